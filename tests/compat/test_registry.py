"""A fastapi-tenancy 0.5.0 registry table: refused at startup with the command that converts it,
and converted by that command (through the real console script) on PostgreSQL, SQLite and
MariaDB; on PostgreSQL the app then serves the 0.5.0 tenants' data.

The 0.5.0 table is made here as 0.5.0 makes it (its columns, types, indexes and server
defaults, and rows as its `register_tenant` writes them), from the description of 0.5.0 in
the project's reference notes; no 0.5.0 code is used."""

import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fastapi_tenancy import ConfigurationError, TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.encryption import URLCipher
from fastapi_tenancy.storage.database import SQLAlchemyTenantStore
from fastapi_tenancy.storage.legacy import CONVERT_COMMAND, convert_legacy_registry
from fastapi_tenancy.urls import normalise_database_url
from tests.apps import build_app
from tests.cli.test_cli import cli, cli_json

COMMAND = ["registry", "convert-from-0.5"]
CREATED = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


def _table_050(metadata: sa.MetaData, name: str = "tenants") -> sa.Table:
    """0.5.0's `tenants` table, column for column."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(255), primary_key=True, comment="Opaque unique tenant ID."),
        sa.Column("identifier", sa.String(255), unique=True, nullable=False, comment="Human-readable slug."),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
        sa.Column("isolation_strategy", sa.String(50), nullable=True),
        sa.Column("database_url", sa.Text(), nullable=True),
        sa.Column("schema_name", sa.String(255), nullable=True),
        sa.Column("tenant_metadata", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Index(f"ix_{name}_identifier", "identifier"),
        sa.Index(f"ix_{name}_status", "status"),
        sa.Index(f"ix_{name}_created_at", "created_at"),
        sa.Index(f"ix_{name}_status_created_at", "status", "created_at"),
    )


def _row_050(identifier: str, status: str = "active", **columns: Any) -> dict[str, Any]:
    """A row as 0.5.0's register_tenant writes it."""
    return {
        "id": "tenant-" + secrets.token_urlsafe(12),
        "identifier": identifier,
        "name": identifier.replace("-", " ").title(),
        "status": status,
        "isolation_strategy": None,
        "database_url": None,
        "schema_name": None,
        "tenant_metadata": json.dumps({"plan": "pro", "seats": 5}),
        "created_at": CREATED,
        "updated_at": CREATED + timedelta(days=2),
        **columns,
    }


async def _registry_050(url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_async_engine(normalise_database_url(url))
    try:
        metadata = sa.MetaData()
        table = _table_050(metadata)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            if rows:
                await conn.execute(table.insert(), rows)
    finally:
        await engine.dispose()


@pytest.fixture
async def engine(url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    engine = create_async_engine(url)
    yield url, engine
    await engine.dispose()


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh database of the backend named by the test's parameter."""
    return normalise_database_url(str(request.getfixturevalue(request.param)))


async def _columns(engine: AsyncEngine, table: str) -> set[str] | None:
    async with engine.connect() as conn:

        def read(sync_conn: sa.Connection) -> set[str] | None:
            inspector = sa.inspect(sync_conn)
            if not inspector.has_table(table):
                return None
            return {column["name"] for column in inspector.get_columns(table)}

        return await conn.run_sync(read)


BACKENDS = ["postgres_url", "sqlite_url", "mysql_url"]


def _isolation(url: str) -> Literal["database", "schema"]:
    return "database" if url.startswith("mysql") else "schema"


def _env(url: str) -> dict[str, str]:
    """What the CLI needs besides the URL: MySQL/MariaDB serves database isolation only."""
    return {"TENANCY_ISOLATION_STRATEGY": _isolation(url)}


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
async def test_a_050_registry_is_refused_at_startup_naming_the_command(
    engine: tuple[str, AsyncEngine],
) -> None:
    url, _ = engine
    await _registry_050(url, [_row_050("acme-corp")])
    config = TenancyConfig(database_url=url, isolation_strategy=_isolation(url))
    manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
    with pytest.raises(ConfigurationError) as caught:
        await manager.initialize()
    assert CONVERT_COMMAND in str(caught.value)
    assert "fastapi-tenancy 0.5.0 tenant registry" in str(caught.value)
    await manager.close()


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
async def test_doctor_names_the_command_for_a_050_registry(engine: tuple[str, AsyncEngine]) -> None:
    url, _ = engine
    await _registry_050(url, [_row_050("acme-corp")])
    code, checks = cli_json(url, "doctor", env=_env(url))
    registry = next(check for check in checks if check["name"] == "registry")
    assert code == 1 and registry["status"] == "fail", checks
    assert CONVERT_COMMAND in registry["detail"]
    # Read-only: the table is as it was, nothing made beside it.
    assert await _columns(engine[1], "tenants") == set(_table_050(sa.MetaData()).c.keys())
    assert await _columns(engine[1], "tenants_settings") is None


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
async def test_a_foreign_table_of_the_same_name_is_refused_at_startup(
    engine: tuple[str, AsyncEngine],
) -> None:
    url, sql = engine
    async with sql.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE tenants (id INTEGER PRIMARY KEY, label TEXT)"))
    manager = TenancyManager(TenancyConfig(database_url=url, isolation_strategy=_isolation(url)))
    with pytest.raises(ConfigurationError, match="not a fastapi-tenancy registry .*identifier"):
        await manager.initialize()
    await manager.close()


@pytest.mark.postgres
async def test_converted_050_tenants_are_served_with_their_data(postgres_url: str) -> None:
    # A 0.5.0 deployment with schema isolation: the registry, and acme-corp's schema with its
    # orders (0.5.0's register_tenant: CREATE SCHEMA, then create_all inside it).
    acme = _row_050("acme-corp")
    globex = _row_050("globex", status="suspended", tenant_metadata=json.dumps({"plan": "free"}))
    gone = _row_050("initech", status="deleted", schema_name="tenant_initech", isolation_strategy="schema")
    await _registry_050(postgres_url, [acme, globex, gone])
    engine = create_async_engine(postgres_url)
    async with engine.begin() as conn:
        for schema in ("tenant_acme_corp", "tenant_globex"):
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            await conn.execute(
                sa.text(f'CREATE TABLE "{schema}".orders (id INTEGER PRIMARY KEY, description TEXT)')
            )
        await conn.execute(sa.text("INSERT INTO tenant_acme_corp.orders VALUES (1, 'First order')"))

    code, planned = cli_json(postgres_url, *COMMAND, "--dry-run")
    assert code == 0, planned
    assert [row["identifier"] for row in planned] == ["acme-corp", "globex", "initech"]
    assert "tenant_metadata" in (await _columns(engine, "tenants") or set())  # nothing changed

    code, output = cli(postgres_url, *COMMAND)
    assert code == 0, output
    assert "Converted 3 tenants" in output and "tenants_0_5" in output
    # 0.5.0's schemas carry no tenant's marker (docs/isolation.md, "Incarnations"): the
    # conversion marks those it finds; initech's is gone.
    async with engine.connect() as conn:
        marked = await conn.scalars(
            sa.text(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'v' AND c.relname LIKE 'fastapi\\_tenancy:%' ORDER BY 1"
            )
        )
        assert marked.all() == ["tenant_acme_corp", "tenant_globex"]
    assert "not adopted" in output and "tenants adopt" in output
    backup = await _columns(engine, "tenants_0_5")
    assert backup is not None and "tenant_metadata" in backup
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM tenants_0_5"))).scalar_one() == 3
    await engine.dispose()

    config = TenancyConfig(database_url=postgres_url)
    manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
    await manager.initialize()
    try:
        tenant = await manager.get_tenant_by_id(acme["id"])
        assert (tenant.identifier, tenant.name, tenant.status) == (
            "acme-corp",
            "Acme Corp",
            TenantStatus.ACTIVE,
        )
        assert tenant.metadata == {"plan": "pro", "seats": 5}
        assert (tenant.created_at, tenant.updated_at) == (CREATED, CREATED + timedelta(days=2))
        assert (await manager.get_tenant("globex")).status is TenantStatus.SUSPENDED
        assert (await manager.get_tenant("initech")).tier == "schema"
        transport = httpx.ASGITransport(app=build_app(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/orders", headers={"X-Tenant-ID": "acme-corp"})
            assert response.status_code == 200, response.text
            assert response.json()["orders"] == [{"id": 1, "description": "First order"}]
            response = await client.get("/orders", headers={"X-Tenant-ID": "globex"})
            assert response.status_code == 403, response.text
        # The converted registry takes new tenants, and the 0.5.0 slugs stay taken.
        assert (await manager.register_tenant("new-co", "New")).status is TenantStatus.ACTIVE
        await manager.suspend_tenant(tenant_id=acme["id"])
    finally:
        await manager.close()
    code, output = cli(postgres_url, *COMMAND)
    assert code == 2 and "not a fastapi-tenancy 0.5.0 registry" in output


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
async def test_a_converted_registry_keeps_every_field(engine: tuple[str, AsyncEngine]) -> None:
    url, sql = engine
    rows = [_row_050("acme-corp"), _row_050("b2", status="provisioning", tenant_metadata="{}")]
    await _registry_050(url, rows)
    code, output = cli(url, *COMMAND, "--backup-table", "old_tenants", env=_env(url))
    assert code == 0, output
    assert await _columns(sql, "old_tenants") is not None
    store = SQLAlchemyTenantStore(url)
    await store.initialize()
    try:
        for row in rows:
            tenant = await store.get_by_id(row["id"])
            assert tenant is not None
            assert (tenant.identifier, tenant.name, tenant.status.value) == (
                row["identifier"],
                row["name"],
                row["status"],
            )
            assert tenant.metadata == json.loads(row["tenant_metadata"])
            # As 0.5.0 stored them: its MySQL columns (DATETIME) keep whole seconds.
            stored = [row[name].replace(microsecond=0) if url.startswith("mysql") else row[name] for name in (
                "created_at", "updated_at"
            )]  # fmt: skip
            assert [tenant.created_at, tenant.updated_at] == stored
        assert await store.count() == 2
    finally:
        await store.close()


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
async def test_rows_that_cannot_be_converted_exactly_change_nothing(engine: tuple[str, AsyncEngine]) -> None:
    url, sql = engine
    rows = [
        _row_050("fine-co"),
        _row_050("long-id", id="tenant-" + "x" * 40),
        _row_050("renamed", schema_name="custom_schema"),
        _row_050("enc-url", database_url="enc::gAAAAABexample"),
        _row_050("plain-url", database_url="postgresql://app:secret@db2/app"),
        _row_050("bad-json", tenant_metadata="{not json"),
        _row_050("not-a-dict", tenant_metadata="[1, 2]"),
        _row_050("odd-tier", isolation_strategy="hybrid"),
    ]
    await _registry_050(url, rows)
    code, output = cli(url, *COMMAND, env=_env(url))
    assert code == 2, output
    assert "7 of 8 tenants cannot be converted exactly, so nothing was changed" in output
    for expected in (
        "longer than 36 characters",
        'ALTER SCHEMA "custom_schema" RENAME TO "tenant_renamed"',
        "encrypted by 0.5.0",
        "set encryption_keys",
        "tenant_metadata is not JSON",
        "not a JSON object",
        "isolation_strategy 'hybrid' is not a tier",
    ):
        assert expected in " ".join(output.split()), expected
    assert "secret" not in output  # a database URL is never repeated
    assert "tenant_metadata" in (await _columns(sql, "tenants") or set())
    assert await _columns(sql, "tenants_0_5") is None


@pytest.mark.postgres
async def test_a_plain_database_url_is_encrypted_with_the_configured_keys(postgres_url: str) -> None:
    await _registry_050(postgres_url, [_row_050("own-db", database_url="postgresql://app:pw@db2/own")])
    cipher = URLCipher([URLCipher.generate_key()])
    store = SQLAlchemyTenantStore(postgres_url)
    result = await convert_legacy_registry(store, cipher=cipher)
    assert [t.identifier for t in result.tenants] == ["own-db"]
    await store.initialize()
    try:
        tenant = await store.get_by_identifier("own-db")
        assert tenant is not None and tenant.encrypted_database_url is not None
        # Not "pw" alone: a base64 ciphertext holds those two letters one run in thirty.
        assert "app:pw@db2" not in tenant.encrypted_database_url
        assert cipher.decrypt(tenant.encrypted_database_url) == "postgresql+asyncpg://app:pw@db2/own"
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_table_other_tables_depend_on_is_left_as_it_was(postgres_url: str) -> None:
    # An application table with a foreign key to 0.5.0's tenants.id: dropping the old table
    # would break it, so the conversion stops with the database's message and rolls back.
    await _registry_050(postgres_url, [_row_050("acme-corp")])
    engine = create_async_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, tenant_id TEXT REFERENCES tenants(id))")
        )
    code, output = cli(postgres_url, *COMMAND)
    assert code == 2 and "nothing was changed" in output and "depend" in output, output
    assert "Traceback" not in output
    assert "tenant_metadata" in (await _columns(engine, "tenants") or set())
    assert await _columns(engine, "tenants_0_5") is None
    await engine.dispose()
