"""Admin API for incident flags: safe mode, brownout, quarantine.

    GET  /api/flags                 effective flags, who set them, when they expire
    POST /api/flags/safe-mode       {"enabled": true, "reason": "...", "ttl": "30m"}   (token)
    POST /api/flags/brownout        {"level": 1, "reason": "...", "ttl": "10m"}        (token)
    POST /api/flags/quarantine      {"target": "shop-v2[/http://host:port]", ...}      (token)
    POST /api/flags/release         {"target": "..."}                                  (token)

Every change carries an actor (body `actor`, the `X-Shaper-Actor` header, or "admin-api"), a
reason and an optional `ttl` after which it reverts to the YAML value by itself. Bad input is a
400 naming the field; a change that makes no sense now (releasing what is not quarantined) is
a 409.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from .api_rollouts import actor_of, bad_request, json_error, read_json_body, reason_of
from .config import quarantine_problem
from .flags import FlagChange, Flags, parse_ttl
from .incidents import FlagKeeper
from .runtime import Runtime
from .state import StoreBusy

__all__ = ["add_flag_routes", "describe_flags", "flag_families"]


def describe_flags(runtime: Runtime) -> dict[str, Any]:
    body = runtime.flags.describe()
    level, cause = runtime.brownout()
    body["brownout"].update(
        {"effective_level": level, "cause": cause, "automatic_level": runtime.auto_brownout[0]}
    )
    return body


def flag_families(runtime: Runtime) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "shaper_safe_mode", "1 while safe mode sends all traffic to stable.",
        value=1.0 if runtime.flags.safe_mode else 0.0,
    )  # fmt: skip
    brownout = GaugeMetricFamily(
        "shaper_brownout_level",
        "Brownout level (0 off, 1 sheds sheddable, 2 also default), by who set it.",
        labels=["source"],
    )
    brownout.add_metric(["operator"], runtime.flags.brownout)
    brownout.add_metric(["automatic"], runtime.auto_brownout[0])
    brownout.add_metric(["effective"], runtime.brownout()[0])
    yield brownout
    quarantined = GaugeMetricFamily(
        "shaper_quarantined", "1 for each upstream or endpoint out of rotation.", labels=["target"]
    )
    for target in sorted(runtime.flags.quarantined):
        quarantined.add_metric([target], 1.0)
    yield quarantined


def _ttl(body: dict[str, Any]) -> float | None:
    try:
        return parse_ttl(body.get("ttl"))
    except ValueError as exc:
        raise bad_request(f"ttl {exc}") from None


def add_flag_routes(app: web.Application, runtime: Runtime, keeper: FlagKeeper) -> None:
    async def get_flags(_: web.Request) -> web.Response:
        return web.json_response(describe_flags(runtime))

    async def apply(
        request: web.Request,
        make: Callable[[dict[str, Any], str, str, float | None], Callable[..., Any]],
    ) -> web.Response:
        body = await read_json_body(request)
        actor = actor_of(request, body)
        reason = reason_of(body)
        ttl = _ttl(body)
        try:
            change = make(body, actor, reason, ttl)
            entry = keeper.change(change)
        except ValueError as exc:
            return json_error(409, "refused", str(exc))
        except StoreBusy as exc:  # before anything was read or written
            return json_error(503, "store_busy", f"nothing changed: {exc}; try again")
        except OSError as exc:
            # The flags are written before their audit entry: what is in force is for
            # GET /api/flags to say (flags on disk are applied within a second).
            return json_error(
                500, "not_persisted", f"the change did not complete: {exc}; see GET /api/flags"
            )
        return web.json_response({"change": entry, "flags": describe_flags(runtime)})

    def change_safe_mode(
        body: dict[str, Any], actor: str, reason: str, ttl: float | None
    ) -> Callable[[Flags], tuple[Flags, FlagChange]]:
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise bad_request('"enabled" must be true or false')
        return lambda flags: flags.set_safe_mode(enabled, actor, reason, keeper.wall(), ttl)

    def change_brownout(
        body: dict[str, Any], actor: str, reason: str, ttl: float | None
    ) -> Callable[[Flags], tuple[Flags, FlagChange]]:
        level = body.get("level")
        if type(level) is not int or level not in (0, 1, 2):  # not True, not 1.0
            raise bad_request('"level" must be 0, 1 or 2')
        if level and not reason:
            raise bad_request("a brownout needs a reason")
        return lambda flags: flags.set_brownout(level, actor, reason, keeper.wall(), ttl)

    def target_of(body: dict[str, Any], releasing: bool = False) -> str:
        target = body.get("target")
        if not isinstance(target, str) or not target:
            raise bad_request('"target" must be UPSTREAM or UPSTREAM/ENDPOINT')
        if releasing and runtime.flags.holds(target.rstrip("/")):
            return target.rstrip("/")  # known to the flags, whatever the config says now
        problem = quarantine_problem(target, dict(runtime.snapshot.config.upstreams))
        if problem:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "unknown_target", "detail": problem}),
                content_type="application/json",
            )
        return target.rstrip("/")

    def change_quarantine(
        body: dict[str, Any], actor: str, reason: str, ttl: float | None
    ) -> Callable[[Flags], tuple[Flags, FlagChange]]:
        target = target_of(body)
        return lambda flags: flags.set_quarantine(target, True, actor, reason, keeper.wall(), ttl)

    def change_release(
        body: dict[str, Any], actor: str, reason: str, ttl: float | None
    ) -> Callable[[Flags], tuple[Flags, FlagChange]]:
        target = target_of(body, releasing=True)
        return lambda flags: flags.set_quarantine(target, False, actor, reason, keeper.wall())

    async def safe_mode(request: web.Request) -> web.Response:
        return await apply(request, change_safe_mode)

    async def brownout(request: web.Request) -> web.Response:
        return await apply(request, change_brownout)

    async def quarantine(request: web.Request) -> web.Response:
        return await apply(request, change_quarantine)

    async def release(request: web.Request) -> web.Response:
        return await apply(request, change_release)

    app.router.add_get("/api/flags", get_flags)
    app.router.add_post("/api/flags/safe-mode", safe_mode)
    app.router.add_post("/api/flags/brownout", brownout)
    app.router.add_post("/api/flags/quarantine", quarantine)
    app.router.add_post("/api/flags/release", release)
