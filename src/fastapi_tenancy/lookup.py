"""`TenantLookup`: identifier → tenant on the request path, from an in-process cache."""

import asyncio
from time import monotonic
from typing import TypeVar

from .storage.base import TenantStore
from .tenant import Tenant, validate_identifier

__all__ = ["TenantLookup"]

_V = TypeVar("_V")


class TenantLookup:
    """Serves tenant lookups from memory; one store read per identifier per TTL.

    Shared by all requests of one event loop. Known tenants are cached for `ttl`
    seconds, unknown identifiers for `negative_ttl` (so clients probing random
    slugs cannot make every request a registry query); both caches are bounded.
    Concurrent misses for one identifier share a single store read. `invalidate`
    is called by the manager on every change it makes; a read that started before
    an invalidation does not write its (possibly stale) result back.
    """

    def __init__(
        self,
        store: TenantStore,
        *,
        ttl: float = 30.0,
        max_size: int = 10_000,
        negative_ttl: float = 5.0,
        negative_max_size: int = 10_000,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.max_size = max_size
        self.negative_ttl = negative_ttl
        self.negative_max_size = negative_max_size
        self._hits: dict[str, tuple[Tenant, float]] = {}
        self._misses: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Tenant | None]] = {}
        self._generation = 0

    async def get(self, identifier: str) -> Tenant | None:
        """The tenant with this identifier, or None if there is none (or it is malformed)."""
        now = monotonic()
        hit = self._hits.get(identifier)
        if hit is not None and hit[1] > now:
            return hit[0]
        expires = self._misses.get(identifier)
        if expires is not None and expires > now:
            return None
        try:
            # Validate before the store sees it: a malformed identifier is never
            # queried and never takes a slot in the negative cache.
            validate_identifier(identifier)
        except ValueError:
            return None
        task = self._inflight.get(identifier)
        if task is None:
            task = asyncio.ensure_future(self._load(identifier))
            self._inflight[identifier] = task
            task.add_done_callback(lambda t: self._loaded(identifier, t))
        # shield: one waiter being cancelled must not cancel the read the others await.
        return await asyncio.shield(task)

    async def _load(self, identifier: str) -> Tenant | None:
        generation = self._generation
        tenant = await self.store.get_by_identifier(identifier)
        if generation == self._generation:
            self._remember(identifier, tenant)
        return tenant

    def _loaded(self, identifier: str, task: "asyncio.Task[Tenant | None]") -> None:
        if self._inflight.get(identifier) is task:
            del self._inflight[identifier]
        if not task.cancelled():
            task.exception()  # mark retrieved even if every waiter was cancelled

    def _remember(self, identifier: str, tenant: Tenant | None) -> None:
        now = monotonic()
        if tenant is not None:
            if self.ttl > 0:
                _bounded_put(self._hits, identifier, (tenant, now + self.ttl), self.max_size)
        elif self.negative_ttl > 0:
            _bounded_put(self._misses, identifier, now + self.negative_ttl, self.negative_max_size)

    def invalidate(self, identifier: str) -> None:
        """Forget what is known about `identifier`, and discard reads in flight."""
        self._generation += 1
        self._hits.pop(identifier, None)
        self._misses.pop(identifier, None)
        self._inflight.pop(identifier, None)

    def clear(self) -> None:
        """Forget everything."""
        self._generation += 1
        self._hits.clear()
        self._misses.clear()
        self._inflight.clear()

    def __len__(self) -> int:
        return len(self._hits) + len(self._misses)


def _bounded_put(cache: dict[str, _V], key: str, value: _V, max_size: int) -> None:
    cache.pop(key, None)
    while len(cache) >= max_size:
        cache.pop(next(iter(cache)))  # oldest insertion first
    cache[key] = value
