"""`clone_tenant`: a new tenant holding a consistent copy of another tenant's data.

For a demo tenant copied per prospect, a staging copy of a customer, a template tenant
with seed data. The clone is registered like any tenant (`provisioning`, then `active`,
audited, every worker's cache told), its storage provisioned the normal way (tables,
incarnation marker, version stamp), then filled from one snapshot of the source
(`isolation/copying.py`). Any failure undoes the clone entirely; the source is only read.
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .errors import ProvisioningError, TenancyError, TenantInactiveError
from .events import LifecycleEvent
from .isolation.copying import copy_tenant_data
from .isolation.hybrid import HybridIsolation
from .tenant import Tenant, TenantStatus

if TYPE_CHECKING:  # registration.py delegates here
    from .registration import Registration

__all__ = ["clone_tenant"]

logger = logging.getLogger("fastapi_tenancy")

# A tenant whose data is settled enough to copy: not half-provisioned, not deleted.
_CLONABLE = (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE, TenantStatus.SUSPENDED)


async def clone_tenant(
    registration: "Registration",
    source: Tenant | str,
    identifier: str,
    *,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    app_metadata: sa.MetaData | None = None,
) -> Tenant:
    """Register tenant `identifier` with a copy of `source`'s rows; the new tenant, `active`.

    The clone takes the source's name and metadata unless given, its tier (hybrid) and
    its server (a tenant's own `database_url`). Its storage is made as a registration
    makes it (`app_metadata`, the schema template, or migrations to head), so the source
    must be at the revision new tenants get. The provisioning steps do not run: the data
    is the source's. Raises `TenantNotFoundError` for an unknown source,
    `TenantInactiveError` for one provisioning or deleted, `TenantAlreadyExistsError` for
    a taken identifier, and `ProvisioningError` (after undoing everything) when the copy fails.
    """
    admin = registration.admin
    original = await admin.current(source)
    if original.status not in _CLONABLE:
        raise TenantInactiveError(original.status.value)
    isolation = admin.isolation
    isolation.storage_name(identifier)  # validates before anything is written
    new = Tenant(
        identifier=identifier,
        name=name or original.name,
        metadata=original.metadata if metadata is None else metadata,
        status=TenantStatus.PROVISIONING,
        encrypted_database_url=original.encrypted_database_url,
        tier=original.tier,
    )
    isolation.check(new)
    tenant = await admin.store.create(new)  # a taken slug raises here, before any storage
    await admin.announce(identifier)
    await admin.events.emit(LifecycleEvent.REGISTERED, tenant, cloned_from=original.identifier)
    # Hybrid isolation fills its tenant column in every tier: the copies name the clone.
    column = isolation.column if isinstance(isolation, HybridIsolation) else None
    started = time.perf_counter()
    try:
        await isolation.provision(tenant, app_metadata)
        try:
            if registration.stamper is not None:
                await registration.stamper.after_provision(isolation, tenant)
            rows = await copy_tenant_data(isolation, original, tenant, column=column)
        except BaseException:
            await asyncio.shield(registration.destroy_quietly(tenant))
            raise
    except BaseException as exc:
        await registration.undo(tenant, exc)
        if isinstance(exc, TenancyError | asyncio.CancelledError) or not isinstance(exc, Exception):
            raise
        raise ProvisioningError(f"could not clone tenant {original.identifier!r}: {exc}") from exc
    seconds = time.perf_counter() - started
    active = await admin.change(identifier, lambda t: t.with_status(TenantStatus.ACTIVE))
    await admin.events.emit(
        LifecycleEvent.CLONED, active, source=original.identifier, rows=rows, seconds=round(seconds, 3)
    )
    logger.info("cloned tenant %s into %s: %d rows in %.2f s", original.identifier, identifier, rows, seconds)
    return active
