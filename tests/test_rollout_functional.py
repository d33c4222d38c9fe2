"""Rollout safety over real sockets: automatic rollback of a failing canary (kept across a
restart), breakers on a hanging endpoint, progressive steps, health checks, the operator API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Shaper
from proxy.supervisor import UNAUDITED

from .conftest import StartShaper, StartUpstream, make_config, to_config

TOKEN = "t0ken"


class Controlled:
    """An upstream whose behaviour a test flips: ok, fail (500), hang, or unhealthy checks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.healthy = True
        self.served = 0

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            if request.path == "/healthz":
                return web.Response(status=200 if self.healthy else 503)
            self.served += 1
            if self.mode == "hang":
                await asyncio.sleep(30)
            if self.mode == "fail":
                return web.Response(status=500, text=f"{self.name} broken")
            return web.Response(text=self.name)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


def _rollout_config(stable: str, canary: str, **rollout: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "stable": "v1",
        "canary": "v2",
        "sticky": {"header": "X-User-Id"},
        "override": {"header": "X-Canary"},
        "slo": {"error_rate": "1%", "min_requests": 20},
    }
    spec.update(rollout)
    return make_config(
        {"v1": [stable], "v2": [canary]},
        [{"name": "shop", "match": {"path_prefix": "/"}, "rollout": spec}],
    )


def _url(address: tuple[str, int]) -> str:
    return "http://{}:{}".format(*address)


async def _drive(shaper: Shaper, count: int, start: int = 0) -> list[tuple[int, str]]:
    """Send `count` requests with distinct users; (status, body) of each."""
    out = []
    async with aiohttp.ClientSession() as client:
        for i in range(start, start + count):
            async with client.get(
                _url(shaper.proxy_address) + "/", headers={"X-User-Id": f"user-{i}"}
            ) as r:
                out.append((r.status, await r.text()))
    return out


async def _rollout(shaper: Shaper) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.admin_address) + "/api/rollouts/shop") as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body


async def test_failing_canary_is_rolled_back_and_stays_down(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A canary that starts failing is rolled back by the analysis; users then only reach
    the stable, and a restart keeps the rollout rolled back."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(await start_upstream(stable.app()), await start_upstream(canary.app()))
    raw["routes"][0]["rollout"]["weight"] = 50
    raw["state_dir"] = str(tmp_path / "state")
    shaper = await start_shaper(raw, tick_interval=0.1)
    assert {body for _, body in await _drive(shaper, 40)} == {"v1", "v2"}
    canary.mode = "fail"
    for round_ in range(60):
        await _drive(shaper, 40, start=1000 * (round_ + 1))
        if (await _rollout(shaper))["status"] == "rolled_back":
            break
        await asyncio.sleep(0.1)
    rollout = await _rollout(shaper)
    assert rollout["status"] == "rolled_back"
    assert rollout["weight"] == 0
    assert rollout["reason"].startswith("canary")
    answers = await _drive(shaper, 50, start=999_000)
    assert answers == [(200, "v1")] * 50
    # Not even the override header reaches a rolled-back canary.
    async with aiohttp.ClientSession() as client:
        async with client.get(
            _url(shaper.proxy_address) + "/", headers={"X-Canary": "always"}
        ) as r:
            assert (r.status, await r.text()) == (200, "v1")
    # The decision is in the audit log with its inputs.
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.admin_address) + "/api/rollouts/shop/decisions") as r:
            decisions = (await r.json())["decisions"]
    rollback = [d for d in decisions if d["action"] == "rollback"][-1]
    assert rollback["actor"] == "analysis"
    assert rollback["inputs"]["canary_failures"] > 0
    assert rollback["config_hash"]
    await shaper.stop()

    again = Shaper(to_config(raw), tick_interval=0.1)
    await again.start()
    try:
        canary.mode = "ok"
        assert (await _rollout(again))["status"] == "rolled_back"
        assert await _drive(again, 30) == [(200, "v1")] * 30
    finally:
        await again.stop()


async def test_breaker_opens_on_hanging_endpoint_and_closes_after(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Timeouts trip the endpoint's breaker (503 circuit_open with Retry-After, upstream
    spared); after the open time a probe succeeds and the breaker closes."""
    backend = Controlled("app")
    url = await start_upstream(backend.app())
    raw = make_config(
        {
            "app": {
                "endpoints": [url],
                "request_timeout": "200ms",
                "breaker": {
                    "consecutive_failures": 3,
                    "open_base": "300ms",
                    "close_after": 1,
                },
            }
        },
        [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
    )
    shaper = await start_shaper(raw)
    backend.mode = "hang"
    statuses = [status for status, _ in await _drive(shaper, 3)]
    assert statuses == [504, 504, 504]
    served = backend.served
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.proxy_address) + "/") as r:
            assert r.status == 503
            assert r.headers["X-Shaper-Error"] == "circuit_open"
            assert int(r.headers["Retry-After"]) >= 1
        assert backend.served == served  # refused without touching the upstream
        async with client.get(_url(shaper.admin_address) + "/api/upstreams") as r:
            assert (await r.json())["upstreams"]["app"][0]["breaker"] == "open"
        async with client.get(_url(shaper.admin_address) + "/metrics") as r:
            text = await r.text()
        assert f'shaper_breaker_state{{endpoint="{url}",upstream="app"}} 1.0' in text
        # The dashboard's list of recent decisions and events shows the trip.
        async with client.get(_url(shaper.admin_address) + "/api/dashboard/snapshot") as r:
            recent = (await r.json())["decisions"]
        assert any(d["action"] == "breaker.open" and d["route"] == "app" for d in recent)
        assert f'shaper_breaker_transitions_total{{endpoint="{url}",to="open",upstream="app"}}' in (
            text
        )
    backend.mode = "ok"
    await asyncio.sleep(0.5)  # the open time (300 ms, +-10% jitter) passes
    assert await _drive(shaper, 3) == [(200, "app")] * 3
    assert shaper.runtime.snapshot.upstreams["app"].endpoints[0].breaker.state == "closed"


async def test_open_canary_breaker_diverts_to_stable(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """With the canary's breaker open, its users get the stable (no errors) and the
    diversion is counted against the canary."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(await start_upstream(stable.app()), await start_upstream(canary.app()))
    raw["routes"][0]["rollout"]["weight"] = 100
    raw["upstreams"]["v2"]["breaker"] = {"consecutive_failures": 2, "open_base": "60s"}
    raw["upstreams"]["v2"]["request_timeout"] = "200ms"
    shaper = await start_shaper(raw)
    canary.mode = "hang"
    assert [s for s, _ in await _drive(shaper, 2)] == [504, 504]
    assert await _drive(shaper, 10, start=100) == [(200, "v1")] * 10
    assert shaper.metrics.diverted["shop"] == 10


async def test_steps_advance_and_promote(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A healthy canary walks 20% -> 60% -> promoted as each short hold passes."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(
        await start_upstream(stable.app()),
        await start_upstream(canary.app()),
        steps=[{"weight": 20, "hold": "1s"}, {"weight": 60, "hold": "1s"}],
        slo={"error_rate": "1%", "min_requests": 5},
    )
    shaper = await start_shaper(raw, tick_interval=0.1)
    seen_weights = set()
    for round_ in range(100):
        await _drive(shaper, 30, start=round_ * 100)
        rollout = await _rollout(shaper)
        seen_weights.add(rollout["weight"])
        if rollout["status"] == "promoted":
            break
        await asyncio.sleep(0.05)
    assert rollout["status"] == "promoted"
    assert {20, 60, 100} <= seen_weights
    assert {body for _, body in await _drive(shaper, 20, start=10**6)} == {"v2"}


async def test_unhealthy_canary_blocks_the_step(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """An active health check failing takes the canary endpoint out of rotation and the
    canary_healthy gate reports it."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(
        await start_upstream(stable.app()),
        await start_upstream(canary.app()),
        steps=[{"weight": 50, "hold": "1s"}, {"weight": 100, "hold": "1s"}],
    )
    raw["upstreams"]["v2"]["health_check"] = {
        "path": "/healthz",
        "interval": "50ms",
        "timeout": "200ms",
        "unhealthy_threshold": 1,
    }
    canary.healthy = False
    shaper = await start_shaper(raw, tick_interval=0.1)
    endpoint = shaper.runtime.snapshot.upstreams["v2"].endpoints[0]
    for _ in range(100):
        if not endpoint.health.healthy:
            break
        await asyncio.sleep(0.02)
    assert not endpoint.health.healthy
    assert {body for _, body in await _drive(shaper, 20)} == {"v1"}
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.admin_address) + "/api/observability/health-gates") as r:
            gates = {g["name"]: g for g in (await r.json())["rollouts"]["shop"]}
    assert gates["canary_healthy"]["passed"] is False
    assert "unhealthy" in gates["canary_healthy"]["reason"]


async def test_operator_api_with_token_and_audit(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pause, set weight, rollback and retry through the API: token required, refusals are
    409, and each action is in the decisions log with its actor and reason."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(
        await start_upstream(stable.app()), await start_upstream(canary.app()), weight=10
    )
    shaper = await start_shaper(raw)
    base = _url(shaper.admin_address) + "/api/rollouts/shop"
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Shaper-Actor": "alice"}
    async with aiohttp.ClientSession() as client:
        async with client.post(base + "/pause") as r:
            assert r.status == 401
        async with client.post(base + "/pause", headers=auth, json={"reason": "checking"}) as r:
            assert r.status == 200
            assert (await r.json())["rollout"]["status"] == "paused"
        async with client.post(base + "/pause", headers=auth) as r:
            assert r.status == 409
            assert "cannot pause" in (await r.json())["detail"]
        async with client.post(base + "/weight", headers=auth, json={"weight": 100}) as r:
            assert r.status == 200
        assert {body for _, body in await _drive(shaper, 10)} == {"v2"}
        async with client.post(base + "/weight", headers=auth, json={"weight": "lots"}) as r:
            assert r.status == 400
        async with client.post(
            base + "/rollback", headers=auth, json={"reason": "bad deploy", "actor": "bob"}
        ) as r:
            assert r.status == 200
        assert {body for _, body in await _drive(shaper, 10)} == {"v1"}
        async with client.post(base + "/retry", headers=auth) as r:
            assert (await r.json())["rollout"]["weight"] == 10
        async with client.post(
            _url(shaper.admin_address) + "/api/rollouts/nope/pause", headers=auth
        ) as r:
            assert r.status == 404
        async with client.get(base + "/decisions") as r:
            decisions = (await r.json())["decisions"]
        rollback = next(d for d in decisions if d["action"] == "rollback")
        assert (rollback["actor"], rollback["reason"]) == ("bob", "bad deploy")
        async with client.get(_url(shaper.admin_address) + f"/api/decisions/{rollback['id']}") as r:
            assert (await r.json())["id"] == rollback["id"]
        async with client.get(_url(shaper.admin_address) + "/metrics") as r:
            text = await r.text()
    assert 'shaper_rollbacks_total{reason="operator",route="shop"} 1.0' in text
    assert 'shaper_rollout_status{route="shop",status="progressing"} 1.0' in text
    assert 'shaper_rollout_weight{route="shop"} 10.0' in text
    assert "shaper_analysis_verdict{" in text
    audit = (Path(shaper.state_dir) / "audit.log").read_text().splitlines()
    assert (
        sum(
            json.loads(line)["action"] in ("pause", "set_weight", "rollback", "retry")
            for line in audit
        )
        == 4
    )


async def test_long_stream_probe_closes_the_breaker(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A half-open probe answered with a long stream closes the breaker at its response head:
    the stream outliving the probe lease neither re-opens it nor refuses other clients."""
    state = {"mode": "fail"}
    release = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        if state["mode"] == "fail":
            return web.Response(status=502)
        if request.path == "/stream":
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"first chunk\n")
            await release.wait()
            await response.write(b"last chunk\n")
            return response
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    url = await start_upstream(app)
    raw = make_config(
        {
            "app": {
                "endpoints": [url],
                "breaker": {
                    "consecutive_failures": 1,
                    "open_base": "200ms",
                    "probe_lease": "300ms",
                    "close_after": 1,
                },
            }
        },
        [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
    )
    shaper = await start_shaper(raw)
    breaker = shaper.runtime.snapshot.upstreams["app"].endpoints[0].breaker
    assert [s for s, _ in await _drive(shaper, 1)] == [502]
    assert breaker.state == "open"
    state["mode"] = "ok"
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as client:
        stream = await client.get(_url(shaper.proxy_address) + "/stream")
        assert stream.status == 200
        assert await stream.content.readline() == b"first chunk\n"
        assert breaker.state == "closed"
        await asyncio.sleep(0.4)  # longer than the probe lease
        assert await _drive(shaper, 3) == [(200, "ok")] * 3
        release.set()
        assert await stream.read() == b"last chunk\n"
        stream.release()
    assert breaker.state == "closed"


async def test_stable_burn_rate_gate(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A stable burning its error budget fast over both windows fails the burn-rate gate."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(
        await start_upstream(stable.app()),
        await start_upstream(canary.app()),
        steps=[{"weight": 10, "hold": "1s"}, {"weight": 100, "hold": "1s"}],
        gates={"max_stable_burn_rate": 5, "burn_windows": ["10s", "20s"]},
    )
    shaper = await start_shaper(raw, tick_interval=0.1)
    stable.mode = "fail"  # 100% errors against a 1% budget: a burn rate of 100
    await _drive(shaper, 40)
    await asyncio.sleep(1.1)  # the failures must be in whole past seconds of both windows

    async def gates() -> dict[str, Any]:
        async with aiohttp.ClientSession() as client:
            async with client.get(
                _url(shaper.admin_address) + "/api/observability/health-gates"
            ) as r:
                return {g["name"]: g for g in (await r.json())["rollouts"]["shop"]}

    burn = (await gates())["stable_burn_rate"]
    assert burn["passed"] is False
    assert "limit 5x" in burn["reason"]


async def _half_canary(
    start_upstream: StartUpstream, tmp_path: Path
) -> tuple[dict[str, Any], Path]:
    """A 50% rollout of v2 over v1 with its state under `tmp_path`; the config, and the
    directory of its state documents."""
    stable, canary = Controlled("v1"), Controlled("v2")
    raw = _rollout_config(await start_upstream(stable.app()), await start_upstream(canary.app()))
    raw["routes"][0]["rollout"]["weight"] = 50
    raw["state_dir"] = str(tmp_path / "state")
    return raw, tmp_path / "state" / "state"


@pytest.mark.parametrize(
    ("rollouts", "lost"),
    [
        (b'{"shop": {"status": "rolled_back", "weight": 0', "saved state unreadable"),  # torn
        (b'["shop"]', "saved state unreadable"),
        (b'{"shop": {"status": "gone wrong"}}', "its saved state was unreadable"),  # one entry
    ],
)
@pytest.mark.parametrize("action", ["retry", "resume"])
async def test_damaged_rollout_state_holds_the_canary_at_the_stable(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rollouts: bytes,
    lost: str,
    action: str,
) -> None:
    """Saved rollout state that is there but unreadable (a hand edit, the disk) is never
    taken for none: that would start the rollout afresh and give a canary that may have been
    rolled back its traffic again. The rollout is held paused at 0%, the decision is audited,
    a damaged file is kept under another name; an operator starts the schedule over with
    retry, or with resume (which at 0% brings back the weight the file asks for)."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    raw, documents = await _half_canary(start_upstream, tmp_path)
    documents.mkdir(parents=True)
    (documents / "rollouts.json").write_bytes(rollouts)
    shaper = await start_shaper(raw, tick_interval=0.1)
    rollout = await _rollout(shaper)
    assert (rollout["status"], rollout["weight"]) == ("paused", 0)
    assert rollout["reason"].startswith(lost)
    assert action in rollout["reason"]
    assert {body for _, body in await _drive(shaper, 40)} == {"v1"}
    kept = [p.name.split(".damaged-")[0] for p in documents.glob("*.damaged-*")]
    assert kept == (["rollouts.json"] if lost == "saved state unreadable" else [])
    assert json.loads((documents / "rollouts.json").read_bytes())["shop"]["status"] == "paused"
    async with aiohttp.ClientSession() as client:
        admin = _url(shaper.admin_address)
        async with client.get(f"{admin}/api/rollouts/shop/decisions") as r:
            decisions = (await r.json())["decisions"]
        held = [d for d in decisions if d["action"] == "pause"]
        assert held and held[-1]["actor"] == "controller"
        async with client.get(f"{admin}/api/flags") as r:
            assert (await r.json())["safe_mode"]["enabled"] is False  # the flags were fine
        async with client.post(
            f"{admin}/api/rollouts/shop/{action}",
            json={"reason": "state checked"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200, await r.text()
    rollout = await _rollout(shaper)
    assert (rollout["status"], rollout["weight"]) == ("progressing", 50)
    assert {body for _, body in await _drive(shaper, 40, start=5000)} == {"v1", "v2"}


async def test_damaged_flags_at_start_turn_safe_mode_on(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """Damaged flags at start: the overrides they held are unknown (a safe mode, a
    quarantine an incident still needs), so safe mode goes on, audited by "shaper", and all
    traffic goes to the stable until an operator has looked; the file is kept aside."""
    raw, documents = await _half_canary(start_upstream, tmp_path)
    documents.mkdir(parents=True)
    (documents / "flags.json").write_bytes(b'{"safe_mode": tru')
    shaper = await start_shaper(raw, tick_interval=0.1)
    async with aiohttp.ClientSession() as client:
        async with client.get(_url(shaper.admin_address) + "/api/flags") as r:
            safe_mode = (await r.json())["safe_mode"]
    assert safe_mode["enabled"] is True
    assert safe_mode["override"]["actor"] == "shaper"
    assert "flag state unreadable" in safe_mode["override"]["reason"]
    assert {body for _, body in await _drive(shaper, 40)} == {"v1"}
    assert [p.name.split(".damaged-")[0] for p in documents.glob("*.damaged-*")] == ["flags.json"]
    assert json.loads((documents / "flags.json").read_bytes())["safe_mode"]["value"] is True


async def test_state_damaged_while_running_is_rewritten_from_memory(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running proxy knows its rollouts and flags: when their documents are damaged under
    it, they are set aside and written anew from what it holds, an operator's override
    included; nothing changes for traffic."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    raw, documents = await _half_canary(start_upstream, tmp_path)
    shaper = await start_shaper(raw, tick_interval=0.1)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            _url(shaper.admin_address) + "/api/flags/safe-mode",
            json={"enabled": True, "reason": "investigating"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200, await r.text()
    rollouts = json.loads((documents / "rollouts.json").read_bytes())
    flags = json.loads((documents / "flags.json").read_bytes())
    for name in ("rollouts.json", "flags.json"):
        (documents / name).write_bytes(b"\x00garbage")
    for _ in range(50):
        await asyncio.sleep(0.1)
        if len(list(documents.glob("*.damaged-*"))) == 2:
            break
    kept = sorted(p.name.split(".damaged-")[0] for p in documents.glob("*.damaged-*"))
    assert kept == ["flags.json", "rollouts.json"]
    for _ in range(50):  # the rollouts are written at the tick after the one that saw it
        if (documents / "rollouts.json").exists():
            break
        await asyncio.sleep(0.1)
    # Every state comes back; the decisions saved with them before their audit lines were
    # appended (`_unaudited`) are in the audit log by now, and not written again.
    rollouts.pop(UNAUDITED, None)
    assert json.loads((documents / "rollouts.json").read_bytes()) == rollouts
    assert json.loads((documents / "flags.json").read_bytes()) == flags
    assert flags["safe_mode"]["reason"] == "investigating"
    rollout = await _rollout(shaper)
    assert (rollout["status"], rollout["weight"]) == ("progressing", 50)
    assert {body for _, body in await _drive(shaper, 40)} == {"v1"}  # still in safe mode
