"""`CitusCluster`: tenant schemas on a Citus cluster, distributed, placed, moved and rebalanced.

Citus (the distributed PostgreSQL extension) keeps a *distributed schema* whole on one
worker node: its tables become single-shard tables of one colocation group, and the
coordinator routes any statement that names only them to that node. A tenant's
transaction carries its schema as the only `search_path` in its `BEGIN` message
(`_begin.py`), so each of its statements names its own tables alone: one node answers
it, with no multi-shard plan. The application keeps one URL, the coordinator's.

What the library does on a cluster (docs/scaling-out.md):

- `initialize()` finds the `citus` extension (`database_cluster="auto"`), or requires it
  (`"citus"`), and checks that `database_url` is the coordinator;
- `distribute()` runs in the provisioning transaction, after the tenant's tables exist
  (created, cloned from the template, or a spare renamed): `citus_schema_distribute()`
  places the schema on a worker. No database-level setting is needed;
- `create_local()` runs the incarnation marker's DDL with DDL propagation off: the marker
  stays a plain view on the coordinator. Distributed, it would have the `LOCK` every
  tenant transaction takes at `BEGIN` lock it on every node, a round trip to each;
- `reference_tables()`: shared tables of the app metadata flagged
  `info={"citus_reference": True}` become reference tables (a copy on every node), so
  that tenant tables may reference them;
- `placements()`, `move()`, `rebalance()`, `nodes()`, `add_node()`: the operator's
  commands (`fastapi-tenancy tenants move`, `fastapi-tenancy cluster ...`).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._utils import is_outage, unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError

__all__ = ["REFERENCE_TABLE", "CitusCluster", "Move", "Node", "TransferMode"]

REFERENCE_TABLE = "citus_reference"
"""`Table.info` key: a shared table (one with a schema, e.g. `public`) flagged with it
becomes a Citus reference table, copied to every node, when a tenant is provisioned."""

TransferMode = Literal["auto", "force_logical", "block_writes"]
"""How Citus copies a moving schema: `auto` (logical replication: writes go on during the
copy, and are blocked only for the switch-over; every table needs a primary key or replica
identity), `force_logical` (logical replication even without one: UPDATE and DELETE on
such a table fail during the move), `block_writes` (writes wait for the whole copy)."""

_EXTENSION = sa.text("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'citus'")
_IS_COORDINATOR = sa.text("SELECT pg_catalog.citus_is_coordinator()")
# Each distributed schema's node (of :schemas, or every one for NULL): the placement of any
# shard of its colocation group (a schema's tables are all on one node). None for a schema
# with no table yet.
_PLACEMENTS = sa.text(
    """
    SELECT DISTINCT ON (n.nspname) n.nspname AS schema, d.nodename, d.nodeport
      FROM pg_dist_schema s
      JOIN pg_catalog.pg_namespace n ON n.oid = s.schemaid
      JOIN pg_dist_partition p ON p.colocationid = s.colocationid
      JOIN pg_dist_shard sh ON sh.logicalrelid = p.logicalrelid
      JOIN pg_dist_placement pl ON pl.shardid = sh.shardid
      JOIN pg_dist_node d ON d.groupid = pl.groupid
     WHERE CAST(:schemas AS text[]) IS NULL OR n.nspname = ANY(CAST(:schemas AS text[]))
     ORDER BY n.nspname, sh.shardid
    """
)
_NODES = sa.text(
    """
    SELECT d.nodename, d.nodeport, d.isactive, d.shouldhaveshards, d.groupid = 0 AS coordinator,
           (SELECT count(DISTINCT s.schemaid) FROM pg_dist_schema s
              JOIN pg_dist_partition p ON p.colocationid = s.colocationid
              JOIN pg_dist_shard sh ON sh.logicalrelid = p.logicalrelid
              JOIN pg_dist_placement pl ON pl.shardid = sh.shardid
             WHERE pl.groupid = d.groupid) AS schemas
      FROM pg_dist_node d WHERE d.noderole = 'primary' ORDER BY d.groupid
    """
)
# The rebalancer's plan: one row per colocation group to move (its first shard's table),
# for tenant schemas only (row-level security's shards are moved one tenant at a time).
_PLAN = sa.text(
    "SELECT p.table_name::regclass::text AS table_name, p.shardid, p.shard_size, "
    "p.sourcename, p.sourceport, p.targetname, p.targetport, n.nspname AS schema "
    "FROM pg_catalog.get_rebalance_table_shards_plan() p "
    "JOIN pg_catalog.pg_class c ON c.oid = p.table_name "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "JOIN pg_dist_schema s ON s.schemaid = n.oid"
)
_CITUS_TABLE = sa.text("SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass(:t)")
# Objects a distributed schema cannot hold, or that Citus does not carry to the worker
# with it: they work on the coordinator only, or not at all (docs/scaling-out.md).
_UNSUPPORTED = sa.text(
    """
    SELECT n.nspname || '.' || c.relname || ': ' || CASE c.relkind
             WHEN 'm' THEN 'materialized view (not distributed)'
             WHEN 'f' THEN 'foreign table (not distributed)'
             WHEN 'r' THEN 'table not distributed with its schema'
             WHEN 'p' THEN 'partitioned table not distributed with its schema' END
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_dist_schema s ON s.schemaid = n.oid
     WHERE (c.relkind IN ('m', 'f'))
        OR (c.relkind IN ('r', 'p') AND NOT EXISTS (
              SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid))
    UNION ALL
    SELECT n.nspname || '.' || g.tgname || ': trigger (Citus runs no triggers on distributed '
           || 'tables unless citus.enable_unsafe_triggers is on)'
      FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_dist_schema s ON s.schemaid = n.oid
     WHERE NOT g.tgisinternal
    LIMIT 20
    """
)


def _refused_move(exc: sa_exc.DBAPIError, schema: str, target: str) -> NoReturn:
    """Why `citus_schema_move` refused or failed, as a `ProvisioningError` (an outage stays a 503).

    E.g. the tenant was deleted after the move looked it up ("schema ... does not exist"),
    or another move of it runs. Citus moves a schema's shards together or not at all: the
    schema is left whole on its node (tests/citus/test_moves.py).
    """
    if is_outage(exc):
        raise exc
    raise ProvisioningError(f"could not move schema {schema!r} to {target}: {exc.orig}") from exc


def _names(schemas: list[str], shown: int = 10) -> str:
    if not schemas:
        return ""
    more = f" and {len(schemas) - shown} more" if len(schemas) > shown else ""
    return f" ({', '.join(sorted(schemas)[:shown])}{more})"


# What online moves need on every worker: logical decoding, and commits written to the WAL
# before they are acknowledged. Citus waits for a moving copy to catch up to
# pg_current_wal_lsn(), the WAL written so far: with synchronous_commit=off a commit
# acknowledged a moment before the switch-over may not be written yet, and is left behind.
_MOVE_SETTINGS = sa.text(
    "SELECT nodename, nodeport, success, result FROM pg_catalog.run_command_on_workers("
    "$$SELECT current_setting('wal_level') || ' ' || current_setting('synchronous_commit')$$)"
)


@dataclass(frozen=True)
class Node:
    """A node of the cluster: where tenant schemas are placed (the coordinator holds none by default)."""

    host: str
    port: int
    active: bool
    holds_shards: bool
    coordinator: bool
    schemas: int

    @property
    def address(self) -> str:
        """`host:port`, as `tenants move --to` takes it."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Move:
    """One schema moved from `source` to `target` (`host:port`), and how long it took."""

    schema: str
    source: str
    target: str
    seconds: float


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (as `tenants move --to` takes it) as a pair; `ConfigurationError` if malformed."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"a node is named HOST:PORT, as `fastapi-tenancy cluster nodes` shows it, not {address!r}"
        )
    return host, int(port)


class CitusCluster:
    """The Citus cluster of the tenant schemas, found (or required) at `initialize()`.

    Safe for concurrent use: `active` is set once by `initialize()`; every other method
    works on the connection or engine it is given. Inactive (no Citus, or
    `database_cluster="none"`), every provisioning hook does nothing.
    """

    def __init__(self, engine: AsyncEngine, *, mode: Literal["auto", "citus", "none"] = "auto") -> None:
        self.engine = engine
        self.mode = mode
        self.active = False
        """Whether tenant schemas are distributed (set by `initialize()`)."""
        self.version: str | None = None
        """The `citus` extension's version in the database, when it is there."""

    async def initialize(self) -> None:
        """Find the extension; refuse a worker node, or a missing extension with `mode="citus"`."""
        if self.mode == "none":
            return
        async with unavailable_as_503("tenant database"), self.engine.connect() as conn:
            self.version = await conn.scalar(_EXTENSION)
            if self.version is None:
                if self.mode == "citus":
                    raise ConfigurationError(
                        "database_cluster='citus', but the citus extension is not installed in this "
                        "database: install Citus on every node and run CREATE EXTENSION citus "
                        "(docs/scaling-out.md)"
                    )
                return
            if not await conn.scalar(_IS_COORDINATOR):
                raise ConfigurationError(
                    "database_url points to a Citus worker node: point it to the coordinator, which "
                    "routes each tenant's statements to the node holding its schema"
                )
        self.active = True

    # -- provisioning (in the transaction that creates the tenant's schema) --------------

    async def reference_tables(self, conn: AsyncConnection, metadata: sa.MetaData | None) -> None:
        """Make the shared tables flagged `REFERENCE_TABLE` reference tables, where they exist."""
        if not self.active or metadata is None:
            return
        for table in metadata.sorted_tables:
            if table.schema is None or not table.info.get(REFERENCE_TABLE):
                continue
            name = f'"{table.schema}"."{table.name}"'
            if await conn.scalar(sa.text("SELECT to_regclass(:t)"), {"t": name}) is None:
                continue  # not created yet: the shared migrations make it
            if not await conn.scalar(_CITUS_TABLE, {"t": name}):
                await conn.execute(
                    sa.text("SELECT create_reference_table(CAST(:t AS regclass))"), {"t": name}
                )

    async def distribute(self, conn: AsyncConnection, schema: str) -> None:
        """Make `schema` (its tables already in it) a distributed schema, placed on a worker."""
        if not self.active:
            return
        try:
            async with conn.begin_nested():
                await conn.execute(
                    sa.text("SELECT citus_schema_distribute(CAST(:s AS regnamespace))"), {"s": f'"{schema}"'}
                )
        except Exception as exc:
            orig = getattr(exc, "orig", exc)
            raise ProvisioningError(
                f"could not distribute schema {schema!r} on the Citus cluster: {orig}"
            ) from exc

    async def create_local(self, conn: AsyncConnection, statement: str) -> None:
        """Run DDL `statement` on the coordinator only (the incarnation marker: see the module docstring)."""
        if not self.active:
            await conn.exec_driver_sql(statement)
            return
        await conn.exec_driver_sql("SET LOCAL citus.enable_ddl_propagation TO off")
        await conn.exec_driver_sql(statement)
        await conn.exec_driver_sql("SET LOCAL citus.enable_ddl_propagation TO on")

    async def keep_local(self, conn: AsyncConnection) -> None:
        """Keep the DDL of the rest of `conn`'s transaction on the coordinator (a spare schema).

        A spare is renamed when a tenant claims it, then distributed. Made with DDL
        propagation on, Citus creates its (empty) schema on the workers too, and such a
        schema, renamed and distributed in one transaction, fails to distribute once it
        holds a sequence ("schema ... does not exist", Citus 13.2). Kept local, the schema
        and its tables reach the workers only with `distribute()`, under the tenant's name.
        """
        if self.active:
            await conn.exec_driver_sql("SET LOCAL citus.enable_ddl_propagation TO off")

    # -- placement ------------------------------------------------------------------------

    async def placements(self, schemas: Sequence[str]) -> dict[str, str]:
        """`schema -> host:port` of the node holding each of `schemas` (absent: not distributed)."""
        if not self.active or not schemas:
            return {}
        async with unavailable_as_503("Citus coordinator"), self.engine.connect() as conn:
            rows = await conn.execute(_PLACEMENTS, {"schemas": list(schemas)})
            return {row.schema: f"{row.nodename}:{row.nodeport}" for row in rows}

    async def nodes(self) -> list[Node]:
        """Every primary node, with how many tenant schemas it holds."""
        self._require()
        async with unavailable_as_503("Citus coordinator"), self.engine.connect() as conn:
            return [
                Node(r.nodename, r.nodeport, r.isactive, r.shouldhaveshards, r.coordinator, r.schemas)
                for r in await conn.execute(_NODES)
            ]

    async def move(self, schema: str, target: str, *, mode: TransferMode = "auto") -> Move:
        """Move `schema` to the node `target` (`host:port`) while its tenant is served.

        `citus_schema_move()` copies the schema's shards with logical replication (by
        default), keeps writes flowing during the copy and blocks them only to switch
        over; a write acknowledged before, during or after the move is on the new node.
        Returns at once (`seconds=0`) when the schema is on `target` already.
        """
        self._require()
        host, port = parse_address(target)
        known = {node.address: node for node in await self.nodes()}
        node = known.get(f"{host}:{port}")
        if node is None or not node.active or not node.holds_shards:
            usable = ", ".join(n.address for n in known.values() if n.active and n.holds_shards) or "none"
            raise ConfigurationError(f"{target} is not a node that holds tenant schemas (nodes: {usable})")
        source = (await self.placements([schema])).get(schema)
        if source is None:
            raise ProvisioningError(
                f"schema {schema!r} is not a distributed schema with tables: nothing to move"
            )
        if source == node.address:
            return Move(schema, source, node.address, 0.0)
        started = time.perf_counter()
        # Logical replication cannot run inside a transaction block.
        async with unavailable_as_503("Citus coordinator"), self.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            try:
                await conn.execute(
                    sa.text(
                        "SELECT citus_schema_move(CAST(:s AS regnamespace), :host, :port, "
                        "shard_transfer_mode => CAST(:mode AS citus.shard_transfer_mode))"
                    ),
                    {"s": f'"{schema}"', "host": host, "port": port, "mode": mode},
                )
            except sa_exc.DBAPIError as exc:
                _refused_move(exc, schema, node.address)
        return Move(schema, source, node.address, time.perf_counter() - started)

    async def rebalance(
        self, *, mode: TransferMode = "auto", progress: Callable[[int, int, Move], None] | None = None
    ) -> list[Move]:
        """Even out the schemas over the nodes, one move at a time; `progress(done, total, move)` after each.

        The plan is the Citus rebalancer's (`get_rebalance_table_shards_plan()`); each
        schema moves online as in `move()`. A node added with `add_node()` is filled here.
        """
        self._require()
        async with unavailable_as_503("Citus coordinator"), self.engine.connect() as conn:
            plan = (await conn.execute(_PLAN)).all()
        moves = []
        for done, step in enumerate(plan, start=1):
            moved = await self.move(step.schema, f"{step.targetname}:{step.targetport}", mode=mode)
            moves.append(moved)
            if progress is not None:
                progress(done, len(plan), moved)
        return moves

    async def add_node(self, address: str) -> Node:
        """Add the worker `host:port` (PostgreSQL with Citus, and the extension in this database)."""
        self._require()
        host, port = parse_address(address)
        async with unavailable_as_503("Citus coordinator"), self.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(sa.text("SELECT citus_add_node(:host, :port)"), {"host": host, "port": port})
        return next(node for node in await self.nodes() if node.address == f"{host}:{port}")

    async def _check_move_settings(self) -> tuple[str, Literal["ok", "warn", "fail"], str]:
        async with self.engine.connect() as conn:
            found = (await conn.execute(_MOVE_SETTINGS)).all()
        problems = []
        for row in found:
            where = f"{row.nodename}:{row.nodeport}"
            if not row.success:
                problems.append(f"{where}: not reachable ({row.result})")
                continue
            wal_level, synchronous_commit = str(row.result).split(" ", 1)
            if wal_level != "logical":
                problems.append(f"{where}: wal_level={wal_level} (moves then block writes; set logical)")
            if synchronous_commit == "off":
                problems.append(
                    f"{where}: synchronous_commit=off (a write acknowledged just before a move "
                    "switches over can be lost; set it on for the database)"
                )
        if problems:
            return "citus moves", "warn", "; ".join(problems)
        return (
            "citus moves",
            "ok",
            "every worker: wal_level=logical, commits written before they are acknowledged",
        )

    def _require(self) -> None:
        if not self.active:
            raise ConfigurationError(
                "not on a Citus cluster: database_url's database has no citus extension "
                "(or database_cluster='none'); see docs/scaling-out.md"
            )

    # -- doctor ------------------------------------------------------------------------------

    async def diagnose(self) -> list[tuple[str, Literal["ok", "warn", "fail"], str]]:
        """`doctor`'s rows: the cluster, its nodes, and what tenant schemas hold that Citus does not carry."""
        if self.mode == "none":
            return [("citus", "ok", "not used (database_cluster='none')")]
        if not self.active:
            async with self.engine.connect() as conn:
                version = await conn.scalar(_EXTENSION)
            if version is None:
                if self.mode == "citus":
                    return [
                        (
                            "citus",
                            "fail",
                            "database_cluster='citus', but the citus extension is not installed in this "
                            "database (install Citus on every node, CREATE EXTENSION citus)",
                        )
                    ]
                return [("citus", "ok", "not a Citus cluster: tenant schemas stay on this server")]
            await self.initialize()
        nodes = await self.nodes()
        workers = [n for n in nodes if n.holds_shards]
        down = [n.address for n in nodes if not n.active]
        async with self.engine.connect() as conn:
            placed = (await conn.execute(_PLACEMENTS, {"schemas": None})).all()
        listing = "; ".join(
            f"{n.address}: {n.schemas} tenant schemas"
            + _names([r.schema for r in placed if r.nodeport == n.port and r.nodename == n.host])
            for n in workers
        )
        rows: list[tuple[str, Literal["ok", "warn", "fail"], str]] = []
        if not workers:
            rows.append(
                ("citus", "fail", f"citus {self.version}: no node may hold tenant schemas (citus_add_node)")
            )
        elif down:
            rows.append(
                ("citus", "fail", f"citus {self.version}: inactive nodes {', '.join(down)}; {listing}")
            )
        else:
            rows.append(
                ("citus", "ok", f"citus {self.version}, coordinator and {len(workers)} nodes: {listing}")
            )
        rows.append(await self._check_move_settings())
        async with self.engine.connect() as conn:
            unsupported = (await conn.scalars(_UNSUPPORTED)).all()
        if unsupported:
            rows.append(("citus schemas", "warn", "; ".join(unsupported)))
        else:
            rows.append(("citus schemas", "ok", "tenant schemas hold nothing Citus does not distribute"))
        return rows
