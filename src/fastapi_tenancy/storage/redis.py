"""`RedisTenantStore`: the tenant registry in Redis.

To cache another store's lookups in Redis instead, wrap it in a `CachingTenantStore`
(`fastapi_tenancy.storage.caching`).
"""

import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

try:
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from .._utils import redis_client
from ..domain import Domain
from ..errors import (
    DomainNotFoundError,
    DomainTakenError,
    TenancyUnavailableError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
from ..tenant import Tenant, TenantStatus
from ._records import decode, encode, pairs, stamp
from .base import TenantStore, TenantVersion

__all__ = ["RedisTenantStore", "is_redis_outage"]

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

# The tenant's domains go with it (KEYS[3], the set of its names; KEYS[4], its primary).
_DELETE = """
local cur = redis.call('HMGET', KEYS[1], 'identifier', 'status')
if not cur[1] then return 0 end
redis.call('DEL', KEYS[1], ARGV[1] .. cur[1])
redis.call('ZREM', KEYS[2], cur[1])
redis.call('ZREM', KEYS[2] .. ':' .. cur[2], cur[1])
for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('GET', ARGV[2] .. name) == ARGV[3] then redis.call('DEL', ARGV[2] .. name) end
end
redis.call('DEL', KEYS[3], KEYS[4])
return 1
"""

# Custom domains: <prefix>domain:<name> holds the tenant's id; <prefix>domains:<id> the set of
# its names, <prefix>primary:<id> its primary one. Checked and written in one script each,
# so of two tenants adding one name, one wins.
_ADD_DOMAIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, 0} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
if ARGV[3] == '1' then redis.call('SET', KEYS[4], ARGV[2]) end
return {1, redis.call('GET', KEYS[4]) == ARGV[2] and 1 or 0}
"""

_REMOVE_DOMAIN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
"""

_GET_DOMAIN = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return {id, redis.call('GET', ARGV[1] .. id) == ARGV[2] and 1 or 0}
"""

_GET_BY_IDENTIFIER = """
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
"""

# Versions of many tenants in one round trip: (id, status, updated_at) per identifier key,
# or nil for an unknown identifier (ARGV[1]: the tenant key's prefix).
_GET_VERSIONS = """
local found = {}
for i, key in ipairs(KEYS) do
  found[i] = false
  local id = redis.call('GET', key)
  if id then
    local version = redis.call('HMGET', ARGV[1] .. id, 'status', 'updated_at')
    if version[1] then found[i] = {id, version[1], version[2]} end
  end
end
return found
"""


_CHANNEL_FIELD = "invalidation_channel"


def is_redis_outage(exc: BaseException) -> bool:
    """True when `exc` means Redis cannot be reached right now (not a command's own error)."""
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


class RedisTenantStore(TenantStore):
    """The tenant registry in Redis. Safe for concurrent use.

    Every record is a Redis hash; changes are atomic Lua scripts (create refuses a
    taken id or slug; `update(expected=...)` is a compare-and-set), and when Redis is
    unreachable every call raises `TenancyUnavailableError` (a 503), never a driver
    error.

        store = RedisTenantStore("redis://localhost:6379/0")

    `redis` is a URL (the store opens and closes its own client) or a
    `redis.asyncio.Redis` you manage, which must have `decode_responses=True`.
    Keys start with `prefix`. The scripts derive keys from that prefix, so the
    store needs a single Redis (or one Cluster hash slot), not a Cluster.

    Deprecated: `backend=` (with `cache_ttl=`) builds
    `CachingTenantStore(backend, redis, prefix=prefix, ttl=cache_ttl, timeout=timeout)`
    instead, a cache in front of `backend`; build that directly.
    """

    def __new__(
        cls,
        redis: "str | Redis",
        *,
        prefix: str = "tenancy:",
        backend: TenantStore | None = None,
        cache_ttl: float = 30.0,
        timeout: float = 1.0,
    ) -> Any:
        if backend is None:
            return super().__new__(cls)
        warnings.warn(
            "RedisTenantStore(backend=...) is deprecated: use "
            "CachingTenantStore(backend, redis, ttl=...) from fastapi_tenancy.storage.caching",
            DeprecationWarning,
            stacklevel=2,
        )
        # Imported here: caching.py imports this module (is_redis_outage).
        from .caching import CachingTenantStore

        return CachingTenantStore(backend, redis, prefix=prefix, ttl=cache_ttl, timeout=timeout)

    def __init__(
        self,
        redis: "str | Redis",
        *,
        prefix: str = "tenancy:",
        backend: TenantStore | None = None,
        cache_ttl: float = 30.0,
        timeout: float = 1.0,
    ) -> None:
        # `backend` and `cache_ttl` belong to __new__: given a backend, it returns a
        # CachingTenantStore, which Python does not pass to this __init__.
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
        self.failures = 0
        """Redis calls that failed because Redis was unreachable (each one a 503)."""
        self._create = self.redis.register_script(_CREATE)
        self._update = self.redis.register_script(_UPDATE)
        self._delete = self.redis.register_script(_DELETE)
        self._get_by_identifier = self.redis.register_script(_GET_BY_IDENTIFIER)
        self._get_versions = self.redis.register_script(_GET_VERSIONS)
        self._add_domain = self.redis.register_script(_ADD_DOMAIN)
        self._remove_domain = self.redis.register_script(_REMOVE_DOMAIN)
        self._get_domain = self.redis.register_script(_GET_DOMAIN)

    # -- keys ------------------------------------------------------------------------

    def _tenant_key(self, tenant_id: str) -> str:
        return f"{self.prefix}tenant:{tenant_id}"

    def _ident_key(self, identifier: str) -> str:
        return f"{self.prefix}ident:{identifier}"

    def _domain_key(self, name: str) -> str:
        return f"{self.prefix}domain:{name}"

    def _domains_key(self, tenant_id: str) -> str:
        return f"{self.prefix}domains:{tenant_id}"

    def _primary_key(self, tenant_id: str) -> str:
        return f"{self.prefix}primary:{tenant_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}index"

    @property
    def _settings_key(self) -> str:
        return f"{self.prefix}settings"

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        async with self._registry():
            await self.redis.ping()  # fail at startup, not on the first request

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    # -- the invalidation channel's record: a field of the registry's settings hash ------

    async def get_channel_record(self) -> str | None:
        async with self._registry():
            record: str | None = await self.redis.hget(self._settings_key, _CHANNEL_FIELD)
        return record

    async def set_channel_record(self, record: str, *, replace: bool = False) -> str:
        async with self._registry():
            if replace:
                await self.redis.hset(self._settings_key, _CHANNEL_FIELD, record)
                return record
            await self.redis.hsetnx(self._settings_key, _CHANNEL_FIELD, record)  # atomic: one wins
            in_force: str = await self.redis.hget(self._settings_key, _CHANNEL_FIELD)
        return in_force

    # -- reads -----------------------------------------------------------------------

    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        async with self._registry():
            record: dict[str, str] = await self.redis.hgetall(self._tenant_key(tenant_id))
        return decode(record) if record else None

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        async with self._registry():
            flat = await self._get_by_identifier(
                keys=[self._ident_key(identifier)], args=[self._tenant_key("")]
            )
        return decode(pairs(flat)) if flat else None

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        records = await self._records(list(dict.fromkeys(identifiers)))
        tenants = (decode(pairs(flat)) for flat in records if flat)
        return {tenant.identifier: tenant for tenant in tenants}

    async def get_versions(self, identifiers: Sequence[str]) -> dict[str, TenantVersion]:
        wanted = list(dict.fromkeys(identifiers))
        if not wanted:
            return {}
        async with self._registry():
            found = await self._get_versions(
                keys=[self._ident_key(i) for i in wanted], args=[self._tenant_key("")]
            )
        return {
            identifier: (version[0], version[1], datetime.fromisoformat(version[2]))
            for identifier, version in zip(wanted, found, strict=True)
            if version
        }

    async def _records(self, identifiers: list[str]) -> list[list[str]]:
        """The records of these identifiers as flat field lists (empty for unknown ones), one round trip."""
        if not identifiers:
            return []
        async with self._registry(), self.redis.pipeline(transaction=False) as pipe:
            for identifier in identifiers:
                await self._get_by_identifier(
                    keys=[self._ident_key(identifier)], args=[self._tenant_key("")], client=pipe
                )
            records: list[list[str]] = await pipe.execute()
        return records

    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        index = self._index_key if status is None else f"{self._index_key}:{status.value}"
        async with self._registry():
            identifiers: list[str] = await self.redis.zrangebylex(
                index, "-" if after is None else f"({after}", "+", start=0, num=limit
            )
        records = await self._records(identifiers)
        # A tenant deleted since the index was read has no record: skipped.
        return [decode(pairs(flat)) for flat in records if flat]

    async def count(self, *, status: TenantStatus | None = None) -> int:
        index = self._index_key if status is None else f"{self._index_key}:{status.value}"
        async with self._registry():
            return int(await self.redis.zcard(index))

    # -- writes ----------------------------------------------------------------------

    async def create(self, tenant: Tenant) -> Tenant:
        record = encode(tenant)
        async with self._registry():
            created_ok = await self._create(
                keys=[self._tenant_key(tenant.id), self._ident_key(tenant.identifier), self._index_key],
                args=[record[k] for k in _CREATE_ARGS],
            )
        if not created_ok:
            raise TenantAlreadyExistsError(f"tenant {tenant.identifier!r} already exists")
        return tenant

    async def update(self, tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        record = encode(tenant)
        check = ["0", "", ""]
        if expected is not None:
            check = ["1", expected.status.value, stamp(expected.updated_at)]
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
        return decode({**record, "identifier": result[1], "created_at": result[2]})

    async def delete(self, tenant_id: str) -> None:
        async with self._registry():
            deleted = await self._delete(
                keys=[
                    self._tenant_key(tenant_id),
                    self._index_key,
                    self._domains_key(tenant_id),
                    self._primary_key(tenant_id),
                ],
                args=[self._ident_key(""), self._domain_key(""), tenant_id],
            )
        if not deleted:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")

    # -- custom domains ------------------------------------------------------------------

    keeps_domains = True

    async def get_domain(self, name: str) -> Domain | None:
        async with self._registry():
            found = await self._get_domain(keys=[self._domain_key(name)], args=[self._primary_key(""), name])
        return None if not found else Domain(name, found[0], primary=bool(found[1]))

    async def get_by_domain(self, name: str) -> Tenant | None:
        # The identifier script reads any key that holds a tenant id: one round trip.
        async with self._registry():
            flat = await self._get_by_identifier(keys=[self._domain_key(name)], args=[self._tenant_key("")])
        return decode(pairs(flat)) if flat else None

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        async with self._registry(), self.redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self._domains_key(tenant_id))
            pipe.get(self._primary_key(tenant_id))
            names, primary = await pipe.execute()
        domains = [Domain(name, tenant_id, primary=name == primary) for name in sorted(names)]
        return tuple(sorted(domains, key=lambda domain: not domain.primary))

    async def add_domain(self, domain: Domain) -> Domain:
        tenant_id = domain.tenant_id
        async with self._registry():
            added, primary = await self._add_domain(
                keys=[
                    self._tenant_key(tenant_id),
                    self._domain_key(domain.name),
                    self._domains_key(tenant_id),
                    self._primary_key(tenant_id),
                ],
                args=[tenant_id, domain.name, "1" if domain.primary else "0"],
            )
        if added == -1:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")
        if added == 0:
            raise DomainTakenError(f"{domain.name} belongs to another tenant")
        return Domain(domain.name, tenant_id, primary=bool(primary))

    async def remove_domain(self, name: str, *, tenant_id: str) -> None:
        async with self._registry():
            removed = await self._remove_domain(
                keys=[self._domain_key(name), self._domains_key(tenant_id), self._primary_key(tenant_id)],
                args=[tenant_id, name],
            )
        if not removed:
            raise DomainNotFoundError(f"{name} is not a domain of tenant id {tenant_id!r}")

    # -- outages are 503s --------------------------------------------------------------

    @asynccontextmanager
    async def _registry(self) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            self.failures += 1
            raise TenancyUnavailableError(f"Redis tenant registry unavailable: {type(exc).__name__}") from exc
