"""The `shaper` command: parses arguments, then hands off to the server, the checker or the demo.

    shaper serve -c FILE [--listen HOST:PORT] [--admin HOST:PORT]
    shaper check -c FILE
    shaper demo [-c FILE] [--duration SECONDS]
    shaper schema [-o FILE]

Usage errors print one line and exit 2; a config that fails to load prints every error and
exits 1; nothing prints a traceback for a mistake a user can make.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import ConfigError, export_schema, load

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"shaper: {message} (see shaper {self._sub_name()}--help)\n")

    def _sub_name(self) -> str:
        parts = self.prog.split()
        return " ".join(parts[1:]) + " " if len(parts) > 1 else ""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf"; neither is a count or a time
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


_MAX_INTERVAL = 86400.0  # time.sleep() overflows not far past 1e10 seconds


def _interval(text: str) -> float:
    value = _positive(text)
    if value > _MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_INTERVAL:g} seconds (a day)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shaper", description="traffic-shaper: canary rollouts at the proxy.")
    parser.add_argument("--version", action="version", version=f"shaper {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("-c", "--config", required=True, type=Path, help="rollouts.yaml")
    serve.add_argument("--listen", type=_host_port, help="HOST:PORT, overrides listen:")
    serve.add_argument("--admin", type=_host_port, help="HOST:PORT, overrides admin:")

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, type=Path)

    demo = commands.add_parser("demo", help="demo upstreams, the proxy and traffic, in one go")
    demo.add_argument("-c", "--config", type=Path, default=Path("rollouts.yaml"))
    demo.add_argument("--duration", type=_positive, help="stop after this many seconds")
    demo.add_argument("--rate", type=_positive, default=50.0, help="requests per second")

    schema = commands.add_parser("schema", help="print the JSON Schema of rollouts.yaml")
    schema.add_argument("-o", "--output", type=Path, help="write to this file instead")
    _add_ops_commands(commands)
    return parser


def _ops_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        default=os.environ.get("SHAPER_ADMIN", "http://127.0.0.1:9901"),
        help="admin API URL (env SHAPER_ADMIN)",
    )
    common.add_argument(
        "--token", default=os.environ.get("SHAPER_ADMIN_TOKEN"), help="env SHAPER_ADMIN_TOKEN"
    )
    common.add_argument(
        "--state-dir", type=Path, help="local mode: change this state directory, no server needed"
    )
    common.add_argument(
        "-c", "--config", type=Path, help="rollouts.yaml (local mode: defaults and validation)"
    )
    common.add_argument("--actor", default=None, help="who you are, for the audit log")
    common.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return common


def _add_ops_commands(commands: Any) -> None:
    common = _ops_options()
    status = commands.add_parser("status", parents=[common], help="rollouts, signals, flags")
    status.add_argument("route", nargs="?")
    status.add_argument("--watch", action="store_true", help="redraw in place")
    status.add_argument("--interval", type=_interval, default=2.0, help="seconds")
    for action in ("rollback", "promote", "pause", "resume", "retry"):
        sub = commands.add_parser(action, parents=[common], help=f"{action} a rollout")
        sub.add_argument("route")
        sub.add_argument("--reason", default="")
    weight = commands.add_parser("set-weight", parents=[common], help="set a canary weight")
    weight.add_argument("route")
    weight.add_argument("percent", type=_percent)
    weight.add_argument("--reason", default="")
    safe = commands.add_parser("safe-mode", parents=[common], help="all traffic to stable")
    safe.add_argument("state", choices=["enable", "disable"])
    safe.add_argument("--reason", default="")
    safe.add_argument("--ttl", help="revert by itself after this long (e.g. 30m)")
    brownout = commands.add_parser("brownout", parents=[common], help="shed low-priority traffic")
    brownout.add_argument("state", choices=["enable", "disable"])
    brownout.add_argument("reason", nargs="?", default="")
    brownout.add_argument("--level", type=int, choices=[1, 2], default=1)
    brownout.add_argument("--ttl")
    quarantine = commands.add_parser(
        "quarantine", parents=[common], help="take UPSTREAM[/ENDPOINT] out of rotation"
    )
    quarantine.add_argument("target")
    quarantine.add_argument("--reason", default="")
    quarantine.add_argument("--ttl")
    release = commands.add_parser("release", parents=[common], help="end a quarantine")
    release.add_argument("target")
    release.add_argument("--reason", default="")
    explain = commands.add_parser("explain", parents=[common], help="show one decision")
    explain.add_argument("decision_id")
    drain = commands.add_parser(
        "drain-dlq", parents=[common], help="re-deliver dead-letter events in order"
    )
    drain.add_argument("--sink", help="only this webhook")
    drain.add_argument("--dry-run", action="store_true", help="count, deliver nothing")


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError("must be between 0 and 100")
    return value


_OPS = frozenset(
    {"status", "rollback", "promote", "pause", "resume", "retry", "set-weight", "safe-mode"}
    | {"brownout", "quarantine", "release", "explain", "drain-dlq"}
)


def _ops(args: argparse.Namespace) -> int:
    from . import ops
    from .rollout import OperatorAction

    target = ops.Target(
        admin=args.admin,
        token=args.token,
        state_dir=args.state_dir,
        config=args.config,
        actor=args.actor or ops.default_actor(),
        output=args.output,
    )
    command = args.command
    if target.state_dir is None and (problem := ops.admin_url_problem(target.admin)):
        print(f"shaper: --admin (or SHAPER_ADMIN) {target.admin!r} {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        ttl = ops.parse_ttl(getattr(args, "ttl", None))
    except ops.OpsError as exc:
        print(f"shaper: {exc}", file=sys.stderr)
        return exc.code
    if command == "status":
        if args.watch:
            return _watch(target, args.route, args.interval)
        return ops.run_op(target, lambda: ops.gather_status(target, args.route), ops.format_status)
    actions: dict[str, OperatorAction] = {
        "rollback": "rollback",
        "promote": "promote",
        "pause": "pause",
        "resume": "resume",
        "retry": "retry",
        "set-weight": "set_weight",
    }
    if command in actions:
        action = actions[command]
        percent = getattr(args, "percent", None)
        return ops.run_op(
            target,
            lambda: ops.rollout_action(target, args.route, action, args.reason, percent),
            ops.format_change,
        )
    if command == "safe-mode":
        enabled = args.state == "enable"
        return ops.run_op(
            target,
            lambda: ops.flag_action(
                target, "safe-mode", enabled=enabled, reason=args.reason, ttl=ttl
            ),
            ops.format_change,
        )
    if command == "brownout":
        if args.state == "enable" and not args.reason:
            print("shaper: brownout enable needs a REASON", file=sys.stderr)
            return EXIT_USAGE
        level = args.level if args.state == "enable" else 0
        return ops.run_op(
            target,
            lambda: ops.flag_action(target, "brownout", level=level, reason=args.reason, ttl=ttl),
            ops.format_change,
        )
    if command in ("quarantine", "release"):
        return ops.run_op(
            target,
            lambda: ops.flag_action(
                target, command, target=args.target, reason=args.reason, ttl=ttl
            ),
            ops.format_change,
        )
    if command == "drain-dlq":
        return ops.run_op(
            target,
            lambda: ops.drain_dlq(target, args.sink, args.dry_run),
            ops.format_drain,
            failed=lambda report: bool(report.get("failed")),
        )
    return ops.run_op(target, lambda: ops.explain(target, args.decision_id), ops.format_explain)


def _watch(target: Any, route: str | None, interval: float) -> int:
    """Redraw the status in place until Ctrl-C; an unreachable server is shown, not fatal."""
    from . import ops

    try:
        while True:
            try:
                text = ops.format_status(ops.gather_status(target, route))
            except ops.OpsError as exc:
                text = f"shaper: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  every {interval:g}s, Ctrl-C stops\n\n")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _report_config_errors(path: Path, exc: ConfigError) -> int:
    """One line for a single problem (such as a missing file), else a header and one line
    per problem; the exit code."""
    if len(exc.errors) == 1:
        print(f"shaper: {path}: {exc.errors[0]}", file=sys.stderr)
        return EXIT_FAILED
    print(f"shaper: {path}: invalid, {len(exc.errors)} errors:", file=sys.stderr)
    for error in exc.errors:
        print(f"  {error}", file=sys.stderr)
    return EXIT_FAILED


def _check(path: Path) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        return _report_config_errors(path, exc)
    rollouts = sum(1 for r in config.routes if r.rollout is not None)
    print(
        f"{path}: ok: {len(config.routes)} route(s) ({rollouts} with a rollout), "
        f"{len(config.upstreams)} upstream(s), listen {config.listen.host}:{config.listen.port}, "
        f"admin {config.admin.host}:{config.admin.port}"
    )
    for route in config.routes:
        if route.rollout is not None:
            target = f"{route.rollout.stable} / {route.rollout.canary} at {route.rollout.weight:g}%"
        else:
            target = str(route.upstream)
        host = route.match.host or "*"
        print(f"  {route.name}: {host}{route.match.path_prefix} -> {target}")
    return EXIT_OK


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    result: object = uvloop.run(coro)
    assert isinstance(result, int)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command in _OPS:
        try:
            return _ops(args)
        except KeyboardInterrupt:
            return EXIT_OK
        except BrokenPipeError:
            # `shaper status | head`: the reader left. Point stdout at /dev/null so the
            # interpreter's final flush does not print a traceback either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "schema":
            text = export_schema()
            if args.output:
                args.output.write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
            return EXIT_OK
        if args.command == "serve":
            from .server import Overrides, serve

            # Validate here first so that a bad or missing file is reported like `check` does,
            # not as a multi-line log record; serve() loads it again (and on every reload).
            try:
                load(args.config)
            except ConfigError as exc:
                return _report_config_errors(args.config, exc)
            return _run(serve(args.config, Overrides(args.listen, args.admin)))
        if args.command == "demo":
            from .demo import run_demo

            try:
                config = load(args.config)
            except ConfigError as exc:
                return _report_config_errors(args.config, exc)
            logging.getLogger().setLevel(logging.WARNING)
            return _run(run_demo(config, args.config.absolute(), args.duration, args.rate))
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"shaper: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    print(f"shaper: unknown command {args.command!r}", file=sys.stderr)
    return EXIT_USAGE
