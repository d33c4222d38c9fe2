"""The `shaper` ops CLI, run for real (`python -m proxy ...` in a subprocess), against a real
proxy with real upstreams that say which version answered: safe mode, brownout by priority,
quarantine and release, expiry, persistence across a restart, local mode, status, rollout
actions with explain, and the exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config import FlagDefaults
from proxy.incidents import FlagKeeper, apply_flag_change
from proxy.metrics import Metrics
from proxy.runtime import Runtime
from proxy.server import Shaper
from proxy.state import AuditLog, FileStateStore

from .conftest import StartShaper, StartUpstream, free_port, make_config, to_config
from .test_serve import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ops-t0ken"
ACTOR = "oncall@test"
SHED_HEADERS = {"X-Shaper-Shed", "Retry-After"}


class Backend:
    """An upstream endpoint that answers with its name ("v1a", "v1b", "v2") and counts hits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.url = ""
        self.release = asyncio.Event()  # requests to .../slow wait for it

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            self.hits += 1
            if request.path.endswith("/slow"):
                await self.release.wait()
            return web.Response(text=self.name)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


@dataclass
class Fleet:
    """Stable v1 with two endpoints (a, b), canary v2 with one."""

    v1a: Backend
    v1b: Backend
    v2: Backend

    @classmethod
    async def start(cls, start_upstream: StartUpstream) -> Fleet:
        fleet = cls(Backend("v1a"), Backend("v1b"), Backend("v2"))
        for backend in (fleet.v1a, fleet.v1b, fleet.v2):
            backend.url = await start_upstream(backend.app())
        return fleet

    def hits(self) -> int:
        return self.v1a.hits + self.v1b.hits + self.v2.hits


def _config(fleet: Fleet, weight: float = 100, state_dir: Path | None = None) -> dict[str, Any]:
    """pay (critical) and reports (sheddable) on v1; shop (default) a v1 -> v2 rollout."""
    raw = make_config(
        {"v1": [fleet.v1a.url, fleet.v1b.url], "v2": [fleet.v2.url]},
        [
            {
                "name": "pay",
                "match": {"path_prefix": "/pay"},
                "priority": "critical",
                "upstream": "v1",
            },
            {
                "name": "reports",
                "match": {"path_prefix": "/reports"},
                "priority": "sheddable",
                "upstream": "v1",
            },
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": weight,
                    "sticky": {"header": "X-User-Id"},
                    "override": {"header": "X-Canary"},
                },
            },
        ],
        drain_timeout="2s",
    )
    if state_dir is not None:
        raw["state_dir"] = str(state_dir)
    return raw


@dataclass
class Result:
    code: int
    out: str
    err: str


async def cli(*args: str, token: str | None = TOKEN) -> Result:
    """Run `shaper ARGS` as a user would; the token comes from SHAPER_ADMIN_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPER_ADMIN")}
    if token is not None:
        env["SHAPER_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def _url(address: tuple[str, int]) -> str:
    return "http://{}:{}".format(*address)


def remote(admin: str | Shaper) -> tuple[str, ...]:
    """The options that point the CLI at a running server's admin API."""
    url = admin if isinstance(admin, str) else _url(admin.admin_address)
    return ("--admin", url, "--actor", ACTOR)


def ok(result: Result) -> Result:
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    return result


def changed(result: Result, what: str) -> str:
    """The audit id printed for a flag change ("FLAG [TARGET]: BEFORE -> AFTER ... (ID)")."""
    match = re.fullmatch(rf"{re.escape(what)}: \S+ -> \S+.* \((d-[0-9a-f-]+)\)", result.out.strip())
    assert match is not None, result.out
    return match[1]


async def explained(entry_id: str, where: tuple[str, ...]) -> dict[str, Any]:
    """The audit entry `shaper explain ID -o json` shows."""
    entry: dict[str, Any] = json.loads(ok(await cli("explain", entry_id, "-o", "json", *where)).out)
    assert entry["id"] == entry_id
    return entry


def refused(result: Result, code: int, fragment: str) -> None:
    """Exit `code` with one clear line on stderr naming the problem, nothing on stdout."""
    assert result.code == code, (result.code, result.out, result.err)
    assert result.out == ""
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("shaper: ")
    assert fragment in lines[0], lines[0]


async def get(
    client: aiohttp.ClientSession, base: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    async with client.get(base + path, headers=headers or {}) as response:
        return response.status, await response.text(), dict(response.headers)


async def answers(
    client: aiohttp.ClientSession,
    base: str,
    path: str = "/",
    count: int = 20,
    headers: dict[str, str] | None = None,
) -> list[str]:
    """Bodies of `count` requests, each from a distinct user (X-User-Id)."""
    out = []
    for i in range(count):
        status, body, _ = await get(
            client, base, path, {"X-User-Id": f"user-{i}", **(headers or {})}
        )
        out.append(body if status == 200 else str(status))
    return out


async def flags(client: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with client.get(admin + "/api/flags") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    """Poll `check` every 50 ms, at most `seconds` worth of tries."""
    for _ in range(int(seconds / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The token the proxies under test require (their config names SHAPER_TEST_TOKEN)."""
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)
    return TOKEN


# -- safe mode -----------------------------------------------------------------------------------


async def test_safe_mode_sends_everything_to_stable_and_disable_restores(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """`safe-mode enable` sends all traffic to stable even at weight 100 with the override
    header; `safe-mode disable` restores the split."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=100))
    proxy = _url(shaper.proxy_address)
    async with aiohttp.ClientSession() as client:
        assert set(await answers(client, proxy)) == {"v2"}

        result = ok(await cli("safe-mode", "enable", "--reason", "unknown errors", *remote(shaper)))
        change = await explained(changed(result, "safe_mode"), remote(shaper))
        assert (change["action"], change["before"], change["after"]) == ("set", False, True)
        assert {a[:2] for a in await answers(client, proxy)} == {"v1"}
        assert {a[:2] for a in await answers(client, proxy, headers={"X-Canary": "always"})} == {
            "v1"
        }
        shown = (await flags(client, _url(shaper.admin_address)))["safe_mode"]
        assert shown["enabled"] is True
        assert shown["override"]["actor"] == ACTOR
        assert shown["override"]["reason"] == "unknown errors"
        assert shown["override"]["expires"] is None

        ok(await cli("safe-mode", "disable", *remote(shaper)))
        assert set(await answers(client, proxy)) == {"v2"}


# -- brownout ------------------------------------------------------------------------------------


async def test_brownout_sheds_by_priority_and_headers_only_lower(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """Level 1 sheds only sheddable routes (503, X-Shaper-Shed, jittered Retry-After, the
    upstream never reached); X-Request-Priority lowers a route but never raises it; level 2
    also sheds default but never critical; disable ends it; shed requests are not errors."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=0))
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    async with aiohttp.ClientSession() as client:
        result = ok(await cli("brownout", "enable", "db overloaded", *remote(shaper)))
        change = await explained(changed(result, "brownout"), remote(shaper))
        assert (change["before"], change["after"], change["reason"]) == (0, 1, "db overloaded")

        before = fleet.hits()
        retry_afters = set()
        for _ in range(40):
            status, body, headers = await get(client, proxy, "/reports/daily")
            assert status == 503
            assert headers["X-Shaper-Shed"] == "1"
            assert headers["X-Shaper-Error"] == "shed"
            assert 1 <= int(headers["Retry-After"]) <= 5
            retry_afters.add(headers["Retry-After"])
        assert len(retry_afters) > 1  # jittered, so shed clients do not return in step
        status, _, _ = await get(
            client, proxy, "/reports", headers={"X-Request-Priority": "critical"}
        )
        assert status == 503  # a request cannot raise its priority
        status, _, _ = await get(client, proxy, "/", headers={"X-Request-Priority": "sheddable"})
        assert status == 503  # but it may lower it
        status, _, _ = await get(client, proxy, "/pay", headers={"X-Request-Priority": "sheddable"})
        assert status == 503
        assert fleet.hits() == before  # no shed request reached an upstream

        status, body, headers = await get(client, proxy, "/")
        assert (status, body[:2]) == (200, "v1")
        assert not SHED_HEADERS & set(headers)
        status, _, _ = await get(client, proxy, "/", headers={"X-Request-Priority": "critical"})
        assert status == 200
        assert (await get(client, proxy, "/pay"))[0] == 200

        ok(await cli("brownout", "enable", "still overloaded", "--level", "2", *remote(shaper)))
        for path in ("/", "/reports"):
            status, _, headers = await get(client, proxy, path)
            assert (status, headers.get("X-Shaper-Shed")) == (503, "1"), path
        status, _, _ = await get(client, proxy, "/", headers={"X-Request-Priority": "critical"})
        assert status == 503
        for _ in range(5):
            assert (await get(client, proxy, "/pay"))[0] == 200
        shown = (await flags(client, admin))["brownout"]
        assert (shown["level"], shown["effective_level"]) == (2, 2)
        assert shown["cause"] == f"{ACTOR}: still overloaded"

        ok(await cli("brownout", "disable", *remote(shaper)))
        for path in ("/", "/reports", "/pay"):
            assert (await get(client, proxy, path))[0] == 200, path

        async with client.get(admin + "/api/observability/golden-signals") as response:
            stable = (await response.json())["routes"]["shop"]["variants"]["stable"]["1m"]
        assert stable["errors"] == 0  # shed requests never count as upstream failures
        assert stable["requests"] == 3  # ... nor as requests of the rollout's variants


async def test_automatic_brownout_raises_and_lowers_with_its_cause_shown(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path, admin_token: str
) -> None:
    """Too many requests in flight to v1 raise the brownout level by itself (sheddable shed,
    cause in status, metrics and the audit log); when they finish it comes back down."""
    fleet = await Fleet.start(start_upstream)
    raw = _config(fleet, weight=0, state_dir=tmp_path / "state")
    raw["flags"] = {
        "auto_brownout": {"max_in_flight": 2, "raise_after": "300ms", "lower_after": "300ms"}
    }
    shaper = await start_shaper(raw)
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    async with aiohttp.ClientSession() as client:
        assert (await get(client, proxy, "/reports"))[0] == 200
        slow = [asyncio.ensure_future(get(client, proxy, "/pay/slow")) for _ in range(3)]
        try:

            async def shedding() -> bool:
                return (await get(client, proxy, "/reports"))[0] == 503

            assert await eventually(shedding)
            shown = (await flags(client, admin))["brownout"]
            assert shown["level"] == 0  # no operator set it
            assert shown["effective_level"] >= 1
            assert shown["cause"].startswith("automatic: v1: 3 in flight > 2")
            table = ok(await cli("status", *remote(shaper))).out
            assert "automatic: v1: 3 in flight > 2" in table.splitlines()[0]
            async with client.get(admin + "/metrics") as response:
                metrics = await response.text()
            assert re.search(r'shaper_brownout_level\{source="automatic"\} [12]\.0', metrics)
        finally:
            for backend in (fleet.v1a, fleet.v1b):
                backend.release.set()
            results = await asyncio.gather(*slow)
        assert [status for status, _, _ in results] == [200, 200, 200]  # critical: never shed

        async def recovered() -> bool:
            return (await get(client, proxy, "/reports"))[0] == 200

        assert await eventually(recovered)
        assert (await flags(client, admin))["brownout"]["effective_level"] == 0

    audit = (tmp_path / "state" / "audit.log").read_text().splitlines()
    automatic = [e for e in map(json.loads, audit) if e.get("flag") == "auto_brownout"]
    assert automatic[0]["actor"] == "governor"
    assert automatic[0]["after"] == 1
    assert automatic[-1]["after"] == 0


# -- quarantine ----------------------------------------------------------------------------------


async def test_quarantine_endpoint_then_release(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """Quarantining one endpoint of a two-endpoint upstream leaves only the other answering;
    `release` puts it back; releasing it twice is refused."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=0))
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    target = f"v1/{fleet.v1a.url}"
    async with aiohttp.ClientSession() as client:
        assert set(await answers(client, proxy, "/pay", count=6)) == {"v1a", "v1b"}

        result = ok(await cli("quarantine", target, "--reason", "flaky NIC", *remote(shaper)))
        changed(result, f"quarantine {target}")
        assert set(await answers(client, proxy, "/pay", count=10)) == {"v1b"}
        assert set(await answers(client, proxy, "/", count=10)) == {"v1b"}
        [shown] = (await flags(client, admin))["quarantine"]
        assert shown["target"] == target
        assert shown["override"]["reason"] == "flaky NIC"

        ok(await cli("release", target, *remote(shaper)))
        assert set(await answers(client, proxy, "/pay", count=6)) == {"v1a", "v1b"}
        assert (await flags(client, admin))["quarantine"] == []
        refused(await cli("release", target, *remote(shaper)), 1, "not quarantined")


def _with_v3(raw: dict[str, Any], present: bool) -> dict[str, Any]:
    """The config with (or without) an extra upstream v3, used by no route."""
    upstreams = {k: v for k, v in raw["upstreams"].items() if k != "v3"}
    if present:
        upstreams["v3"] = {"endpoints": ["http://127.0.0.1:9"]}
    return {**raw, "upstreams": upstreams}


async def test_a_quarantine_on_an_upstream_a_reload_removed_can_be_released(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path, admin_token: str
) -> None:
    """After v3 is quarantined and a reload removes it, `release v3` ends the quarantine
    (before, 404 unknown upstream, and re-adding v3 brought it back quarantined); an unknown
    target that the flags do not hold is still refused, for release and for quarantine."""
    fleet = await Fleet.start(start_upstream)
    config = tmp_path / "rollouts.yaml"
    raw = _with_v3(_config(fleet, weight=0), present=True)
    shaper = await start_shaper(raw, path=config)
    admin = _url(shaper.admin_address)
    ok(await cli("quarantine", "v3", "--reason", "bad host", *remote(shaper)))

    async def reload(present: bool) -> None:
        config.write_text(yaml.safe_dump(_with_v3(raw, present)))
        async with aiohttp.ClientSession() as client:
            async with client.post(
                admin + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 200, await r.text()

    await reload(present=False)
    assert "v3" not in shaper.runtime.snapshot.upstreams
    async with aiohttp.ClientSession() as client:
        assert [q["target"] for q in (await flags(client, admin))["quarantine"]] == ["v3"]
    refused(await cli("quarantine", "v3", *remote(shaper)), 1, "unknown upstream 'v3'")
    changed(ok(await cli("release", "v3", *remote(shaper))), "quarantine v3")
    async with aiohttp.ClientSession() as client:
        assert (await flags(client, admin))["quarantine"] == []
    refused(await cli("release", "v3", *remote(shaper)), 1, "unknown upstream 'v3'")
    refused(await cli("release", "v9", *remote(shaper)), 1, "unknown upstream 'v9'")
    await reload(present=True)
    assert shaper.runtime.snapshot.upstreams["v3"].quarantined is False


async def test_local_mode_releases_a_quarantine_the_config_no_longer_names(
    tmp_path: Path,
) -> None:
    """In local mode too, a quarantine on an upstream the file no longer lists can be
    released, while quarantining it, or releasing what is not held, is refused."""
    state = tmp_path / "state"
    fleet = Fleet(Backend("v1a"), Backend("v1b"), Backend("v2"))
    for port, backend in enumerate((fleet.v1a, fleet.v1b, fleet.v2), start=9001):
        backend.url = f"http://127.0.0.1:{port}"  # never called: no server in local mode
    raw = _config(fleet, state_dir=state)
    config = tmp_path / "rollouts.yaml"
    local = ("--state-dir", str(state), "-c", str(config), "--actor", ACTOR)
    config.write_text(yaml.safe_dump(_with_v3(raw, present=True)))
    ok(await cli("quarantine", "v3", "--reason", "bad host", *local))
    config.write_text(yaml.safe_dump(_with_v3(raw, present=False)))
    refused(await cli("quarantine", "v3", *local), 1, "unknown upstream 'v3'")
    changed(ok(await cli("release", "v3", *local)), "quarantine v3")
    refused(await cli("release", "v3", *local), 1, "unknown upstream 'v3'")
    refused(await cli("release", "v9", *local), 1, "unknown upstream 'v9'")


@pytest.mark.parametrize("form", ["upstream", "endpoint"])
async def test_quarantine_whole_canary_sends_its_users_to_stable(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str, form: str
) -> None:
    """A quarantined canary upstream (as a whole, or its only endpoint) sends canary users to
    the stable without counting it against the canary; release brings them back to it."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=100))
    proxy = _url(shaper.proxy_address)
    target = "v2" if form == "upstream" else f"v2/{fleet.v2.url}"
    async with aiohttp.ClientSession() as client:
        assert set(await answers(client, proxy)) == {"v2"}
        ok(await cli("quarantine", target, "--reason", "bad build", *remote(shaper)))
        assert {a[:2] for a in await answers(client, proxy)} == {"v1"}
        assert shaper.metrics.diverted.get("shop", 0) == 0
        ok(await cli("release", target, *remote(shaper)))
        assert set(await answers(client, proxy)) == {"v2"}


async def test_ttl_expiry_reverts_by_itself(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """Safe mode and a quarantine set with `--ttl 4s` revert on their own, and the expiry is
    in the audit log with actor "expiry"."""
    fleet = await Fleet.start(start_upstream)
    raw = _config(fleet, weight=100)
    shaper = await start_shaper(raw)
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    target = f"v1/{fleet.v1a.url}"
    async with aiohttp.ClientSession() as client:
        # Long enough that both are in force when checked on a loaded machine.
        ok(await cli("safe-mode", "enable", "--ttl", "4s", "--reason", "drill", *remote(shaper)))
        ok(await cli("quarantine", target, "--ttl", "4s", *remote(shaper)))
        assert set(await answers(client, proxy, count=4)) == {"v1b"}

        async def reverted() -> bool:
            shown = await flags(client, admin)
            return not shown["safe_mode"]["enabled"] and shown["quarantine"] == []

        assert await eventually(reverted, seconds=10), await flags(client, admin)
        assert set(await answers(client, proxy)) == {"v2"}
        assert set(await answers(client, proxy, "/pay", count=6)) == {"v1a", "v1b"}

    audit = Path(raw["state_dir"]) / "audit.log"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    expired = {(e["flag"], e["target"]) for e in entries if e.get("action") == "expired"}
    assert expired == {("safe_mode", ""), ("quarantine", target)}
    assert all(e["actor"] == "expiry" for e in entries if e.get("action") == "expired")


# -- persistence and local mode ----------------------------------------------------------------


async def test_flags_survive_a_restart_of_the_serve_process(
    start_upstream: StartUpstream, tmp_path: Path, admin_token: str
) -> None:
    """Flags set on one `shaper serve` are in force in the next one started on the same
    config (its state directory is relative to the config file), and readable in local mode
    while no server runs."""
    fleet = await Fleet.start(start_upstream)
    config = tmp_path / "rollouts.yaml"
    raw = _config(fleet, weight=100)
    raw["state_dir"] = "state"
    config.write_text(yaml.safe_dump(raw))
    target = f"v1/{fleet.v1a.url}"

    first = await ServeProcess.start(config)
    try:
        ok(await cli("safe-mode", "enable", "--reason", "incident 7", *remote(first.admin)))
        ok(await cli("brownout", "enable", "db slow", "--ttl", "1h", *remote(first.admin)))
        ok(await cli("quarantine", target, *remote(first.admin)))
    finally:
        assert await first.stop() == 0

    local = ok(await cli("status", "--state-dir", str(tmp_path / "state"), "-o", "json"))
    offline = json.loads(local.out)["flags"]
    assert offline["safe_mode"]["enabled"] is True
    assert offline["brownout"]["level"] == 1
    assert [q["target"] for q in offline["quarantine"]] == [target]

    second = await ServeProcess.start(config)
    try:
        async with aiohttp.ClientSession() as client:
            assert set(await answers(client, second.proxy, count=10)) == {"v1b"}
            status, _, headers = await get(client, second.proxy, "/reports")
            assert (status, headers.get("X-Shaper-Shed")) == (503, "1")
            shown = await flags(client, second.admin)
        assert shown["safe_mode"]["override"]["reason"] == "incident 7"
        override = shown["brownout"]["override"]
        assert (override["actor"], override["reason"]) == (ACTOR, "db slow")
        assert override["expires"] - override["set_at"] == 3600
    finally:
        assert await second.stop() == 0


async def test_local_mode_with_no_server_then_start(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path, admin_token: str
) -> None:
    """`safe-mode enable --state-dir DIR -c FILE` works with no server running, and a server
    started on that state directory is in safe mode from its first request."""
    fleet = await Fleet.start(start_upstream)
    state = tmp_path / "state"
    raw = _config(fleet, weight=100, state_dir=state)
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(raw))
    local = ("--state-dir", str(state), "-c", str(config), "--actor", ACTOR)

    result = ok(await cli("safe-mode", "enable", "--reason", "before the deploy", *local))
    change = await explained(changed(result, "safe_mode"), local)
    assert (change["actor"], change["after"]) == (ACTOR, True)
    refused(await cli("quarantine", "v9", *local), 1, "unknown upstream 'v9'")
    refused(await cli("release", "v2", *local), 1, "not quarantined")

    shaper = await start_shaper(raw)
    async with aiohttp.ClientSession() as client:
        assert {a[:2] for a in await answers(client, _url(shaper.proxy_address))} == {"v1"}
    shown = json.loads(ok(await cli("status", "-o", "json", *remote(shaper))).out)["flags"]
    assert shown["safe_mode"]["enabled"] is True
    assert shown["safe_mode"]["override"]["reason"] == "before the deploy"
    assert shown["safe_mode"]["override"]["actor"] == ACTOR


async def test_local_mode_leaves_damaged_state_to_the_server(
    start_upstream: StartUpstream, tmp_path: Path, admin_token: str
) -> None:
    """With a state document damaged, local-mode commands say so in one line, exit 1 and
    write nothing: one route's action would replace every other route's state, a flag change
    every other override, and only a server knows what they were (it rewrites the document
    from memory, or fails safe as it starts)."""
    fleet = await Fleet.start(start_upstream)
    state = tmp_path / "state"
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(_config(fleet, weight=100, state_dir=state)))
    local = ("--state-dir", str(state), "-c", str(config), "--actor", ACTOR)
    documents = state / "state"
    documents.mkdir(parents=True)
    for name, damage, act in (
        ("rollouts", b'{"shop": ', ("rollback", "shop")),
        ("flags", b"[]", ("quarantine", "v2", "--reason", "bad build")),
    ):
        (documents / f"{name}.json").write_bytes(damage)
        for args in (act, ("status",)):
            refused(await cli(*args, *local), 1, f"state document '{name}' is damaged")
        assert (documents / f"{name}.json").read_bytes() == damage
        assert not list(documents.glob("*.damaged-*"))
        (documents / f"{name}.json").unlink()
    ok(await cli("quarantine", "v2", "--reason", "bad build", *local))  # undamaged: works


async def test_local_mode_change_is_picked_up_by_a_running_server(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path, admin_token: str
) -> None:
    """A local-mode quarantine reaches a running server within a few seconds, a remote change
    made right after it does not overwrite it, and a local release is picked up too."""
    fleet = await Fleet.start(start_upstream)
    state = tmp_path / "state"
    raw = _config(fleet, weight=100, state_dir=state)
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(raw))
    local = ("--state-dir", str(state), "-c", str(config), "--actor", ACTOR)
    shaper = await start_shaper(raw)
    proxy, admin = _url(shaper.proxy_address), _url(shaper.admin_address)
    async with aiohttp.ClientSession() as client:
        assert set(await answers(client, proxy, count=5)) == {"v2"}

        ok(await cli("quarantine", "v2", "--reason", "bad build", *local))
        ok(await cli("brownout", "enable", "shed reports", *remote(shaper)))

        async def canary_out() -> bool:
            return {a[:2] for a in await answers(client, proxy, count=5)} == {"v1"}

        assert await eventually(canary_out)
        shown = await flags(client, admin)
        assert [q["target"] for q in shown["quarantine"]] == ["v2"]
        assert shown["brownout"]["level"] == 1

        ok(await cli("release", "v2", *local))

        async def canary_back() -> bool:
            return set(await answers(client, proxy, count=5)) == {"v2"}

        assert await eventually(canary_back)
        assert (await flags(client, admin))["brownout"]["level"] == 1


class _RacingStore(FileStateStore):
    """A state store where another process's write lands the instant the lock is released."""

    intrude: Callable[[], None] | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with super().locked():
            yield
        intrude, self.intrude = self.intrude, None
        if intrude is not None:
            intrude()


async def test_local_mode_write_right_after_a_remote_change_is_not_lost(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """A local-mode change that lands just after the server's own change is still picked up
    by the server's next tick."""
    fleet = await Fleet.start(start_upstream)
    config = to_config(_config(fleet, state_dir=tmp_path / "state"))
    runtime = Runtime(config, None, Metrics(time.monotonic, "c"))
    try:
        store = _RacingStore(tmp_path / "state")
        audit = AuditLog(tmp_path / "state")
        keeper = FlagKeeper(runtime, store, audit)
        cli_store = FileStateStore(tmp_path / "state")  # the CLI's view, as another process

        def cli_quarantines_v2() -> None:
            apply_flag_change(
                cli_store,
                audit,
                FlagDefaults(),
                lambda f: f.set_quarantine("v2", True, ACTOR, "bad build", time.time()),
            )

        store.intrude = cli_quarantines_v2
        keeper.change(lambda f: f.set_safe_mode(True, ACTOR, "incident", time.time()))
        keeper.tick()
        assert keeper.flags.safe_mode
        assert keeper.flags.quarantined == {"v2"}
        assert runtime.snapshot.upstreams["v2"].quarantined
    finally:
        await runtime.snapshot.upstreams.close()


async def test_a_lock_held_elsewhere_delays_the_pick_up_of_a_local_change_not_loses_it(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """A local-mode change written, then the store's lock held by another process (a second
    CLI, suspended): the server's flag tick waits at most its lock_wait, raises nothing, and
    picks the change up at the first tick after the lock is free (the version it had seen
    was marked read before the lock, so the change was never applied)."""
    fleet = await Fleet.start(start_upstream)
    config = to_config(_config(fleet, state_dir=tmp_path / "state"))
    runtime = Runtime(config, None, Metrics(time.monotonic, "c"))
    try:
        state = tmp_path / "state"
        audit = AuditLog(state)
        keeper = FlagKeeper(runtime, FileStateStore(state, lock_wait=0.005), audit)
        cli_store = FileStateStore(state)  # the CLIs' view, as other processes
        apply_flag_change(
            cli_store,
            audit,
            FlagDefaults(),
            lambda f: f.set_quarantine("v2", True, ACTOR, "bad build", time.time()),
        )
        with cli_store.locked():
            keeper.tick()
            keeper.tick()
            assert keeper.flags.quarantined == frozenset()
        keeper.tick()
        assert keeper.flags.quarantined == {"v2"}
        assert runtime.snapshot.upstreams["v2"].quarantined
    finally:
        await runtime.snapshot.upstreams.close()


async def test_local_mode_without_config_does_not_claim_a_change_it_did_not_make(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """`safe-mode disable --state-dir DIR` with no -c, under a YAML that turns safe mode on,
    either takes effect or is refused with one line; it never reports success for nothing."""
    fleet = await Fleet.start(start_upstream)
    state = tmp_path / "state"
    raw = _config(fleet, state_dir=state)
    raw["flags"] = {"safe_mode": True}
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(raw))

    result = await cli("safe-mode", "disable", "--state-dir", str(state), "--actor", ACTOR)
    status = ok(await cli("status", "--state-dir", str(state), "-c", str(config), "-o", "json"))
    in_safe_mode = json.loads(status.out)["flags"]["safe_mode"]["enabled"]
    refused_clearly = result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert refused_clearly or not in_safe_mode, (result, in_safe_mode)


# -- status, rollout actions, explain ------------------------------------------------------------


async def test_status_table_and_json(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """`status` shows the rollout, its weight, golden signals per version, breakers and the
    active flags with their expiry, as a table and as `-o json`; a ROUTE filters it."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=30))
    target = f"v1/{fleet.v1b.url}"
    async with aiohttp.ClientSession() as client:
        seen = await answers(client, _url(shaper.proxy_address), count=40)
    assert {a[:2] for a in seen} == {"v1", "v2"}
    ok(await cli("quarantine", target, "--ttl", "30m", "--reason", "flaky", *remote(shaper)))
    ok(await cli("brownout", "enable", "db slow", "--ttl", "10m", *remote(shaper)))

    table = ok(await cli("status", *remote(shaper))).out
    lines = table.splitlines()
    assert lines[0] == (
        f"flags: safe mode off | brownout 1 ({ACTOR}: db slow) (expires in 10m) "
        f"| quarantined: {target} (expires in 30m)"
    )
    [shop] = [line for line in lines if line.startswith("shop ")]
    assert shop.split()[:3] == ["shop", "progressing", "30%"]
    stable = next(line for line in lines if line.split()[:2] == ["stable", "v1"])
    canary = next(line for line in lines if line.split()[:2] == ["canary", "v2"])
    assert "req/s" in stable and "err  0.00%" in stable and "p99" in canary
    assert "BREAKERS" in lines
    assert any(fleet.v1a.url in line and "closed" in line for line in lines)

    status = json.loads(ok(await cli("status", "shop", "-o", "json", *remote(shaper))).out)
    [rollout] = status["rollouts"]
    assert (rollout["route"], rollout["status"], rollout["weight"]) == ("shop", "progressing", 30)
    variants = status["signals"]["routes"]["shop"]["variants"]
    assert variants["stable"]["1m"]["requests"] + variants["canary"]["1m"]["requests"] == 40
    assert variants["canary"]["1m"]["requests"] > 0
    [quarantined] = status["flags"]["quarantine"]
    override = quarantined["override"]
    assert (quarantined["target"], override["actor"], override["reason"]) == (
        target,
        ACTOR,
        "flaky",
    )
    assert override["expires"] - override["set_at"] == 1800
    assert status["flags"]["brownout"]["effective_level"] == 1
    assert status["upstreams"]["v1"][0]["breaker"] == "closed"

    refused(await cli("status", "nope", *remote(shaper)), 1, "no rollout named 'nope'")


async def test_rollout_actions_and_explain(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """set-weight, pause, resume, rollback (then `explain` shows actor and reason), retry and
    promote act on the live split; a second rollback and an unknown route are refused."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=100))
    proxy, where = _url(shaper.proxy_address), remote(shaper)
    async with aiohttp.ClientSession() as client:
        ok(await cli("set-weight", "shop", "0", "--reason", "hold on", *where))
        assert {a[:2] for a in await answers(client, proxy, count=5)} == {"v1"}
        ok(await cli("pause", "shop", *where))
        ok(await cli("resume", "shop", *where))

        result = ok(await cli("rollback", "shop", "--reason", "bad deploy 123", *where))
        assert result.out.startswith("shop: rollback (progressing -> rolled_back")
        match = re.search(r"decision (\S+)$", result.out.strip())
        assert match is not None, result.out
        decision_id = match[1]

        text = ok(await cli("explain", decision_id, *where)).out
        head = text.split("\n  inputs:")[0]  # the fields; the inputs follow, indented
        fields = dict(line.split(None, 1) for line in head.splitlines()[1:] if line.strip())
        assert text.splitlines()[0].startswith(decision_id)
        assert fields["route"] == "shop"
        assert fields["action"] == "rollback"
        assert fields["actor"] == ACTOR
        assert fields["reason"] == "bad deploy 123"
        entry = json.loads(ok(await cli("explain", decision_id, "-o", "json", *where)).out)
        assert (entry["id"], entry["actor"], entry["reason"]) == (
            decision_id,
            ACTOR,
            "bad deploy 123",
        )
        assert (entry["status_before"], entry["status_after"]) == ("progressing", "rolled_back")

        refused(await cli("rollback", "shop", *where), 1, "already rolled back")
        refused(await cli("rollback", "nope", *where), 1, "no rollout named 'nope'")

        ok(await cli("retry", "shop", *where))
        assert set(await answers(client, proxy, count=5)) == {"v2"}
        ok(await cli("promote", "shop", *where))
        status = json.loads(ok(await cli("status", "shop", "-o", "json", *where)).out)
        assert status["rollouts"][0]["status"] == "promoted"


async def test_status_watch_redraws_in_place_until_ctrl_c(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """`status --watch` clears and redraws the screen each interval and exits 0 on Ctrl-C."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=30))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPER_ADMIN")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        "--watch",
        "--interval",
        "0.1",
        *remote(shaper),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert process.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(20):
            while seen.count(b"\x1b[H\x1b[2J") < 2:
                chunk = await process.stdout.read(4096)
                assert chunk, seen
                seen += chunk
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, err = await process.communicate()
    assert process.returncode == 0, err
    assert b"Traceback" not in err
    frame = seen.split(b"\x1b[H\x1b[2J")[1].decode()
    assert "Ctrl-C" in frame
    assert any(line.split()[:3] == ["shop", "progressing", "30%"] for line in frame.splitlines())


def test_status_into_a_closed_pipe_prints_no_traceback(tmp_path: Path) -> None:
    """`shaper status` whose reader has already gone (`| head`) ends without a traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "status", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the CLI writes anything
    err = process.stderr.read().decode()
    process.wait(timeout=30)
    process.stderr.close()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err


# -- exit codes ----------------------------------------------------------------------------------


async def test_exit_codes_and_one_line_errors(
    start_upstream: StartUpstream, start_shaper: StartShaper, admin_token: str
) -> None:
    """Usage errors exit 2, refusals and a bad token 1, an unreachable server 3: each with
    one line on stderr and no traceback; a rejected call changes nothing."""
    fleet = await Fleet.start(start_upstream)
    shaper = await start_shaper(_config(fleet, weight=0))
    where = remote(shaper)
    dead = remote(f"http://127.0.0.1:{free_port()}")
    cases: list[tuple[tuple[str, ...], str | None, int, str]] = [
        (("quarantine",), TOKEN, 2, "target"),
        (("set-weight", "shop", "150", *where), TOKEN, 2, "between 0 and 100"),
        (("safe-mode", "enable", "--ttl", "soon", *where), TOKEN, 2, "--ttl"),
        (("safe-mode", "enable", "--ttl", "9000h", *where), TOKEN, 2, "--ttl must be at most"),
        (("brownout", "enable", *where), TOKEN, 2, "REASON"),
        (("brownout", "enable", "x", "--level", "3", *where), TOKEN, 2, "--level"),
        (("status", *dead), TOKEN, 3, "cannot reach the admin API"),
        (("safe-mode", "enable", *dead), TOKEN, 3, "cannot reach the admin API"),
        (("safe-mode", "enable", *where), "wrong", 1, "unauthorized"),
        (("quarantine", "v2", *where), None, 1, "unauthorized"),
        (("release", "v2", *where), TOKEN, 1, "not quarantined"),
        (("quarantine", "v9", *where), TOKEN, 1, "unknown upstream 'v9'"),
        (("quarantine", "v1/http://127.0.0.1:1", *where), TOKEN, 1, "has no endpoint"),
        (("rollback", "nope", *where), TOKEN, 1, "no rollout named 'nope'"),
        (("explain", "d-0000000000000-000000", *where), TOKEN, 1, "no decision"),
    ]
    results = await asyncio.gather(*(cli(*args, token=token) for args, token, _, _ in cases))
    for (args, _, code, fragment), result in zip(cases, results, strict=True):
        try:
            refused(result, code, fragment)
        except AssertionError as exc:
            raise AssertionError(f"shaper {' '.join(args)}: {exc}") from None
    async with aiohttp.ClientSession() as client:
        shown = await flags(client, _url(shaper.admin_address))
    assert shown["safe_mode"]["enabled"] is False
    assert shown["quarantine"] == []
