"""What does tenancy cost per request? The Quick Start app against the same route without it.

Side A, "tenancy": the Quick Start app, header resolution, one isolation strategy;
the tenant `acme-corp` registered with `app_metadata=Base.metadata` and a few orders
seeded for it, and a second tenant, `globex`, with orders of its own that `acme-corp`
must never see. Side B, "bare": `benchmarks/bare_app.py`, the same route and JSON over
a plain `async_sessionmaker` bound to the storage that holds `acme-corp`'s rows. Same
rows, same driver, same session-per-request dependency, same pool as the library opens.

Strategies (`--strategies`, all by default):

- `schema` (PostgreSQL): exactly `examples/quickstart/main.py`. Bare reads
  `tenant_acme_corp.orders` (pool 10+10, the `TenancyConfig` defaults).
- `schema-roles` (PostgreSQL): `tenancy_app.py` with schema isolation and
  `schema_tenant_roles` (each transaction runs as the tenant's role); requests as a
  NOINHERIT application role, DDL, the tenant roles and the registry as an owner role
  with CREATEROLE. Bare as for `schema`.
- `database` (PostgreSQL, a database per tenant): `benchmarks/tenancy_app.py`, the Quick
  Start configured by `TENANCY_*` variables only (its `isolation_strategy="schema"`
  argument would win over the environment), tenant databases named `<db-prefix>_<slug>`.
  Bare opens the tenant's database directly with the library's per-tenant pool (2, no
  overflow: `database_tenant_pool_size`).
- `rls` (PostgreSQL row-level security): `tenancy_app.py`, whose `Order` then carries the
  `tenant_id` column shared tables need; requests run as a plain application role that
  RLS binds, DDL and the registry as an owner role (both created for the run, dropped
  after it). Bare reads the same shared table `public.orders` as the superuser (RLS does
  not apply to it) with `WHERE tenant_id = <acme-corp's id>`: what an app sharing tables
  without this library writes by hand. It returns the same rows through the same index
  (the tenant column leads the primary key); what it lacks is what tenancy adds: the
  middleware, the binding statement before each transaction and the policy check.
  Without the filter, bare would read both tenants' rows and not be an equivalent.
- `hybrid` (PostgreSQL): `tenancy_app.py` with hybrid isolation, the tenant in
  `--hybrid-tier` (default `rls`, the default tier). Bare as for that tier's strategy
  (with the tenant column in the model; filtered only in the rls tier).
- `sqlite` (a database file per tenant, what `schema` means on SQLite): exactly the
  Quick Start. Bare opens the tenant's file directly (pool 2+8, as the library does).

Each app runs in one uvicorn worker (subprocess, pinned to CPU 0 where `taskset`
exists); `wrk` (pinned to CPU 1) drives `GET /orders` with `X-Tenant-ID: acme-corp`
on both. Before measuring, both sides must answer the same `acme-corp` orders and the
tenancy side must answer `globex`'s orders, and only those, for `X-Tenant-ID: globex`.
After a warm-up, rounds alternate A B / B A ...; the report gives per-side medians of
req/s and of p50/p99 latency, and the median of the per-round ratios tenancy/bare.
`--baseline-src DIR` adds a third side, the same tenancy app importing
fastapi_tenancy from DIR (such as an older version's src/).

    .venv/bin/python benchmarks/overhead.py                 # every strategy
    .venv/bin/python benchmarks/overhead.py --strategies schema,rls --rounds 3 --duration 5
    .venv/bin/python benchmarks/overhead.py --rounds 2 --duration 3 --output-dir /tmp/smoke

Needs `wrk` on PATH (`apt-get install -y wrk`). PostgreSQL comes from
`TENANCY_BENCH_POSTGRES_URL` (default `postgresql+asyncpg://postgres@127.0.0.1:5432`, a
superuser); each strategy gets a fresh database `<db-prefix>_<strategy>` (default prefix
`bench_overhead`), `rls` and `hybrid` the roles `<db-prefix>_owner` and `<db-prefix>_app`,
all dropped at the end. Results go to `benchmarks/results/overhead.json` and
`overhead.md` (`--output-dir` to write them elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
QUICKSTART = ROOT / "examples" / "quickstart" / "main.py"
TENANCY_APP = BENCH_DIR / "tenancy_app.py"  # the Quick Start, isolation strategy from TENANCY_*
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
DEFAULT_PG_BASE = "postgresql+asyncpg://postgres@127.0.0.1:5432"
DB_NAME = "bench_overhead"  # the default --db-prefix
TENANT = "acme-corp"
SCHEMA = "tenant_acme_corp"
HEADER = ("X-Tenant-ID", TENANT)
OTHER_TENANT = "globex"  # a second tenant, whose rows acme-corp must not see
OTHER_ORDERS = 3
POSTGRES_STRATEGIES = ("schema", "schema-roles", "database", "rls", "hybrid")
STRATEGIES = (*POSTGRES_STRATEGIES, "sqlite")
ROLE_PASSWORD = "bench"  # of the run's own owner/app roles, dropped at the end


# -- processes -------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks below


def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one child we started (its own process group), politely then firmly."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if proc in _children:
        _children.remove(proc)


def _stop_all() -> None:
    for proc in list(_children):
        _stop(proc)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_command(app: str, app_dir: Path, port: int, loop: str, http: str) -> list[str]:
    """One uvicorn worker serving `app` (module:attribute) from `app_dir` on loopback."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(app_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
        "--loop",
        loop,
        "--http",
        http,
    ]


@dataclass
class Server:
    name: str
    app: str  # module:attribute
    app_dir: Path
    env: dict[str, str]
    cpu: int | None
    loop: str
    http: str
    log_path: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*_pin(self.cpu), *uvicorn_command(self.app, self.app_dir, self.port, self.loop, self.http)]
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        finally:
            log.close()
        _children.append(self.proc)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not come up in {timeout:.0f}s\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} server exited\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def fetch_orders(server: Server, tenant: str = TENANT) -> Any:
    request = urllib.request.Request(server.url + "/orders", headers={HEADER[0]: tenant})
    with urllib.request.urlopen(request, timeout=10) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{server.name}: GET /orders answered {resp.status}")
        return json.loads(resp.read())


# -- load ------------------------------------------------------------------------------


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def run_wrk(
    server: Server,
    seconds: float,
    args: argparse.Namespace,
    *,
    script: Path = WRK_SCRIPT,
    script_args: tuple[str, ...] = (),
    header: tuple[str, str] | None = HEADER,
    paced: bool = False,
) -> dict[str, Any]:
    """Drive `GET /orders` on `server` for `seconds`; `script` may set its own headers.

    `paced=True`: `--latency-connections` connections at about `--latency-rate`
    requests per second in all (see wrk_report.lua), instead of as fast as possible.
    """
    connections = args.latency_connections if paced else args.connections
    env = None
    if paced:
        env = {**os.environ, "BENCH_PACE_MS": f"{connections * 1000 / args.latency_rate:.3f}"}
    cmd = [
        *_pin(args.load_cpu),
        "wrk",
        "-t",
        str(min(args.threads, connections)),
        "-c",
        str(connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "10s",
        *(["-H", f"{header[0]}: {header[1]}"] if header is not None else []),
        "-s",
        str(script),
        server.url + "/orders",
        *(["--", *script_args] if script_args else []),
    ]
    pid = server.proc.pid if server.proc is not None else -1  # taskset execs: same pid
    cpu_before = process_cpu_seconds(pid)
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=False, cwd=BENCH_DIR, env=env
    )
    cpu_after = process_cpu_seconds(pid)
    server.check_alive()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = {
        k: raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    }
    if any(errors.values()):
        # Non-2xx answers are fast and would flatter the numbers: refuse them.
        raise RuntimeError(f"{server.name}: wrk saw errors {errors}\n{server.log_tail()}")
    seconds_run = raw["duration_us"] / 1e6
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "requests": raw["requests"],
        "seconds": round(seconds_run, 3),
        "rps": raw["requests"] / seconds_run,
        # Server CPU per request: steadier than req/s when neighbours steal the CPU.
        "cpu_us_per_request": None if cpu is None else cpu / raw["requests"] * 1e6,
        "server_cpu_utilisation": None if cpu is None else cpu / seconds_run,
        "p50_ms": raw["lat_p50_us"] / 1000,
        "p90_ms": raw["lat_p90_us"] / 1000,
        "p99_ms": raw["lat_p99_us"] / 1000,
        "mean_ms": raw["lat_mean_us"] / 1000,
        "max_ms": raw["lat_max_us"] / 1000,
    }


# -- setup -----------------------------------------------------------------------------


def load_app(path: Path, env: dict[str, str], module_name: str) -> ModuleType:
    """Import the app at `path` afresh, with `env` set while it reads its configuration."""
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_quickstart(database_url: str, module_name: str) -> ModuleType:
    """Import `examples/quickstart/main.py` afresh, configured for `database_url`."""
    return load_app(QUICKSTART, {"TENANCY_DATABASE_URL": database_url}, module_name)


@dataclass
class Seeded:
    tenant_id: str  # acme-corp's id: the tenant column's value under row-level security
    storage: dict[str, str]  # identifier -> schema, database or file stem holding its rows


async def seed(
    database_url: str,
    module_name: str,
    orders: int,
    *,
    app: Path = QUICKSTART,
    env: dict[str, str] | None = None,
) -> Seeded:
    """Register `acme-corp` and `globex` through the app's own manager and add their orders."""
    qs = load_app(app, {"TENANCY_DATABASE_URL": database_url, **(env or {})}, module_name)
    await qs.manager.initialize()
    try:
        ids: dict[str, str] = {}
        storage: dict[str, str] = {}
        for identifier, name, count, label in (
            (TENANT, "Acme Corp", orders, "Order #"),
            (OTHER_TENANT, "Globex", OTHER_ORDERS, "Globex order #"),
        ):
            tenant = await qs.manager.register_tenant(identifier, name, app_metadata=qs.Base.metadata)
            async with qs.manager.session(tenant) as session:
                # Explicit ids: the shared tables' key (tenant_id, id) does not autoincrement.
                session.add_all([qs.Order(id=i, description=f"{label}{i}") for i in range(1, count + 1)])
                await session.commit()
            isolation = qs.manager.isolation
            if hasattr(isolation, "tier"):  # hybrid: the strategy of the tenant's tier
                isolation = isolation.tier(tenant)
            ids[identifier] = tenant.id
            storage[identifier] = isolation.storage_name(identifier)
        return Seeded(tenant_id=ids[TENANT], storage=storage)
    finally:
        await qs.manager.close()


async def pg_admin(base_url: str, maintenance_db: str, *statements: str) -> list[Any]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(
        f"{base_url}/{maintenance_db}", isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        rows: list[Any] = []
        async with engine.connect() as conn:
            for sql in statements:
                result = await conn.execute(text(sql))
                rows.append(result.fetchall() if result.returns_rows else None)
        return rows
    finally:
        await engine.dispose()


@dataclass
class Backend:
    name: str  # postgres or sqlite
    strategy: str
    tier: str | None  # hybrid: the tenant's tier
    tenancy_app: Path
    tenancy_env: dict[str, str]
    bare_env: dict[str, str]
    notes: str

    @property
    def label(self) -> str:
        return label({"backend": self.name, "strategy": self.strategy, "tier": self.tier})


def _role_url(base: str, role: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(f"{base}/{database}").set(username=role, password=ROLE_PASSWORD)
    return url.render_as_string(hide_password=False)


def _drop_all(base: str, maintenance_db: str, databases: list[str], roles: list[str]) -> None:
    """Drop the run's databases, then its roles (which own objects in those databases only)."""
    statements = [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in databases]
    statements += [f"DROP ROLE IF EXISTS {role}" for role in roles]
    asyncio.run(pg_admin(base, maintenance_db, *statements))


def _pool(size: int, overflow: int) -> dict[str, str]:
    return {"BENCH_BARE_POOL_SIZE": str(size), "BENCH_BARE_MAX_OVERFLOW": str(overflow)}


async def setup_postgres(
    args: argparse.Namespace, cleanups: list[Callable[[], object]], strategy: str = "schema"
) -> Backend:
    base = args.pg_base.rstrip("/")
    prefix = args.db_prefix
    db = f"{prefix}_{strategy.replace('-', '_')}"
    # schema-roles: schema isolation with a role per tenant (schema_tenant_roles).
    tenant_roles = strategy == "schema-roles"
    isolation = "schema" if tenant_roles else strategy
    tier = args.hybrid_tier if strategy == "hybrid" else isolation
    # Tenant databases are cluster-wide names: they carry the run's prefix.
    tenant_dbs = [f"{prefix}_{slug.replace('-', '_')}" for slug in (TENANT, OTHER_TENANT)]
    shared = strategy in ("rls", "hybrid")
    owned = shared or tenant_roles  # an owner role for DDL and the registry, an app role for requests
    roles = [f"{prefix}_owner", f"{prefix}_app"] if owned else []
    if tenant_roles:  # the tenants' roles (<schema>@<database>) and their group; cluster-wide
        names = [f"{prefix}_{slug.replace('-', '_')}@{db}" for slug in (TENANT, OTHER_TENANT)]
        roles = [f'"{name}"' for name in (*names, f"tenants:{db}")] + roles
    databases = [db, *(tenant_dbs if tier == "database" else [])]
    cleanups.append(lambda: _drop_all(base, args.maintenance_db, databases, roles))
    await pg_admin(
        base,
        args.maintenance_db,
        *(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in databases),
        *(f"DROP ROLE IF EXISTS {role}" for role in roles),
        f"CREATE DATABASE {db}",
    )
    env = {"TENANCY_ISOLATION_STRATEGY": isolation, "TENANCY_SCHEMA_PREFIX": f"{prefix}_"}
    app, tenancy_url = TENANCY_APP, f"{base}/{db}"
    if strategy == "schema":
        app, env = QUICKSTART, {}  # the Quick Start itself, as it is
    if owned:
        owner, app_role = roles[-2:]
        # As docs/isolation.md sets them up; CREATEDB only for a hybrid database tier;
        # with tenant roles, the owner makes them and the app role only switches to them.
        createdb = " CREATEDB" if tier == "database" else ""
        createdb += " CREATEROLE" if tenant_roles else ""
        noinherit = " NOINHERIT" if tenant_roles else ""
        await pg_admin(
            base,
            args.maintenance_db,
            f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS{createdb} PASSWORD '{ROLE_PASSWORD}'",
            f"CREATE ROLE {app_role} LOGIN NOSUPERUSER NOBYPASSRLS{noinherit} PASSWORD '{ROLE_PASSWORD}'",
            f"GRANT CREATE ON DATABASE {db} TO {owner}",
        )
        await pg_admin(base, db, f"GRANT CREATE, USAGE ON SCHEMA public TO {owner}")
        tenancy_url = _role_url(base, app_role, db)
        env["TENANCY_DATABASE_OWNER_URL"] = _role_url(base, owner, db)
        if strategy == "hybrid":
            env["TENANCY_HYBRID_DEFAULT_TIER"] = tier
        if tenant_roles:
            env["TENANCY_SCHEMA_TENANT_ROLES"] = "true"
    seeded = await seed(tenancy_url, f"seed_{prefix}_{strategy}", args.orders, app=app, env=env)
    storage = seeded.storage[TENANT]
    column = {"BENCH_BARE_TENANT_COLUMN": "tenant_id"} if shared else {}
    if tier == "database":
        bare_url, schema, pool = f"{base}/{storage}", "", _pool(2, 0)
        where = f"database {storage} directly (pool 2+0, the library's per-tenant pool)"
    elif tier == "rls":
        bare_url, schema, pool = f"{base}/{db}", storage, _pool(10, 10)
        column["BENCH_BARE_TENANT_ID"] = seeded.tenant_id
        where = (
            f"{storage}.orders as the superuser (no RLS) WHERE tenant_id = acme-corp's id "
            "(pool 10+10, like TenancyConfig defaults)"
        )
    else:
        bare_url, schema, pool = f"{base}/{db}", storage, _pool(10, 10)
        where = f"{storage}.orders directly (pool 10+10, like TenancyConfig defaults)"
    app_note = "the Quick Start" if app == QUICKSTART else "tenancy_app.py"
    role_note = " as the app role (owner role for DDL)" if shared else ""
    if tenant_roles:
        role_note = " as the app role switching to the tenant's role (owner role for DDL)"
    if strategy == "hybrid" and tier == "database":
        role_note = " as the owner role (it serves the database tier)"
    tier_note = f", tenant in tier {tier}" if strategy == "hybrid" else ""
    return Backend(
        name="postgres",
        strategy=strategy,
        tier=tier if strategy == "hybrid" else None,
        tenancy_app=app,
        tenancy_env={"TENANCY_DATABASE_URL": tenancy_url, **env},
        bare_env={"BENCH_BARE_DATABASE_URL": bare_url, "BENCH_BARE_SCHEMA": schema, **pool, **column},
        notes=f"database {db}; {app_note}{role_note}{tier_note}; bare app reads {where}",
    )


async def setup_sqlite(args: argparse.Namespace, cleanups: list[Callable[[], object]]) -> Backend:
    directory = Path(tempfile.mkdtemp(prefix="bench_overhead_sqlite_"))
    cleanups.append(lambda: shutil.rmtree(directory, ignore_errors=True))
    registry = directory / "tenancy.db"
    tenant_file = directory / f"tenancy.{SCHEMA}.db"
    backend = Backend(
        name="sqlite",
        strategy="file",
        tier=None,
        tenancy_app=QUICKSTART,
        tenancy_env={"TENANCY_DATABASE_URL": f"sqlite+aiosqlite:///{registry}"},
        bare_env={
            # The same URL form and pool the library opens for a tenant file.
            "BENCH_BARE_DATABASE_URL": f"sqlite+aiosqlite:///file:{tenant_file}?mode=rw&uri=true",
            "BENCH_BARE_SCHEMA": "",
            **_pool(2, 8),
        },
        notes=(
            f"files in a temp dir; the Quick Start; bare app opens {tenant_file.name} directly "
            "(pool 2+8, as the library does per tenant file)"
        ),
    )
    await seed(f"sqlite+aiosqlite:///{registry}", "quickstart_seed_sqlite", args.orders)
    if not tenant_file.exists():
        raise RuntimeError(f"expected tenant file {tenant_file} after registration")
    return backend


# -- one comparison --------------------------------------------------------------------


def summarise(rounds: list[dict[str, Any]], sides: list[str]) -> dict[str, Any]:
    def med(side: str, key: str) -> float:
        return float(statistics.median(r[side][key] for r in rounds))

    have_cpu = all(r[side]["cpu_us_per_request"] is not None for r in rounds for side in sides)
    out: dict[str, Any] = {}
    for side in sides:
        rps = [r[side]["rps"] for r in rounds]
        out[side] = {
            "rps_median": med(side, "rps"),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms_median": med(side, "p50_ms"),
            "p99_ms_median": med(side, "p99_ms"),
            "us_per_request": 1e6 / med(side, "rps"),
            "cpu_us_per_request_median": med(side, "cpu_us_per_request") if have_cpu else None,
            "server_cpu_utilisation_median": med(side, "server_cpu_utilisation") if have_cpu else None,
        }
    paced = all("paced" in r[side] for r in rounds for side in sides)
    if paced:
        # Latency at a fixed load below saturation (see run_wrk): the request's own time.
        for side in sides:
            out[side]["paced"] = {
                key + "_median": float(statistics.median(r[side]["paced"][key] for r in rounds))
                for key in ("rps", "p50_ms", "p99_ms")
            }
    out["vs_bare"] = {}
    for side in sides:
        if side == "bare":
            continue
        ratios = [r[side]["rps"] / r["bare"]["rps"] for r in rounds]
        # On a CPU-bound single worker, 1/rps is the server time per request.
        extra_us = [1e6 / r[side]["rps"] - 1e6 / r["bare"]["rps"] for r in rounds]
        cmp: dict[str, Any] = {
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "extra_us_per_request_median": statistics.median(extra_us),
        }
        # Per round, then the median: both sides of a round ran under the same conditions.
        cmp["p99_ratio_median"] = statistics.median(r[side]["p99_ms"] / r["bare"]["p99_ms"] for r in rounds)
        if paced:
            for key in ("p50_ms", "p99_ms"):
                cmp[f"paced_{key.removesuffix('_ms')}_ratio_median"] = statistics.median(
                    r[side]["paced"][key] / r["bare"]["paced"][key] for r in rounds
                )
        if have_cpu:
            cmp["extra_cpu_us_per_request_median"] = statistics.median(
                r[side]["cpu_us_per_request"] - r["bare"]["cpu_us_per_request"] for r in rounds
            )
        out["vs_bare"][side] = cmp
    out.update(out["vs_bare"]["tenancy"])  # the headline numbers, at the top level
    if "baseline" in sides:
        out["tenancy_vs_baseline_ratio_median"] = statistics.median(
            r["tenancy"]["rps"] / r["baseline"]["rps"] for r in rounds
        )
    if have_cpu:
        # A CPU-bound server below 90 % busy was starved by something else on the machine.
        out["starved_rounds"] = sum(
            1 for r in rounds if min(r[side]["server_cpu_utilisation"] for side in sides) < 0.9
        )
    return out


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=250.0,
        help="req/s of the paced latency runs after each round's throughput runs (0: none)",
    )
    parser.add_argument("--latency-connections", type=int, default=8, help="connections of the paced runs")


def _brief(run: dict[str, Any]) -> str:
    cpu = "" if run["cpu_us_per_request"] is None else f", {run['cpu_us_per_request']:.0f} µs CPU/req"
    paced = run.get("paced")
    at_rate = "" if paced is None else f", p99 {paced['p99_ms']:.1f} ms at {paced['rps']:.0f} req/s"
    return f"{run['rps']:.0f} req/s p99 {run['p99_ms']:.1f} ms{cpu}{at_rate}"


def check_answers(servers: dict[str, Server], orders: int) -> None:
    """Refuse to measure apps that answer differently, or a tenancy app that leaks rows."""
    bodies = {side: fetch_orders(srv) for side, srv in servers.items()}
    mine = bodies["bare"]["orders"]
    if (
        any(body != bodies["bare"] for body in bodies.values())
        or len(mine) != orders
        or not all(o["description"].startswith("Order #") for o in mine)
    ):
        raise RuntimeError(f"the apps answer differently: {bodies}")
    other = fetch_orders(servers["tenancy"], OTHER_TENANT)
    expected = [f"Globex order #{i}" for i in range(1, OTHER_ORDERS + 1)]
    if other["tenant"] != OTHER_TENANT or sorted(o["description"] for o in other["orders"]) != expected:
        raise RuntimeError(f"tenant {OTHER_TENANT} is not isolated from {TENANT}: {other}")


def compare(backend: Backend, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    def server(name: str, app: str, app_dir: Path, env: dict[str, str]) -> Server:
        log = logs / f"{backend.name}-{backend.strategy}-{name}.log"
        return Server(name, app, app_dir, env, args.server_cpu, args.loop, args.http, log)

    tenancy_app = f"{backend.tenancy_app.stem}:app"
    servers = {
        "tenancy": server("tenancy", tenancy_app, backend.tenancy_app.parent, backend.tenancy_env),
        "bare": server("bare", "bare_app:app", BENCH_DIR, backend.bare_env),
    }
    if args.baseline_src is not None:
        # The same tenancy app, importing fastapi_tenancy from another source tree first.
        env = {**backend.tenancy_env, "PYTHONPATH": str(args.baseline_src)}
        servers["baseline"] = server("baseline", tenancy_app, backend.tenancy_app.parent, env)
    sides = list(servers)
    tag = f"[{backend.label}]"
    try:
        for srv in servers.values():
            srv.start()
        for srv in servers.values():
            srv.wait_ready()
        check_answers(servers, args.orders)
        print(
            f"{tag} all apps answer the same {args.orders} {TENANT} orders, and the tenancy app "
            f"{OTHER_ORDERS} {OTHER_TENANT} orders only; warming up",
            flush=True,
        )
        for side in sides:
            run_wrk(servers[side], args.warmup, args)
        rounds: list[dict[str, Any]] = []
        for index in range(args.rounds):
            # A B (C), then reversed, rotating the start: each side leads and follows alike.
            shift = (index // 2) % len(sides)
            order = sides[shift:] + sides[:shift]
            if index % 2:
                order = order[::-1]
            result: dict[str, Any] = {"round": index + 1, "order": order, "loadavg": _loadavg()}
            for side in order:
                time.sleep(args.pause)
                result[side] = run_wrk(servers[side], args.duration, args)
            if args.latency_rate:
                for side in order:
                    time.sleep(args.pause)
                    result[side]["paced"] = run_wrk(servers[side], args.duration, args, paced=True)
            ratios = " ".join(
                f"{side}/bare {result[side]['rps'] / result['bare']['rps']:.3f}"
                for side in sides
                if side != "bare"
            )
            print(
                f"{tag} round {index + 1}/{args.rounds} ({'→'.join(order)}): "
                + " | ".join(f"{side} {_brief(result[side])}" for side in sides)
                + f" | {ratios}",
                flush=True,
            )
            rounds.append(result)
        return {
            "backend": backend.name,
            "strategy": backend.strategy,
            "tier": backend.tier,
            "notes": backend.notes,
            "sides": sides,
            "rounds": rounds,
            "summary": summarise(rounds, sides),
        }
    finally:
        for srv in servers.values():
            srv.stop()


# -- report ----------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cmd(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "-"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "-"


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    cpu_model = "-"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "nproc": _cmd("nproc") or str(os.cpu_count()),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": " ".join((_cmd("wrk", "--version").splitlines() or ["-"])[0].split()[:2])
        if shutil.which("wrk")
        else "-",
        "loadavg_at_start": _loadavg(),
        "git_commit": _cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_cmd("git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "examples")),
        "packages": {
            p: _version(p)
            for p in (
                "fastapi-tenancy",
                "fastapi",
                "starlette",
                "uvicorn",
                "sqlalchemy",
                "asyncpg",
                "aiosqlite",
                "uvloop",
                "httptools",
            )
        },
    }
    return facts


def label(res: dict[str, Any]) -> str:
    """`postgres/rls`, `postgres/hybrid (rls tier)`, ...; older results name the backend only."""
    strategy = res.get("strategy") or {"postgres": "schema", "sqlite": "file"}.get(res["backend"], "?")
    tier = f" ({res['tier']} tier)" if res.get("tier") else ""
    return f"{res['backend']}/{strategy}{tier}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend/strategy | side | req/s (median) | req/s (min-max) | p50 ms | p99 ms | server CPU µs/req "
        "| server CPU busy | req/s ratio to bare | fixed load: p50 / p99 ms | p99 ratio at fixed load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        s = res["summary"]
        for side in res["sides"]:
            x = s[side]
            ratio = paced_ratio = ""
            if side in s["vs_bare"]:
                v = s["vs_bare"][side]
                ratio = f"**{v['ratio_median']:.3f}** ({v['ratio_min']:.3f}-{v['ratio_max']:.3f})"
                paced_ratio = (
                    f"**{v['paced_p99_ratio_median']:.2f}**" if "paced_p99_ratio_median" in v else "-"
                )
            paced = x.get("paced")
            at_load = "-" if paced is None else f"{paced['p50_ms_median']:.2f} / {paced['p99_ms_median']:.2f}"
            cpu, busy = x["cpu_us_per_request_median"], x["server_cpu_utilisation_median"]
            lines.append(
                f"| {label(res)} | {side} | {x['rps_median']:.0f} "
                f"| {x['rps_min']:.0f}-{x['rps_max']:.0f} | "
                f"{x['p50_ms_median']:.2f} | {x['p99_ms_median']:.2f} | "
                f"{'-' if cpu is None else f'{cpu:.0f}'} | {'-' if busy is None else f'{busy:.0%}'} "
                f"| {ratio} | {at_load} | {paced_ratio} |"
            )
    return "\n".join(lines)


def _extra_line(res: dict[str, Any]) -> str:
    s = res["summary"]
    parts = []
    for side, v in s["vs_bare"].items():
        cpu = (
            f" and {v['extra_cpu_us_per_request_median']:.0f} µs of server CPU"
            if "extra_cpu_us_per_request_median" in v
            else ""
        )
        parts.append(
            f"{side} adds about {v['extra_us_per_request_median']:.0f} µs of server time "
            f"(1/rps({side}) - 1/rps(bare)){cpu} per request"
        )
    if "tenancy_vs_baseline_ratio_median" in s:
        parts.append(f"tenancy/baseline req/s {s['tenancy_vs_baseline_ratio_median']:.3f}")
    starved = (
        f" {s['starved_rounds']} of {len(res['rounds'])} rounds had a server below 90 % CPU busy "
        "(starved by other load on the machine)."
        if s.get("starved_rounds")
        else ""
    )
    return f"- {label(res)}: {'; '.join(parts)} (medians over rounds). {res['notes']}.{starved}"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    extra = "\n".join(_extra_line(r) for r in report["results"])
    baseline = (
        f"\nSide `baseline` is the same tenancy app importing fastapi_tenancy from `{s['baseline_src']}`"
        f"{' (' + s['baseline_label'] + ')' if s.get('baseline_label') else ''}."
        if s.get("baseline_src")
        else ""
    )
    return f"""# Tenancy overhead per request

Generated by `benchmarks/overhead.py` on {report["date"]}.

`GET /orders` ({s["orders"]} rows) with `X-Tenant-ID: {TENANT}`: the Quick Start app
(`examples/quickstart/main.py`, header resolution; `benchmarks/tenancy_app.py`, the same
app configured by `TENANCY_*` variables, for strategies other than schema) against the same
route with no tenancy (`benchmarks/bare_app.py`, plain `async_sessionmaker` on the storage
holding the tenant's rows: see each row's note below and the docstring of `overhead.py`).
A second tenant's rows sit beside them. One uvicorn worker each; rounds alternate A/B,
B/A.{baseline}

{table(report["results"])}

Medians over rounds; the ratio is the median of per-round ratios (min-max in brackets).
req/s and the first p50/p99 come from runs as fast as the server goes ({s["connections"]}
connections: latency there is mostly time queued behind other requests); the fixed-load
latencies from paced runs right after each round's, {s.get("latency_connections", "-")}
connections at about {s.get("latency_rate", "-")} req/s in all, well below saturation, where a
request's latency is its own.
"Server CPU" is the uvicorn process's user+system CPU time (from /proc, all threads): per
request served, and as a share of the run's wall time. Near 100 % busy, the server is
CPU-bound and req/s is the inverse of its CPU cost per request.

{extra}

## Settings

- rounds {s["rounds"]} × {s["duration"]} s per side, warm-up {s["warmup"]} s per side, pause {s["pause"]} s
- wrk: {s["threads"]} thread(s), {s["connections"]} connections, keep-alive
- servers pinned to CPU {s["server_cpu"]}, wrk to CPU {s["load_cpu"]} (None: not pinned)
- uvicorn: 1 worker, `--loop {s["loop"]} --http {s["http"]}`, `--log-level warning --no-access-log`

## Machine

- nproc {m["nproc"]} ({m["cpu_model"]}), kernel {m["kernel"]}, load average at start {m["loadavg_at_start"]}
- Python {m["python"]}; {pkgs}
- {m["wrk"]}; PostgreSQL: {m.get("postgres_version", "-")}
- git {m["git_commit"]}{" (src/examples modified)" if m["git_dirty"] else ""}

Shared, noisy machine: compare the ratio, not the absolute req/s, across runs.
"""


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    has = importlib.util.find_spec
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated: schema, schema-roles, database, rls, hybrid (PostgreSQL), sqlite (a file "
        "per tenant)",
    )
    parser.add_argument(
        "--backends",
        default="postgres,sqlite",
        help="comma-separated: postgres (its strategies among --strategies), sqlite",
    )
    parser.add_argument(
        "--hybrid-tier",
        choices=["rls", "schema", "database"],
        default="rls",
        help="the tier of the tenant with --strategies hybrid (default: rls, the default tier)",
    )
    parser.add_argument(
        "--db-prefix",
        default=DB_NAME,
        help="prefix of the run's databases and roles (<prefix>_<strategy>, <prefix>_owner, ...)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (each runs both sides)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per side per round")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per side")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each run")
    # 16: fewer than the apps' pools hold (10 + 10), so no request waits for a connection.
    parser.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections")
    add_latency_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--orders", type=int, default=10, help="orders seeded for the tenant")
    parser.add_argument(
        "--server-cpu", type=int, default=0, help="CPU the servers are pinned to (-1: no pinning)"
    )
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU wrk is pinned to (-1: no pinning)")
    parser.add_argument("--loop", default="uvloop" if has("uvloop") else "asyncio")
    parser.add_argument("--http", default="httptools" if has("httptools") else "h11")
    parser.add_argument("--pg-base", default=os.environ.get("TENANCY_BENCH_POSTGRES_URL", DEFAULT_PG_BASE))
    parser.add_argument("--maintenance-db", default="postgres", help="database to connect to for CREATE/DROP")
    parser.add_argument("--output-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--baseline-label", default="", help="a note on what --baseline-src is")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run the Quick Start with fastapi_tenancy imported from this directory "
        "(e.g. the src/ of an older checkout), as side 'baseline'",
    )
    args = parser.parse_args(argv)
    for opt in ("server_cpu", "load_cpu"):
        if getattr(args, opt) < 0 or (os.cpu_count() or 1) < 2:
            setattr(args, opt, None)
    if args.baseline_src is not None:
        args.baseline_src = args.baseline_src.resolve()
        if not (args.baseline_src / "fastapi_tenancy" / "__init__.py").exists():
            parser.error(f"--baseline-src {args.baseline_src} holds no fastapi_tenancy package")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"postgres", "sqlite"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies: {', '.join(sorted(unknown))}; use {', '.join(STRATEGIES)}")
    args.strategies = [
        name for name in strategies if ("sqlite" if name == "sqlite" else "postgres") in args.backends
    ]
    if not args.strategies:
        parser.error("--strategies and --backends leave nothing to measure")
    if re.fullmatch(r"[a-z][a-z0-9_]{0,20}", args.db_prefix) is None:
        parser.error("--db-prefix: 1-21 lower-case letters, digits or '_', starting with a letter")
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads:
        parser.error("need --rounds >= 1, --duration > 0 and --connections >= --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench_overhead_logs_"))
    facts = machine_facts(args)
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for name in args.strategies:
            cleanups: list[Callable[[], object]] = []
            try:
                if name == "sqlite":
                    backend = asyncio.run(setup_sqlite(args, cleanups))
                else:
                    if "postgres_version" not in facts:
                        rows = asyncio.run(
                            pg_admin(args.pg_base.rstrip("/"), args.maintenance_db, "SELECT version()")
                        )
                        facts["postgres_version"] = rows[0][0][0].split(" on ")[0]
                    backend = asyncio.run(setup_postgres(args, cleanups, name))
                results.append(compare(backend, args, logs))
            except Exception as exc:  # report and go on with the next backend
                failed = True
                print(f"[{name}] FAILED: {exc}", file=sys.stderr, flush=True)
            finally:
                _stop_all()
                for cleanup in cleanups:
                    try:
                        cleanup()
                    except Exception as exc:
                        print(f"[{name}] cleanup failed: {exc}", file=sys.stderr)
    finally:
        _stop_all()
    if not results:
        print(f"no results; server logs in {logs}", file=sys.stderr)
        return 1
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_base"}
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": settings,
        "machine": facts,
        "results": results,
    }
    (args.output_dir / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "overhead.md").write_text(markdown(report))
    print()
    print(table(results))
    for r in results:
        print(_extra_line(r))
    print(f"\nwrote {args.output_dir / 'overhead.json'} and {args.output_dir / 'overhead.md'}")
    if not failed:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"server logs kept in {logs}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
