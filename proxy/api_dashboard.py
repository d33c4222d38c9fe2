"""The ops dashboard's server side: static page, snapshot, 15-minute history, live stream.

    GET /, /dashboard                 the page (proxy/dashboard/index.html)
    GET /dashboard/assets/...         its script, styles and the vendored uPlot (MIT)
    GET /api/dashboard/snapshot       everything the page shows, in one JSON document
    GET /api/observability/history    per route and variant, one point per 5 s, 15 minutes
    GET /api/stream                   Server-Sent Events: a `snapshot` event every second

`History` samples the golden-signal windows every `interval` seconds into a ring of points
(traffic, error rate, p50/p99, in-flight per route and variant), so the charts have 15 minutes
even though the windows themselves keep five. The page is static: no build step, nothing
fetched from the internet. The Content-Security-Policy allows only this origin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .admin_parts import AdminParts
from .periodic import Periodic

__all__ = ["History", "SharedFrame", "add_dashboard_routes", "snapshot"]

ASSETS = Path(__file__).parent / "dashboard"
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


# What an idle variant (no request in the interval, none in flight) reads. Points share these
# dicts, never changed once made: with 1,000 idle routes, dicts of their own per point held
# 394 KB a point, 71 MB over the 15 minutes kept; sharing, 26 KB a point, under 5 MB.
_IDLE: dict[str, Any] = {
    "rps": 0.0,
    "error_rate": 0.0,
    "p50_ms": None,
    "p99_ms": None,
    "in_flight": 0,
}
_IDLE_ROUTE: dict[tuple[str, ...], dict[str, Any]] = {
    ("stable",): {"stable": _IDLE},
    ("stable", "canary"): {"stable": _IDLE, "canary": _IDLE},
}


class History:
    """A ring of golden-signal points, one per `interval` seconds."""

    def __init__(self, parts: AdminParts, interval: float = 5.0, keep: float = 900.0) -> None:
        self.parts = parts
        self.interval = interval
        self.points: deque[dict[str, Any]] = deque(maxlen=int(keep / interval))
        self._ticker = Periodic(
            "dashboard history sample", self.sample, logging.getLogger("shaper.dashboard")
        )

    def sample(self, wall: float | None = None) -> dict[str, Any]:
        runtime = self.parts.runtime
        metrics = runtime.metrics
        now = metrics.clock()
        seconds = max(1, int(self.interval))
        routes: dict[str, Any] = {}
        for route in runtime.snapshot.table.routes:
            variants: dict[str, Any] = {}
            names = ("stable", "canary") if route.canary else ("stable",)
            for variant in names:
                window = metrics.windows.get((route.name, variant))
                # The last whole seconds, not the current partial one.
                stats = window.between(int(now) - seconds, int(now) - 1) if window else None
                in_flight = metrics.in_flight_of(route.name, variant)
                if (stats is None or not stats.requests) and not in_flight:
                    variants[variant] = _IDLE
                    continue
                p50, p99 = stats.quantiles(0.5, 0.99) if stats else (None, None)
                variants[variant] = {
                    "rps": round(stats.rate, 3) if stats else 0.0,
                    "error_rate": round(stats.error_rate, 6) if stats else 0.0,
                    "p50_ms": _ms(p50),
                    "p99_ms": _ms(p99),
                    "in_flight": in_flight,
                }
            idle = all(v is _IDLE for v in variants.values())
            routes[route.name] = _IDLE_ROUTE[names] if idle else variants
        point = {"t": round(time.time() if wall is None else wall, 3), "routes": routes}
        self.points.append(point)
        return point

    def start(self) -> None:
        self.sample()
        self._ticker.start(self.interval)

    async def stop(self) -> None:
        await self._ticker.stop()


# Events the audit log already holds (decisions, flag changes) are not listed twice.
_AUDITED_PREFIXES = ("rollout.", "brownout.", "safe_mode", "quarantine", "release", "outbox.")


def _decisions_and_events(parts: AdminParts, limit: int = 25) -> list[dict[str, Any]]:
    """The audit log's newest entries merged with the other events (breakers, health,
    reloads), newest first, in the audit entries' shape."""
    items = list(parts.audit.recent(limit))
    for event in parts.events.outbox.recent(limit):
        if event["type"].startswith(_AUDITED_PREFIXES):
            continue
        details = event.get("details") or {}
        reason = details.get("reason") or details.get("error") or ""
        if "endpoint" in details:
            reason = f"{details['endpoint']} {reason}".strip()
        items.append(
            {
                "id": event["id"],
                "type": "event",
                "time": event["time"],
                "action": event["type"],
                "route": event.get("route") or event.get("upstream"),
                "reason": reason,
            }
        )
    items.sort(key=lambda item: item.get("time", 0.0), reverse=True)
    return items[:limit]


def snapshot(parts: AdminParts, history: History) -> dict[str, Any]:
    """Everything the dashboard shows, as of now."""
    from .admin import golden_signals
    from .api_events import watchdog_report
    from .api_flags import describe_flags
    from .api_rollouts import upstream_report

    runtime = parts.runtime
    supervisor = parts.supervisor
    return {
        "time": time.time(),
        "config_hash": runtime.snapshot.config_hash,
        "config_age_seconds": round(time.time() - runtime.snapshot.loaded_at, 3),
        "parser": runtime.metrics.parser,
        "rollouts": [supervisor.describe(name) for name in sorted(supervisor.controllers)],
        "signals": golden_signals(runtime, runtime.metrics.clock()),
        "upstreams": upstream_report(runtime),
        "flags": describe_flags(runtime),
        "watchdogs": watchdog_report(runtime, parts.events, parts.lag),
        "decisions": _decisions_and_events(parts),
        "history_point": history.points[-1] if history.points else None,
        "history_interval": history.interval,
    }


class SharedFrame:
    """The live stream's encoded snapshot, shared by every page watching it: made at most once
    per `max_age` seconds, however many pages are open. A snapshot reads every route's windows
    (with 1,000 busy routes, 35-80 ms of the event loop); each watcher making its own each
    second multiplied that stall by the number of people looking, in an incident the most."""

    def __init__(
        self, make: Callable[[], bytes], max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._make = make
        self._max_age = max_age
        self._clock = clock
        self._at = 0.0
        self._body: bytes | None = None

    def get(self) -> bytes:
        now = self._clock()
        if self._body is None or not 0.0 <= now - self._at < self._max_age:
            self._body, self._at = self._make(), now
        return self._body

    def invalidate(self) -> None:
        """After an operator's action: the next frame is made afresh, so no page is shown the
        state from before what it just did."""
        self._body = None


def add_dashboard_routes(app: web.Application, parts: AdminParts, history: History) -> SharedFrame:
    """The dashboard's routes on `app`; the live stream's shared frame is returned, for the
    admin API to invalidate on each change it makes."""

    def frame() -> bytes:
        body = json.dumps(snapshot(parts, history), separators=(",", ":"))
        return f"event: snapshot\ndata: {body}\n\n".encode()

    # Half the interval: a page sleeping one interval between frames never gets a frame older
    # than that, and the snapshot is made at most twice per interval.
    shared = SharedFrame(frame, parts.stream_interval / 2)

    def page(_: web.Request) -> web.FileResponse:
        response = web.FileResponse(ASSETS / "index.html")
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def index(request: web.Request) -> web.StreamResponse:
        return page(request)

    async def get_snapshot(_: web.Request) -> web.Response:
        return web.json_response(snapshot(parts, history))

    async def get_history(_: web.Request) -> web.Response:
        return web.json_response({"interval": history.interval, "points": list(history.points)})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        try:
            while True:
                await response.write(shared.get())
                await asyncio.sleep(parts.stream_interval)
        except ConnectionError:
            pass  # the page went away
        return response

    app.router.add_get("/", index)
    app.router.add_get("/dashboard", index)
    app.router.add_static("/dashboard/assets", ASSETS, follow_symlinks=False)
    app.router.add_get("/api/dashboard/snapshot", get_snapshot)
    app.router.add_get("/api/observability/history", get_history)
    app.router.add_get("/api/stream", stream)
    return shared
