"""Celery tasks that run as the tenant that sent them, or not at all.

`TenancyCelery(celery_app, manager)` gives the app a kind of task that carries the tenant
in a message header (`fastapi_tenancy`: its identifier and id), never in the task's
arguments. Sending one takes the current tenant (or `tenant=`); with neither, it raises
`TenantResolutionError` and nothing is sent. In the worker, before every try, the
tenant is read again from the registry: a task whose header is missing or malformed, or
names a tenant that is gone, suspended, deleted, still provisioning, or whose slug now
belongs to someone else, fails without running. A tenant in maintenance is not a
refusal: the task is retried after `maintenance_retry_after` seconds.

    # tasks.py, imported by the web app and by the worker
    celery_app = Celery("myapp", broker="amqp://guest:guest@localhost//")
    tenancy = TenancyCelery(celery_app, manager)

    @tenancy.task
    async def send_invoice(order_id: int) -> None:
        async with manager.session() as session: ...

    # in a route: runs in the worker as the request's tenant
    send_invoice.delay(order.id)

Task functions may be async (run on the worker process's event loop, where the manager
lives) or sync (run in the tenant's scope, as Celery calls them). Works with Celery's
`prefork` (default) and `solo` pools, which run one task at a time per process; the
`threads`, `gevent` and `eventlet` pools are refused. Needs
`pip install 'fastapi-tenancy[celery]'`.
"""

import asyncio
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, overload

from ..background import reverify_tenant
from ..context import current_tenant_or_none, tenant_scope
from ..errors import (
    ConfigurationError,
    MissingDependencyError,
    TenantMaintenanceError,
    TenantMismatchError,
    TenantResolutionError,
)
from ..manager import TenancyManager
from ..tenant import Tenant

try:
    from celery import Celery, Task
    from celery.signals import worker_process_shutdown, worker_shutdown
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("celery", "celery") from exc

__all__ = ["TENANT_HEADER", "TenancyCelery", "TenantTask"]

logger = logging.getLogger("fastapi_tenancy")

TENANT_HEADER = "fastapi_tenancy"
"""The message header that carries the tenant: `{"identifier": ..., "id": ...}`."""

T = TypeVar("T")


class _WorkerLoop:
    """The event loop of one worker process, where the manager is initialised and async tasks run.

    Made on first use in each process (a prefork child makes its own after the fork) and
    used from one thread only: the manager's pools belong to this loop.
    """

    def __init__(self, manager: TenancyManager) -> None:
        self.manager = manager
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._thread: int | None = None
        self._lock = threading.Lock()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` to completion on this process's loop, from the task's thread."""
        try:
            loop = self._current()
        except BaseException:
            work.close()
            raise
        task = loop.create_task(work)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            # Interrupted from outside (a soft time limit's exception, raised by a signal
            # handler): the coroutine must not linger and run during the next task.
            if not task.done():
                task.cancel()
                try:
                    loop.run_until_complete(task)
                except BaseException:  # noqa: S110 - the interruption is what to report
                    pass
            raise

    def _current(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            pid, thread = os.getpid(), threading.get_ident()
            if self._loop is not None and self._pid == pid:
                if thread != self._thread:
                    raise ConfigurationError(
                        "tenant tasks run one at a time per process: start the worker with the "
                        "prefork (default) or solo pool, not threads"
                    )
                return self._loop
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise ConfigurationError(
                    "a tenant task was called inside a running event loop: send it with .delay() "
                    "or .apply_async(), or await the function itself"
                )
            # A new process (the worker's first task, or a fork): a loop of its own.
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.manager.initialize())
            self._loop, self._pid, self._thread = loop, pid, thread
            return loop

    def close(self) -> None:
        """Close the manager and the loop, if this process made them (worker shutdown)."""
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None or self._pid != os.getpid():
                return
            try:
                loop.run_until_complete(self.manager.close())
            finally:
                loop.close()


class TenantTask(Task):  # type: ignore[misc]  # celery ships no type information
    """The base class of tenant tasks (`TenancyCelery.task` makes one per binding).

    `apply_async` adds the tenant header; `__call__` checks it against the registry and
    runs the task in the tenant's scope. Use `TenancyCelery.task` rather than this class.
    """

    tenancy: "TenancyCelery"

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        """Send the task as the current tenant, or as `tenant=` (a `Tenant`); see Celery's.

        Without either, `TenantResolutionError`: nothing is sent. Headers of a retry
        already carry the tenant; a different one there than the current tenant's is
        refused (`TenantMismatchError`).
        """
        given: Tenant | None = options.pop("tenant", None)
        headers = dict(options.pop("headers", None) or {})
        tenant = given if given is not None else current_tenant_or_none()
        carried = headers.get(TENANT_HEADER)
        if tenant is None:
            if carried is None:
                raise TenantResolutionError(
                    f"task {self.name} sent without a tenant: send it inside a tenant's scope or with tenant="
                )
            _carried(carried)  # a retry re-sent outside any scope: the tenant it was checked as
        else:
            header = {"identifier": tenant.identifier, "id": tenant.id}
            if given is None and carried is not None and carried != header:
                raise TenantMismatchError(
                    f"task {self.name}: its headers name another tenant than the current one"
                )
            headers[TENANT_HEADER] = header
        return super().apply_async(args, kwargs, task_id=task_id, headers=headers, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            # Called as a function (tests, or code already in the worker): the caller's tenant.
            tenant = current_tenant_or_none()
            if tenant is None:
                raise TenantResolutionError(f"task {self.name} called without a tenant in scope")
            identifier, tenant_id = tenant.identifier, tenant.id
        else:
            identifier, tenant_id = _carried(_header(request))
        loop = self.tenancy.loop
        try:
            verified = loop.run(reverify_tenant(self.tenancy.manager, identifier, tenant_id))
        except TenantMaintenanceError as exc:
            if request.called_directly:
                raise
            # Not refused for good: tried again once the maintenance should be over (each
            # try counts against the task's max_retries, after which the error stands).
            raise self.retry(exc=exc, countdown=exc.retry_after) from exc
        with tenant_scope(verified):
            return super().__call__(*args, **kwargs)


def _header(request: Any) -> object:
    headers = getattr(request, "headers", None)
    if isinstance(headers, Mapping) and TENANT_HEADER in headers:
        return headers[TENANT_HEADER]
    # Celery before 5.3 left custom headers on the request itself, not in `headers`.
    return getattr(request, TENANT_HEADER, None)


def _carried(value: object) -> tuple[str, str]:
    if isinstance(value, Mapping):
        identifier, tenant_id = value.get("identifier"), value.get("id")
        if isinstance(identifier, str) and isinstance(tenant_id, str) and identifier and tenant_id:
            return identifier, tenant_id
    raise TenantResolutionError("task sent without a tenant: refused (send it with a TenancyCelery task)")


class TenancyCelery:
    """Tenant tasks for one Celery app and one `TenancyManager`; one per application.

    `task` declares tasks like `celery_app.task` does, with the same options. In a
    worker, the manager is initialised on the first task of each process, on an event
    loop of that process, and closed when the process ends.
    """

    def __init__(self, app: Celery, manager: TenancyManager) -> None:
        self.app = app
        self.manager = manager
        self.loop = _WorkerLoop(manager)
        self.Task: type[TenantTask] = type("TenantTask", (TenantTask,), {"tenancy": self})
        # weak=False: the handlers live as long as this binding, which the app module keeps.
        worker_process_shutdown.connect(self._shutdown, weak=False)
        worker_shutdown.connect(self._shutdown, weak=False)

    def close(self) -> None:
        """Close the manager and the event loop this process's tasks ran on, if any.

        Worker processes do it at shutdown; call it where tasks ran in the calling
        process (`task_always_eager`, a test).
        """
        self.loop.close()

    def _shutdown(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.loop.close()
        except Exception:  # shutting down: say so, do not stop the other handlers
            logger.exception("closing the tenancy manager of a Celery worker process failed")

    @overload
    def task(self, func: Callable[..., Any], /) -> TenantTask: ...
    @overload
    def task(self, /, **options: Any) -> Callable[[Callable[..., Any]], TenantTask]: ...

    def task(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Declare a tenant task: `@tenancy.task` or `@tenancy.task(max_retries=5, ...)`.

        An async function runs on the worker process's event loop (so `manager.session()`
        works in it as in a route); a sync one runs as Celery calls it. Either way,
        `current_tenant()` is the task's tenant. `base=` is taken from this binding.
        """

        def declare(f: Callable[..., Any]) -> Any:
            if "base" in options:
                raise TypeError("tenancy.task sets the task's base class itself")
            run = self._sync(f) if inspect.iscoroutinefunction(f) else f
            return self.app.task(base=self.Task, **options)(run)

        return declare if func is None else declare(func)

    def _sync(self, func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        # Sync for Celery (its retry and autoretry machinery see every exception), async
        # inside: the coroutine runs on the process's loop, in the caller's context.
        loop = self.loop

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            return loop.run(func(*args, **kwargs))

        return run
