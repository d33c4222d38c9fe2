"""Admin API for rollout safety: rollouts, operator actions, decisions, gates and breakers.

    GET  /api/rollouts                          every rollout: status, weight, step, verdict
    GET  /api/rollouts/{name}                   one rollout, with its gates and verdict inputs
    POST /api/rollouts/{name}/pause|resume|promote|rollback|retry   (token)
    POST /api/rollouts/{name}/weight            {"weight": 25}   (token)
    GET  /api/rollouts/{name}/decisions         its audit-log entries, newest last
    GET  /api/decisions/{id}                    one decision with its inputs
    GET  /api/observability/health-gates        each gate of each rollout: pass/fail and why
    GET  /api/upstreams                         endpoints with breaker state and health

Operator calls take an optional JSON body `{"reason": "...", "actor": "..."}`; the actor
defaults to the `X-Shaper-Actor` header, then to "admin-api". Refusals (pausing a paused
rollout) are 409 with the reason; unknown rollouts are 404.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, get_args

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from .breaker import STATE_CODE
from .rollout import OperatorAction
from .runtime import Runtime
from .state import AuditLog
from .supervisor import PersistError, Supervisor

__all__ = [
    "actor_of",
    "add_rollout_routes",
    "endpoint_families",
    "json_error",
    "read_json_body",
    "upstream_report",
]

_ACTIONS: dict[str, OperatorAction] = {a: a for a in get_args(OperatorAction) if a != "set_weight"}
_MAX_DECISIONS = 1000


def endpoint_families(runtime: Runtime) -> Iterator[Metric]:
    """Per endpoint, read from the live objects at scrape time: breaker state, health, and
    the requests in flight (counted by the pool as it hands the endpoint out)."""
    state = GaugeMetricFamily(
        "shaper_breaker_state",
        "Circuit breaker state per endpoint: 0 closed, 1 open, 2 half-open.",
        labels=["upstream", "endpoint"],
    )
    healthy = GaugeMetricFamily(
        "shaper_endpoint_healthy",
        "1 when the endpoint passes its active health checks (or has none).",
        labels=["upstream", "endpoint"],
    )
    active = GaugeMetricFamily(
        "shaper_upstream_requests_active",
        "Requests being proxied to an upstream endpoint now.",
        labels=["upstream", "endpoint"],
    )
    now = runtime.metrics.clock()
    in_flight: dict[tuple[str, str], int] = {}
    for name, pool in sorted(runtime.snapshot.upstreams.items()):
        pool.refresh(now)
        for endpoint in pool.endpoints:
            labels = [name, endpoint.url]
            state.add_metric(labels, STATE_CODE[endpoint.breaker.state])
            healthy.add_metric(labels, 1.0 if endpoint.health.healthy else 0.0)
            in_flight[name, endpoint.url] = endpoint.in_flight
    # A pool a reload replaced still carries the requests that began on it, to the same
    # endpoints: they count until they finish.
    for pool in runtime.draining_pools():
        for endpoint in pool.endpoints:
            key = (pool.name, endpoint.url)
            in_flight[key] = in_flight.get(key, 0) + endpoint.in_flight
    for (name, url), count in in_flight.items():
        active.add_metric([name, url], count)
    yield state
    yield healthy
    yield active


def upstream_report(runtime: Runtime) -> dict[str, Any]:
    """Every endpoint with its breaker state, open time left, health and load."""
    now = runtime.metrics.clock()
    body: dict[str, Any] = {}
    for name, pool in sorted(runtime.snapshot.upstreams.items()):
        pool.refresh(now)
        body[name] = [
            {
                "endpoint": e.url,
                "breaker": e.breaker.state,
                "open_for": round(max(0.0, e.breaker.open_until - now), 3)
                if e.breaker.state == "open"
                else 0.0,
                "healthy": e.health.healthy,
                "health_error": e.health.last_error,
                "quarantined": e.quarantined or pool.quarantined,
                "in_flight": e.in_flight,
            }
            for e in pool.endpoints
        ]
    return body


def json_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def bad_request(detail: str) -> web.HTTPBadRequest:
    """The 400 to raise for bad input, its detail naming what is wrong (json.dumps: the
    detail may quote the input, which may hold any character)."""
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_request", "detail": detail}),
        content_type="application/json",
    )


async def read_json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("body must be JSON") from None
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    """A free-text field of an operator's call (who, why): a string, or 400 naming the field;
    JSON's other types would be stored as Python's repr of them."""
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(f'"{key}" must be a string')
    return value[:limit]


def actor_of(request: web.Request, body: dict[str, Any]) -> str:
    actor = _text(body, "actor", 100) or request.headers.get("X-Shaper-Actor") or "admin-api"
    return actor[:100]


def reason_of(body: dict[str, Any]) -> str:
    return _text(body, "reason", 500)


def add_rollout_routes(
    app: web.Application, runtime: Runtime, supervisor: Supervisor, audit: AuditLog
) -> None:
    def known(name: str) -> None:
        if name not in supervisor.controllers:
            raise web.HTTPNotFound(
                text=json.dumps(
                    {
                        "error": "unknown_rollout",
                        "detail": f"no rollout named {name!r} "
                        f"(known: {', '.join(sorted(supervisor.controllers)) or 'none'})",
                    }
                ),
                content_type="application/json",
            )

    async def list_rollouts(_: web.Request) -> web.Response:
        return web.json_response(
            {"rollouts": [supervisor.describe(name) for name in sorted(supervisor.controllers)]}
        )

    async def get_rollout(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        known(name)
        return web.json_response(supervisor.describe(name))

    async def act(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        known(name)
        operator_action = _ACTIONS.get(action)
        if operator_action is None:
            return json_error(404, "unknown_action", f"actions: {', '.join(sorted(_ACTIONS))}")
        body = await read_json_body(request)
        try:
            entry = supervisor.act(name, operator_action, actor_of(request, body), reason_of(body))
        except ValueError as exc:
            return json_error(409, "refused", str(exc))
        except PersistError as exc:
            return json_error(500, "not_persisted", str(exc))
        return web.json_response({"decision": entry, "rollout": supervisor.describe(name)})

    async def set_weight(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        known(name)
        body = await read_json_body(request)
        weight = body.get("weight")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0.0 <= weight <= 100.0  # also false for NaN
        ):
            return json_error(400, "bad_request", 'body must carry "weight": a number 0-100')
        try:
            entry = supervisor.act(
                name,
                "set_weight",
                actor_of(request, body),
                reason_of(body),
                float(weight),
            )
        except ValueError as exc:
            return json_error(409, "refused", str(exc))
        except PersistError as exc:
            return json_error(500, "not_persisted", str(exc))
        return web.json_response({"decision": entry, "rollout": supervisor.describe(name)})

    async def decisions(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        known(name)
        # Off the event loop: the data plane runs on it, and an old decision may lie far
        # back in a long log.
        entries = await asyncio.to_thread(audit.tail, _MAX_DECISIONS, route=name)
        return web.json_response({"decisions": entries})

    async def decision(request: web.Request) -> web.Response:
        entry = await asyncio.to_thread(audit.find, request.match_info["id"])
        if entry is None:
            return json_error(404, "unknown_decision", "no decision with that id in the audit log")
        return web.json_response(entry)

    async def gates(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "rollouts": {
                    name: [
                        {"name": g.name, "passed": g.passed, "reason": g.reason}
                        for g in supervisor.gates(name, controller)
                    ]
                    for name, controller in sorted(supervisor.controllers.items())
                }
            }
        )

    async def upstreams(_: web.Request) -> web.Response:
        return web.json_response({"upstreams": upstream_report(runtime)})

    app.router.add_get("/api/rollouts", list_rollouts)
    app.router.add_get("/api/rollouts/{name}", get_rollout)
    app.router.add_post("/api/rollouts/{name}/weight", set_weight)
    app.router.add_post("/api/rollouts/{name}/{action}", act)
    app.router.add_get("/api/rollouts/{name}/decisions", decisions)
    app.router.add_get("/api/decisions/{id}", decision)
    app.router.add_get("/api/observability/health-gates", gates)
    app.router.add_get("/api/upstreams", upstreams)
