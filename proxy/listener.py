"""I/O: the client-facing HTTP/1.1 connection, aiohttp's RequestHandler with a proxy's limits.

aiohttp parses the request head (its C parser, llhttp, unless AIOHTTP_NO_EXTENSIONS is set);
this subclass adds what a proxy in front of production needs on top:
  * distinct answers for oversize heads: 414 for the request line, 431 for a header line or too
    many headers (aiohttp answers 400 to both);
  * a deadline for the whole request head, so slow-loris clients are closed with 408;
  * a cap on client connections and the `shaper_client_connections_active` gauge;
  * parse errors answered with a small JSON body and counted by reason;
  * request bodies kept exactly as sent: aiohttp would inflate a `Content-Encoding: gzip` body
    and the forwarder would then send the inflated bytes under the client's Content-Length, so
    a body that inflates past it would be read by the upstream as a second, smuggled request;
  * no trailer ever reaching the next request: llhttp-based aiohttp (3.14) keeps the last
    trailer field of a chunked request and adds it to the headers of the next request on the
    connection. A chunked body that does not visibly end in an empty trailer section with
    nothing after it closes the connection once its response is sent, so whatever the client
    sent after it is never parsed into a request.
"""

from __future__ import annotations

import asyncio
import json
import re
from itertools import islice
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .config import Limits
from .metrics import Metrics

__all__ = ["ClientConnection", "ProxyServer"]


def _classify(exc: BaseException | None, line_limit: int) -> tuple[int, str]:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == line_limit:
            return 414, "request_line_too_long"
        return 431, "header_too_large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "too_many_headers"
    return 400, "malformed"


_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long"}
_REASONS[431] = "Request Header Fields Too Large"

# The end of a chunked body with an empty trailer section: the last chunk (`0`, maybe with
# extensions) and the blank line. A trailer field line cannot match `0+(;...)?`, so the match is
# exact for anything llhttp accepted.
_CLEAN_CHUNKED_END = re.compile(rb"\r\n0+(?:;[^\r\n]*)?\r\n\r\n\Z")
_RECENT_BYTES = 256  # kept to see how a chunked body ended; a longer last-chunk line closes


class ClientConnection(RequestHandler):
    """One client connection of the data plane."""

    __slots__ = (
        "_chunked_body",
        "_head_timer",
        "_limits",
        "_line_limit",
        "_metrics",
        "_recent",
    )

    def __init__(
        self, manager: ProxyServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        limits = manager.limits
        # aiohttp raises the same LineTooLong for the request line and a header line; give
        # them limits that differ by one byte so the limit in the error tells which it was.
        line_limit = limits.max_request_line
        field_limit = limits.max_header_size
        if field_limit == line_limit:
            field_limit += 1
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.keepalive_timeout,
            max_line_size=line_limit,
            max_field_size=field_limit,
            max_headers=limits.max_headers,
            auto_decompress=False,  # a proxy passes bodies on byte for byte
            access_log=None,  # type: ignore[arg-type]  # None disables it (aiohttp checks)
            **kwargs,
        )
        self._limits = limits
        self._line_limit = line_limit
        self._metrics = manager.metrics
        self._head_timer: asyncio.TimerHandle | None = None
        self._chunked_body: StreamReader | None = None  # a chunked request body still arriving
        self._recent = b""  # the last bytes received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._metrics.client_connections += 1
        super().connection_made(transport)
        if self._metrics.client_connections > self._limits.max_connections:
            self._metrics.record_rejected("too_many_connections")
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._manager is not None:
            self._metrics.client_connections -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting_for_head = (
            self._head_timer is None
            and not self._request_in_progress
            and not self._messages
            and not self._upgraded
            and self._payload_parser is None
        )
        if waiting_for_head and data:
            self._head_timer = self._loop.call_later(
                self._limits.header_timeout, self._head_deadline
            )
        queued = len(self._messages)
        super().data_received(data)
        if self._head_timer is not None and (self._messages or self._request_in_progress):
            self._head_timer.cancel()
            self._head_timer = None
        if data and not (self._close or self._force_close):
            self._guard_trailers(data, queued)

    def _guard_trailers(self, data: bytes, queued: int) -> None:
        """Close after the current request when a chunked request body ended in a way that may
        have left a trailer field in the parser: with a trailer section, or with more bytes
        after it (see the module docstring)."""
        self._recent = (self._recent + data[-_RECENT_BYTES:])[-_RECENT_BYTES:]
        # The body still arriving from before, then one entry per request parsed just now.
        bodies = [self._chunked_body] + [
            payload if getattr(message, "chunked", False) else None
            for message, payload in islice(self._messages, queued, None)
        ]
        unsafe = any(
            body is not None
            and body.is_eof()
            and (i < len(bodies) - 1 or not _CLEAN_CHUNKED_END.search(self._recent))
            for i, body in enumerate(bodies)
        )
        last = bodies[-1]
        self._chunked_body = last if last is not None and not last.is_eof() else None
        if unsafe:
            self.close()

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self._metrics.record_rejected("header_timeout")
        self.transport.write(_raw_error(408, "header_timeout"))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # The response was under way: nothing to say but a broken connection.
            raise ConnectionError("response already started")
        if status == 400:
            status, reason = _classify(exc, self._line_limit)
            self._metrics.record_rejected(reason)
        else:
            reason = "internal" if status >= 500 else "bad_request"
            if status == 500 and exc is not None:
                self.log_exception("unhandled error in the data plane", exc_info=exc)
        body = {"error": reason, "detail": (message or str(exc or ""))[:300]}
        response = web.Response(
            status=status,
            text=json.dumps(body),
            content_type="application/json",
            headers={"X-Shaper-Error": reason},
        )
        response.force_close()
        return response


def _raw_error(status: int, reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Shaper-Error: {reason}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ProxyServer(web.Server):
    """aiohttp's low-level server, making `ClientConnection`s."""

    def __init__(self, handler: Any, *, limits: Limits, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=True, **kwargs)
        self.limits = limits
        self.metrics = metrics

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, loop=self._loop, **self._kwargs)
