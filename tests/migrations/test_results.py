"""Reading the runs and results tables back (what the operator console shows), on real PostgreSQL."""

from pathlib import Path

import pytest

from fastapi_tenancy import TenancyManager
from fastapi_tenancy.migrations.fleet import FleetMigrator
from fastapi_tenancy.migrations.results import ResultsTables

from .test_fleet import _raw, _tenants

pytestmark = pytest.mark.postgres


async def test_runs_and_results_read_back_newest_first_with_counts_and_paging(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    tables = ResultsTables("public")
    migrator = FleetMigrator(manager, project, concurrency=2)
    try:
        async with migrator.engine.connect() as conn:
            assert not await tables.exist(conn)  # before any run: nothing to read, no error
        await _tenants(manager, "acme", "bad", "globex", "initech")
        conn = await _raw(postgres_url)
        await conn.execute("CREATE TABLE tenant_bad.fail_here (x int)")
        await conn.close()
        first = await migrator.run("upgrade", "a1")
        second = await migrator.run("upgrade", "head")
        async with migrator.engine.connect() as conn:
            assert await tables.exist(conn)
            runs = await tables.list_runs(conn)
            one = await tables.list_runs(conn, limit=1)
            run = await tables.get_run(conn, second.run_id)
            missing = await tables.get_run(conn, "no-such-run")
            failed = await tables.list_results(conn, second.run_id, status="failed")
            page1 = await tables.list_results(conn, second.run_id, limit=2)
            page2 = await tables.list_results(conn, second.run_id, limit=2, after=page1[-1].tenant)
    finally:
        await migrator.close()
    assert [r.run_id for r in runs] == [second.run_id, first.run_id]
    assert [r.run_id for r in one] == [second.run_id]
    assert runs[1].counts == {"ok": 4} and runs[1].status == "finished"
    assert run is not None and run == runs[0]
    assert (run.direction, run.target, run.status) == ("upgrade", "head", "failed")
    assert run.counts == {"ok": 3, "failed": 1} and run.finished_at is not None
    assert missing is None
    assert [(r.tenant, r.from_revision, r.to_revision) for r in failed] == [("bad", "a1", None)]
    assert failed[0].error is not None and "boom" in failed[0].error
    assert [r.tenant for r in page1 + page2] == ["acme", "bad", "globex", "initech"]
    assert all(r.duration > 0 for r in page1 + page2 if r.status == "ok")


async def test_in_progress_sees_a_run_held_by_another_process_of_this_database_only(
    manager: TenancyManager, project: Path, postgres_url: str
) -> None:
    migrator = FleetMigrator(manager, project)
    holder = await _raw(postgres_url)
    other = await _raw(postgres_url.rsplit("/", 1)[0] + "/postgres")
    try:
        assert not await migrator.in_progress()
        # The same key held in another database is another deployment's run.
        await other.execute("SELECT pg_advisory_lock($1)", 0x7E4A_F1EE)
        assert not await migrator.in_progress()
        await holder.execute("SELECT pg_advisory_lock($1)", 0x7E4A_F1EE)
        assert await migrator.in_progress()
        await holder.execute("SELECT pg_advisory_unlock_all()")
        assert not await migrator.in_progress()
    finally:
        await holder.close()
        await other.close()
        await migrator.close()
