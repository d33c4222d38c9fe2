"""The dashboard's history ring (proxy/api_dashboard.History): what a point reads, and what
15 minutes of points cost in memory with a large route table. Pure: an injected clock, no
sockets (the pools are made but never connect)."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace
from typing import Any

from proxy.api_dashboard import History, SharedFrame
from proxy.metrics import Metrics
from proxy.runtime import Runtime

from .conftest import make_config, to_config

IDLE = {"rps": 0.0, "error_rate": 0.0, "p50_ms": None, "p99_ms": None, "in_flight": 0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _history(routes: int, clock: Clock) -> tuple[History, Metrics, Runtime]:
    table: list[dict[str, Any]] = [
        {"name": f"r{i}", "match": {"path_prefix": f"/r{i}/"}, "upstream": "v1"}
        for i in range(routes - 1)
    ]
    table.append(
        {
            "name": "shop",
            "match": {"path_prefix": "/"},
            "rollout": {"stable": "v1", "canary": "v2", "weight": 10},
        }
    )
    config = to_config(
        make_config({"v1": ["http://127.0.0.1:9"], "v2": ["http://127.0.0.1:9"]}, table)
    )
    metrics = Metrics(clock, "c")
    runtime = Runtime(config, None, metrics)
    return History(SimpleNamespace(runtime=runtime), interval=5.0), metrics, runtime  # type: ignore[arg-type]


async def test_a_point_reads_each_variant_idle_or_busy() -> None:
    clock = Clock()
    history, metrics, runtime = _history(3, clock)
    try:
        for _ in range(10):  # 10 requests to shop's stable in the second before the sample
            metrics.record_request("shop", "stable", "GET", 200, 0.004, False)
        metrics.record_request("shop", "canary", "GET", 503, 0.2, True)
        clock.now += 1.0
        point = json.loads(json.dumps(history.sample(wall=5.0)))
        assert point["t"] == 5.0
        assert point["routes"]["r0"] == {"stable": IDLE}
        assert point["routes"]["r1"] == {"stable": IDLE}
        stable, canary = point["routes"]["shop"]["stable"], point["routes"]["shop"]["canary"]
        assert stable["rps"] == 2.0 and stable["error_rate"] == 0.0  # 10 over 5 s
        assert stable["p50_ms"] is not None and stable["p50_ms"] <= 5.0
        assert canary["rps"] == 0.2 and canary["error_rate"] == 1.0
        clock.now += 10.0  # nothing since: shop is idle again
        later = json.loads(json.dumps(history.sample(wall=15.0)))
        assert later["routes"]["shop"] == {"stable": IDLE, "canary": IDLE}
    finally:
        await runtime.snapshot.upstreams.close()


async def test_idle_routes_cost_little_to_keep() -> None:
    """With 1,000 routes and no traffic, a dict of its own per route and point held about
    71 MB over the 15 minutes (180 points of 394 KB); idle variants now share one (26 KB)."""
    clock = Clock()
    history, _, runtime = _history(1000, clock)
    try:
        history.sample()  # warm: the windows, interned names
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(60):
            clock.now += 5.0
            history.sample()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert grown < 60 * 120_000, f"{grown / 60:,.0f} bytes a point for 1,000 idle routes"
        assert len(history.points) == 61
    finally:
        await runtime.snapshot.upstreams.close()


def test_the_live_frame_is_made_once_per_half_interval_for_every_watcher() -> None:
    clock, made = Clock(), []

    def make() -> bytes:
        made.append(clock.now)
        return f"frame {len(made)}".encode()

    shared = SharedFrame(make, max_age=0.5, clock=clock)
    assert [shared.get() for _ in range(3)] == [b"frame 1"] * 3  # three pages, one snapshot
    clock.now += 0.49
    assert shared.get() == b"frame 1"
    clock.now += 0.01  # half the interval old: made afresh
    assert shared.get() == b"frame 2" and made == [1000.0, 1000.5]
    shared.invalidate()  # an operator acted: no page sees the state from before
    assert shared.get() == b"frame 3"
    clock.now -= 5.0  # a clock that stepped back does not keep a frame for ever
    assert shared.get() == b"frame 4"


async def test_a_request_in_flight_shows_on_its_own_variant() -> None:
    clock = Clock()
    history, metrics, runtime = _history(3, clock)
    try:
        metrics.request_started("shop", "canary")  # a slow request, not answered yet
        point = history.sample(wall=1.0)
        assert point["routes"]["shop"]["canary"] == {**IDLE, "in_flight": 1}
        assert point["routes"]["shop"]["stable"] == IDLE == point["routes"]["r0"]["stable"]
    finally:
        await runtime.snapshot.upstreams.close()
