"""`Resolver`: the contract of a resolution strategy, and the wrapper for plain callables."""

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.types import Scope

if TYPE_CHECKING:
    from ..lookup import TenantLookup

__all__ = ["CallableResolver", "OpenAPITenant", "Resolver", "ResolverFunc", "as_resolver"]

ResolverFunc = Callable[[HTTPConnection], Awaitable[str | None]]


@dataclass(frozen=True)
class OpenAPITenant:
    """How a request names its tenant, as the app's OpenAPI schema shows it (`Resolver.openapi`).

    Every field is added to each tenant operation (never to excluded paths):
    `parameters` are OpenAPI parameter objects (a header); `path_prefix` moves the
    operation under `<prefix>/{tenant}`; `security_schemes` are declared in
    `components` and required by the operation (`security_optional`: one way among
    others); `servers` are where the operation may be sent, after the schema's own.
    """

    parameters: tuple[Mapping[str, Any], ...] = ()
    path_prefix: str | None = None
    security_schemes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    security_optional: bool = False
    servers: tuple[Mapping[str, Any], ...] = ()


class Resolver(ABC):
    """Reads the tenant identifier from a request. Shared by all requests: keep no state.

    Subclass it and implement `resolve`, or pass a plain async function, which
    `as_resolver` wraps. Return the identifier as the client sent it, or None when
    the request names no tenant; raise `TenantResolutionError` for a request that
    names one ambiguously. The manager validates and looks up the identifier, so a
    resolver never needs to.
    """

    @abstractmethod
    async def resolve(self, connection: HTTPConnection) -> str | None:
        """The identifier named by `connection` (an HTTP request or a WebSocket), or None."""

    def app_scope(self, scope: Scope) -> Scope:
        """The ASGI scope the application sees once the tenant is resolved.

        The default hands on `scope` unchanged. A strategy that reads the tenant
        from the URL (`PathResolver`) returns a copy whose `root_path` holds the
        tenant's prefix, so the app's routes are written without it. Must not
        mutate `scope`.
        """
        return scope

    def bind(self, lookup: "TenantLookup") -> None:  # noqa: B027 - optional hook, a no-op by default
        """Given the manager's registry cache once, when the manager is built.

        The default ignores it. A strategy that looks something up to find the
        identifier (`DomainResolver`: the tenant that holds the host) keeps it and
        reads through it, so that its answers are cached and invalidated with the
        manager's. `ChainResolver` passes it on to its members.
        """

    def openapi(self, *, required: bool = True) -> OpenAPITenant | None:
        """How a client names the tenant, for the app's `/openapi.json` (and so `/docs`).

        None (the default, and what a plain function gets) adds nothing. `required`
        is False when the resolver is one way among others (a chain in `first`
        mode): a header it documents is then optional.
        """
        return None


class CallableResolver(Resolver):
    """A `Resolver` around an async function `(HTTPConnection) -> str | None`."""

    def __init__(self, func: ResolverFunc) -> None:
        self.func = func

    async def resolve(self, connection: HTTPConnection) -> str | None:
        return await self.func(connection)


def as_resolver(resolver: Resolver | ResolverFunc) -> Resolver:
    """Normalise a resolver object or a plain async callable to a `Resolver`."""
    if isinstance(resolver, Resolver):
        return resolver
    if callable(resolver):
        return CallableResolver(resolver)
    raise TypeError(f"a resolver must be a Resolver or an async callable, not {type(resolver).__name__}")
