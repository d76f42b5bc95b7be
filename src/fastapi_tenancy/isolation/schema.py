"""`SchemaIsolation`: one PostgreSQL schema per tenant, on one shared pool."""

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant
from .base import Isolation, create_tables, tenant_tables

__all__ = ["SchemaIsolation"]

# Transaction-local (the third argument, is_local=true): the setting ends with the
# transaction, so a pooled connection never carries a tenant's search_path to the
# next request, and it is safe behind PgBouncer in transaction mode. A bound
# parameter, so one prepared statement serves every tenant.
_SET_SEARCH_PATH = "SELECT set_config('search_path', $1, true)"
_SCHEMA_EXISTS = sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")
_SCOPED = "fastapi_tenancy.search_path"  # Connection.info: where the search_path was set


def _scope_transaction(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: DefaultExecutionContext,
    many: bool,
) -> None:
    # Listens on tenant binds only, before every statement. ORM and Core statements
    # built from Table objects already name the tenant's schema (schema_translate_map);
    # everything else — text(), driver SQL, DDL, literal_column(), hints, column
    # defaults written as SQL, names inside functions — resolves through the
    # search_path. So the first statement of every transaction (and again after a
    # savepoint, whose rollback would undo it) is preceded by a search_path holding
    # the tenant's schema alone: no fallback to `public`, so nothing can reach a
    # same-named shared table or the registry by an unqualified name. Detecting
    # "raw" SQL instead was tried and is unsound: SQLAlchemy adds SQL at compile
    # time (column_property, with_expression, hints, SQL defaults) that no walk of
    # the statement sees.
    options = context.execution_options
    if options.get("isolation_level") == "AUTOCOMMIT":
        # Outside a transaction a transaction-local setting lasts one statement.
        raise ConfigurationError("AUTOCOMMIT is not supported in tenant sessions")
    schema = options["schema_translate_map"][None]
    scope = (schema, conn.get_transaction(), conn.get_nested_transaction())
    known = conn.info.get(_SCOPED)
    if known is not None and all(a is b for a, b in zip(known, scope, strict=True)):
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None  # a connection executing a statement has one
    # Straight on a DBAPI cursor of the same connection: the cheapest way to send it
    # (no SQLAlchemy execution context), and inside the transaction the driver opens.
    setter = raw.cursor()
    try:
        setter.execute(_SET_SEARCH_PATH, (f'"{schema}"',))
    finally:
        setter.close()
    conn.info[_SCOPED] = scope


class SchemaIsolation(Isolation):
    """Each tenant in its own PostgreSQL schema (`acme-corp` → `tenant_acme_corp`).

    Safe for concurrent use: per-request state lives in each session's bind and
    transaction, never on this object. Sessions are bound to the shared engine
    with `schema_translate_map={None: schema}`, so ORM and Core statements name
    the tenant's schema explicitly, and every transaction runs under a
    transaction-local `search_path` holding that schema alone (one statement per
    transaction), for everything the map does not reach.
    """

    def __init__(self, engine: AsyncEngine, *, prefix: str = "tenant_", max_cached_binds: int = 10_000):
        super().__init__(prefix)
        self.engine = engine
        # identifier -> a view of the shared engine (same pool) carrying the map; bounded.
        self._binds: dict[str, AsyncEngine] = {}
        self._max_binds = max_cached_binds

    async def session(self, tenant: Tenant) -> AsyncSession:
        bind = self._binds.get(tenant.identifier) or self._bind(tenant.identifier)
        return AsyncSession(bind=bind, expire_on_commit=False)

    def _bind(self, identifier: str) -> AsyncEngine:
        bind = self.engine.execution_options(schema_translate_map={None: self.storage_name(identifier)})
        # On the bind, not the shared engine: listeners on an execution_options() copy
        # stay local to it, so the registry's queries keep SQLAlchemy's fast path.
        event.listen(bind.sync_engine, "before_cursor_execute", _scope_transaction)
        if len(self._binds) >= self._max_binds:
            self._binds.pop(next(iter(self._binds)))
        self._binds[identifier] = bind
        return bind

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        schema = self.storage_name(tenant.identifier)
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            try:
                async with conn.begin():
                    # Never IF NOT EXISTS: an existing schema may hold an earlier tenant's
                    # rows, and adopting it would hand them to the new one.
                    if await conn.scalar(_SCHEMA_EXISTS, {"name": schema}):
                        raise ProvisioningError(
                            f"schema {schema!r} already exists; refusing to hand its data to "
                            "a new tenant (drop it, or purge the old tenant with destroy_data=True)"
                        )
                    await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
                    # Names the translate map does not reach (types, functions in DDL)
                    # resolve in the new schema only, as they will in the tenant's sessions.
                    await conn.exec_driver_sql(_SET_SEARCH_PATH, (f'"{schema}"',))
                    await conn.execution_options(schema_translate_map={None: schema})
                    await conn.run_sync(create_tables, tenant_tables(metadata))
            except (sa_exc.ProgrammingError, sa_exc.IntegrityError) as exc:
                raise ProvisioningError(f"could not provision schema {schema!r}: {exc.orig}") from exc

    async def destroy(self, tenant: Tenant) -> None:
        schema = self.storage_name(tenant.identifier)
        self._binds.pop(tenant.identifier, None)
        async with unavailable_as_503("tenant database"), self.engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
