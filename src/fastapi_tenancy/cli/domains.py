"""`fastapi-tenancy tenants domains`: add, remove and list a tenant's custom domains."""

import json
from typing import Annotated, Any

import typer

from ..domain import Domain
from ..manager import TenancyManager
from .base import out, print_json, print_rows, run_with_manager, state

__all__ = ["domains_app"]

domains_app = typer.Typer(
    help="A tenant's custom domains (domain resolution): add, remove, list.", no_args_is_help=True
)

_COLUMNS = ["domain", "tenant", "primary"]


def _row(identifier: str, domain: Domain) -> dict[str, Any]:
    return {"domain": domain.name, "tenant": identifier, "primary": domain.primary}


@domains_app.command("add")
def domains_add(
    identifier: str,
    domain: str,
    primary: Annotated[
        bool, typer.Option("--primary", help="Make it the tenant's primary domain: its URLs point there.")
    ] = False,
) -> None:
    """Give DOMAIN to tenant IDENTIFIER (--primary: its URLs point there)."""
    added = run_with_manager(lambda m: m.add_domain(identifier, domain, primary=primary))
    print_rows("Added", [_row(identifier, added)], _COLUMNS)


@domains_app.command("remove")
def domains_remove(identifier: str, domain: str) -> None:
    """Take DOMAIN from tenant IDENTIFIER."""

    async def work(manager: TenancyManager) -> None:
        await manager.remove_domain(identifier, domain)

    run_with_manager(work)
    result = {"domain": domain, "tenant": identifier, "removed": True}
    if state.json:
        print_json(json.dumps(result))
    else:
        out.print(f"Removed: {domain} from {identifier}", highlight=False)


@domains_app.command("list")
def domains_list(identifier: str) -> None:
    """The domains of tenant IDENTIFIER, the primary first."""
    found = run_with_manager(lambda m: m.list_domains(identifier))
    print_rows(f"Domains of {identifier}", [_row(identifier, domain) for domain in found], _COLUMNS)
