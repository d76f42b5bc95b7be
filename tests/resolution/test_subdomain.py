"""Subdomain resolution through a real ASGI app: the label before the suffix, nothing else."""

import pytest

from fastapi_tenancy.resolution import SubdomainResolver

from ..asgi import websocket
from .conftest import Build, accepted_as

MISSING = (400, {"detail": "Tenant identifier missing"})
NOT_FOUND = (404, {"detail": "Tenant not found"})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.example.com", "acme"),
        ("ACME.Example.COM:8443", "acme"),
        ("acme.example.com.", "acme"),
        ("acme.example.com.:443", "acme"),
        ("globex.example.com", "globex"),
        ("victim.acme.example.com", MISSING),
        ("a.b.c.example.com", MISSING),
        ("example.com", MISSING),
        (".example.com", MISSING),
        ("www.example.com", MISSING),
        ("WWW.example.com", MISSING),
        ("acme.example.org", MISSING),
        ("acmeexample.com", MISSING),
        ("acme.example.com.evil.test", MISSING),
        ("127.0.0.1", MISSING),
        ("127.0.0.1:8000", MISSING),
        ("[::1]", MISSING),
        ("[::1]:8443", MISSING),
        ("::1", MISSING),
        ("acme.example.com:notaport", MISSING),
        ("acme .example.com", MISSING),  # whitespace inside: no host (it was looked up as "acme ")
        ("xn--bcher-kva.example.com", MISSING),
        ("xn--80ak6aa92e.example.com", MISSING),
        ("bücher.example.com", MISSING),
        ("", MISSING),
        ("a" * (1 << 20) + ".example.com", MISSING),
        ("unknown-co.example.com", NOT_FOUND),
        ("acme_corp.example.com", NOT_FOUND),
        ("-acme.example.com", NOT_FOUND),
        ("sleepy.example.com", (403, {"detail": "Tenant is not active (status: suspended)"})),
        ("gone.example.com", (403, {"detail": "Tenant is not active (status: deleted)"})),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, str) else None,
)
async def test_host_names_the_label_before_the_suffix(build: Build, host: str, expected: object) -> None:
    async with build(resolution_strategy="subdomain", domain_suffix="example.com") as (client, _, _):
        # Raw bytes, as a hostile client would send them (UTF-8 and all).
        response = await client.get("/whoami", headers=[(b"host", host.encode())])
    if isinstance(expected, str):
        assert response.status_code == 200, response.text
        assert response.json()["tenant"] == expected
    else:
        assert (response.status_code, response.json()) == expected


async def test_x_forwarded_host_from_an_untrusted_client_is_ignored(build: Build) -> None:
    settings = {"resolution_strategy": "subdomain", "domain_suffix": "example.com"}
    # No trusted proxies configured: the spoofed header is ignored.
    async with build(**settings) as (client, _, _):
        spoofed = await client.get(
            "/whoami", headers={"host": "acme.example.com", "x-forwarded-host": "globex.example.com"}
        )
        assert spoofed.json()["tenant"] == "acme"
        no_host = await client.get(
            "/whoami", headers={"host": "example.com", "x-forwarded-host": "globex.example.com"}
        )
        assert (no_host.status_code, no_host.json()) == MISSING
    # Proxies configured, but this client is not one of them.
    async with build(**settings, trusted_proxies=["10.0.0.0/8"], client_addr=("203.0.113.7", 1)) as (
        client,
        _,
        _,
    ):
        spoofed = await client.get(
            "/whoami", headers={"host": "acme.example.com", "x-forwarded-host": "globex.example.com"}
        )
        assert spoofed.json()["tenant"] == "acme"


@pytest.mark.parametrize(
    ("client_ip", "forwarded", "expected"),
    [
        ("10.1.2.3", "globex.example.com", "globex"),
        ("10.1.2.3", "GLOBEX.example.com:443", "globex"),
        ("::ffff:10.1.2.3", "globex.example.com", "globex"),
        ("fd00::5", "globex.example.com", "globex"),
        ("10.1.2.3", "evil.test, globex.example.com", "globex"),  # the nearest proxy's entry is last
        ("10.1.2.3", "globex.example.com, evil.test", None),
        ("10.1.2.3", "victim.globex.example.com", None),
        ("10.1.2.3", "x" * (1 << 20), None),
        ("11.0.0.1", "globex.example.com", "acme"),
        ("not-an-ip", "globex.example.com", "acme"),
    ],
)
async def test_x_forwarded_host_is_read_from_trusted_proxies_only(
    build: Build, client_ip: str, forwarded: str, expected: str | None
) -> None:
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=["10.0.0.0/8", "fd00::/8"],
        client_addr=(client_ip, 1),
    ) as (client, _, _):
        response = await client.get(
            "/whoami", headers={"host": "acme.example.com", "x-forwarded-host": forwarded}
        )
    if expected is None:
        assert (response.status_code, response.json()) == MISSING
    else:
        assert response.json()["tenant"] == expected, response.text


async def test_two_different_host_headers_name_no_tenant(build: Build) -> None:
    async with build(resolution_strategy="subdomain", domain_suffix="example.com") as (client, _, _):
        response = await client.get(
            "/whoami", headers=[("host", "acme.example.com"), ("host", "globex.example.com")]
        )
    assert (response.status_code, response.json()) == MISSING


async def test_reserved_labels_are_configurable(build: Build) -> None:
    async with build(
        resolution_strategy="subdomain", domain_suffix="example.com", reserved_subdomains=["API", "www"]
    ) as (client, _, _):
        for host in ("api.example.com", "www.example.com"):
            response = await client.get("/whoami", headers={"host": host})
            assert (response.status_code, response.json()) == MISSING
        assert (await client.get("/whoami", headers={"host": "acme.example.com"})).json()["tenant"] == "acme"


async def test_a_deeper_suffix_serves_its_own_label(build: Build) -> None:
    async with build(resolution_strategy="subdomain", domain_suffix="apps.example.com") as (client, _, _):
        assert (await client.get("/whoami", headers={"host": "acme.apps.example.com"})).json()[
            "tenant"
        ] == "acme"
        response = await client.get("/whoami", headers={"host": "acme.example.com"})
        assert (response.status_code, response.json()) == MISSING


async def test_websockets_resolve_by_subdomain(build: Build) -> None:
    async with build(resolution_strategy="subdomain", domain_suffix="example.com") as (_, app, _):
        assert accepted_as(await websocket(app, [("host", "acme.example.com")])) == "acme"
        refused = await websocket(app, [("host", "victim.acme.example.com")])
        assert refused == [{"type": "websocket.close", "code": 1008, "reason": "Tenant identifier missing"}]
        spoofed = await websocket(
            app, [("host", "acme.example.com"), ("x-forwarded-host", "globex.example.com")]
        )
        assert accepted_as(spoofed) == "acme"


def test_the_resolver_can_be_used_directly() -> None:
    resolver = SubdomainResolver("Example.com.", reserved=["www"], trusted_proxies=["192.168.0.0/16"])
    assert resolver.label("acme.example.com") == "acme"
    assert resolver.label("www.example.com") is None
    with pytest.raises(ValueError):
        SubdomainResolver("")
    with pytest.raises(ValueError):
        SubdomainResolver("10.0.0.1")
    with pytest.raises(ValueError):
        SubdomainResolver("example.com", trusted_proxies=["not-a-network"])


_HOSTILE_HOSTS = [
    b"acme.example.com\xa0",
    b"\x85acme.example.com",
    b"acme.example.com\x1f",
    b"acme.example.com\x0c",
    b"\x0bacme.example.com",
    b"acme.example.com\r",
    b"acme\x00.example.com",
]


@pytest.mark.parametrize("host", _HOSTILE_HOSTS, ids=repr)
@pytest.mark.parametrize("header", ["host", "x-forwarded-host"])
async def test_only_space_and_tab_are_trimmed_from_a_host(build: Build, host: bytes, header: str) -> None:
    # Unicode whitespace and control bytes around (or in) the host never resolve to acme:
    # only HTTP's optional whitespace is trimmed.
    async with build(
        resolution_strategy="subdomain",
        domain_suffix="example.com",
        trusted_proxies=["10.0.0.0/8"],
        client_addr=("10.0.0.1", 1),
    ) as (client, _, _):
        headers = (
            [(b"host", host)] if header == "host" else [(b"host", b"x.test"), (b"x-forwarded-host", host)]
        )
        response = await client.get("/whoami", headers=headers)
        trimmed = await client.get("/whoami", headers=[(b"host", b" \tacme.example.com\t ")])
    assert (response.status_code, response.json()) == MISSING
    assert trimmed.status_code == 200 and trimmed.json()["tenant"] == "acme", trimmed.text
