"""The host a request was sent to: `Host`, or what a trusted proxy says (`Forwarded`, `X-Forwarded-Host`).

One implementation of host hygiene for every strategy that reads the host (subdomain
and domain resolution): which header counts, which proxy is believed, how a value is
normalised, and what is refused.
"""

import ipaddress
import re
from collections.abc import Iterable

from starlette.requests import HTTPConnection

from ..errors import TenantResolutionError

__all__ = ["MAX_HOST", "HostReader", "normalise_host", "parse_forwarded", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A DNS name has at most 253 characters; with a port and a trailing dot a Host value
# is a little longer. Anything beyond is not a host we serve, and is refused before
# any other work is spent on it (a 1 MB header costs one len()).
MAX_HOST = 253 + 1 + 6
# Addresses already judged trusted or not, at most this many (then forgotten all at once):
# parsing one with ipaddress costs several microseconds, a dictionary lookup nothing.
_MEMO_SIZE = 4096
# A Forwarded header is a list of hops: a few hundred bytes each at most. Longer ones are
# refused unparsed.
_MAX_FORWARDED = 8192
# A Forwarded pair: token "=" (token / quoted-string). Tokens are RFC 9110's; a quoted string
# holds tab, space and visible ASCII, quoted-pairs included, and no control byte.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(rf'({_TOKEN})=(?:({_TOKEN})|"((?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t\x20-\x7e])*)")')
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_networks(addresses: Iterable[str]) -> tuple[Network, ...]:
    """Parse IP addresses and CIDR blocks (`10.0.0.0/8`, `::1`); `ValueError` for a bad one."""
    return tuple(ipaddress.ip_network(address.strip(), strict=False) for address in addresses)


def normalise_host(value: str) -> str | None:
    """A Host value as a lower-case name without port or trailing dot (`ACME.com.:443` -> `acme.com`).

    None for anything that is not printable ASCII without whitespace (control bytes and
    Unicode never name a tenant), for IP literals in brackets and bare IPv6 addresses,
    for a port that is not digits, and for values longer than a DNS name can be. Which
    names are served is the resolver's business.
    """
    if len(value) > MAX_HOST or not value.isascii() or not value.isprintable():
        return None
    if " " in value or value.startswith("["):  # whitespace inside; an IPv6 literal
        return None
    name, colon, port = value.rpartition(":")
    if colon:
        if not port.isdigit() or ":" in name:  # a bare IPv6 address, or junk
            return None
        value = name
    # ASCII only from here on: lower() cannot turn a look-alike into another name.
    value = value.lower()
    if value.endswith("."):
        value = value[:-1]
    return value or None


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """The elements of a `Forwarded` header (RFC 7239), hop by hop, or None if it is malformed.

    `for=192.0.2.60;proto=https;host="acme.com:8443", for=10.0.0.1` gives two dicts,
    parameter names lower-cased, quoted strings unquoted. Malformed means: a control byte
    or non-ASCII character anywhere, an unterminated quoted string, a parameter without
    `=` or sent twice in one element, or a name or unquoted value that is not a token.
    A malformed header is refused whole: a client's unterminated quote could otherwise
    swallow the element its proxy appended.
    """
    if len(value) > _MAX_FORWARDED or not value.isascii():
        return None
    elements: list[dict[str, str]] = [{}]
    i, end = 0, len(value)
    while i < end:
        char = value[i]
        if char in " \t;":
            i += 1
            continue
        if char == ",":
            elements.append({})
            i += 1
            continue
        pair = _PAIR.match(value, i)
        if pair is None:
            return None  # not a pair where one must be: a control byte, an unterminated quote, ...
        name, token, quoted = pair.groups()
        name = name.lower()
        element = elements[-1]
        if name in element:
            return None  # "each parameter MUST NOT occur more than once per forwarded-element"
        element[name] = token if token is not None else _QUOTED_PAIR.sub(r"\1", quoted)
        # What follows a pair: optional whitespace, then ";" or "," or the end.
        i = pair.end()
        while i < end and value[i] in " \t":
            i += 1
        if i < end and value[i] not in ";,":
            return None
    return [element for element in elements if element]


class HostReader:
    """Finds the host a request was sent to. Shared by all requests; its only state is a
    bounded memo of which client addresses are trusted proxies.

    The `Host` header (HTTP/2's `:authority` arrives as `Host` in ASGI), or, when the
    connection comes from an address in `trusted_proxies`, what the proxy says it
    received: RFC 7239 `Forwarded: host=` or `X-Forwarded-Host`. From any other client
    those headers are ignored: anyone can send them.

    - `Forwarded` lists one element per hop, each added by the proxy that received the
      request from the element's `for=`. Read from the right, an element is believed
      while every hop after it came from a trusted proxy; the host is the one in the
      leftmost believed element that has one: what the client asked the first proxy for.
    - `X-Forwarded-Host` counts by its last entry, the one the nearest proxy added.
    - Both present and naming different hosts: refused (400 `Tenant identifier
      ambiguous`): two proxies disagree, or a client got one of them through.
    - Two different `Host` headers, or a malformed `Forwarded`: no host (400).
    """

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted_proxies = parse_networks(trusted_proxies)
        self._judged: dict[str, bool] = {}

    def host(self, connection: HTTPConnection) -> str | None:
        """The normalised host (`normalise_host`) the request was sent to, or None."""
        raw = self.raw(connection)
        return None if raw is None else normalise_host(raw)

    def raw(self, connection: HTTPConnection) -> str | None:
        """The host header value that counts, trimmed of spaces and tabs, not yet normalised."""
        host: bytes | None = None
        forwarded_host: bytes | None = None
        forwarded: list[bytes] = []
        for name, value in connection.scope["headers"]:
            if name == b"host":
                if host is not None and value != host:
                    return None  # two different Host headers: no way to know which one counts
                host = value
            elif name == b"x-forwarded-host":
                forwarded_host = value  # the last header, if sent more than once
            elif name == b"forwarded":
                forwarded.append(value)  # several lines are one list, in order (RFC 9110)
        if (
            (forwarded_host is not None or forwarded)
            and self.trusted_proxies
            and self._trusted_peer(connection)
        ):
            by_header = None
            if forwarded_host is not None:
                by_header = forwarded_host.rpartition(b",")[2]  # the nearest proxy appends its view last
                if len(by_header) > MAX_HOST:
                    return None
            by_rfc = None
            if forwarded:
                joined = b",".join(forwarded)
                elements = None if len(joined) > _MAX_FORWARDED else parse_forwarded(joined.decode("latin-1"))
                if elements is None:
                    return None  # a Forwarded header we cannot read: no host is believed
                by_rfc = self._forwarded_host(elements)
            if by_rfc is not None:
                if by_header is not None and normalise_host(_trim(by_header)) != normalise_host(by_rfc):
                    raise TenantResolutionError(
                        "Forwarded and X-Forwarded-Host name different hosts",
                        detail="Tenant identifier ambiguous",
                    )
                return by_rfc
            if by_header is not None:
                return _trim(by_header)
            # A Forwarded header without host= (only for=, proto=): the proxy kept the Host.
        if host is None or len(host) > MAX_HOST:
            return None
        return _trim(host)

    def _forwarded_host(self, elements: list[dict[str, str]]) -> str | None:
        host = None
        for element in reversed(elements):
            # This element was added by a proxy we trust: its host (if any) is believed.
            host = element.get("host", host)
            # The element before it was added by its `for=`: believed only if that is trusted too.
            if not self._trusted(_node_address(element.get("for", ""))):
                break
        return host

    def _trusted_peer(self, connection: HTTPConnection) -> bool:
        client = connection.scope.get("client")
        return self._trusted(client[0]) if client else False

    def _trusted(self, address: str | None) -> bool:
        if not address:
            return False
        judged = self._judged.get(address)
        if judged is None:
            if len(self._judged) >= _MEMO_SIZE:
                self._judged.clear()
            judged = self._judged[address] = self._judge(address)
        return judged

    def _judge(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a Unix socket path, an obfuscated node, a test client's made-up name
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 on a dual-stack socket
        return any(ip in network for network in self.trusted_proxies)


def _trim(value: bytes) -> str:
    # Only HTTP's optional whitespace (space, tab) may be trimmed: str.strip() would
    # also drop \x85, \xa0, \x0c or \x1f, and a host carrying them would resolve.
    return value.decode("latin-1").strip(" \t")


def _node_address(node: str) -> str | None:
    """The IP address of a Forwarded `for=` node (`192.0.2.1:80`, `[2001:db8::1]:80`), or None."""
    if node.startswith("["):
        address, bracket, _port = node[1:].partition("]")
        return address if bracket else None
    if node.count(":") > 1:
        return node  # an IPv6 address without brackets (not RFC 7239's form, but unambiguous)
    return node.partition(":")[0]
