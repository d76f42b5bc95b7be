"""`alembic revision --autogenerate` through Alembic's own command line, per isolation strategy.

Each test makes a project with `fastapi-tenancy migrate init`'s template whose env.py files
compare one `models.py` (two tenant tables and a shared `public.plans`), autogenerates a
revision, checks it holds exactly the model diff, applies it, and autogenerates again:
nothing left to do. Then a changed model gives exactly its change.
"""

import re
from pathlib import Path

import asyncpg
import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager
from tests.isolation.conftest import Roles
from tests.isolation.databases import dropped_afterwards

from .projects import make_models_project, models
from .test_env import alembic

pytestmark = pytest.mark.postgres

CREATE_TENANT_TABLES = [("create_table", "customers"), ("create_table", "orders")]


def autogenerate(
    url: str, root: Path, *args: str, env: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """Run `alembic ... revision --autogenerate`; the operations of the new revision's upgrade()."""
    before = set(root.rglob("versions/*.py"))
    done = alembic(
        url, root, "-c", str(root / "alembic.ini"), *args, "revision", "--autogenerate", "-m", "m", env=env
    )
    assert done.returncode == 0, done.stderr
    (created,) = set(root.rglob("versions/*.py")) - before
    source = created.read_text()
    upgrade = source[source.index("def upgrade") : source.index("def downgrade")]
    if "schema=" in upgrade and "shared" not in created.parts:
        raise AssertionError(f"a tenant revision names a schema:\n{upgrade}")
    if "alembic_version" in source:
        raise AssertionError(f"the revision touches a version table:\n{source}")
    # op.create_table('orders', ...), op.add_column('orders', ...), op.drop_table('x') ...
    operations: list[tuple[str, str]] = re.findall(r"op\.(\w+)\('(\w+)'", upgrade)
    if not operations:
        assert "pass" in upgrade, upgrade
        created.unlink()  # an empty revision: a check, not a step to keep
    return operations


def upgrade(url: str, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
    done = alembic(url, root, "-c", str(root / "alembic.ini"), *args, "upgrade", "head", env=env)
    assert done.returncode == 0, done.stderr


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def _tables(url: str, schema: str) -> list[str]:
    rows = await _fetch(url, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1")  # noqa: S608
    return [r[0] for r in rows]


async def test_schema_tenant_autogenerate_is_the_model_diff_and_applies(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "project"
    make_models_project(root, models())
    await manager.register_tenant("acme", "Acme")  # an empty schema: every table is to create
    tenant = ("--name", "tenant", "-x", "tenant=acme")

    # Not the shared public.plans, not the registry in public; no version table touched.
    assert autogenerate(postgres_url, root, *tenant) == CREATE_TENANT_TABLES
    upgrade(postgres_url, root, *tenant)
    assert await _tables(postgres_url, "tenant_acme") == ["alembic_version", "customers", "orders"]
    # The version table and the foreign key are no difference: nothing left to do.
    assert autogenerate(postgres_url, root, *tenant) == []

    (root / "models.py").write_text(models(note=True))
    assert autogenerate(postgres_url, root, *tenant) == [("add_column", "orders")]
    upgrade(postgres_url, root, *tenant)
    assert autogenerate(postgres_url, root, *tenant) == []
    rows = await _fetch(postgres_url, "SELECT version_num FROM tenant_acme.alembic_version")
    assert len(rows) == 1
    assert await _tables(postgres_url, "public") == [
        "tenancy_audit_log",
        "tenants",
        "tenants_domains",
        "tenants_settings",
    ]


async def test_shared_autogenerate_is_the_shared_tables_only(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "project"
    make_models_project(root, models())
    await manager.register_tenant("acme", "Acme")

    # The registry and the audit log are in public too: the library's, never dropped.
    assert autogenerate(postgres_url, root, "--name", "shared") == [("create_table", "plans")]
    upgrade(postgres_url, root, "--name", "shared")
    assert autogenerate(postgres_url, root, "--name", "shared") == []
    assert await _tables(postgres_url, "public") == [
        "alembic_version",
        "plans",
        "tenancy_audit_log",
        "tenants",
        "tenants_domains",
        "tenants_settings",
    ]
    assert await _tables(postgres_url, "tenant_acme") == []


async def test_database_tenant_autogenerate_is_the_model_diff(postgres_url: str, tmp_path: Path) -> None:
    root = tmp_path / "project"
    make_models_project(root, models())
    async with dropped_afterwards(postgres_url) as prefix:
        config = TenancyConfig(
            database_url=postgres_url,
            isolation_strategy="database",
            schema_prefix=prefix,
            database_pool_size=2,
        )
        manager = TenancyManager(config)
        await manager.initialize()
        try:
            await manager.register_tenant("acme", "Acme")
        finally:
            await manager.close()
        env = {"TENANCY_ISOLATION_STRATEGY": "database", "TENANCY_SCHEMA_PREFIX": prefix}
        tenant = ("--name", "tenant", "-x", "tenant=acme")
        # public.plans is the shared environment's, not a table of each tenant database.
        assert autogenerate(postgres_url, root, *tenant, env=env) == CREATE_TENANT_TABLES
        upgrade(postgres_url, root, *tenant, env=env)
        assert autogenerate(postgres_url, root, *tenant, env=env) == []
        (root / "models.py").write_text(models(note=True))
        assert autogenerate(postgres_url, root, *tenant, env=env) == [("add_column", "orders")]
        upgrade(postgres_url, root, *tenant, env=env)
        database = postgres_url.rsplit("/", 1)[0] + f"/{prefix}acme"
        assert await _tables(database, "public") == ["alembic_version", "customers", "orders"]


def _rls_env(roles: Roles, strategy: str) -> dict[str, str]:
    return {"TENANCY_DATABASE_OWNER_URL": roles.owner_url, "TENANCY_ISOLATION_STRATEGY": strategy}


async def test_rls_autogenerate_compares_the_shared_tenant_tables_only(roles: Roles, tmp_path: Path) -> None:
    root = tmp_path / "project"
    make_models_project(root, models(tenant_column=True))
    manager = TenancyManager(
        TenancyConfig(
            database_url=roles.app_url, database_owner_url=roles.owner_url, isolation_strategy="rls"
        )
    )
    await manager.initialize()
    try:
        await manager.register_tenant("acme", "Acme")  # the registry, audit log and fence: in public
    finally:
        await manager.close()
    url, env = roles.app_url, _rls_env(roles, "rls")
    tenant = ("--name", "tenant", "-x", "tenant=acme")
    assert autogenerate(url, root, *tenant, env=env) == CREATE_TENANT_TABLES
    upgrade(url, root, *tenant, env=env)
    assert await _tables(roles.admin_url, "public") == [
        "alembic_version_rls",
        "customers",
        "fastapi_tenancy_tenant_fence",
        "orders",
        "tenancy_audit_log",
        "tenants",
        "tenants_domains",
        "tenants_settings",
    ]
    assert autogenerate(url, root, *tenant, env=env) == []
    # The shared environment: plans only; the tenants' tables (the tenant column) are not its own.
    assert autogenerate(url, root, "--name", "shared", env=env) == [("create_table", "plans")]
    upgrade(url, root, "--name", "shared", env=env)
    assert autogenerate(url, root, "--name", "shared", env=env) == []
    assert autogenerate(url, root, *tenant, env=env) == []
    (root / "models.py").write_text(models(tenant_column=True, note=True))
    assert autogenerate(url, root, *tenant, env=env) == [("add_column", "orders")]
    assert autogenerate(url, root, "--name", "shared", env=env) == []


async def test_hybrid_autogenerate_follows_each_tenants_tier(roles: Roles, tmp_path: Path) -> None:
    root = tmp_path / "project"
    make_models_project(root, models(tenant_column=True))
    manager = TenancyManager(
        TenancyConfig(
            database_url=roles.app_url, database_owner_url=roles.owner_url, isolation_strategy="hybrid"
        )
    )
    await manager.initialize()
    try:
        await manager.register_tenant("alpha", "Alpha", tier="schema")
        await manager.register_tenant("beta", "Beta", tier="rls")
    finally:
        await manager.close()
    url, env = roles.app_url, _rls_env(roles, "hybrid")
    alpha, beta = (("--name", "tenant", "-x", f"tenant={slug}") for slug in ("alpha", "beta"))
    # The tier is read from the registry: alpha is compared with its schema ...
    assert autogenerate(url, root, *alpha, env=env) == CREATE_TENANT_TABLES
    upgrade(url, root, *alpha, env=env)
    # ... beta with the shared tables, where the same revision then runs once.
    upgrade(url, root, *beta, env=env)
    assert autogenerate(url, root, *alpha, env=env) == []
    assert autogenerate(url, root, *beta, env=env) == []
    assert await _tables(roles.admin_url, "tenant_alpha") == ["alembic_version", "customers", "orders"]
    assert {"alembic_version_rls", "customers", "orders"} <= set(await _tables(roles.admin_url, "public"))
    (root / "models.py").write_text(models(tenant_column=True, note=True))
    assert autogenerate(url, root, *beta, env=env) == [("add_column", "orders")]
    upgrade(url, root, *alpha, env=env)
    upgrade(url, root, *beta, env=env)
    assert autogenerate(url, root, *alpha, env=env) == []


SQLMODEL_MODELS = """
from sqlmodel import Field, Relationship, SQLModel


class User(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=255, unique=True)
    items: list["Item"] = Relationship(back_populates="owner")


class Item(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=255)
    DESCRIPTION
    owner_id: int = Field(foreign_key="user.id")
    owner: User = Relationship(back_populates="items")


metadata = SQLModel.metadata
"""


async def test_sqlmodel_revisions_import_sqlmodel_and_apply(
    manager: TenancyManager, postgres_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "project"
    make_models_project(root, SQLMODEL_MODELS.replace("DESCRIPTION", ""))
    await manager.register_tenant("acme", "Acme")
    tenant = ("--name", "tenant", "-x", "tenant=acme")

    # `str` fields are SQLModel's AutoString: written by module path, so the module is imported.
    assert autogenerate(postgres_url, root, *tenant) == [("create_table", "user"), ("create_table", "item")]
    (first,) = root.rglob("tenant/versions/*.py")
    assert "\nimport sqlmodel.sql.sqltypes\n" in first.read_text()
    assert "sqlmodel.sql.sqltypes.AutoString(length=255)" in first.read_text()
    upgrade(postgres_url, root, *tenant)
    assert autogenerate(postgres_url, root, *tenant) == []

    description = "description: str | None = Field(default=None, max_length=1000)"
    (root / "models.py").write_text(SQLMODEL_MODELS.replace("DESCRIPTION", description))
    assert autogenerate(postgres_url, root, *tenant) == [("add_column", "item")]
    upgrade(postgres_url, root, *tenant)
    assert autogenerate(postgres_url, root, *tenant) == []
    assert await _tables(postgres_url, "tenant_acme") == ["alembic_version", "item", "user"]
    # The shared environment has nothing of the tenants' to compare (nor the library's tables).
    assert autogenerate(postgres_url, root, "--name", "shared") == []
