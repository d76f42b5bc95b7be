"""What schema tenants cost PostgreSQL: catalog size, backend memory, pg_dump time.

On a database of N schema tenants registered through the Quick Start's manager (the
`bench-NNNNN` tenants of `scale.py`, 10 `orders` rows each; each tenant schema holds
`orders`, its sequence and key index, and the incarnation table the library locks):

- **catalog**: the size of `pg_catalog` (every relation, with indexes and TOAST), the
  database's size and the number of relations, total and per tenant;
- **backend memory**: one connection (the pool of a worker, shrunk to one) serves
  `GET /orders`' statements for every tenant in turn, as a long-lived pooled connection
  does over hours; the backend's memory (`pg_backend_memory_contexts`, and its
  `CacheMemoryContext`, where relation and catalog caches live) before and after, and
  the time per tenant of those first visits;
- **pg_dump**: one tenant (`pg_dump -n`) and the whole database, to /dev/null; a failure
  (e.g. `max_locks_per_transaction` too small for one transaction to lock every table)
  is recorded as it is, with its message.

    .venv/bin/python benchmarks/pg_costs.py                          # 1,000 and 10,000 tenants
    .venv/bin/python benchmarks/pg_costs.py --sizes 100,1000
    .venv/bin/python benchmarks/pg_costs.py --keep-database           # then scale.py --keep-database

Uses the database `bench_scale` (`scale.py`'s): a kept one is reused (tenants already
there are not registered again), and `--keep-database` keeps it for `scale.py`; without
it the database is dropped at the end. Writes `results/pg_costs.json` and `pg_costs.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
import scale  # noqa: E402

DB_NAME = scale.DB_NAME

CATALOG_SQL = """
SELECT
  (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pg_catalog' AND NOT c.relisshared) AS catalog_bytes,
  pg_database_size(current_database()) AS database_bytes,
  (SELECT count(*) FROM pg_class) AS relations,
  (SELECT count(*) FROM pg_namespace) AS schemas,
  (SELECT count(*) FROM pg_attribute) AS attributes
"""

MEMORY_SQL = """
SELECT sum(total_bytes) AS total,
       sum(total_bytes) FILTER (WHERE name = 'CacheMemoryContext' OR parent = 'CacheMemoryContext') AS cache
FROM pg_backend_memory_contexts
"""


async def catalog(base: str, database: str = DB_NAME) -> dict[str, int]:
    rows = await overhead.pg_admin(base, database, CATALOG_SQL)
    return {key: int(value) for key, value in rows[0][0]._mapping.items()}


async def backend_memory(database_url: str, size: int) -> dict[str, Any]:
    """Touch every tenant through one pooled connection; that backend's memory before and after."""
    env = {"TENANCY_DATABASE_POOL_SIZE": "1", "TENANCY_DATABASE_MAX_OVERFLOW": "0"}
    qs = overhead.load_app(
        overhead.QUICKSTART, {"TENANCY_DATABASE_URL": database_url, **env}, f"qs_pgcost_{size}"
    )
    await qs.manager.initialize()
    try:
        first = await qs.manager.get_tenant(scale.slug(1))
        async with qs.manager.session(first) as session:
            pid = await session.scalar(sa.text("SELECT pg_backend_pid()"))
            before = (await session.execute(sa.text(MEMORY_SQL))).one()
        began = time.perf_counter()
        for index in range(1, size + 1):
            tenant = await qs.manager.get_tenant(scale.slug(index))
            async with qs.manager.session(tenant) as session:
                (await session.execute(sa.select(qs.Order))).scalars().all()
        seconds = time.perf_counter() - began
        async with qs.manager.session(first) as session:
            same = await session.scalar(sa.text("SELECT pg_backend_pid()")) == pid
            after = (await session.execute(sa.text(MEMORY_SQL))).one()
        rss = _rss_mb(int(pid))
    finally:
        await qs.manager.close()
    return {
        "same_backend": same,
        "before_mb": {"total": int(before.total) / 2**20, "cache": int(before.cache or 0) / 2**20},
        "after_mb": {"total": int(after.total) / 2**20, "cache": int(after.cache or 0) / 2**20},
        "backend_rss_mb": rss,
        "touch_seconds": seconds,
        "touch_ms_per_tenant": seconds / size * 1000,
    }


def _rss_mb(pid: int) -> float | None:
    """The backend's resident anonymous memory, if this machine runs the server."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def pg_dump(base: str, *extra: str) -> dict[str, Any]:
    url = make_url(base.replace("+asyncpg", ""))
    cmd = [
        "pg_dump",
        "-h",
        url.host or "127.0.0.1",
        "-p",
        str(url.port or 5432),
        "-U",
        url.username or "postgres",
    ]
    cmd += [*extra, "-f", os.devnull, DB_NAME]
    env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=3600)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        # The error and its hint (the last line only names the query that failed).
        lines = done.stderr.strip().splitlines()
        reason = [line for line in lines if "error" in line.lower() or line.startswith("HINT")]
        return {"ok": False, "seconds": seconds, "error": reason or lines[-1:]}
    return {"ok": True, "seconds": seconds}


def measure(size: int, base: str, empty: dict[str, int]) -> dict[str, Any]:
    url = f"{base}/{DB_NAME}"
    result: dict[str, Any] = {"tenants": size, "loadavg": overhead._loadavg()}
    result["catalog"] = asyncio.run(catalog(base))
    grown = result["catalog"]["catalog_bytes"] - empty["catalog_bytes"]
    result["catalog"]["per_tenant_bytes"] = grown / size
    result["backend"] = asyncio.run(backend_memory(url, size))
    one_schema = "tenant_" + scale.slug(1).replace("-", "_")
    result["pg_dump_one"] = pg_dump(base, "-n", one_schema)
    result["pg_dump_all"] = pg_dump(base)
    return result


def _dump(d: dict[str, Any]) -> str:
    return f"{d['seconds']:.1f}" if d["ok"] else f"failed after {d['seconds']:.1f} s: {' '.join(d['error'])}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| schema tenants | pg_catalog MB (per tenant kB) | database MB | relations "
        "| backend memory MB after touching all (cache) | first visit ms per tenant "
        "| pg_dump one tenant s | pg_dump all s | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c, b = r["catalog"], r["backend"]
        per_tenant_kb = c["per_tenant_bytes"] / 1024
        lines.append(
            f"| {r['tenants']:,} | {c['catalog_bytes'] / 2**20:.0f} ({per_tenant_kb:.1f}) "
            f"| {c['database_bytes'] / 2**20:.0f} | {c['relations']:,} "
            f"| {b['before_mb']['total']:.1f} → {b['after_mb']['total']:.1f} ({b['after_mb']['cache']:.1f}) "
            f"| {b['touch_ms_per_tenant']:.2f} | {_dump(r['pg_dump_one'])} | {_dump(r['pg_dump_all'])} "
            f"| {r['loadavg'].split()[0]} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    return f"""# PostgreSQL-side cost of schema tenants

Generated by `benchmarks/pg_costs.py` on {report["date"]} (PostgreSQL {report["server_version"]},
`max_locks_per_transaction` {report["max_locks"]}). Per tenant: the catalog's growth over
an empty database's, divided by the tenants. Each tenant: the Quick Start's `orders`
table with 10 rows, its sequence and key index, and the library's incarnation table.

{table(report["results"])}

Backend memory: one pooled connection served `GET /orders`' statements for every tenant
once (`pg_backend_memory_contexts`, total; in brackets the relation and catalog caches).
Load: the 1-minute load average when the size was measured (2 shared cores).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--seed-concurrency", type=int, default=8)
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    parser.add_argument("--pg-base", default=overhead.DEFAULT_PG_BASE)
    parser.add_argument("--maintenance-db", default="postgres")
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(",") if x.strip())
    base = args.pg_base.rstrip("/")
    registered = asyncio.run(scale.registered_tenants(base, args.maintenance_db))
    if registered is None:
        asyncio.run(overhead.pg_admin(base, args.maintenance_db, f"CREATE DATABASE {DB_NAME}"))
        registered = 0
    sizes = [s for s in sizes if s >= registered] or [registered]
    results = []
    # The catalog of a database without tenants, for the growth per tenant.
    empty = asyncio.run(catalog(base, args.maintenance_db))
    try:
        for size in sizes:
            if size > registered:
                seconds = asyncio.run(
                    scale.add_tenants(
                        f"{base}/{DB_NAME}", registered + 1, size + 1, 10, args.seed_concurrency
                    )
                )
                print(f"[{size} tenants] registered {size - registered} more in {seconds:.1f} s", flush=True)
                registered = size
            result = measure(size, base, empty)
            print(f"[{size} tenants] {json.dumps(result)}", flush=True)
            results.append(result)
        facts = asyncio.run(
            overhead.pg_admin(base, DB_NAME, "SHOW server_version", "SHOW max_locks_per_transaction")
        )
    finally:
        if not args.keep_database:
            asyncio.run(
                overhead.pg_admin(
                    base, args.maintenance_db, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
                )
            )
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "server_version": facts[0][0][0],
        "max_locks": facts[1][0][0],
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "pg_costs.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "pg_costs.md").write_text(markdown(report))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
