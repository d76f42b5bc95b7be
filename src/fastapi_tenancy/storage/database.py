"""`SQLAlchemyTenantStore`: the tenant registry in PostgreSQL, SQLite or MySQL/MariaDB."""

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from .._utils import create_engine, create_tables, is_deadlock, unavailable_as_503
from ..domain import Domain
from ..errors import (
    ConfigurationError,
    DomainNotFoundError,
    DomainTakenError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantNotFoundError,
)
from ..tenant import Tenant, TenantStatus, thaw
from ..urls import normalise_database_url
from .base import TenantStore, TenantVersion
from .tables import domains_table, settings_table, table_problem, tenants_table

__all__ = ["SQLAlchemyTenantStore"]


_CHANNEL_SETTING = "invalidation_channel"


class SQLAlchemyTenantStore(TenantStore):
    """The tenant registry as one SQL table. Safe for concurrent use.

    `database_url` is a URL (the store opens and owns a small pool of its own) or
    an `AsyncEngine` you manage. `initialize()` creates the table (`tenants` by
    default) if it is missing, and beside it `<table>_settings`, where the registry
    records its invalidation channel, and `<table>_domains`, the tenants' custom domains.
    `pgbouncer=True` opens the store's own pool for
    PgBouncer in transaction mode (no cached prepared statements); a manager whose
    config sets `database_pgbouncer` turns it on for a store opened from a URL.

        store = SQLAlchemyTenantStore("postgresql+asyncpg://app@db/app")

    Requests do not read the registry on every call: the manager serves lookups
    from its cache, so the pool can stay small.
    """

    def __init__(
        self,
        database_url: str | AsyncEngine,
        *,
        table_name: str = "tenants",
        schema: str | None = None,
        pool_size: int = 5,
        max_overflow: int = 5,
        pgbouncer: bool = False,
    ) -> None:
        if isinstance(database_url, AsyncEngine):
            self._engine: AsyncEngine | None = database_url
            self._url = database_url.url.render_as_string(hide_password=False)
            self._owns_engine = False
        else:
            self._engine = None
            self._url = normalise_database_url(database_url)
            self._owns_engine = True
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self.pgbouncer = pgbouncer
        self.table = tenants_table(table_name, schema)
        self.settings = settings_table(self.table.metadata, f"{table_name}_settings", schema)
        self.domains = domains_table(self.table, f"{table_name}_domains")
        self._read_engine: AsyncEngine | None = None
        self._initialized = False

    def configure(self, *, pgbouncer: bool) -> None:
        # A registry opened from a URL (as in the Quick Start) makes its own pool on
        # first use: behind PgBouncer it must not cache prepared statements either.
        self.pgbouncer = self.pgbouncer or pgbouncer

    def notify_engine(self) -> AsyncEngine | None:
        return self.engine if self.engine.url.get_backend_name() == "postgresql" else None

    @property
    def engine(self) -> AsyncEngine:
        """The engine the registry uses (created on first use)."""
        if self._engine is None:
            self._engine = create_engine(
                self._url,
                pool_size=self._pool_size,
                max_overflow=self._max_overflow,
                pgbouncer=self.pgbouncer,
            )
        return self._engine

    @property
    def _reader(self) -> AsyncEngine:
        # A lone SELECT needs no transaction: on PostgreSQL, autocommit reads skip BEGIN and
        # ROLLBACK, so a cache miss costs one round trip instead of three (asyncpg switches
        # autocommit on the client, for free). MySQL drivers pay a round trip to switch it,
        # SQLite gains nothing: they read inside the usual transaction.
        if self._read_engine is None:
            engine = self.engine
            self._read_engine = (
                engine.execution_options(isolation_level="AUTOCOMMIT")
                if engine.dialect.name == "postgresql"
                else engine
            )
        return self._read_engine

    async def initialize(self) -> None:
        if self._initialized:
            return
        await create_tables(self.engine, self._create_or_check, "tenant registry")
        self._initialized = True

    def _create_or_check(self, conn: sa.Connection) -> None:
        # A table of the same name made by something else (fastapi-tenancy 0.5.0 used
        # `tenants` too) is refused here, at startup, not by a 500 on the first request,
        # and before the tables beside it are made.
        self.table.create(conn, checkfirst=True)
        problem = table_problem(conn, self.table)
        if problem is not None:
            raise ConfigurationError(problem)
        self.table.metadata.create_all(conn, checkfirst=True)

    async def problem(self) -> str | None:
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            return await conn.run_sync(table_problem, self.table)

    async def close(self) -> None:
        if self._owns_engine and self._engine is not None:
            # The engine stays (a new pool opens on next use): whoever holds it, such as the
            # invalidation channel, keeps working after a close and a new initialize.
            await self._engine.dispose()
        self._initialized = False

    async def get_channel_record(self) -> str | None:
        query = sa.select(self.settings.c.value).where(self.settings.c.name == _CHANNEL_SETTING)
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def set_channel_record(self, record: str, *, replace: bool = False) -> str:
        settings, now = self.settings, datetime.now(UTC)
        for _ in range(3):
            if replace:
                async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
                    updated = await conn.execute(
                        settings.update()
                        .where(settings.c.name == _CHANNEL_SETTING)
                        .values(value=record, updated_at=now)
                    )
                if updated.rowcount:
                    return record
            else:
                in_force = await self.get_channel_record()
                if in_force is not None:
                    return in_force
            try:
                # The primary key makes this atomic: of two first processes, one inserts.
                async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
                    await conn.execute(
                        settings.insert().values(name=_CHANNEL_SETTING, value=record, updated_at=now)
                    )
                return record
            except sa_exc.IntegrityError:
                continue  # another process recorded it meanwhile: read (or replace) theirs
        raise TenantChangedError("the registry's channel record kept changing")

    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        return await self._one(self.table.c.id == tenant_id)

    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        return await self._one(self.table.c.identifier == identifier)

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        if not identifiers:
            return {}
        query = self.table.select().where(self._among(self.table.c.identifier, identifiers))
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        tenants = (self._tenant(row._mapping) for row in rows)
        return {tenant.identifier: tenant for tenant in tenants}

    async def get_versions(self, identifiers: Sequence[str]) -> dict[str, TenantVersion]:
        # Four narrow columns, no JSON and no `Tenant` built: what a refresh of an
        # unchanged tenant costs.
        if not identifiers:
            return {}
        c = self.table.c
        query = sa.select(c.identifier, c.id, c.status, c.updated_at).where(
            self._among(c.identifier, identifiers)
        )
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    async def get_by_ids(self, tenant_ids: Iterable[str]) -> list[Tenant]:
        wanted = list(dict.fromkeys(tenant_ids))
        if not wanted:
            return []
        query = self.table.select().where(self.table.c.id.in_(wanted))
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        by_id = {row.id: self._tenant(row._mapping) for row in rows}
        return [by_id[tenant_id] for tenant_id in wanted if tenant_id in by_id]

    async def exists(self, tenant_id: str) -> bool:
        query = sa.select(sa.literal(1)).select_from(self.table).where(self.table.c.id == tenant_id)
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def create(self, tenant: Tenant, *, also: Sequence[sa.Executable] = ()) -> Tenant:
        """`TenantStore.create`; `also` are statements on this store's engine (the audit
        entries of the registration) that commit in the same transaction, or not at all."""
        row = self.new_row(tenant)
        async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
            try:
                await conn.execute(self.table.insert().values(**row))
            except sa_exc.IntegrityError as exc:
                raise TenantAlreadyExistsError(f"tenant {tenant.identifier!r} already exists") from exc
            for statement in also:
                await conn.execute(statement)
        return tenant

    async def update(
        self, tenant: Tenant, *, expected: Tenant | None = None, also: Sequence[sa.Executable] = ()
    ) -> Tenant:
        """`TenantStore.update`; `also` commit with the change, and only when it is applied."""
        table = self.table
        query = table.update().where(table.c.id == tenant.id).values(**self._row(tenant))
        if expected is not None:
            # Compare-and-set in the one statement: no read-modify-write window.
            query = query.where(
                table.c.status == expected.status.value, table.c.updated_at == expected.updated_at
            )
        returning = self.engine.dialect.update_returning
        if returning:  # the stored row in the same round trip (PostgreSQL, SQLite)
            query = query.returning(*table.c)
        async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
            result = await conn.execute(query)
            stored = result.first() if returning else None
            if stored is None:
                applied = not returning and result.rowcount > 0
                # Which failed (gone, or changed) or, without RETURNING, the stored row.
                stored = (await conn.execute(table.select().where(table.c.id == tenant.id))).first()
            else:
                applied = True
            if applied:
                for statement in also:
                    await conn.execute(statement)
        if stored is None:
            raise TenantNotFoundError(f"no tenant with id {tenant.id!r}")
        if not applied:
            raise TenantChangedError(f"tenant {tenant.identifier!r} changed concurrently")
        return self._tenant(stored._mapping)

    async def delete(self, tenant_id: str) -> None:
        async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
            # The tenant's domains go in the same transaction: none may lead to a later tenant.
            # Its row is locked first, as add_domain locks it: no domain is added in between.
            await conn.execute(
                sa.select(self.table.c.id).where(self.table.c.id == tenant_id).with_for_update()
            )
            await conn.execute(self.domains.delete().where(self.domains.c.tenant_id == tenant_id))
            result = await conn.execute(self.table.delete().where(self.table.c.id == tenant_id))
        if result.rowcount == 0:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")

    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        query = self.table.select().order_by(self.table.c.identifier).limit(limit)
        if status is not None:
            query = query.where(self.table.c.status == status.value)
        if after is not None:
            query = query.where(self.table.c.identifier > after)
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [self._tenant(row._mapping) for row in rows]

    async def count(self, *, status: TenantStatus | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(self.table)
        if status is not None:
            query = query.where(self.table.c.status == status.value)
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    # -- custom domains ------------------------------------------------------------------

    keeps_domains = True

    async def get_domain(self, name: str) -> Domain | None:
        query = self.domains.select().where(self.domains.c.name == name)
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Domain(row.name, row.tenant_id, primary=bool(row.is_primary))

    async def get_by_domain(self, name: str) -> Tenant | None:
        # One query: the request path's cold lookups cost one round trip, as by identifier.
        query = (
            self.table.select()
            .join(self.domains, self.domains.c.tenant_id == self.table.c.id)
            .where(self.domains.c.name == name)
        )
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else self._tenant(row._mapping)

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        domains = self.domains
        query = (
            domains.select()
            .where(domains.c.tenant_id == tenant_id)
            .order_by(domains.c.is_primary.desc(), domains.c.name)
        )
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return tuple(Domain(row.name, row.tenant_id, primary=bool(row.is_primary)) for row in rows)

    async def add_domain(self, domain: Domain) -> Domain:
        for _ in range(5):
            try:
                return await self._add_domain(domain)
            except sa_exc.DBAPIError as exc:
                # A concurrent insert of the name (the primary key refused ours): read again
                # who holds it. A deadlock the server broke (MySQL's insert locks): try again.
                if not isinstance(exc, sa_exc.IntegrityError) and not is_deadlock(exc):
                    raise
        raise TenantChangedError(f"{domain.name}: kept colliding with concurrent changes; try again")

    async def _add_domain(self, domain: Domain) -> Domain:
        domains, tenant_id = self.domains, domain.tenant_id
        async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
            # The tenant's row, locked by a write that changes nothing: its domain changes (and
            # its deletion) queue up behind each other, so two primaries are never set at once.
            # A write rather than SELECT ... FOR UPDATE, which SQLite ignores (its driver does
            # not even begin the transaction before a write).
            table = self.table
            lock = table.update().where(table.c.id == tenant_id).values(id=table.c.id)
            if (await conn.execute(lock)).rowcount == 0:
                raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")
            held = (
                await conn.execute(
                    sa.select(domains.c.tenant_id, domains.c.is_primary).where(domains.c.name == domain.name)
                )
            ).first()
            holder = None if held is None else held.tenant_id
            if holder is not None and holder != tenant_id:
                raise DomainTakenError(f"{domain.name} belongs to another tenant")
            primary = held is not None and bool(held.is_primary)
            if domain.primary and not primary:
                # Rows changed by primary key only: a range of the tenant_id index locked here
                # would make MySQL's inserts of other tenants' domains deadlock with it.
                others = sa.select(domains.c.name).where(
                    domains.c.tenant_id == tenant_id, domains.c.is_primary.is_(True)
                )
                former = list((await conn.execute(others)).scalars())
                if former:
                    await conn.execute(
                        domains.update().where(domains.c.name.in_(former)).values(is_primary=False)
                    )
                primary = True
                if holder is not None:
                    await conn.execute(
                        domains.update().where(domains.c.name == domain.name).values(is_primary=True)
                    )
            if holder is None:
                await conn.execute(
                    domains.insert().values(
                        name=domain.name,
                        tenant_id=tenant_id,
                        is_primary=primary,
                        created_at=datetime.now(UTC),
                    )
                )
        return Domain(domain.name, tenant_id, primary=primary)

    async def remove_domain(self, name: str, *, tenant_id: str) -> None:
        domains = self.domains
        async with unavailable_as_503("tenant registry"), self.engine.begin() as conn:
            result = await conn.execute(
                domains.delete().where(domains.c.name == name, domains.c.tenant_id == tenant_id)
            )
        if result.rowcount == 0:
            raise DomainNotFoundError(f"{name} is not a domain of tenant id {tenant_id!r}")

    def _among(self, column: sa.Column[str], values: Sequence[str]) -> sa.ColumnElement[bool]:
        # On PostgreSQL `= ANY(array)`: one bound parameter instead of one per value, which
        # SQLAlchemy renders into the SQL text at every execution (a third of the CPU of a
        # refresh batch's query), and one statement text whatever the batch's size, so one
        # prepared statement. Elsewhere the usual IN list.
        if self.engine.dialect.name == "postgresql":
            return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
        return column.in_(list(values))

    async def _one(self, condition: sa.ColumnElement[bool]) -> Tenant | None:
        async with unavailable_as_503("tenant registry"), self._reader.connect() as conn:
            row = (await conn.execute(self.table.select().where(condition))).first()
        return None if row is None else self._tenant(row._mapping)

    @classmethod
    def new_row(cls, tenant: Tenant) -> dict[str, Any]:
        """The column values that register `tenant`: what `create` inserts."""
        row = cls._row(tenant)
        row.update(id=tenant.id, identifier=tenant.identifier, created_at=tenant.created_at)
        return row

    @staticmethod
    def _row(tenant: Tenant) -> dict[str, Any]:
        return {
            "name": tenant.name,
            "status": tenant.status.value,
            "metadata": thaw(tenant.metadata),
            "tier": tenant.tier,
            "updated_at": tenant.updated_at,
            "encrypted_database_url": tenant.encrypted_database_url,
        }

    @staticmethod
    def _tenant(row: Any) -> Tenant:
        return Tenant(
            id=row["id"],
            identifier=row["identifier"],
            name=row["name"],
            status=TenantStatus(row["status"]),
            metadata=row["metadata"],
            tier=row["tier"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            encrypted_database_url=row["encrypted_database_url"],
        )
