"""The tenant on log records and OpenTelemetry spans, and per-tenant Prometheus metrics."""

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_tenancy import (
    ConfigurationError,
    TenancyConfig,
    TenancyManager,
    TenancyMiddleware,
    Tenant,
    tenant_scope,
)
from fastapi_tenancy.logs import TenantLogFilter
from fastapi_tenancy.metrics import TenantMetrics, TenantMetricsMiddleware, TrafficTotals
from fastapi_tenancy.ratelimit import MemoryRateLimiter
from fastapi_tenancy.tracing import TenantSpanMiddleware


@pytest.fixture
async def manager(sqlite_url: str) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=sqlite_url))
    await manager.initialize()
    for identifier in ("alpha", "beta", "gamma"):
        await manager.register_tenant(identifier, identifier.title())
    try:
        yield manager
    finally:
        await manager.close()


# -- logs -------------------------------------------------------------------------------


def test_the_log_filter_puts_the_tenant_on_records(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.observability.logs")
    log_filter = TenantLogFilter()
    caplog.handler.addFilter(log_filter)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("outside")
            alpha = Tenant(identifier="alpha", name="Alpha")
            with tenant_scope(alpha):
                logger.info("inside")
                logger.info("explicit", extra={"tenant": "given"})
    finally:
        caplog.handler.removeFilter(log_filter)
    got = [
        (r.getMessage(), getattr(r, "tenant", None), getattr(r, "tenant_id", None)) for r in caplog.records
    ]
    assert got == [("outside", "-", "-"), ("inside", "alpha", alpha.id), ("explicit", "given", None)]
    formatted = logging.Formatter("%(tenant)s %(message)s").format(caplog.records[1])
    assert formatted == "alpha inside"


# -- OpenTelemetry ----------------------------------------------------------------------


class _SpanPerRequest:
    """Stands in for the ASGI instrumentation: one server span around each request."""

    def __init__(self, app: ASGIApp, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("tests")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.tracer.start_as_current_span(f"{scope['type']} {scope.get('path', '')}"):
            await self.app(scope, receive, send)


async def test_the_tenant_is_on_the_request_span(manager: TenancyManager) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(TenantSpanMiddleware)
    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health"])
    app.add_middleware(_SpanPerRequest, provider=provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for tenant in ("alpha", "beta"):
            assert (await client.get("/hello", headers={"X-Tenant-ID": tenant})).status_code == 200
        assert (await client.get("/hello", headers={"X-Tenant-ID": "nobody"})).status_code == 404
    spans = exporter.get_finished_spans()
    beta = await manager.get_tenant("beta")
    assert [dict(span.attributes or {}) for span in spans] == [
        {"tenant.identifier": "alpha", "tenant.id": (await manager.get_tenant("alpha")).id},
        {"tenant.identifier": "beta", "tenant.id": beta.id},
        {},  # refused: no tenant, no attribute
    ]
    provider.shutdown()


# -- Prometheus -------------------------------------------------------------------------


def _metrics_app(manager: TenancyManager, metrics: TenantMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    async def work(fail: bool = False) -> dict[str, str]:
        if fail:
            raise HTTPException(500, "boom")
        return {"ok": "yes"}

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("unhandled")

    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/metrics"])
    app.add_middleware(TenantMetricsMiddleware, metrics=metrics)
    app.add_route("/metrics", metrics.endpoint)
    return app


def _samples(text: str) -> dict[tuple[str, str], float]:
    """{(sample name, tenant label): value} of a scrape."""
    return {
        (sample.name, sample.labels.get("tenant", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "le" not in sample.labels
    }


async def test_a_scrape_after_mixed_traffic_counts_each_tenant(manager: TenancyManager) -> None:
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry=registry, max_tenants=2)
    app = _metrics_app(manager, metrics)
    traffic = [("alpha", "/work")] * 5 + [("beta", "/work")] * 3 + [("beta", "/work?fail=true")] * 2
    traffic += [("gamma", "/work")] * 4 + [("nobody", "/work")] * 2  # gamma is past the cap
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for tenant, path in traffic:
            await client.get(path, headers={"X-Tenant-ID": tenant})
        assert (await client.get("/crash", headers={"X-Tenant-ID": "alpha"})).status_code == 500
        scrape = await client.get("/metrics")
    assert scrape.status_code == 200, scrape.text
    samples = _samples(scrape.text)
    requests = {label: value for (name, label), value in samples.items() if name == "tenancy_requests_total"}
    errors = {
        label: value for (name, label), value in samples.items() if name == "tenancy_request_errors_total"
    }
    latency = {
        label: v for (name, label), v in samples.items() if name == "tenancy_request_duration_seconds_count"
    }
    assert requests == {"alpha": 6, "beta": 5, "_other": 4, "_none": 2}
    assert errors == {"alpha": 1, "beta": 2}
    assert latency == requests
    assert metrics.exposition().decode().count("tenancy_requests_total{") == 4


async def test_cardinality_stays_bounded_and_unknown_identifiers_add_no_series(
    manager: TenancyManager,
) -> None:
    metrics = TenantMetrics(registry=CollectorRegistry(), max_tenants=1)
    app = _metrics_app(manager, metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for index in range(50):
            await client.get("/work", headers={"X-Tenant-ID": f"attacker-{index}"})
        for tenant in ("alpha", "beta", "gamma", "alpha"):
            await client.get("/work", headers={"X-Tenant-ID": tenant})
        text = (await client.get("/metrics")).text
    requests = {
        label: value for (name, label), value in _samples(text).items() if name == "tenancy_requests_total"
    }
    assert requests == {"_none": 50, "alpha": 2, "_other": 2}


async def test_tenants_named_like_the_aggregate_labels_keep_their_own_series(manager: TenancyManager) -> None:
    metrics = TenantMetrics(registry=CollectorRegistry(), max_tenants=2)
    for identifier in ("other", "none"):
        await manager.register_tenant(identifier, identifier.title())
    app = _metrics_app(manager, metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for tenant in ("other", "none", "none", "alpha", "nobody"):
            await client.get("/work", headers={"X-Tenant-ID": tenant})
        text = (await client.get("/metrics")).text
    requests = {
        label: value for (name, label), value in _samples(text).items() if name == "tenancy_requests_total"
    }
    assert requests == {"other": 1, "none": 2, "_other": 1, "_none": 1}


def test_metric_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        TenantMetrics(registry=CollectorRegistry(), max_tenants=-1)


def test_multiprocess_mode_is_refused_where_prometheus_client_is_not_in_it() -> None:
    # This test process imported prometheus-client without PROMETHEUS_MULTIPROC_DIR:
    # values live in the process, and no other worker's could be read.
    with pytest.raises(ConfigurationError, match="set PROMETHEUS_MULTIPROC_DIR"):
        TenantMetrics(registry=CollectorRegistry(), multiprocess=True)
    assert TenantMetrics(registry=CollectorRegistry()).multiprocess is False


async def test_a_snapshot_holds_each_label_s_totals_and_refusals(tmp_path: Path) -> None:
    config = TenancyConfig(
        database_url=f"sqlite:///{tmp_path / 'app.db'}", rate_limit_enabled=True, rate_limit_requests=2
    )
    manager = TenancyManager(config)
    await manager.initialize()
    try:
        for identifier in ("alpha", "beta"):
            await manager.register_tenant(identifier, identifier.title())
        metrics = TenantMetrics(registry=CollectorRegistry(), namespace="shop", buckets=(0.5, 10.0))
        assert isinstance(manager.rate_limiter, MemoryRateLimiter)
        metrics.count_refusals(manager.rate_limiter)
        metrics.count_refusals(manager.rate_limiter)  # once is enough: not counted twice
        metrics.count_refusals(None)  # no limiter: nothing to count
        app = _metrics_app(manager, metrics)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [
                (await client.get("/work", headers={"X-Tenant-ID": "alpha"})).status_code for _ in range(5)
            ]
            await client.get("/work?fail=true", headers={"X-Tenant-ID": "beta"})
            scrape = (await client.get("/metrics")).text
    finally:
        await manager.close()
    assert statuses == [200, 200, 429, 429, 429]
    snapshot = metrics.snapshot()
    assert set(snapshot) == {"alpha", "beta", "_none"}
    alpha, beta = snapshot["alpha"], snapshot["beta"]
    # The limiter refuses before the tenant is in the scope: the middleware counts those
    # answers under _none, the refusal hook under the tenant.
    assert (alpha.requests, alpha.errors, alpha.rate_limited) == (2, 0, 3)
    assert snapshot["_none"].requests == 3 + 1  # and the scrape
    assert (beta.requests, beta.errors, beta.rate_limited) == (1, 1, 0)
    assert [bound for bound, _ in alpha.buckets] == [0.5, 10.0, float("inf")]
    assert alpha.buckets[-1][1] == 2 and 0 < alpha.seconds < 1
    assert 'shop_rate_limited_total{tenant="alpha"} 3.0' in scrape
    assert TrafficTotals().requests == 0


def test_a_snapshot_in_multiprocess_mode_sums_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    count = (
        "from prometheus_client import CollectorRegistry\n"
        "from fastapi_tenancy import Tenant, TenantStatus\n"
        "from fastapi_tenancy.metrics import TenantMetrics\n"
        "metrics = TenantMetrics(registry=CollectorRegistry())\n"
        "acme = Tenant(identifier='acme', name='Acme', status=TenantStatus.ACTIVE)\n"
        "for _ in range(COUNT):\n"
        "    metrics.observe(acme, error=False, seconds=0.01)\n"
        "metrics.observe(None, error=True, seconds=0.01)\n"
        "snapshot = metrics.snapshot()\n"
        "print(metrics.multiprocess, snapshot['acme'].requests, snapshot['_none'].errors)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", count.replace("COUNT", str(n))],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for n in (3, 4)
    ]
    # Each worker process reads every process's counts: the second sees the first's too.
    assert outputs == [["True", "3.0", "1.0"], ["True", "7.0", "2.0"]]
