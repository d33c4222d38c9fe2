"""Runtime flags for incidents: safe mode, brownout and quarantine, with expiry. Pure.

`Flags` is an immutable value: the YAML defaults plus the runtime overrides operators set,
each carrying who set it, why, and when it expires. Every change returns a new `Flags` and the
`FlagChange` that describes it (for the audit log and events); `expire(now)` drops overrides
whose time has come, so each reverts to the YAML value by itself. `to_json`/`from_json` are
the state-store form, so flags survive restarts and can be set with no server running.

`BrownoutGovernor` raises and lowers the automatic brownout level from saturation readings
(in-flight requests and recent upstream latency), with hysteresis so it does not flap.

`effective_priority()` is the request-side rule: a request may lower its route's priority with
`X-Request-Priority`, never raise it; `sheds()` says whether a level sheds a priority.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .config import parse_duration

__all__ = [
    "MAX_TTL",
    "BrownoutGovernor",
    "FlagChange",
    "Flags",
    "Override",
    "Priority",
    "effective_priority",
    "parse_ttl",
    "sheds",
]

MAX_TTL = 8784 * 3600.0  # 366 days: past that a ttl is a typo, or "never" (no ttl)

Priority = Literal["critical", "default", "sheddable"]
_RANK: dict[str, int] = {"critical": 0, "default": 1, "sheddable": 2}


def effective_priority(route_priority: Priority, header: str | None) -> Priority:
    """The route's priority, lowered (never raised) by the request's X-Request-Priority."""
    if header:
        wanted = header.strip().lower()
        if wanted in _RANK and _RANK[wanted] > _RANK[route_priority]:
            return wanted  # type: ignore[return-value]  # checked against _RANK
    return route_priority


def parse_ttl(raw: object) -> float | None:
    """An override's time to live, from the API or the CLI: None (or empty, or 0) for none;
    otherwise a duration of at most MAX_TTL (an expiry a clock, a browser or a date format can
    still show), or ValueError saying what is wrong."""
    if raw is None or raw == "" or (raw == 0 and not isinstance(raw, bool)):
        return None
    ttl = parse_duration(raw)
    if ttl > MAX_TTL:
        raise ValueError(
            f"must be at most {MAX_TTL / 3600:.0f}h (366 days), got {raw!r}; "
            "leave it out for an override that does not expire"
        )
    return ttl or None


def sheds(level: int, priority: Priority) -> bool:
    """Level 1 sheds sheddable traffic, level 2 also default; critical is never shed."""
    return (level >= 1 and priority == "sheddable") or (level >= 2 and priority == "default")


@dataclass(frozen=True)
class Override:
    """A runtime value set by an operator, until `expires` (unix time) or forever (None)."""

    value: Any
    actor: str
    reason: str
    set_at: float
    expires: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "actor": self.actor,
            "reason": self.reason,
            "set_at": self.set_at,
            "expires": self.expires,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Override | None:
        if not isinstance(raw, dict):
            return None
        try:
            expires = raw.get("expires")
            return cls(
                value=raw["value"],
                actor=str(raw.get("actor", "")),
                reason=str(raw.get("reason", "")),
                set_at=float(raw.get("set_at", 0.0)),
                expires=None if expires is None else float(expires),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class FlagChange:
    """One change of a flag, for the audit log, events and the caller's answer."""

    flag: str  # "safe_mode", "brownout", "quarantine"
    target: str  # "" or the quarantined upstream[/endpoint]
    action: str  # "set", "clear", "expired"
    before: Any
    after: Any
    actor: str
    reason: str
    at: float
    expires: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "flag",
            "flag": self.flag,
            "target": self.target,
            "action": self.action,
            "before": self.before,
            "after": self.after,
            "actor": self.actor,
            "reason": self.reason,
            "time": self.at,
            "expires": self.expires,
        }


@dataclass(frozen=True)
class Flags:
    """YAML defaults and runtime overrides. The effective values: `safe_mode` and `brownout`,
    worked out once when the flags are made (every request reads them), and `quarantined`."""

    default_safe_mode: bool = False
    default_brownout: int = 0
    default_quarantine: frozenset[str] = frozenset()
    safe_mode_override: Override | None = None
    brownout_override: Override | None = None
    # target -> Override(value=True: quarantined, False: released although the YAML lists it)
    quarantine_overrides: dict[str, Override] = field(default_factory=dict)
    safe_mode: bool = field(init=False, repr=False, compare=False)
    brownout: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        safe_mode, brownout = self.safe_mode_override, self.brownout_override
        object.__setattr__(
            self,
            "safe_mode",
            self.default_safe_mode if safe_mode is None else bool(safe_mode.value),
        )
        object.__setattr__(
            self, "brownout", self.default_brownout if brownout is None else int(brownout.value)
        )

    @property
    def quarantined(self) -> frozenset[str]:
        targets = set(self.default_quarantine)
        for target, override in self.quarantine_overrides.items():
            if override.value:
                targets.add(target)
            else:
                targets.discard(target)
        return frozenset(targets)

    def holds(self, target: str) -> bool:
        """Whether `target` is quarantined or has an override. Such a target may be released
        (or answered "not quarantined") even when a reload removed it from the config: else
        its quarantine could never end, and would come back with it."""
        return target in self.quarantined or target in self.quarantine_overrides

    def with_defaults(self, safe_mode: bool, brownout: int, quarantine: frozenset[str]) -> Flags:
        """The same overrides over new YAML defaults (after a reload)."""
        return replace(
            self,
            default_safe_mode=safe_mode,
            default_brownout=brownout,
            default_quarantine=quarantine,
        )

    # -- changes -----------------------------------------------------------------------------

    def set_safe_mode(
        self, enabled: bool, actor: str, reason: str, now: float, ttl: float | None = None
    ) -> tuple[Flags, FlagChange]:
        expires = now + ttl if ttl else None
        before = self.safe_mode
        override: Override | None = Override(enabled, actor, reason, now, expires)
        if enabled == self.default_safe_mode and expires is None:
            override = None  # back to the YAML value: nothing to remember
        new = replace(self, safe_mode_override=override)
        action = "set" if enabled else "clear"
        return new, FlagChange(
            "safe_mode", "", action, before, enabled, actor, reason, now, expires
        )

    def set_brownout(
        self, level: int, actor: str, reason: str, now: float, ttl: float | None = None
    ) -> tuple[Flags, FlagChange]:
        if level not in (0, 1, 2):
            raise ValueError("brownout level must be 0, 1 or 2")
        expires = now + ttl if ttl else None
        before = self.brownout
        override: Override | None = Override(level, actor, reason, now, expires)
        if level == self.default_brownout and expires is None:
            override = None
        new = replace(self, brownout_override=override)
        return new, FlagChange(
            "brownout", "", "set" if level else "clear", before, level, actor, reason, now, expires
        )

    def set_quarantine(
        self,
        target: str,
        quarantined: bool,
        actor: str,
        reason: str,
        now: float,
        ttl: float | None = None,
    ) -> tuple[Flags, FlagChange]:
        before = target in self.quarantined
        if quarantined == before:
            state = "quarantined" if before else "not quarantined"
            raise ValueError(f"{target} is already {state}")
        expires = now + ttl if ttl and quarantined else None
        overrides = dict(self.quarantine_overrides)
        if not quarantined and target not in self.default_quarantine:
            overrides.pop(target, None)  # back to the YAML default: nothing to remember
        else:
            overrides[target] = Override(quarantined, actor, reason, now, expires)
        new = replace(self, quarantine_overrides=overrides)
        action = "set" if quarantined else "clear"
        return new, FlagChange(
            "quarantine", target, action, before, quarantined, actor, reason, now, expires
        )

    def expire(self, now: float) -> tuple[Flags, list[FlagChange]]:
        """Drop every override whose expiry has passed; each reverts to its YAML default."""
        changes: list[FlagChange] = []
        new = self

        def due(override: Override | None) -> bool:
            return override is not None and override.expires is not None and override.expires <= now

        if due(new.safe_mode_override):
            before = new.safe_mode
            new = replace(new, safe_mode_override=None)
            changes.append(
                _expired("safe_mode", "", before, new.safe_mode, now, self.safe_mode_override)
            )
        if due(new.brownout_override):
            before_level = new.brownout
            new = replace(new, brownout_override=None)
            changes.append(
                _expired("brownout", "", before_level, new.brownout, now, self.brownout_override)
            )
        expired = [t for t, o in new.quarantine_overrides.items() if due(o)]
        if expired:
            overrides = dict(new.quarantine_overrides)
            for target in expired:
                before_q = target in new.quarantined
                old = overrides.pop(target)
                after = target in self.default_quarantine
                changes.append(_expired("quarantine", target, before_q, after, now, old))
            new = replace(new, quarantine_overrides=overrides)
        return new, changes

    def next_expiry(self) -> float | None:
        times = [
            o.expires
            for o in (
                self.safe_mode_override,
                self.brownout_override,
                *self.quarantine_overrides.values(),
            )
            if o is not None and o.expires is not None
        ]
        return min(times) if times else None

    # -- storage -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "safe_mode": self.safe_mode_override.to_json() if self.safe_mode_override else None,
            "brownout": self.brownout_override.to_json() if self.brownout_override else None,
            "quarantine": {t: o.to_json() for t, o in sorted(self.quarantine_overrides.items())},
        }

    def with_overrides_from(self, raw: dict[str, Any] | None) -> Flags:
        """These defaults with the overrides of a stored document (unknown parts ignored)."""
        raw = raw or {}
        quarantine_raw = raw.get("quarantine")
        overrides: dict[str, Override] = {}
        if isinstance(quarantine_raw, dict):
            for target, value in quarantine_raw.items():
                override = Override.from_json(value)
                if override is not None:
                    overrides[str(target)] = override
        safe = Override.from_json(raw.get("safe_mode"))
        brownout = Override.from_json(raw.get("brownout"))
        if brownout is not None and brownout.value not in (0, 1, 2):
            brownout = None
        return replace(
            self,
            safe_mode_override=safe,
            brownout_override=brownout,
            quarantine_overrides=overrides,
        )

    def describe(self) -> dict[str, Any]:
        """The effective values with who set them and until when (API and CLI)."""

        def meta(override: Override | None) -> dict[str, Any] | None:
            return None if override is None else override.to_json()

        return {
            "safe_mode": {"enabled": self.safe_mode, "override": meta(self.safe_mode_override)},
            "brownout": {"level": self.brownout, "override": meta(self.brownout_override)},
            "quarantine": [
                {
                    "target": target,
                    "override": meta(self.quarantine_overrides.get(target)),
                    "from_config": target in self.default_quarantine,
                }
                for target in sorted(self.quarantined)
            ],
        }


def _expired(
    flag: str, target: str, before: Any, after: Any, now: float, old: Override | None
) -> FlagChange:
    reason = f"expired (set by {old.actor}: {old.reason})" if old else "expired"
    return FlagChange(flag, target, "expired", before, after, "expiry", reason, now, None)


@dataclass
class BrownoutGovernor:
    """Automatic brownout from saturation, with hysteresis.

    Saturated when any upstream has more than `max_in_flight` requests in flight, or its
    recent p99 latency is over `latency_target`. The level rises by one after `raise_after`
    seconds of saturation and falls by one after `lower_after` seconds below `relief` times
    the limits (0.8: 20% headroom), so a load hovering at the limit does not flap."""

    max_in_flight: int | None = None
    latency_target: float | None = None
    raise_after: float = 5.0
    lower_after: float = 30.0
    relief: float = 0.8
    level: int = 0
    cause: str = ""
    _since: float | None = None  # when the current saturated / relieved streak began
    _saturated: bool = False

    def observe(
        self, now: float, in_flight: dict[str, int], p99: dict[str, float | None]
    ) -> tuple[int, str] | None:
        """Feed one reading; returns (new level, cause) when the level changed."""
        over: list[str] = []
        calm = True
        for name, count in sorted(in_flight.items()):
            if self.max_in_flight is not None:
                if count > self.max_in_flight:
                    over.append(f"{name}: {count} in flight > {self.max_in_flight}")
                if count > self.max_in_flight * self.relief:
                    calm = False
        for name, latency in sorted(p99.items()):
            if self.latency_target is not None and latency is not None:
                if latency > self.latency_target:
                    over.append(
                        f"{name}: p99 {latency * 1000:.0f}ms > {self.latency_target * 1000:.0f}ms"
                    )
                if latency > self.latency_target * self.relief:
                    calm = False
        saturated = bool(over)
        if saturated != self._saturated or self._since is None:
            self._saturated = saturated
            self._since = now
        if saturated and self.level < 2 and now - self._since >= self.raise_after:
            self.level += 1
            self.cause = "; ".join(over)
            self._since = now
            return self.level, self.cause
        if not saturated and calm and self.level > 0 and now - self._since >= self.lower_after:
            self.level -= 1
            self.cause = "saturation relieved" if self.level == 0 else self.cause
            self._since = now
            return self.level, self.cause
        if not saturated and not calm:
            # In the hysteresis band: neither raise nor count towards lowering; the calm
            # streak starts again at the next calm reading.
            self._since = None
        return None
