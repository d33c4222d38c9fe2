"""kill -9, then restart (RELIABILITY.md §6): a real `shaper serve` process is driven into
several kinds of durable state through its admin API, SIGKILLed, and started again on the same
config and state directory. Rollout states, flags, the audit log, the event outbox and the
dead-letter queue must all come back exactly as they were, together, and the data plane of the
new process must act on them (a rolled-back route answers from the stable, a promoted one from
the canary, a quarantined endpoint gets no traffic, a brownout still sheds)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.outbox import Outbox
from proxy.state import AuditLog

from .conftest import StartUpstream, make_config
from .test_serve import ServeProcess

pytestmark = [pytest.mark.functional, pytest.mark.timeout(30)]

TOKEN = "restart-t0ken"
SECRET = "restart-hook-secret"
ACTOR = "oncall@restart"
ENV = {"SHAPER_TEST_TOKEN": TOKEN, "SHAPER_TEST_HOOK_SECRET": SECRET}
ROLLOUTS = ("shop", "cart", "search", "feed")  # config order: the order of the start events
STATE_FIELDS = (
    "route",
    "generation",
    "status",
    "weight",
    "step",
    "step_started",
    "reason",
    "config_weight",
    "updated",
    "auto_resume",
)
EVENT_TYPES = ["rollout.start"] * 4 + [
    "rollout.set_weight",
    "rollout.rollback",
    "rollout.promote",
    "rollout.pause",
    "brownout.level",
    "quarantine",
]


# -- the world around the proxy ----------------------------------------------------------------


def _named(name: str) -> web.Application:
    """An upstream endpoint that answers every request with its own name."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


class Receiver:
    """A broken webhook receiver: every POST gets a 500; counts hits per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            await request.read()
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            return web.Response(status=500, text="receiver broken")

        app = web.Application()
        app.router.add_post("/{sink}", hook)
        return app


def _config(stable: str, canary: str, api: list[str], hooks: str, state: Path) -> dict[str, Any]:
    def rollout(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path_prefix": f"/{name}"},
            "rollout": {"stable": f"{name}-v1", "canary": f"{name}-v2", **spec},
        }

    upstreams: dict[str, list[str]] = {"api": api, "reports": [stable]}
    for name in ROLLOUTS:
        upstreams[f"{name}-v1"] = [stable]
        upstreams[f"{name}-v2"] = [canary]
    hook = {"secret_env": "SHAPER_TEST_HOOK_SECRET", "types": ["*"], "timeout": "2s"}
    raw = make_config(
        upstreams,
        [
            # Long holds: no step advances by itself during the test.
            rollout("shop", steps=[{"weight": 10, "hold": "1h"}, {"weight": 50, "hold": "1h"}]),
            rollout("cart", weight=100),
            rollout("search", weight=0),
            rollout("feed", weight=20),
            {"name": "api", "match": {"path_prefix": "/api"}, "upstream": "api"},
            {
                "name": "reports",
                "match": {"path_prefix": "/reports"},
                "upstream": "reports",
                "priority": "sheddable",
            },
        ],
        events={
            "webhooks": [
                # No retries: every event lands in this sink's dead-letter queue at once.
                {"name": "dead", "url": f"{hooks}/dead", "retries": 0, **hook},
                # The first attempt fails and the next is due minutes later: the events stay
                # pending in the outbox for the whole test.
                {"name": "slow", "url": f"{hooks}/slow", "retries": 5, "backoff": "1h", **hook},
            ]
        },
    )
    raw["state_dir"] = str(state)
    return raw


# -- talking to the proxy ----------------------------------------------------------------------


class Admin:
    def __init__(self, client: aiohttp.ClientSession, base: str) -> None:
        self.client = client
        self.base = base

    async def get(self, path: str) -> Any:
        async with self.client.get(self.base + path) as r:
            assert r.status == 200, f"GET {path}: {r.status} {await r.text()}"
            return await r.json()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.client.post(
            self.base + path,
            json={"actor": ACTOR, **body},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200, f"POST {path}: {r.status} {await r.text()}"
            return await r.json()


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not reached in {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


async def _traffic(client: aiohttp.ClientSession, proxy: str) -> dict[str, Any]:
    """What the data plane does now for each kind of route, through the proxy port."""

    async def answers(path: str, count: int) -> list[tuple[int, str | None, str]]:
        out = []
        for i in range(count):
            async with client.get(f"{proxy}{path}/{i}") as r:
                out.append((r.status, r.headers.get("X-Shaper-Variant"), await r.text()))
        return out

    async with client.get(f"{proxy}/reports/daily") as r:
        reports = (r.status, r.headers.get("X-Shaper-Shed"))
    return {
        "cart": set(await answers("/cart", 6)),
        "search": set(await answers("/search", 6)),
        "api": {body for _, _, body in await answers("/api", 6)},
        "reports": reports,
    }


def _outbox(state: Path) -> dict[str, Any]:
    """The outbox as stored: pending deliveries of `slow`, dead letters of `dead`."""
    outbox = Outbox(state)
    try:
        return {
            "slow_pending": [
                (d.event_id, d.type, d.attempts, d.next_attempt, d.last_error)
                for d in outbox.pending("slow")
            ],
            "slow_dead": [d.event_id for d in outbox.dead("slow")],
            "dead_pending": [d.event_id for d in outbox.pending("dead")],
            "dead_dead": [(d.event_id, d.type, d.attempts) for d in outbox.dead("dead")],
        }
    finally:
        outbox.close()


async def _record(admin: Admin, state: Path) -> dict[str, Any]:
    """Every piece of durable state, as the admin API (and the audit file) show it."""
    rollouts = (await admin.get("/api/rollouts"))["rollouts"]
    routes = (await admin.get("/api/routes"))["routes"]
    sinks = (await admin.get("/api/observability/watchdogs"))["sinks"]
    return {
        "rollouts": {r["route"]: {k: r[k] for k in STATE_FIELDS} for r in rollouts},
        "weights": {r["name"]: r["weight"] for r in routes},
        "flags": await admin.get("/api/flags"),
        "decisions": {
            name: (await admin.get(f"/api/rollouts/{name}/decisions"))["decisions"]
            for name in ROLLOUTS
        },
        "audit": list(AuditLog(state)),
        "dlq": (await admin.get("/api/dlq"))["dead_letters"],
        "depths": {name: (s["outbox_depth"], s["dlq_depth"]) for name, s in sinks.items()},
        "outbox": _outbox(state),
    }


async def _local_status(config: Path, state: Path) -> dict[str, Any]:
    """`shaper status -o json` in local mode: what the state directory holds, no server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "status", "--state-dir", str(state), "-c", str(config),
        "-o", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **ENV},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    status: dict[str, Any] = json.loads(out)
    return status


# -- the test ----------------------------------------------------------------------------------


async def test_kill_9_then_restart_keeps_all_durable_state(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """Four rollouts in four states (an operator's weight on a stepped rollout, rolled back,
    promoted, paused), a brownout with a TTL, a quarantined endpoint, ten events dead in one
    sink and pending in another: after kill -9 and a restart, all of it is exactly as before,
    and the new process routes by it."""
    stable = await start_upstream(_named("stable"))
    canary = await start_upstream(_named("canary"))
    api_a = await start_upstream(_named("api-a"))
    api_b = await start_upstream(_named("api-b"))
    receiver = Receiver()
    hooks = await start_upstream(receiver.app())
    state = tmp_path / "state"
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(_config(stable, canary, [api_a, api_b], hooks, state)))
    quarantined = f"api/{api_b}"

    # -- first life: build up state ------------------------------------------------------------
    first = await ServeProcess.start(config, env=ENV)
    try:
        async with aiohttp.ClientSession() as client:
            admin = Admin(client, first.admin)
            before = await _traffic(client, first.proxy)
            # The checks below can tell the states apart: this is the traffic before any change.
            assert before == {
                "cart": {(200, "canary", "canary")},
                "search": {(200, "stable", "stable")},
                "api": {"api-a", "api-b"},
                "reports": (200, None),
            }

            # The stepped rollout records one "holding" decision on the supervisor's first
            # tick; wait for it so the audit log's order is known.
            async def holding() -> bool:
                shop = (await admin.get("/api/rollouts/shop/decisions"))["decisions"]
                return any(d["action"] == "hold" for d in shop)

            await _until(holding, "the shop rollout's first hold decision")

            async def rollout(name: str, action: str, body: dict[str, Any]) -> Any:
                return (await admin.post(f"/api/rollouts/{name}/{action}", body))["decision"]

            async def flag(kind: str, body: dict[str, Any]) -> Any:
                return (await admin.post(f"/api/flags/{kind}", body))["change"]

            acted = [
                await rollout("shop", "weight", {"weight": 35, "reason": "by hand"}),
                await rollout("cart", "rollback", {"reason": "bad deploy"}),
                await rollout("search", "promote", {"reason": "looks good"}),
                await rollout("feed", "pause", {"reason": "wait for QA"}),
                await flag("brownout", {"level": 1, "reason": "db hot", "ttl": "1h"}),
                await flag("quarantine", {"target": quarantined, "reason": "flaky NIC"}),
            ]

            # Every event (4 starts + 6 changes) dead in `dead`; in `slow` all still pending,
            # the first after one failed attempt.
            async def settled() -> bool:
                outbox = _outbox(state)
                return (
                    len(outbox["dead_dead"]) == len(EVENT_TYPES)
                    and len(outbox["slow_pending"]) == len(EVENT_TYPES)
                    and outbox["slow_pending"][0][2] == 1
                )

            await _until(settled, "10 dead letters in `dead`, 10 pending in `slow`")
            recorded = await _record(admin, state)
            during = await _traffic(client, first.proxy)
    finally:
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
        killed_at = time.time()
        await first.stop()  # collects the log; no signal is sent to a dead process
    assert first.process.returncode == -signal.SIGKILL, first.log.decode()

    # -- what was recorded is what was asked for (so comparing it later means something) -------
    after_changes = {
        "cart": {(200, "stable", "stable")},
        "search": {(200, "canary", "canary")},
        "api": {"api-a"},
        "reports": (503, "1"),
    }
    assert during == after_changes
    rollouts = recorded["rollouts"]
    assert {n: (r["status"], r["weight"]) for n, r in rollouts.items()} == {
        "shop": ("progressing", 35.0),
        "cart": ("rolled_back", 0.0),
        "search": ("promoted", 100.0),
        "feed": ("paused", 20.0),
    }
    assert recorded["weights"] == {
        "shop": 35.0, "cart": 0.0, "search": 100.0, "feed": 20.0, "api": 0.0, "reports": 0.0,
    }  # fmt: skip
    flags = recorded["flags"]
    assert flags["safe_mode"] == {"enabled": False, "override": None}
    assert (flags["brownout"]["level"], flags["brownout"]["effective_level"]) == (1, 1)
    brownout = flags["brownout"]["override"]
    assert (brownout["actor"], brownout["reason"]) == (ACTOR, "db hot")
    assert brownout["expires"] - brownout["set_at"] == 3600
    assert [(q["target"], q["override"]["reason"]) for q in flags["quarantine"]] == [
        (quarantined, "flaky NIC")
    ]

    audit = recorded["audit"]
    assert [(e.get("route"), e.get("action"), e.get("flag")) for e in audit] == [
        ("shop", "start", None),
        ("cart", "start", None),
        ("search", "start", None),
        ("feed", "start", None),
        ("shop", "hold", None),
        ("shop", "set_weight", None),
        ("cart", "rollback", None),
        ("search", "promote", None),
        ("feed", "pause", None),
        (None, "set", "brownout"),
        (None, "set", "quarantine"),
    ]
    assert audit[-len(acted) :] == acted  # the entries the API answered with, as stored
    assert {e["actor"] for e in acted} == {ACTOR}
    assert len({e["id"] for e in audit}) == len(audit)
    for name in ROLLOUTS:
        assert recorded["decisions"][name] == [e for e in audit if e.get("route") == name]

    # The events: one per audited change except the hold, in order, linked to their entries.
    dlq = recorded["dlq"]
    assert [d["type"] for d in dlq] == EVENT_TYPES
    assert {d["sink"] for d in dlq} == {"dead"}
    announced = [e["id"] for e in audit if e.get("action") != "hold"]
    assert [
        d["event"]["details"].get("decision_id") or d["event"]["details"].get("change_id")
        for d in dlq
    ] == announced
    dead_ids = [d["event_id"] for d in dlq]
    outbox = recorded["outbox"]
    assert [event_id for event_id, _, _ in outbox["dead_dead"]] == dead_ids
    assert [event_id for event_id, *_ in outbox["slow_pending"]] == dead_ids
    assert [t for _, t, *_ in outbox["slow_pending"]] == EVENT_TYPES
    assert [a for _, _, a, _, _ in outbox["slow_pending"]] == [1] + [0] * 9
    first_retry = outbox["slow_pending"][0][3]
    assert first_retry > time.time() + 60  # the retry is minutes away: still pending later
    assert "500" in outbox["slow_pending"][0][4]
    assert outbox["slow_dead"] == [] and outbox["dead_pending"] == []
    assert recorded["depths"] == {"dead": (0, 10), "slow": (10, 0)}
    hits = dict(receiver.hits)
    assert hits["/slow"] == 1

    # -- between lives: the state directory alone (the ops CLI in local mode) -------------------
    local = await _local_status(config, state)
    assert {r["route"]: {k: r[k] for k in STATE_FIELDS} for r in local["rollouts"]} == rollouts
    offline_flags = json.loads(json.dumps(flags))
    offline_flags["brownout"] = {k: flags["brownout"][k] for k in ("level", "override")}
    assert local["flags"] == offline_flags
    assert list(AuditLog(state)) == audit
    assert _outbox(state) == outbox

    # -- second life: everything is back ---------------------------------------------------------
    second = await ServeProcess.start(config, env=ENV)
    try:
        async with aiohttp.ClientSession() as client:
            admin = Admin(client, second.admin)
            # The data plane of the new process acts on the restored state.
            assert await _traffic(client, second.proxy) == after_changes
            again = await _record(admin, state)
            for entry in audit:
                assert await admin.get(f"/api/decisions/{entry['id']}") == entry
    finally:
        exit_code = await second.stop()
    assert exit_code == 0, second.log.decode()

    assert again["rollouts"] == rollouts
    assert again["weights"] == recorded["weights"]
    assert again["flags"] == flags
    # The audit log: every entry still there, in order. The new process may only append; the
    # only thing it appends here is the stepped rollout's "holding" note of its first tick.
    assert again["audit"][: len(audit)] == audit
    for extra in again["audit"][len(audit) :]:
        assert (extra["route"], extra["action"], extra["actor"]) == ("shop", "hold", "controller")
        assert extra["time"] > killed_at
    for name in ROLLOUTS:
        kept = recorded["decisions"][name]
        assert again["decisions"][name][: len(kept)] == kept
    # The dead-letter queue: the same letters, attempts and errors; nothing new, nothing gone.
    assert again["dlq"] == dlq
    # The outbox: every pending event still pending, same order, same retry schedule.
    assert again["outbox"] == outbox
    assert again["depths"] == {"dead": (0, 10), "slow": (10, 0)}
    assert receiver.hits == hits  # no delivery attempt was made early or repeated
