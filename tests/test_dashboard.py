"""The ops dashboard in a real browser: Debian's Chromium, headless, driven by Playwright,
against a real proxy with real upstreams and a steady stream of real requests.

The page must show what the JSON API reports, extend its charts as history points arrive,
carry an operator's rollback to the proxy, and say so when the proxy goes away. A screenshot
under traffic is saved to test-artifacts/dashboard.png (and to docs/dashboard.png for the
README when that is missing or SHAPER_UPDATE_SCREENSHOT=1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, Playwright, async_playwright

from proxy.server import Shaper

from .conftest import StartShaper, StartUpstream, make_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "dashb0ard-t0ken"
FAST = {"history_interval": 0.5, "stream_interval": 0.3, "tick_interval": 0.2}
METRICS = ("traffic", "errors", "latency", "saturation")  # the charts of each route

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="/usr/bin/chromium is missing (apt-get install chromium, or `make system-tools`); "
    "in CI (CI set) these tests run and fail instead",
)


def _upstream(name: str, slowest: float) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        if request.path != "/healthz":
            await asyncio.sleep(random.uniform(0.001, slowest))
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


class Traffic:
    """Requests through the proxy, one after another, until paused or stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.go = asyncio.Event()
        self.go.set()
        self.idle = asyncio.Event()
        self.sent = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as client:
            while True:
                if not self.go.is_set():
                    self.idle.set()
                    await self.go.wait()
                    self.idle.clear()
                self.sent += 1
                user = f"user-{self.sent % 400}"
                try:
                    async with client.get(
                        f"{self.url}/item/{self.sent}", headers={"X-User-Id": user}
                    ) as response:
                        await response.read()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.005)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="traffic")

    async def pause(self) -> None:
        """Stop sending; returns once the request in flight has its answer."""
        self.go.clear()
        await asyncio.wait_for(self.idle.wait(), 5)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Dashboard:
    shaper: Shaper
    raw: dict[str, Any]
    admin: str
    page: Page
    traffic: Traffic
    page_errors: list[str]

    async def api(self, path: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as client:
            async with client.get(self.admin + path) as response:
                assert response.status == 200, await response.text()
                body: dict[str, Any] = await response.json()
                return body

    async def text(self, testid: str) -> str:
        """The element's visible text, whitespace collapsed."""
        return " ".join((await self.page.get_by_test_id(testid).inner_text()).split())


async def _eventually(
    check: Callable[[], Awaitable[Any]],
    timeout: float,
    what: str,
    detail: Callable[[], Any] | None = None,
) -> Any:
    """Retry `check` until it returns something truthy; fail naming `what` and the last value
    (or what `detail` says)."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.15)
    pytest.fail(f"{what} (last: {detail() if detail else last!r})")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; never a downloaded browser."""
    playwright: Playwright = await async_playwright().start()
    try:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()
    finally:
        await playwright.stop()


@pytest.fixture
async def dashboard(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    browser: Browser,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Dashboard]:
    """A proxy with a stepped rollout under traffic, and its dashboard open in the browser."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_upstream("v1", 0.004))
    canary = await start_upstream(_upstream("v2", 0.008))
    raw = make_config(
        {"v1": [stable], "v2": [canary]},
        [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "steps": [{"weight": 20, "hold": "10m"}, {"weight": 50, "hold": "10m"}],
                    "sticky": {"header": "X-User-Id"},
                    "slo": {"error_rate": "1%", "min_requests": 20},
                },
            },
            {"name": "static", "match": {"path_prefix": "/static"}, "upstream": "v1"},
        ],
    )
    shaper = await start_shaper(raw, **FAST)
    traffic = Traffic("http://{}:{}".format(*shaper.proxy_address))
    traffic.start()
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text or "Refused to" in msg.text
            else None
        ),
    )
    admin = "http://{}:{}".format(*shaper.admin_address)
    try:
        await page.goto(admin + "/dashboard")
        # A function, not an expression: the page's CSP forbids eval, which Playwright
        # would use to poll a bare expression.
        await page.wait_for_function(
            "() => window.__dashboard && window.__dashboard.feed === 'live' "
            "&& window.__dashboard.renders > 0",
            timeout=10_000,
        )
        yield Dashboard(shaper, raw, admin, page, traffic, errors)
    finally:
        await traffic.stop()
        await page.close()
    assert errors == [], errors


def _number(text: str) -> float:
    match = re.search(r"-?\d+(?:\.\d+)?", text)
    assert match, f"no number in {text!r}"
    return float(match.group())


def _slug(text: str) -> str:
    """As the page makes test ids from route, upstream and endpoint names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


async def _canary_has_traffic(dashboard: Dashboard) -> bool:
    snap = await dashboard.api("/api/dashboard/snapshot")
    return bool(snap["signals"]["routes"]["shop"]["variants"]["canary"]["1m"]["requests"] >= 5)


async def test_page_shows_what_the_api_reports(dashboard: Dashboard) -> None:
    """Status, weight, step, verdict, gates, traffic, errors and latency match the JSON API."""
    await _eventually(lambda: _canary_has_traffic(dashboard), 10, "the canary got no traffic")
    await dashboard.traffic.pause()

    async def compare() -> dict[str, Any] | None:
        snap = await dashboard.api("/api/dashboard/snapshot")
        rollout = snap["rollouts"][0]
        variants = snap["signals"]["routes"]["shop"]["variants"]
        seen = {
            "status": await dashboard.text("status-shop"),
            "weight": await dashboard.text("weight-shop"),
            "step": await dashboard.text("step-shop"),
            "verdict": await dashboard.text("verdict-shop"),
            "verdict reason": await dashboard.text("verdict-reason-shop"),
        }
        expected = {
            "status": rollout["status"].replace("_", " "),
            "weight": f"{rollout['weight']:g}%",
            "step": f"step {rollout['step'] + 1}/{len(rollout['steps'])}",
            "verdict": rollout["verdict"],
            "verdict reason": rollout["verdict_reason"],
        }
        for gate in rollout["gates"]:
            seen[gate["name"]] = await dashboard.text(f"gate-shop-{gate['name']}")
            expected[gate["name"]] = (
                f"{'pass' if gate['passed'] else 'fail'} {gate['name']} {gate['reason']}"
            )
        for variant in ("stable", "canary"):
            one = variants[variant]["1m"]
            seen[f"{variant} requests"] = (await dashboard.text(f"rps-sub-shop-{variant}")).split(
                " requests"
            )[0]
            expected[f"{variant} requests"] = str(one["requests"])
            rps = _number(await dashboard.text(f"rps-shop-{variant}"))
            seen[f"{variant} rps ok"] = abs(rps - one["rps"]) <= 0.051
            expected[f"{variant} rps ok"] = True
            seen[f"{variant} errors"] = await dashboard.text(f"errors-shop-{variant}")
            expected[f"{variant} errors"] = f"{one['error_rate'] * 100:.2f}%"
            p50, p99 = (
                _number(part)
                for part in (await dashboard.text(f"latency-shop-{variant}")).split("/")
            )
            latency = one["latency_ms"]
            seen[f"{variant} latency ok"] = (
                abs(p50 - latency["p50"]) <= 0.51 and abs(p99 - latency["p99"]) <= 0.51
            )
            expected[f"{variant} latency ok"] = True
        mismatch.clear()
        mismatch.update({k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v})
        return None if mismatch else snap

    mismatch: dict[str, Any] = {}
    snap = await _eventually(
        compare, 10, "the page never showed the API's numbers", lambda: f"page, API: {mismatch}"
    )
    rollout = snap["rollouts"][0]
    assert rollout["status"] == "progressing" and rollout["weight"] == 20
    assert int(snap["signals"]["routes"]["shop"]["variants"]["stable"]["1m"]["requests"]) > 0
    hold = await dashboard.text("hold-shop")
    assert "left of the 10m 00s hold at 20%" in hold, hold
    assert {g["name"] for g in rollout["gates"]} >= {"canary_healthy", "min_requests"}
    # A plain route, breakers, flags and decisions are there too.
    assert "no rollout" in await dashboard.text("status-static")
    for upstream, endpoints in snap["upstreams"].items():
        for endpoint in endpoints:
            row = await dashboard.text(f"endpoint-{upstream}_{_slug(endpoint['endpoint'])}")
            assert endpoint["breaker"] in row, row
            assert ("unhealthy" not in row) == endpoint["healthy"], row
    assert "off" in await dashboard.text("safe-mode")
    assert "level 0" in await dashboard.text("brownout")
    assert "rollout started" in await dashboard.text("decisions")


async def _chart(page: Page, metric: str) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        """metric => {
            const chart = window.__dashboard.charts.shop[metric];
            const xs = chart.data[0];
            return {
                length: xs.length,
                last: xs.length ? xs[xs.length - 1] : null,
                series: chart.data.length - 1,
                max: Math.max(0, ...chart.data.slice(1).flat().filter(v => v !== null)),
                canvas: !!chart.root.querySelector('canvas'),
            };
        }""",
        metric,
    )
    return result


async def test_charts_grow_as_history_points_arrive(dashboard: Dashboard) -> None:
    """Each chart gets the new history points from the stream; screenshot under traffic."""
    history = await dashboard.api("/api/observability/history")
    assert history["interval"] == FAST["history_interval"]
    before = {metric: await _chart(dashboard.page, metric) for metric in METRICS}
    for metric, chart in before.items():
        assert chart["canvas"], metric
        assert chart["series"] == (4 if metric == "latency" else 2), (metric, chart)

    async def grown() -> dict[str, Any] | None:
        now = {metric: await _chart(dashboard.page, metric) for metric in METRICS}
        ok = all(
            now[m]["length"] >= before[m]["length"] + 3 and now[m]["last"] > before[m]["last"]
            for m in METRICS
        )
        return now if ok else None

    after = await _eventually(grown, 10, "the charts did not grow")
    assert after["traffic"]["max"] > 0, after
    assert after["latency"]["max"] > 0, after
    # The newest point on the page is one the API has (or had: the page may be a step behind).
    latest = (await dashboard.api("/api/observability/history"))["points"][-1]["t"]
    assert after["traffic"]["last"] <= latest
    assert latest - after["traffic"]["last"] <= 3 * FAST["history_interval"] + 1
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    await dashboard.page.screenshot(path=str(shot))
    docs = ROOT / "docs" / "dashboard.png"
    if not docs.exists() or os.environ.get("SHAPER_UPDATE_SCREENSHOT") == "1":
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs)


async def test_rollback_clicked_on_the_page_reaches_the_proxy(dashboard: Dashboard) -> None:
    """Roll back from the page (a wrong token is refused and asked again); the proxy obeys."""
    page = dashboard.page
    dialog = page.locator("dialog#confirm")
    button = page.get_by_test_id("rollback-shop")
    # By keyboard: Enter opens the dialog, Escape cancels it and gives the focus back.
    await button.focus()
    await page.keyboard.press("Enter")
    await dialog.wait_for(state="visible")
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="hidden")
    assert await button.evaluate("el => el === document.activeElement")
    await button.click()
    await dialog.wait_for(state="visible")
    assert "Roll back shop?" in await dialog.inner_text()
    token = page.get_by_label("Admin token")
    await token.fill("not-the-token")
    await page.get_by_label("Reason").fill("canary looks wrong")
    await page.locator("#confirm-ok").click()
    # 401: the page forgets the token and asks again, keeping the reason.
    await page.locator("#confirm-error").wait_for(state="visible")
    assert "refused" in await page.locator("#confirm-error").inner_text()
    assert await page.get_by_label("Reason").input_value() == "canary looks wrong"
    assert (await dashboard.api("/api/rollouts/shop"))["status"] == "progressing"
    await token.fill(TOKEN)
    await page.locator("#confirm-ok").click()
    await dialog.wait_for(state="hidden")

    async def rolled_back() -> bool:
        return (await dashboard.api("/api/rollouts/shop"))["status"] == "rolled_back"

    await _eventually(rolled_back, 5, "the proxy never rolled back")
    rollout = await dashboard.api("/api/rollouts/shop")
    assert rollout["weight"] == 0
    decisions = (await dashboard.api("/api/rollouts/shop/decisions"))["decisions"]
    assert decisions[-1]["action"] == "rollback"
    assert decisions[-1]["actor"] == "dashboard"
    assert decisions[-1]["reason"] == "canary looks wrong"

    async def page_shows_it() -> bool:
        return (
            await dashboard.text("status-shop") == "rolled back"
            and await dashboard.text("weight-shop") == "0%"
        )

    await _eventually(page_shows_it, 5, "the page never showed the rollback")
    assert "rolled back at 0%" in await dashboard.text("toast")
    newest = await page.get_by_test_id("decisions").locator("li").first.inner_text()
    assert "rollback" in newest and "by dashboard" in newest, newest
    assert "canary looks wrong" in newest, newest
    assert await button.is_disabled()
    # The token is kept for the tab: the next action does not ask for it.
    await page.get_by_role("button", name="Safe mode on").click()
    await dialog.wait_for(state="visible")
    assert not await page.get_by_label("Admin token").is_visible()
    await page.locator("#confirm-ok").click()

    async def safe_mode_on() -> bool:
        flags = await dashboard.api("/api/flags")
        return bool(flags["safe_mode"]["enabled"]) and "on" in await dashboard.text("safe-mode")

    await _eventually(safe_mode_on, 5, "safe mode never came on")


async def test_banner_when_the_proxy_stops(dashboard: Dashboard, start_shaper: StartShaper) -> None:
    """A role=alert banner appears when the proxy goes away and goes once it is back."""
    banner = dashboard.page.get_by_role("alert").and_(dashboard.page.get_by_test_id("banner"))
    assert not await banner.is_visible()
    await dashboard.traffic.pause()
    port = dashboard.shaper.admin_address[1]
    await dashboard.shaper.stop()
    await banner.wait_for(state="visible", timeout=10_000)
    assert "Cannot reach the proxy" in await banner.inner_text()
    # Back on the same port: the next poll (every 5 s) brings fresh data and the banner goes.
    dashboard.raw["admin"]["port"] = port
    await start_shaper(dashboard.raw, **FAST)
    await banner.wait_for(state="hidden", timeout=10_000)
    assert "polling" in await dashboard.text("feed")
