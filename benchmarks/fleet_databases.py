"""Fleet migrations with database isolation: one database per tenant on local PostgreSQL.

Registers `--tenants` tenants (each a database named with a unique prefix), then times
`FleetMigrator.run`: a first upgrade (a CREATE TABLE in every database), a no-op
upgrade (every database's version read, nothing run), and one ALTER TABLE across all.
Drops every database it made. Writes `results/fleet-databases.json`. Not a test.

    .venv/bin/python benchmarks/fleet_databases.py --tenants 40 --concurrency 4
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fleet import ALTER_1, CREATE, TEMPLATE, add_revision  # noqa: E402

from fastapi_tenancy import TenancyConfig, TenancyManager  # noqa: E402
from fastapi_tenancy.migrations.fleet import FleetMigrator  # noqa: E402

SERVER = os.environ.get("TENANCY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    server = make_url(SERVER)
    prefix = f"bfd{uuid.uuid4().hex[:6]}_"
    registry = f"{prefix}registry"
    admin = await asyncpg.connect(
        host=server.host, port=server.port or 5432, user=server.username, database="postgres"
    )
    await admin.execute(f'CREATE DATABASE "{registry}"')
    url = server.set(database=registry).render_as_string(hide_password=False)
    manager = TenancyManager(
        TenancyConfig(
            database_url=url, database_pool_size=2, isolation_strategy="database", schema_prefix=prefix
        )
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-db-"))
    out: dict[str, Any] = {"tenants": args.tenants, "concurrency": args.concurrency}
    try:
        await manager.initialize()
        shutil.copytree(TEMPLATE, workdir, dirs_exist_ok=True)
        ini = workdir / "alembic.ini"
        ini.write_text(ini.read_text().replace("%(here)s", str(workdir)))
        add_revision(workdir, "r1", None, CREATE)
        started = time.perf_counter()
        for i in range(args.tenants):
            await manager.register_tenant(f"t{i}", "x")
        out["register_all_s"] = round(time.perf_counter() - started, 2)
        migrator = FleetMigrator(manager, ini, concurrency=args.concurrency)
        try:
            for label in ("first_upgrade", "noop_upgrade"):
                started = time.perf_counter()
                report = await migrator.run("upgrade", "head")
                out[f"{label}_s"] = round(time.perf_counter() - started, 2)
                out[f"{label}_counts"] = {s: report.count(s) for s in ("ok", "failed", "skipped")}
            add_revision(workdir, "r2", "r1", ALTER_1)
            started = time.perf_counter()
            report = await migrator.run("upgrade", "head")
            out["alter_table_s"] = round(time.perf_counter() - started, 2)
            out["alter_table_counts"] = {s: report.count(s) for s in ("ok", "failed", "skipped")}
        finally:
            await migrator.close()
        out["load"] = os.getloadavg()
    finally:
        await manager.close()
        names = await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%")
        for row in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{row[0]}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results = ROOT / "benchmarks" / "results"
    (results / "fleet-databases.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
