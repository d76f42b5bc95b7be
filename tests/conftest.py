"""Fixtures for real servers: a fresh PostgreSQL or MySQL database per test, or a SQLite file;
and managers started on them.

Server URLs come from TENANCY_TEST_POSTGRES_URL and TENANCY_TEST_MYSQL_URL (local
defaults below). Without the server a test skips with the reason, unless
TENANCY_TEST_REQUIRE_SERVICES=1 (CI), where it fails.
"""

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager

from .apps import Base, Order

if TYPE_CHECKING:
    from .citus.cluster import Cluster
    from .servers import OwnRedis

POSTGRES_URL = os.environ.get(
    "TENANCY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("TENANCY_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")
REQUIRE_SERVICES = os.environ.get("TENANCY_TEST_REQUIRE_SERVICES") == "1"

_reachable: dict[str, str | None] = {}


async def _postgres_admin(url: str) -> Any:
    import asyncpg

    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database=parsed.database or "postgres",
        timeout=5,
    )


async def _mysql_admin(url: str) -> Any:
    import aiomysql

    parsed = make_url(url)
    return await aiomysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        autocommit=True,
        connect_timeout=5,
    )


async def _require(name: str, connect: Callable[[], Awaitable[Any]]) -> None:
    """Skip (or, with TENANCY_TEST_REQUIRE_SERVICES=1, fail) when `name` is not reachable."""
    if name not in _reachable:
        try:
            conn = await connect()
            result = conn.close()
            if asyncio.iscoroutine(result):
                await result
            _reachable[name] = None
        except Exception as exc:  # any failure to connect means "not reachable"
            _reachable[name] = f"{type(exc).__name__}: {exc}"
    _skip_unless_reachable(name)


def _skip_unless_reachable(name: str) -> None:
    reason = _reachable[name]
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (TENANCY_TEST_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(f"{name} not reachable: {reason}")


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """The URL of a brand-new, empty PostgreSQL database, dropped after the test."""
    await _require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL))
    name = f"ft_{uuid.uuid4().hex[:12]}"
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def mysql_url() -> AsyncIterator[str]:
    """The URL of a brand-new, empty MySQL/MariaDB database, dropped after the test."""
    await _require("MySQL", lambda: _mysql_admin(MYSQL_URL))
    name = f"ft_{uuid.uuid4().hex[:12]}"
    admin = await _mysql_admin(MYSQL_URL)
    try:
        async with admin.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        admin.close()
    yield make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    admin = await _mysql_admin(MYSQL_URL)
    try:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a SQLite registry file in a fresh directory."""
    yield f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pgbouncer_setup(postgres_url: str, port: int, pool_size: int = 1) -> tuple[str, Path]:
    """The pgbouncer binary and a work directory holding its config, auth file and log."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        if REQUIRE_SERVICES:
            pytest.fail("pgbouncer is required (TENANCY_TEST_REQUIRE_SERVICES=1): not installed")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    target = make_url(postgres_url)
    # Not under pytest's tmp_path: its parents are private to root, and PgBouncer
    # refuses to run as root, so it runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="ft-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{target.username}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={target.host} port={target.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 200
query_wait_timeout = 20
ignore_startup_parameters = extra_float_digits
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
"""
    )
    for path in (workdir, *workdir.iterdir()):
        os.chmod(path, 0o777 if path.is_dir() else 0o644)
    return binary, workdir


@pytest.fixture
async def pgbouncer_url(postgres_url: str) -> AsyncIterator[str]:
    """`postgres_url` through a PgBouncer of our own in transaction mode, one server connection.

    Debian's pgbouncer (.ci/run installs it when missing), on a spare loopback
    port, stopped after the test.
    """
    async with running_pgbouncer(postgres_url) as url:
        yield url


@asynccontextmanager
async def running_pgbouncer(
    postgres_url: str, users: tuple[str, ...] = (), *, pool_size: int = 1
) -> AsyncIterator[str]:
    """Start a PgBouncer in front of `postgres_url` that also admits the roles `users`.

    `pool_size` server connections per database and user (one by default).
    """
    port = _free_port()
    binary, workdir = _pgbouncer_setup(postgres_url, port, pool_size)
    with (workdir / "users.txt").open("a") as auth_file:
        auth_file.writelines(f'"{user}" ""\n' for user in users)
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    process = await asyncio.create_subprocess_exec(binary, *user, str(workdir / "pgbouncer.ini"))
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                assert process.returncode is None, "pgbouncer exited; see its log in " + str(workdir)
                await asyncio.sleep(0.05)
        yield make_url(postgres_url).set(port=port).render_as_string(hide_password=False)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


REDIS_URL = os.environ.get("TENANCY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _redis_admin(url: str) -> Any:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=5)
    await client.ping()
    return client


def require_redis() -> str:
    """The URL of the shared Redis; skips (or, in CI, fails) the test when it is down."""
    if "Redis" not in _reachable:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        try:
            client.ping()
            _reachable["Redis"] = None
        except redis.RedisError as exc:
            _reachable["Redis"] = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
    _skip_unless_reachable("Redis")
    return REDIS_URL


@pytest.fixture
def redis_url() -> str:
    """The URL of the shared Redis; use `redis_prefix` or `unique` for keys (others use it at
    the same time).

    Synchronous, so that async fixtures can ask for it with `getfixturevalue`.
    """
    return require_redis()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted after the test."""
    prefix = f"ft-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = await _redis_admin(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- managers ------------------------------------------------------------------------------


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[TenancyManager]:
    """A started manager with no tenant: the registry and each tenant in SQLite files."""
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    yield manager
    await manager.close()


@dataclass
class Tenants:
    manager: TenancyManager
    url: str


# Two tenants with overlapping primary keys: id 1 exists in both.
ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


@pytest.fixture
async def tenants(postgres_url: str) -> AsyncIterator[Tenants]:
    """A manager on PostgreSQL (a pool of one connection), tenants alpha and beta seeded."""
    config = TenancyConfig(database_url=postgres_url, database_pool_size=1, database_max_overflow=0)
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            tenant = await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
            async with manager.session(tenant) as session:
                session.add_all(Order(id=i, description=d) for i, d in rows.items())
                await session.commit()
        yield Tenants(manager, postgres_url)
    finally:
        await manager.close()


@pytest.fixture
def unique() -> str:
    """A name of this test's own (`ft-` and 12 hex digits), for cache prefixes and queues."""
    return f"ft-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def own_redis() -> AsyncIterator["OwnRedis"]:
    """A throwaway redis-server (never the shared one), which the test may kill and restart."""
    from .servers import OwnRedis  # servers.py imports this module

    redis = OwnRedis()
    await redis.start()
    try:
        yield redis
    finally:
        await redis.kill()
        shutil.rmtree(redis.workdir, ignore_errors=True)


# -- Citus ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator["Cluster"]:
    """One Citus cluster per test session (a coordinator and two workers): see tests/citus/cluster.py.

    Installs Citus (../shared/citus/install.sh) when it is missing; skips, or with
    TENANCY_TEST_REQUIRE_SERVICES=1 fails, when it cannot.
    """
    from .citus.cluster import running_cluster  # it imports this module

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def citus_url(citus_cluster: "Cluster") -> AsyncIterator[str]:
    """The coordinator's URL of a brand-new database on the session's cluster (Citus in it, the
    workers added), dropped from every node after the test."""
    from .citus.cluster import create_database, drop_database

    name = f"ft_{uuid.uuid4().hex[:12]}"
    try:
        yield await create_database(citus_cluster, name)
    finally:
        await drop_database(citus_cluster, name)
