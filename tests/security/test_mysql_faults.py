"""Faults on MySQL/MariaDB, on a throwaway MariaDB of our own (the shared server is never
stopped): the server killed and restarted. Every request while it is down is a clear 503
(never a 500), and the first request after it is back is served."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from ..apps import Base, Order
from ..conftest import REQUIRE_SERVICES
from .app import build_security_app
from .mariadb import ThrowawayMariaDB, find_mariadb

pytestmark = pytest.mark.mysql


@pytest.fixture
async def mariadb() -> AsyncIterator[ThrowawayMariaDB]:
    binaries = find_mariadb()
    if binaries is None:
        message = "MariaDB server binaries (mariadbd, mariadb-install-db) not found"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    server = ThrowawayMariaDB(*binaries)
    try:
        await asyncio.to_thread(server.init)
        await server.start()
        yield server
    finally:
        await server.destroy()


@asynccontextmanager
async def app_on(mariadb: ThrowawayMariaDB, setup: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Tenant alpha (two orders) behind the security app, its registry on the MariaDB.

    `database`: the registry and alpha's own database there, one pool each.
    `registry`: only the registry there (SQLAlchemyTenantStore), alpha's tables in SQLite.
    No lookup cache: every request reads the registry, as a request for an unknown
    tenant or a cache miss would.
    """
    name = f"reg_{uuid.uuid4().hex[:10]}"
    await mariadb.sql(f"CREATE DATABASE `{name}`")
    url = make_url(mariadb.url).set(database=name).render_as_string(hide_password=False)
    settings: dict[str, Any] = {"cache_ttl": 0, "negative_cache_ttl": 0, "database_pool_timeout": 5}
    if setup == "database":
        config = TenancyConfig(
            database_url=url, isolation_strategy="database", schema_prefix="t_", **settings
        )
        manager = TenancyManager(config)
    else:
        config = TenancyConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", **settings)
        manager = TenancyManager(config, SQLAlchemyTenantStore(url))
    await manager.initialize()
    try:
        tenant = await manager.register_tenant("alpha", "Alpha", app_metadata=Base.metadata)
        async with manager.session(tenant) as session:
            session.add_all([Order(id=1, description="alpha-1"), Order(id=2, description="alpha-2")])
            await session.commit()
        transport = httpx.ASGITransport(app=build_security_app(manager), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
    finally:
        await manager.close()


async def _orders(client: httpx.AsyncClient, tenant: str = "alpha") -> httpx.Response:
    return await client.get("/orders", headers={"X-Tenant-ID": tenant})


@pytest.mark.parametrize("setup", ["database", "registry"])
async def test_a_killed_mariadb_gives_503s_and_the_first_request_after_restart_is_served(
    mariadb: ThrowawayMariaDB, setup: str, tmp_path: Path
) -> None:
    async with app_on(mariadb, setup, tmp_path) as client:
        for _ in range(2):  # pooled connections, to the registry and (database) to alpha's database
            response = await _orders(client)
            assert response.status_code == 200, response.text

        await mariadb.kill()
        # The first request finds its pooled connection dead, the next ones cannot connect
        # (pymysql 2003): all of them, for a known tenant or an unknown one, are the same 503.
        statuses = []
        for tenant in ("alpha", "alpha", "nobody", "alpha"):
            response = await _orders(client, tenant)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.json() == {"detail": "Tenancy backend unavailable"}, response.text
                assert response.headers["retry-after"] == "1"
        assert statuses == [503] * 4, statuses

        await mariadb.start()
        # The first request after the restart is served: no pool hands it a dead connection.
        response = await _orders(client)
        assert response.status_code == 200, response.text
        assert [o["description"] for o in response.json()["orders"]] == ["alpha-1", "alpha-2"]
        assert (await _orders(client, "nobody")).status_code == 404
