"""Noisy neighbour: does one tenant flooding slow requests raise the others' p99?

Schema isolation on PostgreSQL: every tenant shares the worker's one pool (10 + 10
connections). One hot tenant floods `GET /slow` (`noisy_app.py`: a 100 ms `pg_sleep` in
its transaction) over `--hot-connections` (default 40, twice the pool) while 100 quiet
tenants call `GET /orders` paced (`wrk_spread.lua`, about `--latency-rate` req/s over
`--latency-connections`, requests spread uniformly). Each round measures, on two
uvicorn workers started side by side:

- `capped`: `TENANCY_TENANT_MAX_CONCURRENT_REQUESTS=--cap` (default 4) and
  `TENANCY_TENANT_CONCURRENCY_WAIT=30` (the hot tenant's excess requests queue, holding no
  connection);
- `uncapped`: the default, no cap;

each first with the quiet tenants alone, then with the hot tenant flooding. The figure is
the quiet tenants' p99 with the flood over their p99 alone, per round (same worker, same
minute), then the median. The target (issue 20): at most 1.2.

    .venv/bin/python benchmarks/noisy.py                    # 3 rounds x 10 s per phase
    .venv/bin/python benchmarks/noisy.py --rounds 2 --duration 5

Creates and drops the database `bench_noisy`; writes `results/noisy.json` and `noisy.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

DB_NAME = "bench_noisy"
HOT = "hot"
QUIET_PREFIX = "quiet-"  # quiet-00001 ... quiet-00100, the form wrk_spread.lua asks for
SPREAD_SCRIPT = overhead.BENCH_DIR / "wrk_spread.lua"


async def seed(database_url: str, quiet: int, orders: int) -> float:
    """Register the hot tenant and `quiet` quiet ones, `orders` rows each; seconds taken."""
    qs = overhead.load_quickstart(database_url, "quickstart_noisy")
    await qs.manager.initialize()
    began = time.perf_counter()
    names = iter([HOT, *(f"{QUIET_PREFIX}{i:05d}" for i in range(1, quiet + 1))])

    async def worker() -> None:
        for name in names:
            tenant = await qs.manager.register_tenant(name, name, app_metadata=qs.Base.metadata)
            async with qs.manager.session(tenant) as session:
                session.add_all([qs.Order(description=f"Order #{i}") for i in range(1, orders + 1)])
                await session.commit()

    try:
        await asyncio.gather(*(worker() for _ in range(8)))
    finally:
        await qs.manager.close()
    return time.perf_counter() - began


def start_flood(server: overhead.Server, seconds: float, args: argparse.Namespace) -> subprocess.Popen[str]:
    """wrk flooding `GET /slow` as the hot tenant, in the background."""
    cmd = [
        *overhead._pin(args.load_cpu),
        "wrk",
        "-t",
        "1",
        "-c",
        str(args.hot_connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "60s",
        "-H",
        f"X-Tenant-ID: {HOT}",
        "-s",
        str(overhead.WRK_SCRIPT),
        server.url + "/slow",
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=overhead.BENCH_DIR
    )


def flood_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"hot wrk failed ({proc.returncode}):\n{out}\n{err}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "non_2xx": raw["status_errors"],
        "p50_ms": raw["lat_p50_us"] / 1000,
        "p99_ms": raw["lat_p99_us"] / 1000,
    }


def quiet_run(server: overhead.Server, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    return overhead.run_wrk(
        server,
        seconds,
        args,
        script=SPREAD_SCRIPT,
        script_args=(str(args.quiet), QUIET_PREFIX),
        header=None,
        paced=True,
    )


def measure(servers: dict[str, overhead.Server], args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        order = list(servers) if index % 2 == 0 else list(reversed(servers))
        result: dict[str, Any] = {"round": index + 1, "loadavg": overhead._loadavg()}
        for name in order:
            server = servers[name]
            time.sleep(args.pause)
            alone = quiet_run(server, args.duration, args)
            time.sleep(args.pause)
            flood = start_flood(server, args.duration + 2 * args.flood_lead, args)
            time.sleep(args.flood_lead)  # the flood fills the pool (or the hot queue) first
            with_hot = quiet_run(server, args.duration, args)
            hot = flood_result(flood)
            result[name] = {"alone": alone, "with_hot": with_hot, "hot": hot}
            ratio = with_hot["p99_ms"] / alone["p99_ms"]
            print(
                f"round {index + 1}/{args.rounds} {name}: quiet p99 {alone['p99_ms']:.1f} ms alone, "
                f"{with_hot['p99_ms']:.1f} ms with the hot tenant (x{ratio:.2f}); hot "
                f"{hot['rps']:.0f} req/s, {hot['non_2xx']} refused, p50 {hot['p50_ms']:.0f} ms",
                flush=True,
            )
        rounds.append(result)
    return rounds


def summarise(rounds: list[dict[str, Any]], sides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in sides:

        def med(phase: str, key: str, side: str = side) -> float:
            return float(statistics.median(r[side][phase][key] for r in rounds))

        out[side] = {
            "quiet_p50_ms_alone": med("alone", "p50_ms"),
            "quiet_p99_ms_alone": med("alone", "p99_ms"),
            "quiet_p50_ms_with_hot": med("with_hot", "p50_ms"),
            "quiet_p99_ms_with_hot": med("with_hot", "p99_ms"),
            "quiet_rps": med("with_hot", "rps"),
            "hot_rps": med("hot", "rps"),
            "hot_p50_ms": med("hot", "p50_ms"),
            "hot_non_2xx": int(statistics.median(r[side]["hot"]["non_2xx"] for r in rounds)),
            "p99_ratio_median": statistics.median(
                r[side]["with_hot"]["p99_ms"] / r[side]["alone"]["p99_ms"] for r in rounds
            ),
        }
    return out


def table(summary: dict[str, Any], cap: int) -> str:
    lines = [
        "| worker | quiet p50 / p99 ms alone | quiet p50 / p99 ms with the hot tenant | **quiet p99 ratio** "
        "| hot tenant req/s (p50 ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, label in (("uncapped", "no cap"), ("capped", f"cap {cap} per tenant")):
        s = summary[side]
        lines.append(
            f"| {label} | {s['quiet_p50_ms_alone']:.1f} / {s['quiet_p99_ms_alone']:.1f} "
            f"| {s['quiet_p50_ms_with_hot']:.1f} / {s['quiet_p99_ms_with_hot']:.1f} "
            f"| **{s['p99_ratio_median']:.2f}** | {s['hot_rps']:.0f} ({s['hot_p50_ms']:.0f}) |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    loads = ", ".join(r["loadavg"].split()[0] for r in report["rounds"])
    return f"""# Noisy neighbour

Generated by `benchmarks/noisy.py` on {report["date"]}.

One hot tenant floods `GET /slow` ({s["slow_seconds"]:g} s in `pg_sleep`, {s["hot_connections"]}
connections) while {s["quiet"]} quiet tenants call `GET /orders` paced (about
{s["latency_rate"]:g} req/s over {s["latency_connections"]} connections). PostgreSQL, schema
isolation, one pool of 10 + 10 connections per worker. Ratios per round (quiet p99 with
the flood / alone, same worker), then the median of {s["rounds"]} rounds × {s["duration"]:g} s.

{table(report["summary"], s["cap"])}

The capped worker sets `tenant_max_concurrent_requests={s["cap"]}`, `tenant_concurrency_wait=30`:
the hot tenant's requests beyond {s["cap"]} wait in its own queue, not for a connection.
Load average (1 min) at each round: {loads}; at start {m["loadavg_at_start"]}.
Python {m["python"]}, git {m["git_commit"]}.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--flood-lead", type=float, default=1.0, help="s the flood runs before quiet load")
    parser.add_argument("--quiet", type=int, default=100, help="quiet tenants")
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--hot-connections", type=int, default=40)
    parser.add_argument("--slow-seconds", type=float, default=0.1)
    parser.add_argument(
        "--cap", type=int, default=4, help="tenant_max_concurrent_requests of the capped worker"
    )
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    overhead.add_latency_arguments(parser)
    base = overhead.parse_args([])
    for name in ("server_cpu", "load_cpu", "loop", "http", "pg_base", "maintenance_db", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(base, name))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, overhead._on_sigterm)
    base = args.pg_base.rstrip("/")
    logs = Path(tempfile.mkdtemp(prefix="bench_noisy_logs_"))
    facts = overhead.machine_facts(args)
    drop = f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"
    asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop, f"CREATE DATABASE {DB_NAME}"))
    try:
        seconds = asyncio.run(seed(f"{base}/{DB_NAME}", args.quiet, args.orders))
        print(f"registered {args.quiet + 1} tenants in {seconds:.1f} s", flush=True)
        env = {
            "TENANCY_DATABASE_URL": f"{base}/{DB_NAME}",
            "TENANCY_ISOLATION_STRATEGY": "schema",
            "BENCH_SLOW_SECONDS": str(args.slow_seconds),
        }
        capped = {
            **env,
            "TENANCY_TENANT_MAX_CONCURRENT_REQUESTS": str(args.cap),
            "TENANCY_TENANT_CONCURRENCY_WAIT": "30",
        }
        servers = {
            name: overhead.Server(
                name,
                "noisy_app:app",
                overhead.BENCH_DIR,
                server_env,
                args.server_cpu,
                args.loop,
                args.http,
                logs / f"{name}.log",
            )
            for name, server_env in (("capped", capped), ("uncapped", env))
        }
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():
            quiet_run(server, 2, args)  # warm-up: every quiet tenant looked up, statements prepared
        rounds = measure(servers, args)
    finally:
        overhead._stop_all()
        asyncio.run(overhead.pg_admin(base, args.maintenance_db, drop))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_base"}
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings,
        "machine": facts,
        "rounds": rounds,
        "summary": summarise(rounds, list(servers)),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "noisy.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "noisy.md").write_text(markdown(report))
    print()
    print(table(report["summary"], args.cap))
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
