"""New and replaced connections (checklist item 3): connections the pool opens under load
(overflow) and connections replaced by `pool_recycle` get the tenant's scope exactly as
reused ones do, with a tenant query as their very first statement."""

import asyncio
from typing import Any

from ..isolation.test_matrix import ROWS, Env
from .conftest import AppFactory
from .connection import connection_state

LINE_ROWS = {tenant: ",".join(d for _, d in sorted(rows.items())) for tenant, rows in ROWS.items()}


async def _stream(env: Env, tenant: str, rounds: int) -> None:
    response = await env.client.get(
        "/slow-stream", params={"rounds": rounds, "pause": 0.02}, headers={"X-Tenant-ID": tenant}
    )
    assert response.status_code == 200, response.text
    lines = response.text.splitlines()
    assert lines == [f"{n}:{tenant}:{LINE_ROWS[tenant]}" for n in range(rounds)], response.text[:300]


async def _raw(env: Env, tenant: str) -> None:
    response = await env.get(tenant, "/raw")  # raw SQL: needs the tenant's search_path
    assert response.status_code == 200, response.text
    assert [o["description"] for o in response.json()["orders"]] == sorted(ROWS[tenant].values())


async def test_connections_opened_under_load_are_scoped_from_their_first_query(
    pooled_app: AppFactory,
) -> None:
    async with pooled_app(database_pool_size=1, database_max_overflow=3) as env:
        pool: Any = env.manager.engine.pool
        pool.overflow_idle = 0.0  # overflow connections close as soon as they are idle (HandOffPool)
        for order in (["alpha", "beta", "alpha", "beta"], ["beta", "alpha", "beta", "alpha"]):
            # Four streams want four connections at once: the pool opens up to three for them
            # (closed again when they end), each starting with a tenant query.
            peak = 0
            running = asyncio.gather(*(_stream(env, tenant, 10) for tenant in order))
            while not running.done():
                peak = max(peak, pool.checkedout())
                await asyncio.sleep(0.005)
            await running
            assert peak >= 3, peak  # at least two connections opened for these streams
            for _ in range(100):  # the pool's trim closes the overflow ones on its next turn
                if pool.checkedout() == 0 and pool.overflow() <= 0:
                    break
                await asyncio.sleep(0.01)
            assert pool.checkedout() == 0 and pool.overflow() <= 0
        assert (await connection_state(env.manager.engine)).is_clean


async def test_connections_replaced_by_pool_recycle_are_scoped_from_their_first_query(
    pooled_app: AppFactory,
) -> None:
    async with pooled_app(database_pool_recycle=1) as env:
        direct = not env.manager.config.database_pgbouncer  # behind PgBouncer pids are the server's
        before = await connection_state(env.manager.engine)
        for tenant in ("alpha", "beta"):
            await asyncio.sleep(1.1)  # the pooled connection is now too old: the next checkout replaces it
            await _raw(env, tenant)  # the new connection's first statement
            after = await connection_state(env.manager.engine)
            assert after.is_clean, after
            if direct:
                assert after.backend_pid != before.backend_pid, "the connection was not replaced"
            before = after
