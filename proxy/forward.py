"""One request, from the client to the chosen upstream and back, streaming both ways.

The flow of `Forwarder.handle()`:
  head checks (headers.check_head) -> route match -> body limit (413 before reading) ->
  variant choice (routing.choose_variant) -> endpoint -> upstream request with the request body
  streamed from the client (small bodies of idempotent requests are read first, so the client
  can resend them when a pooled connection turns out to be closed; client.py) ->
  response head written to the client's transport (with the body when it is all there) ->
  the rest of the body streamed chunk by chunk, each write awaiting the client
  (backpressure) ->
  metrics recorded once, in `finally`.

Errors: every failure is a `ProxyError`; `_upstream_error()` is the only place that maps
the upstream client's exceptions onto the tree, and `handle()` the only place that turns one into a
response (errors.error_response). A failure after the response head went out cannot become a
status any more: the client connection is aborted so the client sees a broken stream, never a
short body that looks complete.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from .breaker import Permit
from .client import IDEMPOTENT, UpstreamResponse
from .errors import (
    BadRequest,
    BodyTooLarge,
    CircuitOpen,
    NoRoute,
    ProxyError,
    Shed,
    UpstreamError,
    error_response,
    from_client_error,
)
from .flags import effective_priority, sheds
from .headers import (
    Lines,
    RequestHead,
    check_head,
    cookie_value,
    request_headers,
    response_headers,
)
from .routing import CompiledRoute, Variant, choose_variant
from .upstream import Endpoint, UpstreamPool
from .websocket import is_websocket_handshake, relay_websocket

if TYPE_CHECKING:
    from .listener import ClientConnection
    from .runtime import Runtime, Snapshot

log = logging.getLogger("shaper.forward")

__all__ = ["Forwarder"]

_UNMATCHED = "_unmatched"
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_CLIENT_CLOSED = 499  # nginx's convention for "the client went away first"
_MAX_REQUEST_ID = 200
# client.py retries an idempotent request once on a fresh connection when a pooled one turns out
# to be closed (the upstream's idle timeout racing the request); a streamed body cannot be sent
# twice, so small bodies of idempotent requests are read first and sent as replayable bytes.
_REPLAYABLE_BODY = 64 * 1024


# Request ids: a random per-process prefix and a counter; unique without uuid4's cost per
# request (os.urandom plus UUID construction showed up in profiles).
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


class _Upload:
    """The client's request body as an async iterator for the upstream request: enforces the
    route's size limit, the idle timeout and extends the response deadline while bytes flow."""

    def __init__(
        self,
        conn: ClientConnection,
        content: StreamReader,
        limit: int,
        idle_timeout: float,
        send_continue: bool,
    ) -> None:
        self.conn = conn
        self.content = content
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.send_continue = send_continue
        self.sent = 0
        self.error: ProxyError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self.content
        if self.send_continue:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                self.error = BadRequest("request body stalled past the idle timeout")
                raise self.error from None
            except aiohttp.ClientPayloadError as exc:  # subclass of ClientError
                self.error = BadRequest(f"malformed request body: {exc}")
                raise self.error from None
            except Exception as exc:
                self.error = BadRequest(f"request body failed: {exc}")
                raise self.error from None
            if not chunk:
                return
            self.sent += len(chunk)
            if self.sent > self.limit:
                self.error = BodyTooLarge(f"request body over {self.limit} bytes")
                raise self.error
            yield chunk


def _upstream_error(exc: BaseException, upload: _Upload | None) -> ProxyError:
    """A failed upload is the client's fault and wins over what the upstream saw of it."""
    if upload is not None and upload.error is not None:
        return upload.error
    return from_client_error(exc)


class Forwarder:
    """The data plane's request handler: `handle()` answers one request on its connection."""

    def __init__(
        self,
        runtime: Runtime,
        random: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.random = random
        self.clock = clock

    async def handle(
        self, conn: ClientConnection, message: RawRequestMessage, payload: StreamReader
    ) -> bool:
        """Answer one request; whether the connection may carry another."""
        snapshot = self.runtime.snapshot  # the config this request keeps to the end
        metrics = self.runtime.metrics
        started = self.clock()
        method = message.method
        headers = message.headers
        version = message.version
        request_id = headers.get("X-Request-Id", "")
        if not request_id or len(request_id) > _MAX_REQUEST_ID or not request_id.isprintable():
            request_id = _next_request_id()
        try:
            head = check_head(message.path, version, message.raw_headers)
            route = snapshot.table.match(head.hostname, head.path)
            if route is None:
                raise NoRoute(f"no route for host {head.hostname!r} path {head.path[:200]!r}")
            limit = route.body_limit
            declared = headers.get("Content-Length")
            if declared is not None and int(declared) > limit:
                raise BodyTooLarge(f"Content-Length {declared} is over the limit of {limit}")
        except ProxyError as error:
            metrics.record_request(
                _UNMATCHED, "none", method, error.status, self.clock() - started, False
            )
            return _answer(conn, error, request_id, version)

        level, _ = self.runtime.brownout()
        if level:
            priority = effective_priority(route.priority, headers.get("X-Request-Priority"))
            if sheds(level, priority):
                # Shed before any upstream work; not an upstream failure, not in the analysis.
                metrics.record_shed(route.name, priority)
                metrics.record_request(
                    route.name, "shed", method, 503, self.clock() - started, False
                )
                shed = Shed(f"brownout level {level} sheds {priority} traffic", self.random())
                return _answer(conn, shed, request_id, version)

        variant = self._variant(conn, headers, route)
        pool = snapshot.upstreams[route.upstream_for(variant)]
        if variant == "canary" and pool.quarantined:
            # An operator took the whole canary out: its users go to the stable, and this is
            # no evidence against the canary.
            variant, pool = "stable", snapshot.upstreams[route.stable]
        choice = pool.choose(started)
        if choice is None and variant == "canary":
            # No canary endpoint in rotation: its users go to the stable, unharmed, and the
            # analysis counts each such request against the canary.
            metrics.record_diverted(route.name)
            variant = "stable"
            pool = snapshot.upstreams[route.stable]
            choice = pool.choose(started)
        if choice is None:
            refusal = CircuitOpen(
                f"no endpoint of {pool.name!r} is in rotation", pool.retry_after(started)
            )
            metrics.record_request(
                route.name, variant, method, refusal.status, self.clock() - started, True
            )
            return _answer(conn, refusal, request_id, version)
        endpoint, permit = choice
        metrics.request_started(route.name, variant)
        pool.acquire(endpoint)
        in_use_key = (pool.name, endpoint.url)
        metrics.endpoint_in_use[in_use_key] = metrics.endpoint_in_use.get(in_use_key, 0) + 1
        call = _Call(started, pool, endpoint, permit, self.clock)
        status = _CLIENT_CLOSED
        failed = False
        try:
            if is_websocket_handshake(message):
                status, failed = await relay_websocket(
                    conn,
                    message,
                    pool,
                    endpoint,
                    self._outgoing_headers(
                        conn, message, head, pool, endpoint, request_id, snapshot
                    ),
                    snapshot.config.proxy.variant_header and variant,
                    on_open=lambda: call.judge_head(101),
                )
                call.gateway_failure = failed
                if not call.judged:
                    call.judge_head(status)  # the upstream refused the upgrade
                return False
            status, keep_alive = await self._forward(
                conn, message, payload, head, route, variant, pool, endpoint, request_id,
                snapshot, call,
            )  # fmt: skip
            failed = status >= 500
            return keep_alive
        except _StreamBroken as broken:
            status, failed = broken.status, broken.upstream_failed
            call.gateway_failure = broken.upstream_failed
            conn.abort()
            return False
        except ProxyError as error:
            status = error.status
            failed = isinstance(error, UpstreamError) or error.status >= 500
            call.gateway_failure = isinstance(error, UpstreamError)
            call.failure_reason = error.reason
            return _answer(conn, error, request_id, version)
        finally:
            pool.release(endpoint)
            metrics.endpoint_in_use[in_use_key] -= 1
            call.judge_end()
            metrics.request_finished(
                route.name, variant, method, status, self.clock() - started, failed
            )

    def _variant(
        self, conn: ClientConnection, headers: CIMultiDictProxy[str], route: CompiledRoute
    ) -> Variant:
        if (
            route.canary is None
            or self.runtime.flags.safe_mode
            or route.name in self.runtime.rolled_back  # not even an override reaches it
        ):
            return "stable"
        sticky_key: str | None = None
        source = route.sticky_source
        if source == "header":
            sticky_key = headers.get(route.sticky_name)
        elif source == "cookie":
            sticky_key = cookie_value(headers.getall("Cookie", ()), route.sticky_name)
        elif source == "source_ip":
            sticky_key = conn.peer
        override = headers.get(route.override_header) if route.override_header else None
        weight = self.runtime.weight(route)
        return choose_variant(route, weight, sticky_key, override, self.random)

    def _outgoing_headers(
        self,
        conn: ClientConnection,
        message: RawRequestMessage,
        head: RequestHead,
        pool: UpstreamPool,
        endpoint: Endpoint,
        request_id: str,
        snapshot: Snapshot,
        keep_upgrade: bool = True,
    ) -> Lines:
        return request_headers(
            message.raw_headers,
            peer=conn.peer,
            head=head,
            upstream_host=endpoint.authority if pool.settings.host_header == "endpoint" else None,
            request_id=request_id,
            via=snapshot.config.proxy.via,
            keep_upgrade=keep_upgrade,
        )

    async def _forward(
        self,
        conn: ClientConnection,
        message: RawRequestMessage,
        payload: StreamReader,
        head: RequestHead,
        route: CompiledRoute,
        variant: Variant,
        pool: UpstreamPool,
        endpoint: Endpoint,
        request_id: str,
        snapshot: Snapshot,
        call: _Call,
    ) -> tuple[int, bool]:
        settings = pool.settings
        method = message.method
        headers = self._outgoing_headers(
            conn, message, head, pool, endpoint, request_id, snapshot, keep_upgrade=False
        )
        if not head.host and pool.settings.host_header != "endpoint":
            headers.insert(
                0, (b"Host", endpoint.authority.encode("latin-1", "replace"))
            )  # HTTP/1.0 without Host
        upload: _Upload | None = None
        sent_at = self.clock()
        try:
            data: AsyncIterator[bytes] | bytes | None = None
            chunked = False
            if payload is not EMPTY_PAYLOAD:
                expect = message.headers.get("Expect", "").lower() == "100-continue"
                upload = _Upload(
                    conn,
                    payload,
                    route.body_limit,
                    settings.idle_timeout,
                    send_continue=expect and message.version >= (1, 1),
                )
                data = upload.chunks()
                length = message.headers.get("Content-Length")
                if length is None:
                    chunked = True  # the client sent chunked: re-framed upstream
                elif method in IDEMPOTENT and int(length) <= _REPLAYABLE_BODY:
                    data = b"".join([chunk async for chunk in data])
            upstream = await endpoint.connections.request(
                method, head.target, headers, data, chunked, settings.request_timeout
            )
        except (aiohttp.ClientError, HttpProcessingError, TimeoutError, ProxyError) as exc:
            raise _upstream_error(exc, upload) from None
        call.judge_head(upstream.status)
        assert call.head_at is not None
        self.runtime.metrics.record_upstream(pool.name, call.head_at - sent_at)
        try:
            keep_alive = await self._relay_response(
                conn, message, upstream, variant, snapshot, request_id
            )
        finally:
            upstream.release()
        return upstream.status, keep_alive

    async def _relay_response(
        self,
        conn: ClientConnection,
        message: RawRequestMessage,
        upstream: UpstreamResponse,
        variant: Variant,
        snapshot: Snapshot,
        request_id: str,
    ) -> bool:
        """Send the upstream's response to the client: its head, with hop-by-hop fields
        removed and the proxy's own added, then its body, framed for the client."""
        status = upstream.status
        version = message.version
        keep_alive = not message.should_close
        lines = response_headers(
            upstream.raw_headers,
            via=snapshot.config.proxy.via,
            extra=_VARIANT_LINES[variant] if snapshot.config.proxy.variant_header else [],
            request_id=request_id,
        )
        content = upstream.content
        length = upstream.content_length
        body = b""
        framing = _LENGTH
        if message.method == "HEAD" or status in _NO_BODY_STATUSES:
            framing = _NONE
            if length is not None and status != 204 and status >= 200:
                lines.append((b"Content-Length", b"%d" % length))
        elif content.is_eof():
            # The whole body arrived with the head (the common small response): head and body
            # go out in one write, with its length whatever framing the upstream used.
            try:
                body = content.read_nowait(-1)
            except (aiohttp.ClientError, TimeoutError) as exc:
                upstream.close()
                raise _upstream_error(exc, None) from None
            framing = _NONE
            lines.append((b"Content-Length", b"%d" % len(body)))
        elif length is not None:
            lines.append((b"Content-Length", b"%d" % length))
        elif version >= (1, 1):
            framing = _CHUNKED
            lines.append((b"Transfer-Encoding", b"chunked"))
        else:
            keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if not keep_alive:
            lines.append((b"Connection", b"close"))
        elif version < (1, 1):
            lines.append((b"Connection", b"keep-alive"))
        try:
            conn.write(_encode_head(version, status, upstream.reason, lines) + body)
        except ConnectionError:
            upstream.close()
            raise _StreamBroken(_CLIENT_CLOSED, upstream_failed=False) from None
        if framing == _NONE:
            return keep_alive
        try:
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    upstream.close()
                    log.info("upstream body failed after %s: %s", status, exc)
                    raise _StreamBroken(status, upstream_failed=True) from None
                if not chunk:
                    break
                try:
                    if framing == _CHUNKED:
                        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        conn.write(chunk)
                    await conn.drain()
                except ConnectionError:
                    upstream.close()
                    raise _StreamBroken(_CLIENT_CLOSED, upstream_failed=False) from None
            if framing == _CHUNKED:
                try:
                    conn.write(b"0\r\n\r\n")
                except ConnectionError:
                    raise _StreamBroken(_CLIENT_CLOSED, upstream_failed=False) from None
        except asyncio.CancelledError:
            upstream.close()
            raise
        return keep_alive


_NONE, _LENGTH, _CHUNKED = 0, 1, 2
# Responses that never have a body (RFC 9110 section 6.4.1); 1xx never reach here.
_NO_BODY_STATUSES = frozenset({204, 304})


_FIELD_SEP = b": "
_VARIANT_LINES: dict[str, Lines] = {
    "stable": [(b"X-Shaper-Variant", b"stable")],
    "canary": [(b"X-Shaper-Variant", b"canary")],
}


def _encode_head(version: tuple[int, int], status: int, reason: str, lines: Lines) -> bytes:
    line = b"HTTP/%d.%d %d %s\r\n" % (*version, status, reason.encode("latin-1", "replace"))
    return line + b"\r\n".join(map(_FIELD_SEP.join, lines)) + b"\r\n\r\n"


def _answer(
    conn: ClientConnection, error: ProxyError, request_id: str, version: tuple[int, int]
) -> bool:
    """Send the proxy's own error response; whether the connection stays open."""
    data, keep_alive = error_response(error, request_id, version)
    try:
        conn.write(data)
    except ConnectionError:
        return False
    return keep_alive


@dataclass(slots=True)
class _Call:
    """One upstream call as its endpoint's breaker sees it.

    The breaker is told as soon as the response head arrives (or the 101 of a WebSocket), so
    a long stream never holds a half-open probe's lease; slow calls are judged on the time to
    that head, so downloads and server-sent events are not mistaken for a slow upstream.
    Gateway failures (connect errors, resets, timeouts, 502/503/504) count against the
    endpoint; 4xx answers, client disconnects and the proxy's own refusals count for nothing.
    A failure inside the body after a good head counts once more, as a failure."""

    started: float
    pool: UpstreamPool
    endpoint: Endpoint
    permit: Permit
    clock: Callable[[], float]
    head_at: float | None = None  # when the response head arrived
    judged: bool = False
    gateway_failure: bool = False
    failure_reason: str = ""

    def judge_head(self, status: int) -> None:
        self.head_at = now = self.clock()
        self.judged = True
        breaker = self.endpoint.breaker
        if status in _GATEWAY_STATUSES:
            self.pool.notify(self.endpoint, breaker.failure(self.permit, now, f"status {status}"))
        elif 400 <= status < 500:
            breaker.release(self.permit)
        else:
            self.pool.notify(self.endpoint, breaker.success(self.permit, now))

    def judge_end(self) -> None:
        breaker = self.endpoint.breaker
        if self.gateway_failure:
            reason = self.failure_reason or "upstream failure"
            self.pool.notify(self.endpoint, breaker.failure(self.permit, self.clock(), reason))
        elif not self.judged:
            breaker.release(self.permit)  # the client left, or the proxy refused, first


class _StreamBroken(Exception):
    """The response head went out and then the stream failed; nothing more can be said."""

    def __init__(self, status: int, upstream_failed: bool) -> None:
        super().__init__(status)
        self.status = status
        self.upstream_failed = upstream_failed
