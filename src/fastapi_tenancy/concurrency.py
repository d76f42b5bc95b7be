"""`TenantConcurrencyGate`: at most N requests of one tenant in flight at once.

With schema isolation every tenant shares one connection pool. One tenant sending many
slow requests at once would hold every connection, and every other tenant's requests
would wait for one (the noisy neighbour). The gate caps how many requests each tenant
has inside the app at a time, in this process: a tenant's requests beyond the cap wait
in a first-come queue for `wait` seconds, holding no connection and costing no CPU, and
are refused with 429 (`TenantBusyError`, `Retry-After: 1`) if no slot frees up by then.
Other tenants never wait on that queue.

`TenancyMiddleware` uses one when `TenancyConfig.tenant_max_concurrent_requests` is set
(HTTP requests only: a WebSocket holds no pooled connection between messages).
"""

import asyncio
from collections import deque

from .errors import TenantBusyError
from .tenant import Tenant

__all__ = ["TenantConcurrencyGate"]


class TenantConcurrencyGate:
    """Per-tenant request slots; shared by all requests of one event loop (no locks needed).

    `acquire(tenant)` takes a slot or waits up to `wait` seconds for one (0: refuse at
    once); every successful `acquire` must be paired with one `release(tenant)`. The state
    held is one counter per tenant with requests in flight (none for idle tenants).
    """

    __slots__ = ("limit", "wait", "_in_flight", "_waiters")

    def __init__(self, limit: int, wait: float = 0.0) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if wait < 0:
            raise ValueError("wait must not be negative")
        self.limit = limit
        self.wait = wait
        self._in_flight: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def in_flight(self, tenant: Tenant) -> int:
        """How many of the tenant's requests hold a slot now."""
        return self._in_flight.get(tenant.id, 0)

    async def acquire(self, tenant: Tenant) -> None:
        """Take one of the tenant's slots, waiting in turn; `TenantBusyError` if none frees up."""
        key = tenant.id
        count = self._in_flight.get(key, 0)
        if count < self.limit and key not in self._waiters:
            self._in_flight[key] = count + 1
            return
        if self.wait <= 0:
            raise TenantBusyError(tenant.identifier)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, deque()).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
                self._forget(key, waiter)
            if isinstance(exc, TimeoutError):
                raise TenantBusyError(tenant.identifier) from None
            raise

    def release(self, tenant: Tenant) -> None:
        """Give back a slot: to the tenant's longest-waiting request, if any."""
        key = tenant.id
        queue = self._waiters.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                if not queue:
                    del self._waiters[key]
                waiter.set_result(None)  # the slot passes on: the count stays
                return
        self._waiters.pop(key, None)
        count = self._in_flight.get(key, 0) - 1
        if count > 0:
            self._in_flight[key] = count
        else:
            self._in_flight.pop(key, None)

    def _forget(self, key: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            pass
        if not queue:
            del self._waiters[key]
