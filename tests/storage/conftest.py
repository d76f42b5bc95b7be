"""Helpers of the store tests: the example app served over a given store."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.storage import TenantStore

from ..apps import Base, build_app


@asynccontextmanager
async def serving(store: TenantStore, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the example app whose registry is `store`, tenant `acme-corp` registered.

    The app has no in-process registry cache (`cache_ttl=0`): every request asks `store`.
    """
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}", cache_ttl=0, negative_cache_ttl=0)
    manager = TenancyManager(config, store)
    await manager.initialize()
    try:
        await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await manager.close()
