"""The client connections of listener.py over real sockets: what a connection does around its
requests' lives (graceful shutdown, a client's half-close, many pipelined requests) and what it
tells the client about it (`Connection: close` whenever the proxy closes after a response).

A whole proxy on port 0 in front of a `RecordingUpstream` (tests/rawbytes.py), or of a plain
asyncio server written here; the client is a plain socket that sends exact bytes. Every wait is
bounded; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from proxy.server import Shaper
from tests.conftest import StartShaper, make_config, to_config
from tests.rawbytes import RawClient, RawResponse, RecordingUpstream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from hotpath import MemoryTransport  # bench/hotpath.py, on the path above

pytestmark = pytest.mark.functional

Address = tuple[str, int]
StartProxy = Callable[..., Awaitable[Shaper]]

_STEP = 10.0  # an upper bound for one step of a test, so a broken proxy fails instead of hanging
H = b"Host: shaper.test"


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
    rest of the body still reaches the upstream, the client gets its answer, which says
    `Connection: close`, and then the connection closes (no further request is served)."""
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
        assert response.header("Connection") == [b"close"]
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


@pytest.mark.parametrize("refused", [1, 2], ids=["second-refused", "last-refused"])
async def test_half_close_after_pipelined_requests_answers_each(
    proxy: StartProxy, upstream: RecordingUpstream, refused: int
) -> None:
    """A client that sends three requests and then shuts down its sending side gets all three
    answers, in order (RFC 9112 section 9.3.2), the last one saying `Connection: close`, then
    the close. One of them (`refused`) is answered by the proxy itself (no route), the others
    by the upstream (the first on a new upstream connection, the next from the pool)."""
    shaper = await proxy()
    client = await RawClient.connect(shaper.proxy_address)
    names = [b"first", b"second", b"third"]
    hosts = [b"Host: nowhere.test" if i == refused else H for i in range(3)]
    try:
        await client.send(
            b"".join(
                request(b"/%d" % i, host, b"X-Request-Id: " + name)
                for i, (host, name) in enumerate(zip(hosts, names, strict=True))
            )
        )
        client.writer.write_eof()
        responses = await read_responses(client)
    finally:
        await client.close()
    assert [(r.status, r.header("X-Request-Id")) for r in responses] == [
        (404 if i == refused else 200, [name]) for i, name in enumerate(names)
    ]
    assert [r.header("Connection") for r in responses] == [[], [], [b"close"]]
    assert len(upstream.requests) == 2


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


# --- Saying so: `Connection: close` whenever the proxy closes after a response ----------------

# fmt: off
# Each row: the request's version and its Connection line; the response's Connection values;
# whether the connection stays open after it.
ASKED = [
    pytest.param(b"1.1", (), [], "open", id="1.1"),
    pytest.param(b"1.1", (b"Connection: close",), [b"close"], "closed", id="1.1-close"),
    pytest.param(b"1.0", (), [b"close"], "closed", id="1.0"),
    pytest.param(b"1.0", (b"Connection: keep-alive",), [b"keep-alive"], "open",
                 id="1.0-keep-alive"),
]
# fmt: on


@pytest.mark.parametrize("host", [H, b"Host: nowhere.test"], ids=["upstream", "no-route"])
@pytest.mark.parametrize(("version", "lines", "connection", "after"), ASKED)
async def test_response_says_whether_the_connection_stays_open(
    proxy: StartProxy,
    host: bytes,
    version: bytes,
    lines: tuple[bytes, ...],
    connection: list[bytes],
    after: str,
) -> None:
    """The upstream's answer and the proxy's own (404, no route) alike: `Connection: close`
    when the client asked to close (or, with HTTP/1.0, did not ask to keep it), and then the
    close; `Connection: keep-alive` to an HTTP/1.0 client only when it asked and the
    connection stays open."""
    shaper = await proxy()
    client = await RawClient.connect(shaper.proxy_address)
    try:
        await client.send(request(b"/p", host, *lines, version=version))
        response = await client.response()
        actually_after = await client.after_response()
    finally:
        await client.close()
    assert response.status == (200 if host == H else 404)
    assert response.header("Connection") == connection
    assert actually_after == after


async def _answer_on_head(
    answer: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An upstream that answers as soon as the request head is in (`b""`: closes instead),
    then reads and drops whatever else comes."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        if not answer:
            return
        writer.write(answer)
        while await reader.read(65536):
            pass
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope", 401),
        (b"", 502),
    ],
    ids=["upstream-answers-early", "upstream-closes-early"],
)
async def test_answer_before_the_body_is_read_says_close(
    proxy: StartProxy, answer: bytes, status: int
) -> None:
    """An answer that comes while the client is still sending its body (the upstream's own
    early answer, or the proxy's 502 when the upstream closes) says `Connection: close`: the
    connection does close after it, with a lingering close."""
    server = await asyncio.start_server(partial(_answer_on_head, answer), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        shaper = await proxy(f"http://127.0.0.1:{port}")
        client = await RawClient.connect(shaper.proxy_address)
        try:
            head = request(b"/p", H, b"Content-Length: 100000", method=b"POST")
            await client.send(head + b"a" * 1000)
            response = await client.response(timeout=_STEP)
            assert await client.read_until_closed(timeout=_STEP) == b""
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert response.status == status
    assert response.header("Connection") == [b"close"]


async def test_refused_upgrade_says_close_and_closes(proxy: StartProxy) -> None:
    """An Upgrade request the proxy refuses at once (no route) gets its 404 with `Connection:
    close`, and then the close: after an upgrade request nothing more is parsed, so the
    connection cannot serve another request."""
    shaper = await proxy()
    client = await RawClient.connect(shaper.proxy_address)
    try:
        upgrade = (b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13")
        await client.send(request(b"/ws", b"Host: nowhere.test", *upgrade))
        response = await client.response()
        after = await client.after_response()
    finally:
        await client.close()
    assert response.status == 404
    assert response.header("Connection") == [b"close"]
    assert after == "closed"


class _NeverDrains(MemoryTransport):
    """A client transport whose peer takes no byte: what is written stays buffered, so a
    close waits for ever, as on a socket whose client stopped reading."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.aborted = False

    def write(self, data: Any) -> None:
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closing = True  # a real transport closes once the buffer is sent: never, here

    def abort(self) -> None:
        self.aborted = True


async def test_a_close_whose_client_takes_nothing_is_aborted() -> None:
    """A connection closed with bytes still buffered (the tail of a response to a client that
    stopped reading, then the keep-alive expiry; no write waited on it, so no send deadline
    ran) is aborted once its client has taken nothing for the keep-alive timeout. Before, the
    close waited for the buffer to drain, for ever, and the connection stayed held."""
    from proxy.listener import ProxyServer
    from proxy.metrics import Metrics

    routes = [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}]
    raw = make_config(
        {"app": ["http://127.0.0.1:9"]}, routes, limits={"keepalive_timeout": "100ms"}
    )
    limits = to_config(raw).limits
    metrics = Metrics(asyncio.get_running_loop().time, "c")
    server = ProxyServer(lambda *_: None, limits=limits, metrics=metrics)  # type: ignore[arg-type, return-value]
    transport = _NeverDrains()
    connection = server()
    connection.connection_made(transport)
    transport.write(b"x" * 100_000)  # the part of an answer the client never took
    async with asyncio.timeout(_STEP):
        while not transport.aborted:  # keep-alive expiry closes it; the deadline aborts it
            await asyncio.sleep(0.02)
    assert transport.closing  # a close first, the abort only once the client took nothing
