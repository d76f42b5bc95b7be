"""`TenantRoles`: a PostgreSQL role per tenant schema, so privileges keep tenants apart too.

With schema isolation alone, a tenant's `search_path` is its schema, so unqualified names
never reach another tenant; a *qualified* name (`SELECT * FROM tenant_other.orders`, an
ORM model declared with `schema=`) still does, since one login role reads every schema.
With `schema_tenant_roles`, each tenant schema gets a `NOLOGIN` role that alone may use it,
and each tenant transaction runs as that role (`SET LOCAL ROLE`, in the `BEGIN` message:
no round trip of its own, and it ends with the transaction). PostgreSQL then refuses
(permission denied) any statement that names another tenant's schema.

The login role of `database_url` is a member of every tenant role, which is what lets one
pool serve every tenant, but must not *use* their privileges by itself: on PostgreSQL 16+
it is granted each role `WITH INHERIT FALSE`; before 16 it must be a `NOINHERIT` role
(checked at start). Schemas, roles and grants are made by the owner role
(`database_owner_url`, with `CREATEROLE`), so the login role owns no tenant schema: a
route's `RESET ROLE`, or code on `manager.engine` outside tenant sessions, lands on a role
that reads no tenant's data. Tenant roles are members of one group role per database
(`group`), to which the application grants the shared tables its tenants need.

Role names are cluster-wide, so they name the database too: `<schema>@<database>`, or a
hash of both where that would pass PostgreSQL's 63 bytes.
"""

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import unavailable_as_503
from ..errors import ConfigurationError
from .base import MAX_NAME_BYTES, Finding, quote_identifier

__all__ = ["ROLE_SWITCH", "TenantRoles", "group_name", "role_name"]

logger = logging.getLogger("fastapi_tenancy")

ROLE_SWITCH = "SET LOCAL ROLE "
"""How a tenant's `BEGIN` message switches role (`_begin.py` looks for it)."""

# Table-like relations (tables, partitioned tables, views such as the marker, matviews,
# foreign tables) and sequences: what the grants below cover.
_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
_GRANTS = (
    "GRANT USAGE ON SCHEMA {schema} TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
    # Tables and sequences the owner adds later (migrations run as it) are granted too.
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role}",
)
_LOGIN = sa.text(
    "SELECT r.rolname::text AS name, r.rolsuper AS superuser, r.rolinherit AS inherit, "
    "pg_catalog.current_database()::text AS database, "
    "pg_catalog.current_setting('server_version_num')::int AS version "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
)
_ROLE_EXISTS = sa.text("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :name")
_CAN_LOGIN = sa.text("SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = :name")
_DUPLICATE = ("42710", "23505")  # duplicate_object; unique_violation (a concurrent create)
_DEPENDENT_OBJECTS = "2BP01"
# Per tenant schema (those holding an incarnation marker), what its role lacks, and
# whether the login role reaches the schema by itself.
_CHECK = sa.text(
    "SELECT s.schema, s.role, r.oid IS NOT NULL AS role_exists, "
    "CASE WHEN r.oid IS NULL THEN false ELSE pg_catalog.pg_has_role(:login, r.oid, 'MEMBER') END AS member, "
    "CASE WHEN r.oid IS NULL THEN false ELSE pg_catalog.pg_has_role(r.oid, :group, 'MEMBER') END "
    "AS in_group, "
    "CASE WHEN r.oid IS NULL THEN false ELSE pg_catalog.has_schema_privilege(r.oid, n.oid, 'USAGE') END "
    "AS usage, "
    "CASE WHEN r.oid IS NULL THEN 0 ELSE (SELECT count(*) FROM pg_catalog.pg_class c "
    "WHERE c.relnamespace = n.oid AND ("
    "(c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT ("
    "pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT') "
    "AND pg_catalog.has_table_privilege(r.oid, c.oid, 'INSERT') "
    "AND pg_catalog.has_table_privilege(r.oid, c.oid, 'UPDATE') "
    "AND pg_catalog.has_table_privilege(r.oid, c.oid, 'DELETE'))) "
    "OR (c.relkind = 'S' AND NOT (pg_catalog.has_sequence_privilege(r.oid, c.oid, 'USAGE') "
    "AND pg_catalog.has_sequence_privilege(r.oid, c.oid, 'SELECT'))))) END AS ungranted, "
    "pg_catalog.has_schema_privilege(:login, n.oid, 'USAGE') AS login_reads, "
    "coalesce(r.rolcanlogin, false) AS can_login "
    "FROM unnest(CAST(:schemas AS text[]), CAST(:roles AS text[])) AS s(schema, role) "
    "JOIN pg_catalog.pg_namespace n ON n.nspname = s.schema "
    "LEFT JOIN pg_catalog.pg_roles r ON r.rolname = s.role ORDER BY 1"
)
# Tenant schemas: those holding an incarnation marker, under the prefix.
_TENANT_SCHEMAS = sa.text(
    "SELECT DISTINCT n.nspname::text FROM pg_catalog.pg_namespace n "
    "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind = 'v' "
    "AND c.relname LIKE 'fastapi\\_tenancy:%' WHERE n.nspname LIKE :pattern ORDER BY 1"
)


def _fit(name: str, *parts: str) -> str:
    # Readable when it fits; else a hash of the parts (no "@", so never equal to a readable name).
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]
    return f"fastapi_tenancy_{digest}"


def role_name(schema: str, database: str) -> str:
    """The role of tenant schema `schema` in database `database`: `<schema>@<database>`.

    Injective: schema names hold no `@`. Past 63 bytes, a hash of both.
    """
    return _fit(f"{schema}@{database}", schema, database)


def group_name(database: str) -> str:
    """The group role every tenant role of `database` is a member of: `tenants:<database>`."""
    return _fit(f"tenants:{database}", "tenants", database)


@dataclass(frozen=True)
class _Login:
    name: str
    database: str
    version: int


class TenantRoles:
    """Creates, checks and drops the roles of tenant schemas. Safe for concurrent use.

    `engine` is the login role's (whose connections switch to a tenant's role);
    `ddl_engine` the owner's, which must have `CREATEROLE`. `ready()` reads the login
    role once and refuses one that could read tenant schemas whatever the grants.
    """

    def __init__(self, engine: AsyncEngine, ddl_engine: AsyncEngine, *, prefix: str) -> None:
        if ddl_engine is engine:
            raise ConfigurationError(
                "schema_tenant_roles: tenant schemas must be owned by another role than the one "
                "requests log in as (set database_owner_url), or a route's RESET ROLE would read them all"
            )
        self.engine = engine
        self.ddl_engine = ddl_engine
        self.prefix = prefix
        self.on_citus = False
        """Set by the isolation on a Citus cluster: tenant roles may log in (`_allow_login`),
        and outlive their schema (`drop`)."""
        self._login: _Login | None = None

    async def ready(self) -> _Login:
        """Read (once) and check the login role, and make the group role. Idempotent."""
        if self._login is not None:
            return self._login
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            row = (await conn.execute(_LOGIN)).one()
        if row.superuser:
            raise ConfigurationError(
                f"schema_tenant_roles: the role of database_url ({row.name!r}) is a superuser, "
                "which reads every schema whatever the grants; use a plain login role"
            )
        if row.version < 160000 and row.inherit:
            # Before PostgreSQL 16 a membership cannot be granted without inheritance: an
            # INHERIT login role would read every tenant's schema with no SET ROLE.
            raise ConfigurationError(
                f"schema_tenant_roles: on PostgreSQL before 16 the role of database_url must be "
                f'NOINHERIT, or it reads every tenant\'s schema by itself: ALTER ROLE "{row.name}" NOINHERIT'
            )
        login = _Login(row.name, row.database, row.version)
        async with unavailable_as_503("tenant database"), self.ddl_engine.begin() as conn:
            await _create_role(conn, group_name(login.database))
        self._login = login
        return login

    def name(self, schema: str) -> str:
        """The role of tenant schema `schema` (call after `ready()`)."""
        assert self._login is not None  # ready() runs at initialize and before every grant
        return role_name(schema, self._login.database)

    @property
    def group(self) -> str:
        """The group role of every tenant role here: grant it the shared tables tenants use."""
        assert self._login is not None
        return group_name(self._login.database)

    def setting(self, schema: str) -> str:
        """The `BEGIN`-message SQL that makes a transaction run as `schema`'s role."""
        return f"{ROLE_SWITCH}{quote_identifier(self.name(schema))};"

    async def grant(self, conn: AsyncConnection, schema: str) -> None:
        """Create `schema`'s role if needed and grant it the schema, in `conn`'s (the owner's)
        transaction. Idempotent: also what repairs a role's grants."""
        login = await self.ready()
        role = self.name(schema)
        await _create_role(conn, role)
        if self.on_citus:
            await _allow_login(conn, role)
        quoted = quote_identifier(role)
        await conn.execute(sa.text(f"GRANT {quote_identifier(self.group)} TO {quoted}"))
        # The login role may become the tenant's role, never use its privileges unasked.
        inherit = " WITH INHERIT FALSE" if login.version >= 160000 else ""
        await conn.execute(sa.text(f"GRANT {quoted} TO {quote_identifier(login.name)}{inherit}"))
        for grant in _GRANTS:
            await conn.execute(sa.text(grant.format(schema=quote_identifier(schema), role=quoted)))

    async def drop(self, conn: AsyncConnection, schema: str) -> None:
        """Drop `schema`'s role, in `conn`'s transaction, after the schema was dropped.

        A role still holding privileges elsewhere (granted by hand, or in another
        database) is left, with a warning: it reaches no tenant data once its schema is
        gone, and a tenant registered under the slug again reuses it.
        """
        await self.ready()
        if self.on_citus:
            # Kept: coordinator backends keep their connections to the workers open, logged
            # in as this role by name; a role dropped and made again under that name is
            # another role there, and a slug registered again would be refused ("permission
            # denied for schema") on those connections. It holds nothing once its schema is
            # gone, and a tenant registered under the slug again reuses it.
            return
        role = quote_identifier(self.name(schema))
        try:
            async with conn.begin_nested():
                await conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        except sa_exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _DEPENDENT_OBJECTS:
                raise
            logger.warning("tenant role %s was not dropped: %s", role, exc.orig)

    async def schemas(self) -> list[str]:
        """The tenant schemas here (those holding an incarnation marker)."""
        pattern = self.prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
        async with unavailable_as_503("tenant database"), self.ddl_engine.connect() as conn:
            return list((await conn.scalars(_TENANT_SCHEMAS, {"pattern": pattern})).all())

    async def diagnose(self) -> Finding:
        """One finding for `doctor`: every tenant schema's role exists, is granted the schema,
        its tables and sequences, and the login role reaches no tenant schema by itself."""
        login = await self.ready()
        schemas = await self.schemas()
        problems = await self._problems(login, schemas)
        if problems:
            more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
            shown = "; ".join(problems[:20]) + more
            return "tenant roles", "fail", f"{shown} (repair with `fastapi-tenancy tenants grants`)"
        return "tenant roles", "ok", f"{len(schemas)} tenant schemas, each used by its own role only"

    async def _problems(self, login: _Login, schemas: Sequence[str]) -> list[str]:
        roles = [self.name(s) for s in schemas]
        params = {"schemas": list(schemas), "roles": roles, "login": login.name, "group": self.group}
        async with unavailable_as_503("tenant database"), self.ddl_engine.connect() as conn:
            rows = (await conn.execute(_CHECK, params)).all()
        problems = []
        for row in rows:
            if row.login_reads:
                problems.append(f"{row.schema}: the login role {login.name!r} uses it without a tenant role")
            if not row.role_exists:
                problems.append(f"{row.schema}: role {row.role!r} is missing")
                continue
            lacking = [
                what
                for what, missing in (
                    (f"membership of {login.name!r}", not row.member),
                    ("USAGE on the schema", not row.usage),
                    (f"{row.ungranted} tables or sequences", row.ungranted),
                    (f"the group {self.group!r}", not row.in_group),
                    ("LOGIN, which Citus connects to the workers with", self.on_citus and not row.can_login),
                )
                if missing
            ]
            if lacking:
                problems.append(f"{row.schema}: role {row.role!r} lacks {', '.join(lacking)}")
        return problems

    async def repair(self) -> list[str]:
        """Grant every tenant schema's role what `grant()` would; the schemas it changed."""
        login = await self.ready()
        schemas = await self.schemas()
        broken = {p.split(":", 1)[0] for p in await self._problems(login, schemas)}
        for schema in sorted(broken):
            async with unavailable_as_503("tenant database"), self.ddl_engine.begin() as conn:
                # A login role that owns the schema, or was granted it directly, keeps that:
                # only the owner's grants are repaired here.
                await self.grant(conn, schema)
        return sorted(broken)


async def _create_role(conn: AsyncConnection, role: str) -> None:
    if await conn.scalar(_ROLE_EXISTS, {"name": role}):
        return
    try:
        async with conn.begin_nested():
            await conn.execute(sa.text(f"CREATE ROLE {quote_identifier(role)} NOLOGIN"))
    except sa_exc.DBAPIError as exc:
        # Made meanwhile by another process (roles are cluster-wide).
        if getattr(exc.orig, "sqlstate", None) not in _DUPLICATE:
            raise


async def _allow_login(conn: AsyncConnection, role: str) -> None:
    """Let tenant role `role` log in: what a Citus coordinator needs of it (on every node).

    Citus runs a statement's part on a worker over a connection it opens as the
    *current* user, the tenant's role inside a tenant transaction: a NOLOGIN role is
    refused there ("not permitted to log in"). No password is set, so nobody logs in as
    it with password authentication; the workers must accept the coordinator's
    connections for it as they do for the login role (trust for the coordinator's
    address, certificates, or `pg_dist_authinfo`): docs/scaling-out.md.
    """
    if await conn.scalar(_CAN_LOGIN, {"name": role}):
        return
    # ALTER ROLE on the coordinator reaches every worker (and nodes added later).
    await conn.execute(sa.text(f"ALTER ROLE {quote_identifier(role)} LOGIN"))
