"""The console's traffic plots: the library's own metrics, sampled over time, drawn as SVG.

`TenantMetrics` counts since each process started; rates are the differences between
two samples. Imported only when the console has metrics (prometheus-client, an extra of
its own). The sampler reads `TenantMetrics.snapshot()` every `interval` seconds in a
task of its own (never on a tenant's request) and keeps `history` samples; the charts
are lines computed here and drawn by the templates as inline SVG, so the console needs
no script to show them.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from ..metrics import NO_TENANT, OTHER_TENANTS, TenantMetrics, TrafficTotals

__all__ = ["Chart", "Line", "TrafficRow", "TrafficSampler"]

logger = logging.getLogger("fastapi_tenancy.console")

# (key, title, unit): what each chart plots, per interval between two samples.
MEASURES = (
    ("requests", "Requests per second", "req/s"),
    ("errors", "Errors (5xx) per second", "err/s"),
    ("rate_limited", "Refused by the rate limiter (429) per second", "429/s"),
    ("latency", "Mean latency", "ms"),
)

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM = 560, 160, 48, 20


def describe(label: str) -> str:
    """How the console names a metrics label."""
    return {NO_TENANT: "(no tenant)", OTHER_TENANTS: "(other tenants)"}.get(label, label)


@dataclass(frozen=True)
class Line:
    label: str
    points: str
    """The SVG polyline's points."""
    colour: int
    last: float
    peak: float


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    lines: list[Line]
    top: float
    """The value at the top of the chart."""
    span: float
    """Seconds from the first sample to the last."""


@dataclass(frozen=True)
class TrafficRow:
    """One label's totals and its rates over the last interval."""

    label: str
    name: str
    totals: TrafficTotals
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        """Requests of no tenant: refusals, and excluded paths such as the console itself."""
        return self.label == NO_TENANT


class TrafficSampler:
    """Samples `metrics` every `interval` seconds; keeps `history` samples. One per console."""

    geometry = {"width": WIDTH, "height": HEIGHT, "left": PAD_LEFT, "bottom": HEIGHT - PAD_BOTTOM}
    """The plots' size and axes, for the templates."""

    def __init__(self, metrics: TenantMetrics, *, interval: float = 10.0, history: int = 360) -> None:
        self.metrics = metrics
        self.interval = interval
        self.samples: deque[tuple[float, dict[str, TrafficTotals]]] = deque(maxlen=max(history, 2))
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Take a sample now (the task, and every page that shows traffic, so it is current)."""
        now = time.monotonic()
        sample = (now, self.metrics.snapshot())
        if len(self.samples) > 1 and now - self.samples[-1][0] < min(1.0, self.interval / 2):
            # Samples closer than that would make noisy rates: bring the last one up to date.
            self.samples[-1] = sample
        else:
            self.samples.append(sample)

    def start(self) -> None:
        """Start sampling in the background, once (the console calls it on its first request)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tenancy-console-traffic")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a scrape that fails now may work at the next tick
                logger.exception("could not sample the metrics")
            await asyncio.sleep(self.interval)

    # -- what the pages show ------------------------------------------------------------

    def rows(self) -> list[TrafficRow]:
        """Every label, busiest first (requests over the sampled history)."""
        if not self.samples:
            return []
        first, last = self.samples[0], self.samples[-1]
        previous = self.samples[-2] if len(self.samples) > 1 else None
        rows = []
        for label, totals in last[1].items():
            rates = {} if previous is None else _rates(previous, (last[0], totals), label)
            rows.append(TrafficRow(label, describe(label), totals, rates))
        start = first[1]

        def busy(row: TrafficRow) -> tuple[float, float]:
            before = start.get(row.label, TrafficTotals())
            return (-(row.totals.requests - before.requests), -row.totals.requests)

        return sorted(rows, key=busy)

    def charts(self, labels: list[str]) -> list[Chart]:
        """One chart per measure, a line per label in `labels`."""
        samples = list(self.samples)
        span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
        charts = []
        for key, title, unit in MEASURES:
            series = {label: _series(samples, label, key) for label in labels}
            top = _nice(max((v for values in series.values() for _, v in values), default=0.0))
            lines = [
                Line(
                    describe(label),
                    _points(values, samples[0][0], span, top),
                    index % 6,
                    values[-1][1],
                    max(value for _, value in values),
                )
                for index, (label, values) in enumerate(series.items())
                if values
            ]
            charts.append(Chart(title, unit, lines, top, span))
        return charts


def _rates(
    before: tuple[float, dict[str, TrafficTotals]], after: tuple[float, TrafficTotals], label: str
) -> dict[str, float]:
    then = before[1].get(label, TrafficTotals())
    now = after[1]
    seconds = max(after[0] - before[0], 1e-9)
    requests = max(now.requests - then.requests, 0.0)
    latency = (now.seconds - then.seconds) / requests * 1000 if requests else 0.0
    return {
        "requests": requests / seconds,
        "errors": max(now.errors - then.errors, 0.0) / seconds,
        "rate_limited": max(now.rate_limited - then.rate_limited, 0.0) / seconds,
        "latency": max(latency, 0.0),
    }


def _series(
    samples: list[tuple[float, dict[str, TrafficTotals]]], label: str, key: str
) -> list[tuple[float, float]]:
    """(time, value) of `key` for `label` over each interval between two samples.

    Latency has no value over an interval without requests: the line skips it rather
    than drop to zero.
    """
    values = []
    for before, after in zip(samples, samples[1:], strict=False):
        totals = after[1].get(label)
        if totals is None:
            continue
        rates = _rates(before, (after[0], totals), label)
        if key != "latency" or rates["requests"]:
            values.append((after[0], rates[key]))
    return values


def _points(values: list[tuple[float, float]], start: float, span: float, top: float) -> str:
    width, height = WIDTH - PAD_LEFT, HEIGHT - PAD_BOTTOM
    points = []
    for at, value in values:
        x = PAD_LEFT + (width * (at - start) / span if span else width)
        y = height - (height * value / top if top else 0.0)
        points.append(f"{x:.1f},{y:.1f}")
    if len(points) == 1:  # a zero-length line, drawn as a dot by its round caps
        points.append(points[0])
    return " ".join(points)


def _nice(value: float) -> float:
    """A round number at or above `value` for the top of a chart (1, 2 or 5 times a power of 10)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if step * power >= value)
