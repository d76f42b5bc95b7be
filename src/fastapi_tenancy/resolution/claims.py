"""The verified claims of a request's bearer token, kept in its ASGI scope for the routes.

`JWTResolver` stores them once it has verified the token; `get_token_claims`
(`fastapi_tenancy.dependencies`) reads them, so a route never decodes the token a
second time. A custom resolver that verifies tokens of its own may store its claims
here too. Free of PyJWT: the dependencies import it without the `jwt` extra.
"""

from typing import Any, NamedTuple

from starlette.types import Scope

__all__ = ["VerifiedToken", "remember_token", "verified_token"]

# The key in the ASGI scope's "state"; namespaced, so no state the app's lifespan hands
# to every request can pass for a verified token.
_KEY = "fastapi_tenancy.token"


class VerifiedToken(NamedTuple):
    """A token that passed every check: the tenant it names (None: no tenant claim) and its claims."""

    tenant: str | None
    claims: dict[str, Any]


def remember_token(scope: Scope, tenant: str | None, claims: dict[str, Any]) -> None:
    """Keep `claims` of a verified token, which names `tenant`, for the request `scope`."""
    scope.setdefault("state", {})[_KEY] = VerifiedToken(tenant, claims)


def verified_token(scope: Scope) -> VerifiedToken | None:
    """The request's verified token, or None when no resolver verified one."""
    found = scope.get("state", {}).get(_KEY)
    return found if isinstance(found, VerifiedToken) else None
