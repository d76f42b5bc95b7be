"""The request's host (resolution/host.py): RFC 7239 `Forwarded` from trusted proxies, beside
`X-Forwarded-Host`, through a real app resolving by subdomain."""

import pytest

from fastapi_tenancy.resolution.host import normalise_host, parse_forwarded

from .conftest import Build

MISSING = (400, {"detail": "Tenant identifier missing"})
AMBIGUOUS = (400, {"detail": "Tenant identifier ambiguous"})
PROXIES = ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("host=acme.com", [{"host": "acme.com"}]),
        (
            'For="[2001:db8::1]:4711";HOST="acme.com:8443"',
            [{"for": "[2001:db8::1]:4711", "host": "acme.com:8443"}],
        ),
        (
            "for=192.0.2.60;proto=http;by=203.0.113.43",
            [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}],
        ),
        (
            "for=1.2.3.4, for=10.0.0.1;host=a.test",
            [{"for": "1.2.3.4"}, {"for": "10.0.0.1", "host": "a.test"}],
        ),
        ('host="a,b;c=d"', [{"host": "a,b;c=d"}]),  # separators inside a quoted string
        (r'host="a\"b"', [{"host": 'a"b'}]),  # a quoted-pair
        (
            "for=1.2.3.4 ; host=a.test ,  for=10.0.0.1",
            [{"for": "1.2.3.4", "host": "a.test"}, {"for": "10.0.0.1"}],
        ),
        (",, host=a.test,", [{"host": "a.test"}]),  # empty list members are allowed
        ("", []),
    ],
)
def test_forwarded_elements_are_parsed_per_rfc_7239(header: str, expected: list[dict[str, str]]) -> None:
    assert parse_forwarded(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        'host="acme.com',  # unterminated quoted string
        'host="acme.com\\',  # a quoted-pair cut short
        "host",  # no "="
        "host=",  # no value
        "host =acme.com",  # whitespace around "=" is not allowed
        "host=acme.com;host=evil.test",  # one parameter twice in one element
        "host=acme.com evil.test",  # two tokens without a separator
        "host=acme\x00.com",
        'host="acme.com\x00"',
        'host="acme.com\x7f"',
        "host=acme.com\xa0",
        'host="bücher.de"',
        "h\u0131st=acme.com",  # a dotless i: not a token character
        "for=1.2.3.4;" * 2000,  # longer than any real list of hops
    ],
    ids=repr,
)
def test_a_malformed_forwarded_header_is_refused_whole(header: str) -> None:
    assert parse_forwarded(header) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ACME.com", "acme.com"),
        ("acme.com.:443", "acme.com"),
        ("acme.com:", None),
        ("acme.com:x", None),
        ("acme .com", None),
        ("acme.com\t", None),
        ("[::1]", None),
        ("::1", None),
        ("\u212aacme.com", None),  # the Kelvin sign, which lower() turns into "k"
        ("", None),
        (".", None),
    ],
    ids=repr,
)
def test_hosts_are_normalised_or_refused(value: str, expected: str | None) -> None:
    assert normalise_host(value) == expected


@pytest.mark.parametrize(
    ("client_ip", "forwarded", "expected"),
    [
        # The nearest proxy (the client of the app) is trusted: its element counts.
        ("10.1.2.3", "for=203.0.113.9;host=globex.example.com", "globex"),
        ("10.1.2.3", 'for=203.0.113.9;host="GLOBEX.example.com:443";proto=https', "globex"),
        ("::ffff:10.1.2.3", "host=globex.example.com", "globex"),
        ("fd00::5", 'for="[2001:db8::1]:4711";host=globex.example.com', "globex"),
        # Two lines are one list: the proxy's element is the last one.
        ("10.1.2.3", ["host=acme.example.com", "for=203.0.113.9;host=globex.example.com"], "globex"),
        # A client's own element before the proxy's is not believed.
        ("10.1.2.3", "for=6.6.6.6;host=evil.example.com, for=203.0.113.9;host=globex.example.com", "globex"),
        # An edge proxy (10.9.9.9) in front of the nearest one: the edge saw what the client
        # asked for; the nearest proxy's host is the one the edge sent on.
        ("10.1.2.3", "for=203.0.113.9;host=globex.example.com, for=10.9.9.9;host=origin.internal", "globex"),
        ("10.1.2.3", 'for=203.0.113.9;host=globex.example.com, for="10.9.9.9:1234"', "globex"),
        # ... but only when the hop in between is trusted too.
        ("10.1.2.3", "for=6.6.6.6;host=globex.example.com, for=203.0.113.9;host=origin.internal", None),
        ("10.1.2.3", "host=globex.example.com, for=unknown", "acme"),
        ("10.1.2.3", "host=globex.example.com, for=_hidden", "acme"),
        # No host= anywhere believed: the Host header the proxy passed on counts.
        ("10.1.2.3", "for=203.0.113.9;proto=https", "acme"),
        # Not a trusted proxy: Forwarded is ignored whatever it says.
        ("11.0.0.1", "host=globex.example.com", "acme"),
        ("not-an-ip", "host=globex.example.com", "acme"),
        # Malformed, or a hostile value: no host at all.
        ("10.1.2.3", 'host="globex.example.com', None),
        ("10.1.2.3", 'host="globex.example.com, for=10.0.0.1;host=acme.example.com', None),
        ("10.1.2.3", 'host=" globex.example.com"', None),
        ("10.1.2.3", 'host="victim.globex.example.com"', None),
        ("10.1.2.3", "host=" + "x" * (1 << 20), None),
    ],
    ids=repr,
)
async def test_forwarded_host_is_read_from_trusted_proxies_only(
    build: Build, client_ip: str, forwarded: str | list[str], expected: str | None
) -> None:
    lines = [forwarded] if isinstance(forwarded, str) else forwarded
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=PROXIES,
        client_addr=(client_ip, 1),
    ) as (client, _, _):
        headers = [(b"host", b"acme.example.com"), *((b"forwarded", line.encode()) for line in lines)]
        response = await client.get("/whoami", headers=headers)
    if expected is None:
        assert (response.status_code, response.json()) == MISSING
    else:
        assert response.status_code == 200, response.text
        assert response.json()["tenant"] == expected


@pytest.mark.parametrize(
    ("forwarded", "x_forwarded_host", "expected"),
    [
        ("host=globex.example.com", "globex.example.com", "globex"),
        ("host=globex.example.com", "GLOBEX.example.com:443", "globex"),  # the same host
        ("for=203.0.113.9", "globex.example.com", "globex"),  # Forwarded names no host
        ("host=globex.example.com", "acme.example.com", AMBIGUOUS),
        ("host=globex.example.com", "evil.test, acme.example.com", AMBIGUOUS),
    ],
)
async def test_forwarded_and_x_forwarded_host_must_agree(
    build: Build, forwarded: str, x_forwarded_host: str, expected: object
) -> None:
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=PROXIES,
        client_addr=("10.0.0.1", 1),
    ) as (client, _, _):
        response = await client.get(
            "/whoami",
            headers={
                "host": "acme.example.com",
                "forwarded": forwarded,
                "x-forwarded-host": x_forwarded_host,
            },
        )
    if isinstance(expected, str):
        assert response.status_code == 200, response.text
        assert response.json()["tenant"] == expected
    else:
        assert (response.status_code, response.json()) == expected


async def test_conflicting_proxy_headers_from_an_untrusted_client_are_both_ignored(build: Build) -> None:
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=PROXIES,
        client_addr=("203.0.113.7", 1),
    ) as (client, _, _):
        response = await client.get(
            "/whoami",
            headers={
                "host": "acme.example.com",
                "forwarded": "host=globex.example.com",
                "x-forwarded-host": "sleepy.example.com",
            },
        )
    assert response.status_code == 200, response.text
    assert response.json()["tenant"] == "acme"


_HOSTILE = [b"\xa0", b"\x85", b"\x1f", b"\x0c", b"\x0b", b"\r", b"\x00", "\u3000".encode()]


@pytest.mark.parametrize("byte", _HOSTILE, ids=repr)
@pytest.mark.parametrize("where", ["before", "after", "quoted-before", "quoted-after"])
async def test_unicode_whitespace_and_control_bytes_in_forwarded_never_resolve(
    build: Build, byte: bytes, where: str
) -> None:
    host = b"globex.example.com"
    value = {
        "before": b"host=" + byte + host,
        "after": b"host=" + host + byte,
        "quoted-before": b'host="' + byte + host + b'"',
        "quoted-after": b'host="' + host + byte + b'"',
    }[where]
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=PROXIES,
        client_addr=("10.0.0.1", 1),
    ) as (client, _, _):
        response = await client.get(
            "/whoami", headers=[(b"host", b"acme.example.com"), (b"forwarded", value)]
        )
    assert (response.status_code, response.json()) == MISSING
