"""The verified token's claims in routes (`TokenClaims`): read from the request the JWT strategy
verified, never decoded twice, never another request's, never for a tenant the token did not name."""

import asyncio
import time
from typing import Any

import jwt
import pytest
from starlette.requests import HTTPConnection

from fastapi_tenancy import TenancyConfig
from fastapi_tenancy.resolution import Resolver
from fastapi_tenancy.resolution.claims import remember_token, verified_token

from .conftest import Build

SECRET = "claims-secret-" * 3
JWT: dict[str, Any] = {"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"], "jwt_secret": SECRET}
JWT_THEN_HEADER: dict[str, Any] = {
    **JWT,
    "resolution_strategy": "chain",
    "resolution_chain": ["jwt", "header"],
}
NOT_AUTHENTICATED = (401, {"detail": "Not authenticated"})
MISMATCH = (403, {"detail": "Tenant mismatch"})


def token(**claims: Any) -> str:
    payload = {"sub": "alice", "tenant": "acme", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_routes_read_the_claims_the_resolver_verified_without_decoding_again(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = token(role="admin")
    expected = jwt.decode(sent, SECRET, algorithms=["HS256"])
    decoded: list[str] = []
    real_decode = jwt.decode

    def counting_decode(encoded: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(encoded)
        return real_decode(encoded, *args, **kwargs)

    # The resolver calls `jwt.decode` through the module: every decode passes here.
    monkeypatch.setattr(jwt, "decode", counting_decode)
    async with build(**JWT) as (client, _, _):
        response = await client.get("/claims", headers=bearer(sent))
    assert response.status_code == 200, response.text
    assert response.json() == expected
    assert response.json()["role"] == "admin"
    assert decoded == [sent]  # once, by the resolver


async def test_concurrent_requests_each_see_their_own_claims(build: Build) -> None:
    async with build(**JWT) as (client, _, _):
        users = [(f"user-{n}", "acme" if n % 2 else "globex") for n in range(40)]
        responses = await asyncio.gather(
            *(client.get("/claims", headers=bearer(token(sub=sub, tenant=tenant))) for sub, tenant in users)
        )
    assert [(r.json()["sub"], r.json()["tenant"]) for r in responses] == users


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Tenant-ID": "acme"}, NOT_AUTHENTICATED),  # the header named the tenant: no token at all
        # A valid token that names no tenant: the header chose it, so the token was not issued for it.
        ({"X-Tenant-ID": "acme", "Authorization": "Bearer @no-tenant"}, MISMATCH),
        ({"X-Tenant-ID": "globex", "Authorization": "Bearer @acme"}, (200, "acme")),  # the token wins
    ],
)
async def test_a_tenant_named_by_another_member_of_a_chain_has_no_claims(
    build: Build, headers: dict[str, str], expected: tuple[int, object]
) -> None:
    if headers.get("Authorization") == "Bearer @no-tenant":
        headers = {**headers, **bearer(token(tenant=None))}
    elif headers.get("Authorization") == "Bearer @acme":
        headers = {**headers, **bearer(token())}
    async with build(**JWT_THEN_HEADER) as (client, _, _):
        whoami = await client.get("/whoami", headers=headers)
        response = await client.get("/claims", headers=headers)
    assert whoami.status_code == 200, whoami.text  # the request itself is served
    body = response.json()
    assert (response.status_code, body["tenant"] if response.status_code == 200 else body) == expected
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == "Bearer"


async def test_an_excluded_path_has_no_claims_even_with_a_valid_token(build: Build) -> None:
    async with build(**JWT) as (client, _, _):
        response = await client.get("/health/claims", headers=bearer(token()))
    assert (response.status_code, response.json()) == NOT_AUTHENTICATED


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Bearer {token}\x00")],
        [("authorization", "Bearer {token}\x1f")],
        [("authorization", "Bearer \x00{token}")],
        [("authorization", "Bearer {token}"), ("authorization", "Bearer {other}")],
    ],
    ids=["nul after", "unit separator after", "nul before", "two Authorization headers"],
)
async def test_hostile_authorization_headers_never_reach_a_route(
    build: Build, headers: list[tuple[str, str]]
) -> None:
    sent = [
        (name.encode(), value.format(token=token(), other=token(tenant="globex")).encode("latin-1"))
        for name, value in headers
    ]
    async with build(**JWT) as (client, _, _):
        for path in ("/claims", "/whoami"):
            response = await client.get(path, headers=sent)
            assert (response.status_code, response.json()) == (401, {"detail": "Invalid token"}), path
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_a_custom_resolver_may_keep_the_claims_it_verified(build: Build) -> None:
    class ApiKeys(Resolver):
        """A stand-in for a resolver that verifies credentials of its own."""

        async def resolve(self, connection: HTTPConnection) -> str | None:
            key = connection.headers.get("x-api-key")
            if key != "key-of-globex":
                return None
            remember_token(connection.scope, "globex", {"sub": "integration", "scope": "read"})
            return "globex"

    config = TenancyConfig(database_url="sqlite://", resolution_strategy="custom")
    async with build(config, resolver=ApiKeys()) as (client, _, _):
        response = await client.get("/claims", headers={"x-api-key": "key-of-globex"})
        assert response.json() == {"sub": "integration", "scope": "read"}
        assert (await client.get("/claims")).status_code == 400  # no tenant named at all


def test_only_a_verified_token_counts() -> None:
    # State handed to every request by the app's lifespan cannot pass for a verified token.
    assert verified_token({"state": {"fastapi_tenancy.token": ("acme", {"sub": "x"})}}) is None
    assert verified_token({}) is None
