"""The connection pools of the library's engines.

`HandOffPool` is SQLAlchemy's asyncio queue pool that never closes a connection someone is
waiting for; `MemoryPool` lends the one connection of an in-memory SQLite database.
"""

import asyncio
import time
from typing import Any, TypeVar, cast

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sa_queue
from sqlalchemy.util.langhelpers import memoized_property

from .errors import ConfigurationError

__all__ = ["HandOffPool", "MemoryPool"]

_T = TypeVar("_T")


class _HandOffQueue(sa_queue.AsyncAdaptedQueue[_T]):
    """SQLAlchemy's asyncio queue, full only when its idle items outnumber its waiters by `maxsize`.

    `asyncio.Queue` leaves the item a `put` hands to a waiting `get` in the queue until
    that getter's task runs. When several connections come back in one turn of the event
    loop (a burst of responses) before their getters run, the queue looks full of idle
    connections while every one of them is spoken for, and SQLAlchemy's pool closes the
    next one returned ("overflow" beyond the pool size); the very next checkout then
    opens a new one: a connect, a new server process and cold caches, per request
    in the burst. Here the items a waiter will take are not counted as idle.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self.waiting = 0
        """Checkouts waiting in `get()` (woken ones too, until their task runs)."""

    @memoized_property
    def _queue(self) -> "asyncio.Queue[_T]":
        # Unbounded: put_nowait() below bounds the idle items. Created on first use, in
        # the event loop that uses it (as SQLAlchemy's own).
        return asyncio.LifoQueue() if self.use_lifo else asyncio.Queue()

    def excess(self) -> int:
        """Idle items beyond `maxsize`, not counting those the waiting checkouts will take."""
        return self._queue.qsize() - self.waiting - self.maxsize if self.maxsize > 0 else 0

    def full(self) -> bool:
        return self.excess() >= 0 and self.maxsize > 0

    def put_nowait(self, item: _T) -> None:
        if self.full():
            raise sa_queue.Full()
        self._queue.put_nowait(item)

    def get(self, block: bool = True, timeout: float | None = None) -> _T:
        if not block:
            return self.get_nowait()
        self.waiting += 1
        try:
            return super().get(block, timeout)
        finally:
            self.waiting -= 1


class HandOffPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's `AsyncAdaptedQueuePool`, except that it closes no connection a checkout
    is waiting for, nor one that a burst just needed.

    The same limits: at most `pool_size + max_overflow` connections open, and once the
    pool has been idle for `overflow_idle` seconds, at most `pool_size` of them. Two
    things differ, both about overflow connections (those beyond `pool_size`):

    - one given back while checkouts wait goes to one of them. SQLAlchemy's pool counts
      connections already handed to waiting checkouts as idle, closes the overflow ones
      given back after them, and opens new ones for the next checkouts;
    - one given back while no one waits stays open for `overflow_idle` seconds (5) and
      is closed only if it was not checked out again meanwhile, oldest first. SQLAlchemy's
      closes it at once, so a load that needs a few more connections than `pool_size`
      opens and closes one for most of its requests (a connect, a new server process or
      thread, cold caches).

    Measured under 32 clients (`benchmarks/saturation.py`): PostgreSQL, one pool of
    10 + 10, 12.6 connections opened per 1,000 requests with SQLAlchemy's pool and 1.7
    with the first change alone; SQLite, a pool of 2 + 8 per tenant file over 10 tenants,
    a connection opened for 27 % of requests without the second.
    """

    _queue_class = _HandOffQueue[ConnectionPoolEntry]
    _pool: _HandOffQueue[ConnectionPoolEntry]

    overflow_idle = 5.0
    """Seconds an overflow connection stays open while no one checks it out."""

    _trim_at: asyncio.TimerHandle | None = None
    _trimming: "asyncio.Task[None] | None" = None

    discard_closed = True
    """Refuse a pooled connection its driver already knows is closed, and open another.

    A database restart closes every pooled connection, but SQLAlchemy invalidates only
    the pool that sees the error: with a registry pool and tenant pools, the tenant
    pools still held dead connections after the outage, and the first request after
    recovery was a 503. The driver has already read the server's close (asyncpg's
    `is_closed()`, the end of the stream aiomysql reads from), so asking costs no round
    trip, where `pool_pre_ping` costs one per checkout (with it, this check is skipped).
    Every connection of the pool older than the closed one is then dropped and connected
    anew, as SQLAlchemy does for an `InvalidatePoolError` (an error then, the server still
    down, is the usual 503). A connection cut off without a word (a network partition)
    still needs `pool_pre_ping` to be noticed. Done here, not in a "checkout" listener,
    which would put every checkout of the pool on SQLAlchemy's event-dispatching path."""

    def _do_get(self) -> ConnectionPoolEntry:
        record = super()._do_get()
        if (
            self.discard_closed
            and not self._pre_ping
            and record.dbapi_connection is not None
            and _known_closed(record.driver_connection)
        ):
            error = sa_exc.InvalidatePoolError("the server closed this pooled connection")
            self.logger.info("a pooled connection was closed by the server; connecting anew (%r)", error)
            if self._invalidate_time < cast(Any, record).starttime:  # a _ConnectionRecord's
                self._invalidate_time = time.time()  # the older ones too, at their checkout
            record.invalidate(error)  # closed; connects again when checked out, right after this
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        record.info[_RETURNED] = time.monotonic()
        if not self._pool.full():
            self._pool._queue.put_nowait(record)  # its put_nowait() would ask full() again
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in the event loop (a garbage-collected checkout): close now
            super()._do_return_conn(record)
            return
        # Kept beyond pool_size for now; the trim closes it if it stays unused.
        self._pool._queue.put_nowait(record)
        if self._trim_at is None and self._trimming is None:
            self._trim_at = loop.call_later(self.overflow_idle, self._start_trim)

    def _start_trim(self) -> None:
        self._trim_at = None
        self._trimming = asyncio.get_running_loop().create_task(greenlet_spawn(self._trim))
        self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, task: "asyncio.Task[None]") -> None:
        self._trimming = None
        if not task.cancelled() and task.exception() is not None:
            self.logger.warning("closing idle overflow connections failed: %r", task.exception())

    def _trim(self) -> None:
        """Close the idle connections beyond `pool_size` unused for `overflow_idle` seconds."""
        loop = asyncio.get_running_loop()
        queue = self._pool._queue
        while self._pool.excess() > 0:
            record = queue.get_nowait()  # the oldest given back: the queue is first in, first out
            idle = time.monotonic() - record.info.get(_RETURNED, 0.0)
            if idle < self.overflow_idle:
                queue.put_nowait(record)  # used since: look again when it may have been idle long enough
                self._trim_at = loop.call_later(self.overflow_idle - idle, self._start_trim)
                return
            try:
                record.close()
            finally:
                self._dec_overflow()

    def dispose(self) -> None:
        if self._trim_at is not None:
            self._trim_at.cancel()
            self._trim_at = None
        super().dispose()


_RETURNED = "fastapi_tenancy.returned"  # record.info: when the pool was last given the connection


class MemoryPool(AsyncAdaptedQueuePool):
    """The pool of an in-memory SQLite engine: one connection, lent to one checkout at a time.

    Every connection to `:memory:` opens a database of its own, so the engine keeps
    exactly one, open until `dispose()`. Checkouts take turns on it: a second one
    waits in the queue, up to `pool_timeout`. Sharing it (SQLAlchemy's `StaticPool`)
    interleaves transactions, each committing or rolling back the others' work. A task
    asking again while it holds the connection would wait for itself: it fails at once.
    """

    _holder: "asyncio.Task[Any] | None" = None

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: nobody to wait for
            task = None
        if task is not None and task is self._holder:
            raise ConfigurationError(
                "in-memory SQLite has one connection and this task already holds it (an open "
                "session, transaction or connection of the same engine): a second one would wait "
                "for itself forever. Commit or close the first before opening another, or use a "
                "SQLite file"
            )
        try:
            record = super()._do_get()
        except sa_exc.TimeoutError as exc:
            raise sa_exc.TimeoutError(
                f"in-memory SQLite: its one connection stayed in use for {self._timeout:g} s "
                "(pool_timeout); another session or transaction of the same engine holds it"
            ) from exc
        self._holder = task
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self._holder = None
        super()._do_return_conn(record)


def _known_closed(driver_connection: Any) -> bool:
    is_closed = getattr(driver_connection, "is_closed", None)  # asyncpg
    if callable(is_closed):
        return bool(is_closed())
    # aiomysql (asyncmy where it exposes it): an asyncio StreamReader that saw the close.
    # None once the driver itself closed it; SQLite connections have neither.
    reader = getattr(driver_connection, "_reader", None)
    at_eof = getattr(reader, "at_eof", None)
    return callable(at_eof) and bool(at_eof())
