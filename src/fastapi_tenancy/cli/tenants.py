"""`fastapi-tenancy tenants`: the registry (list, show, create, clone, suspend, delete), spares, grants."""

import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..errors import ConfigurationError
from ..manager import TenancyManager
from ..tenant import Tenant, TenantStatus, thaw
from .base import (
    EXIT_FAILED,
    EXIT_USAGE,
    adopt_each,
    fail,
    out,
    print_json,
    print_rows,
    run_with_manager,
    state,
    tenant_dict,
)
from .cluster import tenant_nodes

if TYPE_CHECKING:
    from ..isolation.spares import SparePool

__all__ = ["maintenance_app", "spares_app", "tenants_app"]

tenants_app = typer.Typer(
    help="List, show, create, clone, seed, suspend, activate, delete tenants, adopt their storage; "
    "maintenance.",
    no_args_is_help=True,
)
spares_app = typer.Typer(
    help="Spare schemas: clones of the template made ahead of time (schema_spares).", no_args_is_help=True
)
maintenance_app = typer.Typer(
    help="Maintenance mode: a tenant's requests get 503 with Retry-After while you work on it.",
    no_args_is_help=True,
)
tenants_app.add_typer(spares_app, name="spares")
tenants_app.add_typer(maintenance_app, name="maintenance")


@tenants_app.command("list")
def tenants_list(
    status: Annotated[TenantStatus | None, typer.Option(help="Only tenants with this status.")] = None,
    after: Annotated[str | None, typer.Option(help="Start after this identifier (paging).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
) -> None:
    """Tenants ordered by identifier (on a Citus cluster, with the node holding each)."""

    async def work(manager: TenancyManager) -> tuple[list[Tenant], dict[str, str]]:
        found = await manager.list_tenants(status=status, after=after, limit=limit)
        return found, await tenant_nodes(manager, found)

    found, nodes = run_with_manager(work)
    rows = [{**tenant_dict(t), **({"node": nodes.get(t.identifier)} if nodes else {})} for t in found]
    columns = ["identifier", "name", "status", "created_at", *(["node"] if nodes else [])]
    print_rows("Tenants", rows, columns)


@tenants_app.command("show")
def tenants_show(identifier: str) -> None:
    """One tenant, with its storage name (and, on a Citus cluster, its node)."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        tenant = await manager.get_tenant(identifier)
        node = (await tenant_nodes(manager, [tenant])).get(identifier)
        return {
            **tenant_dict(tenant),
            "storage": manager.isolation.storage_name(identifier),
            **({"node": node} if node is not None else {}),
            "metadata": thaw(tenant.metadata),
        }

    row = run_with_manager(work)
    if state.json:
        print_json(json.dumps(row, default=str))
        return
    table = Table(title=f"Tenant {identifier}", show_header=False)
    for key, value in row.items():
        table.add_row(key, str(value))
    out.print(table)


@tenants_app.command("create")
def tenants_create(
    identifier: str,
    name: Annotated[str | None, typer.Option(help="Display name (default: the identifier).")] = None,
    empty: Annotated[
        bool,
        typer.Option(
            "--empty", help="Without alembic_config or schema_template: create the storage with no tables."
        ),
    ] = False,
) -> None:
    """Register a tenant: its storage migrated to head (alembic_config) or cloned from the template."""

    async def work(manager: TenancyManager) -> Tenant:
        if not empty:
            _refuse_empty_storage(manager)
        return await manager.register_tenant(identifier, name or identifier)

    tenant = run_with_manager(work)
    print_rows("Created", [tenant_dict(tenant)], ["identifier", "name", "status"])


@tenants_app.command("clone")
def tenants_clone(
    source: str,
    identifier: str,
    name: Annotated[str | None, typer.Option(help="Display name (default: the source's).")] = None,
) -> None:
    """Register IDENTIFIER with a consistent copy of SOURCE's data (its tier, its sequences).

    The new storage is made as `create` makes it (alembic_config or schema_template), then
    filled from one snapshot of SOURCE, which keeps serving. A failure undoes the clone.
    """

    async def work(manager: TenancyManager) -> Tenant:
        _refuse_empty_storage(manager, (await manager.get_tenant(source)).tier)
        return await manager.clone_tenant(source, identifier, name=name)

    tenant = run_with_manager(work)
    print_rows("Cloned", [tenant_dict(tenant)], ["identifier", "name", "status"])


def _refuse_empty_storage(manager: TenancyManager, tier: str | None = None) -> None:
    # The command has no models to create tables from: without migrations to run or a
    # template to clone, the tenant's schema or database would have no tables, and every
    # request of the tenant would fail. Shared tables (rls) are there already, or not.
    config = manager.config
    tier = tier or manager.isolation.choose_tier(None, {}) or config.isolation_strategy
    if config.alembic_config is not None or tier == "rls":
        return
    if tier == "schema" and config.schema_template is not None and config.backend == "postgresql":
        return
    raise ConfigurationError(
        "the new tenant's storage would have no tables: set alembic_config (TENANCY_ALEMBIC_CONFIG) "
        "so that it is migrated to head, or schema_template to clone it, or pass --empty"
    )


def _change(action: str, change: Callable[[TenancyManager], Awaitable[Tenant]]) -> None:
    tenant = run_with_manager(change)
    print_rows(action, [tenant_dict(tenant)], ["identifier", "name", "status"])


@tenants_app.command("suspend")
def tenants_suspend(identifier: str) -> None:
    """Stop serving a tenant (403); its data is kept."""
    _change("Suspended", lambda m: m.suspend_tenant(identifier))


@tenants_app.command("activate")
def tenants_activate(identifier: str) -> None:
    """Serve a suspended tenant again."""
    _change("Activated", lambda m: m.activate_tenant(identifier))


@tenants_app.command("seed")
def tenants_seed(
    identifier: str,
    step: Annotated[
        list[str] | None, typer.Option("--step", "-s", help="Only this provisioning step (repeatable).")
    ] = None,
) -> None:
    """Run the provisioning steps of the app's manager (--app) for an existing tenant."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        ran = await manager.seed_tenant(identifier, steps=step)
        return {"identifier": identifier, "steps": ran}

    result = run_with_manager(work)
    if state.json:
        print_json(json.dumps(result))
    else:
        out.print(f"Seeded {identifier}: {', '.join(result['steps'])}", highlight=False)


@maintenance_app.command("on")
def maintenance_on(identifier: str) -> None:
    """Put an active tenant in maintenance: every worker answers its requests 503."""
    _change("In maintenance", lambda m: m.start_maintenance(identifier))


@maintenance_app.command("off")
def maintenance_off(identifier: str) -> None:
    """Serve a tenant in maintenance again (a suspended or deleted one stays so)."""
    _change("Maintenance ended", lambda m: m.end_maintenance(identifier))


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
            fail("--destroy-data needs --yes when not run interactively", EXIT_USAGE)
        typer.confirm(f"Destroy every row of tenant {identifier!r}? This cannot be undone.", abort=True)

    async def work(manager: TenancyManager) -> None:
        await manager.delete_tenant(identifier, destroy_data=destroy_data)

    run_with_manager(work)
    result = {"identifier": identifier, "deleted": True, "data_destroyed": destroy_data}
    if state.json:
        print_json(json.dumps(result))
    else:
        out.print(f"{'Destroyed' if destroy_data else 'Deleted (data kept)'}: {identifier}")


@tenants_app.command("adopt")
def tenants_adopt(
    identifiers: Annotated[list[str] | None, typer.Argument(help="Tenants whose storage to adopt.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every tenant of the registry.")] = False,
) -> None:
    """Mark storage made outside the library (0.5.0's, a script's) as its tenant's.

    Tenant sessions refuse a schema, database or file without its tenant's marker
    (docs/isolation.md, "Incarnations"); storage marked for another tenant is never
    taken over. Exit 1 if any tenant's storage could not be adopted.
    """
    if not identifiers and not every:
        fail("name the tenants whose storage to adopt, or --all", EXIT_USAGE)

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        slugs = [t.identifier async for t in manager.store.iterate()] if every else list(identifiers or [])
        return await adopt_each(manager, slugs)

    rows = run_with_manager(work)
    print_rows("Storage adopted", rows, ["identifier", "storage"])
    if any(row["storage"].startswith("not adopted") for row in rows):
        raise typer.Exit(EXIT_FAILED)


@tenants_app.command("grants")
def tenants_grants() -> None:
    """Repair tenant roles (schema_tenant_roles): grant each tenant schema's role what it lacks.

    Creates a missing role, grants it its schema, tables and sequences, and grants it to
    the login role; what `doctor` reports under "tenant roles". Exit 1 if a login role
    still reaches a tenant schema by itself (it owns it, or was granted it by hand).
    """

    async def work(manager: TenancyManager) -> dict[str, Any]:
        every = [p.roles for p in manager.isolation.parts() if p.roles is not None]
        if not every:
            raise ConfigurationError("no tenant roles configured: set schema_tenant_roles")
        roles = every[0]  # one schema strategy at most (schema isolation, or hybrid's tier)
        repaired = await roles.repair()
        _, status, detail = await roles.diagnose()
        return {"repaired": repaired, "status": status, "detail": detail}

    result = run_with_manager(work, initialize=False)
    if state.json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"repaired {len(result['repaired'])} schema(s): {', '.join(result['repaired']) or '-'}")
        out.print(f"tenant roles: {result['status']}: {result['detail']}", highlight=False)
    if result["status"] == "fail":
        raise typer.Exit(EXIT_FAILED)


# -- tenants spares ---------------------------------------------------------------------


def _spares(manager: TenancyManager) -> "SparePool":
    pool = manager.isolation.spares
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

    result = run_with_manager(work, initialize=False)
    if state.json:
        print_json(json.dumps(result))
    else:
        out.print(f"made {result['made']} spare schema(s); {result['ready']} ready", highlight=False)


@spares_app.command("list")
def spares_list() -> None:
    """Each spare and whether it is at the template's revision."""

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        pool = _spares(manager)
        await pool.initialize()
        return [s.as_dict() for s in await pool.list_spares()]

    print_rows("Spare schemas", run_with_manager(work, initialize=False), ["name", "revision", "current"])


@spares_app.command("drain")
def spares_drain() -> None:
    """Drop every spare (e.g. after rebuilding the template by hand)."""

    async def work(manager: TenancyManager) -> int:
        pool = _spares(manager)
        await pool.initialize()
        return int(await pool.drain())

    dropped = run_with_manager(work, initialize=False)
    if state.json:
        print_json(json.dumps({"dropped": dropped}))
    else:
        out.print(f"dropped {dropped} spare schema(s)", highlight=False)
