"""The forwarding path over real sockets: methods and exact targets, streaming bodies in bounded
memory, unbuffered event streams, client disconnects, upstream faults, keep-alive pooling, the
stable/canary split, the body limit and the request metrics.

Upstreams are aiohttp applications or plain asyncio servers written here; the proxy is a whole
`Shaper` on loopback port 0. Nothing is mocked and nothing asserts on elapsed time: where a test
must know that the proxy forwarded something, the upstream waits for the client to confirm it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.server import Shaper

from .conftest import StartShaper, StartUpstream, free_port, make_config

pytestmark = pytest.mark.functional

MiB = 1024 * 1024
_STEP = 10.0  # an upper bound for one step of a test, so a broken proxy fails instead of hanging


def _proxy(shaper: Shaper) -> str:
    host, port = shaper.proxy_address
    return f"http://{host}:{port}"


def _admin(shaper: Shaper) -> str:
    host, port = shaper.admin_address
    return f"http://{host}:{port}"


def _plain(url: str, upstream: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A config with one route "app" on "/" to one upstream at `url` (more settings in
    `upstream`; `extra` are top-level config keys)."""
    return make_config(
        {"app": {"endpoints": [url], **(upstream or {})}},
        [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}],
        **extra,
    )


def _rss() -> int:
    """This process's resident set size in bytes (the proxy runs in-process)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for state that the proxy updates just after the client saw the answer."""
    async with asyncio.timeout(_STEP):
        while not condition():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Raw clients and upstreams: exact bytes on the wire.


async def _raw_exchange(shaper: Shaper, request: bytes) -> bytes:
    """Send raw request bytes to the proxy and read until it closes the connection."""
    reader, writer = await asyncio.open_connection(*shaper.proxy_address)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(_STEP):
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@dataclass
class RawRequest:
    """One request as a plain asyncio upstream read it."""

    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def method(self) -> bytes:
        return self.line.split(b" ")[0]

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]


async def _read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """Read one Content-Length-framed (or bodiless) request; None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *rest = head[:-4].split(b"\r\n")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (h.partition(b":") for h in rest)]
    length = next((int(v) for n, v in headers if n == b"content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    return RawRequest(line, headers, body)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class RawUpstream:
    """A plain asyncio server: `handler(reader, writer, connection_number)` per connection."""

    url: str
    connections: int = 0
    requests: list[RawRequest] = field(default_factory=list)


@pytest.fixture
async def start_raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    """Start plain asyncio servers on 127.0.0.1:0; each closes after the test."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: RawHandler) -> RawUpstream:
        upstream = RawUpstream("")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream.connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer, upstream.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return upstream

    yield start
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    for server in servers:
        await server.wait_closed()


def _ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# ---------------------------------------------------------------------------------------------
# Methods and targets.

_ODD_TARGETS: list[Any] = [
    b"/",
    b"/a%2Fb/%7Euser/caf%C3%A9/%2e%2e/x?q=a%20b&plus=1+2&enc=%2B%26%3D&&empty=&semi;x=1",
    b"/odd/!$&'()*+,;=:@-._~/%41%42?/slash?/and?question",
    b"//double//slash/./dot/../dotdot?b=2&a=1&a=1",
    b"/%E2%9C%93?%zz=%ZZ&%=",
    b"/path;matrix=1;x/seg%00ment?q=%0A",
    b"/trailing/slash/?a=%7e&a=%7E",
    b"/empty-query?",
]


@pytest.mark.parametrize("target", _ODD_TARGETS, ids=range(len(_ODD_TARGETS)))
async def test_target_bytes_reach_the_upstream_unchanged(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    target: bytes,
) -> None:
    """Path and query reach the upstream byte for byte: no re-quoting, no dot-segment removal."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while (request := await _read_request(reader)) is not None:
            upstream.requests.append(request)
            writer.write(_ok())
            await writer.drain()

    upstream = await start_raw_upstream(answer)
    shaper = await start_shaper(_plain(upstream.url))
    raw = await _raw_exchange(
        shaper, b"GET " + target + b" HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
    )
    assert _split_response(raw)[0] == 200
    assert [r.target for r in upstream.requests] == [target]


# Extension methods that aiohttp's C parser (llhttp) knows; it answers 400 to other tokens.
_METHODS = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "OPTIONS",
    "PURGE",
    "PROPFIND",
    "MKCOL",
    "QUERY",
]


@pytest.mark.parametrize("method", _METHODS)
async def test_every_method_is_forwarded(
    start_upstream: StartUpstream, start_shaper: StartShaper, method: str
) -> None:
    """Standard and extension methods reach the upstream as sent, with their bodies."""
    seen: list[tuple[str, str, bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, body))
        return web.Response(body=b"answer:" + body, headers={"X-Method": request.method})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    shaper = await start_shaper(_plain(await start_upstream(app)))
    payload = b"" if method in ("GET", "HEAD") else b"payload-" + method.encode()
    target = URL(f"{_proxy(shaper)}/m/%7E?x=%2F", encoded=True)
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, target, data=payload or None) as response,
    ):
        body = await response.read()
    assert response.status == 200
    assert response.headers["X-Method"] == method
    assert body == (b"" if method == "HEAD" else b"answer:" + payload)
    assert response.headers["Content-Length"] == str(len(b"answer:" + payload))
    assert seen == [(method, "/m/%7E?x=%2F", payload)]


# ---------------------------------------------------------------------------------------------
# Streaming in bounded memory.

_BIG = 128 * MiB
_CHUNK = 256 * 1024
# What may pile up inside the process while one side stalls: socket buffers on three loopback
# connections and a few read buffers. A proxy that buffered the body would hold all of it.
_STALL_BOUND = 40 * MiB
_RSS_BOUND = 48 * MiB


_FILLER = os.urandom(_CHUNK - 8)


def _chunks(total: int) -> Iterator[bytes]:
    """Distinct chunks (numbered), so a lost, repeated or reordered chunk changes the hash;
    made one at a time so the test itself holds no whole body."""
    for i in range(total // _CHUNK):
        yield struct.pack(">Q", i) + _FILLER


def _digest(total: int) -> str:
    running = hashlib.sha256()
    for chunk in _chunks(total):
        running.update(chunk)
    return running.hexdigest()


@dataclass
class Progress:
    """Bytes one side has moved, and the largest RSS seen while it moved them."""

    moved: int = 0
    peak_rss: int = 0

    def step(self, n: int) -> None:
        self.moved += n
        self.peak_rss = max(self.peak_rss, _rss())


async def _until_stuck(progress: Progress, total: int) -> int:
    """Wait until `progress` stops moving (or completes); the bytes it had moved by then.

    Sampling uses short sleeps but asserts nothing about time: a slow machine only makes the
    stall look earlier, which lowers the count the test compares against its bound."""
    last, still = -1, 0
    async with asyncio.timeout(_STEP * 3):
        while still < 5 and progress.moved < total:
            await asyncio.sleep(0.05)
            still = still + 1 if progress.moved == last else 0
            last = progress.moved
    return progress.moved


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_large_upload_streams_in_bounded_memory(
    start_upstream: StartUpstream, start_shaper: StartShaper, framing: str
) -> None:
    """A 128 MiB upload arrives intact, held back while the upstream stalls, in flat memory."""
    expected = _digest(_BIG)
    reading = asyncio.Event()
    sent = Progress()
    received = Progress()
    seen: dict[str, Any] = {}

    async def sink(request: web.Request) -> web.Response:
        seen["framing"] = (request.headers.get("Transfer-Encoding"), request.content_length)
        running = hashlib.sha256()
        first = await request.content.readexactly(MiB)
        running.update(first)
        received.step(len(first))
        await reading.wait()  # stall: the proxy must stop taking the client's bytes
        async for chunk in request.content.iter_any():
            running.update(chunk)
            received.step(len(chunk))
        return web.json_response({"size": received.moved, "sha256": running.hexdigest()})

    app = web.Application(client_max_size=_BIG * 2)
    app.router.add_post("/upload", sink)
    shaper = await start_shaper(
        _plain(await start_upstream(app), limits={"max_body_size": _BIG * 2})
    )
    baseline = _rss()

    async def body() -> AsyncIterator[bytes]:
        for chunk in _chunks(_BIG):
            sent.step(len(chunk))
            yield chunk

    headers = {"Content-Length": str(_BIG)} if framing == "content-length" else {}
    async with aiohttp.ClientSession() as client:
        upload = asyncio.ensure_future(
            client.post(f"{_proxy(shaper)}/upload", data=body(), headers=headers)
        )
        stalled_at = await _until_stuck(sent, _BIG)
        assert stalled_at - received.moved < _STALL_BOUND, "the proxy kept reading the client"
        reading.set()
        async with asyncio.timeout(_STEP * 6):
            response = await upload
            result = await response.json()
        response.release()
    assert response.status == 200
    assert result == {"size": _BIG, "sha256": expected}
    if framing == "content-length":
        assert seen["framing"] == (None, _BIG)
    else:
        assert seen["framing"] == ("chunked", None)
    assert max(sent.peak_rss, received.peak_rss) - baseline < _RSS_BOUND


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_large_download_streams_in_bounded_memory(
    start_upstream: StartUpstream, start_shaper: StartShaper, framing: str
) -> None:
    """A 128 MiB download arrives intact, held back while the client stalls, in flat memory."""
    expected = _digest(_BIG)
    sent = Progress()
    received = Progress()

    async def source(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if framing == "content-length":
            response.content_length = _BIG
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in _chunks(_BIG):
            await response.write(chunk)
            sent.step(len(chunk))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/download", source)
    shaper = await start_shaper(_plain(await start_upstream(app)))
    baseline = _rss()
    running = hashlib.sha256()
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.get(f"{_proxy(shaper)}/download") as response,
    ):
        assert response.status == 200
        if framing == "content-length":
            assert response.headers["Content-Length"] == str(_BIG)
        else:
            assert response.headers["Transfer-Encoding"] == "chunked"
        first = await response.content.readexactly(MiB)
        running.update(first)
        received.step(len(first))
        stalled_at = await _until_stuck(sent, _BIG)  # the client reads nothing meanwhile
        assert stalled_at - received.moved < _STALL_BOUND, "the proxy kept reading the upstream"
        async with asyncio.timeout(_STEP * 6):
            async for chunk in response.content.iter_any():
                running.update(chunk)
                received.step(len(chunk))
    assert received.moved == _BIG
    assert running.hexdigest() == expected
    assert max(sent.peak_rss, received.peak_rss) - baseline < _RSS_BOUND


async def test_compressed_body_passes_through_untouched(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Gzip bodies, a 64 MiB bomb included, reach the client byte for byte, never inflated."""
    bomb = gzip.compress(bytes(64 * MiB), compresslevel=9)
    text = gzip.compress(b"hello, " * 1000)

    async def compressed(request: web.Request) -> web.Response:
        body = bomb if request.path == "/bomb" else text
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    app = web.Application()
    app.router.add_get("/{name}", compressed)
    shaper = await start_shaper(_plain(await start_upstream(app)))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for path, expected in (("/bomb", bomb), ("/text", text)):
            async with client.get(
                f"{_proxy(shaper)}{path}", headers={"Accept-Encoding": "gzip"}
            ) as response:
                assert response.headers["Content-Encoding"] == "gzip"
                assert response.headers["Content-Length"] == str(len(expected))
                assert await response.read() == expected


async def test_event_stream_chunks_are_not_buffered(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Each server-sent event reaches the client before the upstream writes the next one."""
    # The upstream writes event N+1 only once the client acknowledged event N.
    events = 5
    acknowledged = [asyncio.Event() for _ in range(events)]

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(events):
            await response.write(f"id: {n}\ndata: event {n}\n\n".encode())
            await acknowledged[n].wait()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", stream)
    shaper = await start_shaper(_plain(await start_upstream(app)))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{_proxy(shaper)}/events") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        for n in range(events):
            expected = f"id: {n}\ndata: event {n}\n\n".encode()
            async with asyncio.timeout(_STEP):
                got = await response.content.readexactly(len(expected))
            assert got == expected
            acknowledged[n].set()
        async with asyncio.timeout(_STEP):
            assert await response.read() == b""


async def test_long_poll_answer_is_not_held_back(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """A long poll: the first part of the body reaches the client while the rest is held."""
    released = asyncio.Event()

    async def poll(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await writer.drain()
        await released.wait()
        writer.write(b"-last")
        await writer.drain()

    upstream = await start_raw_upstream(poll)
    shaper = await start_shaper(_plain(upstream.url))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{_proxy(shaper)}/poll") as response,
    ):
        async with asyncio.timeout(_STEP):
            assert await response.content.readexactly(5) == b"first"
        released.set()
        async with asyncio.timeout(_STEP):
            assert await response.read() == b"-last"


async def _requests_active(client: aiohttp.ClientSession, shaper: Shaper) -> dict[str, float]:
    """shaper_upstream_requests_active from /metrics, by endpoint."""
    async with client.get(f"{_admin(shaper)}/metrics") as response:
        exposition = await response.text()
    return {
        sample.labels["endpoint"]: sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "shaper_upstream_requests_active"
        for sample in family.samples
    }


async def test_requests_active_counts_requests_on_a_pool_a_reload_replaced(
    start_upstream: StartUpstream, start_shaper: StartShaper, tmp_path: Path
) -> None:
    """A reload that changes an upstream's pool settings makes a new pool; a request still
    running on the old one is still load on the endpoint, and counts until it ends."""
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/{name}", slow)
    url = await start_upstream(app)
    raw = _plain(url)
    path = tmp_path / "rollouts.yaml"
    shaper = await start_shaper(raw, path=path, watch_interval=0)
    async with aiohttp.ClientSession() as client, contextlib.AsyncExitStack() as stack:
        stack.callback(release.set)  # a failed assertion must not leave the upstream hanging
        pending = asyncio.ensure_future(client.get(f"{_proxy(shaper)}/slow"))
        await _eventually(lambda: shaper.runtime.snapshot.upstreams["app"].in_flight == 1)
        old_pool = shaper.runtime.snapshot.upstreams["app"]
        raw["upstreams"]["app"]["pool"] = {"max_connections": 7}
        path.write_text(yaml.safe_dump(raw))
        assert shaper.reload().ok
        assert shaper.runtime.snapshot.upstreams["app"] is not old_pool
        assert await _requests_active(client, shaper) == {url: 1}
        release.set()
        async with asyncio.timeout(_STEP):
            async with await pending as response:
                assert await response.text() == "slow"
        await _eventually(lambda: old_pool.in_flight == 0)
        assert await _requests_active(client, shaper) == {url: 0}


async def test_client_disconnect_cancels_the_upstream_request(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A client leaving mid-response cancels the upstream request and frees its connection."""
    # With a pool of one connection, a leaked one would block the follow-up request.
    upstream_saw_disconnect = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path == "/quick":
            return web.Response(text="quick")
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * 1024)
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            upstream_saw_disconnect.set()
            raise

    app = web.Application()
    app.router.add_get("/{name}", endless)
    url = await start_upstream(app)
    shaper = await start_shaper(_plain(url, {"pool": {"max_connections": 1}}))
    async with aiohttp.ClientSession() as client:
        response = await client.get(f"{_proxy(shaper)}/endless")
        async with asyncio.timeout(_STEP):
            await response.content.readexactly(4096)
        assert await _requests_active(client, shaper) == {url: 1}
        response.close()  # drops the client connection mid-body
        async with asyncio.timeout(_STEP):
            await upstream_saw_disconnect.wait()
            async with client.get(f"{_proxy(shaper)}/quick") as quick:
                assert await quick.text() == "quick"
        pool = shaper.runtime.snapshot.upstreams["app"]
        await _eventually(lambda: pool.in_flight == 0)
        assert await _requests_active(client, shaper) == {url: 0}


# ---------------------------------------------------------------------------------------------
# Upstream faults.


async def _error_of(response: aiohttp.ClientResponse) -> str:
    """The reason an error answer gives, checked to be the same in header and JSON body."""
    assert response.content_type == "application/json"
    body = json.loads(await response.read())
    assert body["error"] == response.headers["X-Shaper-Error"]
    return str(body["error"])


async def test_closed_port_is_502_connect_failed(start_shaper: StartShaper) -> None:
    """Nothing listening at the endpoint: 502 with a small JSON body naming connect_failed."""
    shaper = await start_shaper(_plain(f"http://127.0.0.1:{free_port()}"))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{_proxy(shaper)}/x") as response,
    ):
        assert response.status == 502
        assert await _error_of(response) == "connect_failed"
        assert len(await response.read()) < 512


async def test_silent_upstream_is_504_upstream_timeout(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An upstream that reads the request but never answers: 504 upstream_timeout."""
    heard = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        heard.set()
        await reader.read()  # until the proxy gives up and closes

    upstream = await start_raw_upstream(silent)
    shaper = await start_shaper(_plain(upstream.url, {"request_timeout": "300ms"}))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{_proxy(shaper)}/x") as response,
    ):
        assert response.status == 504
        assert await _error_of(response) == "upstream_timeout"
    assert heard.is_set()


_BAD_HEADS = {
    "garbage-status-line": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "status-out-of-range": b"HTTP/1.1 0042 Odd\r\nContent-Length: 0\r\n\r\n",
    "oversize-header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    # Limits on a response head: 128 fields; 64 KiB in all, however it arrives.
    "too-many-fields": b"HTTP/1.1 200 OK\r\n" + b"X-F: v\r\n" * 129 + b"\r\n",
    "head-over-64-kib": b"HTTP/1.1 200 OK\r\n" + b"X-F: %b\r\n" % (b"v" * 8000) * 9 + b"\r\n",
    # Nothing that could split the client's response, or be read two ways, passes.
    "bare-cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: s=1\r\nContent-Length: 0\r\n\r\n",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "nul-in-reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    # A transfer coding other than chunked would reach the client undone and unlabelled.
    "gzip-then-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "gzip-to-the-close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    # Upgrade is never forwarded here (WebSockets have their own path): a 101 answers nothing.
    "unrequested-101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
    b"Upgrade: websocket\r\n\r\n",
    "unrequested-101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
}


@pytest.mark.parametrize("reply", list(_BAD_HEADS.values()), ids=list(_BAD_HEADS))
async def test_malformed_upstream_response_is_502(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    reply: bytes,
) -> None:
    """A malformed status line, oversize header or bad framing from the upstream: 502."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()

    upstream = await start_raw_upstream(broken)
    shaper = await start_shaper(_plain(upstream.url))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{_proxy(shaper)}/x") as response,
    ):
        assert response.status == 502
        assert await _error_of(response) == "bad_upstream_response"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


_SHORT_BODIES = {
    "content-length-reset": (b"Content-Length: 100000\r\n\r\n" + b"a" * 5000, True),
    "content-length-fin": (b"Content-Length: 100000\r\n\r\n" + b"a" * 5000, False),
    "chunked-reset": (b"Transfer-Encoding: chunked\r\n\r\n1388\r\n" + b"a" * 5000 + b"\r\n", True),
    "chunked-fin": (b"Transfer-Encoding: chunked\r\n\r\n1388\r\n" + b"a" * 5000 + b"\r\n", False),
}


@pytest.mark.parametrize("reply, rst", list(_SHORT_BODIES.values()), ids=list(_SHORT_BODIES))
async def test_upstream_dying_mid_body_aborts_the_client_stream(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    reply: bytes,
    rst: bool,
) -> None:
    """An upstream dying mid-body gives the client a broken stream, never a complete-looking one."""
    client_has_head = asyncio.Event()

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + reply)
        await writer.drain()
        await client_has_head.wait()  # so the failure happens mid-body, not before the head
        if rst:
            _reset(writer)
        else:
            writer.close()

    upstream = await start_raw_upstream(dying)
    shaper = await start_shaper(_plain(upstream.url))

    # With aiohttp's client: the body read fails.
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 200
            client_has_head.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(_STEP):
                    await response.read()
        client_has_head.clear()

    # On the wire: the connection ends, and the bytes do not form a complete response.
    reader, writer = await asyncio.open_connection(*shaper.proxy_address)
    writer.write(b"GET /x HTTP/1.1\r\nHost: shop.test\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    client_has_head.set()
    async with asyncio.timeout(_STEP):
        rest = await reader.read(-1)  # returns only once the proxy closes the connection
    writer.close()
    status, headers, _ = _split_response(head)
    assert status == 200
    if "content-length" in headers:
        assert len(rest) < int(headers["content-length"])
    else:
        assert headers["transfer-encoding"] == "chunked"
        assert not rest.endswith(b"0\r\n\r\n")


async def test_upstream_closing_after_each_response_causes_no_errors(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An upstream that closes after every keep-alive response causes no errors."""

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(_ok(b"answer %d" % n))
        await writer.drain()

    upstream = await start_raw_upstream(one_shot)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(f"{_proxy(shaper)}/x") as response:
                assert response.status == 200
                assert (await response.read()).startswith(b"answer ")


_IDEMPOTENT_REQUESTS = {
    "GET": b"",
    "HEAD": b"",
    "PUT": b"replace-me " * 1000,
    "DELETE": b"",
    "OPTIONS": b"",
}


@pytest.mark.parametrize("method", list(_IDEMPOTENT_REQUESTS))
async def test_idle_close_racing_a_request_is_retried_for_idempotent_methods(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    method: str,
) -> None:
    """An idle close racing an idempotent request is retried on a fresh connection: no 5xx."""
    # The upstream answers the first request of each connection and drops the second unanswered,
    # as when its idle timeout fires just as the proxy reuses the connection.
    body = _IDEMPOTENT_REQUESTS[method]

    async def idle_closer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        request = await _read_request(reader)
        assert request is not None
        upstream.requests.append(request)
        answer = _ok(b"fresh")
        writer.write(answer[:-5] if request.method == b"HEAD" else answer)
        await writer.drain()
        await _read_request(reader)  # a second request on this connection: drop it unanswered

    upstream = await start_raw_upstream(idle_closer)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.request(method, f"{_proxy(shaper)}/x", data=body or None) as response:
                assert response.status == 200
                assert await response.read() == (b"" if method == "HEAD" else b"fresh")
    assert [(r.method, r.body) for r in upstream.requests] == [(method.encode(), body)] * 5
    assert upstream.connections >= 5


def _closes_idle_after(seconds: float, hint: bytes) -> RawHandler:
    """An upstream whose answers carry the Keep-Alive field `hint`, and which drops, unanswered,
    a request that reaches a connection idle for over `seconds`: the race of its idle close
    with a request on the wire, widened so that a test hits it every time."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        loop = asyncio.get_running_loop()
        answered = loop.time()
        while True:
            request = await _read_request(reader)
            if request is None or loop.time() - answered > seconds:
                return  # closed unanswered
            writer.write(_ok(b"kept", b"Keep-Alive: %s\r\n" % hint if hint else b""))
            await writer.drain()
            answered = loop.time()

    return handler


async def test_upstream_keep_alive_timeout_retires_pooled_connections_before_it_closes(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An upstream that says `Keep-Alive: timeout=2` (as Node.js says 5) closes connections
    idle for longer: the pool retires them a second before, so a POST after 1.3 s idle goes
    out on a new connection and is answered, not lost to the close (the race no retry can
    undo for a non-idempotent request). The pool's own keep-alive is 15 s."""
    handler = _closes_idle_after(1.2, b"timeout=2")
    upstream = await start_raw_upstream(handler)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.post(f"{_proxy(shaper)}/x", data=b"order") as response:
                assert response.status == 200
                assert await response.read() == b"kept"
        assert upstream.connections == 1  # back to back: the pooled connection is reused
        assert _idle_pool_size(shaper) == 1
        await asyncio.sleep(1.3)
        assert _idle_pool_size(shaper) == 0  # closed at its own time, not the pool's 15 s
        async with client.post(f"{_proxy(shaper)}/x", data=b"order") as response:
            assert response.status == 200
            assert await response.read() == b"kept"
    assert upstream.connections == 2


async def test_upstream_keep_alive_timeout_is_the_latest_responses(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """The limit is the last response's: an upstream that states a timeout on its first
    answer and none after (here on the answer to a HEAD, whose head counts like any other)
    is pooled by the pool's own keep-alive from then on."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        answered = 0
        while (request := await _read_request(reader)) is not None:
            hint = b"Keep-Alive: timeout=2\r\n" if answered == 0 else b""
            answer = _ok(b"kept", hint)
            writer.write(answer[:-4] if request.method == b"HEAD" else answer)
            await writer.drain()
            answered += 1

    upstream = await start_raw_upstream(handler)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert await response.read() == b"kept"
        async with client.head(f"{_proxy(shaper)}/x") as response:
            assert response.status == 200
        await asyncio.sleep(1.3)  # past the first answer's limit, within the pool's 15 s
        assert _idle_pool_size(shaper) == 1
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert await response.read() == b"kept"
    assert upstream.connections == 1


async def test_upstream_keep_alive_timeout_without_room_is_not_pooled(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """`Keep-Alive: timeout=1` leaves no room for the margin: each connection serves one
    request and is closed, never pooled; a timeout above the pool's own changes nothing."""
    upstream = await start_raw_upstream(_closes_idle_after(0.5, b"timeout=1"))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(f"{_proxy(shaper)}/x", data=b"order") as response:
                assert await response.read() == b"kept"
            assert _idle_pool_size(shaper) == 0
    assert upstream.connections == 3
    upstream = await start_raw_upstream(_closes_idle_after(60, b"timeout=3600, max=100"))
    shaper = await start_shaper(_plain(upstream.url, {"pool": {"keepalive_timeout": "50ms"}}))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{_proxy(shaper)}/x") as response:
                assert await response.read() == b"kept"
            await asyncio.sleep(0.1)  # past the pool's own keep-alive: a new connection each
    assert upstream.connections == 3


# ---------------------------------------------------------------------------------------------
# The same faults on a pooled connection. A request without a body that finds an idle pooled
# connection is sent and answered from the connections' callbacks (forward.py's _Exchange), not
# from a task; the tests above mostly meet a fresh connection, these meet a warm one: the
# upstream answers the first request of each connection normally and misbehaves on the second.

_WARM = "/warm"


def _warm_then(
    fault: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            request = await _read_request(reader)
            if request is None:
                return
            if request.target == _WARM.encode():
                writer.write(_ok(b"warm"))
                await writer.drain()
                continue
            await fault(reader, writer)
            return

    return handler


async def _warm_up(client: aiohttp.ClientSession, shaper: Shaper) -> None:
    async with client.get(f"{_proxy(shaper)}{_WARM}") as response:
        assert await response.read() == b"warm"


def _idle_pool_size(shaper: Shaper) -> int:
    endpoint = shaper.runtime.snapshot.upstreams["app"].endpoints[0]
    return len(endpoint.connections._idle)


async def test_pooled_connection_timeout_is_504(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    async def silent(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()

    upstream = await start_raw_upstream(_warm_then(silent))
    shaper = await start_shaper(_plain(upstream.url, {"request_timeout": "300ms"}))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
        assert _idle_pool_size(shaper) == 1
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 504
            assert await _error_of(response) == "upstream_timeout"
    assert upstream.connections == 1  # the request went out on the pooled connection
    assert _idle_pool_size(shaper) == 0  # which is not pooled again
    breaker = shaper.runtime.snapshot.upstreams["app"].endpoints[0].breaker
    assert breaker.consecutive == 1


@pytest.mark.parametrize("reply", list(_BAD_HEADS.values()), ids=list(_BAD_HEADS))
async def test_pooled_connection_malformed_response_is_502(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    reply: bytes,
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        await writer.drain()
        await reader.read()

    upstream = await start_raw_upstream(_warm_then(broken))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 502
            assert await _error_of(response) == "bad_upstream_response"
    assert upstream.connections == 1


async def test_pooled_connection_streams_a_body_that_arrives_after_the_head(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """The head arrives alone, the body later, in pieces: the exchange moves to a task that
    streams the rest, and the connection is pooled again once the body ended."""
    parts = [b"first-", b"second-", b"third"]

    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    upstream = await start_raw_upstream(_warm_then(slow_body))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 200
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert await response.read() == b"".join(parts)
    assert upstream.connections == 1
    await _eventually(lambda: _idle_pool_size(shaper) == 1)


async def test_pooled_connection_unsolicited_second_response_is_not_reused(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An upstream that sends two responses to one request: the client gets the first, and the
    extra one never answers a later request (the connection is not pooled again)."""

    async def doubled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_ok(b"answer") + _ok(b"unsolicited"))
        await writer.drain()
        await reader.read()

    upstream = await start_raw_upstream(_warm_then(doubled))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert await response.read() == b"answer"
        await _warm_up(client, shaper)  # "warm", not "unsolicited"
    assert upstream.connections == 2


async def test_client_leaving_before_a_pooled_connection_answers(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """The client goes away while the request waits for its head on a pooled connection: that
    connection is closed (its answer would be for nobody), the request is counted as 499, the
    breaker holds nothing against the endpoint, and the next request works."""
    heard = asyncio.Event()
    upstream_saw_close = asyncio.Event()

    async def waits(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        heard.set()
        await reader.read()
        upstream_saw_close.set()

    upstream = await start_raw_upstream(_warm_then(waits))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
    _, writer = await asyncio.open_connection(*shaper.proxy_address)
    writer.write(b"GET /x HTTP/1.1\r\nHost: shop.test\r\n\r\n")
    async with asyncio.timeout(_STEP):
        await heard.wait()
        _reset(writer)  # gone (a FIN alone is a half-close, which still gets its answer)
        await upstream_saw_close.wait()
    pool = shaper.runtime.snapshot.upstreams["app"]
    await _eventually(lambda: pool.in_flight == 0)
    assert {endpoint.in_flight for endpoint in pool.endpoints} == {0}
    assert shaper.metrics.requests.get(("app", "stable", "GET", "499")) == 1
    assert pool.endpoints[0].breaker.consecutive == 0
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)


# ---------------------------------------------------------------------------------------------
# Upstream responses as llhttp reads them (client.py): heads without a body, bodies delimited by
# the close, interim heads, what a head may hold. Each twice where the path differs: on a new
# connection (a task) and on a pooled one (the callbacks).


_HEAD_ANSWERS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", "11"),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    "no-framing": (b"HTTP/1.1 200 OK\r\nX-Kind: plain\r\n\r\n", None),
}


@pytest.mark.parametrize(
    ("answer", "length"), list(_HEAD_ANSWERS.values()), ids=list(_HEAD_ANSWERS)
)
async def test_head_answer_leaves_the_connection_usable(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    answer: bytes,
    length: str | None,
) -> None:
    """The answer to HEAD has no body whatever its framing says: the client gets the length
    it declared, and the next response on the same upstream connection is read as its own,
    not as that body; without any framing the connection is not taken for close-delimited."""

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while (request := await _read_request(reader)) is not None:
            if request.method == b"HEAD":
                writer.write(answer)
            else:
                writer.write(_ok(b"got " + request.target))
            await writer.drain()

    upstream = await start_raw_upstream(answers)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for target in ("/a", "/b", "/c"):
            async with client.head(f"{_proxy(shaper)}{target}") as response:
                assert response.status == 200
                assert response.headers.get("Content-Length") == length
                assert await response.read() == b""
            async with client.get(f"{_proxy(shaper)}{target}") as response:
                assert await response.read() == b"got " + target.encode()
    assert upstream.connections == 1


@pytest.mark.parametrize("end", ["fin", "reset"])
@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled"])
async def test_body_delimited_by_the_close(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    end: str,
    warm: bool,
) -> None:
    """A response with neither a length nor chunked framing ends when the upstream closes: a
    FIN completes the body (re-framed for the client), a reset breaks the client's stream."""
    parts = [b"first ", b"second ", b"third"]

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + parts[0])
        for part in parts[1:]:
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(part)
        await writer.drain()
        if end == "reset":
            _reset(writer)
        else:
            writer.close()

    async def fresh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        await closes(reader, writer)

    upstream = await start_raw_upstream(_warm_then(closes) if warm else fresh)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        if warm:
            await _warm_up(client, shaper)
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 200
            assert response.headers["Transfer-Encoding"] == "chunked"
            if end == "fin":
                assert await response.read() == b"".join(parts)
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with asyncio.timeout(_STEP):
                        await response.read()
    assert upstream.connections == 1


# Interim (1xx) responses: passed on to HTTP/1.1 clients ahead of the final one (RFC 9110
# section 15.2), on both paths: a new connection (a task) and a pooled one (callbacks).

_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: X-Hop\r\n"
    b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n"
)
_FINAL = (
    b"HTTP/1.1 200 All Fine, Thanks\r\nX-Cafe: caf\xc3\xa9\r\nX-Pad: v \t \r\n"
    b"Content-Length: 2\r\n\r\nok"
)


def _answers_with(answer: bytes, warm: bool) -> RawHandler:
    """An upstream that sends `answer` to the request (the second one of its connection when
    `warm`, after answering the warm-up request)."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        await _read_request(reader)

    async def fresh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        await respond(reader, writer)

    return _warm_then(respond) if warm else fresh


def _heads(raw: bytes) -> list[list[bytes]]:
    """The interim heads and the final head of one response, each as its lines, and the body
    as the last element's last line."""
    heads = []
    rest = raw
    while rest.startswith(b"HTTP/1.1 1"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        heads.append(head.split(b"\r\n"))
    head, _, body = rest.partition(b"\r\n\r\n")
    return [*heads, [*head.split(b"\r\n"), body]]


async def _answered(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    answer: bytes,
    warm: bool,
    config: dict[str, Any] | None = None,
    version: bytes = b"1.1",
) -> tuple[bytes, Shaper, RawUpstream]:
    """What a client reading to the close gets for one GET when the upstream answers it
    with `answer` (on a pooled connection when `warm`); the proxy and the upstream."""
    upstream = await start_raw_upstream(_answers_with(answer, warm))
    shaper = await start_shaper({**_plain(upstream.url), **(config or {})})
    if warm:
        async with aiohttp.ClientSession() as client:
            await _warm_up(client, shaper)
    raw = await _raw_exchange(
        shaper, b"GET /x HTTP/%b\r\nHost: shop.test\r\nConnection: close\r\n\r\n" % version
    )
    return raw, shaper, upstream


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled"])
async def test_early_hints_pass_to_the_client_and_the_final_answer_as_sent(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    warm: bool,
) -> None:
    """103 Early Hints reach the client before the answer, hop-by-hop fields removed, Via
    added; the upstream's 100 Continue does not (the proxy answers Expect itself). The final
    response keeps its reason phrase and header values byte for byte (trailing whitespace
    aside), and none of the interim heads' fields."""
    answer = _HINTS + b"HTTP/1.1 100 Continue\r\n\r\n" + _FINAL
    raw, _, upstream = await _answered(start_raw_upstream, start_shaper, answer, warm)
    hints, final = _heads(raw)
    assert hints == [
        b"HTTP/1.1 103 Early Hints",
        b"Link: </a.css>; rel=preload",
        b"Via: 1.1 shaper",
    ]
    assert final[0] == b"HTTP/1.1 200 All Fine, Thanks"
    assert b"X-Cafe: caf\xc3\xa9" in final
    assert b"X-Pad: v" in final
    assert not any(line.startswith(b"Link:") for line in final)
    assert final[-1] == b"ok"
    assert upstream.connections == 1


async def test_interim_heads_pass_ahead_of_an_upload_answer(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """A POST with Expect: 100-continue: the client gets the proxy's own 100 Continue, then
    the upstream's 102 and 103, then the answer, in that order."""
    answer = b"HTTP/1.1 102 Processing\r\n\r\n" + _HINTS + _FINAL
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        request = await _read_request(reader)
        assert request is not None
        received.append(request.body)
        writer.write(answer)
        await writer.drain()
        await _read_request(reader)

    upstream = await start_raw_upstream(handler)
    shaper = await start_shaper(_plain(upstream.url))
    reader, writer = await asyncio.open_connection(*shaper.proxy_address)
    try:
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(_STEP):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            raw = await reader.read(-1)
    finally:
        writer.close()
    processing, hints, final = _heads(raw)
    assert processing == [b"HTTP/1.1 102 Processing", b"Via: 1.1 shaper"]
    assert hints[0] == b"HTTP/1.1 103 Early Hints"
    assert final[0] == b"HTTP/1.1 200 All Fine, Thanks" and final[-1] == b"ok"
    assert received == [b"hello"]


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled"])
@pytest.mark.parametrize("why", ["http/1.0 client", "forward_interim off"])
async def test_interim_heads_are_dropped_when_they_may_not_pass(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    warm: bool,
    why: str,
) -> None:
    """An HTTP/1.0 client never gets a 1xx (it has none); with `proxy.forward_interim: false`
    no client does. The final answer is unchanged."""
    version = b"1.0" if why == "http/1.0 client" else b"1.1"
    config = {} if version == b"1.0" else {"proxy": {"forward_interim": False}}
    raw, _, _ = await _answered(
        start_raw_upstream, start_shaper, _HINTS + _FINAL, warm, config, version
    )
    assert raw.startswith(b"HTTP/%b 200 All Fine, Thanks\r\n" % version), raw[:100]
    assert b"Early Hints" not in raw and b"Link:" not in raw
    assert raw.endswith(b"\r\n\r\nok")


async def test_interim_head_over_the_field_limit_is_502(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An interim head is held to the limits of a final one: too many fields is a malformed
    response (502), not a head to skip or to pass on."""
    fields = b"".join(b"Link: </%d.css>; rel=preload\r\n" % i for i in range(200))
    answer = b"HTTP/1.1 103 Early Hints\r\n" + fields + b"\r\n" + _FINAL
    raw, _, _ = await _answered(start_raw_upstream, start_shaper, answer, warm=False)
    status, _, body = _split_response(raw)
    assert status == 502
    assert b"header fields" in body


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled"])
async def test_interim_head_after_the_answer_is_passed_to_nobody(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    warm: bool,
) -> None:
    """A 1xx the upstream sends after its final answer (in the same read) belongs to no
    request: the client does not get it, and the connection is not used again."""
    late = _FINAL + b"HTTP/1.1 103 Early Hints\r\nLink: </late.css>; rel=preload\r\n\r\n"
    raw, shaper, _ = await _answered(start_raw_upstream, start_shaper, late, warm)
    assert raw.startswith(b"HTTP/1.1 200 All Fine, Thanks\r\n"), raw[:80]
    assert b"late.css" not in raw
    await _eventually(lambda: _idle_pool_size(shaper) == 0)


async def test_upstream_closing_after_an_interim_head_is_not_retried(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """A pooled connection closed before the answer is retried once, as the upstream's idle
    timeout racing the request; one that sent a 103 first had begun to answer: no retry (the
    request is not processed twice), a 502 after the hints."""

    async def hint_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_HINTS)
        await writer.drain()

    upstream = await start_raw_upstream(_warm_then(hint_then_close))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
    raw = await _raw_exchange(
        shaper, b"GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
    )
    hints, final = _heads(raw)
    assert hints[0] == b"HTTP/1.1 103 Early Hints"
    assert final[0].startswith(b"HTTP/1.1 502 ")
    assert upstream.connections == 1


@pytest.mark.parametrize(
    "sent",
    [
        b"H",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart",
    ],
    ids=["one-byte", "half-head", "half-body"],
)
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello",
    ],
    ids=["GET", "PUT"],  # sent from the pool at once / through the client's request()
)
async def test_upstream_closing_after_part_of_its_answer_is_not_retried(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
    sent: bytes,
    request_bytes: bytes,
) -> None:
    """A pooled connection that closes after some bytes of the answer is not the upstream's
    idle timeout racing the request: the upstream took the request and began to answer, so
    the request is not sent again (it would be processed twice); a 502, or a cut response
    once its head has gone to the client. One connection only: the warm-up's."""

    async def answer_part_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(sent)
        await writer.drain()

    upstream = await start_raw_upstream(_warm_then(answer_part_then_close))
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        await _warm_up(client, shaper)
    raw = await _raw_exchange(shaper, request_bytes)
    if sent.endswith(b"part"):
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:80]
        assert raw.endswith(b"\r\n\r\npart")  # cut where the upstream stopped
    else:
        assert raw.startswith(b"HTTP/1.1 502 "), raw[:80]
    assert upstream.connections == 1


async def test_interim_flood_to_a_client_not_reading_is_not_buffered(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """An upstream that sends interim heads without end, to a client that reads nothing until
    the answer: the proxy stops passing them on once the client is behind, and the answer
    still arrives whole."""
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </%s>; rel=preload\r\n\r\n" % (b"x" * 1000)
    count = 32 * 1024  # 32 MiB of hints, more than any socket buffer on the way holds
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        for _ in range(count // 64):
            writer.write(hint * 64)
            await writer.drain()
        writer.write(_FINAL)
        await writer.drain()
        sent.set()
        await _read_request(reader)

    upstream = await start_raw_upstream(handler)
    shaper = await start_shaper(_plain(upstream.url))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, shaper.proxy_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(_STEP * 3):
            await sent.wait()
            raw = await reader.read(-1)
    finally:
        writer.close()
    *hints, final = _heads(raw)
    assert 0 < len(hints) < count // 4
    assert final[0] == b"HTTP/1.1 200 All Fine, Thanks" and final[-1] == b"ok"


async def test_trailer_that_never_ends_breaks_the_stream(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """A chunked body whose trailer field goes on and on is cut off once it passes the head
    limit (llhttp would hold all of it in memory): the client's stream breaks."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: ")
        for _ in range(64):  # 4 MiB at most: far past the 64 KiB limit
            writer.write(b"v" * 65536)
            await writer.drain()
        await reader.read()

    upstream = await start_raw_upstream(endless)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{_proxy(shaper)}/x") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(_STEP):
                    await response.read()


async def test_response_begun_after_the_answer_retires_the_connection(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """Bytes of another response after the answer, in the same read or while the connection
    is idle in the pool, answer nothing: that connection is not used again, so the next
    request is not read against a head already begun (which would be a 502)."""

    async def trailing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        first = True
        while await _read_request(reader) is not None:
            writer.write(_ok(b"answer") + (b"HTTP/1.1 2" if first else b""))
            await writer.drain()
            first = False

    upstream = await start_raw_upstream(trailing)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{_proxy(shaper)}/x") as response:
                assert response.status == 200
                assert await response.read() == b"answer"
    assert upstream.connections == 3


async def test_head_at_the_limits_passes_whole(
    start_raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    start_shaper: StartShaper,
) -> None:
    """A response head just inside the limits (an 8,000-byte field, 120 fields, under 64 KiB)
    and a chunked body with a trailer: every field reaches the client, the trailer does not
    become a header, and the body arrives whole."""
    big = b"b" * 8000
    fields = b"".join(b"X-F%d: %d\r\n" % (n, n) for n in range(118))
    reply = (
        b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\n" + fields
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n"
    )  # fmt: skip

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await _read_request(reader) is not None:
            writer.write(reply)
            await writer.drain()

    upstream = await start_raw_upstream(large)
    shaper = await start_shaper(_plain(upstream.url))
    async with aiohttp.ClientSession(max_field_size=9000) as client:
        for _ in range(2):  # on a new connection, then on the pooled one
            async with client.get(f"{_proxy(shaper)}/x") as response:
                assert response.status == 200
                assert response.headers["X-Big"] == big.decode()
                assert [response.headers[f"X-F{n}"] for n in range(118)] == [
                    str(n) for n in range(118)
                ]
                assert "X-Sum" not in response.headers
                assert await response.read() == b"hello"
    assert upstream.connections == 1


# ---------------------------------------------------------------------------------------------
# Keep-alive pooling.


def _peer_recorder(peers: list[tuple[str, int]]) -> web.Application:
    """An upstream that records the proxy's source address (one per connection) per request."""

    async def answer(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[:2])
        return web.Response(text="pooled")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    return app


async def test_sequential_requests_reuse_pooled_connections(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Fifty sequential requests from new clients share one kept-alive upstream connection."""
    peers: list[tuple[str, int]] = []
    shaper = await start_shaper(_plain(await start_upstream(_peer_recorder(peers))))
    for _ in range(50):
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{_proxy(shaper)}/x") as response,
        ):
            assert await response.text() == "pooled"
    assert len(peers) == 50
    assert len(set(peers)) <= 2


async def test_pool_max_connections_caps_concurrent_upstream_connections(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """`pool.max_connections: 2` caps twelve concurrent requests at two upstream connections."""
    peers: set[tuple[str, int]] = set()
    active = 0
    most_active = 0
    two_arrived = asyncio.Event()
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        nonlocal active, most_active
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername")[:2])
        active += 1
        most_active = max(most_active, active)
        if active == 2:
            two_arrived.set()
        try:
            await gate.wait()
        finally:
            active -= 1
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", held)
    shaper = await start_shaper(_plain(await start_upstream(app), {"pool": {"max_connections": 2}}))

    async def one(client: aiohttp.ClientSession) -> str:
        async with client.get(f"{_proxy(shaper)}/x") as response:
            return await response.text()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        requests = [asyncio.ensure_future(one(client)) for _ in range(12)]
        async with asyncio.timeout(_STEP):
            await two_arrived.wait()
        # Give requests past the cap every chance to reach the upstream if the cap leaked.
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert most_active == 2
        assert shaper.runtime.snapshot.upstreams["app"].in_flight == 12
        gate.set()
        async with asyncio.timeout(_STEP):
            assert await asyncio.gather(*requests) == ["done"] * 12
    assert most_active == 2
    assert len(peers) == 2


# ---------------------------------------------------------------------------------------------
# The stable/canary split.


def _version(name: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _rollout(
    start_upstream: StartUpstream,
    start_shaper: StartShaper,
    weight: float,
    **extra: Any,
) -> Shaper:
    stable = await start_upstream(_version("stable"))
    canary = await start_upstream(_version("canary"))
    return await start_shaper(
        make_config(
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
                        "override": {"header": "X-Canary"},
                    },
                }
            ],
            **extra,
        )
    )


async def _variant_of(
    client: aiohttp.ClientSession, shaper: Shaper, headers: dict[str, str]
) -> str:
    """The version that answered, checked against the X-Shaper-Variant the proxy added."""
    async with client.get(f"{_proxy(shaper)}/cart", headers=headers) as response:
        answered = await response.text()
        assert response.headers["X-Shaper-Variant"] == answered
        return answered


async def test_variant_header_names_the_version_that_answered(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Every proxied response carries X-Shaper-Variant, matching the upstream that answered."""
    shaper = await _rollout(start_upstream, start_shaper, 50)
    async with aiohttp.ClientSession() as client:
        seen = {await _variant_of(client, shaper, {"X-User-Id": f"u{n}"}) for n in range(40)}
    assert seen == {"stable", "canary"}


async def test_variant_header_can_be_turned_off(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """With `proxy.variant_header: false` responses carry no X-Shaper-Variant."""
    shaper = await _rollout(start_upstream, start_shaper, 50, proxy={"variant_header": False})
    async with aiohttp.ClientSession() as client:
        for n in range(10):
            async with client.get(
                f"{_proxy(shaper)}/cart", headers={"X-User-Id": f"u{n}"}
            ) as response:
                assert await response.text() in ("stable", "canary")
                assert "X-Shaper-Variant" not in response.headers


async def test_sticky_split_keeps_each_user_on_one_version(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """At 50 % the same X-User-Id always lands on the same version, and both versions serve."""
    shaper = await _rollout(start_upstream, start_shaper, 50)
    async with aiohttp.ClientSession() as client:
        by_user = {
            user: {await _variant_of(client, shaper, {"X-User-Id": user}) for _ in range(4)}
            for user in (f"user-{n}" for n in range(30))
        }
    assert all(len(variants) == 1 for variants in by_user.values())
    assert {v for variants in by_user.values() for v in variants} == {"stable", "canary"}


@pytest.mark.parametrize("weight, expected", [(0, "stable"), (100, "canary")])
async def test_weight_zero_and_hundred_send_everyone_one_way(
    start_upstream: StartUpstream, start_shaper: StartShaper, weight: float, expected: str
) -> None:
    """Weight 0 sends every user to the stable, weight 100 every user to the canary."""
    shaper = await _rollout(start_upstream, start_shaper, weight)
    async with aiohttp.ClientSession() as client:
        seen = {await _variant_of(client, shaper, {"X-User-Id": f"u{n}"}) for n in range(30)}
        seen |= {await _variant_of(client, shaper, {}) for _ in range(5)}
    assert seen == {expected}


@pytest.mark.parametrize("weight", [0, 50, 100])
async def test_override_header_forces_a_version(
    start_upstream: StartUpstream, start_shaper: StartShaper, weight: float
) -> None:
    """`X-Canary: always` forces the canary and `never` the stable, whatever the weight."""
    shaper = await _rollout(start_upstream, start_shaper, weight)
    async with aiohttp.ClientSession() as client:
        for n in range(10):
            user = {"X-User-Id": f"u{n}"}
            assert await _variant_of(client, shaper, {**user, "X-Canary": "always"}) == "canary"
            assert await _variant_of(client, shaper, {**user, "X-Canary": "never"}) == "stable"


# ---------------------------------------------------------------------------------------------
# The route's body limit.


async def test_chunked_upload_over_the_limit_is_aborted(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A chunked upload crossing the body limit is cut off; the upstream gets no whole body."""
    complete: list[int] = []
    partial: list[int] = []

    async def sink(request: web.Request) -> web.Response:
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
        except (aiohttp.ClientPayloadError, ConnectionError):
            partial.append(size)
            raise
        complete.append(size)
        return web.Response(text=f"got {size}")

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/upload", sink)
    shaper = await start_shaper(
        make_config(
            {"app": [await start_upstream(app)]},
            [
                {
                    "name": "upload",
                    "match": {"path_prefix": "/upload"},
                    "upstream": "app",
                    "max_body_size": "1MiB",
                },
                {"name": "rest", "match": {"path_prefix": "/"}, "upstream": "app"},
            ],
        )
    )

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):  # 4 MiB in all
            yield b"u" * (64 * 1024)

    async with aiohttp.ClientSession() as client:
        try:
            async with client.post(f"{_proxy(shaper)}/upload", data=body()) as response:
                status = response.status
                await response.read()
        except aiohttp.ClientError:
            status = None  # the proxy cut the connection: a broken stream
        # Under the limit the same route passes the body on.
        async with client.post(f"{_proxy(shaper)}/upload", data=b"u" * 1000) as small:
            assert small.status == 200
            assert await small.text() == "got 1000"
    assert status in (413, None)
    assert complete == [1000]
    assert all(size <= MiB for size in partial)


async def test_declared_length_over_the_limit_is_413_before_the_upstream(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A Content-Length over `max_body_size` is answered 413 and nothing reaches the upstream."""
    calls: list[str] = []

    async def sink(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(text="no")

    app = web.Application()
    app.router.add_post("/{tail:.*}", sink)
    shaper = await start_shaper(
        _plain(await start_upstream(app), limits={"max_body_size": "64KiB"})
    )
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{_proxy(shaper)}/big", data=b"b" * (65 * 1024)) as response,
    ):
        assert response.status == 413
        assert await _error_of(response) == "body_too_large"
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Metrics.


async def test_requests_are_counted_by_route_variant_method_and_code(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """/metrics and the golden signals count requests by route, variant, method and code."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("status", "200")), text="m")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    stable = await start_upstream(app)
    canary = await start_upstream(app)
    shaper = await start_shaper(
        make_config(
            {"v1": [stable], "v2": [canary]},
            [
                {
                    "name": "shop",
                    "match": {"path_prefix": "/shop"},
                    "rollout": {
                        "stable": "v1",
                        "canary": "v2",
                        "weight": 0,
                        "override": {"header": "X-Canary"},
                    },
                },
                {"name": "api", "match": {"path_prefix": "/api"}, "upstream": "v1"},
            ],
        )
    )
    base = _proxy(shaper)
    async with aiohttp.ClientSession() as client:
        plan = [
            ("GET", "/shop/a", {}, 3),
            ("GET", "/shop/a?status=503", {}, 2),
            ("POST", "/shop/b", {"X-Canary": "always"}, 4),
            ("DELETE", "/api/x?status=404", {}, 1),
        ]
        for method, path, headers, times in plan:
            for _ in range(times):
                async with client.request(method, base + path, headers=headers) as response:
                    await response.read()
        async with client.get(f"{_admin(shaper)}/metrics") as response:
            exposition = await response.text()
        async with client.get(f"{_admin(shaper)}/api/observability/golden-signals") as response:
            signals = await response.json()

    counted = {
        (s.labels["route"], s.labels["variant"], s.labels["method"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "shaper_requests_total"
    }
    assert counted == {
        ("shop", "stable", "GET", "200"): 3,
        ("shop", "stable", "GET", "503"): 2,
        ("shop", "canary", "POST", "200"): 4,
        ("api", "stable", "DELETE", "404"): 1,
    }
    routes = signals["routes"]
    assert routes["shop"]["variants"]["stable"]["1m"]["requests"] == 5
    assert routes["shop"]["variants"]["stable"]["1m"]["errors"] == 2
    assert routes["shop"]["variants"]["canary"]["1m"]["requests"] == 4
    assert routes["api"]["variants"]["stable"]["1m"]["requests"] == 1


async def test_connect_timeout_is_504(start_shaper: StartShaper) -> None:
    """An endpoint that never completes the TCP handshake (a full accept queue) gives 504
    with `X-Shaper-Error: connect_timeout`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Fill the accept queue so the kernel stops answering SYNs for this port.
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        raw = make_config(
            {"app": {"endpoints": [f"http://127.0.0.1:{port}"], "connect_timeout": "300ms"}},
            [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
        )
        shaper = await start_shaper(raw)
        async with aiohttp.ClientSession() as client:
            async with client.get("http://{}:{}/".format(*shaper.proxy_address)) as r:
                assert r.status == 504
                assert r.headers["X-Shaper-Error"] == "connect_timeout"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_upstream_stalling_mid_body_hits_the_idle_timeout(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """An upstream that sends part of a body and then stalls past idle_timeout: the client
    sees an aborted stream, not a complete-looking short body."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/", stall)
    url = await start_upstream(app)
    raw = make_config(
        {"app": {"endpoints": [url], "idle_timeout": "300ms"}},
        [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}],
    )
    shaper = await start_shaper(raw)
    async with aiohttp.ClientSession() as client:
        async with client.get("http://{}:{}/".format(*shaper.proxy_address)) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
