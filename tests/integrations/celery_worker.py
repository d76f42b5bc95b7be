"""The Celery app the task tests run a real worker of, with TENANCY_DATABASE_URL, FT_TEST_BROKER
and FT_TEST_QUEUE set:

    celery -A tests.integrations.celery_worker worker -Q <queue> --pool solo

The manager is built from the TENANCY_* environment like any application's. The test process
builds the same app with `build()` to send tasks; the queue is per test, so concurrent runs
never take each other's tasks.
"""

import os
from typing import Any

from celery import Celery

from fastapi_tenancy import TenancyConfig, TenancyManager, current_tenant
from fastapi_tenancy.integrations.celery import TenancyCelery

from ..apps import Order, descriptions
from ..conftest import REDIS_URL


def build(broker: str, queue: str, manager: TenancyManager) -> tuple[Celery, dict[str, Any]]:
    """The app, on `broker` with its tasks on `queue`, and its tasks by name."""
    app = Celery("ft_tests", broker=broker, backend=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_expires=600,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    tenancy = TenancyCelery(app, manager)

    @tenancy.task(name="read_orders")
    async def read_orders() -> dict[str, Any]:
        """What the task's tenant holds: all its orders, and the order with the id both tenants use."""
        async with manager.session() as session:
            shared_id = await session.get(Order, 1)
        return {
            "tenant": current_tenant().identifier,
            "orders": await descriptions(manager),
            "order_1": None if shared_id is None else shared_id.description,
            "pid": os.getpid(),
        }

    @tenancy.task(name="whoami_sync")
    def whoami_sync(prefix: str) -> str:
        """A sync task: it runs in the tenant's scope too."""
        return f"{prefix} {current_tenant().identifier}"

    @tenancy.task(name="suspend_then_retry", bind=True, max_retries=3)
    async def suspend_then_retry(self: Any) -> str:
        """First try: suspend the task's own tenant and retry, which must be refused."""
        if self.request.retries == 0:
            await manager.suspend_tenant(current_tenant())
            raise self.retry(countdown=0)
        return f"ran try {self.request.retries + 1} as {current_tenant().identifier}"

    @tenancy.task(name="fan_out")
    def fan_out() -> str:
        """A task that sends another: the tenant goes along."""
        return str(whoami_sync.delay("sent by a task to").id)

    return app, {task.name: task for task in (read_orders, whoami_sync, suspend_then_retry, fan_out)}


manager = TenancyManager(TenancyConfig(database_pool_size=1, database_max_overflow=0))
app, tasks = build(
    os.environ.get("FT_TEST_BROKER", "memory://"), os.environ.get("FT_TEST_QUEUE", "ft-unset"), manager
)
