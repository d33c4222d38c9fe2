"""Upstreams as the forwarding path uses them: endpoints, keep-alive pools, endpoint choice.

I/O lives here only in the shape of the aiohttp client session each upstream owns (one
connection pool per endpoint, with explicit limits). `Upstreams.build()` makes the set for a new
config and keeps the pools of upstreams whose settings did not change, so a reload does not
drop warm connections; pools that a reload retired close once their last request finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .config import Config, Upstream

log = logging.getLogger("shaper.upstream")

__all__ = ["Endpoint", "UpstreamPool", "Upstreams"]

# Headers the aiohttp client would otherwise add on its own; a transparent proxy sends only
# what the client sent (plus the forwarding headers it is meant to add).
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(slots=True)
class Endpoint:
    """One address of an upstream."""

    url: str
    host: str
    port: int
    authority: str  # host:port, as sent in Host when host_header is "endpoint"
    in_flight: int = 0

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        assert parts.hostname is not None  # checked by the config model
        port = parts.port or 80
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(url=url.rstrip("/"), host=host, port=port, authority=f"{shown}:{port}")

    def url_for(self, target: str) -> URL:
        """The request URL for an origin-form target, byte for byte as the client sent it."""
        return URL(f"http://{self.authority}{target}", encoded=True)


@dataclass
class UpstreamPool:
    """One upstream's endpoints and its connection pools (one aiohttp session)."""

    name: str
    settings: Upstream
    endpoints: list[Endpoint]
    session: aiohttp.ClientSession
    timeout: aiohttp.ClientTimeout
    _next: int = 0
    in_flight: int = 0
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
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout,
            sock_read=settings.idle_timeout,
        )
        endpoints = [Endpoint.parse(url) for url in settings.endpoints]
        return cls(name, settings, endpoints, session, timeout)

    def pick(self) -> Endpoint:
        """Round-robin over the endpoints."""
        endpoints = self.endpoints
        endpoint = endpoints[self._next % len(endpoints)]
        self._next += 1
        return endpoint

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight += 1
        endpoint.in_flight += 1

    def release(self, endpoint: Endpoint) -> None:
        self.in_flight -= 1
        endpoint.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.close_soon()

    def close_soon(self) -> None:
        if self._closing is None and not self.session.closed:
            self._closing = asyncio.get_running_loop().create_task(
                self.session.close(), name=f"close-upstream-{self.name}"
            )

    async def close(self) -> None:
        if self._closing is not None:
            await self._closing
        elif not self.session.closed:
            await self.session.close()


class Upstreams(Mapping[str, UpstreamPool]):
    """The upstream pools of one config generation, by name."""

    def __init__(self, pools: dict[str, UpstreamPool]) -> None:
        self._pools = pools

    def __getitem__(self, name: str) -> UpstreamPool:
        return self._pools[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
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

    def retire_unused(self, successor: Upstreams) -> None:
        """Mark pools the successor does not reuse; each closes after its last request."""
        kept = {id(p) for p in successor._pools.values()}
        for pool in self._pools.values():
            if id(pool) not in kept:
                pool.retired = True
                if pool.in_flight == 0:
                    pool.close_soon()

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
