"""Where does the tenancy overhead go? CPU per request, in process, with ablations.

Runs the apps of `overhead.py` in this process, driven through ASGI (no HTTP server,
no load generator), `--concurrency` requests in flight, and measures this process's
CPU time per `GET /orders` (with SQLite that includes aiosqlite's threads). On a
single, CPU-bound uvicorn worker this CPU time is what limits req/s. Variants,
alternated over `--rounds`:

- `bare`: `benchmarks/bare_app.py`;
- `bare+middleware`: the same with `TenancyMiddleware` added (the Quick Start's manager),
  to price tenant resolution alone;
- `bare+noop-engine-listener`: the bare app with one no-op `before_cursor_execute`
  listener on its engine: what SQLAlchemy charges for having any engine listener;
- `tenancy`: the Quick Start app as shipped;

`--cprofile` then profiles `tenancy` and `bare` and prints the functions whose
cumulative time per request differs most, plus every fastapi_tenancy function.

    .venv/bin/python benchmarks/profile_overhead.py --backend postgres --cprofile
    .venv/bin/python benchmarks/profile_overhead.py --backend sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
from roundtrips import asgi_get, load_bare  # noqa: E402

DB_NAME = "bench_profile"
HEADERS = [(b"x-tenant-id", overhead.TENANT.encode())]


def _noop(*args: Any) -> None:
    pass


async def drive(app: Any, requests: int, concurrency: int) -> None:
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status, body = await asgi_get(app, "/orders", HEADERS)
            if status != 200:
                raise RuntimeError(f"GET /orders answered {status}: {body[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cpu_per_request(app: Any, requests: int, concurrency: int) -> float:
    """Microseconds of process CPU per request."""
    start = time.process_time()
    await drive(app, requests, concurrency)
    return (time.process_time() - start) / requests * 1e6


@contextlib.asynccontextmanager
async def prepared(
    backend: str, args: argparse.Namespace
) -> AsyncIterator[dict[str, tuple[Any, Callable[[], Any]]]]:
    """Seed a database, load both apps, run their lifespans; yield the variants."""
    cleanup: list[Callable[[], Any]] = []
    base = args.pg_base.rstrip("/")
    try:
        if backend == "postgres":
            await overhead.pg_admin(
                base,
                args.maintenance_db,
                f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
                f"CREATE DATABASE {DB_NAME}",
            )
            cleanup.append(
                lambda: overhead.pg_admin(
                    base, args.maintenance_db, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
                )
            )
            tenancy_url = f"{base}/{DB_NAME}"
            bare_url, schema = tenancy_url, overhead.SCHEMA
            pool = ("10", "10")
        else:
            directory = Path(tempfile.mkdtemp(prefix="bench_profile_sqlite_"))
            cleanup.append(lambda: asyncio.to_thread(shutil.rmtree, directory, True))
            tenancy_url = f"sqlite+aiosqlite:///{directory / 'tenancy.db'}"
            tenant_file = directory / f"tenancy.{overhead.SCHEMA}.db"
            bare_url = f"sqlite+aiosqlite:///file:{tenant_file}?mode=rw&uri=true"
            schema = ""
            pool = ("2", "8")
        await overhead.seed(tenancy_url, f"quickstart_profile_seed_{backend}", args.orders)
        os.environ.update({"BENCH_BARE_POOL_SIZE": pool[0], "BENCH_BARE_MAX_OVERFLOW": pool[1]})
        tenancy = overhead.load_quickstart(tenancy_url, f"quickstart_profile_{backend}")
        bare = load_bare(bare_url, schema)
        # The bare app plus the tenancy middleware only (same manager, bare route).
        bare_mw = load_bare(bare_url, schema)
        from fastapi_tenancy import TenancyMiddleware

        bare_mw.app.add_middleware(TenancyMiddleware, manager=tenancy.manager, excluded_paths=["/health"])
        # The bare app whose engine carries one no-op listener: SQLAlchemy's price for
        # any engine event listener (it then dispatches events on every connection).
        bare_ev = load_bare(bare_url, schema)
        from sqlalchemy import event

        event.listen(bare_ev.engine.sync_engine, "before_cursor_execute", _noop)
        async with tenancy.app.router.lifespan_context(tenancy.app):
            variants: dict[str, tuple[Any, Callable[[], Any]]] = {
                "bare": (bare.app, contextlib.nullcontext),
                "bare+middleware": (bare_mw.app, contextlib.nullcontext),
                "bare+noop-engine-listener": (bare_ev.app, contextlib.nullcontext),
                "tenancy": (tenancy.app, contextlib.nullcontext),
            }
            if args.variants:
                unknown = set(args.variants) - set(variants)
                if unknown:
                    raise SystemExit(f"unknown variant(s) {sorted(unknown)}; have {sorted(variants)}")
                variants = {
                    name: variants[name] for name in variants if name in args.variants or name == "bare"
                }
            try:
                yield variants
            finally:
                await bare.engine.dispose()
                await bare_mw.engine.dispose()
                await bare_ev.engine.dispose()
    finally:
        for step in reversed(cleanup):
            await step()


def profile_diff(backend: str, stats: dict[str, pstats.Stats], requests: int, top: int, out: Path) -> None:
    def per_function(s: pstats.Stats) -> dict[tuple[str, int, str], tuple[float, float, int]]:
        return {func: (tt, ct, nc) for func, (_cc, nc, tt, ct, _callers) in s.stats.items()}  # type: ignore[attr-defined]

    t, b = per_function(stats["tenancy"]), per_function(stats["bare"])

    def name(func: tuple[str, int, str]) -> str:
        path, line, fn = func
        if "site-packages/" in path:
            path = path.split("site-packages/", 1)[1]
        elif "/src/" in path:
            path = path.split("/src/", 1)[1]
        return f"{fn} ({path}:{line})" if path != "~" else fn

    us = 1e6 / requests
    rows = []
    for func in set(t) | set(b):
        ct_t, ct_b = t.get(func, (0, 0, 0))[1], b.get(func, (0, 0, 0))[1]
        tt_t, tt_b = t.get(func, (0, 0, 0))[0], b.get(func, (0, 0, 0))[0]
        nc_t, nc_b = t.get(func, (0, 0, 0))[2], b.get(func, (0, 0, 0))[2]
        rows.append((ct_t - ct_b, tt_t - tt_b, nc_t - nc_b, func, ct_t, ct_b))
    lines = [f"## {backend}: cProfile, tenancy minus bare, µs per request (profiler-inflated)", ""]
    lines.append("### largest differences in cumulative time")
    lines.append(f"{'Δcum':>8} {'Δself':>8} {'Δcalls/req':>10}  function")
    for dct, dtt, dnc, func, _ct_t, _ct_b in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
        lines.append(f"{dct * us:8.1f} {dtt * us:8.1f} {dnc / requests:10.2f}  {name(func)}")
    lines.append("")
    lines.append("### largest differences in self time")
    for dct, dtt, dnc, func, _ct_t, _ct_b in sorted(rows, key=lambda r: -abs(r[1]))[:top]:
        lines.append(f"{dct * us:8.1f} {dtt * us:8.1f} {dnc / requests:10.2f}  {name(func)}")
    lines.append("")
    lines.append("### fastapi_tenancy functions (tenancy app): cumulative µs/request, calls/request")
    total_t = sum(v[0] for v in t.values()) * us
    total_b = sum(v[0] for v in b.values()) * us
    for func, (_tt, ct, nc) in sorted(t.items(), key=lambda kv: -kv[1][1]):
        if "fastapi_tenancy" in func[0]:
            lines.append(f"{ct * us:8.1f} {nc / requests:6.2f}  {name(func)}")
    lines.append("")
    lines.append(f"total profiled CPU per request: tenancy {total_t:.0f} µs, bare {total_b:.0f} µs")
    text = "\n".join(lines)
    print(text)
    out.write_text(text + "\n")


async def run(args: argparse.Namespace) -> int:
    async with prepared(args.backend, args) as variants:
        for _name, (app, ctx) in variants.items():
            with ctx():
                await drive(app, args.warmup, args.concurrency)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                app, ctx = variants[name]
                with ctx():
                    samples[name].append(await cpu_per_request(app, args.requests, args.concurrency))
        lines = [
            f"{args.backend}: process CPU per request "
            f"(median of {args.rounds} rounds × {args.requests} requests, "
            f"{args.concurrency} in flight; {time.strftime('%Y-%m-%d %H:%M')})"
        ]
        lines.append(
            "  (vs bare: median of per-round differences, each variant against the bare run of "
            "the same round, which cancels slow drift on a shared machine)"
        )
        for name, values in samples.items():
            med = statistics.median(values)
            paired = statistics.median(v - b for v, b in zip(values, samples["bare"], strict=True))
            lines.append(
                f"  {name:28} {med:7.0f} µs  ({paired:+5.0f} µs vs bare; "
                f"rounds {', '.join(f'{v:.0f}' for v in values)})"
            )
        print("\n".join(lines))
        (args.output_dir / f"cpu-{args.backend}.txt").write_text("\n".join(lines) + "\n")
        if args.cprofile:
            stats: dict[str, pstats.Stats] = {}
            for name in ("tenancy", "bare"):
                app, _ = variants[name]
                profiler = cProfile.Profile()
                profiler.enable()
                await drive(app, args.profile_requests, args.concurrency)
                profiler.disable()
                stats[name] = pstats.Stats(profiler)
                if args.save_pstats:
                    stats[name].dump_stats(str(args.output_dir / f"profile-{args.backend}-{name}.pstats"))
            profile_diff(
                args.backend,
                stats,
                args.profile_requests,
                args.top,
                args.output_dir / f"profile-{args.backend}.txt",
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument(
        "--variants",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=[],
        help="comma-separated subset of the variants (bare is always run)",
    )
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--profile-requests", type=int, default=3000)
    parser.add_argument("--save-pstats", action="store_true", help="also dump the raw pstats files")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--pg-base", default=os.environ.get("TENANCY_BENCH_POSTGRES_URL", overhead.DEFAULT_PG_BASE)
    )
    parser.add_argument("--maintenance-db", default="postgres")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
