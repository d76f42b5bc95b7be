"""The connection budget gives every slot back after an overload: timeouts, cancelled waits,
cancelled and failing connects (unit level, and against PostgreSQL through DatabaseIsolation)."""

import asyncio
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from fastapi_tenancy import Tenant
from fastapi_tenancy.isolation import DatabaseIsolation
from fastapi_tenancy.isolation._engines import ConnectionBudget

from .databases import dropped_afterwards


class _Record:
    def __init__(self) -> None:
        self.dbapi_connection: Any = None


async def test_a_cancelled_wait_and_a_failing_connect_keep_the_count() -> None:
    budget = ConnectionBudget(1, timeout=5)
    await budget.acquire()  # the only slot, taken by a connect in progress
    waiter = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 1
    assert not budget._waiters  # noqa: SLF001  a queued waiter makes checkins close connections
    budget._connecting -= 1  # noqa: SLF001  the connect above finished without a connection
    with pytest.raises(sa_exc.TimeoutError):
        budget.timeout = 0.05
        await budget.acquire()
        await budget.acquire()
    budget._connecting = 0  # noqa: SLF001
    # A connection whose record dropped it without a `close` event no longer holds a slot.
    record, connection = _Record(), object()
    budget._open[connection] = record  # noqa: SLF001
    record.dbapi_connection = connection
    assert budget.in_use == 1
    record.dbapi_connection = None
    assert budget.in_use == 0


async def _parallel(isolation: DatabaseIsolation, tenants: list[Tenant]) -> float:
    async def one(tenant: Tenant) -> None:
        async with await isolation.session(tenant) as session:
            await session.execute(sa.text("SELECT pg_sleep(0.2)"))

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in tenants))
    return time.perf_counter() - started


async def test_an_overload_gives_every_slot_back(postgres_url: str) -> None:
    async with dropped_afterwards(postgres_url) as prefix:
        isolation = DatabaseIsolation(
            postgres_url, prefix=prefix, connection_budget=3, pool_size=1, pool_timeout=0.5
        )
        tenants = [Tenant(id=f"b{i}", identifier=f"b{i}", name=f"B{i}") for i in range(4)]
        try:
            for tenant in tenants:
                await isolation.provision(tenant, None)
            before = await _parallel(isolation, tenants[:3])

            async def busy(tenant: Tenant) -> None:
                async with await isolation.session(tenant) as session:
                    await session.execute(sa.text("SELECT pg_sleep(0.3)"))

            await isolation.engines.close()  # fresh engines: connects run their first setup
            loop = asyncio.get_running_loop()
            tasks = [asyncio.ensure_future(busy(tenants[i % 4])) for i in range(30)]
            for i, task in enumerate(tasks[::2]):
                # Clients going away at staggered moments: mid-wait, mid-connect, mid-query.
                loop.call_later(0.002 * i, task.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert any(isinstance(r, sa_exc.TimeoutError) for r in failures), "no overload"
            await asyncio.sleep(0.1)
            print(f"\nin use after the overload: {isolation.budget.in_use}")
            assert isolation.budget.in_use <= 3
            after = await _parallel(isolation, tenants[:3])
            print(
                f"\n3 sessions before {before * 1000:.0f} ms, after {after * 1000:.0f} ms; "
                f"{len(failures)}/30 failed"
            )
            assert after < 1.8 * before
            assert isolation.budget.peak <= 3
            assert isolation.budget.in_use <= 3
        finally:
            await isolation.close()


async def test_a_connect_whose_setup_fails_gives_its_slot_back(postgres_url: str) -> None:
    from fastapi_tenancy._utils import create_engine  # noqa: PLC0415

    engine = create_engine(postgres_url, pool_size=1, max_overflow=0)
    budget = ConnectionBudget(1, timeout=0.5)
    budget.attach(engine)

    def fail(_dbapi_connection: Any, _record: Any) -> None:
        raise RuntimeError("setup failed")

    sa.event.listen(engine.sync_engine, "connect", fail)
    try:
        with pytest.raises(RuntimeError):
            async with engine.connect():
                pass
        assert budget.in_use == 0  # SQLAlchemy closed it with no `close` event
        sa.event.remove(engine.sync_engine, "connect", fail)
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT 1")) == 1
            assert budget.in_use == 1
    finally:
        await engine.dispose()
    assert budget.in_use == 0
