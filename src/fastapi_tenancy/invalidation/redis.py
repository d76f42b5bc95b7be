"""`RedisInvalidation`: tenant changes announced over Redis pub/sub."""

import logging
import uuid
from collections.abc import Callable

try:
    from redis.asyncio import Redis
    from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis") from exc

from ..errors import ConfigurationError
from ..storage.redis import is_redis_outage
from .base import BindMode, ChannelRecord, InvalidationChannel

__all__ = ["RedisInvalidation"]

logger = logging.getLogger("fastapi_tenancy")


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
        # Holds the token of the registry whose channel this Redis carries (see `bind`).
        self.registry_key = f"{prefix}invalidation:registry"

    def record(self) -> ChannelRecord:
        return ChannelRecord("redis", self.channel, where=self.where, token=uuid.uuid4().hex)

    @property
    def where(self) -> str:
        """The server this client reaches, as a URL without credentials."""
        pool = self.redis.connection_pool
        kwargs = pool.connection_kwargs
        db = kwargs.get("db", 0)
        if issubclass(pool.connection_class, UnixDomainSocketConnection):
            return f"unix://{kwargs.get('path', '')}?db={db}"
        scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
        return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"

    async def bind(self, record: ChannelRecord, *, mode: BindMode = "join") -> None:
        # One Redis may be reached under several names (a service name in the cluster,
        # localhost through a tunnel), and two servers may answer to one name in different
        # places: the registry's token, kept in the server itself, tells them apart.
        try:
            if mode == "replace":
                await self.redis.set(self.registry_key, record.token)
                return
            found = await self.redis.get(self.registry_key)
            if mode == "join" and found is None and record.where == self.where:
                # Lost (a restart without persistence, an eviction) on the server the
                # record names: put it back.
                await self.redis.set(self.registry_key, record.token, nx=True)
                found = await self.redis.get(self.registry_key)
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            # Not fatal, like the channel itself: the listener retries and drops the cache meanwhile.
            logger.warning("could not check that %s is this registry's Redis (%s)", self.where, exc)
            return
        if found == record.token or (mode == "new" and found is None):
            return
        if found is None:
            problem = (
                f"this process reaches Redis at {self.where}, which holds no mark of this registry, "
                f"while the registry's processes use {record.where}: if that is another server, "
                "their changes and this process's do not meet"
            )
            fix = f"set redis_url (TENANCY_REDIS_URL) to the Redis at {record.where}"
        else:
            problem = (
                f"the Redis at {self.where} carries {self.channel!r} for another registry (its key "
                f"{self.registry_key!r} holds another registry's mark): either it is not the Redis this "
                f"registry's processes use ({record.where or 'none recorded yet'}), or two deployments share "
                "one redis_key_prefix, and with it their invalidations and rate limits"
            )
            fix = (
                "point redis_url (TENANCY_REDIS_URL) at this registry's Redis, or give each deployment its "
                "own redis_key_prefix (TENANCY_REDIS_KEY_PREFIX)"
            )
        raise ConfigurationError(
            f"{problem}. Fix: {fix}. To make this Redis the registry's channel on purpose, run "
            "`fastapi-tenancy invalidation record` with this configuration (see the Deployment docs, "
            "'The invalidation channel')."
        )

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
