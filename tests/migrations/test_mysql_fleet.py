"""The fleet runner on MySQL/MariaDB: the registry and every tenant database on the real server,
with the same per-tenant results, resume, canary, lock and timeouts as on PostgreSQL."""

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.errors import FleetBusyError
from fastapi_tenancy.events import LifecycleEvent, TenantEvent
from fastapi_tenancy.migrations._worker import mysql_timeouts, seconds
from fastapi_tenancy.migrations.fleet import FleetMigrator
from fastapi_tenancy.migrations.results import TenantResult
from tests.conftest import _mysql_admin
from tests.isolation.databases import dropped_afterwards

from .projects import make_mysql_project

pytestmark = pytest.mark.mysql


async def _sql(url: str, database: str, statement: str) -> list[tuple[object, ...]]:
    conn = await _mysql_admin(url)
    try:
        await conn.select_db(database)
        async with conn.cursor() as cur:
            await cur.execute(statement)
            return list(await cur.fetchall())
    finally:
        conn.close()


async def _version(url: str, database: str) -> str | None:
    exists = (
        "SELECT 1 FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = 'alembic_version'"
    )
    if not await _sql(url, database, exists):
        return None
    rows = await _sql(url, database, "SELECT GROUP_CONCAT(version_num) FROM alembic_version")
    return str(rows[0][0])


def _statuses(results: list[TenantResult]) -> dict[str, str]:
    return {r.tenant: r.status for r in results}


class Fleet:
    def __init__(self, manager: TenancyManager, url: str, registry: str, prefix: str, ini: Path) -> None:
        self.manager, self.url, self.registry, self.prefix, self.ini = manager, url, registry, prefix, ini

    def database(self, slug: str) -> str:
        return f"{self.prefix}{slug}"


@pytest.fixture
async def fleet(mysql_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    registry = make_url(mysql_url).database
    assert registry is not None
    async with dropped_afterwards(mysql_url) as prefix:
        manager = TenancyManager(
            TenancyConfig(
                database_url=mysql_url,
                database_pool_size=2,
                isolation_strategy="database",
                schema_prefix=prefix,
            )
        )
        await manager.initialize()
        try:
            for slug in ("acme", "globex"):
                await manager.register_tenant(slug, slug.title())
            yield Fleet(manager, mysql_url, registry, prefix, make_mysql_project(tmp_path / "p"))
        finally:
            await manager.close()


async def test_tenant_databases_are_migrated_recorded_and_resumed(fleet: Fleet) -> None:
    acme, globex = fleet.database("acme"), fleet.database("globex")
    migrator = FleetMigrator(fleet.manager, fleet.ini, concurrency=2)
    try:
        first = await migrator.run("upgrade", "a1")
        assert first.succeeded and _statuses(first.results) == {"acme": "ok", "globex": "ok"}
        for database in (acme, globex):
            assert await _version(fleet.url, database) == "a1"
            # The migration ran in the tenant's own database, and only there.
            assert await _sql(fleet.url, database, "SELECT db FROM marks") == [(database,)]
        assert await _version(fleet.url, fleet.registry) is None
        assert [(m.tenant, m.versions, m.at_target) for m in await migrator.status("a1")] == [
            ("acme", ("a1",), True),
            ("globex", ("a1",), True),
        ]

        # A failure in one tenant's database is recorded in the registry's; the other goes on.
        await _sql(fleet.url, globex, "CREATE TABLE fail_here (x INT)")
        failed = await migrator.run("upgrade", "head")
        assert _statuses(failed.results) == {"acme": "ok", "globex": "failed"}
        [error] = [r.error for r in failed.results if r.status == "failed"]
        assert error is not None and "boom" in error
        recorded = await _sql(
            fleet.url,
            fleet.registry,
            f"SELECT tenant, status FROM tenancy_migration_results WHERE run_id = '{failed.run_id}'",  # noqa: S608
        )
        assert dict(recorded) == {"acme": "ok", "globex": "failed"}  # type: ignore[arg-type]
        runs = await _sql(
            fleet.url, fleet.registry, "SELECT status FROM tenancy_migration_runs ORDER BY started_at"
        )
        assert runs == [("finished",), ("failed",)]
        assert await _version(fleet.url, globex) == "a1"  # b2 failed before its DDL

        # Fixed and run again: only the failed tenant runs Alembic.
        await _sql(fleet.url, globex, "DROP TABLE fail_here")
        again = await migrator.run("upgrade", "head")
        assert again.succeeded and _statuses(again.results) == {"acme": "skipped", "globex": "ok"}
        assert await _version(fleet.url, acme) == await _version(fleet.url, globex) == "b2"

        # Interrupted after the first tenant, then resumed: finished tenants are not redone.
        stopped = asyncio.Event()
        one_at_a_time = FleetMigrator(fleet.manager, fleet.ini, concurrency=1)
        try:
            run = asyncio.create_task(one_at_a_time.run("downgrade", "a1", on_result=lambda _: stopped.set()))
            await stopped.wait()
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            done_before = {
                row[0]
                for row in await _sql(
                    fleet.url,
                    fleet.registry,
                    "SELECT r.tenant FROM tenancy_migration_results r JOIN tenancy_migration_runs u "
                    "USING (run_id) WHERE u.direction = 'downgrade' AND r.status = 'ok'",
                )
            }
            assert done_before
            resumed = await one_at_a_time.run("downgrade", "a1")
        finally:
            await one_at_a_time.close()
        assert resumed.resumed and resumed.succeeded
        assert not {r.tenant for r in resumed.results if r.status == "ok"} & done_before
        assert await _version(fleet.url, acme) == await _version(fleet.url, globex) == "a1"
    finally:
        await migrator.close()


async def test_a_failing_canary_stops_the_run(fleet: Fleet) -> None:
    await fleet.manager.register_tenant("initech", "Initech")
    migrator = FleetMigrator(fleet.manager, fleet.ini, concurrency=1)
    try:
        await migrator.run("upgrade", "a1")
        await _sql(fleet.url, fleet.database("acme"), "CREATE TABLE fail_here (x INT)")
        report = await migrator.run("upgrade", "head", tenants=["acme", "globex", "initech"], canary=1)
        assert report.stopped and not report.succeeded
        assert _statuses(report.results) == {"acme": "failed"}
        assert report.not_run == ["globex", "initech"]
        for slug in ("globex", "initech"):
            assert await _version(fleet.url, fleet.database(slug)) == "a1"  # untouched
    finally:
        await migrator.close()


async def test_one_run_at_a_time_per_registry(fleet: Fleet) -> None:
    migrator = FleetMigrator(fleet.manager, fleet.ini)
    holder = await _mysql_admin(fleet.url)
    try:
        await holder.select_db(fleet.registry)
        async with holder.cursor() as cur:
            # What a running fleet holds: the lock named after the registry's database.
            name = "fastapi_tenancy.fleet." + hashlib.sha256(fleet.registry.encode()).hexdigest()[:32]
            await cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            assert (await cur.fetchone()) == (1,)
            with pytest.raises(FleetBusyError):
                await migrator.run("upgrade", "a1")
            await cur.execute("SELECT RELEASE_LOCK(%s)", (name,))
        assert (await migrator.run("upgrade", "a1")).succeeded
    finally:
        holder.close()
        await migrator.close()


async def test_the_lock_timeout_applies_to_each_tenant_database(fleet: Fleet) -> None:
    migrator = FleetMigrator(fleet.manager, fleet.ini, lock_timeout="1s")
    try:
        await migrator.run("upgrade", "a1")
        # An open transaction that read `items` holds its metadata lock: b2's ALTER must wait.
        reader = await _mysql_admin(fleet.url)
        try:
            await reader.select_db(fleet.database("globex"))
            await reader.begin()
            async with reader.cursor() as cur:
                await cur.execute("SELECT * FROM items")
            report = await asyncio.wait_for(migrator.run("upgrade", "head"), timeout=60)
        finally:
            reader.close()
        assert _statuses(report.results) == {"acme": "ok", "globex": "failed"}
        [error] = [r.error for r in report.results if r.status == "failed"]
        assert error is not None and "Lock wait timeout" in error
        assert await _version(fleet.url, fleet.database("globex")) == "a1"
    finally:
        await migrator.close()


async def test_tenants_are_in_maintenance_only_while_they_migrate(fleet: Fleet) -> None:
    seen: list[tuple[str, str, TenantStatus]] = []

    async def record(event: TenantEvent) -> None:
        stored = await fleet.manager.get_tenant(event.tenant.identifier)
        seen.append((event.tenant.identifier, event.event.value, stored.status))

    fleet.manager.events.add(record, LifecycleEvent.MAINTENANCE, LifecycleEvent.ACTIVATED)
    migrator = FleetMigrator(fleet.manager, fleet.ini, concurrency=1, maintenance=True)
    try:
        await migrator.run("upgrade", "a1", tenants=["acme"])
        assert seen == [
            ("acme", "maintenance", TenantStatus.MAINTENANCE),
            ("acme", "activated", TenantStatus.ACTIVE),
        ]
        seen.clear()
        await fleet.manager.suspend_tenant("globex")
        report = await migrator.run("upgrade", "a1")
        # acme was at the target: skipped, never held off; a suspended tenant is migrated as it is.
        assert _statuses(report.results) == {"acme": "skipped", "globex": "ok"}
        assert seen == []
        assert (await fleet.manager.get_tenant("globex")).status is TenantStatus.SUSPENDED
        assert (await fleet.manager.get_tenant("acme")).status is TenantStatus.ACTIVE
    finally:
        await migrator.close()


def test_timeouts_are_read_as_postgresql_writes_them() -> None:
    assert [seconds(t) for t in ("5s", "500ms", "2min", "1h", "250", "0", "0s")] == [
        5.0,
        0.5,
        120.0,
        3600.0,
        0.25,
        None,
        None,
    ]
    assert mysql_timeouts("500ms", "1.5s", mariadb=True) == [
        "SET SESSION lock_wait_timeout = 1",
        "SET SESSION innodb_lock_wait_timeout = 1",
        "SET SESSION max_statement_time = 1.500",
    ]
    assert mysql_timeouts("0", "2s", mariadb=False) == ["SET SESSION max_execution_time = 2000"]
    for bad in ("5 seconds", "-1s", "1;DROP TABLE x", ""):
        with pytest.raises(ValueError, match="not a timeout"):
            seconds(bad)


async def test_a_backend_without_tenant_databases_is_refused_with_the_reason(sqlite_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url, isolation_strategy="database"))
    try:
        with pytest.raises(ValueError, match="or MySQL/MariaDB with database isolation; this is sqlite"):
            FleetMigrator(manager, "alembic.ini")
    finally:
        await manager.close()
