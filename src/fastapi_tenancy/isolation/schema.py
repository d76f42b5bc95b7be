"""`SchemaIsolation`: one PostgreSQL schema per tenant, on one shared pool."""

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.named_types import NamedType
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant
from ._incarnation import MARKERS_IN_SCHEMA, create_marker, drop_schema, lock_marker, needs_marker
from .base import (
    BEGIN_SETTING,
    ON_STATEMENT_TYPES_CHANGE,
    Finding,
    Isolation,
    create_tables,
    quote_identifier,
    require_asyncpg,
    session_with_options,
    tenant_tables,
)
from .citus import CitusCluster
from .clone import clone_schema
from .roles import TenantRoles
from .spares import SPARES_TABLE, SparePool

__all__ = ["SchemaIsolation"]

logger = logging.getLogger("fastapi_tenancy")

# Transaction-local (the third argument, is_local=true): the setting ends with the
# transaction, so a pooled connection never carries a tenant's search_path to the
# next request, and it is safe behind PgBouncer in transaction mode. A bound
# parameter, so one prepared statement serves every tenant.
_SET_SEARCH_PATH = "SELECT set_config('search_path', $1, true)"
_SCHEMA_EXISTS = sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")
# A schema matching one of the patterns that holds a type of its own: an enum, a
# domain, a range, or a standalone composite type (a table's row type does not count).
_SCHEMA_TYPES = sa.text(
    "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
    "LEFT JOIN pg_class c ON c.oid = t.typrelid "
    "WHERE n.nspname LIKE ANY (:patterns) AND t.typtype IN ('e', 'd', 'r', 'm', 'c') "
    "AND (t.typtype <> 'c' OR c.relkind = 'c') LIMIT 1"
)
_GRANTS = (
    'GRANT USAGE ON SCHEMA "{schema}" TO {role}',
    'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {role}',
    'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO {role}',
    # Tables and sequences the owner adds later (migrations) are granted too.
    'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}',
    'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT USAGE, SELECT ON SEQUENCES TO {role}',
)


def _defines_schema_types(metadata: sa.MetaData) -> bool:
    """True when creating the tenant tables creates types in the tenant's schema."""
    for table in tenant_tables(metadata):
        for column in table.columns:
            column_type = column.type
            if isinstance(column_type, ARRAY):
                column_type = column_type.item_type
            if isinstance(column_type, sa.Enum) and column_type.native_enum and column_type.schema is None:
                return True
            if isinstance(column_type, NamedType) and getattr(column_type, "schema", None) is None:
                return True
    return False


class SchemaIsolation(Isolation):
    """Each tenant in its own PostgreSQL schema (`acme-corp` → `tenant_acme_corp`).

    Safe for concurrent use: per-request state lives in each session and its
    transaction, never on this object.

    Every transaction of a tenant session begins with the tenant's schema as its
    only `search_path`, sent in the same message as `BEGIN` (`isolation/_begin.py`):
    no extra round trip, and every name in every statement (ORM, Core, raw SQL,
    SQL added at compile time) resolves in that schema or fails. The SQL text is then the same for every
    tenant (`shared_statements=True`), so asyncpg's prepared-statement cache serves
    all tenants from one entry per statement; PostgreSQL re-plans a cached
    statement for the schema in use. Where tenant schemas hold types of their own
    (native ENUM, DOMAIN, composite types), a statement's result type differs
    between tenants and PostgreSQL refuses a reused statement ("cached plan must
    not change result type"): statements are then written per tenant (the schema
    named in the SQL), found at `initialize()`, at `provision()` from the metadata,
    or, failing both, at the first such refusal (that request gets a 503).

    Each transaction also locks the tenant's marker in its `BEGIN` message, proving the
    schema is this tenant's (not one made again for another tenant under the slug) and
    keeping it from being dropped until the transaction ends (`_incarnation.py`).

    With `tenant_roles=True` (a separate `ddl_engine` needed), each transaction also runs as
    its tenant's own role, so PostgreSQL refuses SQL that names another tenant's schema
    (`roles.py`).

    The engine must be one that sends settings with `BEGIN`: the manager's, or any
    asyncpg engine on which no connection was opened before this isolation attached
    to it (connections opened before are refused, never used without the setting).
    """

    cluster: CitusCluster

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        prefix: str = "tenant_",
        max_cached_binds: int = 10_000,
        template: str | None = None,
        ddl_engine: AsyncEngine | None = None,
        spares: int = 0,
        shared_statements: bool = True,
        tenant_roles: bool = False,
        cluster: CitusCluster | None = None,
    ):
        super().__init__(prefix)
        # A schema kept at the current head: new tenants are cloned from it
        # (fastapi_tenancy.isolation.clone) instead of created table by table.
        self.template = template
        self.engine = engine
        # With a separate owner (hybrid isolation, tenant roles): schemas are created and
        # dropped by it, and the sessions' role (or each tenant's) is granted use of each
        # one, so it cannot drop them.
        self.ddl_engine = ddl_engine or engine
        # On a Citus coordinator, each tenant schema is made a distributed schema (citus.py).
        self.cluster = cluster if cluster is not None else CitusCluster(self.ddl_engine)
        # Clones of the template made ahead of time: a registration renames one.
        self.spares: SparePool | None = None
        if spares:
            if template is None:
                raise ConfigurationError("spare schemas are clones of the template: set schema_template")
            self.spares = SparePool(self.ddl_engine, template, size=spares, cluster=self.cluster)
        self.roles: TenantRoles | None = (
            TenantRoles(engine, self.ddl_engine, prefix=prefix) if tenant_roles else None
        )
        """A role per tenant schema, each transaction running as its tenant's (`roles.py`)."""
        self._grantee: str | None = None
        # identifier -> the engine view (same pool) a tenant's sessions run on; bounded.
        # identifier -> the tenant's BEGIN setting: strings only, which the garbage
        # collector does not track. Bounded.
        self._settings: dict[str, str] = {}
        self._max_settings = max_cached_binds
        require_asyncpg(engine)
        from . import _begin as begin  # needs asyncpg: imported once the engine is known to use it

        begin.enable(engine)
        self.shared_statements = shared_statements
        """Whether one SQL text serves every tenant (see the class docstring)."""
        self._types_changed = self._on_statement_types_change  # bound once, not per session

    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        # Keyed by the tenant's id, never its slug: a slug deleted and registered again
        # names the schema of another tenant, which the setting refuses (see _setting).
        setting = self._settings.get(tenant.id)
        if setting is None:
            if self.roles is not None:
                await self.roles.ready()
            setting = self._setting(tenant)
        options: dict[str, Any] = {
            BEGIN_SETTING: setting,
            ON_STATEMENT_TYPES_CHANGE: self._types_changed,
        }
        if not self.shared_statements:
            options["schema_translate_map"] = {None: self.storage_name(tenant.identifier)}
        return session_with_options(self.engine, options, session_class=session_class)

    def _setting(self, tenant: Tenant) -> str:
        # The lock proves the schema is this tenant's (it holds the tenant's marker) and
        # keeps it from being dropped until the transaction ends (_incarnation.py).
        schema = self.storage_name(tenant.identifier)
        setting = f'{lock_marker(schema, tenant.id)} SET LOCAL search_path TO "{schema}";'
        if self.roles is not None:
            # First: the marker is then locked as the tenant's role, which proves its grants.
            setting = f"{self.roles.setting(schema)} {setting}"
        if len(self._settings) >= self._max_settings:
            self._settings.pop(next(iter(self._settings)))
        self._settings[tenant.id] = setting
        return setting

    def _on_statement_types_change(self, error: BaseException) -> None:
        # A changed result type always means the statement's tables changed; a parameter
        # type mismatch only counts when it names a tenant schema's type (any other is
        # a mistake in the statement, which per-tenant SQL would not mend).
        if type(error).__name__ == "InvalidCachedStatementError":
            self._write_statements_per_tenant("PostgreSQL refused a statement cached for another tenant")
        elif self.prefix in str(error):
            self._write_statements_per_tenant("a cached statement's parameter types belong to another tenant")

    def _write_statements_per_tenant(self, reason: str) -> None:
        """From now on, name each tenant's schema in its SQL (see the class docstring)."""
        if self.shared_statements:
            logger.warning("schema isolation: %s; tenant statements are now written per tenant", reason)
            self.shared_statements = False

    async def _check_schema_types(self) -> None:
        # Types of the tenants' own (or the template's) make result types differ
        # between tenants: shared statements would be refused by PostgreSQL.
        patterns = [self.prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"]
        if self.template is not None:
            patterns.append(self.template.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%"))
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            found = await conn.scalar(_SCHEMA_TYPES, {"patterns": patterns})
        if found:
            self._write_statements_per_tenant(f"schema {found!r} defines types of its own")

    async def initialize(self) -> None:
        await self.cluster.initialize()
        if self.roles is not None:
            # On Citus the coordinator connects to the workers as the tenant's role.
            self.roles.on_citus = self.cluster.active
            await self.roles.ready()
        if self.shared_statements:
            await self._check_schema_types()
        if self.spares is not None:
            async with unavailable_as_503("tenant database"):
                await self.spares.initialize()
            self.spares.refill_soon()

    def expected_storage(self, tenant: Tenant) -> tuple[str, str] | None:
        return "schema", self.storage_name(tenant.identifier)

    async def diagnose(self) -> list[Finding]:
        findings = [await self._check_template(), await self._check_spares()]
        if self.roles is not None:
            findings.append(await self.roles.diagnose())
        findings.extend(await self.cluster.diagnose())
        return findings

    async def _check_template(self) -> Finding:
        template = self.template
        if template is None:
            return "template", "ok", "not configured: tenants are provisioned with create_all"
        async with self.engine.connect() as conn:
            found = await conn.scalar(_SCHEMA_EXISTS, {"name": template})
        if not found:
            return (
                "template",
                "fail",
                f"schema {template!r} does not exist: registrations will fail until "
                "`fastapi-tenancy migrate upgrade` (or build_template()) creates it",
            )
        return "template", "ok", f"schema {template!r} exists"

    async def _check_spares(self) -> Finding:
        pool = self.spares
        if pool is None:
            return "spares", "ok", "not configured: registrations clone or create their schema"
        async with self.engine.connect() as conn:
            listed = await conn.scalar(sa.text("SELECT to_regclass(:t)"), {"t": SPARES_TABLE})
        if listed is None:
            return (
                "spares",
                "warn",
                "no spares table yet: start the app or run `fastapi-tenancy tenants spares fill`",
            )
        spares = await pool.list_spares()
        ready = sum(1 for s in spares if s.current)
        stale = len(spares) - ready
        detail = f"{ready} of {pool.size} ready" + (
            f", {stale} stale (dropped by the next fill)" if stale else ""
        )
        if ready < pool.size or stale:
            return "spares", "warn", detail + "; registrations clone meanwhile"
        return "spares", "ok", detail

    async def close(self) -> None:
        if self.spares is not None:
            await self.spares.close()

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        try:
            await self._provision(self.storage_name(tenant.identifier), tenant.id, metadata)
        finally:
            if self.spares is not None:
                # After the claim committed (or not): a fill that ran alongside it would
                # count the spare being claimed as still there.
                self.spares.refill_soon()

    async def _provision(self, schema: str, tenant_id: str, metadata: sa.MetaData | None) -> None:
        if self.shared_statements and metadata is not None and _defines_schema_types(metadata):
            self._write_statements_per_tenant("the tenant tables use types created in each schema")
        await self._find_grantee()
        async with unavailable_as_503("tenant database"), self.ddl_engine.connect() as conn:
            try:
                async with conn.begin():
                    await self.cluster.reference_tables(conn, metadata)
                    # Never IF NOT EXISTS: an existing schema may hold an earlier tenant's
                    # rows, and adopting it would hand them to the new one.
                    if await conn.scalar(_SCHEMA_EXISTS, {"name": schema}):
                        raise ProvisioningError(
                            f"schema {schema!r} already exists; refusing to hand its data to "
                            "a new tenant (drop it, or purge the old tenant with destroy_data=True)"
                        )
                    if self.spares is not None and await self.spares.claim(conn, schema):
                        pass  # a spare, renamed: already at the template's revision
                    elif self.template is not None:
                        await clone_schema(conn, self.template, schema)
                    else:
                        await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
                        # Names the translate map does not reach (types, functions in DDL)
                        # resolve in the new schema only, as in the tenant's sessions.
                        await conn.exec_driver_sql(_SET_SEARCH_PATH, (f'"{schema}"',))
                        await conn.execution_options(schema_translate_map={None: schema})
                        await conn.run_sync(create_tables, tenant_tables(metadata))
                    await self.cluster.distribute(conn, schema)
                    # Whose schema this is: each tenant transaction locks it at BEGIN. Before
                    # the grants, which cover it. On a cluster, on the coordinator only.
                    await self.cluster.create_local(conn, create_marker(tenant_id, schema=schema))
                    await self._grant(conn, schema)
            except (sa_exc.ProgrammingError, sa_exc.IntegrityError) as exc:
                raise ProvisioningError(f"could not provision schema {schema!r}: {exc.orig}") from exc

    async def _find_grantee(self) -> None:
        # With a separate owner, the sessions' role is granted use of each schema (with
        # tenant roles, only each tenant's role is).
        if self.ddl_engine is not self.engine and self._grantee is None and self.roles is None:
            async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
                self._grantee = str(await conn.scalar(sa.text("SELECT current_user")))

    async def _grant(self, conn: AsyncConnection, schema: str) -> None:
        if self.roles is not None:
            await self.roles.grant(conn, schema)
        elif self._grantee is not None:
            role = quote_identifier(self._grantee)
            for grant in _GRANTS:
                await conn.execute(sa.text(grant.format(schema=schema, role=role)))

    async def adopt(self, tenant: Tenant) -> bool:
        schema = self.storage_name(tenant.identifier)
        await self._find_grantee()
        async with unavailable_as_503("tenant database"), self.ddl_engine.begin() as conn:
            if not await conn.scalar(_SCHEMA_EXISTS, {"name": schema}):
                raise ProvisioningError(f"schema {schema!r} does not exist: nothing to adopt")
            quoted = {"schema": quote_identifier(schema)}
            found = (await conn.scalars(sa.text(MARKERS_IN_SCHEMA), quoted)).all()
            if not needs_marker(found, tenant.id, f"schema {schema!r}"):
                return False
            await self.cluster.create_local(conn, create_marker(tenant.id, schema=schema))
            await self._grant(conn, schema)
        return True

    async def build_template(self, metadata: sa.MetaData | None, *, replace: bool = False) -> None:
        """Create the template schema from `metadata` (for apps that do not use Alembic).

        With Alembic, let `fastapi-tenancy migrate upgrade` build and upgrade the
        template like a tenant instead: it then carries `alembic_version` too.
        `replace=True` drops an existing template first.
        """
        if self.template is None:
            raise ConfigurationError("no template schema configured (schema_template)")
        template = self.template
        async with unavailable_as_503("tenant database"), self.ddl_engine.begin() as conn:
            if replace:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{template}" CASCADE'))
            await conn.execute(sa.text(f'CREATE SCHEMA "{template}"'))
            await conn.exec_driver_sql(_SET_SEARCH_PATH, (f'"{template}"',))
            await conn.execution_options(schema_translate_map={None: template})
            await conn.run_sync(create_tables, tenant_tables(metadata))

    async def destroy(self, tenant: Tenant) -> None:
        schema = self.storage_name(tenant.identifier)
        self._settings.pop(tenant.id, None)
        async with unavailable_as_503("tenant database"), self.ddl_engine.begin() as conn:
            # Drops the marker too, so it waits for every open transaction of the tenant
            # (each locked it at BEGIN), then ends those that outstay DESTROY_WAIT.
            await drop_schema(conn, schema)
            if self.roles is not None:
                await self.roles.drop(conn, schema)  # after its schema: nothing of it is left to grant
