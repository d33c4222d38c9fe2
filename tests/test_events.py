"""Events against a real local webhook receiver: signed delivery, the dead-letter queue while
the receiver is down (the data path unaffected), restarts, draining in order, kill -9."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config import Webhook
from proxy.events import EventBus
from proxy.outbox import Outbox
from proxy.server import Shaper, StartupError

from .conftest import StartShaper, StartUpstream, make_config, to_config

SECRET = "hook-secret"
TOKEN = "t0ken"


class Receiver:
    """A webhook receiver that records what it gets; `mode` is ok, down (503) or hang."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrived = asyncio.Event()
        self.hanging = 0

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            if self.mode == "hang":
                self.hanging += 1
                await asyncio.sleep(60)
            if self.mode == "down":
                return web.Response(status=503)
            self.received.append(json.loads(body))
            self.headers.append(
                {
                    "signature": request.headers["X-Shaper-Signature"],
                    "id": request.headers["X-Shaper-Event-Id"],
                    "expected": "sha256="
                    + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
                }
            )
            self.arrived.set()
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        return app


def _config(upstream: str, hook: str, tmp_path: Path, **webhook: Any) -> dict[str, Any]:
    spec = {
        "name": "chat",
        "url": hook,
        "secret_env": "SHAPER_TEST_HOOK_SECRET",
        "types": ["*"],
        "retries": 1,
        "backoff": "50ms",
        "timeout": "2s",
    }
    spec.update(webhook)
    raw = make_config(
        {"v1": [upstream], "v2": [upstream]},
        [
            {
                "name": "shop",
                "match": {"path_prefix": "/"},
                "rollout": {"stable": "v1", "canary": "v2", "weight": 10},
            }
        ],
        events={"webhooks": [spec]},
    )
    raw["state_dir"] = str(tmp_path / "state")
    return raw


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAPER_TEST_HOOK_SECRET", SECRET)
    monkeypatch.setenv("SHAPER_TEST_TOKEN", TOKEN)


def _hello() -> web.Application:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _admin(shaper: Shaper) -> str:
    return "http://{}:{}".format(*shaper.admin_address)


async def _post(shaper: Shaper, path: str, body: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as client:
        async with client.post(
            _admin(shaper) + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def _get(shaper: Shaper, path: str) -> Any:
    async with aiohttp.ClientSession() as client:
        async with client.get(_admin(shaper) + path) as r:
            return await r.json()


async def _until(check: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_events_are_delivered_signed(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A rollback and a flag change reach the receiver with a valid HMAC and the event id."""
    receiver = Receiver()
    hook = await start_upstream(receiver.app()) + "/hook"
    shaper = await start_shaper(_config(await start_upstream(_hello()), hook, tmp_path))
    await _post(shaper, "/api/rollouts/shop/rollback", {"reason": "bad deploy"})
    await _post(shaper, "/api/flags/brownout", {"level": 1, "reason": "db hot", "ttl": "1m"})

    async def both() -> bool:
        types = {e["type"] for e in receiver.received}
        return {"rollout.rollback", "brownout.level"} <= types

    await _until(both)
    for headers in receiver.headers:
        assert hmac.compare_digest(headers["signature"], headers["expected"])
    rollback = next(e for e in receiver.received if e["type"] == "rollout.rollback")
    assert rollback["route"] == "shop"
    assert rollback["details"]["reason"] == "bad deploy"
    assert rollback["id"] in {h["id"] for h in receiver.headers}
    watchdogs = await _get(shaper, "/api/observability/watchdogs")
    assert watchdogs["sinks"]["chat"]["outbox_depth"] == 0
    assert watchdogs["sinks"]["chat"]["dlq_depth"] == 0
    assert watchdogs["event_loop_lag_ms"]["last"] is not None


async def test_receiver_down_fills_the_dlq_and_the_proxy_is_unaffected(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """With the receiver hanging, requests still flow; with it refusing, events go to the
    dead-letter queue after their retries, and a restart keeps them."""
    receiver = Receiver()
    receiver.mode = "hang"
    hook = await start_upstream(receiver.app()) + "/hook"
    upstream = await start_upstream(_hello())
    raw = _config(upstream, hook, tmp_path, timeout="30s")
    shaper = await start_shaper(raw)
    await _post(shaper, "/api/flags/safe-mode", {"enabled": True, "reason": "x"})

    async def hanging() -> bool:
        return receiver.hanging >= 1

    await _until(hanging)
    # The only delivery in flight is stuck; the data path does not care.
    async with aiohttp.ClientSession() as client:
        for _ in range(50):
            async with client.get("http://{}:{}/".format(*shaper.proxy_address)) as r:
                assert r.status == 200
    await shaper.stop()

    receiver.mode = "down"
    again = Shaper(to_config(_config(upstream, hook, tmp_path)), tick_interval=0.2)
    await again.start()
    try:
        for level in (1, 2, 0):
            await _post(again, "/api/flags/brownout", {"level": level, "reason": f"l{level}"})

        # Before the restart: rollout.start (its delivery hung) and safe_mode (waiting behind
        # it); after: three brownout changes. All five end up dead, in order.
        async def all_dead() -> bool:
            return len((await _get(again, "/api/dlq"))["dead_letters"]) == 5

        await _until(all_dead)
        letters = (await _get(again, "/api/dlq"))["dead_letters"]
        assert [d["type"] for d in letters] == ["rollout.start", "safe_mode"] + [
            "brownout.level"
        ] * 3
        metrics = ""
        async with aiohttp.ClientSession() as client:
            async with client.get(_admin(again) + "/metrics") as r:
                metrics = await r.text()
        assert 'shaper_dlq_depth{sink="chat"} 5.0' in metrics
        assert "shaper_event_queue_depth" in metrics
        assert "shaper_event_loop_lag_seconds" in metrics
    finally:
        await again.stop()
    # The dead letters are on disk.
    outbox = Outbox(tmp_path / "state")
    assert len(outbox.dead("chat")) == 5
    outbox.close()


async def test_drain_delivers_in_order_and_empties_the_dlq(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """After the receiver returns, a drain (dry run first) re-delivers every dead letter in
    publication order and leaves the queue empty."""
    receiver = Receiver()
    receiver.mode = "down"
    hook = await start_upstream(receiver.app()) + "/hook"
    raw = _config(await start_upstream(_hello()), hook, tmp_path, types=["brownout.*"])
    shaper = await start_shaper(raw)
    reasons = [f"step {i}" for i in range(5)]
    for i, reason in enumerate(reasons):
        await _post(shaper, "/api/flags/brownout", {"level": i % 2 + 1 if i < 4 else 0,
                                                     "reason": reason})  # fmt: skip

    async def dead() -> bool:
        return len((await _get(shaper, "/api/dlq"))["dead_letters"]) == len(reasons)

    await _until(dead)
    # A page at a time, in order, each naming the next; bad paging is a 400 naming it.
    pages, after = [], 0
    while True:
        page = await _get(shaper, f"/api/dlq?sink=chat&limit=2&after={after}")
        assert page["total"] == len(reasons)
        pages.append([d["event"]["details"]["reason"] for d in page["dead_letters"]])
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert pages == [reasons[0:2], reasons[2:4], reasons[4:]]
    whole = await _get(shaper, "/api/dlq")
    assert (whole["total"], whole["next_after"], len(whole["dead_letters"])) == (5, None, 5)
    async with aiohttp.ClientSession() as client:
        for query, detail in (
            ("limit=0", "limit must be an integer 1-1000"),
            ("limit=1001", "limit must be an integer 1-1000"),
            ("limit=two", "limit must be an integer 1-1000"),
            ("after=-1", "after must be an integer of 0 or more"),
            ("after=" + "9" * 5000, "after must be an integer of 0 or more"),
        ):
            async with client.get(_admin(shaper) + "/api/dlq?" + query) as r:
                assert (r.status, (await r.json())["detail"]) == (400, detail), query
    async with aiohttp.ClientSession() as client:  # not a boolean: refused, nothing drained
        async with client.post(
            _admin(shaper) + "/api/dlq/drain",
            json={"dry_run": "no"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 400
            assert (await r.json())["detail"] == '"dry_run" must be true or false'
    report = await _post(shaper, "/api/dlq/drain", {"dry_run": True})
    assert report["would_deliver"] == len(reasons)
    assert receiver.received == []
    receiver.mode = "ok"
    report = await _post(shaper, "/api/dlq/drain", {"sink": "chat"})
    assert (report["delivered"], report["failed"], report["remaining"]) == (len(reasons), 0, 0)
    assert [e["details"]["reason"] for e in receiver.received] == reasons
    assert (await _get(shaper, "/api/dlq"))["dead_letters"] == []


_SERVE_LOG = b"proxy listening on http://"


async def _serve(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ},
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = await process.stderr.readline()
            assert line, "serve exited early"
            if _SERVE_LOG in line:
                admin = line.decode().split("admin on ")[1].split(" ")[0]
                return process, admin


async def test_kill_9_during_delivery_loses_nothing(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """Events stored while the receiver hangs survive a kill -9 of the proxy and are all
    delivered after a restart (at least once; a repeat carries the same id)."""
    receiver = Receiver()
    receiver.mode = "hang"
    hook = await start_upstream(receiver.app()) + "/hook"
    raw = _config(
        await start_upstream(_hello()), hook, tmp_path, retries=20, timeout="30s",
        types=["brownout.*"],
    )  # fmt: skip
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(raw))
    process, admin = await _serve(config)
    published = []
    try:
        async with aiohttp.ClientSession() as client:
            for level in (1, 2, 0, 1):
                async with client.post(
                    admin + "/api/flags/brownout",
                    json={"level": level, "reason": f"r{level}"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as r:
                    assert r.status == 200
                    published.append((await r.json())["change"]["id"])

        async def hanging() -> bool:
            return receiver.hanging >= 1

        await _until(hanging)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    receiver.mode = "ok"
    process, admin = await _serve(config)
    try:

        async def all_there() -> bool:
            changes = [e["details"]["change_id"] for e in receiver.received]
            return set(published) <= set(changes)

        await _until(all_there, timeout=20)
        ids = [e["id"] for e in receiver.received]
        # Duplicates, if any, are the same event with the same id.
        by_change: dict[str, set[str]] = {}
        for event in receiver.received:
            by_change.setdefault(event["details"]["change_id"], set()).add(event["id"])
        assert all(len(event_ids) == 1 for event_ids in by_change.values())
        assert len(set(ids)) == len(published)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


async def test_drain_dlq_cli(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """`shaper drain-dlq --dry-run` counts, `drain-dlq` delivers; a failing drain exits 1."""
    receiver = Receiver()
    receiver.mode = "down"
    hook = await start_upstream(receiver.app()) + "/hook"
    raw = _config(await start_upstream(_hello()), hook, tmp_path, types=["brownout.*"])
    shaper = await start_shaper(raw)
    for level in (1, 0):
        await _post(shaper, "/api/flags/brownout", {"level": level, "reason": "cli"})

    async def dead() -> bool:
        return len((await _get(shaper, "/api/dlq"))["dead_letters"]) == 2

    await _until(dead)

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "drain-dlq", "--admin", _admin(shaper), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SHAPER_ADMIN_TOKEN": TOKEN},
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    assert await cli("--dry-run") == (0, "dry run: 2 dead letter(s) would be re-delivered\n", "")
    code, out, _ = await cli("--sink", "chat")
    assert (code, out) == (1, "delivered 0, failed 1, remaining 2\n")
    receiver.mode = "ok"
    assert await cli() == (0, "delivered 2, failed 0, remaining 0\n", "")
    assert [e["details"]["after"] for e in receiver.received] == [1, 0]
    code, _, err = await cli("--sink", "nope")
    assert code == 1 and "no sink named 'nope'" in err


async def test_local_mode_changes_become_events(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A quarantine set by the CLI in local mode, picked up by the running server, is
    announced to the webhooks like any other change."""
    receiver = Receiver()
    hook = await start_upstream(receiver.app()) + "/hook"
    raw = _config(await start_upstream(_hello()), hook, tmp_path, types=["quarantine"])
    config = tmp_path / "rollouts.yaml"
    await start_shaper(raw, path=config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "quarantine", "v2", "--reason", "from the laptop",
        "--state-dir", raw["state_dir"], "-c", str(config), "--actor", "alice",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err

    async def announced() -> bool:
        return any(e["type"] == "quarantine" for e in receiver.received)

    await _until(announced)
    event = next(e for e in receiver.received if e["type"] == "quarantine")
    assert event["upstream"] == "v2"
    assert (event["details"]["actor"], event["details"]["reason"]) == ("alice", "from the laptop")


def _dead_letters(outbox: Outbox, sink: str, count: int, first: int = 0) -> list[str]:
    """`count` events put straight into the sink's dead-letter queue; their ids, in order."""
    ids = [f"e-{n:05d}" for n in range(first, first + count)]
    for event_id in ids:
        outbox.add({"id": event_id, "time": 1000.0, "type": "safe_mode"}, [sink])
        head = outbox.head(sink)
        assert head is not None
        outbox.failed(head, "receiver down", None)
    return ids


def _bus(outbox: Outbox, hook: str) -> EventBus:
    return EventBus(outbox, [Webhook(name="chat", url=hook, secret_env="X")], {"chat": b"s"})


async def test_drain_goes_past_a_page_and_reports_what_is_left(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """With more dead letters than one read returns (1,100: the old cap was 1,000), a dry run
    counts them all, a drain that fails part-way reports the true remainder, and the next
    drain delivers the rest, every letter once and in order."""
    ids: list[str] = []
    accept = 700

    async def hook(request: web.Request) -> web.Response:
        if len(ids) >= accept:
            return web.Response(status=503)
        ids.append(request.headers["X-Shaper-Event-Id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    url = await start_upstream(app) + "/hook"
    outbox = Outbox(tmp_path)
    published = _dead_letters(outbox, "chat", 1100)
    bus = _bus(outbox, url)
    try:
        dry = (await bus.drain("chat", dry_run=True)).to_json()
        assert (dry["would_deliver"], dry["remaining"]) == (1100, 1100)
        partial = (await bus.drain("chat")).to_json()
        assert (partial["delivered"], partial["failed"], partial["remaining"]) == (700, 1, 400)
        assert outbox.counts("chat").dead == 400
        accept = 10_000
        rest = (await bus.drain()).to_json()
        assert (rest["delivered"], rest["failed"], rest["remaining"]) == (400, 0, 0)
        assert outbox.counts("chat").dead == 0
        assert ids == published
    finally:
        await bus.close()


async def test_drain_ends_while_new_dead_letters_keep_arriving(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """Letters that die while a drain runs wait for the next one: the drain delivers what
    was dead when it began, ends, and counts the newcomers as remaining."""
    outbox = Outbox(tmp_path)
    delivered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        delivered.append(request.headers["X-Shaper-Event-Id"])
        _dead_letters(outbox, "chat", 1, first=10_000 + len(delivered))  # one more per delivery
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    url = await start_upstream(app) + "/hook"
    published = _dead_letters(outbox, "chat", 600)
    bus = _bus(outbox, url)
    try:
        report = (await bus.drain("chat")).to_json()
        assert (report["delivered"], report["failed"], report["remaining"]) == (600, 0, 600)
        assert delivered == published
        assert outbox.counts("chat").dead == 600
    finally:
        await bus.close()


async def test_serve_sets_a_damaged_outbox_aside_and_says_so(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """`shaper serve` with garbage in events.db starts (all traffic would be lost otherwise):
    the file is kept under a new name, the loss is an error line, an audit entry and an event
    the webhook receives; a local `drain-dlq` beforehand refuses in one line and leaves it."""
    receiver = Receiver()
    hook = await start_upstream(receiver.app()) + "/hook"
    raw = _config(await start_upstream(_hello()), hook, tmp_path)
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(raw))
    state = Path(raw["state_dir"])
    state.mkdir()
    garbage = b"\x00garbage" * 1000
    (state / "events.db").write_bytes(garbage)

    local = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "drain-dlq", "--state-dir", str(state), "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(local.communicate(), 30)
    assert (local.returncode, out) == (1, b"")
    assert err.decode().splitlines() == [
        f"shaper: the event outbox {state / 'events.db'} is damaged: file is not a database; "
        "`shaper serve` sets it aside when it starts"
    ]
    assert (state / "events.db").read_bytes() == garbage

    process, _ = await _serve(config)
    try:

        async def announced() -> bool:
            return any(e["type"] == "outbox.set_aside" for e in receiver.received)

        await _until(announced)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    kept = [p.name for p in state.iterdir() if p.name.startswith("events.db.damaged-")]
    assert len(kept) == 1 and (state / kept[0]).read_bytes() == garbage
    event = next(e for e in receiver.received if e["type"] == "outbox.set_aside")
    assert event["details"] == {"error": "file is not a database", "kept": kept[0]}
    audit = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    entry = next(e for e in audit if e.get("type") == "outbox")
    assert (entry["action"], entry["actor"]) == ("set_aside", "shaper")
    assert f"set aside as {kept[0]}" in entry["reason"]
    assert Outbox(state).counts("chat").pending == 0  # the fresh outbox delivered it
    assert "Traceback" not in log


async def test_an_outbox_that_cannot_be_opened_stops_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    """Not damage (a directory where events.db should be): nothing is set aside, and the
    start fails with a StartupError naming the file."""
    raw = _config("http://127.0.0.1:1", "http://127.0.0.1:1/hook", tmp_path)
    (tmp_path / "state" / "events.db").mkdir(parents=True)
    with pytest.raises(StartupError, match=r"cannot open the event outbox .*events\.db"):
        Shaper(to_config(raw))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["events.db", "state"]
