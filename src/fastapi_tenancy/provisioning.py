"""Provisioning pipelines: your steps, run when a tenant is registered (and by `tenants seed`).

A registration makes the tenant's storage (and, with `alembic_config`, brings it to head);
then the manager's `ProvisioningPipeline` runs the steps added to it, in order, each as
the new tenant (`current_tenant()`) with a session on its storage: seed reference data,
create the first admin user, tell another system. The tenant stays `provisioning`, served
to nobody, until every step has succeeded; when one fails, the steps already done are
undone (those given an `undo`), the storage is dropped, the registry row removed, and
`register_tenant` raises `ProvisioningError`: nothing of the tenant is left.

    @manager.provisioning.step
    async def seed_plans(tenant: Tenant, session: AsyncSession) -> None:
        session.add_all([Plan(name="free"), Plan(name="pro")])

`register_tenant(..., background=True)` returns at once, the tenant `provisioning`, and
queues the rest: a job of this process (`manager.provisioning.job(identifier)` says where it
is), a few at a time. Every process sees the tenant's status in the registry.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncSession

from .context import tenant_scope
from .errors import ConfigurationError, ProvisioningError
from .tenant import Tenant

if TYPE_CHECKING:
    from .isolation.base import Isolation

__all__ = ["ProvisioningJob", "ProvisioningPipeline", "ProvisioningStep", "Step", "UndoStep"]

logger = logging.getLogger("fastapi_tenancy")

ProvisioningStep = Callable[[Tenant, AsyncSession], Awaitable[None]]
"""A step: an async function of the new tenant and a session on its storage.

The pipeline commits the session when the step returns (roll back or raise to keep
nothing); outside it, `current_tenant()` is the new tenant too."""

UndoStep = Callable[[Tenant], Awaitable[None]]
"""What takes back a step's effect outside the tenant's storage (a webhook's), if a later step fails."""

S = TypeVar("S", bound=ProvisioningStep)

JobState = Literal["queued", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: its name (for logs, the audit log and `tenants seed --step`)."""

    name: str
    run: ProvisioningStep
    undo: UndoStep | None = None


class ProvisioningJob:
    """A background registration: where it is, and its outcome once it ends.

    `state` is `queued`, `running`, `succeeded` or `failed`; `step` the step running (or
    that failed); `error` the failure's message. `await job.wait()` returns the active
    tenant, or raises what the registration raised.
    """

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self.state: JobState = "queued"
        self.step: str | None = None
        self.error: str | None = None
        self.tenant: Tenant | None = None
        self._task: asyncio.Task[Tenant] | None = None

    async def wait(self) -> Tenant:
        """The tenant, active, once the job succeeded; its error if it failed."""
        assert self._task is not None  # set when the job is queued
        return await asyncio.shield(self._task)

    @property
    def done(self) -> bool:
        """True once the job succeeded or failed."""
        return self.state in ("succeeded", "failed")

    def __repr__(self) -> str:
        return f"ProvisioningJob({self.identifier!r}, state={self.state!r}, step={self.step!r})"


class ProvisioningPipeline:
    """The steps every new tenant goes through, and this process's background registrations.

    One per manager (`manager.provisioning`), shared by all its registrations: add steps at
    startup, before tenants are registered. `concurrency` background registrations run at
    once; the others wait in line (state `queued`). The last `keep` finished jobs stay
    visible through `job()`.
    """

    def __init__(self, *, concurrency: int = 2, keep: int = 1000) -> None:
        if concurrency < 1:
            raise ConfigurationError("provisioning concurrency must be at least 1")
        self._steps: list[Step] = []
        self._jobs: dict[str, ProvisioningJob] = {}
        self._concurrency = concurrency
        self._gate = asyncio.Semaphore(concurrency)
        self._keep = keep

    # -- the steps -----------------------------------------------------------------------

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps, in the order they run."""
        return tuple(self._steps)

    def add(self, step: ProvisioningStep, *, name: str | None = None, undo: UndoStep | None = None) -> Step:
        """Run `step` for every new tenant, after the steps added before it.

        `name` defaults to the function's name and must be unique. `undo(tenant)` is
        called if a later step fails: for effects outside the tenant's storage, which
        dropping the storage does not take back.
        """
        if not callable(step):
            raise TypeError(f"a provisioning step must be callable, not {type(step).__name__}")
        name = name or getattr(step, "__name__", None) or repr(step)
        if any(existing.name == name for existing in self._steps):
            raise ConfigurationError(f"there is already a provisioning step named {name!r}")
        added = Step(name, step, undo)
        self._steps.append(added)
        return added

    @overload
    def step(self, func: S, /) -> S: ...
    @overload
    def step(self, /, *, name: str | None = None, undo: UndoStep | None = None) -> Callable[[S], S]: ...

    def step(
        self,
        func: ProvisioningStep | None = None,
        /,
        *,
        name: str | None = None,
        undo: UndoStep | None = None,
    ) -> Any:
        """Decorator form of `add`: `@pipeline.step` or `@pipeline.step(undo=...)`."""

        def register(f: ProvisioningStep) -> ProvisioningStep:
            self.add(f, name=name, undo=undo)
            return f

        return register if func is None else register(func)

    def select(self, names: Iterable[str] | None) -> list[Step]:
        """The steps named (all of them for None), in pipeline order; unknown names raise."""
        if names is None:
            return list(self._steps)
        wanted = list(names)
        unknown = sorted(set(wanted) - {s.name for s in self._steps})
        if unknown:
            known = ", ".join(s.name for s in self._steps) or "none"
            raise ConfigurationError(f"no provisioning step named {', '.join(unknown)} (steps: {known})")
        return [s for s in self._steps if s.name in wanted]

    async def run(
        self,
        tenant: Tenant,
        isolation: "Isolation",
        *,
        steps: Sequence[Step] | None = None,
        job: ProvisioningJob | None = None,
    ) -> list[str]:
        """Run `steps` (default: all) for `tenant`, in its scope; the names of those that ran.

        Each step gets a fresh session on the tenant's storage, committed when it returns.
        A failing step rolls its session back, calls the `undo` of the steps before it (in
        reverse) and raises `ProvisioningError` naming the step, from the step's error.
        """
        done: list[Step] = []
        for step in self._steps if steps is None else steps:
            if job is not None:
                job.step = step.name
            try:
                with tenant_scope(tenant):
                    session = await isolation.session(tenant)
                    async with session:
                        await step.run(tenant, session)
                        await session.commit()
            except BaseException as exc:
                await asyncio.shield(self._undo(tenant, done))
                if not isinstance(exc, Exception):
                    raise
                raise ProvisioningError(
                    f"provisioning step {step.name!r} failed for tenant {tenant.identifier!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            done.append(step)
        return [step.name for step in done]

    async def _undo(self, tenant: Tenant, done: list[Step]) -> None:
        for step in reversed(done):
            if step.undo is None:
                continue
            try:
                with tenant_scope(tenant):
                    await step.undo(tenant)
            except Exception:  # the failure that started the undo matters more; say what is left
                logger.exception(
                    "could not undo provisioning step %r of tenant %s", step.name, tenant.identifier
                )

    # -- background registrations -----------------------------------------------------------

    def job(self, identifier: str) -> ProvisioningJob | None:
        """The latest background registration of `identifier` started by this process, if any."""
        return self._jobs.get(identifier)

    @property
    def jobs(self) -> tuple[ProvisioningJob, ...]:
        """This process's background registrations that are known, oldest first."""
        return tuple(self._jobs.values())

    def start(self, identifier: str, work: Callable[[ProvisioningJob], Awaitable[Tenant]]) -> ProvisioningJob:
        """Queue `work(job)` (the rest of a registration); it runs when a slot is free."""
        job = ProvisioningJob(identifier)
        self._jobs.pop(identifier, None)
        self._jobs[identifier] = job
        self._forget_finished()

        async def run() -> Tenant:
            async with self._gate:
                job.state = "running"
                try:
                    job.tenant = await work(job)
                except BaseException as exc:
                    job.state, job.error = "failed", str(exc) or type(exc).__name__
                    raise
                job.state = "succeeded"
                return job.tenant

        job._task = asyncio.ensure_future(run())
        # Failures are logged by the registration and kept on the job; mark them retrieved.
        job._task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return job

    def _forget_finished(self) -> None:
        finished = [i for i, j in self._jobs.items() if j.done]
        for identifier in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[identifier]

    async def close(self) -> None:
        """Cancel the registrations still queued or running (each is undone) and wait for them."""
        tasks = [job._task for job in self._jobs.values() if job._task is not None and not job._task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            logger.warning("shutting down: %d background registration(s) cancelled and undone", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)
        # A manager may start again in another event loop: a semaphore belongs to one.
        self._gate = asyncio.Semaphore(self._concurrency)
