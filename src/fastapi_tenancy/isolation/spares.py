"""`SparePool`: schemas cloned from the template ahead of time, so a registration only renames one.

Cloning the template (or `create_all`) for a 30-table tenant is hundreds of
milliseconds of server-side DDL while the user waits. A spare is that clone made
earlier; registering a tenant then claims one and runs a single
`ALTER SCHEMA ... RENAME`, a one-row catalog update.

How claims stay safe:

* Spares are listed in `public.tenancy_spares`. A claim locks one row with
  `FOR UPDATE SKIP LOCKED`, so concurrent registrations (in any process) never
  get the same spare; the row's delete and the rename commit with the tenant's
  provisioning transaction, or neither does.
* A spare is handed out only when its `alembic_version` equals the template's,
  read in the claim's transaction. A stale spare (the template moved on, e.g. its
  migration failed on the spare) is left for the next fill to drop.
* A fleet migration holds an advisory lock that claims and fills also ask for
  (shared, without waiting): while one runs, registrations clone the template
  instead, and no spare is made from a template being migrated.

Spare names (`tenancy-spare-<hex>`) hold a hyphen, which no tenant's storage name
can (see `isolation.base.storage_name`), so a spare can never be taken for a tenant.
"""

import asyncio
import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import ProvisioningError
from .base import quote_identifier
from .citus import CitusCluster
from .clone import clone_schema

__all__ = ["SPARES_TABLE", "SPARE_PREFIX", "SpareInfo", "SparePool"]

logger = logging.getLogger("fastapi_tenancy")

SPARE_PREFIX = "tenancy-spare-"
"""Spare schemas are named this plus 12 hex digits: a hyphen no tenant schema name holds."""

SPARES_TABLE = "public.tenancy_spares"
"""Where the spares are listed, in the tenants' database."""

FLEET_GATE_KEY = 0x7E4A_F1EF
"""Advisory lock a fleet migration holds exclusively, and claims and fills take shared."""

_FILL_KEY = 0x7E4A_F1F0  # one fill at a time per database

_CREATE_TABLE = sa.text(
    f"CREATE TABLE IF NOT EXISTS {SPARES_TABLE} ("
    "name text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
_FLEET_IDLE = sa.text("SELECT pg_try_advisory_xact_lock_shared(:k)")
# Also whether the spares table exists (dropped by hand, or initialize() not run): a
# registration must then clone, not fail.
_CAN_CLAIM = sa.text(
    f"SELECT pg_try_advisory_xact_lock_shared(:k) AND to_regclass('{SPARES_TABLE}') IS NOT NULL"
)
_NEXT = sa.text(
    f"SELECT name FROM {SPARES_TABLE} ORDER BY created_at, name LIMIT 1 FOR UPDATE SKIP LOCKED"  # noqa: S608
)
_DELETE = sa.text(f"DELETE FROM {SPARES_TABLE} WHERE name = :n")  # noqa: S608
_INSERT = sa.text(f"INSERT INTO {SPARES_TABLE} (name) VALUES (:n)")  # noqa: S608
_LIST = sa.text(f"SELECT name FROM {SPARES_TABLE} ORDER BY created_at, name")  # noqa: S608

# Each schema's Alembic revisions (NULL without a version table), read server-side
# in one query: query_to_xml runs the per-schema SELECT, guarded by to_regclass.
_VERSIONS = sa.text(
    """
    SELECT n.nspname AS name,
           CASE WHEN to_regclass(format('%I.alembic_version', n.nspname)) IS NULL THEN NULL
           ELSE ARRAY(
               SELECT CAST(x AS text) FROM unnest(xpath('//v/text()', query_to_xml(
                   format('SELECT version_num AS v FROM %I.alembic_version ORDER BY 1', n.nspname),
                   false, false, ''))) AS x)
           END AS versions
    FROM pg_namespace n WHERE n.nspname = ANY(:names)
    """
)


class SpareInfo:
    """One spare as listed: its schema name and whether it matches the template's revision."""

    def __init__(self, name: str, versions: tuple[str, ...] | None, current: bool) -> None:
        self.name = name
        self.versions = versions
        self.current = current

    def as_dict(self) -> dict[str, object]:
        """For `--json` output."""
        revision = None if self.versions is None else ",".join(self.versions)
        return {"name": self.name, "revision": revision, "current": self.current}


async def _versions(conn: AsyncConnection, names: list[str]) -> dict[str, tuple[str, ...] | None]:
    rows = await conn.execute(_VERSIONS, {"names": names})
    return {row.name: None if row.versions is None else tuple(row.versions) for row in rows}


_quoted = quote_identifier


class SparePool:
    """Spare tenant schemas, cloned from `template` ahead of time. Safe for concurrent use.

        pool = SparePool(engine, "tenancy_template", size=5)
        await pool.initialize()
        await pool.fill()            # up to 5 spares
        async with engine.begin() as conn:
            claimed = await pool.claim(conn, "tenant_acme")  # False: clone instead

    `SchemaIsolation` (with `schema_spares`) claims on registration and refills in
    the background afterwards; `fastapi-tenancy tenants spares fill` fills from the shell.
    """

    def __init__(
        self, engine: AsyncEngine, template: str, *, size: int, cluster: CitusCluster | None = None
    ) -> None:
        self.engine = engine
        self.template = template
        self.size = size
        self.cluster = cluster
        """The Citus cluster tenant schemas are distributed on, if any: spares stay on its coordinator."""
        self._refill: asyncio.Task[int] | None = None

    async def initialize(self) -> None:
        """Create the spares table if needed. Idempotent."""
        async with self.engine.begin() as conn:
            await conn.execute(_CREATE_TABLE)

    async def claim(self, conn: AsyncConnection, target: str) -> bool:
        """Rename a current spare to `target` in `conn`'s transaction; False when none can be used.

        Nothing is done (False) when the pool is empty, every spare is being claimed,
        a fleet migration is running, or the next spare is stale. The caller then
        provisions the slow way; a commit makes the claim final, a rollback returns
        the spare to the pool.
        """
        if not await conn.scalar(_CAN_CLAIM, {"k": FLEET_GATE_KEY}):
            return False
        name = await conn.scalar(_NEXT)
        if name is None:
            return False
        versions = await _versions(conn, [self.template, name])
        if name not in versions or self.template not in versions or versions[name] != versions[self.template]:
            # Stale or gone: never hand it out. The next fill (after this transaction,
            # which holds its row) drops it.
            logger.warning("spare schema %s is not at the template's revision; not using it", name)
            return False
        await conn.execute(_DELETE, {"n": name})
        await conn.exec_driver_sql(f"ALTER SCHEMA {_quoted(name)} RENAME TO {_quoted(target)}")
        return True

    async def list_spares(self) -> list[SpareInfo]:
        """Every listed spare, oldest first, with whether it is at the template's revision."""
        async with self.engine.connect() as conn:
            names = list((await conn.scalars(_LIST)).all())
            versions = await _versions(conn, [self.template, *names])
        wanted = versions.get(self.template)
        return [
            SpareInfo(
                n, versions.get(n), n in versions and self.template in versions and versions[n] == wanted
            )
            for n in names
        ]

    async def fill(self, count: int | None = None) -> int:
        """Drop stale spares, then clone the template until `count` (default `size`) are ready.

        Returns how many were made. Does nothing (0) while another fill or a fleet
        migration runs. Each spare is made and listed in its own transaction.
        """
        target = self.size if count is None else count
        await self.initialize()  # cheap, and brings back a table dropped by hand
        made = 0
        async with self.engine.begin() as gate:
            # One fill per database at a time: a transaction-level lock on a connection of
            # its own, held while the spares are made, so even a cancelled fill releases it.
            if not await gate.scalar(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _FILL_KEY}):
                return 0
            ready = 0
            for spare in await self.list_spares():
                if spare.current:
                    ready += 1
                else:
                    await self._drop(spare.name)
            while ready + made < target:
                if not await self._make_one():
                    break
                made += 1
        if made:
            logger.info("made %d spare schema(s) from %s", made, self.template)
        return made

    async def _make_one(self) -> bool:
        name = SPARE_PREFIX + uuid.uuid4().hex[:12]
        async with self.engine.begin() as conn:
            if not await conn.scalar(_FLEET_IDLE, {"k": FLEET_GATE_KEY}):
                return False  # the template is being migrated: make none from it now
            if self.cluster is not None:
                await self.cluster.keep_local(conn)
            await clone_schema(conn, self.template, name)
            await conn.execute(_INSERT, {"n": name})
        return True

    async def _drop(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            # Locked first, so a spare being claimed right now is left alone.
            locked = await conn.scalar(
                sa.text(f"SELECT name FROM {SPARES_TABLE} WHERE name = :n FOR UPDATE SKIP LOCKED"),  # noqa: S608
                {"n": name},
            )
            if locked is None:
                return False
            await conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {_quoted(name)} CASCADE")
            await conn.execute(_DELETE, {"n": name})
        return True

    async def drain(self) -> int:
        """Drop every spare (e.g. after rebuilding the template). Returns how many."""
        dropped = 0
        for spare in await self.list_spares():
            dropped += await self._drop(spare.name)
        return dropped

    def refill_soon(self) -> None:
        """Start a background fill unless one is running (after a claim, or a stale spare)."""
        if self._refill is not None and not self._refill.done():
            return
        self._refill = asyncio.get_running_loop().create_task(self._background_fill())

    async def _background_fill(self) -> int:
        try:
            return await self.fill()
        except ProvisioningError as exc:  # e.g. no template yet: a clear line, no traceback
            logger.warning("could not make spare schemas: %s", exc)
            return 0
        except Exception:  # a failed refill must not surface anywhere else; registrations still work
            logger.exception("refilling the spare schemas from %s failed", self.template)
            return 0

    async def wait(self) -> None:
        """Wait for a background fill to finish (tests, orderly shutdown)."""
        if self._refill is not None:
            await asyncio.shield(self._refill)

    async def close(self) -> None:
        """Stop a background fill. Idempotent."""
        task, self._refill = self._refill, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
