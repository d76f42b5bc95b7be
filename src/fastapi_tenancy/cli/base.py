"""The frame every `fastapi-tenancy` command runs in: the Typer app, its options, the manager, output.

Commands build their manager with `run_with_manager()`, which turns the library's
errors into a message and an exit code (see `fastapi_tenancy.cli` for the codes), and
print with `print_rows()`: a table for people, JSON with `--json`.
"""

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import MissingDependencyError

    raise MissingDependencyError(exc.name or "typer", "cli") from exc

from pydantic import ValidationError

from ..config import TenancyConfig
from ..errors import (
    ConfigurationError,
    FleetBusyError,
    InvalidDomainError,
    InvalidIdentifierError,
    InvalidTransitionError,
    TenancyError,
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
from ..manager import TenancyManager
from ..tenant import Tenant
from ..urls import mask_url

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "TenantOption",
    "adopt_each",
    "app",
    "err",
    "fail",
    "load_manager",
    "out",
    "print_rows",
    "run_with_manager",
    "state",
    "tenant_dict",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5

T = TypeVar("T")

app = typer.Typer(help="Operate a fastapi-tenancy deployment.", no_args_is_help=True, add_completion=False)
"""The root command; `fastapi_tenancy.cli` adds the command groups and commands to it."""

TenantOption = Annotated[
    list[str] | None, typer.Option("--tenant", "-t", help="Only these tenants (repeatable).")
]
"""`--tenant/-t`, repeatable: the commands that act on many tenants (migrate, run) take it."""

out = Console()
err = Console(stderr=True)


class _State:
    """The global options, set by the root callback before any command runs (one command per process)."""

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
    """The manager named by `module:attribute` (a manager, or a function returning one), or a new one.

    Without `--app`, the configuration comes from the `TENANCY_*` variables alone, and
    a line on stderr says so, with the database it points to: a forgotten
    `TENANCY_DATABASE_URL` would otherwise act on a new `./tenancy.db` without a word.
    (Not with `--json`, whose output a script may read with stderr mixed in.)
    """
    if not app_path:
        config = TenancyConfig()
        if state.json:
            return TenancyManager(config)
        origin = "TENANCY_DATABASE_URL"
        if "database_url" not in config.model_fields_set:
            origin = "the default: set TENANCY_DATABASE_URL, or name the app's manager with --app module:attr"
        database = mask_url(config.database_url)
        err.print(
            f"configuration: TENANCY_* variables (no --app); database {database} ({origin})",
            highlight=False,
            soft_wrap=True,
        )
        return TenancyManager(config)
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
    if isinstance(
        exc, ConfigurationError | InvalidIdentifierError | InvalidDomainError | ValidationError | ImportError
    ):
        return EXIT_USAGE
    if isinstance(exc, TenancyUnavailableError | OSError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, TenancyError):  # e.g. ProvisioningError: a clear message, not a traceback
        return EXIT_FAILED
    return None


def run_with_manager(work: Callable[[TenancyManager], Awaitable[T]], *, initialize: bool = True) -> T:
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
        fail(str(exc) or type(exc).__name__, code)
        raise AssertionError("unreachable") from None


async def adopt_each(manager: TenancyManager, identifiers: list[str]) -> list[dict[str, Any]]:
    """Adopt each tenant's storage (`TenancyManager.adopt_storage`); one row per tenant.

    `storage` is `marked`, `nothing to mark` (already the tenant's, or shared tables), or
    `not adopted: <why>` (missing, marked for another tenant, no tier...).
    """
    rows = []
    for identifier in identifiers:
        try:
            outcome = "marked" if await manager.adopt_storage(identifier) else "nothing to mark"
        except TenancyError as exc:
            outcome = f"not adopted: {exc}"
        rows.append({"identifier": identifier, "storage": outcome})
    return rows


def print_json(text: str) -> None:
    """Write the JSON document `text` to stdout as it is, on one line, for machines (`--json`).

    Not `Console.print_json`: it re-indents and highlights every token, about 1-5 ms per
    result row (a no-op `migrate upgrade --json` over 10,000 tenants spent 10-50 s there).
    """
    out.file.write(text + "\n")
    out.file.flush()


def fail(message: str, code: int) -> None:
    """Print `message` (as JSON with `--json`) and exit with `code`."""
    if state.json:
        print_json(json.dumps({"error": message, "exit_code": code}))
    else:
        err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def tenant_dict(tenant: Tenant) -> dict[str, Any]:
    """A tenant as the commands print it."""
    return {
        "id": tenant.id,
        "identifier": tenant.identifier,
        "name": tenant.name,
        "status": tenant.status.value,
        "created_at": tenant.created_at.isoformat(),
        "updated_at": tenant.updated_at.isoformat(),
    }


def print_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A table of `rows` with `columns`, or every row as JSON with `--json`."""
    if state.json:
        print_json(json.dumps(rows, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)
