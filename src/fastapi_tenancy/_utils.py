"""Private helpers shared by the store, the isolation strategies, the middleware and the OpenAPI schema."""

import errno
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .errors import MissingDependencyError, TenancyUnavailableError
from .pool import HandOffPool, MemoryPool

_DRIVER_EXTRAS = {
    "asyncpg": ("asyncpg", "postgres"),
    "aiosqlite": ("aiosqlite", "sqlite"),
    "aiomysql": ("aiomysql", "mysql"),
    "asyncmy": ("asyncmy", "mysql"),
}


def _unique_statement_name() -> str:
    return f"__ft_{uuid.uuid4().hex}__"


def is_memory_sqlite(url: str) -> bool:
    """True for a SQLite URL that names no file (an in-memory database)."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def create_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    pool_timeout: float = 30.0,
    pool_recycle: int = 1800,
    pool_pre_ping: bool = False,
    echo: bool = False,
    pgbouncer: bool = False,
    empty_search_path: bool = False,
    null_pool: bool = False,
    **options: Any,
) -> AsyncEngine:
    """Create an async engine, naming the pip extra when its driver is missing.

    `null_pool=True` opens a connection per checkout (for one-off admin work);
    other `options` go to `create_async_engine` as they are.
    """
    options.update(echo=echo, pool_pre_ping=pool_pre_ping)
    connect_args: dict[str, Any] = options.setdefault("connect_args", {})
    if empty_search_path:
        # A startup parameter, so free per request: every connection starts with no
        # schema on its search_path, and an unqualified name fails instead of
        # resolving in `public` (see isolation/schema.py).
        connect_args["server_settings"] = {"search_path": ""}
    if pgbouncer:
        # Behind PgBouncer in transaction mode a client connection's next transaction
        # may run on another server connection: no statement may outlive its
        # transaction, and names must not collide between clients sharing a server.
        connect_args.update(
            statement_cache_size=0,
            prepared_statement_cache_size=0,
            prepared_statement_name_func=_unique_statement_name,
        )
    if is_memory_sqlite(url):
        # One connection, since every new connection to :memory: is a new, empty database,
        # never recycled (that would empty it too). Shared-cache memory databases would
        # allow several, but SQLite then refuses concurrent writers ("database table is
        # locked") instead of making them wait.
        options.update(poolclass=MemoryPool, pool_size=1, max_overflow=0, pool_timeout=pool_timeout)
    elif null_pool:
        options["poolclass"] = NullPool
    else:
        # The library's pool also refuses connections the driver knows are closed
        # (`HandOffPool.discard_closed`); a caller's pool class is left as it is.
        options.setdefault("poolclass", HandOffPool)
        options.update(
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
        )
    try:
        engine = create_async_engine(url, **options)
    except ImportError as exc:
        driver = make_url(url).get_driver_name()
        package, extra = _DRIVER_EXTRAS.get(driver, (driver, "all"))
        raise MissingDependencyError(package, extra) from exc
    return engine


# SQLSTATEs saying the server or the connection is gone, not that the statement is
# wrong: class 08 (connection exception, e.g. "connection was closed in the middle of
# operation"), 57P01-57P03 (admin shutdown, crash shutdown, "the database system is
# starting up") and 53300 (too many connections). SQLAlchemy does not flag all of them
# as disconnects, notably when they happen on connect or during a rollback.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
_QUERY_CANCELED = "57014"  # statement_timeout (or an operator's pg_cancel_backend)

# MySQL/MariaDB error codes (pymysql's CR and ER constants, which aiomysql raises too;
# asyncmy uses the same numbers) that SQLAlchemy's MySQL `is_disconnect` leaves out
# because no open connection broke: the connect itself failed (2002 CR_CONNECTION_ERROR,
# 2003 CR_CONN_HOST_ERROR, raised for a refused connect and an unknown host alike), or
# the server refused to serve (1040 ER_CON_COUNT_ERROR, 1203
# ER_TOO_MANY_USER_CONNECTIONS, 1053 ER_SERVER_SHUTDOWN). A broken connection (2006
# server gone, 2013 lost, 2055, 1927 killed, 4031 idle timeout...) SQLAlchemy already
# knows: it comes here as `connection_invalidated`, and its list is not repeated.
_OUTAGE_MYSQL_CODES = frozenset({1040, 1053, 1203, 2002, 2003})
_MYSQL_DRIVERS = ("pymysql", "aiomysql", "asyncmy", "MySQLdb")

# errno values of a socket that could not reach the server or lost it.
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EADDRNOTAVAIL,
    }
)


def _sqlstate(exc: sa_exc.DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def _mysql_code(exc: sa_exc.DBAPIError) -> int | None:
    orig = exc.orig
    if type(orig).__module__.partition(".")[0] not in _MYSQL_DRIVERS:
        return None  # SQLite's and PostgreSQL's errors carry no such number
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    if not isinstance(exc, OSError):
        return False
    # asyncio's create_connection raises one plain OSError, with no errno, when every
    # address of the host refused ("localhost": ::1 and 127.0.0.1).
    return exc.errno in _NETWORK_ERRNOS or (exc.errno is None and str(exc).startswith("Multiple exceptions"))


def is_outage(exc: BaseException) -> bool:
    """True when an error means the database is unreachable right now.

    Such errors become a clear 503. A statement's own mistake does not count,
    even where the driver calls it "operational" (SQLite's "no such table", a
    MySQL syntax error): it stays an error of the code that ran it. A dropped
    connection (SQLAlchemy marks it `connection_invalidated`, or the server's
    SQLSTATE or MySQL error code says so), a server shutting down or starting
    up, a refused connect, an unknown host, too many connections or an
    exhausted pool count.
    """
    if isinstance(exc, sa_exc.DBAPIError):
        return (
            exc.connection_invalidated
            or _sqlstate(exc).startswith(_OUTAGE_SQLSTATES)
            or _mysql_code(exc) in _OUTAGE_MYSQL_CODES
        )
    return isinstance(exc, sa_exc.TimeoutError) or _is_network_error(exc)


def is_result_type_change(exc: BaseException) -> bool:
    """True when PostgreSQL refused a cached statement whose result type changed.

    Its tables changed since it was prepared (a migration, or another tenant's
    schema with types of its own): retrying prepares it again.
    """
    return isinstance(exc, sa_exc.DBAPIError) and type(exc.orig).__name__ == "InvalidCachedStatementError"


def is_query_timeout(exc: BaseException) -> bool:
    """True when the server cancelled a statement: `statement_timeout` ran out (SQLSTATE 57014)."""
    return isinstance(exc, sa_exc.DBAPIError) and _sqlstate(exc) == _QUERY_CANCELED


def is_deadlock(exc: BaseException) -> bool:
    """True when the server broke a deadlock by failing this transaction: retrying it succeeds.

    PostgreSQL's SQLSTATE 40P01, MySQL/MariaDB's 1213 (and its lock wait timeout, 1205).
    """
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    return _sqlstate(exc) == "40P01" or _mysql_code(exc) in (1205, 1213)


@asynccontextmanager
async def unavailable_as_503(what: str) -> AsyncIterator[None]:
    """Translate connection-level driver errors into `TenancyUnavailableError`."""
    try:
        yield
    except Exception as exc:
        if not is_outage(exc):
            raise
        raise TenancyUnavailableError(f"{what} unavailable: {type(exc).__name__}") from exc


async def create_tables(engine: AsyncEngine, create: Callable[[Connection], None], what: str) -> None:
    """Run `create` (DDL that checks first) in a transaction, again if another process raced it.

    Processes started together on an empty database (`uvicorn --workers 4`) all find a
    table missing and all create it; every one but the first then fails with a duplicate
    (PostgreSQL: a unique violation in the catalog; MySQL: "table already exists"). Run
    again, the check finds the tables the others made. A failure that is not such a race
    repeats, and is raised after the last attempt; an outage is a 503 at once.
    """
    for attempt in range(_DDL_ATTEMPTS):
        try:
            async with unavailable_as_503(what), engine.begin() as conn:
                await conn.run_sync(create)
            return
        except (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError):
            if attempt == _DDL_ATTEMPTS - 1:
                raise


# One per table a process can lose the race for (registry, settings, domains, audit log).
_DDL_ATTEMPTS = 5


def redis_client(url: str, *, timeout: float = 1.0) -> Any:
    """A `redis.asyncio.Redis` for `url` that gives up after `timeout` seconds.

    Imported here, not at the top: `redis` is an optional extra, and the package
    root must import without it. Short timeouts matter: a Redis that hangs must
    turn into a quick 503 or a fallback, not into requests that hang with it.
    """
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError as exc:
        raise MissingDependencyError("redis", "redis") from exc
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # A connection idle this long is PINGed before use; the pub/sub listener thereby
        # notices within seconds a connection that died without a reset.
        health_check_interval=5,
        decode_responses=True,
        # One immediate retry on a broken connection (a pooled one that a Redis restart
        # closed), none on a timeout, and no backoff: the caller has a fallback (fail
        # open, the backend store, a 503), and a request must not sleep in a retry loop.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def path_prefixes(paths: Iterable[str]) -> tuple[str, ...]:
    """Paths as `excluded_paths` takes them: each starts with `/`, a trailing `/` is dropped."""
    normalised = set()
    for path in paths:
        if not path.startswith("/"):
            raise ValueError(f"excluded path {path!r} must start with '/'")
        normalised.add(path.rstrip("/") or "/")
    return tuple(sorted(normalised))


def path_covers(prefix: str, path: str) -> bool:
    """Whether `prefix` covers `path` by whole segments, as `excluded_paths` do.

    `/health` covers `/health` and `/health/live`, not `/healthz`; `/` covers nothing
    but itself. `prefix` is normalised (`path_prefixes`: no trailing `/`).
    """
    return path == prefix or (prefix != "/" and path.startswith(prefix + "/"))
