"""The proxy's error tree, and the one place errors become HTTP responses.

    ProxyError                     status  X-Shaper-Error
    ├── BadRequest                 400     bad_request
    ├── NoRoute                    404     no_route
    ├── BodyTooLarge               413     body_too_large
    ├── NoUpstreamAvailable        503     no_upstream
    │   └── CircuitOpen            503     circuit_open (with Retry-After)
    ├── Shed                       503     shed (with a jittered Retry-After, X-Shaper-Shed: 1)
    └── UpstreamError                      (counted against the upstream)
        ├── UpstreamConnectError   502     connect_failed
        ├── UpstreamConnectTimeout 504     connect_timeout
        ├── UpstreamTimeout        504     upstream_timeout
        ├── UpstreamReset          502     upstream_reset
        └── UpstreamProtocolError  502     bad_upstream_response

`error_response()` turns any of them into a small JSON response carrying the reason header; the
forwarding path raises, and only the request handler calls it.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "CircuitOpen",
    "NoRoute",
    "NoUpstreamAvailable",
    "ProxyError",
    "Shed",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "VersionNotSupported",
    "error_response",
    "from_client_error",
    "json_error",
]


class ClientStalled(ConnectionError):
    """The client took no byte of the response for the send deadline (the listener's
    `drain()`); to the forwarder, a client that went away. (Here, not in listener.py: a
    compiled module's class cannot derive from ConnectionError.)"""


class ProxyError(Exception):
    status = 500
    reason = "internal"
    close_connection = False

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"
    close_connection = True


class VersionNotSupported(ProxyError):
    """A request line naming a major version other than 1 (HTTP/2.0, HTTP/0.9 with headers):
    llhttp parses them as HTTP/1 text, and the answer went out as "HTTP/2.0 200"."""

    status = 505
    reason = "http_version_not_supported"
    close_connection = True


class NoRoute(ProxyError):
    status = 404
    reason = "no_route"


class BodyTooLarge(ProxyError):
    status = 413
    reason = "body_too_large"
    close_connection = True


class NoUpstreamAvailable(ProxyError):
    status = 503
    reason = "no_upstream"
    retry_after = 1


class CircuitOpen(NoUpstreamAvailable):
    """Every endpoint of the upstream is out of rotation (breaker open or unhealthy)."""

    reason = "circuit_open"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = max(1, int(retry_after + 0.999))


class Shed(ProxyError):
    """Refused by brownout to keep capacity for more important traffic."""

    status = 503
    reason = "shed"

    def __init__(self, detail: str, jitter: float) -> None:
        super().__init__(detail)
        self.headers = {"X-Shaper-Shed": "1"}
        # 1-5 s, spread so shed clients do not all come back in the same second.
        self.retry_after = 1 + int(jitter * 5) % 5


class UpstreamError(ProxyError):
    """A failure of the upstream; these count as gateway failures for breakers and analysis."""

    status = 502
    reason = "upstream_error"


class UpstreamConnectError(UpstreamError):
    status = 502
    reason = "connect_failed"


class UpstreamConnectTimeout(UpstreamError):
    status = 504
    reason = "connect_timeout"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "upstream_timeout"


class UpstreamReset(UpstreamError):
    status = 502
    reason = "upstream_reset"


class UpstreamProtocolError(UpstreamError):
    status = 502
    reason = "bad_upstream_response"


def error_response(
    error: ProxyError,
    request_id: str | None = None,
    version: tuple[int, int] = (1, 1),
    *,
    keep_alive: bool,
) -> tuple[bytes, bool]:
    """The client-visible form of a proxy error: the whole response (JSON body, reason
    header, maybe Retry-After) and whether the connection stays open after it. `keep_alive`:
    whether it may, as far as the caller knows (the client did not ask to close, and the
    connection is not closing); an error that closes the connection overrides it. The response
    says which: `Connection: close`, or for HTTP/1.0 `Connection: keep-alive`."""
    keep = keep_alive and not error.close_connection
    extra = [f"{name}: {value}" for name, value in getattr(error, "headers", {}).items()]
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        extra.append(f"Retry-After: {retry_after}")
    data = json_error(error.status, error.reason, error.detail, request_id, extra, version, keep)
    return data, keep


def json_error(
    status: int,
    reason: str,
    detail: str,
    request_id: str | None = None,
    extra: list[str] | None = None,
    version: tuple[int, int] = (1, 1),
    keep_alive: bool = False,
) -> bytes:
    """A complete JSON error response: `{"error", "detail"[, "request_id"]}`, the
    X-Shaper-Error reason header, `extra` header lines, and the connection's fate."""
    body: dict[str, str] = {"error": reason, "detail": detail[:300]}
    if request_id:
        body["request_id"] = request_id
    data = json.dumps(body).encode()
    if version[0] != 1:  # never answer in a version this proxy does not speak
        version = (1, 1)
    lines = [
        f"HTTP/{version[0]}.{version[1]} {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(data)}",
        f"X-Shaper-Error: {reason}",
    ]
    if request_id:
        lines.append(f"X-Request-Id: {request_id}")
    lines += extra or []
    if not keep_alive:
        lines.append("Connection: close")
    elif version < (1, 1):
        lines.append("Connection: keep-alive")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1", "replace") + data


def from_client_error(exc: BaseException) -> ProxyError:
    """The single mapping from upstream client failures (aiohttp's client and parser
    exceptions, as client.py and the WebSocket path raise them) onto the tree; re-raises
    the rest."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout("timed out connecting to the upstream")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to the upstream: {exc.os_error}")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout("the upstream did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamReset("the upstream closed the connection")
    if isinstance(
        exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError | HttpProcessingError
    ):
        return UpstreamProtocolError(f"malformed upstream response: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamProtocolError(f"upstream request failed: {exc}")
    raise exc
