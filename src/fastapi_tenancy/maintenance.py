"""`Maintenance`: a tenant's requests held off (503, `Retry-After`) while operators work on it.

A status like the others (`maintenance`), changed through the store's compare-and-set and
announced to every worker, so each refuses the tenant's requests once the change reaches
it. Applications reach it through `TenancyManager.start_maintenance`, `end_maintenance`
and `maintenance()`; the fleet migrator and tier moves hold tenants in it too.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .admin import TenantAdmin, only
from .errors import TenantNotFoundError
from .tenant import Tenant, TenantStatus

__all__ = ["Maintenance"]

logger = logging.getLogger("fastapi_tenancy")


class Maintenance:
    """Puts tenants in and out of maintenance over one `TenantAdmin`; safe to share between tasks."""

    def __init__(self, admin: TenantAdmin) -> None:
        self.admin = admin

    async def start_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Hold off an active tenant's requests (503, `Retry-After`) while operators work on it.

        The tenant's status becomes `maintenance`; every worker refuses its requests once
        the change reaches it (at once here, over the invalidation channel elsewhere).
        Its jobs wait too (ARQ and Celery retry them later). A tenant already in
        maintenance stays so; a suspended, deleted or provisioning one raises
        `InvalidTransitionError`. End it with `end_maintenance`.
        """
        return await self.admin.change_of("start_maintenance", tenant, tenant_id, _into_maintenance)

    async def end_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a tenant in maintenance again; a tenant in any other status is left as it is.

        A suspension or deletion made during the maintenance stands.
        """
        return await self.admin.change_of("end_maintenance", tenant, tenant_id, _out_of_maintenance)

    @asynccontextmanager
    async def maintenance(self, tenant: Tenant | str) -> AsyncIterator[Tenant]:
        """Hold `tenant` in maintenance for the block (a fleet migration, a tier move).

        Only an active tenant is put into maintenance, and only that one is made active
        again afterwards, whatever the block raised. One already in maintenance (an
        operator's) stays in it after the block; a suspended or deleted one is left as
        it is (it is not served anyway). A suspension or deletion made during the block
        stands. Yields the tenant as the block starts.
        """
        entered = False

        def enter(stored: Tenant) -> Tenant:
            nonlocal entered  # re-run on every compare-and-set retry: the last run counts
            entered = stored.status is TenantStatus.ACTIVE
            return stored.with_status(TenantStatus.MAINTENANCE) if entered else stored

        current = await self.admin.change_of("maintenance", tenant, None, enter)
        try:
            yield current
        finally:
            if entered:
                # Shielded: a cancelled run must not leave the tenant refusing its requests.
                await asyncio.shield(self._leave_maintenance(current))

    async def _leave_maintenance(self, tenant: Tenant) -> None:
        try:
            await self.admin.change(tenant.identifier, only(tenant.id, _out_of_maintenance))
        except TenantNotFoundError:
            pass  # purged meanwhile: nothing left to serve
        except Exception:  # the block's own outcome matters more; say what is left behind
            logger.exception(
                "tenant %s is still in maintenance: end it with `fastapi-tenancy tenants maintenance "
                "off %s` (or manager.end_maintenance)",
                tenant.identifier,
                tenant.identifier,
            )


def _into_maintenance(stored: Tenant) -> Tenant:
    if stored.status is TenantStatus.MAINTENANCE:
        return stored
    return stored.with_status(TenantStatus.MAINTENANCE)


def _out_of_maintenance(stored: Tenant) -> Tenant:
    if stored.status is TenantStatus.MAINTENANCE:
        return stored.with_status(TenantStatus.ACTIVE)
    return stored
