"""`InMemoryTenantStore`: a registry in a dict, for tests and examples."""

import asyncio
import bisect

from ..errors import TenantAlreadyExistsError, TenantChangedError, TenantNotFoundError
from ..tenant import Tenant, TenantStatus
from .base import TenantStore

__all__ = ["InMemoryTenantStore"]


class InMemoryTenantStore(TenantStore):
    """Tenants in process memory; gone when the process ends. Safe for concurrent use.

    For tests and single-process demos. Tenants are immutable, so the records
    handed out can be shared without copying.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Tenant] = {}
        self._id_by_identifier: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        tenant_id = self._id_by_identifier.get(identifier)
        return None if tenant_id is None else self._by_id[tenant_id]

    async def create(self, tenant: Tenant) -> Tenant:
        async with self._lock:
            if tenant.id in self._by_id or tenant.identifier in self._id_by_identifier:
                raise TenantAlreadyExistsError(f"tenant {tenant.identifier!r} already exists")
            self._by_id[tenant.id] = tenant
            self._id_by_identifier[tenant.identifier] = tenant.id
        return tenant

    async def update(self, tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        async with self._lock:
            stored = self._by_id.get(tenant.id)
            if stored is None:
                raise TenantNotFoundError(f"no tenant with id {tenant.id!r}")
            if expected is not None and (stored.status, stored.updated_at) != (
                expected.status,
                expected.updated_at,
            ):
                raise TenantChangedError(f"tenant {stored.identifier!r} changed concurrently")
            # Only the mutable fields are taken: the slug and creation time are fixed,
            # so an update can never take over another tenant's identifier.
            updated = stored.__class__(
                id=stored.id,
                identifier=stored.identifier,
                created_at=stored.created_at,
                name=tenant.name,
                status=tenant.status,
                metadata=tenant.metadata,
                tier=tenant.tier,
                updated_at=tenant.updated_at,
                encrypted_database_url=tenant.encrypted_database_url,
            )
            self._by_id[tenant.id] = updated
        return updated

    async def delete(self, tenant_id: str) -> None:
        async with self._lock:
            tenant = self._by_id.pop(tenant_id, None)
            if tenant is None:
                raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")
            del self._id_by_identifier[tenant.identifier]

    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        identifiers = sorted(self._id_by_identifier)
        start = 0 if after is None else bisect.bisect_right(identifiers, after)
        result: list[Tenant] = []
        for identifier in identifiers[start:]:
            if len(result) >= limit:
                break
            tenant = self._by_id[self._id_by_identifier[identifier]]
            if status is None or tenant.status is status:
                result.append(tenant)
        return result

    async def count(self, *, status: TenantStatus | None = None) -> int:
        if status is None:
            return len(self._by_id)
        return sum(1 for t in self._by_id.values() if t.status is status)
