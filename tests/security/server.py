"""A real uvicorn server for the tests that need one, and a lean HTTP/1.1 client for it."""

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

__all__ = ["Connection", "serve"]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serve(database_url: str, *, workers: int = 2, http: str = "httptools") -> AsyncIterator[str]:
    """`tests.security.served_app:app` under uvicorn on a spare port; yields its base URL.

    The stock asyncio event loop (not uvloop): where context variables could leak from
    one request to the next on a connection. A small pool per worker.
    """
    port = _free_port()
    env = {
        **os.environ,
        "TENANCY_DATABASE_URL": database_url,
        "TENANCY_DATABASE_POOL_SIZE": "4",  # per worker: well within a default max_connections
        "TENANCY_DATABASE_MAX_OVERFLOW": "0",
    }
    command = [sys.executable, "-m", "uvicorn", "tests.security.served_app:app", "--workers", str(workers)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    command += ["--http", http, "--loop", "asyncio"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)  # noqa: ASYNC220 - started once, not awaited
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(600):
                assert process.poll() is None, "uvicorn exited"
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


class Connection:
    """A lean keep-alive HTTP/1.1 client connection: a load generator must not need more
    CPU than the server it loads (httpx costs ~2 ms of CPU a request)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> "Connection":
        url = httpx.URL(base)
        return cls(*await asyncio.open_connection(url.host, url.port))

    @staticmethod
    def encode(method: str, target: str, tenant: str | None, body: bytes = b"") -> bytes:
        tenant_header = f"X-Tenant-ID: {tenant}\r\n" if tenant else ""
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: load\r\n{tenant_header}Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def request(
        self, method: str, target: str, tenant: str | None, body: bytes = b""
    ) -> tuple[int, bytes]:
        self.writer.write(self.encode(method, target, tenant, body))
        return await self.response()

    async def response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        assert b"transfer-encoding" not in head.lower(), head
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
