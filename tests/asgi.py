"""Drive an ASGI app with a scope written by hand: what a hostile client or an unusual
server sends, which HTTP clients would normalise away."""

from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp

__all__ = ["http_raw", "websocket"]


async def websocket(
    app: ASGIApp,
    headers: Iterable[tuple[str, str]],
    *,
    path: str = "/ws",
    raw_path: bytes | None = None,
    client: tuple[str, int] = ("203.0.113.7", 50000),
    extensions: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Drive one WebSocket handshake through the ASGI app; what the app sent."""
    sent: list[dict[str, Any]] = []
    incoming: list[dict[str, Any]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect", "code": 1000},
    ]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "root_path": "",
        "query_string": b"",
        "scheme": "ws",
        "server": ("app.test", 80),
        "client": client,
        "subprotocols": [],
        "extensions": extensions or {},
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


async def http_raw(
    app: ASGIApp, path: str, raw_path: bytes | None = None, *, root_path: str = ""
) -> tuple[int, bytes]:
    """One HTTP GET with exactly this scope `path` and `raw_path` (clients normalise
    `..` away before sending; a hostile one does not, and servers pass it on)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "server": ("app.test", 80),
        "client": ("203.0.113.7", 1),
        "headers": [(b"host", b"app.test")],
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
