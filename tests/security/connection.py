"""What a pooled PostgreSQL connection carries between requests, read on the connection itself."""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["ConnectionState", "connection_state"]

# Custom settings an isolation strategy may use to carry the tenant. Placeholders do
# not show in pg_settings, so they are read by name; a strategy that adds one lists
# it here (RLS: `app.tenant_id` style names).
TENANT_SETTINGS = ("app.tenant_id", "app.current_tenant", "fastapi_tenancy.tenant_id", "tenancy.tenant_id")

_STATE = """
SELECT pg_backend_pid(), current_setting('search_path'), current_user, session_user,
       current_setting('role'), txid_current_if_assigned(),
       (SELECT count(*) FROM pg_cursors WHERE name <> ''),  -- '' is this query's own portal
       (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),
       array(SELECT coalesce(current_setting(name, true), '') FROM unnest($1::text[]) AS name),
       array(SELECT name || '=' || setting FROM pg_settings ORDER BY name)
"""


@dataclass(frozen=True)
class ConnectionState:
    """Everything a request could leave behind on a connection, as seen by the next one."""

    backend_pid: int
    in_transaction: bool
    search_path: str
    current_user: str
    session_user: str
    role: str
    transaction_id: int | None
    open_cursors: int
    advisory_locks: int
    tenant_settings: tuple[str, ...]
    settings: tuple[str, ...] = field(repr=False)  # every name=value of pg_settings

    def without_pid(self) -> "ConnectionState":
        return ConnectionState(0, *list(self.__dict__.values())[1:])

    @property
    def is_clean(self) -> bool:
        """No transaction, no cursor, no lock, no tenant setting, and no SET ROLE."""
        return (
            not self.in_transaction
            and self.transaction_id is None
            and self.open_cursors == 0
            and self.advisory_locks == 0
            and not any(self.tenant_settings)
            and self.role == "none"
            and self.current_user == self.session_user
        )


async def connection_state(engine: AsyncEngine) -> ConnectionState:
    """Check a connection out of `engine`'s pool and read its state, touching nothing.

    The query runs straight on the driver connection, before SQLAlchemy begins a
    transaction, so the transaction status is the one the previous user left.
    """
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        in_transaction = bool(driver.is_in_transaction())
        row = await driver.fetchrow(_STATE, list(TENANT_SETTINGS))
    return ConnectionState(
        backend_pid=row[0],
        in_transaction=in_transaction,
        search_path=row[1],
        current_user=row[2],
        session_user=row[3],
        role=row[4],
        transaction_id=row[5],
        open_cursors=row[6],
        advisory_locks=row[7],
        tenant_settings=tuple(row[8]),
        settings=tuple(row[9]),
    )
