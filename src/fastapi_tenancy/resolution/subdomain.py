"""`SubdomainResolver`: the tenant from the label in front of a domain suffix (`acme.example.com`)."""

from collections.abc import Iterable

from starlette.requests import HTTPConnection

from ..domain import DomainPolicy, validate_domain_suffix
from .base import OpenAPITenant, Resolver
from .host import HostReader, normalise_host, parse_networks

# validate_domain_suffix and parse_networks lived here first: still importable from here.
__all__ = ["SubdomainResolver", "parse_networks", "validate_domain_suffix"]


class SubdomainResolver(Resolver):
    """Reads the identifier from the host: the single label directly before `domain_suffix`.

    With `domain_suffix="example.com"`, `acme.example.com` names `acme`. Deeper hosts
    (`victim.acme.example.com`), the bare suffix, other domains, IP addresses,
    `reserved` labels (`www`), punycode (`xn--`) labels and non-ASCII hosts name no
    tenant. The port is ignored, case folded and one trailing dot dropped.

    `Forwarded: host=` (RFC 7239) and `X-Forwarded-Host` are read only from a client
    whose address is in `trusted_proxies` (addresses or CIDR blocks); from anyone else
    they are ignored, since any client can send them (`HostReader` has the rules).
    """

    def __init__(
        self,
        domain_suffix: str,
        *,
        reserved: Iterable[str] = ("www",),
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        suffix = validate_domain_suffix(domain_suffix)
        self.domain_suffix = suffix
        self._dotted_suffix = "." + suffix
        self.reserved = frozenset(label.lower() for label in reserved)
        self.policy = DomainPolicy(domain_suffix=suffix, reserved=self.reserved)
        self.hosts = HostReader(trusted_proxies)
        self.trusted_proxies = self.hosts.trusted_proxies

    async def resolve(self, connection: HTTPConnection) -> str | None:
        host = self.hosts.raw(connection)
        return self.label(host) if host is not None else None

    def openapi(self, *, required: bool = True) -> OpenAPITenant:
        # Requests from /docs go to the host the docs were opened on: on a tenant's
        # host they name that tenant. The template names any tenant's host instead.
        server = {
            "url": "{scheme}://{tenant}." + self.domain_suffix,
            "description": f"a tenant's own host, <tenant>.{self.domain_suffix}",
            "variables": {
                "scheme": {"enum": ["https", "http"], "default": "https"},
                "tenant": {"default": "tenant", "description": "The tenant's identifier, e.g. `acme`."},
            },
        }
        return OpenAPITenant(servers=(server,))

    def label(self, host: str) -> str | None:
        """The tenant label of a Host value (`ACME.example.com:8443` -> `acme`), or None."""
        # Printable ASCII only, no whitespace, no IP literal (normalise_host): control
        # bytes and Unicode never name a tenant.
        name = normalise_host(host)
        if name is None:
            return None
        # Only the label directly in front of the suffix: `victim.acme.example.com` must
        # not resolve to `victim` (nor to `acme`: the client chose a deeper host). Reserved
        # labels name no tenant, nor do punycode ones: a Unicode name in disguise, which
        # would let a look-alike of a slug reach a tenant. (DomainPolicy.classify, shared
        # with the domain strategy, has the rules.)
        kind, label = self.policy.classify(name)
        return label if kind == "subdomain" else None
