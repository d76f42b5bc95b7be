"""More clients than pooled connections: who holds the connection while the response is sent?

Three apps side by side, each in one uvicorn worker, all serving the Quick Start's
`GET /orders` for every tenant (`wrk` with 32 connections, `wrk_spread.lua` spreading
requests uniformly over all registered tenants):

- `tenancy`: the Quick Start (`examples/quickstart/main.py`), as written, whose session
  comes from `make_tenant_db_dependency`: the middleware closes it, and its connection
  goes back to the pool, before the response's body is sent.
- `dependency`: no tenancy, the session from a yield dependency (`bare_app.py`,
  `BENCH_BARE_SESSION=dependency`), the idiomatic FastAPI way; FastAPI ends such a
  dependency after the response is sent, so the connection is held during the send.
- `route`: no tenancy, `async with SessionLocal()` inside the route (`BENCH_BARE_SESSION=route`):
  the connection is back before the response is even built.

The bare apps switch tenant per request as the tenancy app does, from `X-Tenant-ID`: on
PostgreSQL one engine and the tenant's schema per statement (`schema_translate_map`), on
SQLite an engine per tenant file with the library's per-file pool (2 + 8); past 100
tenants the bare apps' asyncpg statement cache holds every tenant's statement (their SQL
names the schema; the tenancy app's does not, see docs/isolation.md). On PostgreSQL
every app has one pool of 10 + 10 (`TenancyConfig`'s defaults), so 32 clients outnumber
it. On SQLite, where each tenant file has a pool of its own, the tenancy app keeps every
tenant's engine open (`TENANCY_MAX_CACHED_ENGINES` raised to the tenant count, as the bare
apps keep theirs), so no app reopens files during the rounds.

For each backend (`--backends`, PostgreSQL schema isolation and SQLite) and size
(`--sizes`, 10 and 1,000 tenants, each with `--orders` rows), the tenants are registered
through the Quick Start's own manager (a kept database may hold more), every app must
answer the same rows for the first and the last tenant, every tenant is requested once on
each app, and after a warm-up the rounds alternate the apps' order. The report gives
per-app medians of req/s and p99 and the per-round ratios tenancy/route and
dependency/route (median, min-max).

    .venv/bin/python benchmarks/saturation.py                       # 7 rounds × 8 s
    .venv/bin/python benchmarks/saturation.py --backends sqlite --sizes 10 --duration 5

Needs `wrk` and PostgreSQL (`TENANCY_BENCH_POSTGRES_URL`); creates and drops the database
`bench_saturation` (`--keep-database` keeps it, and a later run with it reuses its
tenants), and SQLite files in a temporary directory. Writes
`results/saturation.json` and `saturation.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
import scale  # noqa: E402

DB_NAME = "bench_saturation"
SIDES = ("tenancy", "dependency", "route")
TARGET_RPS_RATIO = 0.95  # tenancy / route, at least
TARGET_P99_RATIO = 1.20  # tenancy / route, at most
STATEMENT_CACHE = 100  # asyncpg's prepared statements per connection, by default


@dataclass
class Backend:
    name: str  # postgres or sqlite
    database_url: str  # the tenancy app's (registry) URL
    bare_env: dict[str, str]  # how the bare apps reach a tenant's rows
    tenancy_env: dict[str, str]


def postgres_backend(args: argparse.Namespace) -> Backend:
    base = args.pg_base.rstrip("/")
    url = f"{base}/{DB_NAME}"
    return Backend(
        "postgres",
        url,
        {"BENCH_BARE_DATABASE_URL": url, "BENCH_BARE_SCHEMA": "tenant_{tenant}", **overhead._pool(10, 10)},
        {},
    )


def sqlite_backend(directory: Path) -> Backend:
    registry = directory / "tenancy.db"
    # The URL form and the pool the library opens for a tenant file (isolation/sqlite.py).
    tenant_file = f"sqlite+aiosqlite:///file:{directory}/tenancy.tenant_{{tenant}}.db?mode=rw&uri=true"
    return Backend(
        "sqlite",
        f"sqlite+aiosqlite:///{registry}",
        {"BENCH_BARE_DATABASE_URL": tenant_file, "BENCH_BARE_SCHEMA": "", **overhead._pool(2, 8)},
        {},
    )


def connections_opened(backend: Backend, args: argparse.Namespace) -> int | None:
    """Sessions PostgreSQL has started in the run's database so far (None on SQLite)."""
    if backend.name != "postgres":
        return None
    sql = "SELECT sessions FROM pg_stat_database WHERE datname = 'bench_saturation'"  # DB_NAME
    rows = asyncio.run(overhead.pg_admin(args.pg_base.rstrip("/"), args.maintenance_db, sql))
    return int(rows[0][0][0])


def check_answers(servers: dict[str, overhead.Server], size: int, orders: int) -> None:
    """Refuse to measure apps that answer differently for the same tenant."""
    for tenant in sorted({scale.slug(1), scale.slug(size)}):
        bodies = {side: overhead.fetch_orders(srv, tenant) for side, srv in servers.items()}
        first = bodies["tenancy"]
        if any(body != first for body in bodies.values()) or len(first["orders"]) != orders:
            raise RuntimeError(f"the apps answer differently for {tenant}: {bodies}")


def measure(backend: Backend, size: int, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    tenancy_env = {"TENANCY_DATABASE_URL": backend.database_url, **backend.tenancy_env}
    bare_env = dict(backend.bare_env)
    if backend.name == "sqlite":
        tenancy_env["TENANCY_MAX_CACHED_ENGINES"] = str(max(100, size))
    elif size > STATEMENT_CACHE:
        # The bare apps' SQL names each tenant's schema: one statement per tenant, which
        # asyncpg's cache (100 per connection) would prepare again and again past 100
        # tenants; the tenancy app sends one SQL text for all. A cache that holds every
        # tenant's statement prices the switch, not the cache misses.
        bare_env["BENCH_BARE_DATABASE_URL"] += f"?prepared_statement_cache_size={size + STATEMENT_CACHE}"

    def server(side: str, app: str, app_dir: Path, env: dict[str, str]) -> overhead.Server:
        log = logs / f"{backend.name}-{size}-{side}.log"
        return overhead.Server(side, app, app_dir, env, args.server_cpu, args.loop, args.http, log)

    servers = {
        "tenancy": server("tenancy", "main:app", overhead.QUICKSTART.parent, tenancy_env),
        "dependency": server(
            "dependency",
            "bare_app:app",
            overhead.BENCH_DIR,
            {**bare_env, "BENCH_BARE_SESSION": "dependency"},
        ),
        "route": server(
            "route", "bare_app:app", overhead.BENCH_DIR, {**bare_env, "BENCH_BARE_SESSION": "route"}
        ),
    }
    tag = f"[{backend.name}, {size} tenants]"

    def run(side: str, seconds: float) -> dict[str, Any]:
        before = connections_opened(backend, args)
        result = overhead.run_wrk(
            servers[side],
            seconds,
            args,
            script=scale.SPREAD_SCRIPT,
            script_args=(str(size), scale.PREFIX),
            header=None,
        )
        after = connections_opened(backend, args)
        if before is not None and after is not None:
            # More connections checked out at once than the pool keeps means overflow
            # connections, each opened and closed again: the cost of holding them longer.
            result["connections_opened_per_1000"] = (after - before) / result["requests"] * 1000
        return result

    try:
        for srv in servers.values():
            srv.start()
        for srv in servers.values():
            srv.wait_ready()
        check_answers(servers, size, args.orders)
        for side, srv in servers.items():
            seconds = asyncio.run(scale.touch_every_tenant(srv.url, size))
            print(f"{tag} {side}: requested every tenant once in {seconds:.1f} s", flush=True)
        for side in SIDES:
            run(side, args.warmup)
        rounds: list[dict[str, Any]] = []
        for index in range(args.rounds):
            # As overhead.py: rotate the first app every two rounds, reverse every other round.
            shift = (index // 2) % len(SIDES)
            order = list(SIDES[shift:] + SIDES[:shift])
            if index % 2:
                order.reverse()
            result: dict[str, Any] = {"round": index + 1, "order": order, "loadavg": overhead._loadavg()}
            for side in order:
                time.sleep(args.pause)
                result[side] = run(side, args.duration)
            rounds.append(result)
            print(
                f"{tag} round {index + 1}/{args.rounds} ({'→'.join(order)}): "
                + " | ".join(f"{side} {overhead._brief(result[side])}" for side in SIDES)
                + f" | tenancy/route req/s {result['tenancy']['rps'] / result['route']['rps']:.3f}"
                f", p99 {result['tenancy']['p99_ms'] / result['route']['p99_ms']:.2f}",
                flush=True,
            )
        return {"backend": backend.name, "tenants": size, "rounds": rounds, "summary": summarise(rounds)}
    finally:
        for srv in servers.values():
            srv.stop()


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per app: req/s and p99 over rounds; per pair: the per-round ratios (a round's apps
    ran back to back, under the same conditions), then their median."""
    out: dict[str, Any] = {}
    for side in SIDES:
        out[side] = {
            "rps": _spread([r[side]["rps"] for r in rounds]),
            "p50_ms": _spread([r[side]["p50_ms"] for r in rounds]),
            "p99_ms": _spread([r[side]["p99_ms"] for r in rounds]),
            "cpu_us_per_request": _median([r[side]["cpu_us_per_request"] for r in rounds]),
            "connections_opened_per_1000": _median(
                [r[side].get("connections_opened_per_1000") for r in rounds]
            ),
        }
    for side in ("tenancy", "dependency"):
        out[f"{side}/route"] = {
            "rps": _spread([r[side]["rps"] / r["route"]["rps"] for r in rounds]),
            "p99": _spread([r[side]["p99_ms"] / r["route"]["p99_ms"] for r in rounds]),
        }
    ratio = out["tenancy/route"]
    out["meets_target"] = (
        ratio["rps"]["median"] >= TARGET_RPS_RATIO and ratio["p99"]["median"] <= TARGET_P99_RATIO
    )
    return out


# -- report ----------------------------------------------------------------------------


def _range(x: dict[str, float], fmt: str) -> str:
    return f"{x['min']:{fmt}}-{x['max']:{fmt}}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else f"{value:{fmt}}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | tenants | app | req/s (min-max) | p99 ms (min-max) | req/s ÷ route | p99 ÷ route "
        "| CPU µs/req | connections opened per 1,000 req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "tenancy": "Quick Start with fastapi-tenancy",
        "dependency": "no tenancy, session from a yield dependency",
        "route": "no tenancy, session closed inside the route",
    }
    for res in results:
        s = res["summary"]
        for side in SIDES:
            x = s[side]
            ratio = s.get(f"{side}/route")
            rps_ratio = p99_ratio = "1"
            if ratio is not None:
                bold = "**" if side == "tenancy" else ""
                rps_ratio = f"{bold}{ratio['rps']['median']:.3f}{bold} ({_range(ratio['rps'], '.3f')})"
                p99_ratio = f"{bold}{ratio['p99']['median']:.2f}{bold} ({_range(ratio['p99'], '.2f')})"
            lines.append(
                f"| {res['backend']} | {res['tenants']:,} | {names[side]} "
                f"| {x['rps']['median']:.0f} ({_range(x['rps'], '.0f')}) "
                f"| {x['p99_ms']['median']:.1f} ({_range(x['p99_ms'], '.1f')}) | {rps_ratio} | {p99_ratio} "
                f"| {_opt(x.get('cpu_us_per_request'), '.0f')} "
                f"| {_opt(x.get('connections_opened_per_1000'), '.1f')} |"
            )
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        s = res["summary"]["tenancy/route"]
        met = "meets" if res["summary"]["meets_target"] else "misses"
        loads = ", ".join(r["loadavg"].split()[0] for r in res["rounds"])
        lines.append(
            f"- {res['backend']}, {res['tenants']:,} tenants: tenancy {s['rps']['median']:.3f}× the "
            f"in-route app's req/s, p99 {s['p99']['median']:.2f}×: {met} the target "
            f"(≥ {TARGET_RPS_RATIO}×, p99 within {TARGET_P99_RATIO - 1:.0%}); load average at each "
            f"round's start: {loads}."
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    return f"""# Saturation: more clients than pooled connections

Generated by `benchmarks/saturation.py` on {report["date"]}.

`GET /orders` ({s["orders"]} rows per tenant) spread uniformly over each row's tenants,
{s["connections"]} wrk connections, one uvicorn worker per app; PostgreSQL: schema isolation,
one pool of 10 + 10 per app; SQLite: a file per tenant, a pool of 2 + 8 per file. Medians
over {s["rounds"]} alternating rounds of {s["duration"]:g} s per app; ratios per round, then
the median (min-max in brackets). How each app holds its session: the docstring of
`benchmarks/saturation.py`.

{table(report["results"])}

{verdicts(report["results"])}

## Settings

- rounds {s["rounds"]} × {s["duration"]:g} s per app, warm-up {s["warmup"]:g} s per app,
  pause {s["pause"]:g} s; {report["minutes"]:g} minutes in all
- wrk: {s["threads"]} thread(s), {s["connections"]} connections; servers on CPU {s["server_cpu"]},
  wrk on CPU {s["load_cpu"]}; uvicorn `--loop {s["loop"]} --http {s["http"]}`
- nproc {m["nproc"]}, Python {m["python"]}, git {m["git_commit"]}; load average
  {m["loadavg_at_start"]} at the start, {m["loadavg_at_end"]} at the end

Shared, noisy machine: compare ratios within a run, not absolute req/s across runs.
"""


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="postgres,sqlite", help="comma-separated: postgres, sqlite")
    parser.add_argument("--sizes", default="10,1000", help="comma-separated tenant counts, ascending")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per app per round")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per app")
    parser.add_argument("--pause", type=float, default=1.0)
    # 32: more clients than the PostgreSQL pool's 10 + 10, the case measured here.
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--seed-concurrency", type=int, default=8)
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help=f"PostgreSQL: keep {DB_NAME} afterwards, and reuse the tenants of a kept one",
    )
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    # The same server/loop/database options as overhead.py.
    base = overhead.parse_args([])
    for name in ("server_cpu", "load_cpu", "loop", "http", "pg_base", "maintenance_db"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(base, name))
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - {"postgres", "sqlite"}:
        parser.error("--backends: postgres, sqlite")
    args.sizes = sorted(int(x) for x in args.sizes.split(",") if x.strip())
    if not args.sizes or args.sizes[0] < 1 or args.sizes[-1] > 99_999:
        parser.error("--sizes must be between 1 and 99999")
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads:
        parser.error("need --rounds >= 1, --duration > 0 and --connections >= --threads")
    # Latency runs at a fixed load are overhead.py's business; run_wrk reads these.
    args.latency_connections, args.latency_rate = base.latency_connections, 0.0
    return args


async def kept_tenants(base: str, maintenance_db: str) -> int | None:
    """How many tenants a kept `bench_saturation` holds (None: there is no such database)."""
    exists = "SELECT 1 FROM pg_database WHERE datname = 'bench_saturation'"  # DB_NAME
    if not (await overhead.pg_admin(base, maintenance_db, exists))[0]:
        return None
    try:
        rows = await overhead.pg_admin(base, DB_NAME, "SELECT count(*) FROM tenants")
    except Exception:  # created, but no registry yet
        return 0
    return int(rows[0][0][0])


def run_backend(
    name: str, args: argparse.Namespace, logs: Path, cleanups: list[Callable[[], object]]
) -> list[Any]:
    registered = 0
    if name == "postgres":
        base = args.pg_base.rstrip("/")
        drop = f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
        if args.keep_database:
            registered = asyncio.run(kept_tenants(base, args.maintenance_db))
        else:
            cleanups.append(lambda: asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop)))
        if registered is None or not args.keep_database:
            asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop, f"CREATE DATABASE {DB_NAME}"))
            registered = 0
        backend = postgres_backend(args)
        concurrency = args.seed_concurrency
    else:
        directory = Path(tempfile.mkdtemp(prefix="bench_saturation_sqlite_"))
        cleanups.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        backend = sqlite_backend(directory)
        concurrency = 1  # SQLite serialises the registry's writers anyway
    results = []
    for size in args.sizes:
        if size > registered:
            seconds = asyncio.run(
                scale.add_tenants(backend.database_url, registered + 1, size + 1, args.orders, concurrency)
            )
            print(
                f"[{name}, {size} tenants] registered {size - registered} more in {seconds:.1f} s", flush=True
            )
            registered = size
        results.append(measure(backend, size, args, logs))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, overhead._on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="bench_saturation_logs_"))
    facts = overhead.machine_facts(args)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    failed = False
    for name in args.backends:
        cleanups: list[Callable[[], object]] = []
        try:
            results += run_backend(name, args, logs, cleanups)
        except Exception as exc:  # report and go on with the next backend
            failed = True
            traceback.print_exc()
            print(f"[{name}] FAILED: {exc!r}", file=sys.stderr, flush=True)
        finally:
            overhead._stop_all()
            for cleanup in cleanups:
                try:
                    cleanup()
                except Exception as exc:
                    print(f"[{name}] cleanup failed: {exc}", file=sys.stderr)
    if not results:
        print(f"no results; server logs in {logs}", file=sys.stderr)
        return 1
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_base"}
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "settings": settings,
        "machine": {**facts, "loadavg_at_end": overhead._loadavg()},
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "saturation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "saturation.md").write_text(markdown(report))
    print()
    print(table(results))
    print(verdicts(results))
    print(f"\nwrote {args.output_dir / 'saturation.json'} and {args.output_dir / 'saturation.md'}")
    if failed:
        print(f"server logs kept in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
