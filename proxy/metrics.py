"""Golden-signal recording on the hot path, and its Prometheus export.

The forwarding path calls `Metrics.record_request()` once per request: plain dict and integer
updates, no locks (everything runs on the event loop thread), no prometheus-client objects. At
scrape time `ShaperCollector` turns those counters into metric families. The same calls feed
the per-(route, variant) `SignalWindow`s that the admin API, the dashboard and the canary
analysis read.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__, native
from .signals import SignalWindow

__all__ = ["DURATION_BUCKETS", "Histogram", "Metrics", "Series", "ShaperCollector"]

DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-export histogram over DURATION_BUCKETS (last slot is +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value

    def export(self) -> tuple[list[tuple[str, float]], float]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return buckets, self.total


@dataclass(slots=True)
class Series:
    """The signals of one (route, variant), held by a request from its start to its end, so
    recording it takes no look-ups by name. `durations` and `window` are the objects in
    `Metrics.durations` and `Metrics.windows`."""

    route: str
    variant: str
    durations: Histogram
    window: SignalWindow
    in_flight: int = 0
    # Requests by (method, status); methods outside _KNOWN_METHODS are counted as OTHER before
    # they get here, so this stays small. `Metrics.requests` is built from these at scrape
    # time: one short key hashed per request instead of the exported four-label one.
    counts: dict[tuple[str, int], int] = field(default_factory=dict)


class Metrics:
    """Every counter of the data plane. One instance per process, shared across reloads."""

    def __init__(self, clock: Callable[[], float], parser: str) -> None:
        self.clock = clock
        self.parser = parser
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.upstream_durations: dict[str, Histogram] = {}
        self.upstream_windows: dict[str, SignalWindow] = {}  # latency to the response head
        self.shed: dict[tuple[str, str], int] = {}
        self.windows: dict[tuple[str, str], SignalWindow] = {}
        self._series: dict[tuple[str, str], Series] = {}
        self.client_connections = 0
        self.rejected: dict[str, int] = {}
        self.diverted: dict[str, int] = {}  # canary requests sent to stable, by route
        self.breaker_transitions: dict[tuple[str, str, str], int] = {}
        self.rollbacks: dict[tuple[str, str], int] = {}
        self.health_changes: dict[tuple[str, str, str], int] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = 0.0
        self.last_reload_ok = True
        self.started_at = clock()

    @property
    def requests(self) -> dict[tuple[str, str, str, str], int]:
        """Requests by (route, variant, method, status), as exported."""
        return {
            (series.route, series.variant, method, str(status)): count
            for series in self._series.values()
            for (method, status), count in series.counts.items()
        }

    @property
    def in_flight(self) -> dict[tuple[str, str], int]:
        """Requests in flight by (route, variant)."""
        return {key: series.in_flight for key, series in self._series.items()}

    def in_flight_of(self, route: str, variant: str) -> int:
        """Requests in flight of one (route, variant): a look-up, where `in_flight` builds the
        dict of every series (per route, that made reading all routes quadratic)."""
        series = self._series.get((route, variant))
        return series.in_flight if series is not None else 0

    def series(self, route: str, variant: str) -> Series:
        key = (route, variant)
        series = self._series.get(key)
        if series is None:
            durations = self.durations.setdefault(key, Histogram())
            window = self.windows.setdefault(key, SignalWindow())
            series = self._series[key] = Series(route, variant, durations, window)
        return series

    def request_started(self, route: str, variant: str) -> Series:
        series = self._series.get((route, variant)) or self.series(route, variant)
        series.in_flight += 1
        return series

    def request_finished(
        self, series: Series, method: str, status: int, duration: float, failed: bool
    ) -> None:
        """A request that had been started; `failed` = 5xx or an upstream failure."""
        series.in_flight -= 1
        self._record(series, method, status, duration, failed)

    def record_request(
        self, route: str, variant: str, method: str, status: int, duration: float, failed: bool
    ) -> None:
        """A request answered without being started (refused, shed, unmatched)."""
        self._record(self.series(route, variant), method, status, duration, failed)

    def _record(
        self, series: Series, method: str, status: int, duration: float, failed: bool
    ) -> None:
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        counts = series.counts
        key = (method, status)
        counts[key] = counts.get(key, 0) + 1
        durations = series.durations  # Histogram.observe, inline: this runs for every request
        durations.counts[bisect_left(DURATION_BUCKETS, duration)] += 1
        durations.total += duration
        series.window.record(self.clock(), duration, failed)

    def record_upstream(self, upstream: str, duration: float) -> None:
        histogram = self.upstream_durations.get(upstream)
        if histogram is None:
            histogram = self.upstream_durations[upstream] = Histogram()
            self.upstream_windows[upstream] = SignalWindow()
        histogram.observe(duration)
        self.upstream_windows[upstream].record(self.clock(), duration, False)

    def record_shed(self, route: str, priority: str) -> None:
        key = (route, priority)
        self.shed[key] = self.shed.get(key, 0) + 1

    def record_diverted(self, route: str) -> None:
        """A canary request sent to the stable because no canary endpoint was in rotation."""
        self.diverted[route] = self.diverted.get(route, 0) + 1

    def record_breaker(self, upstream: str, endpoint: str, to: str) -> None:
        key = (upstream, endpoint, to)
        self.breaker_transitions[key] = self.breaker_transitions.get(key, 0) + 1

    def record_rollback(self, route: str, reason: str) -> None:
        key = (route, reason)
        self.rollbacks[key] = self.rollbacks.get(key, 0) + 1

    def record_health(self, upstream: str, endpoint: str, healthy: bool) -> None:
        key = (upstream, endpoint, "healthy" if healthy else "unhealthy")
        self.health_changes[key] = self.health_changes.get(key, 0) + 1

    def record_rejected(self, reason: str) -> None:
        """A request refused before routing (malformed, too large a head, too slow a head)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def reload_result(self, ok: bool, wall_time: float) -> None:
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = ok
        if ok:
            self.last_reload_success = wall_time


MetricSource = Callable[[], Iterator[Metric]]


def _counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], int]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, count in sorted(values):
        family.add_metric(list(key), count)
    return family


def _gauge(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], int]]
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values):
        family.add_metric(list(key), value)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], Histogram]]
) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in sorted(values, key=lambda item: item[0]):
        buckets, total = histogram.export()
        family.add_metric(list(key), buckets, total)
    return family


class ShaperCollector(Collector):
    """Exports `Metrics` in Prometheus form at scrape time, plus families from `sources`
    (breaker states, rollout states) that are read from live objects."""

    def __init__(self, metrics: Metrics, sources: tuple[MetricSource, ...] = ()) -> None:
        self.metrics = metrics
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from self._own()
        for source in self.sources:
            yield from source()

    def _own(self) -> Iterator[Metric]:
        m = self.metrics
        info = GaugeMetricFamily(
            "shaper_build_info",
            "Build and runtime of this traffic-shaper; always 1.",
            labels=["version", "python", "aiohttp", "parser", "data_path"],
        )
        data_path = "compiled" if native.active else "source"  # proxy/native.py
        info.add_metric(
            [__version__, platform.python_version(), aiohttp.__version__, m.parser, data_path], 1
        )
        yield info

        yield _counter(
            "shaper_requests",
            "Requests answered, by route, variant, method and status code.",
            ["route", "variant", "method", "code"],
            m.requests.items(),
        )
        yield _histogram(
            "shaper_request_duration_seconds",
            "Time from the request head to the last response byte, by route and variant.",
            ["route", "variant"],
            m.durations.items(),
        )
        yield _histogram(
            "shaper_upstream_duration_seconds",
            "Time from sending to an upstream until its response head arrived.",
            ["upstream"],
            (((name,), h) for name, h in m.upstream_durations.items()),
        )
        yield _gauge(
            "shaper_requests_in_flight",
            "Requests being proxied now, by route and variant.",
            ["route", "variant"],
            m.in_flight.items(),
        )
        yield GaugeMetricFamily(
            "shaper_client_connections_active",
            "Client connections open to the data plane.",
            value=m.client_connections,
        )
        yield _counter(
            "shaper_requests_rejected",
            "Requests refused before routing, by reason (malformed, head too large, too slow).",
            ["reason"],
            (((reason,), n) for reason, n in m.rejected.items()),
        )
        yield _counter(
            "shaper_config_reloads",
            "Configuration reload attempts, by result.",
            ["result"],
            (((result,), n) for result, n in m.reloads.items()),
        )
        yield _counter(
            "shaper_canary_diverted",
            "Canary requests sent to the stable because no canary endpoint was in rotation.",
            ["route"],
            (((route,), n) for route, n in m.diverted.items()),
        )
        yield _counter(
            "shaper_breaker_transitions",
            "Circuit breaker state changes, by upstream, endpoint and new state.",
            ["upstream", "endpoint", "to"],
            m.breaker_transitions.items(),
        )
        yield _counter(
            "shaper_health_changes",
            "Active health-check verdict changes, by upstream, endpoint and new verdict.",
            ["upstream", "endpoint", "to"],
            m.health_changes.items(),
        )
        yield _counter(
            "shaper_shed",
            "Requests shed by brownout (answered 503 without reaching an upstream).",
            ["route", "priority"],
            m.shed.items(),
        )
        yield _counter(
            "shaper_rollbacks",
            "Rollouts rolled back, by route and reason (analysis or operator).",
            ["route", "reason"],
            m.rollbacks.items(),
        )
        yield GaugeMetricFamily(
            "shaper_config_last_reload_successful",
            "1 when the latest configuration load succeeded, 0 when it was rejected.",
            value=1.0 if m.last_reload_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "shaper_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that succeeded.",
            value=m.last_reload_success,
        )
