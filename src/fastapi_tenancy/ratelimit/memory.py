"""`MemoryRateLimiter`: GCRA counted in this process's memory."""

from collections.abc import Mapping
from time import monotonic

from .base import RateLimitDecision, RateLimiter, gcra

__all__ = ["MemoryRateLimiter"]


class MemoryRateLimiter(RateLimiter):
    """Limits counted in process memory. Safe for concurrent requests of one event loop.

    For a single process (the embedded SQLite default, tests): each worker process
    counts on its own, so with several workers use `RedisRateLimiter`. Holds one
    number per recently active tenant; at most `max_keys` (idle ones go first).
    """

    def __init__(
        self,
        *,
        requests: int = 100,
        window: float = 60.0,
        plans: Mapping[str, int] | None = None,
        fail_open: bool = True,
        max_keys: int = 100_000,
    ) -> None:
        super().__init__(requests=requests, window=window, plans=plans, fail_open=fail_open)
        self.max_keys = max_keys
        self._tats: dict[str, float] = {}

    async def hit(self, key: str, limit: int, window: float) -> RateLimitDecision:
        # No await between read and write: atomic within the event loop.
        now = monotonic()
        new_tat, decision = gcra(self._tats.get(key, now), now, limit, window)
        if new_tat is not None:
            if key not in self._tats and len(self._tats) >= self.max_keys:
                self._evict(now)
            self._tats[key] = new_tat
        return decision

    async def peek(self, key: str) -> float:
        tat = self._tats.get(key)
        return 0.0 if tat is None else max(tat - monotonic(), 0.0)

    def _evict(self, now: float) -> None:
        # A TAT in the past means a full quota: forgetting it changes nothing.
        for key in [key for key, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        while len(self._tats) >= self.max_keys:
            del self._tats[next(iter(self._tats))]
