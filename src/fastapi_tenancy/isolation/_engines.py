"""`EngineRegistry`: one engine per tenant, opened lazily, closed least recently used first,
optionally under a `ConnectionBudget` shared by all of them."""

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import await_only, greenlet_spawn

__all__ = ["ConnectionBudget", "EngineRegistry"]


class ConnectionBudget:
    """At most `limit` connections open at once over every engine `attach`ed to it.

    Shared by all requests of one event loop (one process). Counted where
    connections really open and close (SQLAlchemy's `do_connect` and pool `close`
    events), so idle pooled connections count as much as busy ones. A connect
    beyond the limit first asks `reclaim` to close idle connections elsewhere,
    then waits up to `timeout` seconds for one to close, then raises
    `sqlalchemy.exc.TimeoutError` (a 503 to the client, like an exhausted pool).
    """

    def __init__(self, limit: int, *, timeout: float = 30.0) -> None:
        self.limit = limit
        self.timeout = timeout
        self.peak = 0
        """The most connections that were ever open at once (for tests and metrics)."""
        self.opened = 0
        """Connections opened so far (for tests and metrics)."""
        self.reclaim: Callable[[], Any] | None = None
        """An async callable closing idle connections; True when it closed some."""
        # DBAPI connection -> the pool record it was opened for, per connection holding a
        # slot. Keyed by the object, never id(): an id is reused once a lost connection
        # is garbage collected.
        self._open: dict[Any, Any] = {}
        self._connecting = 0  # slots taken by connects in progress
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        """Connections open now, plus those being opened."""
        self._prune()
        return len(self._open) + self._connecting

    def _prune(self) -> None:
        # SQLAlchemy closes connections on some paths without a `close` event: a
        # connect whose `connect` events fail or are cancelled (dialect setup awaits),
        # a connection the garbage collector finds checked out (detached, then closed).
        # So a slot is not trusted to its event alone: it is held only while its
        # record still holds the connection and the driver says it is open.
        dead = [c for c, record in self._open.items() if record.dbapi_connection is not c or _closed(c)]
        for connection in dead:
            del self._open[connection]

    def attach(self, engine: AsyncEngine) -> None:
        """Count `engine`'s connections against this budget (before it opens any)."""
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "do_connect", self._do_connect)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "close", self._on_close)
        event.listen(sync_engine, "close_detached", self._on_close_detached)

    def _wake_one(self) -> None:
        # One at a time, oldest first: waking every waiter for one free slot would
        # make them all scan for idle connections, and all but one go back to sleep.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def acquire(self) -> None:
        """Take a slot for a connection about to be opened; see the class docstring."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self.in_use >= self.limit:
            before = self.in_use
            if self.reclaim is not None and await self.reclaim() and self.in_use < before:
                continue
            if self.in_use < self.limit:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise sa_exc.TimeoutError(
                    f"connection budget of {self.limit} exhausted; no connection freed within "
                    f"{self.timeout:g}s (raise database_connection_budget or lower "
                    "database_tenant_pool_size)"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                # Capped: a slot freed without an event (see _prune) wakes no one.
                await asyncio.wait_for(waiter, min(remaining, 0.25))
            except TimeoutError:
                pass
            except BaseException:
                self._pass_on(waiter)
                raise
            finally:
                # Never left behind: _on_checkin closes connections while any waiter is queued.
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._connecting += 1

    def _pass_on(self, waiter: "asyncio.Future[None]") -> None:
        # A waiter that was woken but gives up (cancelled) hands the wake-up on.
        if waiter.done() and not waiter.cancelled() and self.in_use < self.limit:
            self._wake_one()

    def _do_connect(self, dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        # Runs inside SQLAlchemy's greenlet, where await_only() may wait on the loop,
        # as the driver's own connect does.
        await_only(self.acquire())
        try:
            connection = dialect.connect(*cargs, **cparams)
        except BaseException:
            self._connecting -= 1
            self._wake_one()
            raise
        self._connecting -= 1
        self.opened += 1
        # The record takes the connection right after this returns, with no await in
        # between, so _prune() never sees it half-assigned.
        self._open[connection] = _record
        self.peak = max(self.peak, len(self._open) + self._connecting)  # no _prune(): not assigned yet
        return connection

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        # While connects wait for a slot, a returned connection is closed rather than
        # kept idle: its slot goes to the oldest waiter (a tenant that keeps its
        # connections idle must not starve the others).
        if self._waiters and record is not None:
            try:
                record.close()
            except Exception:  # outside the event loop (garbage collection): no graceful close
                record.invalidate()

    def _on_close(self, dbapi_connection: Any, _record: Any) -> None:
        self._release(dbapi_connection)

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        self._release(dbapi_connection)

    def _release(self, dbapi_connection: Any) -> None:
        before = len(self._open)
        self._open.pop(dbapi_connection, None)
        self._prune()
        for _ in range(before - len(self._open)):
            self._wake_one()


def _closed(connection: Any) -> bool:
    """Whether the driver says `connection` is closed (asyncpg `is_closed()`, aiomysql `closed`)."""
    driver = getattr(connection, "driver_connection", connection)
    is_closed = getattr(driver, "is_closed", None)
    if callable(is_closed):
        return bool(is_closed())
    closed = getattr(driver, "closed", False)
    return closed if isinstance(closed, bool) else False


class _Entry:
    __slots__ = ("engine", "retired")

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.retired = False

    @property
    def pool(self) -> Pool:
        return self.engine.sync_engine.pool

    def busy(self) -> int:
        pool = self.pool
        return pool.checkedout() if isinstance(pool, QueuePool) else 0

    def idle(self) -> int:
        pool = self.pool
        return pool.checkedin() if isinstance(pool, QueuePool) else 0


class EngineRegistry:
    """Engines by key (a tenant), created on first use. Safe for concurrent use in one loop.

    `get` is synchronous from lookup to insert, so concurrent first requests for a
    tenant can never create two engines: in asyncio nothing else runs in between,
    which makes it the per-tenant creation lock. At most `max_engines` are kept
    (None: no limit); past it, the least recently used engine with no checked-out
    connection is retired and its idle connections closed. An engine in use is
    skipped, never disposed under a request: its connections are closed when they
    come back. With a `budget`, idle connections of the least recently used
    engines are also closed whenever a connect needs their slot.
    """

    def __init__(self, *, max_engines: int | None = 100, budget: ConnectionBudget | None = None) -> None:
        self._max_engines = max_engines
        self.budget = budget
        self._active: OrderedDict[Hashable, _Entry] = OrderedDict()
        # Engines out of the registry that may still hold connections: a session
        # created before its engine was retired can still use it.
        self._retired: set[_Entry] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        if budget is not None:
            budget.reclaim = self.reclaim

    def __len__(self) -> int:
        return len(self._active)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._active

    def get(self, key: Hashable, create: Callable[[], AsyncEngine]) -> AsyncEngine:
        """The engine of `key`, made with `create()` the first time (no I/O: engines connect lazily)."""
        entry = self._active.get(key)
        if entry is not None:
            self._active.move_to_end(key)
            return entry.engine
        engine = create()
        entry = _Entry(engine)
        if self.budget is not None:
            self.budget.attach(engine)
        self._active[key] = entry
        self._evict()
        return engine

    def _evict(self) -> None:
        if self._max_engines is None:
            return
        excess = len(self._active) - self._max_engines
        for key in list(self._active):
            if excess <= 0:
                break
            entry = self._active[key]
            if entry.busy():
                continue  # never under a request; tried again at the next insert
            del self._active[key]
            self._retire(entry)
            excess -= 1

    def _retire(self, entry: _Entry) -> None:
        self._mark_retired(entry)
        self._retired.add(entry)
        self._spawn(self._drain(entry))

    def _mark_retired(self, entry: _Entry) -> None:
        """Retire `entry`: connections it opens or gets back from now on are seen to.

        Listened for only from here on: listeners on an engine keep a few dozen objects
        for the garbage collector to walk, a cost every engine in use would pay (a
        thousand tenant files, a thousand engines) for what only retired ones need.
        Nothing can check a connection in between the flag and the listeners (no await).
        """
        if entry.retired:
            return
        entry.retired = True

        def returned(_dbapi_connection: Any, record: Any) -> None:
            # The engine was retired (evicted, or its tenant destroyed) while this
            # connection was out: close it now. Its pool may be one the engine no
            # longer holds (dispose() swaps pools), where it would sit idle until
            # the garbage collector found it, unclosed.
            if record is not None and record.dbapi_connection is not None:
                try:
                    record.close()
                except Exception:  # outside the event loop (garbage collection)
                    record.invalidate()
            self._spawn(self._drain(entry))

        def connected(_dbapi_connection: Any, _record: Any) -> None:
            # A session that outlived its engine's retirement opened a connection:
            # track the engine again, so the connection is closed when it comes back.
            self._retired.add(entry)

        event.listen(entry.engine.sync_engine, "checkin", returned)
        event.listen(entry.engine.sync_engine, "connect", connected)

    def _spawn(self, coroutine: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a connection returned by the garbage collector, outside the loop
            coroutine.close()
            return
        task = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, entry: _Entry) -> None:
        await self._close_idle(entry)
        if entry.retired and not entry.busy() and not entry.idle():
            self._retired.discard(entry)

    async def _close_idle(self, entry: _Entry) -> bool:
        """Close `entry`'s idle connections if none is checked out; True if some were."""
        if entry.busy() or not entry.idle():
            return False
        # Swap first, close second, with no await in between: from here on new
        # checkouts use the fresh pool, so no request can take a connection from
        # the old one while it is being closed (Engine.dispose() closes first).
        sync_engine = entry.engine.sync_engine
        old = sync_engine.pool
        sync_engine.pool = old.recreate()
        await greenlet_spawn(old.dispose)
        return True

    async def reclaim(self) -> bool:
        """Close the idle connections of one engine not in use, retired ones first, then LRU.

        True when that freed connections (some pools hold only closed ones).
        """
        before = self.budget.in_use if self.budget is not None else 0
        for entry in [*self._retired, *self._active.values()]:
            if await self._close_idle(entry) and (self.budget is None or self.budget.in_use < before):
                return True
        return False

    async def discard(self, key: Hashable) -> None:
        """Forget `key`'s engine and close its idle connections now (its storage is about to go).

        Connections still checked out are closed when they come back.
        """
        entry = self._active.pop(key, None)
        if entry is not None:
            self._mark_retired(entry)
            self._retired.add(entry)
            await entry.engine.dispose()

    async def close(self) -> None:
        """Dispose every engine. Idempotent."""
        entries = [*self._active.values(), *self._retired]
        self._active.clear()
        self._retired.clear()
        for entry in entries:
            self._mark_retired(entry)
            await entry.engine.dispose()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
