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

The forwarder reads a request's lines once: `check_request()` does the checks and collects
what rewriting needs in the same pass, and `rewrite_request()` builds the upstream lines from
that scan when the upstream is known (again, unchanged, for a retry). `check_head()` and
`request_headers()` are the two halves on their own, over the same code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from .errors import BadRequest, VersionNotSupported

__all__ = [
    "HOP_BY_HOP",
    "RequestHead",
    "RequestScan",
    "check_head",
    "check_request",
    "connection_tokens",
    "cookie_value",
    "request_headers",
    "response_headers",
    "rewrite_request",
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


class RequestMessage(Protocol):
    """What the proxy reads of a parsed request: aiohttp's `RawRequestMessage`. Typed as a
    protocol, not as that NamedTuple: the class aiohttp's C parser makes is not a tuple, and
    the compiled build checks declared types at run time."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> RawHeaders: ...
    @property
    def should_close(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...


class RequestHead(NamedTuple):
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
            _add_tokens(tokens, value)
    return frozenset(tokens)


def _add_tokens(tokens: set[str], value: bytes) -> None:
    for token in value.decode("latin-1").split(","):
        token = token.strip().lower()
        if token:
            tokens.add(token)


@lru_cache(maxsize=4096)
def _hostname(host: str) -> str:
    """The one canonical authority routes match on: lower-case, no port, no trailing dot
    (`Example.COM.:80` is `example.com`), so no spelling of a host can miss its own route.
    Cached: a proxy sees the same few Host values over and over (failures are not cached)."""
    if not _HOST.match(host):
        raise BadRequest(f"malformed Host {host!r}")
    if host.startswith("["):
        return host[: host.index("]") + 1].lower()
    name = host.rsplit(":", 1)[0] if ":" in host else host
    return name.lower().removesuffix(".")


_CONTROL = re.compile(rb"[\r\n\x00]")

# Request fields the forwarder treats specially, by lower-case name: dropped (hop-by-hop or
# replaced by the proxy), collected (X-Forwarded-For, Via, X-Request-Id, Connection), or
# collected for the framing and authority checks (Host and Transfer-Encoding, which are
# dropped, and Content-Length, which is kept).
_DROP, _XFF, _VIA, _RID, _CONN, _HOST_LINE, _TE, _CL = range(8)
_REQUEST_SPECIAL: dict[bytes, int] = {
    **{name.encode(): _DROP for name in HOP_BY_HOP},
    **{name.encode(): _DROP for name in _REPLACED},
    b"x-forwarded-for": _XFF,
    b"via": _VIA,
    b"x-request-id": _RID,
    b"connection": _CONN,
    b"host": _HOST_LINE,
    b"transfer-encoding": _TE,
    b"content-length": _CL,
}
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "upgrade"})
# Whole Connection values that list nothing else (the usual ones): no tokenizing needed.
_PLAIN_CONNECTION_VALUES = frozenset({b"keep-alive", b"close", b"upgrade"})


Lines = list[tuple[bytes, bytes]]

# What one pass over the request's header lines collects for rewriting them (`_rewrite`): the
# lines kept as they are, the names Connection lists, the X-Forwarded-For and Via values, and
# whether an X-Request-Id line (already given the request's id) is among the kept ones.
RequestScan = tuple[Lines, set[str] | None, list[bytes], list[bytes], bool]


def check_request(
    target: str, version: tuple[int, int], raw_headers: RawHeaders, request_id: str
) -> tuple[RequestHead, RequestScan]:
    """`check_head` and the reading half of `request_headers` in one pass over the header
    lines (the forwarder's hot path); `rewrite_request` finishes the lines once the upstream
    is known. BadRequest as from `check_head`."""
    scan, hosts, transfer_encodings, content_lengths = _scan(raw_headers, request_id)
    return _checked(target, version, hosts, transfer_encodings, content_lengths), scan


def _scan(
    raw_headers: RawHeaders, request_id: str
) -> tuple[RequestScan, list[str], list[str], list[str]]:
    """One pass over the header lines: what rewriting needs, and the Host, Transfer-Encoding
    and Content-Length values the checks need. BadRequest for a control character in a value
    (llhttp rejects them too; aiohttp's pure-Python parser lets some through)."""
    out: Lines = []
    listed: set[str] | None = None
    forwarded_for: list[bytes] = []
    vias: list[bytes] = []
    has_request_id = False
    hosts: list[str] = []
    transfer_encodings: list[str] = []
    content_lengths: list[str] = []
    rid = request_id.encode("latin-1", "replace")
    control = _CONTROL.search
    special = _REQUEST_SPECIAL.get
    for raw_name, raw_value in raw_headers:
        if control(raw_value) is not None:
            raise BadRequest("control character in a header value")
        kind = special(raw_name.lower())
        if kind is None:
            # find(), not `in`: CPython 3.11 tries a bytes operand of `in` as an integer
            # first, and builds and clears a TypeError each time (~500 instructions).
            if raw_name.find(b"_") < 0:
                out.append((raw_name, raw_value))
        elif kind == _DROP:
            pass
        elif kind == _HOST_LINE:
            hosts.append(raw_value.decode("latin-1").strip())
        elif kind == _CL:
            content_lengths.append(raw_value.decode("latin-1"))
            out.append((raw_name, raw_value))
        elif kind == _TE:
            transfer_encodings.append(raw_value.decode("latin-1"))
        elif kind == _XFF:
            forwarded_for.append(raw_value.strip())
        elif kind == _VIA:
            vias.append(raw_value.strip())
        elif kind == _RID:
            if not has_request_id:
                has_request_id = True
                out.append((raw_name, rid))
        elif kind == _CONN and raw_value.lower() not in _PLAIN_CONNECTION_VALUES:
            if listed is None:
                listed = set()
            _add_tokens(listed, raw_value)
    if listed:
        # Connection may not take the body's framing away: a Content-Length it lists, dropped,
        # left the body to reach the upstream as a request of its own (smuggled past routing,
        # and its answer queued for the next client on that pooled connection).
        listed.discard("content-length")
    scan = (out, listed, forwarded_for, vias, has_request_id)
    return scan, hosts, transfer_encodings, content_lengths


def check_head(target: str, version: tuple[int, int], raw_headers: RawHeaders) -> RequestHead:
    """Validate framing and authority; BadRequest (400, connection closed) on any ambiguity."""
    return check_request(target, version, raw_headers, "")[0]


def _checked(
    target: str,
    version: tuple[int, int],
    hosts: list[str],
    transfer_encodings: list[str],
    content_lengths: list[str],
) -> RequestHead:
    if version[0] != 1:
        # RFC 9110 section 6.2: a server answers in its own major version; RFC 9110 section
        # 15.6.6: 505 for a major version it does not support.
        raise VersionNotSupported(f"HTTP/{version[0]}.{version[1]} is not supported; use HTTP/1.1")
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
    path = origin.split("?", 1)[0] if "?" in origin else origin
    return RequestHead(host, hostname, origin, path)


def _drop_listed(lines: Lines, listed: set[str]) -> Lines:
    """Fields named in Connection are for this hop only (RFC 9110 section 7.6.1)."""
    return [line for line in lines if line[0].decode("latin-1").lower() not in listed]


def request_headers(
    raw_headers: RawHeaders,
    *,
    peer: str,
    head: RequestHead,
    upstream_host: str | None,
    request_id: str,
    via: str,
    keep_upgrade: bool = False,
) -> Lines:
    """Header lines to send upstream, as bytes (name, value) pairs ready to be written.
    `upstream_host` replaces Host when not None; `keep_upgrade` keeps Connection/Upgrade for a
    WebSocket handshake."""
    scan = _scan(raw_headers, request_id)[0]
    return rewrite_request(
        scan,
        peer=peer,
        head=head,
        upstream_host=upstream_host,
        request_id=request_id,
        via=via,
        keep_upgrade=keep_upgrade,
    )


def rewrite_request(
    scan: RequestScan,
    *,
    peer: str,
    head: RequestHead,
    upstream_host: str | None,
    request_id: str,
    via: str,
    keep_upgrade: bool = False,
) -> Lines:
    """The header lines to send upstream from what `check_request` collected (a new list;
    `scan` is left as it was)."""
    kept, listed, forwarded_for, vias, has_request_id = scan
    if listed and not listed <= _PLAIN_CONNECTION:
        out = _drop_listed(kept, listed)
        if "x-forwarded-for" in listed:
            forwarded_for = []
        if "via" in listed:
            vias = []
        if "x-request-id" in listed and has_request_id:
            has_request_id = False
    else:
        out = kept.copy()
    host = upstream_host if upstream_host is not None else head.host
    if host:
        out.insert(0, (b"Host", host.encode("latin-1", "replace")))
    if keep_upgrade:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    peer_b = peer.encode("latin-1", "replace")
    if forwarded_for:
        forwarded_for = [v for v in forwarded_for if v]
        forwarded_for.append(peer_b)
        out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    else:
        out.append((b"X-Forwarded-For", peer_b))
    out.append((b"X-Forwarded-Proto", b"http"))
    if head.host:
        out.append((b"X-Forwarded-Host", head.host.encode("latin-1", "replace")))
    via_b = via.encode("latin-1", "replace")
    if vias:
        vias = [v for v in vias if v]
        vias.append(via_b)
        out.append((b"Via", b", ".join(vias)))
    else:
        out.append((b"Via", via_b))
    if not has_request_id:
        out.append((b"X-Request-Id", request_id.encode("latin-1", "replace")))
    return out


# Response fields never passed to the client as they are: hop-by-hop, and the framing the
# proxy sets itself; Via is appended to.
_RESPONSE_SPECIAL: dict[bytes, int] = {
    **{name.encode(): _DROP for name in HOP_BY_HOP},
    b"content-length": _DROP,
    b"via": _VIA,
    b"x-request-id": _RID,
    b"connection": _CONN,
}


def response_headers(
    raw_headers: RawHeaders,
    *,
    via: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
    request_id: str | None = None,
) -> Lines:
    """Upstream response header lines to pass to the client, as bytes pairs: hop-by-hop and
    framing removed (the proxy frames the body itself), Via appended, then the `extra` lines,
    then X-Request-Id when the upstream did not set one and `request_id` is given."""
    out: Lines = []
    listed: set[str] | None = None
    vias: list[bytes] = []
    has_request_id = False
    special = _RESPONSE_SPECIAL.get
    for raw_name, raw_value in raw_headers:
        kind = special(raw_name.lower())
        if kind is None:
            out.append((raw_name, raw_value))
        elif kind == _RID:
            has_request_id = True
            out.append((raw_name, raw_value))
        elif kind == _VIA:
            vias.append(raw_value.strip())
        elif kind == _CONN and raw_value.lower() not in _PLAIN_CONNECTION_VALUES:
            if listed is None:
                listed = set()
            _add_tokens(listed, raw_value)
    if listed and not listed <= _PLAIN_CONNECTION:
        out = _drop_listed(out, listed)
        if "via" in listed:
            vias = []
    via_b = via.encode("latin-1", "replace")
    if vias:
        vias.append(via_b)
        out.append((b"Via", b", ".join(v for v in vias if v)))
    else:
        out.append((b"Via", via_b))
    out.extend(extra)
    if request_id is not None and not has_request_id:
        out.append((b"X-Request-Id", request_id.encode("latin-1", "replace")))
    return out


def keep_alive_timeout(value: bytes) -> int | None:
    """The `timeout` parameter of a Keep-Alive field (`timeout=5, max=1000`): the seconds the
    sender says it keeps an idle connection open (draft-thomson-hybi-http-timeout; Apache,
    Node.js and others send it). None when absent or not a whole number of seconds."""
    for param in value.split(b","):
        name, sep, number = param.partition(b"=")
        if sep and name.strip().lower() == b"timeout":
            number = number.strip().strip(b'"')
            return int(number) if number.isdigit() and len(number) <= 9 else None
    return None


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
