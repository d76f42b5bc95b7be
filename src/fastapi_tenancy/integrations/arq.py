"""ARQ jobs that run as the tenant that enqueued them, or not at all.

`enqueue_tenant_job` stores the tenant (identifier and id) in the job's keyword
arguments; a worker function decorated with `tenant_job` takes it out, re-reads the
tenant from the registry and runs as it. A job without a tenant, or whose tenant is
no longer active or no longer the same tenant, fails without running. The check
runs on every try, so a retry after a suspension is refused too.

    # web process
    await enqueue_tenant_job(redis, "send_invoice", order.id)

    # worker process
    @tenant_job
    async def send_invoice(ctx, order_id: int) -> None:
        async with manager.session() as session: ...

    class WorkerSettings:
        functions = [send_invoice]
        on_startup = tenancy_startup(manager)

Needs `pip install 'fastapi-tenancy[arq]'`.
"""

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..background import reverify_tenant
from ..context import current_tenant, tenant_scope
from ..errors import ConfigurationError, MissingDependencyError, TenantMaintenanceError, TenantResolutionError
from ..manager import TenancyManager
from ..tenant import Tenant

try:
    from arq import Retry
    from arq.connections import ArqRedis
    from arq.jobs import Job
    from arq.typing import WorkerCoroutine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("arq", "arq") from exc

__all__ = ["MANAGER_KEY", "TENANT_KWARG", "enqueue_tenant_job", "tenancy_startup", "tenant_job"]

TENANT_KWARG = "_fastapi_tenancy"
"""The job keyword argument that carries the tenant: `{"identifier": ..., "id": ...}`."""

MANAGER_KEY = "fastapi_tenancy_manager"
"""Where `tenancy_startup` puts the worker's `TenancyManager` in ARQ's `ctx`."""


async def enqueue_tenant_job(
    redis: ArqRedis, function: str, *args: Any, tenant: Tenant | None = None, **kwargs: Any
) -> Job | None:
    """Enqueue `function` to run as `tenant` (default: the current tenant).

    Outside a tenant scope and without `tenant=`, raises `TenantResolutionError`:
    work meant for "no tenant" is not queued. Other arguments are those of
    `ArqRedis.enqueue_job` (`_job_id`, `_queue_name`, `_defer_by`, ...).
    """
    if tenant is None:
        tenant = current_tenant()
    if TENANT_KWARG in kwargs:
        raise TypeError(f"{TENANT_KWARG!r} is reserved for the tenant; pass tenant= instead")
    job_kwargs: dict[str, Any] = {**kwargs, TENANT_KWARG: {"identifier": tenant.identifier, "id": tenant.id}}
    return await redis.enqueue_job(function, *args, **job_kwargs)


def tenancy_startup(
    manager: TenancyManager, then: Callable[[dict[Any, Any]], Awaitable[None]] | None = None
) -> Callable[[dict[Any, Any]], Awaitable[None]]:
    """An ARQ `on_startup` that initialises `manager` and gives it to `tenant_job` functions.

    `then` is your own startup function, run after it. Close the manager in the
    worker's `on_shutdown`.
    """

    async def startup(ctx: dict[Any, Any]) -> None:
        await manager.initialize()
        ctx[MANAGER_KEY] = manager
        if then is not None:
            await then(ctx)

    return startup


def _carried(value: object) -> tuple[str, str]:
    if isinstance(value, Mapping):
        identifier, tenant_id = value.get("identifier"), value.get("id")
        if isinstance(identifier, str) and isinstance(tenant_id, str) and identifier and tenant_id:
            return identifier, tenant_id
    raise TenantResolutionError("job enqueued without a tenant: refused (use enqueue_tenant_job)")


def tenant_job(func: WorkerCoroutine) -> WorkerCoroutine:
    """Decorate an ARQ job function so it runs as the tenant its job carries.

    Before every try: no tenant in the job raises `TenantResolutionError`; a tenant
    that was deleted, re-registered under the same slug, suspended or is otherwise
    not active raises `TenantNotFoundError`/`TenantInactiveError`. The job then
    fails without running (ARQ does not retry these). A tenant in maintenance is not
    a refusal: the job is tried again `maintenance_retry_after` seconds later (ARQ's
    `Retry`, counted against `max_tries`). Inside the function,
    `current_tenant()` and `manager.session()` act for the job's tenant.
    """

    @functools.wraps(func)
    async def run(ctx: dict[Any, Any], *args: Any, **kwargs: Any) -> Any:
        identifier, tenant_id = _carried(kwargs.pop(TENANT_KWARG, None))
        manager = ctx.get(MANAGER_KEY)
        if not isinstance(manager, TenancyManager):
            raise ConfigurationError("no TenancyManager in the worker: on_startup=tenancy_startup(manager)")
        try:
            tenant = await reverify_tenant(manager, identifier, tenant_id)
        except TenantMaintenanceError as exc:
            # Not refused for good: tried again once the maintenance should be over (each
            # try counts towards the worker's max_tries).
            raise Retry(defer=exc.retry_after) from exc
        with tenant_scope(tenant):
            return await func(ctx, *args, **kwargs)

    return run
