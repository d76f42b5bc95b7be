"""Fuzzed bearer tokens and Authorization headers through the JWT resolver, in the real app
on PostgreSQL (tenants alpha and beta hold the same order ids): never a 500, and a request
is served only as the tenant a token correctly signed by the configured key names, with
every claim valid. Checklist items 28-31."""

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..isolation.test_matrix import ROWS, Env, two_tenants
from .sync import fresh_database, new_runner

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXPECTED = {tenant: sorted(rows.values()) for tenant, rows in ROWS.items()}
MARKERS = ("alpha-", "beta-")
REFUSALS = (400, 401, 403, 404)

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
PEM = (
    KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def sign(payload: dict[str, Any], key: rsa.RSAPrivateKey = KEY, **headers: Any) -> str:
    """An RS256 token signed with the configured key (unless `key` says otherwise). By hand, so
    that any header and claim value (a list for `kid`, a NaN) can be sent: PyJWT refuses to
    encode some."""
    signing_input = f"{_segment({'alg': 'RS256', 'typ': 'JWT', **headers})}.{_segment(payload)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def valid_token(tenant: str) -> str:
    return sign({"tenant": tenant, "exp": int(time.time()) + 300})


@contextmanager
def jwt_env() -> Iterator[tuple[asyncio.Runner, Env]]:
    """The test app on a fresh PostgreSQL database, tenants from RS256 tokens, on a loop of our own."""
    with new_runner() as runner, fresh_database(runner, "postgres") as url:
        context = two_tenants(url, resolution_strategy="jwt", jwt_algorithms=["RS256"], jwt_public_key=PEM)
        env = runner.run(context.__aenter__())
        try:
            yield runner, env
        finally:
            runner.run(context.__aexit__(None, None, None))


def _get(runner: asyncio.Runner, env: Env, authorization: list[bytes]) -> httpx.Response:
    return runner.run(env.client.get("/orders", headers=[(b"authorization", v) for v in authorization]))


def _served_as(response: httpx.Response) -> str | None:
    """The tenant whose rows a 200 carries (checked to be all of them), or None for a refusal."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.status_code in REFUSALS, response.text
        assert not any(marker in response.text for marker in MARKERS), response.text
        return None
    rows = sorted(order["description"] for order in response.json()["orders"])
    owners = {tenant for tenant, expected in EXPECTED.items() if rows == expected}
    assert len(owners) == 1, rows
    return owners.pop()


def _numeric_date(value: Any) -> int | None:
    """A claim's time as PyJWT reads it (`int(value)`: booleans and numeric strings pass), or None."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _may_be_served(claims: dict[str, Any], now: float) -> bool:
    """Whether every registered claim could pass (a few seconds' slack for the clock)."""
    exp, nbf = _numeric_date(claims.get("exp")), _numeric_date(claims.get("nbf"))
    if exp is None or exp <= now - 5:
        return False
    if "nbf" in claims and (nbf is None or nbf > now + 5):
        return False
    return "aud" not in claims  # no audience is configured: a token for one is not for us


def _must_be_served(claims: dict[str, Any], now: float) -> bool:
    """Whether every registered claim is plainly valid (a number, far from its limit)."""
    exp: Any = claims.get("exp")
    nbf: Any = claims.get("nbf")
    if type(exp) not in (int, float) or not now + 60 < exp < 1e12:
        return False
    if nbf is not None and (type(nbf) not in (int, float) or not -1e12 < nbf < now - 60):
        return False
    return "aud" not in claims


# -- tokens signed by the right key, with fuzzed claims and headers ---------------------

TEXT = st.text(max_size=30)
CLAIM_VALUES = st.one_of(
    st.sampled_from(["alpha", "beta", "ALPHA", "alpha ", "beta\x00", "alpha,beta", "gamma", ""]),
    TEXT,
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.sampled_from(["alpha", "beta"]), max_size=3),
    st.dictionaries(st.sampled_from(["tenant", "id"]), st.sampled_from(["alpha", "beta"]), max_size=2),
)
TIMES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from(["offset:+300", "offset:-300", "offset:+3", "offset:-3"]),
    st.integers(min_value=0, max_value=10**11).map(str),  # PyJWT reads numeric strings as times
    st.floats(allow_nan=True),
    TEXT,
    st.booleans(),
)
HEADERS = st.dictionaries(
    st.sampled_from(["kid", "jku", "x5u", "crit", "typ", "cty", "x5c", "jwk"]),
    st.one_of(
        TEXT,
        st.sampled_from(["../../dev/null", "' OR 1=1 --", "http://127.0.0.1:1/jwks", "file:///etc/passwd"]),
        st.lists(st.sampled_from(["exp", "b64", "unknown-critical"]), max_size=2),
        st.integers(),
    ),
    max_size=3,
)


def _time(value: Any, now: int) -> Any:
    if isinstance(value, str) and value.startswith("offset:"):
        return now + int(value.removeprefix("offset:"))
    return value


def test_correctly_signed_tokens_are_served_only_as_their_valid_tenant_claim() -> None:
    with jwt_env() as (runner, env):

        @given(
            tenant=CLAIM_VALUES,
            claim_name=st.sampled_from(["tenant", "tenant", "Tenant", "tenant_id", "tid"]),
            exp=st.one_of(st.none(), st.just("offset:+300"), TIMES),
            nbf=st.one_of(st.none(), TIMES),
            aud=st.one_of(st.none(), TEXT),
            headers=HEADERS,
        )
        @FUZZ
        def probe(
            tenant: Any, claim_name: str, exp: Any, nbf: Any, aud: str | None, headers: dict[str, Any]
        ) -> None:
            now = int(time.time())
            claims: dict[str, Any] = {claim_name: tenant, "sub": "user-1"}
            for name, value in (("exp", _time(exp, now)), ("nbf", _time(nbf, now)), ("aud", aud)):
                if value is not None:
                    claims[name] = value
            token = sign(claims, **headers)
            as_tenant = _served_as(_get(runner, env, [f"Bearer {token}".encode()]))
            if as_tenant is not None:
                assert claim_name == "tenant" and tenant == as_tenant, (claims, headers)
                assert _may_be_served(claims, now), (claims, headers)
                assert "crit" not in headers, headers  # an unknown critical extension is refused
            elif (
                claim_name == "tenant"
                and isinstance(tenant, str)
                and tenant in ROWS
                and _must_be_served(claims, now)
                and not headers
            ):
                raise AssertionError(f"a valid token was refused: {claims}")

        probe()
        # A clean token is served (so the refusals above are not just a broken app).
        assert _served_as(_get(runner, env, [f"Bearer {valid_token('beta')}".encode()])) == "beta"
        # Whatever the draws were: header values naming a key or a key URL are ignored (the key
        # is the configured one), an unknown critical extension is refused.
        claims = {"tenant": "alpha", "exp": int(time.time()) + 300}
        cases: list[tuple[dict[str, Any], str | None]] = [
            ({"kid": "../../dev/null"}, "alpha"),
            ({"kid": "' OR 1=1 --", "jku": "http://127.0.0.1:1/jwks", "x5u": "file:///etc/passwd"}, "alpha"),
            ({"kid": ["not", "a", "string"]}, None),
            ({"crit": ["unknown-critical"], "unknown-critical": True}, None),
            ({"crit": []}, None),
        ]
        for headers, expected in cases:
            token = sign(claims, **headers)
            assert _served_as(_get(runner, env, [f"Bearer {token}".encode()])) == expected, headers


# -- forged tokens naming a real tenant ---------------------------------------------------


def _hs256_with(secret: bytes, payload: dict[str, Any]) -> str:
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _unsigned(payload: dict[str, Any], alg: str) -> str:
    return f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(payload)}."


def _forge(how: str, tenant: str) -> str:
    payload = {"tenant": tenant, "exp": int(time.time()) + 300}
    genuine = valid_token("alpha" if tenant == "beta" else "beta")
    header, _, rest = genuine.partition(".")
    signature = rest.partition(".")[2]
    forgeries = {
        "alg none": lambda: _unsigned(payload, "none"),
        "alg NONE": lambda: _unsigned(payload, "NONE"),
        "alg none, a real signature kept": lambda: _unsigned(payload, "none") + signature,
        "no signature": lambda: f"{_segment({'alg': 'RS256'})}.{_segment(payload)}.",
        "HS256 keyed with the public key": lambda: _hs256_with(PEM.encode(), payload),
        "another RSA key": lambda: sign(payload, OTHER_KEY),
        "ES256": lambda: jwt.encode(payload, EC_KEY, algorithm="ES256"),
        "another tenant's signature": lambda: f"{header}.{_segment(payload)}.{signature}",
        "PS256 by the right key": lambda: jwt.encode(payload, KEY, algorithm="PS256"),
        "RS256 header, PS256 signature": lambda: _swap_alg(jwt.encode(payload, KEY, algorithm="PS256")),
    }
    return forgeries[how]()


def _swap_alg(token: str) -> str:
    _, payload, signature = token.split(".")
    return f"{_segment({'alg': 'RS256', 'typ': 'JWT'})}.{payload}.{signature}"


def test_forged_tokens_for_a_real_tenant_are_refused() -> None:
    with jwt_env() as (runner, env):

        @given(
            how=st.sampled_from(
                [
                    "alg none",
                    "alg NONE",
                    "alg none, a real signature kept",
                    "no signature",
                    "HS256 keyed with the public key",
                    "another RSA key",
                    "ES256",
                    "another tenant's signature",
                    "PS256 by the right key",
                    "RS256 header, PS256 signature",
                ]
            ),
            tenant=st.sampled_from(sorted(ROWS)),
            scheme=st.sampled_from(["Bearer ", "bearer ", "BEARER\t", "Bearer  "]),
        )
        @FUZZ
        def probe(how: str, tenant: str, scheme: str) -> None:
            token = _forge(how, tenant)
            response = _get(runner, env, [f"{scheme}{token}".encode()])
            assert _served_as(response) is None, how
            assert token[:20] not in response.text  # the token is never echoed

        probe()


# -- a genuine token, mutated -------------------------------------------------------------

MUTATIONS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10_000),
        st.sampled_from(["replace", "insert", "delete"]),
        st.sampled_from(list("AZaz09-_.=+/ ") + ["\x00", "\u00e9"]),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(token: str, mutations: list[tuple[int, str, str]]) -> str:
    for position, kind, char in mutations:
        index = position % (len(token) + 1)
        if kind == "insert":
            token = token[:index] + char + token[index:]
        elif token and index < len(token):
            token = token[:index] + (char if kind == "replace" else "") + token[index + 1 :]
    return token


def test_a_mutated_token_is_refused_or_still_its_own_tenant() -> None:
    """Base64 padding bits let a few edits decode to the same bytes: those may still be served,
    as the tenant that was signed; any other edit is refused."""
    with jwt_env() as (runner, env):

        @given(tenant=st.sampled_from(sorted(ROWS)), mutations=MUTATIONS)
        @FUZZ
        def probe(tenant: str, mutations: list[tuple[int, str, str]]) -> None:
            token = valid_token(tenant)
            mutated = _mutate(token, mutations)
            as_tenant = _served_as(_get(runner, env, [b"Bearer " + mutated.encode("utf-8")]))
            assert as_tenant in (None, tenant), (token, mutated)

        probe()


# -- raw Authorization headers --------------------------------------------------------------


def _authorization(valid: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    alpha, beta = valid["alpha"][7:], valid["beta"][7:]
    return st.one_of(
        st.binary(max_size=120),
        st.text(max_size=60).map(lambda t: t.encode("utf-8")),
        st.sampled_from(
            [
                b"Bearer",
                b"Bearer ",
                b"Bearer a.b.c",
                b"Bearer ..",
                b"Basic YWxwaGE6cGFzcw==",
                b"Bearer\x00" + alpha,
                b"Bearer " + alpha + b" " + beta,
                b"Bearer " + alpha + b"\x00",
                b"Bearer " + alpha.upper(),
                b"Token " + beta,
            ]
        ),
        st.sampled_from(sorted(valid)).map(valid.__getitem__),
        st.integers(min_value=8_000, max_value=100_000).map(lambda n: b"Bearer " + b"a" * n),  # huge
    )


def test_fuzzed_authorization_headers_never_fail_and_never_pick_a_wrong_tenant() -> None:
    with jwt_env() as (runner, env):
        valid = {tenant: f"Bearer {valid_token(tenant)}".encode() for tenant in ROWS}

        @given(values=st.lists(_authorization(valid), max_size=3))
        @FUZZ
        def probe(values: list[bytes]) -> None:
            as_tenant = _served_as(_get(runner, env, values))
            # Served only for exactly one genuine token (sent once, or repeated identically).
            genuine = {tenant for tenant, value in valid.items() if set(values) == {value}}
            if as_tenant is not None:
                assert genuine == {as_tenant}, values
            elif genuine:
                raise AssertionError(f"a valid token was refused: {values}")

        probe()
