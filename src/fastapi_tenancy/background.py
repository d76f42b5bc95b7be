"""Work outside the request: run a function as a tenant, re-checked against the registry.

Inside a request the tenant already follows the work: FastAPI's `BackgroundTasks`,
`asyncio.create_task` and streaming responses all run with a copy of the request's
context, so `current_tenant()` answers the request's tenant there, also after the
request has finished. What a copy cannot know is that the tenant was suspended or
deleted since; `run_as_tenant` and `tenant_task` check that before the work starts.
"""

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from starlette.concurrency import run_in_threadpool

from .context import current_tenant, tenant_scope
from .errors import TenantNotFoundError
from .manager import TenancyManager
from .tenant import Tenant

__all__ = ["reverify_tenant", "run_as_tenant", "tenant_task"]

P = ParamSpec("P")
T = TypeVar("T")


async def reverify_tenant(manager: TenancyManager, identifier: str, tenant_id: str | None = None) -> Tenant:
    """The tenant `identifier` as the registry holds it now, if it may still be served.

    Reads the registry, not the registry cache: background work often runs in another
    process, where no cache invalidation arrives. Fails closed:
    `TenantNotFoundError` if the tenant is gone or, when `tenant_id` is given, if the
    slug now belongs to another tenant (deleted, purged and registered again);
    `TenantInactiveError` if it is suspended, deleted or still provisioning, and its
    subclass `TenantMaintenanceError` (retry after its `retry_after` seconds) if it is in
    maintenance.
    """
    tenant = await manager.store.get_by_identifier(identifier)
    if tenant is None or (tenant_id is not None and tenant.id != tenant_id):
        raise TenantNotFoundError(f"tenant {identifier!r:.80} no longer exists")
    manager.ensure_active(tenant)
    return tenant


@overload
async def run_as_tenant(
    manager: TenancyManager,
    tenant: Tenant | str,
    func: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T: ...
@overload
async def run_as_tenant(
    manager: TenancyManager, tenant: Tenant | str, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T: ...


async def run_as_tenant(
    manager: TenancyManager,
    tenant: Tenant | str,
    func: Callable[P, Any],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> Any:
    """Call `func(*args, **kwargs)` as `tenant`, after checking it is still active.

    `tenant` is a `Tenant` (its id must still match: a slug registered again by
    someone else is refused) or an identifier. An async `func` is awaited; a sync
    one runs in the thread pool, where `current_tenant()` answers the tenant too.

        await run_as_tenant(manager, "acme-corp", rebuild_search_index)
    """
    if isinstance(tenant, Tenant):
        verified = await reverify_tenant(manager, tenant.identifier, tenant.id)
    else:
        verified = await reverify_tenant(manager, tenant)
    with tenant_scope(verified):
        if inspect.iscoroutinefunction(func):
            return await func(*args, **kwargs)
        result = await run_in_threadpool(func, *args, **kwargs)
        if inspect.isawaitable(result):  # a sync callable that returned a coroutine
            return await result
        return result


class _TenantTask:
    """The decorator `tenant_task(manager)` returns."""

    def __init__(self, manager: TenancyManager) -> None:
        self.manager = manager

    @overload
    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]: ...
    @overload
    def __call__(self, func: Callable[P, T]) -> Callable[P, Awaitable[T]]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Awaitable[Any]]:
        manager = self.manager

        @functools.wraps(func)
        async def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            return await run_as_tenant(manager, current_tenant(), func, *args, **kwargs)

        return run


def tenant_task(manager: TenancyManager) -> _TenantTask:
    """Decorate a function so each call runs as the tenant current at the call, re-checked.

    The decorated function is always async. At each call it takes the current tenant
    (none: `TenantResolutionError`, and the function does not run), re-checks it
    against the registry as `run_as_tenant` does, then runs the function as that
    tenant; a sync function runs in the thread pool.

        @tenant_task(manager)
        async def send_invoice(order_id: int) -> None: ...

        background_tasks.add_task(send_invoice, order.id)
    """
    return _TenantTask(manager)
