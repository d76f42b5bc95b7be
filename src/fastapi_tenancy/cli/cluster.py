"""`fastapi-tenancy cluster` (nodes, rebalance, add-node) and `tenants move`: tenants on Citus.

The commands work through the isolation's `CitusCluster` (`isolation/citus.py`), which is
active when `database_url` is a Citus coordinator; elsewhere they exit with 2 and say so.
"""

import json
from collections.abc import Iterable
from typing import Annotated, Any

import typer

from ..errors import ConfigurationError
from ..isolation.citus import CitusCluster, Move, TransferMode
from ..isolation.citus_rls import CitusTables
from ..manager import TenancyManager
from ..tenant import Tenant
from .base import out, print_rows, run_with_manager, state

__all__ = ["cluster_app", "tenant_nodes", "tenants_move"]

cluster_app = typer.Typer(
    help="The Citus cluster the tenant schemas are spread over: nodes, rebalancing, adding a node.",
    no_args_is_help=True,
)

ModeOption = Annotated[
    str,
    typer.Option(
        "--mode",
        help="How Citus copies: auto (logical replication, writes go on), force_logical, block_writes.",
    ),
]
_MODES = ("auto", "force_logical", "block_writes")


def _mode(value: str) -> TransferMode:
    if value not in _MODES:
        raise ConfigurationError(f"--mode must be one of {', '.join(_MODES)}, not {value!r}")
    return value  # type: ignore[return-value]  # checked just above


def _cluster(manager: TenancyManager, tenant: Tenant | None = None) -> CitusCluster:
    part = manager.isolation.serving(tenant) if tenant is not None else None
    candidates = [part] if part is not None else manager.isolation.parts()
    for candidate in candidates:
        if candidate.cluster is not None and candidate.cluster.active:
            return candidate.cluster
    raise ConfigurationError(
        "tenants are not on a Citus cluster here: database_url's database has no citus extension, "
        "database_cluster is 'none', or the tenant's tier keeps no schema (docs/scaling-out.md)"
    )


async def tenant_nodes(manager: TenancyManager, tenants: Iterable[Tenant]) -> dict[str, str]:
    """`identifier -> host:port` of the node holding each tenant's schema (or, under row-level
    security, its rows), for those on a cluster."""
    wanted: dict[CitusCluster, dict[str, str]] = {}  # cluster -> schema -> identifier
    sharded: dict[CitusTables, dict[str, str]] = {}  # shared tables -> tenant id -> identifier
    for tenant in tenants:
        part = manager.isolation.serving(tenant)
        if part.shards is not None and part.shards.active:
            sharded.setdefault(part.shards, {})[tenant.id] = tenant.identifier
        elif part.cluster is not None and part.cluster.active:
            wanted.setdefault(part.cluster, {})[part.storage_name(tenant.identifier)] = tenant.identifier
    nodes: dict[str, str] = {}
    for cluster, schemas in wanted.items():
        for schema, node in (await cluster.placements(list(schemas))).items():
            nodes[schemas[schema]] = node
    for shards, ids in sharded.items():
        for tenant_id, node in (await shards.placements(list(ids))).items():
            nodes[ids[tenant_id]] = node
    return nodes


def _move_row(move: Move, identifier: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"schema": move.schema, "from": move.source, "to": move.target}
    if identifier is not None:
        row = {"identifier": identifier, **row}
    return {**row, "seconds": round(move.seconds, 3)}


def tenants_move(
    identifier: str,
    to: Annotated[str, typer.Option("--to", help="The node to move to, HOST:PORT (see `cluster nodes`).")],
    mode: ModeOption = "auto",
    admin_url: Annotated[
        str | None,
        typer.Option(
            "--admin-url",
            help="rls tenants: a role bypassing row-level security (superuser), which Citus copies as.",
        ),
    ] = None,
) -> None:
    """Move a tenant's schema (or, under row-level security, its own shard) to another Citus node
    while it is served (no write is lost)."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        tenant = await manager.get_tenant(identifier)
        shards = manager.isolation.serving(tenant).shards
        if shards is not None and shards.active:
            moved = await shards.move(tenant.id, to, admin_url=admin_url, mode=_mode(mode))
            return _move_row(moved, identifier)
        cluster = _cluster(manager, tenant)
        schema = manager.isolation.serving(tenant).storage_name(identifier)
        return _move_row(await cluster.move(schema, to, mode=_mode(mode)), identifier)

    row = run_with_manager(work)
    if state.json:
        out.print_json(json.dumps(row))
    elif row["from"] == row["to"]:
        out.print(f"{identifier} is on {row['to']} already", highlight=False)
    else:
        out.print(
            f"moved {identifier} from {row['from']} to {row['to']} in {row['seconds']} s", highlight=False
        )


@cluster_app.command("nodes")
def cluster_nodes() -> None:
    """Every node of the cluster and how many tenant schemas it holds."""

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        nodes = await _cluster(manager).nodes()
        return [
            {
                "node": n.address,
                "role": "coordinator" if n.coordinator else "worker",
                "active": n.active,
                "holds_tenants": n.holds_shards,
                "tenants": n.schemas,
            }
            for n in nodes
        ]

    print_rows("Citus nodes", run_with_manager(work), ["node", "role", "active", "holds_tenants", "tenants"])


@cluster_app.command("rebalance")
def cluster_rebalance(mode: ModeOption = "auto") -> None:
    """Even out the tenant schemas over the nodes, moving one at a time, online; prints each move."""

    def progress(done: int, total: int, move: Move) -> None:
        if not state.json:
            out.print(
                f"[{done}/{total}] {move.schema}: {move.source} -> {move.target} ({move.seconds:.1f} s)",
                highlight=False,
            )

    async def work(manager: TenancyManager) -> list[dict[str, Any]]:
        moves = await _cluster(manager).rebalance(mode=_mode(mode), progress=progress)
        return [_move_row(move) for move in moves]

    rows = run_with_manager(work)
    if state.json:
        out.print_json(json.dumps(rows))
    else:
        out.print(f"rebalanced: {len(rows)} move(s)" if rows else "balanced already: nothing to move")


@cluster_app.command("add-node")
def cluster_add_node(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a PostgreSQL with Citus and this database.")],
) -> None:
    """Add a worker node (then `cluster rebalance` moves tenants onto it)."""

    async def work(manager: TenancyManager) -> dict[str, Any]:
        node = await _cluster(manager).add_node(address)
        return {"node": node.address, "active": node.active, "tenants": node.schemas}

    print_rows("Node added", [run_with_manager(work)], ["node", "active", "tenants"])
