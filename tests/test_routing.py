"""Pure tests of proxy/routing.py: route matching, sticky bucketing, overrides and the split."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import routing
from proxy.config import load_text
from proxy.routing import CompiledRoute, RouteTable, bucket, choose_variant

ROOT = Path(__file__).resolve().parent.parent
UPSTREAMS = {
    "v1": {"endpoints": ["http://127.0.0.1:9001"]},
    "v2": {"endpoints": ["http://127.0.0.1:9002"]},
}


def table(routes: list[dict[str, Any]]) -> RouteTable:
    """A route table built the way the server builds it: from a validated config."""
    text = yaml.safe_dump({"upstreams": UPSTREAMS, "routes": routes})
    return RouteTable.build(load_text(text, "test"))


def plain(name: str, prefix: str, host: str | None = None) -> dict[str, Any]:
    match: dict[str, Any] = {"path_prefix": prefix}
    if host is not None:
        match["host"] = host
    return {"name": name, "match": match, "upstream": "v1"}


def rollout_route(weight: float = 10.0, **rollout: Any) -> CompiledRoute:
    """One compiled route splitting v1/v2 at `weight`."""
    spec = {"stable": "v1", "canary": "v2", "weight": weight, **rollout}
    return table([{"name": "shop", "rollout": spec}]).routes[0]


def never_called() -> float:
    raise AssertionError("the random source must not be consulted")


# --- matching ------------------------------------------------------------------------------


def test_longest_prefix_wins() -> None:
    """Among host-less routes the longest matching path prefix is chosen, whatever the order."""
    routes = table([plain("root", "/"), plain("api", "/api"), plain("v2", "/api/v2")])
    assert routes.match("x", "/api/v2/users").name == "v2"  # type: ignore[union-attr]
    assert routes.match("x", "/api/v1/users").name == "api"  # type: ignore[union-attr]
    assert routes.match("x", "/api").name == "api"  # type: ignore[union-attr]
    assert routes.match("x", "/ap").name == "root"  # type: ignore[union-attr]
    assert routes.match("x", "/").name == "root"  # type: ignore[union-attr]


def test_prefixes_are_plain_string_prefixes() -> None:
    """A prefix matches by characters, not path segments: /static also takes /staticfiles."""
    routes = table([plain("root", "/"), plain("static", "/static")])
    assert routes.match("x", "/staticfiles/a.css").name == "static"  # type: ignore[union-attr]


def test_host_specific_routes_before_host_less() -> None:
    """A route for the request's host wins over a longer host-less prefix."""
    routes = table(
        [
            plain("any-api", "/api/v2"),
            plain("shop-root", "/", host="Shop.Example"),
            plain("any-root", "/"),
        ]
    )
    assert routes.match("shop.example", "/api/v2/x").name == "shop-root"  # type: ignore[union-attr]
    assert routes.match("other.example", "/api/v2/x").name == "any-api"  # type: ignore[union-attr]
    assert routes.match("other.example", "/x").name == "any-root"  # type: ignore[union-attr]


def test_host_routes_fall_back_to_host_less_when_no_prefix_matches() -> None:
    """If no route of the request's host matches the path, the host-less routes still apply."""
    routes = table([plain("shop-api", "/api", host="shop.example"), plain("any", "/")])
    assert routes.match("shop.example", "/api/x").name == "shop-api"  # type: ignore[union-attr]
    assert routes.match("shop.example", "/home").name == "any"  # type: ignore[union-attr]


def test_no_match_is_none() -> None:
    """Without a catch-all route, an unmatched path or host gives None."""
    routes = table([plain("api", "/api"), plain("shop", "/", host="shop.example")])
    assert routes.match("other.example", "/home") is None
    assert routes.match("other.example", "/") is None
    assert routes.match("shop.example", "/home") is not None


def test_a_thousand_routes_match_correctly() -> None:
    """A 1000-route table with hosts and nested prefixes picks the right route every time."""
    specs = [plain("root", "/")]
    for i in range(333):
        specs.append(plain(f"svc{i}", f"/svc{i}"))
        specs.append(plain(f"svc{i}-deep", f"/svc{i}/deep/"))
        specs.append(plain(f"h{i}", f"/svc{i}", host=f"h{i}.example"))
    routes = table(specs)
    assert len(routes.routes) == 1000
    for i in range(333):
        got = routes.match
        assert got("x", f"/svc{i}/a").name == f"svc{i}"  # type: ignore[union-attr]
        assert got("x", f"/svc{i}/deep/a").name == f"svc{i}-deep"  # type: ignore[union-attr]
        assert got("x", f"/svc{i}/deep").name == f"svc{i}"  # type: ignore[union-attr]
        assert got(f"h{i}.example", f"/svc{i}/deep/a").name == f"h{i}"  # type: ignore[union-attr]
        assert got(f"h{i}.example", "/elsewhere").name == "root"  # type: ignore[union-attr]
    # /svc1 is a string prefix of /svc10..., but the longer /svc10 wins.
    assert routes.match("x", "/svc10/a").name == "svc10"  # type: ignore[union-attr]
    assert routes.match("x", "/nothing").name == "root"  # type: ignore[union-attr]
    assert routes.by_name["svc200"].index == 1 + 3 * 200


def test_compiled_route_carries_rollout_settings() -> None:
    """Compilation lower-cases header names, defaults the salt to the route name and resolves
    upstreams per variant."""
    route = rollout_route(25, sticky={"header": "X-User-Id"}, override={"header": "X-Canary"})
    assert (route.sticky_source, route.sticky_name) == ("header", "x-user-id")
    assert route.override_header == "x-canary"
    assert route.salt == b"shop"
    assert route.has_rollout
    assert route.upstream_for("stable") == "v1"
    assert route.upstream_for("canary") == "v2"
    cookie = rollout_route(25, sticky={"cookie": "Uid"})
    assert (cookie.sticky_source, cookie.sticky_name) == ("cookie", "Uid")
    assert rollout_route(25, sticky={"source_ip": True}).sticky_source == "source_ip"
    assert rollout_route(25).sticky_source == "none"


def test_plain_route_always_goes_to_its_upstream() -> None:
    """A route without a rollout is 'stable' and ignores overrides."""
    route = table([plain("static", "/")]).routes[0]
    assert not route.has_rollout
    assert choose_variant(route, 100.0, "user", "always", never_called) == "stable"
    assert route.upstream_for("canary") == "v1"


def test_long_salt_is_accepted() -> None:
    """A salt longer than BLAKE2b's 64-byte key limit still compiles and buckets."""
    route = rollout_route(50, salt="s" * 200)
    assert len(route.salt) <= 64
    assert 0 <= bucket("user", route.salt) < 100


# --- bucketing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "salt", "expected"),
    [
        ("user-1", b"shop", 90.1672788699954),
        ("user-2", b"shop", 60.39771966745625),
        ("alice", b"shop", 63.978951026721376),
        ("bob", b"shop", 14.133057765797597),
        ("", b"shop", 16.16829429154636),
        ("alice", b"other", 87.14070489330767),
    ],
)
def test_bucket_values_are_pinned(key: str, salt: bytes, expected: float) -> None:
    """Known keys land in known buckets: changing the hash would move users between versions."""
    assert bucket(key, salt) == expected


def test_bucket_is_the_same_in_another_process() -> None:
    """A process with a different PYTHONHASHSEED computes the same bucket (no use of hash())."""
    keys = ["user-1", "alice", "☃-unicode", "10.0.0.1"]
    code = (
        "import sys; from proxy.routing import bucket\n"
        "print(repr([bucket(k, b'shop') for k in sys.argv[1:]]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, *keys],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == repr([bucket(k, b"shop") for k in keys])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.binary(min_size=0, max_size=64))
def test_bucket_is_in_range_and_deterministic(key: str, salt: bytes) -> None:
    """Any key (even with lone surrogates) maps to [0, 100), the same value every time."""
    value = bucket(key, salt)
    assert 0.0 <= value < 100.0
    assert bucket(key, salt) == value


def test_bucket_scale_never_reaches_100() -> None:
    """The largest digest maps below 100, where 64 bits over 2**64 in floats rounds to 100.0."""
    assert float((1 << 64) - 1) / float(1 << 64) * 100.0 == 100.0  # the trap avoided
    assert ((1 << 53) - 1) * routing._BUCKET_SCALE < 100.0


_KEYS = [f"user-{i}" for i in range(3000)]


@settings(max_examples=60, deadline=None)
@given(
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)
def test_raising_the_weight_only_moves_users_to_the_canary(low: float, high: float) -> None:
    """For any two weights, every user on the canary at the lower one stays there at the
    higher one; no one moves canary -> stable."""
    low, high = sorted((low, high))
    route = rollout_route(0, sticky={"header": "X-User"})
    for key in _KEYS:
        if choose_variant(route, low, key, None, never_called) == "canary":
            assert choose_variant(route, high, key, None, never_called) == "canary", key


def test_different_salts_shuffle_users_differently() -> None:
    """Two salts pick (nearly) independent 10% cohorts, so reshuffling really reshuffles."""
    keys = [f"user-{i}" for i in range(20000)]
    first = {k for k in keys if bucket(k, b"shop") < 10}
    second = {k for k in keys if bucket(k, b"shop-2") < 10}
    assert abs(len(first) - 2000) < 200 and abs(len(second) - 2000) < 200
    # independent cohorts overlap by about 10% of 10% = 1% of users
    assert len(first & second) < 300


def test_salt_defaults_to_route_name_and_can_be_set() -> None:
    """The salt is the route name unless set, so route `b` salted "a" buckets like route `a`."""
    split = {"stable": "v1", "canary": "v2"}
    a = table([{"name": "a", "rollout": split}]).routes[0]
    b = table([{"name": "b", "rollout": {**split, "salt": "a"}}]).routes[0]
    c = table([{"name": "c", "rollout": split}]).routes[0]
    assert a.salt == b.salt == b"a"
    assert c.salt == b"c"


# --- choosing a variant ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["always", "ALWAYS", " Always "])
def test_override_always_forces_the_canary(value: str) -> None:
    """`always` sends to the canary even at weight 0 and regardless of the sticky bucket."""
    route = rollout_route(0)
    assert choose_variant(route, 0.0, "user-1", value, never_called) == "canary"


@pytest.mark.parametrize("value", ["never", "NEVER"])
def test_override_never_forces_the_stable(value: str) -> None:
    """`never` keeps a request on the stable even at weight 100."""
    route = rollout_route(100)
    assert choose_variant(route, 100.0, "user-1", value, never_called) == "stable"


def test_unknown_override_value_is_ignored() -> None:
    """Any other override value falls through to the normal split."""
    route = rollout_route(0)
    assert choose_variant(route, 0.0, "user-1", "yes please", never_called) == "stable"
    assert choose_variant(route, 100.0, "user-1", "", never_called) == "canary"


def test_weight_zero_and_hundred() -> None:
    """Weight 0 never picks the canary and 100 always does, with or without a key."""
    route = rollout_route(50)
    keys = [f"k{i}" for i in range(2000)]
    assert {choose_variant(route, 0.0, k, None, never_called) for k in keys} == {"stable"}
    assert {choose_variant(route, 100.0, k, None, never_called) for k in keys} == {"canary"}
    assert choose_variant(route, 0.0, None, None, never_called) == "stable"
    assert choose_variant(route, 100.0, None, None, never_called) == "canary"


def test_sticky_key_decides_by_bucket() -> None:
    """With a key the answer is bucket < weight, the same on every request."""
    route = rollout_route(50)
    for key in ("user-1", "user-2", "alice", "bob"):
        expected = "canary" if bucket(key, route.salt) < 37.5 else "stable"
        for _ in range(3):
            assert choose_variant(route, 37.5, key, None, never_called) == expected


@pytest.mark.parametrize("weight", [1.0, 10.0, 12.5, 50.0, 90.0])
def test_per_request_split_matches_the_weight(weight: float) -> None:
    """Without a sticky key, 100k requests drawn from a seeded random hit the weight +-0.5."""
    route = rollout_route(weight)
    draw = random.Random(20240601).random
    n = 100_000
    canary = sum(choose_variant(route, weight, None, None, draw) == "canary" for _ in range(n))
    assert abs(canary / n * 100 - weight) < 0.5


def test_per_request_split_uses_the_injected_random() -> None:
    """The per-request draw comes from the random source passed in, compared with the weight."""
    route = rollout_route(30)
    assert choose_variant(route, 30.0, None, None, lambda: 0.2999) == "canary"
    assert choose_variant(route, 30.0, None, None, lambda: 0.3) == "stable"
    assert choose_variant(route, 30.0, "", None, lambda: 0.0) == "canary"  # empty key: no key


def test_sticky_split_over_many_users_matches_the_weight() -> None:
    """Over 100k distinct users the sticky canary share is within 0.5 points of the weight."""
    route = rollout_route(0, sticky={"header": "X-User"})
    buckets = [bucket(f"user-{i}", route.salt) for i in range(100_000)]
    for weight in (1.0, 5.0, 10.0, 33.3, 50.0, 75.0):
        share = sum(b < weight for b in buckets) / len(buckets) * 100
        assert abs(share - weight) < 0.5, (weight, share)
    variants = [choose_variant(route, 10.0, f"user-{i}", None, never_called) for i in range(20000)]
    assert abs(variants.count("canary") / len(variants) * 100 - 10.0) < 0.7
