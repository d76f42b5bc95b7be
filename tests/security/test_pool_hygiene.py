"""Pool hygiene: after every kind of request, the pooled connection the next request gets
carries nothing of the last one: no tenant setting, no open transaction, the default
search_path and role. Pool of ONE connection, so the check runs on the same physical
connection (same backend pid) the request used; only a cancelled query may cost the
connection, and then its replacement is checked, and the old backend must be gone."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from starlette.types import Message

from ..conftest import POSTGRES_URL, _postgres_admin
from ..isolation.test_matrix import ROWS, Env
from .conftest import AppFactory
from .connection import connection_state

EXPECTED = {tenant: [f"{i}:{d}" for i, d in rows.items()] for tenant, rows in ROWS.items()}


def _rows(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [f"{o['id']}:{o['description']}" for o in response.json()["orders"]]


async def _ok(env: Env, tenant: str) -> None:
    assert _rows(await env.get(tenant, "/orders")) == EXPECTED[tenant]
    assert _rows(await env.get(tenant, "/raw")) == EXPECTED[tenant]  # raw SQL: a search_path is set
    committed = await env.post(tenant, "/raw-commit")  # ... in a transaction that commits
    assert committed.json() == {"count": len(EXPECTED[tenant])}, committed.text


async def _route_error(env: Env, tenant: str) -> None:
    response = await env.post(tenant, "/fail", order_id=50)
    assert response.status_code == 500, response.text
    assert _rows(await env.get(tenant, "/orders")) == EXPECTED[tenant], "the write was rolled back"


async def _http_error(env: Env, tenant: str) -> None:
    response = await env.post(tenant, "/fail", order_id=50, status=409)
    assert response.status_code == 409, response.text
    assert _rows(await env.get(tenant, "/orders")) == EXPECTED[tenant], "the write was rolled back"


async def _savepoints(env: Env, tenant: str) -> None:
    response = await env.post(tenant, "/savepoints", order_id=70)
    assert response.status_code == 200, response.text
    rows = ",".join(description for _, description in sorted(ROWS[tenant].items()))
    assert response.json()["seen"] == [
        rows,
        f"{rows},in-a-savepoint",
        f"{rows},in-a-savepoint,in-a-nested-savepoint",
        f"{rows},in-a-savepoint",
        rows,
    ]
    assert _rows(await env.get(tenant, "/orders")) == EXPECTED[tenant], "the savepoints were rolled back"


async def _cancelled(env: Env, tenant: str) -> None:
    # The client goes away in the middle of a query, after a write, before the commit.
    request = asyncio.ensure_future(env.post(tenant, "/slow", order_id=60, seconds=60))
    database = make_url(env.manager.config.database_url).database
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        for _ in range(400):
            sleeping = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%pg_sleep%'"
                " AND state = 'active' AND pid <> pg_backend_pid()",
                database,
            )
            if sleeping or request.done():
                break
            await asyncio.sleep(0.025)
        assert sleeping, "the request never reached its query"
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        # The cancelled backend must not linger inside the transaction (holding the
        # write and its locks): it is either back to idle or gone.
        for _ in range(400):
            state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", sleeping)
            if state in (None, "idle"):
                break
            await asyncio.sleep(0.025)
        assert state in (None, "idle"), f"cancelled backend left {state!r}"
    finally:
        await admin.close()
    assert _rows(await env.get(tenant, "/orders")) == EXPECTED[tenant], "the half-done write was rolled back"


async def _streaming(env: Env, tenant: str) -> None:
    async with env.client.stream("GET", "/stream", headers={"X-Tenant-ID": tenant}) as response:
        assert response.status_code == 200
        body = (await response.aread()).decode()
    assert body.splitlines() == EXPECTED[tenant]


async def _websocket(env: Env, tenant: str) -> None:
    sent = await websocket_exchange(env, "/ws", tenant, ["list", "list"])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.send"], sent
    for message in sent[1:]:
        assert [f"{o['id']}:{o['description']}" for o in json.loads(message["text"])] == EXPECTED[tenant]


async def _unscoped(env: Env, tenant: str) -> None:
    response = await env.client.get("/health")
    assert response.status_code == 200, response.text


async def websocket_exchange(env: Env, path: str, tenant: str, texts: list[str]) -> list[Message]:
    """Open a WebSocket on the app (straight through ASGI), send `texts`, disconnect."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        *({"type": "websocket.receive", "text": text} for text in texts),
    ):
        inbox.put_nowait(message)
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox.empty() and len(sent) > len(texts):  # every answer is in: hang up
            return {"type": "websocket.disconnect", "code": 1000}
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "subprotocols": [],
    }
    app = env.client._transport.app  # type: ignore[attr-defined]
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return sent


KINDS: dict[str, Callable[[Env, str], Awaitable[None]]] = {
    "ok and raw SQL": _ok,
    "error in the route": _route_error,
    "HTTP error after a write": _http_error,
    "savepoints rolled back": _savepoints,
    "cancelled mid-query": _cancelled,
    "streaming response": _streaming,
    "websocket": _websocket,
    "unscoped": _unscoped,
}


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
async def test_the_pooled_connection_is_clean_after_every_kind_of_request(
    pooled_app: AppFactory, kind: str
) -> None:
    async with pooled_app() as env:
        baseline = await connection_state(env.manager.engine)
        assert baseline.is_clean, baseline
        for tenant in ("alpha", "beta", "alpha"):
            await KINDS[kind](env, tenant)
            after = await connection_state(env.manager.engine)
            assert after.without_pid() == baseline.without_pid(), (kind, tenant)
            if kind != "cancelled mid-query":  # a cancelled query may cost its connection
                assert after.backend_pid == baseline.backend_pid, "not the same physical connection"
            baseline = after
