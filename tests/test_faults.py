"""Fault injection: an upstream that hangs, resets mid-body, sends garbage, closes idle
keep-alive connections, answers slowly or dribbles bytes. Each gives its documented
client-visible result, and repeating it leaks no file descriptors, tasks or pool slots."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.server import Shaper

from .conftest import StartShaper, make_config

_BODY = b"hello, world\n"
_GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)


@dataclass
class FaultServer:
    """A raw upstream; `mode` decides what it does with each request head it reads."""

    mode: str = "ok"
    port: int = 0
    server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            mode = self.mode
            if mode == "hang":
                await reader.read()  # never answer; return when the proxy gives up and closes
                return
            if mode == "reset":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                await writer.drain()
                writer.transport.abort()
                return
            if mode == "garbage":
                writer.write(b"this is not http\r\n\r\n")
                await writer.drain()
                return
            if mode == "idle_close":
                writer.write(_GOOD)  # keep-alive promised, then closed at once
                await writer.drain()
                return
            if mode == "slow":
                await asyncio.sleep(0.2)
                writer.write(_GOOD)
            elif mode == "dribble":
                for byte in _GOOD:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.005)
            else:
                writer.write(_GOOD)
            await writer.drain()


@pytest.fixture
async def fault_server() -> AsyncIterator[FaultServer]:
    fault = FaultServer()
    fault.server = await asyncio.start_server(fault.handle, "127.0.0.1", 0)
    fault.port = fault.server.sockets[0].getsockname()[1]
    yield fault
    fault.server.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(fault.server.wait_closed(), 2)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settle(shaper: Shaper) -> None:
    """Wait (bounded) until no request is in flight anywhere in the proxy."""
    for _ in range(200):
        metrics = shaper.runtime.metrics
        pools = shaper.runtime.snapshot.upstreams.items()
        if not any(metrics.in_flight.values()) and not any(p.in_flight for _, p in pools):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("requests still in flight")


async def _get(url: str) -> tuple[int | str, str]:
    """(status, X-Shaper-Error) of one request on a fresh client, or the exception name."""
    async with aiohttp.ClientSession() as client:
        try:
            async with client.get(url) as r:
                await r.read()
                return r.status, r.headers.get("X-Shaper-Error", "")
        except aiohttp.ClientPayloadError:
            return "aborted stream", ""


Expect = Callable[[list[tuple[int | str, str]]], bool]

CASES: list[tuple[str, Expect]] = [
    ("hang", lambda r: all(x == (504, "upstream_timeout") for x in r)),
    ("reset", lambda r: all(x[0] == "aborted stream" for x in r)),
    ("garbage", lambda r: all(x == (502, "bad_upstream_response") for x in r)),
    ("idle_close", lambda r: all(x == (200, "") for x in r)),
    ("slow", lambda r: all(x == (200, "") for x in r)),
    ("dribble", lambda r: all(x == (200, "") for x in r)),
]


@pytest.mark.parametrize(("mode", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_fault_result_and_no_leak(
    fault_server: FaultServer, start_shaper: StartShaper, mode: str, expected: Expect
) -> None:
    """The documented result for each fault; a second round leaves fds, tasks and pool
    slots exactly where the first left them."""
    raw = make_config(
        {
            "app": {
                "endpoints": [f"http://127.0.0.1:{fault_server.port}"],
                "request_timeout": "300ms",
                "idle_timeout": "1s",
                # The faults must reach the proxy's error paths, not be refused by the breaker.
                "breaker": {"consecutive_failures": 1000, "min_calls": 1000},
            }
        },
        [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
    )
    shaper = await start_shaper(raw)
    url = "http://{}:{}/".format(*shaper.proxy_address)
    fault_server.mode = mode

    async def round_() -> list[tuple[int | str, str]]:
        results = await asyncio.gather(*(_get(url) for _ in range(5)))
        await _settle(shaper)
        return list(results)

    first = await round_()
    assert expected(first), first
    fds, tasks = _fds(), len(asyncio.all_tasks())
    second = await round_()
    assert expected(second), second
    await asyncio.sleep(0.1)  # let closed connections finish closing
    assert _fds() <= fds
    assert len(asyncio.all_tasks()) <= tasks
    pool = shaper.runtime.snapshot.upstreams["app"]
    assert pool.in_flight == 0
    assert all(e.in_flight == 0 for e in pool.endpoints)


# -- clients that read slowly, or stop --------------------------------------------------------

_DOWNLOAD = 4 * 1024 * 1024


@dataclass
class Download:
    """A raw upstream answering each request with a `_DOWNLOAD`-byte Content-Length body, as
    fast as the proxy reads it; `closed` is set when the proxy closes its connection."""

    port: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sending: asyncio.Task[None] | None = None
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _DOWNLOAD)
            self.started.set()
            sending = asyncio.create_task(self._send(writer), name="download-body")
            await reader.read()  # b"" (or a reset) when the proxy closes the connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            if sending is not None:
                sending.cancel()
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(_DOWNLOAD // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()


@pytest.fixture
async def download() -> AsyncIterator[Download]:
    upstream = Download()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)


def _download_config(port: int, idle_timeout: str) -> dict[str, Any]:
    """One route to the download upstream, as a canary at 100% so the analysis sees it."""
    return make_config(
        {
            "stable": {"endpoints": [f"http://127.0.0.1:{port}"], "idle_timeout": idle_timeout},
            "canary": {"endpoints": [f"http://127.0.0.1:{port}"], "idle_timeout": idle_timeout},
        },
        [
            {
                "name": "main",
                "match": {"path_prefix": "/"},
                "rollout": {"stable": "stable", "canary": "canary", "weight": 100},
            }
        ],
    )


async def _slow_reader(shaper: Shaper) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer and reading paused, that has sent
    GET /big: the proxy's writes back up at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, shaper.proxy_address)
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.transport.pause_reading()
    writer.write(b"GET /big HTTP/1.1\r\nHost: shop.test\r\n\r\n")
    return reader, writer


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    """All the client gets until the connection ends (closed or reset)."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(2**16):
                data += chunk
    return bytes(data)


def _charged(shaper: Shaper) -> tuple[int, int, int]:
    """(breaker failures in the window, failures in a row, analysis errors) of the canary."""
    endpoint = shaper.runtime.snapshot.upstreams["canary"].endpoints[0]
    now = time.monotonic()
    _, failures, _ = endpoint.breaker.window_counts(now)
    metrics = shaper.runtime.metrics
    _, errors = metrics.windows[("main", "canary")].counts(metrics.clock(), 60)
    return failures, endpoint.breaker.consecutive, errors


async def test_client_that_stops_reading_is_dropped_as_its_own_failure(
    download: Download, start_shaper: StartShaper
) -> None:
    """A client that stops reading a large download is aborted once it has taken nothing for
    the idle timeout: the request and the connection are freed, the upstream connection is
    closed (not pooled), and it counts as a 499, not against the canary's breaker or
    analysis. Without a send deadline the client held its connection for ever."""
    shaper = await start_shaper(_download_config(download.port, "500ms"))
    reader, writer = await _slow_reader(shaper)
    try:
        async with asyncio.timeout(10):
            await download.started.wait()
        await _settle(shaper)  # bounded: fails while the stalled client holds the request
        async with asyncio.timeout(10):
            await download.closed.wait()
            while shaper.runtime.metrics.client_connections:
                await asyncio.sleep(0.02)
        writer.transport.resume_reading()
        assert len(await _read_to_end(reader)) < _DOWNLOAD
    finally:
        writer.close()
    assert shaper.runtime.metrics.requests == {("main", "canary", "GET", "499"): 1}
    assert _charged(shaper) == (0, 0, 0)


async def test_client_pausing_under_the_idle_timeout_gets_the_whole_body(
    download: Download, start_shaper: StartShaper
) -> None:
    """A client that stops reading for a while under the idle timeout (which applies to both
    sides) and then reads on gets the whole body, and the request is a success: the upstream,
    not read meanwhile, is not idle, and the client is not stalled."""
    shaper = await start_shaper(_download_config(download.port, "1s"))
    reader, writer = await _slow_reader(shaper)
    try:
        await asyncio.sleep(0.7)
        writer.transport.resume_reading()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        async with asyncio.timeout(10):
            body = await reader.readexactly(_DOWNLOAD)
    finally:
        writer.close()
    assert body == b"x" * _DOWNLOAD
    await _settle(shaper)
    assert shaper.runtime.metrics.requests == {("main", "canary", "GET", "200"): 1}
    assert _charged(shaper) == (0, 0, 0)
