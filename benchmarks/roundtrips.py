"""Count the PostgreSQL round trips of one `GET /orders`, tenancy vs bare.

Both apps of `overhead.py` (the Quick Start and `bare_app.py`) run in this process,
driven through ASGI (no HTTP server), with their database URL pointed at a small
TCP proxy that reads the PostgreSQL wire protocol from the client side. Every
`Sync` (extended protocol) and every simple `Query` ends with a ReadyForQuery from
the server: one network round trip each. The statements sent are listed per
request, after a warm-up, so prepared-statement caches are in their steady state.

    .venv/bin/python benchmarks/roundtrips.py [--requests 200]

Creates and drops the database `bench_roundtrips` (same server as overhead.py:
`TENANCY_BENCH_POSTGRES_URL`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/ is not a package)

DB_NAME = "bench_roundtrips"


class WireCounter:
    """A TCP proxy to PostgreSQL that records the client's messages."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.round_trips = 0
        self.messages: list[tuple[str, str]] = []  # (type, sql or "")
        self._statements: dict[bytes, str] = {}  # prepared statement name -> SQL
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def reset(self) -> None:
        self.round_trips = 0
        self.messages.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        back = asyncio.ensure_future(_pipe(server_r, client_w))
        try:
            await self._client_to_server(client_r, server_w)
        finally:
            back.cancel()
            server_w.close()
            client_w.close()

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Untyped start-up messages first (SSLRequest, then StartupMessage).
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            body = await reader.readexactly(length - 8)
            writer.write(head + body)
            await writer.drain()
            if code != 80877103:  # not an SSLRequest: that was the StartupMessage
                break
        while True:
            try:
                head = await reader.readexactly(5)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            kind = chr(head[0])
            (length,) = struct.unpack("!i", head[1:])
            body = await reader.readexactly(length - 4)
            if kind in ("S", "Q"):
                self.round_trips += 1
            if kind == "Q":
                self.messages.append(("Query", body.rstrip(b"\0").decode()))
            elif kind == "P":
                name, rest = body.split(b"\0", 1)
                sql = rest.split(b"\0", 1)[0].decode()
                self._statements[name] = sql
                self.messages.append(("Parse", sql))
            elif kind == "B":
                _, statement, _ = body.split(b"\0", 2)
                self.messages.append(("Bind", self._statements.get(statement, "?")))
            elif kind in ("E", "D", "S", "C"):
                self.messages.append(({"E": "Execute", "D": "Describe", "S": "Sync", "C": "Close"}[kind], ""))
            writer.write(head + body)
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()  # the server hung up: hang up on the client too


async def asgi_get(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One HTTP GET through the ASGI interface."""
    status = 0
    body = bytearray()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        return {}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return status, bytes(body)


def load_bare(url: str, schema: str) -> Any:
    import importlib.util

    os.environ.update({"BENCH_BARE_DATABASE_URL": url, "BENCH_BARE_SCHEMA": schema})
    spec = importlib.util.spec_from_file_location("bare_app_rt", overhead.BENCH_DIR / "bare_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def measure(app: Any, counter: WireCounter, requests: int) -> dict[str, Any]:
    headers = [(b"x-tenant-id", overhead.TENANT.encode())]
    async with app.router.lifespan_context(app):
        for _ in range(20):  # warm-up: pool, prepared statements, tenant cache
            status, _ = await asgi_get(app, "/orders", headers)
            assert status == 200, status
        counter.reset()
        status, body = await asgi_get(app, "/orders", headers)
        one = list(counter.messages)
        counter.reset()
        for _ in range(requests):
            status, _ = await asgi_get(app, "/orders", headers)
            assert status == 200, status
        per_request = counter.round_trips / requests
    return {"round_trips_per_request": per_request, "one_request": one, "body": json.loads(body)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = args.pg_base.rstrip("/")
    url = make_url(f"{base}/{DB_NAME}")
    await overhead.pg_admin(
        base,
        args.maintenance_db,
        f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
        f"CREATE DATABASE {DB_NAME}",
    )
    counter = WireCounter(url.host or "127.0.0.1", url.port or 5432)
    try:
        await overhead.seed(str(url.render_as_string(hide_password=False)), "quickstart_rt_seed", 10)
        port = await counter.start()
        proxied = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
        tenancy = overhead.load_quickstart(proxied, "quickstart_rt")
        bare = load_bare(proxied, overhead.SCHEMA)
        results = {
            "tenancy": await measure(tenancy.app, counter, args.requests),
            "bare": await measure(bare.app, counter, args.requests),
        }
        await bare.engine.dispose()
        return results
    finally:
        await counter.close()
        await overhead.pg_admin(base, args.maintenance_db, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--pg-base", default=os.environ.get("TENANCY_BENCH_POSTGRES_URL", overhead.DEFAULT_PG_BASE)
    )
    parser.add_argument("--maintenance-db", default="postgres")
    parser.add_argument("--output-dir", type=Path, default=overhead.BENCH_DIR / "results")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    lines = []
    for side, res in results.items():
        lines.append(f"{side}: {res['round_trips_per_request']:.2f} round trips per request (steady state)")
        for kind, sql in res["one_request"]:
            if kind in ("Query", "Parse", "Bind"):
                lines.append(f"    {kind:5} {' '.join(sql.split())}")
            elif kind == "Sync":
                lines.append("    Sync  (round trip)")
            else:
                lines.append(f"    {kind}")
    print("\n".join(lines))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "roundtrips.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
