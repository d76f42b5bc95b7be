"""What an Alembic `env.py` calls: run a migration inside one tenant's schema or database; read versions.

Tenant migrations and shared (registry, `public`) migrations live in two Alembic
script directories, each with its own `env.py` and version table. A tenant's
`env.py` is three lines:

    from alembic import context
    from fastapi_tenancy.migrations import run_tenant_migrations
    from myapp.models import Base

    run_tenant_migrations(context, Base.metadata)

`alembic --name tenant -x tenant=acme-corp upgrade head` then migrates one tenant;
`fastapi-tenancy migrate upgrade` (see `fastapi_tenancy.migrations.fleet`) migrates them all.
Where a tenant is migrated depends on its strategy (`targets.py`): its schema, its own
database, or, under row-level security, the shared tables, once for every tenant.
`alembic revision --autogenerate` compares the models with one tenant's tables (or the
shared ones) and nothing else (`autogenerate.py`).
Needs the `migrations` extra (Alembic).
"""

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

try:
    import alembic  # noqa: F401 - fail at import, naming the extra
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import MissingDependencyError

    raise MissingDependencyError("alembic", "migrations") from exc

from ..config import TenancyConfig
from ..isolation.base import storage_name
from .autogenerate import combine, shared_filters, tenant_filters
from .targets import RLS_VERSION_TABLE, VERSION_TABLE, MigrationTarget, library_tables

__all__ = [
    "CONNECTION_ATTRIBUTE",
    "DATABASE_ATTRIBUTE",
    "FLEET_ATTRIBUTE",
    "SCHEMA_ATTRIBUTE",
    "VERSION_TABLE_ATTRIBUTE",
    "read_database_version",
    "read_versions",
    "run_shared_migrations",
    "run_tenant_migrations",
    "tenant_schema",
]

CONNECTION_ATTRIBUTE = "connection"
"""`Config.attributes` key of a sync `Connection` to migrate on (the usual Alembic recipe)."""

SCHEMA_ATTRIBUTE = "tenancy_schema"
"""`Config.attributes` key of the schema to migrate; the fleet runner sets it."""

DATABASE_ATTRIBUTE = "tenancy_database"
"""`Config.attributes` key set (to the database's name) when the given connection is a
tenant's own database (database isolation): the migration runs in its default schema."""

VERSION_TABLE_ATTRIBUTE = "tenancy_version_table"
"""`Config.attributes` key of the version table's name, with `SCHEMA_ATTRIBUTE`: set by the
library for tenants sharing tables (`alembic_version_rls`); `alembic_version` when absent."""

FLEET_ATTRIBUTE = "tenancy_fleet"
"""`Config.attributes` key set to True when the library runs `env.py` (the fleet runner, a
registration): the env.py then leaves the application's logging alone (skip fileConfig)."""

# Transaction-local, like the request path: nothing outlives the migration's transaction.
_SET_SEARCH_PATH = "SELECT set_config('search_path', $1, true)"

# Every schema's Alembic version in ONE round trip: query_to_xml runs the per-schema
# SELECT server-side, guarded by to_regclass for schemas with no version table yet.
_VERSIONS = sa.text(
    """
    SELECT n.nspname AS schema,
           CASE WHEN to_regclass(format('%I.%I', n.nspname, CAST(:table AS text))) IS NULL THEN NULL
           ELSE ARRAY(
               SELECT CAST(x AS text) FROM unnest(xpath('//v/text()', query_to_xml(
                   format('SELECT version_num AS v FROM %I.%I', n.nspname, CAST(:table AS text)),
                   false, false, ''))) AS x)
           END AS versions
    FROM pg_namespace n
    WHERE n.nspname = ANY(:schemas)
    """
)


_MYSQL_VERSION_TABLE = sa.text(
    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = :t"
)


def _tenant_slug(context: Any) -> str:
    slug = context.get_x_argument(as_dictionary=True).get("tenant") or os.environ.get("TENANCY_TENANT")
    if not slug:
        raise ValueError(
            "no tenant to migrate: pass -x tenant=<slug> to alembic, or use `fastapi-tenancy migrate`"
        )
    return str(slug)


def tenant_schema(context: Any, config: TenancyConfig | None = None) -> str:
    """The schema (or database) an `env.py` run migrates: set by the library, or `-x tenant=<slug>`.

    Falls back to the `TENANCY_TENANT` environment variable (as `fastapi-tenancy run`
    sets it). Raises `ValueError` when none names a tenant: a tenant migration never
    silently runs against `public`. Under row-level security every tenant's answer is the
    shared schema; with hybrid isolation the tenant's tier is read from the registry.
    """
    attributes = context.config.attributes
    if attributes.get(SCHEMA_ATTRIBUTE):
        return str(attributes[SCHEMA_ATTRIBUTE])
    return _target_of(_tenant_slug(context), config or TenancyConfig()).name


def _target_of(slug: str, config: TenancyConfig) -> MigrationTarget:
    """Where `alembic -x tenant=<slug>` migrates: from the configuration, or the registry (hybrid)."""
    strategy = config.isolation_strategy
    name = storage_name(config.schema_prefix, slug)
    if strategy == "hybrid":
        return asyncio.run(_registered_target(slug, config))
    if strategy == "database" and config.backend != "sqlite":
        # The tenant's database on the configured server. A tenant with its own
        # (encrypted) database_url is reached through the fleet runner, which reads it.
        url = make_url(config.database_url).set(database=name).render_as_string(hide_password=False)
        return MigrationTarget(name, url)
    if strategy == "rls":
        return MigrationTarget("public", version_table=RLS_VERSION_TABLE, shared=True)
    return MigrationTarget(name)


async def _registered_target(slug: str, config: TenancyConfig) -> MigrationTarget:
    # Imported here: the manager is needed only to read a hybrid tenant's tier.
    from ..manager import TenancyManager
    from .targets import migration_target

    manager = TenancyManager(config)
    try:
        return migration_target(manager.isolation, await manager.get_tenant(slug))
    finally:
        await manager.close()


def _scope(connection: Connection, schema: str) -> None:
    connection.exec_driver_sql(_SET_SEARCH_PATH, (f'"{schema}"',))


def _run(
    context: Any,
    schema: str | None,
    configure: dict[str, Any],
    url: Callable[[], str],
    filters: Callable[[Connection], dict[str, Any]],
) -> None:
    """Configure `context` on the given or a new connection, scoped to `schema`, and migrate.

    `schema=None`: the connection is the tenant's own database; nothing is scoped.
    `url()`: where to connect when no connection is given (or to render, offline).
    `filters(connection)`: the autogenerate hooks for this environment.
    """
    if schema is not None:
        configure["version_table_schema"] = schema

    def migrate(connection: Connection) -> None:
        combine(configure, filters(connection))
        context.configure(connection=connection, **configure)
        with context.begin_transaction():
            # In the migration's transaction: unqualified names in migration scripts
            # (op.create_table without schema=) land in this schema and nowhere else.
            if schema is not None:
                _scope(connection, schema)
            context.run_migrations()

    if context.is_offline_mode():
        context.configure(url=url(), literal_binds=True, **configure)
        with context.begin_transaction():
            if schema is not None:
                context.execute(f'SET LOCAL search_path TO "{schema}"')
            context.run_migrations()
        return
    given = context.config.attributes.get(CONNECTION_ATTRIBUTE)
    if given is not None:
        migrate(given)
        return
    asyncio.run(_run_async(url(), migrate))


async def _run_async(url: str, migrate: Callable[[Connection], None]) -> None:
    from .._utils import create_engine

    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(migrate)
            await conn.commit()
    finally:
        await engine.dispose()


def run_tenant_migrations(
    context: Any,
    target_metadata: sa.MetaData | None = None,
    *,
    config: TenancyConfig | None = None,
    **configure: Any,
) -> None:
    """Run Alembic's migrations inside one tenant's schema (or database); call it from the tenant `env.py`.

    The schema comes from `tenant_schema()`. Its version table is
    `<schema>.alembic_version`, and the migration runs with a transaction-local
    `search_path` of that schema alone, so scripts written without `schema=`
    create and alter the tenant's tables. The connection is the one in
    `config.attributes["connection"]` if given, else a new one to
    `sqlalchemy.url` or `TENANCY_DATABASE_OWNER_URL`/`TENANCY_DATABASE_URL`. Extra
    keyword arguments go to `context.configure()` (e.g. `compare_type=True`). With
    database isolation the migration runs in the tenant's database (`-x tenant=<slug>`:
    the one named by `storage_name` on `TENANCY_DATABASE_URL`'s server; `sqlalchemy.url`
    is not used), its version table in that database's default schema. Under row-level
    security it runs once for every tenant, in `public`, with the version table
    `public.alembic_version_rls`.

    Autogenerate compares the metadata's tables without a schema with the tenant's
    tables, and nothing else: not the version table, not shared tables (declared with
    a schema), and under row-level security only the tables carrying the tenant column.
    """
    settings = _settings(config)
    configure.setdefault("target_metadata", target_metadata)
    attributes = context.config.attributes
    if attributes.get(DATABASE_ATTRIBUTE):
        # The library gives the tenant database's connection: the URL is not used.
        given = attributes.get(CONNECTION_ATTRIBUTE)
        where = given.engine.url.render_as_string(hide_password=False) if given else settings().database_url
        target = MigrationTarget(str(attributes[DATABASE_ATTRIBUTE]), where)
    elif attributes.get(SCHEMA_ATTRIBUTE):
        table = str(attributes.get(VERSION_TABLE_ATTRIBUTE) or VERSION_TABLE)
        target = MigrationTarget(
            str(attributes[SCHEMA_ATTRIBUTE]), version_table=table, shared=table == RLS_VERSION_TABLE
        )
    else:
        target = _target_of(_tenant_slug(context), settings())
    if target.version_table != VERSION_TABLE:
        configure.setdefault("version_table", target.version_table)
    shared_column = settings().rls_tenant_column if target.shared else None
    excluded = library_tables(settings()) if target.shared else {VERSION_TABLE, RLS_VERSION_TABLE}

    def filters(_connection: Connection) -> dict[str, Any]:
        metadata = configure.get("target_metadata")
        return tenant_filters(metadata, shared_column=shared_column, excluded=excluded)

    # A tenant database: its own URL, never sqlalchemy.url (which names the main database).
    own = target.url

    def url() -> str:
        return own if own is not None else _main_url(context, settings)

    _run(context, target.schema, configure, url, filters)


def _settings(config: TenancyConfig | None) -> Callable[[], TenancyConfig]:
    """`config`, or the environment's `TenancyConfig`, read when first asked for.

    The fleet runner gives the connection, the schema and the version table: a schema
    tenant's migration then needs no setting at all, and reading them (pydantic-settings
    parsing the environment) was the largest fixed cost of each tenant's migration.
    """
    read: list[TenancyConfig] = [] if config is None else [config]

    def settings() -> TenancyConfig:
        if not read:
            read.append(TenancyConfig())
        return read[0]

    return settings


def _main_url(context: Any, settings: Callable[[], TenancyConfig]) -> str:
    # Under rls and hybrid the owner role owns the tables: migrations run as it.
    given = context.config.get_main_option("sqlalchemy.url")
    if given:
        return str(given)
    config = settings()
    return str(config.database_owner_url or config.database_url)


def run_shared_migrations(
    context: Any,
    target_metadata: sa.MetaData | None = None,
    *,
    schema: str = "public",
    config: TenancyConfig | None = None,
    **configure: Any,
) -> None:
    """Run the shared migrations (tables every tenant sees) in `schema`; for the shared `env.py`.

    Their version table is `<schema>.alembic_version`, apart from every tenant's.
    Autogenerate compares the metadata's tables declared with `schema=<schema>` with
    that schema, leaving out the library's own tables (the registry, the audit log, the
    spares, the fleet's results) and, under row-level security, the tenants' tables.
    """
    settings = _settings(config)
    config = settings()
    configure.setdefault("target_metadata", target_metadata)
    shared_column = config.rls_tenant_column if config.isolation_strategy in ("rls", "hybrid") else None

    def filters(connection: Connection) -> dict[str, Any]:
        return shared_filters(
            configure.get("target_metadata"),
            schema=schema,
            default_schema=connection.dialect.default_schema_name,
            shared_column=shared_column,
            excluded=library_tables(config),
        )

    _run(context, schema, configure, lambda: _main_url(context, settings), filters)


async def read_versions(
    conn: Any, schemas: Iterable[str], *, version_table: str = "alembic_version"
) -> dict[str, tuple[str, ...] | None]:
    """Every schema's Alembic revision(s), in one query: `None` where there is no version table.

    `conn` is an `AsyncConnection` to PostgreSQL. Schemas that do not exist are
    missing from the result.
    """
    result = await conn.execute(_VERSIONS, {"schemas": list(schemas), "table": version_table})
    return {row.schema: (tuple(row.versions) if row.versions is not None else None) for row in result}


async def read_database_version(conn: Any) -> tuple[str, ...] | None:
    """The Alembic revision(s) in `conn`'s database (its default schema); `None` without a version table.

    For database isolation, where each tenant's version table is in its own database:
    PostgreSQL, or MySQL/MariaDB (where a database has no schemas).
    """
    if conn.dialect.name in ("mysql", "mariadb"):
        found = await conn.scalar(_MYSQL_VERSION_TABLE, {"t": VERSION_TABLE})
        if not found:
            return None
        return tuple((await conn.scalars(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))).all())  # noqa: S608
    schema = await conn.scalar(sa.text("SELECT current_schema()"))
    return (await read_versions(conn, [schema])).get(schema)
