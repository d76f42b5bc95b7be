"""Provisioning pipelines on real PostgreSQL: steps run in the new tenant's scope on its own
storage, the tenant is served only once they all succeeded, a failing step undoes the whole
registration, background registrations are queued and visible, `seed_tenant` runs them again."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import (
    ConfigurationError,
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    Tenant,
    TenantInactiveError,
    TenantNotFoundError,
    TenantStatus,
    current_tenant,
)
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.provisioning import ProvisioningPipeline

from .apps import Base, Order, build_app


@pytest.fixture
async def manager(postgres_url: str) -> AsyncIterator[TenancyManager]:
    # A pool of one connection: every step and request reuses the same physical connection.
    config = TenancyConfig(database_url=postgres_url, database_pool_size=1, database_max_overflow=0)
    manager = TenancyManager(config)
    await manager.initialize()
    yield manager
    await manager.close()


async def _orders(manager: TenancyManager, slug: str) -> list[tuple[int, str]]:
    async with manager.session(slug) as session:
        return [(o.id, o.description) for o in (await session.scalars(sa.select(Order).order_by(Order.id)))]


async def _schemas(manager: TenancyManager) -> list[str]:
    async with manager.engine.connect() as conn:
        query = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant_%' ORDER BY 1"
        return list((await conn.scalars(sa.text(query))).all())


async def test_steps_seed_each_new_tenant_in_its_own_scope(manager: TenancyManager) -> None:
    calls: list[tuple[str, str, TenantStatus]] = []

    @manager.provisioning.step
    async def seed_orders(tenant: Tenant, session: AsyncSession) -> None:
        # The same primary key in every tenant: only the tenant's own schema can take it.
        session.add(Order(id=1, description=f"welcome to {current_tenant().identifier}"))
        calls.append(("seed_orders", tenant.identifier, tenant.status))

    @manager.provisioning.step(name="first-admin")
    async def first_admin(tenant: Tenant, session: AsyncSession) -> None:
        # The step before it committed: its row is there.
        count = (await session.execute(sa.select(sa.func.count()).select_from(Order))).scalar_one()
        session.add(Order(id=2, description=f"admin of {tenant.identifier} (after {count})"))
        calls.append(("first-admin", tenant.identifier, tenant.status))

    assert [s.name for s in manager.provisioning.steps] == ["seed_orders", "first-admin"]
    for slug in ("alpha", "beta"):
        tenant = await manager.register_tenant(slug, slug.title(), app_metadata=Base.metadata)
        assert tenant.status is TenantStatus.ACTIVE
    assert calls == [
        ("seed_orders", "alpha", TenantStatus.PROVISIONING),
        ("first-admin", "alpha", TenantStatus.PROVISIONING),
        ("seed_orders", "beta", TenantStatus.PROVISIONING),
        ("first-admin", "beta", TenantStatus.PROVISIONING),
    ]
    assert await _orders(manager, "alpha") == [(1, "welcome to alpha"), (2, "admin of alpha (after 1)")]
    assert await _orders(manager, "beta") == [(1, "welcome to beta"), (2, "admin of beta (after 1)")]


async def test_a_failing_step_undoes_the_whole_registration(manager: TenancyManager) -> None:
    undone: list[str] = []
    events: list[tuple[str, dict[str, object]]] = []
    manager.events.add(lambda e: events.append((e.event.value, dict(e.details))))

    async def tell_billing(tenant: Tenant, session: AsyncSession) -> None:
        pass

    async def take_back_billing(tenant: Tenant) -> None:
        undone.append(tenant.identifier)

    async def seed(tenant: Tenant, session: AsyncSession) -> None:
        session.add(Order(id=1, description="seeded"))
        await session.flush()
        raise RuntimeError("the webhook answered 500")

    manager.provisioning.add(tell_billing, undo=take_back_billing)
    manager.provisioning.add(seed)
    with pytest.raises(
        ProvisioningError, match="step 'seed' failed for tenant 'acme': RuntimeError"
    ) as caught:
        await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert undone == ["acme"]
    with pytest.raises(TenantNotFoundError):
        await manager.get_tenant("acme")
    assert await _schemas(manager) == []  # the storage went too
    assert events[-1] == ("purged", {"reason": "provisioning failed", "error": "ProvisioningError"})
    assert [e for e, _ in events] == ["registered", "purged"]

    # The slug is free again; with steps that work, it registers.
    fixed = TenancyManager(manager.config)
    await fixed.initialize()
    try:
        fixed.provisioning.add(tell_billing, undo=take_back_billing)
        assert (await fixed.register_tenant("acme", "Acme", app_metadata=Base.metadata)).is_active
    finally:
        await fixed.close()


async def test_a_background_registration_is_queued_visible_and_served_only_when_done(
    manager: TenancyManager, postgres_url: str
) -> None:
    manager.provisioning = manager._registration.provisioning = ProvisioningPipeline(concurrency=1)
    release, first_started = asyncio.Event(), asyncio.Event()
    started: list[str] = []

    @manager.provisioning.step
    async def slow_seed(tenant: Tenant, session: AsyncSession) -> None:
        started.append(tenant.identifier)
        first_started.set()
        await release.wait()
        session.add(Order(id=1, description=f"{tenant.identifier}-1"))

    first = await manager.register_tenant("alpha", "Alpha", app_metadata=Base.metadata, background=True)
    second = await manager.register_tenant("beta", "Beta", app_metadata=Base.metadata, background=True)
    assert first.status is second.status is TenantStatus.PROVISIONING
    alpha_job, beta_job = manager.provisioning.job("alpha"), manager.provisioning.job("beta")
    assert alpha_job is not None and beta_job is not None
    await first_started.wait()
    await asyncio.sleep(0.05)  # time enough for the queue to start a second job, were it allowed to
    assert started == ["alpha"]
    assert (alpha_job.state, alpha_job.step, beta_job.state) == ("running", "slow_seed", "queued")

    # Another process sees the status in the registry; requests are refused meanwhile.
    other = TenancyManager(TenancyConfig(database_url=postgres_url))
    try:
        assert (await other.get_tenant("alpha")).status is TenantStatus.PROVISIONING
    finally:
        await other.close()
    transport = httpx.ASGITransport(app=build_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.get("/orders", headers={"X-Tenant-ID": "alpha"})
        assert (refused.status_code, refused.json()) == (
            403,
            {"detail": "Tenant is not active (status: provisioning)"},
        )
        with pytest.raises(TenantInactiveError):
            await _orders(manager, "alpha")

        release.set()
        assert (await alpha_job.wait()).status is TenantStatus.ACTIVE
        assert (await beta_job.wait()).status is TenantStatus.ACTIVE
        assert (alpha_job.state, beta_job.state) == ("succeeded", "succeeded")
        served = await client.get("/orders", headers={"X-Tenant-ID": "beta"})
        assert served.json()["orders"] == [{"id": 1, "description": "beta-1"}], served.text


async def test_a_failed_background_registration_is_undone_and_says_why(
    manager: TenancyManager, caplog: pytest.LogCaptureFixture
) -> None:
    @manager.provisioning.step
    async def broken(tenant: Tenant, session: AsyncSession) -> None:
        raise ValueError("no plan named 'gold'")

    await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata, background=True)
    job = manager.provisioning.job("acme")
    assert job is not None
    with pytest.raises(ProvisioningError, match="no plan named 'gold'"):
        await job.wait()
    assert (job.state, job.step) == ("failed", "broken")
    assert job.error is not None and "no plan named 'gold'" in job.error
    with pytest.raises(TenantNotFoundError):
        await manager.get_tenant("acme")
    assert await _schemas(manager) == []
    assert "background registration of tenant acme failed and was undone" in caplog.text


async def test_closing_the_manager_undoes_unfinished_background_registrations(postgres_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    entered = asyncio.Event()

    @manager.provisioning.step
    async def forever(tenant: Tenant, session: AsyncSession) -> None:
        entered.set()
        await asyncio.sleep(3600)

    await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata, background=True)
    await entered.wait()
    await manager.close()
    job = manager.provisioning.job("acme")
    assert job is not None and job.state == "failed"
    await manager.initialize()
    try:
        with pytest.raises(TenantNotFoundError):
            await manager.get_tenant("acme")
        assert await _schemas(manager) == []
    finally:
        await manager.close()


async def test_seed_runs_the_steps_again_for_an_existing_tenant(manager: TenancyManager) -> None:
    for slug in ("alpha", "beta"):
        await manager.register_tenant(slug, slug.title(), app_metadata=Base.metadata)
    seen: list[TenantEvent] = []
    manager.events.add(seen.append, LifecycleEvent.SEEDED)
    with pytest.raises(ConfigurationError, match="no provisioning steps"):
        await manager.seed_tenant("alpha")

    @manager.provisioning.step
    async def plans(tenant: Tenant, session: AsyncSession) -> None:
        # Written to run twice: insert what is missing.
        if await session.get(Order, 1) is None:
            session.add(Order(id=1, description=f"{current_tenant().identifier} plan"))

    @manager.provisioning.step
    async def audit_trail(tenant: Tenant, session: AsyncSession) -> None:
        session.add(Order(id=100 + len(await _orders_in(session)), description="trail"))

    assert await manager.seed_tenant("alpha") == ["plans", "audit_trail"]
    assert await manager.seed_tenant("alpha", steps=["plans"]) == ["plans"]
    assert await _orders(manager, "alpha") == [(1, "alpha plan"), (101, "trail")]
    assert await _orders(manager, "beta") == []  # another tenant's seed never reaches it
    assert [(e.tenant.identifier, e.details["steps"]) for e in seen] == [
        ("alpha", ("plans", "audit_trail")),
        ("alpha", ("plans",)),
    ]
    with pytest.raises(ConfigurationError, match="no provisioning step named nope"):
        await manager.seed_tenant("alpha", steps=["nope"])
    await manager.start_maintenance("beta")  # operators seed while its requests wait
    assert await manager.seed_tenant("beta", steps=["plans"]) == ["plans"]
    await manager.delete_tenant("beta")
    with pytest.raises(TenantInactiveError):
        await manager.seed_tenant("beta")


async def _orders_in(session: AsyncSession) -> list[Order]:
    return list((await session.scalars(sa.select(Order))).all())


def test_step_names_are_unique_and_steps_callable() -> None:
    pipeline = ProvisioningPipeline()

    async def seed(tenant: Tenant, session: AsyncSession) -> None: ...

    pipeline.add(seed)
    with pytest.raises(ConfigurationError, match="already a provisioning step named 'seed'"):
        pipeline.add(seed)
    pipeline.add(seed, name="seed-again")
    with pytest.raises(TypeError):
        pipeline.add("seed")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ProvisioningPipeline(concurrency=0)
