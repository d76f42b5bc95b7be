"""Moves into and out of the database tier (hybrid isolation): schema or rls ↔ database.

Called by `HybridIsolation.move`, with the guarantees of the moves between schema and
rls: the tenant's writes are held while its rows are copied (from a schema or a database:
writers wait on an EXCLUSIVE lock, reads go on; from rls: its transactions answer 503),
so every write committed before the switch is in the new copy; the new copy is committed
first, then the old one is fenced off in the transaction that held the writes, so a
write of a session still routed there fails instead of landing where nobody reads:

* a schema is renamed to `<name>_` (as in the move to rls);
* a tenant database keeps its name, and its `public` schema, which holds the tenant's
  marker, is renamed to `public_moved`: a session's `BEGIN` then finds no marker and
  answers 503 (`_incarnation.refusal`), and a writer that waited for the lock finds no
  table;
* the shared tables fence the tenant, as in the move to a schema.

Rows are streamed between the databases (`copying.copy_rows`), in the order of the
`MetaData`'s foreign keys; sequences are moved past the highest id copied. If anything
fails before the old copy is fenced, the new copy is removed and the old one serves on.
"""

import asyncio

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant
from .base import Isolation, quote_identifier, tenant_tables
from .copying import Layout, copy_rows, prove_postgres_source
from .database import DatabaseIsolation, _backend
from .rls import RLSIsolation
from .schema import SchemaIsolation

__all__ = ["MOVED_PUBLIC", "move_database_tier", "old_schema_name"]

MOVED_PUBLIC = "public_moved"
"""What a tenant database's `public` schema is renamed to when the tenant moves out of it."""

_q = quote_identifier


def old_schema_name(name: str) -> str:
    """The name a schema tier's copy is renamed to when its tenant moves out (`<name>_`)."""
    # A trailing "_": no slug ends in "-", so no live tenant's schema is ever named so.
    old = name + "_"
    if len(old.encode()) > 63:
        raise ConfigurationError(f"schema {name!r} is too long to keep an old copy beside it")
    return old


def _layout(metadata: sa.MetaData, column: str | None) -> Layout:
    # Parents first; with row-level security only the tables it guards (the tenant column).
    return [
        (table.name, [c.name for c in table.columns if c.computed is None])
        for table in tenant_tables(metadata)
        if column is None or column in table.c
    ]


async def move_database_tier(
    tenant: Tenant, source: Isolation, destination: Isolation, metadata: sa.MetaData, column: str
) -> None:
    """Copy `tenant`'s rows (the tables of `metadata`) from `source` into `destination`; fence the old copy.

    One of the two is the database tier (PostgreSQL), the other a schema or the shared
    tables (rls). `column` is the tenant column every tier's tables carry.
    """
    if isinstance(destination, DatabaseIsolation):
        if _backend(destination.tenant_url(tenant)) != "postgresql":
            raise ConfigurationError("moves into the database tier need PostgreSQL")
        if isinstance(source, SchemaIsolation):
            name = source.storage_name(tenant.identifier)
            await _refuse_old_schema(source.ddl_engine, name, tenant)
            await _into_database(tenant, source.ddl_engine, name, destination, metadata, None, column)
            return
        if isinstance(source, RLSIsolation):
            await _into_database(
                tenant, source.owner_engine, source.schema, destination, metadata, source, column
            )
            return
    elif isinstance(source, DatabaseIsolation):
        if _backend(source.tenant_url(tenant)) != "postgresql":
            raise ConfigurationError("moves out of the database tier need PostgreSQL")
        if isinstance(destination, SchemaIsolation | RLSIsolation):
            await _out_of_database(tenant, source, destination, metadata, column)
            return
    raise ConfigurationError(
        f"moving from {type(source).__name__} to {type(destination).__name__} is not supported"
    )


async def _refuse_old_schema(engine: AsyncEngine, name: str, tenant: Tenant) -> None:
    old = old_schema_name(name)
    async with unavailable_as_503("tenant database"), engine.connect() as conn:
        if await conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": old}):
            raise ProvisioningError(
                f"an old copy of tenant {tenant.identifier!r} ({old!r}) exists; remove it first"
            )


async def _lock_writes(conn: AsyncConnection, schema: str, layout: Layout) -> None:
    # EXCLUSIVE: the tenant's writers finish first and new ones wait; reads go on.
    if layout:
        tables = ", ".join(f"{_q(schema)}.{_q(name)}" for name, _ in layout)
        await conn.execute(sa.text(f"LOCK TABLE {tables} IN EXCLUSIVE MODE"))


async def _into_database(
    tenant: Tenant,
    engine: AsyncEngine,
    schema: str,
    database: DatabaseIsolation,
    metadata: sa.MetaData,
    rls: RLSIsolation | None,
    column: str,
) -> None:
    """From a schema (`rls` None) or the shared tables into a new database of the tenant's."""
    layout = _layout(metadata, rls.column if rls is not None else None)
    await database.provision(tenant, metadata)  # a new database: refuses an existing one
    target = database._engine(database.tenant_url(tenant), null_pool=True)
    database.budget.attach(target)
    try:
        async with (
            unavailable_as_503("tenant database"),
            engine.connect() as reader,
            target.connect() as writer,
        ):
            async with reader.begin():
                if rls is not None:
                    # Waits for the tenant's running transactions; new ones answer 503 until
                    # this commits, and after it the fence sends them away.
                    await rls.hold(reader, tenant)
                    await rls.bind_owner(reader, tenant)
                else:
                    await _lock_writes(reader, schema, layout)
                async with writer.begin():
                    await copy_rows(reader, writer, layout, reader_schema=schema, rewrite=(column, tenant.id))
                    await advance_sequences(writer, "public", layout)
                # The new copy is committed: fence the old one, still holding the writes.
                if rls is not None:
                    await rls.fence(reader, tenant, moved=True)
                else:
                    await reader.execute(
                        sa.text(f"ALTER SCHEMA {_q(schema)} RENAME TO {_q(old_schema_name(schema))}")
                    )
    except BaseException:
        await asyncio.shield(database.destroy(tenant))  # no half-made copy is left
        raise
    finally:
        await target.dispose()


async def _out_of_database(
    tenant: Tenant,
    database: DatabaseIsolation,
    destination: SchemaIsolation | RLSIsolation,
    metadata: sa.MetaData,
    column: str,
) -> None:
    """From the tenant's database into a new schema or the shared tables."""
    rls = destination if isinstance(destination, RLSIsolation) else None
    layout = _layout(metadata, rls.column if rls is not None else None)
    source = database._engine(database.tenant_url(tenant), null_pool=True)
    database.budget.attach(source)
    try:
        async with unavailable_as_503("tenant database"), source.connect() as conn:
            moved = await conn.scalar(
                sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": MOVED_PUBLIC}
            )
        if moved:
            raise ProvisioningError(f"tenant {tenant.identifier!r}'s database holds an old copy already")
        if isinstance(destination, RLSIsolation):
            await destination.provision(tenant, metadata)  # guards the tables; refuses rows of the tenant
            engine, schema = destination.owner_engine, destination.schema
        else:
            await destination.provision(tenant, metadata)  # a new schema: refuses an existing one
            engine, schema = destination.ddl_engine, destination.storage_name(tenant.identifier)
        try:
            async with (
                unavailable_as_503("tenant database"),
                source.connect() as reader,
                engine.connect() as writer,
            ):
                async with reader.begin():
                    await prove_postgres_source(reader, "public", tenant)  # the tenant's own database
                    await _lock_writes(reader, "public", layout)
                    async with writer.begin():
                        if rls is not None:
                            await rls.bind_owner(writer, tenant)
                            await rls.fence(writer, tenant, moved=False)
                        await copy_rows(
                            reader, writer, layout, writer_schema=schema, rewrite=(column, tenant.id)
                        )
                        await advance_sequences(writer, schema, layout)
                    # Sessions still routed to the database find no marker at BEGIN (503),
                    # and a writer that waited for the lock finds no table.
                    await reader.execute(sa.text(f"ALTER SCHEMA public RENAME TO {_q(MOVED_PUBLIC)}"))
        except BaseException:
            await asyncio.shield(_remove_copy(destination, tenant))  # no half-made copy is left
            raise
    finally:
        await source.dispose()
    await database.engines.discard(tenant.id)  # its pooled connections reach the old copy


async def _remove_copy(destination: SchemaIsolation | RLSIsolation, tenant: Tenant) -> None:
    if isinstance(destination, RLSIsolation):
        async with unavailable_as_503("tenant database"), destination.owner_engine.begin() as conn:
            await destination.delete_rows(conn, tenant)
            await destination.fence(conn, tenant, moved=True)
        return
    await destination.destroy(tenant)


async def advance_sequences(conn: AsyncConnection, schema: str, layout: Layout) -> None:
    """Move each copied table's sequences past the highest value copied, so new rows do not collide."""
    for table, _ in layout:
        rows = await conn.execute(
            sa.text(
                "SELECT a.attname::text, pg_get_serial_sequence(t.name, a.attname) "
                "FROM (SELECT format('%I.%I', CAST(:schema AS text), CAST(:table AS text)) AS name) t "
                "JOIN pg_attribute a ON a.attrelid = t.name::regclass AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            {"schema": schema, "table": table},
        )
        for name, sequence in rows.all():
            if sequence is None:
                continue
            await conn.execute(
                sa.text(
                    f"SELECT setval(:seq, GREATEST((SELECT last_value FROM {sequence}), "  # noqa: S608
                    f"(SELECT max({_q(name)}) FROM {_q(schema)}.{_q(table)})))"
                ),
                {"seq": sequence},
            )
