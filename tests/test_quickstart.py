"""The user's Quick Start, run as written: seed.py, then main.py under uvicorn, on PostgreSQL
and on SQLite, checking every request and error of the spec byte for byte."""

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .servers import serve_app
from .swagger import MissingInput, try_it_out

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart"
SPEC = ROOT.parent / "shared" / "spec" / "quickstart.md"

# The one line the example changes: the URL comes from the environment.
SPEC_URL_LINE = '    database_url="postgresql+asyncpg://postgres:postgres@localhost/myapp",\n'
EXAMPLE_URL_LINE = (
    '    database_url=os.environ["TENANCY_DATABASE_URL"],'
    "  # the only change: the URL comes from the environment\n"
)

PREPARE = """
import asyncio
from main import manager, Base

async def prepare():
    await manager.initialize()
    for slug in ("sleepy-co", "gone-co"):
        await manager.register_tenant(identifier=slug, name=slug, app_metadata=Base.metadata)
    await manager.suspend_tenant("sleepy-co")
    await manager.delete_tenant("gone-co")
    await manager.close()

asyncio.run(prepare())
"""


def test_the_example_is_the_spec_verbatim_but_for_the_url() -> None:
    if not SPEC.exists():
        pytest.skip(f"the spec is not beside this checkout ({SPEC})")
    main, seed = re.findall(r"```python\n(.*?)```", SPEC.read_text(), re.S)
    assert (EXAMPLE / "seed.py").read_text() == seed
    assert (EXAMPLE / "main.py").read_text() == "import os\n" + main.replace(SPEC_URL_LINE, EXAMPLE_URL_LINE)


def _run(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[str]:
    env = {**os.environ, "TENANCY_DATABASE_URL": database_url}
    seeded = await asyncio.to_thread(_run, env, "seed.py")
    assert seeded == "Created: acme-corp → schema: tenant_acme_corp\n"
    await asyncio.to_thread(_run, env, "-c", PREPARE)
    async with serve_app(EXAMPLE, env) as base:
        yield base


async def test_every_request_and_error_of_the_spec(server: str) -> None:
    acme = {"X-Tenant-ID": "acme-corp"}
    async with httpx.AsyncClient(base_url=server) as client:
        created = await client.post("/orders?description=First+order", headers=acme)
        assert (created.status_code, created.json()) == (200, {"id": 1, "description": "First order"})
        listed = await client.get("/orders", headers=acme)
        assert (listed.status_code, listed.json()) == (
            200,
            {"tenant": "acme-corp", "orders": [{"id": 1, "description": "First order"}]},
        )
        assert (await client.get("/orders", headers={"X-Tenant-ID": "sleepy-co"})).status_code == 403
        errors = {
            "missing": (await client.get("/orders"), 400, b'{"detail": "Tenant identifier missing"}'),
            "unknown": (
                await client.get("/orders", headers={"X-Tenant-ID": "nobody-inc"}),
                404,
                b'{"detail": "Tenant not found"}',
            ),
            "suspended": (
                await client.get("/orders", headers={"X-Tenant-ID": "sleepy-co"}),
                403,
                b'{"detail": "Tenant is not active (status: suspended)"}',
            ),
            "deleted": (
                await client.get("/orders", headers={"X-Tenant-ID": "gone-co"}),
                403,
                b'{"detail": "Tenant is not active (status: deleted)"}',
            ),
        }
        for name, (response, status, body) in errors.items():
            assert (response.status_code, response.content) == (status, body), name
            assert response.headers["content-type"] == "application/json", name
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/docs")).status_code == 200
        # /docs' "Try it out" asks for the tenant header on the tenant routes, and reaches the tenant.
        schema = (await client.get("/openapi.json")).json()
        assert "parameters" not in schema["paths"]["/health"]["get"]
        with pytest.raises(MissingInput, match="X-Tenant-ID"):
            try_it_out(schema, "/orders", "get", {}, origin=server)
        typed = {"X-Tenant-ID": "acme-corp", "description": "From the docs"}
        tried = await client.send(try_it_out(schema, "/orders", "post", typed, origin=server))
        assert (tried.status_code, tried.json()) == (200, {"id": 2, "description": "From the docs"})
        tried = await client.send(try_it_out(schema, "/orders", "get", typed, origin=server))
        assert [order["id"] for order in tried.json()["orders"]] == [1, 2]
