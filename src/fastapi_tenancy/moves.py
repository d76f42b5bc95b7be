"""`TierMoves`: a live tenant moved to another tier of hybrid isolation.

The strategy copies the tenant's rows (`Isolation.move()`, refused except by hybrid
isolation); this module switches the stored tier with a compare-and-set once the copy
is made, and removes the old copy when asked. Applications reach it through
`TenancyManager.move_tenant` and `remove_old_copy`.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .admin import TenantAdmin
from .errors import TenantChangedError, TenantInactiveError
from .maintenance import Maintenance
from .tenant import Tenant, TenantStatus

if TYPE_CHECKING:  # Alembic, the migrations extra
    from .migrations.stamp import Stamper

__all__ = ["TierMoves"]

logger = logging.getLogger("fastapi_tenancy")


class TierMoves:
    """Moves tenants between tiers over one `TenantAdmin`; safe to share between tasks."""

    def __init__(
        self, admin: TenantAdmin, maintenance: Maintenance, *, stamper: "Stamper | None" = None
    ) -> None:
        self.admin = admin
        self.maintenance = maintenance
        # Set when migrations are configured (alembic_config): the new copy starts at head.
        self.stamper = stamper

    async def move_tenant(
        self, tenant: Tenant | str, tier: str, *, app_metadata: sa.MetaData, maintenance: bool = False
    ) -> Tenant:
        """Move a live tenant to another tier (hybrid isolation): copy, then switch atomically.

        Copies the rows of `app_metadata`'s tables into the new tier, then holds the
        tenant's writes while it switches (see `HybridIsolation.move`: into and out of
        the database tier the copy is made while they go on), then switches the stored
        tier with a compare-and-set; this process routes the tenant to the new tier
        at once, others when their cache expires (`cache_ttl`), answering 503 or
        failing in between, never serving the old copy. The old copy is kept until
        `remove_old_copy`. Raises `TenantChangedError` if the tenant was moved or
        deleted meanwhile.

        `maintenance=True` holds the tenant in maintenance while its writes are held
        and the tier is switched: every worker answers its requests 503 with
        `Retry-After` (not only this process's writers wait), and it is active again
        when the move ends, moved or not. A tenant an operator put in maintenance
        beforehand can be moved too.
        """
        isolation = self.admin.isolation
        current = await self.admin.current(tenant)
        if current.status not in (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE):
            raise TenantInactiveError(current.status.value)

        def switch(stored: Tenant) -> Tenant:
            if stored.id != current.id or stored.tier != current.tier:
                raise TenantChangedError(f"tenant {stored.identifier!r} changed during the move")
            return stored.with_tier(tier)

        switched: list[Tenant] = []

        @asynccontextmanager
        async def holding() -> AsyncIterator[None]:
            # While the writes are held and the tier switched: 503 in this process, and in
            # every worker when in maintenance.
            async with AsyncExitStack() as held:
                if maintenance:
                    await held.enter_async_context(self.maintenance.maintenance(current))
                held.enter_context(isolation.moving(current))
                yield

        async def registry() -> None:
            switched.append(await self.admin.change(current.identifier, switch))

        await isolation.move(current, tier, app_metadata, holding=holding, switch=registry)
        moved = switched[0]
        logger.info("moved tenant %s from tier %s to %s", current.identifier, current.tier, tier)
        if self.stamper is not None:
            # The new copy was made from app_metadata: at head, like a registration. The
            # move stands either way; a failure here shows in `doctor`.
            try:
                await self.stamper.after_provision(isolation, moved)
            except Exception:
                logger.exception("could not stamp the version table of moved tenant %s", moved.identifier)
        return moved

    async def remove_old_copy(self, tenant: Tenant | str) -> None:
        """Delete the copy a `move_tenant` left in the tenant's previous tier. Irreversible."""
        current = await self.admin.current(tenant)
        await self.admin.isolation.remove_old_copy(current)
        logger.warning("removed the old copy of tenant %s", current.identifier)
