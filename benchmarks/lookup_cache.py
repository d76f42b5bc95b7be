"""What does the registry cache cost with many tenants cached? In process, no HTTP.

A `TenantLookup` in front of a `SQLAlchemyTenantStore` on PostgreSQL (database
`bench_lookup_cache`, created and dropped; `TENANCY_BENCH_POSTGRES_URL`) holding
`--tenants` tenants, every one of them cached, as a worker serving traffic spread over
all of them holds them:

- `memory`: the process's resident set size before and after the cache was filled, per
  cached tenant (the registry's rows are read in batches; the lookup keeps them);
- `refresh`: the CPU time (`time.process_time`) of the refresh-ahead re-reading every
  cached tenant, batch by batch, as its sweeper does once per TTL when every tenant is
  busy, per tenant; with nothing changed in the registry (the steady state), then with
  `--changed` percent of the tenants changed since they were read;
- `gc`: a full collection's pause with the tenants cached, and the same after
  `gc.freeze()` (the warm heap moved out of the collector's reach), median of 5 each.

    .venv/bin/python benchmarks/lookup_cache.py --tenants 10000
    .venv/bin/python benchmarks/lookup_cache.py --tenants 100000 --output-dir /tmp/results

Writes `results/lookup-cache-<tenants>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
import sqlalchemy as sa  # noqa: E402

from fastapi_tenancy import Tenant  # noqa: E402
from fastapi_tenancy.lookup import TenantLookup  # noqa: E402
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore  # noqa: E402

DB_NAME = "bench_lookup_cache"
BATCH = 100  # the refresh-ahead's batch (lookup._REFRESH_BATCH)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slug(index: int) -> str:
    return f"bench-{index:06d}"


async def seed(store: SQLAlchemyTenantStore, tenants: int) -> None:
    """`tenants` active tenants, half with a little metadata, made by PostgreSQL itself.

    No `Tenant` is built in this process for them: its heap, measured next, holds only
    what the cache keeps.
    """
    table = store.table.name  # "tenants": ours, not input
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"INSERT INTO {table} (id, identifier, name, status, metadata, created_at, updated_at) "  # noqa: S608
                "SELECT CAST(gen_random_uuid() AS text), 'bench-' || lpad(CAST(g AS text), 6, '0'), "
                "'Tenant ' || g, 'active', CASE WHEN g % 2 = 1 THEN CAST('{\"plan\": \"pro\"}' AS jsonb) "
                "ELSE CAST('{}' AS jsonb) END, now(), now() FROM generate_series(0, :last) AS g"
            ),
            {"last": tenants - 1},
        )


async def fill(lookup: TenantLookup, identifiers: list[str]) -> None:
    """Every identifier cached, as a first request for each would leave it.

    A request's slug is a string of its own (decoded from its header), not the one in the
    registry's row: each is passed as a copy.
    """
    for start in range(0, len(identifiers), 1000):
        began = time.monotonic()
        found = await lookup.store.get_many(identifiers[start : start + 1000])
        for identifier, tenant in found.items():
            lookup._remember(identifier.encode().decode(), tenant, began)


async def refresh_us(lookup: TenantLookup, identifiers: list[str]) -> float:
    """CPU µs per tenant of re-reading every cached tenant in refresh batches."""
    began = time.process_time()
    for start in range(0, len(identifiers), BATCH):
        await lookup._refresh(identifiers[start : start + BATCH])
    return (time.process_time() - began) / len(identifiers) * 1e6


def full_collection_ms(repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    store = SQLAlchemyTenantStore(url)
    await store.initialize()
    try:
        await seed(store, args.tenants)
        identifiers = [slug(i) for i in range(args.tenants)]
        lookup = TenantLookup(store, ttl=3600.0, max_size=args.tenants)
        await store.get_many(identifiers[:BATCH])  # the pool and the statement, warm
        gc.collect()
        before = rss_mb()
        await fill(lookup, identifiers)
        gc.collect()
        after = rss_mb()
        # Again, traced: tracemalloc's bookkeeping would have inflated the RSS above.
        lookup.clear()
        gc.collect()
        tracemalloc.start()
        await fill(lookup, identifiers)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(lookup._hits) == args.tenants, len(lookup._hits)
        result: dict[str, Any] = {
            "tenants": args.tenants,
            "rss_mb": {"before": before, "after": after},
            "bytes_per_tenant": (after - before) * 1024 * 1024 / args.tenants,
            # What Python allocated and still holds after the fill (tracemalloc): exact, where
            # RSS also counts the allocator's free space and tracemalloc's own bookkeeping.
            "allocated_bytes_per_tenant": traced / args.tenants,
        }
        unchanged = [await refresh_us(lookup, identifiers) for _ in range(args.repeat)]
        result["refresh_unchanged_us_per_tenant"] = statistics.median(unchanged)
        result["refresh_unchanged_rounds"] = unchanged
        if args.changed:
            step = max(1, round(100 / args.changed))
            changed = []
            for _ in range(args.repeat):
                async with store.engine.begin() as conn:  # bumps updated_at, as every change does
                    await conn.execute(
                        store.table.update()
                        .where(store.table.c.identifier.in_(identifiers[::step]))
                        .values(updated_at=Tenant(identifier="x", name="x").updated_at)
                    )
                changed.append(await refresh_us(lookup, identifiers))
            result["changed_percent"] = args.changed
            result["refresh_changed_us_per_tenant"] = statistics.median(changed)
        result["objects_tracked"] = len(gc.get_objects())
        result["full_gc_ms"] = full_collection_ms()
        gc.freeze()
        result["objects_tracked_after_freeze"] = len(gc.get_objects())
        result["full_gc_ms_after_freeze"] = full_collection_ms()
        gc.unfreeze()
        lookup.clear()
        return result
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="refresh passes over every tenant")
    parser.add_argument("--changed", type=float, default=1.0, help="percent of tenants changed per pass")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    base = overhead.parse_args([])
    parser.add_argument("--pg-base", default=base.pg_base)
    parser.add_argument("--maintenance-db", default=base.maintenance_db)
    parser.add_argument("--database", default=DB_NAME)
    args = parser.parse_args(argv)
    pg = args.pg_base.rstrip("/")
    drop = f"DROP DATABASE IF EXISTS {args.database} WITH (FORCE)"
    load = os.getloadavg()[0]
    asyncio.run(overhead.pg_admin(pg, args.maintenance_db, drop, f"CREATE DATABASE {args.database}"))
    try:
        result = asyncio.run(run(args, f"{pg}/{args.database}"))
    finally:
        asyncio.run(overhead.pg_admin(pg, args.maintenance_db, drop))
    result["loadavg"] = [load, os.getloadavg()[0]]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"lookup-cache-{args.tenants}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.tenants:,} tenants cached: {result['allocated_bytes_per_tenant']:.0f} bytes each allocated, "
        f"RSS +{result['bytes_per_tenant']:.0f} ({result['rss_mb']['before']:.0f} → "
        f"{result['rss_mb']['after']:.0f} MB); refresh "
        f"{result['refresh_unchanged_us_per_tenant']:.1f} µs CPU per tenant unchanged"
        + (
            f", {result['refresh_changed_us_per_tenant']:.1f} with {args.changed:g} % changed"
            if args.changed
            else ""
        )
        + f"; full gc {result['full_gc_ms']:.1f} ms ({result['objects_tracked']:,} objects), "
        f"{result['full_gc_ms_after_freeze']:.1f} ms after gc.freeze(); load {load:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
