"""Lifecycle events: hooks called when a tenant is registered, provisioned, suspended, ...

The manager emits one `TenantEvent` per stored change: it first goes to the audit
writer (who, what, when), then to the hooks registered for its kind. Both come
after the change is stored, and neither can undo or corrupt it: a failing writer
or hook is logged with its traceback and the lifecycle call returns normally.
"""

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .tenant import FrozenDict, Tenant, TenantStatus

if TYPE_CHECKING:
    from .audit import AuditWriter

__all__ = [
    "LifecycleEvent",
    "LifecycleEvents",
    "LifecycleHook",
    "TenantEvent",
    "acting_as",
    "current_actor",
]

logger = logging.getLogger("fastapi_tenancy.events")

SYSTEM_ACTOR = "system"

# Who is changing tenants: set by the application (an admin route, a CLI) around
# lifecycle calls, read by the manager when it writes the audit log.
_actor: ContextVar[str] = ContextVar("fastapi_tenancy.actor", default=SYSTEM_ACTOR)


class LifecycleEvent(StrEnum):
    """What happened to a tenant."""

    REGISTERED = "registered"  # in the registry, storage not made yet
    PROVISIONED = "provisioned"  # storage ready, now active
    UPDATED = "updated"  # name or metadata changed
    SUSPENDED = "suspended"
    MAINTENANCE = "maintenance"  # requests held off (503) while operators work on it
    ACTIVATED = "activated"  # active again after a suspension or maintenance
    DELETED = "deleted"  # soft delete: data kept, slug reserved
    PURGED = "purged"  # data destroyed and registry row removed
    MIGRATED = "migrated"  # schema migrations applied to the tenant's storage
    SEEDED = "seeded"  # provisioning steps run again for an existing tenant (`tenants seed`)
    CLONED = "cloned"  # made active with a copy of another tenant's data (`tenants clone`)


@dataclass(frozen=True, slots=True)
class TenantEvent:
    """One lifecycle change: what (`event`), to which `tenant`, by whom (`actor`), when (`at`)."""

    event: LifecycleEvent
    tenant: Tenant
    actor: str
    at: datetime
    details: Mapping[str, Any] = field(default_factory=FrozenDict)


LifecycleHook = Callable[[TenantEvent], Awaitable[None] | None]
"""A hook: a sync or async callable taking the `TenantEvent`."""


def current_actor() -> str:
    """Who the running code changes tenants for (`"system"` unless `acting_as` says otherwise)."""
    return _actor.get()


@contextmanager
def acting_as(actor: str) -> Iterator[str]:
    """Attribute the lifecycle changes made inside the block to `actor` in the audit log.

    with acting_as(f"user:{admin.email}"):
        await manager.suspend_tenant("acme-corp")
    """
    if not isinstance(actor, str) or not actor.strip():
        raise ValueError("actor must be a non-empty string")
    token = _actor.set(actor[:255])
    try:
        yield actor
    finally:
        _actor.reset(token)


_TRANSITION_EVENTS: dict[tuple[TenantStatus, TenantStatus], LifecycleEvent] = {
    (TenantStatus.PROVISIONING, TenantStatus.ACTIVE): LifecycleEvent.PROVISIONED,
    (TenantStatus.SUSPENDED, TenantStatus.ACTIVE): LifecycleEvent.ACTIVATED,
    (TenantStatus.ACTIVE, TenantStatus.SUSPENDED): LifecycleEvent.SUSPENDED,
    (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE): LifecycleEvent.MAINTENANCE,
    (TenantStatus.MAINTENANCE, TenantStatus.ACTIVE): LifecycleEvent.ACTIVATED,
    (TenantStatus.MAINTENANCE, TenantStatus.SUSPENDED): LifecycleEvent.SUSPENDED,
}


class LifecycleEvents:
    """The manager's hooks and audit writer (`manager.events`). Shared by all requests.

    Register hooks with `add(hook, *events)` or the `on(*events)` decorator; no
    events means every event. Hooks run in registration order, awaited in turn.

        @manager.events.on(LifecycleEvent.SUSPENDED)
        async def notify_billing(event: TenantEvent) -> None: ...
    """

    def __init__(self, audit: "AuditWriter | None" = None) -> None:
        self.audit = audit
        self._hooks: list[tuple[frozenset[LifecycleEvent], LifecycleHook]] = []

    async def initialize(self) -> None:
        """Prepare the audit writer (creates the SQL table). Called by `manager.initialize()`."""
        if self.audit is not None:
            await self.audit.initialize()

    async def close(self) -> None:
        """Release the audit writer. Called by `manager.close()`."""
        if self.audit is not None:
            await self.audit.close()

    def add(self, hook: LifecycleHook, *events: LifecycleEvent | str) -> None:
        """Call `hook` on each of `events` (all events when none is named)."""
        if not callable(hook):
            raise TypeError(f"a lifecycle hook must be callable, not {type(hook).__name__}")
        kinds = frozenset(LifecycleEvent(e) for e in events) or frozenset(LifecycleEvent)
        self._hooks.append((kinds, hook))

    @property
    def hooks(self) -> tuple[tuple[frozenset[LifecycleEvent], LifecycleHook], ...]:
        """The registered hooks in order, each with the events it is called on."""
        return tuple(self._hooks)

    def on(self, *events: LifecycleEvent | str) -> Callable[[LifecycleHook], LifecycleHook]:
        """Decorator form of `add`."""

        def register(hook: LifecycleHook) -> LifecycleHook:
            self.add(hook, *events)
            return hook

        return register

    async def emit(self, event: LifecycleEvent | str, tenant: Tenant, **details: Any) -> TenantEvent:
        """Record `event` for `tenant`: audit it, then run the hooks. Never raises for them.

        The manager calls this for every change it makes; call it yourself for
        changes it does not make, e.g. `LifecycleEvent.MIGRATED` after migrating
        a tenant's schema.
        """
        return await self.deliver(self.new_event(event, tenant, **details))

    @staticmethod
    def new_event(event: LifecycleEvent | str, tenant: Tenant, **details: Any) -> TenantEvent:
        """The `TenantEvent` `emit` would record for these arguments, made now, by the current actor."""
        now = datetime.now(UTC)
        return TenantEvent(LifecycleEvent(event), tenant, current_actor(), now, FrozenDict(details))

    async def deliver(self, record: TenantEvent, *, audited: bool = False) -> TenantEvent:
        """Audit `record` (unless `audited`: its entry was written with the change) and run the hooks.

        `emit` is `deliver(new_event(...))`; a registration whose audit entry committed in
        the registry's transaction passes `audited=True`. Never raises for writer or hooks.
        """
        tenant = record.tenant
        if self.audit is not None and not audited:
            try:
                await self.audit.write(record)
            except Exception:
                # The change is already stored; failing the call now would report a
                # change as failed that happened. Say loudly what is missing instead.
                logger.exception(
                    "could not write the audit entry %s for tenant %s", record.event, tenant.identifier
                )
        for kinds, hook in self._hooks:
            if record.event not in kinds:
                continue
            try:
                result = hook(record)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "lifecycle hook %r failed on %s of %s", hook, record.event, tenant.identifier
                )
        return record

    async def changed(self, before: Tenant, after: Tenant) -> TenantEvent:
        """Emit the event a stored change from `before` to `after` stands for."""
        return await self.deliver(self.change_event(before, after))

    @classmethod
    def change_event(cls, before: Tenant, after: Tenant) -> TenantEvent:
        """The `TenantEvent` a stored change from `before` to `after` stands for (`changed` emits it)."""
        if after.status is TenantStatus.DELETED:
            event = LifecycleEvent.DELETED
        elif before.status is after.status:
            event = LifecycleEvent.UPDATED
        else:
            # A transition without a name of its own (a status added later) is still audited.
            event = _TRANSITION_EVENTS.get((before.status, after.status), LifecycleEvent.UPDATED)
        details: dict[str, Any] = {"from": before.status.value, "to": after.status.value}
        if event is LifecycleEvent.UPDATED:
            details["fields"] = [
                name for name in ("name", "metadata") if getattr(before, name) != getattr(after, name)
            ]
        return cls.new_event(event, after, **details)
