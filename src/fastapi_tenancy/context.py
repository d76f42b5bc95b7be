"""The current tenant: a ContextVar, set per request by the middleware or by `tenant_scope`."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

from .errors import TenantResolutionError
from .tenant import Tenant

__all__ = [
    "current_tenant",
    "current_tenant_or_none",
    "no_tenant_scope",
    "reset_current_tenant",
    "set_current_tenant",
    "tenant_scope",
]

# A ContextVar, not a global or an attribute of the middleware: each request (and
# each asyncio task started inside it) sees its own value, and the value is reset
# with the token when the request ends, so nothing carries over to the next one.
_current: ContextVar[Tenant | None] = ContextVar("fastapi_tenancy.tenant", default=None)


def current_tenant_or_none() -> Tenant | None:
    """The tenant the running code acts for, or None outside any tenant scope."""
    return _current.get()


def current_tenant() -> Tenant:
    """The tenant the running code acts for; raise `TenantResolutionError` if none.

    Failing closed: code that needs a tenant and has none must not go on as
    "no tenant", which for a query would mean "every tenant".
    """
    tenant = _current.get()
    if tenant is None:
        raise TenantResolutionError("no tenant in scope (use the middleware or tenant_scope)")
    return tenant


class tenant_scope:  # lower case: it is used like the function it was, `with tenant_scope(t):`
    """Run a block as `tenant`, outside a request: scripts, jobs, tests.

        with tenant_scope(tenant):
            async with manager.session() as session:
                ...

    `async with tenant_scope(tenant):` works the same (the form fastapi-tenancy 0.5.0
    documented). The previous tenant (or none) is restored on exit, also on error.
    Each `tenant_scope(...)` is entered once; nest two for two blocks.
    """

    __slots__ = ("_token", "tenant")

    def __init__(self, tenant: Tenant) -> None:
        if not isinstance(tenant, Tenant):
            raise TypeError(f"tenant_scope() needs a Tenant, not {type(tenant).__name__}")
        self.tenant = tenant
        self._token: Token[Tenant | None] | None = None

    def __enter__(self) -> Tenant:
        if self._token is not None:
            raise RuntimeError("this tenant_scope is already entered; make a new one")
        self._token = _current.set(self.tenant)
        return self.tenant

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)

    async def __aenter__(self) -> Tenant:
        # Awaited in the caller's task, so the ContextVar is set in the caller's context.
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)


@contextmanager
def no_tenant_scope() -> Iterator[None]:
    """Run a block explicitly as no tenant, whatever the caller's context holds.

    What excluded paths run under: code inside sees no tenant (and fails closed if
    it needs one), even where the task inherited another request's context.
    """
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


def set_current_tenant(tenant: Tenant | None) -> "Token[Tenant | None]":
    """Make `tenant` (or no tenant) current; give the token to `reset_current_tenant`.

    The low-level form of `tenant_scope` for code that cannot use a `with` block
    around its work (ASGI middleware, test overrides); always reset in a `finally`.
    """
    return _current.set(tenant)


def reset_current_tenant(token: "Token[Tenant | None]") -> None:
    """Restore the tenant that was current before the `set_current_tenant` that gave `token`."""
    _current.reset(token)
