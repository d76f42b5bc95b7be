"""The tenant list: filters, keyset paging, and the bounded scan, up to a registry of 100,000 tenants."""

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager, TenantStatus
from fastapi_tenancy.console.search import TenantFilter, search_tenants

from .conftest import mount


def _identifiers(html: str) -> list[str]:
    return re.findall(r'<td><a href="/_tenancy/tenants/([a-z0-9-]+)">', html)


def _next(html: str) -> str | None:
    match = re.search(r'<a href="/_tenancy/tenants\?([^"]+)" rel="next">', html)
    return None if match is None else match.group(1).replace("&amp;", "&")


async def test_filters_pages_and_the_scan_budget(tmp_path: Path) -> None:
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    try:
        for index in range(30):
            plan = "pro" if index % 3 == 0 else "free"
            await manager.register_tenant(f"t{index:02d}", f"Customer {index}", metadata={"plan": plan})
        await manager.suspend_tenant("t04")
        await manager.suspend_tenant("t09")

        async def identifiers(where: TenantFilter) -> list[str]:
            page = await search_tenants(manager, where)
            return [tenant.identifier for tenant in page.tenants]

        assert await identifiers(TenantFilter(status=TenantStatus.SUSPENDED)) == ["t04", "t09"]
        assert await identifiers(TenantFilter(text="CUSTOMER 1")) == ["t01"] + [
            f"t{i}" for i in range(10, 20)
        ]
        assert await identifiers(TenantFilter(plan="pro", status=TenantStatus.ACTIVE)) == [
            f"t{i:02d}" for i in range(0, 30, 3) if i != 9
        ]
        assert await identifiers(TenantFilter(tier="schema")) == []  # no tiers here
        # Pages of 4 through everything: each starts after the last one, none is lost.
        seen: list[str] = []
        after = None
        while True:
            page = await search_tenants(manager, TenantFilter(), after=after, page_size=4)
            seen += [tenant.identifier for tenant in page.tenants]
            if page.after is None:
                break
            after = page.after
        assert seen == [f"t{i:02d}" for i in range(30)]
        # A filter that matches little stops at the budget, says how far it read, and goes on from there.
        budget = await search_tenants(manager, TenantFilter(plan="pro"), page_size=50, scan_limit=8)
        assert budget.budget_spent and budget.scanned == 8 and budget.after == "t07"
        assert [t.identifier for t in budget.tenants] == ["t00", "t03", "t06"]
        rest = await search_tenants(
            manager, TenantFilter(plan="pro"), after=budget.after, page_size=2, scan_limit=8
        )
        assert [t.identifier for t in rest.tenants] == ["t09", "t12"] and not rest.budget_spent
    finally:
        await manager.close()


@pytest.fixture
async def registry(postgres_url: str) -> AsyncIterator[TenancyManager]:
    """A registry of 100,000 tenants, written straight into its table (registering each would take hours)."""
    manager = TenancyManager(TenancyConfig(database_url=postgres_url))
    await manager.initialize()
    async with manager.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO public.tenants (id, identifier, name, status, metadata, created_at, updated_at) "
                "SELECT gen_random_uuid()::text, 'tenant-' || lpad(i::text, 6, '0'), 'Customer ' || i, "
                "CASE WHEN i % 10 = 0 THEN 'suspended' ELSE 'active' END, "
                "jsonb_build_object('plan', CASE WHEN i % 1000 = 7 THEN 'enterprise' "
                "WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END), now(), now() "
                "FROM generate_series(1, 100000) AS i"
            )
        )
    try:
        yield manager
    finally:
        await manager.close()


@pytest.mark.postgres
async def test_keyset_paging_over_100000_tenants(
    registry: TenancyManager, capsys: pytest.CaptureFixture[str]
) -> None:
    app, console = mount(registry)
    timings: dict[str, float] = {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers={"X-Operator": "alice"}
    ) as client:

        async def page(name: str, query: str = "") -> str:
            started = time.perf_counter()
            response = await client.get(f"/_tenancy/tenants{'?' + query if query else ''}")
            timings[name] = time.perf_counter() - started
            assert response.status_code == 200, response.text
            return response.text

        first = await page("first page")
        assert "100,000 tenants" in first and "90,000 active" in first and "10,000 suspended" in first
        assert _identifiers(first) == [f"tenant-{i:06d}" for i in range(1, 51)]
        second = await page("next page", _next(first) or "")
        assert _identifiers(second) == [f"tenant-{i:06d}" for i in range(51, 101)]
        deep = await page("last page", "after=tenant-099990")
        assert _identifiers(deep) == [f"tenant-{i:06d}" for i in range(99991, 100001)]
        assert _next(deep) is None
        suspended = await page("status filter (in the query)", "status=suspended&after=tenant-050000")
        assert _identifiers(suspended) == [f"tenant-{i:06d}" for i in range(50010, 50510, 10)]
        rare = await page("plan filter, 20,000 rows read", "plan=enterprise")
        # 100 enterprise tenants among 100,000: the budget (20,000 rows) ends the first page.
        assert _identifiers(rare) == [f"tenant-{i:06d}" for i in range(7, 20000, 1000)]
        assert "Read 20,000 tenants up to <code>tenant-020000</code>" in rare
        assert _next(rare) == "plan=enterprise&after=tenant-020000"
        further = await page("plan filter, next 20,000", _next(rare) or "")
        assert _identifiers(further) == [f"tenant-{i:06d}" for i in range(20007, 40000, 1000)]
        named = await page("name search, last tenants", "q=customer+9999&after=tenant-090000")
        assert _identifiers(named) == ["tenant-099990", *(f"tenant-{i:06d}" for i in range(99991, 100000))]
    await console.close()
    with capsys.disabled():
        print(
            "\n[console, 100,000 tenants] " + "; ".join(f"{k}: {v * 1000:.0f} ms" for k, v in timings.items())
        )
    assert max(timings["first page"], timings["next page"], timings["last page"]) < 2.0, timings


@pytest.mark.postgres
async def test_tenants_are_filtered_by_the_database_server_that_holds_them(postgres_url: str) -> None:
    from pydantic import SecretStr

    from fastapi_tenancy.encryption import URLCipher

    from ..isolation.databases import dropped_afterwards

    # Two names of one server stand for two servers: what the filter compares is where a
    # tenant's data lives as its URL says, host and port.
    other = make_url(postgres_url).set(host="localhost", database="postgres")
    async with dropped_afterwards(postgres_url) as prefix:
        config = TenancyConfig(
            database_url=postgres_url,
            isolation_strategy="database",
            schema_prefix=prefix,
            encryption_keys=[SecretStr(URLCipher.generate_key())],
        )
        manager = TenancyManager(config)
        await manager.initialize()
        try:
            await manager.register_tenant("near", "Near")
            await manager.register_tenant(
                "far", "Far", database_url=other.render_as_string(hide_password=False)
            )
            app, console = mount(manager)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", headers={"X-Operator": "alice"}
            ) as client:
                main = f"{make_url(postgres_url).host}:{make_url(postgres_url).port}"
                everyone = (await client.get("/_tenancy/tenants")).text
                assert 'id="server"' in everyone and _identifiers(everyone) == ["far", "near"]
                remote = (await client.get(f"/_tenancy/tenants?server=localhost:{other.port}")).text
                assert _identifiers(remote) == ["far"]
                assert _identifiers((await client.get(f"/_tenancy/tenants?server={main}")).text) == ["near"]
                detail = (await client.get("/_tenancy/tenants/far")).text
                assert f"<dd>localhost:{other.port}, database {prefix}far</dd>" in detail
                assert "postgres@" not in detail  # the host, never the URL and its user
            await console.close()
            await manager.delete_tenant("far", destroy_data=True)
        finally:
            await manager.close()
