"""`TenantOperations`: the manager's tenant methods, each handing the work to the service that does it.

`TenancyManager` inherits them; the services are built by the manager over its parts:
reads, changes and deletion in `TenantAdmin` (`admin.py`), registration and seeding in
`Registration` (`registration.py`), maintenance in `Maintenance` (`maintenance.py`), tier
moves in `TierMoves` (`moves.py`) and custom domains in `CustomDomains`
(`custom_domains.py`). Every one of them changes tenants through `TenantAdmin.change()`,
which invalidates the registry cache of every worker.
"""

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa

from .admin import TenantAdmin
from .custom_domains import CustomDomains
from .domain import Domain
from .maintenance import Maintenance
from .moves import TierMoves
from .registration import Registration
from .tenant import Tenant, TenantStatus

__all__ = ["TenantOperations"]


class TenantOperations:
    """The tenant methods of `TenancyManager`, over the services it builds; see the manager."""

    admin: TenantAdmin
    _registration: Registration
    _maintenance: Maintenance
    _moves: TierMoves
    _domains: CustomDomains

    # -- tenant administration ----------------------------------------------------------

    async def register_tenant(
        self,
        identifier: str,
        name: str,
        *,
        app_metadata: sa.MetaData | None = None,
        metadata: Mapping[str, Any] | None = None,
        database_url: str | None = None,
        tier: str | None = None,
        background: bool = False,
    ) -> Tenant:
        """Register a tenant, create its storage and tables, run the provisioning steps; then active.

        See `Registration.register_tenant`: a failed provisioning is undone and
        raises `ProvisioningError`; a taken slug raises `TenantAlreadyExistsError`.
        `background=True` returns the tenant still `provisioning` and finishes in a job
        of this process (`manager.provisioning.job(identifier)`).
        """
        return await self._registration.register_tenant(
            identifier,
            name,
            app_metadata=app_metadata,
            metadata=metadata,
            database_url=database_url,
            tier=tier,
            background=background,
        )

    async def seed_tenant(self, tenant: Tenant | str, *, steps: Iterable[str] | None = None) -> list[str]:
        """Run the provisioning steps (all, or `steps` by name) for an existing tenant; their names.

        See `Registration.seed_tenant` (and `fastapi-tenancy tenants seed`).
        """
        return await self._registration.seed_tenant(tenant, steps=steps)

    async def clone_tenant(
        self,
        source: Tenant | str,
        identifier: str,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        app_metadata: sa.MetaData | None = None,
    ) -> Tenant:
        """Register `identifier` with a consistent copy of `source`'s data; then active.

        See `cloning.clone_tenant`: the source keeps serving; a failure undoes the clone.
        """
        return await self._registration.clone_tenant(
            source, identifier, name=name, metadata=metadata, app_metadata=app_metadata
        )

    async def rotate_encryption_keys(self) -> int:
        """Re-encrypt every tenant's `database_url` under the first key; how many changed."""
        return await self.admin.rotate_encryption_keys()

    async def get_tenant(self, identifier: str) -> Tenant:
        """The tenant with this identifier, read from the registry (not the cache)."""
        return await self.admin.get_tenant(identifier)

    async def get_tenant_by_id(self, tenant_id: str) -> Tenant:
        """The tenant with this id, read from the registry."""
        return await self.admin.get_tenant_by_id(tenant_id)

    async def list_tenants(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        """Tenants ordered by identifier; page with `after=<last identifier seen>`."""
        return await self.admin.list_tenants(status=status, after=after, limit=limit)

    async def update_tenant(
        self,
        tenant: Tenant | str | None = None,
        *,
        tenant_id: str | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        metadata_patch: Mapping[str, Any] | None = None,
    ) -> Tenant:
        """Change a tenant's name and/or metadata (`metadata` replaces, `metadata_patch` merges).

        Prefer `metadata_patch` under concurrency; see `TenantAdmin.update_tenant`.
        """
        return await self.admin.update_tenant(
            tenant, tenant_id=tenant_id, name=name, metadata=metadata, metadata_patch=metadata_patch
        )

    async def suspend_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Stop serving a tenant (403) and keep its data. Reversible with `activate_tenant`.

        The tenant is a `Tenant`, an identifier, or an id given as `tenant_id=`.
        """
        return await self.admin.suspend_tenant(tenant, tenant_id=tenant_id)

    async def activate_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a suspended tenant again."""
        return await self.admin.activate_tenant(tenant, tenant_id=tenant_id)

    async def delete_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None, destroy_data: bool = False
    ) -> None:
        """Delete a tenant: soft (data and slug kept) or, with `destroy_data=True`, for good."""
        await self.admin.delete_tenant(tenant, tenant_id=tenant_id, destroy_data=destroy_data)

    async def start_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Put an active tenant in maintenance: its requests get 503 with `Retry-After`.

        See `Maintenance.start_maintenance`; `end_maintenance` serves it again.
        """
        return await self._maintenance.start_maintenance(tenant, tenant_id=tenant_id)

    async def end_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a tenant in maintenance again (any other status is left as it is)."""
        return await self._maintenance.end_maintenance(tenant, tenant_id=tenant_id)

    @asynccontextmanager
    async def maintenance(self, tenant: Tenant | str) -> AsyncIterator[Tenant]:
        """Hold an active tenant in maintenance for an `async with` block; see `Maintenance.maintenance`.

        Its requests get 503 meanwhile, in every worker:
        `async with manager.maintenance("acme-corp"): ...`
        """
        async with self._maintenance.maintenance(tenant) as held:
            yield held

    async def move_tenant(
        self, tenant: Tenant | str, tier: str, *, app_metadata: sa.MetaData, maintenance: bool = False
    ) -> Tenant:
        """Move a live tenant to another tier (hybrid isolation); see `TierMoves.move_tenant`.

        `maintenance=True` answers its requests 503 in every worker for the move's duration.
        """
        return await self._moves.move_tenant(tenant, tier, app_metadata=app_metadata, maintenance=maintenance)

    async def remove_old_copy(self, tenant: Tenant | str) -> None:
        """Delete the copy a `move_tenant` left in the tenant's previous tier. Irreversible."""
        await self._moves.remove_old_copy(tenant)

    async def adopt_storage(self, tenant: Tenant | str) -> bool:
        """Mark the storage found under a registered tenant's name as its own.

        For storage made outside the library, which tenant sessions refuse until then.
        True when it wrote the marker; see `TenantAdmin.adopt_storage`.
        """
        return await self.admin.adopt_storage(tenant)

    # -- custom domains: `CustomDomains` (custom_domains.py) has the rules ---------------------

    async def add_domain(self, tenant: Tenant | str, domain: str, *, primary: bool = False) -> Domain:
        """Give the host name `domain` to a tenant (`primary=True`: its primary domain).

        Raises `InvalidDomainError` for a name no tenant can have (central, under another
        tenant's subdomain, malformed), `DomainTakenError` if another tenant holds it.
        """
        return await self._domains.add_domain(tenant, domain, primary=primary)

    async def remove_domain(self, tenant: Tenant | str, domain: str) -> None:
        """Take the host name `domain` from a tenant; `DomainNotFoundError` if it is not its."""
        await self._domains.remove_domain(tenant, domain)

    async def list_domains(self, tenant: Tenant | str) -> tuple[Domain, ...]:
        """The tenant's domains, the primary first, read from the registry."""
        return await self._domains.list_domains(tenant)

    async def tenant_url(self, tenant: Tenant | str, path: str = "/", *, scheme: str = "https") -> str:
        """The URL of `path` on the tenant's primary domain, else on its subdomain of `domain_suffix`.

            return RedirectResponse(await manager.tenant_url(tenant, request.url.path))

        Read through the registry cache (no registry query once cached), so it is cheap
        enough for redirects on the request path. Raises `TenantNotFoundError` for an
        unknown tenant, `ConfigurationError` when it has no primary domain and there is
        no `domain_suffix`.
        """
        return await self._domains.tenant_url(tenant, path, scheme=scheme)
