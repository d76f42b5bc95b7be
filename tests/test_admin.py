"""TenantAdmin, through the manager's methods: registration, changes, soft and hard delete,
cache invalidation."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fastapi_tenancy import (
    ConfigurationError,
    InvalidIdentifierError,
    InvalidTransitionError,
    TenancyConfig,
    TenancyManager,
    Tenant,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
    TenantStatus,
)
from fastapi_tenancy.isolation import SQLiteFileIsolation
from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from .apps import Base


async def test_registration_ends_active_with_its_storage(manager: TenancyManager) -> None:
    tenant = await manager.register_tenant(
        "acme", "Acme", app_metadata=Base.metadata, metadata={"plan": "pro"}
    )
    assert (tenant.status, tenant.metadata["plan"]) == (TenantStatus.ACTIVE, "pro")
    assert isinstance(manager.isolation, SQLiteFileIsolation)
    assert manager.isolation.path(tenant).exists()
    with pytest.raises(TenantAlreadyExistsError):
        await manager.register_tenant("acme", "Acme again")


@pytest.mark.parametrize("slug", ["Acme", "acme_corp", "a" * 57, "-x", ""])
async def test_unusable_slugs_are_refused_before_anything_is_written(
    manager: TenancyManager, slug: str
) -> None:
    with pytest.raises(InvalidIdentifierError):
        await manager.register_tenant(slug, "x")
    assert await manager.store.count() == 0


async def test_lifecycle_changes_are_seen_at_once_through_the_cache(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme")
    assert (await manager.lookup.get("acme")) is not None  # now cached
    await manager.suspend_tenant("acme")
    cached = await manager.lookup.get("acme")
    assert cached is not None and cached.status is TenantStatus.SUSPENDED
    await manager.activate_tenant("acme")
    await manager.update_tenant("acme", name="Acme Corp", metadata={"plan": "pro"})
    cached = await manager.lookup.get("acme")
    assert cached is not None and (cached.status, cached.name, cached.metadata["plan"]) == (
        TenantStatus.ACTIVE,
        "Acme Corp",
        "pro",
    )
    await manager.delete_tenant("acme")
    cached = await manager.lookup.get("acme")
    assert cached is not None and cached.status is TenantStatus.DELETED


async def test_unknown_then_registered_is_served_at_once(manager: TenancyManager) -> None:
    assert await manager.lookup.get("later") is None  # negatively cached
    await manager.register_tenant("later", "Later")
    assert await manager.lookup.get("later") is not None


async def test_forbidden_transitions_raise(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme")
    with pytest.raises(InvalidTransitionError):
        await manager.activate_tenant("acme")
    await manager.delete_tenant("acme")
    with pytest.raises(InvalidTransitionError):
        await manager.activate_tenant("acme")
    with pytest.raises(TenantNotFoundError):
        await manager.suspend_tenant("nobody")


async def test_hard_delete_destroys_data_and_says_so(
    manager: TenancyManager, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    assert isinstance(manager.isolation, SQLiteFileIsolation)
    path = manager.isolation.path(tenant)
    await manager.delete_tenant("acme")
    assert path.exists(), "a soft delete keeps the data"
    with caplog.at_level(logging.WARNING, logger="fastapi_tenancy"):
        await manager.delete_tenant("acme", destroy_data=True)
    assert not path.exists()
    assert "destroyed tenant acme and all of its data" in caplog.text
    with pytest.raises(TenantNotFoundError):
        await manager.get_tenant("acme")


@pytest.mark.parametrize("lifecycle", ["suspend", "delete"])
async def test_a_concurrent_rename_never_undoes_a_suspension_or_delete(
    manager: TenancyManager, lifecycle: str
) -> None:
    await manager.register_tenant("acme", "Acme")
    stop = manager.suspend_tenant("acme") if lifecycle == "suspend" else manager.delete_tenant("acme")
    for _ in range(3):
        await asyncio.gather(
            stop if _ == 0 else asyncio.sleep(0), manager.update_tenant("acme", name=f"Acme {_}")
        )
    stored = await manager.get_tenant("acme")
    assert stored.status is (TenantStatus.SUSPENDED if lifecycle == "suspend" else TenantStatus.DELETED)
    assert stored.name == "Acme 2"


class _YieldingStore(InMemoryTenantStore):
    """The memory store, yielding to the event loop on each read as a real store does."""

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        tenant = await super().get_by_identifier(identifier)
        await asyncio.sleep(0)  # the answer may be stale by the time the caller has it
        return tenant


def _count_conflicts(store: TenantStore) -> list[int]:
    conflicts = [0]
    update = store.update

    async def counting(tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        try:
            return await update(tenant, expected=expected)
        except TenantChangedError:
            conflicts[0] += 1
            raise

    store.update = counting  # type: ignore[method-assign]
    return conflicts


@pytest.fixture(params=["memory", "postgresql"])
def racing_manager(request: pytest.FixtureRequest, tmp_path: Path) -> TenancyManager:
    if request.param == "memory":
        config = TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}")
        return TenancyManager(config, _YieldingStore())
    config = TenancyConfig(database_url=str(request.getfixturevalue("postgres_url")))
    return TenancyManager(config, SQLAlchemyTenantStore(config.database_url))


async def test_concurrent_metadata_patches_all_survive(racing_manager: TenancyManager) -> None:
    manager = racing_manager
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme", metadata={"plan": "free", "old": 1})
        conflicts = _count_conflicts(manager.store)
        await asyncio.gather(*(manager.update_tenant("acme", metadata_patch={f"k{i}": i}) for i in range(10)))
        stored = await manager.get_tenant("acme")
        assert stored.metadata == {"plan": "free", "old": 1, **{f"k{i}": i for i in range(10)}}
        assert conflicts[0] > 0  # the patches did race, and were re-applied on retry
    finally:
        await manager.close()


async def test_a_metadata_patch_merges_one_level_and_none_removes(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme", metadata={"plan": "free", "limits": {"rpm": 10}, "x": 1})
    patched = await manager.update_tenant(
        "acme",
        name="Acme Inc",
        metadata_patch={"limits": {"burst": 5}, "x": None, "missing": None, "seats": 3},
    )
    assert patched.name == "Acme Inc"
    assert patched.metadata == {"plan": "free", "limits": {"burst": 5}, "seats": 3}
    assert (await manager.get_tenant("acme")).metadata == patched.metadata
    with pytest.raises(ConfigurationError, match="not both"):
        await manager.update_tenant("acme", metadata={"a": 1}, metadata_patch={"b": 2})


async def test_changes_by_id_are_spelled_tenant_id(manager: TenancyManager) -> None:
    acme = await manager.register_tenant("acme", "Acme")
    suspended = await manager.suspend_tenant(tenant_id=acme.id)
    assert (suspended.identifier, suspended.status) == ("acme", TenantStatus.SUSPENDED)
    assert (await manager.activate_tenant(tenant_id=acme.id)).status is TenantStatus.ACTIVE
    renamed = await manager.update_tenant(tenant_id=acme.id, metadata_patch={"plan": "pro"})
    assert renamed.metadata == {"plan": "pro"}
    await manager.delete_tenant(tenant_id=acme.id)
    assert (await manager.get_tenant("acme")).status is TenantStatus.DELETED
    with pytest.raises(TenantNotFoundError, match="no tenant with id"):
        await manager.suspend_tenant(tenant_id="no-such-id")
    with pytest.raises(TypeError, match="only one"):
        await manager.suspend_tenant("acme", tenant_id=acme.id)
    with pytest.raises(TypeError, match="only one"):
        await manager.suspend_tenant()


async def test_an_id_given_as_an_identifier_is_never_guessed_but_named(manager: TenancyManager) -> None:
    # fastapi-tenancy 0.5.0 took ids here. An id is never taken for one (a UUID is a valid
    # slug, so guessing could act on another tenant); the error says how to call it.
    acme = await manager.register_tenant("acme", "Acme")
    for method in ("suspend_tenant", "activate_tenant", "delete_tenant", "update_tenant"):
        with pytest.raises(TenantNotFoundError) as caught:
            await getattr(manager, method)(acme.id)
        assert "is the id of tenant 'acme'" in str(caught.value), method
        assert f"{method}(tenant_id=...)" in str(caught.value)
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE  # nothing changed
    # A tenant whose identifier is another tenant's id: the identifier wins, always.
    twin = await manager.register_tenant(acme.id, "Named like an id")
    assert (await manager.suspend_tenant(acme.id)).id == twin.id
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE


async def test_a_change_by_id_never_reaches_the_next_holder_of_the_slug(manager: TenancyManager) -> None:
    old = await manager.register_tenant("acme", "Old customer")
    real_get = manager.admin.get_tenant_by_id

    async def purged_meanwhile(tenant_id: str) -> Tenant:
        found = await real_get(tenant_id)  # read by id, then the slug changes hands
        await manager.delete_tenant("acme", destroy_data=True)
        await manager.register_tenant("acme", "New customer")
        return found

    manager.admin.get_tenant_by_id = purged_meanwhile  # type: ignore[method-assign]
    with pytest.raises(TenantNotFoundError, match="no tenant with id"):
        await manager.suspend_tenant(tenant_id=old.id)
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE


async def test_a_record_of_a_purged_incarnation_never_changes_the_new_holder(manager: TenancyManager) -> None:
    old = await manager.register_tenant("reuse", "Old customer", app_metadata=Base.metadata)
    await manager.delete_tenant(old, destroy_data=True)
    new = await manager.register_tenant("reuse", "New customer", app_metadata=Base.metadata)
    # A job still holding the old record acts on it: never on the new customer.
    changes: list[Callable[[], Awaitable[object]]] = [
        lambda: manager.suspend_tenant(old),
        lambda: manager.activate_tenant(old),
        lambda: manager.update_tenant(old, name="renamed by a stale job"),
        lambda: manager.update_tenant(old, metadata_patch={"plan": "free"}),
        lambda: manager.delete_tenant(old),
        lambda: manager.delete_tenant(old, destroy_data=True),
        lambda: manager.remove_old_copy(old),
    ]
    for change in changes:
        with pytest.raises(TenantNotFoundError):
            await change()
    current = await manager.get_tenant("reuse")
    assert (current.id, current.name, current.status, dict(current.metadata)) == (
        new.id,
        "New customer",
        TenantStatus.ACTIVE,
        {},
    )
    assert manager.isolation.path(new).exists()  # type: ignore[attr-defined]
    # The identifier, and the new record, still work.
    assert (await manager.suspend_tenant("reuse")).status is TenantStatus.SUSPENDED
    assert (await manager.activate_tenant(new)).status is TenantStatus.ACTIVE


# -- maintenance -----------------------------------------------------------------------------


async def test_maintenance_starts_and_ends_and_is_audited(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme")
    seen: list[tuple[str, str, str]] = []
    manager.events.add(lambda e: seen.append((e.event.value, e.details["from"], e.details["to"])))
    assert (await manager.start_maintenance("acme")).status is TenantStatus.MAINTENANCE
    assert (await manager.start_maintenance("acme")).status is TenantStatus.MAINTENANCE  # idempotent
    cached = await manager.lookup.get("acme")
    assert cached is not None and cached.status is TenantStatus.MAINTENANCE
    assert (await manager.end_maintenance("acme")).status is TenantStatus.ACTIVE
    assert (await manager.end_maintenance("acme")).status is TenantStatus.ACTIVE  # nothing to end
    assert seen == [("maintenance", "active", "maintenance"), ("activated", "maintenance", "active")]
    await manager.suspend_tenant("acme")
    with pytest.raises(InvalidTransitionError):
        await manager.start_maintenance("acme")  # not served anyway: nothing to hold off
    assert (await manager.end_maintenance("acme")).status is TenantStatus.SUSPENDED


async def test_a_maintenance_block_restores_only_what_it_changed(manager: TenancyManager) -> None:
    for slug in ("acme", "busy", "sleepy", "failing"):
        await manager.register_tenant(slug, slug)
    async with manager.maintenance("acme") as held:
        assert held.status is TenantStatus.MAINTENANCE
        assert (await manager.get_tenant("acme")).status is TenantStatus.MAINTENANCE
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE

    # An operator's maintenance outlives the block; a suspended tenant is left alone.
    await manager.start_maintenance("busy")
    await manager.suspend_tenant("sleepy")
    async with manager.maintenance("busy"), manager.maintenance("sleepy") as sleepy:
        assert sleepy.status is TenantStatus.SUSPENDED
    assert (await manager.get_tenant("busy")).status is TenantStatus.MAINTENANCE
    assert (await manager.get_tenant("sleepy")).status is TenantStatus.SUSPENDED

    # A suspension during the block stands; the block's error goes through, the tenant is active.
    async with manager.maintenance("acme"):
        await manager.suspend_tenant("acme")
    assert (await manager.get_tenant("acme")).status is TenantStatus.SUSPENDED
    with pytest.raises(RuntimeError, match="migration failed"):
        async with manager.maintenance("failing"):
            raise RuntimeError("migration failed")
    assert (await manager.get_tenant("failing")).status is TenantStatus.ACTIVE


async def test_a_cancelled_maintenance_block_still_ends_it(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme")
    entered = asyncio.Event()

    async def work() -> None:
        async with manager.maintenance("acme"):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE
