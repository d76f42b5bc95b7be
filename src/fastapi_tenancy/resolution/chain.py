"""`ChainResolver`: several strategies in order, first answer wins, or all must agree."""

from collections.abc import Iterable
from typing import Literal

from starlette.requests import HTTPConnection
from starlette.types import Scope

from ..errors import TenantMismatchError
from .base import Resolver, ResolverFunc, as_resolver

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
    still strips its segment when another member answered first.
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

    def app_scope(self, scope: Scope) -> Scope:
        for resolver in self.resolvers:
            scope = resolver.app_scope(scope)
        return scope
