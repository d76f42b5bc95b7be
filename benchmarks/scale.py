"""Does the cost of tenancy stay flat as tenants grow? Throughput, latency and memory.

The Quick Start app (header resolution, schema isolation on PostgreSQL) with 10, 1,000
and 10,000 registered tenants, each with its own `orders` rows, and `wrk` spreading
`GET /orders` uniformly over all of them (`wrk_spread.lua`): the in-process tenant cache
takes hits and misses as it would in production (a miss is one registry query). The bare
app of `overhead.py` serves the same route from one fixed schema. Both sides run in one
uvicorn worker each, in alternating rounds, in the same invocation, per size; the server
is restarted at each size so its memory is measured from a cold start; before the
rounds, every tenant is requested once (first visits cost more: a registry read and the
first statements in the tenant's schema), so the rounds measure the steady state, where
the cache still misses whenever an entry is older than `cache_ttl`. Memory is the
tenancy worker's resident set size after the last round.

    .venv/bin/python benchmarks/scale.py                         # 10, 1000, 10000 tenants
    .venv/bin/python benchmarks/scale.py --sizes 10,1000 --rounds 4 --duration 5
    .venv/bin/python benchmarks/scale.py --strategy rls --sizes 10,100000

`--strategy rls` measures row-level security instead, where 100,000 tenants are natural
(100,000 schemas on one PostgreSQL are not: `pg_costs.py`): `tenancy_app.py` as the app
role, the bare app reading the shared `orders` as the superuser with `WHERE tenant_id =`
one tenant's id (`overhead.py`'s rls pair). Two tenants are registered through the
manager; the `bench-NNNNN` tenants are then copies of the first one's registry row
(new id, slug and name) and their `orders` rows, inserted by SQL in one statement each:
registering 100,000 one by one would take most of an hour and measure nothing this
benchmark is about. Its database is `bench_scale_rls` (roles `bench_scale_owner` and
`bench_scale_app`), always dropped at the end; results go to `results/scale-rls.json`.
With either strategy `cache_max_size` is raised to the tenant count when that is above
its default of 10,000 (`--cache-max-size`), as a deployment with that many busy tenants
would set it.

Tenants are added incrementally (the 1,000 include the first 10), registered through
the Quick Start's own manager. Needs `wrk` and PostgreSQL (`TENANCY_BENCH_POSTGRES_URL`);
creates and drops the database `bench_scale` (`--keep-database` keeps it, and a later run
with `--keep-database` reuses its tenants: registering 10,000 takes minutes; it then
measures only sizes at least as large as what is registered). Writes `results/scale.json`
and `scale.md`. `profile_scale.py` profiles a kept database in process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

DB_NAME = "bench_scale"
PREFIX = "bench-"  # tenants bench-00001 ... bench-10000
SPREAD_SCRIPT = overhead.BENCH_DIR / "wrk_spread.lua"


def slug(index: int) -> str:
    return f"{PREFIX}{index:05d}"


async def add_tenants(database_url: str, start: int, stop: int, orders: int, concurrency: int) -> float:
    """Register tenants start..stop-1 (1-based) with `orders` rows each; returns seconds taken."""
    qs = overhead.load_quickstart(database_url, f"quickstart_scale_{start}")
    await qs.manager.initialize()
    began = time.perf_counter()
    queue = iter(range(start, stop))

    async def worker() -> None:
        for index in queue:
            tenant = await qs.manager.register_tenant(
                slug(index), f"Tenant {index}", app_metadata=qs.Base.metadata
            )
            async with qs.manager.session(tenant) as session:
                session.add_all([qs.Order(description=f"Order #{i}") for i in range(1, orders + 1)])
                await session.commit()

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await qs.manager.close()
    return time.perf_counter() - began


RLS_PREFIX = (
    "bench_scale"  # overhead.setup_postgres names bench_scale_rls, bench_scale_owner, bench_scale_app
)


async def add_rls_tenants(base: str, database: str, table: str, start: int, stop: int, orders: int) -> float:
    """Tenants start..stop-1 as copies of acme-corp's registry row, each with `orders` rows."""
    began = time.perf_counter()
    columns = (
        await overhead.pg_admin(
            base,
            database,
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name = 'tenants' ORDER BY ordinal_position",
        )
    )[0]
    names = [row[0] for row in columns]
    # Slugs as slug() writes them (five digits at least), as wrk_spread.lua asks for them.
    replaced = {
        "id": "CAST(gen_random_uuid() AS text)",
        "identifier": f"'{PREFIX}' || CASE WHEN g < 10000 THEN lpad(CAST(g AS text), 5, '0') "
        "ELSE CAST(g AS text) END",
        "name": "'Tenant ' || g",
    }
    select = ", ".join(replaced.get(name, f'"{name}"') for name in names)
    # Names from the catalog and numbers: no input reaches this SQL.
    quoted = ", ".join(f'"{n}"' for n in names)
    insert_tenants = (
        f"INSERT INTO tenants ({quoted}) "  # noqa: S608
        f"SELECT {select} FROM tenants, generate_series({start}, {stop - 1}) AS g "
        f"WHERE identifier = '{overhead.TENANT}'"
    )
    insert_orders = (
        f"INSERT INTO {table} (tenant_id, id, description) "  # noqa: S608
        f"SELECT t.id, o, 'Order #' || o FROM tenants t, generate_series(1, {orders}) AS o "
        f"WHERE t.identifier LIKE '{PREFIX}%' AND NOT EXISTS "
        f"(SELECT 1 FROM {table} x WHERE x.tenant_id = t.id)"
    )
    await overhead.pg_admin(
        base, database, insert_tenants, insert_orders, f"ANALYZE {table}", "ANALYZE tenants"
    )
    return time.perf_counter() - began


def rls_database(base: str, prefix: str, args: argparse.Namespace, cleanups: list[Any]) -> tuple[Any, str]:
    """`overhead.py`'s rls database (`<prefix>...`): its backend and the shared orders table's name."""
    setup = argparse.Namespace(
        pg_base=base,
        db_prefix=prefix,
        maintenance_db=args.maintenance_db,
        hybrid_tier="rls",
        orders=args.orders,
    )
    backend = asyncio.run(overhead.setup_postgres(setup, cleanups, "rls"))
    schema = backend.bare_env["BENCH_BARE_SCHEMA"]
    return backend, f'"{schema}".orders' if schema else "orders"


def rls_sides(base: str, args: argparse.Namespace, cleanups: list[Any]) -> tuple[Sides, str]:
    """`overhead.py`'s rls pair on `bench_scale_rls`; also the shared orders table's name."""
    backend, table = rls_database(base, RLS_PREFIX, args, cleanups)
    sides = Sides(
        backend.tenancy_app.stem + ":app", backend.tenancy_app.parent, backend.tenancy_env, backend.bare_env
    )
    return sides, table


async def touch_every_tenant(url: str, size: int, concurrency: int = 16) -> float:
    """GET /orders once for every tenant, so the rounds measure the steady state, not first visits."""
    import httpx

    began = time.perf_counter()
    queue = iter(range(1, size + 1))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def get(index: int) -> httpx.Response:
            for attempt in range(3):
                try:
                    return await client.get("/orders", headers={"X-Tenant-ID": slug(index)})
                except httpx.TransportError:
                    # A kept-alive connection the server closed as it was reused (uvicorn
                    # closes those idle for 5 s, which a loaded machine reaches): again.
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        async def worker() -> None:
            for index in queue:
                response = await get(index)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"{slug(index)}: GET /orders answered {response.status_code}: {response.text[:300]}"
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began


async def registered_tenants(base: str, maintenance_db: str) -> int | None:
    """How many tenants a kept `bench_scale` holds (None: there is no such database)."""
    exists = "SELECT 1 FROM pg_database WHERE datname = 'bench_scale'"  # DB_NAME
    if not (await overhead.pg_admin(base, maintenance_db, exists))[0]:
        return None
    try:
        rows = await overhead.pg_admin(base, DB_NAME, "SELECT count(*) FROM tenants")
    except Exception:  # created, but no registry yet
        return 0
    return int(rows[0][0][0])


def rss_mb(pid: int) -> dict[str, float]:
    """Resident set size now and at its peak (VmRSS, VmHWM), in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def schema_sides(base: str, args: argparse.Namespace) -> Sides:
    """The Quick Start on `bench_scale`, and the bare app on the first tenant's schema."""
    env = {"TENANCY_DATABASE_URL": f"{base}/{DB_NAME}{args.tenancy_url_query}"}
    bare_env = {
        "BENCH_BARE_DATABASE_URL": f"{base}/{DB_NAME}",
        "BENCH_BARE_SCHEMA": "tenant_" + slug(1).replace("-", "_"),
        "BENCH_BARE_TENANT": slug(1),
        "BENCH_BARE_POOL_SIZE": "10",
        "BENCH_BARE_MAX_OVERFLOW": "10",
    }
    return Sides("main:app", overhead.QUICKSTART.parent, env, bare_env)


@dataclasses.dataclass
class Sides:
    app: str  # the tenancy app, module:attribute in app_dir
    app_dir: Path
    env: dict[str, str]
    bare_env: dict[str, str]


def measure_size(size: int, sides: Sides, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    env = dict(sides.env)
    if size > 10_000 or args.cache_max_size:
        env["TENANCY_CACHE_MAX_SIZE"] = str(args.cache_max_size or size)

    def server(name: str, app: str, app_dir: Path, server_env: dict[str, str]) -> overhead.Server:
        log = logs / f"{size}-{name}.log"
        return overhead.Server(name, app, app_dir, server_env, args.server_cpu, args.loop, args.http, log)

    servers = {
        "tenancy": server("tenancy", sides.app, sides.app_dir, env),
        "bare": server("bare", "bare_app:app", overhead.BENCH_DIR, sides.bare_env),
    }
    spread = (str(size), PREFIX)

    def run(side: str, seconds: float, paced: bool = False) -> dict[str, Any]:
        if side == "tenancy":
            return overhead.run_wrk(
                servers[side],
                seconds,
                args,
                script=SPREAD_SCRIPT,
                script_args=spread,
                header=None,
                paced=paced,
            )
        return overhead.run_wrk(servers[side], seconds, args, header=None, paced=paced)

    try:
        for srv in servers.values():
            srv.start()
        for srv in servers.values():
            srv.wait_ready()
        tenancy_pid = servers["tenancy"].proc.pid  # type: ignore[union-attr]
        memory_idle = rss_mb(tenancy_pid)
        touch_seconds = asyncio.run(touch_every_tenant(servers["tenancy"].url, size))
        print(f"[{size} tenants] requested every tenant once in {touch_seconds:.1f} s", flush=True)
        for side in servers:
            run(side, args.warmup)
        rounds: list[dict[str, Any]] = []
        for index in range(args.rounds):
            order = ["tenancy", "bare"] if index % 2 == 0 else ["bare", "tenancy"]
            result: dict[str, Any] = {"round": index + 1, "order": order, "loadavg": overhead._loadavg()}
            for side in order:
                time.sleep(args.pause)
                result[side] = run(side, args.duration)
            if args.latency_rate:
                for side in order:
                    time.sleep(args.pause)
                    result[side]["paced"] = run(side, args.duration, paced=True)
            result["tenancy"]["rss_mb"] = rss_mb(tenancy_pid)["VmRSS"]
            print(
                f"[{size} tenants] round {index + 1}/{args.rounds}: "
                f"tenancy {overhead._brief(result['tenancy'])} | bare {overhead._brief(result['bare'])} | "
                f"ratio {result['tenancy']['rps'] / result['bare']['rps']:.3f} | "
                f"RSS {result['tenancy']['rss_mb']:.1f} MB",
                flush=True,
            )
            rounds.append(result)
        memory = rss_mb(tenancy_pid)
        requests = sum(r["tenancy"]["requests"] for r in rounds)
        summary = overhead.summarise(rounds, ["tenancy", "bare"])
        return {
            "tenants": size,
            "cache_max_size": int(env.get("TENANCY_CACHE_MAX_SIZE", "10000")),
            "rounds": rounds,
            "summary": summary,
            "memory_mb": {"idle": memory_idle["VmRSS"], "after": memory["VmRSS"], "peak": memory["VmHWM"]},
            "tenancy_requests_measured": requests,
        }
    finally:
        for srv in servers.values():
            srv.stop()


def cpu_ratio(res: dict[str, Any]) -> str:
    """Median over rounds of bare/tenancy server CPU per request: the req/s ratio the worker
    would reach on a core of its own (req/s ratios also carry the machine's noise)."""
    ratios = [
        r["bare"]["cpu_us_per_request"] / r["tenancy"]["cpu_us_per_request"]
        for r in res["rounds"]
        if r["bare"].get("cpu_us_per_request") and r["tenancy"].get("cpu_us_per_request")
    ]
    return f"{statistics.median(ratios):.3f}" if ratios else "-"


def paced_cells(summary: dict[str, Any]) -> str:
    """`p50 / p99 ms tenancy / bare at N req/s | p99 ratio` of the paced runs, or dashes."""
    t, b = summary["tenancy"].get("paced"), summary["bare"].get("paced")
    if t is None or b is None:
        return "- | -"
    ratio = summary["paced_p99_ratio_median"]
    return (
        f"{t['p50_ms_median']:.1f} / {b['p50_ms_median']:.1f}, {t['p99_ms_median']:.1f} / "
        f"{b['p99_ms_median']:.1f} at {b['rps_median']:.0f} req/s | **{ratio:.2f}**"
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| tenants | tenancy req/s | bare req/s | **req/s ratio** (min-max) | CPU ratio "
        "| p99 ms at saturation, tenancy / bare (ratio) "
        "| fixed load: p50, p99 ms tenancy / bare | **p99 ratio at fixed load** "
        "| tenancy RSS MB (idle → after) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        s = res["summary"]
        t, b = s["tenancy"], s["bare"]
        mem = res["memory_mb"]
        lines.append(
            f"| {res['tenants']:,} | {t['rps_median']:.0f} | {b['rps_median']:.0f} "
            f"| **{s['ratio_median']:.3f}** ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | {cpu_ratio(res)} "
            f"| {t['p99_ms_median']:.1f} / {b['p99_ms_median']:.1f} ({s['p99_ratio_median']:.2f}) "
            f"| {paced_cells(s)} "
            f"| {mem['idle']:.1f} → {mem['after']:.1f} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    results = report["results"]
    growth = ""
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = (
            f"\nMemory of the tenancy worker after its rounds: {first['memory_mb']['after']:.1f} MB at "
            f"{first['tenants']:,} tenants, {last['memory_mb']['after']:.1f} MB at {last['tenants']:,} "
            f"(+{last['memory_mb']['after'] - first['memory_mb']['after']:.1f} MB).\n"
        )
    seeding = ", ".join(f"{int(n):,} in {sec:.0f} s" for n, sec in report["seeding_seconds"].items())
    how = (
        f"through the manager, {s['seed_concurrency']} at a time"
        if s["strategy"] == "schema"
        else "copies of one registered tenant's registry row and rows, by SQL"
    )
    bare = "one fixed schema" if s["strategy"] == "schema" else "one tenant's rows of the shared table"
    cached = " / ".join(f"{r['cache_max_size']:,}" for r in results)
    return f"""# Tenancy cost as tenants grow

Generated by `benchmarks/scale.py` on {report["date"]}.

`GET /orders` ({s["orders"]} rows per tenant) on the Quick Start app with requests spread
uniformly over all registered tenants (header `X-Tenant-ID`), against the bare app reading
{bare}. PostgreSQL, {s["strategy"]} isolation, default `TenancyConfig` (cache TTL 30 s,
{cached} cached tenants). One uvicorn worker each, alternating rounds, medians. Throughput
and the first p99 come from runs as fast as the server goes ({s["connections"]} connections);
the fixed-load latencies from paced runs right after, {s["latency_connections"]} connections
at about {s["latency_rate"]:g} req/s in all, where a request's latency is its own rather than
time queued behind others. Ratios are per round (both sides under the same conditions),
then the median.

{table(results)}
{growth}
Registering the tenants ({how}): {seeding}.

## Settings

- rounds {s["rounds"]} × {s["duration"]} s per side, warm-up {s["warmup"]} s per side
- wrk: {s["threads"]} thread(s), {s["connections"]} connections; servers on CPU {s["server_cpu"]},
  wrk on CPU {s["load_cpu"]}
- Python {m["python"]}, git {m["git_commit"]}, load average at start {m["loadavg_at_start"]}

Shared, noisy machine: compare ratios within a run, not absolute req/s across runs.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="comma-separated tenant counts, ascending")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)  # below the pools' 10 + 10
    overhead.add_latency_arguments(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--seed-concurrency", type=int, default=8)
    parser.add_argument(
        "--tenancy-url-query",
        default="",
        help="appended to the tenancy app's database URL, e.g. '?prepared_statement_cache_size=500'",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help=f"keep {DB_NAME} afterwards; reuse a kept one"
    )
    parser.add_argument("--strategy", choices=("schema", "rls"), default="schema")
    parser.add_argument(
        "--cache-max-size",
        type=int,
        default=0,
        help="the tenancy app's cache_max_size (0: the tenant count above 10,000)",
    )
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    # The same server/loop/database options as overhead.py.
    base = overhead.parse_args([])
    for name in ("server_cpu", "load_cpu", "loop", "http", "pg_base", "maintenance_db"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(base, name))
    args = parser.parse_args(argv)
    args.sizes = sorted(int(x) for x in args.sizes.split(",") if x.strip())
    if not args.sizes or args.sizes[0] < 1 or args.sizes[-1] > 100_000:
        parser.error("--sizes must be between 1 and 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, overhead._on_sigterm)
    base = args.pg_base.rstrip("/")
    logs = Path(tempfile.mkdtemp(prefix="bench_scale_logs_"))
    facts = overhead.machine_facts(args)
    results: list[dict[str, Any]] = []
    seeding: dict[int, float] = {}
    if args.strategy == "rls":
        cleanups: list[Any] = []
        try:
            sides, table = rls_sides(base, args, cleanups)
            registered = 0
            for size in args.sizes:
                seconds = asyncio.run(
                    add_rls_tenants(base, f"{RLS_PREFIX}_rls", table, registered + 1, size + 1, args.orders)
                )
                seeding[size - registered] = seconds
                print(f"[{size} tenants] added {size - registered} more in {seconds:.1f} s", flush=True)
                registered = size
                results.append(measure_size(size, sides, args, logs))
        finally:
            overhead._stop_all()
            for cleanup in reversed(cleanups):
                cleanup()
        return finish(args, facts, seeding, results, logs)
    drop = f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
    registered = asyncio.run(registered_tenants(base, args.maintenance_db)) if args.keep_database else None
    if registered is None:
        asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop, f"CREATE DATABASE {DB_NAME}"))
        registered = 0
    elif registered > args.sizes[0]:
        print(f"{DB_NAME} holds {registered} tenants: cannot measure {args.sizes[0]}", file=sys.stderr)
        return 2
    try:
        for size in args.sizes:
            seconds = asyncio.run(
                add_tenants(f"{base}/{DB_NAME}", registered + 1, size + 1, args.orders, args.seed_concurrency)
            )
            seeding[size - registered] = seconds
            print(f"[{size} tenants] registered {size - registered} more in {seconds:.1f} s", flush=True)
            registered = size
            results.append(measure_size(size, schema_sides(base, args), args, logs))
    finally:
        overhead._stop_all()
        if not args.keep_database:
            asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop))
    return finish(args, facts, seeding, results, logs)


def finish(
    args: argparse.Namespace,
    facts: dict[str, Any],
    seeding: dict[int, float],
    results: list[dict[str, Any]],
    logs: Path,
) -> int:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_base"}
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings,
        "machine": facts,
        "seeding_seconds": seeding,
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = "scale" if args.strategy == "schema" else f"scale-{args.strategy}"
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / f"{stem}.md").write_text(markdown(report))
    print()
    print(table(results))
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
