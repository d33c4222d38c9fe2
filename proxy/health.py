"""Active health checks: a pure per-endpoint verdict, and the probe loop that feeds it.

`EndpointHealth.observe(ok)` applies the thresholds (`unhealthy_threshold` failures in a row
take an endpoint out of rotation, `healthy_threshold` successes in a row bring it back) and
says when the verdict flips. Endpoints start healthy, so a restart does not turn away traffic
before the first probe. `HealthChecker` is the I/O shell: one task per upstream that probes
every endpoint each `interval` with a GET of `path` (a 2xx or 3xx answer within `timeout` is a
success) and writes the verdict onto the `Endpoint`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from .config import HealthCheck
from .periodic import cancel_and_wait

if TYPE_CHECKING:  # upstream.py imports EndpointHealth from here
    from .upstream import Endpoint, UpstreamPool

log = logging.getLogger("shaper.health")

__all__ = ["EndpointHealth", "HealthChecker"]


@dataclass
class EndpointHealth:
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    healthy: bool = True
    successes: int = 0
    failures: int = 0
    last_error: str = ""

    def observe(self, ok: bool, error: str = "") -> bool | None:
        """Record one probe; returns the new verdict when it changed, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.healthy_threshold:
                self.healthy = True
                self.last_error = ""
                return True
            return None
        self.failures += 1
        self.successes = 0
        self.last_error = error
        if self.healthy and self.failures >= self.unhealthy_threshold:
            self.healthy = False
            return False
        return None


class HealthChecker:
    """Probes the endpoints of every upstream that has a `health_check:`."""

    def __init__(self, on_change: Callable[[UpstreamPool, Endpoint, bool, str], None]) -> None:
        self.on_change = on_change
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def sync(self, pools: list[UpstreamPool]) -> None:
        """Probe exactly these pools (after a reload): start new loops, stop retired ones."""
        wanted = {id(p): p for p in pools if p.settings.health_check is not None}
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
        for key, pool in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = asyncio.get_running_loop().create_task(
                    self._loop(pool), name=f"health-{pool.name}"
                )

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks.values())
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    async def _probe(self, check: HealthCheck, endpoint: Endpoint) -> tuple[bool, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with (
                asyncio.timeout(check.timeout),
                self._session.get(
                    endpoint.url_for(check.path),
                    headers={"User-Agent": "traffic-shaper-health"},
                    allow_redirects=False,
                ) as response,
            ):
                await response.read()
                if 200 <= response.status < 400:
                    return True, ""
                return False, f"status {response.status}"
        except TimeoutError:
            return False, f"no answer within {check.timeout:g}s"
        except aiohttp.ClientError as exc:
            return False, str(exc) or type(exc).__name__
        except Exception as exc:  # a probe must never end the loop; it just fails
            log.exception("health probe of %s failed unexpectedly", endpoint.url)
            return False, type(exc).__name__

    async def _loop(self, pool: UpstreamPool) -> None:
        check = pool.settings.health_check
        assert check is not None
        for endpoint in pool.endpoints:
            endpoint.health = EndpointHealth(check.healthy_threshold, check.unhealthy_threshold)
        while True:
            results = await asyncio.gather(*(self._probe(check, e) for e in pool.endpoints))
            for endpoint, (ok, error) in zip(pool.endpoints, results, strict=True):
                changed = endpoint.health.observe(ok, error)
                if changed is not None:
                    log.warning(
                        "endpoint %s of %s is now %s%s",
                        endpoint.url,
                        pool.name,
                        "healthy" if changed else "unhealthy",
                        f" ({error})" if error else "",
                    )
                    self.on_change(pool, endpoint, changed, error)
            await asyncio.sleep(check.interval)
