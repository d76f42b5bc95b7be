"""`tenants move` at its edges: a tenant deleted, or deleted and registered again, while its
schema moves; a move to the node it is on; an unknown tenant; an address that is no worker.
Each ends in a clear answer, and never in a tenant half on one node and half on another."""

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from fastapi_tenancy import ProvisioningError, TenancyConfig, TenancyManager
from fastapi_tenancy.cli import app as cli_app
from fastapi_tenancy.isolation.citus import CitusCluster

from ..apps import Base, Order

ROWS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


async def _seed(manager: TenancyManager, identifier: str, rows: dict[int, str]) -> None:
    await manager.register_tenant(identifier, identifier.title(), app_metadata=Base.metadata)
    async with manager.session(identifier) as session:
        session.add_all(Order(id=i, description=d) for i, d in rows.items())
        await session.commit()


@pytest.fixture
async def manager(citus_url: str) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=citus_url, database_pool_size=3))
    await manager.initialize()
    try:
        for identifier, rows in ROWS.items():
            await _seed(manager, identifier, rows)
        yield manager
    finally:
        await manager.close()


def _cluster(manager: TenancyManager) -> CitusCluster:
    cluster = manager.isolation.cluster
    assert isinstance(cluster, CitusCluster)
    return cluster


async def _rows(manager: TenancyManager, identifier: str) -> dict[int, str]:
    async with manager.session(identifier) as session:
        return {
            row.id: row.description for row in await session.execute(sa.select(Order.id, Order.description))
        }


async def _everywhere(url: str, schema: str) -> dict[str, int]:
    """Where `schema` is: its relations on the coordinator, its `pg_dist_schema` row, the nodes
    holding placements of its tables, and the shards (`<table>_<shardid>`) in it on each worker."""
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user="postgres", database=parsed.database
    )
    try:
        found = {
            "coordinator": await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1",
                schema,
            ),
            "pg_dist_schema": await conn.fetchval(
                "SELECT count(*) FROM pg_dist_schema WHERE schemaid::regnamespace::text = $1", schema
            ),
            "placed on": await conn.fetchval(
                "SELECT count(DISTINCT pl.groupid) FROM pg_dist_shard sh "
                "JOIN pg_dist_placement pl USING (shardid) JOIN pg_class c ON c.oid = sh.logicalrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
                schema,
            ),
        }
        shards = (
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "  # noqa: S608
            f"WHERE n.nspname = '{schema}' AND c.relkind = 'r' AND c.relname ~ '_[0-9]+$'"
        )
        for row in await conn.fetch("SELECT nodeport, result FROM run_command_on_workers($1)", shards):
            found[f"shards on {row['nodeport']}"] = int(row["result"])
        return found
    finally:
        await conn.close()


async def _copying(url: str) -> None:
    """Wait until citus_schema_move runs on the coordinator (past the move's own look-ups)."""
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user="postgres", database=parsed.database
    )
    try:
        for _ in range(200):
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'SELECT citus_schema_move(%'"
            ):
                await asyncio.sleep(0.2)  # and into the copy
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the move never started")
    finally:
        await conn.close()


def _other_node(placed: str, nodes: list[str]) -> str:
    return next(node for node in nodes if node != placed)


async def _workers(cluster: CitusCluster) -> list[str]:
    return [n.address for n in await cluster.nodes() if n.holds_shards]


async def test_a_tenant_deleted_while_it_moves_is_gone_from_every_node(
    manager: TenancyManager, citus_url: str
) -> None:
    cluster = _cluster(manager)
    source = (await cluster.placements(["tenant_alpha"]))["tenant_alpha"]
    move = asyncio.create_task(cluster.move("tenant_alpha", _other_node(source, await _workers(cluster))))
    await _copying(citus_url)
    await manager.delete_tenant("alpha", destroy_data=True)
    moved = await asyncio.wait_for(move, 60)  # the deletion waited for the move to end
    assert moved.source == source
    found = await _everywhere(citus_url, "tenant_alpha")
    assert set(found.values()) == {0}, found
    assert await _rows(manager, "beta") == ROWS["beta"]


async def test_a_slug_registered_again_while_it_moves_keeps_only_the_new_rows(
    manager: TenancyManager, citus_url: str
) -> None:
    cluster = _cluster(manager)
    source = (await cluster.placements(["tenant_alpha"]))["tenant_alpha"]
    move = asyncio.create_task(cluster.move("tenant_alpha", _other_node(source, await _workers(cluster))))
    await _copying(citus_url)
    await manager.delete_tenant("alpha", destroy_data=True)
    await _seed(manager, "alpha", {1: "new-1"})
    await asyncio.wait_for(move, 60)
    assert await _rows(manager, "alpha") == {1: "new-1"}
    assert await _rows(manager, "beta") == ROWS["beta"]
    # One whole schema, its shards all on one worker, none left on the other.
    found = await _everywhere(citus_url, "tenant_alpha")
    shards = sorted(v for k, v in found.items() if k.startswith("shards"))
    assert found["pg_dist_schema"] == found["placed on"] == 1 and shards[0] == 0 and shards[1] > 0, found
    placed = (await cluster.placements(["tenant_alpha"]))["tenant_alpha"]
    assert placed in await _workers(cluster)


async def test_a_tenant_deleted_before_its_move_begins_is_a_clear_error(
    manager: TenancyManager, citus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The move looked the schema up (it was there), then the tenant is deleted with its
    # data, then citus_schema_move runs: refused with the reason, not a driver error.
    cluster = _cluster(manager)
    source = (await cluster.placements(["tenant_alpha"]))["tenant_alpha"]
    looked_up = cluster.placements

    async def then_deleted(schemas: list[str]) -> dict[str, str]:
        found = await looked_up(schemas)
        await manager.delete_tenant("alpha", destroy_data=True)
        return found

    monkeypatch.setattr(cluster, "placements", then_deleted)
    with pytest.raises(ProvisioningError, match="could not move schema 'tenant_alpha' to .*does not exist"):
        await cluster.move("tenant_alpha", _other_node(source, await _workers(cluster)))
    assert set((await _everywhere(citus_url, "tenant_alpha")).values()) == {0}
    assert await _rows(manager, "beta") == ROWS["beta"]


async def _cli(url: str, *args: str) -> tuple[int, str]:
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, cli_app, list(args), env={"TENANCY_DATABASE_URL": url})
    return result.exit_code, result.output


async def test_moves_that_cannot_happen_are_clear_errors(manager: TenancyManager, citus_url: str) -> None:
    cluster = _cluster(manager)
    placed = (await cluster.placements(["tenant_alpha"]))["tenant_alpha"]
    coordinator = next(n.address for n in await cluster.nodes() if n.coordinator)
    code, output = await _cli(citus_url, "--json", "tenants", "move", "alpha", "--to", placed)
    assert code == 0, output
    assert json.loads(output)["from"] == json.loads(output)["to"] == placed
    code, output = await _cli(citus_url, "tenants", "move", "alpha", "--to", placed)
    assert code == 0 and "alpha is on" in output and "already" in output, output
    code, output = await _cli(citus_url, "tenants", "move", "nobody", "--to", placed)
    assert code == 3 and "nobody" in output, output
    for address in (coordinator, "127.0.0.1:1", "somewhere", "127.0.0.1:99999"):
        code, output = await _cli(citus_url, "tenants", "move", "alpha", "--to", address)
        assert code == 2, (address, output)
        assert "HOST:PORT" in output or "not a node that holds tenant schemas" in output, output
    code, output = await _cli(citus_url, "tenants", "move", "alpha", "--to", placed, "--mode", "fast")
    assert code == 2 and "--mode" in output, output
    # A schema that is not (or no longer) distributed: nothing to move, a clear error.
    with pytest.raises(ProvisioningError, match="nothing to move"):
        await cluster.move("tenant_nobody", placed)
    assert (await cluster.placements(["tenant_alpha"]))["tenant_alpha"] == placed
    assert await _rows(manager, "alpha") == ROWS["alpha"]
