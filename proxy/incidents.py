"""I/O shell of the incident flags: storage, audit, expiry, local-mode pick-up, auto brownout.

`FlagKeeper` owns the live `Flags` value. An operator change (admin API) is applied under the
state store's lock: the stored document is re-read first, so a change the CLI made in local
mode is never overwritten. The new document is then written, the change is appended to the
audit log, and the value is published to the runtime. A loop several times a second expires
due overrides. It also notices documents written by another process (`shaper ... --state-dir`
with or without a server running) and feeds the brownout governor its saturation readings.

`apply_flag_change()` is the same read-modify-write for the CLI's local mode, with no server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .config import AutoBrownout, Config, FlagDefaults
from .flags import BrownoutGovernor, FlagChange, Flags
from .periodic import Periodic
from .runtime import Runtime
from .state import AuditLog, DamagedState, StateStore, StoreBusy, locked_unless_busy

log = logging.getLogger("shaper.flags")

__all__ = ["FLAGS_KEY", "FlagKeeper", "apply_flag_change", "flags_from", "stored_flags"]

FLAGS_KEY = "flags"
_LATENCY_WINDOW = 10  # seconds of upstream latency the governor looks at


def flags_from(defaults: FlagDefaults, stored: dict[str, Any] | None) -> Flags:
    return Flags(
        default_safe_mode=defaults.safe_mode,
        default_brownout=defaults.brownout,
        default_quarantine=frozenset(t.rstrip("/") for t in defaults.quarantine),
    ).with_overrides_from(stored)


def stored_flags(
    store: StateStore,
    audit: AuditLog,
    defaults: FlagDefaults,
    now: float,
    known: Flags | None = None,
) -> tuple[Flags, dict[str, Any] | None]:
    """The flags in force from the store, for the server (call it under the store's lock).
    When the stored document is there but unreadable, it is set aside and replaced at once,
    and the audit entry of what that changed comes too. A running server rewrites the flags
    it holds (`known`: nothing changes). At start (none known), safe mode goes on: the
    overrides the document held are unknown, and one may have been a safe mode or a
    quarantine an incident still needs, so all traffic goes to the stable until an operator
    has looked."""
    try:
        return flags_from(defaults, store.get(FLAGS_KEY)), None
    except DamagedState as exc:
        kept = store.set_aside(FLAGS_KEY) or "?"
        damage = f"{exc.detail}; set aside as {kept}"
    if known is not None:
        log.error("flag state unreadable (%s); rewritten from the flags in force", damage)
        store.put(FLAGS_KEY, known.to_json())
        return known, None
    log.error("flag state unreadable (%s); safe mode on", damage)
    flags, change = flags_from(defaults, None).set_safe_mode(
        True, "shaper", f"flag state unreadable ({damage})", now
    )
    store.put(FLAGS_KEY, flags.to_json())
    return flags, audit.append(change.to_json())


def apply_flag_change(
    store: StateStore,
    audit: AuditLog,
    defaults: FlagDefaults,
    change: Callable[[Flags], tuple[Flags, FlagChange]],
    known: Flags | None = None,
) -> tuple[Flags, dict[str, Any], int]:
    """Read the stored flags, apply `change`, write them back and audit it, all under the
    store's lock; returns the new flags, the audit entry and the document's version as
    written (read under the lock, so a later write by another process is never mistaken
    for this one). ValueError from `change` (a refusal) leaves everything as it was.
    `known`: the flags a running server holds, which replace a damaged document; without
    them (the CLI's local mode) a damaged document raises DamagedState and is left alone,
    for the server, which knows what it held."""
    with store.locked():
        if known is None:
            current = flags_from(defaults, store.get(FLAGS_KEY))
        else:
            current, _ = stored_flags(store, audit, defaults, time.time(), known)
        new, flag_change = change(current)
        store.put(FLAGS_KEY, new.to_json())
        entry = audit.append(flag_change.to_json())
        version = store.version(FLAGS_KEY)
    return new, entry, version


def _governor(auto: AutoBrownout) -> BrownoutGovernor:
    return BrownoutGovernor(
        max_in_flight=auto.max_in_flight,
        latency_target=auto.latency_target,
        raise_after=auto.raise_after,
        lower_after=auto.lower_after,
    )


class FlagKeeper:
    def __init__(
        self,
        runtime: Runtime,
        store: StateStore,
        audit: AuditLog,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.audit = audit
        self.wall = wall
        config = runtime.snapshot.config
        self._auto = config.flags.auto_brownout
        self.governor = _governor(self._auto)
        self._busy = False  # the store's lock was held by another process at the last tick
        with locked_unless_busy(store) as busy:
            if busy is not None:  # at start, reading what the holder has written will do
                log.warning("%s; reading the flags without it", busy)
            # The version before the read: without the lock, a write landing in between is
            # then read again at the first tick, never marked seen unread.
            self._version = store.version(FLAGS_KEY)
            flags, damaged = stored_flags(store, audit, config.flags, wall())
            if damaged is not None:
                self._version = store.version(FLAGS_KEY)  # written anew from these
        self._publish(flags)
        if damaged is not None:
            self._announce(damaged)
        self._ticker = Periodic("flag keeper tick", self.tick, log)

    @property
    def flags(self) -> Flags:
        return self.runtime.flags

    def _publish(self, flags: Flags) -> None:
        self.runtime.set_flags(flags)

    def sync(self, config: Config) -> None:
        """After a reload: new YAML defaults under the same overrides; new governor limits."""
        self._publish(
            self.flags.with_defaults(
                config.flags.safe_mode,
                config.flags.brownout,
                frozenset(t.rstrip("/") for t in config.flags.quarantine),
            )
        )
        if config.flags.auto_brownout != self._auto:
            self._auto = config.flags.auto_brownout
            level, cause = self.governor.level, self.governor.cause
            self.governor = _governor(self._auto)
            self.governor.level, self.governor.cause = level, cause

    def change(self, change: Callable[[Flags], tuple[Flags, FlagChange]]) -> dict[str, Any]:
        """Apply an operator's change durably; returns the audit entry. ValueError: refused."""
        flags, entry, self._version = apply_flag_change(
            self.store, self.audit, self.runtime.snapshot.config.flags, change, self.flags
        )
        self._publish(flags)
        self._announce(entry)
        log.warning(
            "flag %s%s: %s -> %s by %s (%s)%s",
            entry["flag"],
            f" {entry['target']}" if entry["target"] else "",
            entry["before"],
            entry["after"],
            entry["actor"],
            entry["reason"],
            f", expires at {entry['expires']:.0f}" if entry.get("expires") else "",
        )
        return entry

    def _announce(self, entry: dict[str, Any]) -> None:
        """The event for an audited flag change."""
        flag = entry["flag"]
        if flag == "quarantine":
            event_type = "quarantine" if entry["after"] else "release"
        elif flag in ("brownout", "auto_brownout"):
            event_type = "brownout.level"
        else:
            event_type = "safe_mode"
        target = entry.get("target") or ""
        self.runtime.publish(
            event_type,
            {
                "change_id": entry["id"],
                "flag": flag,
                "target": target,
                "before": entry["before"],
                "after": entry["after"],
                "actor": entry["actor"],
                "reason": entry["reason"],
                "expires": entry.get("expires"),
            },
            upstream=target.split("/", 1)[0] or None,
        )

    def _announce_external(self, before: Flags, after: Flags) -> None:
        """Events for changes another process (the CLI in local mode) made; it wrote the
        audit entries itself."""
        changes: list[tuple[str, str, Any, Any, Any]] = []
        if before.safe_mode != after.safe_mode:
            changes.append(
                ("safe_mode", "", before.safe_mode, after.safe_mode, after.safe_mode_override)
            )
        if before.brownout != after.brownout:
            changes.append(
                ("brownout", "", before.brownout, after.brownout, after.brownout_override)
            )
        for target in sorted(before.quarantined ^ after.quarantined):
            on = target in after.quarantined
            override = after.quarantine_overrides.get(target) or before.quarantine_overrides.get(
                target
            )
            changes.append(("quarantine", target, not on, on, override))
        for flag, target, old, new, override in changes:
            self._announce(
                {
                    "id": "",
                    "flag": flag,
                    "target": target,
                    "before": old,
                    "after": new,
                    "actor": override.actor if override else "state store",
                    "reason": override.reason if override else "",
                    "expires": override.expires if override else None,
                }
            )

    def tick(self) -> None:
        """Pick up changes written by other processes, expire overrides, run the governor.
        A state store another process holds locked (a CLI in local mode, writing) or that
        fails delays the first two to a later tick; the governor runs whatever the disk
        does."""
        try:
            self._pick_up()
            self._expire()
        except StoreBusy as exc:
            if not self._busy:
                log.warning("%s; flag changes wait for it", exc)
            self._busy = True
        except OSError:
            log.exception("flag keeper: the state store failed; retrying")
        else:
            self._busy = False
        self._govern()

    def _pick_up(self) -> None:
        version = self.store.version(FLAGS_KEY)
        if version != self._version:
            config = self.runtime.snapshot.config
            before = self.flags
            with self.store.locked():
                after, _ = stored_flags(self.store, self.audit, config.flags, self.wall(), before)
                # Seen once read: a lock that cannot be had leaves it for the next tick.
                self._version = version
                if after is before:  # it was damaged, and is written anew from these
                    self._version = self.store.version(FLAGS_KEY)
            if after is not before:
                self._publish(after)
                log.warning("flags changed in the state store by another process; applied")
                self._announce_external(before, after)

    def _expire(self) -> None:
        now = self.wall()
        due = self.flags.next_expiry()
        if due is not None and due <= now:
            with self.store.locked():
                config = self.runtime.snapshot.config
                current, _ = stored_flags(self.store, self.audit, config.flags, now, self.flags)
                expired, changes = current.expire(now)
                if changes:
                    self.store.put(FLAGS_KEY, expired.to_json())
                    for change in changes:
                        self._announce(self.audit.append(change.to_json()))
                        log.warning(
                            "flag %s%s expired: back to %s",
                            change.flag,
                            f" {change.target}" if change.target else "",
                            change.after,
                        )
                self._version = self.store.version(FLAGS_KEY)
            self._publish(expired)

    def _govern(self) -> None:
        if self._auto.max_in_flight is None and self._auto.latency_target is None:
            return
        metrics = self.runtime.metrics
        now = metrics.clock()
        in_flight = {name: pool.in_flight for name, pool in self.runtime.snapshot.upstreams.items()}
        p99: dict[str, float | None] = {}
        for name in in_flight:
            window = metrics.upstream_windows.get(name)
            p99[name] = window.stats(now, _LATENCY_WINDOW).quantile(0.99) if window else None
        changed = self.governor.observe(now, in_flight, p99)
        if changed is not None:
            level, cause = changed
            before = self.runtime.auto_brownout[0]
            self.runtime.auto_brownout = (level, cause)
            self._announce(
                self.audit.append(
                    FlagChange(
                        "auto_brownout", "", "set", before, level, "governor", cause, self.wall()
                    ).to_json()
                )
            )
            log.warning("automatic brownout level %d -> %d: %s", before, level, cause)

    def start(self, interval: float = 0.25) -> None:
        self._ticker.start(interval)

    async def stop(self) -> None:
        await self._ticker.stop()
