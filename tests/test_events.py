"""Lifecycle hooks and the audit log the manager writes for every change."""

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from fastapi_tenancy import ProvisioningError, TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.audit import AuditWriter, SQLAuditWriter
from fastapi_tenancy.events import LifecycleEvent, TenantEvent, acting_as, current_actor

from .apps import Base


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def manager(db_url: str) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(
        TenancyConfig(database_url=db_url, database_pool_size=1, database_max_overflow=0)
    )
    await manager.initialize()
    try:
        yield manager
    finally:
        await manager.close()


def _audit(manager: TenancyManager) -> SQLAuditWriter:
    assert isinstance(manager.events.audit, SQLAuditWriter)
    return manager.events.audit


async def test_every_lifecycle_change_is_audited_with_who_and_when(manager: TenancyManager) -> None:
    with acting_as("admin:ops@example.com"):
        tenant = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
        await manager.update_tenant(tenant, name="Acme Inc")
    await manager.events.emit(
        LifecycleEvent.MIGRATED, tenant, revision="abc123"
    )  # as a migration runner would
    await manager.suspend_tenant("acme")  # no actor set: "system"
    with acting_as("support:ann"):
        await manager.activate_tenant("acme")
        await manager.delete_tenant("acme")
        await manager.delete_tenant("acme", destroy_data=True)

    entries = list(reversed(await _audit(manager).entries(tenant_id=tenant.id)))
    assert [(e.event, e.actor, e.status) for e in entries] == [
        ("registered", "admin:ops@example.com", "provisioning"),
        ("provisioned", "admin:ops@example.com", "active"),
        ("updated", "admin:ops@example.com", "active"),
        ("migrated", "system", "active"),
        ("suspended", "system", "suspended"),
        ("activated", "support:ann", "active"),
        ("deleted", "support:ann", "deleted"),
        ("purged", "support:ann", "deleted"),
    ]
    assert entries[2].details == {"from": "active", "to": "active", "fields": ["name"]}
    assert entries[3].details == {"revision": "abc123"}
    assert entries[4].details == {"from": "active", "to": "suspended"}
    assert all(e.tenant_id == tenant.id and e.tenant_identifier == "acme" for e in entries)
    times = [e.at for e in entries]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert current_actor() == "system"


async def test_no_op_changes_are_not_audited(manager: TenancyManager) -> None:
    tenant = await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    await manager.delete_tenant(tenant)
    await manager.delete_tenant(tenant)  # already deleted: nothing changes
    events = [e.event for e in await _audit(manager).entries(tenant_id=tenant.id)]
    assert events == ["deleted", "provisioned", "registered"]


async def test_hooks_sync_and_async_filtered_by_event(manager: TenancyManager) -> None:
    seen: list[tuple[str, str, str]] = []

    @manager.events.on(LifecycleEvent.SUSPENDED, "activated")
    async def on_status(event: TenantEvent) -> None:
        seen.append(("async", event.event, event.tenant.status))

    def on_everything(event: TenantEvent) -> None:
        seen.append(("sync", event.event, event.actor))

    manager.events.add(on_everything)
    await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    with acting_as("bob"):
        await manager.suspend_tenant("acme")
        await manager.activate_tenant("acme")
    assert seen == [
        ("sync", "registered", "system"),
        ("sync", "provisioned", "system"),
        ("async", "suspended", "suspended"),
        ("sync", "suspended", "bob"),
        ("async", "activated", "active"),
        ("sync", "activated", "bob"),
    ]


async def test_a_failing_hook_is_logged_and_the_lifecycle_goes_on(
    manager: TenancyManager, caplog: pytest.LogCaptureFixture
) -> None:
    later: list[str] = []

    async def broken(event: TenantEvent) -> None:
        raise RuntimeError("hook bug")

    manager.events.add(broken, LifecycleEvent.SUSPENDED)
    manager.events.add(lambda event: later.append(event.event), LifecycleEvent.SUSPENDED)
    await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
    with caplog.at_level(logging.ERROR, logger="fastapi_tenancy.events"):
        suspended = await manager.suspend_tenant("acme")
    assert suspended.status is TenantStatus.SUSPENDED
    assert (await manager.get_tenant("acme")).status is TenantStatus.SUSPENDED
    assert later == ["suspended"]  # the next hook still ran
    assert "hook bug" in caplog.text and "suspended of acme" in caplog.text
    assert (await manager.activate_tenant("acme")).status is TenantStatus.ACTIVE


class _Recorder(AuditWriter):
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.events: list[TenantEvent] = []

    async def write(self, event: TenantEvent) -> None:
        if self.fail:
            raise ConnectionError("audit store down")
        self.events.append(event)


async def test_a_custom_writer_replaces_the_sql_table(sqlite_url: str) -> None:
    recorder = _Recorder()
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url), audit=recorder)
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme")
        async with manager.engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        assert "tenancy_audit_log" not in tables
    finally:
        await manager.close()
    assert [e.event for e in recorder.events] == ["registered", "provisioned"]


async def test_a_failing_audit_writer_is_logged_and_the_change_stands(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url), audit=_Recorder(fail=True))
    await manager.initialize()
    try:
        with caplog.at_level(logging.ERROR, logger="fastapi_tenancy.events"):
            tenant = await manager.register_tenant("acme", "Acme")
        assert tenant.status is TenantStatus.ACTIVE
        assert "could not write the audit entry provisioned for tenant acme" in caplog.text
    finally:
        await manager.close()


async def test_failed_provisioning_is_audited_as_registered_then_purged(manager: TenancyManager) -> None:
    bad = sa.MetaData()
    sa.Table(
        "t",
        bad,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("x", sa.Integer, sa.ForeignKey("nowhere.id")),
    )
    with pytest.raises(ProvisioningError):
        await manager.register_tenant("acme", "Acme", app_metadata=bad)
    entries: list[Any] = await _audit(manager).entries()
    assert [(e.event, e.tenant_identifier, e.details) for e in reversed(entries)] == [
        ("registered", "acme", {}),
        ("purged", "acme", {"reason": "provisioning failed", "error": "NoReferencedTableError"}),
    ]


def test_acting_as_needs_a_name() -> None:
    with pytest.raises(ValueError):
        with acting_as(" "):
            pass
