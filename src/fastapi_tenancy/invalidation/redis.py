"""`RedisInvalidation`: tenant changes announced over Redis pub/sub."""

from collections.abc import Callable

try:
    from redis.asyncio import Redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from ..storage.redis import is_redis_outage
from .base import InvalidationChannel

__all__ = ["RedisInvalidation"]


class RedisInvalidation(InvalidationChannel):
    """Invalidation over a Redis pub/sub channel (`<prefix>invalidate`). Safe for concurrent use.

    redis-py may reconnect a subscription by itself; every reconnection shows as a
    new "subscribe" confirmation, and each one drops the cache, since messages
    published while it was away are lost.
    """

    def __init__(self, redis: Redis, *, prefix: str = "tenancy:", retry_interval: float = 0.5) -> None:
        super().__init__(retry_interval=retry_interval)
        self.redis = redis
        self.channel = f"{prefix}invalidate"

    async def _send(self, identifier: str) -> None:
        await self.redis.publish(self.channel, identifier)

    def _is_outage(self, exc: BaseException) -> bool:
        return is_redis_outage(exc)

    async def _listen_once(
        self, invalidate: Callable[[str], None], reset: Callable[[], None], listening: Callable[[], None]
    ) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            while True:
                # The timeout only bounds the wait, so the loop notices cancellation.
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    listening()
                elif message["type"] == "message":
                    data = message["data"]
                    invalidate(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
