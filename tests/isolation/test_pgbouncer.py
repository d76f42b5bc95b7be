"""Schema and row-level security isolation through a real PgBouncer in transaction mode, with
ONE server connection shared by every client connection, so tenants' transactions interleave on it."""

import asyncio
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from ..conftest import running_pgbouncer
from .conftest import Roles
from .test_matrix import Env, two_tenants


async def test_tenants_sharing_one_server_connection_never_cross(pgbouncer_url: str) -> None:
    async with two_tenants(pgbouncer_url, database_pgbouncer=True, database_pool_size=5) as env:
        async with env.manager.engine.connect() as first, env.manager.engine.connect() as second:
            pids = []
            for conn in (first, second):  # each transaction ends before the next may take the server
                pids.append((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
                await conn.commit()
        assert pids[0] == pids[1], "two client connections, one server connection"

        await _interleaved_requests_never_cross(env, seed=3)
        async with env.manager.engine.connect() as conn:
            assert (await conn.execute(sa.text("SHOW search_path"))).scalar_one() == '"$user", public'


async def test_a_registry_opened_from_a_url_follows_the_pgbouncer_setting(pgbouncer_url: str) -> None:
    # The Quick Start's pattern: the store gets the URL and makes its own pool. Behind
    # PgBouncer with several server connections, a statement it prepared and cached in one
    # transaction would be missing from the server connection of the next.
    config = TenancyConfig(database_url=pgbouncer_url, database_pgbouncer=True, database_pool_size=3)
    manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
    assert manager.store.pgbouncer  # type: ignore[attr-defined]
    await manager.initialize()
    try:
        slugs = [f"reg-{i}" for i in range(4)]
        for slug in slugs:
            await manager.register_tenant(slug, slug)
        for _ in range(10):
            found = await asyncio.gather(*(manager.store.get_by_identifier(slug) for slug in slugs))
            assert [t.identifier for t in found if t is not None] == slugs
    finally:
        await manager.close()


@pytest.mark.parametrize("strategy", ["rls", "hybrid"])
async def test_rls_tenants_sharing_one_server_connection_never_cross(roles: Roles, strategy: str) -> None:
    # The binding is per transaction, so it travels with each transaction to whatever
    # server connection PgBouncer gives it, and is gone when that transaction ends.
    # Hybrid: alpha in a schema, beta in the shared tables, on the same server connection.
    async with running_pgbouncer(roles.admin_url, (roles.app, roles.owner)) as bouncer:
        port = make_url(bouncer).port
        app_url = make_url(roles.app_url).set(port=port).render_as_string(hide_password=False)
        owner_url = make_url(roles.owner_url).set(port=port).render_as_string(hide_password=False)
        settings: dict[str, Any] = {
            "isolation_strategy": strategy,
            "database_owner_url": owner_url,
            "database_pgbouncer": True,
        }
        async with two_tenants(app_url, **settings, database_pool_size=5) as env:
            await _interleaved_requests_never_cross(env, seed=5)
            async with env.manager.engine.connect() as conn:  # the one server connection, unbound again
                assert await conn.scalar(
                    sa.text("SELECT current_setting('fastapi_tenancy.tenant_id', true)")
                ) in (
                    "",
                    None,
                )
                assert (await conn.execute(sa.text("SELECT count(*) FROM public.orders"))).scalar_one() == 0


async def _interleaved_requests_never_cross(env: Env, *, seed: int) -> None:
    """300 requests of alpha and beta (ORM and raw SQL) at once, then a commit-then-read."""
    expected = {"alpha": ["alpha-1", "alpha-2"], "beta": ["beta-1", "beta-3"]}
    rng = random.Random(seed)
    picks = [rng.choice(["alpha", "beta"]) for _ in range(300)]
    paths = [rng.choice(["/orders", "/raw"]) for _ in picks]
    responses = await asyncio.gather(*(env.get(t, p) for t, p in zip(picks, paths, strict=True)))
    crossed = [
        (tenant, r.text)
        for tenant, r in zip(picks, responses, strict=True)
        if r.status_code != 200 or [o["description"] for o in r.json()["orders"]] != expected[tenant]
    ]
    assert crossed == []
    committed = await env.post("beta", "/orders/commit-then-read", order_id=2, description="beta-2")
    assert [o["description"] for o in committed.json()["orders"]] == ["beta-1", "beta-2", "beta-3"]


async def test_route_state_and_raw_commit_never_follow_the_server_connection(pgbouncer_url: str) -> None:
    # One server connection behind PgBouncer: what a route sets at session level would
    # follow it to the next client, and a raw COMMIT would hand the server back mid-request.
    async with two_tenants(pgbouncer_url, database_pgbouncer=True, database_pool_size=2) as env:
        beta = env.manager.isolation.storage_name("beta")
        response = await env.client.post(
            "/sql",
            json=[
                f"SELECT set_config('search_path', '\"{beta}\"', false)",
                "CREATE TEMPORARY TABLE orders AS SELECT * FROM orders",
                "SET statement_timeout = '5min'",
            ],
            headers={"X-Tenant-ID": "alpha"},
        )
        assert response.status_code == 200, response.text
        await _interleaved_requests_never_cross(env, seed=7)
        async with env.manager.engine.connect() as conn:
            assert (await conn.execute(sa.text("SHOW search_path"))).scalar_one() == '"$user", public'
            assert (await conn.execute(sa.text("SHOW statement_timeout"))).scalar_one() == "0"
        response = await env.client.post(
            "/sql",
            json=[f'SET search_path TO "{beta}"', "COMMIT", "SELECT description FROM orders"],
            headers={"X-Tenant-ID": "alpha"},
        )
        assert response.status_code == 500 and "beta" not in response.text
        for tenant, rows in (("alpha", ["alpha-1", "alpha-2"]), ("beta", ["beta-1", "beta-2", "beta-3"])):
            response = await env.get(tenant, "/raw")
            assert [o["description"] for o in response.json()["orders"]] == rows
