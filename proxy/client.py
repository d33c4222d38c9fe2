"""I/O: a lean pooled HTTP/1.1 client for the forwarding path.

aiohttp's `ClientSession` builds a `ClientRequest`, a header multidict, a connector key and a
`ClientResponse` for every call; the proxy needs none of that. Here a request is one bytes
buffer for the head (the header lines forward.py already built) and the body as it comes, and
the response is parsed by llhttp (through httptools, a parser kept per connection) in a small
protocol of ours: the head as bytes lines, and the body as bytes when all of it came with the
head, else as aiohttp's `StreamReader` with flow control. Failures are raised as aiohttp's own
client exceptions (disconnects, the idle and head timeouts, "payload not completed", a
malformed response as HttpProcessingError), which errors.from_client_error maps.

    EndpointConnections.request()
      acquire: newest idle connection (LIFO) or a new one under `max_connections`, else wait
      -> write head (+ small body in the same write) or start a body-writer task (streamed
         as-is for Content-Length, re-framed when the client sent chunked; backpressure via
         the protocol's pause_writing/resume_writing)
      -> read heads until a final one (1xx ones, but 100, told to the caller's `interim`)
      -> `UpstreamResponse`
      a pooled connection the upstream closed before answering is retried once on a fresh
      one when the request can be sent again (idempotent method, body absent or in memory)
    EndpointConnections.send_now(): the same for a request without a body on an idle pooled
      connection, from a callback: the head and body go to a `HeadListener`, no task
    UpstreamResponse.release(): back to the pool only when the body was read to its end, the
      upload finished and keep-alive is allowed; anything else closes the connection.

Failures: connect errors are raised as the error tree's `UpstreamConnectError` and
`UpstreamConnectTimeout`; everything after the connect surfaces as aiohttp's client and
parser exceptions, which `errors.from_client_error` maps in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import httptools
from aiohttp import (
    ClientOSError,
    ClientPayloadError,
    ServerDisconnectedError,
    ServerTimeoutError,
)
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from mypy_extensions import mypyc_attr

from .errors import UpstreamConnectError, UpstreamConnectTimeout
from .headers import Lines, connection_tokens, keep_alive_timeout
from .protocol import FlowProtocol

log = logging.getLogger("shaper.client")

__all__ = [
    "IDEMPOTENT",
    "STALE",
    "Body",
    "EndpointConnections",
    "HeadListener",
    "ResponseHead",
    "UpstreamResponse",
]

# The methods a client may retry on its own (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods without a body get no Content-Length: 0 (as aiohttp's client did for the others).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_READ_BUFSIZE = 2**16
# What a pooled connection the upstream closed before answering fails with.
STALE = (ServerDisconnectedError, ClientOSError, ConnectionError)
_MAX_HEADERS = 128
_MAX_HEAD = 2**16
# Subtracted from an upstream's Keep-Alive timeout: its clock starts when it sent the response,
# before the proxy read it (undici's keepAliveTimeoutThreshold; HTTP.jl's margin).
_KEEP_ALIVE_MARGIN = 1.0
_FIELD_SEP = b": "
_IDLE, _HEAD, _BODY = 0, 1, 2  # what a connection's timer is watching for


class ResponseHead:
    """A final response head from the upstream, as parsed: the status, the reason as sent,
    the header lines (name, value) as bytes with the value's trailing whitespace removed, and
    whether the upstream asked to close."""

    __slots__ = ("code", "raw_headers", "reason", "should_close")

    def __init__(
        self, code: int, reason: bytes, raw_headers: list[tuple[bytes, bytes]], should_close: bool
    ) -> None:
        self.code = code
        self.reason = reason
        self.raw_headers = raw_headers
        self.should_close = should_close

    @property
    def content_length(self) -> int | None:
        """The Content-Length the upstream declared (llhttp checked it is digits, and not
        repeated with another value); read only when the body is not all here, or for HEAD,
        204 and 304, so not gathered as the head is parsed."""
        for name, value in self.raw_headers:
            if len(name) == 14 and name.lower() == b"content-length":
                return int(value)
        return None

    def delimited_by_close(self) -> bool:
        """Whether the body ends where the connection does: no length, and not chunked
        (RFC 9112 section 6.3)."""
        chunked = False
        for name, value in self.raw_headers:
            if len(name) == 14 and name.lower() == b"content-length":
                return False
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
        return not chunked


# A response body as the connection hands it over: all of it (bytes), or a stream.
Body = bytes | StreamReader
_Message = tuple[ResponseHead, StreamReader]


class HeadListener(Protocol):
    """Told, from the connection's callbacks, how the exchange of `send_now()` went: exactly
    one of the two is called, unless the listener is detached first. The body is bytes when
    all of it came with the head, else a stream."""

    def on_head(self, head: ResponseHead, body: Body) -> None: ...

    def on_error(self, exc: BaseException) -> None: ...

    def on_interim(self, code: int, reason: bytes, lines: Lines) -> None: ...


# Told of each interim (1xx) head before the final one, other than 100 Continue (the proxy
# sends its own): code, reason, header lines. It must not raise.
InterimListener = Callable[[int, bytes, Lines], None]


@mypyc_attr(native_class=False)  # see protocol.py
class _Connection(FlowProtocol):
    """One upstream connection: llhttp (httptools) parses what the upstream sends, through the
    callbacks below; each final response head goes to the one waiting exchange with its body,
    as bytes when all of it arrived with the head (the common small response: no stream
    object at all), else as a `StreamReader` fed as the rest arrives, with flow control.

    Limits on what an upstream may send in a head: 128 fields, 64 KiB in all (counted as
    the head is read, also across reads, so a head that never ends is cut off); over them, or
    anything llhttp rejects, the exchange fails as a malformed response (a 502). llhttp is
    strict about header values (no control characters, no bare CR, no obs-fold), so nothing
    that could split the client's response passes; it accepts LF-only line ends and spaces
    after a chunk size, as aiohttp's client does.

    Deadlines: while a request is out, its response head must arrive by `deadline` (the
    request timeout after the last request byte went out); while a body arrives, each read
    must come within the idle timeout of the one before, not counting the time reading is
    paused because the body's reader is behind (a client slower than the upstream). The
    timer is created once and, when it fires early, re-armed for what is left, so requests do
    not create timer handles."""

    __slots__ = (
        "_deadline",
        "_done",
        "_head",
        "_head_size",
        "_hp",
        "_idle_timeout",
        "_in_head",
        "_interim",
        "_keep_alive",
        "_lines",
        "_parts",
        "_payload",
        "_phase",
        "_progress",
        "_ready",
        "_reason",
        "_renew",
        "_skip_payload",
        "_timer",
        "_unparsed",
        "_waiter",
        "exc",
        "hinted_until",
        "idle_until",
        "interim",
        "listener",
        "reused",
        "should_close",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        # Until when this connection may sit idle in the pool: what the upstream's Keep-Alive
        # timeout allows, counted from the last response head (None: it stated none), and
        # until when in all, set as it goes back to the pool.
        self.hinted_until: float | None = None
        self.idle_until = 0.0
        self.reused = False
        self.should_close = False
        self.exc: BaseException | None = None
        self._waiter: asyncio.Future[_Message] | None = None
        self.listener: HeadListener | None = None  # instead of a waiter: see send_now()
        self.interim: InterimListener | None = None  # with a waiter: see request()
        self._ready: deque[_Message] = deque()
        self._payload: StreamReader | None = None  # the body arriving now, as a stream
        self._skip_payload = False
        self._phase = _IDLE
        self._deadline = 0.0
        self._idle_timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The parser, and what its callbacks gather of the message being parsed.
        self._hp: httptools.HttpResponseParser | None = None
        self._renew = True  # a new parser for the next exchange (none yet, or after a HEAD)
        self._in_head = False
        self._unparsed = 0  # bytes read since the parser last got anywhere (a head, a trailer)
        self._progress = False  # the parser got somewhere in this read
        self._head_size = 0  # bytes of the head's fields so far
        self._interim = False
        self._reason = b""
        self._keep_alive: bytes | None = None  # the head's Keep-Alive value
        self._lines: list[tuple[bytes, bytes]] = []
        self._head: ResponseHead | None = None  # the message in its body
        self._parts: list[bytes] = []
        self._done: list[tuple[ResponseHead, bytes]] = []  # messages completed in this read

    # -- the parser's callbacks (httptools) ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._reason = b""
        self._keep_alive = None
        self._lines = []

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason)
        self._reason = self._reason + reason if self._reason else reason  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # else a trailer field of a chunked body: not forwarded
            size = len(name)
            self._head_size += size + len(value)
            value = value.rstrip(b" \t")  # llhttp strips the whitespace before a value only
            # name[4]: "-" in Keep-Alive, a cheap first test ("Connection" has ten letters too)
            if size == 10 and name[4] == 45 and name.lower() == b"keep-alive":
                self._keep_alive = value
            elif (
                size == 17 and value.lower() != b"chunked" and name.lower() == b"transfer-encoding"
            ):
                # llhttp undoes chunked only; a coding such as gzip would reach the client
                # with no header left to say so (Transfer-Encoding is hop-by-hop).
                raise HttpProcessingError(message=f"upstream transfer coding {value[:40]!r}")
            self._lines.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress = True
        hp = self._hp
        assert hp is not None
        code = hp.get_status_code()
        lines = self._lines
        if len(lines) > _MAX_HEADERS:
            raise HttpProcessingError(
                message=f"upstream response with over {_MAX_HEADERS} header fields"
            )
        if self._head_size > _MAX_HEAD:
            raise HttpProcessingError(message=f"upstream response head over {_MAX_HEAD} bytes")
        if self._reason.find(b"\0") >= 0:  # not `in`: see headers._scan
            raise HttpProcessingError(message="NUL in the upstream's status line")
        if code < 200 and code >= 100:  # a final head is done with at the first test
            if code == 101:
                # Upgrade is never forwarded on this path (WebSockets go through
                # websocket.py), so this is a switch nobody asked for (RFC 9110 section
                # 15.2.2): malformed.
                raise HttpProcessingError(message="101 Switching Protocols to a request for none")
            self._interim = True
            if self._done or self._phase != _HEAD:
                # After the final head (in this read, or on an idle connection): a message
                # nobody asked for, passed on to nobody; the connection is not reused.
                self.should_close = True
            elif code != 100:  # 100 Continue: the proxy sends its own (see forward.py)
                listener = self.listener
                target = listener.on_interim if listener is not None else self.interim
                if target is not None:
                    try:
                        target(code, self._reason, lines)
                    except Exception:  # a bug of ours is not a malformed upstream response
                        log.exception("an interim response could not be passed on")
            return
        head = ResponseHead(code, self._reason, lines, not hp.should_keep_alive())
        keep_alive = self._keep_alive
        if keep_alive is None:
            self.hinted_until = None
        else:
            # Counted from the head: the upstream's clock starts when it has written the
            # whole response, which is after it sent the head, and may be well before the
            # proxy reads the last of a body held up by a slow client.
            timeout = keep_alive_timeout(keep_alive)
            self.hinted_until = (
                None if timeout is None else self._loop.time() + timeout - _KEEP_ALIVE_MARGIN
            )
        if self._skip_payload:
            # The answer to a HEAD: no body whatever its framing says. llhttp cannot be told
            # so; it is replaced before the next exchange, and any bytes it reads as this
            # message's body are bytes the upstream should not have sent. Without a length
            # llhttp would wait for the close, and call the connection done with it.
            if head.should_close:
                head.should_close = not _persistent(hp.get_http_version(), lines)
            self._renew = True
            self._done.append((head, b""))
            return
        self._head = head
        self._parts = []

    def on_body(self, data: bytes) -> None:
        self._progress = True
        payload = self._payload
        if payload is not None:
            payload.feed_data(data)
        elif self._head is not None:
            self._parts.append(data)
        else:
            self.should_close = True  # a body after a HEAD's answer, or after a 1xx

    def on_message_complete(self) -> None:
        self._progress = True
        if self._interim:
            self._interim = False
            return
        head, self._head = self._head, None
        payload = self._payload
        if payload is not None:
            self._payload = None
            self._phase = _IDLE  # the body is all here: no idle deadline for it
            payload.feed_eof()
        elif head is not None:
            parts = self._parts
            self._done.append((head, parts[0] if len(parts) == 1 else b"".join(parts)))

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        hp = self._hp
        if hp is None or self.exc is not None:
            return
        phase = self._phase
        if phase == _BODY:
            self._deadline = self._loop.time() + self._idle_timeout
        elif phase == _IDLE:
            self.should_close = True  # bytes nobody asked for: this connection is not reused
        # Any byte of an answer: the upstream took the request, so a close from here on is
        # not its idle timeout racing it, and the request is not sent again (see request()).
        self.reused = False
        self._progress = False
        try:
            hp.feed_data(data)
            if self._progress:
                self._unparsed = 0
            else:
                # Nothing came of this read: a head or a trailer still arriving, which llhttp
                # (httptools) holds in memory until it ends. Bounded across reads.
                self._unparsed += len(data)
                if self._unparsed > _MAX_HEAD:
                    raise HttpProcessingError(
                        message=f"upstream head or trailer over {_MAX_HEAD} bytes"
                    )
        except Exception as exc:
            self._fail_parse(exc)
            return
        done = self._done
        if done:
            self._done = []
            more = self._head is not None or self._in_head  # anything begun after them
            for index, (head, body) in enumerate(done):
                if self._deliver(head, body, more or index < len(done) - 1):
                    return
        current = self._head
        if current is not None and self._payload is None:
            # A head whose body goes on past this read: from here on, a stream.
            payload = StreamReader(self, _READ_BUFSIZE, loop=self._loop)
            for part in self._parts:
                payload.feed_data(part)
            self._parts = []
            self._payload = payload
            self._deliver(current, payload, False)

    def _fail_parse(self, exc: Exception) -> None:
        """What the upstream sent is not a response llhttp accepts, or breaks a limit: the
        exchange fails as a malformed response (502) and the connection is closed."""
        cause: BaseException = exc
        if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__:
            cause = exc.__context__  # raised by a callback above: a limit
        self.should_close = True
        self._hp = None
        if isinstance(cause, HttpProcessingError):
            error = HttpProcessingError(code=cause.code, message=cause.message)
        else:
            error = HttpProcessingError(message=str(cause))
        self._fail(error)
        if self.transport is not None:
            self.transport.close()

    def _deliver(self, head: ResponseHead, body: Body, more: bool) -> bool:
        """Hand a final response head on; True when a listener took it (it may have handed
        this connection on, so nothing more is read here)."""
        if head.should_close or more:
            self.should_close = True  # more: a response nobody asked for; not reused
        listener = self.listener
        if listener is not None:
            self.listener = None
            if isinstance(body, bytes):  # _took(), inline for the common whole body
                self._phase = _IDLE
            else:
                self._took(body)
            listener.on_head(head, body)  # may hand this connection on
            return True
        self.interim = None  # the final head is here: no 1xx after it belongs to the request
        if isinstance(body, bytes):
            body = _whole(self, body)
        item = (head, body)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(item)
        else:
            self._ready.append(item)
        return False

    def eof_received(self) -> bool:
        self.should_close = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.should_close = True
        payload = self._payload
        if payload is not None and not payload.is_eof():
            head = self._head
            if exc is None and head is not None and head.delimited_by_close():
                payload.feed_eof()  # a body delimited by the close ends here
            else:
                payload.set_exception(ClientPayloadError("Response payload is not completed"))
        self._payload = None
        self._hp = None
        if self.exc is None:
            self.exc = ServerDisconnectedError() if exc is None else ClientOSError(*exc.args)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.exc)
        self._waiter = None
        super().connection_lost(exc)
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.on_error(self.exc)

    # Flow control: the stream pauses the transport when its buffer fills and resumes it
    # once read below the low-water mark. llhttp is not paused inside a read: a read is
    # bounded, and all of it goes into the stream. While paused, the body's idle deadline
    # does not run (the proxy is not reading: the upstream is not idle, however long the
    # client takes); it starts afresh when reading resumes.
    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
            if self._phase == _BODY:
                self._deadline = self._loop.time() + self._idle_timeout
                if self._timer is None:
                    self._timer = self._loop.call_at(self._deadline, self._on_timer)

    # -- one exchange ------------------------------------------------------------------------

    def begin(self, skip_payload: bool, idle_timeout: float) -> None:
        """Get ready for the response to a request about to be sent."""
        if self._renew:
            self._renew = False
            self._hp = hp = httptools.HttpResponseParser(self)
            hp.set_dangerous_leniencies(
                lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
            )
        self._skip_payload = skip_payload
        self._idle_timeout = idle_timeout
        self._payload = None
        self._head = None
        self._ready.clear()

    def expect_head(self, deadline: float) -> None:
        """The response head must arrive by `deadline` (moved on while a body is sent)."""
        self._phase = _HEAD
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
        elif timer.when() > deadline:
            timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    async def read(self) -> _Message:
        """The next response head (with its body as a stream)."""
        if self._ready:
            item = self._ready.popleft()
        elif self.exc is not None:
            raise self.exc
        else:
            self._waiter = self._loop.create_future()
            item = await self._waiter
        self._took(item[1])
        return item

    def _took(self, body: Body) -> None:
        """A final response head was taken: from now on the body's idle deadline runs."""
        if isinstance(body, bytes) or body.is_eof():
            self._phase = _IDLE
        else:
            self._phase = _BODY
            self._deadline = self._loop.time() + self._idle_timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def fail(self, exc: BaseException) -> None:
        """The exchange failed on this side (the upload): the reader raises `exc`."""
        self._fail(exc)
        if self.transport is not None:
            # abort, not close: a response already streaming then fails as incomplete
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._waiter = None
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(exc)
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.on_error(exc)

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == _IDLE or self.transport is None:
            return
        if self._reading_paused and self._phase == _BODY:
            return  # not read for backpressure: resume_reading() arms the deadline again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self.should_close = True
        self._fail(ServerTimeoutError("Timeout on reading data from socket"))
        self.transport.abort()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def reusable_at(self, now: float) -> bool:
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self.should_close
            and self.exc is None
            and now < self.idle_until
        )


class UpstreamResponse:
    """A response head from the upstream and its body as a stream; release it exactly once."""

    __slots__ = ("_conn", "_done", "_owner", "_writer", "content", "head")

    def __init__(
        self,
        owner: EndpointConnections,
        conn: _Connection,
        writer: asyncio.Task[bool] | None,
        head: ResponseHead,
        content: StreamReader,
    ) -> None:
        self._owner = owner
        self._conn = conn
        self._writer = writer
        self._done = False
        self.head = head
        self.content = content

    @property
    def status(self) -> int:
        return self.head.code

    def release(self) -> None:
        """Give the connection back: pooled when the exchange ended cleanly, else closed."""
        writer, content = self._writer, self.content
        self._finish(
            content.at_eof()
            and content.exception() is None
            and not self._conn.should_close
            and (writer is None or (writer.done() and not writer.cancelled() and writer.result()))
        )

    def close(self) -> None:
        """Drop the connection whatever state the exchange is in."""
        self._finish(False)

    def _finish(self, reusable: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._owner.release(self._conn, reusable)


def _persistent(version: str, lines: list[tuple[bytes, bytes]]) -> bool:
    """Whether a connection stays open after a response by its version and Connection
    fields alone (RFC 9112 section 9.3), for an answer with no body to delimit."""
    tokens = connection_tokens(lines)
    return "close" not in tokens if version == "1.1" else "keep-alive" in tokens


def _whole(protocol: FlowProtocol, body: bytes) -> StreamReader:
    """A body that arrived whole, as an ended stream (for the exchanges that run as tasks)."""
    if not body:
        return EMPTY_PAYLOAD
    stream = StreamReader(protocol, _READ_BUFSIZE, loop=protocol._loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream


def _encode_head(method: str, target: str, headers: Lines) -> bytes:
    try:
        line = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    except UnicodeEncodeError:
        # The target came from aiohttp's utf-8/surrogateescape decoding of the request line.
        line = f"{method} ".encode() + target.encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\n"
    return line + b"\r\n".join(map(_FIELD_SEP.join, headers)) + b"\r\n\r\n"


class EndpointConnections:
    """The keep-alive connections to one endpoint (host and port)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        keepalive_timeout: float,
        connect_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.closed = False
        self._idle: list[_Connection] = []
        self._busy = 0  # connections handed out or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._expiry: asyncio.TimerHandle | None = None

    # -- the pool -----------------------------------------------------------------------

    async def _acquire(self, fresh: bool, head_timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if not fresh:
                pooled = self._pop_idle(loop.time())
                if pooled is not None:
                    return pooled
            if self._busy < self.max_connections:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(head_timeout):
                    await waiter
            except BaseException:
                if not waiter.done():
                    waiter.cancel()
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # pass on the turn this task was given
                raise
        self._busy += 1
        try:
            conn = await self._connect(loop)
        except BaseException:
            self._busy -= 1
            self._wake()
            raise
        return conn

    def _pop_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, and idle ones expire
            if conn.reusable_at(now):
                self._busy += 1
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port
                )
        except TimeoutError:
            raise UpstreamConnectTimeout("timed out connecting to the upstream") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to the upstream: {exc}") from None
        return conn

    def release(self, conn: _Connection, reusable: bool) -> None:
        self._busy -= 1
        conn._phase = _IDLE  # the exchange is over: no deadline runs on an idle connection
        conn._payload = None
        now = conn._loop.time()
        until = now + self.keepalive_timeout
        hinted = conn.hinted_until
        if hinted is not None and hinted < until:
            # The upstream said when it closes an idle connection: retired a margin before,
            # so no request goes out on it as it closes (the race no retry can undo for a
            # POST). A timeout with no room for the margin leaves nothing to reuse.
            until = hinted
            reusable = reusable and hinted > now
            expiry = self._expiry
            if reusable and expiry is not None and hinted < expiry.when():
                expiry.cancel()  # closed when its time comes, not at the pool's next round
                self._expiry = None
        if reusable and not self.closed and conn.transport is not None:
            conn.idle_until = until
            self._idle.append(conn)
            if self._expiry is None:
                self._expiry = conn._loop.call_at(until, self._expire)
        else:
            conn.close()
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        self._expiry = None
        if not self._idle:
            return
        loop = self._idle[0]._loop
        now = loop.time()
        keep = [c for c in self._idle if c.reusable_at(now)]
        for conn in self._idle:
            if conn not in keep:
                conn.close()
        self._idle = keep
        if keep:
            self._expiry = loop.call_at(min(c.idle_until for c in keep), self._expire)

    def close(self) -> None:
        """Close the idle connections; ones in use close when they are released."""
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    # -- one exchange -------------------------------------------------------------------

    async def request(
        self,
        method: str,
        target: str,
        headers: Lines,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        head_timeout: float,
        fresh: bool = False,
        interim: InterimListener | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head arrived, which must be
        within `head_timeout` of the last request byte (else ServerTimeoutError).

        `headers` are sent as given (Host first); `chunked` re-frames a streamed body; `fresh`
        asks for a new connection (a retry after a pooled one failed); `interim` is told of
        1xx heads before the final one."""
        head = _encode_head(method, target, _framed(method, headers, body is None, chunked))
        replayable = method in IDEMPOTENT and (body is None or isinstance(body, bytes))
        conn = await self._acquire(fresh, head_timeout)
        try:
            return await self._exchange(conn, method, head, body, chunked, head_timeout, interim)
        except STALE:
            # The upstream closed a pooled connection as the request went out (its idle
            # timeout racing ours): nothing was processed, so send once more on a new one.
            if fresh or not (conn.reused and replayable):
                raise
        conn = await self._acquire(True, head_timeout)
        return await self._exchange(conn, method, head, body, chunked, head_timeout, interim)

    def send_now(
        self,
        method: str,
        target: str,
        headers: Lines,
        listener: HeadListener,
        head_timeout: float,
    ) -> _Connection | None:
        """Send a request without a body on an idle pooled connection, from a callback; the
        listener is told of any interim heads, then of the final one or the failure. None, and
        nothing sent, when no pooled connection is idle (then `request()` waits for or opens
        one)."""
        if not self._idle:
            return None
        # The time from the connection's own loop: asyncio.get_running_loop() makes a getpid()
        # system call on every call in Python 3.11.
        conn = self._pop_idle(self._idle[-1]._loop.time())
        if conn is None:
            return None
        transport = conn.transport
        assert transport is not None  # reusable_at checked it
        conn.begin(method == "HEAD", self.idle_timeout)
        conn.listener = listener
        if method not in _NO_BODY_METHODS:  # GET and the like go as they are
            headers = _framed(method, headers, True, False)
        transport.write(_encode_head(method, target, headers))
        conn.expect_head(conn._loop.time() + head_timeout)
        return conn

    def response(
        self,
        conn: _Connection,
        head: ResponseHead,
        content: StreamReader,
        writer: asyncio.Task[bool] | None = None,
    ) -> UpstreamResponse:
        return UpstreamResponse(self, conn, writer, head, content)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        request_head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        head_timeout: float,
        interim: InterimListener | None,
    ) -> UpstreamResponse:
        conn.begin(method == "HEAD", self.idle_timeout)
        conn.interim = interim
        writer: asyncio.Task[bool] | None = None
        try:
            transport = conn.transport
            if transport is None or conn.exc is not None:
                raise ServerDisconnectedError()
            loop = conn._loop
            if body is None:
                transport.write(request_head)
            elif isinstance(body, bytes):
                transport.write(request_head + body)
            else:
                transport.write(request_head)
                writer = loop.create_task(
                    _write_body(conn, body, chunked, head_timeout), name="upstream-body"
                )
            conn.expect_head(loop.time() + head_timeout)
            head, content = await conn.read()  # the final head: 1xx ones went to `interim`
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            self.release(conn, False)
            raise
        finally:
            conn.interim = None
        return self.response(conn, head, content, writer)


def _framed(method: str, headers: Lines, bodyless: bool, chunked: bool) -> Lines:
    """The request's framing fields: none for a bodiless GET and the like, Content-Length: 0 for
    other bodiless methods (as aiohttp's client did), chunked for a re-framed body."""
    if bodyless and method not in _NO_BODY_METHODS:
        if not any(name.lower() == b"content-length" for name, _ in headers):
            return [*headers, (b"Content-Length", b"0")]
    elif chunked:
        return [*headers, (b"Transfer-Encoding", b"chunked")]
    return headers


async def _write_body(
    conn: _Connection, body: AsyncIterator[bytes], chunked: bool, head_timeout: float
) -> bool:
    """Stream a request body upstream; True once all of it went out. A failure (the client's
    upload, or the connection) is handed to the response reader, which raises it. The
    response head's deadline counts from the last byte sent."""
    loop = conn._loop
    try:
        async for chunk in body:
            transport = conn.transport
            if transport is None:
                raise ConnectionResetError("upstream connection lost during the upload")
            if not chunk:
                continue
            if chunked:
                # One write, not writelines(): the stdlib transport's writelines() of Python
                # 3.12.0-3.12.7 and 3.13.0 never pauses the protocol at its high-water mark
                # (CPython gh-127655), so the upload would not wait for a slow upstream.
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if conn.writing_paused:
                await conn._drain_helper()
            conn.expect_head(loop.time() + head_timeout)
        if chunked:
            if conn.transport is None:
                raise ConnectionResetError("upstream connection lost during the upload")
            conn.transport.write(b"0\r\n\r\n")
        conn.expect_head(loop.time() + head_timeout)
        return True
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        conn.fail(exc)
        return False
