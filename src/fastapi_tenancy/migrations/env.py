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
With `isolation_strategy="database"` a tenant is migrated in its own database, with
the version table in that database's default schema.
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

__all__ = [
    "CONNECTION_ATTRIBUTE",
    "DATABASE_ATTRIBUTE",
    "FLEET_ATTRIBUTE",
    "SCHEMA_ATTRIBUTE",
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

FLEET_ATTRIBUTE = "tenancy_fleet"
"""`Config.attributes` key set to True when the fleet runner runs `env.py` (e.g. skip fileConfig)."""

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


def _tenant_slug(context: Any) -> str:
    slug = context.get_x_argument(as_dictionary=True).get("tenant") or os.environ.get("TENANCY_TENANT")
    if not slug:
        raise ValueError(
            "no tenant to migrate: pass -x tenant=<slug> to alembic, or use `fastapi-tenancy migrate`"
        )
    return str(slug)


def tenant_schema(context: Any, config: TenancyConfig | None = None) -> str:
    """The schema an `env.py` run migrates: set by the fleet runner, or `-x tenant=<slug>`.

    Falls back to the `TENANCY_TENANT` environment variable (as `fastapi-tenancy run`
    sets it). Raises `ValueError` when none names a tenant: a tenant migration never
    silently runs against `public`.
    """
    attributes = context.config.attributes
    if attributes.get(SCHEMA_ATTRIBUTE):
        return str(attributes[SCHEMA_ATTRIBUTE])
    prefix = (config or TenancyConfig()).schema_prefix
    return storage_name(prefix, _tenant_slug(context))


def _scope(connection: Connection, schema: str) -> None:
    connection.exec_driver_sql(_SET_SEARCH_PATH, (f'"{schema}"',))


def _run(
    context: Any,
    schema: str | None,
    configure: dict[str, Any],
    fallback_url: str,
    *,
    url: str | None = None,
) -> None:
    """Configure `context` on the given or a new connection, scoped to `schema`, and migrate.

    `schema=None`: the connection is the tenant's own database; nothing is scoped.
    """
    if schema is not None:
        configure["version_table_schema"] = schema

    def migrate(connection: Connection) -> None:
        context.configure(connection=connection, **configure)
        with context.begin_transaction():
            # In the migration's transaction: unqualified names in migration scripts
            # (op.create_table without schema=) land in this schema and nowhere else.
            if schema is not None:
                _scope(connection, schema)
            context.run_migrations()

    url = url or context.config.get_main_option("sqlalchemy.url") or fallback_url
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, **configure)
        with context.begin_transaction():
            if schema is not None:
                context.execute(f'SET LOCAL search_path TO "{schema}"')
            context.run_migrations()
        return
    given = context.config.attributes.get(CONNECTION_ATTRIBUTE)
    if given is not None:
        migrate(given)
        return
    asyncio.run(_run_async(url, migrate))


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
    `sqlalchemy.url` or `TENANCY_DATABASE_URL`. Extra keyword arguments go to
    `context.configure()` (e.g. `compare_type=True`). With database isolation the
    migration runs in the tenant's database (`-x tenant=<slug>`: the one named by
    `storage_name` on `TENANCY_DATABASE_URL`'s server; `sqlalchemy.url` is not used),
    its version table in that database's default schema.
    """
    config = config or TenancyConfig()
    configure.setdefault("target_metadata", target_metadata)
    if context.config.attributes.get(DATABASE_ATTRIBUTE):
        _run(context, None, configure, config.database_url)  # the fleet runner's tenant database
        return
    if config.isolation_strategy == "database" and config.backend != "sqlite":
        # The tenant's database on the configured server. A tenant with its own
        # (encrypted) database_url is reached through the fleet runner, which reads it.
        name = storage_name(config.schema_prefix, _tenant_slug(context))
        url = make_url(config.database_url).set(database=name).render_as_string(hide_password=False)
        _run(context, None, configure, config.database_url, url=url)
        return
    _run(context, tenant_schema(context, config), configure, config.database_url)


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
    """
    configure.setdefault("target_metadata", target_metadata)
    _run(context, schema, configure, (config or TenancyConfig()).database_url)


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

    For database isolation, where each tenant's version table is in its own database.
    """
    schema = await conn.scalar(sa.text("SELECT current_schema()"))
    return (await read_versions(conn, [schema])).get(schema)
