"""PostgreSQL-only guarantees of schema isolation: pool hygiene, schema names, raw SQL."""

from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa

from fastapi_tenancy import InvalidIdentifierError, TenancyConfig, TenancyManager

from ..apps import Base
from .test_matrix import two_tenants


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


async def test_orm_requests_cost_no_extra_statement(postgres_url: str) -> None:
    async with two_tenants(postgres_url) as env:
        statements: list[str] = []

        def record(conn: object, cursor: object, statement: str, *args: object) -> None:
            statements.append(statement)

        sync_engine = env.manager.engine.sync_engine
        sa.event.listen(sync_engine, "before_cursor_execute", record)
        try:
            for tenant in ("alpha", "beta", "alpha"):
                statements.clear()
                assert (await env.get(tenant, "/orders")).status_code == 200
                assert len(statements) == 1, statements  # the SELECT itself, schema-qualified
                assert f"tenant_{tenant}.orders" in statements[0]
        finally:
            sa.event.remove(sync_engine, "before_cursor_execute", record)


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


@pytest.mark.parametrize("form", list(RAW_FORMS), ids=list(RAW_FORMS))
async def test_every_form_of_raw_sql_stays_in_the_tenant(postgres_url: str, form: str) -> None:
    async with two_tenants(postgres_url) as env:
        await env.shared_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, description VARCHAR(200))")
        await env.shared_sql("INSERT INTO orders VALUES (1, 'PUBLIC-SECRET')")
        for tenant, expected in (("alpha", ["alpha-1", "alpha-2"]), ("beta", ["beta-1", "beta-3"])):
            async with env.manager.session(await env.manager.get_tenant(tenant)) as session:
                rows = sorted((await session.execute(RAW_FORMS[form]())).scalars().all())
                assert rows == expected
                await session.commit()  # a new transaction must be scoped again
                assert sorted((await session.execute(RAW_FORMS[form]())).scalars().all()) == expected
                conn = await session.connection()
                driver = await conn.exec_driver_sql("SELECT description FROM orders ORDER BY id")
                assert list(driver.scalars()) == expected


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
