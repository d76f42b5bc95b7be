"""`FleetMigrator`: upgrade or downgrade every tenant's schema or database, concurrently and resumably.

The orchestrator: it plans the run, holds the locks, runs the waves and builds the
report. Beside it, `results.py` holds the report types and the results tables, and
`_worker.py` the process that migrates one tenant at a time.

How a run goes, and why:

1. The registry lists the tenants; ONE catalog query reads every tenant schema's
   Alembic version (`env.read_versions`). Tenants already at the target are
   skipped without starting Alembic, so a no-op deploy over thousands of tenants
   costs a couple of queries.
2. The rest run in worker PROCESSES (`_worker.py`), at most `concurrency` at a
   time: given, or chosen from the throughput the run measures (`pacing.py`).
   Alembic keeps its `context` and `op` proxies in module globals; two migrations
   sharing one interpreter (threads, or coroutines interleaving on `run_sync`) would
   send one tenant's operations to the other's connection. A process runs one tenant
   at a time, so its globals belong to that tenant.
3. Each tenant migrates in one transaction with its own `lock_timeout` and
   `statement_timeout`; its result row (`ok`, duration) is written in that same
   transaction, so "recorded ok" and "migrated" cannot disagree. A failure is rolled
   back and recorded as `failed` with its error; the others go on unless `fail_fast`.
4. An interrupted run (killed, Ctrl+C) is resumed by the next run with the same
   direction and target: tenants it finished are not redone.

With database isolation each tenant is migrated in its own database (the URL comes
from the isolation, which decrypts a tenant's own `database_url`), its version is read
there, one database at a time per reader, and its result is recorded in the registry
database after the migration commits (a crash in between: the next run finds the
tenant at the target and skips it). The registry and the tenants' databases may be
MySQL/MariaDB: there DDL commits as it runs, so each revision commits with its version
stamp, and a failure leaves the tenant at the last revision that completed.
Tenants under row-level security share their tables: those are migrated once, as
`(rls tables)`, with their own version table (`targets.py` says where each tenant is
migrated). Under rls and hybrid isolation the
runner connects as the owner role (`database_owner_url`), which owns the tables.

Waves: `canary=N` migrates N tenants first and stops the run if any of them fails.
Only one fleet run per database at a time (a PostgreSQL advisory lock; on MySQL/MariaDB,
a named lock, `GET_LOCK`). With `maintenance=True` each tenant is in maintenance (its
requests answered 503 with `Retry-After` by every worker) while Alembic runs for it.
"""

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from .._utils import create_engine
from ..errors import ConfigurationError, FleetBusyError, TenantNotFoundError
from ..isolation.spares import FLEET_GATE_KEY, SPARES_TABLE
from ..tenant import Tenant, TenantStatus
from ._worker import init_worker, migrate_in_worker, seconds, worker_context, worker_settings
from .env import read_database_version, read_versions
from .pacing import Pacing
from .results import (
    RLS_LABEL,
    SPARE_LABEL,
    TEMPLATE_LABEL,
    Direction,
    FleetReport,
    Outcome,
    ResultsTables,
    TenantMigration,
    TenantResult,
    join_versions,
)
from .targets import MigrationTarget, migration_target

if TYPE_CHECKING:  # the manager imports nothing of the fleet; this is for typing only
    from ..manager import TenancyManager

__all__ = ["FleetMigrator"]

_LOCK_KEY = 0x7E4A_F1EE  # pg advisory lock: one fleet run per database

_VERSIONS_PER_QUERY = 1000  # schemas whose version tables one transaction reads (and locks)


class FleetMigrator:
    """Migrates every tenant's schema (or database) with Alembic. One instance per command; not shared.

        migrator = FleetMigrator(manager, "alembic.ini")
        report = await migrator.run("upgrade", "head", canary=5)

    `concurrency` tenants are migrated at once; None (the default) lets the run choose,
    from the throughput it measures (`pacing.Pacing`). `alembic_ini` and `section` name
    the tenant environment (see the project template: `fastapi-tenancy migrate init`).
    Results go to `<results_schema>.tenancy_migration_runs` and `tenancy_migration_results` (on
    MySQL/MariaDB, the registry's database). `maintenance=True` holds each tenant in
    maintenance (its requests answered 503 in every worker) while Alembic runs for it.
    """

    def __init__(
        self,
        manager: "TenancyManager",
        alembic_ini: str | Path,
        *,
        section: str = "tenant",
        concurrency: int | None = None,
        lock_timeout: str = "5s",
        statement_timeout: str = "0",
        results_schema: str = "public",
        statuses: Iterable[TenantStatus] = (
            TenantStatus.ACTIVE,
            TenantStatus.MAINTENANCE,
            TenantStatus.SUSPENDED,
        ),
        maintenance: bool = False,
    ) -> None:
        config = manager.config
        # MySQL/MariaDB has no schemas apart from databases: its tenants are databases.
        self._mysql = config.backend == "mysql"
        if not (config.backend == "postgresql" or (self._mysql and config.isolation_strategy == "database")):
            raise ConfigurationError(
                "fleet migrations need PostgreSQL (schema, database, rls or hybrid isolation) "
                f"or MySQL/MariaDB with database isolation; this is {config.backend} with "
                f"{config.isolation_strategy} isolation"
            )
        if concurrency is not None and concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        seconds(lock_timeout), seconds(statement_timeout)  # refuse a malformed timeout now, not per tenant
        self.manager = manager
        self.alembic_ini = str(alembic_ini)
        self.section = section
        self.concurrency = concurrency
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        # On MySQL/MariaDB the results live in the registry's own database unless named.
        self.results_schema: str | None = (
            None if self._mysql and results_schema == "public" else results_schema
        )
        self.statuses = tuple(statuses)
        self.maintenance = maintenance
        self._engine: AsyncEngine | None = None
        # Database isolation: each tenant is migrated in its own database (its URL from
        # the isolation's migration_url); results stay here, and there is no template.
        self._per_database = manager.config.isolation_strategy == "database"
        # Each label of the plan (a tenant, the template, a spare, the rls tables) -> where.
        self._targets: dict[str, MigrationTarget] = {}
        # The labels that are one tenant's own migration, and that tenant (for maintenance).
        self._tenant_labels: dict[str, Tenant] = {}
        # The owner role, where there is one (rls, hybrid): it owns what migrations change.
        self._url = manager.config.database_owner_url or manager.config.database_url

    @property
    def engine(self) -> AsyncEngine:
        """A small pool of our own: the manager's connections start with an empty search_path."""
        if self._engine is None:
            self._engine = create_engine(self._url, pool_size=2, max_overflow=0)
        return self._engine

    async def close(self) -> None:
        """Close the runner's pool."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def script(self) -> ScriptDirectory:
        """The tenant environment's Alembic scripts."""
        if not Path(self.alembic_ini).is_file():
            raise ConfigurationError(
                f"no Alembic config at {self.alembic_ini!r} (see `fastapi-tenancy migrate init`)"
            )
        return ScriptDirectory.from_config(Config(self.alembic_ini, ini_section=self.section))

    def _target_revisions(self, direction: Direction, target: str) -> frozenset[str] | None:
        """The revisions a tenant at `target` has, or None when that depends on where it is."""
        if target[:1] in "+-" or any(mark in target for mark in "+-@:"):
            return None  # relative: every tenant must go through Alembic
        script = self.script()
        if target == "base":
            return frozenset()
        revisions = script.get_revisions("heads" if target == "head" else target)
        return frozenset(r.revision for r in revisions if r is not None)

    async def _tenants(self, only: Sequence[str] | None) -> list[tuple[str, str]]:
        """The plan's entries, as (label, schema or database); `_targets` says where each is."""
        self._targets = {}
        self._tenant_labels = {}
        wanted = list(only or ())
        template = None if self._per_database else self.manager.config.schema_template
        if template is not None and (not wanted or TEMPLATE_LABEL in wanted):
            # Migrated first, like a tenant, so tenants cloned from it start at head.
            self._targets[TEMPLATE_LABEL] = MigrationTarget(template)
            # Spares are clones of the template, to be handed out as tenants: kept at its revision.
            for name in await self._spares():
                self._targets[SPARE_LABEL.format(name)] = MigrationTarget(name)
        if wanted:
            for slug in wanted:
                if slug != TEMPLATE_LABEL:
                    self._add(await self.manager.get_tenant(slug))
        else:
            async for tenant in self.manager.store.iterate(page=1000):
                if tenant.status in self.statuses:
                    self._add(tenant)
        return [(label, target.name) for label, target in self._targets.items()]

    def _add(self, tenant: Tenant) -> None:
        target = migration_target(self.manager.isolation, tenant)
        # Tenants sharing tables (row-level security) share one migration: one entry,
        # which no single tenant's maintenance covers.
        if target.shared:
            self._targets[RLS_LABEL] = target
        else:
            self._targets[tenant.identifier] = target
            self._tenant_labels[tenant.identifier] = tenant

    async def _database_versions(self, labels: list[str]) -> dict[str, tuple[str, ...] | None]:
        """Database isolation: each tenant database's revision, a few databases at a time.

        A database that cannot be reached is left out (not at the target): its
        migration then fails with the reason, recorded like any other failure.
        """
        gate = asyncio.Semaphore(max(self.concurrency or 0, 8))
        versions: dict[str, tuple[str, ...] | None] = {}

        async def read(label: str, url: str) -> None:
            async with gate:
                engine = create_engine(url, null_pool=True)
                try:
                    async with engine.connect() as conn:
                        versions[label] = await read_database_version(conn)
                except Exception:  # noqa: S110 - reported by the migration that follows
                    pass
                finally:
                    await engine.dispose()

        await asyncio.gather(*(read(label, url) for label in labels if (url := self._targets[label].url)))
        return versions

    async def _schema_versions(self, labels: list[str]) -> dict[str, tuple[str, ...] | None]:
        """The revisions of the entries in schemas of the main database: a query per version table."""
        versions: dict[str, tuple[str, ...] | None] = {}
        by_table: dict[str, dict[str, str]] = {}  # version table -> label -> schema
        for label in labels:
            target = self._targets[label]
            by_table.setdefault(target.version_table, {})[label] = target.name
        async with self.engine.connect() as conn:
            for table, group in by_table.items():
                entries = list(group.items())
                for start in range(0, len(entries), _VERSIONS_PER_QUERY):
                    chunk = dict(entries[start : start + _VERSIONS_PER_QUERY])
                    found = await read_versions(conn, chunk.values(), version_table=table)
                    # Reading a version table locks it until the transaction ends: one
                    # transaction over 10,000 tenants ran out of the server's lock table
                    # ("out of shared memory", 64 locks x max_connections by default).
                    await conn.commit()
                    versions.update({label: found[name] for label, name in chunk.items() if name in found})
        return versions

    async def _spares(self) -> list[str]:
        async with self.engine.connect() as conn:
            if await conn.scalar(sa.text("SELECT to_regclass(:t)"), {"t": SPARES_TABLE}) is None:
                return []
            return list((await conn.scalars(sa.text(f"SELECT name FROM {SPARES_TABLE} ORDER BY name"))).all())  # noqa: S608

    async def in_progress(self) -> bool:
        """Whether a fleet run holds this database now (from any process), read without waiting.

        A run recorded as `running` that no process holds was interrupted: the next run
        with the same direction and target resumes it.
        """
        async with self.engine.connect() as conn:
            held = await conn.scalar(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND classid = 0 AND objid = :k AND objsubid = 1)"
                ),
                {"k": _LOCK_KEY},
            )
        return bool(held)

    async def status(
        self, target: str = "head", *, tenants: Sequence[str] | None = None, direction: Direction = "upgrade"
    ) -> list[TenantMigration]:
        """Every tenant's revision and whether it is at `target`: two queries, no Alembic run.

        With database isolation, one query per tenant database instead (a few at a time).
        """
        wanted = self._target_revisions(direction, target)
        listed = await self._tenants(tenants)
        own = [label for label, _ in listed if self._targets[label].url is not None]
        versions = await self._database_versions(own) if own else {}
        in_schemas = [label for label, _ in listed if self._targets[label].url is None]
        if in_schemas:
            versions.update(await self._schema_versions(in_schemas))
        rows = []
        for label, name in listed:
            current = versions.get(label)
            have = frozenset(current or ())
            at_target = wanted is not None and label in versions and have == wanted
            rows.append(TenantMigration(label, name, current, at_target))
        return rows

    async def run(
        self,
        direction: Direction = "upgrade",
        target: str = "head",
        *,
        tenants: Sequence[str] | None = None,
        canary: int = 0,
        fail_fast: bool = False,
        dry_run: bool = False,
        on_result: Callable[[TenantResult], None] | None = None,
        on_plan: Callable[[int], None] | None = None,
    ) -> FleetReport:
        """Migrate the tenants (all, or `tenants`) to `target`; the report says what happened.

        `on_plan(n)` is called once with the number of tenants that will run
        Alembic, `on_result` after each tenant (for progress bars). With
        `dry_run=True` nothing is written: the report lists the tenants that
        would run as `planned`.
        """
        template = None if self._per_database else self.manager.config.schema_template
        if template is not None and not dry_run:
            async with self.engine.begin() as conn:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{template}"'))
        plan = await self.status(target, tenants=tenants, direction=direction)
        skipped = [m for m in plan if m.at_target]
        todo = [m for m in plan if not m.at_target]
        report = FleetReport(run_id="", direction=direction, target=target)
        if dry_run:
            report.run_id = "dry-run"
            report.results = [_result(m, "skipped") for m in skipped] + [_result(m, "planned") for m in todo]
            return report
        if self._mysql:
            return await self._run_mysql(report, skipped, todo, canary, fail_fast, on_result, on_plan)
        async with self.engine.connect() as lock_conn:
            # Session-level and held for the whole run on this connection; released by
            # PostgreSQL if this process dies, so a killed run never blocks the next.
            if not await lock_conn.scalar(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}):
                raise FleetBusyError("another fleet migration is running against this database")
            await lock_conn.commit()
            try:
                # Claims and fills of spare schemas hold this shared for milliseconds; waiting
                # for it keeps spares from being handed out or made while the template and
                # the spares change (they fall back to cloning meanwhile).
                await lock_conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": FLEET_GATE_KEY})
                await lock_conn.commit()
                # Spares claimed since the plan was made are tenants now, not spares.
                spares = set(await self._spares())
                todo = [m for m in todo if not _is_spare(m.tenant) or m.schema in spares]
                skipped = [m for m in skipped if not _is_spare(m.tenant) or m.schema in spares]
                return await self._run_locked(report, skipped, todo, canary, fail_fast, on_result, on_plan)
            finally:
                await lock_conn.execute(sa.text("SELECT pg_advisory_unlock_all()"))
                await lock_conn.commit()

    async def _run_mysql(
        self,
        report: FleetReport,
        skipped: list[TenantMigration],
        todo: list[TenantMigration],
        canary: int,
        fail_fast: bool,
        on_result: Callable[[TenantResult], None] | None,
        on_plan: Callable[[int], None] | None,
    ) -> FleetReport:
        """`run` on MySQL/MariaDB: the same run, under a named lock of the registry's database."""
        async with self.engine.connect() as lock_conn:
            # GET_LOCK is held by this session until released, and by nobody once the
            # session ends: a killed run never blocks the next. Names are server-wide, so
            # the name carries the registry database's.
            database = await lock_conn.scalar(sa.text("SELECT DATABASE()"))
            name = "fastapi_tenancy.fleet." + hashlib.sha256(str(database).encode()).hexdigest()[:32]
            if not await lock_conn.scalar(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}):
                raise FleetBusyError("another fleet migration is running against this database")
            await lock_conn.commit()
            try:
                return await self._run_locked(report, skipped, todo, canary, fail_fast, on_result, on_plan)
            finally:
                await lock_conn.scalar(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
                await lock_conn.commit()

    async def _run_locked(
        self,
        report: FleetReport,
        skipped: list[TenantMigration],
        todo: list[TenantMigration],
        canary: int,
        fail_fast: bool,
        on_result: Callable[[TenantResult], None] | None,
        on_plan: Callable[[int], None] | None,
    ) -> FleetReport:
        tables = ResultsTables(self.results_schema, mysql=self._mysql)
        async with self.engine.begin() as conn:
            await tables.create(conn)
            previous = await tables.unfinished(conn, report.direction, report.target)
            if previous is not None:
                report.run_id, report.resumed = previous, True
                done = await tables.done(conn, previous)
                todo = [m for m in todo if m.tenant not in done]
            else:
                report.run_id = await tables.start(conn, report.direction, report.target)
            await tables.skip(conn, report.run_id, skipped)
        for m in skipped:
            report.results.append(_result(m, "skipped"))
        if on_plan is not None:
            on_plan(len(todo))
        if todo:
            await self._execute(report, todo, canary, fail_fast, on_result)
            if any(r.status == "ok" and self._targets[r.tenant].shared for r in report.results):
                # Row-level security guards the tables the migrations added.
                for part in self.manager.isolation.parts():
                    await part.migrated()
        status = "stopped" if report.stopped else ("failed" if report.count("failed") else "finished")
        async with self.engine.begin() as conn:
            await tables.finish(conn, report.run_id, status)
        return report

    async def _execute(
        self,
        report: FleetReport,
        todo: list[TenantMigration],
        canary: int,
        fail_fast: bool,
        on_result: Callable[[TenantResult], None] | None,
    ) -> None:
        settings = {
            "url": self._url,
            "ini": self.alembic_ini,
            "section": self.section,
            "results_schema": self.results_schema,
            "lock_timeout": self.lock_timeout,
            "statement_timeout": self.statement_timeout,
            "mysql": self._mysql,
        }
        pacing = Pacing(self.concurrency, tenants=len(todo))
        # Never forked from this process, which runs an event loop and threads (see worker_context).
        pool = ProcessPoolExecutor(
            max_workers=pacing.ceiling,
            mp_context=worker_context(),
            initializer=init_worker,
            initargs=(worker_settings(settings),),
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def migrate(m: TenantMigration) -> dict[str, Any]:
            return await loop.run_in_executor(
                pool,
                migrate_in_worker,
                report.run_id,
                m.tenant,
                m.schema,
                report.direction,
                report.target,
                self._targets[m.tenant].url,
                self._targets[m.tenant].version_table,
            )

        async def one(m: TenantMigration, stop_on_failure: bool) -> None:
            async with pacing:
                if stop.is_set():
                    report.not_run.append(m.tenant)
                    return
                async with AsyncExitStack() as held:
                    if self.maintenance and m.tenant in self._tenant_labels:
                        # Only while Alembic runs for it: skipped and waiting tenants are
                        # served. A tenant purged since the plan is migrated (and fails) as is.
                        with suppress(TenantNotFoundError):
                            await held.enter_async_context(
                                self.manager.maintenance(self._tenant_labels[m.tenant])
                            )
                    raw = await migrate(m)
            result = TenantResult(m.tenant, m.schema, **raw)
            report.results.append(result)
            if on_result is not None:
                on_result(result)
            if result.status == "failed" and stop_on_failure:
                stop.set()

        try:
            waves = [(todo[:canary], True), (todo[canary:], fail_fast)] if canary > 0 else [(todo, fail_fast)]
            for wave, stop_on_failure in waves:
                if stop.is_set():
                    report.not_run.extend(m.tenant for m in wave)
                    continue
                await asyncio.gather(*(one(m, stop_on_failure) for m in wave))
            report.stopped = stop.is_set()
            report.concurrency = pacing.width
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _is_spare(label: str) -> bool:
    return label.startswith(SPARE_LABEL.format(""))


def _result(m: TenantMigration, status: Outcome) -> TenantResult:
    version = join_versions(m.versions)
    return TenantResult(m.tenant, m.schema, status, version, version if status == "skipped" else None, 0.0)
