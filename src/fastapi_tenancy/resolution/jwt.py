"""`JWTResolver`: the tenant from a claim of a verified bearer token (PyJWT, the `jwt` extra).

Imported only when used (`resolution_strategy="jwt"` or an explicit import), so
`import fastapi_tenancy` never needs PyJWT.
"""

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from time import monotonic
from typing import Any

from starlette.requests import HTTPConnection

from ..errors import ConfigurationError, InvalidTokenError, MissingDependencyError, TenancyUnavailableError
from .algorithms import check_jwt_settings
from .base import OpenAPITenant, Resolver
from .claims import remember_token

try:
    import httpx
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from jwt.algorithms import get_default_algorithms
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(exc.name or "pyjwt", "jwt") from exc

__all__ = ["JWKSKeys", "JWTResolver"]

logger = logging.getLogger("fastapi_tenancy")

# A header value beyond this is not a token we issued; it is refused before any decoding.
_MAX_TOKEN = 8192
_MAX_JWKS_BYTES = 1 << 20
_JWKS_TIMEOUT = 5.0


class JWKSKeys:
    """The signing keys published at a JWKS URL, cached; shared by all requests of one loop.

    Keys are fetched on first use and again after `ttl` seconds, or sooner when a
    token names an unknown `kid` (key rotation), at most once per
    `min_refetch_interval` seconds, so tokens with random `kid`s cannot turn every
    request into a fetch.
    Concurrent requests share one fetch. When a refetch fails the keys already held
    stay in use (and the failure is logged); with no keys at all, 503.
    Only keys for one of `algorithms` are kept; symmetric (`oct`) keys never are.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Iterable[str],
        ttl: float = 300.0,
        min_refetch_interval: float = 10.0,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refetch_interval = min_refetch_interval
        self.algorithms = frozenset(algorithms)
        self._by_kid: dict[str, jwt.PyJWK] = {}
        self._all: tuple[jwt.PyJWK, ...] = ()
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, kid: str | None) -> jwt.PyJWK:
        """The key a token's `kid` names (or the only key, for a token without one)."""
        if monotonic() - self._fetched_at > self.ttl:
            await self._refresh(reason="expired")
        key = self._find(kid)
        if key is None:
            await self._refresh(reason="unknown kid")
            key = self._find(kid)
        if key is None:
            raise InvalidTokenError("no JWKS key for the token's kid")
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return self._all[0] if len(self._all) == 1 else None
        return self._by_kid.get(kid)

    async def _refresh(self, *, reason: str) -> None:
        attempted = self._attempted_at
        async with self._lock:
            if self._attempted_at != attempted:
                return  # another request fetched (or tried to) while this one waited
            if reason == "unknown kid" and monotonic() - self._attempted_at < self.min_refetch_interval:
                return
            self._attempted_at = monotonic()
            try:
                keys = await self._fetch()
            except Exception as exc:
                if not self._all:
                    raise TenancyUnavailableError(f"JWKS unavailable: {type(exc).__name__}") from exc
                logger.warning("could not refresh the JWKS from %s (%s); keeping the old keys", self.url, exc)
                return
            self._all = tuple(keys)
            self._by_kid = {key.key_id: key for key in keys if key.key_id}
            self._fetched_at = monotonic()

    async def _fetch(self) -> list[jwt.PyJWK]:
        async with (
            httpx.AsyncClient(timeout=_JWKS_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", self.url, headers={"accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError("JWKS document larger than 1 MB")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("a JWKS document is a JSON object")
        keys = []
        for key in jwt.PyJWKSet.from_dict(document).keys:
            if key.key_type == "oct" or (key.public_key_use or "sig") != "sig":
                continue  # a shared secret has no business in a public key set
            if key.algorithm_name in self.algorithms:
                keys.append(key)
        if not keys:
            raise ValueError(f"the JWKS holds no signing key for {sorted(self.algorithms)}")
        return keys


_NUMERIC_DATES = ("exp", "nbf", "iat")


class JWTResolver(Resolver):
    """Reads the identifier from a claim of the request's bearer token, after verifying it.

    The token comes from `Authorization: Bearer <token>` (scheme matched without
    regard to case). It is verified with `secret` (HS256/384/512) or a public key,
    given as PEM (`public_key`) or fetched from `jwks_url` (RS, PS, ES, EdDSA);
    only `algorithms` are accepted, and symmetric and asymmetric ones cannot be
    mixed, so `none` and HS/RS confusion are impossible. `exp` is required unless
    `require_exp=False`; `aud` and `iss` are checked when given. `tenant_claim` may
    be a dotted path (`org.slug`) into nested claims.

    No `Authorization` header, another scheme, or a valid token without the claim
    name no tenant (None), so that a chain can ask its next strategy. With
    `required=True` (the strategy alone, or where a chain cannot fall through) a
    request without a bearer token is refused instead: 401 `Not authenticated`
    with `WWW-Authenticate: Bearer`. Anything wrong with the token raises
    `InvalidTokenError` (401 with `WWW-Authenticate: Bearer error="invalid_token"`).

    The verified claims stay with the request (`get_token_claims`), never on the
    resolver.
    """

    def __init__(
        self,
        algorithms: Iterable[str],
        *,
        secret: str | bytes | None = None,
        public_key: str | None = None,
        jwks_url: str | None = None,
        jwks_cache_ttl: float = 300.0,
        jwks_min_refetch_interval: float = 10.0,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        tenant_claim: str = "tenant",
        require_exp: bool = True,
        required: bool = False,
    ) -> None:
        self.algorithms = tuple(algorithms)
        secret_bytes = secret.encode() if isinstance(secret, str) else secret
        try:
            check_jwt_settings(self.algorithms, secret_bytes, public_key, jwks_url)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self._key: Any = None
        self.jwks: JWKSKeys | None = None
        if secret_bytes is not None:
            self._key = secret_bytes
        elif public_key is not None:
            self._key = _load_public_key(public_key, self.algorithms)
        else:
            assert jwks_url is not None  # check_jwt_settings requires one of the three
            self.jwks = JWKSKeys(
                jwks_url,
                algorithms=self.algorithms,
                ttl=jwks_cache_ttl,
                min_refetch_interval=jwks_min_refetch_interval,
            )
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.tenant_claim = tenant_claim
        self._claim_path = tuple(tenant_claim.split("."))
        require = ["exp"] if require_exp else []
        require += ["aud"] if audience is not None else []
        require += ["iss"] if issuer is not None else []
        self._options: Any = {"require": require, "enforce_minimum_key_length": True}
        self.required = required

    async def resolve(self, connection: HTTPConnection) -> str | None:
        token = _bearer_token(connection.scope["headers"])
        if token is None:
            if self.required:
                # RFC 6750 §3.1: a request without credentials gets the challenge, no error code.
                raise InvalidTokenError(
                    "no bearer token", detail="Not authenticated", headers={"www-authenticate": "Bearer"}
                )
            return None
        claims = await self.verify(token)
        tenant = self._tenant(claims)
        # Per request, in the scope: the routes read these claims instead of decoding again.
        remember_token(connection.scope, tenant, claims)
        return tenant

    def openapi(self, *, required: bool = True) -> OpenAPITenant:
        scheme = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": f"A JWT whose `{self.tenant_claim}` claim names the tenant.",
        }
        return OpenAPITenant(security_schemes={"TenantToken": scheme}, security_optional=not required)

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of `token` if it passes every check; `InvalidTokenError` otherwise."""
        try:
            key: Any = self._key
            if self.jwks is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                if kid is not None and not isinstance(kid, str):
                    raise InvalidTokenError("kid is not a string")
                key = await self.jwks.get(kid)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidTokenError("token expired", detail="Token expired") from exc
        except jwt.PyJWTError as exc:
            # The message names the failed check, never the token.
            raise InvalidTokenError(f"token rejected: {type(exc).__name__}: {exc}") from exc
        except (ValueError, TypeError, KeyError) as exc:  # hostile input PyJWT did not wrap
            raise InvalidTokenError(f"token rejected: {type(exc).__name__}") from exc
        # RFC 7519 §2: exp, nbf and iat are NumericDates (JSON numbers). PyJWT converts a
        # string ("1999999999") and would accept it; a bool is an int to Python.
        for name in _NUMERIC_DATES:
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise InvalidTokenError(f"claim {name!r} is not a NumericDate")
        return claims

    def _tenant(self, claims: Mapping[str, Any]) -> str | None:
        # A claim named with dots (`https://example.com/tenant`) is read whole first.
        value: Any = claims.get(self.tenant_claim)
        if value is None and len(self._claim_path) > 1:
            value = claims
            for part in self._claim_path:
                value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidTokenError(f"claim {self.tenant_claim!r} is not a string")
        return value


def _bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    found: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            if found is not None and value != found:
                raise InvalidTokenError("two different Authorization headers")
            found = value
    if found is None:
        return None
    if len(found) > _MAX_TOKEN:
        raise InvalidTokenError("Authorization header too long")
    # Only HTTP's optional whitespace is trimmed (as for Host): never \x85, \xa0, ...
    scheme, _, token = found.decode("latin-1").strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme (Basic, ...): not ours to judge
    token = token.strip(" \t")
    if not token:
        raise InvalidTokenError("empty bearer token")
    return token


def _load_public_key(pem: str, algorithms: Iterable[str]) -> Any:
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigurationError("jwt_public_key: not a PEM-encoded public key") from exc
    available = get_default_algorithms()
    for name in algorithms:
        try:
            available[name].prepare_key(key)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigurationError(
                f"jwt_public_key: a {type(key).__name__} cannot verify {name} tokens"
            ) from exc
    return key
