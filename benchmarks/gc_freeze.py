"""Does `gc.freeze()` after warm-up help a worker that has many tenants cached? In process.

The test app (`tenancy_app.py`, row-level security on PostgreSQL, `overhead.py`'s rls
setup on the database `bench_gcfreeze_rls`, created and dropped) loaded in this process
with `--tenants` tenants (copies of one registered tenant, by SQL, as `scale.py --strategy
rls` makes them), every one requested once, then `GET /orders` through ASGI spread
uniformly over all of them, in alternating rounds:

- `plain`: the heap as it is (`gc.unfreeze()` before the round);
- `frozen`: `gc.freeze()` before the round, as an application would call it once after
  warm-up: everything alive then (modules, the app, the cached tenants) is moved out of
  the collector's reach.

Per round: process CPU per request, the garbage collector's CPU time per request and its
longest full (generation 2) pause, from `gc.callbacks`; medians over rounds. Before the
rounds, after the warm-up: a full collection's pause (`gc.collect()`, median of 5) in
that heap, as it is and frozen. A round starts from a collection, so short rounds may
see no full pass at all (one comes once the objects that survived into the oldest
generation since the last pass number a quarter of those there).

    .venv/bin/python benchmarks/gc_freeze.py --tenants 10000

Writes `results/gc-freeze.json`.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
import scale  # noqa: E402
from profile_scale import drive, drive_each  # noqa: E402

PREFIX = "bench_gcfreeze"


class Collections:
    """CPU time spent in the garbage collector, by `gc.callbacks` (thread time: a shared
    machine's preemption does not count)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.full: list[float] = []
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
            return
        took = time.thread_time() - self._began
        self.total += took
        if info["generation"] == 2:
            self.full.append(took)


async def rounds(module: Any, tenants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    await module.manager.initialize()
    try:
        await drive_each(module.app, tenants, args.concurrency)  # every tenant once: all cached
        await drive(module.app, tenants, args.requests, args.concurrency)  # warm-up
        # A full collection's pause in this heap (the app, the library, the cached tenants),
        # as it is and frozen: what each full pass costs a worker that is serving requests.
        pauses: dict[str, float] = {}
        for variant in ("plain", "frozen"):
            gc.unfreeze()
            gc.collect()
            if variant == "frozen":
                gc.freeze()
            times = []
            for _ in range(5):
                began = time.perf_counter()
                gc.collect()
                times.append((time.perf_counter() - began) * 1e3)
            pauses[variant] = statistics.median(times)
            print(f"full collection {variant}: {pauses[variant]:.1f} ms ({len(gc.get_objects()):,} objects)")
        samples: dict[str, list[dict[str, float]]] = {"plain": [], "frozen": []}
        for index in range(args.rounds):
            for variant in ("plain", "frozen") if index % 2 == 0 else ("frozen", "plain"):
                gc.unfreeze()
                gc.collect()
                if variant == "frozen":
                    gc.freeze()
                collections = Collections()
                gc.callbacks.append(collections)
                began = time.process_time()
                try:
                    await drive(module.app, tenants, args.requests, args.concurrency)
                finally:
                    gc.callbacks.remove(collections)
                cpu = time.process_time() - began
                samples[variant].append(
                    {
                        "cpu_us_per_request": cpu / args.requests * 1e6,
                        "gc_us_per_request": collections.total / args.requests * 1e6,
                        "full_collections": len(collections.full),
                        "longest_full_ms": max(collections.full, default=0.0) * 1e3,
                    }
                )
                print(f"round {index + 1} {variant}: {samples[variant][-1]}", flush=True)
        gc.unfreeze()
        result: dict[str, Any] = {
            variant: {key: statistics.median(s[key] for s in values) for key in values[0]}
            for variant, values in samples.items()
        }
        for variant, pause in pauses.items():
            result[variant]["full_collection_ms"] = pause
        return result | {"rounds": samples}
    finally:
        await module.manager.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    base = overhead.parse_args([])
    parser.add_argument("--pg-base", default=base.pg_base)
    parser.add_argument("--maintenance-db", default=base.maintenance_db)
    args = parser.parse_args(argv)
    pg = args.pg_base.rstrip("/")
    cleanups: list[Any] = []
    load = os.getloadavg()[0]
    try:
        backend, table = scale.rls_database(pg, PREFIX, args, cleanups)
        asyncio.run(scale.add_rls_tenants(pg, f"{PREFIX}_rls", table, 1, args.tenants + 1, args.orders))
        env = dict(backend.tenancy_env, TENANCY_CACHE_MAX_SIZE=str(max(10_000, args.tenants)))
        module = overhead.load_app(backend.tenancy_app, env, "gc_freeze_app")
        tenants = [scale.slug(i) for i in range(1, args.tenants + 1)]
        result = asyncio.run(rounds(module, tenants, args))
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    result.update(tenants=args.tenants, loadavg=[load, os.getloadavg()[0]], requests_per_round=args.requests)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gc-freeze.json").write_text(json.dumps(result, indent=2) + "\n")
    for variant in ("plain", "frozen"):
        r = result[variant]
        print(
            f"{variant:7} CPU {r['cpu_us_per_request']:.0f} µs/request, "
            f"gc {r['gc_us_per_request']:.0f} µs/request, "
            f"{r['full_collections']:.0f} full collections per round, longest {r['longest_full_ms']:.1f} ms; "
            f"a full collection after warm-up {r['full_collection_ms']:.1f} ms"
        )
    print(f"{args.tenants:,} tenants, load average {load:.1f} → {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
