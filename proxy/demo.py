"""`shaper demo`: two demo upstreams, the proxy on rollouts.yaml, sticky traffic, a status line.

The demo upstreams listen where rollouts.yaml's endpoints point: the stable upstream of the
first rollout answers as `v1`, its canary as `v2` (the `X-Demo-Version` header and the JSON body
say which), with a few milliseconds of jitter. A traffic generator sends `--rate` requests a
second with user ids drawn from a fixed pool, so sticky routing is visible: the observed canary
share follows the route's weight. Once a second one line reports req/s, the canary share seen
by the clients, and error rate and p99 per version. Ctrl-C (or --duration) stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .config import Config
from .server import Shaper, StartupError
from .signals import SignalWindow

__all__ = ["demo_upstream_app", "run_demo"]

_USERS = 1000


def demo_upstream_app(version: str, error_rate: float = 0.0) -> web.Application:
    """A tiny service that says which version answered."""

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0.0005, 0.004))
        if error_rate and random.random() < error_rate:
            return web.json_response({"version": version, "error": "demo failure"}, status=500)
        body = {"version": version, "path": request.path, "user": request.headers.get("X-User-Id")}
        return web.Response(
            text=json.dumps(body) + "\n",
            content_type="application/json",
            headers={"X-Demo-Version": version},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _start_upstream(app: web.Application, url: str) -> web.AppRunner:
    parts = urlsplit(url)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, parts.hostname, parts.port or 80)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"demo upstream cannot listen on {url}: {exc.strerror}") from None
    return runner


class _Observed:
    """What the generated traffic saw in the current second."""

    def __init__(self) -> None:
        self.sent = 0
        self.variants: Counter[str] = Counter()
        self.windows = {"stable": SignalWindow(horizon=5), "canary": SignalWindow(horizon=5)}

    def line(self, now: float, elapsed: float) -> str:
        total = sum(self.variants.values())
        share = 100.0 * self.variants["canary"] / total if total else 0.0
        parts = [f"req/s {total / elapsed:6.1f}", f"canary share {share:5.1f}%"]
        for variant in ("stable", "canary"):
            # The last whole second and the current one: the line is printed early in a
            # second, whose own few requests would often leave no p99 to show.
            stats = self.windows[variant].stats(now, 2)
            p99 = stats.quantile(0.99)
            p99_text = f"{p99 * 1000:6.1f}ms" if p99 is not None else "     -  "
            parts.append(f"{variant} err {100 * stats.error_rate:5.2f}% p99 {p99_text}")
        self.variants.clear()
        return " | ".join(parts)


async def _traffic(base: str, rate: float, observed: _Observed) -> None:
    paths = ["/", "/products", "/cart", "/checkout"]
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            user = f"user-{random.randrange(_USERS)}"
            started = time.monotonic()
            try:
                async with session.get(
                    base + random.choice(paths), headers={"X-User-Id": user}
                ) as response:
                    await response.read()
                    variant = response.headers.get("X-Shaper-Variant", "stable")
                    failed = response.status >= 500
            except (aiohttp.ClientError, TimeoutError):
                variant, failed = "stable", True
            now = time.monotonic()
            observed.variants[variant] += 1
            window = observed.windows.get(variant, observed.windows["stable"])
            window.record(now, now - started, failed)

        interval = 1.0 / rate
        next_at = time.monotonic()
        while True:
            task = asyncio.get_running_loop().create_task(one(), name="demo-request")
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def run_demo(config: Config, config_path: Path, duration: float | None, rate: float) -> int:
    """Run the demo until Ctrl-C or `duration`; `config_path` is absolute (for reloads).
    Rollout state goes to a temporary directory, so every demo starts from the file's weights
    (an earlier demo's promotion or rollback does not carry over)."""
    with tempfile.TemporaryDirectory(prefix="shaper-demo-") as state_dir:
        demo_config = config.model_copy(update={"state_dir": state_dir})
        return await _run_demo(demo_config, config_path, duration, rate)


async def _run_demo(config: Config, config_path: Path, duration: float | None, rate: float) -> int:
    rollout_route = next((r for r in config.routes if r.rollout is not None), None)
    if rollout_route is None or rollout_route.rollout is None:
        print(f"{config_path}: the demo needs a route with a rollout", file=sys.stderr)
        return 1
    versions = {rollout_route.rollout.stable: "v1", rollout_route.rollout.canary: "v2"}
    runners: list[web.AppRunner] = []
    shaper: Shaper | None = None
    try:
        for name, version in versions.items():
            for url in config.upstreams[name].endpoints:
                runners.append(await _start_upstream(demo_upstream_app(version), url))  # noqa: PERF401 - awaits in order, stops at the first failure
        shaper = Shaper(config, config_path)
        await shaper.start()
    except StartupError as exc:
        print(f"shaper demo: {exc}", file=sys.stderr)
        for runner in runners:
            await runner.cleanup()
        return 1

    host, port = shaper.proxy_address
    admin_host, admin_port = shaper.admin_address
    print(
        f"proxy:     http://{host}:{port}/   (route {rollout_route.name!r}: "
        f"{rollout_route.rollout.weight:g}% to the canary, sticky by X-User-Id)"
    )
    print(
        f"admin:     http://{admin_host}:{admin_port}/metrics  "
        f"http://{admin_host}:{admin_port}/api/observability/golden-signals"
    )
    print(
        "try:       curl -si -H 'X-User-Id: alice' "
        f"http://{host}:{port}/ | grep -i -e variant -e version"
    )
    print("Ctrl-C stops the demo.", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    observed = _Observed()
    traffic = loop.create_task(_traffic(f"http://{host}:{port}", rate, observed), name="traffic")
    started = time.monotonic()
    last = started
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            now = time.monotonic()
            print(observed.line(now, now - last), flush=True)
            last = now
            if duration is not None and now - started >= duration:
                break
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        await shaper.stop()
        for runner in runners:
            await runner.cleanup()
    print("demo stopped", flush=True)
    return 0
