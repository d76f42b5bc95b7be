"""Tenancy on a Citus cluster: the Quick Start's `GET /orders` against the same route without it,
and how long moving a tenant between workers takes as its schema grows.

A throwaway cluster (`../shared/citus/cluster.sh`: a coordinator and two workers, each its
own PostgreSQL 15 with Citus; `--cluster-url` to use a running one instead) holds the
tenants. Side A, "tenancy": `examples/quickstart/main.py` as it is, its URL the
coordinator's; `acme-corp` and `globex` registered through it with `--orders` orders each
side's answer must match, their schemas on different workers (moved apart if Citus placed
them together). Side B, "bare": `benchmarks/bare_app.py` reading `tenant_acme_corp.orders`
through the same coordinator with a plain `async_sessionmaker` (pool 10+10, the library's
defaults). The rounds, wrk settings and summary are `overhead.py`'s (one uvicorn worker each,
rounds alternating A B / B A, the median of the per-round req/s ratios).

Then, for each `--move-sizes` row count, a tenant `move-<rows>` is registered, filled, and
moved to the other worker with `CitusCluster.move()` (what `fastapi-tenancy tenants move`
runs: `citus_schema_move`, logical replication); the report gives its size and the time.

    .venv/bin/python benchmarks/citus.py                     # 6 rounds, moves of 0 to 1M rows
    .venv/bin/python benchmarks/citus.py --rounds 2 --duration 3 --move-sizes 0,10000,100000

Needs `wrk`, root (the nodes run as the postgres user) and Citus (`../shared/citus/install.sh`
builds it). Results go to `benchmarks/results/citus.json` and `citus.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

ROOT = overhead.ROOT
SCRIPTS = next(
    (d for d in (ROOT.parent / "shared" / "citus", ROOT.parents[1] / "shared" / "citus") if d.is_dir()),
    ROOT.parent / "shared" / "citus",
)


def _free_base(count: int) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        if base + count < 65_000:
            return base
    raise RuntimeError("no run of free ports for the Citus nodes")


@contextmanager
def cluster(args: argparse.Namespace) -> Iterator[str]:
    """The coordinator's async URL: `--cluster-url`, or a cluster started (and stopped) here."""
    if args.cluster_url:
        yield args.cluster_url
        return
    script = SCRIPTS / "cluster.sh"
    if not script.exists():
        raise RuntimeError(f"no {script}: pass --cluster-url, or put the Citus scripts beside the checkout")
    workdir = Path(tempfile.mkdtemp(prefix="bench-citus-"))
    os.chmod(workdir, 0o755)
    nodes = workdir / "nodes"
    port = _free_base(3)
    started = subprocess.run(
        [str(script), "start", str(nodes), str(port), "2"], capture_output=True, text=True
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"cluster.sh start failed: {started.stderr}")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(script), "stop", str(nodes)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


async def _manager(url: str, module: str) -> Any:
    quickstart = overhead.load_quickstart(url, module)
    await quickstart.manager.initialize()
    return quickstart


async def spread(url: str) -> dict[str, str]:
    """Put acme-corp and globex on different workers; their nodes."""
    qs = await _manager(url, "citus_spread")
    try:
        cluster = qs.manager.isolation.cluster
        schemas = ["tenant_acme_corp", "tenant_globex"]
        placed = await cluster.placements(schemas)
        if placed["tenant_acme_corp"] == placed["tenant_globex"]:
            other = next(
                n.address
                for n in await cluster.nodes()
                if n.holds_shards and n.address != placed["tenant_globex"]
            )
            await cluster.move("tenant_globex", other)
            placed = await cluster.placements(schemas)
        return dict(placed)
    finally:
        await qs.manager.close()


async def move_timings(url: str, sizes: list[int]) -> list[dict[str, Any]]:
    """Register `move-<rows>` tenants, fill them, move each to the other worker: the timings."""
    import sqlalchemy as sa

    qs = await _manager(url, "citus_moves")
    rows_out = []
    try:
        cluster = qs.manager.isolation.cluster
        nodes = [n.address for n in await cluster.nodes() if n.holds_shards]
        for size in sizes:
            identifier = f"move-{size}"
            schema = qs.manager.isolation.storage_name(identifier)
            await qs.manager.register_tenant(identifier, identifier, app_metadata=qs.Base.metadata)
            async with qs.manager.engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        f'INSERT INTO "{schema}".orders (description) '  # noqa: S608 - our own schema name
                        "SELECT 'order #' || g FROM generate_series(1, :n) AS g"
                    ),
                    {"n": size},
                )
                megabytes = await conn.scalar(
                    sa.text(
                        "SELECT schema_size FROM public.citus_schemas "
                        "WHERE schema_name = CAST(:s AS regnamespace)"
                    ),
                    {"s": schema},
                )
            source = (await cluster.placements([schema]))[schema]
            target = next(node for node in nodes if node != source)
            moved = await cluster.move(schema, target)
            row = {"rows": size, "size": str(megabytes), "seconds": round(moved.seconds, 3)}
            print(
                f"[citus] moved {identifier} ({row['size']}) {source} -> {target} in {moved.seconds:.2f} s",
                flush=True,
            )
            rows_out.append(row)
    finally:
        await qs.manager.close()
    return rows_out


def markdown(report: dict[str, Any]) -> str:
    result = report["result"]
    lines = [
        "# Tenancy on a Citus cluster",
        "",
        f"{report['date']}; `{report['command']}`",
        "",
        f"Coordinator and two workers; {result['notes']}.",
        "",
        overhead.table([result]),
        "",
        "## Moving a tenant between workers (`fastapi-tenancy tenants move`)",
        "",
        "| rows | schema size | seconds |",
        "|---:|---:|---:|",
        *(f"| {m['rows']:,} | {m['size']} | {m['seconds']:.2f} |" for m in report["moves"]),
        "",
        f"Machine: nproc {report['machine']['nproc']}, load average at start "
        f"{report['machine']['loadavg_at_start']}. Shared, noisy machine: compare the ratio, not req/s.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cluster-url", default="", help="a running coordinator (async URL) instead of cluster.sh"
    )
    parser.add_argument(
        "--move-sizes",
        default="0,10000,100000,1000000",
        help="comma-separated row counts of the tenants moved (empty: no moves)",
    )
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    # Everything else as overhead.py takes it (rounds, duration, wrk, pinning...).
    known, rest = parser.parse_known_args(argv)
    args = overhead.parse_args(rest + ["--strategies", "schema", "--output-dir", str(known.output_dir)])
    vars(args).update(vars(known))
    args.move_sizes = [int(n) for n in known.move_sizes.split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, overhead._on_sigterm)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench_citus_logs_"))
    facts = overhead.machine_facts(args)
    try:
        with cluster(args) as url:
            asyncio.run(overhead.seed(url, "citus_seed", args.orders))
            placed = asyncio.run(spread(url))
            backend = overhead.Backend(
                name="citus",
                strategy="schema",
                tier=None,
                tenancy_app=overhead.QUICKSTART,
                tenancy_env={"TENANCY_DATABASE_URL": url},
                bare_env={
                    "BENCH_BARE_DATABASE_URL": url,
                    "BENCH_BARE_SCHEMA": "tenant_acme_corp",
                    **overhead._pool(10, 10),
                },
                notes=(
                    f"the Quick Start on the coordinator, acme-corp on {placed['tenant_acme_corp']} and "
                    f"globex on {placed['tenant_globex']}; bare app reads "
                    "tenant_acme_corp.orders through the coordinator (pool 10+10)"
                ),
            )
            result = overhead.compare(backend, args, logs)
            moves = asyncio.run(move_timings(url, args.move_sizes))
    finally:
        overhead._stop_all()
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": facts,
        "result": result,
        "moves": moves,
    }
    (args.output_dir / "citus.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "citus.md").write_text(markdown(report))
    print()
    print(overhead.table([result]))
    print(f"\ntenancy/bare req/s ratio (median): {result['summary']['ratio_median']:.3f}")
    print(f"wrote {args.output_dir / 'citus.json'} and {args.output_dir / 'citus.md'}")
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
