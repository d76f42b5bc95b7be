"""Hybrid moves into and out of the database tier, with traffic running: no acknowledged write
lost, no row of the other tenant served, the old copy fenced off and then removed."""

from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from fastapi_tenancy import ProvisioningError, TenancyManager, TenancyUnavailableError, TenantStatus
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.isolation.database import DatabaseIsolation
from fastapi_tenancy.isolation.moves import MOVED_PUBLIC

from ..apps import SharedBase
from .conftest import Roles
from .databases import databases, server_sql
from .test_hybrid import _admin_rows, _move_with_traffic, _orders
from .test_matrix import Env, _environment, shared_settings


@pytest.fixture
async def env(roles: Roles) -> AsyncIterator[Env]:
    # alpha in its own schema, beta in the shared tables; the database tier made by the owner.
    settings = {
        **shared_settings(roles, "hybrid"),
        "database_pool_size": 3,
        "database_tenant_pool_size": 3,
        "admin_url": roles.admin_url,
    }
    async with _environment(roles.app_url, settings) as environment:
        yield environment


async def _stored(env: Env) -> set[int]:
    return {o["id"] for o in (await env.get("beta", "/orders")).json()["orders"]}


async def test_a_live_tenant_moves_into_and_out_of_the_database_tier(env: Env, roles: Roles) -> None:
    prefix = env.manager.config.schema_prefix
    beta = await env.manager.get_tenant("beta")
    rows = "SELECT id FROM public.orders WHERE tenant_id = '" + beta.id + "'"  # noqa: S608

    # rls -> database: the shared rows are copied, then fenced off; every acknowledged write is in.
    acknowledged = await _move_with_traffic(env, "database")
    stored = await _stored(env)
    assert {1, 3, *acknowledged} == stored
    assert await databases(roles.admin_url, prefix + "beta") == [prefix + "beta"]
    old = {row[0] for row in await _admin_rows(roles, rows)}
    assert {1, 3} <= old <= stored  # the old copy, what was there at the switch
    await env.manager.remove_old_copy("beta")
    assert await _admin_rows(roles, rows) == []

    # database -> schema: the database's public schema is renamed away (the old copy).
    before = stored
    acknowledged = await _move_with_traffic(env, "schema")
    stored = await _stored(env)
    assert before | set(acknowledged) == stored
    with pytest.raises(ProvisioningError, match="already exists"):  # the old copy blocks a move back
        await env.manager.move_tenant("beta", "database", app_metadata=SharedBase.metadata)
    await env.manager.remove_old_copy("beta")
    assert await databases(roles.admin_url, prefix + "beta") == []

    # schema -> database, then database -> rls.
    before = stored
    acknowledged = await _move_with_traffic(env, "database")
    stored = await _stored(env)
    assert before | set(acknowledged) == stored
    schemas = f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{prefix}beta%'"  # noqa: S608
    assert await _admin_rows(roles, schemas) == [(prefix + "beta_",)]  # renamed out of the way
    await env.manager.remove_old_copy("beta")
    assert await _admin_rows(roles, schemas) == []

    before = stored
    acknowledged = await _move_with_traffic(env, "rls")
    stored = await _stored(env)
    assert before | set(acknowledged) == stored
    assert {row[0] for row in await _admin_rows(roles, rows)} == stored
    assert await databases(roles.admin_url, prefix + "beta") == [prefix + "beta"]  # kept until removed
    await env.manager.remove_old_copy("beta")
    assert await databases(roles.admin_url, prefix + "beta") == []
    assert _orders(await env.get("alpha", "/orders")) == ["alpha-1", "alpha-2"]  # never touched


async def test_a_process_still_routing_to_the_old_database_is_answered_503(env: Env) -> None:
    await env.manager.move_tenant("beta", "database", app_metadata=SharedBase.metadata)
    await env.manager.remove_old_copy("beta")  # the shared rows, so that it can move back
    # Another process whose cache still places beta in its database, and whose invalidation
    # channel has not told it of the next move.
    other = TenancyManager(env.manager.config.model_copy(update={"cache_ttl": 3600.0}))
    await other.initialize()
    assert other.invalidation is not None
    await other.invalidation.close()
    try:
        stale = await other.lookup.get("beta")
        assert stale is not None and stale.tier == "database"
        async with other.session(stale) as session:  # its pool has a connection to the database
            assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar() == 2
        await env.manager.move_tenant("beta", "rls", app_metadata=SharedBase.metadata)
        async with other.session(stale) as session:
            with pytest.raises(TenancyUnavailableError, match="gone"):
                await session.execute(
                    sa.text("INSERT INTO orders (tenant_id, id, description) VALUES (:t, 9, 'lost')"),
                    {"t": stale.id},
                )
        assert _orders(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]
        # The old database keeps the rows of the switch, under the renamed schema only.
        old = other.isolation.tiers["database"]  # type: ignore[attr-defined]
        assert isinstance(old, DatabaseIsolation)
        url = old.tenant_url(stale).render_as_string(hide_password=False)
        schemas = "SELECT nspname FROM pg_namespace WHERE nspname IN ('public', 'public_moved')"
        assert await server_sql(url, schemas) == [MOVED_PUBLIC]
        count = f"SELECT count(*) FROM {MOVED_PUBLIC}.orders"  # noqa: S608
        assert await server_sql(url, count) == [2]
    finally:
        await other.close()


async def test_a_move_into_the_database_tier_in_maintenance_is_answered_503_until_it_ends(env: Env) -> None:
    seen: list[tuple[str, str | None, int]] = []

    async def probe(event: TenantEvent) -> None:
        seen.append((event.event.value, event.tenant.tier, (await env.get("beta", "/orders")).status_code))

    env.manager.events.add(probe, LifecycleEvent.MAINTENANCE, LifecycleEvent.UPDATED)
    moved = await env.manager.move_tenant(
        "beta", "database", app_metadata=SharedBase.metadata, maintenance=True
    )
    assert seen == [("maintenance", "rls", 503), ("updated", "database", 503)]
    assert (moved.tier, (await env.manager.get_tenant("beta")).status) == ("database", TenantStatus.ACTIVE)
    assert _orders(await env.get("beta", "/orders")) == ["beta-1", "beta-3"]
