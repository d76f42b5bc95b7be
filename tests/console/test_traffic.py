"""The traffic page: the library's metrics sampled in the background, as rates and SVG plots."""

import asyncio
import re
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.console.traffic import TrafficSampler, _nice
from fastapi_tenancy.metrics import TenantMetrics, TenantMetricsMiddleware, TrafficTotals

from ..apps import Base
from .conftest import mount


def test_rates_and_lines_come_from_the_differences_between_samples() -> None:
    sampler = TrafficSampler(TenantMetrics(registry=CollectorRegistry()), interval=10, history=3)
    for at, count, errors, refused, seconds in [
        (0, 10, 0, 0, 1.0),
        (10, 30, 2, 5, 2.0),
        (20, 40, 2, 5, 4.0),
    ]:
        sampler.samples.append((at, {"acme": TrafficTotals(count, errors, refused, seconds)}))
    sampler.samples.append((30, {"acme": TrafficTotals(40, 2, 5, 4.0), "globex": TrafficTotals(100)}))
    assert len(sampler.samples) == 3  # the oldest went
    rows = sampler.rows()
    assert [row.label for row in rows] == ["globex", "acme"]  # busiest first, over the history
    assert rows[1].rates == {"requests": 0.0, "errors": 0.0, "rate_limited": 0.0, "latency": 0.0}
    charts = sampler.charts(["acme"])
    assert [chart.unit for chart in charts] == ["req/s", "err/s", "429/s", "ms"]
    requests, _, _, latency = charts
    # Two intervals of 10 s: 10 requests (1/s, the top of the chart), then none. The plot is
    # 512 x 140 from x=48: the first point halfway, at the top; the last at the right, at 0.
    assert (requests.top, requests.span, requests.lines[0].last) == (1.0, 20, 0.0)
    assert requests.lines[0].points == "304.0,0.0 560.0,140.0"
    assert (requests.lines[0].peak, latency.top) == (1.0, 200.0)  # 2 s over 10 requests
    assert latency.lines[0].points == "304.0,0.0 304.0,0.0"  # no requests, no latency: one point, a dot
    assert [_nice(v) for v in (0, 0.3, 1, 1.5, 7, 12, 99)] == [1, 0.5, 1, 2, 10, 20, 100]


async def test_the_traffic_page_plots_requests_errors_and_429s_per_tenant(tmp_path: Path) -> None:
    config = TenancyConfig(
        database_url=f"sqlite:///{tmp_path / 'app.db'}", rate_limit_enabled=True, rate_limit_requests=3
    )
    manager = TenancyManager(config)
    await manager.initialize()
    metrics = TenantMetrics(registry=CollectorRegistry())
    try:
        await manager.register_tenant("acme", "Acme", app_metadata=Base.metadata)
        await manager.register_tenant("globex", "Globex")  # no tables: its /orders is a 500
        app, console = mount(manager, metrics=metrics, traffic_interval=0.05)
        app.add_middleware(TenantMetricsMiddleware, metrics=metrics)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            operator = {"X-Operator": "alice"}
            first = await client.get("/_tenancy/traffic", headers=operator)
            assert "metrics.count_refusals(manager.rate_limiter)" in first.text  # not wired yet
            assert "the plots appear when there are" in first.text
            metrics.count_refusals(manager.rate_limiter)
            statuses = [
                (await client.get("/orders", headers={"X-Tenant-ID": "acme"})).status_code for _ in range(5)
            ]
            statuses += [(await client.get("/orders", headers={"X-Tenant-ID": "globex"})).status_code]
            assert statuses == [200, 200, 200, 429, 429, 500]
            await asyncio.sleep(0.2)  # a few samples by the console's own task
            page = await client.get("/_tenancy/traffic", headers=operator)
            detail = await client.get("/_tenancy/tenants/acme", headers=operator)
        await console.close()
    finally:
        await manager.close()
    assert page.status_code == 200, page.text
    assert console.traffic is not None and len(console.traffic.samples) >= 3
    assert "count_refusals" not in page.text
    rows = re.findall(
        r"<tr>\s*<td>(?:<a [^>]+>)?([^<]+)(?:</a>)?</td>\s*<td>([\d,]+)</td>\s*<td>[\d.]+</td>\s*"
        r"<td>([\d,]+)</td>\s*<td>([\d,]+)</td>",
        page.text,
    )
    counted = {name: (requests, errors, refused) for name, requests, errors, refused in rows}
    assert counted["acme"] == ("3", "0", "2")
    assert counted["globex"] == ("1", "1", "0")
    # The 429s were refused before the tenant was in the scope, and the console's own pages
    # have none: both are counted as requests of no tenant.
    assert counted["(no tenant)"][1:] == ("0", "0") and int(counted["(no tenant)"][0]) >= 2
    assert page.text.count("<svg") == 4 and page.text.count("<polyline") >= 8
    assert (
        'role="img" aria-labelledby="chart-1"' in page.text
        and "Refused by the rate limiter (429)" in page.text
    )
    assert detail.text.count("<svg") == 4 and "Quota used now" in detail.text
