"""`TenantLookup`: the registry cache, identifier (or domain) → tenant on the request path, in memory.

Not the application cache (`fastapi_tenancy.cache`, the user's data): this one holds
tenant records in front of the `TenantStore`; `cache_ttl`, `cache_max_size` and
`negative_cache_*` configure it.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Generic, TypeVar

from .domain import Domain
from .storage.base import TenantStore, TenantVersion
from .tenant import Tenant, validate_identifier

__all__ = ["TenantLookup"]

logger = logging.getLogger("fastapi_tenancy")

_V = TypeVar("_V")

# Refresh-ahead: entries used within the last _KEEP_WARM TTLs are checked in batches of
# _VERSION_BATCH (one narrow registry query each) before they expire. Batches run one
# after another, each waiting its turn on a busy event loop (28 ms a batch, measured at
# 100,000 tenants in process): batches of 100 renewed 2,000 entries a second where
# 100,000 tenants need 3,300 (one per TTL), so a fifth of the requests found their entry
# expired and read the registry; 1,000 per query renews ten times as many per turn. A
# check of an unchanged tenant costs about 5 us of CPU, a miss about 900 us (a registry
# read): 40 checks of an entry that then serves one request still cost a quarter of the
# miss they save, and 40 TTLs (20 minutes at the default 30 s) keep 100,000 tenants warm
# in a worker that sees each of them only every few minutes. Changed tenants are built
# whole (tens of microseconds each): _REFRESH_BATCH of them at a time keeps that pause
# to a few milliseconds, where 500 showed in the p99 latency at 10,000 tenants. TTLs
# under _MIN_REFRESH_TTL seconds are left to expire (a sweep every few milliseconds
# would cost more than it saves).
_KEEP_WARM = 40
# A sweep walks every entry: about 9 ms of CPU at 100,000 (measured), held in one go it
# is a stall of every request in flight; slices of 10,000 keep each under a millisecond.
_SWEEP_SLICE = 10_000
_REFRESH_BATCH = 100
_VERSION_BATCH = 1000
_MIN_REFRESH_TTL = 2.0


class TenantLookup:
    """Serves tenant lookups from memory; one store read per identifier per TTL.

    Shared by all requests of one event loop. Known tenants are cached for `ttl`
    seconds, unknown identifiers for `negative_ttl` (so clients probing random
    slugs cannot make every request a registry query); both caches are bounded.
    Concurrent misses for one identifier share a single store read. `invalidate`
    is called by the manager on every change it makes; a read of that identifier
    that started before the invalidation does not write its (possibly stale) result
    back (reads of other identifiers are unaffected).

    Refresh-ahead: when `ttl` is at least two seconds, a background task sweeps the
    cache every `ttl / 4` seconds and checks, in batches of 100, every entry past half
    its TTL that was used within the last 40 TTLs: one registry query reads the
    batch's versions (`TenantStore.get_versions`: id, status, `updated_at`), and only
    the tenants whose version moved are read whole (`get_many`); a tenant gone from
    the registry is dropped. A busy tenant's entry is thus renewed before it expires,
    and its requests never wait for the registry; an entry served is still never older
    than `ttl` (its age counts from the start of the read that produced or confirmed
    it), and a failed refresh leaves the entries to expire as usual.
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
        # Tenants and their expiry times apart: a (tenant, expiry) pair per entry would
        # be one more object per cached tenant for the garbage collector to walk (a
        # dict of floats is not walked at all).
        self._hits: dict[str, Tenant] = {}
        self._expires: dict[str, float] = {}
        self._misses: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Tenant | None]] = {}
        # identifier -> the sweep during which its entry was last served: one int object per
        # sweep shared by all the entries served in it, where a time would be a float each.
        self._used: dict[str, int] = {}
        self._sweeps = 0
        self._refreshing: set[str] = set()  # identifiers whose batch read is in flight
        self._sweeper: asyncio.Task[None] | None = None
        self._invalidations = 0  # counts invalidate() and clear() calls: see _read_domain
        # Custom domains: a name -> (identifier, tenant id), and a tenant's domains by identifier.
        # Invalidated by name: the manager announces a domain change under the domain's name
        # and the tenant's identifier (identifiers have no dots, names do: they never meet).
        self._by_domain: _Entries[tuple[str, str]] = _Entries(
            self._read_domain,
            ttl=ttl,
            max_size=max_size,
            negative_ttl=negative_ttl,
            negative_max_size=negative_max_size,
        )
        self._domains_of: _Entries[tuple[Domain, ...]] = _Entries(
            self._read_domains_of,
            ttl=ttl,
            max_size=max_size,
            negative_ttl=negative_ttl,
            negative_max_size=negative_max_size,
        )

    async def get(self, identifier: str) -> Tenant | None:
        """The tenant with this identifier, or None if there is none (or it is malformed)."""
        now = monotonic()
        if self._expires.get(identifier, 0.0) > now:
            self._used[identifier] = self._sweeps
            return self._hits[identifier]
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
        started = monotonic()
        task = asyncio.current_task()
        tenant = await self.store.get_by_identifier(identifier)
        # Still the read in flight for this identifier: neither invalidated nor cleared since.
        if self._inflight.get(identifier) is task:
            self._remember(identifier, tenant, started)
        return tenant

    def _loaded(self, identifier: str, task: "asyncio.Task[Tenant | None]") -> None:
        if self._inflight.get(identifier) is task:
            del self._inflight[identifier]
        if not task.cancelled():
            task.exception()  # mark retrieved even if every waiter was cancelled

    def _remember(self, identifier: str, tenant: Tenant | None, started: float) -> None:
        if tenant is not None:
            if self.ttl > 0:
                self._hits.pop(identifier, None)
                self._expires.pop(identifier, None)
                used = self._used.pop(identifier, self._sweeps)
                while len(self._hits) >= self.max_size:
                    self._forget(next(iter(self._hits)))  # oldest insertion first
                # Keyed by the tenant's own copy of the slug (equal to `identifier`, which
                # often is the request's): one string per cached tenant, not two.
                key = tenant.identifier if tenant.identifier == identifier else identifier
                self._hits[key] = tenant
                self._expires[key] = started + self.ttl
                self._used[key] = used
                self._start_sweeper()
        elif self.negative_ttl > 0:
            _bounded_put(self._misses, identifier, started + self.negative_ttl, self.negative_max_size)

    # -- custom domains -----------------------------------------------------------

    async def get_by_domain(self, name: str) -> Tenant | None:
        """The tenant that holds the domain `name` (normalised: `validate_domain`), or None.

        Two dictionary lookups when cached: the domain's entry names the identifier, whose
        entry is the tenant's. The entry also keeps the tenant's id: a name that leads to
        another incarnation of the identifier (purged and registered again since it was
        read) is read again, and never serves the new tenant by the old one's domain.
        """
        for _ in range(2):
            held = await self._by_domain.get(name)
            if held is None:
                return None
            identifier, tenant_id = held
            tenant = await self.get(identifier)
            if tenant is not None and tenant.id == tenant_id:
                return tenant
            self._by_domain.invalidate(name)
        return None

    async def domains_of(self, identifier: str) -> tuple[Domain, ...]:
        """The custom domains of the tenant `identifier`, the primary first (empty for none)."""
        return await self._domains_of.get(identifier) or ()

    async def _read_domain(self, name: str) -> tuple[str, str] | None:
        started, invalidations = monotonic(), self._invalidations
        tenant = await self.store.get_by_domain(name)
        if tenant is None:
            return None
        identifier = tenant.identifier
        # The read brought the whole tenant: keep it, so that a cold request costs one registry
        # query, not two. Only if nothing at all was invalidated meanwhile (it may have been
        # this tenant) and no read of the identifier is in flight (it may be newer).
        if (
            self._invalidations == invalidations
            and identifier not in self._inflight
            and self._expires.get(identifier, 0.0) <= started
        ):
            self._remember(identifier, tenant, started)
        return identifier, tenant.id

    async def _read_domains_of(self, identifier: str) -> tuple[Domain, ...] | None:
        tenant = await self.get(identifier)
        return None if tenant is None else await self.store.get_domains(tenant.id)

    # -- refresh-ahead ------------------------------------------------------------

    def _start_sweeper(self) -> None:
        if self._sweeper is None and self.ttl >= _MIN_REFRESH_TTL:
            self._sweeper = asyncio.ensure_future(self._sweep())
            self._sweeper.add_done_callback(self._swept)

    def _swept(self, task: "asyncio.Task[None]") -> None:
        if self._sweeper is task:
            self._sweeper = None
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
            logger.error("tenant cache refresh stopped", exc_info=task.exception())

    async def _sweep(self) -> None:
        # Ends when nothing is cached any more; the next cached tenant starts it again.
        while self._hits:
            await asyncio.sleep(self.ttl / 4)
            now = monotonic()
            due = now + self.ttl / 2  # would expire before the sweep after next
            idle = self._sweeps - 4 * _KEEP_WARM  # sweeps run four times per TTL
            self._sweeps += 1
            keep: list[str] = []
            entries = list(self._expires.items())
            for start in range(0, len(entries), _SWEEP_SLICE):
                if start:
                    await asyncio.sleep(0)  # requests run between the slices of a large cache
                for identifier, expires in entries[start : start + _SWEEP_SLICE]:
                    if expires > due:
                        continue
                    if self._used.get(identifier, idle) > idle:
                        keep.append(identifier)
                    elif expires <= now and self._expires.get(identifier) == expires:
                        self._forget(identifier)  # expired and idle (and not read again meanwhile)
            if len(self._used) > len(self._hits):  # entries evicted by size or invalidated
                for identifier in [i for i in self._used if i not in self._hits]:
                    del self._used[identifier]
            for start in range(0, len(keep), _VERSION_BATCH):
                await self._refresh(keep[start : start + _VERSION_BATCH])
        for identifier in [i for i in self._used if i not in self._hits]:
            del self._used[identifier]

    async def _refresh(self, identifiers: list[str]) -> None:
        started = monotonic()
        batch = self._refreshing = set(identifiers)
        try:
            # First the versions alone (id, status, updated_at: one narrow query); whole
            # records only for the tenants whose version moved: in the steady state, none.
            versions = await self.store.get_versions(identifiers)
            expires = started + self.ttl  # one float for the whole batch
            changed = self._confirm(identifiers, batch, versions, expires)
            found: dict[str, Tenant] = {}
            for start in range(0, len(changed), _REFRESH_BATCH):  # built whole: a few at a time
                found.update(await self.store.get_many(changed[start : start + _REFRESH_BATCH]))
        except Exception as exc:  # an outage: the entries expire as they would have
            logger.debug("tenant cache refresh failed (%s: %s)", type(exc).__name__, exc)
            return
        finally:
            if self._refreshing is batch:
                self._refreshing = set()
        for identifier in changed:
            if identifier not in batch or identifier in self._inflight or identifier not in self._hits:
                continue  # invalidated, re-read or evicted while the records were read
            tenant = found.get(identifier)
            if tenant is None:  # deleted since its version was read: the next request reads it
                self._forget(identifier)
            else:  # read after `started`: no older than the versions were
                self._hits[identifier] = tenant
                self._expires[identifier] = expires

    def _confirm(
        self, identifiers: list[str], batch: set[str], versions: dict[str, TenantVersion], expires: float
    ) -> list[str]:
        """Renew the entries whose version is unchanged, drop those gone; return the changed ones."""
        changed: list[str] = []
        for identifier in identifiers:
            if identifier not in batch or identifier in self._inflight:
                continue  # invalidated (or cleared, or re-read) while the versions were read
            current = self._hits.get(identifier)
            seen = versions.get(identifier)
            if current is None:
                continue  # evicted meanwhile
            if seen is None:  # gone from the registry: the next request reads it again
                self._forget(identifier)
            elif seen == (current.id, current.status, current.updated_at):
                # Unchanged: the cached object stays (no new long-lived objects), for longer.
                self._expires[identifier] = expires
            else:
                changed.append(identifier)
        return changed

    def _forget(self, identifier: str) -> None:
        self._hits.pop(identifier, None)
        self._expires.pop(identifier, None)
        self._used.pop(identifier, None)

    def invalidate(self, identifier: str) -> None:
        """Forget what is known about `identifier` (or a domain of that name); discard reads in flight."""
        self._invalidations += 1
        self._forget(identifier)
        self._misses.pop(identifier, None)
        self._inflight.pop(identifier, None)
        self._refreshing.discard(identifier)
        self._by_domain.invalidate(identifier)
        self._domains_of.invalidate(identifier)

    def clear(self) -> None:
        """Forget everything (and stop refreshing until a tenant is cached again)."""
        self._invalidations += 1
        self._hits.clear()
        self._expires.clear()
        self._misses.clear()
        self._inflight.clear()
        self._used.clear()
        self._refreshing.clear()
        self._by_domain.clear()
        self._domains_of.clear()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and not sweeper.done():
            # It may belong to an event loop that is already closed (a manager restarted
            # in a new loop): then there is nothing left to stop.
            with contextlib.suppress(RuntimeError):
                sweeper.cancel()

    def __len__(self) -> int:
        return len(self._hits) + len(self._misses) + len(self._by_domain) + len(self._domains_of)


class _Entries(Generic[_V]):
    """A small cache for the lookups beside the main one (domains): key -> value, or "none".

    Values live `ttl` seconds, None (unknown) `negative_ttl`; each map is bounded, the
    oldest insertion going first. Concurrent misses of a key share one read; `invalidate`
    discards a read in flight, so it never writes back a value from before the change.
    An entry served in the second half of its life is read again in the background
    (one read per key at a time), so a busy key never waits for the registry; an entry
    served is never older than `ttl`, counted from the start of the read behind it.
    """

    def __init__(
        self,
        load: Callable[[str], Awaitable[_V | None]],
        *,
        ttl: float,
        max_size: int,
        negative_ttl: float,
        negative_max_size: int,
    ) -> None:
        self._load = load
        self.ttl = ttl
        self.max_size = max_size
        self.negative_ttl = negative_ttl
        self.negative_max_size = negative_max_size
        self._hits: dict[str, _V] = {}
        self._expires: dict[str, float] = {}
        self._misses: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[_V | None]] = {}

    async def get(self, key: str) -> _V | None:
        now = monotonic()
        expires = self._expires.get(key)
        if expires is not None and expires > now:
            if expires - now < self.ttl / 2 and self.ttl >= _MIN_REFRESH_TTL and key not in self._inflight:
                self._start(key)  # refresh ahead; this request is served from the cache
            return self._hits[key]
        missed = self._misses.get(key)
        if missed is not None and missed > now:
            return None
        task = self._inflight.get(key) or self._start(key)
        # shield: one waiter being cancelled must not cancel the read the others await.
        return await asyncio.shield(task)

    def _start(self, key: str) -> "asyncio.Task[_V | None]":
        task = asyncio.ensure_future(self._read(key))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._done(key, t))
        return task

    async def _read(self, key: str) -> _V | None:
        started = monotonic()
        task = asyncio.current_task()
        value = await self._load(key)
        if self._inflight.get(key) is task:  # neither invalidated nor cleared since
            self._remember(key, value, started)
        return value

    def _done(self, key: str, task: "asyncio.Task[_V | None]") -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved even when nobody awaited it (a refresh): the entry expires as it would have.
            logger.debug("registry cache read of %r failed: %r", key, task.exception())

    def _remember(self, key: str, value: _V | None, started: float) -> None:
        self._hits.pop(key, None)
        self._expires.pop(key, None)
        self._misses.pop(key, None)
        if value is not None:
            if self.ttl > 0:
                while len(self._hits) >= self.max_size:
                    oldest = next(iter(self._hits))  # oldest insertion first
                    del self._hits[oldest], self._expires[oldest]
                self._hits[key] = value
                self._expires[key] = started + self.ttl
        elif self.negative_ttl > 0:
            _bounded_put(self._misses, key, started + self.negative_ttl, self.negative_max_size)

    def invalidate(self, key: str) -> None:
        self._hits.pop(key, None)
        self._expires.pop(key, None)
        self._misses.pop(key, None)
        self._inflight.pop(key, None)

    def clear(self) -> None:
        self._hits.clear()
        self._expires.clear()
        self._misses.clear()
        self._inflight.clear()

    def __len__(self) -> int:
        return len(self._hits) + len(self._misses)


def _bounded_put(cache: dict[str, _V], key: str, value: _V, max_size: int) -> None:
    cache.pop(key, None)
    while len(cache) >= max_size:
        cache.pop(next(iter(cache)))  # oldest insertion first
    cache[key] = value
