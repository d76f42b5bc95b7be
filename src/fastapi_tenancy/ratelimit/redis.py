"""`RedisRateLimiter`: GCRA in one Lua script, shared by every worker."""

from collections.abc import Mapping

try:
    from redis.asyncio import Redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from .._utils import redis_client
from ..storage.redis import is_redis_outage
from .base import RateLimitDecision, RateLimiter

__all__ = ["RedisRateLimiter"]

# The whole check is one script, so Redis runs it atomically: concurrent requests from
# any number of workers can never both take the last slot. Times are microseconds from
# Redis's own clock (TIME), so workers' clocks need not agree. The TAT is written with
# an expiry at the moment the quota is full again, when the key carries no information.
_GCRA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > window then
  return {0, 0, string.format('%.0f', tat - now), string.format('%.0f', new_tat - window - now)}
end
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
local remaining = math.floor((window - (new_tat - now)) / interval + 1e-6)
return {1, remaining, string.format('%.0f', new_tat - now), '0'}
"""


class RedisRateLimiter(RateLimiter):
    """Limits counted in Redis, exact across every worker and host. Safe for concurrent use.

    One round trip per check: the script is sent once, then called by its SHA1
    (`EVALSHA`; redis-py loads it again by itself after a Redis restart). Keys are
    `<prefix>ratelimit:<tenant id>:<limit>:<window>`.

        limiter = RedisRateLimiter("redis://localhost:6379/0", requests=100, window=60)
    """

    def __init__(
        self,
        redis: "str | Redis",
        *,
        prefix: str = "tenancy:",
        timeout: float = 1.0,
        requests: int = 100,
        window: float = 60.0,
        plans: Mapping[str, int] | None = None,
        fail_open: bool = True,
    ) -> None:
        super().__init__(requests=requests, window=window, plans=plans, fail_open=fail_open)
        if isinstance(redis, str):
            self.redis: Redis = redis_client(redis, timeout=timeout)
            self._owns_client = True
        else:
            self.redis = redis
            self._owns_client = False
        self.prefix = prefix
        self._script = self.redis.register_script(_GCRA)

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def hit(self, key: str, limit: int, window: float) -> RateLimitDecision:
        allowed, remaining, reset_us, retry_us = await self._script(
            keys=[f"{self.prefix}ratelimit:{key}"], args=[limit, round(window * 1_000_000)]
        )
        return RateLimitDecision(
            allowed=bool(allowed),
            limit=limit,
            remaining=int(remaining),
            window=window,
            reset_after=int(reset_us) / 1_000_000,
            retry_after=int(retry_us) / 1_000_000,
        )

    def is_outage(self, exc: BaseException) -> bool:
        return is_redis_outage(exc)

    async def peek(self, key: str) -> float:
        # The TAT and Redis's own clock in one round trip, the clock the script uses.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(f"{self.prefix}ratelimit:{key}")
            pipe.time()
            tat, (seconds, micros) = await pipe.execute()
        if tat is None:
            return 0.0
        return max(int(tat) - (int(seconds) * 1_000_000 + int(micros)), 0) / 1_000_000
