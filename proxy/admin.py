"""The admin HTTP API, on its own port: metrics, health, golden signals, reload.

    GET  /metrics                            Prometheus exposition
    GET  /healthz                            the process is alive
    GET  /readyz                             config loaded, every route has a reachable stable
    GET  /api/routes                         routes, their upstreams and weights
    GET  /api/observability/golden-signals   per route and variant, over 1 m and 5 m
    POST /admin/reload                       reload the config file (token)
    ... and the rollout API of api_rollouts.py

Every mutating call needs `Authorization: Bearer <token>`, compared in constant time; bodies
are capped at `admin.max_body_size`; no CORS headers are ever sent, so browsers on other
origins cannot read or drive the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .admin_parts import AdminParts
from .api_dashboard import History, SharedFrame, add_dashboard_routes
from .api_events import add_event_routes, watchdog_families
from .api_flags import add_flag_routes, flag_families
from .api_rollouts import add_rollout_routes, endpoint_families
from .metrics import ShaperCollector
from .routing import Variant
from .runtime import Runtime
from .signals import WindowStats

__all__ = ["RUNTIME", "build_admin_app", "golden_signals"]

RUNTIME = web.AppKey("runtime", Runtime)
_READY_CACHE_SECONDS = 1.0
_PROBE_TIMEOUT = 1.0
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _stats_json(stats: WindowStats) -> dict[str, Any]:
    p50, p95, p99 = (
        None if value is None else round(value * 1000.0, 3)
        for value in stats.quantiles(0.5, 0.95, 0.99)
    )
    return {
        "requests": stats.requests,
        "rps": round(stats.rate, 3),
        "errors": stats.errors,
        "error_rate": round(stats.error_rate, 6),
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
    }


def golden_signals(runtime: Runtime, now: float) -> dict[str, Any]:
    """Traffic, errors, latency and saturation per route and variant (pure over the runtime)."""
    snapshot = runtime.snapshot
    metrics = runtime.metrics
    routes: dict[str, Any] = {}
    for route in snapshot.table.routes:
        variants: dict[str, Any] = {}
        variant: Variant
        for variant in ("stable", "canary") if route.canary else ("stable",):
            window = metrics.windows.get((route.name, variant))
            one = window.stats(now, 60) if window else WindowStats(60.0, 0, 0, ())
            five = window.stats(now, 300) if window else WindowStats(300.0, 0, 0, ())
            variants[variant] = {
                "upstream": route.upstream_for(variant),
                "1m": _stats_json(one),
                "5m": _stats_json(five),
                "saturation": {"in_flight": metrics.in_flight_of(route.name, variant)},
            }
        routes[route.name] = {"weight": runtime.weight(route), "variants": variants}
    pools: dict[str, Any] = {}
    for name, pool in snapshot.upstreams.items():
        pools[name] = {
            "limit_per_endpoint": pool.settings.pool.max_connections,
            "endpoints": {e.url: {"in_use": e.in_flight} for e in pool.endpoints},
        }
    return {
        "routes": routes,
        "saturation": {
            "client_connections": metrics.client_connections,
            "requests_in_flight": sum(metrics.in_flight.values()),
            "upstream_pools": pools,
        },
    }


async def _reachable(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Readiness:
    """TCP probes of each route's stable endpoints, cached briefly so probes cannot be abused."""

    def __init__(self) -> None:
        self._at = 0.0
        self._body: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def check(self, runtime: Runtime) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._at < _READY_CACHE_SECONDS:
                return self._body
            snapshot = runtime.snapshot
            stable_names = sorted({route.stable for route in snapshot.table.routes})
            probes = {
                (name, e.url): _reachable(e.host, e.port)
                for name in stable_names
                for e in snapshot.upstreams[name].endpoints
            }
            results = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
            upstream_ok = {
                name: any(ok for (n, _), ok in results.items() if n == name)
                for name in stable_names
            }
            routes = {r.name: upstream_ok[r.stable] for r in snapshot.table.routes}
            self._body = {
                "ready": all(routes.values()),
                "config_hash": snapshot.config_hash,
                "routes": routes,
            }
            self._at = time.monotonic()
            return self._body


def build_admin_app(parts: AdminParts, history: History) -> web.Application:
    runtime, token, reload = parts.runtime, parts.token, parts.reload
    supervisor, audit, events, lag = parts.supervisor, parts.audit, parts.events, parts.lag
    config = runtime.snapshot.config
    body_limit = config.admin.max_body_size
    live: SharedFrame | None = None  # the dashboard's live frame, once its routes are added

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method in _MUTATING and token is not None:
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                return web.json_response(
                    {"error": "unauthorized", "detail": "a valid admin bearer token is required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="shaper"'},
                )
        if request.method in _MUTATING:
            # Read (and so cap) the body before any handler runs; aiohttp raises 413 past
            # client_max_size, chunked bodies included.
            declared = request.content_length
            if declared is not None and declared > body_limit:
                raise web.HTTPRequestEntityTooLarge(max_size=body_limit, actual_size=declared)
            await request.read()
        response = await handler(request)
        if request.method in _MUTATING and live is not None:
            live.invalidate()
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app = web.Application(middlewares=[guard], client_max_size=config.admin.max_body_size)
    app[RUNTIME] = runtime
    registry = CollectorRegistry(auto_describe=True)
    registry.register(
        ShaperCollector(
            runtime.metrics,
            (
                lambda: endpoint_families(runtime),
                supervisor.metric_families,
                lambda: flag_families(runtime),
                lambda: watchdog_families(runtime, events, lag),
            ),
        )
    )
    readiness = _Readiness()

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        body = await readiness.check(runtime)
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def routes(_: web.Request) -> web.Response:
        snapshot = runtime.snapshot
        return web.json_response(
            {
                "config_hash": snapshot.config_hash,
                "loaded_at": snapshot.loaded_at,
                "routes": [
                    {
                        "name": r.name,
                        "host": r.host,
                        "path_prefix": r.path_prefix,
                        "stable": r.stable,
                        "canary": r.canary,
                        "weight": runtime.weight(r),
                    }
                    for r in snapshot.table.routes
                ],
            }
        )

    async def signals(_: web.Request) -> web.Response:
        return web.json_response(golden_signals(runtime, runtime.metrics.clock()))

    async def do_reload(_: web.Request) -> web.Response:
        result = reload()
        if not result.ok:
            return web.json_response({"reloaded": False, "errors": list(result.errors)}, status=422)
        return web.json_response(
            {"reloaded": True, "changed": result.changed, "config_hash": result.config_hash}
        )

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/routes", routes)
    app.router.add_get("/api/observability/golden-signals", signals)
    app.router.add_post("/admin/reload", do_reload)
    add_rollout_routes(app, runtime, supervisor, audit)
    add_flag_routes(app, runtime, parts.flag_keeper)
    add_event_routes(app, runtime, events, lag)
    live = add_dashboard_routes(app, parts, history)
    return app
