"""Fixtures for tenant context outside the request: two seeded tenants."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import Base, Order

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
