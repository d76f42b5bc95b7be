"""The console's fleet page: the runs and results tables read back, and upgrades started in the background.

An upgrade started from the console runs `FleetMigrator.run` in a task of this process,
with the operator as the actor of the `migrated` events it writes to the audit log, one
per tenant migrated. Its progress is read from the results tables, which the workers
fill as tenants finish: every process of the application shows it, whichever started
it, and so do runs started with `fastapi-tenancy migrate upgrade`.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfigurationError, FleetBusyError, TenantNotFoundError
from ..events import LifecycleEvent, acting_as
from ..manager import TenancyManager

if TYPE_CHECKING:  # the migrations extra (Alembic), imported where a run needs it
    from ..migrations.fleet import FleetMigrator
    from ..migrations.results import RecordedResult, RecordedRun, TenantMigration, TenantResult

__all__ = ["FleetConsole", "FleetJob"]

logger = logging.getLogger("fastapi_tenancy.console")


@dataclass
class FleetJob:
    """An upgrade this process started: what the operator asked for, and how far it got."""

    operator: str
    target: str
    canary: int
    concurrency: int
    started: float = field(default_factory=time.time)
    planned: int | None = None
    """Tenants that run Alembic (known once the run has made its plan)."""
    done: int = 0
    failed: int = 0
    run_id: str | None = None
    error: str | None = None
    finished: bool = False
    task: "asyncio.Task[None] | None" = None


class FleetConsole:
    """Fleet migrations as the console sees them. One per console; its job is this process's."""

    def __init__(self, manager: TenancyManager, alembic_config: str | Path | None = None) -> None:
        self.manager = manager
        self.alembic_config = str(alembic_config or manager.config.alembic_config or "")
        self.job: FleetJob | None = None
        # A migrator kept for `in_progress` (its engine only: shareable).
        self._watcher: FleetMigrator | None = None

    def unavailable(self) -> str | None:
        """Why fleet migrations cannot run from here, or None."""
        if self.manager.config.backend != "postgresql":
            return "Fleet migrations need PostgreSQL."
        if not _has_alembic():
            return "Fleet migrations need Alembic: pip install 'fastapi-tenancy[migrations]'."
        if not self.alembic_config:
            return "Fleet migrations need alembic_config (TENANCY_ALEMBIC_CONFIG)."
        return None

    @property
    def readable(self) -> bool:
        """Whether there can be runs to read (PostgreSQL, and the migrations extra to read them with)."""
        return self.manager.config.backend == "postgresql" and _has_alembic()

    @property
    def _engine(self) -> AsyncEngine:
        # The tables belong to the role that runs migrations (the owner, where there is one).
        return self.manager.owner_engine or self.manager.engine

    # -- reading ----------------------------------------------------------------------

    async def runs(self, limit: int = 10) -> "list[RecordedRun]":
        if not self.readable:
            return []
        from ..migrations.results import ResultsTables  # noqa: PLC0415 - the migrations extra

        tables = ResultsTables("public")
        async with self._engine.connect() as conn:
            if not await tables.exist(conn):
                return []
            return await tables.list_runs(conn, limit=limit)

    async def run(self, run_id: str) -> "RecordedRun | None":
        if not self.readable:
            return None
        from ..migrations.results import ResultsTables  # noqa: PLC0415

        tables = ResultsTables("public")
        async with self._engine.connect() as conn:
            return await tables.get_run(conn, run_id) if await tables.exist(conn) else None

    async def results(
        self, run_id: str, *, status: str | None, after: str | None, limit: int
    ) -> "list[RecordedResult]":
        from ..migrations.results import ResultsTables  # noqa: PLC0415

        tables = ResultsTables("public")
        async with self._engine.connect() as conn:
            return await tables.list_results(conn, run_id, status=status, after=after, limit=limit)

    async def in_progress(self) -> bool:
        """Whether a fleet run holds the database now, started here or anywhere else."""
        if self.unavailable() is not None:
            return False
        if self._watcher is None:
            self._watcher = self._migrator()
        return bool(await self._watcher.in_progress())

    async def revisions(self, tenants: list[str] | None = None) -> "list[TenantMigration]":
        """Each tenant's revision and whether it is at head (two queries; no Alembic run)."""
        migrator = self._migrator()
        try:
            rows: list[TenantMigration] = await migrator.status("head", tenants=tenants)
            return rows
        finally:
            await migrator.close()

    def _migrator(self, concurrency: int = 1) -> "FleetMigrator":
        from ..migrations.fleet import FleetMigrator  # noqa: PLC0415 - the migrations extra

        problem = self.unavailable()
        if problem is not None:
            raise ConfigurationError(problem)
        return FleetMigrator(self.manager, self.alembic_config, concurrency=concurrency)

    # -- running ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    def start(self, operator: str, *, target: str, canary: int, concurrency: int) -> FleetJob:
        """Start an upgrade to `target` in the background; refused while this process runs one."""
        if self.running:
            raise FleetBusyError("an upgrade started from this console is still running")
        migrator = self._migrator(concurrency)
        job = FleetJob(operator, target, canary, concurrency)
        # The task inherits this context: the audit entries it writes name the operator.
        with acting_as(operator):
            job.task = asyncio.get_running_loop().create_task(
                self._run(job, migrator), name="tenancy-console-fleet"
            )
        self.job = job
        logger.warning(
            "%s started a fleet upgrade to %s (canary %d, concurrency %d)",
            operator,
            target,
            canary,
            concurrency,
        )
        return job

    async def _run(self, job: FleetJob, migrator: Any) -> None:
        migrated: asyncio.Queue[TenantResult | None] = asyncio.Queue()
        auditor = asyncio.create_task(self._audit(migrated))

        def on_plan(count: int) -> None:
            job.planned = count

        def on_result(result: "TenantResult") -> None:
            job.done += 1
            job.failed += result.status == "failed"
            if result.status == "ok":
                migrated.put_nowait(result)

        try:
            report = await migrator.run(
                "upgrade", job.target, canary=job.canary, on_plan=on_plan, on_result=on_result
            )
            job.run_id = report.run_id
            if report.stopped:
                job.error = f"stopped early: {len(report.not_run)} tenants not run (the canary failed)"
        except FleetBusyError:
            job.error = "another fleet migration is running against this database"
        except Exception as exc:
            logger.exception("the fleet upgrade started by %s failed", job.operator)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            migrated.put_nowait(None)
            await auditor
            await migrator.close()
            job.finished = True

    async def _audit(self, migrated: "asyncio.Queue[TenantResult | None]") -> None:
        """A `migrated` event per tenant migrated, as results come in (the template is no tenant)."""
        while (result := await migrated.get()) is not None:
            if result.tenant.startswith("("):
                continue
            try:
                tenant = await self.manager.get_tenant(result.tenant)
                await self.manager.events.emit(
                    LifecycleEvent.MIGRATED,
                    tenant,
                    from_revision=result.from_revision,
                    to_revision=result.to_revision,
                    via="console",
                )
            except TenantNotFoundError:  # purged since: nobody to write it for
                continue
            except Exception:  # the registry is down: the migration stands, say what is missing
                logger.exception("could not audit the migration of tenant %s", result.tenant)

    async def close(self) -> None:
        """Cancel this process's run, if any (the next run with the same target resumes it)."""
        job = self.job
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None


def _has_alembic() -> bool:
    try:
        import alembic  # noqa: F401, PLC0415 - only to say what is missing
    except ImportError:
        return False
    return True
