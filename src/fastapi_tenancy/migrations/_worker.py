"""The fleet runner's worker process: migrates one tenant at a time, in an interpreter of its own.

Alembic keeps its `context` and `op` proxies in module globals; two migrations sharing
one interpreter (threads, or coroutines interleaving on `run_sync`) would send one
tenant's operations to the other's connection. So `FleetMigrator` starts these
processes (`spawn`), each with an event loop, a one-connection pool and the Alembic
config, and hands each one tenant at a time: its globals belong to that tenant.

Each tenant migrates in one transaction with its own `lock_timeout` and
`statement_timeout`. A schema tenant's result row is written in that same
transaction; a failure is rolled back and recorded as `failed` with its error.
"""

import asyncio
import time
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from .._utils import create_engine
from .env import (
    CONNECTION_ATTRIBUTE,
    DATABASE_ATTRIBUTE,
    FLEET_ATTRIBUTE,
    SCHEMA_ATTRIBUTE,
    VERSION_TABLE_ATTRIBUTE,
    read_database_version,
    read_versions,
)
from .results import Direction, ResultsTables, error_text, join_versions

__all__ = ["Worker", "init_worker", "migrate_in_worker"]

_current: "Worker | None" = None


class Worker:
    """One per worker process: an event loop, a one-connection pool and the Alembic config.

    `settings` is a dictionary (it crosses the process boundary by pickling): the
    database URL, the Alembic ini file and section, the results schema and the two
    timeouts.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(settings["url"], pool_size=1, max_overflow=0)
        self.alembic = Config(settings["ini"], ini_section=settings["section"])
        self.alembic.attributes[FLEET_ATTRIBUTE] = True
        self.tables = ResultsTables(settings["results_schema"])

    def migrate(
        self,
        run_id: str,
        tenant: str,
        schema: str,
        direction: Direction,
        target: str,
        url: str | None,
        version_table: str = "alembic_version",
    ) -> dict[str, Any]:
        """Migrate one tenant (in its own database when `url` is given); the result as a dictionary."""
        if url is not None:
            return self.loop.run_until_complete(
                self._migrate_database(run_id, tenant, schema, direction, target, url)
            )
        return self.loop.run_until_complete(
            self._migrate(run_id, tenant, schema, direction, target, version_table)
        )

    async def _migrate_database(
        self, run_id: str, tenant: str, database: str, direction: Direction, target: str, url: str
    ) -> dict[str, Any]:
        """Database isolation: migrate in the tenant's database, then record in the registry's.

        Two databases, so two transactions: a crash between them leaves a migrated tenant
        without its `ok` row, and the next run finds it at the target and skips it.
        """
        settings = self.settings
        started = time.perf_counter()
        before: tuple[str, ...] | None = None
        engine = create_engine(url, null_pool=True)
        try:
            async with engine.connect() as conn, conn.begin():
                await conn.exec_driver_sql(
                    "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
                    (settings["lock_timeout"], settings["statement_timeout"]),
                )
                before = await read_database_version(conn)
                await conn.run_sync(self._alembic, {DATABASE_ATTRIBUTE: database}, direction, target)
                after = await read_database_version(conn)
        except Exception as exc:
            result = _failed(before, started, exc)
        else:
            result = _migrated(before, after, started)
        finally:
            await engine.dispose()
        try:
            async with self.engine.begin() as conn:
                await self.tables.record(conn, run_id, tenant, result)
        except Exception as record_exc:
            note = f"recording the result failed: {error_text(record_exc)}"
            result["error"] = f"{result['error']} ({note})" if result["error"] else note
        return result

    async def _migrate(
        self, run_id: str, tenant: str, schema: str, direction: Direction, target: str, version_table: str
    ) -> dict[str, Any]:
        settings = self.settings
        started = time.perf_counter()
        before: tuple[str, ...] | None = None
        result: dict[str, Any]
        try:
            async with self.engine.connect() as conn, conn.begin():
                # Transaction-local: the timeouts and the search_path end with this tenant.
                await conn.exec_driver_sql(
                    "SELECT set_config('search_path', $1, true), set_config('lock_timeout', $2, true), "
                    "set_config('statement_timeout', $3, true)",
                    (f'"{schema}"', settings["lock_timeout"], settings["statement_timeout"]),
                )
                before = (await read_versions(conn, [schema], version_table=version_table)).get(schema)
                where = {SCHEMA_ATTRIBUTE: schema, VERSION_TABLE_ATTRIBUTE: version_table}
                await conn.run_sync(self._alembic, where, direction, target)
                after = (await read_versions(conn, [schema], version_table=version_table)).get(schema)
                result = _migrated(before, after, started)
                # In the migration's transaction: recorded ok if and only if migrated.
                await self.tables.record(conn, run_id, tenant, result)
        except Exception as exc:
            result = _failed(before, started, exc)
            try:
                async with self.engine.begin() as conn:
                    await self.tables.record(conn, run_id, tenant, result)
            except Exception as record_exc:  # the migration's error matters more
                result["error"] += f" (and recording it failed: {error_text(record_exc)})"
        return result

    def _alembic(
        self, connection: Connection, where: dict[str, str], direction: Direction, target: str
    ) -> None:
        attributes = {CONNECTION_ATTRIBUTE: connection, **where}
        self.alembic.attributes.update(attributes)
        try:
            if direction == "upgrade":
                command.upgrade(self.alembic, target)
            else:
                command.downgrade(self.alembic, target)
        finally:
            for key in attributes:
                self.alembic.attributes.pop(key, None)


def init_worker(settings: dict[str, Any]) -> None:
    """The process pool's initializer: this process's `Worker`."""
    global _current
    _current = Worker(settings)


def migrate_in_worker(
    run_id: str,
    tenant: str,
    schema: str,
    direction: Direction,
    target: str,
    url: str | None,
    version_table: str = "alembic_version",
) -> dict[str, Any]:
    """What the orchestrator submits to the pool: one tenant, migrated by this process's `Worker`."""
    assert _current is not None  # set by the pool's initializer
    return _current.migrate(run_id, tenant, schema, direction, target, url, version_table)


def _migrated(
    before: tuple[str, ...] | None, after: tuple[str, ...] | None, started: float
) -> dict[str, Any]:
    """The result of a tenant migrated from revision `before` to `after`."""
    return {
        "status": "ok",
        "from_revision": join_versions(before),
        "to_revision": join_versions(after),
        "duration": time.perf_counter() - started,
        "error": None,
    }


def _failed(before: tuple[str, ...] | None, started: float, exc: BaseException) -> dict[str, Any]:
    """The result of a tenant whose migration raised `exc`, from revision `before`."""
    return {
        "status": "failed",
        "from_revision": join_versions(before),
        "to_revision": None,
        "duration": time.perf_counter() - started,
        "error": error_text(exc),
    }
