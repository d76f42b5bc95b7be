"""`SchemaIsolation`: one PostgreSQL schema per tenant, on one shared pool."""

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from .._utils import unavailable_as_503
from ..errors import ProvisioningError
from ..tenant import Tenant
from .base import Isolation, create_tables, tenant_tables

__all__ = ["SchemaIsolation"]

_SCHEMA_KEY = "fastapi_tenancy.schema"

# Transaction-local (the third argument, is_local=true): the setting ends with the
# transaction, so a pooled connection never carries a tenant's search_path to the
# next request, and it is safe behind PgBouncer in transaction mode. A bound
# parameter, so the statement is prepared once per connection for all tenants.
_SET_SEARCH_PATH = sa.text("SELECT set_config('search_path', :path, true)")
_SCHEMA_EXISTS = sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")


class _TenantSession(Session):
    """The sync half of tenant sessions; carries the listener below."""


@event.listens_for(_TenantSession, "after_begin")
def _scope_transaction(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    # Runs at the start of every transaction of a tenant session, including the
    # ones after commit(), so the scope survives commits. The search_path holds the
    # tenant's schema only: no fallback to `public`, so raw SQL that names a table
    # without a schema can reach neither a same-named shared table nor the registry.
    schema = session.info.get(_SCHEMA_KEY)
    if schema is None:  # pragma: no cover - only sessions built below carry this class
        raise RuntimeError("tenant session without a schema")
    connection.execute(_SET_SEARCH_PATH, {"path": f'"{schema}"'})


class SchemaIsolation(Isolation):
    """Each tenant in its own PostgreSQL schema (`acme-corp` → `tenant_acme_corp`).

    Safe for concurrent use: per-request state lives in each session's `info`,
    never on this object or on a connection. Sessions are bound to the shared
    engine with `schema_translate_map={None: schema}`, so ORM statements name the
    tenant's schema explicitly, and each transaction sets a transaction-local
    `search_path` to that schema alone, for raw SQL.
    """

    def __init__(self, engine: AsyncEngine, *, prefix: str = "tenant_", max_cached_binds: int = 10_000):
        super().__init__(prefix)
        self.engine = engine
        # identifier -> (engine view carrying the translate map, schema name); bounded.
        self._binds: dict[str, tuple[AsyncEngine, str]] = {}
        self._max_binds = max_cached_binds

    async def session(self, tenant: Tenant) -> AsyncSession:
        bound = self._binds.get(tenant.identifier) or self._bind(tenant.identifier)
        return AsyncSession(
            bind=bound[0],
            sync_session_class=_TenantSession,
            expire_on_commit=False,
            info={_SCHEMA_KEY: bound[1]},
        )

    def _bind(self, identifier: str) -> tuple[AsyncEngine, str]:
        schema = self.storage_name(identifier)
        # A view of the shared engine (same pool) whose statements carry the map.
        bound = (self.engine.execution_options(schema_translate_map={None: schema}), schema)
        if len(self._binds) >= self._max_binds:
            self._binds.pop(next(iter(self._binds)))
        self._binds[identifier] = bound
        return bound

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        schema = self.storage_name(tenant.identifier)
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            try:
                async with conn.begin():
                    # Never IF NOT EXISTS: an existing schema may hold an earlier tenant's
                    # rows, and adopting it would hand them to the new one.
                    exists = await conn.scalar(_SCHEMA_EXISTS, {"name": schema})
                    if exists:
                        raise ProvisioningError(
                            f"schema {schema!r} already exists; refusing to hand its data to "
                            "a new tenant (drop it, or purge the old tenant with destroy_data=True)"
                        )
                    await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
                    await conn.execute(_SET_SEARCH_PATH, {"path": f'"{schema}"'})
                    tables = tenant_tables(metadata)
                    if tables:
                        await conn.execution_options(schema_translate_map={None: schema})
                        await conn.run_sync(create_tables, tables)
            except (sa_exc.ProgrammingError, sa_exc.IntegrityError) as exc:
                raise ProvisioningError(f"could not provision schema {schema!r}: {exc.orig}") from exc

    async def destroy(self, tenant: Tenant) -> None:
        schema = self.storage_name(tenant.identifier)
        self._binds.pop(tenant.identifier, None)
        async with unavailable_as_503("tenant database"), self.engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
