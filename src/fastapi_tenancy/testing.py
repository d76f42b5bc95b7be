"""Helpers for testing an application built on fastapi-tenancy (no pytest needed).

- `memory_manager()`: a manager on the in-memory registry and in-memory SQLite tenants.
- `create_tenant()`: register a tenant with a fresh identifier and the app's tables.
- `tenant_client()`: an `httpx.AsyncClient` calling the app in process as one tenant.
- `override_tenant()`: make routes see a given tenant, without the middleware.
- `run_lifespan()`: run the app's startup and shutdown (`ASGITransport` does not).
- `retarget()`: run the manager an app built at import on test services instead of its own.
- `template_schema()`: the `schema_template` schema, made from your models, on a test database.
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
from sqlalchemy.engine import make_url

from .config import TenancyConfig
from .context import reset_current_tenant, set_current_tenant
from .dependencies import get_current_tenant
from .errors import ConfigurationError, IsolationError, MissingDependencyError
from .isolation.base import create_tables, tenant_tables
from .manager import TenancyManager
from .probe import IsolationReport, ProbeWarning, assert_isolated
from .storage.base import TenantStore
from .storage.memory import InMemoryTenantStore
from .tenant import Tenant
from .urls import normalise_database_url

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("httpx", "testing") from exc

__all__ = [
    "IsolationError",
    "IsolationReport",
    "ProbeWarning",
    "assert_isolated",
    "create_tenant",
    "memory_manager",
    "override_tenant",
    "retarget",
    "retargeted_config",
    "run_lifespan",
    "template_schema",
    "tenant_client",
    "unique_identifier",
]

_BASE_URL = "http://testserver"

# Settings that reach the app's own servers, or describe its deployment: a test config
# never inherits them (a test must not touch the app's database, Redis or PgBouncer).
_DEPLOYMENT: dict[str, Any] = {
    "database_url": "sqlite://",
    "database_owner_url": None,
    "database_pgbouncer": False,
    "redis_url": None,
}
_POSTGRES_PROVISIONING = ("schema_template", "schema_spares")


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

    as_tenant.overridden_tenant = tenant  # type: ignore[attr-defined]  # read by make_tenant_db_dependency
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


def retargeted_config(config: TenancyConfig, **settings: Any) -> TenancyConfig:
    """The app's `config` for tests: its settings, the test's servers.

        config = retargeted_config(main.manager.config, database_url=test_url)

    Keeps every field the app set (strategies, header name, `schema_template`, ...),
    leaves out those that reach its own servers (`database_url`, `database_owner_url`,
    `redis_url`, `database_pgbouncer`), then applies `settings`. `database_url`
    defaults to `"sqlite://"` (every tenant in memory), where `schema_template` and
    `schema_spares` are left out too: SQLite tenants get their tables from the metadata.
    `TENANCY_*` variables fill only the fields neither the app nor `settings` set.
    """
    kept = {name: getattr(config, name) for name in config.model_fields_set if name not in _DEPLOYMENT}
    merged = {**kept, **_DEPLOYMENT, **settings}
    if make_url(normalise_database_url(merged["database_url"])).get_backend_name() == "sqlite":
        # How PostgreSQL schemas are provisioned fast; SQLite tenants are made from the metadata.
        for name in _POSTGRES_PROVISIONING:
            if name not in settings:
                merged.pop(name, None)
    return type(config)(**merged)


@asynccontextmanager
async def retarget(
    manager: TenancyManager,
    config: TenancyConfig | None = None,
    *,
    store: TenantStore | None = None,
    **settings: Any,
) -> AsyncIterator[TenancyManager]:
    """Within the block, the manager an app built at import runs on test servers.

        async with retarget(main.manager, database_url=test_url):
            ...  # main.app, its lifespan and main's own code all use test_url

    For apps that build their manager at import, as the Quick Start does: the
    middleware, the session dependency and the app's code all hold that object, so
    it is rebuilt in place from `config` (default `retargeted_config(manager.config,
    **settings)`) and `store` (default a new in-memory registry). Its lifecycle hooks
    and a custom resolver are kept; other parts you passed to it are built from the
    config. Refused once the manager is initialized (its pools would already be open
    on the app's servers). On exit it is closed and restored as it was, not started.
    """
    if config is not None and settings:
        raise TypeError("retarget takes a config or settings, not both")
    if manager.initialized:
        raise ConfigurationError(
            "retarget() needs a manager that is not initialized yet: its pools are open on the "
            "app's own servers (retarget it before the app's lifespan runs)"
        )
    config = config if config is not None else retargeted_config(manager.config, **settings)
    resolver = manager.resolver if config.resolution_strategy == "custom" else None
    rebuilt = TenancyManager(config, store if store is not None else InMemoryTenantStore(), resolver=resolver)
    for kinds, hook in manager.events.hooks:  # the hooks the app registered at import
        rebuilt.events.add(hook, *kinds)
    saved = dict(vars(manager))
    vars(manager).update(vars(rebuilt))
    try:
        yield manager
    finally:
        try:
            await manager.close()
        finally:
            vars(manager).clear()
            vars(manager).update(saved)


@asynccontextmanager
async def template_schema(manager: TenancyManager, metadata: sa.MetaData | None) -> AsyncIterator[bool]:
    """The `schema_template` schema, for the block: made from `metadata` if missing, dropped after.

    With `schema_template` set, registrations clone that schema, which
    `fastapi-tenancy migrate upgrade` makes in a real deployment; a fresh test
    database has none, and every registration fails. Yields whether it made the
    template (one that exists is used and left as it is); without
    `schema_template`, does nothing. Starts the manager if needed.
    """
    template = manager.config.schema_template
    if template is None:
        yield False
        return
    await manager.initialize()
    # The role that owns the tenants' schemas (and so clones them) owns their template.
    engine = manager.owner_engine or manager.engine
    async with engine.begin() as conn:
        exists = await conn.scalar(
            sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": template}
        )
        if not exists:
            await conn.execute(sa.text(f'CREATE SCHEMA "{template}"'))
            # As a tenant's tables are made: every name the DDL uses resolves in the template.
            await conn.execute(
                sa.text("SELECT set_config('search_path', :path, true)"), {"path": f'"{template}"'}
            )
            ddl = await conn.execution_options(schema_translate_map={None: template})
            await ddl.run_sync(create_tables, tenant_tables(metadata))
    try:
        yield not exists
    finally:
        if not exists:
            async with engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{template}" CASCADE'))
