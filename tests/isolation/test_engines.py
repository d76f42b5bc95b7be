"""`EngineRegistry` and the engines of tenant files: a retired engine closes the connections it
gets back or opens, and an engine in use carries no per-engine listeners for the garbage
collector to walk (a thousand tenant files are a thousand engines)."""

import gc
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy._utils import create_engine
from fastapi_tenancy.isolation import SQLiteFileIsolation
from fastapi_tenancy.isolation._engines import EngineRegistry

from ..apps import Base, Order


def _open_connections(pool: Any) -> int:
    return sum(record.dbapi_connection is not None for record in list(pool._pool._queue._queue))


def _engine(path: Path) -> AsyncEngine:
    return create_engine(f"sqlite+aiosqlite:///{path}", pool_size=2, max_overflow=0)


async def test_a_retired_engine_closes_the_connection_it_gets_back(tmp_path: Path) -> None:
    registry = EngineRegistry(max_engines=10)
    engine = registry.get("a", lambda: _engine(tmp_path / "a.db"))
    pool = engine.sync_engine.pool
    async with engine.connect() as held:
        await held.execute(sa.text("SELECT 1"))
        raw = (await held.get_raw_connection()).dbapi_connection
        await registry.discard("a")  # retired while its connection is out
        assert "a" not in registry
    assert raw is not None and raw.driver_connection._connection is None  # aiosqlite: closed
    assert _open_connections(pool) == 0, "given back to a retired engine: closed, not kept"
    # A session made before the retirement opens a connection: closed when it comes back too.
    async with engine.connect() as late:
        await late.execute(sa.text("SELECT 1"))
    assert _open_connections(engine.sync_engine.pool) == 0
    await registry.close()


async def test_an_engine_in_use_has_no_listeners_of_the_registry(tmp_path: Path) -> None:
    registry = EngineRegistry(max_engines=10)
    engine = registry.get("a", lambda: _engine(tmp_path / "a.db"))
    plain = _engine(tmp_path / "b.db")
    try:
        for name in ("checkin", "connect"):
            assert len(getattr(engine.sync_engine.pool.dispatch, name)) == len(
                getattr(plain.sync_engine.pool.dispatch, name)
            ), name
    finally:
        await registry.close()
        await plain.dispose()


def _tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_a_tenant_file_engine_costs_the_collector_about_what_a_plain_engine_does(
    sqlite_url: str,
) -> None:
    # Measured in objects the garbage collector tracks (deterministic), against plain
    # SQLAlchemy engines of the same files made in the same test.
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url, max_cached_engines=100))
    await manager.initialize()
    try:
        tenants = [
            await manager.register_tenant(f"t{i}", f"T{i}", app_metadata=Base.metadata) for i in range(40)
        ]
        isolation = manager.isolation
        assert isinstance(isolation, SQLiteFileIsolation)
        before = _tracked()
        for tenant in tenants:
            async with manager.session(tenant) as session:
                await session.execute(sa.select(Order))
        ours = (_tracked() - before) / len(tenants)
        urls = [f"sqlite+aiosqlite:///file:{isolation.path(t)}?mode=rw&uri=true" for t in tenants]
        before = _tracked()
        plain = [create_async_engine(url, pool_size=2, max_overflow=8) for url in urls]
        for engine in plain:
            async with engine.connect() as conn:
                await conn.execute(sa.select(Order))
        theirs = (_tracked() - before) / len(plain)
        for engine in plain:
            await engine.dispose()
        # A tenant's engine and connection, its cached tenant record and session setting:
        # 34 objects more than a plain engine with its connection (81 with the engine
        # event listeners the pool's methods replace).
        assert ours - theirs < 50, (ours, theirs)
    finally:
        await manager.close()
