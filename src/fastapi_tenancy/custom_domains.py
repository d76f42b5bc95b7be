"""`CustomDomains`: giving host names to tenants and taking them back, and a tenant's URL.

The rules for names are `domain.py`'s (`validate_domain`, `DomainPolicy`); the store keeps
who holds which name, atomically. Every change is announced like a tenant change: each
worker's registry cache forgets the name and the tenant's list of domains. Applications
reach it through `TenancyManager.add_domain`, `remove_domain`, `list_domains` and
`tenant_url`.
"""

import logging

from .admin import TenantAdmin
from .domain import Domain, DomainPolicy, validate_domain
from .errors import TenantNotFoundError
from .tenant import Tenant

__all__ = ["CustomDomains"]

logger = logging.getLogger("fastapi_tenancy")


class CustomDomains:
    """Tenants' custom domains over one `TenantAdmin`; safe to share between tasks."""

    def __init__(self, admin: TenantAdmin, policy: DomainPolicy | None = None) -> None:
        self.admin = admin
        # Which hosts are whose (central domains, domain_suffix): checked before add_domain.
        self.policy = policy if policy is not None else DomainPolicy()

    async def add_domain(self, tenant: Tenant | str, domain: str, *, primary: bool = False) -> Domain:
        """Give the host name `domain` to a tenant; with `primary=True`, make it its primary domain.

        The name is normalised (`ACME.com.` is `acme.com`) and checked before anything
        is written: `InvalidDomainError` for a name no tenant can have (malformed, an IP
        address, punycode, a central domain, under another tenant's subdomain of
        `domain_suffix`), `DomainTakenError` when another tenant holds it (the store
        decides atomically). Adding a name the tenant has is allowed (to make it primary).
        Every worker's registry cache forgets the name at once.
        """
        name = validate_domain(domain)
        current = await self.admin.current(tenant)
        self.policy.check(name, current.identifier)
        try:
            added = await self.admin.store.add_domain(Domain(name, current.id, primary=primary))
        finally:
            await self._domain_changed(current, name)
        logger.info(
            "tenant %s: domain %s added%s", current.identifier, name, " (primary)" if added.primary else ""
        )
        return added

    async def remove_domain(self, tenant: Tenant | str, domain: str) -> None:
        """Take the host name `domain` from a tenant; `DomainNotFoundError` if it is not the tenant's."""
        name = validate_domain(domain)
        current = await self.admin.current(tenant)
        try:
            await self.admin.store.remove_domain(name, tenant_id=current.id)
        finally:
            await self._domain_changed(current, name)
        logger.info("tenant %s: domain %s removed", current.identifier, name)

    async def list_domains(self, tenant: Tenant | str) -> tuple[Domain, ...]:
        """The tenant's domains, the primary first, read from the registry (not the cache)."""
        current = await self.admin.current(tenant)
        return await self.admin.store.get_domains(current.id)

    async def tenant_url(self, tenant: Tenant | str, path: str = "/", *, scheme: str = "https") -> str:
        """The URL of `path` on the tenant's primary domain, else on its subdomain of `domain_suffix`.

            return RedirectResponse(await manager.tenant_url(tenant, request.url.path))

        Read through the registry cache (no registry query once cached), so it is cheap
        enough for redirects on the request path. Raises `TenantNotFoundError` for an
        unknown tenant, `ConfigurationError` when it has no primary domain and there is
        no `domain_suffix`.
        """
        lookup = self.admin.lookup
        identifier = tenant.identifier if isinstance(tenant, Tenant) else tenant
        current = await lookup.get(identifier)
        if current is None or (isinstance(tenant, Tenant) and current.id != tenant.id):
            raise TenantNotFoundError(f"no tenant {identifier!r:.80}")
        domains = await lookup.domains_of(identifier)
        # Only this incarnation's: a list read before a purge and re-registration is no one's.
        mine = [domain for domain in domains if domain.tenant_id == current.id]
        return self.policy.url(identifier, mine, path, scheme=scheme)

    async def _domain_changed(self, tenant: Tenant, name: str) -> None:
        # The name's entry (which tenant holds it) and the tenant's list of domains.
        await self.admin.announce(name)
        await self.admin.announce(tenant.identifier)
