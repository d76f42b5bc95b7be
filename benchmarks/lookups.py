"""What does resolving a tenant cost? `TenancyManager.resolve()` in process, in microseconds.

Times `manager.resolve(HTTPConnection(scope))` (resolution, then the lookup cache) for
a request naming one of N registered tenants, by `--strategy`: `header` (`X-Tenant-ID`),
`subdomain` (`Host: t-00001.example.com`) or `domain` (`Host: t-00001.example.org`, a
custom domain of each tenant):

- `hit`: the tenant is in the in-process cache (the steady state);
- `miss`: the cache was cleared first, so the lookup reads the registry (one query on
  the registry's database: SQLite file or PostgreSQL; two for a domain: the domain, then
  the tenant by its identifier);
- `unknown`: an identifier (or host) no tenant has, served from the negative cache after
  its first miss.

Each figure is the median over `--repeat` batches of the mean per call in a batch. The
registry is a `SQLAlchemyTenantStore` on SQLite (a temp file) or PostgreSQL
(`TENANCY_BENCH_POSTGRES_URL`, database `bench_lookups`, created and dropped).

    .venv/bin/python benchmarks/lookups.py [--tenants 10000] [--backend postgres] [--strategy header]
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

from starlette.requests import HTTPConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

from fastapi_tenancy import TenancyConfig, TenancyManager, Tenant  # noqa: E402

DB_NAME = "bench_lookups"


def scope_for(identifier: str, strategy: str = "header") -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"x-tenant-id", identifier.encode())]
    if strategy == "subdomain":
        headers = [(b"host", f"{identifier}.example.com".encode())]
    elif strategy == "domain":
        headers = [(b"host", f"{identifier}.example.org".encode())]
    return {
        "type": "http",
        "method": "GET",
        "path": "/orders",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }


async def per_call_us(manager: TenancyManager, scopes: list[dict[str, Any]], clear: bool) -> float:
    """Mean microseconds per resolve() over `scopes`, clearing the cache before each if `clear`."""
    total = 0.0
    for scope in scopes:
        if clear:
            manager.lookup.clear()
        start = time.perf_counter()
        try:
            await manager.resolve(HTTPConnection(scope))
        except Exception:  # unknown tenants raise TenantNotFoundError: that is the point
            pass
        total += time.perf_counter() - start
    return total / len(scopes) * 1e6


async def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"resolution_strategy": args.strategy}
    if args.strategy == "subdomain":
        settings["domain_suffix"] = "example.com"
    manager = TenancyManager(TenancyConfig(database_url=database_url, **settings))
    await manager.initialize()
    try:
        tenants = [Tenant(identifier=f"t-{i:05d}", name=f"T{i}") for i in range(args.tenants)]
        for tenant in tenants:  # straight into the registry: no storage is needed to resolve
            await manager.store.create(tenant.with_status(tenant.status.ACTIVE))
            if args.strategy == "domain":
                from fastapi_tenancy.domain import Domain

                await manager.store.add_domain(Domain(f"{tenant.identifier}.example.org", tenant.id))
        hits = [scope_for(t.identifier, args.strategy) for t in tenants]
        for scope in hits:  # warm the cache
            await manager.resolve(HTTPConnection(scope))
        unknown = [scope_for(f"nobody-{i}", args.strategy) for i in range(min(args.tenants, 1000))]
        results: dict[str, list[float]] = {"hit": [], "miss": [], "unknown": []}
        for _ in range(args.repeat):
            results["hit"].append(await per_call_us(manager, hits, clear=False))
            results["miss"].append(await per_call_us(manager, hits[: args.misses], clear=True))
            for scope in hits:  # refill the cache that the misses cleared
                await manager.resolve(HTTPConnection(scope))
            await per_call_us(manager, unknown, clear=False)  # remember them as unknown
            results["unknown"].append(await per_call_us(manager, unknown, clear=False))
        return {kind: statistics.median(values) for kind, values in results.items()}
    finally:
        await manager.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--misses", type=int, default=200, help="cache misses timed per batch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--strategy", choices=["header", "subdomain", "domain"], default="header")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    base = overhead.parse_args([])
    parser.add_argument("--pg-base", default=base.pg_base)
    parser.add_argument("--maintenance-db", default=base.maintenance_db)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_lookups_"))
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
    report = {"backend": args.backend, "tenants": args.tenants, "us_per_resolve": result}
    name = (
        f"lookups-{args.backend}" if args.strategy == "header" else f"lookups-{args.backend}-{args.strategy}"
    )
    if args.strategy != "header":
        report["strategy"] = args.strategy
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.backend}, {args.strategy}, {args.tenants:,} tenants: resolve() hit {result['hit']:.1f} µs, "
        f"unknown (negative cache) {result['unknown']:.1f} µs, miss {result['miss']:.0f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
