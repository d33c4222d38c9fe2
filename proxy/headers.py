"""Request-head checks and header rewriting for both directions. Pure: no I/O.

In: the raw header lines aiohttp parsed (original case and order). Out: the header lines to
send on, with hop-by-hop fields removed (RFC 9110 section 7.6.1: the fixed set and every name
the Connection header lists), the forwarding headers set (X-Forwarded-For appended with the
peer, X-Forwarded-Proto and X-Forwarded-Host overwritten, Via appended, X-Request-Id kept or
minted), and names with underscores dropped so `X_Forwarded_For` can never pose as
`X-Forwarded-For` behind a server that folds `_` into `-`.

`check_head()` rejects the ambiguous heads that request-smuggling relies on (no Host, an empty
one or several, an absolute-form target whose authority disagrees with Host, any
Transfer-Encoding but a lone `chunked` or any in HTTP/1.0, Content-Length in any form but plain
digits, both framings at once) before anything reaches an upstream, and derives the one
canonical host name that routing uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import BadRequest

__all__ = [
    "HOP_BY_HOP",
    "RequestHead",
    "check_head",
    "connection_tokens",
    "cookie_value",
    "request_headers",
    "response_headers",
]

RawHeaders = Iterable[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        # HTTP/1.1's upgrade to HTTP/2 (RFC 7540 section 3.2.1): connection-specific even when
        # the client forgets to list it in Connection, and meaningless to any other hop.
        "http2-settings",
    }
)
# Set by this proxy; a client's own values are replaced (X-Forwarded-For is appended to).
_REPLACED = frozenset({"x-forwarded-proto", "x-forwarded-host", "host", "expect"})
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The canonical view of a request head that routing and forwarding use."""

    host: str  # the Host value as sent (may carry a port); "" for HTTP/1.0 without Host
    hostname: str  # lower-case, no port: what routes match on
    target: str  # origin-form target to send upstream: path and query, raw bytes as text
    path: str  # the target without its query


def connection_tokens(raw_headers: RawHeaders) -> frozenset[str]:
    """Lower-case names listed by every Connection header."""
    tokens: set[str] = set()
    for name, value in raw_headers:
        if name.lower() == b"connection":
            for token in value.decode("latin-1").split(","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


def _hostname(host: str) -> str:
    """The one canonical authority routes match on: lower-case, no port, no trailing dot
    (`Example.COM.:80` is `example.com`), so no spelling of a host can miss its own route."""
    if not _HOST.match(host):
        raise BadRequest(f"malformed Host {host!r}")
    if host.startswith("["):
        return host[: host.index("]") + 1].lower()
    name = host.rsplit(":", 1)[0] if ":" in host else host
    return name.lower().removesuffix(".")


def check_head(target: str, version: tuple[int, int], raw_headers: RawHeaders) -> RequestHead:
    """Validate framing and authority; BadRequest (400, connection closed) on any ambiguity."""
    hosts: list[str] = []
    transfer_encodings: list[str] = []
    content_lengths: list[str] = []
    for raw_name, raw_value in raw_headers:
        name = raw_name.lower()
        if name == b"host":
            hosts.append(raw_value.decode("latin-1").strip())
        elif name == b"transfer-encoding":
            transfer_encodings.append(raw_value.decode("latin-1"))
        elif name == b"content-length":
            content_lengths.append(raw_value.decode("latin-1"))
        if b"\r" in raw_value or b"\n" in raw_value or b"\x00" in raw_value:
            raise BadRequest("control character in a header value")

    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if not (hosts and hosts[0]) and version >= (1, 1):
        # RFC 9112 section 3.2: 400 for HTTP/1.1 without Host. An empty one names no
        # authority either; forwarding it would let the upstream client pick a Host of its own.
        raise BadRequest("missing or empty Host header")
    if transfer_encodings:
        if version < (1, 1):
            # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if len(transfer_encodings) > 1 or transfer_encodings[0].strip().lower() != "chunked":
            raise BadRequest("unsupported Transfer-Encoding; only a single 'chunked' is accepted")
        if content_lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding")
    if content_lengths and (
        len(content_lengths) > 1 or not _DIGITS.match(content_lengths[0].strip())
    ):
        raise BadRequest("malformed or repeated Content-Length")

    host = hosts[0] if hosts else ""
    if target.startswith("/"):
        origin = target
    elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
        parts = urlsplit(target)
        if not hosts:
            host = parts.netloc
        elif parts.netloc.lower() != host.lower():
            raise BadRequest("absolute-form authority differs from Host")
        origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    else:
        raise BadRequest("request target must be origin-form or absolute-form")
    hostname = _hostname(host) if host else ""
    path = origin.split("?", 1)[0]
    return RequestHead(host=host, hostname=hostname, target=origin, path=path)


def request_headers(
    raw_headers: RawHeaders,
    *,
    peer: str,
    head: RequestHead,
    upstream_host: str | None,
    request_id: str,
    via: str,
    keep_upgrade: bool = False,
) -> list[tuple[str, str]]:
    """Headers to send upstream. `upstream_host` replaces Host when not None;
    `keep_upgrade` keeps Connection/Upgrade for a WebSocket handshake."""
    raw = list(raw_headers)
    listed = connection_tokens(raw)
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    vias: list[str] = []
    has_request_id = False
    for raw_name, raw_value in raw:
        if b"_" in raw_name:
            continue
        name = raw_name.decode("latin-1")
        lname = name.lower()
        value = raw_value.decode("latin-1")
        if lname in HOP_BY_HOP or lname in listed or lname in _REPLACED:
            continue
        if lname == "x-forwarded-for":
            forwarded_for.append(value.strip())
            continue
        if lname == "via":
            vias.append(value.strip())
            continue
        if lname == "x-request-id":
            if has_request_id:
                continue
            has_request_id = True
            value = request_id
        out.append((name, value))
    host = upstream_host if upstream_host is not None else head.host
    if host:
        out.insert(0, ("Host", host))
    if keep_upgrade:
        out.append(("Connection", "Upgrade"))
        out.append(("Upgrade", "websocket"))
    forwarded_for = [v for v in forwarded_for if v]
    forwarded_for.append(peer)
    out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", "http"))
    if head.host:
        out.append(("X-Forwarded-Host", head.host))
    vias = [v for v in vias if v]
    vias.append(via)
    out.append(("Via", ", ".join(vias)))
    if not has_request_id:
        out.append(("X-Request-Id", request_id))
    return out


def response_headers(raw_headers: RawHeaders, *, via: str) -> list[tuple[str, str]]:
    """Upstream response headers to pass to the client: hop-by-hop and framing removed
    (the proxy frames the body itself), Via appended."""
    raw = list(raw_headers)
    listed = connection_tokens(raw)
    out: list[tuple[str, str]] = []
    vias: list[str] = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in listed or lname == "content-length":
            continue
        value = raw_value.decode("latin-1")
        if lname == "via":
            vias.append(value.strip())
            continue
        out.append((name, value))
    vias.append(via)
    out.append(("Via", ", ".join(v for v in vias if v)))
    return out


def cookie_value(cookie_headers: Iterable[str], name: str) -> str | None:
    """The value of cookie `name` in the request's Cookie headers (RFC 6265 section 5.4:
    `name=value` pairs separated by `;`), or None. Quotes around a value are removed."""
    for header in cookie_headers:
        for pair in header.split(";"):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
    return None
