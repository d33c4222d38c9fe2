"""I/O: WebSocket upgrades relayed to the chosen upstream, messages and close codes mirrored.

The upstream handshake happens first: only when the upstream answers 101 does the client get
its 101 and a tunnel; any other answer is passed back as a plain response with that status.
Then two pumps copy frames each way (text, binary, ping, pong) until one side closes; its close
code and reason are sent to the other side. A side that vanishes without a close frame is
reported to the other as 1014 (upstream gone) or 1001 (client gone), never as a normal 1000.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http import WS_KEY, WebSocketReader, WebSocketWriter, WSMessage
from aiohttp.streams import EofStream

from .errors import BadRequest, ProxyError, from_client_error
from .headers import Lines, RequestMessage, connection_tokens
from .upstream import Endpoint, UpstreamPool

if TYPE_CHECKING:
    from .listener import ClientConnection

log = logging.getLogger("shaper.websocket")

__all__ = ["is_websocket_handshake", "relay_websocket"]

# The handshake headers each side negotiates for itself.
_HANDSHAKE = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


def is_websocket_handshake(message: RequestMessage) -> bool:
    return (
        message.method == "GET"
        and message.headers.get("Upgrade", "").strip().lower() == "websocket"
        and "upgrade" in connection_tokens(message.raw_headers)
    )


def accept_key(message: RequestMessage) -> str:
    """Sec-WebSocket-Accept for the client's handshake (RFC 6455 section 4.2); BadRequest
    for a handshake no WebSocket server would accept."""
    headers = message.headers
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise BadRequest("unsupported Sec-WebSocket-Version; 13 is required")
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise BadRequest("malformed Sec-WebSocket-Key")
    except binascii.Error:
        raise BadRequest("malformed Sec-WebSocket-Key") from None
    return base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()


class _SendDeadline:
    """What aiohttp's frame writer waits on when the client's write buffer is full: the
    connection's own drain with its send deadline, so a client that stops reading while the
    upstream keeps sending is dropped after `idle_timeout` (ClientStalled, a ConnectionError:
    to the relay, a client that went away) instead of holding both sockets for ever."""

    def __init__(self, conn: ClientConnection, idle_timeout: float) -> None:
        self.conn = conn
        self.idle_timeout = idle_timeout

    @property
    def _paused(self) -> bool:
        return self.conn._paused

    async def _drain_helper(self) -> None:
        await self.conn.drain(self.idle_timeout)


class _ClientSocket:
    """The client's side of the session, on its raw connection: aiohttp's frame reader fed
    by the connection and its frame writer on the connection's transport, waiting for a slow
    client at most `idle_timeout` without progress."""

    def __init__(self, conn: ClientConnection, idle_timeout: float) -> None:
        assert conn.transport is not None
        self.conn = conn
        self._queue = WebSocketDataQueue(conn, 2**16, loop=conn._loop)
        self._reader = WebSocketReader(self._queue, 0, compress=False, decode_text=True)
        deadline = _SendDeadline(conn, idle_timeout)
        self._writer = WebSocketWriter(deadline, conn.transport, use_mask=False)  # type: ignore[arg-type]
        self.closed = False

    def start(self, tail: bytes) -> None:
        """From now on the connection's bytes are frames."""
        self.conn.sink = self._reader
        if tail:
            self._reader.feed_data(tail)

    async def receive(self) -> WSMessage:
        try:
            return await self._queue.read()  # type: ignore[return-value]
        except EofStream:
            return WSMessage(WSMsgType.CLOSED, None, None)
        except Exception as exc:
            return WSMessage(WSMsgType.ERROR, exc, None)

    async def send_str(self, data: str) -> None:
        await self._writer.send_frame(data.encode(), WSMsgType.TEXT)

    async def send_bytes(self, data: bytes) -> None:
        await self._writer.send_frame(data, WSMsgType.BINARY)

    async def ping(self, data: bytes) -> None:
        await self._writer.send_frame(data, WSMsgType.PING)

    async def pong(self, data: bytes) -> None:
        await self._writer.send_frame(data, WSMsgType.PONG)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        if self.closed:
            return False
        self.closed = True
        with contextlib.suppress(ConnectionError):
            await self._writer.close(code, message)
        return True


_Side = Literal["client", "upstream"]
_Socket = _ClientSocket | aiohttp.ClientWebSocketResponse

# A side that vanished without a close frame cannot have its 1006 passed on (RFC 6455 section
# 7.4.1 forbids sending it); the other side gets a code that still says "not a normal end", so
# clients reconnect: 1014 (bad gateway, RFC 6455 registry) when the upstream went away, 1001
# (going away) when the client did.
_VANISHED: dict[_Side, int] = {"upstream": 1014, "client": 1001}
_NO_STATUS = frozenset({0, 1005})  # a close frame without a code
_CLOSE_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class _Ended:
    """How the session ended: which side ended it, and its close code and reason (code None
    when that side vanished without a close frame)."""

    side: _Side
    code: int | None
    reason: str


async def _pump(source: _Socket, sink: _Socket, source_side: _Side, sink_side: _Side) -> _Ended:
    """Copy frames from source to sink until one of them ends; say which and how."""
    while True:
        message = await source.receive()
        try:
            if message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == WSMsgType.PONG:
                await sink.pong(message.data)
            elif message.type == WSMsgType.CLOSE:
                code = message.data if message.data not in _NO_STATUS else 1000
                return _Ended(source_side, code, message.extra or "")
            else:  # CLOSING, CLOSED, ERROR: the connection went without a close frame
                return _Ended(source_side, None, "")
        except ConnectionError:
            return _Ended(sink_side, None, "")


async def relay_websocket(
    conn: ClientConnection,
    message: RequestMessage,
    pool: UpstreamPool,
    endpoint: Endpoint,
    headers: Lines,
    variant: str | bool,
    on_open: Callable[[], None] | None = None,
) -> tuple[int, bool]:
    """Relay one WebSocket session; returns the status the client got and whether the
    upstream failed. `on_open` is called once the upstream answered 101 (the breaker's
    success). The connection is closed when this returns; a ProxyError raised before any
    answer (a malformed handshake, an upstream that cannot be reached) leaves it open for the
    caller to answer with it (which then closes it): closed here, the client got nothing."""
    try:
        result = await _relay(conn, message, pool, endpoint, headers, variant, on_open)
    except ProxyError:
        raise
    except BaseException:
        if conn.transport is not None:
            conn.transport.close()
        raise
    if conn.transport is not None:
        conn.transport.close()
    return result


async def _relay(
    conn: ClientConnection,
    message: RequestMessage,
    pool: UpstreamPool,
    endpoint: Endpoint,
    headers: Lines,
    variant: str | bool,
    on_open: Callable[[], None] | None,
) -> tuple[int, bool]:
    accept = accept_key(message)  # before any upstream work
    protocols = tuple(
        p.strip()
        for value in message.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    )
    upstream_headers = [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in headers
        if n.decode("latin-1").lower() not in _HANDSHAKE
    ]
    url = endpoint.url_for(message.path if message.path.startswith("/") else "/")
    try:
        async with asyncio.timeout(pool.settings.connect_timeout + pool.settings.request_timeout):
            upstream = await pool.session.ws_connect(
                url,
                headers=upstream_headers,
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
    except aiohttp.WSServerHandshakeError as exc:
        # No 101 from the upstream: no tunnel; the client gets the upstream's status.
        status = exc.status if exc.status >= 200 else 502
        body = f"upstream refused the upgrade: {status}\n".encode()
        conn.write(
            f"HTTP/1.1 {status} {exc.message or 'Refused'}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "X-Shaper-Error: upgrade_refused\r\n"
            "Connection: close\r\n\r\n".encode("latin-1", "replace")
            + body
        )
        return status, status >= 500
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise from_client_error(exc) from None
    if on_open is not None:
        on_open()

    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
    ]
    if upstream.protocol:
        lines.append(f"Sec-WebSocket-Protocol: {upstream.protocol}")
    if variant:
        lines.append(f"X-Shaper-Variant: {variant}")
    client = _ClientSocket(conn, pool.settings.idle_timeout)
    pumps: list[asyncio.Task[_Ended]] = []
    try:
        conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        client.start(conn.take_upgrade_tail())
        pumps = [
            asyncio.create_task(_pump(client, upstream, "client", "upstream"), name="ws-up"),
            asyncio.create_task(_pump(upstream, client, "upstream", "client"), name="ws-down"),
        ]
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finished = next(iter(done))
        failure = finished.exception()
        if failure is None:
            ended = finished.result()
        else:  # not a connection failure (those are results): end both sides as broken
            log.warning("websocket relay failed: %r", failure)
            ended = _Ended("upstream", None, "")
        sockets: dict[_Side, _Socket] = {"client": client, "upstream": upstream}
        other: _Side = "upstream" if ended.side == "client" else "client"
        code = ended.code if ended.code is not None else _VANISHED[ended.side]
        # The other side gets the same close; the side that ended gets its own code echoed
        # (RFC 6455 section 5.5.1). The pump still reading the other side sees it close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT):
                await sockets[other].close(code=code, message=ended.reason.encode())
                await sockets[ended.side].close(code=code)
                await asyncio.gather(*pumps, return_exceptions=True)
        log.debug("websocket session ended by the %s with %s", ended.side, code)
    finally:
        for pump in pumps:
            pump.cancel()
        # Only still open when this handler was cancelled (the client went away).
        await upstream.close(code=_VANISHED["client"])
        if not client.closed and conn.transport is not None:
            with contextlib.suppress(Exception):
                await client.close(code=_VANISHED["upstream"])
    return 101, False
