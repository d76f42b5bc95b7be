"""Where does the time go with many tenants? CPU per request, in process, by traffic pattern.

Drives the Quick Start app (schema isolation, PostgreSQL) through ASGI, as
`profile_overhead.py` does, against a database already holding tenants
`bench-00001...` (seed it with `scale.py --keep-database`), and compares process CPU
per `GET /orders` when the requests go:

- `one`: all to one tenant (every cache warm);
- `spread`: uniformly over `--tenants` tenants, every tenant already in the lookup cache
  (what many tenants cost with no registry read: SQL text and binds per tenant);
- `spread-cold-lookup`: the same, with the lookup cache emptied before each round, so
  each tenant's first request in the round reads the registry (what a lookup miss costs);
- `spread-big-stmt-cache`: as `spread`, on an app whose asyncpg prepared-statement cache
  holds more statements than there are tenants (`--big-stmt-cache`).

`--cprofile` prints the functions whose cumulative time per request differs most
between `spread` and `one`.

    .venv/bin/python benchmarks/profile_scale.py --database bench_scale --tenants 1000 --cprofile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
from roundtrips import asgi_get  # noqa: E402

PREFIX = "bench-"


def slug(index: int) -> str:
    return f"{PREFIX}{index:05d}"


async def drive(app: Any, tenants: list[str], requests: int, concurrency: int) -> None:
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            headers = [(b"x-tenant-id", random.choice(tenants).encode())]
            status, body = await asgi_get(app, "/orders", headers)
            if status != 200:
                raise RuntimeError(f"GET /orders answered {status}: {body[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def drive_each(app: Any, tenants: list[str], concurrency: int) -> None:
    """GET /orders exactly once per tenant (`drive` picks tenants at random: a pass of as
    many requests as tenants reaches only about 63 % of them)."""
    queue = iter(tenants)

    async def worker() -> None:
        for tenant in queue:
            status, body = await asgi_get(app, "/orders", [(b"x-tenant-id", tenant.encode())])
            if status != 200:
                raise RuntimeError(f"GET /orders answered {status}: {body[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cpu_per_request(app: Any, tenants: list[str], requests: int, concurrency: int) -> float:
    start = time.process_time()
    await drive(app, tenants, requests, concurrency)
    return (time.process_time() - start) / requests * 1e6


def top_diff(a: pstats.Stats, b: pstats.Stats, requests: int, top: int) -> str:
    def per(s: pstats.Stats) -> dict[Any, tuple[float, float, int]]:
        return {f: (tt, ct, nc) for f, (_cc, nc, tt, ct, _c) in s.stats.items()}  # type: ignore[attr-defined]

    pa, pb = per(a), per(b)
    us = 1e6 / requests

    def name(func: tuple[str, int, str]) -> str:
        path, line, fn = func
        for marker in ("site-packages/", "/src/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        return f"{fn} ({path}:{line})" if path != "~" else fn

    rows = []
    for func in set(pa) | set(pb):
        ta, tb = pa.get(func, (0, 0, 0)), pb.get(func, (0, 0, 0))
        rows.append((ta[1] - tb[1], ta[0] - tb[0], (ta[2] - tb[2]) / requests, func))
    # Sorted by self time: cumulative times of coroutines are unreliable under cProfile
    # (every resumption counts as a call and nests under whatever runs the loop).
    lines = [f"{'Δcum µs':>9} {'Δself µs':>9} {'Δcalls':>7}  function"]
    for dct, dtt, dnc, func in sorted(rows, key=lambda r: -abs(r[1]))[:top]:
        lines.append(f"{dct * us:9.1f} {dtt * us:9.1f} {dnc:7.2f}  {name(func)}")
    total_a = sum(v[0] for v in pa.values()) * us
    total_b = sum(v[0] for v in pb.values()) * us
    lines.append(f"total profiled CPU per request: {total_a:.0f} vs {total_b:.0f} µs")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    url = f"{args.pg_base.rstrip('/')}/{args.database}"
    apps = {"main": overhead.load_quickstart(url, "quickstart_profile_scale")}
    if args.big_stmt_cache:
        query = f"?prepared_statement_cache_size={args.big_stmt_cache}"
        apps["big"] = overhead.load_quickstart(url + query, "quickstart_profile_scale_big")
    everyone = [slug(i) for i in range(1, args.tenants + 1)]
    one = [slug(1)]
    lines: list[str] = []
    for module in apps.values():
        await module.manager.initialize()
    try:
        main = apps["main"]
        main.manager.lookup.ttl = 3600.0  # `spread` measures no registry read
        if "big" in apps:
            apps["big"].manager.lookup.ttl = 3600.0
        for module in apps.values():
            await drive(module.app, everyone, args.tenants, args.concurrency)  # every tenant once
            await drive(module.app, everyone, args.warmup, args.concurrency)

        def cold() -> None:
            main.manager.lookup.clear()

        async def rewarm() -> None:  # untimed: the other variants find every tenant cached
            for identifier in everyone:
                await main.manager.lookup.get(identifier)

        variants: dict[str, tuple[Any, list[str], Any]] = {
            "one": (main.app, one, None),
            "spread": (main.app, everyone, None),
            "spread-cold-lookup": (main.app, everyone, cold),
        }
        if "big" in apps:
            variants["spread-big-stmt-cache"] = (apps["big"].app, everyone, None)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                app, tenants, before = variants[name]
                if before is not None:
                    before()
                samples[name].append(await cpu_per_request(app, tenants, args.requests, args.concurrency))
                if before is not None:
                    await rewarm()
        lines.append(
            f"process CPU per request, {args.tenants} tenants, median of {args.rounds} rounds × "
            f"{args.requests} requests, {args.concurrency} in flight, load average {os.getloadavg()[0]:.1f}"
        )
        for name, values in samples.items():
            paired = statistics.median(v - o for v, o in zip(values, samples["one"], strict=True))
            lines.append(
                f"  {name:24} {statistics.median(values):7.0f} µs  ({paired:+5.0f} vs one; rounds "
                f"{', '.join(f'{v:.0f}' for v in values)})"
            )
        print("\n".join(lines), flush=True)
        if args.cprofile:
            stats = {}
            for name in ("spread", "one"):
                app, tenants, _ = variants[name]
                profiler = cProfile.Profile()
                profiler.enable()
                await drive(app, tenants, args.profile_requests, args.concurrency)
                profiler.disable()
                stats[name] = pstats.Stats(profiler)
            text = "cProfile, spread minus one, µs per request (profiler-inflated)\n"
            text += top_diff(stats["spread"], stats["one"], args.profile_requests, args.top)
            print(text)
            lines.append(text)
        if args.output:
            args.output.write_text("\n".join(lines) + "\n")
    finally:
        for module in apps.values():
            await module.manager.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="bench_scale", help="a database seeded by scale.py")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--big-stmt-cache", type=int, default=0, help="also run with this cache size")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--profile-requests", type=int, default=3000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--pg-base", default=os.environ.get("TENANCY_BENCH_POSTGRES_URL", overhead.DEFAULT_PG_BASE)
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
