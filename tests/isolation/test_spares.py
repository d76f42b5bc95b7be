"""Spare schemas: claimed by a rename, equal to create_all, never shared, never stale, migrated."""

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fastapi_tenancy import TenancyConfig, TenancyManager, Tenant, TenantStatus
from fastapi_tenancy.audit import SQLAuditWriter
from fastapi_tenancy.errors import TenantAlreadyExistsError
from fastapi_tenancy.isolation.clone import schema_catalog
from fastapi_tenancy.isolation.spares import FLEET_GATE_KEY, SPARE_PREFIX, SparePool
from fastapi_tenancy.migrations.fleet import FleetMigrator
from tests.migrations.projects import make_project

from .test_clone import rich_metadata

pytestmark = pytest.mark.postgres

TEMPLATE = "tenancy_template"


def _pool(manager: TenancyManager) -> SparePool:
    pool = manager.isolation.spares
    assert isinstance(pool, SparePool)
    return pool


def _spared(url: str, spares: int = 2, pool_size: int = 2) -> TenancyManager:
    return TenancyManager(
        TenancyConfig(
            database_url=url, database_pool_size=pool_size, schema_template=TEMPLATE, schema_spares=spares
        )
    )


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url)
    yield engine
    await engine.dispose()


async def _build_template(url: str, engine: AsyncEngine) -> None:
    """The template schema from `rich_metadata()`, at Alembic revision abc123."""
    builder = TenancyManager(TenancyConfig(database_url=url, database_pool_size=1, schema_template=TEMPLATE))
    try:
        await builder.isolation.build_template(rich_metadata())  # type: ignore[attr-defined]
    finally:
        await builder.close()
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(f"CREATE TABLE {TEMPLATE}.alembic_version (version_num varchar(32) PRIMARY KEY)")
        )
        await conn.execute(sa.text(f"INSERT INTO {TEMPLATE}.alembic_version VALUES ('abc123')"))  # noqa: S608


async def _spare_names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list(
            (await conn.scalars(sa.text("SELECT name FROM public.tenancy_spares ORDER BY name"))).all()
        )


async def _schema_exists(engine: AsyncEngine, name: str) -> bool:
    async with engine.connect() as conn:
        return bool(await conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": name}))


@pytest.fixture
async def one_spare(
    postgres_url: str, engine: AsyncEngine
) -> AsyncIterator[tuple[TenancyManager, SparePool]]:
    """The template built (at revision abc123), and a manager keeping one spare of it, made."""
    await _build_template(postgres_url, engine)
    spared = _spared(postgres_url, spares=1)
    await spared.initialize()  # starts filling the pool in the background
    try:
        pool = _pool(spared)
        await pool.wait()
        yield spared, pool
    finally:
        await spared.close()


async def test_a_claimed_spare_equals_create_all_and_is_replaced(
    postgres_url: str, engine: AsyncEngine
) -> None:
    await _build_template(postgres_url, engine)
    plain = TenancyManager(TenancyConfig(database_url=postgres_url, database_pool_size=2))
    spared = _spared(postgres_url)
    await plain.initialize()
    await spared.initialize()  # starts filling the pool in the background
    try:
        pool = _pool(spared)
        await pool.wait()
        before = await _spare_names(engine)
        assert len(before) == 2 and all(name.startswith(SPARE_PREFIX) for name in before)
        await plain.register_tenant("by-create-all", "A", app_metadata=rich_metadata())
        await spared.register_tenant("by-spare", "B")
        await pool.wait()  # the refill after the claim
        after = await _spare_names(engine)
        # The oldest spare became the tenant (renamed, not copied); a new one replaced it.
        assert len(after) == 2 and len(set(after) & set(before)) == 1
        claimed = (set(before) - set(after)).pop()
        assert not await _schema_exists(engine, claimed)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE tenant_by_create_all.alembic_version (version_num varchar(32) PRIMARY KEY)"
                )
            )
            await conn.execute(sa.text("INSERT INTO tenant_by_create_all.alembic_version VALUES ('abc123')"))
        async with engine.connect() as conn:
            expected = await schema_catalog(conn, "tenant_by_create_all")
            assert await schema_catalog(conn, "tenant_by_spare") == expected
            assert len(expected["columns"]) > 10 and expected["sequences"]
        # The tenant works through the manager, with its own sequences.
        tenant = await spared.get_tenant("by-spare")
        async with spared.session(tenant) as session, session.begin():
            first = await session.scalar(
                sa.text("INSERT INTO customers (email) VALUES ('a@b.example') RETURNING id")
            )
        assert first == 1
    finally:
        await spared.close()
        await plain.close()


async def test_concurrent_registrations_never_claim_the_same_spare(
    postgres_url: str, engine: AsyncEngine
) -> None:
    await _build_template(postgres_url, engine)
    # Two managers (two pools, as two workers would have), three registrations each at once.
    first, second = _spared(postgres_url, spares=3, pool_size=4), _spared(postgres_url, spares=3, pool_size=4)
    await first.initialize()
    await _pool(first).wait()
    await second.initialize()
    try:
        await _pool(second).wait()
        spares = await _spare_names(engine)
        assert len(spares) == 3
        async with engine.begin() as conn:
            for name in spares:  # a mark in each spare says which spare a tenant came from
                await conn.execute(
                    sa.text(f'CREATE TABLE "{name}".came_from AS SELECT CAST(:n AS text) AS n'), {"n": name}
                )
        slugs = [f"t{i}" for i in range(6)]
        await asyncio.gather(
            *(first.register_tenant(s, s) for s in slugs[:3]),
            *(second.register_tenant(s, s) for s in slugs[3:]),
        )
        await _pool(first).wait()
        await _pool(second).wait()
        origins = []
        async with engine.connect() as conn:
            for slug in slugs:
                if await conn.scalar(sa.text(f"SELECT to_regclass('tenant_{slug}.came_from')")) is not None:
                    origins.append(await conn.scalar(sa.text(f"SELECT n FROM tenant_{slug}.came_from")))  # noqa: S608
                assert (
                    await conn.scalar(sa.text(f"SELECT to_regclass('tenant_{slug}.customers')")) is not None
                )
        # Every marked spare went to exactly one tenant; no spare was claimed twice.
        assert sorted(origins) == sorted(spares)
        assert [(await first.get_tenant(s)).status.value for s in slugs] == ["active"] * 6
    finally:
        await second.close()
        await first.close()


async def test_an_empty_pool_falls_back_to_cloning(
    one_spare: tuple[TenancyManager, SparePool], engine: AsyncEngine
) -> None:
    spared, pool = one_spare
    assert await pool.drain() == 1
    assert await _spare_names(engine) == []
    async with engine.connect() as conn, conn.begin():
        assert await pool.claim(conn, "tenant_nobody") is False
    await spared.register_tenant("acme", "Acme")
    async with engine.connect() as conn:
        assert await schema_catalog(conn, "tenant_acme") == await schema_catalog(conn, TEMPLATE)
    await pool.wait()
    assert len(await _spare_names(engine)) == 1  # refilled after the registration


async def test_without_the_spares_table_registration_clones_and_the_fill_restores_it(
    one_spare: tuple[TenancyManager, SparePool], engine: AsyncEngine
) -> None:
    spared, pool = one_spare
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE public.tenancy_spares"))
    await spared.register_tenant("acme", "Acme")
    async with engine.connect() as conn:
        assert await schema_catalog(conn, "tenant_acme") == await schema_catalog(conn, TEMPLATE)
    await pool.wait()
    assert len(await _spare_names(engine)) == 1


async def test_a_stale_spare_is_never_handed_out_and_is_replaced(
    one_spare: tuple[TenancyManager, SparePool], engine: AsyncEngine
) -> None:
    spared, pool = one_spare
    [stale] = await _spare_names(engine)
    async with engine.begin() as conn:
        # The template moves on (as a migration would); the spare does not.
        await conn.execute(sa.text(f"ALTER TABLE {TEMPLATE}.customers ADD COLUMN phone text"))
        await conn.execute(sa.text(f"UPDATE {TEMPLATE}.alembic_version SET version_num = 'new'"))  # noqa: S608
    assert [s.current for s in await pool.list_spares()] == [False]
    await spared.register_tenant("acme", "Acme")
    async with engine.connect() as conn:
        assert await schema_catalog(conn, "tenant_acme") == await schema_catalog(conn, TEMPLATE)
        assert await conn.scalar(sa.text("SELECT version_num FROM tenant_acme.alembic_version")) == "new"
    await pool.wait()
    # The fill dropped the stale spare and made a current one.
    assert not await _schema_exists(engine, stale)
    [fresh] = await pool.list_spares()
    assert fresh.name != stale and fresh.current and fresh.versions == ("new",)


async def test_no_spare_is_claimed_or_made_while_a_fleet_migration_runs(
    one_spare: tuple[TenancyManager, SparePool], engine: AsyncEngine
) -> None:
    spared, pool = one_spare
    async with engine.connect() as fleet:
        await fleet.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": FLEET_GATE_KEY})
        await fleet.commit()
        async with engine.connect() as conn, conn.begin():
            assert await pool.claim(conn, "tenant_nobody") is False
        assert await pool.drain() == 1
        assert await pool.fill() == 0
        await spared.register_tenant("acme", "Acme")  # cloned instead
        await pool.wait()  # the refill after it made nothing
        assert await _spare_names(engine) == []
        await fleet.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": FLEET_GATE_KEY})
        await fleet.commit()
    assert await pool.fill() == 1
    async with engine.connect() as conn:
        assert await schema_catalog(conn, "tenant_acme") == await schema_catalog(conn, TEMPLATE)


async def test_the_fleet_migrates_spares_with_the_template(tmp_path: Path, postgres_url: str) -> None:
    ini = make_project(tmp_path / "p")
    spared = _spared(postgres_url, spares=2)
    await spared.initialize()  # no template yet: the first fill makes nothing
    try:
        pool = _pool(spared)
        await pool.wait()
        migrator = FleetMigrator(spared, ini, concurrency=2)
        try:
            first = await migrator.run("upgrade", "a1")  # creates the template and migrates it
            assert first.succeeded, first.results
            assert await pool.fill() == 2
            assert {s.versions for s in await pool.list_spares()} == {("a1",)}
            report = await migrator.run("upgrade", "head")
        finally:
            await migrator.close()
        assert report.succeeded, report.results
        migrated = sorted(r.tenant for r in report.results if r.status == "ok")
        assert migrated == sorted(["(template)", *(f"(spare {s.name})" for s in await pool.list_spares())])
        assert [s.current and s.versions == ("b2",) for s in await pool.list_spares()] == [True, True]
        tenant = await spared.register_tenant("acme", "Acme")
        async with spared.session(tenant) as session:
            assert await session.scalar(sa.text("SELECT version_num FROM alembic_version")) == "b2"
    finally:
        await spared.close()


async def test_two_workers_registering_one_slug_from_spares_one_wins_audited_once(
    postgres_url: str, engine: AsyncEngine
) -> None:
    await _build_template(postgres_url, engine)
    first, second = _spared(postgres_url, spares=2), _spared(postgres_url, spares=2)
    await first.initialize()
    await _pool(first).wait()
    await second.initialize()
    try:
        await _pool(second).wait()
        results = await asyncio.gather(
            first.register_tenant("acme", "Acme"),
            second.register_tenant("acme", "Acme"),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, Tenant)]
        assert len(winners) == 1, results
        assert [type(r) for r in results if not isinstance(r, Tenant)] == [TenantAlreadyExistsError]
        # The other worker sees the winner active (its cache was told by the commit's NOTIFY).
        for manager in (first, second):
            assert (await manager.get_tenant("acme")).status is TenantStatus.ACTIVE
        audit = first.events.audit
        assert isinstance(audit, SQLAuditWriter)
        entries = await audit.entries(tenant_id=winners[0].id)
        assert sorted(e.event for e in entries) == ["provisioned", "registered"]
        # The loser claimed nothing: one spare went to acme, the rest are still listed.
        assert len(await _spare_names(engine)) >= 1
    finally:
        await second.close()
        await first.close()


async def test_the_registry_writes_and_their_audit_entries_share_transactions(
    postgres_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await _build_template(postgres_url, engine)
    manager = _spared(postgres_url)
    await manager.initialize()
    try:
        audit = manager.events.audit
        assert isinstance(audit, SQLAuditWriter)
        first = await manager.register_tenant("acme", "Acme")
        with pytest.raises(TenantAlreadyExistsError):
            await manager.register_tenant("acme", "Acme again")
        # The refused row took its entry with it.
        async with engine.connect() as conn:
            registered = await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM public.tenancy_audit_log "
                    "WHERE tenant_identifier = 'acme' AND event = 'registered'"
                )
            )
        assert registered == 1
        assert sorted(e.event for e in await audit.entries(tenant_id=first.id)) == [
            "provisioned",
            "registered",
        ]
        # An entry that cannot be written never fails the registration (as before, when each
        # entry had a transaction of its own): the rows go alone, the failures are logged.
        broken = sa.table("no_such_audit_table", sa.column("x")).insert().values(x=1)
        monkeypatch.setattr(audit, "insert", lambda _event: broken)
        with caplog.at_level(logging.ERROR, logger="fastapi_tenancy.events"):
            tenant = await manager.register_tenant("globex", "Globex")
        assert tenant.status is TenantStatus.ACTIVE
        assert (await manager.get_tenant("globex")).status is TenantStatus.ACTIVE
        logged = [
            r.getMessage() for r in caplog.records if "could not write the audit entry" in r.getMessage()
        ]
        assert len(logged) == 2, logged
    finally:
        await manager.close()
