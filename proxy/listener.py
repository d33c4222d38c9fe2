"""I/O: the client-facing HTTP/1.1 connections of the data plane, on raw asyncio protocols.

Each connection is an `asyncio.Protocol` that feeds the bytes it receives to aiohttp's request
parser (the C one built on llhttp, or the pure-Python one under AIOHTTP_NO_EXTENSIONS) and
hands every parsed request, in order, to the forwarder, which writes the response bytes
straight to the transport. aiohttp's `web` layer (request objects, `StreamResponse`, header
multidicts on the way out) is not on this path: it cost more than half of the CPU per request.

What a proxy in front of production needs on top of the parser, all here:
  * distinct answers for oversize heads: 414 for the request line, 431 for a header line or too
    many headers (the parser raises the same error for both kinds of line: they get limits one
    byte apart so the limit in the error tells which it was);
  * a deadline for the whole request head (408, then close) and an idle timeout between
    requests (close);
  * a cap on client connections and the `shaper_client_connections_active` gauge;
  * parse errors answered with a small JSON body, counted by reason, and the connection closed;
  * pipelined requests answered in order, one at a time, reading paused while too many wait
    (over 32, until 16 or fewer do);
  * request bodies kept exactly as sent (no decompression: a body that inflates past its
    Content-Length would be read upstream as a second, smuggled request);
  * no trailer ever reaching the next request: llhttp-based aiohttp (3.14) keeps the last
    trailer field of a chunked request and adds it to the headers of the next request on the
    connection. A chunked body that does not visibly end in an empty trailer section with
    nothing after it closes the connection once its response is sent;
  * after an Upgrade request nothing more is parsed: the connection becomes a WebSocket tunnel
    (websocket.py) or closes after the response;
  * a graceful shutdown: stop accepting, close idle connections, let requests in flight finish
    up to a deadline (the rest of a body in flight is still read; nothing after it is served),
    then abort the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from mypy_extensions import mypyc_attr

from .config import Limits
from .errors import ClientStalled, json_error
from .headers import RequestMessage
from .metrics import Metrics
from .protocol import FlowProtocol

log = logging.getLogger("shaper.listener")

__all__ = ["ClientConnection", "ClientStalled", "ProxyServer", "UpgradeSink"]

_PAYLOAD_LIMIT = 2**16  # the request body buffer's high-water mark (reading pauses above)
_MAX_QUEUED = 32  # pipelined requests parsed ahead of the one in flight; reading pauses above
_RESUME_QUEUED = _MAX_QUEUED // 2  # and resumes once this many or fewer wait
_LINGER = 2.0  # seconds an abandoned request body is read and discarded before closing
_MAX_UPGRADE_TAIL = 2**16  # bytes a client may send after an Upgrade request before its answer
_MAX_INTERIM_BUFFER = 2**16  # unsent bytes above which an interim (1xx) response is dropped

# The forwarder's entry point: answers a request at once (returns whether the connection stays
# open) or takes it (returns None) and later calls `finished()`, `crashed()` or neither (the
# connection was lost). What it takes it registers with `run()` (a coroutine, run as a task) or
# `hold()` (callbacks under way, e.g. an upstream exchange), so a lost client cancels it.
Handler = Callable[["ClientConnection", RequestMessage, StreamReader], bool | None]


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


class UpgradeSink(Protocol):
    """Where the bytes of an upgraded connection go (websocket.py's frame reader)."""

    def feed_data(self, data: bytes) -> Any: ...

    def feed_eof(self) -> None: ...


def _classify(exc: BaseException, line_limit: int) -> tuple[int, str]:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == line_limit or str(limit) == str(line_limit):
            return 414, "request_line_too_long"
        return 431, "header_too_large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "too_many_headers"
    return 400, "malformed"


# The end of a chunked body with an empty trailer section: the last chunk (`0`, maybe with
# extensions) and the blank line. A trailer field line cannot match `0+(;...)?`, so the match is
# exact for anything llhttp accepted.
_CLEAN_CHUNKED_END = re.compile(rb"\r\n0+(?:;[^\r\n]*)?\r\n\r\n\Z")
_RECENT_BYTES = 256  # kept to see how a chunked body ended; a longer last-chunk line closes


class _ParseFailure:
    """A parse error queued behind the requests parsed before it, answered in its turn."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_Queued = tuple[RequestMessage, StreamReader] | _ParseFailure


@mypyc_attr(native_class=False)  # see protocol.py
class ClientConnection(FlowProtocol):
    """One client connection of the data plane."""

    __slots__ = (
        "_chunked_body",
        "_current",
        "_deadline",
        "_discarding",
        "_eof",
        "_head_started",
        "_inflight",
        "_line_limit",
        "_parse_failed",
        "_queue",
        "_recent",
        "_send_timeout",
        "_server",
        "_timer",
        "_unsent",
        "_upgrade_tail",
        "_wrote",
        "closing",
        "peer",
        "sink",
    )

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server.loop)  # FlowProtocol: flow control; pauses the parser too
        self._server = server
        limits = server.limits
        # The parser raises the same LineTooLong for the request line and a header line; give
        # them limits that differ by one byte so the limit in the error tells which it was.
        self._line_limit = line_limit = limits.max_request_line
        field_limit = limits.max_header_size
        if field_limit == line_limit:
            field_limit += 1
        parser_class = server.parser_class
        # The pure-Python parser counts the request line and the blank line as headers.
        python_parser = parser_class.__module__ != "aiohttp._http_parser"
        max_headers = limits.max_headers + (2 if python_parser else 0)
        self._parser = parser_class(
            self,
            server.loop,
            _PAYLOAD_LIMIT,
            max_line_size=line_limit,
            max_field_size=field_limit,
            max_headers=max_headers,
            auto_decompress=False,  # a proxy passes bodies on byte for byte
        )
        self._queue: deque[_Queued] = deque()
        self._inflight: Cancellable | None = None  # the request being answered, if taken
        self._current: tuple[RequestMessage, StreamReader] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._send_timeout = 0.0  # while drain() waits: the send deadline's length
        self._unsent = 0  # the write buffer's size when the send deadline was last set
        self._head_started = False  # bytes of a request head arrived, no whole head yet
        # The request in flight (or the next one taken) is the last one served: the connection
        # closes once its response is sent, and the forwarder says so in that response
        # (`Connection: close`). The rest of that request's body is still read.
        self.closing = False
        self._discarding = False  # input is dropped: the connection only waits to close
        self._eof = False  # the client half-closed: what it sent is answered, then close
        self._parse_failed = False
        self._upgrade_tail = b""
        self._chunked_body: StreamReader | None = None  # a chunked request body still arriving
        self._recent = b""  # the last bytes received
        self._wrote = False  # response bytes went out for the request in flight
        self.peer = ""
        self.sink: UpgradeSink | None = None  # set once the connection is a tunnel

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._server
        server.metrics.client_connections += 1
        server.connections.add(self)
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) else ""
        if server.metrics.client_connections > server.limits.max_connections or server.closing:
            if not server.closing:
                server.metrics.record_rejected("too_many_connections")
            transport.close()
            return
        self._arm(self._loop.time() + server.limits.keepalive_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._server
        server.metrics.client_connections -= 1
        server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sink is not None:
            self.sink.feed_eof()
        elif self._parser is not None:
            with contextlib.suppress(HttpProcessingError):
                self._parser.feed_eof()  # a body still arriving fails as incomplete
        # The parser holds this protocol: without the cycle, a closed connection is freed by
        # reference counting, even when a reload froze it while it was open (gc.freeze()
        # takes what is alive out of the collector's reach, its cycles too).
        self._parser = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()  # the client went away: stop work done on its behalf
        super().connection_lost(exc)
        self._queue.clear()
        server.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.feed_data(data)
            return
        if self.closing or self.transport is None:
            # No further request is served, but the rest of the body of the one in flight is
            # still read (it is being forwarded: a graceful shutdown lets it finish); anything
            # else is dropped.
            current = self._current
            if self._discarding or self.transport is None or current is None or current[1].is_eof():
                return
        if self._parse_failed:
            return
        if self._upgraded:
            # Bytes after an Upgrade request, before its answer: kept for the tunnel.
            self._upgrade_tail += data
            if len(self._upgrade_tail) > _MAX_UPGRADE_TAIL:
                self.abort()
            return
        queued = len(self._queue)
        # Through Any: the C parser's messages may be a tuple, not the stubs' list, and the
        # compiled build checks what a typed call returns.
        parser: Any = self._parser
        assert parser is not None
        try:
            fed = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._parse_failed = True
            self._queue.append(_ParseFailure(exc))
            if self._inflight is None:
                self._next()
            return
        messages: Sequence[tuple[RequestMessage, StreamReader]] = fed[0]
        upgraded, tail = fed[1], fed[2]
        if upgraded:
            # Before the upgrade request (always the last one parsed) is taken: a refusal
            # answered at once then closes the connection, which parses nothing more.
            self._upgraded = True
            self._upgrade_tail = bytes(tail)
        if messages:
            self._head_started = False
            self._queue.extend(messages)
            chunked = self._chunked_body is not None
            if not chunked:
                for message, _ in messages:  # a loop: any() over a generator costs more
                    if message.chunked:
                        chunked = True
                        break
            if chunked:
                self._guard_trailers(data, queued)
            else:
                self._recent = b""  # no chunked body involved: nothing to guard
            if len(self._queue) > _MAX_QUEUED and not self._buffer_paused:
                self._pause_reading_for_buffer()
            if self._inflight is None:
                self._next()
        elif self._chunked_body is not None:
            self._guard_trailers(data, queued)
        if data and not messages and self._inflight is None and not self._head_started:
            # The first bytes of a request head: the whole head must follow in time.
            self._head_started = True
            self._arm(self._loop.time() + self._server.limits.header_timeout, sooner=True)

    def eof_received(self) -> bool:
        if self.sink is not None:
            return False
        if self._inflight is None and not self._queue:
            return False  # nothing to answer: close
        # A half-closed client (it shut down its sending side after its requests) still gets
        # an answer to each, in order (RFC 9112 section 9.3.2); the connection closes after the
        # last one (`_next` marks it when it takes it). A body cut short fails as incomplete.
        self._eof = True
        if not self._queue:
            self.closing = True  # the request in flight is the last one
        if self._parser is not None:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as exc:
                # Both parsers raise for a body cut short without failing its reader: fail it
                # here, so its reader learns now rather than at the body idle timeout. Only
                # the last request parsed can have a body still arriving.
                last = self._queue[-1] if self._queue else self._current
                if isinstance(last, tuple) and not last[1].is_eof():
                    last[1].set_exception(exc)
        return True

    # -- what the forwarder uses ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection lost")
        self._wrote = True
        transport.write(data)

    def interim_room(self) -> bool:
        """Whether an interim (1xx) response may go out now: not when the client is gone, or
        has not read those before it (an upstream that sends them without end is not
        buffered without end)."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() <= _MAX_INTERIM_BUFFER
        )

    def write_interim(self, data: bytes) -> None:
        """An interim (1xx) response to the request in flight, ahead of its final one; the
        caller checked `interim_room()`. It is not the response: nothing counts as sent (a
        failure after it is still answered)."""
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self, idle_timeout: float) -> None:
        """Wait while the client reads slower than the response arrives (backpressure); raise
        ClientStalled when it takes no byte for `idle_timeout`.

        The deadline runs on the connection's timer, armed only when the write has to wait:
        when it passes, a write buffer smaller than when it was set means the client took
        bytes meanwhile (slow, not stalled) and it is set again from then. The buffer only
        shrinks once the kernel's socket buffers have room, so a client is aborted between
        `idle_timeout` and twice that after the last byte it took."""
        if not self._paused:
            return
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("client connection lost")
        self._send_timeout = idle_timeout
        self._unsent = transport.get_write_buffer_size()
        self._arm(self._loop.time() + idle_timeout, sooner=True)
        try:
            await self._drain_helper()
        finally:
            self._send_timeout = 0.0

    def abort(self) -> None:
        """Drop the connection: a response that started cannot end in an error status."""
        self.closing = self._discarding = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        """No request in flight or queued, and not a tunnel."""
        return self._inflight is None and not self._queue and self.sink is None

    def will_close(self) -> bool:
        """Whether the connection closes once the response being written now is sent, whatever
        the request asked: it serves no further request (shutdown, the last request before a
        half-close, a suspect trailer, an upgrade), or the request's body is still arriving
        (a lingering close follows). The forwarder says so in that response; the request's own
        `Connection: close` (or HTTP/1.0 without keep-alive) it reads from the request."""
        if self.closing or (self._upgraded and not self._queue):
            return True  # (requests pipelined ahead of an upgrade request are answered first)
        current = self._current
        return current is not None and not current[1].is_eof()

    def close_after_response(self) -> None:
        """Serve no further request: the one in flight finishes (the rest of its body is still
        read and forwarded), then the connection closes."""
        self.closing = True

    def take_upgrade_tail(self) -> bytes:
        tail, self._upgrade_tail = self._upgrade_tail, b""
        return tail

    # -- requests, in order -----------------------------------------------------------------

    def _next(self) -> None:
        """Answer queued requests, one at a time, until one is taken or none is left."""
        queue = self._queue
        begin = self._server.handler
        while queue and self._inflight is None and self.transport is not None:
            item = queue.popleft()
            if isinstance(item, _ParseFailure):
                self._reject(item.exc)
                return
            if self._buffer_paused and len(queue) <= _RESUME_QUEUED:
                # Before the queue is empty: a request whose body is still arriving is the last
                # one parsed, and it is taken with nothing left behind it; its body must come.
                self._resume_reading_for_buffer()
            if self._eof and not queue:
                self.closing = True  # the client half-closed and this is its last request
            self._current = item
            self._wrote = False
            try:
                keep_alive = begin(self, *item)
            except Exception:
                self.crashed()
                return
            if keep_alive is None:
                return  # taken: finished() carries on
            if not self._after(keep_alive):
                return
        self._idle()

    def run(self, work: Coroutine[Any, Any, bool]) -> None:
        """Answer the current request with `work`, as a task; its result is `keep_alive`."""
        self._inflight = self._loop.create_task(self._run(work))

    def hold(self, work: Cancellable) -> None:
        """The current request is being answered by `work`'s callbacks."""
        self._inflight = work

    async def _run(self, work: Coroutine[Any, Any, bool]) -> None:
        try:
            keep_alive = await work
        except asyncio.CancelledError:
            raise
        except Exception:
            self.crashed()
            return
        self.finished(keep_alive)

    def finished(self, keep_alive: bool) -> None:
        """The current request is answered; the connection carries on when it may."""
        self._inflight = None
        if self.transport is None or not self._after(keep_alive):
            return
        if self._queue:
            self._loop.call_soon(self._resume)  # not from inside the forwarder's callbacks
        else:
            self._idle()

    def _resume(self) -> None:
        if self._inflight is None:
            self._next()

    def crashed(self) -> None:
        """The forwarder failed unexpectedly on the current request: 500 when nothing was sent
        yet, and the connection is dropped."""
        log.exception("unhandled error in the data plane")
        self._inflight = None
        if not self._wrote and self.transport is not None:
            self.transport.write(json_error(500, "internal", "unhandled error in the data plane"))
        self.abort()

    def _after(self, keep_alive: bool) -> bool:
        """After a response: whether the connection may answer another request."""
        current, self._current = self._current, None
        assert current is not None
        message, payload = current
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            self._linger()  # the body was refused or abandoned: not read any further
            return False
        # As `will_close()` told the forwarder (the server's shutdown marks every connection
        # it does not close at once `closing`).
        if (
            not keep_alive
            or message.should_close
            or self.closing
            or (self._upgraded and not self._queue)
        ):
            self.closing = True
            self._close()
            return False
        return True

    def _close(self) -> None:
        """Close the transport once what is buffered is sent. A client that takes none of it
        for the keep-alive timeout is aborted (the send deadline of `drain()`, on the same
        timer): a close waits for the buffer to drain, and a client that never reads (the tail
        of a response, under the send buffer's high-water mark, so no write waited on it)
        held the connection for ever."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        unsent = transport.get_write_buffer_size()
        if unsent:
            self._send_timeout = self._server.limits.keepalive_timeout
            self._unsent = unsent
            self._arm(self._loop.time() + self._send_timeout, sooner=True)

    def _idle(self) -> None:
        if not self.closing and not self._head_started and self.transport is not None:
            self._arm(self._loop.time() + self._server.limits.keepalive_timeout)

    def _linger(self) -> None:
        """Close a connection whose request body is still arriving without resetting it: a
        close with unread bytes sends an RST, which can destroy the response before the client
        reads it. Send FIN after the response, discard what still comes, close on the client's
        FIN or after a short while, whichever is first (nginx's lingering close)."""
        self.closing = self._discarding = True  # data_received discards from now on
        transport = self.transport
        if transport is None:
            return
        if self._eof or not transport.can_write_eof():
            self._close()  # after the client's FIN nothing unread is left to cause an RST
            return
        transport.write_eof()
        self._reading_paused = self._buffer_paused = False
        self._resume_transport_reading()
        self._loop.call_later(_LINGER, self._close)

    def _reject(self, exc: BaseException) -> None:
        status, reason = _classify(exc, self._line_limit)
        self._server.metrics.record_rejected(reason)
        message = getattr(exc, "message", None) or str(exc)
        if self.transport is not None:
            self.transport.write(json_error(status, reason, str(message)))
            self._close()
        self.closing = self._discarding = True

    # -- timers: one per connection, moved lazily --------------------------------------------

    def _arm(self, deadline: float, sooner: bool = False) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is not None:
            if not sooner or timer.when() <= deadline:
                return  # it fires first and re-arms for the rest
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._send_timeout:
            self._check_send()
            return
        if self.transport is None or self.closing or self._inflight is not None or self._queue:
            return  # busy: the idle timer is armed again after the response
        if self.sink is not None:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        if self._head_started:
            self._server.metrics.record_rejected("header_timeout")
            self.transport.write(
                json_error(408, "header_timeout", "the request head did not arrive in time")
            )
        self.closing = self._discarding = True
        self._close()

    def _check_send(self) -> None:
        """The send deadline of a write waiting in `drain()`, or of a close with bytes unsent:
        moved on while the client takes bytes, else the wait fails with ClientStalled (the
        close is made an abort)."""
        transport = self.transport
        if transport is None:
            return  # connection_lost() woke the writer
        now = self._loop.time()
        unsent = transport.get_write_buffer_size()
        if now >= self._deadline and unsent < self._unsent:
            self._unsent = unsent
            self._deadline = now + self._send_timeout
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                ClientStalled(f"the client took no byte for {self._send_timeout:g}s")
            )
        elif transport.is_closing():  # closed with bytes unsent (`_close`): nobody waits
            transport.abort()

    # -- trailers ------------------------------------------------------------------------

    def _guard_trailers(self, data: bytes, queued: int) -> None:
        """Close after the current request when a chunked request body ended in a way that may
        have left a trailer field in the parser: with a trailer section, or with more bytes
        after it (see the module docstring)."""
        self._recent = (self._recent + data[-_RECENT_BYTES:])[-_RECENT_BYTES:]
        bodies: list[StreamReader | None] = [self._chunked_body]
        for i in range(queued, len(self._queue)):
            item = self._queue[i]
            if isinstance(item, tuple):
                bodies.append(item[1] if item[0].chunked else None)
        unsafe = any(
            body is not None
            and body.is_eof()
            and (i < len(bodies) - 1 or not _CLEAN_CHUNKED_END.search(self._recent))
            for i, body in enumerate(bodies)
        )
        last = bodies[-1]
        self._chunked_body = last if last is not None and not last.is_eof() else None
        if unsafe:
            self.closing = True  # nothing after the request in flight is answered


class ProxyServer:
    """The data plane's listening socket and its connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        metrics: Metrics,
        parser_class: Any = HttpRequestParser,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.metrics = metrics
        self.parser_class = parser_class
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._all_closed: asyncio.Event | None = None

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self, host: str, port: int, backlog: int = 1024) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            self, host, port, backlog=backlog, reuse_address=True
        )
        # Through Any: uvloop's `sockets` is a list, not the stubs' tuple, and the compiled
        # build checks the type of what it reads.
        server: Any = self._server
        bound = server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def connection_closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting; close idle connections; let requests in flight finish for up to
        `drain_timeout` seconds, bodies still arriving included (their connections close after
        the response); abort the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            if conn.idle:
                conn._close()
            else:
                conn.close_after_response()
        if self.connections:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning("drain deadline passed; aborting %d connections", len(self.connections))
                for conn in list(self.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
                await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()
