"""`Domain`: a host name a tenant is served on, and `DomainPolicy`: which hosts are whose.

A tenant may have several custom domains (`acme.com`, `app.acme.com`), one of them
primary (where its URLs point); the stores keep them (`TenantStore.add_domain`), and a
name belongs to one tenant at most. Beside them, `domain_suffix` gives every tenant a
subdomain (`acme.example.com`), and central domains (the marketing site, the admin)
belong to no tenant. `DomainPolicy` holds those rules, for the domain resolver and for
the checks made before a domain is given to a tenant.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigurationError, InvalidDomainError

__all__ = [
    "DOMAIN_MAX_LENGTH",
    "Domain",
    "DomainPolicy",
    "HostKind",
    "is_domain",
    "validate_domain",
    "validate_domain_suffix",
]

DOMAIN_MAX_LENGTH = 253
"""The longest DNS name, without its trailing dot (RFC 1035)."""

# A DNS label as host names spell it: letters, digits, inner hyphens; at most 63.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IDN_PREFIX = "xn--"
# A domain a tenant may have, in one match (it runs on the request path): two or more such
# labels, none of them punycode, the last not all digits. Labels hold no dot, so each
# match of a label ends at the next dot: no backtracking across labels.
_TENANT_DOMAIN = re.compile(
    r"(?:(?!xn--)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?!xn--)(?![0-9]+\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


def is_domain(name: str) -> bool:
    """Whether `name` is a domain a tenant may have, exactly as written (lower-case, no dot at the end).

    At least two labels, each letters, digits and inner hyphens; not an IP address (the
    last label is not all digits); no punycode (`xn--`) label: an internationalised name
    can be made to look like another (`аcme.com` with a Cyrillic `а`), so none is served.
    """
    return len(name) <= DOMAIN_MAX_LENGTH and _TENANT_DOMAIN.fullmatch(name) is not None


def validate_domain(name: str) -> str:
    """`name` normalised (`ACME.com.` -> `acme.com`); `InvalidDomainError` if no tenant can have it.

    Case is folded only once the name is known to be ASCII: `str.lower()` maps some
    non-ASCII letters onto ASCII ones (the Kelvin sign `K` becomes `k`), and a look-alike
    must never become the name it imitates. Leading and trailing spaces are not trimmed.
    """
    if not isinstance(name, str) or not name.isascii():
        raise InvalidDomainError(f"not a domain name: {name!r:.80} (internationalised names are not served)")
    value = name.lower()
    if value.endswith("."):
        value = value[:-1]
    if not is_domain(value):
        raise InvalidDomainError(
            f"not a domain name such as 'acme.com': {name!r:.80} (two or more labels of letters, digits "
            "and inner hyphens; no IP address, no punycode)"
        )
    return value


def validate_domain_suffix(suffix: str) -> str:
    """Normalise a domain suffix (`Example.COM.` -> `example.com`); `ValueError` if it is not one.

    Its last label may not be all digits, so no IP address can ever end with it. One
    label (`localhost`) and punycode labels are allowed: the suffix is the operator's.
    """
    value = suffix.strip().rstrip(".")
    if not value.isascii():  # before lower(): see validate_domain
        raise ValueError("not a domain name such as 'example.com'")
    value = value.lower()
    labels = value.split(".")
    if not value or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("not a domain name such as 'example.com'")
    return value


@dataclass(frozen=True, slots=True)
class Domain:
    """One host name of a tenant: `name` (normalised: `validate_domain`), whose it is, whether primary.

    Immutable. A tenant has at most one primary domain: the host of the URLs built for
    it (`TenancyManager.tenant_url`) and the one to redirect its other hosts to.
    """

    name: str
    tenant_id: str
    primary: bool = False

    def __post_init__(self) -> None:
        # Stores compare names byte for byte: only the normalised form may reach them.
        if not isinstance(self.name, str) or validate_domain(self.name) != self.name:
            raise InvalidDomainError(f"not a normalised domain name: {self.name!r:.80}")
        if not isinstance(self.tenant_id, str) or not self.tenant_id:
            raise ValueError("a domain needs the id of its tenant")


HostKind = Literal["central", "subdomain", "registered", "none"]


class DomainPolicy:
    """Which host names are whose: central, a tenant's subdomain, or to look up in the registry.

    Shared, immutable. `domain_suffix` (optional) gives each tenant the host
    `<identifier>.<suffix>`; `central` names hosts that belong to no tenant; `reserved`
    labels under the suffix (`www`) are central too, and so is the bare suffix.
    """

    def __init__(
        self,
        *,
        domain_suffix: str | None = None,
        central: Iterable[str] = (),
        reserved: Iterable[str] = ("www",),
    ) -> None:
        self.domain_suffix = None if domain_suffix is None else validate_domain_suffix(domain_suffix)
        self._dotted_suffix = "" if self.domain_suffix is None else "." + self.domain_suffix
        self.central = frozenset(validate_domain(name) for name in central)
        self.reserved = frozenset(label.strip().lower() for label in reserved)

    def classify(self, host: str) -> tuple[HostKind, str]:
        """What the normalised `host` is, and the name to use: `("subdomain", label)` and so on.

        - `central`: a central domain, the bare suffix or a reserved label under it;
        - `subdomain`: exactly one label before the suffix: the tenant with that identifier
          (the label is returned; whether such a tenant exists is the registry's answer);
        - `registered`: a domain to look up in the registry (deeper hosts under the suffix too);
        - `none`: nothing any tenant can be served on (an IP address, one label, punycode).
        """
        if host in self.central:
            return "central", host
        if self.domain_suffix is not None:
            if host == self.domain_suffix:
                return "central", host
            if host.endswith(self._dotted_suffix):
                label = host[: -len(self._dotted_suffix)]
                if "." not in label:
                    # One label before the suffix always names the tenant of that identifier:
                    # no registered domain can take a tenant's subdomain from it.
                    if not label or label in self.reserved:
                        return "central", host
                    if label.startswith(_IDN_PREFIX):
                        return "none", host  # punycode: a look-alike of some slug
                    return "subdomain", label
                if label.rpartition(".")[2] in self.reserved:
                    return "central", host  # under www.<suffix>, which is no tenant's
        if is_domain(host):
            return "registered", host
        return "none", host

    def check(self, name: str, identifier: str) -> None:
        """Refuse to give the normalised domain `name` to tenant `identifier` unless it may have it.

        Central domains are no tenant's. Under `domain_suffix`, `<label>.<suffix>` and
        every host below it belong to the tenant `<label>` only: the subdomain names that
        tenant whatever the registry says, and a host below it shares its cookies
        (`Domain=acme.example.com` reaches `login.acme.example.com`). Raises
        `InvalidDomainError`.
        """
        kind, value = self.classify(name)
        if kind == "central":
            raise InvalidDomainError(f"{name} is a central domain: it belongs to no tenant")
        if kind == "none":
            raise InvalidDomainError(f"not a domain a tenant can have: {name!r:.80}")
        if self.domain_suffix is not None and name.endswith(self._dotted_suffix):
            owner = value if kind == "subdomain" else name[: -len(self._dotted_suffix)].rpartition(".")[2]
            if owner != identifier:
                raise InvalidDomainError(
                    f"{name} is under tenant {owner!r}'s subdomain ({owner}.{self.domain_suffix}): "
                    f"only that tenant may have it"
                )

    def url(
        self, identifier: str, domains: Iterable[Domain], path: str = "/", *, scheme: str = "https"
    ) -> str:
        """The URL of `path` for a tenant: on its primary domain, else on its subdomain.

        `ConfigurationError` when the tenant has no primary domain and there is no
        `domain_suffix` to make its subdomain from.
        """
        host = next((domain.name for domain in domains if domain.primary), None)
        if host is None:
            if self.domain_suffix is None:
                raise ConfigurationError(
                    f"tenant {identifier!r} has no primary domain, and without domain_suffix it has no "
                    "subdomain: add one with add_domain(..., primary=True)"
                )
            host = f"{identifier}.{self.domain_suffix}"
        if scheme not in ("https", "http"):
            raise ValueError(f"scheme must be 'https' or 'http', not {scheme!r}")
        return f"{scheme}://{host}/{path.lstrip('/')}"
