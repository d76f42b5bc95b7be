"""Passwords (scrypt, from the standard library) and access tokens (PyJWT).

The token carries the tenant claim: the JWT strategy reads the request's tenant from it,
and `sub` names the user within that tenant.
"""

import hashlib
import secrets
import time

import jwt
from fastapi_tenancy import TenancyConfig

ACCESS_TOKEN_SECONDS = 8 * 24 * 3600  # the template's eight days


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"{salt.hex()}${digest.hex()}"


def verify_password(password: str, hashed: str) -> bool:
    salt = bytes.fromhex(hashed.partition("$")[0])
    return secrets.compare_digest(hash_password(password, salt), hashed)


def create_access_token(config: TenancyConfig, tenant: str, user_id: int) -> str:
    """A token the app's JWT strategy accepts: signed with its key, naming the tenant."""
    assert config.jwt_secret is not None, "set TENANCY_JWT_SECRET"
    claims = {
        config.jwt_tenant_claim: tenant,
        "sub": str(user_id),
        "exp": int(time.time()) + ACCESS_TOKEN_SECONDS,
    }
    return jwt.encode(claims, config.jwt_secret.get_secret_value(), algorithm=config.jwt_algorithms[0])
