"""`SubdomainResolver`: the tenant from the label in front of a domain suffix (`acme.example.com`)."""

import ipaddress
import re
from collections.abc import Iterable

from starlette.requests import HTTPConnection

from .base import OpenAPITenant, Resolver

__all__ = ["SubdomainResolver", "parse_networks", "validate_domain_suffix"]

# A DNS name has at most 253 characters; with a port and a trailing dot a Host value
# is a little longer. Anything beyond is not a host we serve, and is refused before
# any other work is spent on it (a 1 MB header costs one len()).
_MAX_HOST = 253 + 1 + 6
_IDN_PREFIX = "xn--"
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def validate_domain_suffix(suffix: str) -> str:
    """Normalise a domain suffix (`Example.COM.` -> `example.com`); `ValueError` if it is not one.

    Its last label may not be all digits, so no IP address can ever end with it.
    """
    value = suffix.strip().rstrip(".").lower()
    labels = value.split(".")
    if not value or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("not a domain name such as 'example.com'")
    return value


def parse_networks(addresses: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse IP addresses and CIDR blocks (`10.0.0.0/8`, `::1`); `ValueError` for a bad one."""
    return tuple(ipaddress.ip_network(address.strip(), strict=False) for address in addresses)


class SubdomainResolver(Resolver):
    """Reads the identifier from the host: the single label directly before `domain_suffix`.

    With `domain_suffix="example.com"`, `acme.example.com` names `acme`. Deeper hosts
    (`victim.acme.example.com`), the bare suffix, other domains, IP addresses,
    `reserved` labels (`www`), punycode (`xn--`) labels and non-ASCII hosts name no
    tenant. The port is ignored, case folded and one trailing dot dropped.

    `X-Forwarded-Host` is read only from a client whose address is in
    `trusted_proxies` (addresses or CIDR blocks); from anyone else it is ignored,
    since any client can send it.
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
        self.trusted_proxies = parse_networks(trusted_proxies)

    async def resolve(self, connection: HTTPConnection) -> str | None:
        host = self._host(connection)
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
        # Printable ASCII only (label() is public: check again): control bytes and
        # Unicode never name a tenant.
        if len(host) > _MAX_HOST or not host.isascii() or not host.isprintable():
            return None
        if host.startswith("["):  # an IPv6 literal, with or without a port
            return None
        name, colon, port = host.rpartition(":")
        if colon:
            if not port.isdigit() or ":" in name:  # a bare IPv6 address, or junk
                return None
            host = name
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not host.endswith(self._dotted_suffix):
            return None
        label = host[: -len(self._dotted_suffix)]
        # Only the label directly in front of the suffix: `victim.acme.example.com`
        # must not resolve to `victim` (nor to `acme`: the client chose a deeper host).
        if not label or "." in label or label in self.reserved:
            return None
        # Punycode is a Unicode name in disguise; slugs are plain ASCII, and serving
        # `xn--` labels would let a look-alike name reach a tenant.
        if label.startswith(_IDN_PREFIX):
            return None
        # No IP address reaches this point: the suffix's last label is not numeric
        # (validate_domain_suffix), and an IPv6 address has colons, refused above.
        return label

    def _host(self, connection: HTTPConnection) -> str | None:
        host: bytes | None = None
        forwarded: bytes | None = None
        for name, value in connection.scope["headers"]:
            if name == b"host":
                if host is not None and value != host:
                    return None  # two different Host headers: no way to know which one counts
                host = value
            elif name == b"x-forwarded-host":
                forwarded = value  # the last header, if sent more than once
        if forwarded is not None and self.trusted_proxies and self._from_trusted_proxy(connection):
            host = forwarded.rpartition(b",")[2]  # the nearest proxy appends its own view last
        if host is None or len(host) > _MAX_HOST:
            return None
        # Only HTTP's optional whitespace (space, tab) may be trimmed: str.strip() would
        # also drop \x85, \xa0, \x0c or \x1f, and a host carrying them would resolve.
        return host.decode("latin-1").strip(" \t")

    def _from_trusted_proxy(self, connection: HTTPConnection) -> bool:
        client = connection.scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:  # a Unix socket path, or a test client's made-up name
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 on a dual-stack socket
        return any(address in network for network in self.trusted_proxies)
