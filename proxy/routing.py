"""The route table and the stable/canary split. Pure: no I/O, no clock, no global state.

`RouteTable.build(config)` compiles the routes once per config load; `match(host, path)` finds
the route for a request with dictionary look-ups (the longest path prefix wins, routes for the
request's host before host-less ones). `choose_variant()` decides stable or canary:

* an override header (`always` / `never`) forces a version;
* with a sticky key, `bucket(key, salt)` is a stable hash in [0, 100) and the request goes to the
  canary iff bucket < weight. Raising the weight therefore only ever moves users from stable to
  canary, and every replica computes the same answer with no shared state;
* without a key, each request is drawn independently with the injected random source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from .config import Config, Route
from .flags import Priority

Variant = Literal["stable", "canary"]
StickySource = Literal["header", "cookie", "source_ip", "none"]

__all__ = [
    "CompiledRoute",
    "RouteTable",
    "Variant",
    "bucket",
    "choose_variant",
]

# A double holds 53 bits exactly; dividing a full 64-bit integer by 2**64 rounds the largest
# values up to 1.0, which would put a user in bucket 100.0, outside [0, 100).
_BUCKET_SCALE = 100.0 / (1 << 53)


@lru_cache(maxsize=65536)
def bucket(key: str, salt: bytes) -> float:
    """Map a user key to [0, 100) with a keyed BLAKE2b: uniform, stable across processes,
    machines and Python versions (unlike `hash()`). Cached: the same users come back."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, key=salt)
    return (int.from_bytes(digest.digest(), "big") >> 11) * _BUCKET_SCALE


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route as the hot path needs it: every look-up precomputed."""

    name: str
    index: int
    host: str | None
    path_prefix: str
    stable: str  # the upstream of a plain route is its "stable"
    canary: str | None
    weight: float
    sticky_source: StickySource
    sticky_name: str  # header name (lower-case) or cookie name
    override_header: str | None  # lower-case
    salt: bytes
    body_limit: int
    priority: Priority = "default"

    @property
    def has_rollout(self) -> bool:
        return self.canary is not None

    def upstream_for(self, variant: Variant) -> str:
        if variant == "canary" and self.canary is not None:
            return self.canary
        return self.stable


def _compile(config: Config, route: Route, index: int) -> CompiledRoute:
    rollout = route.rollout
    sticky_source: StickySource = "none"
    sticky_name = ""
    if rollout is not None and rollout.sticky is not None:
        if rollout.sticky.header:
            sticky_source, sticky_name = "header", rollout.sticky.header.lower()
        elif rollout.sticky.cookie:
            sticky_source, sticky_name = "cookie", rollout.sticky.cookie
        else:
            sticky_source = "source_ip"
    salt_text = (rollout.salt if rollout and rollout.salt else None) or route.name
    # BLAKE2b keys are at most 64 bytes; hash longer salts down to fit.
    salt = salt_text.encode()
    if len(salt) > 64:
        salt = hashlib.sha256(salt).digest()
    return CompiledRoute(
        name=route.name,
        index=index,
        host=route.match.host,
        path_prefix=route.match.path_prefix,
        stable=rollout.stable if rollout else (route.upstream or ""),
        canary=rollout.canary if rollout else None,
        weight=rollout.weight if rollout else 0.0,
        sticky_source=sticky_source,
        sticky_name=sticky_name,
        override_header=(rollout.override.header.lower() if rollout and rollout.override else None),
        salt=salt,
        body_limit=config.body_limit(route),
        priority=route.priority,
    )


@dataclass(frozen=True, slots=True)
class _PrefixIndex:
    """Prefixes of one host group, looked up longest first, one dict probe per length."""

    by_prefix: Mapping[str, CompiledRoute]
    lengths: tuple[int, ...]  # distinct prefix lengths, longest first

    @classmethod
    def build(cls, routes: list[CompiledRoute]) -> _PrefixIndex:
        by_prefix = {r.path_prefix: r for r in routes}
        lengths = tuple(sorted({len(p) for p in by_prefix}, reverse=True))
        return cls(by_prefix, lengths)

    def find(self, path: str) -> CompiledRoute | None:
        by_prefix = self.by_prefix
        path_len = len(path)
        for length in self.lengths:
            if length <= path_len:
                route = by_prefix.get(path[:length])
                if route is not None:
                    return route
        return None


@dataclass(frozen=True)
class RouteTable:
    """All routes of one config, indexed for matching."""

    routes: tuple[CompiledRoute, ...]
    _by_host: Mapping[str, _PrefixIndex] = field(repr=False)
    _any_host: _PrefixIndex = field(repr=False)
    by_name: Mapping[str, CompiledRoute] = field(repr=False)

    @classmethod
    def build(cls, config: Config) -> RouteTable:
        compiled = [_compile(config, r, i) for i, r in enumerate(config.routes)]
        hosts: dict[str, list[CompiledRoute]] = {}
        for r in compiled:
            if r.host is not None:
                hosts.setdefault(r.host, []).append(r)
        any_host = [r for r in compiled if r.host is None]
        return cls(
            routes=tuple(compiled),
            _by_host={h: _PrefixIndex.build(rs) for h, rs in hosts.items()},
            _any_host=_PrefixIndex.build(any_host),
            by_name={r.name: r for r in compiled},
        )

    def match(self, host: str, path: str) -> CompiledRoute | None:
        """`host` is lower-case without port; `path` is the request path without the query."""
        if self._by_host:
            index = self._by_host.get(host)
            if index is not None:
                route = index.find(path)
                if route is not None:
                    return route
        return self._any_host.find(path)


def choose_variant(
    route: CompiledRoute,
    weight: float,
    sticky_key: str | None,
    override: str | None,
    random: Callable[[], float],
) -> Variant:
    """Stable or canary for one request; `weight` is the effective percent (runtime state may
    differ from the file's). `override` is the override header's value, if any."""
    if route.canary is None:
        return "stable"
    if override is not None:
        value = override.strip().lower()
        if value == "always":
            return "canary"
        if value == "never":
            return "stable"
    if weight <= 0.0:
        return "stable"
    if weight >= 100.0:
        return "canary"
    if sticky_key:
        return "canary" if bucket(sticky_key, route.salt) < weight else "stable"
    return "canary" if random() * 100.0 < weight else "stable"
