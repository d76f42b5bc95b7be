"""Domain resolution through a real ASGI app: custom domains from the registry, subdomains of the
suffix, central domains, and host hygiene (look-alikes never reach a tenant)."""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager
from fastapi_tenancy.domain import Domain
from fastapi_tenancy.errors import DomainNotFoundError, DomainTakenError, InvalidDomainError
from fastapi_tenancy.resolution import ChainResolver, DomainResolver, HeaderResolver
from fastapi_tenancy.storage import InMemoryTenantStore, TenantStore

from ..asgi import websocket
from .conftest import Build, accepted_as

MISSING = (400, {"detail": "Tenant identifier missing"})
NOT_FOUND = (404, {"detail": "Tenant not found"})
SUSPENDED = (403, {"detail": "Tenant is not active (status: suspended)"})
DELETED = (403, {"detail": "Tenant is not active (status: deleted)"})
SETTINGS: dict[str, Any] = {
    "resolution_strategy": "domain",
    "domain_suffix": "example.com",
    "central_domains": ["marketing.test", "admin.example.com"],
    "trusted_proxies": ["10.0.0.0/8"],
}

Served = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI, TenancyManager]]]


@pytest.fixture
def served(build: Build) -> Served:
    """The resolution app with domains: acme (acme.com primary, app.acme.com, shop.acme.example.com),
    globex (globex.org, kacme.com), sleepy (sleepy.net, suspended), gone (gone.io, deleted)."""

    @asynccontextmanager
    async def serve(**settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, TenancyManager]]:
        async with build(**{**SETTINGS, **settings}) as (client, app, manager):
            await manager.add_domain("acme", "acme.com", primary=True)
            await manager.add_domain("acme", "App.Acme.com.")
            await manager.add_domain("acme", "shop.acme.example.com")
            await manager.add_domain("globex", "globex.org")
            await manager.add_domain("globex", "kacme.com")
            await manager.add_domain("sleepy", "sleepy.net")
            await manager.add_domain("gone", "gone.io")
            yield client, app, manager

    return serve


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.com", "acme"),
        ("ACME.Com.:8443", "acme"),
        ("app.acme.com", "acme"),
        ("shop.acme.example.com", "acme"),  # registered under acme's own subdomain
        ("acme.example.com", "acme"),  # the subdomain of the suffix, as with subdomain resolution
        ("globex.example.com", "globex"),
        ("globex.org", "globex"),
        ("kacme.com", "globex"),
        ("sleepy.net", SUSPENDED),
        ("gone.io", DELETED),
        ("sleepy.example.com", SUSPENDED),
        ("www.acme.com", NOT_FOUND),  # not registered: each name is registered on its own
        ("acme.org", NOT_FOUND),
        ("acme.com.evil.test", NOT_FOUND),
        ("victim.acme.example.com", NOT_FOUND),  # deeper under a subdomain: only what is registered
        ("nobody.example.com", NOT_FOUND),
        ("marketing.test", MISSING),  # central
        ("admin.example.com", MISSING),  # central, under the suffix
        ("example.com", MISSING),  # the bare suffix
        ("www.example.com", MISSING),  # a reserved label
        ("x.www.example.com", MISSING),
        ("localhost", MISSING),  # one label: no tenant's domain
        ("127.0.0.1", MISSING),
        ("127.0.0.1:8000", MISSING),
        ("[::1]:8443", MISSING),
        ("::1", MISSING),
        ("acme.com:notaport", MISSING),
        ("acme..com", MISSING),
        ("-acme.com", MISSING),
        ("acme_corp.com", MISSING),
        ("", MISSING),
        ("a" * 300 + ".com", MISSING),
        ("acme.com" + "." * 2, MISSING),
    ],
    ids=repr,
)
async def test_the_host_names_its_tenant(served: Served, host: str, expected: object) -> None:
    async with served() as (client, _, _):
        response = await client.get("/whoami", headers=[(b"host", host.encode())])
    if isinstance(expected, str):
        assert response.status_code == 200, response.text
        assert response.json()["tenant"] == expected
    else:
        assert (response.status_code, response.json()) == expected


# Look-alikes of acme.com (and of kacme.com, globex's): Unicode confusables, compatibility
# forms that IDNA 2003 or NFKC would map onto the ASCII name, invisible characters, and the
# punycode of a look-alike. None of them may reach acme or globex, whether sent as the Host
# or by a trusted proxy.
LOOKALIKES = [
    "аcme.com",  # Cyrillic a
    "acme.cοm",  # Greek omicron
    "ａｃｍｅ.com",  # fullwidth: IDNA 2003 maps it to acme.com
    "acme。com",  # ideographic full stop: IDNA maps it to "."
    "ACME.COM".replace("M", "\u041c"),  # Cyrillic capital em
    "ac\u00adme.com",  # soft hyphen
    "acme\u200b.com",  # zero-width space
    "acme.com\u0301",  # a combining accent
    "\u212aacme.com",  # the Kelvin sign, which str.lower() turns into "k": kacme.com
    "xn--cme-5cd.com",  # the punycode of аcme.com
    "xn--acme-.com",
    "acme.com\u3002",
    "acme.com\x00",
    "acme.com\t.evil",
]


@pytest.mark.parametrize("host", LOOKALIKES, ids=repr)
@pytest.mark.parametrize("header", ["host", "forwarded", "x-forwarded-host"])
async def test_look_alikes_never_reach_a_tenant(served: Served, host: str, header: str) -> None:
    raw = host.encode()
    headers = {
        "host": [(b"host", raw)],
        "forwarded": [(b"host", b"marketing.test"), (b"forwarded", b'host="' + raw + b'"')],
        "x-forwarded-host": [(b"host", b"marketing.test"), (b"x-forwarded-host", raw)],
    }[header]
    async with served(client_addr=("10.0.0.1", 1)) as (client, _, _):
        response = await client.get("/whoami", headers=headers)
    assert response.status_code in (400, 404), response.text
    assert response.json()["detail"] in ("Tenant identifier missing", "Tenant not found")


async def test_a_trusted_proxy_names_the_custom_domain(served: Served) -> None:
    async with served(client_addr=("10.0.0.1", 1)) as (client, _, _):
        forwarded = await client.get(
            "/whoami", headers={"host": "app.internal", "forwarded": 'for=203.0.113.9;host="acme.com:443"'}
        )
        x_forwarded = await client.get(
            "/whoami", headers={"host": "app.internal", "x-forwarded-host": "globex.org"}
        )
        both = await client.get(
            "/whoami",
            headers={"host": "app.internal", "forwarded": "host=acme.com", "x-forwarded-host": "globex.org"},
        )
    assert forwarded.json()["tenant"] == "acme", forwarded.text
    assert x_forwarded.json()["tenant"] == "globex", x_forwarded.text
    assert (both.status_code, both.json()) == (400, {"detail": "Tenant identifier ambiguous"})


async def test_forwarded_headers_from_an_untrusted_client_are_ignored(served: Served) -> None:
    async with served(client_addr=("203.0.113.7", 1)) as (client, _, _):
        response = await client.get(
            "/whoami",
            headers={"host": "globex.org", "forwarded": "host=acme.com", "x-forwarded-host": "acme.com"},
        )
    assert response.json()["tenant"] == "globex", response.text


async def test_domain_changes_apply_at_once_and_a_removed_domain_names_no_one(served: Served) -> None:
    async with served() as (client, _, manager):

        async def tenant(host: str) -> object:
            response = await client.get("/whoami", headers={"host": host})
            return response.json()["tenant"] if response.status_code == 200 else response.status_code

        assert await tenant("globex.org") == "globex"
        assert await tenant("new.org") == 404  # now remembered as unknown
        await manager.add_domain("acme", "new.org")
        assert await tenant("new.org") == "acme"
        # A domain moved from globex to acme: globex gives it up, acme takes it.
        await manager.remove_domain("globex", "globex.org")
        assert await tenant("globex.org") == 404
        await manager.add_domain("acme", "globex.org")
        assert await tenant("globex.org") == "acme"
        # Suspending the tenant is seen through every domain at once.
        await manager.suspend_tenant("acme")
        assert await tenant("acme.com") == 403 and await tenant("new.org") == 403
        await manager.activate_tenant("acme")
        # A purge takes the tenant's domains along; the slug registered again has none.
        await manager.delete_tenant("acme", destroy_data=True)
        assert await tenant("acme.com") == 404
        await manager.register_tenant("acme", "Acme again")
        assert await tenant("acme.com") == 404
        assert await tenant("acme.example.com") == "acme"  # its subdomain is its own
        assert await manager.list_domains("acme") == ()


async def test_the_admin_checks_names_before_any_write(served: Served) -> None:
    async with served() as (_, _, manager):
        globex = await manager.get_tenant("globex")
        before = await manager.list_domains("globex")
        refused = [
            "acme.example.com",  # acme's subdomain
            "shop.acme.example.com",
            "login.acme.example.com",  # below acme's subdomain: it would get acme's cookies
            "admin.example.com",  # central
            "marketing.test",
            "example.com",  # the suffix
            "www.example.com",
            "x.www.example.com",
            "10.0.0.1",
            "localhost",
            "xn--cme-5cd.com",
            "аcme.com",
            "\u212aacme.com",
            " acme.net",
            "acme.net/",
            "*.acme.net",
        ]
        for name in refused:
            with pytest.raises(InvalidDomainError):
                await manager.add_domain(globex, name)
        with pytest.raises(DomainTakenError):
            await manager.add_domain("globex", "ACME.com")
        with pytest.raises(DomainNotFoundError):
            await manager.remove_domain("globex", "acme.com")
        assert await manager.list_domains("globex") == before
        # Its own subdomain and below it are globex's to add.
        assert await manager.add_domain("globex", "globex.example.com") == Domain(
            "globex.example.com", globex.id, primary=False
        )
        await manager.add_domain("globex", "eu.globex.example.com")


async def test_the_primary_domain_builds_the_tenants_urls(served: Served) -> None:
    async with served() as (_, _, manager):
        acme = await manager.get_tenant("acme")
        assert await manager.tenant_url("acme") == "https://acme.com/"
        assert await manager.tenant_url(acme, "/orders?page=2") == "https://acme.com/orders?page=2"
        assert (
            await manager.tenant_url("acme", "//evil.test/x", scheme="http") == "http://acme.com/evil.test/x"
        )
        # No primary domain: the subdomain of the suffix.
        assert await manager.tenant_url("globex", "orders") == "https://globex.example.com/orders"
        # Another primary, at once; the previous one stays as a plain domain.
        await manager.add_domain("acme", "app.acme.com", primary=True)
        assert await manager.tenant_url("acme") == "https://app.acme.com/"
        assert [(d.name, d.primary) for d in await manager.list_domains("acme")] == [
            ("app.acme.com", True),
            ("acme.com", False),
            ("shop.acme.example.com", False),
        ]
        await manager.remove_domain("acme", "app.acme.com")
        assert await manager.tenant_url("acme") == "https://acme.example.com/"
        with pytest.raises(ValueError, match="scheme"):
            await manager.tenant_url("acme", scheme="javascript")
        with pytest.raises(Exception, match="no tenant"):
            await manager.tenant_url("nobody")


async def test_without_a_suffix_a_tenant_needs_a_primary_domain_for_its_urls(build: Build) -> None:
    async with build(resolution_strategy="domain") as (client, _, manager):
        await manager.add_domain("acme", "acme.com")
        with pytest.raises(ConfigurationError, match="primary"):
            await manager.tenant_url("acme")
        await manager.add_domain("acme", "acme.com", primary=True)
        assert await manager.tenant_url("acme", "/x") == "https://acme.com/x"
        # Without a suffix every host is looked up: acme.example.com is nobody's.
        response = await client.get("/whoami", headers={"host": "acme.example.com"})
        assert (response.status_code, response.json()) == NOT_FOUND
        assert (await client.get("/whoami", headers={"host": "acme.com"})).json()["tenant"] == "acme"


async def test_websockets_resolve_by_domain(served: Served) -> None:
    async with served() as (_, app, _):
        assert accepted_as(await websocket(app, [("host", "acme.com")])) == "acme"
        refused = await websocket(app, [("host", "marketing.test")])
        assert refused == [{"type": "websocket.close", "code": 1008, "reason": "Tenant identifier missing"}]
        unknown = await websocket(app, [("host", "nobody.org")])
        assert unknown == [{"type": "websocket.close", "code": 1008, "reason": "Tenant not found"}]


async def test_anti_enumeration_answers_unknown_and_inactive_domains_alike(served: Served) -> None:
    async with served(anti_enumeration=True) as (client, _, _):
        answers = {
            host: (r.status_code, r.json(), sorted(r.headers.keys()))
            for host in ("nobody.org", "sleepy.net", "gone.io")
            for r in [await client.get("/whoami", headers={"host": host})]
        }
    assert len(set(map(str, answers.values()))) == 1, answers
    assert answers["nobody.org"][:2] == NOT_FOUND


async def test_a_domain_resolver_in_a_chain_and_by_hand() -> None:
    store = InMemoryTenantStore()
    manager = TenancyManager(
        TenancyConfig(database_url="sqlite://", resolution_strategy="custom"),
        store,
        resolver=ChainResolver([HeaderResolver(), DomainResolver(central_domains=["example.com"])]),
    )
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme")
        await manager.add_domain("acme", "acme.com")
        # The manager gave the chain's member its registry cache.
        resolver = manager.resolver
        assert isinstance(resolver, ChainResolver)
        domains = resolver.resolvers[1]
        assert isinstance(domains, DomainResolver) and domains.lookup is manager.lookup
    finally:
        await manager.close()
    with pytest.raises(ConfigurationError, match="registry cache"):
        await DomainResolver().resolve(_connection("acme.com"))


async def test_a_store_without_domains_is_refused_at_construction() -> None:
    class Plain(InMemoryTenantStore):
        keeps_domains = False

    with pytest.raises(ConfigurationError, match="keeps custom domains"):
        TenancyManager(TenancyConfig(database_url="sqlite://", resolution_strategy="domain"), Plain())
    # Other strategies run on it as before.
    store: TenantStore = Plain()
    TenancyManager(TenancyConfig(database_url="sqlite://"), store)


def _connection(host: str) -> Any:
    from starlette.requests import HTTPConnection

    return HTTPConnection({"type": "http", "headers": [(b"host", host.encode())], "client": ("1.2.3.4", 1)})
