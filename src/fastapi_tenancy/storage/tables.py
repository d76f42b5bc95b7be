"""The registry's tables as `SQLAlchemyTenantStore` keeps them, and `UTCDateTime`, their timestamps.

Tenants, the settings every process of a registry shares, and custom domains; each made
for the table names and schema of one store; `table_problem()` says whether a table found
under the name is one. `audit.py` stores its timestamps with `UTCDateTime` too.
"""

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect

from ..domain import DOMAIN_MAX_LENGTH
from ..tenant import IDENTIFIER_MAX_LENGTH
from .legacy import registry_problem

__all__ = ["UTCDateTime", "domains_table", "settings_table", "table_problem", "tenants_table"]


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timestamps stored as UTC; always read back timezone-aware.

    SQLite and MySQL keep no zone, so values go in as naive UTC and come back
    with the zone restored.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def tenants_table(name: str, schema: str | None) -> sa.Table:
    """The registry's table of tenants, `name` in `schema`, in a `MetaData` of its own."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("identifier", sa.String(IDENTIFIER_MAX_LENGTH), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("metadata", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("tier", sa.String(32), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        # Ciphertext only (database isolation): the store never sees the plain URL.
        sa.Column("encrypted_database_url", sa.Text(), nullable=True),
        schema=schema,
    )


def settings_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    """Values every process sharing the registry agrees on (the invalidation channel), by name."""
    return sa.Table(
        name,
        metadata,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        schema=schema,
    )


def domains_table(tenants: sa.Table, name: str) -> sa.Table:
    """The tenants' custom domains, beside `tenants` (same metadata and schema)."""
    # The primary key makes a name one tenant's at most, atomically on every backend. On
    # MySQL the name is compared byte for byte (ascii_bin), not by a case- and
    # accent-insensitive default collation; names are normalised ASCII anyway.
    name_type = sa.String(DOMAIN_MAX_LENGTH).with_variant(
        mysql.VARCHAR(DOMAIN_MAX_LENGTH, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
    )
    return sa.Table(
        name,
        tenants.metadata,
        sa.Column("name", name_type, primary_key=True),
        # No foreign key: SQLite would not enforce it anyway, so the store keeps the rows in
        # step itself (a domain change locks the tenant's row; delete() removes its domains).
        # Not named tenant_id in the database (like the audit log's column): row-level
        # security takes every table of the shared schema with that column for a tenant table.
        sa.Column("owner_tenant_id", sa.String(36), key="tenant_id", nullable=False, index=True),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        schema=tenants.schema,
    )


def table_problem(conn: sa.Connection, table: sa.Table) -> str | None:
    """Why the `table` found in the database is not a registry of ours (0.5.0's, another program's).

    None when it is ours, or missing (`initialize()` creates it). Read-only.
    """
    inspector = sa.inspect(conn)
    if not inspector.has_table(table.name, table.schema):
        return None
    columns = {column["name"] for column in inspector.get_columns(table.name, table.schema)}
    return registry_problem(table, columns)
