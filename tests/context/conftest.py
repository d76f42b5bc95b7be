"""Fixtures for tenant context outside the request: two seeded tenants, a Redis URL."""

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import Base, Order
from ..conftest import REQUIRE_SERVICES

REDIS_URL = os.environ.get("TENANCY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Two tenants with overlapping primary keys: id 1 exists in both.
ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


@dataclass
class Tenants:
    manager: TenancyManager
    url: str


async def descriptions(manager: TenancyManager) -> list[str]:
    """The current tenant's order descriptions, read through `manager.session()`."""
    async with manager.session() as session:
        return list((await session.execute(sa.select(Order.description).order_by(Order.id))).scalars())


_redis_down: list[str] = []


@pytest.fixture
def redis_url() -> str:
    """The shared Redis; every test uses keys and queues under a unique prefix.

    Synchronous, so that async fixtures can ask for it with `getfixturevalue`.
    """
    import redis

    if not _redis_down:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        try:
            client.ping()
            _redis_down.append("")
        except redis.RedisError as exc:
            _redis_down.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()
    if _redis_down[0]:
        if REQUIRE_SERVICES:
            pytest.fail(f"Redis is required (TENANCY_TEST_REQUIRE_SERVICES=1): {_redis_down[0]}")
        pytest.skip(f"Redis not reachable: {_redis_down[0]}")
    return REDIS_URL


@pytest.fixture
def unique() -> str:
    return f"ft-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def tenants(postgres_url: str) -> AsyncIterator[Tenants]:
    """A manager on PostgreSQL (a pool of one connection), tenants alpha and beta seeded."""
    config = TenancyConfig(database_url=postgres_url, database_pool_size=1, database_max_overflow=0)
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            tenant = await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
            async with manager.session(tenant) as session:
                session.add_all(Order(id=i, description=d) for i, d in rows.items())
                await session.commit()
        yield Tenants(manager, postgres_url)
    finally:
        await manager.close()
