"""WebSocket upgrades over real sockets: frames relayed both ways to the chosen version, close
codes mirrored, the upstream's subprotocol passed back, refused upgrades passed through."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from proxy.server import Shaper

from .conftest import StartShaper, StartUpstream, free_port, make_config

pytestmark = pytest.mark.functional

_STEP = 10.0  # an upper bound for one step of a test, so a broken relay fails instead of hanging


def _ws_url(shaper: Shaper, path: str = "/ws") -> str:
    host, port = shaper.proxy_address
    return f"http://{host}:{port}{path}"


def _plain(url: str, **extra: Any) -> dict[str, Any]:
    return make_config(
        {"app": [url]}, [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}], **extra
    )


async def _raw_handshake(
    shaper: Shaper, path: str = "/ws", extra: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """An upgrade request written by hand; the open connection and the answer's head."""
    reader, writer = await asyncio.open_connection(*shaper.proxy_address)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: live.test\r\nConnection: Upgrade\r\n".encode()
        + b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + extra
        + b"\r\n"
    )
    async with asyncio.timeout(_STEP):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


WsHandler = Callable[[web.Request, web.WebSocketResponse], Awaitable[None]]


def _ws_app(session: WsHandler, protocols: tuple[str, ...] = (), name: str = "") -> web.Application:
    """An upstream whose /ws endpoint runs `session` after the handshake; other paths refuse
    the upgrade with 403."""

    async def upgrade(request: web.Request) -> web.StreamResponse:
        if request.path != "/ws":
            return web.Response(status=403, text="no websockets here")
        ws = web.WebSocketResponse(protocols=protocols, autoping=True)
        if name:
            ws.headers["X-Version"] = name
        await ws.prepare(request)
        await session(request, ws)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", upgrade)
    return app


async def _echo(request: web.Request, ws: web.WebSocketResponse) -> None:
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data == "ping me":
                await ws.ping(b"from-upstream")
            else:
                await ws.send_str(f"echo:{message.data}")
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(b"echo:" + message.data)


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    async with asyncio.timeout(_STEP):
        return await ws.receive()


async def test_frames_are_relayed_both_ways(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """Text, binary, ping and pong frames are relayed both ways."""
    shaper = await start_shaper(_plain(await start_upstream(_ws_app(_echo))))
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(_ws_url(shaper), autoping=False) as ws,
    ):
        await ws.send_str("héllo")
        message = await _receive(ws)
        assert (message.type, message.data) == (WSMsgType.TEXT, "echo:héllo")

        payload = bytes(range(256)) * 300
        await ws.send_bytes(payload)
        message = await _receive(ws)
        assert (message.type, message.data) == (WSMsgType.BINARY, b"echo:" + payload)

        await ws.ping(b"from-client")
        message = await _receive(ws)
        assert (message.type, message.data) == (WSMsgType.PONG, b"from-client")

        await ws.send_str("ping me")
        message = await _receive(ws)
        assert (message.type, message.data) == (WSMsgType.PING, b"from-upstream")


async def test_handshake_goes_to_the_chosen_version(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """The upgrade goes to the version the split chose, named by X-Shaper-Variant on the 101."""

    def version(name: str) -> web.Application:
        async def greet(request: web.Request, ws: web.WebSocketResponse) -> None:
            await ws.send_str(name)
            await ws.receive()

        return _ws_app(greet)

    stable = await start_upstream(version("stable"))
    canary = await start_upstream(version("canary"))
    shaper = await start_shaper(
        make_config(
            {"v1": [stable], "v2": [canary]},
            [
                {
                    "name": "live",
                    "match": {"path_prefix": "/"},
                    "rollout": {
                        "stable": "v1",
                        "canary": "v2",
                        "weight": 50,
                        "override": {"header": "X-Canary"},
                    },
                }
            ],
        )
    )
    for forced, expected in (("always", "canary"), ("never", "stable")):
        reader, writer, head = await _raw_handshake(
            shaper, extra=f"X-Canary: {forced}\r\n".encode()
        )
        assert head.startswith(b"HTTP/1.1 101 ")
        assert f"\r\nX-Shaper-Variant: {expected}\r\n".encode() in head
        async with asyncio.timeout(_STEP):  # an unmasked text frame from the upstream
            assert await reader.readexactly(2 + len(expected)) == (
                bytes([0x81, len(expected)]) + expected.encode()
            )
        writer.close()


async def test_client_close_code_reaches_the_upstream(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """The close code and reason the client chooses are the ones the upstream sees."""
    upstream_closed: asyncio.Future[tuple[int | None, str]] = asyncio.Future()

    async def watch_with_reason(request: web.Request, ws: web.WebSocketResponse) -> None:
        # autoclose answers the close frame; look at the frame itself for the reason.
        message = await ws.receive()
        assert message.type == WSMsgType.TEXT
        await ws.send_str("ready")
        message = await ws.receive()
        upstream_closed.set_result((message.data, message.extra))

    shaper = await start_shaper(_plain(await start_upstream(_ws_app(watch_with_reason))))
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(_ws_url(shaper))
        await ws.send_str("hi")
        assert (await _receive(ws)).data == "ready"
        async with asyncio.timeout(_STEP):
            await ws.close(code=4001, message=b"client is done")
            assert await upstream_closed == (4001, "client is done")
        assert ws.close_code == 4001


async def test_upstream_close_code_reaches_the_client(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """The close code and reason the upstream chooses are the ones the client sees."""

    async def close_early(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.receive()
        await ws.close(code=4002, message=b"upstream says bye")

    shaper = await start_shaper(_plain(await start_upstream(_ws_app(close_early))))
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(_ws_url(shaper), autoclose=False) as ws,
    ):
        await ws.send_str("go")
        message = await _receive(ws)
        assert message.type == WSMsgType.CLOSE
        assert (message.data, message.extra) == (4002, "upstream says bye")
        await ws.close()


async def test_subprotocol_chosen_by_the_upstream_is_passed_back(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """The subprotocol the upstream picks from the client's offer is the one the client gets."""
    offered: list[str] = []

    async def record(request: web.Request, ws: web.WebSocketResponse) -> None:
        offered.append(request.headers.get("Sec-WebSocket-Protocol", ""))
        await ws.send_str(ws.ws_protocol or "")
        await ws.receive()

    shaper = await start_shaper(
        _plain(await start_upstream(_ws_app(record, protocols=("graphql-ws", "v2.chat"))))
    )
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(_ws_url(shaper), protocols=("v1.chat", "v2.chat")) as ws,
    ):
        assert ws.protocol == "v2.chat"
        assert (await _receive(ws)).data == "v2.chat"
    assert [p.strip() for p in offered[0].split(",")] == ["v1.chat", "v2.chat"]


async def test_refused_upgrade_passes_the_status_and_opens_no_tunnel(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """An upstream that answers the handshake with 403: the client gets 403, not 101."""
    shaper = await start_shaper(_plain(await start_upstream(_ws_app(_echo))))
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(_ws_url(shaper, "/private"))
        assert refused.value.status == 403

    # On the wire: a plain 403 answer, no 101 and no switch of protocols.
    _, writer, head = await _raw_handshake(shaper, "/private")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"upgrade: websocket" not in head.lower()


async def test_upstream_vanishing_is_not_reported_as_a_normal_close(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """An upstream dropping TCP mid-session reaches the client as close 1014, not 1000."""

    async def crash(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()

    shaper = await start_shaper(_plain(await start_upstream(_ws_app(crash))))
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(_ws_url(shaper), autoclose=False) as ws,
    ):
        await ws.send_str("go")
        message = await _receive(ws)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1014)


async def test_client_vanishing_tells_the_upstream_it_went_away(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """A client dropping TCP mid-session reaches the upstream as close 1001, not 1000."""
    upstream_saw: asyncio.Future[tuple[WSMsgType, Any]] = asyncio.Future()

    async def wait_for_close(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_str("ready")
        message = await ws.receive()
        upstream_saw.set_result((message.type, message.data))

    shaper = await start_shaper(_plain(await start_upstream(_ws_app(wait_for_close))))
    reader, writer, head = await _raw_handshake(shaper)
    assert head.startswith(b"HTTP/1.1 101 ")
    async with asyncio.timeout(_STEP):
        assert await reader.readexactly(7) == b"\x81\x05ready"  # the upstream is there
    writer.transport.abort()
    async with asyncio.timeout(_STEP):
        assert await upstream_saw == (WSMsgType.CLOSE, 1001)


async def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(
    start_upstream: StartUpstream, start_shaper: StartShaper
) -> None:
    """An upstream streaming frames to a client that has stopped reading: once the client's
    buffers are full and it takes nothing for the upstream's idle_timeout, the session ends
    as if the client went away (1001 to the upstream), where it held both sockets for ever."""
    upstream_saw: asyncio.Future[tuple[WSMsgType, Any]] = asyncio.Future()

    async def flood(request: web.Request, ws: web.WebSocketResponse) -> None:
        async def send() -> None:
            with contextlib.suppress(Exception):
                while not ws.closed:
                    await ws.send_bytes(b"x" * 65536)

        sender = asyncio.create_task(send())
        message = await ws.receive()
        upstream_saw.set_result((message.type, message.data))
        sender.cancel()

    upstream = await start_upstream(_ws_app(flood))
    config = _plain(upstream)
    config["upstreams"]["app"]["idle_timeout"] = "1s"
    shaper = await start_shaper(config)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, shaper.proxy_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: live.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    try:
        async with asyncio.timeout(_STEP):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.transport.pause_reading()  # and never read again
        async with asyncio.timeout(_STEP):
            assert await upstream_saw == (WSMsgType.CLOSE, 1001)
    finally:
        writer.transport.abort()


async def _handshake_answer(shaper: Shaper, key: bytes) -> tuple[bytes, bytes]:
    """An upgrade request with this Sec-WebSocket-Key line: the answer's head, and what
    follows it until the proxy closes."""
    reader, writer = await asyncio.open_connection(*shaper.proxy_address)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: live.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" + key + b"\r\n"
    )
    try:
        async with asyncio.timeout(_STEP):
            head = await reader.readuntil(b"\r\n\r\n")
            return head, await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("key", [b"", b"Sec-WebSocket-Key: not-base64\r\n"], ids=["none", "bad"])
async def test_malformed_handshake_is_answered_400_then_closed(
    start_upstream: StartUpstream, start_shaper: StartShaper, key: bytes
) -> None:
    """A handshake no WebSocket server would accept gets the proxy's 400 with its reason, then
    the close; before, the connection was closed before the answer went out (the client saw
    only the close)."""
    shaper = await start_shaper(_plain(await start_upstream(_ws_app(_echo))))
    head, rest = await _handshake_answer(shaper, key)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"X-Shaper-Error: bad_request" in head and b"Connection: close" in head
    assert b"Sec-WebSocket-Key" in rest


async def test_unreachable_upstream_for_a_handshake_is_answered_502(
    start_shaper: StartShaper,
) -> None:
    """An upstream that refuses the connection: the client gets the proxy's 502, not a
    silent close."""
    port = free_port()  # nothing listens there
    shaper = await start_shaper(_plain(f"http://127.0.0.1:{port}"))
    head, _ = await _handshake_answer(shaper, b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), head
    assert b"X-Shaper-Error: connect_failed" in head
