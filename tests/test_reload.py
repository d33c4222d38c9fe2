"""Hot reload over real sockets: admin call, file watch (including a Kubernetes-style symlink
swap), rejection of bad files, in-flight requests keeping their config, no loss under load."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.server import Shaper

from .conftest import StartShaper, StartUpstream, make_config


def _named(name: str, gate: asyncio.Event | None = None) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        if gate is not None and request.path == "/slow":
            await gate.wait()
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _config(a: str, b: str, weight: float, **extra: Any) -> dict[str, Any]:
    return make_config(
        {"a": [a], "b": [b]},
        [
            {
                "name": "main",
                "match": {"path_prefix": "/"},
                "rollout": {"stable": "a", "canary": "b", "weight": weight},
            }
        ],
        **extra,
    )


def _proxy(shaper: Shaper) -> str:
    return "http://{}:{}".format(*shaper.proxy_address)


def _admin(shaper: Shaper) -> str:
    return "http://{}:{}".format(*shaper.admin_address)


async def _answers(shaper: Shaper, n: int = 20) -> set[str]:
    async with aiohttp.ClientSession() as client:
        seen = set()
        for _ in range(n):
            async with client.get(_proxy(shaper) + "/") as r:
                seen.add(await r.text())
        return seen


async def _metric(shaper: Shaper, line_start: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(_admin(shaper) + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")  # absent: equal to nothing


async def _eventually(check: Any, timeout: float = 10.0) -> None:
    """Poll an async predicate until it holds (bounded), for changes made by a background task."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_admin_reload_applies_new_weight(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """POST /admin/reload swaps in the edited file: weight 0 -> 100 moves traffic to b."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0)
    assert await _answers(shaper) == {"a"}
    path.write_text(yaml.safe_dump(_config(a, b, 100)))
    async with aiohttp.ClientSession() as client:
        async with client.post(_admin(shaper) + "/admin/reload") as r:
            assert r.status == 200
            assert (await r.json())["changed"] is True
    assert await _answers(shaper) == {"b"}


async def test_invalid_file_is_rejected_and_old_config_serves(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A bad file never replaces a good one; every error is returned and the failure counted."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0)
    bad = _config(a, b, 150)
    bad["routes"][0]["colour"] = "blue"
    path.write_text(yaml.safe_dump(bad))
    async with aiohttp.ClientSession() as client:
        async with client.post(_admin(shaper) + "/admin/reload") as r:
            assert r.status == 422
            errors = (await r.json())["errors"]
    assert any(e.startswith("routes[0].rollout.weight") for e in errors)
    assert any(e.startswith("routes[0].colour") for e in errors)
    assert await _answers(shaper) == {"a"}
    assert await _metric(shaper, 'shaper_config_reloads_total{result="failure"}') == 1.0
    assert await _metric(shaper, "shaper_config_last_reload_successful ") == 0.0


async def test_file_watch_reloads(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """Editing the file is picked up by the watch without any signal or call."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0.05)
    path.write_text(yaml.safe_dump(_config(a, b, 100)))

    async def moved() -> bool:
        return await _answers(shaper, 5) == {"b"}

    await _eventually(moved)


async def test_configmap_symlink_swap_reloads(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A Kubernetes ConfigMap update (the ..data symlink swapped atomically) is reloaded."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    first = tmp_path / "..2026_11_26_1"
    first.mkdir()
    (first / "rollouts.yaml").write_text(yaml.safe_dump(_config(a, b, 0)))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "rollouts.yaml").symlink_to("..data/rollouts.yaml")
    shaper = Shaper.from_file(tmp_path / "rollouts.yaml")
    shaper.watch_interval = 0.05
    await shaper.start()
    try:
        assert await _answers(shaper) == {"a"}
        second = tmp_path / "..2026_11_26_2"
        second.mkdir()
        (second / "rollouts.yaml").write_text(yaml.safe_dump(_config(a, b, 100)))
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

        async def moved() -> bool:
            return await _answers(shaper, 5) == {"b"}

        await _eventually(moved)
    finally:
        await shaper.stop()


async def test_in_flight_request_keeps_its_config(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A request that started before a reload finishes on the upstream it was sent to,
    even when the reload removes that upstream; new requests use the new config."""
    gate = asyncio.Event()
    a = await start_upstream(_named("a", gate))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0)
    old_pool = shaper.runtime.snapshot.upstreams["a"]
    async with aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(client.get(_proxy(shaper) + "/slow"))
        while old_pool.in_flight == 0:
            await asyncio.sleep(0.01)
        # The new config points both names at b: pool "a" is retired.
        path.write_text(yaml.safe_dump(_config(b, b + "/", 0)))
        assert shaper.reload().ok
        assert await _answers(shaper) == {"b"}
        gate.set()
        response = await slow
        assert response.status == 200
        assert await response.text() == "a"
    assert old_pool.retired
    for _ in range(100):
        if old_pool.session.closed:
            break
        await asyncio.sleep(0.01)
    assert old_pool.session.closed


async def test_reloads_under_load_lose_nothing(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """Constant concurrent traffic across 30 reloads that flip the split: every request is 200."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0)
    statuses: list[int] = []
    done = asyncio.Event()

    async def worker(client: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with client.get(_proxy(shaper) + "/") as r:
                await r.read()
                statuses.append(r.status)

    async with aiohttp.ClientSession() as client:
        workers = [asyncio.ensure_future(worker(client)) for _ in range(8)]
        for i in range(30):
            # Alternate weights and upstream settings so pools are rebuilt, not only reused.
            timeout = "15s" if i % 2 else "20s"
            raw = _config(a, b, 100 if i % 2 else 0)
            raw["upstreams"]["a"]["request_timeout"] = timeout
            path.write_text(yaml.safe_dump(raw))
            assert shaper.reload().ok
            await asyncio.sleep(0.02)
        done.set()
        await asyncio.gather(*workers)
    assert len(statuses) > 100
    assert set(statuses) == {200}


@pytest.mark.parametrize("weight", [0, 100])
async def test_listen_change_is_deferred(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path, weight: int
) -> None:
    """A reload that changes listen: keeps serving on the bound port (restart needed)."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(_config(a, b, weight), path=path, watch_interval=0)
    raw = _config(a, b, weight)
    raw["listen"]["port"] = 1
    path.write_text(yaml.safe_dump(raw))
    assert shaper.reload().ok
    assert await _answers(shaper, 3) == {"a" if weight == 0 else "b"}


async def test_serve_takes_the_config_out_of_the_collectors_reach(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """`serve` freezes the heap at start (before it listens) and after each reload
    (server._settle_heap), so a full collection never walks the config, the route table and
    the modules under traffic; other embeddings (tests, the demo) leave the collector alone."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    gc.unfreeze()
    try:
        plain = await start_shaper(_config(a, b, 0), path=tmp_path / "plain.yaml", watch_interval=0)
        assert gc.get_freeze_count() == 0
        (tmp_path / "plain.yaml").write_text(yaml.safe_dump(_config(a, b, 50)))
        assert plain.reload().ok
        assert gc.get_freeze_count() == 0

        path = tmp_path / "rollouts.yaml"
        shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0, settle_heap=True)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        path.write_text(yaml.safe_dump(_config(a, b, 50)))
        assert shaper.reload().ok
        assert gc.get_freeze_count() > 0
        assert await _answers(shaper, 5) <= {"a", "b"}
    finally:
        gc.unfreeze()


async def _settling(
    start_upstream: StartUpstream, start_shaper: StartShaper, path: Path
) -> tuple[Shaper, str, str]:
    """A proxy as `serve` runs it (heap settled at start and at reloads), from a heap thawed
    first; the caller thaws it again when done. The proxy and its two upstreams, a and b."""
    a = await start_upstream(_named("a"))
    b = await start_upstream(_named("b"))
    gc.unfreeze()
    shaper = await start_shaper(_config(a, b, 0), path=path, watch_interval=0, settle_heap=True)
    return shaper, a, b


class _Cycle:
    """An object in a reference cycle with itself: freed by the collector alone."""

    def __init__(self) -> None:
        self.me = self


def _frozen_cycle() -> weakref.ref[_Cycle]:
    """Frozen garbage in a reference cycle, which only a full settle frees; its witness."""
    garbage = _Cycle()
    witness = weakref.ref(garbage)
    gc.freeze()
    return witness


async def test_a_reload_settles_the_heap_without_walking_what_is_frozen_until_it_grows(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """The full settle walks the whole heap (tens of ms, a stall for every request in
    flight); after a reload only what is not frozen is collected, until the heap has grown
    by a quarter since the last full settle or 16 reloads have passed (frozen cycles are
    never collected, so what they hold stays bounded). A frozen cycle is the witness: it
    outlives a reload that walks only the unfrozen heap, and not one that walks all of it."""
    from proxy.server import _PARTIAL_SETTLES

    path = tmp_path / "rollouts.yaml"
    shaper, a, b = await _settling(start_upstream, start_shaper, path)
    weights = iter([50.0, 0.0] * (_PARTIAL_SETTLES + 2))

    def reload() -> None:
        path.write_text(yaml.safe_dump(_config(a, b, next(weights))))
        assert shaper.reload().ok

    try:
        witness = _frozen_cycle()
        reload()
        assert witness() is not None, "the reload walked the frozen heap"
        assert await _answers(shaper, 5) <= {"a", "b"}

        # The heap a half bigger (two blocks a list), alive: the next reload settles in full,
        # and measures the heap anew from there.
        grown: list[list[object]] = [[] for _ in range(sys.getallocatedblocks() // 4)]
        reload()
        assert witness() is None, "the heap grew by a half and no full settle ran"
        assert await _answers(shaper, 3) == {"a"}

        witness = _frozen_cycle()
        for _ in range(_PARTIAL_SETTLES):
            reload()
            assert witness() is not None, "the grown heap was not taken as the new measure"
        reload()
        assert witness() is None, f"{_PARTIAL_SETTLES + 1} reloads and no full settle"
        assert len(grown) > 0
    finally:
        gc.unfreeze()


async def test_connections_open_at_a_reload_are_freed_when_they_close(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A reload freezes the heap, connections open at that moment with it; frozen objects in
    a reference cycle are never collected. A client connection that served requests, open at
    a reload and closed after it, must be freed by reference counting alone."""
    from proxy.listener import ClientConnection

    path = tmp_path / "rollouts.yaml"
    shaper, a, b = await _settling(start_upstream, start_shaper, path)
    try:
        host, port = shaper.proxy_address
        clients = [await asyncio.open_connection(host, port) for _ in range(20)]
        for reader, writer in clients:
            writer.write(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                await reader.readexactly(1)  # the body: "a"
        path.write_text(yaml.safe_dump(_config(a, b, 50)))
        assert shaper.reload().ok  # the 20 connections are frozen now
        for _, writer in clients:
            writer.close()
        async with asyncio.timeout(10):
            while shaper.metrics.client_connections:
                await asyncio.sleep(0.01)
        gc.unfreeze()  # what was frozen and is still alive is listed again
        server = shaper._data_server
        left = [o for o in gc.get_objects() if isinstance(o, ClientConnection)]
        assert [c for c in left if c._server is server] == []
    finally:
        gc.unfreeze()
