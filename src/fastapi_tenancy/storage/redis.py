"""`RedisTenantStore`: the tenant registry in Redis, or a Redis cache in front of another store."""

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import UTC, datetime
from enum import Enum
from typing import Any

try:
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from .._utils import redis_client
from ..errors import (
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
from ..tenant import Tenant, TenantStatus, thaw
from .base import TenantStore

__all__ = ["RedisTenantStore", "is_redis_outage"]

logger = logging.getLogger("fastapi_tenancy")

# The fields a tenant keeps for life; every other dataclass field is "mutable" and is
# stored as one JSON document, so fields added to `Tenant` flow through unchanged.
_FIXED = ("id", "identifier", "created_at")
_DATETIMES = frozenset(f.name for f in fields(Tenant) if f.type in (datetime, datetime | None))

# Hash layout of a registry record: id, identifier, created_at, status and updated_at as
# plain fields (the scripts compare and index them), the rest as JSON in "fields".
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'identifier', ARGV[2], 'created_at', ARGV[3],
           'status', ARGV[4], 'updated_at', ARGV[5], 'fields', ARGV[6])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('ZADD', KEYS[3] .. ':' .. ARGV[4], 0, ARGV[2])
return 1
"""

# Compare-and-set in one script: Redis runs it atomically, so no other client's write
# can land between the check of status/updated_at and the write.
_CREATE_ARGS = ("id", "identifier", "created_at", "status", "updated_at", "fields")

_UPDATE = """
local cur = redis.call('HMGET', KEYS[1], 'identifier', 'status', 'updated_at', 'created_at')
if not cur[1] then return {-1} end
if ARGV[4] == '1' and (cur[2] ~= ARGV[5] or cur[3] ~= ARGV[6]) then return {0} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2], 'fields', ARGV[3])
if cur[2] ~= ARGV[1] then
  redis.call('ZREM', KEYS[2] .. ':' .. cur[2], cur[1])
  redis.call('ZADD', KEYS[2] .. ':' .. ARGV[1], 0, cur[1])
end
return {1, cur[1], cur[4]}
"""

_DELETE = """
local cur = redis.call('HMGET', KEYS[1], 'identifier', 'status')
if not cur[1] then return 0 end
redis.call('DEL', KEYS[1], ARGV[1] .. cur[1])
redis.call('ZREM', KEYS[2], cur[1])
redis.call('ZREM', KEYS[2] .. ':' .. cur[2], cur[1])
return 1
"""

_GET_BY_IDENTIFIER = """
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
"""

# Cache fill: only if no invalidation happened since the reader looked (the version key
# is bumped by every invalidation), so a slow read can never cache a stale record.
_FILL = """
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def is_redis_outage(exc: BaseException) -> bool:
    """True when `exc` means Redis cannot be reached right now (not a command's own error)."""
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _stamp(value)
    if isinstance(value, Enum):
        return value.value
    return thaw(value)


def _encode(tenant: Tenant) -> dict[str, str]:
    """The tenant as flat strings: fixed fields, status, updated_at and the rest as JSON."""
    rest = {
        f.name: _plain(getattr(tenant, f.name))
        for f in fields(tenant)
        if f.name not in _FIXED and f.name not in ("status", "updated_at")
    }
    return {
        "id": tenant.id,
        "identifier": tenant.identifier,
        "created_at": _stamp(tenant.created_at),
        "status": tenant.status.value,
        "updated_at": _stamp(tenant.updated_at),
        "fields": json.dumps(rest, separators=(",", ":")),
    }


def _decode(record: Mapping[str, str]) -> Tenant:
    values: dict[str, Any] = json.loads(record["fields"])
    values.update(
        id=record["id"],
        identifier=record["identifier"],
        created_at=record["created_at"],
        status=TenantStatus(record["status"]),
        updated_at=record["updated_at"],
    )
    for name in _DATETIMES:
        if isinstance(values.get(name), str):
            values[name] = datetime.fromisoformat(values[name])
    known = {f.name for f in fields(Tenant)}
    # A field removed from Tenant since the record was written is ignored, not fatal.
    return Tenant(**{k: v for k, v in values.items() if k in known})


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisTenantStore(TenantStore):
    """The tenant registry in Redis, or a shared cache in front of another store. Safe for concurrent use.

    On its own it is the registry: every record is a Redis hash, changes are atomic
    Lua scripts (create refuses a taken id or slug; `update(expected=...)` is a
    compare-and-set), and when Redis is unreachable every call raises
    `TenancyUnavailableError` (a 503), never a driver error.

        store = RedisTenantStore("redis://localhost:6379/0")

    With `backend=`, it caches that store's lookups for `cache_ttl` seconds, shared
    by every worker; writes go to the backend and then invalidate the cache. When
    Redis is unreachable the cache steps aside: lookups go straight to the backend
    (logged once per outage, counted in `failures`), so a Redis outage never costs
    a request. Invalidations that could not reach Redis are retried before the
    cache is used again.

        store = RedisTenantStore("redis://localhost:6379/0", backend=SQLAlchemyTenantStore(url))

    `redis` is a URL (the store opens and closes its own client) or a
    `redis.asyncio.Redis` you manage, which must have `decode_responses=True`.
    Keys start with `prefix`. The scripts derive keys from that prefix, so the
    store needs a single Redis (or one Cluster hash slot), not a Cluster.
    """

    def __init__(
        self,
        redis: "str | Redis",
        *,
        prefix: str = "tenancy:",
        backend: TenantStore | None = None,
        cache_ttl: float = 30.0,
        timeout: float = 1.0,
    ) -> None:
        # Any: redis-py's type hints differ between releases (5.x types async results as
        # `Awaitable[T] | T`), and arq keeps 5.x installed beside us.
        self.redis: Any
        if isinstance(redis, str):
            self.redis = redis_client(redis, timeout=timeout)
            self._owns_client = True
        else:
            self.redis = redis
            self._owns_client = False
        self.prefix = prefix
        self.backend = backend
        self.cache_ttl = cache_ttl
        self.failures = 0
        """Redis calls that failed because Redis was unreachable (cache mode degrades on them)."""
        self._degraded = False
        self._pending: set[tuple[str, str]] = set()
        self._create = self.redis.register_script(_CREATE)
        self._update = self.redis.register_script(_UPDATE)
        self._delete = self.redis.register_script(_DELETE)
        self._get_by_identifier = self.redis.register_script(_GET_BY_IDENTIFIER)
        self._fill = self.redis.register_script(_FILL)

    # -- keys ------------------------------------------------------------------------

    def _tenant_key(self, tenant_id: str) -> str:
        return f"{self.prefix}tenant:{tenant_id}"

    def _ident_key(self, identifier: str) -> str:
        return f"{self.prefix}ident:{identifier}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}index"

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        if self.backend is not None:
            await self.backend.initialize()
            try:
                await self.redis.ping()
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self._failed(exc)
            return
        async with self._registry():
            await self.redis.ping()  # fail at startup, not on the first request

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
        if self._owns_client:
            await self.redis.aclose()

    # -- reads -----------------------------------------------------------------------

    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        if self.backend is not None:
            return await self._cached("id", tenant_id)
        async with self._registry():
            record: dict[str, str] = await self.redis.hgetall(self._tenant_key(tenant_id))
        return _decode(record) if record else None

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        if self.backend is not None:
            return await self._cached("identifier", identifier)
        async with self._registry():
            flat = await self._get_by_identifier(
                keys=[self._ident_key(identifier)], args=[self._tenant_key("")]
            )
        return _decode(_pairs(flat)) if flat else None

    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        if self.backend is not None:
            return await self.backend.list(status=status, after=after, limit=limit)
        index = self._index_key if status is None else f"{self._index_key}:{status.value}"
        async with self._registry():
            identifiers: list[str] = await self.redis.zrangebylex(
                index, "-" if after is None else f"({after}", "+", start=0, num=limit
            )
            async with self.redis.pipeline(transaction=False) as pipe:
                for identifier in identifiers:
                    await self._get_by_identifier(
                        keys=[self._ident_key(identifier)], args=[self._tenant_key("")], client=pipe
                    )
                records = await pipe.execute() if identifiers else []
        # A tenant deleted since the index was read has no record: skipped.
        return [_decode(_pairs(flat)) for flat in records if flat]

    async def count(self, *, status: TenantStatus | None = None) -> int:
        if self.backend is not None:
            return await self.backend.count(status=status)
        index = self._index_key if status is None else f"{self._index_key}:{status.value}"
        async with self._registry():
            return int(await self.redis.zcard(index))

    # -- writes ----------------------------------------------------------------------

    async def create(self, tenant: Tenant) -> Tenant:
        if self.backend is not None:
            created = await self.backend.create(tenant)
            await self._invalidate(created)
            return created
        record = _encode(tenant)
        async with self._registry():
            created_ok = await self._create(
                keys=[self._tenant_key(tenant.id), self._ident_key(tenant.identifier), self._index_key],
                args=[record[k] for k in _CREATE_ARGS],
            )
        if not created_ok:
            raise TenantAlreadyExistsError(f"tenant {tenant.identifier!r} already exists")
        return tenant

    async def update(self, tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        if self.backend is not None:
            try:
                saved = await self.backend.update(tenant, expected=expected)
            except BaseException:
                await self._invalidate(tenant)  # the id's entry, in case the write did land
                raise
            await self._invalidate(saved)  # the stored slug, whatever the caller's record said
            return saved
        record = _encode(tenant)
        check = ["0", "", ""]
        if expected is not None:
            check = ["1", expected.status.value, _stamp(expected.updated_at)]
        async with self._registry():
            result = await self._update(
                keys=[self._tenant_key(tenant.id), self._index_key],
                args=[record["status"], record["updated_at"], record["fields"], *check],
            )
        if result[0] == -1:
            raise TenantNotFoundError(f"no tenant with id {tenant.id!r}")
        if result[0] == 0:
            raise TenantChangedError(f"tenant {tenant.identifier!r} changed concurrently")
        # The slug and creation time come from what is stored, never from the caller.
        return _decode({**record, "identifier": result[1], "created_at": result[2]})

    async def delete(self, tenant_id: str) -> None:
        if self.backend is not None:
            tenant = await self.backend.get_by_id(tenant_id)
            await self.backend.delete(tenant_id)
            if tenant is not None:
                await self._invalidate(tenant)
            return
        async with self._registry():
            deleted = await self._delete(
                keys=[self._tenant_key(tenant_id), self._index_key], args=[self._ident_key("")]
            )
        if not deleted:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")

    # -- registry mode: outages are 503s -----------------------------------------------

    @asynccontextmanager
    async def _registry(self) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self.failures += 1
            raise TenancyUnavailableError(f"Redis tenant registry unavailable: {type(exc).__name__}") from exc

    # -- cache mode: outages fall back to the backend -------------------------------------

    def _cache_keys(self, kind: str, value: str) -> tuple[str, str]:
        return f"{self.prefix}cache:{kind}:{value}", f"{self.prefix}cache:version:{kind}:{value}"

    async def _cached(self, kind: str, value: str) -> Tenant | None:
        assert self.backend is not None
        key, version_key = self._cache_keys(kind, value)
        version: Any = None
        try:
            await self._flush_pending()
            cached, version = await self.redis.mget(key, version_key)
            if cached is not None:
                self._recovered()
                return _decode(json.loads(cached))
            self._recovered()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)
            version = None
        if kind == "id":
            tenant = await self.backend.get_by_id(value)
        else:
            tenant = await self.backend.get_by_identifier(value)
        if tenant is None or self.cache_ttl <= 0 or self._degraded:
            return tenant
        try:
            await self._fill(
                keys=[key, version_key],
                args=[version or "0", json.dumps(_encode(tenant)), max(1, int(self.cache_ttl * 1000))],
            )
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self._failed(exc)
        return tenant

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
