"""Hybrid tiers: the tier is chosen at registration and stored, tiers never mix, and a live
tenant moves between them with traffic running."""

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from fastapi_tenancy import (
    ConfigurationError,
    ProvisioningError,
    TenancyConfig,
    TenancyManager,
    TenancyUnavailableError,
    TenantStatus,
)
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.isolation.hybrid import HybridIsolation

from ..apps import SharedBase
from ..conftest import _postgres_admin
from .conftest import Roles
from .test_matrix import Env, shared_settings, two_tenants


@pytest.fixture
async def env(roles: Roles) -> AsyncIterator[Env]:
    # alpha in its own schema, beta in the shared tables; a few connections for traffic.
    async with two_tenants(
        roles.app_url, **shared_settings(roles, "hybrid"), database_pool_size=3
    ) as environment:
        yield environment


async def _admin_rows(roles: Roles, query: str) -> list[tuple[object, ...]]:
    admin = await _postgres_admin(roles.admin_url)  # a superuser sees past row-level security
    try:
        return [tuple(row) for row in await admin.fetch(query)]
    finally:
        await admin.close()


def _orders(env_response: object) -> list[str]:
    return [o["description"] for o in env_response.json()["orders"]]  # type: ignore[attr-defined]


async def test_tiers_never_mix(env: Env, roles: Roles) -> None:
    alpha, beta = await env.manager.get_tenant("alpha"), await env.manager.get_tenant("beta")
    assert (alpha.tier, beta.tier) == ("schema", "rls")
    assert await _admin_rows(roles, "SELECT tenant_id, description FROM public.orders ORDER BY 2") == [
        (beta.id, "beta-1"),
        (beta.id, "beta-3"),
    ]
    assert await _admin_rows(roles, "SELECT description FROM tenant_alpha.orders ORDER BY 1") == [
        ("alpha-1",),
        ("alpha-2",),
    ]
    assert await _admin_rows(roles, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant_%'") == [
        ("tenant_alpha",)
    ]
    # Writes through the app stay in each tenant's tier.
    assert (await env.post("alpha", "/orders", order_id=7, description="alpha-7")).status_code == 200
    assert (await env.post("beta", "/orders", order_id=7, description="beta-7")).status_code == 200
    assert await _admin_rows(roles, "SELECT count(*) FROM public.orders WHERE description LIKE 'alpha%'") == [
        (0,)
    ]
    assert await _admin_rows(
        roles,
        "SELECT count(*) FROM tenant_alpha.orders WHERE tenant_id = '" + alpha.id + "'",  # noqa: S608
    ) == [(3,)]  # the tenant column is filled in the schema tier too


async def test_the_tier_comes_from_the_argument_the_plan_or_the_default(roles: Roles) -> None:
    config = TenancyConfig(
        database_url=roles.app_url,
        database_pool_size=1,
        database_max_overflow=0,
        hybrid_plan_tiers={"enterprise": "schema"},
        hybrid_default_tier="rls",
        **shared_settings(roles, "hybrid"),
    )
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        metadata = SharedBase.metadata
        big = await manager.register_tenant(
            "big", "Big", app_metadata=metadata, metadata={"plan": "enterprise"}
        )
        small = await manager.register_tenant(
            "small", "Small", app_metadata=metadata, metadata={"plan": "free"}
        )
        chosen = await manager.register_tenant("chosen", "C", app_metadata=metadata, tier="schema")
        assert (big.tier, small.tier, chosen.tier) == ("schema", "rls", "schema")
        assert (await manager.get_tenant("big")).tier == "schema"  # stored, not recomputed
        with pytest.raises(ConfigurationError, match="unknown tier 'gold'"):
            await manager.register_tenant("gold", "Gold", app_metadata=metadata, tier="gold")
        assert await manager.store.get_by_identifier("gold") is None
    finally:
        await manager.close()


async def test_a_tier_needs_hybrid_isolation(sqlite_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url))
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match="hybrid"):
            await manager.register_tenant("acme", "Acme", tier="rls")
    finally:
        await manager.close()


STATUSES: dict[int | str, int] = {}  # writes by outcome, over the run (printed with -s)
counter = itertools.count(100)  # order ids of the writes, unique over both moves


async def _traffic(env: Env, stop: asyncio.Event, acknowledged: list[int], crossed: list[str]) -> None:
    """Writes to beta and reads of both tenants until `stop`; records acknowledged writes."""

    async def writer() -> None:
        while not stop.is_set():
            order_id = next(counter)
            try:
                response = await env.post(
                    "beta", "/orders", order_id=order_id, description=f"beta-{order_id}"
                )
            except Exception:  # noqa: S112 - a request that failed acknowledged nothing
                STATUSES["error"] = STATUSES.get("error", 0) + 1
                await asyncio.sleep(0.005)
                continue
            STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1
            if response.status_code == 200:
                acknowledged.append(order_id)
            else:
                assert response.status_code == 503, response.text  # "being moved: retry"
                await asyncio.sleep(0.005)  # as a client would, before retrying

    async def reader(tenant: str) -> None:
        while not stop.is_set():
            try:
                response = await env.get(tenant, "/orders")
            except Exception:  # noqa: S112 - stale routing fails; it must never answer wrongly
                await asyncio.sleep(0.005)
                continue
            if response.status_code == 200 and any(not d.startswith(tenant) for d in _orders(response)):
                crossed.append(response.text)
            await asyncio.sleep(0.001 if response.status_code == 200 else 0.005)

    await asyncio.gather(writer(), writer(), reader("alpha"), reader("beta"))


async def _move_with_traffic(env: Env, tier: str) -> list[int]:
    stop, acknowledged, crossed = asyncio.Event(), [], []  # type: ignore[var-annotated]
    traffic = asyncio.create_task(_traffic(env, stop, acknowledged, crossed))
    try:
        await asyncio.sleep(0.3)
        moved = await env.manager.move_tenant("beta", tier, app_metadata=SharedBase.metadata)
        assert moved.tier == tier
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(traffic, 60)
    assert crossed == []
    assert acknowledged, "no write went through: the traffic did not run"
    print(f"move to {tier}: writes by outcome {STATUSES}")  # noqa: T201
    return acknowledged


async def test_a_live_tenant_moves_between_tiers_and_back(env: Env, roles: Roles) -> None:
    isolation = env.manager.isolation
    assert isinstance(isolation, HybridIsolation)
    acknowledged = await _move_with_traffic(env, "schema")
    beta = await env.manager.get_tenant("beta")
    stored = {o["id"] for o in (await env.get("beta", "/orders")).json()["orders"]}
    assert {1, 3, *acknowledged} == stored  # every acknowledged write is in the new copy
    assert _orders(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]
    # The old copy stays in the shared tables until removed, and blocks a move back.
    old_rows = "SELECT id FROM public.orders WHERE tenant_id = '" + beta.id + "'"  # noqa: S608
    old = {row[0] for row in await _admin_rows(roles, old_rows)}
    assert {1, 3} <= old <= stored  # what was there at the switch; later writes went to the schema
    with pytest.raises(ProvisioningError, match="remove the old copy"):
        await env.manager.move_tenant("beta", "rls", app_metadata=SharedBase.metadata)
    assert (await env.manager.get_tenant("beta")).tier == "schema"
    await env.manager.remove_old_copy("beta")
    assert await _admin_rows(roles, old_rows) == []

    before = stored
    acknowledged = await _move_with_traffic(env, "rls")
    stored = {o["id"] for o in (await env.get("beta", "/orders")).json()["orders"]}
    assert before | set(acknowledged) == stored
    assert await _admin_rows(roles, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant_beta%'") == [
        ("tenant_beta_",)  # the old copy, renamed out of the way
    ]
    await env.manager.remove_old_copy("beta")
    assert (
        await _admin_rows(roles, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant_beta%'") == []
    )
    assert _orders(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]
    await env.manager.delete_tenant("beta", destroy_data=True)
    assert await _admin_rows(roles, "SELECT count(*) FROM public.orders") == [(0,)]


async def test_another_process_with_a_stale_cache_is_fenced_off_after_a_move(env: Env, roles: Roles) -> None:
    # A second manager stands for another process: its cache still places beta in the
    # shared tables after the first one moved beta to a schema. Its invalidation channel is
    # stopped, as if the move's message were still on its way.
    config = env.manager.config.model_copy(update={"cache_ttl": 3600.0})
    other = TenancyManager(config)
    await other.initialize()
    assert other.invalidation is not None
    await other.invalidation.close()
    try:
        stale = await other.lookup.get("beta")
        assert stale is not None and stale.tier == "rls"
        await env.manager.move_tenant("beta", "schema", app_metadata=SharedBase.metadata)
        assert (await other.lookup.get("beta")) == stale  # still cached
        async with other.session(stale) as session:
            with pytest.raises(TenancyUnavailableError, match="moved"):
                await session.execute(sa.text("SELECT count(*) FROM orders"))
        # The move's process serves the new copy at once.
        assert _orders(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]
        # And back: a process still routing beta to its schema finds no schema of that name
        # (the old copy was renamed), so it answers 503 instead of writing where nobody reads.
        await env.manager.remove_old_copy("beta")
        other.lookup.clear()
        stale = await other.lookup.get("beta")
        assert stale is not None and stale.tier == "schema"
        await env.manager.move_tenant("beta", "rls", app_metadata=SharedBase.metadata)
        async with other.session(stale) as session:
            with pytest.raises(TenancyUnavailableError, match="gone"):
                await session.execute(
                    sa.text("INSERT INTO orders (tenant_id, id, description) VALUES ('x', 9, 'y')")
                )
        assert _orders(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]
    finally:
        await other.close()


async def test_a_move_in_maintenance_is_answered_503_until_it_ends(env: Env, roles: Roles) -> None:
    seen: list[tuple[str, str | None, int, str | None]] = []

    async def probe(event: TenantEvent) -> None:
        # At the maintenance's start and at the tier switch: the tenant's requests wait.
        response = await env.get("beta", "/orders")
        seen.append(
            (event.event.value, event.tenant.tier, response.status_code, response.headers.get("retry-after"))
        )

    env.manager.events.add(probe, LifecycleEvent.MAINTENANCE, LifecycleEvent.UPDATED)
    moved = await env.manager.move_tenant(
        "beta", "schema", app_metadata=SharedBase.metadata, maintenance=True
    )
    assert seen == [("maintenance", "rls", 503, "120"), ("updated", "schema", 503, "120")]
    assert (moved.tier, (await env.manager.get_tenant("beta")).status) == ("schema", TenantStatus.ACTIVE)
    assert _orders(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]
    assert _orders(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]  # never held off
