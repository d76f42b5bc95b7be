"""PostgreSQL-only guarantees of schema isolation: pool hygiene, schema names, raw SQL."""

from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from fastapi_tenancy import ConfigurationError, InvalidIdentifierError, TenancyConfig, TenancyManager

from ..apps import Base
from .test_matrix import ROWS, two_tenants


async def test_pooled_connection_is_clean_after_every_request(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        async with env.manager.engine.connect() as conn:
            baseline = (
                await conn.execute(sa.text("SELECT current_setting('search_path'), pg_backend_pid()"))
            ).one()
        for tenant, path in [
            ("alpha", "/orders"),
            ("beta", "/raw"),
            ("alpha", "/orders/1"),
            ("beta", "/nope"),
        ]:
            response = await env.get(tenant, path)
            assert response.status_code in (200, 404), response.text
            async with env.manager.engine.connect() as conn:  # the one and only pooled connection
                search_path, pid, xid, user = (
                    await conn.execute(
                        sa.text(
                            "SELECT current_setting('search_path'), pg_backend_pid(),"
                            " txid_current_if_assigned(), current_user"
                        )
                    )
                ).one()
            assert (search_path, pid) == tuple(baseline), "same physical connection, default search_path"
            assert xid is None, "no transaction left open"
            assert user == "postgres"


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
        assert isinstance(env.client, httpx.AsyncClient)


async def test_every_transaction_is_scoped_once_before_its_first_statement(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
            path = sa.text("SELECT current_setting('search_path')")
            assert (await session.execute(path)).scalar_one() == '"tenant_alpha"'
            await session.commit()
            assert (await session.execute(path)).scalar_one() == '"tenant_alpha"'
        async with env.manager.engine.connect() as conn:
            assert (await conn.execute(path)).scalar_one() == '"$user", public'


async def test_autocommit_is_refused_in_tenant_sessions(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
            conn = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
                await conn.execute(sa.text("SELECT description FROM orders"))


_ORDERS = sa.table("orders", sa.column("id"), sa.column("description"))
_SNEAK = "UNION ALL SELECT description FROM orders"

# SQL that reaches tables by unqualified names, in every way SQLAlchemy lets it in.
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
    """A mapping whose column_property reads `orders` by an unqualified name."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column(sa.String(200))
    summary: Mapped[str] = column_property(
        sa.literal_column("(SELECT string_agg(description, ',' ORDER BY id) FROM orders)")
    )
    note: Mapped[str | None] = mapped_column(
        sa.String(200), default=sa.text("(SELECT min(description) FROM orders)")
    )


async def test_sql_added_by_mappings_stays_in_the_tenant(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
        await env.shared_sql("INSERT INTO orders VALUES (1, 'PUBLIC-SECRET')")
        alpha = await env.manager.get_tenant("alpha")
        async with env.manager.session(alpha) as session:
            await session.execute(sa.text("ALTER TABLE orders ADD COLUMN note VARCHAR(200)"))
            await session.commit()
            session.add(_OrderWithSummary(id=9, description="alpha-9"))
            await session.commit()
            loaded = (
                await session.execute(sa.select(_OrderWithSummary).where(_OrderWithSummary.id == 9))
            ).scalar_one()
            assert loaded.summary == "alpha-1,alpha-2,alpha-9"
            assert loaded.note == "alpha-1"


async def test_raw_sql_after_a_rolled_back_savepoint_is_still_scoped(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
        async with env.manager.session(await env.manager.get_tenant("alpha")) as session:
            savepoint = await session.begin_nested()
            await session.execute(sa.text("SELECT 1 FROM orders"))  # sets search_path inside the savepoint
            await savepoint.rollback()  # ... which undoes it
            rows = (await session.execute(sa.text("SELECT description FROM orders ORDER BY id"))).scalars()
            assert list(rows) == ["alpha-1", "alpha-2"]
            schema = (await session.execute(sa.select(sa.func.current_schema()))).scalar_one()
            assert schema == "tenant_alpha"
            with pytest.raises(sa.exc.ProgrammingError, match="tenants"):
                await session.execute(sa.text("SELECT * FROM tenants"))
