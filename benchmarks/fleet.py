"""Fleet operations with N schema tenants: no-op upgrade, one ALTER TABLE across all, kill + resume.

Runs the real `fastapi-tenancy` console script against its own `bench_fleet_*`
database (`--database-prefix`) on local PostgreSQL (TENANCY_BENCH_POSTGRES_URL) and
writes `results/fleet-<tenants>.json` with the machine's load average at the start
(`results/fleet.md` discusses them). `make bench` runs it at 100 and at 1,000 tenants,
and `--noop-only` at 10,000 (registration, then only the no-op upgrade: the other
steps at 10,000 would take most of an hour). Tenants are registered
`--register-concurrency` at a time (untimed); a `--noop-only` run writes
`results/fleet-noop-<tenants>.json`. Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/fleet.py --tenants 100   # --concurrency N: fixed, not chosen by the run
    .venv/bin/python benchmarks/fleet.py --tenants 10000 --noop-only
"""

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "src" / "fastapi_tenancy" / "migrations" / "template"
SCRIPT = Path(sys.executable).parent / "fastapi-tenancy"
SERVER = os.environ.get("TENANCY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432")

REVISION = """
import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
"""

CREATE = """    op.create_table(
        "items", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text)
    )
    op.create_index("ix_items_name", "items", ["name"])"""
ALTER_1 = """    op.add_column("items", sa.Column("price", sa.Integer, server_default="0", nullable=False))"""
ALTER_2 = """    op.add_column("items", sa.Column("sku", sa.String(40)))"""


def add_revision(project: Path, revision: str, down: str | None, body: str) -> None:
    versions = project / "migrations" / "tenant" / "versions"
    (versions / f"{revision}.py").write_text(REVISION.format(revision=revision, down=down, body=body))


CPU_SECONDS: list[float] = []  # of each `cli` process (user + system), whatever the machine's load


def cli(env: dict[str, str], cwd: Path, *args: str) -> tuple[float, int, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([str(SCRIPT), "--json", *args], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError:
        parsed = {"stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return elapsed, done.returncode, parsed


def durations(report: dict[str, Any]) -> dict[str, float]:
    ok = sorted(r["duration"] * 1000 for r in report["results"] if r["status"] == "ok")
    if not ok:
        return {}
    return {
        "p50_ms": round(statistics.median(ok), 1),
        "p95_ms": round(ok[int(len(ok) * 0.95) - 1], 1),
        "max_ms": round(ok[-1], 1),
    }


async def connect(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        database=parsed.database or "postgres",
    )


async def ok_tenants(url: str) -> set[str]:
    conn = await connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant FROM public.tenancy_migration_results r JOIN public.tenancy_migration_runs u "
            "USING (run_id) WHERE u.target = 'head' AND r.status = 'ok' AND u.status = 'running'"
        )
    finally:
        await conn.close()
    return {row["tenant"] for row in rows}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=None, help="fixed (default: the run chooses)")
    parser.add_argument("--database-prefix", default="bench_fleet_", help="of the throwaway database")
    parser.add_argument("--register-concurrency", type=int, default=8)
    parser.add_argument("--noop-only", action="store_true", help="measure only the no-op upgrade")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()

    fixed = () if args.concurrency is None else ("--concurrency", str(args.concurrency))
    database = f"{args.database_prefix}{uuid.uuid4().hex[:8]}"
    admin = await connect(SERVER)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    url = make_url(SERVER).set(database=database).render_as_string(hide_password=False)
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    project = work / "project"
    shutil.copytree(TEMPLATE, project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    env.update(
        TENANCY_DATABASE_URL=url, TENANCY_DATABASE_POOL_SIZE="4", TENANCY_SCHEMA_TEMPLATE="tenancy_template"
    )
    out: dict[str, Any] = {
        "tenants": args.tenants,
        "concurrency": args.concurrency,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    try:
        add_revision(project, "r1", None, CREATE)
        # The template is migrated like a tenant; every tenant is then cloned from it at r1.
        elapsed, code, _ = cli(env, project, "migrate", "upgrade")
        assert code == 0, _
        sys.path.insert(0, str(ROOT / "src"))
        from fastapi_tenancy import TenancyConfig, TenancyManager

        manager = TenancyManager(TenancyConfig(database_url=url, schema_template="tenancy_template"))
        await manager.initialize()
        started = time.perf_counter()
        numbers = iter(range(args.tenants))

        async def register() -> None:
            for i in numbers:
                await manager.register_tenant(f"t{i:05d}", f"Tenant {i}")

        await asyncio.gather(*(register() for _ in range(args.register_concurrency)))
        out["register_all_s"] = round(time.perf_counter() - started, 2)
        await manager.close()
        print(f"registered {args.tenants} tenants in {out['register_all_s']} s", flush=True)

        # 1. A no-op upgrade: every tenant at head.
        noop: list[float] = []
        noop_cpu: list[float] = []
        for _ in range(3):
            elapsed, code, report = cli(env, project, "migrate", "upgrade")
            assert code == 0 and report["counts"]["skipped"] == args.tenants + 1, report
            noop.append(round(elapsed, 2))
            noop_cpu.append(round(CPU_SECONDS[-1], 2))
        out["noop_upgrade_s"] = noop
        # The CLI's own CPU time: on a loaded machine, wall time is mostly waiting for a core.
        out["noop_upgrade_cpu_s"] = noop_cpu
        print(f"no-op upgrade (whole CLI process): {noop} s, CPU {noop_cpu} s", flush=True)
        # The same in process: what the run itself costs, without starting Python and importing.
        from fastapi_tenancy.migrations.fleet import FleetMigrator

        manager = TenancyManager(TenancyConfig(database_url=url, schema_template="tenancy_template"))
        await manager.initialize()
        migrator = FleetMigrator(manager, project / "alembic.ini")
        in_process = []
        for _ in range(3):
            started = time.perf_counter()
            result = await migrator.run()
            in_process.append(round(time.perf_counter() - started, 3))
            assert result.count("skipped") == args.tenants + 1
        await migrator.close()
        await manager.close()
        out["noop_upgrade_in_process_s"] = in_process
        print(f"no-op upgrade (in process): {in_process} s", flush=True)
        if args.noop_only:
            out["noop_only"] = True
            write(out, args.output_dir)
            return

        # 2. One ALTER TABLE across all of them, concurrently, with per-tenant results.
        add_revision(project, "r2", "r1", ALTER_1)
        elapsed, code, report = cli(env, project, "migrate", "upgrade", *fixed)
        assert code == 0, report
        out["alter_all"] = {
            "wall_s": round(elapsed, 2),
            "cpu_s": round(CPU_SECONDS[-1], 2),
            "concurrency": report.get("concurrency"),
            "counts": report["counts"],
            **durations(report),
        }
        print(f"ALTER TABLE across all: {out['alter_all']}", flush=True)

        # 3. Kill the run halfway (the whole process group, workers too), then re-run.
        add_revision(project, "r3", "r2", ALTER_2)
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; we poll the database meanwhile
            [str(SCRIPT), "--json", "migrate", "upgrade", *fixed],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while len(await ok_tenants(url)) < (args.tenants + 1) // 2:
            await asyncio.sleep(0.05)
            assert process.poll() is None, "the run finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        await asyncio.sleep(0.5)
        done_before = await ok_tenants(url)
        elapsed, code, report = cli(env, project, "migrate", "upgrade", *fixed)
        assert code == 0, report
        redone = {r["tenant"] for r in report["results"] if r["status"] == "ok"}
        skipped = {r["tenant"] for r in report["results"] if r["status"] == "skipped"}
        out["kill_and_resume"] = {
            "done_before_kill": len(done_before),
            "resumed": report["resumed"],
            "migrated_by_rerun": len(redone),
            "skipped_by_rerun": len(skipped),
            "redone_twice": len(redone & done_before),
            "rerun_wall_s": round(elapsed, 2),
        }
        assert not redone & done_before and len(redone) + len(done_before) == args.tenants + 1
        elapsed, code, report = cli(env, project, "migrate", "status")
        assert code == 0 and all(r["revision"] == "r3" for r in report), report
        print(f"kill halfway, re-run: {out['kill_and_resume']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        admin = await connect(SERVER)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    write(out, args.output_dir)


def write(out: dict[str, Any], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    name = f"fleet-noop-{out['tenants']}" if out.get("noop_only") else f"fleet-{out['tenants']}"
    (where / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
