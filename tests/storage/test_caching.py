"""CachingTenantStore beyond the contract: what is cached and shared, invalidation on writes
(also against a read in flight), compare-and-set through the cache, and Redis outages."""

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from fastapi_tenancy import Tenant, TenantStatus
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.storage.base import version_of
from fastapi_tenancy.storage.caching import CachingTenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from ..servers import OwnRedis
from .conftest import serving


class CountingStore(InMemoryTenantStore):
    """The memory store, counting reads; `during_read` runs in the middle of one read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.batches: list[list[str]] = []
        self.during_read: asyncio.Future[None] | None = None

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads += 1
        tenant = await super().get_by_identifier(identifier)
        await self._pause()
        return tenant

    async def _pause(self) -> None:
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            await hook

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        self.batches.append(list(identifiers))
        found: dict[str, Tenant] = {}
        for identifier in identifiers:
            tenant = await super().get_by_identifier(identifier)  # not counted in `reads`
            if tenant is not None:
                found[identifier] = tenant
        await self._pause()
        return found


@pytest.fixture
async def cached(redis_url: str, redis_prefix: str) -> AsyncIterator[CachingTenantStore]:
    store = CachingTenantStore(CountingStore(), redis_url, prefix=redis_prefix, ttl=60)
    await store.initialize()
    yield store
    await store.close()


def _backend(store: CachingTenantStore) -> CountingStore:
    assert isinstance(store.backend, CountingStore)
    return store.backend


async def test_the_cache_serves_repeated_lookups_from_redis(cached: CachingTenantStore) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", metadata={"plan": "pro"}))
    for _ in range(3):
        assert await cached.get_by_identifier("acme") == tenant
    assert _backend(cached).reads == 1
    # A second store (another worker) shares the cache.
    other = CachingTenantStore(_backend(cached), cached.redis, prefix=cached.prefix)
    assert await other.get_by_identifier("acme") == tenant
    assert _backend(cached).reads == 1


async def test_a_write_invalidates_the_shared_cache(cached: CachingTenantStore) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    assert await cached.get_by_identifier("acme") == tenant
    assert await cached.get_by_id(tenant.id) == tenant
    suspended = await cached.update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    assert await cached.get_by_identifier("acme") == suspended
    assert await cached.get_by_id(tenant.id) == suspended
    await cached.delete(tenant.id)
    assert await cached.get_by_identifier("acme") is None


@pytest.mark.parametrize("read", ["get_by_identifier", "get_many"])
async def test_a_read_overtaken_by_a_write_is_not_cached(cached: CachingTenantStore, read: str) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _backend(cached).during_read = gate
    slow_read: asyncio.Task[object] = asyncio.create_task(
        cached.get_many(["acme"]) if read == "get_many" else cached.get_by_identifier("acme")
    )
    await asyncio.sleep(0.05)  # the read has the old record and waits
    suspended = await cached.update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    gate.set_result(None)
    # What it read, but it must not be cached.
    assert await slow_read == (tenant if read == "get_by_identifier" else {"acme": tenant})
    assert await cached.get_by_identifier("acme") == suspended
    assert await cached.get_many(["acme"]) == {"acme": suspended}


async def test_get_many_reads_redis_once_and_the_backend_once_for_the_misses(
    cached: CachingTenantStore,
) -> None:
    acme = await cached.create(Tenant(identifier="acme", name="Acme"))
    globex = await cached.create(Tenant(identifier="globex", name="Globex"))
    initech = await cached.create(Tenant(identifier="initech", name="Initech"))
    assert await cached.get_by_identifier("acme") == acme  # cached
    backend = _backend(cached)
    found = await cached.get_many(["initech", "nobody", "acme", "globex", "acme"])
    assert found == {"initech": initech, "acme": acme, "globex": globex}
    assert list(found) == ["initech", "acme", "globex"]  # in the order asked
    assert backend.batches == [["initech", "nobody", "globex"]]  # the misses, in one read
    # Filled: the next batch, and single lookups, are served from Redis.
    assert await cached.get_many(["globex", "initech"]) == {"globex": globex, "initech": initech}
    assert await cached.get_by_identifier("globex") == globex
    assert (len(backend.batches), backend.reads) == (1, 1)


async def test_get_versions_of_cached_tenants_come_from_redis(cached: CachingTenantStore) -> None:
    acme = await cached.create(Tenant(identifier="acme", name="Acme"))
    globex = await cached.create(Tenant(identifier="globex", name="Globex"))
    assert await cached.get_by_identifier("acme") == acme  # cached
    backend = _backend(cached)
    versions = await cached.get_versions(["acme", "globex", "nobody"])
    assert versions == {"acme": version_of(acme), "globex": version_of(globex)}
    assert backend.batches == [["globex", "nobody"]]  # the backend's default reads the uncached whole
    renamed = await cached.update(acme.with_changes(name="Renamed"))  # drops the entry
    assert await cached.get_versions(["acme"]) == {"acme": version_of(renamed)}


async def test_a_change_from_a_stale_cached_record_retries_on_what_is_stored(
    cached: CachingTenantStore,
) -> None:
    tenant = await cached.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    assert await cached.get_by_identifier("acme") == tenant  # now cached
    # Another process suspends the tenant in the registry itself: the cache still says active.
    suspended = await _backend(cached).update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    seen: list[TenantStatus] = []

    def rename(current: Tenant) -> Tenant:
        seen.append(current.status)
        return current.with_changes(name="Renamed")

    before, after = await cached.change("acme", rename)
    # The stale read lost the compare-and-set, which dropped the entry; the retry read the registry.
    assert seen == [TenantStatus.ACTIVE, TenantStatus.SUSPENDED]
    assert before == suspended
    assert (after.status, after.name) == (TenantStatus.SUSPENDED, "Renamed")
    assert await cached.get_by_identifier("acme") == after


async def test_ttl_zero_caches_nothing(redis_url: str, redis_prefix: str) -> None:
    backend = CountingStore()
    store = CachingTenantStore(backend, redis_url, prefix=redis_prefix, ttl=0)
    await store.initialize()
    try:
        tenant = await store.create(Tenant(identifier="acme", name="Acme"))
        assert await store.get_by_identifier("acme") == tenant
        assert await store.get_by_identifier("acme") == tenant
        assert backend.reads == 2
        assert await store.redis.exists(f"{redis_prefix}cache:identifier:acme") == 0
    finally:
        await store.close()


async def test_cache_steps_aside_when_redis_dies_and_returns(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    backend = CountingStore()
    store = CachingTenantStore(backend, own_redis.url, timeout=0.5)
    await store.initialize()
    try:
        tenant = await store.create(Tenant(identifier="acme", name="Acme"))
        await own_redis.kill()
        with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
            for _ in range(3):
                assert await store.get_by_identifier("acme") == tenant
            assert await store.get_many(["acme"]) == {"acme": tenant}
            changed = await store.update(tenant.with_changes(name="Changed"))
        assert store.failures >= 5 and backend.reads == 3 and backend.batches == [["acme"]]
        assert caplog.text.count("Redis tenant cache unavailable") == 1
        await own_redis.start()
        assert await store.get_by_identifier("acme") == changed
        assert await store.get_by_identifier("acme") == changed
        assert backend.reads == 4  # cached again
    finally:
        await store.close()


async def test_a_store_that_starts_without_redis_serves_from_the_backend(own_redis: OwnRedis) -> None:
    await own_redis.kill()
    backend = CountingStore()
    store = CachingTenantStore(backend, own_redis.url, timeout=0.5)
    await store.initialize()  # Redis is optional here: no error
    try:
        tenant = await store.create(Tenant(identifier="acme", name="Acme"))
        assert await store.get_by_identifier("acme") == tenant
        assert store.failures >= 2
    finally:
        await store.close()


async def test_over_http_a_redis_outage_serves_from_the_backend(own_redis: OwnRedis, tmp_path: Path) -> None:
    registry = SQLAlchemyTenantStore(f"sqlite:///{tmp_path / 'reg.db'}")
    async with serving(CachingTenantStore(registry, own_redis.url, timeout=0.5), tmp_path) as client:
        assert (await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})).status_code == 200
        await own_redis.kill()
        response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
        assert response.status_code == 200, response.text  # straight to the SQL registry
        await own_redis.start()
        after = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
        assert after.status_code == 200, after.text


async def test_the_deployment_reaches_the_backend_through_the_cache(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    from fastapi_tenancy import TenancyConfig, TenancyManager
    from fastapi_tenancy.invalidation.postgres import PostgresInvalidation

    backend = SQLAlchemyTenantStore(postgres_url)
    store = CachingTenantStore(backend, redis_url, prefix=redis_prefix)
    store.configure(pgbouncer=True)
    assert backend.pgbouncer
    # Without redis_url, the workers of a PostgreSQL registry hear of changes over
    # LISTEN/NOTIFY on the registry's own engine, cache in front or not.
    manager = TenancyManager(TenancyConfig(database_url=postgres_url), store)
    try:
        assert isinstance(manager.invalidation, PostgresInvalidation)
        assert store.notify_engine() is backend.engine
    finally:
        await manager.close()
