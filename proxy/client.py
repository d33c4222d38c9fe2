"""I/O: a lean pooled HTTP/1.1 client for the forwarding path.

aiohttp's `ClientSession` builds a `ClientRequest`, a header multidict, a connector key and a
`ClientResponse` for every call; the proxy needs none of that. Here a request is one bytes
buffer for the head (the header lines forward.py already built) and the body as it comes, and
the response is parsed by aiohttp's own llhttp-based parser through its `ResponseHandler`
protocol, which gives the body as a `StreamReader` with flow control, the idle (sock_read)
timeout and the "payload not completed" errors that forward.py already relays.

    EndpointConnections.request()
      acquire: newest idle connection (LIFO) or a new one under `max_connections`, else wait
      -> write head (+ small body in the same write) or start a body-writer task (streamed
         as-is for Content-Length, re-framed when the client sent chunked; backpressure via
         the protocol's pause_writing/resume_writing)
      -> read heads until a final one (1xx are skipped) -> `UpstreamResponse`
      a pooled connection the upstream closed before answering is retried once on a fresh
      one when the request can be sent again (idempotent method, body absent or in memory)
    UpstreamResponse.release(): back to the pool only when the body was read to its end, the
      upload finished and keep-alive is allowed; anything else closes the connection.

Failures: connect errors are raised as the error tree's `UpstreamConnectError` and
`UpstreamConnectTimeout`; everything after the connect surfaces as aiohttp's own client and
parser exceptions, which `errors.from_client_error` maps in one place.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader

from .errors import UpstreamConnectError, UpstreamConnectTimeout

__all__ = ["EndpointConnections", "UpstreamResponse"]

# The methods a client may retry on its own (RFC 9110 section 9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods without a body get no Content-Length: 0 (as aiohttp's client did for the others).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_MAX_LINE = 8190
_MAX_FIELD = 8190
_READ_BUFSIZE = 2**16
_STALE = (ServerDisconnectedError, ClientOSError, ConnectionError)


class _Connection(ResponseHandler):
    """One upstream connection: aiohttp's response protocol plus the pool's bookkeeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.idle_since = 0.0
        self.reused = False

    def reusable_at(self, now: float, keepalive: float) -> bool:
        return (
            self.is_connected()
            and not self.should_close
            and self.exception() is None
            and not self.is_eof()
            and now - self.idle_since < keepalive
        )


class UpstreamResponse:
    """A response head from the upstream and its body as a stream; release it exactly once."""

    __slots__ = (
        "_conn",
        "_done",
        "_owner",
        "_writer",
        "content",
        "content_length",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        owner: EndpointConnections,
        conn: _Connection,
        writer: asyncio.Task[bool] | None,
        status: int,
        reason: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        content_length: int | None,
        content: StreamReader,
    ) -> None:
        self._owner = owner
        self._conn = conn
        self._writer = writer
        self._done = False
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.content_length = content_length
        self.content = content

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


def _encode_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    text = f"{method} {target} HTTP/1.1\r\n{lines}\r\n"
    try:
        return text.encode("latin-1")  # headers were decoded as latin-1: byte for byte back
    except UnicodeEncodeError:
        # The target came from aiohttp's utf-8/surrogateescape decoding of the request line.
        head = f"{method} ".encode() + target.encode("utf-8", "surrogateescape")
        return head + f" HTTP/1.1\r\n{lines}\r\n".encode("latin-1", "backslashreplace")


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

    async def _acquire(self, fresh: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if not fresh:
                now = loop.time()
                idle = self._idle
                while idle:
                    conn = idle.pop()  # LIFO: the warmest connection, and idle ones expire
                    if conn.reusable_at(now, self.keepalive_timeout):
                        self._busy += 1
                        conn.reused = True
                        return conn
                    conn.close()
            if self._busy < self.max_connections:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
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
        if reusable and not self.closed and conn.is_connected():
            conn.idle_since = conn._loop.time()
            conn._drop_timeout()  # sock_read measures a request in flight, not an idle wait
            self._idle.append(conn)
            if self._expiry is None:
                self._expiry = conn._loop.call_later(self.keepalive_timeout, self._expire)
        else:
            conn.close()
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
        keep = [c for c in self._idle if c.reusable_at(now, self.keepalive_timeout)]
        for conn in self._idle:
            if conn not in keep:
                conn.close()
        self._idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self._expiry = loop.call_at(oldest + self.keepalive_timeout, self._expire)

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
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head arrived.

        `headers` are sent as given (Host first); `chunked` re-frames a streamed body."""
        if body is None and method not in _NO_BODY_METHODS:
            if not any(name.lower() == "content-length" for name, _ in headers):
                headers = [*headers, ("Content-Length", "0")]
        elif chunked:
            headers = [*headers, ("Transfer-Encoding", "chunked")]
        head = _encode_head(method, target, headers)
        replayable = method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
        conn = await self._acquire(fresh=False)
        try:
            return await self._exchange(conn, method, head, body, chunked)
        except _STALE:
            # The upstream closed a pooled connection as the request went out (its idle
            # timeout racing ours): nothing was processed, so send once more on a new one.
            if not (conn.reused and replayable):
                raise
        conn = await self._acquire(fresh=True)
        return await self._exchange(conn, method, head, body, chunked)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        conn.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,  # bytes pass through unchanged, gzip bombs included
            read_timeout=self.idle_timeout,
            read_bufsize=_READ_BUFSIZE,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
        )
        writer: asyncio.Task[bool] | None = None
        try:
            transport = conn.transport
            if transport is None:
                raise ServerDisconnectedError()
            if body is None:
                transport.write(head)
                conn.start_timeout()
            elif isinstance(body, bytes):
                transport.write(head + body)
                conn.start_timeout()
            else:
                transport.write(head)
                writer = asyncio.get_running_loop().create_task(
                    _write_body(conn, body, chunked), name="upstream-body"
                )
            while True:
                message, content = await conn.read()
                # 1xx heads (100 Continue, 103 Early Hints) are interim; 101 is final.
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            self.release(conn, False)
            raise
        length = message.headers.get("Content-Length")
        return UpstreamResponse(
            self,
            conn,
            writer,
            message.code,
            message.reason,
            message.raw_headers,
            int(length) if length is not None and length.isdigit() else None,
            content,
        )


async def _write_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> bool:
    """Stream a request body upstream; True once all of it went out. A failure (the client's
    upload, or the connection) is handed to the response reader, which raises it."""
    try:
        async for chunk in body:
            transport = conn.transport
            if transport is None:
                raise ConnectionResetError("upstream connection lost during the upload")
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if conn.writing_paused:
                await conn._drain_helper()
        if chunked:
            if conn.transport is None:
                raise ConnectionResetError("upstream connection lost during the upload")
            conn.transport.write(b"0\r\n\r\n")
        conn.start_timeout()
        return True
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        conn.set_exception(exc)
        if conn.transport is not None:
            # abort, not close: a response already streaming then fails as incomplete
            conn.transport.abort()
        return False
