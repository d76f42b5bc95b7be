"""`Pacing`: how many tenants a fleet run migrates at once, fixed or chosen from what it measures.

The right number depends on where the time of a tenant's migration goes, which the
runner cannot know in advance: the worker's own CPU (Alembic), the database server's
CPU (on the same machine or not), and waiting (commits reaching the disk, locks). So
with no `concurrency` given it measures: it starts with as many tenants in flight as
this process may use CPUs, and after each window of finished tenants compares their
throughput (tenants per second) with the best window so far. While one more tenant in
flight raised the throughput by at least `GAIN`, it adds another; at the first window
that did not, it goes back to the best width and keeps it for the rest of the run. It
never goes above `CEILING_PER_CPU` per CPU, nor above the number of tenants.
"""

import asyncio
import logging
import os
import time

__all__ = ["CEILING_PER_CPU", "GAIN", "Pacing", "usable_cpus"]

logger = logging.getLogger("fastapi_tenancy.migrations")

GAIN = 1.05
"""A wider window must be this much faster than the best one to keep widening."""

CEILING_PER_CPU = 4
"""At most this many tenants in flight per CPU when the width is chosen."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


class Pacing:
    """A gate for one run's tenants: `concurrency` wide, or tuned (None). Not shared between runs.

    pacing = Pacing(None, tenants=1000)
    async with pacing:
        ...  # one tenant's migration
    """

    def __init__(self, concurrency: int | None, *, tenants: int, cpus: int | None = None) -> None:
        cpus = cpus or usable_cpus()
        self.tuning = concurrency is None
        self.ceiling = max(1, min(tenants, concurrency or CEILING_PER_CPU * cpus))
        """The most tenants ever in flight: the size of the worker pool."""
        self.width = min(self.ceiling, concurrency or cpus)
        """Tenants in flight now."""
        self.windows: list[tuple[int, float]] = []
        """Each measured window: (width, tenants per second)."""
        self._best: tuple[int, float] | None = None
        self._active = 0
        self._finished = 0
        self._since = time.perf_counter()
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._active < self.width)
            self._active += 1

    async def __aexit__(self, *_exc: object) -> None:
        async with self._changed:
            self._active -= 1
            self._finished += 1
            if self.tuning and self._finished >= max(8, 4 * self.width):
                self._measure()
            self._changed.notify_all()

    def _measure(self) -> None:
        now = time.perf_counter()
        rate = self._finished / max(now - self._since, 1e-6)
        self.windows.append((self.width, rate))
        self._finished, self._since = 0, now
        if self._best is None or rate >= self._best[1] * GAIN:
            self._best = (self.width, rate)
            if self.width < self.ceiling:
                self.width += 1
                return
        else:
            self.width = self._best[0]
        self.tuning = False
        logger.info("fleet run: %d tenants at once (measured: %s)", self.width, self._summary())

    def _summary(self) -> str:
        return ", ".join(f"{width} -> {rate:.1f}/s" for width, rate in self.windows)
