"""The audit log of tenant lifecycle changes: who changed which tenant, how, and when.

The manager writes one entry per change through an `AuditWriter`. The default,
`SQLAuditWriter`, is a table (`tenancy_audit_log`) in the registry database.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from ._utils import create_tables, unavailable_as_503
from .events import TenantEvent
from .storage.tables import UTCDateTime
from .tenant import IDENTIFIER_MAX_LENGTH, thaw

__all__ = ["AuditEntry", "AuditWriter", "SQLAuditWriter"]


class AuditWriter(ABC):
    """Where audit entries go. Implement `write`; `initialize` and `close` are optional.

    `write` is awaited after each lifecycle change is stored; an exception is
    logged by the manager and does not undo the change.
    """

    async def initialize(self) -> None:  # noqa: B027 - optional hook
        """Prepare storage (create a table, open a file). Called by `manager.initialize()`."""

    @abstractmethod
    async def write(self, event: TenantEvent) -> None:
        """Store one entry for `event`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called by `manager.close()`."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the SQL audit log."""

    id: int
    at: datetime
    event: str
    tenant_id: str
    tenant_identifier: str
    status: str
    actor: str
    details: dict[str, Any]


class SQLAuditWriter(AuditWriter):
    """The audit log as one SQL table, append-only. Safe for concurrent use.

    `engine` is the registry's engine (the manager passes its own). `entries()`
    reads the log back, newest first.
    """

    def __init__(
        self, engine: AsyncEngine, *, table_name: str = "tenancy_audit_log", schema: str | None = None
    ):
        self.engine = engine
        self.table = sa.Table(
            table_name,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("at", UTCDateTime(), nullable=False),
            sa.Column("event", sa.String(16), nullable=False),
            # Not named `tenant_id`: row-level security treats every table of the shared
            # schema with the tenant column as a tenant table, and this one is the library's.
            sa.Column("subject_tenant_id", sa.String(36), key="tenant_id", nullable=False, index=True),
            sa.Column("tenant_identifier", sa.String(IDENTIFIER_MAX_LENGTH), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("actor", sa.String(255), nullable=False),
            sa.Column("details", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
            schema=schema,
        )

    async def initialize(self) -> None:
        await create_tables(self.engine, lambda conn: self.table.metadata.create_all(conn), "audit log")

    async def write(self, event: TenantEvent) -> None:
        async with unavailable_as_503("audit log"), self.engine.begin() as conn:
            await conn.execute(self.insert(event))

    def insert(self, event: TenantEvent) -> sa.Insert:
        """The statement that writes `event`'s entry: `write` runs it in a transaction of its own.

        A registration runs it in the registry's transaction instead, when the registry
        is a `SQLAlchemyTenantStore` on this writer's engine: the change and its entry
        then commit together (or neither does), in one round trip to the server fewer.
        """
        row = {
            "at": event.at,
            "event": event.event.value,
            "tenant_id": event.tenant.id,
            "tenant_identifier": event.tenant.identifier,
            "status": event.tenant.status.value,
            "actor": event.actor,
            "details": thaw(event.details),
        }
        return self.table.insert().values(**row)

    async def entries(self, *, tenant_id: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` entries, of one tenant (by id) or of all."""
        query = self.table.select().order_by(self.table.c.id.desc()).limit(limit)
        if tenant_id is not None:
            query = query.where(self.table.c.tenant_id == tenant_id)
        async with unavailable_as_503("audit log"), self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [AuditEntry(**{column.key: row._mapping[column] for column in self.table.c}) for row in rows]
