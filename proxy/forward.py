"""One request, from the client to the chosen upstream and back, streaming both ways.

The flow of `Forwarder.handle()`:
  head checks (headers.check_head) -> route match -> body limit (413 before reading) ->
  variant choice (routing.choose_variant) -> endpoint -> upstream request with the request body
  streamed from the client (small bodies of idempotent requests are read first, so the client
  can resend them when a pooled connection turns out to be closed; client.py) ->
  response head relayed ->
  response body streamed chunk by chunk, each write awaiting the client (backpressure) ->
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
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .breaker import Permit
from .client import UpstreamResponse
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
from .headers import RequestHead, check_head, request_headers, response_headers
from .routing import CompiledRoute, Variant, choose_variant
from .upstream import Endpoint, UpstreamPool
from .websocket import is_websocket_handshake, relay_websocket

if TYPE_CHECKING:
    from .runtime import Runtime, Snapshot

log = logging.getLogger("shaper.forward")

__all__ = ["Forwarder", "RelayResponse"]

_UNMATCHED = "_unmatched"
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_CLIENT_CLOSED = 499  # nginx's convention for "the client went away first"
_MAX_REQUEST_ID = 200
_CHUNK = 64 * 1024
# client.py retries an idempotent request once on a fresh connection when a pooled one turns out
# to be closed (the upstream's idle timeout racing the request); a streamed body cannot be sent
# twice, so small bodies of idempotent requests are read first and sent as replayable bytes.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REPLAYABLE_BODY = 64 * 1024


# Request ids: a random per-process prefix and a counter; unique without uuid4's cost per
# request (os.urandom plus UUID construction showed up in profiles).
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


class RelayResponse(web.StreamResponse):
    """A response that carries exactly the upstream's headers: aiohttp would add Server and
    Content-Type when they are absent, which a transparent proxy must not do."""

    def __init__(self, status: int, reason: str | None, strip: tuple[str, ...]) -> None:
        super().__init__(status=status, reason=reason)
        self._strip = strip

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self._strip:
            self._headers.popall(name, None)


class _Upload:
    """The client's request body as an async iterator for the upstream request: enforces the
    route's size limit, the idle timeout and extends the response deadline while bytes flow."""

    def __init__(
        self,
        request: web.BaseRequest,
        limit: int,
        idle_timeout: float,
        deadline: asyncio.Timeout,
        request_timeout: float,
        send_continue: bool,
    ) -> None:
        self.request = request
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.request_timeout = request_timeout
        self.send_continue = send_continue
        self.sent = 0
        self.error: ProxyError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self.request.content
        if self.send_continue:
            await self.request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        loop = asyncio.get_running_loop()
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
            # Bytes are flowing: the response deadline counts from the last request byte.
            self.deadline.reschedule(loop.time() + self.request_timeout)
            yield chunk


def _upstream_error(exc: BaseException, upload: _Upload | None) -> ProxyError:
    """A failed upload is the client's fault and wins over what the upstream saw of it."""
    if upload is not None and upload.error is not None:
        return upload.error
    return from_client_error(exc)


class Forwarder:
    """The data plane's request handler."""

    def __init__(
        self,
        runtime: Runtime,
        random: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.random = random
        self.clock = clock

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        snapshot = self.runtime.snapshot  # the config this request keeps to the end
        metrics = self.runtime.metrics
        started = self.clock()
        method = request.method
        request_id = request.headers.get("X-Request-Id", "")
        if not request_id or len(request_id) > _MAX_REQUEST_ID or not request_id.isprintable():
            request_id = _next_request_id()
        try:
            head = check_head(request.raw_path, request.version, request.raw_headers)
            route = snapshot.table.match(head.hostname, head.path)
            if route is None:
                raise NoRoute(f"no route for host {head.hostname!r} path {head.path[:200]!r}")
            limit = route.body_limit
            declared = request.content_length
            if declared is not None and declared > limit:
                raise BodyTooLarge(f"Content-Length {declared} is over the limit of {limit}")
        except ProxyError as error:
            metrics.record_request(
                _UNMATCHED, "none", method, error.status, self.clock() - started, False
            )
            return error_response(error, request_id)

        level, _ = self.runtime.brownout()
        if level:
            priority = effective_priority(route.priority, request.headers.get("X-Request-Priority"))
            if sheds(level, priority):
                # Shed before any upstream work; not an upstream failure, not in the analysis.
                metrics.record_shed(route.name, priority)
                metrics.record_request(
                    route.name, "shed", method, 503, self.clock() - started, False
                )
                return error_response(
                    Shed(f"brownout level {level} sheds {priority} traffic", self.random()),
                    request_id,
                )

        variant = self._variant(request, route)
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
            return error_response(refusal, request_id)
        endpoint, permit = choice
        metrics.request_started(route.name, variant)
        pool.acquire(endpoint)
        in_use_key = (pool.name, endpoint.url)
        metrics.endpoint_in_use[in_use_key] = metrics.endpoint_in_use.get(in_use_key, 0) + 1
        call = _Call(started, pool, endpoint, permit, self.clock)
        status = _CLIENT_CLOSED
        failed = False
        try:
            if is_websocket_handshake(request):
                response, failed = await relay_websocket(
                    request,
                    pool,
                    endpoint,
                    self._outgoing_headers(request, head, pool, endpoint, request_id, snapshot),
                    snapshot.config.proxy.variant_header and variant,
                    on_open=lambda: call.judge_head(101),
                )
                status = response.status
                call.gateway_failure = failed
                if not call.judged:
                    call.judge_head(status)  # the upstream refused the upgrade
                return response
            response = await self._forward(
                request, head, route, variant, pool, endpoint, request_id, snapshot, call
            )
            status = response.status
            failed = status >= 500
            return response
        except _StreamBroken as broken:
            status, failed = broken.status, broken.upstream_failed
            call.gateway_failure = broken.upstream_failed
            raise ConnectionResetError("stream aborted") from None
        except ProxyError as error:
            status = error.status
            failed = isinstance(error, UpstreamError) or error.status >= 500
            call.gateway_failure = isinstance(error, UpstreamError)
            call.failure_reason = error.reason
            return error_response(error, request_id)
        finally:
            pool.release(endpoint)
            metrics.endpoint_in_use[in_use_key] -= 1
            call.judge_end()
            metrics.request_finished(
                route.name, variant, method, status, self.clock() - started, failed
            )

    def _variant(self, request: web.BaseRequest, route: CompiledRoute) -> Variant:
        if (
            route.canary is None
            or self.runtime.flags.safe_mode
            or route.name in self.runtime.rolled_back  # not even an override reaches it
        ):
            return "stable"
        sticky_key: str | None = None
        source = route.sticky_source
        if source == "header":
            sticky_key = request.headers.get(route.sticky_name)
        elif source == "cookie":
            sticky_key = request.cookies.get(route.sticky_name)
        elif source == "source_ip":
            sticky_key = request.remote
        override = request.headers.get(route.override_header) if route.override_header else None
        weight = self.runtime.weight(route)
        return choose_variant(route, weight, sticky_key, override, self.random)

    def _outgoing_headers(
        self,
        request: web.BaseRequest,
        head: RequestHead,
        pool: UpstreamPool,
        endpoint: Endpoint,
        request_id: str,
        snapshot: Snapshot,
        keep_upgrade: bool = True,
    ) -> list[tuple[str, str]]:
        return request_headers(
            request.raw_headers,
            peer=request.remote or "",
            head=head,
            upstream_host=endpoint.authority if pool.settings.host_header == "endpoint" else None,
            request_id=request_id,
            via=snapshot.config.proxy.via,
            keep_upgrade=keep_upgrade,
        )

    async def _forward(
        self,
        request: web.BaseRequest,
        head: RequestHead,
        route: CompiledRoute,
        variant: Variant,
        pool: UpstreamPool,
        endpoint: Endpoint,
        request_id: str,
        snapshot: Snapshot,
        call: _Call,
    ) -> web.StreamResponse:
        settings = pool.settings
        headers = self._outgoing_headers(
            request, head, pool, endpoint, request_id, snapshot, keep_upgrade=False
        )
        if not head.host and pool.settings.host_header != "endpoint":
            headers.insert(0, ("Host", endpoint.authority))  # HTTP/1.0 without Host
        upload: _Upload | None = None
        sent_at = self.clock()
        try:
            async with asyncio.timeout(settings.request_timeout) as deadline:
                data: AsyncIterator[bytes] | bytes | None = None
                chunked = False
                if request.body_exists:
                    expect = request.headers.get("Expect", "").lower() == "100-continue"
                    upload = _Upload(
                        request,
                        route.body_limit,
                        settings.idle_timeout,
                        deadline,
                        settings.request_timeout,
                        send_continue=expect and request.version >= (1, 1),
                    )
                    data = upload.chunks()
                    length = request.content_length
                    if length is None:
                        chunked = True  # the client sent chunked: re-framed upstream
                    elif request.method in _IDEMPOTENT and length <= _REPLAYABLE_BODY:
                        data = b"".join([chunk async for chunk in data])
                upstream = await endpoint.connections.request(
                    request.method, head.target, headers, data, chunked
                )
        except (aiohttp.ClientError, HttpProcessingError, TimeoutError, ProxyError) as exc:
            raise _upstream_error(exc, upload) from None
        call.judge_head(upstream.status)
        assert call.head_at is not None
        self.runtime.metrics.record_upstream(pool.name, call.head_at - sent_at)
        try:
            return await self._relay_response(request, upstream, variant, snapshot, request_id)
        finally:
            upstream.release()

    async def _relay_response(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        variant: Variant,
        snapshot: Snapshot,
        request_id: str,
    ) -> web.StreamResponse:
        raw = upstream.raw_headers
        names = {name.lower() for name, _ in raw}
        strip = tuple(
            name
            for name, lname in (("Server", b"server"), ("Content-Type", b"content-type"))
            if lname not in names
        )
        response = RelayResponse(upstream.status, upstream.reason, strip)
        if upstream.content.is_eof():
            # The whole body is already here: head and body go out in one write. A body still
            # to come (a stream, a long poll) keeps the head going out at once.
            response._send_headers_immediately = False
        for name, value in response_headers(raw, via=snapshot.config.proxy.via):
            response.headers.add(name, value)
        if snapshot.config.proxy.variant_header:
            response.headers["X-Shaper-Variant"] = variant
        if b"x-request-id" not in names:
            response.headers["X-Request-Id"] = request_id
        length = upstream.content_length
        if length is not None:
            response.content_length = length
        try:
            await response.prepare(request)
        except (ConnectionError, asyncio.CancelledError):
            upstream.close()
            raise
        try:
            content = upstream.content
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    upstream.close()
                    log.info("upstream body failed after %s: %s", upstream.status, exc)
                    request.transport and request.transport.abort()  # type: ignore[func-returns-value]
                    raise _StreamBroken(upstream.status, upstream_failed=True) from None
                if not chunk:
                    break
                try:
                    await response.write(chunk)
                except ConnectionError:
                    upstream.close()
                    raise _StreamBroken(_CLIENT_CLOSED, upstream_failed=False) from None
            await response.write_eof()
        except asyncio.CancelledError:
            upstream.close()
            raise
        return response


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
