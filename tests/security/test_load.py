"""Load: 20,000 requests over 200 tenants from several concurrent clients against a
TWO-worker uvicorn server on PostgreSQL schema isolation. Mixed reads and writes; every
tenant holds rows with the same ids as every other. Zero 5xx, zero rows of another
tenant, every acknowledged write stored."""

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import Base
from .server import Connection, serve

TENANTS = [f"load-{i:03d}" for i in range(200)]
REQUESTS = int(os.environ.get("TENANCY_TEST_LOAD_REQUESTS", "20000"))
CLIENTS = 16  # concurrent clients, one keep-alive connection each
WRITE_SHARE = 0.1


async def _provision(url: str) -> None:
    """200 tenants, each with orders 1 and 2 (the same ids in every tenant)."""
    manager = TenancyManager(TenancyConfig(database_url=url, database_pool_size=4, database_max_overflow=0))
    await manager.initialize()
    try:
        for start in range(0, len(TENANTS), 4):
            await asyncio.gather(
                *(
                    manager.register_tenant(t, t, app_metadata=Base.metadata)
                    for t in TENANTS[start : start + 4]
                )
            )
    finally:
        await manager.close()
    engine = create_async_engine(url, poolclass=sa.pool.NullPool)
    try:
        async with engine.begin() as conn:
            for tenant in TENANTS:
                schema = "tenant_" + tenant.replace("-", "_")
                await conn.execute(
                    sa.text(f"INSERT INTO {schema}.orders VALUES (1, :a), (2, :b)"),  # noqa: S608 - our names
                    {"a": f"{tenant}-1", "b": f"{tenant}-2"},
                )
    finally:
        await engine.dispose()


@pytest.fixture
async def server(postgres_url: str) -> AsyncIterator[str]:
    await _provision(postgres_url)
    async with serve(postgres_url) as base:
        yield base


async def test_20000_requests_over_200_tenants_on_two_workers_never_cross(
    server: str, postgres_url: str
) -> None:
    rng = random.Random(2026)
    plan = [(rng.choice(TENANTS), rng.random() < WRITE_SHARE) for _ in range(REQUESTS)]
    statuses: Counter[int] = Counter()
    crossed: list[tuple[str, str]] = []
    acknowledged: set[tuple[str, int]] = set()
    queue: asyncio.Queue[tuple[int, str, bool]] = asyncio.Queue()
    for n, (tenant, write) in enumerate(plan):
        queue.put_nowait((n, tenant, write))

    async def client() -> None:
        connection = await Connection.open(server)
        try:
            while not queue.empty():
                n, tenant, write = queue.get_nowait()
                if write:
                    order_id = 1000 + n  # unique per request, so per tenant
                    target = f"/orders?order_id={order_id}&description={tenant}-w{n}"
                    status, body = await connection.request("POST", target, tenant)
                    if status == 200:
                        acknowledged.add((tenant, order_id))
                else:
                    status, body = await connection.request("GET", "/orders", tenant)
                    if status == 200:
                        page = json.loads(body)
                        descriptions = [o["description"] for o in page["orders"]]
                        if page["tenant"] != tenant or not all(
                            d.startswith(f"{tenant}-") for d in descriptions
                        ):
                            crossed.append((tenant, body.decode()))
                        if not {f"{tenant}-1", f"{tenant}-2"} <= set(descriptions):
                            crossed.append((tenant, "seeded rows missing: " + body.decode()))
                statuses[status] += 1
        finally:
            await connection.close()

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    elapsed, client_cpu = time.monotonic() - started, time.process_time() - cpu

    assert crossed == [], crossed[:5]
    assert dict(statuses) == {200: REQUESTS}, dict(statuses)
    engine = create_async_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            stored: set[tuple[str, int]] = set()
            for tenant in TENANTS:
                schema = "tenant_" + tenant.replace("-", "_")
                rows = await conn.execute(sa.text(f"SELECT id, description FROM {schema}.orders"))  # noqa: S608
                for order_id, description in rows:
                    assert description.startswith(f"{tenant}-"), (tenant, description)
                    stored.add((tenant, order_id))
    finally:
        await engine.dispose()
    assert acknowledged <= stored
    writes = sum(write for _, write in plan)
    print(
        f"\nload: {REQUESTS} requests ({writes} writes) over {len(TENANTS)} tenants, {CLIENTS} concurrent "
        f"keep-alive clients, 2 workers: {elapsed:.1f}s, {REQUESTS / elapsed:.0f} req/s, "
        f"statuses {dict(statuses)}, crossed {len(crossed)}, client CPU {client_cpu:.1f}s"
    )
