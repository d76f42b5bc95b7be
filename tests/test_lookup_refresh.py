"""TenantLookup refresh-ahead: used entries are re-read in batches before they expire."""

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from fastapi_tenancy import Tenant, TenantStatus
from fastapi_tenancy import lookup as lookup_module
from fastapi_tenancy.lookup import TenantLookup
from fastapi_tenancy.storage import InMemoryTenantStore
from fastapi_tenancy.storage.base import TenantVersion, version_of

TTL = 0.4  # sweeps every 0.1 s


@pytest.fixture(autouse=True, params=[10_000, 1], ids=["one-slice", "sliced"])
def short_ttls_refresh(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setattr(lookup_module, "_MIN_REFRESH_TTL", 0.0)
    # "sliced": the sweep yields to other tasks after every entry, as it does every 10,000.
    monkeypatch.setattr(lookup_module, "_SWEEP_SLICE", request.param)


class CountingStore(InMemoryTenantStore):
    """Counts reads: `batches`, the refresh's version reads; `whole`, its reads of whole records."""

    def __init__(self, delay: float = 0) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.batches: list[list[str]] = []
        self.whole: list[list[str]] = []
        self.delay = delay
        self.fail = False
        self.batch_started = asyncio.Event()

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        self.reads.append(identifier)
        return await super().get_by_identifier(identifier)

    async def get_versions(self, identifiers: Sequence[str]) -> dict[str, TenantVersion]:
        self.batches.append(list(identifiers))
        self.batch_started.set()
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("registry down")
        return {i: version_of(t) for i, t in (await self._stored(identifiers)).items()}

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        self.whole.append(list(identifiers))
        return await self._stored(identifiers)

    async def _stored(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        found: dict[str, Tenant] = {}
        for identifier in identifiers:
            tenant = await super().get_by_identifier(identifier)  # not counted in `reads`
            if tenant is not None:
                found[identifier] = tenant
        return found

    def overwrite(self, tenant: Tenant) -> None:
        """Put `tenant` in the registry as it is (as an UPDATE by hand would, `updated_at` and all)."""
        self._by_id[tenant.id] = tenant


async def _use(lookup: TenantLookup, identifiers: list[str], seconds: float) -> list[Tenant | None]:
    seen: list[Tenant | None] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for identifier in identifiers:
            seen.append(await lookup.get(identifier))
        await asyncio.sleep(0.02)
    return seen


async def test_used_entries_are_refreshed_in_batches_and_never_miss() -> None:
    store = CountingStore()
    for name in ("acme", "globex", "initech"):
        await store.create(Tenant(identifier=name, name=name.title()))
    lookup = TenantLookup(store, ttl=TTL)
    seen = await _use(lookup, ["acme", "globex", "initech"], 4 * TTL)
    assert all(t is not None for t in seen)
    assert sorted(store.reads) == ["acme", "globex", "initech"]  # only the first reads
    assert len(store.batches) >= 3
    assert all(sorted(b) == ["acme", "globex", "initech"] for b in store.batches)
    assert store.whole == []  # nothing changed: versions only, no record read whole
    lookup.clear()


async def test_only_the_changed_tenants_are_read_whole() -> None:
    store = CountingStore()
    tenants = [
        await store.create(Tenant(identifier=n, name=n.title())) for n in ("acme", "globex", "initech")
    ]
    lookup = TenantLookup(store, ttl=TTL)
    await _use(lookup, ["acme", "globex", "initech"], TTL)
    cached = lookup._hits["acme"]
    renamed = await store.update(tenants[1].with_changes(name="Globex Renamed"))
    await _use(lookup, ["acme", "globex", "initech"], TTL)
    assert store.whole == [["globex"]]
    assert await lookup.get("globex") == renamed
    assert lookup._hits["acme"] is cached  # the unchanged entries keep their objects
    lookup.clear()


async def test_a_status_changed_without_updated_at_is_still_served_within_the_ttl() -> None:
    # The status is part of the version: a suspension written by hand, keeping `updated_at`,
    # still reaches the cache (fail closed), though any other field written so would not.
    store = CountingStore()
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=TTL)
    await _use(lookup, ["acme"], TTL)
    store.overwrite(dataclasses.replace(tenant, status=TenantStatus.SUSPENDED))
    loop = asyncio.get_running_loop()
    changed = loop.time()
    while (current := await lookup.get("acme")) is not None and current.status is TenantStatus.ACTIVE:
        assert loop.time() - changed <= TTL
        await asyncio.sleep(0.01)
    assert current is not None and current.status is TenantStatus.SUSPENDED
    lookup.clear()


async def test_another_incarnation_of_a_slug_replaces_the_cached_one() -> None:
    store = CountingStore()
    old = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=TTL)
    await _use(lookup, ["acme"], TTL / 2)
    await store.delete(old.id)  # purged and registered again, outside this process, same timestamp
    new = await store.create(
        Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE, updated_at=old.updated_at)
    )
    await asyncio.sleep(TTL)
    current = await lookup.get("acme")
    assert current is not None and current.id == new.id
    lookup.clear()


async def test_a_tenant_deleted_between_the_two_reads_leaves_the_cache() -> None:
    store = CountingStore()
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=TTL, negative_ttl=60)
    await _use(lookup, ["acme"], TTL / 2)
    await store.update(tenant.with_changes(name="Changed"))  # its version moves ...
    original = store.get_many

    async def deleted_meanwhile(identifiers: Sequence[str]) -> dict[str, Tenant]:
        await store.delete(tenant.id)  # ... and it is gone by the time its record is read
        return await original(identifiers)

    store.get_many = deleted_meanwhile  # type: ignore[method-assign]
    await asyncio.sleep(TTL)
    assert "acme" not in lookup._hits
    assert await lookup.get("acme") is None
    lookup.clear()


async def test_a_change_outside_the_manager_is_served_within_the_ttl() -> None:
    store = CountingStore()
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=TTL)
    await _use(lookup, ["acme"], TTL)
    await store.update(tenant.with_status(TenantStatus.SUSPENDED))  # not through the lookup
    loop = asyncio.get_running_loop()
    changed = loop.time()
    while True:
        current = await lookup.get("acme")
        assert current is not None
        if current.status is TenantStatus.SUSPENDED:
            break
        assert loop.time() - changed <= TTL
        await asyncio.sleep(0.01)
    lookup.clear()


async def test_a_tenant_deleted_outside_the_manager_leaves_the_cache() -> None:
    store = CountingStore()
    tenant = await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store, ttl=TTL, negative_ttl=60)
    await _use(lookup, ["acme"], TTL / 2)
    await store.delete(tenant.id)
    await asyncio.sleep(TTL)
    assert await lookup.get("acme") is None
    lookup.clear()


async def test_a_batch_in_flight_during_invalidation_does_not_write_back() -> None:
    store = CountingStore(delay=0.15)
    tenant = await store.create(Tenant(identifier="acme", name="Acme", status=TenantStatus.ACTIVE))
    lookup = TenantLookup(store, ttl=TTL)
    await _use(lookup, ["acme"], TTL / 2 + 0.1)  # past half its TTL: the next sweep refreshes it
    await asyncio.wait_for(store.batch_started.wait(), 1)
    # The batch is reading; the manager suspends the tenant and invalidates.
    await store.update(tenant.with_status(TenantStatus.SUSPENDED))
    lookup.invalidate("acme")
    current = await lookup.get("acme")
    assert current is not None and current.status is TenantStatus.SUSPENDED
    await asyncio.sleep(0.2)  # the batch has finished: it must not have restored ACTIVE
    current = await lookup.get("acme")
    assert current is not None and current.status is TenantStatus.SUSPENDED
    lookup.clear()


async def test_a_failed_refresh_lets_entries_expire_as_usual() -> None:
    store = CountingStore()
    await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store, ttl=TTL)
    store.fail = True
    seen = await _use(lookup, ["acme"], 3 * TTL)
    assert all(t is not None for t in seen)
    assert store.batches  # tried
    assert len(store.reads) >= 2  # and read again on expiry
    lookup.clear()


async def test_idle_entries_are_not_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup_module, "_KEEP_WARM", 1)
    store = CountingStore()
    await store.create(Tenant(identifier="acme", name="Acme"))
    await store.create(Tenant(identifier="idle", name="Idle"))
    lookup = TenantLookup(store, ttl=TTL)
    assert await lookup.get("idle") is not None
    await _use(lookup, ["acme"], 4 * TTL)
    assert "idle" not in store.batches[-1]
    assert "acme" in store.batches[-1]
    assert "idle" not in lookup._hits  # expired and idle: dropped
    lookup.clear()


async def test_clear_stops_the_sweeper_and_it_ends_when_the_cache_empties() -> None:
    store = CountingStore()
    await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store, ttl=TTL)
    await lookup.get("acme")
    sweeper = lookup._sweeper
    assert sweeper is not None
    lookup.clear()
    await asyncio.sleep(0)
    assert sweeper.cancelled() and lookup._sweeper is None
    await lookup.get("acme")
    assert lookup._sweeper is not None  # started again
    monkey_keep_warm = lookup_module._KEEP_WARM
    lookup_module._KEEP_WARM = 0  # nothing counts as used: the entry expires and goes
    try:
        await asyncio.sleep(2 * TTL)
        assert lookup._sweeper is None and len(lookup) == 0
    finally:
        lookup_module._KEEP_WARM = monkey_keep_warm


async def test_no_refresh_for_short_ttls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup_module, "_MIN_REFRESH_TTL", 2.0)
    store = CountingStore()
    await store.create(Tenant(identifier="acme", name="Acme"))
    lookup = TenantLookup(store, ttl=1.0)
    await lookup.get("acme")
    assert lookup._sweeper is None


async def test_usage_records_stay_bounded_by_the_cache() -> None:
    store = CountingStore()
    for i in range(20):
        await store.create(Tenant(identifier=f"t-{i}", name=f"T {i}"))
    lookup = TenantLookup(store, ttl=TTL, max_size=5)
    for i in range(20):
        await lookup.get(f"t-{i}")
    await asyncio.sleep(TTL / 4 + 0.05)  # one sweep
    assert len(lookup._used) <= 5
    lookup.invalidate("t-19")
    assert "t-19" not in lookup._used
    lookup.clear()
