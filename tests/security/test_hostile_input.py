"""Hostile input: fuzzed identifiers, tenant headers, hosts and paths (Hypothesis), and
Schemathesis against the Quick Start app's OpenAPI. Never a 500, never a wrong tenant;
identifiers built to collide with a tenant's after some normalisation are refused."""

import asyncio
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection
from starlette.types import Message

from fastapi_tenancy import InvalidIdentifierError
from fastapi_tenancy.isolation import storage_name
from fastapi_tenancy.resolution import DomainResolver
from fastapi_tenancy.resolution.base import Resolver, ResolverFunc
from fastapi_tenancy.tenant import validate_identifier

from ..apps import Base
from ..isolation.test_matrix import ROWS, Env, two_tenants
from .sync import fresh_database, new_runner

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXPECTED = {tenant: sorted(rows.values()) for tenant, rows in ROWS.items()}
MARKERS = ("alpha-", "beta-")
BACKENDS = ["postgres", "sqlite"]

# -- identifiers -------------------------------------------------------------------

SLUG = st.from_regex(re.compile(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?"), fullmatch=True)
NASTY = st.sampled_from(
    ["'", '"', ";", "--", "$$", "\x00", " ", "\t", "\n", "\u00a0", "\u200b", "\u0085", "/", "..", ":", "*",
     "public", "information_schema", "pg_", "DROP", "é", "ß", "İ", "\U0001f600", "a" * 64, "ａ"]
)  # fmt: skip
IDENTIFIERS = st.one_of(st.text(max_size=80), SLUG, st.lists(st.one_of(SLUG, NASTY), max_size=5).map("".join))

# Letters that look like (or normalise to) ASCII ones: Cyrillic, Greek, fullwidth, ligatures.
LOOKALIKES = {
    "a": "аɑａ",
    "c": "сϲｃ",
    "e": "еℯｅ",
    "i": "іıｉ",
    "o": "оοｏ",
    "p": "рρ",
    "1": "１𝟏",
    "-": "‐‑–_",
}


def _collisions(slug: str) -> list[str]:
    """Strings a careless normaliser (case, '-'/'_', NFKC, lookalikes, whitespace) maps to `slug`."""
    variants = {slug.upper(), slug.title(), slug.replace("-", "_"), slug + " ", " " + slug, slug + "\t"}
    variants |= {slug + "\u00a0", slug + "\u200b", slug + ".", unicodedata.normalize("NFKD", slug)}
    for i, char in enumerate(slug):
        for lookalike in LOOKALIKES.get(char, ""):
            variants.add(slug[:i] + lookalike + slug[i + 1 :])
    return sorted(variants - {slug})


@given(identifier=IDENTIFIERS)
@FUZZ
def test_an_identifier_is_refused_or_gets_a_valid_unique_storage_name(identifier: str) -> None:
    try:
        name = storage_name("tenant_", identifier)
    except InvalidIdentifierError:
        return
    assert validate_identifier(identifier) == identifier
    assert re.fullmatch(r"tenant_[a-z0-9_]{1,56}", name), name
    assert len(name.encode()) <= 63, "PostgreSQL would truncate it"
    assert name.replace("_", "-").removeprefix("tenant-") == identifier, "the mapping is invertible"


@given(first=IDENTIFIERS | SLUG, second=IDENTIFIERS | SLUG)
@FUZZ
def test_two_accepted_identifiers_never_share_storage(first: str, second: str) -> None:
    try:
        names = storage_name("tenant_", first), storage_name("tenant_", second)
    except InvalidIdentifierError:
        return
    assert (names[0] == names[1]) == (first == second)


@given(slug=SLUG)
@FUZZ
def test_identifiers_built_to_collide_after_normalisation_are_refused(slug: str) -> None:
    for variant in _collisions(slug):
        with pytest.raises(InvalidIdentifierError):
            storage_name("tenant_", variant)


# -- requests ----------------------------------------------------------------------


@contextmanager
def hostile_env(
    backend: str, resolver: Resolver | ResolverFunc | None = None
) -> Iterator[tuple[asyncio.Runner, Env]]:
    """Tenants alpha and beta (overlapping ids) behind the test app, on a loop of our own."""
    settings: dict[str, Any] = {"resolution_strategy": "custom"} if resolver is not None else {}
    with new_runner() as runner, fresh_database(runner, backend) as url:
        context = two_tenants(url, resolver=resolver, **settings)
        env = runner.run(context.__aenter__())
        try:
            yield runner, env
        finally:
            runner.run(context.__aexit__(None, None, None))


def _check(response: httpx.Response, tenant: str | None) -> None:
    """`tenant`'s rows and nothing else, or (tenant None) a clean refusal without rows."""
    assert response.status_code < 500, response.text
    if tenant is None:
        assert response.status_code in (400, 404), response.text
        assert not any(marker in response.text for marker in MARKERS), response.text
        return
    assert response.status_code == 200, response.text
    assert sorted(o["description"] for o in response.json()["orders"]) == EXPECTED[tenant]


HEADER_VALUES = st.one_of(
    st.binary(max_size=100),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"alpha", b"beta", b"ALPHA", b"alpha\x00", b"\xa0alpha", b"alpha\x85", b"alpha\x1c"]),
    st.tuples(
        st.sampled_from([b"alpha", b"beta"]), st.sampled_from([b" ", b"\t", b"\r", b"\x0b", b"\xa0"])
    ).map(lambda pair: pair[0] + pair[1]),
    st.integers(min_value=10_000, max_value=200_000).map(lambda n: b"a" * n),  # huge
)


def _header_oracle(values: list[bytes]) -> tuple[int, str | None]:
    """What the header resolver must do: (400 or 404, None), or (200, the tenant)."""
    if not values:
        return 400, None
    if len(set(values)) > 1:
        return 400, None  # sent twice, differently: ambiguous
    value = values[0].decode("latin-1").strip(" \t")  # HTTP's optional whitespace only
    if not value:
        return 400, None
    return (200, value) if value in ROWS else (404, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzzed_tenant_headers_never_fail_and_never_pick_a_wrong_tenant(backend: str) -> None:
    with hostile_env(backend) as (runner, env):

        @given(values=st.lists(HEADER_VALUES, max_size=3), path=st.sampled_from(["/orders", "/raw"]))
        @FUZZ
        def probe(values: list[bytes], path: str) -> None:
            status, tenant = _header_oracle(values)
            headers = [(b"x-tenant-id", value) for value in values]
            response = runner.run(env.client.get(path, headers=headers))
            assert response.status_code == status, (values, response.text)
            _check(response, tenant)

        probe()


async def _first_host_label(connection: HTTPConnection) -> str | None:
    """A custom resolver as users write them: the tenant is the first label of the Host."""
    host = connection.headers.get("host", "")
    return host.split(":")[0].split(".")[0] or None


HOSTS = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda label, rest: label + rest,
        st.sampled_from(
            ["alpha", "beta", "ALPHA", "Alpha", "аlpha", "xn--lpha-2ve", "alpha_", "www", "127", ""]
        ),
        st.sampled_from([".example.com", ".example.com.", ":8080", "", ".", "..", "%2e", "\x00", " "]),
    ),
    st.sampled_from(["127.0.0.1", "[::1]:80", "::1", "localhost", "example.com"]),
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzzed_hosts_through_a_custom_resolver_never_pick_a_wrong_tenant(backend: str) -> None:
    with hostile_env(backend, resolver=_first_host_label) as (runner, env):

        @given(host=HOSTS)
        @FUZZ
        def probe(host: str) -> None:
            label = host.split(":")[0].split(".")[0]
            raw = host.encode("utf-8")
            response = runner.run(env.client.get("/orders", headers=[(b"host", raw)]))
            _check(response, label if label in ROWS else None)

        probe()


# Custom domains: alpha has alpha.com and shop.alpha.com, beta beta.org and kalpha.com (what
# str.lower() makes of "\u212aalpha.com", with a Kelvin sign); both have their subdomains.
DOMAINS = {"alpha.com": "alpha", "shop.alpha.com": "alpha", "beta.org": "beta", "kalpha.com": "beta"}


def _mutations(name: str) -> st.SearchStrategy[str]:
    """`name` as a hostile client or proxy might spell it: case, look-alikes, odd characters."""
    lookalike = st.sampled_from(
        [
            name[:i] + other + name[i + 1 :]
            for i, char in enumerate(name)
            for other in LOOKALIKES.get(char, "")
        ]
        or [name]
    )
    inserted = st.tuples(
        st.integers(min_value=0, max_value=len(name)),
        st.sampled_from(
            ["\x00", "\t", " ", "\xa0", "\u200b", "\u00ad", "\u3002", "\u0301", ".", "-", "_", "\u212a"]
        ),
    ).map(lambda pair: name[: pair[0]] + pair[1] + name[pair[0] :])
    suffix = st.sampled_from(["", ".", ":443", ".:8080", ":", ":x", "..", " ", "\t", "\r"]).map(
        lambda s: name + s
    )
    return st.one_of(st.just(name), st.just(name.upper()), lookalike, inserted, suffix)


DOMAIN_HOSTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from([*DOMAINS, "alpha.example.com", "beta.example.com", "www.example.com"]).flatmap(
        _mutations
    ),
    st.sampled_from(
        ["\u212aalpha.com", "xn--lpha-2ve.com", "ａｌｐｈａ.com", "[::1]", "10.0.0.1", "example.com"]
    ),
)


def _domain_oracle(raw: bytes) -> str | None:
    """The tenant the host names, by the rules of docs/resolution.md (Custom domains), or None."""
    host = raw.decode("latin-1").strip(" \t")  # HTTP's optional whitespace only
    if not host.isascii() or not host.isprintable() or " " in host or host.startswith("["):
        return None
    name, colon, port = host.rpartition(":")
    if colon:
        if not port.isdigit() or ":" in name:
            return None
        host = name
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host
    label = host.removesuffix(".example.com")
    if label != host and "." not in label:
        return label if label in ROWS else None  # a subdomain: that tenant, or a 404
    return DOMAINS.get(host)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzzed_hosts_through_domain_resolution_never_pick_a_wrong_tenant(backend: str) -> None:
    with hostile_env(backend, resolver=DomainResolver(domain_suffix="example.com")) as (runner, env):
        for name, tenant in DOMAINS.items():
            runner.run(env.manager.add_domain(tenant, name))

        @given(host=DOMAIN_HOSTS)
        @FUZZ
        def probe(host: str) -> None:
            raw = host.encode("utf-8")
            response = runner.run(env.client.get("/orders", headers=[(b"host", raw)]))
            _check(response, _domain_oracle(raw))

        probe()


PATHS = st.one_of(
    st.text(max_size=60).map(lambda t: "/" + t),
    st.sampled_from(
        [
            "/health/../orders",
            "/health/%2e%2e/orders",
            "//orders",
            "/orders/",
            "/ORDERS",
            "/orders/1%00",
            "/health;/orders",
            "/docs/../orders",
            "/openapi.json/../orders",
            "/orders/99999999999999999999",
        ]
    ),  # fmt: skip
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzzed_paths_never_fail_and_never_leak(backend: str) -> None:
    with hostile_env(backend) as (runner, env):

        @given(path=PATHS, tenant=st.sampled_from([None, "alpha", "beta"]))
        @FUZZ
        def probe(path: str, tenant: str | None) -> None:
            headers = {"X-Tenant-ID": tenant} if tenant else {}
            response = runner.run(_raw_request(env, path, headers))
            assert response.status_code < 500, (path, response.text)
            others = [m for m in MARKERS if tenant is None or not m.startswith(tenant)]
            assert not any(marker in response.text for marker in others), (path, tenant, response.text)

        probe()


async def _raw_request(env: Env, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET `path` exactly as given, straight through ASGI (an HTTP client would normalise it)."""
    app = env.client._transport.app  # type: ignore[attr-defined]
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": quote(path, safe="/%;").encode("ascii", "replace"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    try:
        await app(scope, receive, send)
    except Exception as exc:  # what a server would turn into a 500
        return httpx.Response(500, text=repr(exc))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return httpx.Response(sent[0]["status"], content=body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registering_a_lookalike_of_a_tenant_is_refused_before_anything_is_written(backend: str) -> None:
    with hostile_env(backend) as (runner, env):
        for variant in _collisions("alpha") + _collisions("beta"):
            with pytest.raises(InvalidIdentifierError):
                runner.run(env.manager.register_tenant(variant, variant, app_metadata=Base.metadata))
            response = runner.run(env.client.get("/orders", headers=[(b"x-tenant-id", variant.encode())]))
            # Space and tab around a header value are not part of it (RFC 9110): the same tenant.
            _check(response, variant.strip(" \t") if variant.strip(" \t") in ROWS else None)
        assert runner.run(env.manager.store.count()) == 2
