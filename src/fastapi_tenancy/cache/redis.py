"""`RedisCacheBackend`: a cache shared by every process, on redis-py's asyncio client.

Needs `pip install 'fastapi-tenancy[redis]'`.
"""

from typing import Any

from ..errors import MissingDependencyError
from .base import CacheBackend

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("redis", "redis") from exc

__all__ = ["RedisCacheBackend"]

# Each operation reads the namespace's version and uses it in one server-side step:
# one round trip, and no window in which an invalidation lands between the two.
# The data key is built in the script, so this needs a single Redis (or one
# Redis Cluster slot), not keys spread over a cluster.
_GET = """
local version = redis.call('GET', KEYS[1]) or '0'
return redis.call('GET', ARGV[1] .. ':v' .. version .. ':' .. ARGV[2])
"""
_SET = """
local version = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[1] .. ':v' .. version .. ':' .. ARGV[2]
if ARGV[4] == '' then
  return redis.call('SET', key, ARGV[3])
end
return redis.call('SET', key, ARGV[3], 'PX', ARGV[4])
"""
_DELETE = """
local version = redis.call('GET', KEYS[1]) or '0'
return redis.call('DEL', ARGV[1] .. ':v' .. version .. ':' .. ARGV[2])
"""


class RedisCacheBackend(CacheBackend):
    """Entries in Redis. Safe for concurrent use by any number of processes.

    `redis` is a URL (the backend opens and closes its own client) or a
    `redis.asyncio.Redis` you manage. Invalidation is one `INCR` of the tenant's
    version key, `<namespace>:version`.

        backend = RedisCacheBackend("redis://localhost:6379/0")
    """

    def __init__(self, redis: "str | aioredis.Redis") -> None:
        if isinstance(redis, str):
            self.redis = aioredis.Redis.from_url(redis)
            self._owns_client = True
        else:
            self.redis = redis
            self._owns_client = False
        self._get = self.redis.register_script(_GET)
        self._set = self.redis.register_script(_SET)
        self._delete = self.redis.register_script(_DELETE)

    @staticmethod
    def _version_key(namespace: str) -> str:
        return f"{namespace}:version"

    async def get(self, namespace: str, key: str) -> bytes | None:
        value: Any = await self._get(keys=[self._version_key(namespace)], args=[namespace, key])
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else bytes(value)  # decode_responses=True

    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None:
        ttl_ms = "" if ttl is None else str(max(1, int(ttl * 1000)))
        await self._set(keys=[self._version_key(namespace)], args=[namespace, key, value, ttl_ms])

    async def delete(self, namespace: str, key: str) -> None:
        await self._delete(keys=[self._version_key(namespace)], args=[namespace, key])

    async def invalidate(self, namespace: str) -> None:
        await self.redis.incr(self._version_key(namespace))

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
