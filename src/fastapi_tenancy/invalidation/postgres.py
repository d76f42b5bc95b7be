"""`PostgresInvalidation`: tenant changes announced with PostgreSQL LISTEN/NOTIFY."""

import asyncio
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .._utils import is_outage
from .base import ChannelRecord, InvalidationChannel

__all__ = ["PostgresInvalidation"]

_HEALTH_CHECK_INTERVAL = 5.0
_ADAPTER_ARGUMENTS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


class PostgresInvalidation(InvalidationChannel):
    """Invalidation over LISTEN/NOTIFY in the registry's PostgreSQL. Safe for concurrent use.

    For a registry in PostgreSQL without Redis. Each worker holds one dedicated
    asyncpg connection that LISTENs (a session feature: it must reach PostgreSQL
    directly, not through PgBouncer in transaction mode); NOTIFY is sent through
    `engine`. The listening connection is checked every few seconds, so a silently
    dead one is noticed and replaced (dropping the cache).
    """

    def __init__(
        self, engine: AsyncEngine, *, channel: str = "fastapi_tenancy_invalidate", retry_interval: float = 0.5
    ) -> None:
        super().__init__(retry_interval=retry_interval)
        self.engine = engine
        self.channel = channel

    def record(self) -> ChannelRecord:
        # No token: the engine is the registry's own, so a process that reads this record
        # reaches the database whose NOTIFY it is.
        where = self.engine.url.render_as_string(hide_password=True)
        return ChannelRecord("postgres", self.channel, where=where)

    def notice(self, engine: AsyncEngine, identifier: str) -> sa.Executable | None:
        # Another engine may reach another database, whose listeners are not ours.
        return self._notify(identifier) if engine is self.engine else None

    def _notify(self, identifier: str) -> sa.Executable:
        return sa.select(sa.func.pg_notify(self.channel, identifier))

    async def _send(self, identifier: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(self._notify(identifier))

    def _is_outage(self, exc: BaseException) -> bool:
        return is_outage(exc)

    async def _listen_once(
        self, invalidate: Callable[[str], None], reset: Callable[[], None], listening: Callable[[], None]
    ) -> None:
        import asyncpg  # the postgres extra: present whenever the engine is asyncpg's

        # Without the query arguments that configure SQLAlchemy's driver adapter, which
        # asyncpg would send to the server as settings (and the server refuse).
        url = self.engine.url.set(drivername="postgresql").difference_update_query(_ADAPTER_ARGUMENTS)
        dsn = url.render_as_string(hide_password=False)
        conn: Any = await asyncpg.connect(
            dsn,
            timeout=self.retry_interval * 10,
            # Named, so an operator can tell it apart in pg_stat_activity.
            server_settings={"application_name": "fastapi-tenancy-invalidation"},
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())

            def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                invalidate(payload)

            await conn.add_listener(self.channel, on_notify)
            listening()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), _HEALTH_CHECK_INTERVAL)
                except TimeoutError:
                    await conn.execute("SELECT 1", timeout=_HEALTH_CHECK_INTERVAL)
            raise ConnectionError("the LISTEN connection was closed")
        finally:
            conn.terminate()
