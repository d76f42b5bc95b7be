"""`InMemoryTenantStore`: a registry in a dict, for tests and examples."""

import asyncio
import bisect

from ..domain import Domain
from ..errors import (
    DomainNotFoundError,
    DomainTakenError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
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
        self._domains: dict[str, str] = {}  # domain name -> tenant id
        self._primary: dict[str, str] = {}  # tenant id -> its primary domain
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
            # The tenant's domains go with it: none may lead to a later tenant.
            for name in [name for name, owner in self._domains.items() if owner == tenant_id]:
                del self._domains[name]
            self._primary.pop(tenant_id, None)

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

    # -- custom domains ------------------------------------------------------------------

    keeps_domains = True

    async def get_domain(self, name: str) -> Domain | None:
        tenant_id = self._domains.get(name)
        if tenant_id is None:
            return None
        return Domain(name, tenant_id, primary=self._primary.get(tenant_id) == name)

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        primary = self._primary.get(tenant_id)
        names = sorted(name for name, owner in self._domains.items() if owner == tenant_id)
        domains = (Domain(name, tenant_id, primary=name == primary) for name in names)
        return tuple(sorted(domains, key=lambda domain: not domain.primary))

    async def add_domain(self, domain: Domain) -> Domain:
        async with self._lock:
            if domain.tenant_id not in self._by_id:
                raise TenantNotFoundError(f"no tenant with id {domain.tenant_id!r}")
            holder = self._domains.get(domain.name)
            if holder is not None and holder != domain.tenant_id:
                raise DomainTakenError(f"{domain.name} belongs to another tenant")
            self._domains[domain.name] = domain.tenant_id
            if domain.primary:
                self._primary[domain.tenant_id] = domain.name
            return Domain(domain.name, domain.tenant_id, self._primary.get(domain.tenant_id) == domain.name)

    async def remove_domain(self, name: str, *, tenant_id: str) -> None:
        async with self._lock:
            if self._domains.get(name) != tenant_id:
                raise DomainNotFoundError(f"{name} is not a domain of tenant id {tenant_id!r}")
            del self._domains[name]
            if self._primary.get(tenant_id) == name:
                del self._primary[tenant_id]
