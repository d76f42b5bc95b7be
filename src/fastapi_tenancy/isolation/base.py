"""`Isolation`: the contract of an isolation strategy, and tenant storage names."""

from abc import ABC, abstractmethod
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ..errors import ConfigurationError, InvalidIdentifierError
from ..tenant import Tenant, validate_identifier

__all__ = [
    "BEGIN_SETTING",
    "CONNECTION_OPTIONS",
    "ON_STATEMENT_TYPES_CHANGE",
    "UNAVAILABLE_SQLSTATE",
    "Isolation",
    "TenantSession",
    "create_tables",
    "require_asyncpg",
    "storage_name",
    "tenant_tables",
]

# Execution options of tenant binds, read by isolation/_begin.py on engines that send
# settings with BEGIN (defined here because that module needs asyncpg).
BEGIN_SETTING = "fastapi_tenancy_begin_setting"
"""SQL (ending in `;`) run in the same message as each transaction's `BEGIN`."""
CONNECTION_OPTIONS = "fastapi_tenancy.connection_options"
"""Session.info key: execution options given to each connection a `TenantSession` begins on."""
UNAVAILABLE_SQLSTATE = "FT503"
"""SQLSTATE a setting raises when the tenant is not served here right now (a 503)."""
ON_STATEMENT_TYPES_CHANGE = "fastapi_tenancy_on_statement_types_change"
"""Called with the error when PostgreSQL refuses a cached statement whose result or
parameter types no longer fit (its tables differ from those it was prepared for, such
as another tenant's schema with types of its own)."""

_MAX_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated
_RESERVED_NAMES = frozenset({"public", "information_schema"})


class TenantSession(Session):
    """The sync side of tenant sessions on a shared engine.

    Each connection the session begins a transaction on gets the execution options
    in `info[CONNECTION_OPTIONS]` (the tenant's `BEGIN_SETTING`, ...) before its first
    statement. Per session rather than per tenant engine: an `execution_options()`
    copy of the engine for each tenant kept about 14 objects alive per tenant, which
    Python's garbage collector walked again and again (a full collection took 80 ms
    at 10,000 tenants).
    """


def _set_connection_options(
    session: Session, _transaction: SessionTransaction, connection: Connection
) -> None:
    options = session.info.get(CONNECTION_OPTIONS)
    if options is not None:
        connection.execution_options(**options)


event.listen(TenantSession, "after_begin", _set_connection_options)


def session_with_options(
    engine: AsyncEngine, options: dict[str, Any], *, info: dict[str, Any] | None = None
) -> AsyncSession:
    """A new, not yet begun session on `engine` whose connections get `options`."""
    return AsyncSession(
        bind=engine,
        expire_on_commit=False,
        sync_session_class=TenantSession,
        info={**(info or {}), CONNECTION_OPTIONS: options},
    )


def require_asyncpg(engine: AsyncEngine) -> None:
    """Refuse an engine whose driver cannot send tenant settings with `BEGIN` (see _begin.py)."""
    driver = engine.sync_engine.dialect.driver
    if driver != "asyncpg":
        raise ConfigurationError(f"this isolation strategy needs PostgreSQL through asyncpg, not {driver}")


def storage_name(prefix: str, identifier: str) -> str:
    """The schema (or database file) name of a tenant: `tenant_` + slug with `_` for `-`.

    Injective: slugs never contain `_`, so `acme-corp` → `tenant_acme_corp` and
    `acme--corp` → `tenant_acme__corp` stay apart. Names PostgreSQL would truncate
    (over 63 bytes) or that are reserved (`public`, `information_schema`, `pg_*`)
    raise `InvalidIdentifierError` instead of silently landing somewhere shared.
    """
    validate_identifier(identifier)
    name = prefix + identifier.replace("-", "_")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise InvalidIdentifierError(
            f"tenant identifier {identifier!r} is too long: its storage name {name!r} "
            f"exceeds {_MAX_NAME_BYTES} bytes (at most {_MAX_NAME_BYTES - len(prefix)} characters)"
        )
    if name in _RESERVED_NAMES or name.startswith("pg_"):
        raise InvalidIdentifierError(f"tenant storage name {name!r} is reserved")
    return name


def tenant_tables(metadata: sa.MetaData | None) -> list[sa.Table]:
    """The tables of `metadata` that belong in each tenant (those with no explicit schema)."""
    if metadata is None:
        return []
    return [table for table in metadata.sorted_tables if table.schema is None]


def create_tables(connection: Connection, tables: list[sa.Table]) -> None:
    """Create `tables` (from one MetaData) on a sync connection, with no existence check.

    checkfirst=False: the storage is brand new, and a check could be fooled by a
    same-named table elsewhere on the search_path (a shared `public.orders`).
    """
    if tables:
        tables[0].metadata.create_all(connection, tables=tables, checkfirst=False)


class Isolation(ABC):
    """Keeps each tenant's data apart. One instance serves all requests concurrently.

    A strategy provisions storage for a new tenant, destroys it on request, and
    hands out `AsyncSession`s that can only reach the tenant's own data. To add
    a strategy, subclass this and implement the abstract methods; sessions must
    stay scoped after `commit()` and leave nothing on pooled connections.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def storage_name(self, identifier: str) -> str:
        """The name of the tenant's schema or database; raises for unusable slugs."""
        return storage_name(self.prefix, identifier)

    def check(self, tenant: Tenant) -> None:
        """Raise `ConfigurationError` if this strategy cannot serve `tenant` as registered.

        Called before anything of a new tenant is written. The default refuses a
        tenant's own `database_url`, which only database isolation uses.
        """
        if tenant.encrypted_database_url is not None:
            raise ConfigurationError(
                f"tenant {tenant.identifier!r} has its own database_url, but {type(self).__name__} "
                "keeps tenants on one server; use isolation_strategy='database'"
            )

    async def initialize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Prepare shared resources (pools). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release shared resources. Idempotent."""

    @abstractmethod
    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        """Create the tenant's storage and the tables of `metadata` in it.

        Must refuse (`ProvisioningError`) when the storage already exists, so that
        a re-registered slug never adopts an earlier tenant's data, and must leave
        nothing behind when it fails.
        """

    @abstractmethod
    async def destroy(self, tenant: Tenant) -> None:
        """Delete the tenant's storage and every row in it. Irreversible."""

    @abstractmethod
    async def session(self, tenant: Tenant) -> AsyncSession:
        """A new, not yet begun session that reaches only `tenant`'s data."""
