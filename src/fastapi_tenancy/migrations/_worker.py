"""The fleet runner's worker process: migrates one tenant at a time, in an interpreter of its own.

Alembic keeps its `context` and `op` proxies in module globals; two migrations sharing
one interpreter (threads, or coroutines interleaving on `run_sync`) would send one
tenant's operations to the other's connection. So `FleetMigrator` starts these
processes (`worker_context`: forked from a fork server), each with an event loop, a
one-connection pool and the Alembic config, and hands each one tenant at a time: its
globals belong to that tenant.

Each tenant migrates in one transaction with its own `lock_timeout` and
`statement_timeout`. A schema tenant's result row is written in that same
transaction; a failure is rolled back and recorded as `failed` with its error.
"""

import asyncio
import math
import multiprocessing
import os
import re
import time
from multiprocessing.context import BaseContext
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import create_engine
from ..errors import ConfigurationError
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

__all__ = [
    "Worker",
    "init_worker",
    "migrate_in_worker",
    "mysql_timeouts",
    "seconds",
    "worker_context",
    "worker_settings",
]

_current: "Worker | None" = None

# Transaction-local: the timeouts end with the tenant's migration.
_PG_TIMEOUTS = "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)"


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
        # Read once per process: `command.upgrade` would read the scripts directory and
        # import every revision file again for each tenant.
        self.script = ScriptDirectory.from_config(self.alembic)
        self.tables = ResultsTables(settings["results_schema"], mysql=settings.get("mysql", False))

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
        where = {DATABASE_ATTRIBUTE: database}
        try:
            if engine.dialect.name in ("mysql", "mariadb"):
                before, after = await self._migrate_mysql(engine, where, direction, target)
            else:
                async with engine.connect() as conn, conn.begin():
                    await conn.exec_driver_sql(
                        _PG_TIMEOUTS, (settings["lock_timeout"], settings["statement_timeout"])
                    )
                    before = await read_database_version(conn)
                    await conn.run_sync(self._alembic, where, direction, target)
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

    async def _migrate_mysql(
        self, engine: AsyncEngine, where: dict[str, str], direction: Direction, target: str
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        """A MySQL/MariaDB tenant database: its revisions before and after, migrated by Alembic.

        MySQL commits every DDL statement on the spot, so one transaction around the whole
        migration would be a fiction: Alembic commits each revision with its version
        stamp instead (it does so when the connection is not in a transaction), and a
        failure leaves the tenant at the last revision that completed, recorded as such.
        The timeouts are session settings of a connection used for this tenant alone.
        """
        async with engine.connect() as conn:
            for statement in mysql_timeouts(
                self.settings["lock_timeout"], self.settings["statement_timeout"], mariadb=_is_mariadb(conn)
            ):
                await conn.exec_driver_sql(statement)
            before = await read_database_version(conn)
            await conn.commit()  # out of the autobegun transaction: Alembic's commits are real
            await conn.run_sync(self._alembic, where, direction, target)
            after = await read_database_version(conn)
            await conn.commit()
        return before, after

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
                # Alembic succeeded, so the version table exists: read it plainly (the catalog
                # query `read_versions` runs is several times slower after DDL in the same
                # transaction).
                table = ".".join(map(conn.dialect.identifier_preparer.quote, (schema, version_table)))
                after = tuple((await conn.scalars(sa.text(f"SELECT version_num FROM {table}"))).all())  # noqa: S608
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
        if ":" in target:  # as the commands say: a range is for --sql mode only
            raise CommandError("Range revision not allowed")
        attributes = {CONNECTION_ATTRIBUTE: connection, **where}
        self.alembic.attributes.update(attributes)
        script = self.script

        # What `command.upgrade` and `command.downgrade` do, on this process's scripts.
        def steps(heads: Any, _context: MigrationContext) -> Any:
            if direction == "upgrade":
                return script._upgrade_revs(target, heads)
            return script._downgrade_revs(target, heads)

        try:
            with EnvironmentContext(self.alembic, script, fn=steps, destination_rev=target):
                script.run_env()
        finally:
            for key in attributes:
                self.alembic.attributes.pop(key, None)


def _is_mariadb(conn: AsyncConnection) -> bool:
    return bool(getattr(conn.dialect, "is_mariadb", False))


_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(timeout: str) -> float | None:
    """A PostgreSQL-style timeout (`5s`, `500ms`, `2min`; a bare number is milliseconds) in
    seconds; None for `0` (no timeout). Raises `ConfigurationError` for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?\s*", timeout)
    if match is None:
        raise ConfigurationError(f"not a timeout: {timeout!r:.40} (use e.g. 5s, 500ms, 2min or 0)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "ms"]
    return value or None


def mysql_timeouts(lock_timeout: str, statement_timeout: str, *, mariadb: bool) -> list[str]:
    """The session settings that give a MySQL/MariaDB connection the fleet's two timeouts.

    `lock_timeout` bounds the wait for metadata locks (DDL behind a long transaction) and
    row locks, in whole seconds (at least one); `statement_timeout` is MariaDB's
    `max_statement_time`, and MySQL's `max_execution_time`, which bounds SELECTs only.
    """
    statements = []
    lock = seconds(lock_timeout)
    if lock is not None:
        whole = max(1, math.ceil(lock))
        statements += [
            f"SET SESSION lock_wait_timeout = {whole}",
            f"SET SESSION innodb_lock_wait_timeout = {whole}",
        ]
    statement = seconds(statement_timeout)
    if statement is not None:
        if mariadb:
            statements.append(f"SET SESSION max_statement_time = {statement:.3f}")
        else:
            statements.append(f"SET SESSION max_execution_time = {max(1, round(statement * 1000))}")
    return statements


def worker_context() -> BaseContext:
    """How the runner starts its workers: forked from a server process that imported them once.

    A fresh interpreter per worker (`spawn`) imports the package, SQLAlchemy and Alembic:
    about a second of CPU each, which on a small machine was more than the migrations of
    hundreds of tenants. `forkserver` imports them once, in a clean single-threaded process
    started for that purpose, and forks each worker from it, never from the runner (whose
    event loop and threads make forking it unsafe). `spawn` where there is no forkserver.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The CLI is the usual runner: its main script is imported again in each worker.
    context.set_forkserver_preload([__name__, "fastapi_tenancy.cli"])
    return context


def worker_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings`, with what a worker must share with the runner *now*: environment, directory.

    A forked worker inherits them from the fork server, which may have started for an
    earlier run: `init_worker` puts the runner's current ones in place.
    """
    return {**settings, "environ": dict(os.environ), "cwd": os.getcwd()}


def init_worker(settings: dict[str, Any]) -> None:
    """The process pool's initializer: this process's `Worker`."""
    global _current
    if "environ" in settings:
        os.environ.clear()
        os.environ.update(settings["environ"])
    if "cwd" in settings:
        os.chdir(settings["cwd"])
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
