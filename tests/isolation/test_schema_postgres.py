"""PostgreSQL-only guarantees of schema isolation: pool hygiene and schema names."""

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
