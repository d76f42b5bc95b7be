"""JWT resolution: verified tokens only; every token problem is a 401 that never echoes it."""

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fastapi_tenancy import ConfigurationError, InvalidTokenError, TenancyConfig, TenancyUnavailableError
from fastapi_tenancy.resolution.jwt import JWKSKeys, JWTResolver

from ..asgi import websocket
from .conftest import Build, accepted_as

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = "s3cret-" * 6  # 42 bytes: enough for HS256


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "tenant": "acme", "exp": int(time.time()) + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rs256(payload: dict[str, Any], key: rsa.RSAPrivateKey = RSA_KEY, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def hs256_with(secret: bytes, payload: dict[str, Any]) -> str:
    """HS256 signed with `secret`: by hand, since PyJWT refuses a PEM key as an HMAC secret."""
    signing_input = (
        f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(payload).encode())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


RS_SETTINGS: dict[str, Any] = {
    "resolution_strategy": "jwt",
    "jwt_algorithms": ["RS256"],
    "jwt_public_key": pem(RSA_KEY),
}
INVALID = {"detail": "Invalid token"}
NOT_AUTHENTICATED = {"detail": "Not authenticated"}
BEARER_ERROR = 'Bearer error="invalid_token"'


# Made in the test, not at collection: a token made early could expire before its test
# runs and be refused for the wrong reason.
HOSTILE_TOKENS: dict[str, Callable[[], str]] = {
    "alg none": lambda: unsigned(claims()),
    "alg None": lambda: unsigned(claims(), alg="None"),
    "alg none, stolen signature": lambda: unsigned(claims()) + rs256(claims()).rpartition(".")[2],
    "HS256 signed with the RS public key": lambda: hs256_with(pem(RSA_KEY).encode(), claims()),
    "signed by another key": lambda: rs256(claims(), OTHER_RSA_KEY),
    "ES256 (not allowed)": lambda: jwt.encode(claims(), EC_KEY, algorithm="ES256"),
    "without exp": lambda: rs256(claims(exp=None)),
    "exp not a number": lambda: rs256(claims(exp="tomorrow")),
    "not yet valid": lambda: rs256(claims(nbf=int(time.time()) + 600)),
    "audience not configured but present": lambda: rs256(claims(aud="someone-else")),
    "tenant claim not a string": lambda: rs256(claims(tenant=["acme", "globex"])),
    "tampered payload": lambda: _tamper(rs256(claims())),
    "garbage": lambda: "not-a-token",
    "garbage with dots": lambda: "a.b.c",
    "binary garbage": lambda: "\u00ff\u00fe.\u00fd.\u00fc",
    "empty segments": lambda: "..",
    "huge": lambda: "a" * (1 << 20),
}


def _tamper(token: str) -> str:
    header, _, rest = token.partition(".")
    _, _, signature = rest.partition(".")
    return f"{header}.{_b64(json.dumps(claims(tenant='globex')).encode())}.{signature}"


@pytest.mark.parametrize("case", HOSTILE_TOKENS)
async def test_hostile_tokens_are_a_401_that_never_echoes_the_token(build: Build, case: str) -> None:
    token = HOSTILE_TOKENS[case]()
    async with build(**RS_SETTINGS) as (client, _, _):
        response = await client.get(
            "/whoami", headers=[(b"authorization", b"Bearer " + token.encode("latin-1"))]
        )
    assert (response.status_code, response.json()) == (401, INVALID), case
    assert response.headers["www-authenticate"] == BEARER_ERROR
    assert token[:20] not in response.text


async def test_expired_tokens_say_so(build: Build) -> None:
    async with build(**RS_SETTINGS) as (client, _, _):
        token = rs256(claims(exp=int(time.time()) - 60))
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()) == (401, {"detail": "Token expired"})
    assert response.headers["www-authenticate"] == BEARER_ERROR


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ("Bearer {token}", (200, "acme")),
        ("bearer {token}", (200, "acme")),
        ("BEARER   {token}  ", (200, "acme")),
        # No bearer token at all: the challenge of RFC 6750 §3.1, without an error code.
        (None, (401, NOT_AUTHENTICATED)),
        ("Basic dXNlcjpwYXNz", (401, NOT_AUTHENTICATED)),
        ("Bearer", (401, INVALID)),
        ("Bearer ", (401, INVALID)),
    ],
)
async def test_bearer_scheme(build: Build, authorization: str | None, expected: tuple[int, object]) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.format(token=rs256(claims()))}
    async with build(**RS_SETTINGS) as (client, _, _):
        response = await client.get("/whoami", headers=headers)
    body = response.json()
    assert (response.status_code, body["tenant"] if response.status_code == 200 else body) == expected
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == (
            "Bearer" if body == NOT_AUTHENTICATED else BEARER_ERROR
        )


async def test_two_different_authorization_headers_are_refused(build: Build) -> None:
    async with build(**RS_SETTINGS) as (client, _, _):
        response = await client.get(
            "/whoami",
            headers=[
                ("authorization", f"Bearer {rs256(claims())}"),
                ("authorization", f"Bearer {rs256(claims(tenant='globex'))}"),
            ],
        )
    assert (response.status_code, response.json()) == (401, INVALID)


async def test_a_valid_token_is_served_as_its_tenant_and_answers_like_any_other_for_unknown_ones(
    build: Build,
) -> None:
    async with build(**RS_SETTINGS) as (client, _, _):

        async def get(**overrides: Any) -> tuple[int, Any]:
            r = await client.get("/whoami", headers={"Authorization": f"Bearer {rs256(claims(**overrides))}"})
            return r.status_code, r.json()

        assert (await get())[1]["tenant"] == "acme"
        assert (await get(tenant="globex"))[1]["tenant"] == "globex"
        assert await get(tenant="unknown-co") == (404, {"detail": "Tenant not found"})
        assert await get(tenant="Not A Slug!") == (404, {"detail": "Tenant not found"})
        assert await get(tenant="sleepy") == (403, {"detail": "Tenant is not active (status: suspended)"})
        assert await get(tenant=None) == (400, {"detail": "Tenant identifier missing"})


async def test_audience_issuer_and_leeway(build: Build) -> None:
    settings = {
        **RS_SETTINGS,
        "jwt_audience": "orders-api",
        "jwt_issuer": "https://idp.test/",
        "jwt_leeway": 30,
    }
    ok = {"aud": "orders-api", "iss": "https://idp.test/"}
    async with build(**settings) as (client, _, _):

        async def status(**overrides: Any) -> int:
            token = rs256(claims(**{**ok, **overrides}))
            return (await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})).status_code

        assert await status() == 200
        assert await status(aud=["other", "orders-api"]) == 200
        assert await status(exp=int(time.time()) - 10) == 200  # within the leeway
        assert await status(exp=int(time.time()) - 120) == 401
        assert await status(aud="other-api") == 401
        assert await status(aud=None) == 401
        assert await status(iss="https://evil.test/") == 401
        assert await status(iss=None) == 401


async def test_exp_can_be_made_optional(build: Build) -> None:
    async with build(**RS_SETTINGS, jwt_require_exp=False) as (client, _, _):
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {rs256(claims(exp=None))}"})
    assert response.json()["tenant"] == "acme"


@pytest.mark.parametrize(
    ("claim", "payload"),
    [
        ("org.slug", {"org": {"slug": "globex"}}),
        ("a.b.c", {"a": {"b": {"c": "globex"}}}),
        ("https://example.com/tenant", {"https://example.com/tenant": "globex"}),
        ("tid", {"tid": "globex"}),
    ],
)
async def test_the_tenant_claim_may_be_nested(build: Build, claim: str, payload: dict[str, Any]) -> None:
    async with build(**RS_SETTINGS, jwt_tenant_claim=claim) as (client, _, _):
        token = rs256(claims(tenant=None, **payload))
        assert (await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})).json()[
            "tenant"
        ] == "globex"
        wrong_shape = rs256(claims(tenant=None, org="globex", a=["b"]))
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {wrong_shape}"})
        assert response.status_code == 400, response.text


async def test_hs256_with_a_secret(build: Build) -> None:
    settings = {"resolution_strategy": "jwt", "jwt_algorithms": ["HS256"], "jwt_secret": SECRET}
    async with build(**settings) as (client, _, manager):
        assert SECRET not in repr(manager.config)
        good = jwt.encode(claims(), SECRET, algorithm="HS256")
        assert (await client.get("/whoami", headers={"Authorization": f"Bearer {good}"})).json()[
            "tenant"
        ] == "acme"
        for bad in (
            rs256(claims()),
            jwt.encode(claims(), SECRET[::-1], algorithm="HS256"),
            unsigned(claims()),
        ):
            response = await client.get("/whoami", headers={"Authorization": f"Bearer {bad}"})
            assert (response.status_code, response.json()) == (401, INVALID)


async def test_es256_and_eddsa_public_keys(build: Build) -> None:
    async with build(resolution_strategy="jwt", jwt_algorithms=["ES256"], jwt_public_key=pem(EC_KEY)) as (
        client,
        _,
        _,
    ):
        token = jwt.encode(claims(), EC_KEY, algorithm="ES256")
        assert (await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})).json()[
            "tenant"
        ] == "acme"


async def test_websockets_resolve_by_token(build: Build) -> None:
    async with build(**RS_SETTINGS) as (_, app, _):
        assert accepted_as(await websocket(app, [("authorization", f"Bearer {rs256(claims())}")])) == "acme"
        refused = await websocket(app, [("authorization", f"Bearer {unsigned(claims())}")])
        assert refused == [{"type": "websocket.close", "code": 1008, "reason": "Invalid token"}]
        # Where the server can answer the handshake over HTTP, it is the same 401 with its header.
        answered = await websocket(
            app, [("authorization", "Bearer garbage")], extensions={"websocket.http.response": {}}
        )
        assert answered[0]["status"] == 401
        assert (b"www-authenticate", BEARER_ERROR.encode()) in answered[0]["headers"]
        assert answered[1]["body"] == b'{"detail": "Invalid token"}'


# -- JWKS against a real HTTP server --------------------------------------------------------


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1 whose key set the test can rotate; counts requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.up = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.requests += 1
                if not server.up:
                    self.send_error(503)
                    return
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def publish(self, *keys: tuple[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, str]) -> None:
        published = []
        for kid, key, alg in keys:
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            else:
                jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        self.keys = published


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def jwks_resolver(server: JWKSServer, **options: Any) -> JWTResolver:
    return JWTResolver(["RS256", "ES256"], jwks_url=server.url, **options)


async def test_jwks_key_rotation_against_a_real_server(build: Build, jwks_server: JWKSServer) -> None:
    jwks_server.publish(("key-1", RSA_KEY, "RS256"))
    resolver = jwks_resolver(jwks_server, jwks_min_refetch_interval=0.0)
    config = TenancyConfig(database_url="sqlite://", resolution_strategy="custom")
    async with build(config, resolver=resolver) as (client, _, _):

        async def get(token: str) -> tuple[int, Any]:
            r = await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
            return r.status_code, r.json()

        old = rs256(claims(), RSA_KEY, kid="key-1")
        assert (await get(old))[1]["tenant"] == "acme"
        assert (await get(old))[1]["tenant"] == "acme"
        assert jwks_server.requests == 1  # cached

        # The issuer rotates: a new key appears (the old one still published for a while).
        jwks_server.publish(("key-2", OTHER_RSA_KEY, "RS256"), ("key-1", RSA_KEY, "RS256"))
        new = rs256(claims(tenant="globex"), OTHER_RSA_KEY, kid="key-2")
        assert (await get(new))[1]["tenant"] == "globex"
        assert jwks_server.requests == 2  # the unknown kid triggered one refetch

        # The old key is retired: its tokens stop working once the set is refetched.
        jwks_server.publish(("key-2", OTHER_RSA_KEY, "RS256"))
        assert (await get(rs256(claims(), RSA_KEY, kid="key-3")))[0] == 401  # unknown kid: refetch
        assert jwks_server.requests == 3
        assert await get(old) == (401, INVALID)

        # A token naming key-2 but signed with key-1, and one whose header claims another alg.
        assert await get(rs256(claims(), RSA_KEY, kid="key-2")) == (401, INVALID)
        assert await get(hs256_with(pem(OTHER_RSA_KEY).encode(), claims())) == (401, INVALID)


async def test_unknown_kids_cannot_make_every_request_a_fetch(build: Build, jwks_server: JWKSServer) -> None:
    jwks_server.publish(("key-1", RSA_KEY, "RS256"))
    config = TenancyConfig(database_url="sqlite://", resolution_strategy="custom")
    async with build(config, resolver=jwks_resolver(jwks_server)) as (client, _, _):
        for i in range(20):
            token = rs256(claims(), RSA_KEY, kid=f"random-{i}")
            response = await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
            assert (response.status_code, response.json()) == (401, INVALID)
    assert jwks_server.requests == 1  # the first fetch; no refetch within the interval


async def test_jwks_outages(jwks_server: JWKSServer) -> None:
    keys = JWKSKeys(jwks_server.url, algorithms=["RS256"], ttl=0.01, min_refetch_interval=0.0)
    jwks_server.up = False
    with pytest.raises(TenancyUnavailableError):
        await keys.get("key-1")  # nothing cached: 503
    jwks_server.up = True
    jwks_server.publish(("key-1", RSA_KEY, "RS256"))
    assert (await keys.get("key-1")).key_id == "key-1"
    jwks_server.up = False
    await asyncio.sleep(0.02)  # past the TTL
    assert (await keys.get("key-1")).key_id == "key-1"  # the refetch failed; the old keys serve
    assert jwks_server.requests == 3


async def test_jwks_keys_for_other_algorithms_and_secrets_are_not_used(jwks_server: JWKSServer) -> None:
    jwks_server.publish(("ec", EC_KEY, "ES256"), ("rsa", RSA_KEY, "RS256"))
    jwks_server.keys.append({"kty": "oct", "kid": "shared", "k": _b64(SECRET.encode()), "alg": "HS256"})
    keys = JWKSKeys(jwks_server.url, algorithms=["RS256"])
    assert (await keys.get("rsa")).key_id == "rsa"
    for kid in ("ec", "shared"):
        with pytest.raises(InvalidTokenError, match="no JWKS key"):
            await keys.get(kid)


async def test_jwks_through_the_config(build: Build, jwks_server: JWKSServer) -> None:
    jwks_server.publish(("key-1", EC_KEY, "ES256"))
    async with build(resolution_strategy="jwt", jwt_algorithms=["ES256"], jwt_jwks_url=jwks_server.url) as (
        client,
        app,
        _,
    ):
        token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "key-1"})
        assert (await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})).json()[
            "tenant"
        ] == "acme"
        assert accepted_as(await websocket(app, [("authorization", f"Bearer {token}")])) == "acme"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"algorithms": []}, "jwt_algorithms"),
        ({"algorithms": ["none"]}, "jwt_algorithms"),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, "jwt_algorithms"),
        ({"algorithms": ["HS256"], "public_key": pem(RSA_KEY)}, "jwt_public_key"),
        ({"algorithms": ["HS256"]}, "jwt_secret"),
        ({"algorithms": ["HS256"], "secret": "short"}, "jwt_secret"),
        ({"algorithms": ["HS512"], "secret": SECRET}, "jwt_secret"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "jwt_secret"),
        ({"algorithms": ["RS256"]}, "jwt_public_key"),
        (
            {"algorithms": ["RS256"], "public_key": pem(RSA_KEY), "jwks_url": "https://x/jwks"},
            "jwt_public_key",
        ),
        ({"algorithms": ["RS256"], "jwks_url": "file:///etc/passwd"}, "jwt_jwks_url"),
        ({"algorithms": ["RS256"], "public_key": "not a key"}, "jwt_public_key"),
        ({"algorithms": ["ES256"], "public_key": pem(RSA_KEY)}, "jwt_public_key"),
    ],
)
def test_unsafe_resolvers_cannot_be_built(kwargs: dict[str, Any], field: str) -> None:
    algorithms = kwargs.pop("algorithms")
    with pytest.raises(ConfigurationError, match=field):
        JWTResolver(algorithms, **kwargs)


_LATER = int(time.time()) + 86_400  # a day: the suite runs for minutes before this test


@pytest.mark.parametrize(
    ("dates", "served"),
    [
        ({"exp": str(_LATER)}, False),
        ({"exp": True}, False),
        ({"exp": [_LATER]}, False),
        ({"nbf": "0"}, False),
        ({"iat": "0"}, False),
        ({"exp": _LATER}, True),
        ({"exp": _LATER + 0.5, "nbf": 0, "iat": 0.0}, True),
    ],
    ids=repr,
)
async def test_exp_nbf_and_iat_must_be_numeric_dates(
    build: Build, dates: dict[str, Any], served: bool
) -> None:
    # RFC 7519: NumericDate is a JSON number. PyJWT would convert "1999999999".
    async with build(**RS_SETTINGS) as (client, _, _):
        token = rs256({**claims(), **dates})
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    if served:
        assert response.status_code == 200, response.text
    else:  # a bool exp is 1 to PyJWT: refused as expired before our check sees it
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == BEARER_ERROR
