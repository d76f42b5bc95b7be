"""`InvalidationChannel`: the contract of a cross-process invalidation channel."""

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

__all__ = ["InvalidationChannel"]

logger = logging.getLogger("fastapi_tenancy")

_PUBLISH_ATTEMPTS = 3


class InvalidationChannel(ABC):
    """Carries "tenant <identifier> changed" from the process that changed it to every worker.

    One per manager; its listener runs as a background task of the worker's event
    loop. Delivery is at most once, so the rule that makes it safe is: whenever the
    listener may have missed a message (it lost its connection, or is not connected
    yet), it calls `reset`, which drops the whole cache, and keeps calling it every
    `retry_interval` seconds until it is listening again. A worker is then never
    more than `retry_interval` behind, even while the channel is down.

    To add a channel, implement `_send`, `_listen_once` and `_is_outage`.
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
