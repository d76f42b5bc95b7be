"""`Stamper`: a tenant registered while migrations are configured starts at the head revision.

`register_tenant(app_metadata=...)` creates a tenant's tables with `create_all` (or
clones the template). Without a revision in its version table, the first
`fastapi-tenancy migrate upgrade` would run every migration on tables that already exist
and fail (`relation "user" already exists`). With `alembic_config` set, each registration
ends, once the storage is provisioned, with one of three outcomes:

* `kept`: the storage already has a revision (a clone of a template that the fleet
  migrated, a spare, the shared tables of row-level security after the first tenant);
* `stamped`: it has tables but no revision (made from `app_metadata`, or cloned from a
  template built by `build_template()`): the head revision(s) are written into its
  version table, one row, as `alembic stamp head` would; the tables were made from the
  models, which are the head;
* `migrated`: it has no tables at all (registered without `app_metadata` or a template,
  as `fastapi-tenancy tenants create` does): the migrations run, here, to head.

The head is read from the scripts once per process, at the first registration.
"""

import asyncio
import weakref
from typing import Any, Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import create_engine, unavailable_as_503
from ..config import TenancyConfig
from ..errors import ConfigurationError
from ..isolation.base import Isolation, quote_identifier
from ..tenant import Tenant
from .env import (
    CONNECTION_ATTRIBUTE,
    DATABASE_ATTRIBUTE,
    FLEET_ATTRIBUTE,
    SCHEMA_ATTRIBUTE,
    VERSION_TABLE_ATTRIBUTE,
)
from .targets import MigrationTarget, library_tables, migration_target

__all__ = ["Outcome", "Stamper"]

Outcome = Literal["kept", "stamped", "migrated"]

# Where the target stands, in one round trip: whether its version table holds a revision
# (query_to_xml reads it server-side, guarded by to_regclass), and whether it has tables
# (under row-level security: tables carrying the tenant column, the library's aside).
_STATE = sa.text(
    """
    SELECT CASE WHEN to_regclass(format('%I.%I', s.name, CAST(:vt AS text))) IS NULL THEN false
           ELSE CAST(CAST((xpath('/row/n/text()', query_to_xml(
                format('SELECT count(*) AS n FROM %I.%I', s.name, CAST(:vt AS text)), false, true, '')))[1]
                AS text) AS integer) > 0
           END AS versioned,
           EXISTS (SELECT 1 FROM pg_class c
                    WHERE c.relnamespace = to_regnamespace(quote_ident(s.name)) AND c.relkind IN ('r', 'p')
                      AND c.relname <> ALL(CAST(:skip AS text[]))
                      AND (CAST(:column AS text) IS NULL OR EXISTS (
                           SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = c.oid AND a.attname = :column AND NOT a.attisdropped))
           ) AS has_tables
    FROM (SELECT coalesce(CAST(:schema AS text), current_schema()) AS name) AS s
    """
)

# Tenants sharing tables share one version table: registrations stamp it one at a time.
_SHARED_LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")

# Alembic's module-level `context` and `op` serve one migration at a time per process.
_turns: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()


def _alembic_turn() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _turns.get(loop)
    if lock is None:
        lock = _turns[loop] = asyncio.Lock()
    return lock


class Stamper:
    """Brings each newly provisioned tenant to the head revision. Safe for concurrent use.

        stamper = Stamper("alembic.ini", engine=engine, config=config)
        await stamper.after_provision(manager.isolation, tenant)  # "kept", "stamped" or "migrated"

    The manager builds one when `alembic_config` is set and its registrations call it.
    `engine` reaches the main database as the role that owns the tenants' tables (the
    owner role under rls and hybrid); a tenant with a database of its own is reached at
    its URL. Stamps are one short transaction each; migrations run here (storage with
    no tables) take turns within the process, as Alembic keeps its state in globals.
    """

    def __init__(
        self, alembic_ini: str, *, engine: AsyncEngine, config: TenancyConfig, section: str = "tenant"
    ) -> None:
        self.alembic_ini = alembic_ini
        self.section = section
        self.engine = engine
        self._column = config.rls_tenant_column
        self._library = sorted(library_tables(config))
        self._heads: tuple[str, ...] | None = None

    def _config(self) -> Config:
        try:
            return Config(self.alembic_ini, ini_section=self.section)
        except Exception as exc:  # a missing file, a missing section
            raise ConfigurationError(f"alembic_config {self.alembic_ini!r}: {exc}") from exc

    def heads(self) -> tuple[str, ...]:
        """The head revision(s) of the tenant scripts, read once and kept for the process's life."""
        if self._heads is None:
            try:
                script = ScriptDirectory.from_config(self._config())
                self._heads = tuple(sorted(script.get_heads()))
            except ConfigurationError:
                raise
            except Exception as exc:
                raise ConfigurationError(
                    f"cannot read the tenant migrations of alembic_config {self.alembic_ini!r}: {exc}"
                ) from exc
        return self._heads

    async def after_provision(self, isolation: Isolation, tenant: Tenant) -> Outcome:
        """Keep, stamp or migrate `tenant`'s freshly provisioned storage (see the module docstring)."""
        target = migration_target(isolation, tenant)
        heads = self.heads()
        if not heads:
            return "kept"  # no revisions yet: nothing to stamp or run
        if target.url is None:
            outcome = await self._bring(self.engine, target, heads)
        else:
            engine = create_engine(target.url, null_pool=True)
            try:
                outcome = await self._bring(engine, target, heads)
            finally:
                await engine.dispose()
        if outcome == "migrated":
            await isolation.serving(tenant).migrated()  # row-level security guards the new tables
        return outcome

    async def _bring(self, engine: AsyncEngine, target: MigrationTarget, heads: tuple[str, ...]) -> Outcome:
        async with unavailable_as_503("tenant database"), engine.connect() as conn:
            async with conn.begin():
                state = await self._state(conn, target)
                if state.versioned:
                    return "kept"
                if state.has_tables:
                    await self._stamp(conn, target, heads)
                    return "stamped"
            async with _alembic_turn(), conn.begin():
                if (await self._state(conn, target)).versioned:  # another registration was first
                    return "kept"
                await conn.run_sync(self._upgrade, target)
        return "migrated"

    async def _state(self, conn: AsyncConnection, target: MigrationTarget) -> Any:
        if target.shared:
            await conn.execute(_SHARED_LOCK, {"key": f"fastapi_tenancy.stamp:{target.name}"})
        params = {
            "schema": target.schema,
            "vt": target.version_table,
            "skip": [target.version_table, *(self._library if target.shared else ())],
            "column": self._column if target.shared else None,
        }
        return (await conn.execute(_STATE, params)).one()

    async def _stamp(self, conn: AsyncConnection, target: MigrationTarget, heads: tuple[str, ...]) -> None:
        # The table exactly as Alembic creates it, so the stamped schema and a migrated one
        # have the same catalog.
        table = quote_identifier(target.version_table)
        if target.schema is not None:
            table = f"{quote_identifier(target.schema)}.{table}"
        constraint = quote_identifier(f"{target.version_table}_pkc")
        await conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {table} (version_num VARCHAR(32) NOT NULL, "
                f"CONSTRAINT {constraint} PRIMARY KEY (version_num))"
            )
        )
        await conn.execute(
            sa.text(f"INSERT INTO {table} (version_num) SELECT unnest(CAST(:heads AS text[]))"),  # noqa: S608
            {"heads": list(heads)},
        )

    def _upgrade(self, connection: Connection, target: MigrationTarget) -> None:
        alembic = self._config()
        where: dict[str, Any]
        if target.schema is None:
            where = {DATABASE_ATTRIBUTE: target.name}
        else:
            where = {SCHEMA_ATTRIBUTE: target.schema, VERSION_TABLE_ATTRIBUTE: target.version_table}
        # FLEET_ATTRIBUTE: the env.py leaves the application's logging configuration alone.
        alembic.attributes.update({FLEET_ATTRIBUTE: True, CONNECTION_ATTRIBUTE: connection, **where})
        command.upgrade(alembic, "head")
