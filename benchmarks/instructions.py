"""Instructions per request, counted by valgrind: a measure the machine's noise does not move.

Timings on a shared 2-core machine vary by 10-25 % from round to round; the number of
instructions a worker executes per request does not (the same count to 0.3 % whatever
else the machine does). Each app runs in one uvicorn worker under `valgrind
--tool=callgrind` (pinned to CPU 0), takes a warm-up, then `--requests` requests of the
Quick Start's `GET /orders` over `--connections` keep-alive connections with the tenants
taken in turn (32 in flight: more than the pools' 10 + 10, as `saturation.py`), between
`callgrind_control --zero` and `--dump`. Reported per request: all instructions, those of
the garbage collector (`gc_collect_main`, inclusive), and the ratio to the in-route app.

Apps (`--apps`): `route`, `dependency` (`bare_app.py`, as in `saturation.py`),
`tenancy` (the Quick Start), `tenancy-nofreeze` (the Quick Start with
`TENANCY_GC_FREEZE=false`). Under valgrind a worker runs some 50 times slower than
natively, so the collector's share is not the native one (young collections come with
allocations, not time) and the wall-clock figures mean nothing; the counts of the
request path do.

    .venv/bin/python benchmarks/saturation.py --backends postgres --sizes 10 --keep-database
    .venv/bin/python benchmarks/instructions.py                    # ~1 min per app

Needs `valgrind` (`apt-get install -y valgrind`) and the `bench_saturation` database
with its tenants that `saturation.py --keep-database` leaves. Writes
`results/instructions.json` and `instructions.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)
import saturation  # noqa: E402
import scale  # noqa: E402

APPS = ("route", "dependency", "tenancy", "tenancy-nofreeze")


def app_command(app: str, port: int, out: Path, url: str) -> tuple[list[str], dict[str, str]]:
    env: dict[str, str] = {}
    if app in ("route", "dependency"):
        target, app_dir = "bare_app:app", overhead.BENCH_DIR
        env.update(
            BENCH_BARE_DATABASE_URL=url,
            BENCH_BARE_SCHEMA="tenant_{tenant}",
            BENCH_BARE_SESSION=app,
            **overhead._pool(10, 10),
        )
    else:
        target, app_dir = "main:app", overhead.QUICKSTART.parent
        env["TENANCY_DATABASE_URL"] = url
        if app == "tenancy-nofreeze":
            env["TENANCY_GC_FREEZE"] = "false"
    command = [
        *overhead._pin(0),
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}.%p.%n",
        "--dump-instr=no",
        *overhead.uvicorn_command(target, app_dir, port, "asyncio", "httptools"),
    ]
    return command, env


async def load(port: int, total: int, connections: int, tenants: int) -> None:
    """`total` requests over `connections` keep-alive connections; any answer but 200 fails."""

    async def one_connection(index: int, count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for k in range(count):
                tenant = scale.slug((index * count + k) % tenants + 1)
                request = f"GET /orders HTTP/1.1\r\nHost: bench\r\nX-Tenant-ID: {tenant}\r\n\r\n"
                writer.write(request.encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{tenant}: {head[:60]!r}")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length is None:
                    raise RuntimeError(f"{tenant}: no content-length in {head!r}")
                await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()

    await asyncio.gather(*(one_connection(i, total // connections) for i in range(connections)))


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the server did not answer /health in time")


def totals(dump: Path) -> tuple[int, int]:
    """All instructions in a callgrind dump, and those inside `gc_collect_main` (inclusive)."""
    text = dump.read_text(errors="replace")
    match = re.search(r"^summary: (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary in {dump}")
    annotate = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True, text=True, check=True
    )
    collector = 0
    for line in annotate.stdout.splitlines():
        if "gc_collect_main" in line:
            collector = int(line.split()[0].replace(",", ""))
            break
    return int(match.group(1)), collector


def measure(app: str, args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Any]:
    port = overhead._free_port()
    out = workdir / app
    command, env = app_command(app, port, out, url)
    log = (workdir / f"{app}.log").open("wb")
    proc = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=overhead.ROOT,
    )
    try:
        wait_ready(proc, port)
        asyncio.run(load(port, args.warmup, args.connections, args.tenants))
        pid = str(proc.pid)  # valgrind's own process (taskset execs it), which runs the worker
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
        began = time.monotonic()
        asyncio.run(load(port, args.requests, args.connections, args.tenants))
        seconds = time.monotonic() - began
        before = set(workdir.glob(f"{app}.*"))
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
        for _ in range(100):
            dumps = set(workdir.glob(f"{app}.*")) - before
            if dumps:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # the dump is written in one go, but let it finish
        (dump,) = dumps
        total, collector = totals(dump)
    finally:
        overhead._stop(proc)
        log.close()
    requests = args.requests // args.connections * args.connections
    result = {
        "app": app,
        "requests": requests,
        "seconds_under_valgrind": round(seconds, 1),
        "instructions_per_request": total // requests,
        "collector_per_request": collector // requests,
    }
    print(
        f"{app}: {result['instructions_per_request']:,} instructions per request "
        f"({result['collector_per_request']:,} in the collector), {seconds:.0f} s",
        flush=True,
    )
    return result


def markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    base = next((r for r in rows if r["app"] == "route"), rows[0])
    lines = [
        "# Instructions per request (valgrind)",
        "",
        f"Generated by `benchmarks/instructions.py` on {report['generated']}, git {report['git']}.",
        "",
        f"The Quick Start's `GET /orders` over {report['tenants']} PostgreSQL schema tenants, "
        f"{report['requests']} requests with {report['connections']} in flight after "
        f"{report['warmup']} of warm-up, one uvicorn worker under callgrind per app.",
        "",
        f"| app | instructions per request | ÷ {base['app']} | of which the collector |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["instructions_per_request"] / base["instructions_per_request"]
        count, collector = r["instructions_per_request"], r["collector_per_request"]
        lines.append(f"| {r['app']} | {count:,} | {ratio:.3f} | {collector:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", default="route,tenancy,tenancy-nofreeze")
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--warmup", type=int, default=640)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--pg-base", default=overhead.DEFAULT_PG_BASE)
    parser.add_argument("--maintenance-db", default="test")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    args = parser.parse_args(argv)
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    if not apps or set(apps) - set(APPS):
        parser.error(f"--apps: a comma-separated list of {', '.join(APPS)}")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y valgrind")
    kept = asyncio.run(saturation.kept_tenants(args.pg_base, args.maintenance_db))
    if kept is None or kept < args.tenants:
        sys.exit(
            f"needs {saturation.DB_NAME} with at least {args.tenants} tenants: run "
            "benchmarks/saturation.py --backends postgres --sizes 10 --keep-database first"
        )
    url = f"{args.pg_base.rstrip('/')}/{saturation.DB_NAME}"
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        results = [measure(app, args, url, Path(tmp)) for app in apps]
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=overhead.ROOT
    ).stdout.strip()
    report = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git,
        "tenants": args.tenants,
        "requests": args.requests,
        "warmup": args.warmup,
        "connections": args.connections,
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "instructions.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "instructions.md").write_text(markdown(report))
    print(f"\nwrote {args.output_dir / 'instructions.json'} and {args.output_dir / 'instructions.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
