"""The ARQ worker the job tests run in a process of its own, with TENANCY_DATABASE_URL
and FT_TEST_QUEUE set:

    python -m arq tests.integrations.arq_worker.WorkerSettings --burst

The manager is built from the TENANCY_* environment like any application's; the
queue name is per test, so concurrent test runs never take each other's jobs.
"""

import os
from typing import Any, ClassVar

from arq import Retry
from arq.connections import RedisSettings

from fastapi_tenancy import TenancyConfig, TenancyManager, current_tenant
from fastapi_tenancy.integrations.arq import tenancy_startup, tenant_job

from ..apps import Order, descriptions
from ..conftest import REDIS_URL

manager = TenancyManager(TenancyConfig(database_pool_size=1, database_max_overflow=0))


@tenant_job
async def read_orders(ctx: dict[Any, Any]) -> dict[str, Any]:
    """What the job's tenant holds: all its orders, and the order with the id both tenants use."""
    async with manager.session() as session:
        shared_id = await session.get(Order, 1)
    return {
        "tenant": current_tenant().identifier,
        "orders": await descriptions(manager),
        "order_1": None if shared_id is None else shared_id.description,
        "pid": os.getpid(),
    }


@tenant_job
async def suspend_then_retry(ctx: dict[Any, Any]) -> str:
    """First try: suspend the job's own tenant and ask for a retry, which must be refused."""
    if ctx["job_try"] == 1:
        await manager.suspend_tenant(current_tenant())
        raise Retry(defer=0)
    return f"ran try {ctx['job_try']} as {current_tenant().identifier}"


async def shutdown(ctx: dict[Any, Any]) -> None:
    await manager.close()


class WorkerSettings:
    functions: ClassVar[list[Any]] = [read_orders, suspend_then_retry]
    queue_name = os.environ.get("FT_TEST_QUEUE", "ft-unset")
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    on_startup = tenancy_startup(manager)
    on_shutdown = shutdown
    max_tries = 3
    poll_delay = 0.05
