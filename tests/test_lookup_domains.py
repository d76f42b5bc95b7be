"""TenantLookup by domain: served from memory like identifiers, invalidated by name, never another
incarnation's tenant."""

import asyncio

import pytest

from fastapi_tenancy import Tenant, TenantStatus
from fastapi_tenancy import lookup as lookup_module
from fastapi_tenancy.domain import Domain
from fastapi_tenancy.lookup import TenantLookup
from fastapi_tenancy.storage import InMemoryTenantStore


class CountingStore(InMemoryTenantStore):
    def __init__(self, delay: float = 0) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.delay = delay
        self.fail = False

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads.append(identifier)
        return await super().get_by_identifier(identifier)

    async def get_by_domain(self, name: str) -> Tenant | None:
        self.reads.append(name)
        if self.fail:
            raise ConnectionError("registry down")
        found = await super().get_by_domain(name)
        await asyncio.sleep(self.delay)  # a slow answer: what it says may be stale when it arrives
        return found

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        self.reads.append(f"domains of {tenant_id}")
        return await super().get_domains(tenant_id)


async def _acme(store: CountingStore, *names: str) -> Tenant:
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    for position, name in enumerate(names):
        await store.add_domain(Domain(name, tenant.id, primary=position == 0))
    return tenant


async def test_known_and_unknown_domains_are_read_once_per_ttl() -> None:
    store = CountingStore()
    acme = await _acme(store, "acme.com", "app.acme.com")
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    for _ in range(100):
        assert await lookup.get_by_domain("acme.com") == acme
        assert await lookup.get_by_domain("app.acme.com") == acme
        assert await lookup.get_by_domain("nobody.com") is None
    # Each name once; the tenant came with its first name's read (one query for a cold host).
    assert sorted(store.reads) == ["acme.com", "app.acme.com", "nobody.com"]
    lookup.clear()


async def test_a_tenant_read_with_its_domain_is_kept_only_if_nothing_changed_meanwhile() -> None:
    store = CountingStore(delay=0.05)
    acme = await _acme(store, "acme.com")
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    slow = asyncio.ensure_future(lookup.get_by_domain("acme.com"))
    await asyncio.sleep(0.01)
    # Suspended while the domain's read (which saw it active) is on its way back.
    await store.update(acme.with_status(TenantStatus.SUSPENDED))
    lookup.invalidate("acme")
    served = await slow
    assert served is not None and served.status is TenantStatus.SUSPENDED  # read again by identifier
    assert "acme" in store.reads
    tenant = await lookup.get("acme")
    assert tenant is not None and tenant.status is TenantStatus.SUSPENDED
    lookup.clear()


async def test_ttl_zero_reads_every_time() -> None:
    store = CountingStore()
    await _acme(store, "acme.com")
    lookup = TenantLookup(store, ttl=0, negative_ttl=0)
    for _ in range(3):
        assert await lookup.get_by_domain("acme.com") is not None
        assert await lookup.get_by_domain("nobody.com") is None
    assert store.reads.count("acme.com") == 3 and store.reads.count("nobody.com") == 3


async def test_invalidating_a_name_drops_its_entry_and_a_read_in_flight() -> None:
    store = CountingStore(delay=0.05)
    acme = await _acme(store, "acme.com")
    globex = await store.create(Tenant(identifier="globex", name="Globex", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    stale_read = asyncio.ensure_future(lookup.get_by_domain("acme.com"))
    await asyncio.sleep(0.01)
    # The domain moves to globex while the read is in flight; the manager invalidates the name.
    await store.remove_domain("acme.com", tenant_id=acme.id)
    await store.add_domain(Domain("acme.com", globex.id))
    lookup.invalidate("acme.com")
    assert await stale_read == acme  # what the read saw; not kept
    assert await lookup.get_by_domain("acme.com") == globex
    # A name remembered as unknown is forgotten too.
    assert await lookup.get_by_domain("new.com") is None
    await store.add_domain(Domain("new.com", acme.id))
    assert await lookup.get_by_domain("new.com") is None  # negative entry, until invalidated
    lookup.invalidate("new.com")
    assert await lookup.get_by_domain("new.com") == acme
    lookup.clear()


async def test_a_domain_never_serves_another_incarnation_of_its_tenants_slug() -> None:
    store = CountingStore()
    old = await _acme(store, "acme.com")
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    assert await lookup.get_by_domain("acme.com") == old
    # Purged and registered again under the same slug, and the domain's invalidation lost:
    # only the identifier's entry is refreshed (as by another change, or its TTL).
    await store.delete(old.id)
    new = await store.create(Tenant(identifier="acme", name="Acme again", status=TenantStatus.ACTIVE))
    lookup.invalidate("acme")
    assert await lookup.get_by_domain("acme.com") is None  # read again: the new tenant has no domain
    await store.add_domain(Domain("acme.com", new.id))
    lookup.invalidate("acme.com")
    assert await lookup.get_by_domain("acme.com") == new
    lookup.clear()


async def test_concurrent_misses_share_one_read_and_a_cancelled_waiter_cancels_none() -> None:
    store = CountingStore(delay=0.05)
    acme = await _acme(store, "acme.com")
    lookup = TenantLookup(store, ttl=60)
    first = asyncio.ensure_future(lookup.get_by_domain("acme.com"))
    await asyncio.sleep(0.01)
    first.cancel()
    results = await asyncio.gather(*(lookup.get_by_domain("acme.com") for _ in range(20)))
    assert results == [acme] * 20
    assert store.reads.count("acme.com") == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    lookup.clear()


async def test_domain_entries_are_bounded() -> None:
    store = CountingStore()
    await _acme(store, *(f"d{i}.acme.com" for i in range(5)))
    lookup = TenantLookup(store, ttl=60, max_size=2, negative_ttl=60, negative_max_size=3)
    for i in range(5):
        assert await lookup.get_by_domain(f"d{i}.acme.com") is not None
    for i in range(100):
        assert await lookup.get_by_domain(f"probe{i}.com") is None
    assert len(lookup._by_domain) == 2 + 3
    store.reads.clear()
    assert await lookup.get_by_domain("d4.acme.com") is not None  # the newest is kept
    assert await lookup.get_by_domain("d0.acme.com") is not None  # the oldest was evicted
    assert store.reads == ["d0.acme.com"]
    lookup.clear()


async def test_a_busy_domain_is_read_again_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup_module, "_MIN_REFRESH_TTL", 0.0)
    store = CountingStore()
    acme = await _acme(store, "acme.com")
    lookup = TenantLookup(store, ttl=0.4, negative_ttl=0.4)
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.5
    while loop.time() < end:
        # Served from memory every time, never waiting for a read, though the TTL passes.
        started = loop.time()
        assert await lookup.get_by_domain("acme.com") == acme
        assert loop.time() - started < 0.01 or store.reads.count("acme.com") == 1
        await asyncio.sleep(0.02)
    assert 3 <= store.reads.count("acme.com") <= 8, store.reads
    # A refresh that fails leaves the entry to expire; the next request then waits for the
    # registry, and fails as it does.
    store.fail = True
    await asyncio.sleep(0.45)
    with pytest.raises(ConnectionError):
        await lookup.get_by_domain("acme.com")
    lookup.clear()


async def test_a_tenants_domains_are_cached_by_identifier() -> None:
    store = CountingStore()
    acme = await _acme(store, "acme.com", "app.acme.com")
    lookup = TenantLookup(store, ttl=60, negative_ttl=60)
    expected = (Domain("acme.com", acme.id, primary=True), Domain("app.acme.com", acme.id))
    for _ in range(10):
        assert await lookup.domains_of("acme") == expected
        assert await lookup.domains_of("nobody") == ()
    assert store.reads.count(f"domains of {acme.id}") == 1
    await store.add_domain(Domain("acme.net", acme.id, primary=True))
    lookup.invalidate("acme")  # a domain change is announced under the tenant's identifier too
    assert (await lookup.domains_of("acme"))[0] == Domain("acme.net", acme.id, primary=True)
    lookup.clear()
    assert len(lookup) == 0
