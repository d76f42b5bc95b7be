"""TenantLookup: served from memory, negative caching, invalidation, one read per miss."""

import asyncio

import pytest

from fastapi_tenancy import Tenant, TenantStatus
from fastapi_tenancy.lookup import TenantLookup
from fastapi_tenancy.storage import InMemoryTenantStore


class CountingStore(InMemoryTenantStore):
    def __init__(self, delay: float = 0) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.delay = delay

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads.append(identifier)
        await asyncio.sleep(self.delay)
        return await super().get_by_identifier(identifier)


async def test_known_and_unknown_identifiers_are_read_once_per_ttl() -> None:
    store = CountingStore()
    await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    for _ in range(100):
        assert (await lookup.get("acme")) is not None
        assert (await lookup.get("nobody")) is None
    assert sorted(store.reads) == ["acme", "nobody"]


async def test_malformed_identifiers_never_reach_the_store_or_the_cache() -> None:
    store = CountingStore()
    lookup = TenantLookup(store)
    for bad in ("Bad!", "x" * 100, "", "a_b"):
        assert await lookup.get(bad) is None
    assert store.reads == []
    assert len(lookup) == 0


async def test_negative_cache_is_bounded() -> None:
    lookup = TenantLookup(CountingStore(), negative_max_size=10)
    for i in range(1000):
        await lookup.get(f"probe-{i}")
    assert len(lookup) == 10


async def test_the_tenant_cache_is_bounded_and_evicts_oldest_first() -> None:
    store = CountingStore()
    for name in ("a1", "a2", "a3"):
        await store.create(Tenant(identifier=name, name=name, status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=60, max_size=2)
    for name in ("a1", "a2", "a3", "a3", "a2", "a1"):
        tenant = await lookup.get(name)
        assert tenant is not None and tenant.identifier == name
    assert len(lookup) == 2
    assert store.reads == ["a1", "a2", "a3", "a1"]  # a1 was evicted by a3, a2 was not
    lookup.clear()


async def test_ttl_zero_disables_caching() -> None:
    store = CountingStore()
    lookup = TenantLookup(store, ttl=0, negative_ttl=0)
    for _ in range(3):
        await lookup.get("acme")
    assert store.reads == ["acme"] * 3


async def test_concurrent_misses_share_one_read() -> None:
    store = CountingStore(delay=0.05)
    await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store)
    results = await asyncio.gather(*(lookup.get("acme") for _ in range(50)))
    assert len({id(r) for r in results}) == 1
    assert store.reads == ["acme"]


async def test_a_read_in_flight_during_invalidation_is_not_cached() -> None:
    store = CountingStore(delay=0.05)
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store)
    stale_read = asyncio.ensure_future(lookup.get("acme"))
    await asyncio.sleep(0.01)
    await store.update(tenant.with_status(TenantStatus.SUSPENDED))
    lookup.invalidate("acme")
    assert (await stale_read) is not None
    fresh = await lookup.get("acme")
    assert fresh is not None and fresh.status is TenantStatus.SUSPENDED


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    store = CountingStore(delay=0.05)
    await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store)
    first = asyncio.ensure_future(lookup.get("acme"))
    second = asyncio.ensure_future(lookup.get("acme"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second) is not None
    with pytest.raises(asyncio.CancelledError):
        await first
