"""`Isolation`: the contract of an isolation strategy, and tenant storage names."""

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ..errors import ConfigurationError, InvalidIdentifierError
from ..tenant import Tenant, validate_identifier

if TYPE_CHECKING:  # spares.py and roles.py import this module
    from .citus import CitusCluster
    from .citus_rls import CitusTables
    from .roles import TenantRoles
    from .spares import SparePool

__all__ = [
    "BEGIN_SETTING",
    "CONNECTION_OPTIONS",
    "MAX_NAME_BYTES",
    "ON_STATEMENT_TYPES_CHANGE",
    "UNAVAILABLE_SQLSTATE",
    "Finding",
    "Isolation",
    "TenantSession",
    "create_tables",
    "marker_name",
    "new_session",
    "quote_identifier",
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

Finding = tuple[str, Literal["ok", "warn", "fail"], str]
"""One health check's verdict for `fastapi-tenancy doctor`: (name, status, detail)."""

MAX_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated
_PLAIN_ID = re.compile(r"[A-Za-z0-9._-]+")
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
        # What `connection.execution_options(**options)` keeps, without its two hooks, on
        # every transaction: the dialect's handles only its connection characteristics
        # (isolation level, ...), which these options never are, and the event is for
        # options an application sets (tests/isolation/test_begin_internals.py pins both).
        connection._execution_options = connection._execution_options.union(options)


event.listen(TenantSession, "after_begin", _set_connection_options)


# (ours, theirs) -> the class with both; one per pair of classes, made once.
_SYNC_CLASSES: dict[tuple[type[Session], type[Session]], type[Session]] = {}
# (ours, session class) -> the sync class its sessions were seen to use (new_session).
_VERIFIED: dict[tuple[type[Session], type[AsyncSession]], type[Session]] = {}


def _sync_class(ours: type[Session], session_class: type[AsyncSession]) -> type[Session]:
    theirs = session_class.sync_session_class
    if issubclass(ours, theirs):
        return ours
    if issubclass(theirs, ours):
        return theirs
    combined = _SYNC_CLASSES.get((ours, theirs))
    if combined is None:
        namespace = {"__module__": __name__, "__doc__": ours.__doc__}
        combined = _SYNC_CLASSES[ours, theirs] = type(theirs.__name__, (ours, theirs), namespace)
    return combined


def new_session(session_class: type[AsyncSession], ours: type[Session], **kwargs: Any) -> AsyncSession:
    """A `session_class` session whose sync side is both `ours` and the class's own.

    `ours` carries the listeners that scope the session to its tenant; the class's own
    sync side carries its methods (SQLModel's `AsyncSession` runs `exec()` on a
    `sqlmodel.Session`). The class having both is made once per pair, and every
    listener of `ours` applies to it, as to any subclass. `kwargs` go to the session.
    """
    sync_class = _VERIFIED.get((ours, session_class))
    if sync_class is not None:
        # On the request path: a session of this class already proved to use it.
        return session_class(sync_session_class=sync_class, **kwargs)
    sync_class = _sync_class(ours, session_class)
    session = session_class(sync_session_class=sync_class, **kwargs)
    # Fail closed: a class that builds its sync side itself (SQLModel's did before 0.0.12)
    # would drop the listeners, and with them the tenant's scope.
    if not isinstance(session.sync_session, ours):
        raise ConfigurationError(
            f"{session_class.__qualname__} ignores sync_session_class, so its sessions cannot be "
            "scoped to a tenant (SQLModel: install sqlmodel>=0.0.14)"
        )
    _VERIFIED[ours, session_class] = sync_class
    return session


def session_with_options(
    engine: AsyncEngine,
    options: dict[str, Any],
    *,
    info: dict[str, Any] | None = None,
    session_class: type[AsyncSession] = AsyncSession,
) -> AsyncSession:
    """A new, not yet begun `session_class` session on `engine` whose connections get `options`."""
    info = {CONNECTION_OPTIONS: options} if info is None else {**info, CONNECTION_OPTIONS: options}
    return new_session(session_class, TenantSession, bind=engine, expire_on_commit=False, info=info)


def quote_identifier(name: str, *, quote: str = '"') -> str:
    """`name` as a quoted SQL identifier (`"` for PostgreSQL and SQLite, a backtick for MySQL)."""
    return quote + name.replace(quote, quote * 2) + quote


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
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidIdentifierError(
            f"tenant identifier {identifier!r} is too long: its storage name {name!r} "
            f"exceeds {MAX_NAME_BYTES} bytes (at most {MAX_NAME_BYTES - len(prefix)} characters)"
        )
    if name in _RESERVED_NAMES or name.startswith("pg_"):
        raise InvalidIdentifierError(f"tenant storage name {name!r} is reserved")
    return name


def marker_name(tenant_id: str) -> str:
    """The name of the view that marks storage as `tenant_id`'s: `fastapi_tenancy:<id>`.

    The id itself when it is letters, digits, `.`, `_` and `-` and the name fits in 63
    bytes (a generated id, a UUID, always does), else a SHA-256 of it: a name that
    needs no escaping in any backend or driver. See docs/isolation.md, "Incarnations".
    """
    name = "fastapi_tenancy:" + tenant_id
    if len(name) <= MAX_NAME_BYTES and _PLAIN_ID.fullmatch(tenant_id):
        return name
    return "fastapi_tenancy:sha256:" + hashlib.sha256(tenant_id.encode()).hexdigest()[:40]


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

    shared_column: str | None = None
    """The column that tells tenants' rows apart when tenants share tables (row-level
    security), else None. Shared tables are migrated once for every tenant, in the
    schema `storage_name()` names (see `fastapi_tenancy.migrations.targets`)."""

    spares: "SparePool | None" = None
    """Storage made ahead of time for new tenants (schema isolation with a template and
    `schema_spares`), which `fastapi-tenancy tenants spares` fills; else None."""

    roles: "TenantRoles | None" = None
    """A role per tenant schema (schema isolation with `schema_tenant_roles`), which
    `doctor` checks and `fastapi-tenancy tenants grants` repairs; else None."""

    cluster: "CitusCluster | None" = None
    """The Citus cluster this strategy's tenant schemas are distributed over (schema
    isolation; active once `initialize()` found Citus), which `fastapi-tenancy tenants
    move` and `fastapi-tenancy cluster` operate; else None."""

    shards: "CitusTables | None" = None
    """Row-level security's shared tables on that cluster, sharded by the tenant column
    (active once `initialize()` found Citus): where each tenant's rows are, and `fastapi-tenancy
    tenants move` for them; else None."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    # -- what the rest of the library asks a strategy (instead of testing its class) ----

    def parts(self) -> list["Isolation"]:
        """Every strategy that serves tenants here: this one (hybrid isolation: each tier once)."""
        return [self]

    def serving(self, tenant: Tenant) -> "Isolation":
        """The strategy that holds `tenant`'s data: this one (hybrid isolation: its tier's)."""
        return self

    def expected_storage(self, tenant: Tenant) -> tuple[str, str] | None:
        """`(kind, name)` of the storage `tenant` must have on the main server, for `doctor`.

        `kind` is `"schema"` or `"database"`; None when the tenant has none of its own there
        (shared tables, another server, a file).
        """
        return None

    async def diagnose(self) -> list[Finding]:
        """This strategy's own health checks, run by `fastapi-tenancy doctor` (none by default)."""
        return []

    def migration_url(self, tenant: Tenant) -> URL | None:
        """The URL of the database the fleet migrator migrates `tenant` in, or None.

        None (the default): the tenant is migrated on the main database, scoped to its
        schema `storage_name()`. Database isolation returns the tenant's own database.
        """
        return None

    def choose_tier(self, tier: str | None, metadata: Mapping[str, Any]) -> str | None:
        """The tier a new tenant is stored with; only hybrid isolation has tiers (None here)."""
        if tier is not None:
            raise ConfigurationError(f"tier={tier!r} needs isolation_strategy='hybrid'")
        return None

    def moving(self, tenant: Tenant) -> AbstractContextManager[None]:
        """A block during which this process refuses `tenant`'s sessions (503) while it moves.

        Only strategies with tiers move tenants; the default refuses.
        """
        raise ConfigurationError("moving tenants between tiers needs isolation_strategy='hybrid'")

    async def move(
        self,
        tenant: Tenant,
        target: str,
        metadata: sa.MetaData,
        *,
        holding: Callable[[], AbstractAsyncContextManager[object]] | None = None,
        switch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Copy `tenant`'s data into tier `target` (see `HybridIsolation.move`); refused by default.

        `holding()` is entered just before the tenant's writes are held, and left when the
        move fails or has switched; `switch` runs inside it once the old copy is fenced
        off (switch the registry there).
        """
        raise ConfigurationError("moving tenants between tiers needs isolation_strategy='hybrid'")

    async def remove_old_copy(self, tenant: Tenant) -> None:
        """Delete what a move left behind (see `HybridIsolation`); refused by default."""
        raise ConfigurationError("remove_old_copy needs isolation_strategy='hybrid'")

    async def adopt(self, tenant: Tenant) -> bool:
        """Mark the storage found under `tenant`'s name as `tenant`'s (see `TenancyManager.adopt_storage`).

        True when it wrote the marker; False when there was nothing to write (the
        storage was already marked as the tenant's, or, as here by default, the strategy
        keeps no storage of the tenant's own). Strategies whose storage carries a marker
        (schema, database, SQLite file) refuse (`ProvisioningError`) storage that is
        missing or marked for another tenant.
        """
        return False

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

    async def migrated(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called after the library ran migrations on tenants' tables (the fleet, a registration).

        Row-level security guards the tables a migration added; others do nothing.
        """

    async def initialize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Prepare shared resources (pools). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release shared resources. Idempotent."""

    @abstractmethod
    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        """Create the tenant's storage and the tables of `metadata` in it.

        Must refuse (`ProvisioningError`) when the storage already exists, so that
        a re-registered slug never adopts an earlier tenant's data, must leave
        nothing behind when it fails, and should mark the storage with the tenant's
        id, which its sessions check (`_incarnation.py`).
        """

    @abstractmethod
    async def destroy(self, tenant: Tenant) -> None:
        """Delete the tenant's storage and every row in it, once no transaction of the
        tenant is open (waiting, or ending them). Irreversible."""

    @abstractmethod
    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        """A new, not yet begun session that reaches only `tenant`'s data (not the data of
        another tenant that took the slug since).

        Of class `session_class` (an `AsyncSession` subclass such as SQLModel's), scoped
        exactly as the default: build it with `new_session()` when a sync session class
        carries the scope.
        """
