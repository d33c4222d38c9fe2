"""Upstreams as the forwarding path uses them: endpoints, keep-alive pools, endpoint choice.

I/O lives here only in the shape of the connection pools: each endpoint owns its keep-alive
HTTP/1.1 connections (`client.EndpointConnections`, for the forwarding path), and each upstream
an aiohttp client session for WebSocket handshakes. `Upstreams.build()` makes the set for a new
config and keeps the pools of upstreams whose settings did not change, so a reload does not
drop warm connections; pools that a reload retired close once their last request finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .breaker import Breaker, BreakerSettings, Permit, Transition
from .client import EndpointConnections
from .config import Config, Upstream
from .health import EndpointHealth

log = logging.getLogger("shaper.upstream")

__all__ = ["Endpoint", "UpstreamPool", "Upstreams"]

# Headers the aiohttp client would otherwise add on its own; a transparent proxy sends only
# what the client sent (plus the forwarding headers it is meant to add).
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(slots=True)
class Endpoint:
    """One address of an upstream, with its breaker and health verdict."""

    url: str
    host: str
    port: int
    authority: str  # host:port, as sent in Host when host_header is "endpoint"
    breaker: Breaker
    connections: EndpointConnections  # the forwarding path's keep-alive pool
    health: EndpointHealth = field(default_factory=EndpointHealth)
    quarantined: bool = False
    in_flight: int = 0

    @classmethod
    def parse(cls, url: str, breaker: BreakerSettings, settings: Upstream) -> Endpoint:
        parts = urlsplit(url)
        assert parts.hostname is not None  # checked by the config model
        port = parts.port or 80
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(
            url=url.rstrip("/"),
            host=host,
            port=port,
            authority=f"{shown}:{port}",
            breaker=Breaker(breaker),
            connections=EndpointConnections(
                host,
                port,
                max_connections=settings.pool.max_connections,
                keepalive_timeout=settings.pool.keepalive_timeout,
                connect_timeout=settings.connect_timeout,
                idle_timeout=settings.idle_timeout,
            ),
        )

    def url_for(self, target: str) -> URL:
        """The request URL for an origin-form target, byte for byte as the client sent it."""
        return URL(f"http://{self.authority}{target}", encoded=True)


@dataclass
class UpstreamPool:
    """One upstream's endpoints (each with its connection pool) and the aiohttp session that
    WebSocket handshakes use."""

    name: str
    settings: Upstream
    endpoints: list[Endpoint]
    session: aiohttp.ClientSession
    _next: int = 0
    in_flight: int = 0
    quarantined: bool = False  # the whole upstream is out of rotation
    on_breaker: Callable[[UpstreamPool, Endpoint, Transition], None] | None = None
    retired: bool = False
    _closing: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, name: str, settings: Upstream) -> UpstreamPool:
        connector = aiohttp.TCPConnector(
            limit=0,  # no global cap; the per-endpoint cap below is the real one
            limit_per_host=settings.pool.max_connections,
            keepalive_timeout=settings.pool.keepalive_timeout,
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through unchanged, gzip bombs included
            cookie_jar=aiohttp.DummyCookieJar(),  # never mix one user's cookies into another's
            skip_auto_headers=_NO_AUTO_HEADERS,
            requote_redirect_url=False,
            trust_env=False,
            raise_for_status=False,
        )
        breaker = settings.breaker.settings()
        endpoints = [Endpoint.parse(url, breaker, settings) for url in settings.endpoints]
        return cls(name, settings, endpoints, session)

    def choose(self, now: float) -> tuple[Endpoint, Permit] | None:
        """Round-robin over the endpoints in rotation; takes a breaker permit for the call.
        None when no endpoint is healthy with its breaker admitting calls."""
        if self.quarantined:
            return None
        endpoints = self.endpoints
        count = len(endpoints)
        for _ in range(count):
            endpoint = endpoints[self._next % count]
            self._next += 1
            if endpoint.quarantined or not endpoint.health.healthy:
                continue
            breaker = endpoint.breaker
            if breaker.state != "closed":
                self.notify(endpoint, breaker.poll(now))  # report time-driven changes as such
            permit = breaker.acquire(now)
            if permit is not None:
                return endpoint, permit
        return None

    def retry_after(self, now: float) -> float:
        """Seconds until the first open breaker of this upstream lets a probe through."""
        waits = [e.breaker.open_until - now for e in self.endpoints if e.breaker.state == "open"]
        return max(1.0, min(waits)) if waits else 1.0

    def refresh(self, now: float) -> None:
        """Apply time-driven breaker changes (open -> half-open, expired probe leases) before
        reporting states, so an idle endpoint does not show "open" forever."""
        for endpoint in self.endpoints:
            self.notify(endpoint, endpoint.breaker.poll(now))

    def notify(self, endpoint: Endpoint, transition: Transition | None) -> None:
        if transition is not None and self.on_breaker is not None:
            self.on_breaker(self, endpoint, transition)

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight += 1
        endpoint.in_flight += 1

    def release(self, endpoint: Endpoint) -> None:
        self.in_flight -= 1
        endpoint.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.close_soon()

    def close_soon(self) -> None:
        for endpoint in self.endpoints:
            endpoint.connections.close()
        if self._closing is None and not self.session.closed:
            self._closing = asyncio.get_running_loop().create_task(
                self.session.close(), name=f"close-upstream-{self.name}"
            )

    async def close(self) -> None:
        self.close_soon()
        if self._closing is not None:
            await self._closing


class Upstreams(Mapping[str, UpstreamPool]):
    """The upstream pools of one config generation, by name."""

    def __init__(self, pools: dict[str, UpstreamPool]) -> None:
        self._pools = pools

    def __getitem__(self, name: str) -> UpstreamPool:
        return self._pools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    @classmethod
    def build(cls, config: Config, previous: Upstreams | None = None) -> Upstreams:
        """Pools for `config`, reusing `previous` ones whose settings are unchanged."""
        pools: dict[str, UpstreamPool] = {}
        for name, settings in config.upstreams.items():
            old = previous._pools.get(name) if previous is not None else None
            if old is not None and old.settings == settings and not old.retired:
                pools[name] = old
            else:
                pools[name] = UpstreamPool.create(name, settings)
        return cls(pools)

    def retire_unused(self, successor: Upstreams) -> list[UpstreamPool]:
        """Mark pools the successor does not reuse; each closes after its last request.
        The retired pools that still have requests in flight."""
        kept = {id(p) for p in successor._pools.values()}
        draining = []
        for pool in self._pools.values():
            if id(pool) not in kept:
                pool.retired = True
                if pool.in_flight == 0:
                    pool.close_soon()
                else:
                    draining.append(pool)
        return draining

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
