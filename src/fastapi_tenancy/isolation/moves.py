"""Moves into and out of the database tier (hybrid isolation): schema or rls ↔ database, online.

Called by `HybridIsolation.move`, with the guarantees of the moves between schema and
rls (every write committed before the switch is in the new copy; a session still routed
to the old copy fails instead of writing where nobody reads), but the tenant's writes go
on while its rows are copied, and are held only to bring the copy up to date and switch:

1. Change capture (`capture.py`): triggers on the tenant's source tables record the key of
   every row changed from now on.
2. The rows are streamed into the new copy from one `REPEATABLE READ` snapshot
   (`copying.copy_rows`, tables in the order of the `MetaData`'s foreign keys), while the
   tenant reads and writes as usual.
3. Catching up, still online: the changes recorded so far are replayed into the copy
   (up to `CATCH_UP_PASSES` times, until a pass finds fewer than `CATCH_UP_DONE` keys),
   so that little is left for the hold.
4. The hold, inside the caller's `Hooks.holding()` (this process's 503s, and maintenance if
   asked): the writes are held as they were for the whole copy before (from a schema or
   a database: writers wait on an EXCLUSIVE lock, reads go on; from rls: its transactions
   answer 503); the rest of the changes is replayed, sequences are moved past the highest
   id, and the new copy is committed; then the old one is fenced off in the transaction
   that holds the writes:

   * a schema is renamed to `<name>_` (as in the move to rls);
   * a tenant database keeps its name, and its `public` schema, which holds the tenant's
     marker, is renamed to `public_moved`: a session's `BEGIN` then finds no marker and
     answers 503 (`_incarnation.refusal`), and a writer that waited for the lock finds no
     table;
   * the shared tables fence the tenant, as in the move to a schema.

5. The caller's `Hooks.switch()` switches the registry, still inside `holding()`.
6. The triggers and the change table are dropped, whether the move succeeded or not: after
   the switch, so that dropping them (a moment's lock on each table) is not part of it.

Why not a full hold: copying takes time in proportion to the tenant's rows, and its writes
would wait (or answer 503) all along; replaying what changed meanwhile takes time in
proportion to the writes during the last catch-up pass. A table without a primary key
cannot be replayed row by row: such a move holds the writes for the whole copy, as before
(logged). So does a replay that cannot proceed (`capture.Resync`: a `TRUNCATE`, or a
unique value handed from a deleted row to a new one): the copy is emptied and made again
under the hold. If anything fails before the old copy is fenced, the hold ends, the new
copy is removed and the old one serves on. One move of a tenant runs at a time (a session
advisory lock on the main database): a second would remove the first's triggers.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from ..tenant import Tenant
from .base import Isolation, quote_identifier, tenant_tables
from .capture import Capture, Resync
from .copying import Layout, copy_rows, prove_postgres_source
from .database import DatabaseIsolation, _backend
from .rls import RLSIsolation
from .schema import SchemaIsolation

__all__ = [
    "CATCH_UP_DONE",
    "CATCH_UP_PASSES",
    "MOVED_PUBLIC",
    "Hooks",
    "move_database_tier",
    "old_schema_name",
]

logger = logging.getLogger("fastapi_tenancy")

MOVED_PUBLIC = "public_moved"
"""What a tenant database's `public` schema is renamed to when the tenant moves out of it."""

CATCH_UP_PASSES = 5
"""At most this many catch-up passes before the writes are held."""

CATCH_UP_DONE = 1000
"""A catch-up pass that replays fewer changed keys than this is the last one."""

_Hook = Callable[[], Awaitable[None]]
_Holding = Callable[[], AbstractAsyncContextManager[object]]

_q = quote_identifier


def old_schema_name(name: str) -> str:
    """The name a schema tier's copy is renamed to when its tenant moves out (`<name>_`)."""
    # A trailing "_": no slug ends in "-", so no live tenant's schema is ever named so.
    old = name + "_"
    if len(old.encode()) > 63:
        raise ConfigurationError(f"schema {name!r} is too long to keep an old copy beside it")
    return old


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """The caller's part of a move (`Isolation.move`'s `holding` and `switch`).

    `holding()` is entered just before the tenant's writes are held and left when the
    move fails or has switched; `switch()` runs inside it once the old copy is fenced off
    (the registry's switch), before the move cleans up after itself.
    """

    holding: _Holding = nullcontext
    switch: _Hook = _nothing


def _layout(metadata: sa.MetaData, column: str | None) -> tuple[Layout, dict[str, list[str]]]:
    # Parents first; with row-level security only the tables it guards (the tenant column).
    tables = [t for t in tenant_tables(metadata) if column is None or column in t.c]
    layout = [(t.name, [c.name for c in t.columns if c.computed is None]) for t in tables]
    return layout, {t.name: [c.name for c in t.primary_key.columns] for t in tables}


@dataclass
class _Route:
    """Where one move reads and writes, and what it does at each end."""

    tenant: Tenant
    column: str  # the tenant column, rewritten to the tenant's id in the copy
    layout: Layout
    keys: dict[str, list[str]]
    source: AsyncEngine
    source_schema: str
    moved_schema: str  # where the source's objects are once it is fenced
    target: AsyncEngine
    target_schema: str
    source_rls: RLSIsolation | None = None
    target_rls: RLSIsolation | None = None
    prove: bool = False  # the source is a tenant database: prove it is the tenant's

    async def enter_source(self, conn: AsyncConnection) -> None:
        if self.prove:
            await prove_postgres_source(conn, self.source_schema, self.tenant)  # the tenant's own database
        if self.source_rls is not None:
            await self.source_rls.bind_owner(conn, self.tenant)  # the policies confine the reads

    async def hold(self, conn: AsyncConnection) -> None:
        if self.source_rls is not None:
            # Waits for the tenant's running transactions; new ones answer 503 until this
            # commits, and after it the fence sends them away.
            await self.source_rls.hold(conn, self.tenant)
        elif self.layout:
            # EXCLUSIVE: the tenant's writers finish first and new ones wait; reads go on.
            tables = ", ".join(f"{_q(self.source_schema)}.{_q(name)}" for name, _ in self.layout)
            await conn.execute(sa.text(f"LOCK TABLE {tables} IN EXCLUSIVE MODE"))
        await self.enter_source(conn)

    async def enter_target(self, conn: AsyncConnection) -> None:
        if self.target_rls is not None:
            await self.target_rls.bind_owner(conn, self.tenant)
            await self.target_rls.fence(conn, self.tenant, moved=False)

    async def fence(self, conn: AsyncConnection) -> None:
        if self.source_rls is not None:
            await self.source_rls.fence(conn, self.tenant, moved=True)
        else:
            # A schema renamed away: sessions still routed to it find no marker at BEGIN
            # (503), and a writer that waited for the lock finds no table.
            await conn.execute(
                sa.text(f"ALTER SCHEMA {_q(self.source_schema)} RENAME TO {_q(self.moved_schema)}")
            )

    @property
    def rewrite(self) -> tuple[str, str]:
        return self.column, self.tenant.id


async def move_database_tier(
    tenant: Tenant,
    source: Isolation,
    destination: Isolation,
    metadata: sa.MetaData,
    column: str,
    *,
    hooks: Hooks = Hooks(),  # noqa: B008 - immutable
) -> None:
    """Copy `tenant`'s rows (the tables of `metadata`) from `source` into `destination`; fence the old copy.

    One of the two is the database tier (PostgreSQL), the other a schema or the shared
    tables (rls). `column` is the tenant column every tier's tables carry. The tenant's
    writes go on during the copy, and are held inside `hooks.holding()`; `hooks.switch`
    runs once the old copy is fenced off (a failure after that leaves the new copy).
    """
    main = _main_engine(source) or _main_engine(destination)
    if main is None:
        raise ConfigurationError(
            f"moving from {type(source).__name__} to {type(destination).__name__} is not supported"
        )
    async with _one_move_at_a_time(main, tenant):
        await _move(tenant, source, destination, metadata, column, hooks)


def _main_engine(isolation: Isolation) -> AsyncEngine | None:
    if isinstance(isolation, SchemaIsolation):
        return isolation.ddl_engine
    if isinstance(isolation, RLSIsolation):
        return isolation.owner_engine
    return None


@asynccontextmanager
async def _one_move_at_a_time(engine: AsyncEngine, tenant: Tenant) -> AsyncIterator[None]:
    """Refuse a second move of `tenant` while this one runs (in any process).

    Two would provision, copy and clean up over each other (the second removing the
    first's change capture, or on failure the first's new copy).
    """
    key = {"key": f"fastapi_tenancy_move:{tenant.id}"}
    async with unavailable_as_503("tenant database"), engine.connect() as conn:
        # Session-level, on a connection of its own held for the move: it ends with it.
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        if not await conn.scalar(sa.text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key):
            raise ProvisioningError(f"tenant {tenant.identifier!r} is being moved already")
        try:
            yield
        finally:
            await conn.execute(sa.text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)


async def _move(
    tenant: Tenant,
    source: Isolation,
    destination: Isolation,
    metadata: sa.MetaData,
    column: str,
    hooks: Hooks,
) -> None:
    if isinstance(destination, DatabaseIsolation):
        if _backend(destination.tenant_url(tenant)) != "postgresql":
            raise ConfigurationError("moves into the database tier need PostgreSQL")
        if isinstance(source, SchemaIsolation):
            name = source.storage_name(tenant.identifier)
            await _refuse_old_schema(source.ddl_engine, name, tenant)
            await _into_database(tenant, source.ddl_engine, name, destination, metadata, None, column, hooks)
            return
        if isinstance(source, RLSIsolation):
            await _into_database(
                tenant, source.owner_engine, source.schema, destination, metadata, source, column, hooks
            )
            return
    elif isinstance(source, DatabaseIsolation):
        if _backend(source.tenant_url(tenant)) != "postgresql":
            raise ConfigurationError("moves out of the database tier need PostgreSQL")
        if isinstance(destination, SchemaIsolation | RLSIsolation):
            await _out_of_database(tenant, source, destination, metadata, column, hooks)
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


async def _into_database(
    tenant: Tenant,
    engine: AsyncEngine,
    schema: str,
    database: DatabaseIsolation,
    metadata: sa.MetaData,
    rls: RLSIsolation | None,
    column: str,
    hooks: Hooks,
) -> None:
    """From a schema (`rls` None) or the shared tables into a new database of the tenant's."""
    layout, keys = _layout(metadata, rls.column if rls is not None else None)
    await database.provision(tenant, metadata)  # a new database: refuses an existing one
    target = database._engine(database.tenant_url(tenant), null_pool=True)
    database.budget.attach(target)
    moved = schema if rls is not None else old_schema_name(schema)
    route = _Route(tenant, column, layout, keys, engine, schema, moved, target, "public", source_rls=rls)
    try:
        await _copy(route, hooks, lambda: database.destroy(tenant))
    finally:
        await target.dispose()


async def _out_of_database(
    tenant: Tenant,
    database: DatabaseIsolation,
    destination: SchemaIsolation | RLSIsolation,
    metadata: sa.MetaData,
    column: str,
    hooks: Hooks,
) -> None:
    """From the tenant's database into a new schema or the shared tables."""
    rls = destination if isinstance(destination, RLSIsolation) else None
    layout, keys = _layout(metadata, rls.column if rls is not None else None)
    source = database._engine(database.tenant_url(tenant), null_pool=True)
    database.budget.attach(source)
    try:
        async with unavailable_as_503("tenant database"), source.connect() as conn:
            moved = await conn.scalar(
                sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": MOVED_PUBLIC}
            )
        if moved:
            raise ProvisioningError(f"tenant {tenant.identifier!r}'s database holds an old copy already")
        await destination.provision(tenant, metadata)  # rls: refuses rows of the tenant; schema: a new one
        if isinstance(destination, RLSIsolation):
            engine, schema = destination.owner_engine, destination.schema
        else:
            engine, schema = destination.ddl_engine, destination.storage_name(tenant.identifier)
        route = _Route(
            tenant,
            column,
            layout,
            keys,
            source,
            "public",
            MOVED_PUBLIC,
            engine,
            schema,
            target_rls=rls,
            prove=True,
        )
        await _copy(route, hooks, lambda: _remove_copy(destination, tenant))
    finally:
        await source.dispose()
    await database.engines.discard(tenant.id)  # its pooled connections reach the old copy


async def _copy(route: _Route, hooks: Hooks, remove_new_copy: _Hook) -> None:
    """Copy online (capture, snapshot, catch up); hold the writes, replay the rest, commit, fence; switch."""
    capture = None
    missing = [name for name, keys in route.keys.items() if not keys]
    if missing:
        logger.warning(
            "tables %s have no primary key: the writes of tenant %s are held for its whole move",
            missing,
            route.tenant.identifier,
        )
    elif route.layout:
        column = None if route.source_rls is None else route.source_rls.column
        capture = Capture(route.tenant, route.source_schema, route.layout, route.keys, column)
    fenced = False
    try:
        try:
            started = time.perf_counter()
            async with (
                unavailable_as_503("tenant database"),
                route.target.connect() as writer,
                writer.begin() as copying,
            ):
                await route.enter_target(writer)
                if capture is not None:
                    await capture.install(route.source)
                    await _snapshot_copy(route, writer)
                    await _catch_up(route, capture, writer)
                copied = time.perf_counter()
                # Connected before the hold; the hold ends (holding() is left) on a failure
                # before the new copy is removed, and after the switch on success.
                async with route.source.connect() as reader, hooks.holding():
                    async with reader.begin():
                        await route.hold(reader)
                        replayed = await _replay(route, capture, reader, writer)
                        await advance_sequences(writer, route.target_schema, route.layout)
                        await copying.commit()
                        # The new copy is committed: fence the old one, still holding the writes.
                        await route.fence(reader)
                    fenced = True
                    held = time.perf_counter()
                    await hooks.switch()
        except BaseException:
            if not fenced:
                await asyncio.shield(remove_new_copy())  # no half-made copy is left
            raise
        logger.info(
            "moved tenant %s: copied in %.2f s, writes held %.3f s (%s keys replayed), switched in %.3f s",
            route.tenant.identifier,
            copied - started,
            held - copied,
            replayed,
            time.perf_counter() - held,
        )
    finally:
        if capture is not None:
            # Also after a failure: the old copy serves on, with nothing of the move left in it.
            await asyncio.shield(_remove_capture(route, capture, fenced))


async def _remove_capture(route: _Route, capture: Capture, fenced: bool) -> None:
    schema = route.moved_schema if fenced else route.source_schema
    try:
        await capture.remove(route.source, schema)
    except Exception:  # the move's own outcome matters more: say what is left
        logger.exception(
            "could not drop the change capture of tenant %s's move: drop function %s.%s_capture() "
            "cascade, and table %s.%s_changes",
            route.tenant.identifier,
            schema,
            capture.name,
            schema,
            capture.name,
        )


async def _snapshot_copy(route: _Route, writer: AsyncConnection) -> None:
    async with route.source.connect() as snapshot:
        snapshot = await snapshot.execution_options(isolation_level="REPEATABLE READ")
        async with snapshot.begin():
            await route.enter_source(snapshot)
            await copy_rows(
                snapshot,
                writer,
                route.layout,
                reader_schema=route.source_schema,
                writer_schema=route.target_schema,
                rewrite=route.rewrite,
            )


async def _catch_up(route: _Route, capture: Capture, writer: AsyncConnection) -> None:
    for _ in range(CATCH_UP_PASSES):
        async with route.source.connect() as reader:
            transaction = await reader.begin()
            await route.enter_source(reader)
            try:
                replayed = await capture.catch_up(reader, writer, route.target_schema, route.rewrite)
            except Resync:
                await transaction.rollback()  # the records stay, for the hold
                return
            await transaction.commit()  # the records replayed are taken
        if replayed < CATCH_UP_DONE:
            return


async def _replay(
    route: _Route, capture: Capture | None, reader: AsyncConnection, writer: AsyncConnection
) -> int | str:
    """Bring the copy up to date under the hold: the recorded changes, or all rows again."""
    if capture is not None:
        try:
            return await capture.apply(reader, writer, route.target_schema, route.rewrite)
        except Resync as exc:
            logger.warning("tenant %s is copied again under the hold: %s", route.tenant.identifier, exc)
    for name, _ in reversed(route.layout):
        # Children first; the copy's own rows only (the writer is bound under row-level security).
        await writer.execute(sa.text(f"DELETE FROM {_q(route.target_schema)}.{_q(name)}"))  # noqa: S608
    await copy_rows(
        reader,
        writer,
        route.layout,
        reader_schema=route.source_schema,
        writer_schema=route.target_schema,
        rewrite=route.rewrite,
    )
    return "all"


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
