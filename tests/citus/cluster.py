"""A Citus cluster for the tests: a coordinator and two workers, each its own PostgreSQL.

`tests/conftest.py` starts one per test session (`citus_cluster`) and gives each test
that asks for `citus_url` a database of its own on it.

Citus (a test dependency only, never vendored) is built into the machine's PostgreSQL by
`../shared/citus/install.sh` when it is missing, and `../shared/citus/cluster.sh` starts
the nodes on spare ports (`wal_level=logical`, so that tenants move online) and stops them
when the session ends. Each test gets a database of its own on every node, with the
extension and the workers added (`citus_database`). Without Citus (it cannot be installed
here) the tests skip with the reason, unless TENANCY_TEST_REQUIRE_SERVICES=1 (CI), where
they fail. TENANCY_TEST_CITUS_DIR names another directory holding the two scripts.
"""

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[2]
# Beside the checkout (../shared/citus), or beside the directory of a git worktree.
SCRIPTS = Path(
    os.environ.get("TENANCY_TEST_CITUS_DIR")
    or next(
        (d for d in (ROOT.parent / "shared" / "citus", ROOT.parents[1] / "shared" / "citus") if d.is_dir()),
        ROOT.parent / "shared" / "citus",
    )
)
WORKERS = 2


@dataclass(frozen=True)
class Cluster:
    """A running coordinator (`port`) and its workers (`port + 1` ...), all on 127.0.0.1."""

    port: int
    workers: int

    @property
    def worker_ports(self) -> list[int]:
        return [self.port + i for i in range(1, self.workers + 1)]

    @property
    def ports(self) -> list[int]:
        return [self.port, *self.worker_ports]


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"Citus is required (TENANCY_TEST_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(f"Citus is not available: {reason}")


def _pkglibdir() -> Path | None:
    pg_config = Path("/usr/lib/postgresql/15/bin/pg_config")
    binary = str(pg_config) if pg_config.exists() else shutil.which("pg_config")
    if binary is None:
        return None
    return Path(
        subprocess.run([binary, "--pkglibdir"], capture_output=True, text=True, check=True).stdout.strip()
    )


def _ensure_installed() -> None:
    libdir = _pkglibdir()
    if libdir is None:
        _unavailable("no PostgreSQL server development setup (pg_config) on this machine")
        return
    if (libdir / "citus.so").exists():
        return
    install = SCRIPTS / "install.sh"
    if not install.exists():
        _unavailable(f"citus.so is not in {libdir}, and there is no {install} to build it")
    if os.geteuid() != 0:
        _unavailable(f"citus.so is not in {libdir}; run {install} as root")
    result = subprocess.run([str(install)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not (libdir / "citus.so").exists():
        _unavailable(f"{install} failed: {(result.stdout + result.stderr)[-2000:]}")


def _free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are all free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65_000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports for the Citus nodes")


@contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Citus installed if missing, then one coordinator and two workers, stopped on exit."""
    _ensure_installed()
    if os.geteuid() != 0:
        _unavailable("cluster.sh runs the nodes as the postgres user, so the tests must run as root")
    workdir = Path(tempfile.mkdtemp(prefix="ft-citus-")) / "nodes"
    os.chmod(workdir.parent, 0o755)  # the nodes run as postgres, which must reach their directory
    port = _free_ports(WORKERS + 1)
    script = str(SCRIPTS / "cluster.sh")
    started = subprocess.run(
        [script, "start", str(workdir), str(port), str(WORKERS)], capture_output=True, text=True, timeout=300
    )
    try:
        if started.returncode != 0:
            _unavailable(f"cluster.sh start failed: {started.stderr[-2000:]}")
        yield Cluster(port, WORKERS)
    finally:
        subprocess.run([script, "stop", str(workdir)], capture_output=True, timeout=120)
        shutil.rmtree(workdir.parent, ignore_errors=True)


async def _admin(port: int, database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=database, timeout=10)


async def _with_citus(port: int, name: str) -> None:
    conn = await _admin(port)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await _admin(port, name)
    try:
        await conn.execute("CREATE EXTENSION citus")
        # cluster.sh turns synchronous_commit off for speed. Citus waits for a moving shard's
        # copy to catch up to pg_current_wal_lsn(), the WAL *written*, which an asynchronous
        # commit may not have reached yet: writes committed in that window would be lost.
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit TO on')
        # Moving a row-level security tenant splits its shard online with Citus' own logical
        # decoding plugin, which PostgreSQL releases with this setting refuse unless listed.
        plugins = await conn.fetchval("SELECT current_setting('output_plugin_libraries', true)")
        if plugins is not None and "citus" not in plugins.split(", "):
            await conn.execute(f"ALTER SYSTEM SET output_plugin_libraries = {plugins}, citus")
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def create_database(cluster: Cluster, name: str) -> str:
    """Database `name` on every node, with Citus, its workers added; the coordinator's URL."""
    await asyncio.gather(*(_with_citus(port, name) for port in cluster.ports))
    conn = await _admin(cluster.port, name)
    try:
        await conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', $1)", cluster.port)
        for worker in cluster.worker_ports:
            await conn.execute("SELECT citus_add_node('127.0.0.1', $1)", worker)
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{cluster.port}/{name}"


async def _drop(port: int, name: str) -> None:
    conn = await _admin(port)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def drop_database(cluster: Cluster, name: str) -> None:
    await asyncio.gather(*(_drop(port, name) for port in cluster.ports))


class ExtraNode:
    """One more PostgreSQL with Citus (as cluster.sh makes its nodes), to add to the cluster,
    stop and start again; `remove()` stops it and deletes its files."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        self.port = _free_ports(1)
        self.workdir = Path(tempfile.mkdtemp(prefix="ft-citus-node-"))
        os.chmod(self.workdir, 0o777)
        self.data = self.workdir / "data"
        self._as_postgres(f"{self.BIN}/initdb -D {self.data} -A trust -U postgres")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.workdir}'\n"
                "shared_preload_libraries = 'citus'\nwal_level = logical\nmax_connections = 200\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    @staticmethod
    def _as_postgres(command: str) -> None:
        done = subprocess.run(["su", "postgres", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        self._as_postgres(f"{self.BIN}/pg_ctl -D {self.data} -l {self.workdir}/log -w start")

    def stop(self) -> None:
        self._as_postgres(f"{self.BIN}/pg_ctl -D {self.data} -m immediate -w stop")

    async def create_database(self, name: str) -> None:
        await _with_citus(self.port, name)

    def remove(self) -> None:
        subprocess.run(
            ["su", "postgres", "-c", f"{self.BIN}/pg_ctl -D {self.data} -m immediate -w stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.workdir, ignore_errors=True)


async def coordinator(url: str) -> asyncpg.Connection:
    """A superuser connection to the coordinator database of `url` (a `citus_url`)."""
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port, user="postgres", database=parsed.database
    )


async def distributed_schemas(conn: asyncpg.Connection) -> set[str]:
    """The names of the distributed schemas, as the coordinator's metadata has them."""
    rows = await conn.fetch(
        "SELECT n.nspname FROM pg_dist_schema s JOIN pg_namespace n ON n.oid = s.schemaid"
    )
    return {r["nspname"] for r in rows}
