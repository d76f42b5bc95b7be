"""Registration with `alembic_config`: every way of provisioning ends at head; the fleet goes on from there.

The project's revisions a1 and b2 make the tables of `METADATA`: a tenant registered from
the metadata (create_all), with no tables (the migrations run), cloned from a template
(migrated by the fleet, or built from the metadata) or from a spare all end at b2 with the
same catalog, and a third revision then migrates each of them.
"""

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.errors import ConfigurationError, TenantNotFoundError
from fastapi_tenancy.isolation.clone import schema_catalog
from fastapi_tenancy.migrations.fleet import FleetMigrator
from fastapi_tenancy.migrations.results import RLS_LABEL, TEMPLATE_LABEL
from tests.isolation.conftest import Roles
from tests.isolation.databases import dropped_afterwards

from .projects import make_project

pytestmark = pytest.mark.postgres

# The tables revisions a1 and b2 make (projects.py), as models.
METADATA = sa.MetaData()
sa.Table(
    "items",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("price", sa.Integer, server_default="0"),
)
sa.Table(
    "marks",
    METADATA,
    sa.Column("schema", sa.Text),
    sa.Column("started", sa.DateTime(timezone=True)),
    sa.Column("finished", sa.DateTime(timezone=True)),
)

REVISION_C = """
import sqlalchemy as sa
from alembic import op

revision = "c3"
down_revision = "b2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("sku", sa.Text))


def downgrade() -> None:
    op.drop_column("items", "sku")
"""


def add_revision(ini: Path, name: str, source: str) -> None:
    (ini.parent / "migrations" / "tenant" / "versions" / f"{name}.py").write_text(source)


async def _raw(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )


async def _version(url: str, table: str) -> str | None:
    conn = await _raw(url)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return None
        version = await conn.fetchval(f"SELECT string_agg(version_num, ',') FROM {table}")  # noqa: S608
        return None if version is None else str(version)
    finally:
        await conn.close()


async def _upgrade(manager: TenancyManager, ini: Path) -> dict[str, str]:
    migrator = FleetMigrator(manager, ini, concurrency=2)
    try:
        report = await migrator.run("upgrade", "head")
    finally:
        await migrator.close()
    assert report.succeeded, report.results
    return {r.tenant: r.status for r in report.results}


@pytest.fixture
async def stamping(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[TenancyManager, Path]]:
    ini = make_project(tmp_path / "project")
    config = TenancyConfig(database_url=postgres_url, database_pool_size=3, alembic_config=str(ini))
    manager = TenancyManager(config)
    await manager.initialize()
    yield manager, ini
    await manager.close()


async def test_a_tenant_registered_from_metadata_is_stamped_then_migrated_by_the_fleet(
    stamping: tuple[TenancyManager, Path], postgres_url: str
) -> None:
    manager, ini = stamping
    await manager.register_tenant("acme", "Acme", app_metadata=METADATA)  # create_all: stamped
    await manager.register_tenant("globex", "Globex")  # no tables: the migrations run
    assert await _version(postgres_url, "tenant_acme.alembic_version") == "b2"
    assert await _version(postgres_url, "tenant_globex.alembic_version") == "b2"
    # Without the stamp, the fleet ran a1 on acme's tables: "relation items already exists".
    assert await _upgrade(manager, ini) == {"acme": "skipped", "globex": "skipped"}
    add_revision(ini, "c3", REVISION_C)
    assert await _upgrade(manager, ini) == {"acme": "ok", "globex": "ok"}
    conn = await _raw(postgres_url)
    try:
        for schema in ("tenant_acme", "tenant_globex"):
            assert await conn.fetchval(f"SELECT version_num FROM {schema}.alembic_version") == "c3"  # noqa: S608
            await conn.execute(f"INSERT INTO {schema}.items (id, name, sku) VALUES (1, 'x', 'y')")  # noqa: S608
    finally:
        await conn.close()
    # The head is read once per process, not per registration.
    stamper = manager._registration.stamper
    assert stamper is not None and stamper.heads() == ("b2",)


async def test_every_schema_provisioning_path_ends_at_head_with_the_same_catalog(
    postgres_url: str, tmp_path: Path
) -> None:
    ini = make_project(tmp_path / "project")
    base = TenancyConfig(database_url=postgres_url, database_pool_size=4, alembic_config=str(ini))
    plain = TenancyManager(base)
    migrated = TenancyManager(
        base.model_copy(update={"schema_template": "tmpl_migrated", "schema_spares": 1})
    )
    built = TenancyManager(base.model_copy(update={"schema_template": "tmpl_built"}))
    for manager in (plain, migrated, built):
        await manager.initialize()
    try:
        await plain.register_tenant("from-metadata", "x", app_metadata=METADATA)
        await plain.register_tenant("from-migrations", "x")
        # A template the fleet migrated carries its revision; its clones and spares keep it.
        assert (await _upgrade(migrated, ini))[TEMPLATE_LABEL] == "ok"
        assert migrated.isolation.spares is not None
        await migrated.isolation.spares.fill()
        await migrated.register_tenant("from-spare", "x")
        await migrated.isolation.spares.wait()
        assert await migrated.isolation.spares.drain() == 1
        await migrated.register_tenant("from-clone", "x")  # the pool is empty: a clone
        # A template built from the models has no revision: its clones are stamped.
        await built.isolation.build_template(METADATA)  # type: ignore[attr-defined]
        await built.register_tenant("from-built-template", "x")
        slugs = ["from-metadata", "from-migrations", "from-spare", "from-clone", "from-built-template"]
        engine = plain.engine
        catalogs = []
        async with engine.connect() as conn:
            for slug in slugs:
                schema = "tenant_" + slug.replace("-", "_")
                versions = await conn.execute(sa.text(f"SELECT version_num FROM {schema}.alembic_version"))  # noqa: S608
                assert versions.scalars().all() == ["b2"], slug
                catalogs.append(await schema_catalog(conn, schema))
        assert all(catalog == catalogs[0] for catalog in catalogs[1:])
        add_revision(ini, "c3", REVISION_C)
        results = await _upgrade(migrated, ini)
        assert {slug: results[slug] for slug in slugs} == dict.fromkeys(slugs, "ok")
    finally:
        for manager in (plain, migrated, built):
            await manager.close()


async def test_a_failed_stamp_undoes_the_registration(postgres_url: str, tmp_path: Path) -> None:
    manager = TenancyManager(
        TenancyConfig(database_url=postgres_url, alembic_config=str(tmp_path / "missing.ini"))
    )
    await manager.initialize()
    try:
        with pytest.raises(ConfigurationError, match="missing.ini"):
            await manager.register_tenant("acme", "Acme", app_metadata=METADATA)
        with pytest.raises(TenantNotFoundError):
            await manager.get_tenant("acme")
        async with manager.engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT to_regnamespace('tenant_acme')")) is None
    finally:
        await manager.close()


async def test_database_tenants_are_stamped_in_their_own_database(postgres_url: str, tmp_path: Path) -> None:
    ini = make_project(tmp_path / "project")
    async with dropped_afterwards(postgres_url) as prefix:
        manager = TenancyManager(
            TenancyConfig(
                database_url=postgres_url,
                database_pool_size=2,
                isolation_strategy="database",
                schema_prefix=prefix,
                alembic_config=str(ini),
            )
        )
        await manager.initialize()
        try:
            await manager.register_tenant("acme", "Acme", app_metadata=METADATA)
            await manager.register_tenant("globex", "Globex")
            acme = make_url(postgres_url).set(database=f"{prefix}acme").render_as_string(hide_password=False)
            globex = (
                make_url(postgres_url).set(database=f"{prefix}globex").render_as_string(hide_password=False)
            )
            assert await _version(acme, "alembic_version") == "b2"
            assert await _version(globex, "alembic_version") == "b2"
            assert await _version(postgres_url, "public.alembic_version") is None
            add_revision(ini, "c3", REVISION_C)
            assert await _upgrade(manager, ini) == {"acme": "ok", "globex": "ok"}
            assert await _version(acme, "alembic_version") == "c3"
        finally:
            await manager.close()


# Row-level security: every tenant table leads with the tenant column.
RLS_R1 = """
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("tenant_id", sa.String(36), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("items")
"""

RLS_R2 = """
import sqlalchemy as sa
from alembic import op

revision = "r2"
down_revision = "r1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("tenant_id", sa.String(36), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("notes")
"""

RLS_METADATA = sa.MetaData()
sa.Table(
    "items",
    RLS_METADATA,
    sa.Column("tenant_id", sa.String(36), primary_key=True, server_default=sa.FetchedValue()),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text),
)


def rls_project(root: Path) -> Path:
    ini = make_project(root)
    versions = root / "migrations" / "tenant" / "versions"
    for old in versions.glob("*.py"):
        old.unlink()
    (versions / "r1.py").write_text(RLS_R1)
    return ini


async def _rows(manager: TenancyManager, slug: str, table: str) -> list[str]:
    """Insert row 1 (the same key in every tenant) as the application role; the tenant ids it sees."""
    tenant = await manager.get_tenant(slug)
    async with manager.session(tenant) as session, session.begin():
        insert = sa.text(f"INSERT INTO {table} (tenant_id, id) VALUES (:t, 1)")  # noqa: S608
        await session.execute(insert, {"t": tenant.id})
        return list((await session.execute(sa.text(f"SELECT tenant_id FROM {table}"))).scalars())  # noqa: S608


async def test_rls_tenants_share_one_stamp_and_one_migration(roles: Roles, tmp_path: Path) -> None:
    ini = rls_project(tmp_path / "project")
    manager = TenancyManager(
        TenancyConfig(
            database_url=roles.app_url,
            database_owner_url=roles.owner_url,
            isolation_strategy="rls",
            alembic_config=str(ini),
        )
    )
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme")  # no tables yet: r1 runs once, then guarded
        await manager.register_tenant("globex", "Globex")  # the shared tables have r1: kept
        assert await _version(roles.admin_url, "public.alembic_version_rls") == "r1"
        acme, globex = await manager.get_tenant("acme"), await manager.get_tenant("globex")
        assert await _rows(manager, "acme", "items") == [acme.id]
        assert await _rows(manager, "globex", "items") == [globex.id]
        # One entry for every rls tenant, migrated once; its new table is guarded like the others.
        add_revision(ini, "r2", RLS_R2)
        assert await _upgrade(manager, ini) == {RLS_LABEL: "ok"}
        assert await _version(roles.admin_url, "public.alembic_version_rls") == "r2"
        assert await _rows(manager, "acme", "notes") == [acme.id]
        assert await _rows(manager, "globex", "notes") == [globex.id]
        assert await manager.isolation.verify() == []  # type: ignore[attr-defined]
        await manager.register_tenant("initech", "Initech", app_metadata=RLS_METADATA)  # kept
        assert await _version(roles.admin_url, "public.alembic_version_rls") == "r2"
        assert await _upgrade(manager, ini) == {RLS_LABEL: "skipped"}
    finally:
        await manager.close()


async def test_hybrid_tiers_are_stamped_where_each_tenant_lives(roles: Roles, tmp_path: Path) -> None:
    ini = rls_project(tmp_path / "project")
    manager = TenancyManager(
        TenancyConfig(
            database_url=roles.app_url,
            database_owner_url=roles.owner_url,
            isolation_strategy="hybrid",
            alembic_config=str(ini),
        )
    )
    await manager.initialize()
    try:
        await manager.register_tenant("alpha", "Alpha", tier="schema", app_metadata=RLS_METADATA)
        await manager.register_tenant("beta", "Beta", tier="rls", app_metadata=RLS_METADATA)
        await manager.register_tenant("gamma", "Gamma", tier="schema")  # no tables: migrated
        assert await _version(roles.admin_url, "tenant_alpha.alembic_version") == "r1"
        assert await _version(roles.admin_url, "tenant_gamma.alembic_version") == "r1"
        assert await _version(roles.admin_url, "public.alembic_version_rls") == "r1"
        assert await _version(roles.admin_url, "public.alembic_version") is None
        add_revision(ini, "r2", RLS_R2)
        # As the owner role; a table added to a tenant schema is usable by the application role.
        assert await _upgrade(manager, ini) == {"alpha": "ok", "gamma": "ok", RLS_LABEL: "ok"}
        for slug in ("alpha", "beta", "gamma"):
            tenant = await manager.get_tenant(slug)
            assert await _rows(manager, slug, "notes") == [tenant.id]
    finally:
        await manager.close()


def test_alembic_config_needs_postgresql(tmp_path: Path) -> None:
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path}/app.db", alembic_config="alembic.ini")
    with pytest.raises(ConfigurationError, match="alembic_config: tenant migrations need PostgreSQL"):
        TenancyManager(config)
