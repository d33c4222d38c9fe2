"""The admin server over real sockets: health, readiness, metrics (checked by promtool),
golden signals, and the token on mutating calls."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Shaper, StartupError
from proxy.state import FileStateStore

from .conftest import StartShaper, StartUpstream, free_port, make_config, to_config

TOKEN = "s3cret-token"


def _hello(version: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "200"))
        return web.Response(text=version, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _rollout_config(stable: str, canary: str, weight: float = 50) -> dict[str, object]:
    return make_config(
        {"v1": [stable], "v2": [canary]},
        [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": weight,
                    "sticky": {"header": "X-User-Id"},
                },
            }
        ],
    )


def _admin(shaper: Shaper) -> str:
    host, port = shaper.admin_address
    return f"http://{host}:{port}"


def _proxy(shaper: Shaper) -> str:
    host, port = shaper.proxy_address
    return f"http://{host}:{port}"


async def test_healthz_and_readyz(start_upstream: StartUpstream, start_shaper: StartShaper) -> None:
    """healthz answers while alive; readyz is 200 only when each route's stable is reachable."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    up = await start_shaper(_rollout_config(stable, canary))
    down = await start_shaper(_rollout_config(f"http://127.0.0.1:{free_port()}", canary))
    async with aiohttp.ClientSession() as client:
        async with client.get(_admin(up) + "/healthz") as r:
            assert r.status == 200
        async with client.get(_admin(up) + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["routes"] == {"shop": True}
        async with client.get(_admin(down) + "/healthz") as r:
            assert r.status == 200
        async with client.get(_admin(down) + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["routes"] == {"shop": False}


async def _traffic(shaper: Shaper, n: int) -> None:
    async with aiohttp.ClientSession() as client:
        for i in range(n):
            status = 500 if i % 10 == 0 else 200
            async with client.post(
                _proxy(shaper) + f"/checkout?status={status}",
                headers={"X-User-Id": f"u{i}"},
                data=b"x",
            ) as r:
                await r.read()


async def test_metrics_names_and_labels(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """/metrics exports the documented families with bounded labels and the expected counts."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary, weight=0))
    await _traffic(shaper, 20)
    async with aiohttp.ClientSession() as client, client.get(_admin(shaper) + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert 'shaper_requests_total{code="200",method="POST",route="shop",variant="stable"} 18.0' in (
        text
    )
    assert 'shaper_requests_total{code="500",method="POST",route="shop",variant="stable"} 2.0' in (
        text
    )
    for bucket in ("0.001", "0.0025", "10.0", "+Inf"):
        assert f'shaper_request_duration_seconds_bucket{{le="{bucket}",route="shop"' in text
    assert re.search(r'shaper_upstream_duration_seconds_count\{upstream="v1"\} 20\.0', text)
    assert "shaper_requests_in_flight{" in text
    assert "shaper_client_connections_active " in text
    assert 'shaper_config_reloads_total{result="success"} 1.0' in text
    assert "shaper_config_last_reload_success_timestamp_seconds " in text
    assert re.search(r'shaper_build_info\{.*parser="c".*\} 1\.0', text)
    # Which data path runs: the compiled one under `make test`, the source under SHAPER_PURE.
    data_path = "source" if os.environ.get("SHAPER_PURE", "") not in ("", "0") else "compiled"
    assert re.search(rf'shaper_build_info\{{.*data_path="{data_path}".*\}} 1\.0', text)
    # Raw paths never become label values.
    assert "/checkout" not in text


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool not installed (make test installs Debian's prometheus package)",
)
async def test_promtool_accepts_metrics(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """`promtool check metrics` finds no problem in the real /metrics output under traffic."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary))
    await _traffic(shaper, 30)
    async with aiohttp.ClientSession() as client, client.get(_admin(shaper) + "/metrics") as r:
        text = await r.read()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_golden_signals(start_upstream: StartUpstream, start_shaper: StartShaper) -> None:
    """The golden-signals API reports rate, errors and latency per route and variant."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary, weight=0))
    await _traffic(shaper, 20)
    async with aiohttp.ClientSession() as client:
        async with client.get(_admin(shaper) + "/api/observability/golden-signals") as r:
            body = await r.json()
    stable_signals = body["routes"]["shop"]["variants"]["stable"]
    assert stable_signals["upstream"] == "v1"
    assert stable_signals["1m"]["requests"] == 20
    assert stable_signals["1m"]["errors"] == 2
    assert stable_signals["1m"]["error_rate"] == pytest.approx(0.1)
    assert stable_signals["5m"]["requests"] == 20
    assert stable_signals["1m"]["latency_ms"]["p99"] > 0
    assert body["routes"]["shop"]["variants"]["canary"]["1m"]["requests"] == 0
    assert body["saturation"]["requests_in_flight"] == 0
    assert "v1" in body["saturation"]["upstream_pools"]


async def test_mutating_calls_need_the_token(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /admin/reload is refused without the bearer token or with a wrong one."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary))
    url = _admin(shaper) + "/admin/reload"
    async with aiohttp.ClientSession() as client:
        async with client.post(url) as r:
            assert r.status == 401
        async with client.post(url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with client.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            # No file to reload from in this test: the call is authorised and says why it failed.
            assert r.status == 422
            assert "no config file" in (await r.json())["errors"][0]
        # Reads need no token; no CORS is granted to other origins.
        async with client.get(
            _admin(shaper) + "/healthz", headers={"Origin": "http://evil.example"}
        ) as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_admin_body_limit(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin request body over admin.max_body_size is refused with 413."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    raw = _rollout_config(stable, canary)
    raw["admin"] = {**raw["admin"], "max_body_size": 1024}  # type: ignore[dict-item]
    shaper = await start_shaper(raw)
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            _admin(shaper) + "/admin/reload",
            data=b"x" * 4096,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        assert r.status == 413


async def test_flag_ttl_out_of_range_is_a_400_that_names_it(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ttl JSON can carry but no duration can be (an integer past a float's range, NaN,
    Infinity) is a 400 naming the ttl, for safe mode and brownout; nothing changes."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    cases = [
        ("safe-mode", '{"enabled": true, "ttl": 1%s}' % ("0" * 400)),
        ("brownout", '{"level": 1, "reason": "x", "ttl": 1%s}' % ("0" * 400)),
        ("safe-mode", '{"enabled": true, "ttl": NaN}'),
        ("brownout", '{"level": 1, "reason": "x", "ttl": Infinity}'),
        ("safe-mode", '{"enabled": true, "ttl": "inf"}'),
    ]
    async with aiohttp.ClientSession() as client:
        for flag, body in cases:
            async with client.post(
                _admin(shaper) + f"/api/flags/{flag}", data=body, headers=headers
            ) as r:
                assert r.status == 400, (body[:60], await r.text())
                detail = (await r.json())["detail"]
                assert detail.startswith("ttl must be a finite duration"), detail
        # The input is quoted in the answer, which stays JSON whatever it holds.
        async with client.post(
            _admin(shaper) + "/api/flags/safe-mode",
            json={"enabled": True, "ttl": '5"m'},
            headers=headers,
        ) as r:
            assert r.status == 400
            detail = (await r.json())["detail"]
            assert detail == "ttl must be a duration such as 250ms, 5s or 1m, got '5\"m'"
        async with client.get(_admin(shaper) + "/api/flags") as r:
            shown = await r.json()
    assert shown["safe_mode"]["enabled"] is False
    assert shown["brownout"]["level"] == 0


async def test_operator_fields_of_the_wrong_type_are_400s_that_name_them(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brownout level of 1.0, a reason or an actor that is not a string, a ttl past 366
    days (1e308 s would be an expiry no clock or browser can show): each is a 400 naming the
    field, where they were stored as Python's repr of them (or broke the dashboard's clock);
    nothing changes."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    cases: list[tuple[str, dict[str, object], str]] = [
        ("/api/flags/brownout", {"level": 1.0, "reason": "x"}, '"level" must be 0, 1 or 2'),
        ("/api/flags/brownout", {"level": 1, "reason": {"why": "db"}}, '"reason" must be a string'),
        ("/api/flags/safe-mode", {"enabled": True, "actor": 7}, '"actor" must be a string'),
        ("/api/flags/safe-mode", {"enabled": True, "ttl": 1e308}, "ttl must be at most 8784h"),
        ("/api/flags/brownout", {"level": 2, "reason": "x", "ttl": "9000h"}, "ttl must be at most"),
        ("/api/rollouts/shop/pause", {"reason": ["a", "b"]}, '"reason" must be a string'),
        ("/api/rollouts/shop/weight", {"weight": 5, "actor": False}, '"actor" must be a string'),
    ]
    async with aiohttp.ClientSession() as client:
        for path, body, detail in cases:
            async with client.post(_admin(shaper) + path, json=body, headers=headers) as r:
                assert r.status == 400, (path, body, await r.text())
                assert (await r.json())["detail"].startswith(detail), (path, body)
        # The longest ttl there is, and a reason of null (no reason), are taken.
        async with client.post(
            _admin(shaper) + "/api/flags/safe-mode",
            json={"enabled": True, "ttl": "8784h", "reason": None},
            headers=headers,
        ) as r:
            assert r.status == 200, await r.text()
            change = (await r.json())["change"]
            assert change["reason"] == "" and change["expires"] > change["time"] + 8783 * 3600
        async with client.get(_admin(shaper) + "/api/flags") as r:
            shown = await r.json()
        async with client.get(_admin(shaper) + "/api/rollouts/shop") as r:
            rollout = await r.json()
    assert shown["safe_mode"]["enabled"] is True  # the one good call
    assert shown["brownout"]["level"] == 0
    assert (rollout["status"], rollout["weight"]) == ("progressing", 50)


async def test_changes_while_another_process_holds_the_state_lock(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI in local mode holding the state store's lock (suspended mid-change): a flag
    change through the API is a 503 that says so, and changes nothing; a rollout action is in
    force at once and says it is not saved yet; the proxy keeps serving meanwhile (its loop
    waits at most 50 ms for the lock, where it waited for as long as it was held). Once the
    lock is free, the flag change goes through and the rollout's state is saved."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    shaper = await start_shaper(_rollout_config(stable, canary))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    holder = FileStateStore(Path(shaper.state_dir))  # another descriptor: another process
    async with aiohttp.ClientSession() as client:
        with holder.locked():
            async with client.post(
                _admin(shaper) + "/api/flags/safe-mode", json={"enabled": True}, headers=headers
            ) as r:
                assert r.status == 503, await r.text()
                answer = await r.json()
            assert answer["error"] == "store_busy"
            assert answer["detail"].startswith("nothing changed: ")
            assert "local mode" in answer["detail"]
            async with client.post(
                _admin(shaper) + "/api/rollouts/shop/pause", json={}, headers=headers
            ) as r:
                assert r.status == 500, await r.text()
                answer = await r.json()
            assert answer["error"] == "not_persisted" and "is in force" in answer["detail"]
            async with client.get(_proxy(shaper) + "/") as r:
                assert r.status == 200
            async with client.get(_admin(shaper) + "/api/flags") as r:
                assert (await r.json())["safe_mode"]["enabled"] is False
            async with client.get(_admin(shaper) + "/api/rollouts/shop") as r:
                assert (await r.json())["status"] == "paused"
        async with client.post(
            _admin(shaper) + "/api/flags/safe-mode", json={"enabled": True}, headers=headers
        ) as r:
            assert r.status == 200, await r.text()
        saved = Path(shaper.state_dir) / "state" / "rollouts.json"
        for _ in range(100):  # the next supervisor tick saves it
            if json.loads(saved.read_bytes())["shop"]["status"] == "paused":
                break
            await asyncio.sleep(0.05)
        assert json.loads(saved.read_bytes())["shop"]["status"] == "paused"


async def test_no_public_admin_without_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The admin server refuses a non-loopback address when no token is configured."""
    monkeypatch.delenv("SHAPER_TEST_TOKEN", raising=False)
    raw = _rollout_config("http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["admin"] = {"host": "0.0.0.0", "port": 0, "token_env": "SHAPER_TEST_TOKEN"}
    raw["state_dir"] = str(tmp_path)
    with pytest.raises(StartupError, match="not loopback and no admin token"):
        Shaper(to_config(raw))
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    shaper = Shaper(to_config(raw))
    assert shaper.token == TOKEN
    await shaper.runtime.snapshot.upstreams.close()
    shaper.outbox.close()


async def _first_frame(client: aiohttp.ClientSession, shaper: Shaper) -> dict[str, Any]:
    """The first `snapshot` event a new page watching the live stream gets."""
    async with client.get(_admin(shaper) + "/api/stream") as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                frame: dict[str, Any] = json.loads(line[len(b"data: ") :])
                return frame
    raise AssertionError("the stream ended before a snapshot")


async def test_pages_watching_share_one_frame_until_an_operator_acts(
    start_upstream: StartUpstream, start_shaper: StartShaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page on the live stream gets the same snapshot (made once, not once per page);
    a change made through the admin API shows in the very next frame, never the one before."""
    stable = await start_upstream(_hello("v1"))
    canary = await start_upstream(_hello("v2"))
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    shaper = await start_shaper(_rollout_config(stable, canary), stream_interval=10.0)
    async with aiohttp.ClientSession() as client:
        first = await _first_frame(client, shaper)
        second = await _first_frame(client, shaper)
        assert second == first  # the same "time": one snapshot, two pages
        assert first["flags"]["safe_mode"]["enabled"] is False
        async with client.post(
            _admin(shaper) + "/api/flags/safe-mode",
            json={"enabled": True, "reason": "incident"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200, await r.text()
        after = await _first_frame(client, shaper)
        assert after["time"] > first["time"]
        assert after["flags"]["safe_mode"]["enabled"] is True
