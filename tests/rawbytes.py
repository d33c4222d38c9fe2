"""Raw-bytes helpers for the functional tests of framing and header handling.

`RecordingUpstream` is a plain asyncio server that keeps the exact bytes each connection
delivered and answers every complete request with a canned raw response. `RawClient` talks to
the proxy over a plain TCP connection: it sends exact bytes and reads the answer byte for byte.
Neither uses an HTTP library, so neither can tidy up what is under test: a header the proxy
should have removed, or a body it should have re-framed, shows up exactly as it was sent.

The upstream parses only enough to know where a request ends (the blank line after the head,
then Content-Length bytes or a chunked body up to its last chunk and trailer section).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "FRAMING",
    "OK_RESPONSE",
    "REQUEST_ID",
    "After",
    "RawClient",
    "RawResponse",
    "ReceivedRequest",
    "RecordingUpstream",
    "matches",
]

After = Literal["open", "closed", "silent"]
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: recording\r\n\r\nok"
REQUEST_ID = b"<request-id>"  # in expected bytes: an id the proxy minted (32 hex digits)
FRAMING = b"<framing>"  # in expected bytes: the framing line of a body the proxy re-framed
_PLACEHOLDERS = {
    REQUEST_ID: rb"[0-9a-f]{32}",
    FRAMING: rb"(?:Transfer-Encoding: chunked|Content-Length: [0-9]+)",
}


def matches(expected: bytes, actual: bytes) -> bool:
    """`actual == expected`, with `<request-id>` and `<framing>` standing for what they name."""
    pattern = re.escape(expected)
    for placeholder, replacement in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(placeholder), replacement)
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


def _header_values(head: bytes, name: bytes) -> list[bytes]:
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            values.append(value.strip())
    return values


def _connection_tokens(head: bytes) -> set[bytes]:
    values = b",".join(_header_values(head.split(b"\r\n\r\n", 1)[0], b"connection"))
    return {token.strip().lower() for token in values.split(b",")}


def _chunked_end(buffer: bytes, start: int) -> tuple[int, bytes] | None:
    """Where a chunked body starting at `start` ends and its decoded bytes; None if partial."""
    position, body = start, bytearray()
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(buffer[position:line_end].split(b";")[0].strip(), 16)
        position = line_end + 2
        if size == 0:
            if buffer.startswith(b"\r\n", position):
                return position + 2, bytes(body)
            trailer_end = buffer.find(b"\r\n\r\n", position)
            return None if trailer_end < 0 else (trailer_end + 4, bytes(body))
        if len(buffer) < position + size + 2:
            return None
        body += buffer[position : position + size]
        if buffer[position + size : position + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        position += size + 2


def _split_request(buffer: bytes) -> tuple[bytes, bytes, int] | None:
    """(head, decoded body, bytes used) of the first complete request in `buffer`, or None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[: head_end + 4]
    encodings = b",".join(_header_values(head, b"transfer-encoding")).lower()
    if encodings:
        if encodings.split(b",")[-1].strip() != b"chunked":
            raise ValueError(f"cannot frame Transfer-Encoding {encodings!r}")
        end = _chunked_end(buffer, len(head))
        return None if end is None else (head, end[1], end[0])
    lengths = _header_values(head, b"content-length")
    length = int(lengths[0]) if lengths else 0
    if len(buffer) < len(head) + length:
        return None
    return head, buffer[len(head) : len(head) + length], len(head) + length


@dataclass
class ReceivedRequest:
    """One complete request as the upstream got it."""

    connection: int  # index into RecordingUpstream.connections
    raw: bytes  # exactly as received: head, then the body in its framing
    head: bytes  # request line and header lines, through the blank line
    body: bytes  # the body with any chunked framing removed

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:-2]


@dataclass
class UpstreamConnection:
    """The bytes one proxy-to-upstream connection delivered, and whether it has ended."""

    received: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingUpstream:
    """A fake upstream on 127.0.0.1:0 that records exactly what it receives.

    Every complete request gets `response`; when that carries `Connection: close` the
    connection is closed after it. Bytes that do not parse close the connection."""

    def __init__(self, response: bytes = OK_RESPONSE) -> None:
        self.response = response
        self.connections: list[UpstreamConnection] = []
        self.requests: list[ReceivedRequest] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    @property
    def received(self) -> bytes:
        """Everything any connection delivered, in connection order."""
        return b"".join(bytes(connection.received) for connection in self.connections)

    async def all_closed(self, timeout: float = 5.0) -> bool:
        """True once every connection the proxy opened has been closed by the proxy."""
        try:
            async with asyncio.timeout(timeout):
                for connection in self.connections:
                    await connection.closed.wait()
        except TimeoutError:
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = UpstreamConnection()
        index = len(self.connections)
        self.connections.append(connection)
        self._writers.add(writer)
        pending = b""
        try:
            while data := await reader.read(65536):
                connection.received += data
                pending += data
                while (parsed := _split_request(pending)) is not None:
                    head, body, used = parsed
                    self.requests.append(ReceivedRequest(index, pending[:used], head, body))
                    pending = pending[used:]
                    writer.write(self.response)
                    await writer.drain()
                    if b"close" in _connection_tokens(self.response):
                        return
        except (ValueError, ConnectionError):
            return
        finally:
            connection.closed.set()
            self._writers.discard(writer)
            writer.close()


@dataclass
class RawResponse:
    """A response as the client read it off the wire."""

    status: int
    head: bytes  # status line and header lines, through the blank line
    body: bytes  # with any chunked framing removed
    interim: list[bytes]  # heads of 1xx responses that came first

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:-2]

    def header(self, name: str) -> list[bytes]:
        return _header_values(self.head, name.lower().encode())


class RawClient:
    """A plain TCP connection to the proxy; every read is bounded by a timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> RawClient:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> RawResponse:
        """Read one final response (skipping and keeping 1xx heads); TimeoutError if none."""
        interim: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                if status >= 200:
                    break
                interim.append(head)
            body = await self._body(head, status)
        return RawResponse(status, head, body, interim)

    async def _body(self, head: bytes, status: int) -> bytes:
        if status in (204, 304):
            return b""
        if b"chunked" in b",".join(_header_values(head, b"transfer-encoding")).lower():
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return bytes(body)
                body += (await self.reader.readexactly(size + 2))[:-2]
        lengths = _header_values(head, b"content-length")
        if lengths:
            return await self.reader.readexactly(int(lengths[0]))
        return await self.reader.read()  # delimited by the close

    async def dribble(
        self, data: bytes, gap: float, timeout: float = 5.0
    ) -> tuple[RawResponse, int]:
        """Send `data` a byte at a time, `gap` seconds apart, until the proxy answers: the
        answer and how many bytes went out first. Every wait is bounded by the socket read."""
        reading = asyncio.ensure_future(self.response(timeout))
        sent = 0
        try:
            while sent < len(data) and not reading.done():
                try:
                    await self.send(data[sent : sent + 1])
                except ConnectionError:
                    break
                sent += 1
                await asyncio.wait({reading}, timeout=gap)
            return await reading, sent
        finally:
            reading.cancel()

    async def read_until_closed(self, timeout: float = 3.0) -> bytes | None:
        """What arrives before the proxy closes the connection; None if it stays open."""
        data = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    data += chunk
        except TimeoutError:
            return None
        except ConnectionError:
            pass
        return bytes(data)

    async def after_response(self, timeout: float = 2.0) -> After:
        """What the connection does after a response, probed with a plain follow-up request:
        "open" if it is answered, "closed" if the proxy closes the connection (or shuts down
        its sending side), "silent" if neither happens within `timeout`."""
        try:
            await self.send(b"GET /follow-up HTTP/1.1\r\nHost: shaper.test\r\n\r\n")
            await self.response(timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed"
        except TimeoutError:
            return "silent"
        return "open"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
