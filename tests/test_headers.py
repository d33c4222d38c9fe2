"""Pure tests of proxy/headers.py: head checks and header rewriting, both directions."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.headers import (
    HOP_BY_HOP,
    RequestHead,
    check_head,
    check_request,
    connection_tokens,
    keep_alive_timeout,
    request_headers,
    response_headers,
    rewrite_request,
)

HTTP11 = (1, 1)
HTTP10 = (1, 0)


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Header lines as aiohttp hands them over: bytes, original case and order."""
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


def head(host: str = "shop.example", target: str = "/a?b=1") -> RequestHead:
    return check_head(target, HTTP11, raw(("Host", host)))


def upstream(
    *pairs: tuple[str, str],
    peer: str = "10.0.0.9",
    upstream_host: str | None = None,
    keep_upgrade: bool = False,
) -> list[tuple[str, str]]:
    return text(
        request_headers(
            raw(*pairs),
            peer=peer,
            head=head(),
            upstream_host=upstream_host,
            request_id="rid-1",
            via="1.1 shaper",
            keep_upgrade=keep_upgrade,
        )
    )


def text(lines: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header lines as the proxy writes them (bytes), read back as text for comparisons."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in lines]


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


# --- check_head ----------------------------------------------------------------------------


def test_origin_form_head() -> None:
    """An ordinary request: the host as sent, a lower-case port-less hostname, path and query."""
    result = check_head("/Cart/items?id=7", HTTP11, raw(("Host", "Shop.Example:8080")))
    assert result == RequestHead(
        host="Shop.Example:8080",
        hostname="shop.example",
        target="/Cart/items?id=7",
        path="/Cart/items",
    )


def test_hostname_is_canonical() -> None:
    """Case, port and a trailing root dot are all removed, so every spelling finds its route."""
    assert check_head("/", HTTP11, raw(("Host", "Shop.Example.:8080"))).hostname == "shop.example"
    assert check_head("/", HTTP11, raw(("Host", "SHOP.example"))).hostname == "shop.example"


def test_ipv6_host() -> None:
    """A bracketed IPv6 literal keeps its brackets and loses its port."""
    assert check_head("/", HTTP11, raw(("Host", "[::1]:8080"))).hostname == "[::1]"


def test_absolute_form_agreeing_with_host() -> None:
    """An absolute-form target is reduced to origin-form when its authority matches Host."""
    result = check_head("http://shop.example/x?y=1", HTTP11, raw(("Host", "shop.example")))
    assert (result.target, result.path, result.hostname) == ("/x?y=1", "/x", "shop.example")
    bare = check_head("http://shop.example", HTTP11, raw(("Host", "shop.example")))
    assert bare.target == "/"


def test_absolute_form_supplies_the_host_for_http10() -> None:
    """Without a Host line, an HTTP/1.0 absolute-form target names the authority."""
    result = check_head("http://shop.example:81/x", HTTP10, [])
    assert (result.host, result.hostname, result.target) == (
        "shop.example:81",
        "shop.example",
        "/x",
    )


def test_http10_without_host_is_allowed() -> None:
    """HTTP/1.0 may omit Host; the hostname is then empty (only host-less routes match)."""
    result = check_head("/", HTTP10, [])
    assert (result.host, result.hostname) == ("", "")


@pytest.mark.parametrize(
    ("target", "version", "headers"),
    [
        ("/", HTTP11, []),  # HTTP/1.1 without Host
        ("/", HTTP11, [("Host", "")]),  # empty Host names no authority
        ("/", HTTP11, [("Host", "a.example"), ("Host", "b.example")]),
        ("/", HTTP11, [("Host", "a.example"), ("host", "a.example")]),
        ("http://evil.example/", HTTP11, [("Host", "shop.example")]),
        ("*", HTTP11, [("Host", "shop.example")]),
        ("shop.example:443", HTTP11, [("Host", "shop.example")]),
        ("/", HTTP11, [("Host", "a b")]),
        ("/", HTTP11, [("Host", "evil.example/path")]),
        ("/", HTTP11, [("Host", "user@shop.example")]),
        ("/", HTTP11, [("Host", "[::1")]),
    ],
    ids=[
        "missing-host",
        "empty-host",
        "two-hosts",
        "two-hosts-any-case",
        "absolute-form-disagrees",
        "asterisk-form",
        "authority-form",
        "host-with-space",
        "host-with-path",
        "host-with-userinfo",
        "unclosed-ipv6",
    ],
)
def test_ambiguous_authority_is_rejected(
    target: str, version: tuple[int, int], headers: list[tuple[str, str]]
) -> None:
    """Heads whose authority is missing, repeated, contradictory or malformed are 400s."""
    with pytest.raises(BadRequest):
        check_head(target, version, raw(*headers))


@pytest.mark.parametrize(
    "framing",
    [
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
        [("Content-Length", "5"), ("Content-Length", "5")],
        [("Content-Length", "5, 5")],
        [("Content-Length", "+5")],
        [("Content-Length", "-1")],
        [("Content-Length", "0x10")],
        [("Content-Length", "")],
        [("Content-Length", "9" * 19)],
    ],
    ids=[
        "te-list",
        "te-twice",
        "te-identity",
        "te-and-cl",
        "cl-twice",
        "cl-list",
        "cl-plus",
        "cl-negative",
        "cl-hex",
        "cl-empty",
        "cl-huge",
    ],
)
def test_ambiguous_framing_is_rejected(framing: list[tuple[str, str]]) -> None:
    """Anything but a lone `chunked` or one plain-digit Content-Length is refused (smuggling)."""
    with pytest.raises(BadRequest) as info:
        check_head("/", HTTP11, raw(("Host", "shop.example"), *framing))
    assert info.value.status == 400
    assert info.value.close_connection


@pytest.mark.parametrize(
    "framing",
    [
        [("Transfer-Encoding", "chunked")],
        [("transfer-encoding", " Chunked ")],
        [("Content-Length", "0")],
        [("Content-Length", " 1234 ")],
        [],
    ],
)
def test_unambiguous_framing_is_accepted(framing: list[tuple[str, str]]) -> None:
    """A single chunked coding (any case) or a single decimal length passes."""
    check_head("/", HTTP11, raw(("Host", "shop.example"), *framing))


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\x00b"])
def test_control_characters_in_values_are_rejected(value: str) -> None:
    """CR, LF or NUL inside any header value is a 400, wherever it appears."""
    with pytest.raises(BadRequest):
        check_head("/", HTTP11, raw(("Host", "shop.example"), ("X-Note", value)))


# --- connection_tokens ---------------------------------------------------------------------


def test_connection_tokens() -> None:
    """Tokens from every Connection line, lower-cased and trimmed, empty ones skipped."""
    headers = raw(
        ("Connection", "Keep-Alive, X-Secret ,"),
        ("Accept", "close"),
        ("connection", "UPGRADE"),
    )
    assert connection_tokens(headers) == frozenset({"keep-alive", "x-secret", "upgrade"})
    assert connection_tokens([]) == frozenset()


# --- request_headers -----------------------------------------------------------------------


def test_hop_by_hop_fields_are_removed_upstream() -> None:
    """The fixed hop-by-hop set and every name listed in Connection are not forwarded."""
    sent = upstream(
        ("Connection", "keep-alive, X-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic eA=="),
        ("X-Hop", "1"),
        ("Accept", "text/html"),
    )
    forwarded = set(names(sent))
    assert not forwarded & (HOP_BY_HOP | {"x-hop"})
    assert values(sent, "accept") == ["text/html"]


def test_names_with_underscores_are_dropped() -> None:
    """`X_Forwarded_For` cannot pose as `X-Forwarded-For` behind a server that folds `_`."""
    sent = upstream(("X_Forwarded_For", "1.2.3.4"), ("X_User", "admin"), ("X-User", "bob"))
    assert values(sent, "x-forwarded-for") == ["10.0.0.9"]
    assert "x_user" not in names(sent)
    assert values(sent, "x-user") == ["bob"]


def test_host_comes_first_and_can_be_replaced() -> None:
    """Host is the first line: the client's by default, the endpoint's when asked."""
    sent = upstream(("Accept", "*/*"), ("Host", "ignored.example"))
    assert sent[0] == ("Host", "shop.example")
    assert names(sent).count("host") == 1
    replaced = upstream(("Accept", "*/*"), upstream_host="127.0.0.1:9001")
    assert replaced[0] == ("Host", "127.0.0.1:9001")
    assert names(replaced).count("host") == 1


def test_x_forwarded_for_is_appended_to() -> None:
    """Earlier hops are kept in order (across lines), empty entries dropped, the peer last."""
    sent = upstream(
        ("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
        ("x-forwarded-for", " "),
        ("X-Forwarded-For", "3.3.3.3"),
        peer="10.0.0.9",
    )
    assert values(sent, "x-forwarded-for") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]


def test_forwarded_proto_and_host_are_overwritten() -> None:
    """A client's X-Forwarded-Proto/Host are replaced by what this proxy saw."""
    sent = upstream(("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "bank.example"))
    assert values(sent, "x-forwarded-proto") == ["http"]
    assert values(sent, "x-forwarded-host") == ["shop.example"]


def test_via_is_appended() -> None:
    """Via keeps earlier hops and adds this one."""
    assert values(upstream(("Via", "1.0 edge")), "via") == ["1.0 edge, 1.1 shaper"]
    assert values(upstream(), "via") == ["1.1 shaper"]


def test_request_id_is_set_once() -> None:
    """The request id replaces the client's X-Request-Id in place, or is added; never twice."""
    sent = upstream(("X-Request-Id", "client"), ("X-Request-Id", "again"), ("Accept", "*/*"))
    assert values(sent, "x-request-id") == ["rid-1"]
    assert names(sent).index("x-request-id") < names(sent).index("accept")
    assert values(upstream(("Accept", "*/*")), "x-request-id") == ["rid-1"]


def test_expect_is_not_forwarded() -> None:
    """Expect: 100-continue is answered by this proxy, not passed on."""
    assert "expect" not in names(upstream(("Expect", "100-continue")))


def test_end_to_end_fields_keep_order_case_and_repeats() -> None:
    """Other fields pass through untouched: original case, order and repeated lines."""
    sent = upstream(
        ("accept", "a"), ("X-Custom", "1"), ("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Custom", "2")
    )
    passed = [(n, v) for n, v in sent if n.lower() in {"accept", "x-custom", "cookie"}]
    assert passed == [
        ("accept", "a"),
        ("X-Custom", "1"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-Custom", "2"),
    ]


def test_keep_upgrade_for_websocket() -> None:
    """A WebSocket handshake keeps exactly one Connection: Upgrade and Upgrade: websocket."""
    sent = upstream(
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        keep_upgrade=True,
    )
    assert values(sent, "connection") == ["Upgrade"]
    assert values(sent, "upgrade") == ["websocket"]
    assert values(sent, "sec-websocket-key") == ["dGhlIHNhbXBsZSBub25jZQ=="]


# --- response_headers ----------------------------------------------------------------------


def test_response_hop_by_hop_and_framing_are_removed() -> None:
    """Hop-by-hop fields, Connection-listed names and Content-Length never reach the client."""
    sent = text(
        response_headers(
            raw(
                ("Connection", "close, X-Internal"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "10"),
                ("X-Internal", "secret"),
                ("Content-Type", "text/plain"),
            ),
            via="1.1 shaper",
        )
    )
    assert sent == [("Content-Type", "text/plain"), ("Via", "1.1 shaper")]


def test_response_keeps_repeated_fields_and_appends_via() -> None:
    """Repeated Set-Cookie lines survive in order; Via gets this hop."""
    sent = text(
        response_headers(
            raw(("Set-Cookie", "a=1"), ("Via", "1.1 app"), ("Set-Cookie", "b=2")), via="1.1 shaper"
        )
    )
    assert sent == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Via", "1.1 app, 1.1 shaper")]


def test_response_gets_a_request_id_unless_the_upstream_set_one() -> None:
    """The proxy's request id is added to a response without one; the upstream's own wins."""
    added = text(response_headers(raw(("X-A", "1")), via="v", request_id="rid-9"))
    assert added == [("X-A", "1"), ("Via", "v"), ("X-Request-Id", "rid-9")]
    kept = text(response_headers(raw(("x-request-id", "up-1")), via="v", request_id="rid-9"))
    assert kept == [("x-request-id", "up-1"), ("Via", "v")]


def test_one_checked_scan_rewrites_the_same_lines_every_time() -> None:
    """The forwarder checks a head once and builds its upstream lines from that scan on every
    attempt (a retry on a fresh connection): each rewrite is what `request_headers` gives,
    and none of them changes the scan."""
    lines = raw(
        ("Host", "shop.example"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("Via", "1.0 edge"),
        ("X-Request-Id", "client-id"),
        ("Content-Length", "3"),
        ("X_Forwarded_For", "spoof"),
    )
    checked, scan = check_request("/a?b=1", HTTP11, lines, "rid-1")
    assert checked == check_head("/a?b=1", HTTP11, lines)

    def rewrite() -> list[tuple[bytes, bytes]]:
        return rewrite_request(
            scan, peer="10.0.0.9", head=checked, upstream_host=None, request_id="rid-1", via="v"
        )

    expected = request_headers(
        lines, peer="10.0.0.9", head=checked, upstream_host=None, request_id="rid-1", via="v"
    )
    first, second = rewrite(), rewrite()
    assert first == second == expected
    assert ("X-Forwarded-For", "1.2.3.4, 10.0.0.9") in text(first)
    assert "x-secret" not in names(text(first))
    assert values(text(first), "content-length") == ["3"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"timeout=5", 5),
        (b"timeout=5, max=1000", 5),  # Apache
        (b"max=100, Timeout = 15", 15),  # any order, case and spacing
        (b'timeout="7"', 7),
        (b"timeout=0", 0),
        (b"max=100", None),
        (b"", None),
        (b"timeout", None),
        (b"timeout=", None),
        (b"timeout=-1", None),
        (b"timeout=2.5", None),  # whole seconds only
        (b"timeout=5s", None),
        (b"timeout=1234567890", None),  # no number from a runaway value
        (b"timeout=\xd9\xa3", None),  # a non-ASCII digit is no digit
    ],
)
def test_keep_alive_timeout(value: bytes, seconds: int | None) -> None:
    assert keep_alive_timeout(value) == seconds
