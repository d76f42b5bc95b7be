"""Chains: first answer wins, or every source must agree (403 when they do not)."""

import time
from typing import Any

import jwt
import pytest
from starlette.requests import HTTPConnection

from fastapi_tenancy import TenancyConfig
from fastapi_tenancy.resolution import ChainResolver, HeaderResolver, SubdomainResolver

from ..asgi import websocket
from .conftest import Build, accepted_as

SECRET = "chain-secret-" * 4
JWT_SETTINGS: dict[str, Any] = {
    "jwt_algorithms": ["HS256"],
    "jwt_secret": SECRET,
    "domain_suffix": "example.com",
}
MISSING = (400, {"detail": "Tenant identifier missing"})
MISMATCH = (403, {"detail": "Tenant mismatch"})
NOT_AUTHENTICATED = (401, {"detail": "Not authenticated"})


def bearer(tenant: str) -> dict[str, str]:
    """Marks a token to be made in the test: made at collection it could expire first."""
    return {"Authorization": f"Bearer @{tenant}"}


def _signed(headers: dict[str, str]) -> dict[str, str]:
    value = headers.get("Authorization", "")
    if not value.startswith("Bearer @"):
        return headers
    claims = {"tenant": value.removeprefix("Bearer @"), "exp": int(time.time()) + 60}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize(
    ("host", "headers", "expected"),
    [
        ("acme.example.com", bearer("globex"), "globex"),  # the token answers first
        ("acme.example.com", {}, "acme"),  # no token: the subdomain
        ("example.com", bearer("globex"), "globex"),
        ("example.com", {}, MISSING),
        ("acme.example.com", {"Authorization": "Bearer forged"}, (401, {"detail": "Invalid token"})),
    ],
)
async def test_first_answer_wins(build: Build, host: str, headers: dict[str, str], expected: object) -> None:
    settings = {"resolution_strategy": "chain", "resolution_chain": ["jwt", "subdomain"], **JWT_SETTINGS}
    headers = _signed(headers)
    async with build(**settings) as (client, _, _):
        response = await client.get("/whoami", headers={"host": host, **headers})
    actual = (
        response.json()["tenant"] if response.status_code == 200 else (response.status_code, response.json())
    )
    assert actual == expected


@pytest.mark.parametrize(
    ("host", "headers", "expected"),
    [
        ("acme.example.com", bearer("acme"), "acme"),
        ("acme.example.com", bearer("globex"), MISMATCH),
        ("globex.example.com", bearer("acme"), MISMATCH),
        ("victim.acme.example.com", bearer("acme"), MISSING),
        ("acme.example.com", {}, NOT_AUTHENTICATED),  # every member must answer: the token too
        ("example.com", bearer("acme"), MISSING),
        # A mismatch is refused before any lookup: it says nothing about which tenants exist.
        ("unknown-a.example.com", bearer("unknown-b"), MISMATCH),
        ("acme.example.com", {"Authorization": "Bearer forged"}, (401, {"detail": "Invalid token"})),
    ],
)
async def test_agree_mode_refuses_a_token_for_another_subdomain(
    build: Build, host: str, headers: dict[str, str], expected: object
) -> None:
    settings = {
        "resolution_strategy": "chain",
        "resolution_chain": ["jwt", "subdomain"],
        "resolution_chain_mode": "agree",
        **JWT_SETTINGS,
    }
    headers = _signed(headers)
    async with build(**settings) as (client, app, _):
        response = await client.get("/whoami", headers={"host": host, **headers})
        actual = (
            response.json()["tenant"]
            if response.status_code == 200
            else (response.status_code, response.json())
        )
        assert actual == expected
        ws = await websocket(app, [("host", host), *headers.items()])
        assert accepted_as(ws) == (expected if isinstance(expected, str) else None)


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (["jwt", "subdomain"], MISSING),  # the subdomain had the last word
        (["subdomain", "jwt"], NOT_AUTHENTICATED),  # the token had it: nothing to fall through to
    ],
)
async def test_a_request_without_a_token_is_a_401_only_where_the_chain_ends_at_the_token(
    build: Build, chain: list[str], expected: tuple[int, object]
) -> None:
    async with build(resolution_strategy="chain", resolution_chain=chain, **JWT_SETTINGS) as (client, _, _):
        response = await client.get("/whoami", headers={"host": "example.com"})
        assert (response.status_code, response.json()) == expected
        assert response.headers.get("www-authenticate") == ("Bearer" if expected[0] == 401 else None)
        # A token still wins wherever the chain reaches it.
        signed = _signed(bearer("globex"))
        assert (await client.get("/whoami", headers={"host": "example.com", **signed})).json()[
            "tenant"
        ] == "globex"


async def test_a_path_member_still_strips_its_segment(build: Build) -> None:
    settings = {
        "resolution_strategy": "chain",
        "resolution_chain": ["path", "header"],
        "resolution_chain_mode": "agree",
    }
    async with build(**settings) as (client, _, _):
        ok = await client.get("/t/acme/whoami", headers={"X-Tenant-ID": "acme"})
        assert ok.json()["url_for"] == "http://app.test/t/acme/whoami"
        other = await client.get("/t/acme/whoami", headers={"X-Tenant-ID": "globex"})
        assert (other.status_code, other.json()) == MISMATCH


async def test_chains_of_objects_and_callables(build: Build) -> None:
    async def from_query(connection: HTTPConnection) -> str | None:
        return connection.query_params.get("tenant")

    chain = ChainResolver([HeaderResolver(), from_query, SubdomainResolver("example.com")])
    config = TenancyConfig(database_url="sqlite://", resolution_strategy="custom")
    async with build(config, resolver=chain) as (client, _, _):
        assert (await client.get("/whoami?tenant=globex", headers={"host": "acme.example.com"})).json()[
            "tenant"
        ] == "globex"
        assert (await client.get("/whoami", headers={"host": "acme.example.com"})).json()["tenant"] == "acme"


def test_invalid_chains() -> None:
    with pytest.raises(ValueError):
        ChainResolver([])
    with pytest.raises(ValueError):
        ChainResolver([HeaderResolver()], mode="any")  # type: ignore[arg-type]
