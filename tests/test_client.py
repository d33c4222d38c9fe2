"""The upstream client (client.py) over real sockets, without the proxy around it: deadlines
that depend on what the reader of a response body does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from proxy.client import EndpointConnections

pytestmark = pytest.mark.functional

_BIG = 4 * 1024 * 1024
_IDLE = 0.3


@pytest.fixture
async def download() -> AsyncIterator[int]:
    """A raw upstream that answers every request with a `_BIG`-byte Content-Length body, as
    fast as it is read; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _BIG)
            for _ in range(_BIG // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)


async def test_body_idle_deadline_stops_while_the_reader_is_behind(download: int) -> None:
    """A body whose reader stops for many idle timeouts (a client slower than the upstream:
    the stream fills and reading pauses) is not timed out meanwhile; it arrives whole."""
    connections = EndpointConnections(
        "127.0.0.1",
        download,
        max_connections=1,
        keepalive_timeout=5.0,
        connect_timeout=2.0,
        idle_timeout=_IDLE,
    )
    try:
        response = await connections.request(
            "GET", "/big", [(b"Host", b"upstream.test")], None, False, _IDLE
        )
        assert response.status == 200
        received = len(await response.content.read(65536))
        await asyncio.sleep(_IDLE * 4)  # not read: the stream is full and reading is paused
        while chunk := await response.content.readany():
            received += len(chunk)
        assert received == _BIG
        response.release()
    finally:
        connections.close()
