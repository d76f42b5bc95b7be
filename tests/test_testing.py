"""`fastapi_tenancy.testing`: the helpers users build their tests on."""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI

from fastapi_tenancy import (
    MissingDependencyError,
    TenancyConfig,
    TenancyManager,
    Tenant,
    TenantStatus,
    current_tenant,
    current_tenant_or_none,
)
from fastapi_tenancy.dependencies import get_current_tenant
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.testing import (
    create_tenant,
    memory_manager,
    override_tenant,
    run_lifespan,
    tenant_client,
    unique_identifier,
)
from tests.apps import Base, Order, build_app


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
