"""The client connections of listener.py over real sockets: what a connection does around its
requests' lives (graceful shutdown, a client's half-close, many pipelined requests) and what it
tells the client about it (`Connection: close` whenever the proxy closes after a response).

A whole proxy on port 0 in front of a `RecordingUpstream` (tests/rawbytes.py), or of a plain
asyncio server written here; the client is a plain socket that sends exact bytes. Every wait is
bounded; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.server import Shaper
from tests.conftest import StartShaper, make_config
from tests.rawbytes import RawClient, RawResponse, RecordingUpstream

pytestmark = pytest.mark.functional

Address = tuple[str, int]
StartProxy = Callable[..., Awaitable[Shaper]]

_STEP = 10.0  # an upper bound for one step of a test, so a broken proxy fails instead of hanging
H = b"Host: shaper.test"


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recording = RecordingUpstream()
    await recording.start()
    yield recording
    await recording.close()


@pytest.fixture
def proxy(start_shaper: StartShaper, upstream: RecordingUpstream) -> StartProxy:
    """Start a proxy with one route, host shaper.test -> the recording upstream (or `url`);
    `drain_timeout` and the upstream's own settings as keywords."""

    async def start(
        url: str | None = None, drain_timeout: str = "5s", **upstream_settings: Any
    ) -> Shaper:
        raw = make_config(
            {"main": {"endpoints": [url or upstream.url], **upstream_settings}},
            [{"name": "site", "match": {"host": "shaper.test"}, "upstream": "main"}],
            drain_timeout=drain_timeout,
        )
        return await start_shaper(raw)

    return start


def request(path: bytes, *lines: bytes, method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
    """A request head from its lines (CRLF added), ending in the blank line."""
    first = b"%b %b HTTP/%b" % (method, path, version)
    return b"".join(line + b"\r\n" for line in (first, *lines)) + b"\r\n"


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until `condition()` holds."""
    async with asyncio.timeout(_STEP):
        while not condition():
            await asyncio.sleep(0.01)


async def stopped_accepting(address: Address) -> None:
    """Wait (bounded) until the proxy refuses new connections: its shutdown has begun, and
    every connection it had was closed or told to close after its response (one step)."""
    async with asyncio.timeout(_STEP):
        while True:
            try:
                _, writer = await asyncio.open_connection(*address)
            except ConnectionRefusedError:
                return
            writer.close()
            await asyncio.sleep(0.01)


# --- Graceful shutdown ------------------------------------------------------------------------


async def test_shutdown_reads_the_rest_of_the_body_in_flight(
    proxy: StartProxy, upstream: RecordingUpstream
) -> None:
    """A shutdown that begins while a request body is arriving lets that request finish: the
    rest of the body still reaches the upstream, the client gets its answer, and then the
    connection closes (no further request is served)."""
    shaper = await proxy()
    client = await RawClient.connect(shaper.proxy_address)
    stopping: asyncio.Task[None] | None = None
    try:
        await client.send(request(b"/p", H, b"Content-Length: 10", method=b"POST") + b"hello")
        await eventually(lambda: upstream.received.endswith(b"hello"))
        stopping = asyncio.create_task(shaper.stop())
        await stopped_accepting(shaper.proxy_address)
        await client.send(b"world")
        response = await client.response()
        assert (response.status, response.body) == (200, b"ok")
        assert await client.read_until_closed() == b""
    finally:
        await client.close()
        if stopping is not None:
            await stopping
    assert [r.body for r in upstream.requests] == [b"helloworld"]


# --- A client's half-close --------------------------------------------------------------------


async def read_responses(client: RawClient) -> list[RawResponse]:
    """Every response until the proxy closes the connection."""
    responses = []
    while True:
        try:
            responses.append(await client.response(timeout=_STEP))
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b""  # the close came between responses
            return responses


async def test_half_close_after_pipelined_requests_answers_each(
    proxy: StartProxy, upstream: RecordingUpstream
) -> None:
    """A client that sends three requests and then shuts down its sending side gets all three
    answers, in order (RFC 9112 section 9.3.2), then the close; the one in the middle is
    answered by the proxy itself (no route), the others by the upstream."""
    shaper = await proxy()
    client = await RawClient.connect(shaper.proxy_address)
    try:
        await client.send(
            request(b"/a", H, b"X-Request-Id: first")
            + request(b"/b", b"Host: nowhere.test", b"X-Request-Id: second")
            + request(b"/c", H, b"X-Request-Id: third")
        )
        client.writer.write_eof()
        responses = await read_responses(client)
    finally:
        await client.close()
    assert [(r.status, r.header("X-Request-Id")) for r in responses] == [
        (200, [b"first"]),
        (404, [b"second"]),
        (200, [b"third"]),
    ]
    assert [r.head.split(b" ")[1] for r in upstream.requests] == [b"/a", b"/c"]


async def test_half_close_in_the_middle_of_a_body_fails_it_as_incomplete(
    proxy: StartProxy, upstream: RecordingUpstream
) -> None:
    """A client that shuts down its sending side before its body is complete gets a 400 that
    says the body was cut short (not one for a body that stalled, at the idle timeout, which
    is set far beyond the test's bound here), then the close; the upstream gets no request."""
    shaper = await proxy(idle_timeout="60s")
    client = await RawClient.connect(shaper.proxy_address)
    try:
        await client.send(request(b"/p", H, b"Content-Length: 10", method=b"POST") + b"hello")
        await eventually(lambda: upstream.received.endswith(b"hello"))
        client.writer.write_eof()
        response = await client.response(timeout=_STEP)
        assert await client.read_until_closed() == b""
    finally:
        await client.close()
    assert response.status == 400
    assert b"content length" in response.body.lower(), response.body
    assert upstream.requests == []


# --- Many pipelined requests ------------------------------------------------------------------


async def test_body_behind_many_pipelined_requests_is_read(
    proxy: StartProxy, upstream: RecordingUpstream
) -> None:
    """Reading pauses while over 32 pipelined requests wait; it resumes as they are answered,
    so a body behind 40 of them, of which the client sends the rest only once it has their
    answers, still arrives (rather than stalling into a 400 at the body idle timeout)."""
    shaper = await proxy(idle_timeout="60s")
    client = await RawClient.connect(shaper.proxy_address)
    try:
        gets = b"".join(request(b"/g%d" % i, H) for i in range(40))
        await client.send(
            gets + request(b"/p", H, b"Content-Length: 10", method=b"POST") + b"hello"
        )
        for _ in range(40):
            assert (await client.response(timeout=_STEP)).status == 200
        await client.send(b"world")
        response = await client.response(timeout=_STEP)
    finally:
        await client.close()
    assert (response.status, response.body) == (200, b"ok")
    assert upstream.requests[-1].body == b"helloworld"
