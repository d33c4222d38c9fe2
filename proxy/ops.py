"""The operator commands of `shaper`: remote (admin API) and local (the state directory).

Remote mode talks to `--admin URL` with the bearer token; local mode (`--state-dir DIR`)
changes the same state store and audit log the server reads, with no server needed: a running
server applies such a change within a second. Each command returns an exit code:

    0 done    1 refused or failed    2 usage error    3 server unreachable

and prints one clear line on failure (never a traceback), a table or `-o json` on success.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, FlagDefaults, load, quarantine_problem
from .flags import FlagChange, Flags
from .flags import parse_ttl as flags_ttl
from .incidents import FLAGS_KEY, apply_flag_change, flags_from
from .rollout import OperatorAction, RolloutController, RolloutState
from .state import AuditLog, DamagedState, FileStateStore, new_id
from .supervisor import UNAUDITED, plan_for

__all__ = ["OpsError", "Target", "run_op"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
_ROLLOUTS_KEY = "rollouts"


class OpsError(Exception):
    """A command that cannot be carried out; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Target:
    """Where commands go: a server's admin API, or a state directory."""

    admin: str
    token: str | None
    state_dir: Path | None
    config: Path | None
    actor: str
    output: str  # "table" or "json"


# -- remote ------------------------------------------------------------------------------------


def admin_url_problem(url: str) -> str | None:
    """Why `url` cannot be the admin API's address (None when it can): it must be http or
    https with a host, a valid port if any, and no query or fragment (paths are appended)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - read for its check: a port that is not a number raises
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "is not an http:// or https:// URL (such as http://127.0.0.1:9901)"
    if not parts.hostname:
        return "names no host (such as http://127.0.0.1:9901)"
    if parts.query or parts.fragment:
        return "must not carry a query or a fragment"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    return None


def _call(target: Target, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = target.admin.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    request.add_header("X-Shaper-Actor", target.actor)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if target.token:
        request.add_header("Authorization", f"Bearer {target.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        if exc.code == 401:
            raise OpsError(
                "unauthorized: the admin API wants a valid token (--token or SHAPER_ADMIN_TOKEN)"
            ) from None
        raise OpsError(detail or f"the admin API answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsError(
            f"cannot reach the admin API at {target.admin}: {reason}", EXIT_UNREACHABLE
        ) from None
    except json.JSONDecodeError:
        raise OpsError(f"{url} did not answer JSON; is that the admin port?") from None
    except ValueError:
        # urllib refuses a URL or header it cannot send. --admin is checked before any call,
        # so it is the token or the actor; the value is not echoed (it may be the token).
        raise OpsError(
            "cannot send the request: a control character in --token or --actor?", EXIT_USAGE
        ) from None


# -- local -------------------------------------------------------------------------------------


def _local_config(target: Target, needed_for: str | None) -> Config | None:
    if target.config is None:
        if needed_for:
            raise OpsError(f"local mode needs -c FILE (the rollouts.yaml) to {needed_for}")
        return None
    try:
        return load(target.config)
    except ConfigError as exc:
        raise OpsError(f"{target.config}: {exc.errors[0]}") from None


def _store(target: Target) -> tuple[FileStateStore, AuditLog]:
    assert target.state_dir is not None
    try:
        return FileStateStore(target.state_dir), AuditLog(target.state_dir)
    except OSError as exc:
        raise OpsError(f"cannot use state directory {target.state_dir}: {exc.strerror}") from None


def _damaged(exc: DamagedState) -> OpsError:
    """Local mode leaves a damaged document alone: a running server rewrites it from what it
    holds, and one starting fails safe (rollouts held at the stable, safe mode on)."""
    return OpsError(f"{exc}; left for the server, which sets it aside and rewrites it")


def _read(store: FileStateStore, key: str) -> dict[str, Any] | None:
    try:
        return store.get(key)
    except DamagedState as exc:
        raise _damaged(exc) from None


def _local_flags(target: Target, change: Callable[[Flags], tuple[Flags, FlagChange]]) -> Any:
    # The file's flag defaults decide what a change means (disabling a safe mode the YAML
    # turns on must be remembered), so local mode needs it.
    config = _local_config(target, "change flags")
    assert config is not None
    store, audit = _store(target)
    try:
        flags, entry, _ = apply_flag_change(store, audit, config.flags, change)
    except DamagedState as exc:
        raise _damaged(exc) from None
    except ValueError as exc:
        raise OpsError(str(exc)) from None
    return {"change": entry, "flags": flags.describe()}


def _local_rollout(
    target: Target, route: str, action: OperatorAction, reason: str, weight: float | None
) -> Any:
    config = _local_config(target, "act on a rollout")
    assert config is not None
    spec = next((r for r in config.routes if r.name == route and r.rollout), None)
    if spec is None or spec.rollout is None:
        names = ", ".join(r.name for r in config.routes if r.rollout) or "none"
        raise OpsError(f"no rollout named {route!r} (known: {names})")
    store, audit = _store(target)
    now = time.time()
    with store.locked():
        saved_all = _read(store, _ROLLOUTS_KEY) or {}
        raw = saved_all.get(route)
        saved = RolloutState.from_json(raw) if isinstance(raw, dict) else None
        controller = RolloutController(plan_for(config, route, spec.rollout), saved, now)
        try:
            decision = controller.operator(action, now, target.actor, reason, weight)
        except ValueError as exc:
            raise OpsError(str(exc)) from None
        entry = {**decision.to_json(), "mode": "local", "id": new_id("d", now)}
        # The state this change was based on: a running server that has changed the
        # rollout since, and not saved it yet, refuses the change rather than lose its own.
        based_on = saved.updated if saved is not None else 0.0
        saved_all[route] = {**controller.state.to_json(), "based_on": based_on}
        # As the server does: the state first, with the decision, then the audit line; if
        # this process stops in between, the server appends the line when it next writes.
        unaudited = saved_all.get(UNAUDITED)
        saved_all[UNAUDITED] = [*(unaudited if isinstance(unaudited, list) else []), entry]
        store.put(_ROLLOUTS_KEY, saved_all)
        entry = audit.append(entry)
    return {"decision": entry, "rollout": controller.state.to_json()}


# -- commands ----------------------------------------------------------------------------------


def rollout_action(
    target: Target, route: str, action: OperatorAction, reason: str, weight: float | None = None
) -> Any:
    if target.state_dir is not None:
        return _local_rollout(target, route, action, reason, weight)
    path = f"/api/rollouts/{urllib.parse.quote(route, safe='')}"
    if action == "set_weight":
        return _call(target, "POST", path + "/weight", {"weight": weight, "reason": reason})
    return _call(target, "POST", f"{path}/{action}", {"reason": reason})


def flag_action(where: Target, kind: str, **args: Any) -> Any:
    reason = str(args.get("reason") or "")
    ttl = args.get("ttl")
    actor = where.actor
    if where.state_dir is not None:
        now = time.time()
        if kind == "safe-mode":
            enabled = bool(args["enabled"])
            return _local_flags(where, lambda f: f.set_safe_mode(enabled, actor, reason, now, ttl))
        if kind == "brownout":
            level = int(args["level"])
            return _local_flags(where, lambda f: f.set_brownout(level, actor, reason, now, ttl))
        flag_target = str(args["target"]).rstrip("/")
        on = kind == "quarantine"
        upstreams = dict(config.upstreams) if (config := _local_config(where, None)) else None

        def change(flags: Flags) -> tuple[Flags, FlagChange]:
            # A release of what the flags hold needs no config entry: a reload may have
            # removed the upstream, and its quarantine must still be able to end.
            checked = upstreams is not None and (on or not flags.holds(flag_target))
            if checked and (problem := quarantine_problem(flag_target, upstreams or {})):
                raise ValueError(problem)
            return flags.set_quarantine(flag_target, on, actor, reason, now, ttl if on else None)

        return _local_flags(where, change)
    body: dict[str, Any] = {"reason": reason}
    if ttl:
        body["ttl"] = ttl
    if kind == "safe-mode":
        body["enabled"] = bool(args["enabled"])
    elif kind == "brownout":
        body["level"] = int(args["level"])
    else:
        body["target"] = args["target"]
    return _call(where, "POST", f"/api/flags/{kind}", body)


def gather_status(target: Target, route: str | None) -> dict[str, Any]:
    """Everything `shaper status` shows, from the server or from the state directory."""
    if target.state_dir is not None:
        store, _ = _store(target)
        config = _local_config(target, None)
        defaults = config.flags if config else FlagDefaults()
        rollouts = [
            {**state, "route": name}
            for name, state in sorted((_read(store, _ROLLOUTS_KEY) or {}).items())
            if isinstance(state, dict)
        ]
        status: dict[str, Any] = {
            "mode": "local",
            "rollouts": rollouts,
            "flags": flags_from(defaults, _read(store, FLAGS_KEY)).describe(),
        }
    else:
        status = {
            "mode": "remote",
            "rollouts": _call(target, "GET", "/api/rollouts")["rollouts"],
            "signals": _call(target, "GET", "/api/observability/golden-signals"),
            "upstreams": _call(target, "GET", "/api/upstreams")["upstreams"],
            "flags": _call(target, "GET", "/api/flags"),
        }
    if route is not None:
        status["rollouts"] = [r for r in status["rollouts"] if r.get("route") == route]
        if not status["rollouts"]:
            raise OpsError(f"no rollout named {route!r}")
    return status


def drain_dlq(target: Target, sink: str | None, dry_run: bool) -> Any:
    """Re-deliver dead letters in order (or count them with `dry_run`)."""
    if target.state_dir is None:
        body: dict[str, Any] = {"dry_run": dry_run}
        if sink:
            body["sink"] = sink
        return _call(target, "POST", "/api/dlq/drain", body)
    import asyncio
    import os
    import sqlite3

    from .events import EventBus
    from .outbox import DamagedOutbox, Outbox, OutboxError

    config = _local_config(target, "know the webhooks to drain to")
    assert config is not None
    secrets: dict[str, bytes] = {}
    for hook in config.events.webhooks:
        secret = os.environ.get(hook.secret_env, "")
        if not secret:
            raise OpsError(f"{hook.secret_env} is not set; cannot sign for webhook {hook.name!r}")
        secrets[hook.name] = secret.encode()

    async def run() -> Any:
        assert target.state_dir is not None
        try:
            outbox = Outbox(target.state_dir)
        except DamagedOutbox as exc:
            # Left alone, like a damaged state document: the server sets it aside at start.
            raise OpsError(f"{exc}; `shaper serve` sets it aside when it starts") from None
        except OutboxError as exc:
            raise OpsError(str(exc)) from None
        bus = EventBus(outbox, list(config.events.webhooks), secrets)
        try:
            return (await bus.drain(sink, dry_run)).to_json()
        except KeyError:
            raise OpsError(f"no webhook named {sink!r} in {target.config}") from None
        except sqlite3.Error as exc:  # damage past what the check at open reads
            raise OpsError(f"the event outbox {outbox.path}: {exc}") from None
        finally:
            await bus.close()

    return asyncio.run(run())


def format_drain(report: Any) -> str:
    if report.get("would_deliver") and not report.get("delivered"):
        return f"dry run: {report['would_deliver']} dead letter(s) would be re-delivered"
    return (
        f"delivered {report['delivered']}, failed {report['failed']}, "
        f"remaining {report['remaining']}"
    )


def explain(target: Target, decision_id: str) -> Any:
    if target.state_dir is not None:
        _, audit = _store(target)
        entry = audit.find(decision_id)
        if entry is None:
            raise OpsError(f"no decision {decision_id!r} in {audit.path}")
        return entry
    return _call(target, "GET", f"/api/decisions/{urllib.parse.quote(decision_id, safe='')}")


# -- printing ----------------------------------------------------------------------------------


def _until(expires: float | None) -> str:
    if not expires:
        return ""
    left = expires - time.time()
    if left <= 0:
        return " (expiring)"
    if left >= 3600:
        return f" (expires in {left / 3600:.1f}h)"
    return f" (expires in {left / 60:.0f}m)" if left >= 120 else f" (expires in {left:.0f}s)"


def _signals_line(variant: str, signals: dict[str, Any]) -> str:
    one = signals["1m"]
    latency = one["latency_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}ms"

    return (
        f"    {variant:<6} {signals['upstream']:<14} {one['rps']:8.1f} req/s  "
        f"err {100 * one['error_rate']:5.2f}%  p50 {ms(latency['p50'])}  p99 {ms(latency['p99'])}"
        f"  in-flight {signals['saturation']['in_flight']}"
    )


def format_status(status: dict[str, Any]) -> str:
    lines: list[str] = []
    flags = status["flags"]
    safe = flags["safe_mode"]
    brown = flags["brownout"]
    level = brown.get("effective_level", brown["level"])
    cause = brown.get("cause") or ""
    quarantined = ", ".join(
        q["target"] + _until((q.get("override") or {}).get("expires")) for q in flags["quarantine"]
    )
    lines.append(
        "flags: safe mode "
        + ("ON" + _until((safe.get("override") or {}).get("expires")) if safe["enabled"] else "off")
        + f" | brownout {level}"
        + (f" ({cause})" if level and cause else "")
        + _until((brown.get("override") or {}).get("expires"))
        + f" | quarantined: {quarantined or 'none'}"
    )
    header = f"{'ROUTE':<14} {'STATUS':<12} {'WEIGHT':>7} {'STEP':>5}  {'VERDICT':<13} WHY"
    lines += ["", header]
    signals = status.get("signals", {}).get("routes", {})
    for rollout in status["rollouts"]:
        steps = rollout.get("steps") or []
        step = f"{rollout.get('step', 0) + 1}/{len(steps)}" if steps else "-"
        verdict = rollout.get("verdict", "")
        why = rollout.get("verdict_reason") or rollout.get("reason", "")
        if rollout.get("status") in ("rolled_back", "paused", "promoted"):
            why = rollout.get("reason", why)
        lines.append(
            f"{rollout['route']:<14} {rollout['status']:<12} {rollout['weight']:>6g}% {step:>5}  "
            f"{verdict:<13} {why}"
        )
        for variant, data in signals.get(rollout["route"], {}).get("variants", {}).items():
            lines.append(_signals_line(variant, data))
        failing = [g for g in rollout.get("gates", []) if not g["passed"]]
        for gate in failing:
            lines.append(f"    gate {gate['name']}: {gate['reason']}")
    upstreams = status.get("upstreams")
    if upstreams:
        lines += ["", "BREAKERS"]
        for name, endpoints in upstreams.items():
            for e in endpoints:
                state = e["breaker"] + (f" for {e['open_for']:.0f}s" if e["open_for"] else "")
                health = "" if e["healthy"] else f", unhealthy ({e['health_error']})"
                lines.append(f"  {name:<14} {e['endpoint']:<28} {state}{health}")
    if status["mode"] == "local":
        lines += ["", "(local mode: state only; live signals need a running server)"]
    return "\n".join(lines)


def format_change(result: Any) -> str:
    if isinstance(result, dict) and "decision" in result:
        d = result["decision"]
        return (
            f"{d['route']}: {d['action']} ({d['status_before']} -> {d['status_after']}, "
            f"weight {d['weight_before']:g}% -> {d['weight_after']:g}%) decision {d['id']}"
        )
    if isinstance(result, dict) and "change" in result:
        c = result["change"]
        what = c["flag"] + (f" {c['target']}" if c["target"] else "")

        def shown(value: Any) -> str:
            return {True: "on", False: "off"}.get(value, str(value))

        return (
            f"{what}: {shown(c['before'])} -> {shown(c['after'])}{_until(c.get('expires'))} "
            f"({c['id']})"
        )
    return json.dumps(result, indent=2)


def format_explain(entry: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("time", 0)))
    lines = [f"{entry.get('id')}  {when}"]
    for key in (
        "route",
        "action",
        "flag",
        "target",
        "actor",
        "reason",
        "status_before",
        "status_after",
        "weight_before",
        "weight_after",
        "config_hash",
    ):
        if entry.get(key) not in (None, ""):
            lines.append(f"  {key:<14} {entry[key]}")  # noqa: PERF401 - reads clearer as a loop
    inputs = entry.get("inputs") or {}
    if inputs:
        lines.append("  inputs:")
        for key, value in inputs.items():
            lines.append(f"    {key:<28} {json.dumps(value)}")
    return "\n".join(lines)


def emit(target: Target, result: Any, human: Callable[[Any], str]) -> None:
    if target.output == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(human(result))


def run_op(
    target: Target,
    op: Callable[[], Any],
    human: Callable[[Any], str],
    failed: Callable[[Any], bool] = lambda _: False,
) -> int:
    """Run one command: its output, or one line on stderr; the exit code. `failed` says
    whether a result that did arrive is still a failure (a drain that could not finish)."""
    try:
        result = op()
    except OpsError as exc:
        print(f"shaper: {exc}", file=sys.stderr)
        return exc.code
    emit(target, result, human)
    return EXIT_FAILED if failed(result) else EXIT_OK


def parse_ttl(text: str | None) -> float | None:
    try:
        return flags_ttl(text)
    except ValueError as exc:
        raise OpsError(f"--ttl {exc}", EXIT_USAGE) from None
