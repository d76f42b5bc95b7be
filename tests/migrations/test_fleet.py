"""The fleet runner against real PostgreSQL: skip, concurrency, failures, waves, timeouts, resume."""

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from fastapi_tenancy import TenancyManager
from fastapi_tenancy.errors import FleetBusyError
from fastapi_tenancy.migrations import read_versions
from fastapi_tenancy.migrations.fleet import FleetMigrator
from fastapi_tenancy.migrations.results import TenantResult

from .projects import make_project

pytestmark = pytest.mark.postgres


async def _raw(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )


async def _tenants(manager: TenancyManager, *slugs: str) -> None:
    for slug in slugs:
        await manager.register_tenant(slug, slug.title())


async def _results(url: str, run_id: str) -> dict[str, str]:
    conn = await _raw(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant, status FROM public.tenancy_migration_results WHERE run_id = $1", run_id
        )
    finally:
        await conn.close()
    return {row["tenant"]: row["status"] for row in rows}


async def test_upgrade_migrates_each_tenant_in_its_own_schema_concurrently(
    manager: TenancyManager, tmp_path: Path, postgres_url: str
) -> None:
    ini = make_project(tmp_path / "p", sleep=0.3)
    slugs = ["acme", "globex", "initech", "umbrella"]
    await _tenants(manager, *slugs)
    migrator = FleetMigrator(manager, ini, concurrency=4)
    try:
        report = await migrator.run("upgrade", "head")
    finally:
        await migrator.close()
    assert report.succeeded, report.results
    assert sorted(r.tenant for r in report.results if r.status == "ok") == slugs
    assert {r.to_revision for r in report.results} == {"b2"}
    conn = await _raw(postgres_url)
    try:
        windows = []
        for slug in slugs:
            schema = f"tenant_{slug}"
            # Each tenant's migration ran in its own schema, and only there.
            marks = await conn.fetch(f'SELECT schema, started, finished FROM "{schema}".marks')  # noqa: S608
            assert [m["schema"] for m in marks] == [schema]
            windows.append((marks[0]["started"], marks[0]["finished"]))
            assert await conn.fetchval(f'SELECT version_num FROM "{schema}".alembic_version') == "b2"  # noqa: S608
            # Same primary key in two tenants: the tables are separate.
            await conn.execute(f"INSERT INTO \"{schema}\".items (id, name) VALUES (1, '{slug}')")  # noqa: S608
        for slug in slugs:
            assert await conn.fetchval(f'SELECT name FROM "tenant_{slug}".items WHERE id = 1') == slug  # noqa: S608
        assert await conn.fetchval("SELECT to_regclass('public.items')") is None
        assert await conn.fetchval("SELECT to_regclass('public.alembic_version')") is None
    finally:
        await conn.close()
    # Some migrations overlapped in time: the run really was concurrent.
    windows.sort()
    assert any(later[0] < earlier[1] for earlier, later in zip(windows, windows[1:], strict=False))
    assert await _results(postgres_url, report.run_id) == dict.fromkeys(slugs, "ok")


async def test_a_no_op_run_skips_every_tenant_without_alembic(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    await _tenants(manager, "acme", "globex")
    migrator = FleetMigrator(manager, project, concurrency=2)
    try:
        assert (await migrator.run()).succeeded
        planned: list[int] = []
        report = await migrator.run(on_plan=planned.append)
        status = await migrator.status()
    finally:
        await migrator.close()
    assert planned == [0]  # no worker process was started
    assert [r.status for r in report.results] == ["skipped", "skipped"]
    assert await _results(postgres_url, report.run_id) == {"acme": "skipped", "globex": "skipped"}
    assert [(s.tenant, s.versions, s.at_target) for s in status] == [
        ("acme", ("b2",), True),
        ("globex", ("b2",), True),
    ]


async def test_read_versions_is_one_query_over_many_schemas(manager: TenancyManager, project: Path) -> None:
    await _tenants(manager, "acme", "globex")
    migrator = FleetMigrator(manager, project)
    try:
        await migrator.run("upgrade", "a1", tenants=["acme"])
        async with migrator.engine.connect() as conn:
            versions = await read_versions(conn, ["tenant_acme", "tenant_globex", "tenant_nobody"])
    finally:
        await migrator.close()
    assert versions == {"tenant_acme": ("a1",), "tenant_globex": None}


async def test_versions_are_read_a_batch_per_transaction_so_locks_never_pile_up(
    manager: TenancyManager, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each version table read stays locked until its transaction ends: over 10,000
    # tenants in one transaction, the server's lock table ran out.
    from fastapi_tenancy.migrations import fleet

    slugs = ["acme", "globex", "initech", "umbrella", "wayne"]
    await _tenants(manager, *slugs)
    monkeypatch.setattr(fleet, "_VERSIONS_PER_QUERY", 2)
    held_before: list[int] = []

    async def reading(conn: AsyncConnection, schemas: Iterable[str], **kwargs: Any) -> Any:
        held_before.append(
            await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation' "
                    "AND CAST(CAST(relation AS regclass) AS text) LIKE '%alembic_version'"
                )
            )
        )
        return await read_versions(conn, schemas, **kwargs)

    monkeypatch.setattr(fleet, "read_versions", reading)
    migrator = FleetMigrator(manager, project)
    try:
        await migrator.run("upgrade", "a1", tenants=["acme", "initech"])
        status = {s.tenant: s.versions for s in await migrator.status()}
    finally:
        await migrator.close()
    assert status == {"acme": ("a1",), "globex": None, "initech": ("a1",), "umbrella": None, "wayne": None}
    assert len(held_before) >= 3 and set(held_before) == {0}, held_before


async def test_a_failure_is_recorded_and_the_others_go_on(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    await _tenants(manager, "acme", "bad", "globex")
    conn = await _raw(postgres_url)
    await conn.execute("CREATE TABLE tenant_bad.fail_here (x int)")
    await conn.close()
    migrator = FleetMigrator(manager, project, concurrency=2)
    try:
        report = await migrator.run()
        downgraded = await migrator.run("downgrade", "a1", tenants=["acme"])
        status = {s.tenant: s.versions for s in await migrator.status()}
    finally:
        await migrator.close()
    assert not report.succeeded
    failed = [r for r in report.results if r.status == "failed"]
    assert [r.tenant for r in failed] == ["bad"]
    assert failed[0].error is not None and "boom" in failed[0].error
    # The failed tenant's migration was rolled back whole: it is still at base.
    assert status == {"acme": ("a1",), "bad": None, "globex": ("b2",)}
    assert downgraded.succeeded and downgraded.results[0].to_revision == "a1"
    assert (await _results(postgres_url, report.run_id))["bad"] == "failed"


@pytest.mark.parametrize("mode", ["canary", "fail_fast"])
async def test_a_failing_canary_or_fail_fast_stops_the_run(
    manager: TenancyManager, project: Path, postgres_url: str, mode: str
) -> None:
    await _tenants(manager, "a-bad", "b", "c", "d")
    conn = await _raw(postgres_url)
    await conn.execute("CREATE TABLE tenant_a_bad.fail_here (x int)")
    await conn.close()
    migrator = FleetMigrator(manager, project, concurrency=1)
    try:
        if mode == "canary":
            report = await migrator.run(canary=1)
        else:
            report = await migrator.run(fail_fast=True)
        status = {s.tenant: s.versions for s in await migrator.status()}
    finally:
        await migrator.close()
    assert report.stopped and not report.succeeded
    assert [r.tenant for r in report.results] == ["a-bad"]
    assert sorted(report.not_run) == ["b", "c", "d"]
    assert status == {"a-bad": None, "b": None, "c": None, "d": None}


async def test_dry_run_changes_nothing(manager: TenancyManager, project: Path, postgres_url: str) -> None:
    await _tenants(manager, "acme")
    migrator = FleetMigrator(manager, project)
    try:
        report = await migrator.run(dry_run=True)
        status = await migrator.status()
    finally:
        await migrator.close()
    assert [(r.tenant, r.status) for r in report.results] == [("acme", "planned")]
    assert status[0].versions is None
    conn = await _raw(postgres_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.tenancy_migration_runs')") is None
    finally:
        await conn.close()


async def test_lock_timeout_fails_a_blocked_tenant_not_the_fleet(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    await _tenants(manager, "acme", "globex")
    migrator = FleetMigrator(manager, project, concurrency=2, lock_timeout="200ms")
    blocker = await _raw(postgres_url)
    try:
        await migrator.run("upgrade", "a1")
        # An open transaction reading acme's table holds a lock ALTER TABLE must wait for.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.fetch("SELECT * FROM tenant_acme.items")
        report = await migrator.run("upgrade", "head")
        await transaction.rollback()
    finally:
        await blocker.close()
        await migrator.close()
    outcome = {r.tenant: r for r in report.results}
    assert outcome["globex"].status == "ok"
    assert outcome["acme"].status == "failed"
    assert outcome["acme"].error is not None and "lock timeout" in outcome["acme"].error


async def test_an_interrupted_run_resumes_without_redoing_finished_tenants(
    manager: TenancyManager, tmp_path: Path, postgres_url: str
) -> None:
    ini = make_project(tmp_path / "p", sleep=0.2)
    slugs = [f"t{i}" for i in range(5)]
    await _tenants(manager, *slugs)
    first_done = asyncio.Event()
    seen: list[TenantResult] = []

    def on_result(result: TenantResult) -> None:
        seen.append(result)
        first_done.set()

    migrator = FleetMigrator(manager, ini, concurrency=1)
    try:
        run = asyncio.create_task(migrator.run(on_result=on_result))
        await first_done.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        done_before = await _done(postgres_url)
        assert 1 <= len(done_before) < len(slugs)
        report = await migrator.run()
    finally:
        await migrator.close()
    assert report.resumed and report.succeeded
    redone = {r.tenant for r in report.results if r.status == "ok"}
    assert redone == set(slugs) - done_before
    assert {r.tenant for r in report.results if r.status == "skipped"} == done_before
    assert await _done(postgres_url) == set(slugs)


async def _done(url: str) -> set[str]:
    conn = await _raw(url)
    try:
        rows = await conn.fetch("SELECT tenant FROM public.tenancy_migration_results WHERE status = 'ok'")
    finally:
        await conn.close()
    return {row["tenant"] for row in rows}


async def test_only_one_fleet_run_at_a_time(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    await _tenants(manager, "acme")
    holder = await _raw(postgres_url)
    await holder.execute("SELECT pg_advisory_lock($1)", 0x7E4A_F1EE)
    migrator = FleetMigrator(manager, project)
    try:
        with pytest.raises(FleetBusyError):
            await migrator.run()
    finally:
        await holder.close()
        await migrator.close()


async def test_the_template_is_migrated_with_the_tenants_and_clones_start_at_head(
    postgres_url: str, project: Path
) -> None:
    from fastapi_tenancy import TenancyConfig

    config = TenancyConfig(
        database_url=postgres_url, database_pool_size=2, schema_template="tenancy_template"
    )
    manager = TenancyManager(config)
    await manager.initialize()
    migrator = FleetMigrator(manager, project)
    try:
        report = await migrator.run()
        assert [(r.tenant, r.status, r.to_revision) for r in report.results] == [("(template)", "ok", "b2")]
        await manager.register_tenant("acme", "Acme")  # cloned from the template
        status = {s.tenant: (s.versions, s.at_target) for s in await migrator.status()}
        again = await migrator.run()
    finally:
        await migrator.close()
        await manager.close()
    assert status == {"(template)": (("b2",), True), "acme": (("b2",), True)}
    assert [r.status for r in again.results] == ["skipped", "skipped"]
