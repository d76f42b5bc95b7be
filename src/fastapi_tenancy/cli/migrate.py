"""`fastapi-tenancy migrate`: create the Alembic project; upgrade, downgrade and check every tenant.

The fleet runner (`fastapi_tenancy.migrations.fleet`) is imported inside the commands
that use it: it needs the `migrations` extra, which `migrate init` does not.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..manager import TenancyManager
from .base import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    TenantOption,
    fail,
    out,
    print_json,
    print_rows,
    run_with_manager,
    state,
)

__all__ = ["migrate_app"]

migrate_app = typer.Typer(help="Alembic migrations across every tenant.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="The Alembic config file (default: alembic_config, else alembic.ini)."
    ),
]
SectionOption = Annotated[str, typer.Option(help="The tenant section of the Alembic config.")]


@migrate_app.command("init")
def migrate_init(
    directory: Annotated[Path, typer.Argument(help="Where to create the project.")] = Path(),
) -> None:
    """Create alembic.ini and the shared/ and tenant/ migration environments."""
    # The path, not an import: the package imports Alembic, which init does not need.
    template = Path(__file__).parents[1] / "migrations" / "template"
    if (directory / "alembic.ini").exists() or (directory / "migrations").exists():
        fail(f"{directory} already holds alembic.ini or migrations/", EXIT_CONFLICT)
    shutil.copytree(template, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if state.json:
        print_json(json.dumps({"created": str(directory / "alembic.ini")}))
    else:
        out.print(f"Created {directory / 'alembic.ini'} with migrations/shared and migrations/tenant")


def _alembic_ini(manager: TenancyManager, given: Path | None) -> Path:
    """`--config` if given, else the configured `alembic_config`, else `alembic.ini` here."""
    if given is not None:
        return given
    return Path(manager.config.alembic_config or "alembic.ini")


def _migrate(
    direction: str,
    target: str,
    config: Path | None,
    section: str,
    tenants: list[str] | None,
    concurrency: int | None,
    canary: int,
    fail_fast: bool,
    dry_run: bool,
    lock_timeout: str,
    statement_timeout: str,
    maintenance: bool = False,
) -> None:
    from ..migrations.fleet import FleetMigrator  # noqa: PLC0415 - the migrations extra
    from ..migrations.results import FleetReport, TenantResult  # noqa: PLC0415

    show_progress = out.is_terminal and not state.json

    async def work(manager: TenancyManager) -> FleetReport:
        migrator = FleetMigrator(
            manager,
            _alembic_ini(manager, config),
            section=section,
            concurrency=concurrency,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            maintenance=maintenance,
        )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
        )
        task_id = progress.add_task(f"{direction} {target}", total=None)

        def on_plan(n: int) -> None:
            progress.update(task_id, total=n)

        def on_result(result: TenantResult) -> None:
            progress.advance(task_id)
            if result.status == "failed" and show_progress:
                progress.console.print(f"[red]failed[/red] {result.tenant}: {result.error}", highlight=False)

        try:
            if show_progress:
                progress.start()
            return await migrator.run(
                direction,  # type: ignore[arg-type]
                target,
                tenants=tenants,
                canary=canary,
                fail_fast=fail_fast,
                dry_run=dry_run,
                on_result=on_result,
                on_plan=on_plan,
            )
        finally:
            if show_progress:
                progress.stop()
            await migrator.close()

    report = run_with_manager(work)
    summary = {
        "run_id": report.run_id,
        "direction": report.direction,
        "target": report.target,
        "resumed": report.resumed,
        "concurrency": report.concurrency,
        "stopped": report.stopped,
        "counts": {s: report.count(s) for s in ("ok", "failed", "skipped", "planned")},
        "not_run": report.not_run,
        "results": [asdict(r) for r in report.results],
    }
    if state.json:
        print_json(json.dumps(summary))
    else:
        shown = [asdict(r) for r in report.results if r.status != "skipped"]
        if shown:
            print_rows(
                f"{direction} {target}",
                [{**r, "duration": f"{r['duration'] * 1000:.0f} ms"} for r in shown],
                ["tenant", "status", "from_revision", "to_revision", "duration", "error"],
            )
        counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n)  # type: ignore[attr-defined]
        out.print(
            f"run {report.run_id}{' (resumed)' if report.resumed else ''}: {counts or 'no tenants'}"
            + (f"; stopped early, {len(report.not_run)} not run" if report.stopped else ""),
            highlight=False,
        )
    if not report.succeeded:
        raise typer.Exit(EXIT_FAILED)


def _fleet_command(direction: str, default_target: str | None) -> Callable[..., None]:
    def command(
        target: Annotated[str, typer.Argument(help="Alembic revision (head, base, an id).")] = default_target
        or "head",
        config: ConfigOption = None,
        section: SectionOption = "tenant",
        tenant: TenantOption = None,
        concurrency: Annotated[
            int | None,
            typer.Option(
                min=1, max=64, help="Tenants migrated at once (default: chosen from the measured throughput)."
            ),
        ] = None,
        canary: Annotated[int, typer.Option(min=0, help="Migrate this many first; stop if one fails.")] = 0,
        fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failure.")] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Show what would run; change nothing.")
        ] = False,
        lock_timeout: Annotated[str, typer.Option(help="Per-tenant lock_timeout.")] = "5s",
        statement_timeout: Annotated[str, typer.Option(help="Per-tenant statement_timeout (0: none).")] = "0",
        maintenance: Annotated[
            bool,
            typer.Option(
                "--maintenance",
                help="Hold each tenant in maintenance (503 to its requests) while it migrates.",
            ),
        ] = False,
    ) -> None:
        _migrate(
            direction,
            target,
            config,
            section,
            tenant,
            concurrency,
            canary,
            fail_fast,
            dry_run,
            lock_timeout,
            statement_timeout,
            maintenance,
        )

    return command


migrate_app.command(
    "upgrade", help="Upgrade every tenant (or --tenant ...) to TARGET, skipping those there."
)(_fleet_command("upgrade", "head"))
migrate_app.command("downgrade", help="Downgrade every tenant (or --tenant ...) to TARGET.")(
    _fleet_command("downgrade", None)
)


@migrate_app.command("status")
def migrate_status(
    target: Annotated[str, typer.Argument()] = "head",
    config: ConfigOption = None,
    section: SectionOption = "tenant",
    tenant: TenantOption = None,
) -> None:
    """Each tenant's revision and whether it is at TARGET (two queries; Alembic does not run)."""
    from ..migrations.fleet import FleetMigrator  # noqa: PLC0415 - the migrations extra
    from ..migrations.results import TenantMigration  # noqa: PLC0415

    async def work(manager: TenancyManager) -> list[TenantMigration]:
        migrator = FleetMigrator(manager, _alembic_ini(manager, config), section=section)
        try:
            return await migrator.status(target, tenants=tenant)
        finally:
            await migrator.close()

    rows = [
        {
            "tenant": m.tenant,
            "schema": m.schema,
            "revision": None if m.versions is None else ",".join(m.versions),
            "at_target": m.at_target,
        }
        for m in run_with_manager(work)
    ]
    print_rows(f"Migration status (target {target})", rows, ["tenant", "schema", "revision", "at_target"])
    if not all(r["at_target"] for r in rows):
        raise typer.Exit(EXIT_FAILED)
