"""`fastapi_tenancy.probe`: `assert_isolated` passes on correct apps (ours and the Quick Start)
and catches leaky routes."""

import importlib.util
import sys
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyManager, TenancyMiddleware, Tenant
from fastapi_tenancy.dependencies import get_current_tenant, make_tenant_db_dependency
from fastapi_tenancy.errors import IsolationError
from fastapi_tenancy.probe import ProbeWarning, assert_isolated
from fastapi_tenancy.testing import create_tenant, memory_manager, run_lifespan
from tests.apps import Base, Order, build_app

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "main.py"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return "sqlite://" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[TenancyManager]:
    """On both backends; a pool of one connection, so every request reuses the same one."""
    manager = memory_manager(database_url=database_url, database_pool_size=1, database_max_overflow=0)
    await manager.initialize()
    yield manager
    await manager.close()


@pytest.fixture
async def memory() -> AsyncIterator[TenancyManager]:
    """In memory, for the bugs of an app's own code, which are the same on every backend."""
    manager = memory_manager()
    await manager.initialize()
    yield manager
    await manager.close()


async def _tenants(manager: TenancyManager) -> tuple[Tenant, Tenant]:
    a = await create_tenant(manager, app_metadata=Base.metadata)
    b = await create_tenant(manager, app_metadata=Base.metadata)
    return a, b


async def test_passes_on_the_example_app(manager: TenancyManager) -> None:
    a, b = await _tenants(manager)
    report = await assert_isolated(build_app(manager), manager, a, b)
    assert report.findings == []
    assert {"GET /orders", "GET /orders/{order_id}", "POST /orders", "PUT /orders/{order_id}"} <= set(
        report.routes
    )
    assert len(report.b_markers) >= 3, report  # B's three seeded orders, seen through B's own GETs
    assert report.b_identifiers[:3] == [1, 2, 3]  # the same ids as A's: overlapping primary keys
    assert report.statuses.get(200, 0) >= 5, report.statuses


async def test_passes_on_the_quickstart_app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_DATABASE_URL", database_url)
    spec = importlib.util.spec_from_file_location("quickstart_main", QUICKSTART)
    assert spec is not None and spec.loader is not None
    main = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, main)
    spec.loader.exec_module(main)
    async with run_lifespan(main.app):  # the Quick Start's lifespan starts its manager
        a = await create_tenant(main.manager, app_metadata=main.Base.metadata)
        b = await create_tenant(main.manager, app_metadata=main.Base.metadata)
        report = await assert_isolated(main.app, main.manager, a, b)
    assert set(report.routes) == {"GET /orders", "POST /orders"}
    assert report.skipped == ["GET /health"]  # excluded by the app's middleware: no tenant there
    assert report.b_markers and report.findings == []


def _leaky_app(manager: TenancyManager, leak: str, **options: Any) -> FastAPI:
    """The example app plus one route with a classic multi-tenancy bug."""
    app = build_app(manager, **options)
    get_db = make_tenant_db_dependency(manager)
    Session = Annotated[AsyncSession, Depends(get_db)]
    cache: dict[int, dict[str, Any]] = {}

    if leak == "cache":
        # A process-wide cache keyed by the order id alone: the next tenant asking
        # for order 1 gets whoever's order 1 was cached first.
        @app.get("/cached/orders/{order_id}")
        async def cached(order_id: int, session: Session) -> dict[str, Any]:
            if order_id not in cache:
                order = await session.get(Order, order_id)
                if order is None:
                    raise HTTPException(404, "Order not found")
                cache[order_id] = {"id": order.id, "description": order.description}
            return cache[order_id]

    elif leak == "every-tenant":
        # A cleanup route that forgets the request's tenant and acts on all of them.
        @app.delete("/orders/{order_id}")
        async def delete_everywhere(order_id: int) -> dict[str, int]:
            deleted = 0
            for tenant in await manager.list_tenants():
                async with manager.session(tenant) as session:
                    result = await session.execute(sa.delete(Order).where(Order.id == order_id))
                    await session.commit()
                    deleted += int(result.rowcount)  # type: ignore[attr-defined]
            return {"deleted": deleted}

    elif leak == "other-schema":
        # Raw SQL naming other tenants' schemas (PostgreSQL): a report "for the tenant"
        # built by scanning every tenant schema.
        @app.get("/report")
        async def report(
            session: Session, tenant: Annotated[Tenant, Depends(get_current_tenant)]
        ) -> list[str]:
            rows: list[str] = []
            for other in await manager.list_tenants():
                schema = manager.isolation.storage_name(other.identifier)
                sql = f'SELECT description FROM "{schema}".orders ORDER BY id'  # noqa: S608
                rows += (await session.scalars(sa.text(sql))).all()
            return rows

    return app


async def test_catches_a_cache_shared_between_tenants(memory: TenancyManager) -> None:
    a, b = await _tenants(memory)
    with pytest.raises(IsolationError) as caught:
        await assert_isolated(_leaky_app(memory, "cache"), memory, a, b)
    findings = caught.value.report.findings
    assert findings and all("GET /cached/orders/" in f and "returned tenant B's data" in f for f in findings)
    assert "tenant A reached tenant B's data" in str(caught.value)


async def test_catches_a_route_that_changes_every_tenant(memory: TenancyManager) -> None:
    a, b = await _tenants(memory)
    with pytest.raises(IsolationError) as caught:
        await assert_isolated(_leaky_app(memory, "every-tenant"), memory, a, b)
    findings = caught.value.report.findings
    assert any("tenant B's GET /orders changed after tenant A's requests" in f for f in findings), findings


@pytest.mark.postgres
async def test_catches_raw_sql_into_another_tenants_schema(postgres_url: str) -> None:
    manager = memory_manager(database_url=postgres_url, database_pool_size=1, database_max_overflow=0)
    await manager.initialize()
    try:
        a, b = await _tenants(manager)
        with pytest.raises(IsolationError) as caught:
            await assert_isolated(_leaky_app(manager, "other-schema"), manager, a, b)
        assert any(f.startswith("GET /report as tenant A returned") for f in caught.value.report.findings)
        # The same app passes once the leaky route is left out: `skip` works, and the
        # failure above came from that route alone (fresh tenants: the seeded ids start at 1).
        c, d = await _tenants(manager)
        await assert_isolated(_leaky_app(manager, "other-schema"), manager, c, d, skip=["GET /report"])
    finally:
        await manager.close()


def _read_only_app(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    get_db = make_tenant_db_dependency(manager)

    @app.get("/orders")
    async def orders(session: Annotated[AsyncSession, Depends(get_db)]) -> list[str]:
        return list((await session.scalars(sa.select(Order.description).order_by(Order.id))).all())

    return app


async def test_refuses_to_pass_when_nothing_of_b_is_visible(memory: TenancyManager) -> None:
    a, b = await _tenants(memory)
    app = _read_only_app(memory)  # no POST route: nothing is seeded
    with pytest.raises(IsolationError, match="nothing to check"):
        await assert_isolated(app, memory, a, b)
    # Seeded by the test itself, and named with markers=, B's data is checked.
    for tenant, description in ((a, "a-secret-1"), (b, "b-secret-1")):
        async with memory.session(tenant) as session:
            session.add(Order(id=1, description=description))
            await session.commit()
    report = await assert_isolated(app, memory, a, b, markers=["b-secret-1"])
    assert report.b_markers == ["b-secret-1"] and report.routes == ["GET /orders"]


async def test_takes_a_client_factory_for_other_resolvers() -> None:
    manager = memory_manager()
    try:
        a, b = await _tenants(manager)
        app = build_app(manager)
        used: list[str] = []

        def client(tenant: Tenant) -> Any:
            from fastapi_tenancy.testing import tenant_client

            used.append(tenant.identifier)
            return tenant_client(app, tenant, manager=manager, raise_app_exceptions=False)

        await assert_isolated(app, manager, a, b, client=client)
        assert used == [a.identifier, b.identifier]
    finally:
        await manager.close()


def test_module_types() -> None:
    assert issubclass(IsolationError, AssertionError)  # pytest shows it as a failed assertion
    assert isinstance(sys.modules[__name__], types.ModuleType)


# -- what the probe calls, and what it leaves behind ---------------------------------------


class SignUp(BaseModel):
    company: str
    email: str


def _app_with_sign_up(manager: TenancyManager, jobs: list[str], *, leaky: bool = False) -> FastAPI:
    """The example app (or the leaky one) with a sign-up route on an excluded path, as a real app
    has: it registers a tenant and queues a welcome job, and registers a bystander as well (a
    tenant another test could have made meanwhile, made of none of the probe's values)."""
    excluded = ["/health", "/auth/"]
    app = (
        _leaky_app(manager, "cache", excluded_paths=excluded)
        if leaky
        else build_app(manager, excluded_paths=excluded)
    )

    @app.post("/auth/signup")
    async def sign_up(form: SignUp) -> dict[str, str]:
        tenant = await manager.register_tenant(
            f"t-{uuid.uuid4().hex[:12]}", form.company, app_metadata=Base.metadata
        )
        await manager.register_tenant(
            f"bystander-{uuid.uuid4().hex[:12]}", "Bystander", app_metadata=Base.metadata
        )
        jobs.append(f"welcome {form.email}")
        return {"tenant": tenant.identifier}

    return app


async def _identifiers(manager: TenancyManager) -> set[str]:
    return {tenant.identifier for tenant in await manager.list_tenants(limit=1000)}


async def test_leaves_out_the_apps_excluded_paths(manager: TenancyManager) -> None:
    a, b = await _tenants(manager)
    jobs: list[str] = []
    report = await assert_isolated(_app_with_sign_up(manager, jobs), manager, a, b)
    assert jobs == []  # the sign-up route was never called: no tenant, no job
    assert await _identifiers(manager) == {a.identifier, b.identifier}
    assert "POST /auth/signup" in report.skipped and "GET /health" in report.skipped
    assert not [route for route in report.routes if route.endswith(("/auth/signup", "/health"))]
    assert report.b_markers and report.findings == []


async def test_skip_matches_whole_segments_like_excluded_paths(memory: TenancyManager) -> None:
    a, b = await _tenants(memory)
    jobs: list[str] = []
    app = _app_with_sign_up(memory, jobs)
    report = await assert_isolated(app, memory, a, b, skip_excluded=False, skip=["/auth", "PUT /orders/"])
    assert jobs == []
    assert {"POST /auth/signup", "PUT /orders/{order_id}"} <= set(report.skipped)
    assert "GET /orders/{order_id}" in report.routes  # another method, or a path that merely starts alike
    assert "GET /health" in report.routes and "GET /health" not in report.skipped


async def test_warns_of_skip_entries_that_match_no_route(memory: TenancyManager) -> None:
    a, b = await _tenants(memory)
    app = build_app(memory)
    with pytest.warns(ProbeWarning) as caught:
        # /order is not /orders (whole segments); /health is excluded, yet it is a route.
        await assert_isolated(app, memory, a, b, skip=["/order", "GET /health", "DELETE /orders"])
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "assert_isolated: skip entry '/order' matches no route of the app's OpenAPI schema",
        "assert_isolated: skip entry 'DELETE /orders' matches no route of the app's OpenAPI schema",
    ]
    assert all(w.filename == __file__ for w in caught)  # points at the caller's line
    with pytest.raises(ValueError, match="skip entry 'orders': expected '/path' or 'METHOD /path'"):
        await assert_isolated(app, memory, a, b, skip=["orders"])


@pytest.mark.parametrize("leaky", [False, True], ids=["passes", "fails"])
async def test_removes_the_tenants_its_requests_registered(memory: TenancyManager, leaky: bool) -> None:
    a, b = await _tenants(memory)
    jobs: list[str] = []
    app = _app_with_sign_up(memory, jobs, leaky=leaky)
    if leaky:
        with pytest.raises(IsolationError) as caught:
            await assert_isolated(app, memory, a, b, skip_excluded=False)
        report = caught.value.report
    else:
        report = await assert_isolated(app, memory, a, b, skip_excluded=False)
    assert jobs  # called on purpose this time: queued jobs are the app's to undo
    left = await _identifiers(memory)
    bystanders = {i for i in left if i.startswith("bystander-")}
    assert left == {a.identifier, b.identifier} | bystanders  # the probe's sign-ups are gone
    assert len(bystanders) == len(jobs)  # the tenants made of none of its values are not its own
    assert len(report.removed_tenants) == len(jobs) and not set(report.removed_tenants) & left


async def _tenant_schemas(manager: TenancyManager) -> set[str]:
    if manager.config.backend != "postgresql":
        return set()
    async with manager.engine.connect() as conn:
        query = sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_probe\\_%'")
        return set((await conn.scalars(query)).all())


@pytest.mark.parametrize("leaky", [False, True], ids=["passes", "fails"])
async def test_makes_and_removes_its_own_tenants(manager: TenancyManager, leaky: bool) -> None:
    app = _leaky_app(manager, "cache") if leaky else build_app(manager)
    if leaky:
        with pytest.raises(IsolationError) as caught:
            await assert_isolated(app, manager, app_metadata=Base.metadata)
        report = caught.value.report
    else:
        report = await assert_isolated(app, manager, app_metadata=Base.metadata)
    assert len(report.b_markers) >= 3 and report.b_identifiers[:3] == [1, 2, 3]  # fresh tenants
    assert [name.split("-")[1] for name in report.removed_tenants] == ["a", "b"]
    assert await _identifiers(manager) == set()  # the registry is as it was
    assert await _tenant_schemas(manager) == set()  # and their data is gone with them


async def test_takes_both_tenants_or_neither(memory: TenancyManager) -> None:
    a = await create_tenant(memory, app_metadata=Base.metadata)
    with pytest.raises(TypeError, match="both tenants or neither"):
        await assert_isolated(build_app(memory), memory, a)
