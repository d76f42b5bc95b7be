"""A worker added to the cluster is filled by `cluster rebalance`; a worker that stops answers
503 for its own tenants only, and serves them again once it is back, with no restart."""

import asyncio
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.cli import app as cli_app
from fastapi_tenancy.isolation.citus import CitusCluster

from ..apps import Base, Order, build_app
from ..servers import poll
from .cluster import ExtraNode

TENANTS = ("alpha", "beta", "gamma")


@pytest.fixture
async def extra_node(citus_url: str) -> AsyncIterator[ExtraNode]:
    node = await asyncio.to_thread(ExtraNode)
    try:
        await asyncio.to_thread(node.start)
        await node.create_database(str(make_url(citus_url).database))
        yield node
    finally:
        await asyncio.to_thread(node.remove)


async def _cli(url: str, *args: str) -> tuple[int, str]:
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, cli_app, list(args), env={"TENANCY_DATABASE_URL": url})
    return result.exit_code, result.output


async def test_an_added_node_is_rebalanced_onto_and_its_outage_stays_its_own(
    citus_url: str, extra_node: ExtraNode
) -> None:
    manager = TenancyManager(TenancyConfig(database_url=citus_url))
    await manager.initialize()
    try:
        for identifier in TENANTS:
            registered = await manager.register_tenant(identifier, identifier, app_metadata=Base.metadata)
            async with manager.session(registered) as session:
                session.add(Order(id=1, description=identifier))
                await session.commit()
        address = f"127.0.0.1:{extra_node.port}"
        code, output = await _cli(citus_url, "--json", "cluster", "add-node", address)
        assert code == 0, output
        assert json.loads(output)[0] == {"node": address, "active": True, "tenants": 0}
        code, output = await _cli(citus_url, "cluster", "rebalance")
        assert code == 0, output
        # Progress, one line per move as it finishes.
        assert re.search(rf"\[1/\d+\] tenant_\w+: 127\.0\.0\.1:\d+ -> {re.escape(address)} \(", output), (
            output
        )
        code, output = await _cli(citus_url, "--json", "cluster", "nodes")
        counts = {row["node"]: row["tenants"] for row in json.loads(output) if row["holds_tenants"]}
        assert len(counts) == 3 and sum(counts.values()) == 3 and counts[address] >= 1, counts

        cluster = manager.isolation.cluster
        assert isinstance(cluster, CitusCluster)
        placed = await cluster.placements([f"tenant_{t}" for t in TENANTS])
        on_new = [t for t in TENANTS if placed[f"tenant_{t}"] == address]
        elsewhere = [t for t in TENANTS if t not in on_new]
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def status(tenant: str) -> int:
                return (await client.get("/orders", headers={"X-Tenant-ID": tenant})).status_code

            assert [await status(t) for t in TENANTS] == [200, 200, 200]
            await asyncio.to_thread(extra_node.stop)
            for tenant in on_new:
                response = await client.get("/orders", headers={"X-Tenant-ID": tenant})
                assert response.status_code == 503, response.text
            assert [await status(t) for t in elsewhere] == [200] * len(elsewhere)
            await asyncio.to_thread(extra_node.start)

            async def back() -> bool:
                return all([await status(t) == 200 for t in TENANTS])

            assert await poll(back, within=30, interval=0.5)
    finally:
        await manager.close()
