"""The current tenant: a ContextVar, set per request by the middleware or by `tenant_scope`."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import TenantResolutionError
from .tenant import Tenant

__all__ = ["current_tenant", "current_tenant_or_none", "tenant_scope"]

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


@contextmanager
def tenant_scope(tenant: Tenant) -> Iterator[Tenant]:
    """Run a block as `tenant`, outside a request: scripts, jobs, tests.

        with tenant_scope(tenant):
            async with manager.session() as session:
                ...

    The previous tenant (or none) is restored on exit, also on error.
    """
    if not isinstance(tenant, Tenant):
        raise TypeError(f"tenant_scope() needs a Tenant, not {type(tenant).__name__}")
    token = _current.set(tenant)
    try:
        yield tenant
    finally:
        _current.reset(token)
