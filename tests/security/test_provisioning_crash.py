"""Provisioning killed midway (checklist item 46): a process registering a tenant is killed
with SIGKILL while it creates the tenant's tables, for schema isolation (one transaction)
and database per tenant (CREATE DATABASE cannot be in one). Afterwards the tenant is not
active and is refused, its slug has one holder, a purge removes the record and every
piece of storage, and the slug can be registered again and served, empty."""

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager, TenantAlreadyExistsError, TenantStatus

from ..apps import Base, build_app
from ..isolation.databases import databases, dropped_afterwards, server_sql

ROOT = Path(__file__).resolve().parents[2]


async def _kill_while_creating_tables(url: str, settings: dict[str, str], storage: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    env.update({"TENANCY_DATABASE_URL": url, **settings})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.security.provision_victim", cwd=ROOT, env=env
    )
    try:
        for _ in range(3000):
            # The child's connection in the middle of creating the filler tables (in the
            # test's database, or in the tenant's own).
            busy = await server_sql(
                url,
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%CREATE TABLE%filler_%' "  # noqa: S608
                f"AND datname IN ('{make_url(url).database}', '{storage}') AND pid <> pg_backend_pid()",
            )
            if busy[0] or process.returncode is not None:
                break
            await asyncio.sleep(0.005)
        assert process.returncode is None, "provisioning ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _schemas(url: str, name: str) -> list[object]:
    return await server_sql(url, f"SELECT nspname FROM pg_namespace WHERE nspname = '{name}'")  # noqa: S608


@pytest.mark.parametrize("strategy", ["schema", "database"])
async def test_a_provisioning_killed_midway_leaves_no_active_tenant_and_can_be_purged(
    strategy: str, postgres_url: str
) -> None:
    async with dropped_afterwards(postgres_url) as prefix:
        settings = {"TENANCY_ISOLATION_STRATEGY": strategy, "TENANCY_SCHEMA_PREFIX": prefix}
        storage = f"{prefix}victim"
        await _kill_while_creating_tables(postgres_url, settings, storage)

        config = TenancyConfig(database_url=postgres_url, isolation_strategy=strategy, schema_prefix=prefix)  # type: ignore[arg-type]
        manager = TenancyManager(config)
        await manager.initialize()
        try:
            record = await manager.store.get_by_identifier("victim")
            assert record is not None and record.status is TenantStatus.PROVISIONING
            if strategy == "schema":  # one transaction: the kill left no schema behind
                assert await _schemas(postgres_url, storage) == []
            else:  # the database was created, its tables were not all made
                assert await databases(postgres_url, storage) == [storage]
            transport = httpx.ASGITransport(app=build_app(manager))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                refused = await client.get("/orders", headers={"X-Tenant-ID": "victim"})
                assert refused.status_code in (403, 404), refused.text
                with pytest.raises(TenantAlreadyExistsError):  # one holder of the slug
                    await manager.register_tenant("victim", "Someone else", app_metadata=Base.metadata)

                await manager.delete_tenant("victim", destroy_data=True)
                assert await manager.store.get_by_identifier("victim") is None
                assert await _schemas(postgres_url, storage) == []
                assert await databases(postgres_url, storage) == []

                await manager.register_tenant("victim", "Victim again", app_metadata=Base.metadata)
                served = await client.get("/orders", headers={"X-Tenant-ID": "victim"})
                assert (served.status_code, served.json()["orders"]) == (200, [])
        finally:
            await manager.close()
