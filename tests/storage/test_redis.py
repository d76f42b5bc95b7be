"""RedisTenantStore beyond the contract: outages, the shared cache, generic serialisation."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyUnavailableError, Tenant, TenantStatus
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.storage.redis import RedisTenantStore, _decode, _encode

from ..apps import Base, build_app
from ..servers import OwnRedis, free_port


class CountingStore(InMemoryTenantStore):
    """The memory store, counting lookups; `during_read` runs in the middle of one."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.during_read: asyncio.Future[None] | None = None

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads += 1
        tenant = await super().get_by_identifier(identifier)
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            await hook
        return tenant


@pytest.fixture
async def cached(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisTenantStore]:
    store = RedisTenantStore(redis_url, prefix=redis_prefix, backend=CountingStore(), cache_ttl=60)
    await store.initialize()
    yield store
    await store.close()


def _backend(store: RedisTenantStore) -> CountingStore:
    assert isinstance(store.backend, CountingStore)
    return store.backend


async def test_the_cache_serves_repeated_lookups_from_redis(cached: RedisTenantStore) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", metadata={"plan": "pro"}))
    for _ in range(3):
        assert await cached.get_by_identifier("acme") == tenant
    assert _backend(cached).reads == 1
    # A second store (another worker) shares the cache.
    other = RedisTenantStore(cached.redis, prefix=cached.prefix, backend=_backend(cached))
    assert await other.get_by_identifier("acme") == tenant
    assert _backend(cached).reads == 1


async def test_a_write_invalidates_the_shared_cache(cached: RedisTenantStore) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    assert await cached.get_by_identifier("acme") == tenant
    assert await cached.get_by_id(tenant.id) == tenant
    suspended = await cached.update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    assert await cached.get_by_identifier("acme") == suspended
    assert await cached.get_by_id(tenant.id) == suspended
    await cached.delete(tenant.id)
    assert await cached.get_by_identifier("acme") is None


async def test_a_read_overtaken_by_a_write_is_not_cached(cached: RedisTenantStore) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _backend(cached).during_read = gate
    slow_read = asyncio.create_task(cached.get_by_identifier("acme"))
    await asyncio.sleep(0.05)  # the read has the old record and waits
    suspended = await cached.update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    gate.set_result(None)
    assert await slow_read == tenant  # what it read, but it must not be cached
    assert await cached.get_by_identifier("acme") == suspended


async def test_registry_answers_503_when_redis_is_unreachable() -> None:
    store = RedisTenantStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        with pytest.raises(TenancyUnavailableError):
            await store.initialize()
        with pytest.raises(TenancyUnavailableError):
            await store.get_by_identifier("acme")
        with pytest.raises(TenancyUnavailableError):
            await store.create(Tenant(identifier="acme", name="Acme"))
    finally:
        await store.close()
    assert store.failures == 3


async def test_cache_steps_aside_when_redis_dies_and_returns(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    backend = CountingStore()
    store = RedisTenantStore(own_redis.url, backend=backend, timeout=0.5)
    await store.initialize()
    try:
        tenant = await store.create(Tenant(identifier="acme", name="Acme"))
        await own_redis.kill()
        with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
            for _ in range(3):
                assert await store.get_by_identifier("acme") == tenant
            changed = await store.update(tenant.with_changes(name="Changed"))
        assert store.failures >= 4 and backend.reads == 3
        assert caplog.text.count("Redis tenant cache unavailable") == 1
        await own_redis.start()
        assert await store.get_by_identifier("acme") == changed
        assert await store.get_by_identifier("acme") == changed
        assert backend.reads == 4  # cached again
    finally:
        await store.close()


async def test_every_tenant_field_round_trips() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    tenant = Tenant(
        identifier="acme",
        name="Ünïcode ✓",
        status=TenantStatus.SUSPENDED,
        metadata={"nested": {"list": [1, 2.5, None, "x"]}, "flag": True},
        created_at=stamp,
        updated_at=stamp,
    )
    record = _encode(tenant)
    assert _decode(record) == tenant
    # Serialised generically: every dataclass field is in the record.
    names = {f.name for f in fields(Tenant)}
    assert names <= set(record) | set(json.loads(record["fields"]))


@pytest.mark.parametrize("mode", ["registry", "cache"])
async def test_over_http_a_redis_outage_is_a_503_or_nothing(
    mode: str, own_redis: OwnRedis, tmp_path: Path
) -> None:
    backend = None if mode == "registry" else SQLAlchemyTenantStore(f"sqlite:///{tmp_path / 'reg.db'}")
    store = RedisTenantStore(own_redis.url, backend=backend, timeout=0.5)
    # No in-process cache: every request asks the store.
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}", cache_ttl=0, negative_cache_ttl=0)
    manager = TenancyManager(config, store)
    await manager.initialize()
    await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)
    transport = httpx.ASGITransport(app=build_app(manager))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})).status_code == 200
            await own_redis.kill()
            response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
            if mode == "registry":
                assert response.status_code == 503
                assert response.json() == {"detail": "Tenancy backend unavailable"}
                assert response.headers["retry-after"] == "1"
            else:
                assert response.status_code == 200, response.text  # straight to the SQL registry
            await own_redis.start()
            # Back by itself; this Redis keeps nothing on disk, so a Redis registry is empty now.
            after = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
            assert after.status_code == (200 if mode == "cache" else 404), after.text
    finally:
        await manager.close()
