"""Helpers for testing an application built on fastapi-tenancy (no pytest needed).

- `memory_manager()`: a manager on the in-memory registry and in-memory SQLite tenants.
- `create_tenant()`: register a tenant with a fresh identifier and the app's tables.
- `tenant_client()`: an `httpx.AsyncClient` calling the app in process as one tenant.
- `override_tenant()`: make routes see a given tenant, without the middleware.
- `run_lifespan()`: run the app's startup and shutdown (`ASGITransport` does not).
- `assert_isolated()`: prove that tenant A's requests neither read nor change tenant B's data
  (from `fastapi_tenancy.probe`, exported here too).

Needs httpx: `pip install 'fastapi-tenancy[testing]'`.
"""

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI

from .config import TenancyConfig
from .context import reset_current_tenant, set_current_tenant
from .dependencies import get_current_tenant
from .errors import IsolationError, MissingDependencyError
from .manager import TenancyManager
from .probe import IsolationReport, assert_isolated
from .storage.memory import InMemoryTenantStore
from .tenant import Tenant

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("httpx", "testing") from exc

__all__ = [
    "IsolationError",
    "IsolationReport",
    "assert_isolated",
    "create_tenant",
    "memory_manager",
    "override_tenant",
    "run_lifespan",
    "tenant_client",
    "unique_identifier",
]

_BASE_URL = "http://testserver"


def memory_manager(config: TenancyConfig | None = None, **settings: Any) -> TenancyManager:
    """A `TenancyManager` for tests: the registry in memory, tenants in in-memory SQLite.

        manager = memory_manager()                      # everything in memory
        manager = memory_manager(database_url=pg_url)   # tenants in PostgreSQL schemas

    `settings` are `TenancyConfig` fields (ignored when `config` is given);
    `database_url` defaults to `"sqlite://"`, where every tenant gets its own
    in-memory database, gone at `close()`. Call `initialize()` before use
    (`create_tenant` does it for you) and `close()` after.
    """
    if config is None:
        config = TenancyConfig(**{"database_url": "sqlite://", **settings})
    return TenancyManager(config, InMemoryTenantStore())


def unique_identifier(prefix: str = "t") -> str:
    """A tenant identifier no other test uses: `t-3f9c0a1b2d4e`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_tenant(
    manager: TenancyManager,
    identifier: str | None = None,
    *,
    name: str | None = None,
    app_metadata: sa.MetaData | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Tenant:
    """Register an active tenant with the tables of `app_metadata`, through the real path.

    `identifier` defaults to a fresh `unique_identifier()`; the manager is
    initialized first if it is not yet (idempotent).
    """
    await manager.initialize()
    identifier = identifier if identifier is not None else unique_identifier()
    return await manager.register_tenant(
        identifier, name if name is not None else identifier, app_metadata=app_metadata, metadata=metadata
    )


def tenant_client(
    app: Any,
    tenant: Tenant | str | None = None,
    *,
    manager: TenancyManager | None = None,
    header: str | None = None,
    base_url: str = _BASE_URL,
    raise_app_exceptions: bool = True,
    **client_options: Any,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` calling `app` in process, every request naming `tenant`.

        async with tenant_client(app, acme, manager=manager) as client:
            response = await client.get("/orders")

    The tenant goes in the header `header`, else `manager.config.tenant_header_name`,
    else `X-Tenant-ID`; `tenant=None` sends none. It uses `httpx.ASGITransport`,
    which does not run the app's lifespan: start the manager yourself, or wrap the
    test in `run_lifespan(app)`. `client_options` go to `httpx.AsyncClient`.
    """
    headers = dict(client_options.pop("headers", None) or {})
    if tenant is not None:
        name = header or (manager.config.tenant_header_name if manager is not None else "X-Tenant-ID")
        headers[name] = tenant.identifier if isinstance(tenant, Tenant) else tenant
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url=base_url, headers=headers, **client_options)


@asynccontextmanager
async def run_lifespan(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan (startup before the block, shutdown after).

    For apps whose lifespan initializes their manager, such as the Quick Start's:
    `httpx.ASGITransport` sends no lifespan events.
    """
    async with app.router.lifespan_context(app):
        yield app


@contextmanager
def override_tenant(app: FastAPI, tenant: Tenant) -> Iterator[Tenant]:
    """Within the block, the app's routes run as `tenant`, whatever the request says.

    Overrides the `get_current_tenant` dependency (so `CurrentTenant` parameters and
    the sessions of `make_tenant_db_dependency` see `tenant`) and sets the current
    tenant while a route runs (so `current_tenant()` sees it too). The
    `TenancyMiddleware` runs before any dependency and still refuses a request
    naming no known tenant: build the app without it for such tests. The previous
    override (or none) is restored on exit.
    """

    async def as_tenant() -> AsyncIterator[Tenant]:
        token = set_current_tenant(tenant)
        try:
            yield tenant
        finally:
            reset_current_tenant(token)

    overrides = app.dependency_overrides
    missing = object()
    previous = overrides.get(get_current_tenant, missing)
    overrides[get_current_tenant] = as_tenant
    try:
        yield tenant
    finally:
        if previous is missing:
            overrides.pop(get_current_tenant, None)
        else:
            overrides[get_current_tenant] = previous  # type: ignore[assignment]
