"""PostgreSQL-only guarantees of schema isolation: schema names, raw SQL. (Pool hygiene after
every kind of request: tests/security/test_pool_hygiene.py.)"""

from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from fastapi_tenancy import ConfigurationError, InvalidIdentifierError, TenancyConfig, TenancyManager
from fastapi_tenancy._utils import is_result_type_change
from fastapi_tenancy.isolation import SchemaIsolation
from fastapi_tenancy.isolation.base import CONNECTION_OPTIONS
from fastapi_tenancy.isolation.schema import _defines_schema_types

from ..apps import Base
from .test_matrix import ROWS, Env, two_tenants


async def test_schema_names_in_the_catalog_are_exactly_the_expected_ones(postgres_url: str) -> None:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    try:
        longest = "a" * 56  # tenant_ + 56 = 63 bytes, PostgreSQL's limit
        for slug in ("acme-corp", "acme--corp", "9lives", longest):
            await manager.register_tenant(slug, slug, app_metadata=Base.metadata)
        with pytest.raises(InvalidIdentifierError, match="too long"):
            await manager.register_tenant("a" * 57, "too long", app_metadata=Base.metadata)
        async with manager.engine.connect() as conn:
            names = set(
                (
                    await conn.execute(
                        sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%'")
                    )
                ).scalars()
            )
        assert names == {"tenant_acme_corp", "tenant_acme__corp", "tenant_9lives", f"tenant_{longest}"}
        assert await manager.store.count() == 4
    finally:
        await manager.close()


async def test_docs_and_health_need_no_tenant(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        for path in ("/health", "/docs", "/openapi.json"):
            response = await env.client.get(path)
            assert response.status_code == 200, (path, response.text)


async def test_every_tenant_transaction_begins_with_the_tenant_search_path(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:  # a pool of one connection
        path = sa.text("SELECT current_setting('search_path')")
        async with env.manager.engine.connect() as conn:  # the manager's own connections: nothing
            assert (await conn.execute(path)).scalar_one() == ""
        async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
            assert (await session.execute(path)).scalar_one() == "tenant_alpha"
            await session.commit()
            assert (await session.execute(path)).scalar_one() == "tenant_alpha"
            async with session.begin_nested():
                assert (await session.execute(path)).scalar_one() == "tenant_alpha"
        async with env.manager.engine.connect() as conn:  # the same connection, back to nothing
            assert (await conn.execute(path)).scalar_one() == ""


async def test_one_statement_text_serves_every_tenant(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:  # a pool of one connection
        for _ in range(3):
            for identifier, rows in ROWS.items():
                response = await env.client.get("/orders", headers={"X-Tenant-ID": identifier})
                assert response.json()["orders"] == [{"id": k, "description": v} for k, v in rows.items()]
        async with env.manager.engine.connect() as conn:
            prepared = (
                await conn.execute(
                    sa.text(
                        "SELECT statement FROM pg_prepared_statements WHERE statement LIKE 'SELECT orders.%'"
                    )
                )
            ).scalars()
            assert list(prepared) == ["SELECT orders.id, orders.description \nFROM orders ORDER BY orders.id"]


async def test_a_transaction_begun_for_no_tenant_refuses_tenant_statements(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        session = await env.manager.isolation.session(await env.manager.get_tenant("alpha"))
        tenant_options = session.info[CONNECTION_OPTIONS]
        async with env.manager.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))  # begins, with no tenant
            await conn.execution_options(**tenant_options)
            with pytest.raises(ConfigurationError, match="not begun for that tenant"):
                await conn.execute(sa.text("SELECT description FROM orders"))


_MOOD_DDL = (
    "CREATE TYPE {s}.mood AS ENUM ('ok', 'sad')",
    "CREATE TABLE {s}.moods (id int PRIMARY KEY, m {s}.mood)",
    "INSERT INTO {s}.moods VALUES (1, 'ok')",
)
# The table as the application declares it: the enum type resolves in each tenant's schema.
_MOODS = sa.Table(
    "moods",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("m", postgresql.ENUM("ok", "sad", name="mood", create_type=False)),
)


async def _moods_in_both_schemas(env: Env) -> SchemaIsolation:
    """Give alpha's and beta's schemas an enum type of their own (after the manager started)."""
    isolation = env.manager.isolation
    assert isinstance(isolation, SchemaIsolation) and isolation.shared_statements
    async with env.manager.engine.begin() as conn:
        for schema in ("tenant_alpha", "tenant_beta"):
            for statement in _MOOD_DDL:
                await conn.execute(sa.text(statement.format(s=schema)))
    return isolation


async def test_tenant_schema_types_switch_to_statements_per_tenant(postgres_url: str) -> None:
    # Each schema gets its own enum type, after the manager started: PostgreSQL refuses the
    # shared statement once (a 503, retryable), then each tenant's SQL names its schema.
    async with two_tenants(postgres_url) as env:
        isolation = await _moods_in_both_schemas(env)

        async def read(identifier: str) -> list[str]:
            async with env.manager.session(await env.manager.get_tenant(identifier)) as session:
                return list((await session.execute(sa.select(_MOODS.c.m))).scalars())

        assert await read("alpha") == ["ok"]
        with pytest.raises(sa.exc.DBAPIError) as refused:
            await read("beta")
        assert is_result_type_change(refused.value)
        assert not isolation.shared_statements
        for _ in range(2):
            assert await read("beta") == ["ok"]
            assert await read("alpha") == ["ok"]
        # A manager started on such schemas writes statements per tenant from the start.
        later = TenancyManager(TenancyConfig(database_url=postgres_url))
        await later.initialize()
        try:
            assert isinstance(later.isolation, SchemaIsolation) and not later.isolation.shared_statements
        finally:
            await later.close()


def test_metadata_with_enum_types_is_seen() -> None:
    metadata = sa.MetaData()
    sa.Table("plain", metadata, sa.Column("id", sa.Integer, primary_key=True))
    assert not _defines_schema_types(metadata)
    sa.Table("tagged", metadata, sa.Column("tags", postgresql.ARRAY(sa.Enum("a", "b", name="tag"))))
    assert _defines_schema_types(metadata)


async def test_autocommit_is_refused_in_tenant_sessions(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
            conn = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
                await conn.execute(sa.text("SELECT description FROM orders"))


_ORDERS = Base.metadata.tables["orders"]  # a real Table: the translate map qualifies it
_SNEAK = "UNION ALL SELECT description FROM orders"

# SQL that reaches tables by unqualified names: visible to the library's check...
RAW_FORMS: dict[str, Callable[[], sa.Executable]] = {
    "text": lambda: sa.text("SELECT description FROM orders ORDER BY id"),
    "text in select": lambda: (
        sa.select(sa.text("description")).select_from(sa.text("orders")).order_by(sa.text("id"))
    ),
    "literal column on table()": lambda: sa.select(sa.literal_column("description")).select_from(
        sa.table("orders")
    ),
    "textual select": lambda: sa.text("SELECT description FROM orders ORDER BY id").columns(
        sa.column("description")
    ),
}
# ... and added to the SQL where no check before execution can see it.
HIDDEN_FORMS: dict[str, Callable[[], sa.Executable]] = {
    "statement hint": lambda: sa.select(_ORDERS.c.description).with_statement_hint(_SNEAK),
    "suffix": lambda: sa.select(_ORDERS.c.description).suffix_with(_SNEAK),
}


@pytest.mark.parametrize("form", list(RAW_FORMS), ids=list(RAW_FORMS))
async def test_every_form_of_raw_sql_stays_in_the_tenant(postgres_url: str, form: str) -> None:
    async with two_tenants(postgres_url) as env:
        await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
        await env.shared_sql("INSERT INTO orders VALUES (1, 'PUBLIC-SECRET')")
        for tenant, other in (("alpha", "beta"), ("beta", "alpha")):
            async with env.manager.session(await env.manager.get_tenant(tenant)) as session:
                for _ in range(2):  # the second time in a new transaction, after a commit
                    seen = repr((await session.execute(RAW_FORMS[form]())).all())
                    assert f"{tenant}-1" in seen
                    assert "PUBLIC-SECRET" not in seen and other not in seen, seen
                    await session.commit()
                conn = await session.connection()
                driver = await conn.exec_driver_sql("SELECT description FROM orders ORDER BY id")
                assert list(driver.scalars()) == [f"{tenant}-{i}" for i in ROWS[tenant]]


class _Other(DeclarativeBase):
    pass


class _OrderWithSummary(_Other):
    """A mapping that reads `orders` by an unqualified name, out of sight of any check."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column(sa.String(200))
    summary: Mapped[str] = column_property(
        sa.literal_column("(SELECT string_agg(description, ',' ORDER BY id) FROM orders)")
    )
    note: Mapped[str | None] = mapped_column(
        sa.String(200), default=sa.text("(SELECT min(description) FROM orders)")
    )


async def _hidden_sql(env: Env, tenant: str) -> list[str]:
    """Run every hidden form as `tenant`; return what each gave, or the error class name."""
    outcomes = []
    async with env.manager.session(await env.manager.get_tenant(tenant)) as session:
        attempts: list[Callable[[], Awaitable[object]]] = [
            *(lambda f=form: session.execute(f()) for form in HIDDEN_FORMS.values()),
            lambda: session.execute(sa.select(_OrderWithSummary)),
            lambda: _insert_with_sql_default(session),
        ]
        for attempt in attempts:
            try:
                result = await attempt()
                rows = result.all() if isinstance(result, sa.Result) else result
                outcomes.append(
                    repr([getattr(r[0], "summary", r) for r in rows] if isinstance(rows, list) else rows)
                )
                await session.commit()
            except sa.exc.ProgrammingError as exc:
                outcomes.append(f"error: {exc.orig}")
                await session.rollback()
    return outcomes


async def _insert_with_sql_default(session: AsyncSession) -> object:
    order = _OrderWithSummary(id=9, description="new")
    session.add(order)
    await session.flush()
    return order.note


@pytest.mark.parametrize("pgbouncer", [False, True], ids=["empty search_path", "every transaction"])
async def test_sql_hidden_from_the_check_never_reaches_another_schema(
    postgres_url: str, pgbouncer: bool
) -> None:
    async with two_tenants(postgres_url, database_pgbouncer=pgbouncer) as env:
        await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
        await env.shared_sql("INSERT INTO orders VALUES (1, 'PUBLIC-SECRET')")
        await env.shared_sql("ALTER TABLE tenant_alpha.orders ADD COLUMN note VARCHAR(200)")
        outcomes = await _hidden_sql(env, "alpha")
        assert len(outcomes) == 4
        for outcome in outcomes:
            assert "PUBLIC" not in outcome and "beta" not in outcome, outcomes
        # Every tenant transaction begins with the tenant's search_path: hidden SQL works.
        assert all("alpha-1" in outcome for outcome in outcomes), outcomes


async def test_an_engine_of_the_applications_own_is_made_to_send_the_setting(postgres_url: str) -> None:
    # Connections opened before the isolation attached to the engine cannot carry the
    # setting: refused, never used without it. Those opened after can.
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        tenant = await manager.register_tenant("alpha", "Alpha", app_metadata=Base.metadata)
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))  # a plain connection, back in the pool
        isolation = SchemaIsolation(engine)
        async with await isolation.session(tenant) as session:
            with pytest.raises(ConfigurationError, match="cannot carry the tenant's setting"):
                await session.execute(sa.text("SELECT count(*) FROM orders"))
        await engine.dispose()
        async with await isolation.session(tenant) as session:
            assert (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 0
            path = (await session.execute(sa.text("SELECT current_setting('search_path')"))).scalar_one()
            assert path == "tenant_alpha"
    finally:
        await engine.dispose()
        await manager.close()


def test_schema_isolation_needs_asyncpg() -> None:
    with pytest.raises(ConfigurationError, match="needs PostgreSQL through asyncpg"):
        SchemaIsolation(create_async_engine("sqlite+aiosqlite://"))


async def test_a_bound_tenant_type_switches_to_statements_per_tenant(postgres_url: str) -> None:
    # A parameter's type is fixed when a statement is first prepared: comparing with
    # another tenant's enum fails ("cannot cast type tenant_alpha.mood to mood") until
    # the statements name their schema.
    async with two_tenants(postgres_url) as env:
        isolation = await _moods_in_both_schemas(env)

        async def count(identifier: str) -> int:
            async with env.manager.session(await env.manager.get_tenant(identifier)) as session:
                query = sa.select(sa.func.count()).select_from(_MOODS).where(_MOODS.c.m == "ok")
                return int((await session.execute(query)).scalar_one())

        assert await count("alpha") == 1
        with pytest.raises(sa.exc.ProgrammingError, match="tenant_alpha.mood"):
            await count("beta")
        assert not isolation.shared_statements
        for _ in range(2):
            assert await count("beta") == 1
            assert await count("alpha") == 1
