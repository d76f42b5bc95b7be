"""The registry table of fastapi-tenancy 0.5.0: recognising it, and converting it to ours.

0.5.0 kept its tenants in a `tenants` table too, in another layout (`tenant_metadata`
as JSON text, ids of up to 255 characters, a per-tenant `schema_name` and
`database_url`). `SQLAlchemyTenantStore.initialize()` refuses such a table with an
error naming the conversion, instead of failing on the first request;
`convert_legacy_registry` (the `fastapi-tenancy registry convert-from-0.5` command)
converts it in one transaction: it checks every row first and changes nothing if one
cannot be converted exactly, copies the old table to a backup table, and replaces it
with ours holding the same tenants (same ids, identifiers, statuses, metadata and
timestamps). On MySQL/MariaDB each DDL statement commits by itself: back up first.
"""

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from .._utils import is_outage, unavailable_as_503
from ..errors import ConfigurationError
from ..tenant import Tenant, TenantStatus
from ..urls import normalise_database_url
from .base import TenantStore

if TYPE_CHECKING:
    from ..encryption import URLCipher  # needs `cryptography`, an optional extra

__all__ = [
    "CONVERT_COMMAND",
    "LegacyConversion",
    "convert_legacy_registry",
    "is_legacy_registry",
    "registry_problem",
]

CONVERT_COMMAND = "fastapi-tenancy registry convert-from-0.5"
"""The command that converts a 0.5.0 registry table (docs/coming-from-0.5.md)."""

_ID_MAX = 36  # our id column: String(36)
_TIERS = ("schema", "database", "rls")
_ENCRYPTED = "enc::"  # 0.5.0's ciphertext prefix


def is_legacy_registry(columns: Collection[str]) -> bool:
    """True when a table with these columns is a fastapi-tenancy 0.5.0 registry."""
    return "tenant_metadata" in columns and "metadata" not in columns


def registry_problem(table: sa.Table, columns: Collection[str]) -> str | None:
    """Why an existing table with `columns` cannot be `table`, our registry; None if it can."""
    name = table.fullname
    if is_legacy_registry(columns):
        return (
            f"the table {name!r} is a fastapi-tenancy 0.5.0 tenant registry: convert it with "
            f"`{CONVERT_COMMAND}` (docs/coming-from-0.5.md), or give the store another table_name"
        )
    missing = sorted(column.name for column in table.columns if column.name not in columns)
    if missing:
        return (
            f"the table {name!r} exists but is not a fastapi-tenancy registry (no column "
            f"{', '.join(missing)}): give SQLAlchemyTenantStore another table_name"
        )
    return None


@dataclass
class LegacyConversion:
    """What `convert_legacy_registry` did (or, with `dry_run`, would do)."""

    table: str
    backup_table: str
    tenants: list[Tenant] = field(default_factory=list)
    dry_run: bool = False


def _legacy_table(name: str, schema: str | None) -> sa.Table:
    # The columns 0.5.0 read and wrote; its indexes and comments do not matter for reading.
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("identifier", sa.String(255)),
        sa.Column("name", sa.String(255)),
        sa.Column("status", sa.String(50)),
        sa.Column("isolation_strategy", sa.String(50)),
        sa.Column("database_url", sa.Text()),
        sa.Column("schema_name", sa.String(255)),
        sa.Column("tenant_metadata", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        schema=schema,
    )


def _utc(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    # 0.5.0 wrote UTC; SQLite and MySQL hand it back without a zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _Converter:
    """Turns 0.5.0 rows into our tenants, or says exactly why a row cannot be converted."""

    def __init__(self, schema_prefix: str, cipher: "URLCipher | None") -> None:
        self.schema_prefix = schema_prefix
        self.cipher = cipher
        self.problems: list[str] = []

    def tenants(self, rows: Iterable[Mapping[Any, Any]]) -> list[Tenant]:
        converted = []
        for row in rows:
            try:
                converted.append(self._tenant(row))
            except ValueError as exc:
                self.problems.append(f"tenant {row['identifier']!r:.70} (id {row['id']!r:.70}): {exc}")
        return converted

    def _tenant(self, row: Mapping[Any, Any]) -> Tenant:
        identifier = str(row["identifier"])
        tenant_id = str(row["id"])
        if len(tenant_id) > _ID_MAX:
            raise ValueError(f"its id is longer than {_ID_MAX} characters")
        expected_schema = self.schema_prefix + identifier.replace("-", "_")
        if row["schema_name"] not in (None, expected_schema):
            raise ValueError(
                f"its schema is {row['schema_name']!r}; tenant schemas are named schema_prefix + identifier: "
                f'rename it (ALTER SCHEMA "{row["schema_name"]}" RENAME TO "{expected_schema}") and set '
                "schema_name to NULL"
            )
        tier = row["isolation_strategy"]
        if tier is not None and tier not in _TIERS:
            raise ValueError(f"isolation_strategy {tier!r} is not a tier ({', '.join(_TIERS)})")
        try:
            metadata = json.loads(row["tenant_metadata"] or "{}")
        except json.JSONDecodeError as exc:
            # 0.5.0 read such a row as {}; converting it so would lose the metadata for good.
            raise ValueError(f"its tenant_metadata is not JSON ({exc.msg})") from None
        if not isinstance(metadata, dict):
            raise ValueError("its tenant_metadata is not a JSON object")
        now = datetime.now(UTC)
        created_at = _utc(row["created_at"], now)
        return Tenant(
            id=tenant_id,
            identifier=identifier,
            name=str(row["name"]),
            status=TenantStatus(row["status"]),
            metadata=metadata,
            tier=tier,
            created_at=created_at,
            updated_at=max(_utc(row["updated_at"], created_at), created_at),
            encrypted_database_url=self._database_url(row["database_url"]),
        )

    def _database_url(self, url: str | None) -> str | None:
        if url is None:
            return None
        if url.startswith(_ENCRYPTED):
            raise ValueError(
                "its database_url was encrypted by 0.5.0: decrypt it with 0.5.0 "
                "(manager.decrypt_tenant) and store it in clear before converting"
            )
        if self.cipher is None:
            raise ValueError(
                "it has a database_url, stored encrypted here: set encryption_keys to convert it"
            )
        return self.cipher.encrypt(normalise_database_url(url))


async def convert_legacy_registry(
    store: TenantStore,
    *,
    backup_table: str | None = None,
    schema_prefix: str = "tenant_",
    cipher: "URLCipher | None" = None,
    dry_run: bool = False,
) -> LegacyConversion:
    """Convert the 0.5.0 registry in `store`'s table to ours, in place; keep a copy.

    `store` keeps its registry in a SQL table: a `SQLAlchemyTenantStore`, or a store in
    front of one (`registry_store()`); any other raises `ConfigurationError`.

    Every row is checked before anything is written; if one cannot be converted
    exactly (an id longer than ours, a schema named otherwise than
    `schema_prefix` + identifier, metadata that is not JSON, a `database_url` without
    `cipher` to encrypt it, one 0.5.0 encrypted), `ConfigurationError` lists them all
    and nothing changes. Otherwise the old table is copied to `backup_table` (default:
    its name + `_0_5`), then replaced by ours with the same tenants, in one
    transaction. With `dry_run`, the checks run and nothing is written.
    """
    from .database import SQLAlchemyTenantStore  # noqa: PLC0415 - it imports this module

    registry = store.registry_store()
    if not isinstance(registry, SQLAlchemyTenantStore):
        raise ConfigurationError(f"the registry is a {type(registry).__name__}, not a SQL table")
    store = registry
    table = store.table
    backup = backup_table or f"{table.name}_0_5"
    legacy = _legacy_table(table.name, table.schema)
    async with unavailable_as_503("tenant registry"), store.engine.begin() as conn:

        def inspect(sync_conn: sa.Connection) -> tuple[set[str] | None, bool]:
            inspector = sa.inspect(sync_conn)
            if not inspector.has_table(table.name, schema=table.schema):
                return None, inspector.has_table(backup, schema=table.schema)
            columns = {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}
            return columns, inspector.has_table(backup, schema=table.schema)

        columns, backup_exists = await conn.run_sync(inspect)
        if columns is None:
            raise ConfigurationError(f"there is no table {table.fullname!r} to convert")
        if not is_legacy_registry(columns):
            raise ConfigurationError(f"the table {table.fullname!r} is not a fastapi-tenancy 0.5.0 registry")
        if backup_exists:
            raise ConfigurationError(f"the backup table {backup!r} exists already: name another one")
        rows = (await conn.execute(legacy.select().order_by(legacy.c.identifier))).mappings().all()
        converter = _Converter(schema_prefix, cipher)
        tenants = converter.tenants(rows)
        if converter.problems:
            shown = converter.problems[:20]
            more = f"; and {len(converter.problems) - 20} more" if len(converter.problems) > 20 else ""
            raise ConfigurationError(
                f"{len(converter.problems)} of {len(rows)} tenants cannot be converted exactly, so "
                f"nothing was changed: {'; '.join(shown)}{more}"
            )
        result = LegacyConversion(table=table.fullname, backup_table=backup, tenants=tenants, dry_run=dry_run)
        if dry_run:
            return result
        try:
            await _replace(conn, legacy, backup, table, [store.new_row(tenant) for tenant in tenants])
        except sa_exc.DBAPIError as exc:
            if is_outage(exc):
                raise
            # E.g. a foreign key of an application table to the old tenants.id: dropping
            # the table would break it. The transaction rolls back: nothing changed.
            raise ConfigurationError(
                f"the 0.5.0 table could not be replaced, so nothing was changed: {exc.orig}"
            ) from exc
    return result


async def _replace(
    conn: AsyncConnection, legacy: sa.Table, backup: str, table: sa.Table, rows: list[dict[str, Any]]
) -> None:
    quote = conn.dialect.identifier_preparer
    old = quote.format_table(legacy)
    copy = quote.format_table(sa.Table(backup, sa.MetaData(), schema=table.schema))
    # Names from the store's configuration, quoted by the dialect; no input in them.
    await conn.execute(sa.text(f"CREATE TABLE {copy} AS SELECT * FROM {old}"))  # noqa: S608
    await conn.execute(sa.text(f"DROP TABLE {old}"))
    await conn.run_sync(table.metadata.create_all)
    if rows:
        await conn.execute(table.insert(), rows)
