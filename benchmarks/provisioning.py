"""How long does registering a tenant take? `register_tenant` with a 30-table schema.

Each registration writes the registry row, creates the tenant's storage (a PostgreSQL
schema, or a SQLite file) and the app's tables in it, and marks the tenant active: what
a sign-up waits for. The app metadata has `--tables` tables (default 30), each with a
primary key, a foreign key to the previous table, a unique constraint, an index, a
server default and a few typed columns. Registrations run one after another; the
report gives p50/p95/max in milliseconds.

    .venv/bin/python benchmarks/provisioning.py [--tenants 50] [--backend postgres]

PostgreSQL from `TENANCY_BENCH_POSTGRES_URL` (database `bench_provisioning`, created and
dropped); SQLite in a temp directory. Writes `results/provisioning-<backend>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

from fastapi_tenancy import TenancyConfig, TenancyManager  # noqa: E402

DB_NAME = "bench_provisioning"


def app_metadata(tables: int) -> sa.MetaData:
    """A realistic app schema: `tables` tables chained by foreign keys."""
    metadata = sa.MetaData()
    for i in range(tables):
        columns: list[Any] = [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("code", sa.String(32), nullable=False, unique=True),
            sa.Column("title", sa.String(200), nullable=False, index=True),
            sa.Column("amount", sa.Numeric(12, 2), nullable=False, server_default="0"),
            sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
            sa.Column("notes", sa.Text),
        ]
        if i:
            columns.append(sa.Column("parent_id", sa.ForeignKey(f"table_{i - 1:02d}.id"), index=True))
        sa.Table(f"table_{i:02d}", metadata, *columns)
    return metadata


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    metadata = app_metadata(args.tables)
    manager = TenancyManager(TenancyConfig(database_url=database_url))
    await manager.initialize()
    try:
        await manager.register_tenant("warm-up", "Warm-up", app_metadata=metadata)
        timings: list[float] = []
        for i in range(args.tenants):
            start = time.perf_counter()
            await manager.register_tenant(f"tenant-{i:04d}", f"Tenant {i}", app_metadata=metadata)
            timings.append((time.perf_counter() - start) * 1000)
        return {
            "p50_ms": statistics.median(timings),
            "p95_ms": percentile(timings, 0.95),
            "max_ms": max(timings),
            "mean_ms": statistics.fmean(timings),
        }
    finally:
        await manager.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--tables", type=int, default=30)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    base = overhead.parse_args([])
    parser.add_argument("--pg-base", default=base.pg_base)
    parser.add_argument("--maintenance-db", default=base.maintenance_db)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_provisioning_"))
    pg = args.pg_base.rstrip("/")
    drop = f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
    try:
        if args.backend == "postgres":
            asyncio.run(overhead.pg_admin(pg, args.maintenance_db, drop, f"CREATE DATABASE {DB_NAME}"))
            url = f"{pg}/{DB_NAME}"
        else:
            url = f"sqlite+aiosqlite:///{workdir / 'registry.db'}"
        result = asyncio.run(run(args, url))
    finally:
        if args.backend == "postgres":
            asyncio.run(overhead.pg_admin(pg, args.maintenance_db, drop))
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"backend": args.backend, "tenants": args.tenants, "tables": args.tables, "register_ms": result}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"provisioning-{args.backend}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.backend}: register_tenant with {args.tables} tables: p50 {result['p50_ms']:.0f} ms, "
        f"p95 {result['p95_ms']:.0f} ms, max {result['max_ms']:.0f} ms ({args.tenants} tenants)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
