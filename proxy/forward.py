"""One request, from the client to the chosen upstream and back, streaming both ways.

The flow of `Forwarder.begin()`:
  `_admit`: head checks (headers.check_request, which reads the lines to forward in the
  same pass) -> route match -> body limit (413 before reading) -> shedding -> variant
  choice (routing.choose_variant) -> endpoint and breaker permit; a refusal is answered
  here ->
  upstream request: without a body and with an idle pooled connection, sent at once and
  answered from the connections' callbacks (`_Exchange`: no task, no future; the common case);
  otherwise in a task (`_proceed`), with the request body streamed from the client (small
  bodies of idempotent requests are read first, so they can be resent when a pooled connection
  turns out to be closed; client.py) ->
  response head written to the client's transport (with the body when it is all there) ->
  the rest of the body streamed chunk by chunk in a task, each write awaiting the client
  (backpressure; a client that takes no byte for the upstream's idle timeout is dropped as
  gone, with the upstream connection: a 499, no failure of the upstream's) ->
  `_finish`: metrics recorded and the breaker told, once, however the request ended.

Errors: every failure is a `ProxyError`; `_upstream_error()` and errors.from_client_error map
the upstream client's exceptions onto the tree, and `_answer()` is the only place that turns
one into a response (errors.error_response). A failure after the response head went out cannot
become a status any more: the client connection is aborted so the client sees a broken
stream, never a short body that looks complete.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from .breaker import Permit

# Imported for real, not under TYPE_CHECKING: the compiled build checks these types at run time.
from .client import (
    IDEMPOTENT,
    STALE,
    Body,
    InterimListener,
    ResponseHead,
    UpstreamResponse,
    _Connection,
)
from .errors import (
    BadRequest,
    BodyTooLarge,
    CircuitOpen,
    ClientStalled,
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
    RequestMessage,
    RequestScan,
    check_request,
    cookie_value,
    response_headers,
    rewrite_request,
)
from .listener import ClientConnection
from .metrics import Series
from .routing import CompiledRoute, Variant, choose_variant
from .runtime import Runtime, Snapshot
from .upstream import Endpoint, UpstreamPool
from .websocket import is_websocket_handshake, relay_websocket

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

    def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, once the upstream request starts to take it (the 100
        Continue goes out then). An iterator class: the compiled build has no async
        generators."""
        return self

    def __aiter__(self) -> _Upload:
        return self

    async def __anext__(self) -> bytes:
        if self.send_continue:
            self.send_continue = False
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.idle_timeout):
                chunk = await self.content.readany()
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
            raise StopAsyncIteration
        self.sent += len(chunk)
        if self.sent > self.limit:
            self.error = BodyTooLarge(f"request body over {self.limit} bytes")
            raise self.error
        return chunk


def _upstream_error(exc: BaseException, upload: _Upload | None) -> ProxyError:
    """A failed upload is the client's fault and wins over what the upstream saw of it."""
    if upload is not None and upload.error is not None:
        return upload.error
    return from_client_error(exc)


class Forwarder:
    """The data plane's request handler: `begin()` answers one request on its connection."""

    def __init__(
        self,
        runtime: Runtime,
        random: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.random = random
        self.clock = clock

    def begin(
        self, conn: ClientConnection, message: RequestMessage, payload: StreamReader
    ) -> bool | None:
        """Answer one request: whether the connection may carry another when it was answered at
        once (refusals), or None when it was taken, to be finished by `conn.finished()`.

        The common request (no body, an idle pooled upstream connection) is sent and answered
        from the protocols' callbacks (`_Exchange`), without a task or a future; the rest run
        as a task (`_proceed`): bodies, WebSockets, new upstream connections, streamed
        responses, retries."""
        call = self._admit(conn, message)
        if isinstance(call, bool):
            return call
        if payload is EMPTY_PAYLOAD and "Upgrade" not in message.headers:
            exchange = _Exchange(self, conn, message, call)
            if exchange.send():
                conn.hold(exchange)
                return None
        conn.run(self._proceed(conn, message, payload, call))
        return None

    def _admit(self, conn: ClientConnection, message: RequestMessage) -> _Call | bool:
        """Everything decided before the upstream is asked: the route, the limits, shedding,
        the variant and the endpoint (with its breaker's permit). A refusal is answered here."""
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
            head, scan = check_request(message.path, version, message.raw_headers, request_id)
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
            return _answer(conn, error, request_id, message)

        runtime = self.runtime
        level = runtime.flags.brownout or runtime.auto_brownout[0]  # brownout(), without its cause
        if level:
            level, _ = runtime.brownout()
            priority = effective_priority(route.priority, headers.get("X-Request-Priority"))
            if sheds(level, priority):
                # Shed before any upstream work; not an upstream failure, not in the analysis.
                metrics.record_shed(route.name, priority)
                metrics.record_request(
                    route.name, "shed", method, 503, self.clock() - started, False
                )
                shed = Shed(f"brownout level {level} sheds {priority} traffic", self.random())
                return _answer(conn, shed, request_id, message)

        variant = self._variant(conn, headers, route)
        pool = snapshot.upstreams[route.upstream_for(variant)]
        if variant == "canary" and pool.quarantined:
            # An operator took the whole canary out: its users go to the stable, and this is
            # no evidence against the canary.
            variant, pool = "stable", snapshot.upstreams[route.stable]
        choice = pool.choose(started)
        if choice is None and variant == "canary":
            # No canary endpoint in rotation: its users go to the stable, unharmed, and the
            # analysis counts each such request against the canary, unless an operator
            # quarantined every endpoint of it (as for the whole upstream, above).
            if not all(endpoint.quarantined for endpoint in pool.endpoints):
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
            return _answer(conn, refusal, request_id, message)
        endpoint, permit = choice
        series = metrics.request_started(route.name, variant)
        pool.acquire(endpoint)
        return _Call(
            started, pool, endpoint, permit, self.clock, snapshot, route, variant, head,
            scan, request_id, series,
        )  # fmt: skip

    def _finish(self, call: _Call, method: str) -> None:
        """The request is over, however it ended: counts, gauges and the breaker told."""
        metrics = self.runtime.metrics
        call.pool.release(call.endpoint)
        if call.gateway_failure or not call.judged:  # else the head's verdict stands
            call.judge_end()
        metrics.request_finished(
            call.series, method, call.status, self.clock() - call.started, call.failed
        )

    def _refuse(
        self, conn: ClientConnection, call: _Call, error: ProxyError, message: RequestMessage
    ) -> bool:
        """Answer a failure before the response head went out with the proxy's own error."""
        call.status = error.status
        call.failed = isinstance(error, UpstreamError) or error.status >= 500
        call.gateway_failure = isinstance(error, UpstreamError)
        call.failure_reason = error.reason
        return _answer(conn, error, call.request_id, message)

    async def _proceed(
        self,
        conn: ClientConnection,
        message: RequestMessage,
        payload: StreamReader,
        call: _Call,
        upstream: UpstreamResponse | None = None,
        fresh: bool = False,
    ) -> bool:
        """The admitted request as a task: the whole exchange, or the rest of one whose
        `upstream` response head arrived in `_Exchange` (`fresh`: after a pooled connection
        failed there, a retry on a new one)."""
        try:
            if upstream is None and is_websocket_handshake(message):
                call.status, call.failed = await relay_websocket(
                    conn,
                    message,
                    call.pool,
                    call.endpoint,
                    self._outgoing_headers(conn, message, call),
                    call.snapshot.config.proxy.variant_header and call.variant,
                    on_open=lambda: call.judge_head(101),
                )
                call.gateway_failure = call.failed
                if not call.judged:
                    call.judge_head(call.status)  # the upstream refused the upgrade
                return False
            if upstream is None:
                upstream = await self._send(conn, message, payload, call, fresh)
            call.status = upstream.status
            try:
                keep_alive = await self._relay_response(conn, message, upstream, call)
            finally:
                upstream.release()
            call.failed = call.status >= 500
            return keep_alive
        except _StreamBroken as broken:
            call.status, call.failed = broken.status, broken.upstream_failed
            call.gateway_failure = broken.upstream_failed
            conn.abort()
            return False
        except ProxyError as error:
            return self._refuse(conn, call, error, message)
        finally:
            self._finish(call, message.method)

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
        message: RequestMessage,
        call: _Call,
        keep_upgrade: bool = True,
    ) -> Lines:
        pool, endpoint, head = call.pool, call.endpoint, call.head
        endpoint_host = pool.settings.host_header == "endpoint"
        lines = rewrite_request(
            call.scan,
            peer=conn.peer,
            head=head,
            upstream_host=endpoint.authority if endpoint_host else None,
            request_id=call.request_id,
            via=call.snapshot.config.proxy.via,
            keep_upgrade=keep_upgrade,
        )
        if not head.host and not endpoint_host:  # HTTP/1.0 without Host
            lines.insert(0, (b"Host", endpoint.authority.encode("latin-1", "replace")))
        return lines

    async def _send(
        self,
        conn: ClientConnection,
        message: RequestMessage,
        payload: StreamReader,
        call: _Call,
        fresh: bool,
    ) -> UpstreamResponse:
        """Send the request upstream, its body streamed from the client; the response head,
        judged by the breaker."""
        settings = call.pool.settings
        method = message.method
        headers = self._outgoing_headers(conn, message, call, keep_upgrade=False)
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
                    call.route.body_limit,
                    settings.idle_timeout,
                    send_continue=expect and message.version >= (1, 1),
                )
                data = upload.chunks()
                length = message.headers.get("Content-Length")
                if length is None:
                    chunked = True  # the client sent chunked: re-framed upstream
                elif method in IDEMPOTENT and int(length) <= _REPLAYABLE_BODY:
                    data = b"".join([chunk async for chunk in data])
            interim: InterimListener | None = None
            if _interim_allowed(message, call):
                interim = partial(_pass_interim, conn, message, call)
            upstream = await call.endpoint.connections.request(
                method, call.head.target, headers, data, chunked, settings.request_timeout,
                fresh, interim,
            )  # fmt: skip
        except (aiohttp.ClientError, HttpProcessingError, TimeoutError, ProxyError) as exc:
            raise _upstream_error(exc, upload) from None
        self._judged(call, upstream.status, sent_at)
        return upstream

    def _judged(self, call: _Call, status: int, sent_at: float) -> None:
        """The response head arrived: the breaker judges it, the upstream's latency counts."""
        call.judge_head(status)
        assert call.head_at is not None
        self.runtime.metrics.record_upstream(call.pool.name, call.head_at - sent_at)

    def _response_head(
        self,
        message: RequestMessage,
        head: ResponseHead,
        whole: bytes | None,
        call: _Call,
        closing: bool,
    ) -> tuple[bytes, int, bool]:
        """The response head for the client, with the body when all of it is here (`whole`):
        hop-by-hop fields removed and the proxy's own added; the framing of the rest;
        keep-alive (not when the request asked to close or the connection is `closing`, which
        the head then says)."""
        version = message.version
        keep_alive = not (message.should_close or closing)
        proxy_settings = call.snapshot.config.proxy
        lines = response_headers(
            head.raw_headers,
            via=proxy_settings.via,
            extra=_VARIANT_LINES[call.variant] if proxy_settings.variant_header else [],
            request_id=call.request_id,
        )
        status = head.code
        body = b""
        framing = _LENGTH
        if message.method == "HEAD" or status in _NO_BODY_STATUSES:
            framing = _NONE
            length = head.content_length
            if length is not None and status != 204 and status >= 200:
                lines.append((b"Content-Length", b"%d" % length))
        elif whole is not None:
            # The whole body arrived with the head (the common small response): head and body
            # go out in one write, with its length whatever framing the upstream used.
            body = whole
            framing = _NONE
            lines.append((b"Content-Length", b"%d" % len(body)))
        elif (length := head.content_length) is not None:
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
        return _encode_head(version, status, head.reason, lines) + body, framing, keep_alive

    async def _relay_response(
        self,
        conn: ClientConnection,
        message: RequestMessage,
        upstream: UpstreamResponse,
        call: _Call,
    ) -> bool:
        """Send the upstream's response to the client: its head, then its body, framed for
        the client."""
        status = upstream.status
        content = upstream.content
        whole: bytes | None = None
        if content.is_eof():  # all of it here: sent with the head, with its length
            try:
                whole = content.read_nowait(-1)
            except (aiohttp.ClientError, TimeoutError) as exc:
                upstream.close()
                raise _upstream_error(exc, None) from None
        data, framing, keep_alive = self._response_head(
            message, upstream.head, whole, call, conn.will_close()
        )
        try:
            conn.write(data)
        except ConnectionError:
            upstream.close()
            raise _StreamBroken(_CLIENT_CLOSED, upstream_failed=False) from None
        if framing == _NONE:
            return keep_alive
        # The client's send deadline: the longest pause inside a body, as for the upstream.
        idle_timeout = call.pool.settings.idle_timeout
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
                    await conn.drain(idle_timeout)
                except ConnectionError as exc:  # gone, or stalled past the deadline
                    upstream.close()
                    if isinstance(exc, ClientStalled):
                        log.info("client stalled after %s: %s", status, exc)
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


class _Exchange:
    """A request without a body answered from callbacks, no task and no future: sent on an
    idle pooled upstream connection from the client connection's callback, and answered from
    the upstream connection's callback when the response head arrives with its whole body.
    Anything else is handed to a task (`Forwarder._proceed`) at the point it is reached: a
    body still streaming, a pooled connection found closed (the retry on a new one)."""

    __slots__ = ("call", "conn", "forwarder", "message", "sent_at", "upstream")

    def __init__(
        self,
        forwarder: Forwarder,
        conn: ClientConnection,
        message: RequestMessage,
        call: _Call,
    ) -> None:
        self.forwarder = forwarder
        self.conn = conn
        self.message = message
        self.call = call
        self.sent_at = 0.0
        self.upstream: _Connection | None = None

    def send(self) -> bool:
        """Whether the request went out (False: no pooled connection was idle)."""
        forwarder, call, message = self.forwarder, self.call, self.message
        headers = forwarder._outgoing_headers(self.conn, message, call, keep_upgrade=False)
        self.sent_at = forwarder.clock()
        self.upstream = call.endpoint.connections.send_now(
            message.method, call.head.target, headers, self, call.pool.settings.request_timeout
        )
        return self.upstream is not None

    def on_head(self, head: ResponseHead, body: Body) -> None:
        forwarder, call, conn, message = self.forwarder, self.call, self.conn, self.message
        upstream, self.upstream = self.upstream, None
        assert upstream is not None
        connections = call.endpoint.connections
        reusable = False
        try:
            forwarder._judged(call, head.code, self.sent_at)
            if not isinstance(body, bytes):  # the body goes on: streamed from a task
                streamed = connections.response(upstream, head, body)
                conn.run(forwarder._proceed(conn, message, EMPTY_PAYLOAD, call, streamed))
                return
            # The whole response is here: answered without an UpstreamResponse; the
            # connection goes back to the pool below, once, however this ends.
            call.status = head.code
            # No body and no Upgrade (see `begin`): of `conn.will_close()` only `closing`
            # applies, one attribute read on the hot path.
            data, _, keep_alive = forwarder._response_head(message, head, body, call, conn.closing)
            try:
                conn.write(data)
            except ConnectionError:  # the client went away as the answer came
                call.status, call.failed = _CLIENT_CLOSED, False
                conn.abort()
                keep_alive = False
            else:
                call.failed = call.status >= 500
                reusable = not upstream.should_close
        except Exception:
            connections.release(upstream, False)
            self._crashed()
            return
        connections.release(upstream, reusable)
        forwarder._finish(call, message.method)
        conn.finished(keep_alive)

    def on_interim(self, code: int, reason: bytes, lines: Lines) -> None:
        if _interim_allowed(self.message, self.call):
            _pass_interim(self.conn, self.message, self.call, code, reason, lines)

    def on_error(self, exc: BaseException) -> None:
        forwarder, call, conn, message = self.forwarder, self.call, self.conn, self.message
        upstream, self.upstream = self.upstream, None
        assert upstream is not None
        upstream_pool = call.endpoint.connections
        upstream_pool.release(upstream, False)
        if isinstance(exc, STALE) and upstream.reused and message.method in IDEMPOTENT:
            # The upstream closed the pooled connection as the request went out (its idle
            # timeout racing ours): nothing was processed; once more on a new connection.
            conn.run(forwarder._proceed(conn, message, EMPTY_PAYLOAD, call, fresh=True))
            return
        try:
            keep_alive = forwarder._refuse(conn, call, from_client_error(exc), message)
        except Exception:
            self._crashed()
            return
        forwarder._finish(call, message.method)
        conn.finished(keep_alive)

    def _crashed(self) -> None:
        """A bug on the way: counted as a 500, answered by the connection (500 or abort)."""
        self.call.status, self.call.failed = 500, True
        self.forwarder._finish(self.call, self.message.method)
        self.conn.crashed()

    def cancel(self) -> None:
        """The client left before the response head: the upstream connection is dropped."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.listener = None
            self.call.endpoint.connections.release(upstream, False)
            self.forwarder._finish(self.call, self.message.method)


_NONE, _LENGTH, _CHUNKED = 0, 1, 2
# Responses that never have a body (RFC 9110 section 6.4.1); 1xx never reach here.
_NO_BODY_STATUSES = frozenset({204, 304})


_FIELD_SEP = b": "
_VARIANT_LINES: dict[str, Lines] = {
    "stable": [(b"X-Shaper-Variant", b"stable")],
    "canary": [(b"X-Shaper-Variant", b"canary")],
}


def _encode_head(version: tuple[int, int], status: int, reason: bytes, lines: Lines) -> bytes:
    """The status line (the reason as the upstream sent it) and the header lines."""
    line = b"HTTP/%d.%d %d %b\r\n" % (*version, status, reason)
    return line + b"\r\n".join(map(_FIELD_SEP.join, lines)) + b"\r\n\r\n"


def _interim_allowed(message: RequestMessage, call: _Call) -> bool:
    """Whether 1xx heads go to this client: HTTP/1.1 (HTTP/1.0 has none), and the config lets
    them through (`proxy.forward_interim`)."""
    return message.version >= (1, 1) and call.snapshot.config.proxy.forward_interim


def _pass_interim(
    conn: ClientConnection,
    message: RequestMessage,
    call: _Call,
    code: int,
    reason: bytes,
    lines: Lines,
) -> None:
    """An upstream's interim head (103 Early Hints, 102 Processing) passed on to the client
    ahead of the final one, as RFC 9110 section 15.2 asks of a proxy: its hop-by-hop fields
    removed, Via added. The callers check `_interim_allowed`."""
    if not conn.interim_room():  # checked first: a flood costs no work per dropped head
        return
    lines = response_headers(lines, via=call.snapshot.config.proxy.via)
    conn.write_interim(_encode_head(message.version, code, reason, lines))


def _answer(
    conn: ClientConnection, error: ProxyError, request_id: str, message: RequestMessage
) -> bool:
    """Send the proxy's own error response; whether the connection stays open (which the
    response says)."""
    keep_alive = not (message.should_close or conn.will_close())
    data, keep_alive = error_response(error, request_id, message.version, keep_alive=keep_alive)
    try:
        conn.write(data)
    except ConnectionError:
        return False
    return keep_alive


@dataclass(slots=True)
class _Call:
    """One admitted request: what it was given (snapshot, route, variant, endpoint and the
    breaker's permit) and how it ends (status, failed), for `Forwarder._finish`.

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
    snapshot: Snapshot
    route: CompiledRoute
    variant: Variant
    head: RequestHead
    scan: RequestScan  # the request's header lines as read when it was checked
    request_id: str
    series: Series
    status: int = _CLIENT_CLOSED  # until the response says otherwise
    failed: bool = False  # 5xx or an upstream failure, for the analysis
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
            change = breaker.success(self.permit, now)
            if change is not None:  # the common success changes nothing to report
                self.pool.notify(self.endpoint, change)

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
