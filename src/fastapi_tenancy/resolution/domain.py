"""`DomainResolver`: the tenant from the host, by its custom domains (`acme.com`) and subdomains."""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from ..domain import DomainPolicy
from ..errors import ConfigurationError, TenantNotFoundError
from .base import OpenAPITenant, Resolver
from .host import HostReader

if TYPE_CHECKING:
    from ..lookup import TenantLookup

__all__ = ["DomainResolver"]


class DomainResolver(Resolver):
    """Reads the tenant from the host: a domain registered for it, or its subdomain.

    - A host exactly one label in front of `domain_suffix` (`acme.example.com`) names
      the tenant with that identifier, as `SubdomainResolver` does; no registered
      domain can take it from that tenant.
    - Any other host is looked up among the tenants' domains (`add_domain`) through
      the manager's registry cache: two dictionary lookups once cached. A host no
      tenant has is 404 `Tenant not found`.
    - Central domains (`central_domains`), the bare suffix and reserved labels under it
      (`www`) name no tenant (400), and neither do IP addresses, single labels,
      punycode and anything `HostReader` refuses (control bytes, Unicode, whitespace).

    `Forwarded: host=` and `X-Forwarded-Host` count only from `trusted_proxies`. The
    manager gives the resolver its registry cache (`bind`); built by hand outside a
    manager, pass `lookup=`.
    """

    def __init__(
        self,
        *,
        domain_suffix: str | None = None,
        central_domains: Iterable[str] = (),
        reserved: Iterable[str] = ("www",),
        trusted_proxies: Iterable[str] = (),
        lookup: "TenantLookup | None" = None,
    ) -> None:
        self.policy = DomainPolicy(domain_suffix=domain_suffix, central=central_domains, reserved=reserved)
        self.hosts = HostReader(trusted_proxies)
        self.lookup = lookup

    def bind(self, lookup: "TenantLookup") -> None:
        if not lookup.store.keeps_domains:
            # At startup rather than on every request: the store cannot answer.
            raise ConfigurationError(
                f"domain resolution needs a store that keeps custom domains; {type(lookup.store).__name__} "
                "does not (keeps_domains is False)"
            )
        self.lookup = lookup

    async def resolve(self, connection: HTTPConnection) -> str | None:
        host = self.hosts.host(connection)
        if host is None:
            return None
        kind, name = self.policy.classify(host)
        if kind == "subdomain":
            return name
        if kind != "registered":
            return None  # central, or nothing a tenant can have
        if self.lookup is None:
            raise ConfigurationError(
                "DomainResolver has no registry cache to look domains up in: pass it to a "
                "TenancyManager, or build it with lookup=manager.lookup"
            )
        tenant = await self.lookup.get_by_domain(name)
        if tenant is None:
            # A 404 like an unknown subdomain: the host was looked up as a tenant's.
            raise TenantNotFoundError(f"no tenant has the domain {name}")
        return tenant.identifier

    def openapi(self, *, required: bool = True) -> OpenAPITenant:
        # Requests from /docs go to the host the docs were opened on; the templates name
        # another tenant's host.
        scheme = {"enum": ["https", "http"], "default": "https"}
        servers = []
        suffix = self.policy.domain_suffix
        if suffix is not None:
            servers.append(
                {
                    "url": "{scheme}://{tenant}." + suffix,
                    "description": f"a tenant's own host, <tenant>.{suffix}",
                    "variables": {
                        "scheme": scheme,
                        "tenant": {
                            "default": "tenant",
                            "description": "The tenant's identifier, e.g. `acme`.",
                        },
                    },
                }
            )
        servers.append(
            {
                "url": "{scheme}://{domain}",
                "description": "a tenant's own domain",
                "variables": {
                    "scheme": scheme,
                    "domain": {
                        "default": "tenant.example",
                        "description": "A domain of the tenant, e.g. `acme.com`.",
                    },
                },
            }
        )
        return OpenAPITenant(servers=tuple(servers))
