"""A slow Redis (checklist item 38): between the app and the shared Redis, a TCP proxy of
the test's own adds latency on demand. With the registry in Redis, requests fail fast with
a 503 while it is slow (never a 500, never a default tenant) and are served again once it
is not, with no restart; with Redis as a cache in front of the SQL registry, requests go
on being served from SQL."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.storage.caching import CachingTenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.storage.redis import RedisTenantStore

from ..apps import Base, build_app

TIMEOUT = 0.3  # the store's Redis timeout
SLOW = 5.0  # the latency the proxy adds while Redis is "slow"


class LatencyProxy:
    """Forwards TCP to Redis; while `delay` is set, every chunk waits that long first."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.delay = 0.0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        pipes = [
            asyncio.ensure_future(self._pipe(reader, upstream_writer)),
            asyncio.ensure_future(self._pipe(upstream_reader, writer)),
        ]
        self.tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        for w in (writer, upstream_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()


@asynccontextmanager
async def app_behind(
    proxy: LatencyProxy, mode: str, tmp_path: Path, prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, RedisTenantStore | CachingTenantStore]]:
    store: RedisTenantStore | CachingTenantStore
    if mode == "cache":
        backend = SQLAlchemyTenantStore(f"sqlite:///{tmp_path / 'registry.db'}")
        store = CachingTenantStore(backend, proxy.url, prefix=prefix, timeout=TIMEOUT)
    else:
        store = RedisTenantStore(proxy.url, prefix=prefix, timeout=TIMEOUT)
    # No in-process cache: every request asks the store, so each one meets the slow Redis.
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}", cache_ttl=0, negative_cache_ttl=0)
    manager = TenancyManager(config, store)
    await manager.initialize()
    try:
        await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, store
    finally:
        proxy.delay = 0.0
        await manager.close()


async def _get(client: httpx.AsyncClient, tenant: str) -> tuple[int, float, httpx.Response]:
    started = time.monotonic()
    response = await client.get("/orders", headers={"X-Tenant-ID": tenant})
    return response.status_code, time.monotonic() - started, response


@pytest.mark.parametrize("mode", ["registry", "cache"])
async def test_a_slow_redis_fails_fast_or_steps_aside_and_recovers(
    mode: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = LatencyProxy(host, int(port))
    await proxy.start()
    try:
        async with app_behind(proxy, mode, tmp_path, redis_prefix) as (client, store):
            assert (await _get(client, "acme-corp"))[0] == 200
            assert (await _get(client, "nobody"))[0] == 404
            proxy.delay = SLOW
            for tenant in ("acme-corp", "nobody", "acme-corp"):
                status, took, response = await _get(client, tenant)
                if mode == "registry":
                    assert (status, response.json()) == (503, {"detail": "Tenancy backend unavailable"})
                    assert response.headers["retry-after"] == "1"
                else:  # the SQL registry answers; the cache steps aside
                    assert status == (200 if tenant == "acme-corp" else 404), response.text
                # Bounded by the store's timeout, not by the slowness (no absolute SLO: the
                # machine is shared; the slowness is many times the timeout).
                assert took < SLOW, took
            assert store.failures > 0
            proxy.delay = 0.0
            # Recovery by itself, without a restart (the first call may still meet a
            # connection that the slowness left behind).
            deadline = time.monotonic() + 5
            while (await _get(client, "acme-corp"))[0] != 200:
                assert time.monotonic() < deadline, "not served again within 5 s of Redis recovering"
                await asyncio.sleep(0.1)
            assert (await _get(client, "nobody"))[0] == 404
    finally:
        await proxy.close()
