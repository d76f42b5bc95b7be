"""`fastapi-tenancy registry`: the registry table itself; converting one fastapi-tenancy 0.5.0 made."""

from typing import Annotated

import typer

from ..manager import TenancyManager
from ..storage.legacy import LegacyConversion, convert_legacy_registry
from .base import adopt_each, err, print_rows, run_with_manager, state

__all__ = ["registry_app"]

registry_app = typer.Typer(help="The tenant registry table.", no_args_is_help=True)


@registry_app.command("convert-from-0.5")
def convert_from_05(
    backup_table: Annotated[
        str | None,
        typer.Option(help="Where to keep a copy of the 0.5.0 table (default: its name + _0_5)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every row; change nothing.")] = False,
) -> None:
    """Convert a fastapi-tenancy 0.5.0 `tenants` table to this version's registry, in place.

    Checks every row first and changes nothing if one cannot be converted exactly; keeps
    a copy of the old table. Tenants keep their ids, identifiers, statuses and metadata.
    """

    async def work(manager: TenancyManager) -> tuple[LegacyConversion, dict[str, str]]:
        result = await convert_legacy_registry(
            manager.store,
            backup_table=backup_table,
            schema_prefix=manager.config.schema_prefix,
            cipher=manager.cipher,
            dry_run=dry_run,
        )
        if result.dry_run:
            return result, {}
        # 0.5.0 made the tenants' storage: mark each as its tenant's, or sessions refuse
        # it (docs/isolation.md, "Incarnations"). Storage not found yet (a database to
        # rename, a file to fill) is listed; `tenants adopt` marks it later.
        adopted = await adopt_each(manager, [t.identifier for t in result.tenants])
        return result, {row["identifier"]: row["storage"] for row in adopted}

    # Not initialized: initialize() refuses the 0.5.0 table this command is for.
    result, storage = run_with_manager(work, initialize=False)
    rows = [{"identifier": t.identifier, "id": t.id, "status": t.status.value} for t in result.tenants]
    if not result.dry_run:
        for row in rows:
            row["storage"] = storage.get(row["identifier"], "")
    verb = "Would convert" if result.dry_run else "Converted"
    columns = ["identifier", "id", "status"] + ([] if result.dry_run else ["storage"])
    print_rows(f"{verb} {len(rows)} tenants in {result.table}", rows, columns)
    if not state.json and not result.dry_run:
        err.print(
            f"The 0.5.0 table is kept as {result.backup_table}. Storage not adopted (a database to "
            "rename, a SQLite file to fill): `fastapi-tenancy tenants adopt SLUG` once it is in place. "
            "Next: `fastapi-tenancy doctor` checks that every tenant's storage is where this version "
            "looks for it (docs/coming-from-0.5.md).",
            highlight=False,
        )
