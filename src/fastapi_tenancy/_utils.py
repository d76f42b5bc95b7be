"""Private helpers shared by the store and the isolation strategies."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from .errors import MissingDependencyError, TenancyUnavailableError

_DRIVER_EXTRAS = {
    "asyncpg": ("asyncpg", "postgres"),
    "aiosqlite": ("aiosqlite", "sqlite"),
    "aiomysql": ("aiomysql", "mysql"),
    "asyncmy": ("asyncmy", "mysql"),
}


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
) -> AsyncEngine:
    """Create an async engine, naming the pip extra when its driver is missing."""
    options: dict[str, Any] = {"echo": echo, "pool_pre_ping": pool_pre_ping}
    if is_memory_sqlite(url):
        # One shared connection: every new connection to :memory: is a new, empty database.
        options["poolclass"] = StaticPool
    else:
        options.update(
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
        )
    try:
        return create_async_engine(url, **options)
    except ImportError as exc:
        driver = make_url(url).get_driver_name()
        package, extra = _DRIVER_EXTRAS.get(driver, (driver, "all"))
        raise MissingDependencyError(package, extra) from exc


# Errors that mean "the database is not reachable right now" rather than "this
# statement is wrong": they become a clear 503, never a 500 or a wrong answer.
# The middleware maps these when an app raises them; around our own database
# calls (`unavailable_as_503`) any OSError or timeout counts too.
DB_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    ConnectionError,
)
UNAVAILABLE = (*DB_UNAVAILABLE, TimeoutError, OSError)


@asynccontextmanager
async def unavailable_as_503(what: str) -> AsyncIterator[None]:
    """Translate connection-level driver errors into `TenancyUnavailableError`."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise TenancyUnavailableError(f"{what} unavailable: {type(exc).__name__}") from exc
