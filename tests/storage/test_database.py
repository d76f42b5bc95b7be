"""`SQLAlchemyTenantStore` on in-memory SQLite: one shared connection, one transaction at a time."""

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import ConfigurationError, Tenant
from fastapi_tenancy._utils import create_engine
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

MEMORY_URLS = pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite://"], ids=["memory", "no-database"]
)


@MEMORY_URLS
@pytest.mark.parametrize("count", [5, 20])
async def test_concurrent_creates_on_memory_sqlite_are_all_kept(url: str, count: int) -> None:
    # Interleaved on the one connection, each transaction used to commit or roll back
    # the others' work: 5 creates left 2-4 rows, every one of them acknowledged.
    store = SQLAlchemyTenantStore(url)
    await store.initialize()
    try:
        tenants = [Tenant(identifier=f"t-{i:02d}", name=f"T {i}") for i in range(count)]
        assert await asyncio.gather(*(store.create(t) for t in tenants)) == tenants
        listed = await store.list(limit=100)
        assert [t.identifier for t in listed] == [t.identifier for t in tenants]
    finally:
        await store.close()


async def test_a_second_checkout_waits_for_the_first_to_be_returned() -> None:
    store = SQLAlchemyTenantStore("sqlite+aiosqlite://")
    await store.initialize()
    acme = Tenant(identifier="acme", name="Acme")
    try:
        async with asyncio.timeout(5):
            async with store.engine.connect() as conn:
                await conn.execute(sa.select(store.table.c.id))  # a transaction is open
                creating = asyncio.create_task(store.create(acme))
                await asyncio.sleep(0.05)
                assert not creating.done()  # waiting, not sharing the open transaction
            assert await creating == acme
        assert await store.get_by_identifier("acme") == acme
    finally:
        await store.close()


async def test_a_checkout_times_out_with_pool_timeout() -> None:
    engine = create_engine("sqlite+aiosqlite://", pool_timeout=0.1)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            other = asyncio.create_task(engine.connect().start())
            with pytest.raises(sa_exc.TimeoutError, match="in-memory SQLite.*0.1 s"):
                async with asyncio.timeout(5):
                    await other
    finally:
        await engine.dispose()


async def test_a_nested_checkout_in_one_task_fails_at_once() -> None:
    # It would wait for the connection its own task holds: an error instead of a hang.
    engine = create_engine("sqlite+aiosqlite://")
    try:
        async with asyncio.timeout(5), engine.begin() as outer:
            await outer.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            with pytest.raises(ConfigurationError, match="this task already holds it"):
                async with AsyncSession(engine) as session:
                    await session.execute(sa.text("SELECT 1"))
            await outer.execute(sa.text("INSERT INTO t VALUES (1)"))  # the outer one goes on
        async with asyncio.timeout(5), engine.connect() as after:
            assert await after.scalar(sa.text("SELECT count(*) FROM t")) == 1
    finally:
        await engine.dispose()
