"""`HybridIsolation`: each tenant in the tier chosen for it, and moves between tiers."""

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .._utils import unavailable_as_503
from ..errors import ConfigurationError, ProvisioningError, TenancyUnavailableError
from ..tenant import Tenant
from ._incarnation import drop_schema
from ._rows import tenant_session
from .base import CONNECTION_OPTIONS, Isolation, quote_identifier
from .citus_rls import insert_rows
from .database import DatabaseIsolation
from .moves import Hooks, move_database_tier
from .moves import old_schema_name as _old_copy_name
from .rls import RLSIsolation
from .schema import SchemaIsolation

__all__ = ["HybridIsolation"]

_quote = quote_identifier


class HybridIsolation(Isolation):
    """Tenants split over tiers, each tier an isolation strategy: `{"schema": ..., "rls": ...}`.

    Safe for concurrent use; holds no per-request state. A tenant's tier is chosen
    when it is registered (`choose_tier`) and stored with it (`Tenant.tier`); every
    session, provisioning and deletion goes to that tier's strategy alone, so a
    schema-tier tenant never touches the shared RLS tables, nor an RLS-tier tenant
    a schema. ORM objects get the tenant column filled in every tier, so one model
    serves all of them. `move` copies a tenant to another tier (schema, rls, database).
    """

    def __init__(
        self,
        tiers: Mapping[str, Isolation],
        *,
        default_tier: str,
        plan_tiers: Mapping[str, str] | None = None,
        column: str = "tenant_id",
    ) -> None:
        unknown = {default_tier, *(plan_tiers or {}).values()} - set(tiers)
        if unknown:
            raise ConfigurationError(f"tiers {sorted(unknown)} are not configured (have {sorted(tiers)})")
        first = next(iter(tiers.values()))
        super().__init__(first.prefix)
        self.tiers = dict(tiers)
        self.default_tier = default_tier
        self.plan_tiers = dict(plan_tiers or {})
        self.column = column
        # Ids of tenants this process is moving: their new sessions answer 503 at once
        # instead of reaching a copy that is being fenced off.
        self._moving: set[str] = set()

    def choose_tier(self, tier: str | None, metadata: Mapping[str, Any]) -> str:
        """The tier of a new tenant: `tier` if given, else by its metadata `plan`, else the default."""
        if tier is None:
            plan = metadata.get("plan")
            tier = (
                self.plan_tiers.get(plan, self.default_tier) if isinstance(plan, str) else self.default_tier
            )
        if tier not in self.tiers:
            raise ConfigurationError(f"unknown tier {tier!r}; configured tiers: {sorted(self.tiers)}")
        return tier

    def tier(self, tenant: Tenant) -> Isolation:
        """The strategy that holds `tenant`'s data; refuses a tenant with no (known) tier."""
        isolation = self.tiers.get(tenant.tier or "")
        if isolation is None:
            # Fail closed: guessing a tier could open another tenant's shared tables.
            raise ConfigurationError(f"tenant {tenant.identifier!r} has no configured tier ({tenant.tier!r})")
        return isolation

    def check(self, tenant: Tenant) -> None:
        # The tenant's tier decides: only the database tier takes a tenant's own database_url.
        self.tier(tenant).check(tenant)

    def storage_name(self, identifier: str) -> str:
        # Valid in every tier: a tenant may move to any of them.
        names = [isolation.storage_name(identifier) for isolation in self.tiers.values()]
        return names[0]

    def _unique(self) -> list[Isolation]:
        return list({id(i): i for i in self.tiers.values()}.values())

    def parts(self) -> list[Isolation]:
        return self._unique()

    def serving(self, tenant: Tenant) -> Isolation:
        return self.tier(tenant)

    def expected_storage(self, tenant: Tenant) -> tuple[str, str] | None:
        isolation = self.tiers.get(tenant.tier or "")
        return None if isolation is None else isolation.expected_storage(tenant)

    def migration_url(self, tenant: Tenant) -> URL | None:
        return self.tier(tenant).migration_url(tenant)

    async def initialize(self) -> None:
        for isolation in self._unique():
            await isolation.initialize()

    async def close(self) -> None:
        for isolation in self._unique():
            await isolation.close()

    async def session(
        self, tenant: Tenant, *, session_class: type[AsyncSession] = AsyncSession
    ) -> AsyncSession:
        if tenant.id in self._moving:
            raise TenancyUnavailableError(f"tenant {tenant.identifier!r} is being moved to another tier")
        isolation = self.tier(tenant)
        session = await isolation.session(tenant, session_class=session_class)
        if isinstance(isolation, RLSIsolation):
            return session
        # The same bind and connection options, in a session that fills the tenant
        # column of new ORM objects.
        bind = session.bind
        assert isinstance(bind, AsyncEngine)  # every strategy binds its sessions to an engine
        options = session.info.get(CONNECTION_OPTIONS)
        return tenant_session(bind, self.column, tenant.id, options, session_class=session_class)

    async def provision(self, tenant: Tenant, metadata: sa.MetaData | None) -> None:
        await self.tier(tenant).provision(tenant, metadata)

    async def adopt(self, tenant: Tenant) -> bool:
        return await self.tier(tenant).adopt(tenant)

    async def destroy(self, tenant: Tenant) -> None:
        """Delete the tenant's data in its tier, and any old copy a move left in another."""
        await self.tier(tenant).destroy(tenant)
        await self.remove_old_copy(tenant)
        for isolation in self._unique():
            if isinstance(isolation, RLSIsolation):
                await isolation.destroy(tenant)  # rows (none left) and its moved-out mark

    # -- moves between tiers ---------------------------------------------------------

    @contextmanager
    def moving(self, tenant: Tenant) -> Iterator[None]:
        """While in this block, this process answers 503 for `tenant` (wrap the move and the switch)."""
        self._moving.add(tenant.id)
        try:
            yield
        finally:
            self._moving.discard(tenant.id)

    async def move(
        self,
        tenant: Tenant,
        target: str,
        metadata: sa.MetaData,
        *,
        holding: Callable[[], AbstractAsyncContextManager[object]] | None = None,
        switch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Copy `tenant`'s rows (the tables of `metadata`) into tier `target`; fence the old copy.

        Call through `TenancyManager.move_tenant`, which switches the registry (`switch`).
        While the writes are held: from RLS, new transactions of the tenant wait for
        none and answer 503, in-flight ones finish first; afterwards RLS sessions of it
        answer 503 (other processes until their cache sees the new tier). From a
        schema: writes wait (reads go on); the schema is then renamed to `<name>_`,
        where stale sessions find nothing. Between rls and schema the writes are held
        for the whole copy; into and out of the database tier only to catch up and
        switch (`moves.py`). `holding()` is entered just before the hold and left when
        the move fails or has switched; `switch` runs inside it once the old copy is
        fenced off (switch the registry there). The old copy stays until
        `remove_old_copy`. Every write committed before the switch is copied.
        """
        hooks = Hooks(holding or nullcontext, switch or _nothing)
        source = self.tier(tenant)
        destination = self.tiers.get(target)
        if destination is None:
            raise ConfigurationError(f"unknown tier {target!r}; configured tiers: {sorted(self.tiers)}")
        if destination is source:
            raise ConfigurationError(f"tenant {tenant.identifier!r} is already in tier {target!r}")
        if isinstance(source, DatabaseIsolation) or isinstance(destination, DatabaseIsolation):
            await move_database_tier(tenant, source, destination, metadata, self.column, hooks=hooks)
        elif isinstance(source, RLSIsolation) and isinstance(destination, SchemaIsolation):
            async with hooks.holding():  # held for the whole copy: one INSERT ... SELECT per table
                await self._rls_to_schema(tenant, source, destination, metadata)
                await hooks.switch()
        elif isinstance(source, SchemaIsolation) and isinstance(destination, RLSIsolation):
            async with hooks.holding():
                await self._schema_to_rls(tenant, source, destination, metadata)
                await hooks.switch()
        else:
            raise ConfigurationError(
                f"moving from {type(source).__name__} to {type(destination).__name__} is not supported"
            )

    def _tables(self, rls: RLSIsolation, metadata: sa.MetaData) -> list[sa.Table]:
        return [t for t in metadata.sorted_tables if t.schema is None and rls.column in t.c]

    async def _rls_to_schema(
        self, tenant: Tenant, rls: RLSIsolation, schema: SchemaIsolation, metadata: sa.MetaData
    ) -> None:
        name = schema.storage_name(tenant.identifier)
        await schema.provision(tenant, metadata)  # a new schema: refuses an existing one
        try:
            async with unavailable_as_503("tenant database"), rls.owner_engine.begin() as conn:
                # Waits for the tenant's running RLS transactions; new ones answer 503
                # until this commits, and after it the fence sends them away.
                await rls.hold(conn, tenant)
                await rls.bind_owner(conn, tenant)  # the policies confine the reads to the tenant
                for table in self._tables(rls, metadata):
                    columns = ", ".join(_quote(c.name) for c in table.columns)
                    await conn.execute(
                        sa.text(
                            f"INSERT INTO {_quote(name)}.{_quote(table.name)} ({columns}) "  # noqa: S608
                            f"SELECT {columns} FROM {_quote(rls.schema)}.{_quote(table.name)}"
                        )
                    )
                await _advance_sequences(conn, name, self._tables(rls, metadata))
                await rls.fence(conn, tenant, moved=True)
        except BaseException:
            await schema.destroy(tenant)  # no half-made copy is left
            raise

    async def _schema_to_rls(
        self, tenant: Tenant, schema: SchemaIsolation, rls: RLSIsolation, metadata: sa.MetaData
    ) -> None:
        name = schema.storage_name(tenant.identifier)
        old = _old_copy_name(name)
        async with unavailable_as_503("tenant database"), rls.owner_engine.connect() as conn:
            if await conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": old}):
                raise ProvisioningError(
                    f"an old copy of tenant {tenant.identifier!r} ({old!r}) exists; remove it first"
                )
        await rls.provision(tenant, metadata)  # guards the tables; refuses rows of the tenant
        tables = self._tables(rls, metadata)
        async with unavailable_as_503("tenant database"), rls.owner_engine.begin() as conn:
            if tables:
                # EXCLUSIVE: the tenant's writers finish first and new ones wait; reads go on.
                locked = ", ".join(f"{_quote(name)}.{_quote(t.name)}" for t in tables)
                await conn.execute(sa.text(f"LOCK TABLE {locked} IN EXCLUSIVE MODE"))
            await rls.bind_owner(conn, tenant)
            await rls.fence(conn, tenant, moved=False)
            for table in tables:
                # The tenant column is left to its default, the bound tenant: rows written in
                # the schema tier with another value are relabelled, never carried over.
                columns = [c.name for c in table.columns if c.name != rls.column]
                target = f"{_quote(rls.schema)}.{_quote(table.name)}"
                source = f"{_quote(name)}.{_quote(table.name)}"
                if rls.shards.active:
                    await insert_rows(conn, target, source, columns)
                    continue
                listed = ", ".join(_quote(c) for c in columns)
                await conn.execute(
                    sa.text(f"INSERT INTO {target} ({listed}) SELECT {listed} FROM {source}")  # noqa: S608
                )
            await _advance_sequences(conn, rls.schema, tables)
            # Sessions still routed to the schema now find no schema: new transactions answer
            # 503 at BEGIN, open ones fail, and none of their writes can land in the old
            # copy after it was read.
            await conn.execute(sa.text(f"ALTER SCHEMA {_quote(name)} RENAME TO {_quote(old)}"))

    async def remove_old_copy(self, tenant: Tenant) -> None:
        """Delete what a move left in tiers other than the tenant's own. Irreversible; idempotent."""
        current = self.tier(tenant)
        for isolation in self._unique():
            if isolation is current:
                continue
            if isinstance(isolation, SchemaIsolation):
                old = _old_copy_name(isolation.storage_name(tenant.identifier))
                async with unavailable_as_503("tenant database"), isolation.ddl_engine.begin() as conn:
                    # After the transactions that still hold the copy's marker (_incarnation.py).
                    await drop_schema(conn, old)
                    if isolation.roles is not None:
                        # The tenant's role served the copy (a renamed schema keeps its grants).
                        await isolation.roles.drop(conn, isolation.storage_name(tenant.identifier))
            elif isinstance(isolation, RLSIsolation):
                async with unavailable_as_503("tenant database"), isolation.owner_engine.begin() as conn:
                    await isolation.delete_rows(conn, tenant)
            elif isinstance(isolation, DatabaseIsolation):
                # The database keeps its name when its tenant moves out (moves.py).
                await isolation.destroy(tenant)


async def _nothing() -> None:
    return None


async def _advance_sequences(conn: AsyncConnection, schema: str, tables: list[sa.Table]) -> None:
    """Move each copied table's sequences past the highest value copied, so new rows do not collide."""
    for table in tables:
        rows = await conn.execute(
            sa.text(
                "SELECT a.attname::text, pg_get_serial_sequence(t.name, a.attname) "
                "FROM (SELECT format('%I.%I', CAST(:schema AS text), CAST(:table AS text)) AS name) t "
                "JOIN pg_attribute a ON a.attrelid = t.name::regclass AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            {"schema": schema, "table": table.name},
        )
        for column, sequence in rows.all():
            if sequence is None:
                continue
            await conn.execute(
                sa.text(
                    f"SELECT setval(:seq, GREATEST((SELECT last_value FROM {sequence}), "  # noqa: S608
                    f"(SELECT max({_quote(column)}) FROM {_quote(schema)}.{_quote(table.name)})))"
                ),
                {"seq": sequence},
            )
