"""TenancyManager: the parts' lifecycle, sessions outside requests, wiring; its tenant methods
(tested in test_admin.py) call TenantAdmin."""

import asyncio
import inspect
import uuid
from pathlib import Path

import pytest
from fastapi import FastAPI

from fastapi_tenancy import (
    ConfigurationError,
    TenancyConfig,
    TenancyManager,
    TenantInactiveError,
    TenantNotFoundError,
    TenantResolutionError,
    TenantStatus,
    current_tenant,
    current_tenant_or_none,
    tenant_scope,
)
from fastapi_tenancy.admin import TenantAdmin
from fastapi_tenancy.custom_domains import CustomDomains
from fastapi_tenancy.maintenance import Maintenance
from fastapi_tenancy.moves import TierMoves
from fastapi_tenancy.operations import TenantOperations
from fastapi_tenancy.registration import Registration
from fastapi_tenancy.resolution import HeaderResolver
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore

from .apps import Base


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


# What the manager's tenant methods hand their work to; TenantAdmin's change path and
# Registration's undoing are for them (and cloning).
SERVICES = (TenantAdmin, Registration, Maintenance, TierMoves, CustomDomains)
CHANGE_PATH = {"change", "change_of", "current", "announce", "undo", "destroy_quietly"}
SERVICE_METHODS = {
    name: service
    for service in SERVICES
    for name, value in vars(service).items()
    if callable(value) and not name.startswith("_") and name not in CHANGE_PATH
}


@pytest.mark.parametrize("name", sorted(SERVICE_METHODS))
def test_the_tenant_methods_are_the_services_with_the_same_signature(name: str) -> None:
    service = SERVICE_METHODS[name]
    assert inspect.signature(getattr(TenancyManager, name)) == inspect.signature(getattr(service, name))
    assert getattr(TenancyManager, name).__doc__, name


def test_every_tenant_method_of_the_manager_has_a_service() -> None:
    public = {name for name in vars(TenantOperations) if not name.startswith("_") and name != "admin"}
    assert public == set(SERVICE_METHODS)


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


async def test_a_session_takes_an_identifier_like_the_other_methods(manager: TenancyManager) -> None:
    await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    async with manager.session("acme") as session:
        assert (await session.execute(Base.metadata.tables["orders"].select())).all() == []
    with pytest.raises(TenantNotFoundError, match="no tenant 'nobody'"):
        async with manager.session("nobody"):
            pass
    with pytest.raises(TenantNotFoundError):
        async with manager.session("Not A Slug"):
            pass
    await manager.suspend_tenant("acme")
    with pytest.raises(TenantInactiveError):
        async with manager.session("acme"):
            pass


async def test_create_lifespan_initializes_and_closes(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    app = FastAPI(lifespan=manager.create_lifespan())
    async with app.router.lifespan_context(app):
        assert manager.initialized
        await manager.register_tenant("acme", "Acme")
    assert not manager.initialized
    with pytest.raises(RuntimeError, match="boom"):
        async with app.router.lifespan_context(app):
            raise RuntimeError("boom")
    assert not manager.initialized  # closed on the way out of a failure too


async def test_tenant_scope_also_works_with_async_with(manager: TenancyManager) -> None:
    tenant = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    async with tenant_scope(tenant) as scoped:
        assert scoped is tenant and current_tenant() is tenant
        async with manager.session() as session:
            assert (await session.execute(Base.metadata.tables["orders"].select())).all() == []
    assert current_tenant_or_none() is None
    with pytest.raises(ValueError, match="inside"):
        async with tenant_scope(tenant):
            raise ValueError("inside")
    assert current_tenant_or_none() is None
    scope = tenant_scope(tenant)
    with scope, pytest.raises(RuntimeError, match="already entered"):
        with scope:
            pass


@pytest.fixture(params=["postgres", "mysql"])
def fresh_url(request: pytest.FixtureRequest) -> str:
    """An empty PostgreSQL or MariaDB database."""
    return str(request.getfixturevalue(f"{request.param}_url"))


async def test_workers_starting_together_on_a_fresh_database_all_initialize(fresh_url: str) -> None:
    # `uvicorn --workers 4` on an empty database: every process creates the registry, its
    # side tables and the audit log at once. Each must come up, none with a duplicate-table error.
    postgres = fresh_url.startswith("postgresql")
    config = TenancyConfig(database_url=fresh_url, isolation_strategy="schema" if postgres else "database")
    managers = [TenancyManager(config) for _ in range(4)]
    try:
        await asyncio.gather(*(manager.initialize() for manager in managers))
        # A unique name: tenant databases of MariaDB live beside every other test's.
        identifier = f"t{uuid.uuid4().hex[:12]}"
        await managers[0].register_tenant(identifier, "Acme")
        assert [t.identifier for t in await managers[-1].list_tenants()] == [identifier]
        await managers[0].delete_tenant(identifier, destroy_data=True)
    finally:
        for manager in managers:
            await manager.close()
