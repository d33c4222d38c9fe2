"""I/O: WebSocket upgrades relayed to the chosen upstream, messages and close codes mirrored.

The upstream handshake happens first: only when the upstream answers 101 does the client get
its 101 and a tunnel; any other answer is passed back as a plain response with that status.
Then two pumps copy frames each way (text, binary, ping, pong) until one side closes; its close
code and reason are sent to the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

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


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == WSMsgType.PONG:
            await sink.pong(message.data)
        else:  # CLOSE, CLOSING, CLOSED, ERROR: this direction is over
            break
    code = source.close_code if source.close_code is not None else 1000
    if not sink.closed:
        await sink.close(code=code)


async def relay_websocket(
    request: web.BaseRequest,
    pool: UpstreamPool,
    endpoint: Endpoint,
    headers: list[tuple[str, str]],
    variant: str | bool,
) -> tuple[web.StreamResponse, bool]:
    """Relay one WebSocket session; returns the response and whether the upstream failed."""
    protocols = tuple(
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    )
    upstream_headers = [(n, v) for n, v in headers if n.lower() not in _HANDSHAKE]
    url = endpoint.url_for(request.raw_path if request.raw_path.startswith("/") else "/")
    try:
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

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=False,
        max_msg_size=0,
        compress=False,
    )
    if variant:
        client.headers["X-Shaper-Variant"] = str(variant)
    try:
        await client.prepare(request)
        to_upstream = asyncio.create_task(_pump(client, upstream), name="ws-to-upstream")
        to_client = asyncio.create_task(_pump(upstream, client), name="ws-to-client")
        done, pending = await asyncio.wait(
            {to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED
        )
        # One side closed; give the other pump a moment to deliver its close frame.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5.0)
        for task in (to_upstream, to_client):
            if not task.done():
                task.cancel()
        for task in done:
            if task.exception() is not None:
                log.info("websocket relay ended: %s", task.exception())
    finally:
        await upstream.close()
        if not client.closed:
            await client.close()
    return client, False
