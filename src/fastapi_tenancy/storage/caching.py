"""`CachingTenantStore`: any store, with its lookups cached in Redis for every worker.

A store in front of a store: it holds the registry (`backend`) and answers lookups from
a Redis cache that all workers share, so a new worker or a cold in-process registry
cache does not send every request to the database. Needs `pip install
'fastapi-tenancy[redis]'`.
"""

import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

try:
    from redis.asyncio import Redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from sqlalchemy.ext.asyncio import AsyncEngine

from .._utils import redis_client
from ..domain import Domain
from ..tenant import Tenant, TenantStatus
from ._records import decode, encode
from .base import TenantStore, TenantVersion
from .redis import is_redis_outage

__all__ = ["CachingTenantStore"]

logger = logging.getLogger("fastapi_tenancy")

# Cache fill: only if no invalidation happened since the reader looked (the version key
# is bumped by every invalidation), so a slow read can never cache a stale record.
_FILL = """
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class CachingTenantStore(TenantStore):
    """`backend`, with lookups cached in Redis and shared by every worker. Safe for concurrent use.

    Lookups by id and by identifier (and `get_many`) are served from Redis for `ttl`
    seconds; a miss reads `backend` and fills the cache. Writes go to `backend`, then
    drop the tenant's entries, so `update(expected=...)` keeps the backend's
    compare-and-set. `list`, `count` and `iterate` always read `backend`. When Redis
    is unreachable the cache steps aside: lookups go to `backend` directly (logged
    once per outage, counted in `failures`), so a Redis outage never costs a request;
    drops that could not reach Redis are retried before the cache is used again.
    Custom domains are the backend's: their reads and writes go to it uncached (the
    manager's registry cache keeps them in memory).

        store = CachingTenantStore(SQLAlchemyTenantStore(url), "redis://localhost:6379/0")

    `redis` is a URL (the store opens and closes its own client) or a
    `redis.asyncio.Redis` you manage, which must have `decode_responses=True`. Keys
    start with `prefix` + `cache:`. `initialize()` and `close()` pass on to `backend`.
    """

    def __init__(
        self,
        backend: TenantStore,
        redis: "str | Redis",
        *,
        prefix: str = "tenancy:",
        ttl: float = 30.0,
        timeout: float = 1.0,
    ) -> None:
        # Any: redis-py's type hints differ between releases (see storage/redis.py).
        self.redis: Any
        if isinstance(redis, str):
            self.redis = redis_client(redis, timeout=timeout)
            self._owns_client = True
        else:
            self.redis = redis
            self._owns_client = False
        self.backend = backend
        self.keeps_domains = backend.keeps_domains
        self.prefix = prefix
        self.ttl = ttl
        self.failures = 0
        """Redis calls that failed because Redis was unreachable (the cache stepped aside)."""
        self._degraded = False
        self._pending: set[tuple[str, str]] = set()
        self._fill = self.redis.register_script(_FILL)

    # -- lifecycle -------------------------------------------------------------------

    async def problem(self) -> str | None:
        return await self.backend.problem()

    async def initialize(self) -> None:
        await self.backend.initialize()
        try:
            await self.redis.ping()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)  # the cache is optional: start without it

    async def close(self) -> None:
        await self.backend.close()
        if self._owns_client:
            await self.redis.aclose()

    def configure(self, *, pgbouncer: bool) -> None:
        self.backend.configure(pgbouncer=pgbouncer)

    def notify_engine(self) -> AsyncEngine | None:
        # The registry is the backend's: its workers listen where it lives.
        return self.backend.notify_engine()

    def registry_store(self) -> TenantStore:
        return self.backend.registry_store()

    async def get_channel_record(self) -> str | None:
        return await self.backend.get_channel_record()

    async def set_channel_record(self, record: str, *, replace: bool = False) -> str:
        return await self.backend.set_channel_record(record, replace=replace)

    # -- reads -----------------------------------------------------------------------

    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        return await self._cached("id", tenant_id)

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        return await self._cached("identifier", identifier)

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        """The cached ones from one Redis read, the others from one `backend.get_many`."""
        wanted = list(dict.fromkeys(identifiers))
        if not wanted:
            return {}
        try:
            await self._flush_pending()
            keys = [key for slug in wanted for key in self._cache_keys("identifier", slug)]
            values = await self.redis.mget(keys)
            self._recovered()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)
            return await self.backend.get_many(wanted)
        found: dict[str, Tenant] = {}
        versions: dict[str, str] = {}
        for slug, cached, version in zip(wanted, values[::2], values[1::2], strict=True):
            if cached is not None:
                found[slug] = decode(json.loads(cached))
            else:
                versions[slug] = version or "0"
        if versions:
            read = await self.backend.get_many(list(versions))
            found.update(read)
            await self._fill_many({slug: (versions[slug], tenant) for slug, tenant in read.items()})
        return {slug: found[slug] for slug in wanted if slug in found}

    async def get_versions(self, identifiers: Sequence[str]) -> dict[str, TenantVersion]:
        """The cached ones' from one Redis read (no `Tenant` built), the others' from `backend`."""
        wanted = list(dict.fromkeys(identifiers))
        if not wanted:
            return {}
        try:
            await self._flush_pending()
            values = await self.redis.mget([self._cache_keys("identifier", slug)[0] for slug in wanted])
            self._recovered()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)
            return await self.backend.get_versions(wanted)
        found: dict[str, TenantVersion] = {}
        missing: list[str] = []
        for slug, cached in zip(wanted, values, strict=True):
            if cached is None:
                missing.append(slug)
            else:
                record = json.loads(cached)
                found[slug] = (record["id"], record["status"], datetime.fromisoformat(record["updated_at"]))
        if missing:
            # Not cached: their versions alone are not worth an entry (a miss caches whole records).
            found.update(await self.backend.get_versions(missing))
        return {slug: found[slug] for slug in wanted if slug in found}

    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        return await self.backend.list(status=status, after=after, limit=limit)

    async def iterate(self, *, status: TenantStatus | None = None, page: int = 500) -> AsyncIterator[Tenant]:
        async for tenant in self.backend.iterate(status=status, page=page):
            yield tenant

    async def count(self, *, status: TenantStatus | None = None) -> int:
        return await self.backend.count(status=status)

    # -- custom domains: the backend's, read and written directly -----------------------

    async def get_domain(self, name: str) -> Domain | None:
        return await self.backend.get_domain(name)

    async def get_by_domain(self, name: str) -> Tenant | None:
        return await self.backend.get_by_domain(name)

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        return await self.backend.get_domains(tenant_id)

    async def add_domain(self, domain: Domain) -> Domain:
        return await self.backend.add_domain(domain)

    async def remove_domain(self, name: str, *, tenant_id: str) -> None:
        await self.backend.remove_domain(name, tenant_id=tenant_id)

    # -- writes: the backend decides, then the cache forgets ---------------------------

    async def create(self, tenant: Tenant) -> Tenant:
        created = await self.backend.create(tenant)
        await self._invalidate(created)
        return created

    async def update(self, tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        try:
            saved = await self.backend.update(tenant, expected=expected)
        except BaseException:
            # The id's entry, in case the write did land; and after a lost
            # compare-and-set, so the next read (change()'s retry) sees what won.
            await self._invalidate(tenant)
            raise
        await self._invalidate(saved)  # the stored slug, whatever the caller's record said
        return saved

    async def delete(self, tenant_id: str) -> None:
        tenant = await self.backend.get_by_id(tenant_id)  # its slug, to drop that entry too
        await self.backend.delete(tenant_id)
        if tenant is not None:
            await self._invalidate(tenant)

    # -- the cache: outages fall back to the backend -----------------------------------

    def _cache_keys(self, kind: str, value: str) -> tuple[str, str]:
        return f"{self.prefix}cache:{kind}:{value}", f"{self.prefix}cache:version:{kind}:{value}"

    async def _cached(self, kind: str, value: str) -> Tenant | None:
        key, version_key = self._cache_keys(kind, value)
        version: Any = None
        try:
            await self._flush_pending()
            cached, version = await self.redis.mget(key, version_key)
            self._recovered()
            if cached is not None:
                return decode(json.loads(cached))
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)
        if kind == "id":
            tenant = await self.backend.get_by_id(value)
        else:
            tenant = await self.backend.get_by_identifier(value)
        if tenant is not None:
            await self._fill_many({value: (version or "0", tenant)}, kind=kind)
        return tenant

    async def _fill_many(self, entries: dict[str, tuple[str, Tenant]], *, kind: str = "identifier") -> None:
        """Cache each tenant under `kind`, unless invalidated since its version was read."""
        if not entries or self.ttl <= 0 or self._degraded:
            return
        ttl_ms = max(1, int(self.ttl * 1000))
        calls = [
            (list(self._cache_keys(kind, value)), [version, json.dumps(encode(tenant)), ttl_ms])
            for value, (version, tenant) in entries.items()
        ]
        try:
            if len(calls) == 1:  # one round trip: a pipeline would first ask SCRIPT EXISTS
                await self._fill(keys=calls[0][0], args=calls[0][1])
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._fill(keys=keys, args=args, client=pipe)
                await pipe.execute()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)

    async def _invalidate(self, tenant: Tenant) -> None:
        self._pending.add((tenant.id, tenant.identifier))
        try:
            await self._flush_pending()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)

    async def _flush_pending(self) -> None:
        while self._pending:
            tenant_id, identifier = next(iter(self._pending))
            async with self.redis.pipeline(transaction=True) as pipe:
                for kind, value in (("id", tenant_id), ("identifier", identifier)):
                    key, version_key = self._cache_keys(kind, value)
                    pipe.incr(version_key)
                    pipe.delete(key)
                await pipe.execute()
            self._pending.discard((tenant_id, identifier))

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self._degraded:
            self._degraded = True
            logger.warning("Redis tenant cache unavailable (%s); reading the backend store directly", exc)

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            logger.info("Redis tenant cache reachable again")
