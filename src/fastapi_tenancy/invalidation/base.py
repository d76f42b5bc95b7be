"""`InvalidationChannel`: the contract of a cross-process invalidation channel, and `ChannelRecord`."""

import asyncio
import contextlib
import json
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["NO_CHANNEL", "ChannelRecord", "InvalidationChannel"]

logger = logging.getLogger("fastapi_tenancy")

_PUBLISH_ATTEMPTS = 3

ChannelKind = Literal["redis", "postgres", "none"]
BindMode = Literal["new", "join", "replace"]


@dataclass(frozen=True)
class ChannelRecord:
    """Where a process announces and hears tenant changes, as recorded in the registry.

    `kind` is the medium, `channel` the name messages travel under, `where` the server
    (for people: never a password), and `token` what tells one Redis from another
    whatever host name reaches it. `recorded_at` and `recorded_by` say which process
    recorded it. Two processes hear each other when `kind` and `channel` agree (and,
    on Redis, the server holds the token); see `fastapi_tenancy.invalidation.record`.
    """

    kind: ChannelKind
    channel: str = ""
    where: str = ""
    token: str = ""
    recorded_at: str = ""
    recorded_by: str = ""

    def same_channel(self, other: "ChannelRecord") -> bool:
        """Whether a message sent on one reaches listeners of the other (the server aside)."""
        return (self.kind, self.channel) == (other.kind, other.channel)

    def describe(self) -> str:
        """The channel in words, naming the settings that choose it."""
        if self.kind == "redis":
            prefix = self.channel.removesuffix("invalidate")
            return f"Redis pub/sub (redis_url={self.where}, redis_key_prefix={prefix!r})"
        if self.kind == "postgres":
            return f"LISTEN/NOTIFY on the registry's PostgreSQL ({self.where}, channel {self.channel!r})"
        return "no invalidation channel"

    def stamped(self) -> "ChannelRecord":
        """This record, saying that this process recorded it now."""
        by = f"{socket.gethostname()} pid {os.getpid()}"
        return replace(self, recorded_at=datetime.now(UTC).isoformat(timespec="seconds"), recorded_by=by)

    def dumps(self) -> str:
        """The record as the registry keeps it (JSON)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "ChannelRecord":
        """A record read back from the registry; unknown keys (from newer versions) are ignored."""
        data = json.loads(text)
        fields = {key: str(data[key]) for key in cls.__dataclass_fields__ if key in data}
        # A kind this version does not know (a newer one recorded it) is kept as it was
        # written: it then agrees with no channel this process can have.
        kind = cast(ChannelKind, fields.pop("kind", "none"))
        return cls(kind, **fields)


NO_CHANNEL = ChannelRecord("none")
"""The record of a process without a channel: other workers hear of its changes after `cache_ttl`."""


class InvalidationChannel(ABC):
    """Carries "tenant <identifier> changed" from the process that changed it to every worker.

    One per manager; its listener runs as a background task of the worker's event
    loop. Delivery is at most once, so the rule that makes it safe is: whenever the
    listener may have missed a message (it lost its connection, or is not connected
    yet), it calls `reset`, which drops the whole cache, and keeps calling it every
    `retry_interval` seconds until it is listening again. A worker is then never
    more than `retry_interval` behind, even while the channel is down.

    To add a channel, implement `_send`, `_listen_once`, `_is_outage` and `record`
    (and `bind`, when the channel's name alone does not say which server carries it).
    """

    def __init__(self, *, retry_interval: float = 0.5) -> None:
        self.retry_interval = retry_interval
        self.failures = 0
        """Publishes and connections that failed (outages)."""
        self.reconnects = 0
        """Times the listener (re)connected; each one dropped the cache."""
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._failing = False

    async def start(
        self, invalidate: Callable[[str], None], reset: Callable[[], None], *, wait: float = 2.0
    ) -> None:
        """Start listening; wait up to `wait` seconds for the subscription (then go on retrying)."""
        if self._task is not None:
            return
        self._listening = asyncio.Event()
        self._task = asyncio.create_task(self._run(invalidate, reset), name="fastapi-tenancy-invalidation")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), wait)

    async def close(self) -> None:
        """Stop listening and release connections. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(self, identifier: str) -> None:
        """Tell every listener that `identifier` changed. Never raises on an outage (logs, counts)."""
        error: BaseException | None = None
        # A few quick tries: after a server restart the first use of a pooled connection
        # fails, and a lost message would leave other workers stale until their TTL.
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                await self._send(identifier)
                return
            except Exception as exc:
                if not self._is_outage(exc):
                    raise
                error = exc
            await asyncio.sleep(0.05 * attempt)
        assert error is not None
        self._outage("publish", error)

    @abstractmethod
    def record(self) -> ChannelRecord:
        """What the registry records about this channel when this process is the first to start."""

    async def bind(self, record: ChannelRecord, *, mode: BindMode = "join") -> None:  # noqa: B027 - optional hook
        """Check that this process reaches the server `record` names; `ConfigurationError` if not.

        Called at `initialize()` with a record whose `kind` and `channel` agree with this
        channel's. `mode`: `"new"`, `record` is about to be recorded (the server must be
        no other registry's); `"join"`, it is the registry's record (the server must be
        the one it names, and is marked so again if the mark was lost); `"replace"`, it
        replaces the registry's record (mark the server as this registry's). The default
        checks nothing: the channel's name says it all.
        """

    def notice(self, engine: "AsyncEngine", identifier: str) -> "sa.Executable | None":
        """A statement that publishes `identifier` when run in a transaction on `engine`, or None.

        Only a channel carried by that database can (`PostgresInvalidation`: NOTIFY is
        sent on commit, and not at all on rollback). A registration runs it in the
        registry transaction that activates the tenant, instead of a `publish` after it.
        """
        return None

    @abstractmethod
    async def _send(self, identifier: str) -> None:
        """Send one message saying `identifier` changed."""

    @abstractmethod
    def _is_outage(self, exc: BaseException) -> bool:
        """True when `exc` means the channel's server is unreachable."""

    @abstractmethod
    async def _listen_once(
        self, invalidate: Callable[[str], None], reset: Callable[[], None], listening: Callable[[], None]
    ) -> None:
        """Connect, call `listening()` once subscribed, deliver messages until the connection fails."""

    async def _run(self, invalidate: Callable[[str], None], reset: Callable[[], None]) -> None:
        while True:
            reset()  # not listening: anything cached may already be stale

            def listening() -> None:
                # Messages sent before this point were missed: drop the cache once more.
                reset()
                self.reconnects += 1
                self._listening.set()
                if self._failing:
                    self._failing = False
                    logger.info("invalidation channel connected again; tenant cache dropped")

            try:
                await self._listen_once(invalidate, reset, listening)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._outage("listen", exc)
            self._listening.clear()
            reset()
            await asyncio.sleep(self.retry_interval)

    def _outage(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if not self._failing:
            self._failing = True
            logger.warning(
                "invalidation channel unavailable (%s: %s: %s); dropping the tenant cache every %.1fs "
                "until it is back",
                what,
                type(exc).__name__,
                exc,
                self.retry_interval,
            )
