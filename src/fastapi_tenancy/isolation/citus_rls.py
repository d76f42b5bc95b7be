"""`CitusTables`: row-level security's shared tables on a Citus cluster, sharded by the tenant column.

Where schema isolation hands Citus whole schemas (`citus.py`), row-level security hands
it its shared tenant tables: each becomes a hash-distributed table on the tenant column
(`create_distributed_table`), all of them in one colocation group, so a tenant's rows
of every table sit in the same shard group on one node, and joins and foreign keys
between them stay on that node. Shared tables flagged `REFERENCE_TABLE` become reference
tables. What the library does on a cluster (docs/scaling-out.md):

- the tenant's binding reaches the workers: the tenant function, besides its
  transaction-local setting, runs `SET LOCAL` of it with `citus.propagate_set_commands`
  on, which Citus repeats on every worker connection of the transaction (a `SET LOCAL`
  sent in the `BEGIN` message itself would not do: Citus repeats the whole message, and
  with it the tenant function, on each worker). Without it the policies on the shards
  see no tenant: every read is empty, every write refused;
- `prepare()` and `distribute()` run in the transaction that creates or guards the
  tables, before creating them (reference tables first) and after the policies: refuses
  (`ConfigurationError`) what Citus cannot distribute, then distributes parents first;
- `placements()` and `move()`: which node holds each tenant's rows, and moving one
  (`isolate_tenant_to_new_shard`, then `citus_move_shard_placement`), for
  `fastapi-tenancy tenants move`.
"""

import time
from collections.abc import Sequence
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .._utils import create_engine, unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError
from .base import Finding, quote_identifier
from .citus import CitusCluster, Move, TransferMode, parse_address

__all__ = ["CitusTables", "insert_rows"]

# The tenant tables of the shared schema: those with the tenant column, other than the
# fence table and partitions (distributed with their parent).
_TENANT_TABLES = """
    SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name, a.attnum,
           format_type(a.atttypid, NULL) AS type
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = :column AND NOT a.attisdropped
     WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND NOT c.relispartition
       AND c.relname <> :fence
"""
# What Citus cannot distribute by the tenant column, one line each (docs/scaling-out.md).
_PROBLEMS = sa.text(
    f"""
    WITH tenant AS ({_TENANT_TABLES})
    SELECT t.name || ': unique index ' || quote_ident(ic.relname) || ' does not include the tenant '
           || 'column (Citus enforces uniqueness per shard only: add ' || quote_ident(:column) || ' to it)'
      FROM tenant t JOIN pg_catalog.pg_index i ON i.indrelid = t.oid
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
     WHERE i.indisunique AND NOT (t.attnum = ANY (i.indkey::int2[]))
    UNION ALL
    SELECT t.name || ': exclusion constraint ' || quote_ident(x.conname)
           || ' does not include the tenant column'
      FROM tenant t JOIN pg_catalog.pg_constraint x ON x.conrelid = t.oid AND x.contype = 'x'
     WHERE NOT (t.attnum = ANY (x.conkey))
    UNION ALL
    SELECT t.name || ': foreign key ' || quote_ident(f.conname) || ' to ' || r.name || ' does not pair '
           || 'the tenant columns (Citus needs FOREIGN KEY (' || quote_ident(:column) || ', ...) '
           || 'REFERENCES ' || r.name || ' (' || quote_ident(:column) || ', ...))'
      FROM tenant t JOIN pg_catalog.pg_constraint f ON f.conrelid = t.oid AND f.contype = 'f'
      JOIN tenant r ON r.oid = f.confrelid
     WHERE NOT EXISTS (SELECT 1 FROM generate_subscripts(f.conkey, 1) k
                        WHERE f.conkey[k] = t.attnum AND f.confkey[k] = r.attnum)
    UNION ALL
    SELECT t.name || ': foreign key ' || quote_ident(f.conname) || ' to ' || f.confrelid::regclass::text
           || ', which is neither a tenant table nor a reference table (flag it citus_reference)'
      FROM tenant t JOIN pg_catalog.pg_constraint f ON f.conrelid = t.oid AND f.contype = 'f'
     WHERE f.confrelid NOT IN (SELECT oid FROM tenant)
       AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p
                        WHERE p.logicalrelid = f.confrelid AND p.repmodel = 't')
    UNION ALL
    SELECT f.conrelid::regclass::text || ': foreign key ' || quote_ident(f.conname) || ' to tenant table '
           || r.name || ' from a table without the tenant column (Citus refuses it)'
      FROM tenant r JOIN pg_catalog.pg_constraint f ON f.confrelid = r.oid AND f.contype = 'f'
     WHERE f.conrelid NOT IN (SELECT oid FROM tenant)
    UNION ALL
    SELECT 'the tenant column has several types (' || string_agg(DISTINCT type, ', ') || '): '
           || 'colocated tables need one'
      FROM tenant HAVING count(DISTINCT type) > 1
    LIMIT 20
    """  # noqa: S608 - no input in the SQL: the names are bound parameters
)
# Tenant tables and whether each is distributed, with its tenant-table parents (foreign keys).
_STATE = sa.text(
    f"""
    WITH tenant AS ({_TENANT_TABLES})
    SELECT t.oid, t.name,
           EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = t.oid AND p.partmethod = 'h')
               AS distributed,
           ARRAY(SELECT DISTINCT f.confrelid FROM pg_catalog.pg_constraint f
                  WHERE f.conrelid = t.oid AND f.contype = 'f' AND f.confrelid IN (SELECT oid FROM tenant)
                    AND f.confrelid <> t.oid) AS parents
      FROM tenant t ORDER BY t.name
    """  # noqa: S608 - as above
)
# Each tenant's shard (by the anchor table, a distributed tenant table), its node, and
# whether the shard holds that tenant alone (isolated: one hash value).
_PLACEMENTS = sa.text(
    """
    SELECT t.id, s.shardid, d.nodename, d.nodeport, s.shardminvalue = s.shardmaxvalue AS isolated
      FROM unnest(CAST(:ids AS text[])) AS t(id)
      JOIN pg_dist_shard s
        ON s.shardid = get_shard_id_for_distribution_column(CAST(:anchor AS regclass), t.id)
      JOIN pg_dist_placement pl ON pl.shardid = s.shardid
      JOIN pg_dist_node d ON d.groupid = pl.groupid
    """
)
# A role that bypasses row-level security: Citus copies a shard's rows as the role that
# moves it, and under FORCE ROW LEVEL SECURITY any other role copies none of them.
_BYPASSES = sa.text("SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user")


class CitusTables:
    """Row-level security's shared tenant tables, distributed by the tenant column on Citus.

    Safe for concurrent use: holds configuration only; `active` is the cluster's (set once
    by its `initialize()`). Inactive, every hook does nothing and `begin_sql()` is empty.
    """

    def __init__(self, cluster: CitusCluster, *, schema: str, column: str, setting: str, fence: str) -> None:
        self.cluster = cluster
        self.schema = schema
        self.column = column
        self.setting = setting
        self._params = {"schema": schema, "column": column, "fence": fence}

    @property
    def active(self) -> bool:
        """Whether the shared tables are on a Citus cluster (found by the cluster's `initialize()`)."""
        return self.cluster.active

    # -- binding a transaction to its tenant, on every node ---------------------------------

    def enter_sql(self) -> str:
        """PL/pgSQL for the tenant function (argument `tenant`): bind the workers' connections too.

        A `SET LOCAL` run by `EXECUTE` reaches Citus with its own text, which it repeats on
        each worker connection of the transaction; `setting` is a validated SQL name.
        """
        if not self.active:
            return ""
        return (
            "PERFORM set_config('citus.propagate_set_commands', 'local', true);\n"
            f"    EXECUTE format('SET LOCAL {self.setting} TO %L', tenant);"
        )

    async def bind(self, conn: AsyncConnection, tenant_id: str) -> None:
        """Bind an owner transaction's worker connections to `tenant_id` (after `set_config`)."""
        if not self.active:
            return
        await conn.execute(sa.text("SELECT set_config('citus.propagate_set_commands', 'local', true)"))
        literal = "'" + tenant_id.replace("'", "''") + "'"
        await conn.execute(sa.text(f"SET LOCAL {self.setting} TO {literal}"))

    # -- distributing the tables ----------------------------------------------------------------

    async def problems(self, conn: AsyncConnection) -> list[str]:
        """What Citus cannot distribute by the tenant column (FKs, unique indexes, types); read-only."""
        return list((await conn.scalars(_PROBLEMS, self._params)).all())

    async def prepare(self, conn: AsyncConnection, metadata: sa.MetaData | None) -> None:
        """Before the owner's transaction creates tenant tables: make flagged shared tables of
        `metadata` reference tables (tenant tables may reference them), and keep Citus from
        turning new tables that reference one into coordinator-local Citus tables, which
        `distribute()` could then not distribute while they reference one another."""
        if not self.active:
            return
        await conn.execute(sa.text("SET LOCAL citus.enable_local_reference_table_foreign_keys TO off"))
        await self.cluster.reference_tables(conn, metadata)

    async def distribute(self, conn: AsyncConnection) -> None:
        """Distribute the tenant tables not distributed yet, colocated, in the owner's transaction.

        Refuses (`ConfigurationError`), before distributing anything, a foreign key or
        unique index Citus could not keep (see `problems()`).
        """
        if not self.active:
            return
        problems = await self.problems(conn)
        if problems:
            raise ConfigurationError(
                "the shared tenant tables cannot be distributed by the tenant column on the Citus "
                "cluster: " + "; ".join(problems) + " (docs/scaling-out.md)"
            )
        rows = (await conn.execute(_STATE, self._params)).all()
        names = {row.oid: row.name for row in rows}
        anchor = next((row.name for row in rows if row.distributed), None)
        waiting = {row.oid: set(row.parents) for row in rows if not row.distributed}
        for row in rows:
            if row.distributed:
                for needs in waiting.values():
                    needs.discard(row.oid)
        while waiting:  # parents first: a child's foreign key needs its parent distributed
            oid = next((o for o, needs in sorted(waiting.items()) if not needs), min(waiting))
            del waiting[oid]
            for needs in waiting.values():
                needs.discard(oid)
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        sa.text(
                            "SELECT create_distributed_table(CAST(:t AS regclass), :column, "
                            "colocate_with => :anchor)"
                        ),
                        {"t": names[oid], "column": self.column, "anchor": anchor or "none"},
                    )
            except Exception as exc:
                orig = getattr(exc, "orig", exc)
                raise ProvisioningError(
                    f"could not distribute {names[oid]} by {self.column!r} on the Citus cluster: {orig}"
                ) from exc
            anchor = anchor or names[oid]

    async def _anchor(self, conn: AsyncConnection) -> str | None:
        rows = (await conn.execute(_STATE, self._params)).all()
        return next((row.name for row in rows if row.distributed), None)

    # -- placement --------------------------------------------------------------------------------

    async def placements(self, tenant_ids: Sequence[str]) -> dict[str, str]:
        """`tenant id -> host:port` of the node holding each tenant's rows (empty: nothing distributed)."""
        if not self.active or not tenant_ids:
            return {}
        async with unavailable_as_503("Citus coordinator"), self.cluster.engine.connect() as conn:
            anchor = await self._anchor(conn)
            if anchor is None:
                return {}
            rows = await conn.execute(_PLACEMENTS, {"ids": list(tenant_ids), "anchor": anchor})
            return {row.id: f"{row.nodename}:{row.nodeport}" for row in rows}

    async def move(
        self, tenant_id: str, target: str, *, admin_url: str | None, mode: TransferMode = "auto"
    ) -> Move:
        """Give `tenant_id` a shard group of its own and move it to `target` (`host:port`).

        `isolate_tenant_to_new_shard(..., 'CASCADE')` splits the tenant's rows of every
        colocated table out of the shard they share with other tenants, then
        `citus_move_shard_placement` moves that group. Both copy with writes blocked
        (`block_writes`): writes to the shard wait for the copy, and none is lost; reads go
        on. Not online as schema moves are: PostgreSQL refuses to replicate logically into
        tables under FORCE ROW LEVEL SECURITY, so `auto` means `block_writes` here and
        `force_logical` is refused. Both copy rows as the connecting role, so they run on
        `admin_url`, a role that bypasses row-level security (a superuser): any other role
        would copy no row, and the tenant's rows would be lost. Returns at once
        (`seconds=0`) when the tenant is alone in its shard on `target` already.
        """
        if mode == "force_logical":
            raise ConfigurationError(
                "row-level security tenants cannot move with logical replication: PostgreSQL refuses "
                "to replicate into tables with FORCE ROW LEVEL SECURITY (use auto or block_writes)"
            )
        host, port = parse_address(target)
        known = {node.address: node for node in await self.cluster.nodes()}
        node = known.get(f"{host}:{port}")
        if node is None or not node.active or not node.holds_shards:
            usable = ", ".join(n.address for n in known.values() if n.active and n.holds_shards) or "none"
            raise ConfigurationError(f"{target} is not a node that holds tenants (nodes: {usable})")
        if admin_url is None:
            raise ConfigurationError(
                "moving a row-level security tenant needs --admin-url: Citus copies the shard's rows "
                "as the connecting role, and under FORCE ROW LEVEL SECURITY the owner role would copy "
                "none; give the URL of a superuser on the coordinator"
            )
        admin = create_engine(admin_url, null_pool=True)
        try:
            async with unavailable_as_503("Citus coordinator"), admin.connect() as conn:
                # Splits and moves cannot run inside a transaction block.
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                if not await conn.scalar(_BYPASSES):
                    raise ConfigurationError(
                        "--admin-url's role does not bypass row-level security: Citus would copy none of "
                        "the shard's rows (use a superuser)"
                    )
                anchor = await self._anchor(conn)
                if anchor is None:
                    raise ProvisioningError("no tenant table is distributed yet: nothing to move")
                placed = (await conn.execute(_PLACEMENTS, {"ids": [tenant_id], "anchor": anchor})).one()
                source = f"{placed.nodename}:{placed.nodeport}"
                if placed.isolated and source == node.address:
                    return Move(self.schema, source, node.address, 0.0)
                started = time.perf_counter()
                shard = placed.shardid
                if not placed.isolated:
                    shard = await conn.scalar(
                        sa.text(
                            "SELECT isolate_tenant_to_new_shard(CAST(:t AS regclass), CAST(:id AS text), "
                            "'CASCADE', shard_transfer_mode => 'block_writes')"
                        ),
                        {"t": anchor, "id": tenant_id},
                    )
                if source != node.address:
                    await conn.execute(
                        sa.text(
                            "SELECT citus_move_shard_placement(:shard, :sh, :sp, :th, :tp, "
                            "shard_transfer_mode => 'block_writes')"
                        ),
                        {"shard": shard, "sh": placed.nodename, "sp": placed.nodeport}
                        | {"th": host, "tp": port},
                    )
        finally:
            await admin.dispose()
        return Move(self.schema, source, node.address, time.perf_counter() - started)

    # -- doctor ---------------------------------------------------------------------------------

    async def diagnose(self) -> list[Finding]:
        """`doctor`'s row for the shared tables on Citus: all distributed, nothing Citus cannot keep."""
        if not self.active:
            return []
        async with self.cluster.engine.connect() as conn:
            problems = await self.problems(conn)
            rows = (await conn.execute(_STATE, self._params)).all()
        local = [row.name for row in rows if not row.distributed]
        status: Literal["ok", "warn", "fail"] = "ok"
        details = []
        if problems:
            status = "fail"
            details.extend(problems)
        if local:
            status = "fail"
            details.append(
                f"not distributed (on the coordinator only): {', '.join(local)}; run `fastapi-tenancy "
                "migrate upgrade` or restart the app, which distribute them"
            )
        if not details:
            column = quote_identifier(self.column)
            details.append(f"{len(rows)} tenant tables distributed by {column}, colocated")
        return [("citus shared tables", status, "; ".join(details))]


async def insert_rows(
    conn: AsyncConnection, target: str, source: str, columns: list[str], *, overriding: bool = False
) -> int:
    """Copy `source`'s rows into the distributed `target` (quoted names) by plain INSERTs, in batches.

    What copies into the shared tables use on Citus instead of `INSERT ... SELECT`, which
    Citus runs with COPY into the shards when it cannot push the statement down to them,
    and COPY FROM is refused under row-level security. The rows pass through this
    process's memory. `overriding`: OVERRIDING SYSTEM VALUE (identity columns). Returns
    how many rows were inserted.
    """
    listed = ", ".join(quote_identifier(c) for c in columns)
    rows = (await conn.execute(sa.text(f"SELECT {listed} FROM {source}"))).all()  # noqa: S608 - quoted names
    values = ", ".join(f":p{i}" for i in range(len(columns)))
    override = " OVERRIDING SYSTEM VALUE" if overriding else ""
    insert = sa.text(f"INSERT INTO {target} ({listed}){override} VALUES ({values})")  # noqa: S608 - quoted
    for start in range(0, len(rows), 1000):
        batch = rows[start : start + 1000]
        await conn.execute(insert, [{f"p{i}": value for i, value in enumerate(row)} for row in batch])
    return len(rows)
