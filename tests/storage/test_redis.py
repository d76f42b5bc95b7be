"""RedisTenantStore beyond the contract: outages are 503s, every field round-trips, and the
deprecated `backend=` builds a CachingTenantStore."""

import json
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fastapi_tenancy import TenancyUnavailableError, Tenant, TenantStatus
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.storage._records import decode, encode
from fastapi_tenancy.storage.caching import CachingTenantStore
from fastapi_tenancy.storage.redis import RedisTenantStore

from ..servers import OwnRedis, free_port
from .conftest import serving


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
    record = encode(tenant)
    assert decode(record) == tenant
    # Serialised generically: every dataclass field is in the record.
    names = {f.name for f in fields(Tenant)}
    assert names <= set(record) | set(json.loads(record["fields"]))


async def test_over_http_a_redis_outage_is_a_503(own_redis: OwnRedis, tmp_path: Path) -> None:
    async with serving(RedisTenantStore(own_redis.url, timeout=0.5), tmp_path) as client:
        assert (await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})).status_code == 200
        await own_redis.kill()
        response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
        assert response.status_code == 503
        assert response.json() == {"detail": "Tenancy backend unavailable"}
        assert response.headers["retry-after"] == "1"
        await own_redis.start()
        # Back by itself; this Redis keeps nothing on disk, so the registry is empty now.
        after = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
        assert after.status_code == 404, after.text


async def test_backend_is_deprecated_and_builds_the_caching_store(redis_url: str, redis_prefix: str) -> None:
    registry = InMemoryTenantStore()
    with pytest.warns(DeprecationWarning, match="CachingTenantStore"):
        store = RedisTenantStore(redis_url, prefix=redis_prefix, backend=registry, cache_ttl=7, timeout=0.25)
    assert isinstance(store, CachingTenantStore)
    assert (store.backend, store.prefix, store.ttl) == (registry, redis_prefix, 7)
    assert store.redis.connection_pool.connection_kwargs["socket_timeout"] == 0.25
    await store.initialize()
    try:
        tenant = await store.create(Tenant(identifier="acme", name="Acme"))
        assert await store.get_by_identifier("acme") == tenant
        assert await store.redis.exists(f"{redis_prefix}cache:identifier:acme") == 1
    finally:
        await store.close()
    # Without a backend it is the registry, with no warning (warnings are errors here).
    registry_store = RedisTenantStore(redis_url, prefix=redis_prefix)
    assert type(registry_store) is RedisTenantStore
    await registry_store.close()
