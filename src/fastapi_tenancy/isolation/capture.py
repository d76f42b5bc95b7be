"""Change capture for online moves: which of a tenant's rows changed while its copy was made.

The moves into and out of the database tier (`moves.py`) copy a tenant's rows while its
writes go on, then hold the writes only to bring the copy up to date. Why triggers, and
not logical decoding: they work on any PostgreSQL (no `wal_level = logical`, no
replication privilege, no slot to leak), they record a change in the transaction that
makes it (so a change is recorded exactly when it commits), and a move can read what
they recorded with plain SQL.

* Before the copy, each source table gets an `AFTER INSERT OR UPDATE OR DELETE` row trigger
  that records the primary key of every changed row (old and new key of an update) in a
  change table of the move's own. Under row-level security the triggers sit on the shared
  tables with a `WHEN` on the tenant column: other tenants' writes pay for the `WHEN` only.
  A `TRUNCATE` (statement trigger) records the whole table.
* `CREATE TRIGGER` waits for the table's running writers, so every write either committed
  before the trigger existed (and is in the copy's snapshot, taken afterwards) or is
  recorded.
* Catching up, and under the hold: for each recorded key, the row as it is now in the
  source is written over the copy's (`INSERT ... ON CONFLICT DO UPDATE`, parents first),
  or deleted from the copy if it is gone (children first). Re-applying a key is harmless,
  so a catch-up pass takes (deletes) the records it sees, and the hold applies the rest.
* A recorded `TRUNCATE`, or a constraint the replay trips over (a unique value handed from
  a deleted row to a new one, which replay in key order cannot order), raises `Resync`:
  the caller then copies the tenant again under the hold (correct, only slower).

The trigger function is `SECURITY DEFINER` (the tenant's own role writes the change table,
which it cannot read or write itself); dropping it drops the triggers.
"""

import hashlib
import json
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import unavailable_as_503
from ..tenant import Tenant
from .base import quote_identifier
from .copying import BATCH_ROWS, Layout

__all__ = ["Capture", "Resync"]

_q = quote_identifier


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Resync(Exception):
    """The recorded changes cannot be replayed row by row: copy the tenant again, under the hold."""


class Capture:
    """The triggers and change table of one move, on one source schema; not shared between moves.

    `keys` maps each table of `layout` to its primary key columns. `column` (sources under
    row-level security) is the tenant column the triggers' `WHEN` compares to the tenant id.
    """

    def __init__(
        self, tenant: Tenant, schema: str, layout: Layout, keys: dict[str, list[str]], column: str | None
    ) -> None:
        self.tenant = tenant
        self.schema = schema
        self.layout = layout
        self.keys = keys
        self.column = column
        digest = hashlib.sha256(tenant.id.encode()).hexdigest()[:16]
        # One name per tenant: a move's leftovers (a killed process) are found by the next one.
        self.name = f"fastapi_tenancy_move_{digest}"

    def _objects(self, schema: str) -> tuple[str, str]:
        """The change table and the trigger function, in `schema`."""
        return f"{_q(schema)}.{_q(self.name + '_changes')}", f"{_q(schema)}.{_q(self.name + '_capture')}"

    async def install(self, engine: AsyncEngine) -> None:
        """Create the change table and the triggers (each table in a transaction of its own)."""
        await self.remove(engine, self.schema)  # what a killed move left
        table, function = self._objects(self.schema)
        async with unavailable_as_503("tenant database"), engine.begin() as conn:
            await conn.execute(
                sa.text(
                    f"CREATE UNLOGGED TABLE {table} "
                    "(seq bigserial PRIMARY KEY, relation text NOT NULL, key jsonb)"
                )
            )
            # Default privileges of the schema may have granted it to the tenant's roles.
            grantees = await conn.scalars(
                sa.text(
                    "SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a "
                    "WHERE c.oid = CAST(:t AS regclass) AND a.grantee <> c.relowner AND a.grantee <> 0"
                ),
                {"t": table},
            )
            await conn.execute(sa.text(f"REVOKE ALL ON TABLE {table} FROM PUBLIC"))
            for grantee in grantees.all():
                await conn.execute(sa.text(f"REVOKE ALL ON TABLE {table} FROM {grantee}"))
            await conn.execute(sa.text(_FUNCTION.format(function=function, table=table)))
        for name, _ in self.layout:
            # One transaction per table: each waits for that table's writers only, and
            # holding several tables' locks at once could deadlock with a writer.
            async with unavailable_as_503("tenant database"), engine.begin() as conn:
                for statement in self._triggers(name, function):
                    await conn.execute(sa.text(statement))

    def _triggers(self, name: str, function: str) -> list[str]:
        target = f"{_q(self.schema)}.{_q(name)}"
        arguments = ", ".join(_literal(k) for k in self.keys[name])
        trigger = self.name
        truncate = (
            f"CREATE TRIGGER {_q(trigger + '_t')} AFTER TRUNCATE ON {target} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )
        if self.column is None:
            return [
                f"CREATE TRIGGER {_q(trigger)} AFTER INSERT OR UPDATE OR DELETE ON {target} "
                f"FOR EACH ROW EXECUTE FUNCTION {function}({arguments})",
                truncate,
            ]
        column, tenant = _q(self.column), _literal(self.tenant.id)
        # The shared tables: a row trigger's WHEN may name NEW only for inserts, OLD only for deletes.
        conditions = {
            "INSERT": f"NEW.{column} = {tenant}",
            "UPDATE": f"OLD.{column} = {tenant} OR NEW.{column} = {tenant}",
            "DELETE": f"OLD.{column} = {tenant}",
        }
        return [
            f"CREATE TRIGGER {_q(trigger + '_' + event[0].lower())} AFTER {event} ON {target} "
            f"FOR EACH ROW WHEN ({condition}) EXECUTE FUNCTION {function}({arguments})"
            for event, condition in conditions.items()
        ] + [truncate]

    async def remove(self, engine: AsyncEngine, schema: str) -> None:
        """Drop the function (and with it every trigger) and the change table in `schema`, if there."""
        table, function = self._objects(schema)
        async with unavailable_as_503("tenant database"), engine.begin() as conn:
            exists = await conn.scalar(
                sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": schema}
            )
            if exists:
                await conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {function}() CASCADE"))
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))

    async def leftovers(self, conn: AsyncConnection) -> list[str]:
        """The capture objects of this move still in the source database (for tests and checks)."""
        rows = await conn.scalars(
            sa.text(
                "SELECT relname::text FROM pg_class WHERE relname LIKE :n || '%' UNION ALL "
                "SELECT proname::text FROM pg_proc WHERE proname LIKE :n || '%' UNION ALL "
                "SELECT tgname::text FROM pg_trigger WHERE tgname LIKE :n || '%'"
            ),
            {"n": self.name},
        )
        return list(rows.all())

    # -- replay ------------------------------------------------------------------------

    async def catch_up(
        self, reader: AsyncConnection, writer: AsyncConnection, target_schema: str, rewrite: tuple[str, str]
    ) -> int:
        """Take the changes recorded so far and replay them into the copy; how many keys.

        In `reader`'s transaction: the records are deleted, so a caller that does not
        commit it (the replay failed) leaves them for the hold.
        """
        table, _ = self._objects(self.schema)
        rows = await reader.execute(sa.text(f"DELETE FROM {table} RETURNING relation, key::text"))  # noqa: S608
        return await self._replay(reader, writer, target_schema, rewrite, [(r[0], r[1]) for r in rows])

    async def apply(
        self, reader: AsyncConnection, writer: AsyncConnection, target_schema: str, rewrite: tuple[str, str]
    ) -> int:
        """Replay every change recorded and not yet taken (the source's writes are held); how many keys."""
        table, _ = self._objects(self.schema)
        rows = await reader.execute(sa.text(f"SELECT DISTINCT relation, key::text FROM {table}"))  # noqa: S608
        return await self._replay(reader, writer, target_schema, rewrite, [(r[0], r[1]) for r in rows])

    async def _replay(
        self,
        reader: AsyncConnection,
        writer: AsyncConnection,
        target_schema: str,
        rewrite: tuple[str, str],
        records: Iterable[tuple[str, str | None]],
    ) -> int:
        changed: dict[str, set[str]] = {}
        for relation, key in records:
            if key is None:
                raise Resync(f"table {relation!r} was truncated during the copy")
            changed.setdefault(relation, set()).add(key)
        try:
            async with writer.begin_nested():
                for name, columns in self.layout:  # parents first
                    for batch in _batches(changed.get(name, ())):
                        await self._upsert(reader, writer, target_schema, name, columns, batch, rewrite)
                for name, _ in reversed(self.layout):  # children first
                    for batch in _batches(changed.get(name, ())):
                        await self._delete(reader, writer, target_schema, name, batch, rewrite)
        except sa_exc.IntegrityError as exc:
            raise Resync(f"the recorded changes could not be replayed in key order: {exc.orig}") from exc
        return sum(len(keys) for keys in changed.values())

    async def _upsert(
        self,
        reader: AsyncConnection,
        writer: AsyncConnection,
        target_schema: str,
        name: str,
        columns: list[str],
        batch: str,
        rewrite: tuple[str, str],
    ) -> None:
        source, keys = f"{_q(self.schema)}.{_q(name)}", self.keys[name]
        listed = ", ".join(f"t.{_q(c)}" for c in columns)
        mine, theirs = (", ".join(f"{side}.{_q(k)}" for k in keys) for side in "tr")
        rows = await reader.execute(
            sa.text(
                f"SELECT {listed} FROM {source} t WHERE ({mine}) IN (SELECT {theirs} "  # noqa: S608
                f"FROM jsonb_array_elements(CAST(:keys AS jsonb)) AS k(v), "
                f"jsonb_populate_record(NULL::{source}, k.v) AS r)"
            ),
            {"keys": batch},
        )
        records = [dict(zip(columns, row, strict=True)) for row in rows.all()]
        if not records:
            return
        if rewrite[0] in columns:
            for record in records:
                record[rewrite[0]] = rewrite[1]
        target = sa.table(name, *(sa.column(c) for c in columns), schema=target_schema)
        statement = postgresql.insert(target)
        updated = {c: statement.excluded[c] for c in columns if c not in keys}
        if updated:
            statement = statement.on_conflict_do_update(index_elements=keys, set_=updated)
        else:
            statement = statement.on_conflict_do_nothing(index_elements=keys)
        await writer.execute(statement, records)

    async def _delete(
        self,
        reader: AsyncConnection,
        writer: AsyncConnection,
        target_schema: str,
        name: str,
        batch: str,
        rewrite: tuple[str, str],
    ) -> None:
        source, keys = f"{_q(self.schema)}.{_q(name)}", self.keys[name]
        matches = " AND ".join(f"t.{_q(k)} = r.{_q(k)}" for k in keys)
        # Gone when no source row maps to the copy's key: the tenant column is rewritten in
        # the copy, so a source row relabelled meanwhile still lands on it.
        kept = " AND ".join(f"t.{_q(k)} = r.{_q(k)}" for k in keys if k != rewrite[0]) or "TRUE"
        gone = await reader.scalars(
            sa.text(
                f"SELECT k.v::text FROM jsonb_array_elements(CAST(:keys AS jsonb)) AS k(v), "  # noqa: S608
                f"jsonb_populate_record(NULL::{source}, k.v) AS r "
                f"WHERE NOT EXISTS (SELECT 1 FROM {source} t WHERE {kept})"
            ),
            {"keys": batch},
        )
        missing = list(gone.all())
        if not missing:
            return
        target = f"{_q(target_schema)}.{_q(name)}"
        # The copy's tenant column holds the tenant's id, whatever the source's row said.
        relabel = {rewrite[0]: rewrite[1]} if rewrite[0] in keys else {}
        await writer.execute(
            sa.text(
                f"DELETE FROM {target} t USING jsonb_array_elements(CAST(:keys AS jsonb)) AS k(v), "  # noqa: S608
                f"jsonb_populate_record(NULL::{target}, k.v || CAST(:relabel AS jsonb)) AS r WHERE {matches}"
            ),
            {"keys": "[" + ",".join(missing) + "]", "relabel": json.dumps(relabel)},
        )


def _batches(keys: Iterable[str]) -> Iterable[str]:
    """`keys` (JSON objects) as JSON arrays of at most `BATCH_ROWS` each."""
    ordered = sorted(keys)
    for start in range(0, len(ordered), BATCH_ROWS):
        yield "[" + ",".join(ordered[start : start + BATCH_ROWS]) + "]"


# Records the primary key (TG_ARGV: its columns) of each changed row; a NULL key for a TRUNCATE.
_FUNCTION = """
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    old_key jsonb;
    new_key jsonb;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO {table} (relation, key) VALUES (TG_TABLE_NAME, NULL);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT jsonb_object_agg(k, to_jsonb(OLD) -> k) INTO old_key FROM unnest(TG_ARGV) AS k;
        INSERT INTO {table} (relation, key) VALUES (TG_TABLE_NAME, old_key);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT jsonb_object_agg(k, to_jsonb(NEW) -> k) INTO new_key FROM unnest(TG_ARGV) AS k;
        IF new_key IS DISTINCT FROM old_key THEN
            INSERT INTO {table} (relation, key) VALUES (TG_TABLE_NAME, new_key);
        END IF;
    END IF;
    RETURN NULL;
END
$fn$"""
