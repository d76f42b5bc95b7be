"""`DatabaseIsolation`: one database per tenant on PostgreSQL or MySQL/MariaDB, on one
server or many, under a per-process connection budget."""

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .._utils import create_engine, unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError, TenantNotFoundError
from ..tenant import Tenant
from ..urls import normalise_database_url
from ._engines import ConnectionBudget, EngineRegistry
from ._incarnation import create_marker, lock_marker, needs_marker
from .base import (
    BEGIN_SETTING,
    Isolation,
    create_tables,
    marker_name,
    quote_identifier,
    session_with_options,
    tenant_tables,
)

if TYPE_CHECKING:  # the cipher needs `cryptography`, an optional extra
    from ..encryption import URLCipher

__all__ = ["DatabaseIsolation"]

logger = logging.getLogger("fastapi_tenancy")

_SERVER_BACKENDS = ("postgresql", "mysql")
_EXISTS = {
    "postgresql": sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
    "mysql": sa.text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :name"),
}


# MySQL/MariaDB servers may default to latin1; tenants' text must not depend on that.
_CHARSET = {"postgresql": "", "mysql": " CHARACTER SET utf8mb4"}
# Where a PostgreSQL tenant database keeps its marker, and how to find the markers.
_MARKER_SCHEMA = "public"
_MARKERS = {
    "postgresql": sa.text(
        "SELECT c.relname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'v' "
        "AND c.relname LIKE 'fastapi\\_tenancy:%'"
    ),
    "mysql": sa.text(
        "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME LIKE 'fastapi\\_tenancy:%'"
    ),
}
_QUOTE = {"postgresql": '"', "mysql": "`"}


def _marker_ddl(backend: str, tenant_id: str) -> str:
    """The marker of `tenant_id` in a tenant database (PostgreSQL: in `public`)."""
    schema = _MARKER_SCHEMA if backend == "postgresql" else None
    return create_marker(tenant_id, schema=schema, quote=_QUOTE[backend])


# MySQL/MariaDB: a connection reaches the tenant's database by its name. This statement
# fails (1146, no such table) unless the connection's current database holds the
# tenant's marker: not in a database a route moved it to, nor in one made for another
# tenant under the same name. `DO`: no result set to send and parse.
_MYSQL_NO_SUCH_TABLE = 1146
_MYSQL_NO_DATABASE = 1046  # the current database was dropped
_MYSQL_UNKNOWN_THREAD = 1094  # KILL of a connection that ended meanwhile


def _mysql_check(tenant_id: str) -> Any:
    """`check(dbapi_connection)`: True when the connection's database is `tenant_id`'s."""
    statement = f"DO (SELECT tenant FROM {quote_identifier(marker_name(tenant_id), quote='`')})"  # noqa: S608

    def check(dbapi_connection: Any) -> bool:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
        except Exception as exc:
            if getattr(exc, "args", ())[:1] in ((_MYSQL_NO_SUCH_TABLE,), (_MYSQL_NO_DATABASE,)):
                return False
            raise
        finally:
            cursor.close()
        return True

    return check


def _mysql_listeners(engine: AsyncEngine, database: str, tenant_id: str) -> None:
    """Keep a MySQL tenant engine's connections in `database`, while it is `tenant_id`'s.

    On connect: a database of the same name made for another tenant (the slug deleted and
    registered again) is refused. On checkin, one round trip where `USE` used to be
    (MySQL has no BEGIN message to fold it into, and `COM_RESET_CONNECTION` keeps the
    current database; about 50 µs more than `USE` on loopback, which would point the
    connection at whatever database has the name now): a connection a route moved
    elsewhere (`USE other_db`), or whose database is no longer the tenant's, is
    recycled before its next use. Session variables a route sets stay on its own
    tenant's pool.
    """
    check = _mysql_check(tenant_id)

    def connected(dbapi_connection: Any, _record: Any) -> None:
        if not check(dbapi_connection):
            raise TenantNotFoundError(
                f"database {database!r} holds no marker of tenant {tenant_id!r}: it belongs to another tenant"
            )

    def reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        if state.asyncio_safe and record is not None and not check(dbapi_connection):
            record.invalidate(soft=True)  # closed and opened again (and checked) at its next checkout

    event.listen(engine.sync_engine, "connect", connected)
    event.listen(engine.sync_engine, "reset", reset)


async def _end_mysql_connections(conn: Any, name: str) -> None:
    """End every other connection whose current database is `name` (KILL needs no wait)."""
    ids = await conn.scalars(
        sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :name AND ID <> CONNECTION_ID()"),
        {"name": name},
    )
    for thread in ids.all():
        try:
            await conn.exec_driver_sql(f"KILL CONNECTION {int(thread)}")
        except sa_exc.DBAPIError as exc:
            if getattr(exc.orig, "args", ())[:1] != (_MYSQL_UNKNOWN_THREAD,):
                raise


def _backend(url: URL) -> str:
    backend = url.get_backend_name()
    return "mysql" if backend == "mariadb" else backend


def _quoted(backend: str, name: str) -> str:
    # The quotes keep reserved words usable (names come from storage_name() anyway).
    return quote_identifier(name, quote="`" if backend == "mysql" else '"')


class DatabaseIsolation(Isolation):
    """Each tenant in a database of its own (`acme-corp` → database `tenant_acme_corp`).

    Safe for concurrent use. A tenant's database lives on `server_url`'s server,
    or on the server of its own `database_url` (stored encrypted; `cipher`
    decrypts it when the tenant's engine is made). Engines are made on a
    tenant's first request and kept in an `EngineRegistry`: at most
    `max_engines`, each with a pool of `pool_size` connections and no overflow,
    all of them under one `ConnectionBudget` of `connection_budget` connections.
    Sessions connect to the tenant's database only, so neither other tenants nor
    the registry are reachable by unqualified names, raw SQL included; and only while
    it holds the tenant's marker, not a database made again under the name for another
    tenant (`_incarnation.py`).

        isolation = DatabaseIsolation("postgresql+asyncpg://app@db/app", connection_budget=40)
    """

    def __init__(
        self,
        server_url: str,
        *,
        prefix: str = "tenant_",
        cipher: "URLCipher | None" = None,
        connection_budget: int = 50,
        pool_size: int = 2,
        pool_timeout: float = 30.0,
        pool_recycle: int = 1800,
        pool_pre_ping: bool = False,
        max_engines: int = 100,
        pgbouncer: bool = False,
        echo: bool = False,
    ) -> None:
        super().__init__(prefix)
        self._server = make_url(normalise_database_url(server_url))
        if _backend(self._server) not in _SERVER_BACKENDS:
            raise ConfigurationError(
                "DatabaseIsolation needs a PostgreSQL or MySQL/MariaDB server; on SQLite, "
                "SQLiteFileIsolation gives each tenant its own file"
            )
        if pool_size > connection_budget:
            raise ConfigurationError("a tenant's pool_size cannot exceed connection_budget")
        self._cipher = cipher
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._pool_recycle = pool_recycle
        self._pool_pre_ping = pool_pre_ping
        self._pgbouncer = pgbouncer
        self._echo = echo
        self.budget = ConnectionBudget(connection_budget, timeout=pool_timeout)
        """Counts every connection this strategy opens, provisioning included."""
        self.engines = EngineRegistry(max_engines=max_engines, budget=self.budget)
        # tenant id -> the execution options of its sessions (PostgreSQL); bounded.
        self._options: dict[str, dict[str, Any]] = {}

    # -- where a tenant lives ------------------------------------------------------

    def check(self, tenant: Tenant) -> None:
        """Refuse a tenant whose own `database_url` cannot be decrypted or used."""
        self._server_of(tenant)

    def _server_of(self, tenant: Tenant) -> URL:
        token = tenant.encrypted_database_url
        if token is None:
            return self._server
        if self._cipher is None:
            raise ConfigurationError(
                f"tenant {tenant.identifier!r} has its own database_url, but no encryption_keys are set"
            )
        try:
            server = make_url(normalise_database_url(self._cipher.decrypt(token)))
        except ValueError as exc:  # ConfigurationError included; messages never hold the URL
            raise ConfigurationError(
                f"the database_url of tenant {tenant.identifier!r} is unusable: {exc}"
            ) from None
        if _backend(server) not in _SERVER_BACKENDS:
            raise ConfigurationError(
                f"the database_url of tenant {tenant.identifier!r} must name a PostgreSQL or "
                "MySQL/MariaDB server"
            )
        return server

    def _engine(self, url: URL, *, null_pool: bool = False, autocommit: bool = False) -> AsyncEngine:
        postgres = _backend(url) == "postgresql"
        options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
        return create_engine(
            url.render_as_string(hide_password=False),
            pool_size=self._pool_size,
            max_overflow=0,
            pool_timeout=self._pool_timeout,
            pool_recycle=self._pool_recycle,
            pool_pre_ping=self._pool_pre_ping,
            echo=self._echo,
            pgbouncer=self._pgbouncer and postgres,
            null_pool=null_pool,
            **options,
        )

    def _admin_engine(self, server: URL) -> AsyncEngine:
        # The server URL's own database, or the maintenance database: CREATE and DROP
        # DATABASE run outside any transaction, on a connection of their own.
        if server.database is None and _backend(server) == "postgresql":
            server = server.set(database="postgres")
        engine = self._engine(server, null_pool=True, autocommit=True)
        self.budget.attach(engine)
        return engine

    def tenant_url(self, tenant: Tenant) -> URL:
        """The URL of `tenant`'s database, password included (for tools such as the fleet migrator)."""
        return self._server_of(tenant).set(database=self.storage_name(tenant.identifier))

    def expected_storage(self, tenant: Tenant) -> tuple[str, str] | None:
        # A tenant with its own database_url lives on another server.
        if tenant.encrypted_database_url is not None:
            return None
        return "database", self.storage_name(tenant.identifier)

    def migration_url(self, tenant: Tenant) -> URL | None:
        return self.tenant_url(tenant)

    def _tenant_engine(self, tenant: Tenant) -> AsyncEngine:
        url = self.tenant_url(tenant)
        engine = self._engine(url)
        # What route code sets on a connection must not outlive its request: the pool
        # is the tenant's, but `USE other_db` would point its next request elsewhere.
        # And the database must be this tenant's: a slug deleted and registered again
        # names a database made for another (_incarnation.py).
        if engine.sync_engine.dialect.driver == "asyncpg":
            from . import _begin as begin  # needs asyncpg

            # Each transaction begins and ends reset, in its BEGIN and COMMIT messages,
            # and locks the tenant's marker in its BEGIN message (see session()).
            begin.enable(engine)
        elif _backend(url) == "mysql":
            _mysql_listeners(engine, url.database or "", tenant.id)
        return engine

    # -- the request path ----------------------------------------------------------

    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        engine = self.engines.get(tenant.id, lambda: self._tenant_engine(tenant))
        if engine.sync_engine.dialect.driver == "asyncpg":
            # The connection reset around each transaction, and the lock of the tenant's
            # marker: in the BEGIN message, so behind PgBouncer too, where a client
            # connection's next transaction may run on a server connection opened later.
            options = self._options.get(tenant.id)
            if options is None:
                if len(self._options) >= 10_000:
                    self._options.pop(next(iter(self._options)))
                setting = lock_marker(_MARKER_SCHEMA, tenant.id)
                options = self._options[tenant.id] = {BEGIN_SETTING: setting}
            return session_with_options(engine, options, session_class=session_class)
        return session_class(bind=engine, expire_on_commit=False)

    # -- lifecycle -----------------------------------------------------------------

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        name = self.storage_name(tenant.identifier)
        server = self._server_of(tenant)
        backend = _backend(server)
        admin = self._admin_engine(server)
        created = False
        try:
            async with unavailable_as_503("tenant database server"):
                async with admin.connect() as conn:
                    # Never IF NOT EXISTS: an existing database may hold an earlier
                    # tenant's rows, and adopting it would hand them to the new one.
                    if await conn.scalar(_EXISTS[backend], {"name": name}):
                        raise ProvisioningError(
                            f"database {name!r} already exists; refusing to hand its data to a new "
                            "tenant (drop it, or purge the old tenant with destroy_data=True)"
                        )
                    # A concurrent registration of the same name makes this fail, and
                    # `created` stays False: the other one's database is not ours to drop.
                    await conn.exec_driver_sql(f"CREATE DATABASE {_quoted(backend, name)}{_CHARSET[backend]}")
                    created = True
                tables = self._engine(server.set(database=name), null_pool=True)
                self.budget.attach(tables)
                try:
                    async with tables.begin() as conn:
                        await conn.run_sync(create_tables, tenant_tables(metadata))
                        # Whose database this is: tenant connections check it (_incarnation.py).
                        await conn.exec_driver_sql(_marker_ddl(backend, tenant.id))
                finally:
                    await tables.dispose()
        except BaseException as exc:
            # Whatever went wrong (even a cancellation), a database we created is
            # dropped, so the slug can be registered again.
            if created:
                await asyncio.shield(self._drop(admin, backend, name))
            if isinstance(exc, sa_exc.SQLAlchemyError):
                detail = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
                raise ProvisioningError(f"could not provision database {name!r}: {detail}") from exc
            raise
        finally:
            await admin.dispose()

    async def adopt(self, tenant: Tenant) -> bool:
        name = self.storage_name(tenant.identifier)
        server = self._server_of(tenant)
        backend = _backend(server)
        engine = self._engine(server.set(database=name), null_pool=True)
        self.budget.attach(engine)
        where = f"database {name!r}"
        try:
            async with unavailable_as_503("tenant database server"), engine.begin() as conn:
                found = (await conn.scalars(_MARKERS[backend])).all()
                if not needs_marker(found, tenant.id, where):
                    return False
                await conn.exec_driver_sql(_marker_ddl(backend, tenant.id))
        except sa_exc.DBAPIError as exc:  # no such database, among others
            raise ProvisioningError(f"could not adopt {where}: {exc.orig}") from exc
        finally:
            await engine.dispose()
        return True

    async def _drop(self, admin: AsyncEngine, backend: str, name: str) -> None:
        # WITH (FORCE) (PostgreSQL 13+) ends sessions still connected to it, ours in
        # other processes included; MySQL drops under open connections anyway.
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        try:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quoted(backend, name)}{force}")
        except Exception:
            logger.exception("could not drop database %s of a failed provisioning", name)

    async def destroy(self, tenant: Tenant) -> None:
        name = self.storage_name(tenant.identifier)
        self._options.pop(tenant.id, None)
        await self.engines.discard(tenant.id)
        server = self._server_of(tenant)
        backend = _backend(server)
        admin = self._admin_engine(server)
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        try:
            async with unavailable_as_503("tenant database server"), admin.connect() as conn:
                if backend == "mysql":
                    # MySQL drops a database under connections that are in it, and they then
                    # reach a database made again under the name: end them, before (so the
                    # drop waits for no open transaction) and after (those that came in
                    # between). PostgreSQL's FORCE ends them itself.
                    await _end_mysql_connections(conn, name)
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quoted(backend, name)}{force}")
                if backend == "mysql":
                    await _end_mysql_connections(conn, name)
        finally:
            await admin.dispose()

    async def close(self) -> None:
        await self.engines.close()
