"""`HandOffPool`: no connection closed that a waiting checkout or a burst needs, the same limits.

Against real PostgreSQL and SQLite files; connections counted by the pool's own
`connect` and `close` events. Each burst test first shows SQLAlchemy's pool closing and
reopening connections in the same scenario, so the scenario is known to provoke it.
"""

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import greenlet_spawn

from fastapi_tenancy._utils import create_engine
from fastapi_tenancy.pool import HandOffPool


class Counts:
    def __init__(self, engine: AsyncEngine) -> None:
        self.opened = self.closed = 0
        event.listen(engine.sync_engine, "connect", self._connect)
        event.listen(engine.sync_engine, "close", self._close)

    def _connect(self, *_: Any) -> None:
        self.opened += 1

    def _close(self, *_: Any) -> None:
        self.closed += 1

    @property
    def open(self) -> int:
        return self.opened - self.closed


@pytest.fixture(params=["postgres", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}"
    return str(request.getfixturevalue("postgres_url"))


def engine_for(url: str, pool: str, size: int = 2, overflow: int = 2) -> AsyncEngine:
    options: dict[str, Any] = {}
    if pool == "sqlalchemy":
        options["poolclass"] = AsyncAdaptedQueuePool
    return create_engine(url, pool_size=size, max_overflow=overflow, pool_timeout=5, **options)


async def test_the_library_engines_use_it(url: str) -> None:
    engine = create_engine(url)
    try:
        assert isinstance(engine.sync_engine.pool, HandOffPool)
    finally:
        await engine.dispose()


async def burst(engine: AsyncEngine) -> Counts:
    """Hold every connection (2 + 2), queue 3 checkouts, then give all 4 back in one turn of
    the event loop: before any waiting checkout has run."""
    counts = Counts(engine)
    pool: Any = engine.sync_engine.pool
    held = [await greenlet_spawn(pool.connect) for _ in range(4)]
    assert counts.opened == 4

    async def use() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    waiters = [asyncio.create_task(use()) for _ in range(3)]
    await asyncio.sleep(0.05)  # all three are waiting for a connection
    assert not any(w.done() for w in waiters)
    await greenlet_spawn(lambda: [fairy.close() for fairy in held])
    await asyncio.gather(*waiters)
    return counts


async def test_a_connection_given_back_goes_to_a_waiting_checkout(url: str) -> None:
    engine = engine_for(url, "sqlalchemy")
    try:
        counts = await burst(engine)
        # SQLAlchemy's pool: the 3rd and 4th given back found the queue "full" of the
        # two handed to waiters and were closed, while a third checkout still waited.
        assert counts.closed == 2
    finally:
        await engine.dispose()

    engine = engine_for(url, "handoff")
    try:
        counts = await burst(engine)
        assert (counts.opened, counts.closed) == (4, 0)
        pool: Any = engine.sync_engine.pool
        assert pool.checkedin() == 4
    finally:
        await engine.dispose()


async def test_overflow_connections_close_only_after_staying_unused(url: str) -> None:
    engine = engine_for(url, "handoff")
    pool: Any = engine.sync_engine.pool
    pool.overflow_idle = 0.3
    counts = Counts(engine)
    try:
        held = [await greenlet_spawn(pool.connect) for _ in range(4)]
        await greenlet_spawn(lambda: [fairy.close() for fairy in held])
        assert pool.checkedin() == 4 and counts.closed == 0  # kept for a while, not closed at once
        # Used again meanwhile: a burst a moment later reuses them, opening none.
        await asyncio.sleep(0.15)
        again = [await greenlet_spawn(pool.connect) for _ in range(4)]
        await greenlet_spawn(lambda: [fairy.close() for fairy in again])
        assert counts.opened == 4
        await asyncio.sleep(0.2)  # 0.35 s after the first return, 0.2 s after the second
        assert counts.closed == 0
        await asyncio.sleep(0.3)
        assert (pool.checkedin(), counts.closed, counts.open) == (2, 2, 2)  # back to pool_size
        assert pool.overflow() == -pool.size() + 2
    finally:
        await engine.dispose()


async def test_the_limits_hold_under_concurrency(url: str) -> None:
    engine = engine_for(url, "handoff", size=3, overflow=4)
    pool: Any = engine.sync_engine.pool
    pool.overflow_idle = 0.05
    counts = Counts(engine)
    most = 0

    async def use(i: int) -> int:
        nonlocal most
        async with engine.connect() as conn:
            most = max(most, counts.open)
            await asyncio.sleep(0.001 * (i % 5))
            return int(await conn.scalar(text(f"SELECT {i}")))

    try:
        for _ in range(3):
            assert await asyncio.gather(*(use(i) for i in range(60))) == list(range(60))
            await asyncio.sleep(0.1 if _ else 0)
        assert most <= 7 and counts.open <= 7
        await asyncio.sleep(0.3)
        assert counts.open == 3 == pool.checkedin()
    finally:
        await engine.dispose()
    assert counts.open == 0


async def test_dispose_closes_every_connection_and_the_pending_trim(url: str) -> None:
    engine = engine_for(url, "handoff")
    pool: Any = engine.sync_engine.pool
    counts = Counts(engine)
    held = [await greenlet_spawn(pool.connect) for _ in range(4)]
    await greenlet_spawn(lambda: [fairy.close() for fairy in held])
    assert pool._trim_at is not None
    await engine.dispose()
    assert counts.open == 0 and pool._trim_at is None
    # The engine is usable again after dispose(), as SQLAlchemy's.
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT 1")) == 1
    await engine.dispose()
