"""TenancyManager: lifecycle, registration, soft and hard delete, cache invalidation."""

import asyncio
import logging
from collections.abc import AsyncIterator
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
    TenantInactiveError,
    TenantNotFoundError,
    TenantResolutionError,
    TenantStatus,
    tenant_scope,
)
from fastapi_tenancy.isolation import SQLiteFileIsolation
from fastapi_tenancy.resolution import HeaderResolver
from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from .apps import Base


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    yield manager
    await manager.close()


async def test_initialize_and_close_are_idempotent_and_restartable(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    await manager.initialize()
    await manager.register_tenant("acme", "Acme")
    await manager.close()
    await manager.close()
    await manager.initialize()
    assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE
    await manager.close()


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


async def test_sessions_outside_requests_need_an_active_tenant_in_scope(manager: TenancyManager) -> None:
    tenant = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    with pytest.raises(TenantResolutionError):
        async with manager.session():
            pass
    with tenant_scope(tenant):
        async with manager.session() as session:
            assert (await session.execute(Base.metadata.tables["orders"].select())).all() == []
    suspended = await manager.suspend_tenant("acme")
    with pytest.raises(TenantInactiveError):
        async with manager.session(suspended):
            pass


async def test_resolver_wiring_is_checked() -> None:
    async def from_query(connection: object) -> str | None:
        return None

    with pytest.raises(ConfigurationError, match="custom"):
        TenancyManager(TenancyConfig(database_url="sqlite://", resolution_strategy="custom"))
    with pytest.raises(ConfigurationError, match="resolution_strategy='custom'"):
        TenancyManager(TenancyConfig(database_url="sqlite://"), resolver=from_query)
    manager = TenancyManager(TenancyConfig(database_url="sqlite://", tenant_header_name="X-Org"))
    assert isinstance(manager.resolver, HeaderResolver) and manager.resolver.header_name == "x-org"
    custom = TenancyManager(
        TenancyConfig(database_url="sqlite://", resolution_strategy="custom"), resolver=from_query
    )
    assert custom.resolver.resolve.__self__.func is from_query  # type: ignore[attr-defined]


async def test_a_job_holding_an_old_record_is_refused_after_a_change(manager: TenancyManager) -> None:
    held = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    await manager.suspend_tenant("acme")
    with pytest.raises(TenantInactiveError):
        async with manager.session(held):
            pass
    await manager.delete_tenant("acme", destroy_data=True)
    await manager.register_tenant("acme", "New customer, same slug", app_metadata=Base.metadata)
    with pytest.raises(TenantNotFoundError):
        async with manager.session(held):
            pass


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


def test_an_inactive_tenant_error_says_the_same_in_logs_and_to_clients() -> None:
    error = TenantInactiveError("suspended")
    assert str(error) == error.detail == "Tenant is not active (status: suspended)"


async def test_a_manager_restarts_in_a_new_event_loop_each_time(postgres_url: str) -> None:
    # Test suites (and some servers) run startup and shutdown in a new event loop each time;
    # nothing may keep a connection of an earlier loop: the registry's pool, the
    # invalidation channel's NOTIFY connection.
    config = TenancyConfig(database_url=postgres_url)
    manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))

    async def cycle(index: int) -> None:
        await manager.initialize()
        try:
            await manager.register_tenant(f"loop-{index}", "Loop")
            await manager.suspend_tenant(f"loop-{index}")
        finally:
            await manager.close()

    def run_cycles() -> None:
        for index in range(3):
            asyncio.run(cycle(index))

    await asyncio.to_thread(run_cycles)
