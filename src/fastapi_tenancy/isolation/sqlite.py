"""`SQLiteFileIsolation`: one SQLite database file per tenant (the embedded default)."""

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event, util
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import ConnectionPoolEntry

from .._utils import create_engine, is_memory_sqlite, unavailable_as_503
from ..errors import ProvisioningError, TenancyUnavailableError, TenantNotFoundError
from ..pool import HandOffPool
from ..tenant import Tenant
from ._engines import EngineRegistry
from ._incarnation import create_marker, needs_marker
from ._watch import DirectoryWatch, watch
from .base import Isolation, create_tables, marker_name, tenant_tables

__all__ = ["SQLiteFileIsolation"]

_CROSSING_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


def _authorize(action: int, *_: Any) -> int:
    # A tenant connection may do anything inside its own file, but never ATTACH
    # another one: that would open the registry or another tenant's file.
    return sqlite3.SQLITE_DENY if action in _CROSSING_ACTIONS else sqlite3.SQLITE_OK


def _confine(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.run_async(lambda driver: driver.set_authorizer(_authorize))


_MARKERS = (
    "SELECT name FROM sqlite_master WHERE type = 'view' AND name LIKE 'fastapi\\_tenancy:%' ESCAPE '\\'"
)
_FILE = "fastapi_tenancy.file"  # record.info: the identity of the file a connection opened
_SEEN = "fastapi_tenancy.file_seen"  # record.info: the watch's count for it at the last check


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


@dataclass(frozen=True, slots=True)
class _TenantFile:
    """The file a tenant engine's connections must stay on (`_FilePool.file`)."""

    path: Path
    tenant_id: str
    watch: Callable[[], DirectoryWatch | None]


class _FilePool(HandOffPool):
    """The pool of a SQLite file's engine: it confines its connections to the file, and a
    tenant's (`file`) to that tenant's own file (_incarnation.py).

    Every connection refuses `ATTACH`. With `file` set, on connect a missing file is a
    503 (deleted, or being moved), not a 500, and a file that holds no marker of the
    tenant (made for another tenant under the same slug) is refused: one query per new
    connection. On checkout, a pooled connection whose file was deleted or replaced since
    it opened it (by another process: `destroy()` closes this process's own) is replaced:
    one `stat`, no query, and no `stat` either while the directory's watch has seen no
    entry of that name created, deleted or renamed since the connection's last check
    (_watch.py).

    Methods of the pool rather than engine event listeners: listeners on an engine keep
    objects of their own for the garbage collector to walk (collections, weak references,
    closures), and a process with a thousand tenant files open has a thousand engines.
    A tenant's engine with its connection was 81 tracked objects more than a plain
    SQLAlchemy engine with its connection, and is 34 now (tests/isolation/test_engines.py);
    a full collection walks all of them, and every request in flight waits it out.
    """

    file: _TenantFile | None = None
    discard_closed = False  # SQLite has no server to close a connection

    def recreate(self) -> "_FilePool":
        pool = cast(_FilePool, super().recreate())  # dispose() replaces the pool: keep the file
        pool.file = self.file
        return pool

    def _should_wrap_creator(self, creator: Any) -> Any:
        invoke = super()._should_wrap_creator(creator)

        def connect(record: Any) -> Any:
            file = self.file
            try:
                connection = invoke(record)
            except sqlite3.OperationalError as exc:
                if file is None or file.path.exists():
                    raise
                raise TenancyUnavailableError(f"database file {file.path.name!r} is gone") from exc
            try:
                _confine(connection, record)
                if file is not None:
                    _check_marker(connection, file)
                    record.info[_FILE] = _identity(file.path)
            except BaseException:
                with util.safe_reraise():
                    self._close_connection(connection, terminate=True)
            return connection

        return connect

    def _do_get(self) -> ConnectionPoolEntry:
        record = super()._do_get()
        file = self.file
        if file is None or record.dbapi_connection is None:
            return record  # none: it connects again when checked out, and is checked then
        watching = file.watch()
        seen = None if watching is None else watching.generation(file.path.name)
        if seen is not None and seen == record.info.get(_SEEN):
            return record  # nothing of that name changed in the directory since the last check
        if record.info.get(_FILE) != _identity(file.path):
            # Replaced when the checkout asks for its connection: a new one, checked on connect.
            record.invalidate(sa_exc.DisconnectionError(f"{file.path.name!r} was deleted or replaced"))
            return record
        record.info[_SEEN] = seen
        return record


def _check_marker(connection: Any, file: _TenantFile) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute(_MARKERS)
        found = [row[0] for row in cursor.fetchall()]
    finally:
        cursor.close()
    if found != [marker_name(file.tenant_id)]:
        raise TenantNotFoundError(f"{file.path.name!r} holds no marker of tenant {file.tenant_id!r}")


class SQLiteFileIsolation(Isolation):
    """Each tenant in its own SQLite file beside the registry: `app.tenant_acme_corp.db`.

    What both `isolation_strategy="schema"` and `"database"` mean on SQLite. A tenant
    session's engine opens only that tenant's file and refuses `ATTACH`, so neither other
    tenants nor the registry are reachable from it, even by raw SQL. Files are opened
    read-write without create (`mode=rw`): a tenant whose file is missing gets a 503,
    never a fresh empty database, and a file that holds no marker of the tenant is
    refused (`_incarnation.py`). At most `max_engines` files are kept open (an
    `EngineRegistry`: least recently used closed first, never under a request). An
    in-memory registry URL gives in-memory tenants, which are never closed (that would
    lose them). Safe for concurrent use.
    """

    def __init__(
        self, registry_url: str, *, prefix: str = "tenant_", max_engines: int = 100, echo: bool = False
    ):
        super().__init__(prefix)
        self._memory = is_memory_sqlite(registry_url)
        url = make_url(registry_url)
        self._driver = url.drivername
        database = Path(url.database or "tenancy.db")
        self.directory = database.parent.resolve()
        self._stem = database.name.removesuffix(".db")
        self._echo = echo
        self.engines = EngineRegistry(max_engines=None if self._memory else max_engines)
        self._watch: DirectoryWatch | None = None
        self._watched_loop: asyncio.AbstractEventLoop | None = None  # where watch() was last tried
        # One bound method for every tenant file (each access would make a new one).
        self._watch_reader: Callable[[], DirectoryWatch | None] = self._current_watch

    def path(self, tenant: Tenant) -> Path:
        """The database file of `tenant`."""
        return self.directory / f"{self._stem}.{self.storage_name(tenant.identifier)}.db"

    def _open(self, path: Path, mode: str, tenant_id: str | None = None) -> AsyncEngine:
        if self._memory:
            engine = create_engine(f"{self._driver}://", echo=self._echo)
            event.listen(engine.sync_engine, "connect", _confine)
        else:
            # A small pool per file: SQLite serialises writers anyway, and every
            # aiosqlite connection is a thread of its own.
            url = f"{self._driver}:///file:{path}?mode={mode}&uri=true"
            engine = create_engine(url, pool_size=2, max_overflow=8, echo=self._echo, poolclass=_FilePool)
            if tenant_id is not None:
                pool = cast(_FilePool, engine.sync_engine.pool)
                pool.file = _TenantFile(path, tenant_id, self._watch_reader)
        return engine

    def _current_watch(self) -> DirectoryWatch | None:
        return self._watch

    def _ensure_watch(self) -> None:
        # Once per event loop: a watch lives on the loop that reads its events.
        loop = asyncio.get_running_loop()
        if self._watched_loop is loop and (self._watch is None or self._watch.open):
            return
        if self._watch is not None:
            self._watch.close()
        self._watched_loop = loop
        self._watch = watch(self.directory) if self.directory.is_dir() else None

    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        if self._memory and tenant.id not in self.engines:
            # In memory, the engine is the tenant's database: none, no tenant here.
            raise TenantNotFoundError(f"no in-memory database of tenant {tenant.identifier!r}")
        if not self._memory:
            self._ensure_watch()
        return session_class(bind=self._engine(tenant), expire_on_commit=False)

    def _engine(self, tenant: Tenant) -> AsyncEngine:
        # Keyed by the tenant's id, never its slug: a slug deleted and registered again
        # is another tenant, with an engine (and, in memory, a database) of its own.
        if self._memory:
            return self.engines.get(tenant.id, lambda: self._open(Path(), "rw"))
        return self.engines.get(tenant.id, lambda: self._open(self.path(tenant), "rw", tenant.id))

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        tables = tenant_tables(metadata)
        if self._memory:
            if tenant.id in self.engines:
                raise ProvisioningError(f"in-memory database of {tenant.identifier!r} already exists")
            async with self._engine(tenant).begin() as conn:
                await conn.run_sync(create_tables, tables)
            return
        path = self.path(tenant)
        if path.exists():
            raise ProvisioningError(
                f"database file {path.name!r} already exists; refusing to hand its data to a new "
                "tenant (remove it, or purge the old tenant with destroy_data=True)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        engine = self._open(path, "rwc")
        try:
            async with unavailable_as_503("tenant database"), engine.begin() as conn:
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                await conn.run_sync(create_tables, tables)
                # Whose file this is: the tenant's connections check it (_incarnation.py).
                await conn.exec_driver_sql(create_marker(tenant.id))
        except BaseException as exc:
            # Whatever went wrong (even a cancellation), no file is left behind to
            # block a later registration of the slug.
            await asyncio.shield(engine.dispose())
            _unlink(path)
            if isinstance(exc, sa_exc.SQLAlchemyError):
                raise ProvisioningError(f"could not provision {path.name!r}: {exc}") from exc
            raise
        await engine.dispose()

    async def adopt(self, tenant: Tenant) -> bool:
        if self._memory:
            return False  # the engine is the database: nothing made outside the library
        path = self.path(tenant)
        if not path.exists():
            raise ProvisioningError(f"database file {path.name!r} does not exist: nothing to adopt")
        engine = self._open(path, "rw")
        try:
            async with unavailable_as_503("tenant database"), engine.begin() as conn:
                found = (await conn.scalars(sa.text(_MARKERS))).all()
                if not needs_marker(found, tenant.id, f"database file {path.name!r}"):
                    return False
                await conn.exec_driver_sql(create_marker(tenant.id))
        finally:
            await engine.dispose()
        return True

    async def destroy(self, tenant: Tenant) -> None:
        await self.engines.discard(tenant.id)
        if not self._memory:
            _unlink(self.path(tenant))

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = self._watched_loop = None
        await self.engines.close()


def _unlink(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
