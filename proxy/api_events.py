"""Admin API for events and watchdogs, and the event-loop lag probe.

    GET  /api/dlq                          dead letters, oldest first, a page at a time
                                           (?sink=NAME&limit=1..1000&after=SEQ)
    POST /api/dlq/drain                    {"sink": "chat", "dry_run": false}   (token)
    GET  /api/observability/watchdogs      outbox and DLQ depth and age per sink, sink
                                           breakers, upstream latency (1 m / 5 m), event-loop
                                           lag, config age

`LagMonitor` sleeps a fixed interval over and over and records by how much each wake-up came
late: the time a request waits for the event loop before any of its own work starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from .api_rollouts import bad_request, json_error, read_json_body
from .breaker import STATE_CODE
from .events import EventBus
from .periodic import cancel_and_wait
from .runtime import Runtime

__all__ = ["LagMonitor", "add_event_routes", "watchdog_families", "watchdog_report"]


class LagMonitor:
    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.last = 0.0
        self.worst_recent = 0.0
        self._samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - before - self.interval)
            self._samples.append(self.last)
            del self._samples[:-240]  # about a minute
            self.worst_recent = max(self._samples)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def watchdog_report(runtime: Runtime, bus: EventBus, lag: LagMonitor) -> dict[str, Any]:
    now_wall = time.time()
    now = runtime.metrics.clock()
    sinks: dict[str, Any] = {}
    for name in sorted(set(bus.sinks) | set(bus.outbox.sinks_with_rows())):
        counts = bus.outbox.counts(name)
        sink = bus.sinks.get(name)
        sinks[name] = {
            "outbox_depth": counts.pending,
            "oldest_age_seconds": round(now_wall - counts.oldest_pending, 3)
            if counts.oldest_pending
            else 0.0,
            "dlq_depth": counts.dead,
            "breaker": sink.breaker.state if sink else "removed from config",
        }
    upstreams: dict[str, Any] = {}
    for name in sorted(runtime.snapshot.upstreams):
        window = runtime.metrics.upstream_windows.get(name)
        entry: dict[str, Any] = {}
        for label, seconds in (("1m", 60), ("5m", 300)):
            stats = window.stats(now, seconds) if window else None
            p50, p99 = stats.quantiles(0.5, 0.99) if stats else (None, None)
            entry[label] = {
                "calls": stats.requests if stats else 0,
                "p50_ms": _ms(p50),
                "p99_ms": _ms(p99),
            }
        upstreams[name] = entry
    return {
        "sinks": sinks,
        "upstream_latency": upstreams,
        "event_loop_lag_ms": {"last": _ms(lag.last), "worst_last_minute": _ms(lag.worst_recent)},
        "config_age_seconds": round(now_wall - runtime.snapshot.loaded_at, 3),
        "events": {"published": bus.published, "publish_failures": bus.publish_failures},
    }


def watchdog_families(runtime: Runtime, bus: EventBus, lag: LagMonitor) -> Iterator[Metric]:
    report = watchdog_report(runtime, bus, lag)
    depth = GaugeMetricFamily(
        "shaper_event_queue_depth", "Events waiting in the outbox, per sink.", labels=["sink"]
    )
    age = GaugeMetricFamily(
        "shaper_event_oldest_age_seconds",
        "Age of the oldest undelivered event in the outbox, per sink.",
        labels=["sink"],
    )
    dlq = GaugeMetricFamily(
        "shaper_dlq_depth", "Events in the dead-letter queue, per sink.", labels=["sink"]
    )
    breaker = GaugeMetricFamily(
        "shaper_sink_breaker_state",
        "Circuit breaker of each webhook sink: 0 closed, 1 open, 2 half-open.",
        labels=["sink"],
    )
    for name, sink in report["sinks"].items():
        depth.add_metric([name], sink["outbox_depth"])
        age.add_metric([name], sink["oldest_age_seconds"])
        dlq.add_metric([name], sink["dlq_depth"])
        if name in bus.sinks:
            breaker.add_metric([name], STATE_CODE[bus.sinks[name].breaker.state])
    yield depth
    yield age
    yield dlq
    yield breaker
    yield GaugeMetricFamily(
        "shaper_event_loop_lag_seconds",
        "How late the event loop woke the lag probe last time.",
        value=lag.last,
    )
    yield GaugeMetricFamily(
        "shaper_config_age_seconds",
        "Seconds since the running config was loaded.",
        value=report["config_age_seconds"],
    )
    yield GaugeMetricFamily(
        "shaper_event_publish_failures",
        "Events that could not be stored in the outbox (see the log).",
        value=bus.publish_failures,
    )


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A whole number from the query string, or 400 naming the parameter and its range."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # A length bound before int(): digits past SQLite's range, or past int()'s own limit on
    # digits (a ValueError), are no seq anyway.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18 and low <= int(raw) <= high):
        span = f"{low}-{high}" if high < 10**18 else f"of {low} or more"
        raise bad_request(f"{name} must be an integer {span}")
    return int(raw)


def add_event_routes(
    app: web.Application, runtime: Runtime, bus: EventBus, lag: LagMonitor
) -> None:
    async def dlq(request: web.Request) -> web.Response:
        """A page of dead letters: `limit` of them (1,000 by default and at most) after the
        seq `after`; `next_after` is the `after` of the next page, null on the last one, and
        `total` how many dead letters there are now (of the sink, or of all)."""
        sink = request.query.get("sink")
        limit = _query_int(request, "limit", 1000, 1, 1000)
        after = _query_int(request, "after", 0, 0, 10**18)
        outbox = bus.outbox
        letters = outbox.dead(sink, limit + 1, after=after)
        more = len(letters) > limit
        letters = letters[:limit]
        sinks = [sink] if sink is not None else outbox.sinks_with_rows()
        return web.json_response(
            {
                "dead_letters": [d.to_json() for d in letters],
                "next_after": letters[-1].seq if more else None,
                "total": sum(outbox.counts(name).dead for name in sinks),
            }
        )

    async def drain(request: web.Request) -> web.Response:
        body = await read_json_body(request)
        sink = body.get("sink")
        if sink is not None and not isinstance(sink, str):
            return json_error(400, "bad_request", '"sink" must be a sink name')
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):  # "no" and "false" read as true by bool()
            return json_error(400, "bad_request", '"dry_run" must be true or false')
        try:
            report = await bus.drain(sink, dry_run)
        except KeyError:
            known = ", ".join(sorted(bus.sinks)) or "none"
            return json_error(404, "unknown_sink", f"no sink named {sink!r} (known: {known})")
        return web.json_response(report.to_json())

    async def watchdogs(_: web.Request) -> web.Response:
        return web.json_response(watchdog_report(runtime, bus, lag))

    app.router.add_get("/api/dlq", dlq)
    app.router.add_post("/api/dlq/drain", drain)
    app.router.add_get("/api/observability/watchdogs", watchdogs)
