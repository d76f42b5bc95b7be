"""`ChainResolver`: several strategies in order, first answer wins, or all must agree."""

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from starlette.requests import HTTPConnection
from starlette.types import Scope

from ..errors import TenantMismatchError
from .base import OpenAPITenant, Resolver, ResolverFunc, as_resolver

if TYPE_CHECKING:
    from ..lookup import TenantLookup

__all__ = ["ChainResolver"]


class ChainResolver(Resolver):
    """Asks several resolvers, in order.

    - `mode="first"`: the first identifier any of them returns wins; the rest are
      not asked (`JWTResolver`, then `SubdomainResolver`).
    - `mode="agree"`: every resolver must name the same tenant (a token's claim
      must match the subdomain). Different answers are refused with 403
      `Tenant mismatch`; a resolver naming none makes the request name none (400).

    An error from a resolver (a bad token's 401) ends the chain in both modes: a
    request with a broken token is refused, not resolved by the next strategy.
    `app_scope` applies every member's rewrite, so a `PathResolver` in the chain
    still strips its segment when another member answered first. `openapi`
    documents every member's way, each optional in `first` mode.
    """

    def __init__(
        self, resolvers: Iterable[Resolver | ResolverFunc], *, mode: Literal["first", "agree"] = "first"
    ) -> None:
        self.resolvers = tuple(as_resolver(resolver) for resolver in resolvers)
        if not self.resolvers:
            raise ValueError("a chain needs at least one resolver")
        if mode not in ("first", "agree"):
            raise ValueError(f"mode must be 'first' or 'agree', not {mode!r}")
        self.mode = mode

    async def resolve(self, connection: HTTPConnection) -> str | None:
        if self.mode == "first":
            for resolver in self.resolvers:
                identifier = await resolver.resolve(connection)
                if identifier:
                    return identifier
            return None
        agreed: str | None = None
        for resolver in self.resolvers:
            identifier = await resolver.resolve(connection)
            if not identifier:
                return None
            if agreed is not None and identifier != agreed:
                # Compared before any lookup, so the refusal says nothing about
                # whether either tenant exists.
                raise TenantMismatchError(f"resolvers disagree: {agreed!r:.80} != {identifier!r:.80}")
            agreed = identifier
        return agreed

    def bind(self, lookup: "TenantLookup") -> None:
        for resolver in self.resolvers:
            resolver.bind(lookup)

    def app_scope(self, scope: Scope) -> Scope:
        for resolver in self.resolvers:
            scope = resolver.app_scope(scope)
        return scope

    def openapi(self, *, required: bool = True) -> OpenAPITenant | None:
        # In `first` mode each member is one way among several; in `agree` mode all are needed.
        each_required = required and (self.mode == "agree" or len(self.resolvers) == 1)
        parts = [part for r in self.resolvers if (part := r.openapi(required=each_required)) is not None]
        if not parts:
            return None
        return OpenAPITenant(
            parameters=tuple(parameter for part in parts for parameter in part.parameters),
            path_prefix=next((part.path_prefix for part in parts if part.path_prefix is not None), None),
            security_schemes={name: s for part in parts for name, s in part.security_schemes.items()},
            security_optional=any(part.security_optional for part in parts if part.security_schemes),
            servers=tuple(server for part in parts for server in part.servers),
        )
