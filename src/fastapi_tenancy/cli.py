"""The `fastapi-tenancy` command line: tenants, fleet migrations, per-tenant commands, doctor, demo.

Reads `TenancyConfig` from `TENANCY_*` variables, or takes the application's
manager from an import path (`--app main:manager`, like uvicorn). Tables for
people, `--json` for scripts. Exit codes:

    0  success
    1  the operation ran and something failed (a tenant's migration or command, a doctor check)
    2  usage or configuration error
    3  no such tenant
    4  conflict: the tenant exists, the change is not allowed, or another fleet run holds the lock
    5  the database is unavailable

Needs the `cli` extra (typer, rich); `migrate` also the `migrations` extra.
"""

import asyncio
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

try:
    import typer
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .errors import MissingDependencyError

    raise MissingDependencyError(exc.name or "typer", "cli") from exc

from pydantic import ValidationError

from .config import TenancyConfig
from .errors import (
    ConfigurationError,
    FleetBusyError,
    InvalidIdentifierError,
    InvalidTransitionError,
    TenancyError,
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
from .manager import TenancyManager
from .tenant import Tenant, TenantStatus, thaw

__all__ = ["EXIT_CONFLICT", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_UNAVAILABLE", "EXIT_USAGE", "app", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5

T = TypeVar("T")

app = typer.Typer(help="Operate a fastapi-tenancy deployment.", no_args_is_help=True, add_completion=False)
tenants_app = typer.Typer(
    help="List, show, create, suspend, activate and delete tenants.", no_args_is_help=True
)
migrate_app = typer.Typer(help="Alembic migrations across every tenant.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(migrate_app, name="migrate")

out = Console()
err = Console(stderr=True)


class _State:
    app_path: str | None = None
    json: bool = False


state = _State()


@app.callback()
def _options(
    app_path: Annotated[
        str | None,
        typer.Option(
            "--app", envvar="TENANCY_APP", help="The manager as module:attribute (default: from TENANCY_*)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    state.app_path = app_path
    state.json = as_json


def load_manager(app_path: str | None) -> TenancyManager:
    """The manager named by `module:attribute` (a manager, or a function returning one), or a new one."""
    if not app_path:
        return TenancyManager(TenancyConfig())
    module_name, _, attribute = app_path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app must look like module:attribute, not {app_path!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: the app's module is found from here
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"--app {app_path}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not isinstance(target, TenancyManager) and callable(target):
        target = target()
    if not isinstance(target, TenancyManager):
        raise ConfigurationError(f"{app_path} is a {type(target).__name__}, not a TenancyManager")
    return target


def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, TenantNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(
        exc, TenantAlreadyExistsError | InvalidTransitionError | TenantChangedError | FleetBusyError
    ):
        return EXIT_CONFLICT
    if isinstance(exc, ConfigurationError | InvalidIdentifierError | ValidationError | ImportError):
        return EXIT_USAGE
    if isinstance(exc, TenancyUnavailableError | OSError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, TenancyError):  # e.g. ProvisioningError: a clear message, not a traceback
        return EXIT_FAILED
    return None


def _run(work: Callable[[TenancyManager], Awaitable[T]], *, initialize: bool = True) -> T:
    """Build the manager, run `work` with it, close it; errors become messages and exit codes."""

    async def go() -> T:
        manager = load_manager(state.app_path)
        try:
            if initialize:
                await manager.initialize()
            return await work(manager)
        finally:
            await manager.close()

    try:
        return asyncio.run(go())
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        _fail(str(exc) or type(exc).__name__, code)
        raise AssertionError("unreachable") from None


def _fail(message: str, code: int) -> None:
    if state.json:
        out.print_json(json.dumps({"error": message, "exit_code": code}))
    else:
        err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _tenant_dict(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "identifier": tenant.identifier,
        "name": tenant.name,
        "status": tenant.status.value,
        "created_at": tenant.created_at.isoformat(),
        "updated_at": tenant.updated_at.isoformat(),
    }


def _print_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if state.json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


# -- tenants ----------------------------------------------------------------------------


@tenants_app.command("list")
def tenants_list(
    status: Annotated[TenantStatus | None, typer.Option(help="Only tenants with this status.")] = None,
    after: Annotated[str | None, typer.Option(help="Start after this identifier (paging).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
) -> None:
    """Tenants ordered by identifier."""
    found = _run(lambda m: m.list_tenants(status=status, after=after, limit=limit))
    _print_rows("Tenants", [_tenant_dict(t) for t in found], ["identifier", "name", "status", "created_at"])


@tenants_app.command("show")
def tenants_show(identifier: str) -> None:
    """One tenant, with its storage name."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        tenant = await manager.get_tenant(identifier)
        return {
            **_tenant_dict(tenant),
            "storage": manager.isolation.storage_name(identifier),
            "metadata": thaw(tenant.metadata),
        }

    row = _run(work)
    if state.json:
        out.print_json(json.dumps(row, default=str))
        return
    table = Table(title=f"Tenant {identifier}", show_header=False)
    for key, value in row.items():
        table.add_row(key, str(value))
    out.print(table)


@tenants_app.command("create")
def tenants_create(
    identifier: str,
    name: Annotated[str | None, typer.Option(help="Display name (default: the identifier).")] = None,
) -> None:
    """Register a tenant and provision its storage (from the template schema when configured)."""
    tenant = _run(lambda m: m.register_tenant(identifier, name or identifier))
    _print_rows("Created", [_tenant_dict(tenant)], ["identifier", "name", "status"])


def _change(action: str, change: Callable[[TenancyManager], Awaitable[Tenant]]) -> None:
    tenant = _run(change)
    _print_rows(action, [_tenant_dict(tenant)], ["identifier", "name", "status"])


@tenants_app.command("suspend")
def tenants_suspend(identifier: str) -> None:
    """Stop serving a tenant (403); its data is kept."""
    _change("Suspended", lambda m: m.suspend_tenant(identifier))


@tenants_app.command("activate")
def tenants_activate(identifier: str) -> None:
    """Serve a suspended tenant again."""
    _change("Activated", lambda m: m.activate_tenant(identifier))


@tenants_app.command("delete")
def tenants_delete(
    identifier: str,
    destroy_data: Annotated[
        bool, typer.Option("--destroy-data", help="Drop the tenant's schema and every row in it.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before destroying data.")] = False,
) -> None:
    """Soft-delete a tenant (data kept), or purge it with --destroy-data."""
    if destroy_data and not yes:
        if not sys.stdin.isatty():
            _fail("--destroy-data needs --yes when not run interactively", EXIT_USAGE)
        typer.confirm(f"Destroy every row of tenant {identifier!r}? This cannot be undone.", abort=True)

    async def work(manager: TenancyManager) -> None:
        await manager.delete_tenant(identifier, destroy_data=destroy_data)

    _run(work)
    result = {"identifier": identifier, "deleted": True, "data_destroyed": destroy_data}
    if state.json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"{'Destroyed' if destroy_data else 'Deleted (data kept)'}: {identifier}")


# -- tenants spares ---------------------------------------------------------------------

spares_app = typer.Typer(
    help="Spare schemas: clones of the template made ahead of time (schema_spares).", no_args_is_help=True
)
tenants_app.add_typer(spares_app, name="spares")


def _spares(manager: TenancyManager) -> Any:
    pool = getattr(manager.isolation, "spares", None)
    if pool is None:
        raise ConfigurationError("no spare schemas configured: set schema_template and schema_spares")
    return pool


@spares_app.command("fill")
def spares_fill(
    count: Annotated[
        int | None, typer.Option(min=0, max=1000, help="Keep this many ready (default: schema_spares).")
    ] = None,
) -> None:
    """Drop stale spares and clone the template until COUNT spares are ready."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        pool = _spares(manager)
        await pool.initialize()
        made = await pool.fill(count)
        return {"made": made, "ready": sum(1 for s in await pool.list_spares() if s.current)}

    result = _run(work, initialize=False)
    if state.json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"made {result['made']} spare schema(s); {result['ready']} ready", highlight=False)


@spares_app.command("list")
def spares_list() -> None:
    """Each spare and whether it is at the template's revision."""

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        pool = _spares(manager)
        await pool.initialize()
        return [s.as_dict() for s in await pool.list_spares()]

    _print_rows("Spare schemas", _run(work, initialize=False), ["name", "revision", "current"])


@spares_app.command("drain")
def spares_drain() -> None:
    """Drop every spare (e.g. after rebuilding the template by hand)."""

    async def work(manager: TenancyManager) -> int:
        pool = _spares(manager)
        await pool.initialize()
        return int(await pool.drain())

    dropped = _run(work, initialize=False)
    if state.json:
        out.print_json(json.dumps({"dropped": dropped}))
    else:
        out.print(f"dropped {dropped} spare schema(s)", highlight=False)


# -- migrate ------------------------------------------------------------------------------

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The Alembic config file.")]
SectionOption = Annotated[str, typer.Option(help="The tenant section of the Alembic config.")]
TenantOption = Annotated[
    list[str] | None, typer.Option("--tenant", "-t", help="Only these tenants (repeatable).")
]


@migrate_app.command("init")
def migrate_init(
    directory: Annotated[Path, typer.Argument(help="Where to create the project.")] = Path(),
) -> None:
    """Create alembic.ini and the shared/ and tenant/ migration environments."""
    # The path, not an import: the package imports Alembic, which init does not need.
    template = Path(__file__).parent / "migrations" / "template"
    if (directory / "alembic.ini").exists() or (directory / "migrations").exists():
        _fail(f"{directory} already holds alembic.ini or migrations/", EXIT_CONFLICT)
    shutil.copytree(template, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if state.json:
        out.print_json(json.dumps({"created": str(directory / "alembic.ini")}))
    else:
        out.print(f"Created {directory / 'alembic.ini'} with migrations/shared and migrations/tenant")


def _migrate(
    direction: str,
    target: str,
    config: Path,
    section: str,
    tenants: list[str] | None,
    concurrency: int,
    canary: int,
    fail_fast: bool,
    dry_run: bool,
    lock_timeout: str,
    statement_timeout: str,
) -> None:
    from .migrations.fleet import FleetMigrator  # noqa: PLC0415 - the migrations extra
    from .migrations.results import FleetReport, TenantResult  # noqa: PLC0415

    show_progress = out.is_terminal and not state.json

    async def work(manager: TenancyManager) -> FleetReport:
        migrator = FleetMigrator(
            manager,
            config,
            section=section,
            concurrency=concurrency,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
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

    report = _run(work)
    summary = {
        "run_id": report.run_id,
        "direction": report.direction,
        "target": report.target,
        "resumed": report.resumed,
        "stopped": report.stopped,
        "counts": {s: report.count(s) for s in ("ok", "failed", "skipped", "planned")},
        "not_run": report.not_run,
        "results": [asdict(r) for r in report.results],
    }
    if state.json:
        out.print_json(json.dumps(summary))
    else:
        shown = [asdict(r) for r in report.results if r.status != "skipped"]
        if shown:
            _print_rows(
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
        config: ConfigOption = Path("alembic.ini"),
        section: SectionOption = "tenant",
        tenant: TenantOption = None,
        concurrency: Annotated[int, typer.Option(min=1, max=64, help="Tenants migrated at once.")] = 4,
        canary: Annotated[int, typer.Option(min=0, help="Migrate this many first; stop if one fails.")] = 0,
        fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failure.")] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Show what would run; change nothing.")
        ] = False,
        lock_timeout: Annotated[str, typer.Option(help="Per-tenant lock_timeout.")] = "5s",
        statement_timeout: Annotated[str, typer.Option(help="Per-tenant statement_timeout (0: none).")] = "0",
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
    config: ConfigOption = Path("alembic.ini"),
    section: SectionOption = "tenant",
    tenant: TenantOption = None,
) -> None:
    """Each tenant's revision and whether it is at TARGET (two queries; Alembic does not run)."""
    from .migrations.fleet import FleetMigrator  # noqa: PLC0415 - the migrations extra
    from .migrations.results import TenantMigration  # noqa: PLC0415

    async def work(manager: TenancyManager) -> list[TenantMigration]:
        migrator = FleetMigrator(manager, config, section=section)
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
        for m in _run(work)
    ]
    _print_rows(f"Migration status (target {target})", rows, ["tenant", "schema", "revision", "at_target"])
    if not all(r["at_target"] for r in rows):
        raise typer.Exit(EXIT_FAILED)


# -- run, doctor, demo ---------------------------------------------------------------------


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run_command(
    ctx: typer.Context,
    status: Annotated[
        TenantStatus, typer.Option(help="Run for tenants with this status.")
    ] = TenantStatus.ACTIVE,
    tenant: TenantOption = None,
) -> None:
    """Run a command once per tenant: `fastapi-tenancy run -- python job.py`.

    Each run has TENANCY_TENANT (the identifier) and TENANCY_TENANT_SCHEMA (its
    storage name) in its environment. Exits 1 if any run fails.
    """
    argv = list(ctx.args)
    if not argv:
        _fail("nothing to run: give a command after --", EXIT_USAGE)

    async def work(manager: TenancyManager) -> list[tuple[str, str]]:
        if tenant:
            chosen = [await manager.get_tenant(slug) for slug in tenant]
        else:
            chosen = [t async for t in manager.store.iterate(status=status)]
        return [(t.identifier, manager.isolation.storage_name(t.identifier)) for t in chosen]

    results = []
    for identifier, storage in _run(work):
        env = {**os.environ, "TENANCY_TENANT": identifier, "TENANCY_TENANT_SCHEMA": storage}
        try:
            completed = subprocess.run(argv, env=env, check=False)  # noqa: S603 - the operator's own command
            code = completed.returncode
        except OSError as exc:
            _fail(f"cannot run {argv[0]!r}: {exc}", EXIT_USAGE)
        results.append({"tenant": identifier, "exit_code": code})
    if state.json:
        out.print_json(json.dumps(results))
    else:
        _print_rows("Runs", results, ["tenant", "exit_code"])
    if any(r["exit_code"] != 0 for r in results):
        raise typer.Exit(EXIT_FAILED)


@app.command("doctor")
def doctor() -> None:
    """Check configuration, connectivity, the registry, pooler safety and tenant storage."""
    from .doctor import CheckResult, run_checks  # noqa: PLC0415

    async def work(manager: TenancyManager) -> list[CheckResult]:
        return await run_checks(manager)

    results = _run(work, initialize=False)
    _print_rows("Doctor", [asdict(r) for r in results], ["name", "status", "detail"])
    if any(r.status == "fail" for r in results):
        raise typer.Exit(EXIT_FAILED)


DEMO_TENANTS = {"demo-acme": "Acme Corporation", "demo-globex": "Globex Inc."}


@app.command("demo")
def demo() -> None:
    """Register two demo tenants, give each an order with the SAME id, and show each sees its own."""
    import sqlalchemy as sa  # noqa: PLC0415

    metadata = sa.MetaData()
    orders = sa.Table(
        "demo_orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("description", sa.String(200), nullable=False),
    )

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        rows = []
        for identifier, name in DEMO_TENANTS.items():
            try:
                tenant = await manager.get_tenant(identifier)
            except TenantNotFoundError:
                tenant = await manager.register_tenant(identifier, name, app_metadata=metadata)
                async with manager.session(tenant) as session, session.begin():
                    await session.execute(orders.insert().values(id=1, description=f"First order of {name}"))
            async with manager.session(tenant) as session:
                for order in (await session.execute(sa.select(orders).order_by(orders.c.id))).all():
                    rows.append(
                        {"tenant": identifier, "order_id": order.id, "description": order.description}
                    )
        return rows

    rows = _run(work)
    _print_rows("Each tenant sees only its own orders", rows, ["tenant", "order_id", "description"])


def main() -> None:
    """The console script's entry point."""
    app()
