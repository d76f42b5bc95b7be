"""Servers a test runs for itself: a Redis it may kill and restart, the app on two uvicorn workers,
an example app (the Quick Start's `main.py`) on one.

Shared by the Redis store, rate limiter, invalidation, multi-worker and Quick Start tests.
"""

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_client(base_url: str) -> httpx.AsyncClient:
    """A client that opens a new connection per request, so requests spread over the workers."""
    return httpx.AsyncClient(
        base_url=base_url, limits=httpx.Limits(max_keepalive_connections=0), timeout=10.0
    )


@asynccontextmanager
async def serve_workers(env: dict[str, str], app: str = "tests.workers.app:app") -> AsyncIterator[str]:
    """`async with serve_workers(env) as base_url`: tests/workers/app.py on two uvicorn workers.

    Returns once both workers have answered `/health` (with an `X-Worker-Pid` header).
    `env` holds the `TENANCY_*` settings and any other variable the app needs; `app`,
    another app to serve.
    """
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}, **env},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        pids: set[str] = set()
        async with fresh_client(base_url) as client:
            for _ in range(300):
                assert process.returncode is None, "uvicorn exited during startup"
                try:
                    responses = await asyncio.gather(*(client.get("/health") for _ in range(4)))
                    pids |= {r.headers["x-worker-pid"] for r in responses if r.status_code == 200}
                except httpx.TransportError:
                    pass
                if len(pids) == 2:
                    break
                await asyncio.sleep(0.1)
        assert len(pids) == 2, f"both workers never answered (saw {pids})"
        yield base_url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@asynccontextmanager
async def serve_app(directory: Path, env: dict[str, str], *, ready: str = "/health") -> AsyncIterator[str]:
    """`async with serve_app(directory, env) as base_url`: `main:app` of `directory` on one uvicorn worker.

    Returns once `ready` answers at all (uvicorn accepts connections only after the app's
    startup). On exit the server is stopped, and its log must be clean: no traceback, no
    error line (uvicorn re-raises SIGTERM after a graceful shutdown: -15 is a clean exit).
    """
    process = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-m",
            "uvicorn",
            "main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port := free_port()),
        ),
        *("--log-level", "warning"),
        cwd=directory,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url) as client:
            for _ in range(300):
                try:
                    await client.get(ready)
                    break
                except httpx.TransportError:
                    assert process.returncode is None, "uvicorn exited during startup"
                    await asyncio.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        output, _ = await asyncio.wait_for(process.communicate(), timeout=15)
        assert process.returncode in (0, -15), output
        assert b"Traceback" not in output and b"ERROR" not in output, output


class OwnRedis:
    """A redis-server of the test's own on a spare port, which the test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = Path(tempfile.mkdtemp(prefix="ft-redis-"))
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if REQUIRE_SERVICES:
                pytest.fail("redis-server is required (TENANCY_TEST_REQUIRE_SERVICES=1): not installed")
            pytest.skip("redis-server is not installed")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("redis-server did not start")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def poll(condition: Callable[[], Awaitable[bool]], within: float, interval: float = 0.02) -> bool:
    """True once `condition()` holds, False if it did not within `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await condition():
            return True
        await asyncio.sleep(interval)
    return False
