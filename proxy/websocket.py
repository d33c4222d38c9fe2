"""I/O: WebSocket upgrades relayed to the chosen upstream, messages and close codes mirrored.

The upstream handshake happens first: only when the upstream answers 101 does the client get
its 101 and a tunnel; any other answer is passed back as a plain response with that status.
Then two pumps copy frames each way (text, binary, ping, pong) until one side closes; its close
code and reason are sent to the other side. A side that vanishes without a close frame is
reported to the other as 1014 (upstream gone) or 1001 (client gone), never as a normal 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import WSMsgType, web

from .errors import from_client_error
from .headers import connection_tokens
from .upstream import Endpoint, UpstreamPool

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


def is_websocket_handshake(request: web.BaseRequest) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").strip().lower() == "websocket"
        and "upgrade" in connection_tokens(request.raw_headers)
    )


_Side = Literal["client", "upstream"]
_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

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
    request: web.BaseRequest,
    pool: UpstreamPool,
    endpoint: Endpoint,
    headers: list[tuple[str, str]],
    variant: str | bool,
    on_open: Callable[[], None] | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Relay one WebSocket session; returns the response and whether the upstream failed.
    `on_open` is called once the upstream answered 101 (the breaker's success)."""
    protocols = tuple(
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    )
    upstream_headers = [(n, v) for n, v in headers if n.lower() not in _HANDSHAKE]
    url = endpoint.url_for(request.raw_path if request.raw_path.startswith("/") else "/")
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
        response = web.Response(status=status, text=f"upstream refused the upgrade: {status}\n")
        response.headers["X-Shaper-Error"] = "upgrade_refused"
        return response, status >= 500
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise from_client_error(exc) from None
    if on_open is not None:
        on_open()

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=False,
        max_msg_size=0,
        compress=False,
    )
    if variant:
        client.headers["X-Shaper-Variant"] = str(variant)
    pumps: list[asyncio.Task[_Ended]] = []
    try:
        await client.prepare(request)
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
        if client.prepared and not client.closed:
            await client.close(code=_VANISHED["upstream"])
    return client, False
