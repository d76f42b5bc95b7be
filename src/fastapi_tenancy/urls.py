"""Database URLs: the async driver each backend is used through, and masking for logs."""

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["mask_url", "normalise_database_url"]

# The async driver we use for each backend; a URL naming the bare backend (or a
# sync driver) is normalised to it once, here.
_ASYNC_DRIVERS = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
_OTHER_ASYNC_DRIVERS = {"mysql": ("asyncmy",), "mariadb": ("asyncmy",)}


def normalise_database_url(url: str) -> str:
    """Return `url` with the async driver this library uses for its backend.

    `postgresql://` becomes `postgresql+asyncpg://`, `sqlite://` becomes
    `sqlite+aiosqlite://`, `mysql://` becomes `mysql+aiomysql://`. Raises
    `ValueError` for an unparsable URL or a backend we do not support.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError("not a database URL (expected e.g. postgresql+asyncpg://...)") from exc
    backend, _, driver = parsed.drivername.partition("+")
    backend = {"postgres": "postgresql"}.get(backend, backend)
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported database backend {backend!r}; use one of {sorted(_ASYNC_DRIVERS)}")
    if driver not in (_ASYNC_DRIVERS[backend], *_OTHER_ASYNC_DRIVERS.get(backend, ())):
        parsed = parsed.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
    return parsed.render_as_string(hide_password=False)


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by `***` (for logs and reprs)."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        return "***"
    return parsed.render_as_string(hide_password=True)
