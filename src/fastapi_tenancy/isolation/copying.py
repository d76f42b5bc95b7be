"""Copying a tenant's rows into another tenant's new storage: the machinery of `clone_tenant`.

The source is read in one REPEATABLE READ transaction: every table comes from the same
snapshot, so a clone never holds an order without its customer, and the snapshot takes no
lock beyond the ACCESS SHARE of its reads (the source keeps serving, writes included).
The destination is storage provisioned the normal way moments before (its tables, its
incarnation marker), written in one transaction too; the caller destroys it on failure.

* schema: `INSERT ... SELECT` from schema to schema on one connection, tables parents first
  (foreign keys), then each sequence set to the source's value;
* database: rows streamed from the source database to the new one in batches, then
  sequences (PostgreSQL) or `AUTO_INCREMENT` (MySQL/MariaDB) set to the source's value;
* SQLite files: as databases; the `AUTOINCREMENT` counters (`sqlite_sequence`) too;
* row-level security: the source's rows read into temporary tables while the owner
  transaction is bound to the source, then inserted while it is bound to the new tenant,
  so the policies confine each side and the tenant column is filled with the new id.

The source's storage must prove it is the source's (its marker, `_incarnation.py`), so a
slug purged and registered again meanwhile is never copied from.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant
from ._incarnation import lock_marker
from .base import Isolation, marker_name, quote_identifier
from .citus_rls import insert_rows
from .database import _MARKER_SCHEMA, _MARKERS, DatabaseIsolation, _backend
from .rls import RLSIsolation
from .schema import SchemaIsolation
from .sqlite import SQLiteFileIsolation

__all__ = ["BATCH_ROWS", "Layout", "copy_rows", "copy_tenant_data", "prove_postgres_source", "table_layout"]

BATCH_ROWS = 1000
"""Rows per insert when rows are streamed from one database to another."""

Layout = list[tuple[str, list[str]]]
"""Tables parents first (foreign keys), each with the columns a copy writes."""

_REPEATABLE = {"isolation_level": "REPEATABLE READ"}
# Made by the library or by Alembic, never the tenant's rows: the new storage has its own.
_SKIPPED = frozenset({"alembic_version"})
_q = quote_identifier


async def copy_tenant_data(
    isolation: Isolation, source: Tenant, target: Tenant, *, column: str | None
) -> int:
    """Copy `source`'s rows into `target`'s new storage (same strategy); how many rows.

    `column` (hybrid isolation: the tenant column every tier's tables carry) is set to
    `target.id` in the copied rows. Raises `ProvisioningError` when the source's storage
    is not the source's (or is going away), `ConfigurationError` for a strategy whose
    tenants cannot be cloned (SQLite files).
    """
    strategy = isolation.serving(source)
    if isolation.serving(target) is not strategy:
        raise ConfigurationError("a clone is made in its source's strategy (hybrid isolation: its tier)")
    if isinstance(strategy, SchemaIsolation):
        return await _copy_schema(strategy, source, target, column)
    if isinstance(strategy, RLSIsolation):
        return await _copy_rls(strategy, source, target)
    if isinstance(strategy, DatabaseIsolation):
        return await _copy_database(strategy, source, target, column)
    if isinstance(strategy, SQLiteFileIsolation):
        return await _copy_sqlite(strategy, source, target)
    raise ConfigurationError(f"cloning tenants of {type(strategy).__name__} is not supported")


def table_layout(connection: Connection, schema: str | None) -> Layout:
    """The tables of `schema` (None: the connection's default), parents first, with their columns.

    Generated columns are left out (the destination computes them); so are views (the
    incarnation marker among them) and the Alembic version table.
    """
    inspector = sa.inspect(connection)
    columns = inspector.get_multi_columns(schema=schema)
    ordered = [name for name, _ in inspector.get_sorted_table_and_fkc_names(schema=schema) if name]
    return [
        (name, [c["name"] for c in columns[(schema, name)] if "computed" not in c])
        for name in ordered
        if name not in _SKIPPED
    ]


async def copy_rows(
    reader: AsyncConnection,
    writer: AsyncConnection,
    layout: Layout,
    *,
    reader_schema: str | None = None,
    writer_schema: str | None = None,
    rewrite: tuple[str, str] | None = None,
) -> int:
    """Stream the rows of `layout`'s tables from `reader` to `writer` (other databases); how many.

    In batches of `BATCH_ROWS`, tables in order; `rewrite` = (column, value) sets that
    column in every row that has it. Both connections must be in transactions.
    """
    total = 0
    for name, columns in layout:
        source = sa.table(name, *(sa.column(c) for c in columns), schema=reader_schema)
        target = sa.table(name, *(sa.column(c) for c in columns), schema=writer_schema)
        relabel = rewrite if rewrite is not None and rewrite[0] in columns else None
        result = await reader.stream(sa.select(*source.c))
        async for batch in result.partitions(BATCH_ROWS):
            records = [dict(zip(columns, row, strict=True)) for row in batch]
            if relabel is not None:
                for record in records:
                    record[relabel[0]] = relabel[1]
            await writer.execute(sa.insert(target), records)
            total += len(records)
    return total


# -- schema isolation: one connection, one transaction ---------------------------------


async def _copy_schema(schema: SchemaIsolation, source: Tenant, target: Tenant, column: str | None) -> int:
    old, new = schema.storage_name(source.identifier), schema.storage_name(target.identifier)
    async with unavailable_as_503("tenant database"), schema.ddl_engine.connect() as conn:
        conn = await conn.execution_options(**_REPEATABLE)
        async with conn.begin():
            await prove_postgres_source(conn, old, source)
            layout = await conn.run_sync(table_layout, old)
            total = 0
            for name, columns in layout:
                listed = ", ".join(_q(c) for c in columns)
                # The tenant column (hybrid) names the new tenant; text converts to the
                # column's type on assignment (varchar, uuid, ...).
                selected = ", ".join("CAST(:id AS text)" if c == column else _q(c) for c in columns)
                # OVERRIDING SYSTEM VALUE: identity columns keep the source's ids.
                result = await conn.execute(
                    sa.text(
                        f"INSERT INTO {_q(new)}.{_q(name)} ({listed}) OVERRIDING SYSTEM VALUE "  # noqa: S608
                        f"SELECT {selected} FROM {_q(old)}.{_q(name)}"
                    ),
                    {"id": target.id},
                )
                total += result.rowcount
            await _continue_sequences(conn, conn, old, new)
            return total


async def prove_postgres_source(conn: AsyncConnection, schema: str, source: Tenant) -> None:
    """Lock `source`'s marker in `schema` as its transactions do, or raise `ProvisioningError`."""
    # The marker lock a transaction of the source takes (ACCESS SHARE, which its own
    # writers do not conflict with): the storage is the source's, and is not being dropped.
    try:
        async with conn.begin_nested():
            await conn.exec_driver_sql(lock_marker(schema, source.id).rstrip(";"))
    except sa_exc.DBAPIError as exc:
        raise ProvisioningError(
            f"the storage of tenant {source.identifier!r} is not its own or is going away: {exc.orig}"
        ) from exc


async def _continue_sequences(reader: AsyncConnection, writer: AsyncConnection, old: str, new: str) -> None:
    """Set each sequence of schema `new` to the value of its namesake in `old` (PostgreSQL).

    Sequences are not transactional: the source's value now is at least that of every
    row in the snapshot, so the clone's next id follows them.
    """
    rows = await reader.execute(
        sa.text(
            "SELECT sequencename::text, last_value FROM pg_catalog.pg_sequences "
            "WHERE schemaname = :schema AND last_value IS NOT NULL"
        ),
        {"schema": old},
    )
    for name, value in rows.all():
        await writer.execute(
            sa.text("SELECT pg_catalog.setval(CAST(:seq AS regclass), :value)"),
            {"seq": f"{_q(new)}.{_q(name)}", "value": value},
        )


# -- row-level security: the shared tables, bound to one tenant at a time ---------------

_COLUMNS = sa.text(
    "SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = CAST(:table AS regclass) "
    "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum"
)


async def _copy_rls(rls: RLSIsolation, source: Tenant, target: Tenant) -> int:
    async with unavailable_as_503("tenant database"), rls.owner_engine.connect() as conn:
        conn = await conn.execution_options(**_REPEATABLE)
        async with conn.begin():
            # Shared, like a transaction of the source: not while it moves or is deleted.
            held = await conn.scalar(
                sa.text("SELECT pg_catalog.pg_try_advisory_xact_lock_shared(hashtextextended(:key, 0))"),
                {"key": f"{rls.policy}:{source.id}"},
            )
            fenced = await conn.scalar(
                sa.text(f"SELECT 1 FROM {rls.fence_table} WHERE tenant_id = :id"),  # noqa: S608
                {"id": source.id},
            )
            if not held or fenced:
                raise ProvisioningError(
                    f"tenant {source.identifier!r} is not served by row-level security right now "
                    "(moving, moved or deleted)"
                )
            tables = await rls._table_names(conn)
            layout = [(t, (await conn.scalars(_COLUMNS, {"table": t})).all()) for t in tables]
            await rls.bind_owner(conn, source)
            for number, (table, columns) in enumerate(layout):
                listed = ", ".join(_q(c) for c in columns)
                await conn.execute(
                    sa.text(
                        f"CREATE TEMPORARY TABLE {_q(f'ft_clone_{number}')} ON COMMIT DROP AS "  # noqa: S608
                        f"SELECT {listed} FROM {table}"
                    )
                )
            await rls.bind_owner(conn, target)
            total = 0
            for number, (table, columns) in enumerate(layout):
                # The tenant column is left to its default, the bound (new) tenant.
                kept = [c for c in columns if c != rls.column]
                if rls.shards.active:  # on Citus: INSERT ... SELECT would COPY, which RLS refuses
                    total += await insert_rows(conn, table, _q(f"ft_clone_{number}"), kept, overriding=True)
                    continue
                listed = ", ".join(_q(c) for c in kept)
                result = await conn.execute(
                    sa.text(
                        f"INSERT INTO {table} ({listed}) OVERRIDING SYSTEM VALUE "  # noqa: S608
                        f"SELECT {listed} FROM {_q(f'ft_clone_{number}')}"
                    )
                )
                total += result.rowcount
            # The shared tables' sequences are shared: they are past every copied id already.
            return total


# -- database isolation: two databases, rows streamed between them ----------------------


async def _copy_database(db: DatabaseIsolation, source: Tenant, target: Tenant, column: str | None) -> int:
    old_url, new_url = db.tenant_url(source), db.tenant_url(target)
    backend = _backend(old_url)
    if _backend(new_url) != backend:
        raise ConfigurationError("a clone's database is on a server of its source's kind")
    engines = [db._engine(url, null_pool=True) for url in (old_url, new_url)]
    for engine in engines:
        db.budget.attach(engine)
    try:
        async with (
            unavailable_as_503("tenant database server"),
            engines[0].connect() as reader,
            engines[1].connect() as writer,
        ):
            reader = await reader.execution_options(**_REPEATABLE)
            async with reader.begin(), writer.begin():
                await _prove_database_source(reader, backend, source)
                layout = await reader.run_sync(table_layout, None)
                rewrite = None if column is None else (column, target.id)
                total = await copy_rows(reader, writer, layout, rewrite=rewrite)
                if backend == "postgresql":
                    await _continue_sequences(reader, writer, _MARKER_SCHEMA, _MARKER_SCHEMA)
                    return total
                increments = await _auto_increments(reader)
            # MySQL/MariaDB: ALTER TABLE commits by itself; after the rows are in.
            for table, value in increments:
                await writer.exec_driver_sql(
                    f"ALTER TABLE {_q(table, quote='`')} AUTO_INCREMENT = {int(value)}"
                )
            return total
    finally:
        for engine in engines:
            await engine.dispose()


async def _prove_database_source(conn: AsyncConnection, backend: str, source: Tenant) -> None:
    if backend == "postgresql":
        await prove_postgres_source(conn, _MARKER_SCHEMA, source)
        return
    found: Sequence[Any] = (await conn.scalars(_MARKERS[backend])).all()
    if list(found) != [marker_name(source.id)]:
        raise ProvisioningError(f"the database of tenant {source.identifier!r} is not its own")


async def _auto_increments(conn: AsyncConnection) -> list[tuple[str, int]]:
    rows = await conn.execute(
        sa.text(
            "SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND AUTO_INCREMENT IS NOT NULL AND TABLE_TYPE = 'BASE TABLE'"
        )
    )
    return [(str(name), int(value)) for name, value in rows.all()]


# -- SQLite files: two files, rows streamed between them --------------------------------


async def _copy_sqlite(files: SQLiteFileIsolation, source: Tenant, target: Tenant) -> int:
    # The tenants' own engines: a connection checks the file's marker as it opens it.
    async with (
        unavailable_as_503("tenant database"),
        files._engine(source).connect() as reader,
        files._engine(target).connect() as writer,
    ):
        # The driver begins only before a write: BEGIN by hand, so that every read comes
        # from one snapshot (the files are in WAL mode: the source's writers go on).
        await reader.exec_driver_sql("BEGIN")
        layout = await reader.run_sync(table_layout, None)
        async with writer.begin():
            total = await copy_rows(reader, writer, layout)
            if await reader.scalar(sa.text(_SQLITE_SEQUENCE_EXISTS)):
                counters = (await reader.execute(sa.text("SELECT name, seq FROM sqlite_sequence"))).all()
                for name, value in counters:
                    await writer.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :n"), {"n": name})
                    await writer.execute(
                        sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:n, :v)"),
                        {"n": name, "v": value},
                    )
        return total


_SQLITE_SEQUENCE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"
