"""The Quick Start, unmodified but for its URL, on a Citus coordinator with two workers.

Its tenants become distributed schemas spread over both workers; `fastapi-tenancy tenants
move` moves one to the other worker while a writer keeps writing to it, and every write
the app acknowledged is there afterwards.
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ..cli.test_cli import SCRIPT
from ..servers import serve_app
from ..test_quickstart import EXAMPLE, _run

MORE_TENANTS = """
import asyncio
from main import manager, Base

async def more():
    await manager.initialize()
    for slug in ("globex", "initech", "umbrella"):
        await manager.register_tenant(identifier=slug, name=slug, app_metadata=Base.metadata)
    await manager.close()

asyncio.run(more())
"""


async def _cli(env: dict[str, str], *args: str) -> tuple[int, Any]:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), "--json", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    try:
        return process.returncode, json.loads(stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON: {stdout!r} {stderr!r}")


@pytest.fixture
async def quickstart(citus_url: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    env["TENANCY_DATABASE_URL"] = citus_url
    seeded = await asyncio.to_thread(_run, env, "seed.py")
    assert seeded == "Created: acme-corp → schema: tenant_acme_corp\n"
    await asyncio.to_thread(_run, env, "-c", MORE_TENANTS)
    async with serve_app(EXAMPLE, env) as base:
        yield base, env


async def test_quickstart_tenants_spread_over_the_workers_and_move_online(
    quickstart: tuple[str, dict[str, str]],
) -> None:
    base, env = quickstart
    code, tenants = await _cli(env, "tenants", "list")
    assert code == 0, tenants
    nodes = {t["identifier"]: t["node"] for t in tenants}
    assert set(nodes) == {"acme-corp", "globex", "initech", "umbrella"}
    assert len(set(nodes.values())) == 2, nodes  # both workers hold tenants
    source = nodes["acme-corp"]
    target = next(node for node in nodes.values() if node != source)

    acme = {"X-Tenant-ID": "acme-corp"}
    acknowledged: list[int] = []
    statuses: dict[int, int] = {}
    moving = asyncio.Event()
    moved = asyncio.Event()

    async def write(client: httpx.AsyncClient) -> None:
        after = 0  # writes after the move, on the tenant's new node
        while after < 10:
            after += moved.is_set()
            response = await client.post("/orders", params={"description": "a write"}, headers=acme)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                acknowledged.append(response.json()["id"])
                if len(acknowledged) == 20:
                    moving.set()  # writes are flowing: start the move

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        writers = [asyncio.create_task(write(client)) for _ in range(4)]
        await asyncio.wait_for(moving.wait(), 30)
        during = len(acknowledged)
        code, move = await _cli(env, "tenants", "move", "acme-corp", "--to", target)
        assert code == 0, move
        moved.set()
        assert (move["from"], move["to"]) == (source, target) and move["seconds"] > 0
        assert len(acknowledged) > during, "no write was acknowledged while the tenant moved"
        await asyncio.gather(*writers)
        listed = await client.get("/orders", headers=acme)
        assert listed.status_code == 200, listed.text
        stored = sorted(order["id"] for order in listed.json()["orders"])
    # Zero lost writes: every acknowledged order is there, once, and nothing else is.
    assert stored == sorted(acknowledged), (len(stored), len(acknowledged))
    assert set(statuses) <= {200, 503}, statuses

    (code, shown), (doctor_code, checks) = await asyncio.gather(
        _cli(env, "tenants", "show", "acme-corp"), _cli(env, "doctor")
    )
    assert code == 0 and shown["node"] == target, shown
    assert doctor_code == 0, checks
    citus = next(check for check in checks if check["name"] == "citus")
    assert "2 nodes" in citus["detail"], citus
