"""The supervisor's persistence: the order of state, audit line and event (and the crash
between them), local-mode CLI writes racing the proxy's decisions, and renamed routes. The
proxy's clocks are injected; traffic is fed to the metrics, never sent."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import ops
from proxy.config import FlagDefaults
from proxy.events import EventBus
from proxy.incidents import FLAGS_KEY, FlagKeeper, apply_flag_change
from proxy.metrics import Metrics
from proxy.outbox import Outbox
from proxy.runtime import Runtime, Snapshot
from proxy.state import AuditLog, FileStateStore
from proxy.supervisor import BUSY_GRACE, UNAUDITED, Supervisor

from .conftest import make_config, to_config


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _raw(state: Path, route: str = "shop") -> dict[str, Any]:
    raw = make_config(
        {"v1": ["http://127.0.0.1:9001"], "v2": ["http://127.0.0.1:9002"]},
        [
            {
                "name": route,
                "match": {"path_prefix": "/"},
                "rollout": {
                    "stable": "v1",
                    "canary": "v2",
                    "weight": 10,
                    "slo": {"error_rate": "1%", "min_requests": 100},
                },
            }
        ],
    )
    raw["state_dir"] = str(state)
    return raw


class World:
    """A supervisor on a state directory, with an outbox, fed by hand one second a time."""

    def __init__(self, state: Path, route: str = "shop", lock_wait: float | None = None) -> None:
        self.mono = Clock(5000.0)
        self.wall = Clock(1_700_000_000.0)
        self.metrics = Metrics(self.mono, "c")
        self.runtime = Runtime(to_config(_raw(state, route)), None, self.metrics, wall=self.wall)
        self.outbox = Outbox(state)
        self.runtime.publish = EventBus(self.outbox, [], {}, wall=self.wall).publish
        self.store = FileStateStore(state, lock_wait=lock_wait)
        self.audit = AuditLog(state)
        self.supervisor = Supervisor(self.runtime, self.store, self.audit, wall=self.wall)

    def second(self, route: str = "shop", canary_failed: int = 0) -> list[str]:
        """One second of traffic (10 canary requests, 90 stable), then a tick."""
        for variant, count, failed in (("canary", 10, canary_failed), ("stable", 90, 0)):
            for i in range(count):
                started = self.metrics.request_started(route, variant)
                self.metrics.request_finished(
                    started, "GET", 500 if i < failed else 200, 0.01, i < failed
                )
        self.mono.now += 1
        self.wall.now += 1
        return [d.action for d in self.supervisor.tick()]

    def decisions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.audit if e.get("action") == action]

    def events(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.outbox.recent(1000) if e["type"] == event_type]

    async def close(self) -> None:
        self.outbox.close()
        await self.runtime.snapshot.upstreams.close()


@pytest.fixture
async def open_world() -> AsyncIterator[Callable[..., World]]:
    worlds: list[World] = []

    def make(state: Path, route: str = "shop", lock_wait: float | None = None) -> World:
        worlds.append(World(state, route, lock_wait))
        return worlds[-1]

    yield make
    for world in worlds:
        await world.close()


# -- a kill -9 between the writes --------------------------------------------------------------

_KILLED = """
import asyncio, os, sys
sys.path[:0] = [{root!r}]
from tests.test_supervisor import World
from proxy.state import AuditLog, FileStateStore
from proxy.outbox import Outbox

async def main() -> None:
    world = World(__import__("pathlib").Path({state!r}))
    writes = []

    def dies_after(name, write, about_rollback):
        def wrapped(*args):
            out = write(*args)
            if about_rollback(*args):
                writes.append(name)
                if len(writes) == {after}:
                    os._exit(137)  # as kill -9 right after this write
            return out
        return wrapped

    world.store.put = dies_after(
        "state", world.store.put,
        lambda key, doc: any(isinstance(v, dict) and v.get("status") == "rolled_back"
                             for v in doc.values()))
    world.audit.append = dies_after(
        "audit", world.audit.append, lambda entry: entry.get("action") == "rollback")
    world.outbox.add = dies_after(
        "event", world.outbox.add, lambda event, sinks: event["type"] == "rollout.rollback")
    for _ in range(5):
        world.second(canary_failed=10)
    print("not killed", writes)

asyncio.run(main())
"""


@pytest.mark.parametrize("after", [1, 2])
async def test_kill_9_after_any_write_of_a_rollback_keeps_it_rolled_back(
    tmp_path: Path, open_world: Callable[..., World], after: int
) -> None:
    """A process killed right after the first (or second) durable write about an automatic
    rollback comes back rolled back at 0%, with the rollback once in the audit log and once
    in the outbox: the state is written first, and what followed it is made good at start."""
    script = _KILLED.format(root=str(Path(__file__).parents[1]), state=str(tmp_path), after=after)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 137, done.stdout + done.stderr
    world = open_world(tmp_path)
    controller = world.supervisor.controllers["shop"]
    assert (controller.state.status, controller.weight) == ("rolled_back", 0.0)
    assert world.runtime.rolled_back == {"shop"}
    assert world.runtime.rollout_weights == {"shop": 0.0}
    [rollback] = world.decisions("rollback")
    assert rollback["actor"] == "analysis"
    assert ("recovered" in rollback) == (after == 1)  # its line was written at start
    [event] = world.events("rollout.rollback")
    assert event["details"]["decision_id"] == rollback["id"]
    saved = json.loads((tmp_path / "state" / "rollouts.json").read_bytes())
    assert UNAUDITED not in saved  # settled, and not carried on
    assert world.second(canary_failed=10) == []  # it stays down


async def test_decision_is_saved_before_it_is_audited_and_announced(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """The order of the writes of one rollback: the state (which holds the decision too),
    the audit line, the event."""
    world = open_world(tmp_path)
    order: list[str] = []
    put, append, add = world.store.put, world.audit.append, world.outbox.add

    def saving(key: str, document: dict[str, Any]) -> None:
        if document["shop"]["status"] == "rolled_back":
            order.append("state")
            assert [e["action"] for e in document[UNAUDITED]] == ["rollback"]
        put(key, document)

    def auditing(entry: dict[str, Any]) -> dict[str, Any]:
        order.append("audit")
        return append(entry)

    def announcing(event: dict[str, Any], sinks: Any) -> bool:
        order.append("event")
        return add(event, sinks)

    world.store.put, world.audit.append = saving, auditing  # type: ignore[method-assign]
    world.outbox.add = announcing  # type: ignore[method-assign]
    while "rollback" not in world.second(canary_failed=10):
        pass
    assert order[-3:] == ["state", "audit", "event"]


class _FullDisk:
    """The state store's writes fail with ENOSPC while `full`."""

    def __init__(self, world: World) -> None:
        self.full = True
        self._put = world.store.put
        world.store.put = self._flaky  # type: ignore[method-assign]

    def _flaky(self, key: str, document: dict[str, Any]) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        self._put(key, document)


async def test_state_not_saved_means_nothing_announced(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """While the state cannot be written, the rollback is in force but neither audited nor
    announced; once the disk is back, state, audit line and event follow, once each."""
    world = open_world(tmp_path)
    disk = _FullDisk(world)
    while "rollback" not in world.second(canary_failed=10):
        pass
    assert world.runtime.rollout_weights == {"shop": 0.0}
    world.second()
    assert world.decisions("rollback") == [] and world.events("rollout.rollback") == []
    disk.full = False
    world.second()
    assert len(world.decisions("rollback")) == len(world.events("rollout.rollback")) == 1
    assert world.store.get("rollouts")["shop"]["status"] == "rolled_back"  # type: ignore[index]


# -- the CLI's local mode racing the proxy -----------------------------------------------------


def _target(state: Path, config: Path) -> ops.Target:
    return ops.Target("http://unused", None, state, config, "oncall@cli", "json")


async def test_local_mode_write_while_the_proxy_rolls_back_cannot_undo_it(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """A `set-weight 20` in local mode that comes while the proxy is saving an automatic
    rollback waits for it, sees it, and is refused with one line; the rollback holds."""
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path)))
    world = open_world(tmp_path)
    cli: list[Any] = []

    def set_weight() -> None:
        try:
            cli.append(ops.rollout_action(_target(tmp_path, config), "shop", "set_weight", "", 20))
        except ops.OpsError as exc:
            cli.append(exc)

    thread = threading.Thread(target=set_weight)
    append = world.audit.append

    def auditing(entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get("action") == "rollback" and not thread.is_alive() and not cli:
            thread.start()
            thread.join(0.5)  # time enough to write, had it not to wait for the lock
        return append(entry)

    world.audit.append = auditing  # type: ignore[method-assign]
    while "rollback" not in world.second(canary_failed=10):
        pass
    thread.join(10)
    [refused] = cli
    assert isinstance(refused, ops.OpsError) and refused.code == ops.EXIT_FAILED
    assert "rolled_back" in str(refused) and "\n" not in str(refused)
    world.second()
    assert world.supervisor.controllers["shop"].state.status == "rolled_back"
    assert world.runtime.rolled_back == {"shop"}
    assert world.runtime.rollout_weights == {"shop": 0.0}


async def test_local_mode_write_based_on_a_state_the_proxy_changed_is_refused(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """The proxy rolled back but could not save it yet (the disk full); a local-mode write
    based on the state still on disk is refused, audited as such, and overwritten: it is
    never adopted over the rollback."""
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path)))
    world = open_world(tmp_path)
    disk = _FullDisk(world)
    while "rollback" not in world.second(canary_failed=10):
        pass
    changed = ops.rollout_action(_target(tmp_path, config), "shop", "set_weight", "more", 20)
    assert changed["rollout"]["weight"] == 20.0  # what the disk held allowed it
    disk.full = False
    world.second()
    world.second()
    state = world.supervisor.controllers["shop"].state
    assert (state.status, state.weight) == ("rolled_back", 0.0)
    assert world.runtime.rollout_weights == {"shop": 0.0}
    assert world.store.get("rollouts")["shop"]["status"] == "rolled_back"  # type: ignore[index]
    [refusal] = world.decisions("refuse")
    assert refusal["inputs"]["refused"]["weight"] == 20.0
    assert "changed the rollout meanwhile" in refusal["reason"]
    assert len(world.decisions("rollback")) == 1


async def test_local_mode_write_based_on_the_current_state_is_adopted(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """The ordinary case stays as it was: a local-mode change based on what the proxy holds
    is taken over at the next tick, and is not refused."""
    config = tmp_path / "rollouts.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path)))
    world = open_world(tmp_path)
    world.second()
    ops.rollout_action(_target(tmp_path, config), "shop", "set_weight", "more", 20)
    world.second()
    assert world.runtime.rollout_weights == {"shop": 20.0}
    assert world.decisions("refuse") == []
    [set_weight] = world.decisions("set_weight")
    assert set_weight["mode"] == "local"


# -- renamed routes ----------------------------------------------------------------------------


def _reload(world: World, state: Path, *routes: str) -> None:
    raw = _raw(state, routes[0])
    raw["routes"] = [{**raw["routes"][0], "name": name, "match": {"path_prefix": f"/{name}"}}
                     for name in routes]  # fmt: skip
    world.runtime.snapshot = Snapshot.build(to_config(raw), world.runtime.snapshot, world.wall())
    world.supervisor.sync()


async def test_renamed_route_keeps_its_rollback(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """A reload that renames `shop` to `shop-eu` (same stable, canary and endpoints) keeps
    the rollback under the new name, says so in the audit log, and keeps it across a
    restart; the old name's state is gone from the store."""
    world = open_world(tmp_path)
    while "rollback" not in world.second(canary_failed=10):
        pass
    _reload(world, tmp_path, "shop-eu")
    state = world.supervisor.controllers["shop-eu"].state
    assert (state.status, state.weight, state.route) == ("rolled_back", 0.0, "shop-eu")
    assert world.runtime.rolled_back == {"shop-eu"}
    assert world.runtime.rollout_weights == {"shop-eu": 0.0}
    [renamed] = world.decisions("rename")
    assert renamed["route"] == "shop-eu" and renamed["inputs"]["from_route"] == "shop"
    assert "carried over from route 'shop'" in renamed["reason"]
    assert world.decisions("start") and all(d["route"] == "shop" for d in world.decisions("start"))
    assert len(world.events("rollout.rename")) == 1
    saved = world.store.get("rollouts")
    assert saved is not None and "shop" not in saved
    again = open_world(tmp_path, "shop-eu")
    assert again.supervisor.controllers["shop-eu"].state.status == "rolled_back"


async def test_rename_that_is_ambiguous_starts_afresh(
    tmp_path: Path, open_world: Callable[..., World]
) -> None:
    """Two new routes with the same generation as the one removed: which one it became is
    not known, so both start at their configured weight, as before."""
    world = open_world(tmp_path)
    while "rollback" not in world.second(canary_failed=10):
        pass
    _reload(world, tmp_path, "shop-eu", "shop-us")
    assert world.runtime.rollout_weights == {"shop-eu": 10.0, "shop-us": 10.0}
    assert world.decisions("rename") == []


# -- another process holding the store's lock -------------------------------------------------


async def test_a_lock_held_elsewhere_delays_decisions_then_they_go_on_without_it(
    open_world: Callable[..., World], tmp_path: Path
) -> None:
    """A CLI in local mode suspended while it holds the store's lock: each tick waits for it
    at most the store's lock_wait (the event loop waited for as long as it was held, with all
    traffic), decides nothing for BUSY_GRACE seconds (the CLI's change is decided on once it
    lands), then decides without it: a failing canary is rolled back, in force at once, and
    the state (then its audit entry and event) is saved at the first tick after the lock is
    free. Nothing is lost meanwhile: the seconds not judged while waiting are judged then."""
    world = open_world(tmp_path, lock_wait=0.005)
    for _ in range(3):
        assert world.second() == []
    saved = tmp_path / "state" / "rollouts.json"
    holder = FileStateStore(tmp_path)  # another descriptor: to flock, another process
    with holder.locked():
        waited = [world.second(canary_failed=10) for _ in range(int(BUSY_GRACE))]
        assert waited == [[]] * int(BUSY_GRACE)
        assert world.supervisor.controllers["shop"].state.status == "progressing"
        actions = world.second(canary_failed=10)
        assert actions == ["rollback"]
        assert world.runtime.rollout_weights["shop"] == 0.0  # in force without the lock
        assert json.loads(saved.read_bytes())["shop"]["status"] == "progressing"  # not saved
        assert world.decisions("rollback") == []  # audited once saved (state, audit, event)
    world.second()
    assert json.loads(saved.read_bytes())["shop"]["status"] == "rolled_back"
    [rollback] = world.decisions("rollback")
    failed = rollback["inputs"]["canary_failures"]
    assert failed == 10 * (int(BUSY_GRACE) + 1), failed  # every second judged, none lost
    assert len(world.events("rollout.rollback")) == 1


async def test_a_start_or_a_reload_under_a_held_lock_keeps_a_rollback_in_force(
    open_world: Callable[..., World], tmp_path: Path
) -> None:
    """A proxy restarted while a CLI holds the store's lock reads the saved rollback and
    puts it in force at once (no canary traffic), though it cannot save; so does a reload
    that renames the route. The weights used to be handed over only by a save, so the
    canary got its configured share for as long as the lock was held (found in review)."""
    first = open_world(tmp_path)
    while "rollback" not in first.second(canary_failed=10):
        pass
    holder = FileStateStore(tmp_path)  # a CLI in local mode, suspended holding the lock
    with holder.locked():
        world = open_world(tmp_path, lock_wait=0.005)  # the restarted server
        assert world.supervisor.controllers["shop"].state.status == "rolled_back"
        assert world.runtime.rolled_back == {"shop"}
        route = world.runtime.snapshot.config.routes[0]
        assert world.runtime.weight(route) == 0.0
        for _ in range(int(BUSY_GRACE) + 2):
            world.second()
        assert world.runtime.weight(route) == 0.0
        _reload(world, tmp_path, "shop-eu")
        assert world.supervisor.controllers["shop-eu"].state.status == "rolled_back"
        assert world.runtime.rolled_back == {"shop-eu"}


class _RacyStore(FileStateStore):
    """The server's store, with a CLI's write landing right after the server's read."""

    def __init__(self, root: Path, cli: Callable[[], object]) -> None:
        super().__init__(root, lock_wait=0.005)
        self.cli: Callable[[], object] | None = cli

    def get(self, key: str) -> dict[str, Any] | None:
        document = super().get(key)
        if key == FLAGS_KEY and self.cli is not None:
            cli, self.cli = self.cli, None
            cli()
        return document


async def test_a_flag_change_landing_while_the_keeper_starts_without_the_lock_is_applied(
    tmp_path: Path,
) -> None:
    """The flag keeper starting while a CLI holds the lock reads the flags without it; a
    change the CLI writes between that read and the keeper's note of the version is picked
    up at the next tick, where reading the version after the flags marked it seen unread
    (found in review)."""
    runtime = Runtime(to_config(_raw(tmp_path)), None, Metrics(time.monotonic, "c"))
    try:
        audit = AuditLog(tmp_path)
        holder = FileStateStore(tmp_path)  # the CLI in local mode
        with holder.locked():

            def cli_quarantines_v2() -> None:  # what the CLI does under its lock
                apply_flag_change(
                    holder,
                    audit,
                    FlagDefaults(),
                    lambda f: f.set_quarantine("v2", True, "oncall", "bad build", time.time()),
                )

            keeper = FlagKeeper(runtime, _RacyStore(tmp_path, cli_quarantines_v2), audit)
            assert keeper.flags.quarantined == frozenset()
        keeper.tick()
        assert keeper.flags.quarantined == {"v2"}
    finally:
        await runtime.snapshot.upstreams.close()
