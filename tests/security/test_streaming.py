"""Streaming responses (checklist item 18): a long stream reads its tenant's rows on a live
session for its full length while another tenant's requests run beside it, and a client
that disconnects in the middle of a stream leaves no session checked out, no tenant in
context and a clean connection."""

import asyncio
from typing import Any

from starlette.types import Message

from fastapi_tenancy import current_tenant_or_none

from ..isolation.test_matrix import ROWS, Env
from .conftest import AppFactory
from .connection import connection_state

ROUNDS = 40
LINE_ROWS = {tenant: ",".join(d for _, d in sorted(rows.items())) for tenant, rows in ROWS.items()}
EXPECTED = {tenant: [f"{i}:{d}" for i, d in rows.items()] for tenant, rows in ROWS.items()}


def _lines(tenant: str, body: str) -> None:
    lines = body.splitlines()
    assert lines == [f"{n}:{tenant}:{LINE_ROWS[tenant]}" for n in range(len(lines))], body[:500]


async def _stream(env: Env, tenant: str, rounds: int) -> str:
    async with env.client.stream(
        "GET", "/slow-stream", params={"rounds": rounds}, headers={"X-Tenant-ID": tenant}
    ) as response:
        assert response.status_code == 200
        return (await response.aread()).decode()


async def _orders(env: Env, tenant: str) -> None:
    response = await env.get(tenant, "/orders")
    assert response.status_code == 200, response.text
    assert [f"{o['id']}:{o['description']}" for o in response.json()["orders"]] == EXPECTED[tenant]


async def test_a_long_stream_stays_in_its_tenant_while_another_tenant_is_served(
    pooled_app: AppFactory,
) -> None:
    # A pool of two: the stream holds one connection for its whole length, the other
    # tenant's requests take turns on the second.
    async with pooled_app(database_pool_size=2) as env:
        baseline = await connection_state(env.manager.engine)

        async def beta_traffic() -> None:
            for _ in range(15):
                await _orders(env, "beta")
                _lines("beta", await _stream(env, "beta", 3))

        alpha, _, beta = await asyncio.gather(
            _stream(env, "alpha", ROUNDS), beta_traffic(), _stream(env, "beta", ROUNDS)
        )
        _lines("alpha", alpha)
        _lines("beta", beta)
        assert len(alpha.splitlines()) == len(beta.splitlines()) == ROUNDS
        pool: Any = env.manager.engine.pool
        assert pool.checkedout() == 0
        assert (await connection_state(env.manager.engine)).without_pid() == baseline.without_pid()


async def test_a_client_leaving_mid_stream_leaves_nothing_behind(pooled_app: AppFactory) -> None:
    async with pooled_app() as env:  # a pool of one: a leaked checkout would starve what follows
        baseline = await connection_state(env.manager.engine)
        for tenant in ("alpha", "beta", "alpha"):
            sent = await _disconnect_after(env, tenant, lines=3)
            body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
            _lines(tenant, body.decode())
            assert 3 <= len(body.decode().splitlines()) < 1000, "the stream stopped at the disconnect"
            assert current_tenant_or_none() is None
            pool: Any = env.manager.engine.pool
            assert pool.checkedout() == 0, "the stream's session was not closed"
            after = await connection_state(env.manager.engine)
            assert after.without_pid() == baseline.without_pid(), tenant
            await _orders(env, "beta" if tenant == "alpha" else "alpha")


async def _disconnect_after(env: Env, tenant: str, *, lines: int) -> list[Message]:
    """GET a 1000-line stream straight through ASGI; hang up once `lines` lines came in."""
    sent: list[Message] = []
    enough = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        if body.count(b"\n") >= lines:
            enough.set()

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/slow-stream",
        "raw_path": b"/slow-stream",
        "root_path": "",
        "query_string": b"rounds=1000&pause=0.01",
        "headers": [(b"host", b"test"), (b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    app = env.client._transport.app  # type: ignore[attr-defined]
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return sent
