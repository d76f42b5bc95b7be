"""The pytest plugin of fastapi-tenancy: fixtures named `tenancy_*` for testing an app built on it.

Loaded by pytest through the `pytest11` entry point whenever fastapi-tenancy is
installed, so importing it is cheap: pytest and the standard library only (plus
pytest-asyncio, itself a loaded plugin, when installed). It is a top-level
package, not a module of `fastapi_tenancy`, because importing any module of that
package imports the whole library (about a second here). Nothing is autouse and
no hook changes a run: a suite that uses no `tenancy_*` fixture sees no change.
The fixtures import the library when a test asks for them.

Fixtures to override (plain pytest overriding, in your conftest.py or test module):

- `tenancy_app`: your FastAPI app (required by `tenancy_client`).
- `tenancy_metadata`: the `MetaData` whose tables every new tenant gets (default none).
- `tenancy_database_url`: where tenants live (default `"sqlite://"`, all in memory);
  return `tenancy_postgres_url` to use PostgreSQL.
- `tenancy_config`: the whole `TenancyConfig`, built from `tenancy_database_url`.
- `tenancy_app_manager`: the manager your app built at import (default none); the
  plugin then runs that manager, rebuilt on `tenancy_config`, for each test.
- `tenancy_manager`: the manager; override it to yield a manager of your own.

Fixtures to use: `tenancy_manager`, `tenancy_tenant_factory`, `tenancy_client`,
`tenancy_postgres_url`. The async ones need pytest-asyncio
(`pip install 'fastapi-tenancy[testing]'`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import pytest

try:
    # pytest-asyncio's decorator works in its strict and auto modes alike.
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - without it pytest itself says async fixtures need a plugin
    async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:
    import httpx
    import sqlalchemy as sa

    from fastapi_tenancy.config import TenancyConfig
    from fastapi_tenancy.manager import TenancyManager
    from fastapi_tenancy.tenant import Tenant

__all__ = [
    "tenancy_app",
    "tenancy_app_manager",
    "tenancy_client",
    "tenancy_config",
    "tenancy_database_url",
    "tenancy_manager",
    "tenancy_metadata",
    "tenancy_postgres_url",
    "tenancy_tenant_factory",
]

POSTGRES_URL_VARIABLE = "TENANCY_TEST_POSTGRES_URL"


@pytest.fixture
def tenancy_app() -> Any:
    """Your FastAPI app, built on `tenancy_manager`: override this fixture to provide it."""
    pytest.fail(
        "define a `tenancy_app` fixture returning your FastAPI app (built on `tenancy_manager`) "
        "to use `tenancy_client`",
        pytrace=False,
    )


@pytest.fixture
def tenancy_metadata() -> sa.MetaData | None:
    """The `MetaData` whose tables each tenant of `tenancy_tenant_factory` gets (override it)."""
    return None


@pytest.fixture
def tenancy_database_url() -> str:
    """Where `tenancy_manager` keeps tenants: `"sqlite://"`, an in-memory database each.

    Override it to return `tenancy_postgres_url` to test on PostgreSQL schemas.
    """
    return "sqlite://"


@pytest.fixture
def tenancy_app_manager() -> TenancyManager | None:
    """The manager your app builds at import (`from main import manager`): override to return it.

    Default None: `tenancy_manager` is a manager of the plugin's own. Given one, the
    plugin runs that very manager (the app's middleware and dependencies hold it) on
    `tenancy_config` for each test, and restores it afterwards, unstarted.
    """
    return None


@pytest.fixture
def tenancy_config(tenancy_database_url: str, tenancy_app_manager: TenancyManager | None) -> TenancyConfig:
    """The `TenancyConfig` of `tenancy_manager`, on `tenancy_database_url`.

    With `tenancy_app_manager`, the app's own settings (strategies, header,
    `schema_template`, ...) without its servers (`retargeted_config`); otherwise the
    defaults. `TENANCY_*` variables fill the fields left unset.
    """
    from fastapi_tenancy.config import TenancyConfig
    from fastapi_tenancy.testing import retargeted_config

    if tenancy_app_manager is not None:
        return retargeted_config(tenancy_app_manager.config, database_url=tenancy_database_url)
    return TenancyConfig(database_url=tenancy_database_url)


@async_fixture
async def tenancy_manager(
    tenancy_config: TenancyConfig, tenancy_app_manager: TenancyManager | None
) -> AsyncIterator[TenancyManager]:
    """An initialized `TenancyManager` with the in-memory registry, closed after the test.

    The app's own manager when `tenancy_app_manager` names it, rebuilt on
    `tenancy_config` for the test (`fastapi_tenancy.testing.retarget`).
    """
    from fastapi_tenancy.manager import TenancyManager
    from fastapi_tenancy.storage.memory import InMemoryTenantStore
    from fastapi_tenancy.testing import retarget

    if tenancy_app_manager is not None:
        async with retarget(tenancy_app_manager, tenancy_config) as manager:
            await manager.initialize()
            yield manager
        return
    manager = TenancyManager(tenancy_config, InMemoryTenantStore())
    await manager.initialize()
    try:
        yield manager
    finally:
        await manager.close()


@async_fixture
async def tenancy_tenant_factory(
    tenancy_manager: TenancyManager, tenancy_metadata: sa.MetaData | None
) -> AsyncIterator[Callable[..., Awaitable[Tenant]]]:
    """`await tenancy_tenant_factory("acme")`: a new active tenant with the `tenancy_metadata` tables.

    The identifier defaults to a unique one; `name=` and `metadata=` are passed on.
    Every tenant made is destroyed with its data after the test (a schema dropped,
    an in-memory database closed). With `schema_template` set, a template missing
    from the database is made from `tenancy_metadata` first, and dropped after the
    test (`fastapi_tenancy.testing.template_schema`).
    """
    from fastapi_tenancy.errors import TenantNotFoundError
    from fastapi_tenancy.testing import template_schema

    made: list[Tenant] = []
    async with AsyncExitStack() as template:
        template_ready: list[bool] = []  # entered at the first tenant, once the manager is started

        async def make(
            identifier: str | None = None, *, name: str | None = None, metadata: dict[str, Any] | None = None
        ) -> Tenant:
            await tenancy_manager.initialize()  # idempotent; an app's own manager may not be started
            if not template_ready:
                template_ready.append(
                    await template.enter_async_context(template_schema(tenancy_manager, tenancy_metadata))
                )
            identifier = identifier if identifier is not None else f"t-{uuid.uuid4().hex[:12]}"
            tenant = await tenancy_manager.register_tenant(
                identifier, name or identifier, app_metadata=tenancy_metadata, metadata=metadata
            )
            made.append(tenant)
            return tenant

        yield make
        for tenant in reversed(made):
            try:
                await tenancy_manager.delete_tenant(tenant.identifier, destroy_data=True)
            except TenantNotFoundError:
                pass  # the test purged it itself


@async_fixture
async def tenancy_client(
    tenancy_app: Any, tenancy_manager: TenancyManager
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """`tenancy_client(tenant)`: an `httpx.AsyncClient` calling `tenancy_app` in process as `tenant`.

    The tenant goes in the manager's tenant header (`tenant=None` sends none);
    keyword arguments go to `fastapi_tenancy.testing.tenant_client`. Uses
    `httpx.ASGITransport`, not Starlette's `TestClient`; the app's lifespan is not
    run (the manager is started by `tenancy_manager`). Clients are closed after the test.
    """
    from fastapi_tenancy.testing import tenant_client

    clients: list[httpx.AsyncClient] = []

    def make(tenant: Tenant | str | None = None, **options: Any) -> httpx.AsyncClient:
        client = tenant_client(tenancy_app, tenant, manager=tenancy_manager, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture(scope="session")
def tenancy_postgres_url() -> Iterator[str]:
    """A PostgreSQL database made for this test session, dropped at its end.

    Made on the server of `TENANCY_TEST_POSTGRES_URL` (the user needs CREATEDB);
    the tests that use it skip when the variable is unset. One database per
    session (per worker under pytest-xdist); each test's tenants are schemas in
    it, created by `tenancy_tenant_factory` and dropped after the test. Override
    the fixture to return a database of your own instead.
    """
    server = os.environ.get(POSTGRES_URL_VARIABLE)
    if not server:
        pytest.skip(f"set {POSTGRES_URL_VARIABLE} to a PostgreSQL server URL to run tests on PostgreSQL")
    from sqlalchemy.engine import make_url

    from fastapi_tenancy.urls import normalise_database_url

    url = make_url(normalise_database_url(server))
    name = f"tenancy_test_{uuid.uuid4().hex[:12]}"
    _run(_admin(url.render_as_string(hide_password=False), f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        _run(
            _admin(
                url.render_as_string(hide_password=False), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            )
        )


async def _admin(url: str, statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run `coroutine` on a loop of its own, in a thread: callable whether or not a loop runs here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="tenancy-postgres-admin")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
