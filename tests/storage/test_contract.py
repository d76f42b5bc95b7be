"""The contract every TenantStore passes, run against each backend: memory, SQLite, PostgreSQL,
MySQL, the Redis registry, and the Redis cache in front of PostgreSQL."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from fastapi_tenancy import (
    Tenant,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
    TenantStatus,
)
from fastapi_tenancy.domain import Domain
from fastapi_tenancy.errors import DomainNotFoundError, DomainTakenError
from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore
from fastapi_tenancy.storage.base import version_of
from fastapi_tenancy.storage.caching import CachingTenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.storage.redis import RedisTenantStore

BACKENDS = ["memory", "sqlite", "postgres", "mysql", "redis", "caching"]


@pytest.fixture(params=BACKENDS)
def unopened(request: pytest.FixtureRequest) -> TenantStore:
    """The store of this run's backend, not initialized yet (on a fresh database or key prefix)."""
    kind = request.param
    if kind == "memory":
        return InMemoryTenantStore()
    if kind in ("redis", "caching"):
        redis_url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        if kind == "redis":
            return RedisTenantStore(redis_url, prefix=prefix)
        registry = SQLAlchemyTenantStore(str(request.getfixturevalue("postgres_url")))
        return CachingTenantStore(registry, redis_url, prefix=prefix)
    return SQLAlchemyTenantStore(str(request.getfixturevalue(f"{kind}_url")))


@pytest.fixture
async def store(unopened: TenantStore) -> AsyncIterator[TenantStore]:
    await unopened.initialize()
    await unopened.initialize()  # idempotent
    yield unopened
    await unopened.close()
    await unopened.close()  # idempotent


def _tenant(identifier: str, **kwargs: object) -> Tenant:
    return Tenant(identifier=identifier, name=identifier.title(), **kwargs)  # type: ignore[arg-type]


async def test_create_then_get_by_id_and_identifier(store: TenantStore) -> None:
    tenant = _tenant("acme", metadata={"plan": "pro", "limits": {"rpm": 100}, "tags": ["a", "b"]})
    assert await store.create(tenant) == tenant
    for got in (await store.get_by_id(tenant.id), await store.get_by_identifier("acme")):
        assert got == tenant
        assert got is not None
        assert got.metadata["limits"]["rpm"] == 100
        assert got.metadata["tags"] == ("a", "b")
        assert got.created_at.tzinfo is not None


async def test_timestamps_keep_microseconds_and_utc(store: TenantStore) -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    tenant = _tenant("acme", created_at=stamp, updated_at=stamp + timedelta(seconds=1))
    await store.create(tenant)
    got = await store.get_by_id(tenant.id)
    assert got is not None
    assert got.created_at == stamp
    assert got.updated_at == stamp + timedelta(seconds=1)


async def test_unknown_lookups_return_none(store: TenantStore) -> None:
    assert await store.get_by_id("missing") is None
    assert await store.get_by_identifier("missing") is None


@pytest.mark.parametrize("clash", ["identifier", "id"])
async def test_create_refuses_a_taken_identifier_or_id(store: TenantStore, clash: str) -> None:
    first = await store.create(_tenant("acme"))
    second = _tenant("acme") if clash == "identifier" else _tenant("other", id=first.id)
    with pytest.raises(TenantAlreadyExistsError):
        await store.create(second)
    assert await store.count() == 1


async def test_concurrent_creates_of_one_slug_have_one_winner(store: TenantStore) -> None:
    results = await asyncio.gather(*(store.create(_tenant("race")) for _ in range(5)), return_exceptions=True)
    winners = [r for r in results if isinstance(r, Tenant)]
    assert len(winners) == 1, results
    assert all(isinstance(r, TenantAlreadyExistsError) for r in results if r not in winners)


async def test_update_stores_mutable_fields_only(store: TenantStore) -> None:
    tenant = await store.create(_tenant("acme", status=TenantStatus.ACTIVE))
    other = await store.create(_tenant("other"))
    changed = tenant.with_changes(name="Acme Corp", metadata={"plan": "free"}).with_status(
        TenantStatus.SUSPENDED
    )
    # An update can never move a tenant onto another slug (the hijack of 0.5.0's memory store).
    hijack = Tenant(
        id=changed.id,
        identifier="other",
        name=changed.name,
        status=changed.status,
        metadata=changed.metadata,
        created_at=changed.created_at,
        updated_at=changed.updated_at,
    )
    stored = await store.update(hijack)
    assert stored.identifier == "acme"
    assert (stored.name, stored.status, dict(stored.metadata)) == (
        "Acme Corp",
        TenantStatus.SUSPENDED,
        {"plan": "free"},
    )
    assert await store.get_by_identifier("other") == other
    assert await store.get_by_identifier("acme") == stored


async def test_update_and_delete_of_unknown_id_raise(store: TenantStore) -> None:
    with pytest.raises(TenantNotFoundError):
        await store.update(_tenant("ghost"))
    with pytest.raises(TenantNotFoundError):
        await store.delete("ghost-id")


async def test_delete_frees_the_slug(store: TenantStore) -> None:
    tenant = await store.create(_tenant("acme"))
    await store.delete(tenant.id)
    assert await store.get_by_id(tenant.id) is None
    assert await store.get_by_identifier("acme") is None
    await store.create(_tenant("acme"))


async def test_list_pages_by_identifier_and_filters_status(store: TenantStore) -> None:
    for i, slug in enumerate(["d", "b", "a", "e", "c"]):
        status = TenantStatus.SUSPENDED if i % 2 else TenantStatus.ACTIVE
        await store.create(_tenant(slug, status=status))
    assert [t.identifier for t in await store.list(limit=2)] == ["a", "b"]
    assert [t.identifier for t in await store.list(after="b", limit=2)] == ["c", "d"]
    assert [t.identifier for t in await store.list(after="d")] == ["e"]
    assert [t.identifier for t in await store.list(status=TenantStatus.SUSPENDED)] == ["b", "e"]
    assert await store.count() == 5
    assert await store.count(status=TenantStatus.ACTIVE) == 3


async def test_update_with_a_stale_expectation_changes_nothing(store: TenantStore) -> None:
    tenant = await store.create(_tenant("acme", status=TenantStatus.ACTIVE))
    suspended = await store.update(tenant.with_status(TenantStatus.SUSPENDED), expected=tenant)
    # A change computed from the old read must not undo the suspension.
    with pytest.raises(TenantChangedError):
        await store.update(tenant.with_changes(name="Renamed"), expected=tenant)
    stored = await store.get_by_id(tenant.id)
    assert stored is not None and (stored.status, stored.name) == (TenantStatus.SUSPENDED, "Acme")
    renamed = await store.update(suspended.with_changes(name="Renamed"), expected=suspended)
    assert (renamed.status, renamed.name) == (TenantStatus.SUSPENDED, "Renamed")
    with pytest.raises(TenantNotFoundError):
        await store.update(_tenant("ghost"), expected=_tenant("ghost"))


async def test_the_encrypted_database_url_is_stored_as_given(store: TenantStore) -> None:
    # Ciphertext (database isolation): a store keeps it byte for byte, on create and update.
    token = "gAAAAABpZ" + "x" * 200
    tenant = await store.create(_tenant("acme", encrypted_database_url=token))
    assert (await store.get_by_identifier("acme")) == tenant
    rotated = tenant.with_encrypted_database_url(token + "-rotated")
    assert (await store.update(rotated, expected=tenant)).encrypted_database_url == token + "-rotated"
    stored = await store.get_by_id(tenant.id)
    assert stored is not None and stored.encrypted_database_url == token + "-rotated"
    assert (await store.create(_tenant("plain"))).encrypted_database_url is None
    assert (await store.get_by_identifier("plain")) is not None
    assert (await store.get_by_identifier("plain")).encrypted_database_url is None  # type: ignore[union-attr]


async def test_tier_is_stored_on_create_and_changed_by_update(store: TenantStore) -> None:
    tenant = await store.create(_tenant("acme", tier="rls", status=TenantStatus.ACTIVE))
    assert (await store.get_by_id(tenant.id)) == tenant
    assert (await store.get_by_identifier("acme")).tier == "rls"  # type: ignore[union-attr]
    moved = await store.update(tenant.with_tier("schema"), expected=tenant)
    assert moved.tier == "schema"
    assert (await store.get_by_id(tenant.id)) == moved
    with pytest.raises(TenantChangedError):  # a stale placement never overwrites a newer one
        await store.update(tenant.with_tier("rls"), expected=tenant)
    assert (await store.get_by_identifier("acme")).tier == "schema"  # type: ignore[union-attr]


async def test_get_many_returns_the_known_ones_by_identifier(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme"))
    globex = await store.create(_tenant("globex", status=TenantStatus.SUSPENDED))
    found = await store.get_many(["globex", "nobody", "acme"])
    assert found == {"acme": acme, "globex": globex}
    assert await store.get_many([]) == {}


async def test_get_versions_reads_id_status_and_updated_at_by_identifier(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme", status=TenantStatus.ACTIVE, metadata={"plan": "pro"}))
    globex = await store.create(_tenant("globex", status=TenantStatus.ACTIVE))
    assert await store.get_by_identifier("acme") == acme  # a caching store has it cached now
    versions = await store.get_versions(["globex", "nobody", "acme"])
    assert versions == {"acme": version_of(acme), "globex": version_of(globex)}
    assert await store.get_versions([]) == {}
    # Every change moves the version, whatever it changed.
    renamed = await store.update(acme.with_changes(name="Acme Renamed"), expected=acme)
    suspended = await store.update(globex.with_status(TenantStatus.SUSPENDED), expected=globex)
    versions = await store.get_versions(["acme", "globex"])
    assert versions == {"acme": version_of(renamed), "globex": version_of(suspended)}
    assert versions["acme"] != version_of(acme) and versions["globex"] != version_of(globex)
    # Another incarnation of a slug has another version, even with the same timestamp.
    await store.delete(renamed.id)
    again = await store.create(_tenant("acme", updated_at=renamed.updated_at, status=TenantStatus.ACTIVE))
    assert (await store.get_versions(["acme"]))["acme"] == version_of(again) != version_of(renamed)


async def test_get_by_ids_and_exists_read_by_id(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme"))
    globex = await store.create(_tenant("globex", status=TenantStatus.DELETED))
    found = await store.get_by_ids([globex.id, "nobody", acme.id, globex.id])
    assert found == [globex, acme]  # the order asked for, each once, unknown ids left out
    assert await store.get_by_ids([]) == []
    assert await store.exists(acme.id) and await store.exists(globex.id)
    assert not await store.exists("acme")  # an identifier is not an id
    assert not await store.exists("nobody")


@pytest.mark.parametrize("page", [1, 2, 500], ids=["page-1", "page-2", "page-500"])
async def test_iterate_yields_every_tenant_in_identifier_order(store: TenantStore, page: int) -> None:
    for i, slug in enumerate(["d", "b", "a", "e", "c"]):
        await store.create(_tenant(slug, status=TenantStatus.SUSPENDED if i % 2 else TenantStatus.ACTIVE))
    assert [t.identifier async for t in store.iterate(page=page)] == ["a", "b", "c", "d", "e"]
    suspended = [t.identifier async for t in store.iterate(status=TenantStatus.SUSPENDED, page=page)]
    assert suspended == ["b", "e"]


async def test_the_channel_record_is_kept_first_come_unless_replaced(store: TenantStore) -> None:
    assert await store.get_channel_record() is None
    # Of processes recording at once, one record wins and every one of them gets it back.
    results = await asyncio.gather(*(store.set_channel_record(f"record-{i}") for i in range(5)))
    assert len(set(results)) == 1 and results[0].startswith("record-")
    assert await store.get_channel_record() == results[0]
    assert await store.set_channel_record("later") == results[0]
    assert await store.set_channel_record('{"kind": "redis"}', replace=True) == '{"kind": "redis"}'
    assert await store.get_channel_record() == '{"kind": "redis"}'
    assert await store.count() == 0  # the record is no tenant


# -- custom domains ----------------------------------------------------------------------


async def test_domains_are_added_read_and_removed(store: TenantStore) -> None:
    assert store.keeps_domains
    acme = await store.create(_tenant("acme"))
    other = await store.create(_tenant("other"))
    assert await store.add_domain(Domain("www.acme.com", acme.id)) == Domain("www.acme.com", acme.id)
    assert await store.add_domain(Domain("acme.com", acme.id, primary=True)) == Domain(
        "acme.com", acme.id, primary=True
    )
    assert await store.add_domain(Domain("app.acme.com", acme.id)) == Domain("app.acme.com", acme.id)
    # The primary first, then by name; another tenant's list is its own.
    assert await store.get_domains(acme.id) == (
        Domain("acme.com", acme.id, primary=True),
        Domain("app.acme.com", acme.id),
        Domain("www.acme.com", acme.id),
    )
    assert await store.get_domains(other.id) == ()
    assert await store.get_domains("nobody") == ()
    assert await store.get_domain("app.acme.com") == Domain("app.acme.com", acme.id)
    assert await store.get_domain("acme.com") == Domain("acme.com", acme.id, primary=True)
    assert await store.get_by_domain("app.acme.com") == acme
    assert await store.get_domain("acme.org") is None
    assert await store.get_by_domain("acme.org") is None
    await store.remove_domain("acme.com", tenant_id=acme.id)
    assert await store.get_domain("acme.com") is None
    assert await store.get_by_domain("acme.com") is None
    # The primary was removed: none is primary now.
    assert await store.get_domains(acme.id) == (
        Domain("app.acme.com", acme.id),
        Domain("www.acme.com", acme.id),
    )
    assert await store.count() == 2  # domains are no tenants


async def test_a_domain_belongs_to_one_tenant_at_most(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme"))
    other = await store.create(_tenant("other"))
    await store.add_domain(Domain("acme.com", acme.id))
    with pytest.raises(DomainTakenError):
        await store.add_domain(Domain("acme.com", other.id))
    with pytest.raises(DomainTakenError):
        await store.add_domain(Domain("acme.com", other.id, primary=True))
    assert await store.get_by_domain("acme.com") == acme
    assert await store.get_domains(other.id) == ()
    # Adding it again to its tenant changes nothing; with primary=True it becomes primary.
    assert await store.add_domain(Domain("acme.com", acme.id)) == Domain("acme.com", acme.id)
    assert await store.add_domain(Domain("acme.com", acme.id, primary=True)) == Domain(
        "acme.com", acme.id, primary=True
    )
    assert await store.add_domain(Domain("acme.com", acme.id)) == Domain("acme.com", acme.id, primary=True)
    # Only its tenant can remove it.
    with pytest.raises(DomainNotFoundError):
        await store.remove_domain("acme.com", tenant_id=other.id)
    with pytest.raises(DomainNotFoundError):
        await store.remove_domain("acme.org", tenant_id=acme.id)
    assert await store.get_by_domain("acme.com") == acme
    with pytest.raises(TenantNotFoundError):
        await store.add_domain(Domain("ghost.com", "no-such-id"))
    assert await store.get_domain("ghost.com") is None


async def test_concurrent_claims_of_one_domain_have_one_winner(store: TenantStore) -> None:
    tenants = [await store.create(_tenant(f"t{i}")) for i in range(4)]
    for round_ in range(3):
        name = f"race{round_}.example.org"
        claims = [
            store.add_domain(Domain(name, tenant.id, primary=bool(round_ % 2))) for tenant in tenants * 2
        ]
        results = await asyncio.gather(*claims, return_exceptions=True)
        winners = {r.tenant_id for r in results if isinstance(r, Domain)}
        assert len(winners) == 1, results
        assert all(isinstance(r, Domain | DomainTakenError) for r in results), [
            repr(r)[:300] for r in results
        ]
        holder = await store.get_by_domain(name)
        assert holder is not None and {holder.id} == winners
        for tenant in tenants:
            names = [domain.name for domain in await store.get_domains(tenant.id)]
            assert (name in names) == (tenant.id in winners)


async def test_a_tenant_has_one_primary_domain_at_most(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme"))
    other = await store.create(_tenant("other"))
    await store.add_domain(Domain("other.org", other.id, primary=True))
    await store.add_domain(Domain("acme.com", acme.id, primary=True))
    await store.add_domain(Domain("acme.net", acme.id, primary=True))
    assert await store.get_domains(acme.id) == (
        Domain("acme.net", acme.id, primary=True),
        Domain("acme.com", acme.id),
    )
    # Made primary at once: one of them is, the others are plain domains.
    names = [f"d{i}.acme.com" for i in range(6)]
    await asyncio.gather(*(store.add_domain(Domain(name, acme.id, primary=True)) for name in names))
    domains = await store.get_domains(acme.id)
    assert len(domains) == 8
    assert [domain.primary for domain in domains] == [True] + [False] * 7
    assert domains[0].name in names
    # Another tenant's primary is its own.
    assert await store.get_domains(other.id) == (Domain("other.org", other.id, primary=True),)


async def test_delete_takes_the_tenants_domains_with_it(store: TenantStore) -> None:
    acme = await store.create(_tenant("acme"))
    other = await store.create(_tenant("other"))
    await store.add_domain(Domain("acme.com", acme.id, primary=True))
    await store.add_domain(Domain("app.acme.com", acme.id))
    await store.add_domain(Domain("other.org", other.id))
    await store.delete(acme.id)
    assert await store.get_domain("acme.com") is None
    assert await store.get_by_domain("app.acme.com") is None
    assert await store.get_domains(acme.id) == ()
    # The name is free: a new tenant with the old slug does not inherit it, another can take it.
    again = await store.create(_tenant("acme"))
    assert await store.get_domains(again.id) == ()
    assert await store.add_domain(Domain("acme.com", other.id)) == Domain("acme.com", other.id)
    assert await store.get_by_domain("other.org") == other
