"""Which JWT algorithms and keys may be configured together: the signing policy.

Shared by `TenancyConfig` (checked when the settings are read) and `JWTResolver` (when
one is built by hand); free of PyJWT, so the configuration imports it without the extra.
"""

from collections.abc import Iterable

__all__ = ["check_jwt_settings"]

# HMAC algorithms and the shortest secret each accepts (RFC 7518 §3.2: at least the
# hash size); every other algorithm is verified with a public key.
_HS_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
_PUBLIC_KEY_ALGORITHMS = frozenset(
    ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA"]
)


def check_jwt_settings(
    algorithms: Iterable[str], secret: bytes | None, public_key: str | None, jwks_url: str | None
) -> None:
    """Refuse JWT settings that could be attacked; `ValueError` naming the `jwt_*` field.

    The allow-list is all HMAC (verified with `secret`) or all public-key algorithms
    (verified with exactly one of `public_key` or `jwks_url`), never both: a public
    key that could also serve as an HMAC secret is the classic algorithm confusion.
    `none` is not an algorithm here.
    """
    algorithms = tuple(algorithms)
    if not algorithms:
        raise ValueError("jwt_algorithms: list the algorithms your tokens are signed with, e.g. ['RS256']")
    known = _PUBLIC_KEY_ALGORITHMS.union(_HS_ALGORITHMS)
    unknown = [name for name in algorithms if name not in known]
    if unknown:
        raise ValueError(
            f"jwt_algorithms: unsupported {unknown}; use HS256/384/512, RS*, PS*, ES* or EdDSA ('none' never)"
        )
    hmac = [name for name in algorithms if name in _HS_ALGORITHMS]
    if hmac and len(hmac) != len(algorithms):
        raise ValueError("jwt_algorithms: do not mix HS* with public-key algorithms (algorithm confusion)")
    if hmac:
        if public_key is not None or jwks_url is not None:
            field = "jwt_public_key" if public_key is not None else "jwt_jwks_url"
            raise ValueError(f"{field}: HS* tokens are verified with jwt_secret, not a public key")
        if secret is None:
            raise ValueError("jwt_secret: required for HS* algorithms")
        needed = max(_HS_ALGORITHMS[name] for name in hmac)
        if len(secret) < needed:
            raise ValueError(f"jwt_secret: {'/'.join(hmac)} needs a secret of at least {needed} bytes")
        return
    if secret is not None:
        raise ValueError("jwt_secret: public-key algorithms are verified with jwt_public_key or jwt_jwks_url")
    if (public_key is None) == (jwks_url is None):
        raise ValueError("jwt_public_key: give exactly one of jwt_public_key and jwt_jwks_url")
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise ValueError("jwt_jwks_url: must be an https:// (or http://) URL")
