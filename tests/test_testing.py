"""`fastapi_tenancy.testing`: the helpers users build their tests on."""

import asyncio
import subprocess
import sys
import types
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.pool import QueuePool
from starlette.requests import HTTPConnection

from fastapi_tenancy import (
    ConfigurationError,
    MissingDependencyError,
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    Tenant,
    TenantStatus,
    current_tenant,
    current_tenant_or_none,
)
from fastapi_tenancy.dependencies import get_current_tenant
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.testing import (
    create_tenant,
    memory_manager,
    override_tenant,
    retarget,
    retargeted_config,
    run_lifespan,
    template_schema,
    tenant_client,
    unique_identifier,
)
from tests.apps import QUICKSTART_URL, Base, Order, build_app, quickstart_as_written


@pytest.fixture
async def manager() -> AsyncIterator[TenancyManager]:
    manager = memory_manager()
    yield manager
    await manager.close()


async def test_memory_manager_keeps_everything_in_memory(manager: TenancyManager) -> None:
    assert isinstance(manager.store, InMemoryTenantStore)
    assert manager.config.database_url == "sqlite+aiosqlite://"
    custom = memory_manager(tenant_header_name="X-Org", schema_prefix="org_")
    assert (custom.config.tenant_header_name, custom.config.schema_prefix) == ("X-Org", "org_")
    config = TenancyConfig(database_url="sqlite://", cache_ttl=0)
    assert memory_manager(config).config is config


async def test_create_tenant_registers_active_tenants_with_their_tables(manager: TenancyManager) -> None:
    first = await create_tenant(manager, app_metadata=Base.metadata)
    second = await create_tenant(manager, "acme-corp", name="Acme", metadata={"plan": "pro"})
    assert first.identifier != unique_identifier() and first.identifier.startswith("t-")
    assert (second.identifier, second.name, second.metadata) == ("acme-corp", "Acme", {"plan": "pro"})
    assert {first.status, second.status} == {TenantStatus.ACTIVE}
    async with manager.session(first) as session:
        session.add(Order(id=1, description="made"))
        await session.commit()
        assert await session.scalar(sa.select(sa.func.count()).select_from(Order)) == 1


async def test_tenant_clients_see_only_their_tenant(manager: TenancyManager) -> None:
    acme = await create_tenant(manager, app_metadata=Base.metadata)
    globex = await create_tenant(manager, app_metadata=Base.metadata)
    app = build_app(manager)
    # Overlapping primary keys: both tenants have order 1.
    async with tenant_client(app, acme, manager=manager) as a, tenant_client(app, globex.identifier) as g:
        assert (await a.post("/orders", params={"order_id": 1, "description": "acme's"})).status_code == 200
        assert (await g.post("/orders", params={"order_id": 1, "description": "globex's"})).status_code == 200
        assert (await a.get("/orders/1")).json() == {"id": 1, "description": "acme's"}
        assert (await g.get("/orders/1")).json() == {"id": 1, "description": "globex's"}
    async with tenant_client(app) as nobody:
        response = await nobody.get("/orders")
        assert (response.status_code, response.json()) == (400, {"detail": "Tenant identifier missing"})


async def test_tenant_client_uses_the_managers_header() -> None:
    manager = memory_manager(tenant_header_name="X-Org")
    try:
        acme = await create_tenant(manager, app_metadata=Base.metadata)
        app = build_app(manager)
        async with tenant_client(app, acme, manager=manager) as client:
            assert client.headers["X-Org"] == acme.identifier
            assert (await client.get("/orders")).json()["tenant"] == acme.identifier
        async with tenant_client(app, acme, header="X-Other") as client:
            assert "X-Org" not in client.headers and client.headers["X-Other"] == acme.identifier
            assert (await client.get("/orders")).status_code == 400
    finally:
        await manager.close()


async def test_run_lifespan_runs_startup_and_shutdown() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)
    async with run_lifespan(app) as running:
        assert running is app and events == ["startup"]
    assert events == ["startup", "shutdown"]


async def test_override_tenant_reaches_dependencies_and_current_tenant(manager: TenancyManager) -> None:
    acme = await create_tenant(manager, app_metadata=Base.metadata)
    app = FastAPI()  # no middleware: the override stands in for it

    @app.get("/who")
    async def who(tenant: Annotated[Tenant, Depends(get_current_tenant)]) -> dict[str, Any]:
        return {"dependency": tenant.identifier, "context": current_tenant().identifier}

    async with tenant_client(app) as client:
        assert (await client.get("/who")).status_code == 400  # no tenant, no data
        with override_tenant(app, acme):
            response = await client.get("/who")
            assert response.json() == {"dependency": acme.identifier, "context": acme.identifier}
            # The tenant was set for the request only; ASGITransport runs it in this task.
            assert current_tenant_or_none() is None
        assert get_current_tenant not in app.dependency_overrides
        assert (await client.get("/who")).status_code == 400


async def test_override_tenant_restores_an_earlier_override(manager: TenancyManager) -> None:
    acme = await create_tenant(manager)
    globex = await create_tenant(manager)
    app = FastAPI()
    with override_tenant(app, acme):
        outer = app.dependency_overrides[get_current_tenant]
        with override_tenant(app, globex):
            assert app.dependency_overrides[get_current_tenant] is not outer
        assert app.dependency_overrides[get_current_tenant] is outer


@pytest.mark.parametrize("module", ["testing", "probe"])
def test_the_helpers_name_their_extra_when_httpx_is_missing(module: str) -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from fastapi_tenancy import MissingDependencyError\n"
        f"try:\n    import fastapi_tenancy.{module}\n"
        "except MissingDependencyError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "httpx is not installed: pip install 'fastapi-tenancy[testing]'", result
    assert issubclass(MissingDependencyError, ImportError)


async def test_concurrent_writes_are_all_kept_per_tenant(manager: TenancyManager) -> None:
    # Each in-memory tenant database has one connection; concurrent requests take turns
    # on it. Before they did, 10 concurrent POSTs all answered 200 and stored 7 or 8.
    acme = await create_tenant(manager, app_metadata=Base.metadata)
    globex = await create_tenant(manager, app_metadata=Base.metadata)
    app = build_app(manager)
    async with tenant_client(app, acme, manager=manager) as a, tenant_client(app, globex.identifier) as g:
        clients = {acme.identifier: a, globex.identifier: g}

        async def post(tenant: str, order_id: int) -> tuple[str, int, int]:
            response = await clients[tenant].post(
                "/orders", params={"order_id": order_id, "description": f"{tenant}'s"}
            )
            return tenant, order_id, response.status_code

        # Overlapping primary keys: both tenants write orders 1 to 10, all at once.
        results = await asyncio.gather(*(post(t, i) for i in range(1, 11) for t in clients))
        for tenant, client in clients.items():
            acknowledged = sorted(i for who, i, status in results if who == tenant and status == 200)
            assert acknowledged == list(range(1, 11)), results
            orders = (await client.get("/orders")).json()["orders"]
            assert orders == [{"id": i, "description": f"{tenant}'s"} for i in acknowledged]


def test_the_probe_is_exported_here_too_whichever_module_is_imported_first() -> None:
    import fastapi_tenancy.probe
    import fastapi_tenancy.testing
    from fastapi_tenancy.errors import IsolationError

    assert fastapi_tenancy.testing.assert_isolated is fastapi_tenancy.probe.assert_isolated
    assert fastapi_tenancy.testing.IsolationReport is fastapi_tenancy.probe.IsolationReport
    assert fastapi_tenancy.testing.IsolationError is IsolationError
    assert set(fastapi_tenancy.probe.__all__) < set(fastapi_tenancy.testing.__all__)
    for first, then in [("probe", "testing"), ("testing", "probe")]:
        code = f"import fastapi_tenancy.{first}, fastapi_tenancy.{then}; print('ok')"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == "ok", result.stderr


# -- an app that builds its manager at import (the Quick Start) ------------------------------


def _import_quickstart(monkeypatch: pytest.MonkeyPatch, *config_lines: str) -> Any:
    """The Quick Start's main.py as written (its database URL a literal), imported as a module."""
    module = types.ModuleType(f"quickstart_{uuid.uuid4().hex[:8]}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(quickstart_as_written(*config_lines), "main.py", "exec"), module.__dict__)  # noqa: S102
    return module


def _never_connected(manager: TenancyManager) -> bool:
    """Whether the engines the app built at import never opened a connection."""
    engines = [manager.engine, getattr(manager.store, "engine", None)]
    pools = [engine.pool for engine in engines if engine is not None]
    queues = [pool for pool in pools if isinstance(pool, QueuePool)]
    assert queues and len(queues) == len(pools)
    return all((pool.checkedin(), pool.checkedout()) == (0, 0) for pool in queues)


@pytest.fixture(params=["sqlite", "postgres"])
def test_database(request: pytest.FixtureRequest) -> str:
    return "sqlite://" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


async def test_retarget_runs_an_app_built_at_import_on_the_test_database(
    monkeypatch: pytest.MonkeyPatch, test_database: str
) -> None:
    main = _import_quickstart(monkeypatch)
    assert main.manager.config.database_url == QUICKSTART_URL  # TENANCY_* could not change it
    async with retarget(main.manager, database_url=test_database) as manager, run_lifespan(main.app):
        assert manager is main.manager  # the object the middleware and get_db hold
        assert manager.config.backend == ("sqlite" if test_database == "sqlite://" else "postgresql")
        assert (manager.config.resolution_strategy, manager.config.isolation_strategy) == ("header", "schema")
        acme = await create_tenant(manager, app_metadata=main.Base.metadata)
        globex = await create_tenant(manager, app_metadata=main.Base.metadata)
        async with tenant_client(main.app, acme, manager=manager) as a, tenant_client(main.app, globex) as g:
            # Overlapping primary keys, through the app's own routes and dependency.
            assert (await a.post("/orders", params={"description": "acme's"})).json()["id"] == 1
            assert (await g.post("/orders", params={"description": "globex's"})).json()["id"] == 1
            listed = (await a.get("/orders")).json()
            assert listed == {"tenant": acme.identifier, "orders": [{"id": 1, "description": "acme's"}]}
            assert (await g.get("/orders")).json()["orders"] == [{"id": 1, "description": "globex's"}]
            assert (await a.get("/orders", headers={"X-Tenant-ID": "nobody"})).status_code == 404
    # Restored as the app built it, unstarted: its own database was never reached.
    assert main.manager.config.database_url == QUICKSTART_URL
    assert not main.manager._initialized and _never_connected(main.manager)
    async with retarget(main.manager) as again:  # and it can be retargeted again, for the next test
        assert await create_tenant(again, acme.identifier)  # a new registry: the name is free


async def test_retarget_keeps_the_apps_hooks_and_custom_resolver() -> None:
    async def from_query(connection: HTTPConnection) -> str | None:
        return connection.query_params.get("tenant")

    app_config = TenancyConfig(database_url=QUICKSTART_URL, resolution_strategy="custom")
    manager = TenancyManager(app_config, resolver=from_query)
    seen: list[str] = []

    @manager.events.on(LifecycleEvent.PROVISIONED)
    def provisioned(event: TenantEvent) -> None:
        seen.append(event.tenant.identifier)

    app = build_app(manager)
    async with retarget(manager):
        acme = await create_tenant(manager, app_metadata=Base.metadata)
        assert seen == [acme.identifier]
        async with tenant_client(app) as client:
            response = await client.get("/orders", params={"tenant": acme.identifier})
            assert response.json() == {"tenant": acme.identifier, "orders": []}, response.text
    assert manager.config is app_config and _never_connected(manager)


async def test_retarget_refuses_a_started_manager() -> None:
    started = memory_manager()
    await started.initialize()
    try:
        with pytest.raises(ConfigurationError, match="not initialized yet"):
            async with retarget(started):
                pass
        with pytest.raises(TypeError, match="a config or settings"):
            async with retarget(memory_manager(), TenancyConfig(database_url="sqlite://"), cache_ttl=1):
                pass
    finally:
        await started.close()


def test_retargeted_config_keeps_the_apps_settings_but_not_its_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANCY_REDIS_URL", "redis://cache.internal:6379/0")
    monkeypatch.setenv("TENANCY_CACHE_TTL", "7")
    app_config = TenancyConfig(
        database_url=QUICKSTART_URL,
        database_pgbouncer=True,
        redis_url="redis://redis.internal:6379/0",
        tenant_header_name="X-Org",
        schema_template="orders_template",
    )
    config = retargeted_config(app_config, database_url="postgresql://postgres@127.0.0.1/test")
    assert (config.tenant_header_name, config.schema_template) == ("X-Org", "orders_template")
    assert config.database_url == "postgresql+asyncpg://postgres@127.0.0.1/test"
    assert (config.redis_url, config.database_pgbouncer, config.database_owner_url) == (None, False, None)
    assert config.cache_ttl == 7  # a field the app left unset: the test's environment fills it
    assert retargeted_config(app_config, cache_ttl=0).database_url == "sqlite+aiosqlite://"


async def _schemas(manager: TenancyManager) -> set[str]:
    async with manager.engine.connect() as conn:
        return set((await conn.scalars(sa.text("SELECT nspname FROM pg_namespace"))).all())


@pytest.mark.postgres
async def test_template_schema_makes_a_missing_template_for_the_test(postgres_url: str) -> None:
    manager = memory_manager(database_url=postgres_url, schema_template="orders_template")
    try:
        # A fresh database has no template: registrations cannot clone it.
        with pytest.raises(ProvisioningError, match="template schema 'orders_template' does not exist"):
            await create_tenant(manager, app_metadata=Base.metadata)
        async with template_schema(manager, Base.metadata) as made:
            assert made and "orders_template" in await _schemas(manager)
            acme = await create_tenant(manager, app_metadata=Base.metadata)
            async with manager.session(acme) as session:  # cloned, with the tables of Base
                session.add(Order(id=1, description="acme's"))
                await session.commit()
            async with template_schema(manager, None) as made_again:  # one that exists is kept
                assert not made_again
            assert "orders_template" in await _schemas(manager)
        assert "orders_template" not in await _schemas(manager)
        async with template_schema(memory_manager(), Base.metadata) as made:  # no template: nothing
            assert not made
    finally:
        await manager.close()
