"""The live state of a running proxy: the current config snapshot and the shared counters.

A `Snapshot` bundles everything derived from one config (route table, upstream pools, hash);
a request reads `Runtime.snapshot` once and keeps that object to the end, so a reload (which
builds a whole new snapshot and swaps one reference) never changes a request half-way.
`Runtime.reload()` is the only writer; an invalid file leaves the old snapshot serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .breaker import Transition
from .config import Config, ConfigError, config_hash, load
from .flags import Flags
from .metrics import Metrics
from .routing import CompiledRoute, RouteTable
from .upstream import Endpoint, UpstreamPool, Upstreams

log = logging.getLogger("shaper.runtime")


class Publish(Protocol):
    def __call__(
        self,
        event_type: str,
        details: dict[str, Any] | None = None,
        *,
        route: str | None = None,
        upstream: str | None = None,
        at: float | None = None,
        event_id: str | None = None,
    ) -> Any: ...


def _no_events(
    event_type: str,
    details: dict[str, Any] | None = None,
    *,
    route: str | None = None,
    upstream: str | None = None,
    at: float | None = None,
    event_id: str | None = None,
) -> None:
    return None


__all__ = ["ReloadResult", "Runtime", "Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """One config generation, ready for the hot path."""

    config: Config
    table: RouteTable
    upstreams: Upstreams
    config_hash: str
    loaded_at: float  # unix time

    @classmethod
    def build(cls, config: Config, previous: Snapshot | None, wall: float) -> Snapshot:
        upstreams = Upstreams.build(config, previous.upstreams if previous else None)
        return cls(config, RouteTable.build(config), upstreams, config_hash(config), wall)


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    errors: tuple[str, ...] = ()
    changed: bool = False
    config_hash: str = ""


class Runtime:
    """Owns the current snapshot and the metrics; reloads from `config_path`."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        metrics: Metrics,
        wall: Callable[[], float] = time.time,
        adjust: Callable[[Config], Config] = lambda c: c,
    ) -> None:
        self.config_path = config_path
        self.metrics = metrics
        self.wall = wall
        self.adjust = adjust  # command-line overrides, re-applied on every reload
        # Weights decided at run time (rollout steps, rollbacks, operators), by route name;
        # a route without an entry uses its configured weight.
        self.rollout_weights: dict[str, float] = {}
        self.rolled_back: frozenset[str] = frozenset()  # routes whose canary gets nothing
        self.flags = Flags()
        # Where state changes are announced (the event bus once the server wires it in).
        self.publish: Publish = _no_events
        self.auto_brownout: tuple[int, str] = (0, "")  # (level, cause) from the governor
        self.snapshot = Snapshot.build(adjust(config), None, wall())
        # Pools a reload replaced while requests were still running on them, until those
        # finish: what they carry is still load on the endpoints (see endpoint_families).
        self.draining: list[UpstreamPool] = []
        self._watch_breakers(self.snapshot)
        metrics.reload_result(True, self.snapshot.loaded_at)

    def draining_pools(self) -> list[UpstreamPool]:
        """The pools a reload replaced that still have requests in flight (the rest let go)."""
        self.draining = [pool for pool in self.draining if pool.in_flight]
        return self.draining

    def set_flags(self, flags: Flags) -> None:
        self.flags = flags
        self._apply_quarantine(self.snapshot)

    def _apply_quarantine(self, snapshot: Snapshot) -> None:
        targets = self.flags.quarantined
        for name, pool in snapshot.upstreams.items():
            pool.quarantined = name in targets
            for endpoint in pool.endpoints:
                endpoint.quarantined = f"{name}/{endpoint.url}" in targets

    def brownout(self) -> tuple[int, str]:
        """The brownout level in force and its cause: the higher of the operator's and the
        governor's."""
        manual = self.flags.brownout
        auto_level, auto_cause = self.auto_brownout
        if auto_level > manual:
            return auto_level, f"automatic: {auto_cause}"
        override = self.flags.brownout_override
        if manual and override is not None:
            return manual, f"{override.actor}: {override.reason}"
        return manual, "config" if manual else ""

    def weight(self, route: CompiledRoute) -> float:
        """The canary percentage in force for a route."""
        weight = self.rollout_weights.get(route.name)
        return route.weight if weight is None else weight

    def _watch_breakers(self, snapshot: Snapshot) -> None:
        for pool in snapshot.upstreams.values():
            pool.on_breaker = self._on_breaker

    def _on_breaker(self, pool: UpstreamPool, endpoint: Endpoint, change: Transition) -> None:
        self.metrics.record_breaker(pool.name, endpoint.url, change.new)
        level = logging.WARNING if change.new == "open" else logging.INFO
        log.log(
            level,
            "breaker %s %s: %s -> %s (%s)",
            pool.name,
            endpoint.url,
            change.old,
            change.new,
            change.reason,
        )
        self.publish(
            f"breaker.{change.new}",
            {"endpoint": endpoint.url, "from": change.old, "reason": change.reason},
            upstream=pool.name,
        )

    def reload(self) -> ReloadResult:
        """Load the file again; swap in the new snapshot only if it is entirely valid."""
        if self.config_path is None:
            return ReloadResult(False, ("no config file to reload from",))
        try:
            config = self.adjust(load(self.config_path))
        except ConfigError as exc:
            self.metrics.reload_result(False, self.wall())
            log.error("config reload rejected, keeping the running config:\n%s", exc)
            self.publish("config.reload_failed", {"errors": exc.errors[:20]})
            return ReloadResult(False, tuple(exc.errors))
        old = self.snapshot
        new_hash = config_hash(config)
        if new_hash == old.config_hash:
            self.metrics.reload_result(True, self.wall())
            return ReloadResult(True, changed=False, config_hash=new_hash)
        for field in ("listen", "admin"):
            if getattr(config, field) != getattr(old.config, field):
                log.warning("%s changed in the file; it takes effect at the next restart", field)
        new = Snapshot.build(config, old, self.wall())
        self._watch_breakers(new)
        self._apply_quarantine(new)
        self.snapshot = new
        self.draining = self.draining_pools() + old.upstreams.retire_unused(self.snapshot.upstreams)
        self.metrics.reload_result(True, self.snapshot.loaded_at)
        log.info("config reloaded (%s -> %s)", old.config_hash, new_hash)
        self.publish("config.reload_succeeded", {"from": old.config_hash, "to": new_hash})
        return ReloadResult(True, changed=True, config_hash=new_hash)
