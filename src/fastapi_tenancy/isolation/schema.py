"""`SchemaIsolation`: one PostgreSQL schema per tenant, on one shared pool."""

import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Compiled, Connection
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import Function
from sqlalchemy.sql.selectable import TableClause

from .._utils import unavailable_as_503
from ..errors import ProvisioningError
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

# Compiled statements (cached by SQLAlchemy, so each shape is inspected once) ->
# whether every name in them is rendered with the tenant's schema.
_QUALIFIED: "weakref.WeakKeyDictionary[Compiled, bool]" = weakref.WeakKeyDictionary()


def _unqualified(element: Any) -> bool:
    """True for SQL the schema_translate_map cannot qualify: it resolves by search_path."""
    return (
        isinstance(element, TextClause)  # text(), also inside a Core statement
        or (isinstance(element, ColumnClause) and element.is_literal)  # literal_column()
        or (isinstance(element, TableClause) and not isinstance(element, sa.Table))  # table()
        or type(element) is Function  # func.anything_not_builtin()
    )


def _fully_qualified(context: DefaultExecutionContext) -> bool:
    compiled = context.compiled
    if compiled is None or context.isddl:  # exec_driver_sql() strings, DDL
        return False
    known = _QUALIFIED.get(compiled)
    if known is None:
        statement = compiled.statement
        known = statement is not None and not any(map(_unqualified, visitors.iterate(statement)))
        _QUALIFIED[compiled] = known
    return known


def _scope_raw_sql(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: DefaultExecutionContext,
    many: bool,
) -> None:
    # Listens on tenant binds only. Tenant sessions run with schema_translate_map=
    # {None: schema}: statements built from Table objects name the tenant's schema
    # and need nothing more (no extra round trip). SQL the map cannot qualify
    # (text(), driver SQL, DDL, literal fragments) gets a search_path holding the
    # tenant's schema alone, once per transaction: no fallback to `public`, so it
    # cannot reach a same-named shared table or the registry.
    schema = context.execution_options["schema_translate_map"][None]
    # The transaction (and savepoint) the search_path was set in: a new transaction
    # has lost it, and so has one whose savepoint was rolled back since.
    scope = (schema, conn.get_transaction(), conn.get_nested_transaction())
    known = conn.info.get(_SCOPED)
    if known is not None and all(a is b for a, b in zip(known, scope, strict=True)):
        return
    if _fully_qualified(context):
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None  # a connection executing a statement has one
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
    the tenant's schema explicitly at no extra cost; raw SQL runs under a
    transaction-local `search_path` holding that schema alone.
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
        event.listen(bind.sync_engine, "before_cursor_execute", _scope_raw_sql)
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
