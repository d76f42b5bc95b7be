"""`RLSIsolation`: every tenant in shared PostgreSQL tables, kept apart by row-level security."""

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant, validate_identifier
from ._incarnation import advisory_holders, end_after_wait
from ._rows import tenant_session
from .base import (
    BEGIN_SETTING,
    UNAVAILABLE_SQLSTATE,
    Finding,
    Isolation,
    quote_identifier,
    require_asyncpg,
)
from .citus import CitusCluster
from .citus_rls import CitusTables

__all__ = ["RLSIsolation", "tenant_session"]

# The tenant's lock, exclusive: every transaction of the tenant holds it shared from BEGIN
# (the tenant function), so this waits for them, and new ones answer 503 meanwhile.
_HOLD = "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(:key, 0))"
_COMMANDS = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}


_quote = quote_identifier


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class RLSIsolation(Isolation):
    """All tenants in shared tables, each row labelled by a tenant column, guarded by policies.

    Safe for concurrent use: per-request state lives in each session's bind and
    transaction. Requests run on `engine`, whose role must be subject to
    row-level security (not a superuser, no BYPASSRLS, not the tables' owner:
    `initialize()` refuses it otherwise); tables, policies and the tenant
    registry are managed with `owner_engine`. Each transaction of a tenant
    session is bound to the tenant in its `BEGIN` message, by a transaction-local
    setting which every policy reads: with no tenant bound, a query sees zero
    rows and an insert fails.

        isolation = RLSIsolation(app_engine, owner_engine)

    On a Citus coordinator (`cluster`, found at `initialize()`), the tenant tables are
    distributed by the tenant column and the binding reaches every worker (`citus_rls.py`).
    """

    cluster: CitusCluster
    shards: CitusTables

    def __init__(
        self,
        engine: AsyncEngine,
        owner_engine: AsyncEngine,
        *,
        column: str = "tenant_id",
        namespace: str = "fastapi_tenancy",
        schema: str = "public",
        prefix: str = "tenant_",
        max_cached_binds: int = 10_000,
        cluster: CitusCluster | None = None,
    ) -> None:
        super().__init__(prefix)
        self.engine = engine
        self.owner_engine = owner_engine
        self.column = column
        self.shared_column = column
        self.schema = schema
        self.setting = f"{namespace}.tenant_id"
        self.policy = f"{namespace}_tenant"
        # Tenants moved out to another tier (hybrid), or deleted: their sessions here answer 503.
        self.fence_table = f"{_quote(schema)}.{_quote(self.policy + '_fence')}"
        self.enter_function = f"{_quote(schema)}.{_quote(self.policy + '_enter')}"
        if len(namespace) > 40:
            raise ConfigurationError("the setting namespace must be at most 40 characters")
        # Each transaction of a tenant session begins bound to its tenant, in the BEGIN
        # message itself (isolation/_begin.py): no round trip of its own, no listener.
        require_asyncpg(engine)
        from . import _begin as begin  # needs asyncpg: imported once the engine is known to use it

        begin.enable(engine)
        # tenant id -> its BEGIN setting (strings: not tracked by the garbage collector).
        self._settings: dict[str, str] = {}
        self._max_settings = max_cached_binds
        self._translate = {None: schema}
        self.app_role: str | None = None
        self._owner_role: str | None = None
        # On a Citus coordinator, the tenant tables are sharded by the tenant column.
        self.cluster = cluster if cluster is not None else CitusCluster(owner_engine)
        self.shards = CitusTables(
            self.cluster, schema=schema, column=column, setting=self.setting, fence=self.policy + "_fence"
        )
        """The tenant tables on a Citus cluster: distribution, placement, moves (`citus_rls.py`)."""

    def storage_name(self, identifier: str) -> str:
        """The shared schema: RLS tenants have no storage of their own (validates the slug)."""
        validate_identifier(identifier)
        return self.schema

    # -- sessions --------------------------------------------------------------------

    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        # Keyed by the tenant's id, never its slug: a slug purged and registered again
        # belongs to a new tenant with a new id.
        setting = self._settings.get(tenant.id) or self._setting(tenant.id)
        options = {"schema_translate_map": self._translate, BEGIN_SETTING: setting}
        return tenant_session(self.engine, self.column, tenant.id, options, session_class=session_class)

    def _setting(self, tenant_id: str) -> str:
        # The search_path too: the manager's connections start with an empty one (so
        # raw SQL cannot fall back to another schema), and the shared tables must
        # resolve for raw SQL. The tenant function takes the tenant's shared advisory
        # lock, checks it has not moved to another tier (else raises: a 503), then sets
        # the setting the policies read. Transaction-local: the binding ends with the
        # transaction, so a pooled connection never carries it to the next request, a
        # commit() in the middle of a request starts a transaction that is bound
        # again, and it holds behind PgBouncer in transaction mode.
        setting = (
            f"SET LOCAL search_path TO {_quote(self.schema)}; "
            f"SELECT {self.enter_function}({_literal(tenant_id)});"
        )
        if len(self._settings) >= self._max_settings:
            self._settings.pop(next(iter(self._settings)))
        self._settings[tenant_id] = setting
        return setting

    # -- startup ---------------------------------------------------------------------

    async def initialize(self) -> None:
        """Create the tenant function, then refuse an application role that RLS would not bind."""
        await self.cluster.initialize()  # first: on Citus, the tenant function binds the workers too
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            await self._lock_setup(conn)
            self._owner_role = str(await conn.scalar(sa.text("SELECT current_user")))
            await conn.execute(
                sa.text(f"CREATE TABLE IF NOT EXISTS {self.fence_table} (tenant_id text PRIMARY KEY)")
            )
            await conn.execute(sa.text(self._enter_function_sql()))
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            row = (await conn.execute(sa.text(_ROLE_CHECK), self._catalog_params())).one()
        self.app_role = row.app_role
        problems = []
        if row.privileged:
            problems.append(
                f"it is, or can become, a superuser or a role with BYPASSRLS ({', '.join(row.privileged)}), "
                "which row-level security does not apply to"
            )
        if row.owner_member:
            problems.append(
                f"it is, or is a member of, the owner role {self._owner_role!r} (database_owner_url), "
                "which can turn row-level security off"
            )
        if row.owned:
            problems.append(f"it owns tenant tables ({', '.join(row.owned)})")
        if problems:
            raise ConfigurationError(
                f"refusing to serve tenants with row-level security as role {row.app_role!r}: "
                + "; ".join(problems)
                + ". Use two roles: an owner role for DDL (database_owner_url: owns the tables, "
                "runs migrations and policies) and an application role for requests (database_url), "
                "e.g. CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS; the library grants it what it needs."
            )
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            await self._lock_setup(conn)
            await conn.execute(sa.text(f"REVOKE ALL ON FUNCTION {self.enter_function}(text) FROM PUBLIC"))
            await conn.execute(
                sa.text(f"GRANT EXECUTE ON FUNCTION {self.enter_function}(text) TO {_quote(row.app_role)}")
            )

    async def _lock_setup(self, conn: AsyncConnection) -> None:
        # Several processes start at once: their DDL on the same objects would collide.
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": self.policy}
        )

    def _enter_function_sql(self) -> str:
        # SECURITY DEFINER: reads the fence table, which the application role cannot.
        # It grants nothing a tenant session lacks: that role may set the setting
        # itself anyway (RLS here guards against mistakes in queries, see the docs).
        # VOLATILE: each query inside it sees what committed before it ran, so a move
        # that committed while this waited is seen. Names are quoted, settings validated.
        return f"""
CREATE OR REPLACE FUNCTION {self.enter_function}(tenant text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(hashtextextended('{self.policy}:' || tenant, 0)) THEN
        RAISE EXCEPTION 'tenant is not served by row-level security right now (moving or being deleted)'
            USING ERRCODE = '{UNAVAILABLE_SQLSTATE}';
    END IF;
    IF EXISTS (SELECT 1 FROM {self.fence_table} WHERE tenant_id = tenant) THEN
        RAISE EXCEPTION 'tenant is not served by row-level security right now (moved or deleted)'
            USING ERRCODE = '{UNAVAILABLE_SQLSTATE}';
    END IF;
    PERFORM set_config('{self.setting}', tenant, true);
    {self.shards.enter_sql()}
    RETURN 'ok';
END
$fn$"""  # noqa: S608

    def _catalog_params(self) -> dict[str, str]:
        return {
            "schema": self.schema,
            "column": self.column,
            "policy": self.policy,
            "app_role": self.app_role or self._owner_role or "public",
        }

    # -- policies --------------------------------------------------------------------

    def _tables(self, metadata: sa.MetaData | None) -> list[sa.Table]:
        tables = [] if metadata is None else [t for t in metadata.sorted_tables if t.schema is None]
        missing = [t.name for t in tables if self.column not in t.c]
        if missing:
            # Fail closed: such a table would be shared by every tenant, unguarded.
            raise ConfigurationError(
                f"tables {missing} have no {self.column!r} column: under row-level security every "
                "table of the app metadata is shared and must name each row's tenant "
                "(keep shared reference tables out of the app metadata)"
            )
        return tables

    async def apply(self, metadata: sa.MetaData) -> None:
        """Create the shared tables of `metadata` that are missing and guard each one (as owner).

        For every table: ENABLE and FORCE ROW LEVEL SECURITY, one policy for all
        commands (USING and WITH CHECK: the row's tenant is the bound tenant), a
        column default filling the tenant column from the binding, and DML grants
        to the application role. Idempotent, and sends DDL only for what is missing.
        """
        if self.app_role is None:
            raise ConfigurationError("call initialize() before apply()")
        tables = self._tables(metadata)
        if not tables:
            return
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            await self._lock_setup(conn)
            await conn.execution_options(schema_translate_map={None: self.schema})
            await self.shards.prepare(conn, metadata)  # on Citus: reference tables first
            await conn.run_sync(lambda sync: metadata.create_all(sync, tables=tables, checkfirst=True))
            rows = (await conn.execute(sa.text(_TABLE_STATE), self._catalog_params())).all()
            state = {row.name: row for row in rows}
            for table in tables:
                await self._guard(conn, state[table.name])
            await self.shards.distribute(conn)  # after the policies, which Citus copies to the shards

    async def migrated(self) -> None:
        """Guard the tenant tables migrations added: those of the shared schema with the tenant column.

        As `apply()` does for the tables it creates (policies, defaults, grants), from the
        catalog instead of a MetaData. Idempotent.
        """
        if self.app_role is None:
            raise ConfigurationError("call initialize() before migrated()")
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            await self._lock_setup(conn)
            for row in (await conn.execute(sa.text(_TABLE_STATE), self._catalog_params())).all():
                await self._guard(conn, row)
            await self.shards.distribute(conn)

    async def _guard(self, conn: AsyncConnection, row: Any) -> None:
        target = f"{_quote(self.schema)}.{_quote(row.name)}"
        column = _quote(self.column)
        # The column's type without its modifier: a cast to varchar(36) would truncate.
        bound = f"NULLIF(current_setting('{self.setting}', true), '')::{row.column_type}"
        statements = []
        if not row.enabled:
            statements.append(f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY")
        if not row.forced:  # or the owner would bypass the policy
            statements.append(f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY")
        if not row.has_policy:
            statements.append(
                f"CREATE POLICY {_quote(self.policy)} ON {target} AS PERMISSIVE FOR ALL TO PUBLIC "
                f"USING ({column} = {bound}) WITH CHECK ({column} = {bound})"
            )
        if not row.has_default:
            statements.append(f"ALTER TABLE {target} ALTER COLUMN {column} SET DEFAULT {bound}")
        if not row.granted:
            statements.append(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {target} TO {_quote(self.app_role or '')}"
            )
            for sequence in row.sequences or ():
                statements.append(
                    f"GRANT USAGE, SELECT ON SEQUENCE {sequence} TO {_quote(self.app_role or '')}"
                )
        for statement in statements:
            await conn.execute(sa.text(statement))

    async def diagnose(self) -> list[Finding]:
        problems = await self.verify()
        # On Citus: the cluster's rows (hybrid's schema tier shares them), then the tables'.
        citus = [*await self.cluster.diagnose(), *await self.shards.diagnose()] if self.shards.active else []
        if problems:
            return [("row-level security", "fail", "; ".join(problems[:20])), *citus]
        covered = "every shared tenant table is enabled, forced and covered"
        return [("row-level security", "ok", covered), *citus]

    async def verify(self, metadata: sa.MetaData | None = None) -> list[str]:
        """Problems of every tenant table (in the shared schema, having the tenant column).

        One line per problem: row-level security not enabled or not forced, a
        command (SELECT, INSERT, UPDATE, DELETE) no permissive policy covers, a
        permissive policy other than the library's (policies are OR-ed: it could let
        other tenants' rows through), or a table of `metadata` that does not exist.
        Empty when all is well. Read-only.
        """
        tables = self._tables(metadata)
        async with unavailable_as_503("tenant database"), self.owner_engine.connect() as conn:
            rows = (await conn.execute(sa.text(_TABLE_STATE), self._catalog_params())).all()
        problems = []
        found = {row.name for row in rows}
        for table in tables:
            if table.name not in found:
                problems.append(f"{self.schema}.{table.name}: table missing (run apply)")
        for row in rows:
            name = f"{self.schema}.{row.name}"
            if not row.enabled:
                problems.append(f"{name}: row-level security is not enabled")
            if not row.forced:
                problems.append(f"{name}: row-level security is not forced (its owner bypasses it)")
            commands = set(row.commands or ())
            for command, code in _COMMANDS.items():
                if code not in commands and "*" not in commands:
                    problems.append(f"{name}: no policy for {command}")
            for other in row.other_permissive or ():
                problems.append(f"{name}: permissive policy {other!r} widens the tenant policy")
        return problems

    # -- provisioning ----------------------------------------------------------------

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        """Nothing to create for the tenant itself: guard `metadata`'s shared tables (once).

        Refuses (`ProvisioningError`) when rows already carry the tenant's id, so a
        tenant never adopts rows it did not write (an old copy left by a tier move).
        """
        if metadata is not None:
            await self.apply(metadata)
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            tables = await self._table_names(conn)
            if not tables:
                return
            await self.bind_owner(conn, tenant)
            # Quoted names from the catalog, no input: one round trip for every table.
            query = " OR ".join(f"EXISTS (SELECT 1 FROM {t})" for t in tables)  # noqa: S608
            if await conn.scalar(sa.text(f"SELECT {query}")):
                raise ProvisioningError(
                    f"rows of tenant {tenant.identifier!r} already exist in the shared tables; refusing "
                    "to hand them over (remove the old copy first)"
                )

    async def destroy(self, tenant: Tenant) -> None:
        """Delete the tenant's rows from every tenant table (children first), as the owner.

        After the tenant's open transactions (each holds its lock from BEGIN; those that
        outstay `DESTROY_WAIT` are ended): a slow write of one would otherwise land after
        the DELETE. The tenant stays fenced off, so a request of it still in flight in
        another process (its cache not yet told) writes no row afterwards: a 503.
        """
        self._settings.pop(tenant.id, None)
        async with unavailable_as_503("tenant database"), self.owner_engine.begin() as conn:
            key = {"key": f"{self.policy}:{tenant.id}"}
            await end_after_wait(conn, _HOLD, advisory_holders(), key)
            await self.delete_rows(conn, tenant)
            await self.fence(conn, tenant, moved=True)

    async def delete_rows(self, conn: AsyncConnection, tenant: Tenant) -> None:
        """Delete `tenant`'s rows from every tenant table, on an owner connection in a transaction."""
        await self.bind_owner(conn, tenant)
        # The policies confine each DELETE to the bound tenant; never TRUNCATE, which
        # ignores them.
        for table in reversed(await self._table_names(conn)):
            await conn.execute(sa.text(f"DELETE FROM {table}"))  # noqa: S608 - names from the catalog, quoted

    async def bind_owner(self, conn: AsyncConnection, tenant: Tenant) -> None:
        """Bind an owner transaction to `tenant` (the owner is subject to the policies too)."""
        await conn.execute(
            sa.text("SELECT set_config(:name, :id, true)"), {"name": self.setting, "id": tenant.id}
        )
        await self.shards.bind(conn, tenant.id)  # on Citus: on the workers' connections too

    async def _table_names(self, conn: AsyncConnection) -> list[str]:
        """The quoted tenant tables, parents before children (foreign keys)."""
        rows = (await conn.execute(sa.text(_TABLE_STATE), self._catalog_params())).all()
        names = {row.oid: f"{_quote(self.schema)}.{_quote(row.name)}" for row in rows}
        parents = {row.oid: set(row.parents or ()) & set(names) - {row.oid} for row in rows}
        ordered: list[str] = []
        while parents:
            ready = sorted(oid for oid, needs in parents.items() if not needs) or sorted(parents)[:1]
            for oid in ready:
                ordered.append(names[oid])
                del parents[oid]
            for needs in parents.values():
                needs.difference_update(ready)
        return ordered

    # -- tier moves ------------------------------------------------------------------

    async def hold(self, conn: AsyncConnection, tenant: Tenant) -> None:
        """Wait until no transaction of `tenant` runs here, and keep new ones out (503) until commit."""
        await conn.execute(sa.text(_HOLD), {"key": f"{self.policy}:{tenant.id}"})

    async def fence(self, conn: AsyncConnection, tenant: Tenant, *, moved: bool) -> None:
        """Mark `tenant` as served elsewhere (`moved=True`, sessions here answer 503) or here again."""
        if moved:
            statement = f"INSERT INTO {self.fence_table} (tenant_id) VALUES (:id) ON CONFLICT DO NOTHING"  # noqa: S608
        else:
            statement = f"DELETE FROM {self.fence_table} WHERE tenant_id = :id"  # noqa: S608 - quoted name
        await conn.execute(sa.text(statement), {"id": tenant.id})


# The application role and every role it can become: superusers or BYPASSRLS ones, the
# owner role (it can turn RLS off), and tenant tables it owns.
_ROLE_CHECK = """
SELECT session_user::text AS app_role,
    ARRAY(SELECT r.rolname::text FROM pg_roles r
          WHERE (r.rolsuper OR r.rolbypassrls)
            AND (pg_has_role(session_user, r.oid, 'MEMBER') OR pg_has_role(current_user, r.oid, 'MEMBER'))
          ORDER BY 1) AS privileged,
    ARRAY(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :column AND NOT a.attisdropped
          WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND c.relname <> :policy || '_fence'
            AND (pg_has_role(session_user, c.relowner, 'MEMBER')
                 OR pg_has_role(current_user, c.relowner, 'MEMBER'))
          ORDER BY 1) AS owned,
    EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = :schema AND p.proname = :policy || '_enter'
              AND (pg_has_role(session_user, p.proowner, 'MEMBER')
                   OR pg_has_role(current_user, p.proowner, 'MEMBER'))) AS owner_member
"""

# Every tenant table of the shared schema (a table with the tenant column), with its
# RLS state, the commands its permissive policies cover, and its foreign-key parents.
_TABLE_STATE = """
SELECT c.oid, c.relname::text AS name, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
    format_type(a.atttypid, NULL) AS column_type,
    a.atthasdef AS has_default,
    EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = :policy) AS has_policy,
    ARRAY(SELECT DISTINCT p.polcmd::text FROM pg_policy p WHERE p.polrelid = c.oid AND p.polpermissive)
        AS commands,
    ARRAY(SELECT p.polname::text FROM pg_policy p
          WHERE p.polrelid = c.oid AND p.polpermissive AND p.polname <> :policy) AS other_permissive,
    ARRAY(SELECT DISTINCT f.confrelid FROM pg_constraint f WHERE f.conrelid = c.oid AND f.contype = 'f')
        AS parents,
    ARRAY(SELECT s.oid::regclass::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
          WHERE d.refobjid = c.oid AND s.relkind = 'S' AND d.deptype IN ('a', 'i')) AS sequences,
    (has_table_privilege(:app_role, c.oid, 'SELECT') AND has_table_privilege(:app_role, c.oid, 'INSERT')
     AND has_table_privilege(:app_role, c.oid, 'UPDATE')
     AND has_table_privilege(:app_role, c.oid, 'DELETE')) AS granted
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :column AND NOT a.attisdropped
WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND c.relname <> :policy || '_fence'
ORDER BY c.relname
"""
