"""Context pollution in the server: under uvicorn on the stock asyncio loop, a request for
a tenant with a body over 64 KiB on a keep-alive connection, then a pipelined request that
names no tenant. The second must start with no tenant in its context (uvicorn #2167,
CPython gh-140947), with either of uvicorn's HTTP parsers."""

import asyncio
import json

import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import Base
from .server import Connection, serve


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_pipelined_unscoped_request_never_inherits_the_previous_tenant(
    postgres_url: str, http: str
) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, database_pool_size=2))
    await manager.initialize()
    try:
        await manager.register_tenant("alpha", "Alpha", app_metadata=Base.metadata)
    finally:
        await manager.close()
    async with serve(postgres_url, workers=1, http=http) as base:
        for body_size in (0, 70_000, 300_000):
            connection = await Connection.open(base)
            try:
                for n in range(5):
                    scoped = Connection.encode(
                        "POST", f"/orders?order_id={body_size + n}&description=d", "alpha", b"x" * body_size
                    )
                    unscoped = Connection.encode("GET", "/health/tenant", None)
                    connection.writer.write(scoped + unscoped)  # pipelined: one write, two requests
                    status, body = await connection.response()
                    assert status == 200, body
                    status, body = await connection.response()
                    assert (status, json.loads(body)) == (200, {"tenant": None}), (body_size, n)
                    await connection.request("DELETE", "/nowhere", "alpha")  # a 405 as alpha, then:
                    status, body = await connection.request("GET", "/health/tenant", None)
                    assert json.loads(body) == {"tenant": None}
            finally:
                await connection.close()
            await asyncio.sleep(0)
