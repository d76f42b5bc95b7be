"""What a fleet run reports and records: its report types, and the two results tables.

A run is a row of `<schema>.tenancy_migration_runs` (direction, target, `running` until
it ends as `finished`, `failed` or `stopped`); each tenant it handled is a row of
`<schema>.tenancy_migration_results` (`ok`, `failed` or `skipped`, the revisions before
and after, the duration and the error). A run that did not end is resumed by the next
run with the same direction and target: its `ok` tenants are not redone. The worker
writes a schema tenant's `ok` row in the migration's own transaction, so "recorded ok"
and "migrated" cannot disagree.
"""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "RLS_LABEL",
    "SPARE_LABEL",
    "TEMPLATE_LABEL",
    "Direction",
    "FleetReport",
    "Outcome",
    "RecordedResult",
    "RecordedRun",
    "ResultsTables",
    "TenantMigration",
    "TenantResult",
    "error_text",
    "join_versions",
]

Direction = Literal["upgrade", "downgrade"]
Outcome = Literal["ok", "failed", "skipped", "planned"]

TEMPLATE_LABEL = "(template)"
"""How results name the template schema (`schema_template`), which is migrated with the tenants."""
SPARE_LABEL = "(spare {})"
"""How results name a spare schema (`schema_spares`); spares are migrated with the template."""
RLS_LABEL = "(rls tables)"
"""How results name the tables tenants share under row-level security: migrated once for all."""

_ERROR_MAX = 2000


@dataclass(frozen=True)
class TenantMigration:
    """One tenant's schema and its current Alembic revision(s) (`None`: no version table)."""

    tenant: str
    schema: str
    versions: tuple[str, ...] | None
    at_target: bool


@dataclass(frozen=True)
class TenantResult:
    """What a run did to one tenant."""

    tenant: str
    schema: str
    status: Outcome
    from_revision: str | None
    to_revision: str | None
    duration: float
    error: str | None = None


@dataclass
class FleetReport:
    """The results of one run, in the order tenants finished."""

    run_id: str
    direction: Direction
    target: str
    results: list[TenantResult] = field(default_factory=list)
    resumed: bool = False
    stopped: bool = False
    """True when the canary wave failed or `fail_fast` stopped the run early."""
    not_run: list[str] = field(default_factory=list)
    """Tenants left untouched because the run stopped early."""
    concurrency: int = 0
    """Tenants migrated at once when the run ended: given, or chosen (0: none ran Alembic)."""

    def count(self, status: Outcome) -> int:
        """How many tenants ended with `status`."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def succeeded(self) -> bool:
        """No tenant failed and nothing was left out."""
        return not self.stopped and self.count("failed") == 0


@dataclass(frozen=True)
class RecordedRun:
    """A run as the runs table holds it, with how many tenants it recorded per outcome."""

    run_id: str
    direction: str
    target: str
    status: str
    """`running` (or interrupted: the next run with the same direction and target resumes
    it), `finished`, `failed` or `stopped`."""
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]


@dataclass(frozen=True)
class RecordedResult:
    """One tenant's row of the results table."""

    tenant: str
    status: str
    from_revision: str | None
    to_revision: str | None
    duration: float
    error: str | None
    finished_at: datetime


def join_versions(versions: tuple[str, ...] | None) -> str | None:
    """Revisions as a results row holds them: sorted and comma-separated; None without a version table."""
    return None if versions is None else ",".join(sorted(versions))


def error_text(exc: BaseException) -> str:
    """An error as a results row holds it: the driver's own exception if any, at most 2,000 characters."""
    orig = getattr(exc, "orig", None)
    text = f"{type(orig or exc).__name__}: {orig or exc}"
    return text[:_ERROR_MAX]


class ResultsTables:
    """The runs and results tables in one schema; every statement a fleet run writes to them.

    The schema name is quoted here, and only ever comes from the runner's own
    `results_schema` argument, never from a tenant. On MySQL/MariaDB (`mysql=True`) a
    schema is a database: `schema=None` puts the tables in the connection's own (the
    registry's) database.
    """

    def __init__(self, schema: str | None, *, mysql: bool = False) -> None:
        self.mysql = mysql
        if mysql:
            where = "" if schema is None else f"`{schema}`."
        else:
            where = f'"{schema or "public"}".'
        self.runs = f"{where}tenancy_migration_runs"
        self.results = f"{where}tenancy_migration_results"
        # The one spelling that differs between the two: the time now, in the column's precision.
        self._now = "CURRENT_TIMESTAMP(6)" if mysql else "now()"

    async def create(self, conn: AsyncConnection) -> None:
        """Create both tables if they are missing."""
        if self.mysql:
            await self._create_mysql(conn)
            return
        await conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {self.runs} (run_id text PRIMARY KEY, direction text NOT NULL, "
                "target text NOT NULL, status text NOT NULL, started_at timestamptz NOT NULL DEFAULT now(), "
                "finished_at timestamptz)"
            )
        )
        await conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {self.results} ("
                f"run_id text NOT NULL REFERENCES {self.runs} ON DELETE CASCADE, "
                "tenant text NOT NULL, status text NOT NULL, from_revision text, to_revision text, "
                "duration_ms double precision NOT NULL, error text, "
                "finished_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_id, tenant))"
            )
        )

    async def _create_mysql(self, conn: AsyncConnection) -> None:
        # Keys are bounded strings (a TEXT column cannot be a key); identifiers are at most
        # 63 characters, labels such as "(spare ...)" fit as well.
        await conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {self.runs} (run_id VARCHAR(32) PRIMARY KEY, "
                "direction VARCHAR(16) NOT NULL, target VARCHAR(255) NOT NULL, status VARCHAR(16) NOT NULL, "
                "started_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), finished_at DATETIME(6) NULL"
                ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            )
        )
        await conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {self.results} (run_id VARCHAR(32) NOT NULL, "
                "tenant VARCHAR(255) NOT NULL, status VARCHAR(16) NOT NULL, from_revision TEXT NULL, "
                "to_revision TEXT NULL, duration_ms DOUBLE NOT NULL, error TEXT NULL, "
                "finished_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), "
                "PRIMARY KEY (run_id, tenant), "
                f"FOREIGN KEY (run_id) REFERENCES {self.runs} (run_id) ON DELETE CASCADE"
                ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            )
        )

    async def unfinished(self, conn: AsyncConnection, direction: Direction, target: str) -> str | None:
        """The latest run with this direction and target that is still `running` (it was interrupted)."""
        run_id: str | None = await conn.scalar(
            sa.text(
                f"SELECT run_id FROM {self.runs} WHERE direction = :d AND target = :t "  # noqa: S608 - quoted schema
                "AND status = 'running' ORDER BY started_at DESC LIMIT 1"
            ),
            {"d": direction, "t": target},
        )
        return run_id

    async def done(self, conn: AsyncConnection, run_id: str) -> set[str]:
        """The tenants run `run_id` migrated successfully."""
        return set(
            (
                await conn.scalars(
                    sa.text(f"SELECT tenant FROM {self.results} WHERE run_id = :r AND status = 'ok'"),  # noqa: S608
                    {"r": run_id},
                )
            ).all()
        )

    async def start(self, conn: AsyncConnection, direction: Direction, target: str) -> str:
        """Record a new run as `running`; its id."""
        run_id = uuid.uuid4().hex
        await conn.execute(
            sa.text(
                f"INSERT INTO {self.runs} (run_id, direction, target, status) "  # noqa: S608
                "VALUES (:r, :d, :t, 'running')"
            ),
            {"r": run_id, "d": direction, "t": target},
        )
        return run_id

    async def skip(self, conn: AsyncConnection, run_id: str, skipped: Iterable[TenantMigration]) -> None:
        """Record tenants already at the target as `skipped`, in one statement (kept if already there)."""
        rows = [{"r": run_id, "tenant": m.tenant, "v": join_versions(m.versions)} for m in skipped]
        if not rows:
            return
        keep = (
            "ON DUPLICATE KEY UPDATE tenant = tenant"
            if self.mysql
            else "ON CONFLICT (run_id, tenant) DO NOTHING"
        )
        await conn.execute(
            sa.text(
                f"INSERT INTO {self.results} "  # noqa: S608 - a quoted schema name
                "(run_id, tenant, status, from_revision, to_revision, duration_ms) "
                f"VALUES (:r, :tenant, 'skipped', :v, :v, 0) {keep}"
            ),
            rows,
        )

    async def record(self, conn: AsyncConnection, run_id: str, tenant: str, result: dict[str, Any]) -> None:
        """Write (or overwrite) one tenant's result: a worker's result dictionary."""
        if self.mysql:
            overwrite = (
                "ON DUPLICATE KEY UPDATE status = VALUES(status), from_revision = VALUES(from_revision), "
                "to_revision = VALUES(to_revision), duration_ms = VALUES(duration_ms), "
                "error = VALUES(error), finished_at = CURRENT_TIMESTAMP(6)"
            )
        else:
            overwrite = (
                "ON CONFLICT (run_id, tenant) DO UPDATE SET status = EXCLUDED.status, "
                "from_revision = EXCLUDED.from_revision, to_revision = EXCLUDED.to_revision, "
                "duration_ms = EXCLUDED.duration_ms, error = EXCLUDED.error, finished_at = now()"
            )
        await conn.execute(
            sa.text(
                f"INSERT INTO {self.results} "  # noqa: S608 - a quoted schema name
                "(run_id, tenant, status, from_revision, to_revision, duration_ms, error) "
                "VALUES (:run_id, :tenant, :status, :from_revision, :to_revision, :duration_ms, :error) "
                + overwrite
            ),
            {
                "run_id": run_id,
                "tenant": tenant,
                "status": result["status"],
                "from_revision": result["from_revision"],
                "to_revision": result["to_revision"],
                "duration_ms": result["duration"] * 1000,
                "error": result["error"],
            },
        )

    async def finish(self, conn: AsyncConnection, run_id: str, status: str) -> None:
        """Close a run as `finished`, `failed` or `stopped`."""
        await conn.execute(
            sa.text(f"UPDATE {self.runs} SET status = :s, finished_at = {self._now} WHERE run_id = :r"),  # noqa: S608
            {"s": status, "r": run_id},
        )

    async def exist(self, conn: AsyncConnection) -> bool:
        """Whether the tables are there (a first fleet run creates them)."""
        found = await conn.scalar(sa.text("SELECT to_regclass(:t)"), {"t": self.results})
        return found is not None

    async def list_runs(self, conn: AsyncConnection, *, limit: int = 10) -> list[RecordedRun]:
        """The latest `limit` runs, newest first, each with its count of tenants per outcome."""
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT r.run_id, r.direction, r.target, r.status, r.started_at, r.finished_at, "  # noqa: S608
                    "s.status AS outcome, count(s.tenant) AS n FROM (SELECT * FROM "
                    f"{self.runs} ORDER BY started_at DESC LIMIT :n) r LEFT JOIN {self.results} s "
                    "ON s.run_id = r.run_id GROUP BY r.run_id, r.direction, r.target, r.status, "
                    "r.started_at, r.finished_at, s.status ORDER BY r.started_at DESC"
                ),
                {"n": limit},
            )
        ).all()
        runs: dict[str, RecordedRun] = {}
        for row in rows:
            run = runs.get(row.run_id)
            if run is None:
                run = runs[row.run_id] = RecordedRun(
                    row.run_id, row.direction, row.target, row.status, row.started_at, row.finished_at, {}
                )
            if row.outcome is not None:
                run.counts[row.outcome] = int(row.n)
        return list(runs.values())

    async def get_run(self, conn: AsyncConnection, run_id: str) -> RecordedRun | None:
        """One run, with its counts; None if there is no such run."""
        row = (
            await conn.execute(
                sa.text(
                    "SELECT run_id, direction, target, status, started_at, finished_at "  # noqa: S608
                    f"FROM {self.runs} WHERE run_id = :r"
                ),
                {"r": run_id},
            )
        ).first()
        if row is None:
            return None
        counts = await conn.execute(
            sa.text(f"SELECT status, count(*) AS n FROM {self.results} WHERE run_id = :r GROUP BY status"),  # noqa: S608
            {"r": run_id},
        )
        return RecordedRun(
            row.run_id,
            row.direction,
            row.target,
            row.status,
            row.started_at,
            row.finished_at,
            {c.status: int(c.n) for c in counts},
        )

    async def list_results(
        self,
        conn: AsyncConnection,
        run_id: str,
        *,
        status: str | None = None,
        after: str | None = None,
        limit: int = 200,
    ) -> list[RecordedResult]:
        """A run's results by tenant label, `limit` at a time after the label `after` (keyset paging)."""
        where = ["run_id = :r"]
        params: dict[str, Any] = {"r": run_id, "n": limit}
        if status is not None:
            where.append("status = :s")
            params["s"] = status
        if after is not None:
            where.append("tenant > :a")
            params["a"] = after
        rows = await conn.execute(
            sa.text(
                "SELECT tenant, status, from_revision, to_revision, duration_ms, error, finished_at "  # noqa: S608
                f"FROM {self.results} WHERE {' AND '.join(where)} ORDER BY tenant LIMIT :n"
            ),
            params,
        )
        return [
            RecordedResult(
                r.tenant,
                r.status,
                r.from_revision,
                r.to_revision,
                r.duration_ms / 1000,
                r.error,
                r.finished_at,
            )
            for r in rows
        ]
