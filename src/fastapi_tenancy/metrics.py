"""Per-tenant request metrics in Prometheus format: count, errors and latency.

Needs `pip install 'fastapi-tenancy[prometheus]'`. Nothing here runs unless the
application adds `TenantMetricsMiddleware`: without it the request path does not
change at all. With several worker processes, prometheus-client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`) makes `/metrics` serve the sum of every worker's counts.
"""

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ConfigurationError, MissingDependencyError
from .tenant import Tenant

if TYPE_CHECKING:
    from .ratelimit.base import RateLimitDecision, RateLimiter

try:
    import prometheus_client
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client import multiprocess as prometheus_multiprocess
    from prometheus_client import values as prometheus_values
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("prometheus-client", "prometheus") from exc

__all__ = ["NO_TENANT", "OTHER_TENANTS", "TenantMetrics", "TenantMetricsMiddleware", "TrafficTotals"]

# Both start with "_", which no tenant identifier can: a tenant named "other" or
# "none" keeps a series of its own.
NO_TENANT = "_none"
"""The label of requests that ran as no tenant: excluded paths and refused requests."""

OTHER_TENANTS = "_other"
"""The label shared by tenants past the `max_tenants` cap."""


@dataclass(frozen=True, slots=True)
class TrafficTotals:
    """One label's counts since its processes started (`TenantMetrics.snapshot`)."""

    requests: float = 0.0
    errors: float = 0.0
    rate_limited: float = 0.0
    seconds: float = 0.0
    """The sum of the latencies of `requests`."""
    buckets: tuple[tuple[float, float], ...] = ()
    """The latency histogram: (upper bound in seconds, requests at most that slow), cumulative."""


class TenantMetrics:
    """Request counters and a latency histogram labelled by tenant. Shared by all requests.

    - `<namespace>_requests_total{tenant}`: finished requests;
    - `<namespace>_request_errors_total{tenant}`: those answered 5xx or raising;
    - `<namespace>_request_duration_seconds{tenant}`: latency histogram;
    - `<namespace>_rate_limited_total{tenant}`: requests the rate limiter refused (429),
      once `count_refusals(manager.rate_limiter)` is called.

    Cardinality is bounded: the first `max_tenants` tenants seen get a label of
    their own (their identifier), every later one is counted under `_other`, and
    requests without a tenant under `_none` (no identifier starts with "_"). Labels come only from resolved
    tenants, never from what a client sent, so unknown identifiers add no series.
    `registry` defaults to prometheus-client's global one.

    `multiprocess`: serve every worker process's counts, summed, from the files of
    prometheus-client's multiprocess mode, which is on when `PROMETHEUS_MULTIPROC_DIR` was
    set before prometheus-client was imported (in the server's environment). The default,
    None, follows that mode; True without it raises `ConfigurationError`, since each worker
    would then serve its own counts alone. The `max_tenants` cap is per process.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "tenancy",
        max_tenants: int = 100,
        buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS,
        multiprocess: bool | None = None,
    ) -> None:
        if max_tenants < 0:
            raise ValueError("max_tenants must be 0 or more")
        # prometheus-client chooses, once, at import, where values live: in the process, or
        # in a file per process under PROMETHEUS_MULTIPROC_DIR that any worker can read.
        files = bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))
        if multiprocess and not files:
            raise ConfigurationError(
                "TenantMetrics(multiprocess=True) needs prometheus-client's multiprocess mode: set "
                "PROMETHEUS_MULTIPROC_DIR to an empty directory in the server's environment, before "
                "prometheus_client is first imported"
            )
        self.multiprocess = files if multiprocess is None else multiprocess
        """Whether `/metrics` serves the sum of every worker process's counts."""
        self.namespace = namespace
        self.registry = REGISTRY if registry is None else registry
        self._served = self.registry
        if self.multiprocess:
            # A registry of its own, read from every process's files at each scrape: the
            # metrics' registry would give this process's values only.
            self._served = CollectorRegistry()
            try:
                prometheus_multiprocess.MultiProcessCollector(self._served)  # type: ignore[no-untyped-call]
            except ValueError as exc:
                raise ConfigurationError(f"prometheus multiprocess mode: {exc}") from exc
        self.max_tenants = max_tenants
        self._series: dict[str, tuple[Any, Any, str]] = {}  # at most max_tenants
        self._aggregate: dict[str, tuple[Any, Any, str]] = {}
        labels, registry = ["tenant"], self.registry
        self.requests = Counter(
            "requests", "Requests served, by tenant.", labels, namespace=namespace, registry=registry
        )
        self.errors = Counter(
            "request_errors",
            "Requests answered with a 5xx status or an exception, by tenant.",
            labels,
            namespace=namespace,
            registry=registry,
        )
        self.latency = Histogram(
            "request_duration_seconds",
            "Request latency in seconds, by tenant.",
            labels,
            namespace=namespace,
            registry=registry,
            buckets=tuple(buckets),
        )
        self.rate_limited = Counter(
            "rate_limited",
            "Requests the rate limiter refused (429), by tenant.",
            labels,
            namespace=namespace,
            registry=registry,
        )

    def label(self, tenant: Tenant | None) -> str:
        """The label `tenant` is counted under."""
        if tenant is None:
            return NO_TENANT
        if tenant.identifier in self._series or len(self._series) < self.max_tenants:
            return tenant.identifier
        return OTHER_TENANTS

    def observe(self, tenant: Tenant | None, *, error: bool, seconds: float) -> None:
        """Count one finished request."""
        key = NO_TENANT if tenant is None else tenant.identifier
        series = self._series.get(key) or self._aggregate.get(key)
        if series is None:
            series = self._new_series(tenant)
        requests, latency, label = series
        requests.inc()
        latency.observe(seconds)
        if error:  # rare: no series kept for it, so tenants without errors show none
            self.errors.labels(label).inc()

    def _new_series(self, tenant: Tenant | None) -> tuple[Any, Any, str]:
        label = self.label(tenant)
        # prometheus-client's labels() takes a lock and builds a key; keep the children
        # so the request path is two dictionary lookups and two increments.
        series = (self.requests.labels(label), self.latency.labels(label), label)
        if tenant is not None and label == tenant.identifier:
            self._series[label] = series
        else:  # "none" and "other": stored apart, so they never use up the cap
            self._aggregate[label] = series
        return series

    def count_refusals(self, limiter: "RateLimiter | None") -> None:
        """Count the requests `limiter` refuses in `<namespace>_rate_limited_total{tenant}`.

            metrics.count_refusals(manager.rate_limiter)  # None (no limiter): nothing to count

        The limiter refuses before the request has a tenant in its scope, so the
        middleware counts those answers under `_none`; this counts them per tenant.
        """
        if limiter is not None and self._refused not in limiter.on_refused:
            limiter.on_refused.append(self._refused)

    def _refused(self, tenant: Tenant, decision: "RateLimitDecision") -> None:
        self.rate_limited.labels(self.label(tenant)).inc()

    def snapshot(self) -> dict[str, TrafficTotals]:
        """Each label's counts so far, read from the registry (every worker's, in multiprocess mode).

        What the operator console samples to plot request rates, errors, 429s and
        latency; counts only grow, so rates are differences between two snapshots.
        """
        if self.multiprocess:
            families = self._served.collect()
        else:
            metrics = (self.requests, self.errors, self.rate_limited, self.latency)
            families = itertools.chain.from_iterable(metric.collect() for metric in metrics)
        prefix = f"{self.namespace}_" if self.namespace else ""
        fields = {
            f"{prefix}requests_total": "requests",
            f"{prefix}request_errors_total": "errors",
            f"{prefix}rate_limited_total": "rate_limited",
            f"{prefix}request_duration_seconds_sum": "seconds",
        }
        bucket = f"{prefix}request_duration_seconds_bucket"
        values: dict[str, dict[str, float]] = {}
        buckets: dict[str, dict[float, float]] = {}
        for family in families:
            for sample in family.samples:
                label = sample.labels.get("tenant")
                if label is None:
                    continue
                if sample.name == bucket:
                    le = float(sample.labels["le"])
                    per_label = buckets.setdefault(label, {})
                    per_label[le] = per_label.get(le, 0.0) + sample.value
                elif sample.name in fields:
                    per_field = values.setdefault(label, {})
                    name = fields[sample.name]
                    per_field[name] = per_field.get(name, 0.0) + sample.value
        return {
            label: TrafficTotals(
                **values.get(label, {}),
                buckets=tuple(sorted(buckets.get(label, {}).items())),
            )
            for label in values.keys() | buckets.keys()
        }

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what `/metrics` serves).

        In multiprocess mode: every metric of every worker process of the server (the
        application's own metrics too), counters and histograms summed.
        """
        return prometheus_client.generate_latest(self._served)

    async def endpoint(self, request: Request) -> Response:
        """A Starlette endpoint serving the registry: `app.add_route("/metrics", metrics.endpoint)`."""
        return Response(self.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


class TenantMetricsMiddleware:
    """Pure ASGI middleware feeding `TenantMetrics` with every HTTP request.

    Add it after `TenancyMiddleware` (outermost), so refused requests are counted
    too (as `_none`); it reads the tenant the inner middleware put in the scope.

        app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/metrics"])
        app.add_middleware(TenantMetricsMiddleware, metrics=metrics)
        app.add_route("/metrics", metrics.endpoint)
    """

    def __init__(self, app: ASGIApp, metrics: TenantMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error = True
        try:
            await self.app(scope, receive, send_status)
            error = status >= 500
        finally:
            tenant = scope.get("state", {}).get("tenant")
            self.metrics.observe(
                tenant if isinstance(tenant, Tenant) else None,
                error=error,
                seconds=time.perf_counter() - start,
            )
