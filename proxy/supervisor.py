"""I/O shell of rollout safety: runs each route's `RolloutController` once a second.

Each tick it reads, for every rollout, the whole seconds since the last tick from the golden
signal windows (requests, failures, requests slower than the latency SLO, and canary requests
diverted to the stable), evaluates the step gates, and lets the controller decide. Operator
actions from the admin API take the same path, so an operator's rollback and the analysis'
rollback look alike in the log.

A decision is in force on the data path at once (the weights are handed to the runtime, which
the forwarding path reads on the next request). Then, in this order:
1. the states are written to the state store, together with the decisions not yet in the audit
   log (`_unaudited` in the document);
2. the decisions are appended to the audit log (with their inputs and the config hash);
3. they are published as events (webhooks, chat).
So a crash never leaves an announced decision that the state does not hold: the state is the
truth. A crash between 1 and 2 leaves a decision saved but not audited; whoever writes the
document next (this process after a restart) finds its line missing, appends it and publishes
it then.

Deciding and saving happen under the store's lock, and the CLI's local mode decides under it
too, so each acts on the state the other saved: a CLI change can never be based on a state
older than a decision the proxy has taken. A local-mode write says which state it was based on
(`based_on`: that state's `updated`); when the proxy holds a newer state it could not save yet
(the disk failing), the write is refused (audited as `refuse`) instead of undoing that state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from .analysis import Analysis, AnalysisSettings, TickCounts
from .config import Config, Rollout
from .periodic import Periodic
from .rollout import (
    STATUSES,
    Decision,
    GateResult,
    OperatorAction,
    RolloutController,
    RolloutPlan,
    RolloutState,
    Step,
    held_state,
)
from .runtime import Runtime
from .state import AuditLog, DamagedState, StateStore, StoreBusy, locked_unless_busy, new_id

log = logging.getLogger("shaper.rollout")

__all__ = ["UNAUDITED", "PersistError", "Supervisor", "plan_for"]

_STATE_KEY = "rollouts"
# In the rollouts document, next to the states by route (a route name starts with a letter or
# digit): the decisions saved with their states and maybe not yet in the audit log.
UNAUDITED = "_unaudited"
_ENTRY_FIELDS = frozenset(
    [
        "id",
        "route",
        "action",
        "actor",
        "reason",
        "time",
        "status_after",
        "weight_before",
        "weight_after",
    ]
)
_VERDICT_CODE = {"inconclusive": 0, "healthy": 1, "rollback": 2, "incident": 3}


def plan_for(config: Config, route_name: str, rollout: Rollout) -> RolloutPlan:
    """The controller's view of one route's rollout config."""
    slo = rollout.slo
    quantile, latency = slo.latency.quantile if slo.latency else (0.99, None)
    return RolloutPlan(
        route=route_name,
        stable=rollout.stable,
        canary=rollout.canary,
        canary_endpoints=tuple(config.upstreams[rollout.canary].endpoints),
        weight=rollout.weight,
        steps=tuple(Step(s.weight, s.hold) for s in rollout.steps or ()),
        on_breach=rollout.on_breach,
        analysis=AnalysisSettings(
            alpha=slo.false_rollback_rate / 100.0,
            error_rate=slo.error_rate / 100.0 if slo.error_rate is not None else None,
            latency=latency,
            latency_quantile=quantile,
            min_requests=slo.min_requests,
        ),
    )


# How long the rollouts wait, a tick at a time, for the store's lock while another process
# holds it (a CLI in local mode mid-change), before deciding without it: a CLI suspended
# while holding it must not keep a bad canary from being rolled back.
BUSY_GRACE = 5.0


class PersistError(Exception):
    """An operator's decision took effect but could not be written to disk."""


@dataclass
class _Progress:
    """Per route: the last second already fed to the analysis, and canary requests per step."""

    last_second: int
    diverted_seen: int
    step: int = -1
    step_requests: int = 0


class Supervisor:
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
        self.controllers: dict[str, RolloutController] = {}
        self._progress: dict[str, _Progress] = {}
        self._ticker = Periodic("rollout supervisor tick", self.tick, log)
        self._version = -1
        self._unsaved = False
        self._pending: list[dict[str, Any]] = []  # decided, not yet in the audit log; in order
        self._in_doc: set[str] = set()  # ids of the decisions our last write saved unaudited
        self._moved: set[str] = set()  # old names of renamed routes, dropped at the next write
        self._handled: dict[str, float] = {}  # route: `updated` of the last external write seen
        self._busy_since: float | None = None  # another process holds the store's lock since
        self.sync()

    # -- config ------------------------------------------------------------------------------

    def sync(self) -> None:
        """Match controllers to the current config (start, reload): new routes get a saved or
        fresh state, changed plans are re-planned, removed routes are dropped."""
        with self._guarded(failing=False) as locked:
            # What the CLI changed meanwhile first (replanning would make it look stale);
            # a damaged document is left for `_sync` to set aside, and to say so.
            self._adopt_external(locked=False)
            self._sync(locked)
            self._hand_over()  # in force before any write: a rollback stays one without the lock
            try:
                self._publish()
            except StoreBusy:
                self._unsaved = True  # in force; the next tick that gets the lock saves it
            self._flush()

    def _sync(self, locked: bool) -> None:
        config = self.runtime.snapshot.config
        saved_all, lost = self._saved(locked)
        now = self.wall()
        wanted: dict[str, RolloutPlan] = {
            r.name: plan_for(config, r.name, r.rollout) for r in config.routes if r.rollout
        }
        orphans: dict[str, RolloutState] = {}  # states of routes the config no longer names
        for name in list(self.controllers):
            if name not in wanted:
                orphans[name] = self.controllers.pop(name).state
                self._progress.pop(name, None)
        for name, raw in saved_all.items():
            if name in wanted or name in orphans or not isinstance(raw, dict):
                continue
            if (state := RolloutState.from_json(raw)) is not None:
                orphans[name] = state
        renamed = {} if lost else self._renamed(wanted, saved_all, orphans)
        for name, plan in wanted.items():
            # Export the rollback counters at 0 from the start, so increase() sees the first.
            for reason in ("analysis", "operator"):
                self.runtime.metrics.rollbacks.setdefault((name, reason), 0)
            controller = self.controllers.get(name)
            if controller is not None and controller.plan.generation == plan.generation:
                controller.replan(plan, now)
                continue
            raw = saved_all.get(name)
            saved = RolloutState.from_json(raw) if isinstance(raw, dict) else None
            if controller is not None:
                saved = controller.state  # a new generation replaces the running one
            elif name in renamed:
                old = renamed[name]
                saved = replace(orphans[old], route=name)
                self._moved.add(old)
                self._decided(
                    Decision(
                        route=name,
                        action="rename",
                        actor="controller",
                        reason=(
                            f"carried over from route {old!r}, which the config no longer "
                            f"names: same stable, canary and endpoints (generation "
                            f"{plan.generation}); {saved.status} at {saved.weight:g}%"
                        ),
                        at=now,
                        status_before=saved.status,
                        status_after=saved.status,
                        weight_before=saved.weight,
                        weight_after=saved.weight,
                        inputs={"generation": plan.generation, "from_route": old},
                    )
                )
            elif lost or (raw is not None and saved is None):
                saved = held_state(plan, now, lost or "its saved state was unreadable")
                self._decided(
                    Decision(
                        route=name,
                        action="pause",
                        actor="controller",
                        reason=saved.reason,
                        at=now,
                        status_before="unknown",
                        status_after=saved.status,
                        weight_before=0.0,
                        weight_after=saved.weight,
                        inputs={"generation": plan.generation},
                    )
                )
            controller = self.controllers[name] = RolloutController(plan, saved, now)
            # Start with the second before now, so traffic in the very second the proxy (or a
            # new generation) starts is analysed too.
            self._progress[name] = _Progress(
                int(self.runtime.metrics.clock()) - 1, self.runtime.metrics.diverted.get(name, 0)
            )
            if saved is None or saved.generation != plan.generation:
                self._decided(
                    Decision(
                        route=name,
                        action="start",
                        actor="controller",
                        reason=controller.state.reason,
                        at=now,
                        status_before=saved.status if saved else "none",
                        status_after=controller.state.status,
                        weight_before=saved.weight if saved else 0.0,
                        weight_after=controller.weight,
                        inputs={"generation": plan.generation},
                    )
                )

    def _renamed(
        self,
        wanted: dict[str, RolloutPlan],
        saved_all: dict[str, Any],
        orphans: dict[str, RolloutState],
    ) -> dict[str, str]:
        """New route name: the old one whose state it takes over. A route with no state of
        its own (none running, none saved) takes that of a route the config no longer names
        with the same generation (a rename of `shop` to `shop-eu`), when exactly one such
        state and exactly one such route match: else a rolled-back canary would start afresh
        under its new name. Anything ambiguous starts afresh, as before."""
        olds: dict[str, list[str]] = {}
        for old, state in orphans.items():
            olds.setdefault(state.generation, []).append(old)
        news: dict[str, list[str]] = {}
        for name, plan in wanted.items():
            if name not in self.controllers and saved_all.get(name) is None:
                news.setdefault(plan.generation, []).append(name)
        return {
            names[0]: olds[generation][0]
            for generation, names in news.items()
            if len(names) == 1 and len(olds.get(generation, ())) == 1
        }

    def _saved(self, locked: bool = True) -> tuple[dict[str, Any], str]:
        """The saved states by route, and why they are lost when the document was there but
        unreadable: it is set aside (so nothing overwrites it), and the states held here are
        written anew at the next tick. Only under the store's lock (`locked`) is it set aside
        here: the CLI's local mode must not write between the read and the renaming; else
        the next write, which holds the lock, does it."""
        try:
            return self.store.get(_STATE_KEY) or {}, ""
        except DamagedState as exc:
            self._unsaved = True
            if not locked:
                return {}, str(exc)
            kept = self.store.set_aside(_STATE_KEY)
            log.error("%s; set aside as %s", exc, kept or "(gone already)")
            return {}, f"saved state unreadable ({exc.detail}; set aside as {kept or '?'})"

    def _publish(self) -> None:
        """Write every state, with the decisions not yet in the audit log (under the store's
        lock, after adopting any change another process made meanwhile), and hand the
        weights to the forwarding path."""
        with self.store.locked():
            self._adopt_external()
            saved = self._saved()[0]  # damaged: the states held here are written anew
            unaudited = self._settle(saved.pop(UNAUDITED, None))
            for old in self._moved:
                saved.pop(old, None)
            # Keep states of routes that a reload removed, so adding them back resumes them.
            saved.update({n: c.state.to_json() for n, c in self.controllers.items()})
            unaudited += [e for e in self._pending if e["action"] != "hold"]
            if unaudited:
                saved[UNAUDITED] = unaudited
            self.store.put(_STATE_KEY, saved)
            self._in_doc = {e["id"] for e in unaudited}
            self._moved.clear()
            self._version = self.store.version(_STATE_KEY)
            self._unsaved = False
        self._hand_over()

    def _settle(self, unaudited: Any) -> list[dict[str, Any]]:
        """The decisions another writer (this proxy before a restart, the CLI) saved with
        their states. One whose audit line is missing (the writer stopped before appending
        it) is appended now. Each is published again: its event may be what was missing,
        and the outbox keeps one event per id. Returns those still not appended."""
        if not isinstance(unaudited, list):
            return []
        foreign = [
            e
            for e in unaudited
            if isinstance(e, dict)
            and e.keys() >= _ENTRY_FIELDS
            and isinstance(e["id"], str)
            and e["id"] not in self._in_doc
        ]
        if not foreign:
            return []
        try:
            missing = {e["id"] for e in self.audit.missing(foreign)}
        except OSError:
            log.exception("cannot read the audit log; checking the saved decisions later")
            return foreign
        left: list[dict[str, Any]] = []
        for entry in foreign:
            if entry["id"] in missing:
                recovered = {
                    **entry,
                    "recovered": "saved with its state; the writer stopped before this line",
                }
                try:
                    if left:
                        raise OSError("an earlier one is not written yet")  # keep the order
                    self.audit.append(recovered)
                except OSError:
                    log.exception("cannot append decision %s to the audit log", entry["id"])
                    left.append(entry)
                    continue
                log.warning(
                    "rollout %s: decision %s (%s) was saved but not audited: appended now",
                    entry.get("route"),
                    entry["id"],
                    entry.get("action"),
                )
                entry = recovered
            self._announce(entry)
        return left

    def _flush(self) -> bool:
        """Append the decisions taken to the audit log, then publish them; True when all are.
        Only once the states they made are saved (else they wait: the state is the truth)."""
        if self._unsaved:
            return False
        while self._pending:
            entry = self._pending[0]
            try:
                self.audit.append(entry)
            except OSError:
                log.exception("rollout %s: cannot append to the audit log", entry["route"])
                return False
            del self._pending[0]
            self._announce(entry)
        return True

    def _announce(self, entry: dict[str, Any]) -> None:
        """Publish a decision as an event (not holds, refusals or the CLI's own changes)."""
        if entry["action"] in ("hold", "refuse") or entry.get("mode") == "local":
            return
        self.runtime.publish(
            f"rollout.{entry['action']}",
            {
                "decision_id": entry["id"],
                "actor": entry["actor"],
                "reason": entry["reason"],
                "status": entry["status_after"],
                "weight_before": entry["weight_before"],
                "weight_after": entry["weight_after"],
            },
            route=entry["route"],
            at=entry["time"],
            event_id="e" + entry["id"][1:],  # published again after a crash: stored once
        )

    def _hand_over(self) -> None:
        """Give the forwarding path the weights and rolled-back routes now in force."""
        self.runtime.rollout_weights = {n: c.weight for n, c in self.controllers.items()}
        self.runtime.rolled_back = frozenset(
            n for n, c in self.controllers.items() if c.state.status == "rolled_back"
        )

    def _adopt_external(self, locked: bool = True) -> bool:
        """Take over states that the CLI wrote in local mode; True when any changed.
        `locked`: whether the caller holds the store's lock."""
        version = self.store.version(_STATE_KEY)
        if version == self._version:
            return False
        self._version = version
        saved_all = self._saved(locked)[0]  # damaged: nothing to adopt; the next write replaces it
        changed = False
        for name, controller in self.controllers.items():
            raw = saved_all.get(name)
            saved = RolloutState.from_json(raw) if isinstance(raw, dict) else None
            if (
                saved is None
                or saved.generation != controller.plan.generation
                or saved == controller.state
                or self._handled.get(name) == saved.updated
            ):
                continue
            based_on = raw.get("based_on") if isinstance(raw, dict) else None
            if based_on is None and self._unsaved:
                continue  # our own older write: the state held here is newer, not saved yet
            self._handled[name] = saved.updated
            if based_on is not None and based_on != controller.state.updated:
                self._refuse(controller, saved)
                continue
            log.warning(
                "rollout %s: state changed in the state store by another process: %s at %g%%",
                name,
                saved.status,
                saved.weight,
            )
            if saved.status == "progressing" and controller.state.status != "progressing":
                controller.analysis = Analysis(controller.plan.analysis)  # a retry
            controller.state = saved
            changed = True
        if changed:
            self._hand_over()
        return changed

    def _refuse(self, controller: RolloutController, change: RolloutState) -> None:
        """A local-mode write based on a state this proxy has changed since (and could not
        save yet): it is not adopted, and the state held here is written over it."""
        state = controller.state
        log.warning(
            "rollout %s: refused a change by another process (%s at %g%%): it was based on a "
            "state the proxy has changed since (%s at %g%%)",
            state.route,
            change.status,
            change.weight,
            state.status,
            state.weight,
        )
        self._decided(
            Decision(
                route=state.route,
                action="refuse",
                actor="controller",
                reason=(
                    f"refused a change by another process ({change.status} at "
                    f"{change.weight:g}%, {change.reason!r}): the proxy changed the rollout "
                    "meanwhile"
                ),
                at=self.wall(),
                status_before=state.status,
                status_after=state.status,
                weight_before=state.weight,
                weight_after=state.weight,
                inputs={"refused": change.to_json()},
            )
        )

    def _latency_inputs(self, route: str) -> dict[str, Any]:
        """p50/p95/p99 per variant over the last minute, for the audit log."""
        metrics = self.runtime.metrics
        now = metrics.clock()
        out: dict[str, Any] = {}
        for variant in ("stable", "canary"):
            window = metrics.windows.get((route, variant))
            stats = window.stats(now, 60) if window else None
            out[variant] = {
                f"p{int(q * 100)}_ms": (
                    None
                    if stats is None or (value := stats.quantile(q)) is None
                    else round(value * 1000, 3)
                )
                for q in (0.5, 0.95, 0.99)
            }
        return out

    def _decided(self, decision: Decision) -> dict[str, Any]:
        """Take a decision: logged and counted now, queued for the audit log and the events,
        which follow once the state it made is saved. Returns its audit entry."""
        entry = decision.to_json()
        entry["id"] = new_id("d", decision.at)
        entry["config_hash"] = self.runtime.snapshot.config_hash
        if decision.route in self.controllers:
            entry["inputs"] = {
                **entry["inputs"],
                "latency_ms": self._latency_inputs(decision.route),
            }
        level = logging.WARNING if decision.action in ("rollback", "pause") else logging.INFO
        log.log(
            level,
            "rollout %s: %s by %s (%s -> %s, weight %g -> %g): %s",
            decision.route,
            decision.action,
            decision.actor,
            decision.status_before,
            decision.status_after,
            decision.weight_before,
            decision.weight_after,
            decision.reason,
        )
        if decision.action == "rollback":
            self.runtime.metrics.record_rollback(
                decision.route, "analysis" if decision.actor == "analysis" else "operator"
            )
        self._pending.append(entry)
        if decision.action != "hold":
            self._unsaved = True
        return entry

    # -- ticking -----------------------------------------------------------------------------

    def _counts(self, name: str, controller: RolloutController) -> TickCounts:
        metrics = self.runtime.metrics
        progress = self._progress[name]
        current = int(metrics.clock()) - 1  # only whole seconds
        first = progress.last_second + 1
        progress.last_second = max(progress.last_second, current)
        latency = controller.plan.analysis.latency
        counts: dict[str, int] = {}
        for variant in ("canary", "stable"):
            window = metrics.windows.get((name, variant))
            if window is None or current < first:
                counts.update({f"{variant}_n": 0, f"{variant}_f": 0, f"{variant}_s": 0})
                continue
            stats = window.between(first, current)
            counts[f"{variant}_n"] = stats.requests
            counts[f"{variant}_f"] = stats.errors
            counts[f"{variant}_s"] = stats.count_over(latency) if latency else 0
        diverted_total = metrics.diverted.get(name, 0)
        diverted = diverted_total - progress.diverted_seen
        progress.diverted_seen = diverted_total
        # Diverted requests were answered by the stable (and counted there), but for the
        # analysis each is a canary request that failed.
        return TickCounts(
            canary_requests=counts["canary_n"] + diverted,
            canary_failures=counts["canary_f"] + diverted,
            canary_slow=counts["canary_s"],
            stable_requests=counts["stable_n"],
            stable_failures=counts["stable_f"],
            stable_slow=counts["stable_s"],
            diverted=diverted,
        )

    def gates(self, name: str, controller: RolloutController) -> tuple[GateResult, ...]:
        """The step gates of one rollout, as of now."""
        snapshot = self.runtime.snapshot
        route = next((r for r in snapshot.config.routes if r.name == name), None)
        if route is None or route.rollout is None:
            return ()
        gates_cfg = route.rollout.gates
        results: list[GateResult] = []
        now = self.runtime.metrics.clock()
        if gates_cfg.canary_healthy:
            pool = snapshot.upstreams[controller.plan.canary]
            bad = [
                f"{e.url} {'unhealthy' if not e.health.healthy else 'breaker ' + e.breaker.state}"
                for e in pool.endpoints
                if not e.health.healthy or e.breaker.state != "closed"
            ]
            results.append(
                GateResult(
                    "canary_healthy",
                    not bad,
                    "; ".join(bad) if bad else f"{len(pool.endpoints)} endpoint(s) in rotation",
                )
            )
        error_budget = controller.plan.analysis.error_rate
        if gates_cfg.max_stable_burn_rate is not None and error_budget:
            window = self.runtime.metrics.windows.get((name, "stable"))
            burns = []
            for seconds in gates_cfg.burn_windows:
                # counts only: the gate is read every tick, and merging minutes of latency
                # histograms for nothing cost about a millisecond of event-loop time
                requests, errors = window.counts(now, int(seconds)) if window else (0, 0)
                burns.append((errors / requests if requests else 0.0) / error_budget)
            limit = gates_cfg.max_stable_burn_rate
            burning = all(b > limit for b in burns)
            shown = ", ".join(
                f"{b:.1f}x over {s:g}s" for b, s in zip(burns, gates_cfg.burn_windows, strict=True)
            )
            results.append(
                GateResult(
                    "stable_burn_rate",
                    not burning,
                    f"stable burns its error budget at {shown} (limit {limit:g}x)",
                )
            )
        needed = gates_cfg.min_requests or controller.plan.analysis.min_requests
        progress = self._progress[name]
        results.append(
            GateResult(
                "min_requests",
                progress.step_requests >= needed,
                f"{progress.step_requests} of {needed} canary requests in this step",
            )
        )
        return tuple(results)

    def tick(self) -> list[Decision]:
        """One round over every rollout; returns the decisions taken.

        A decision takes effect on the data path at once (the weights are handed over before
        any disk I/O); the saved state, then the audit entry and the event follow. Deciding
        and saving are done under the store's lock, so that the CLI's local mode never acts
        on a state older than what is decided here. If the disk fails, the rollouts are
        still decided (without the lock), the save is retried every tick until it succeeds,
        and a failing route never stops the others."""
        taken: list[Decision] = []
        now = self.wall()
        frozen = self.runtime.flags.safe_mode
        with self._guarded() as locked:
            busy = self._busy_since
            if not locked and busy is not None and self.runtime.metrics.clock() - busy < BUSY_GRACE:
                return []  # the other process is mid-change: decide next tick, on what it wrote
            try:
                self._adopt_external(locked)
            except OSError:
                log.exception("cannot read the rollout state store")
            for name, controller in self.controllers.items():
                try:
                    decisions = self._tick_one(name, controller, now, frozen)
                except Exception:
                    log.exception("rollout %s: tick failed", name)
                    continue
                taken += decisions
                for decision in decisions:
                    self._decided(decision)
                if any(d.action != "hold" for d in decisions):
                    self._hand_over()
            if self._unsaved:
                try:
                    self._publish()
                except StoreBusy:
                    pass  # said when it began; saved at the first tick that gets the lock
                except OSError:
                    log.exception("cannot save rollout states; retrying next tick")
            self._flush()
        return taken

    @contextlib.contextmanager
    def _guarded(self, failing: bool = True) -> Iterator[bool]:
        """The store's lock (True), or none when it cannot be had (False): with the disk
        failing (`failing`: else that raises), or another process holding the lock past the
        store's wait, rollouts are still decided, and what is decided is in force."""
        stack = contextlib.ExitStack()
        try:
            busy = stack.enter_context(locked_unless_busy(self.store))
        except OSError:
            if not failing:
                raise
            log.exception("cannot lock the rollout state store")
            locked = False
        else:
            locked = busy is None
            if busy is not None and self._busy_since is None:
                self._busy_since = self.runtime.metrics.clock()
                log.warning(
                    "%s; rollouts wait for it up to %gs, then decide without it", busy, BUSY_GRACE
                )
            elif busy is None and self._busy_since is not None:
                log.warning("the state store's lock is free again")
                self._busy_since = None
        with stack:
            yield locked

    def _tick_one(
        self, name: str, controller: RolloutController, now: float, frozen: bool
    ) -> list[Decision]:
        counts = self._counts(name, controller)
        if frozen:
            # Safe mode: every rollout frozen (all traffic is on stable anyway); the seconds
            # are consumed so nothing stale is judged when it ends.
            return []
        progress = self._progress[name]
        if progress.step != controller.state.step or controller.state.status != "progressing":
            progress.step = (
                controller.state.step if controller.state.status == "progressing" else -1
            )
            progress.step_requests = 0
        # Diverted requests already failed; they are no progress towards a step.
        progress.step_requests += counts.canary_requests - counts.diverted
        return controller.tick(now, counts, self.gates(name, controller))

    def start(self, interval: float = 1.0) -> None:
        self._ticker.start(interval)

    async def stop(self) -> None:
        await self._ticker.stop()

    # -- operators ---------------------------------------------------------------------------

    def act(
        self,
        name: str,
        action: OperatorAction,
        actor: str,
        reason: str,
        weight: float | None = None,
    ) -> dict[str, Any]:
        """An operator's action; KeyError for an unknown route, ValueError when refused.
        Decided under the store's lock, on the state as the CLI's local mode left it."""
        controller = self.controllers[name]
        with self._guarded() as locked:
            try:
                self._adopt_external(locked)
            except OSError:
                log.exception("cannot read the rollout state store")
            decision = controller.operator(action, self.wall(), actor, reason, weight)
            entry = self._decided(decision)
            self._hand_over()  # in force before any I/O
            try:
                self._publish()
            except OSError as exc:
                raise PersistError(
                    f"{action} is in force but could not be saved ({exc}); it is retried every "
                    "second and lost if the proxy restarts first"
                ) from exc
            if not self._flush():
                raise PersistError(
                    f"{action} is in force and saved, but its audit entry could not be written; "
                    "it is retried every second"
                )
        return entry

    # -- reading -----------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        controller = self.controllers[name]
        plan = controller.plan
        state = controller.state
        verdict = controller.verdict
        return {
            **state.to_json(),
            "stable": plan.stable,
            "canary": plan.canary,
            "steps": [{"weight": s.weight, "hold": s.hold} for s in plan.steps],
            "on_breach": plan.on_breach,
            "verdict": verdict.kind if verdict else "inconclusive",
            "verdict_reason": verdict.reason if verdict else "no data yet",
            "verdict_inputs": verdict.inputs if verdict else {},
            "gates": [
                {"name": g.name, "passed": g.passed, "reason": g.reason}
                for g in self.gates(name, controller)
            ],
        }

    def metric_families(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "shaper_rollout_weight", "Percent of traffic sent to the canary now.", labels=["route"]
        )
        status = GaugeMetricFamily(
            "shaper_rollout_status",
            "1 for the rollout's current status, 0 for the others.",
            labels=["route", "status"],
        )
        verdict = GaugeMetricFamily(
            "shaper_analysis_verdict",
            "Latest analysis verdict: 0 inconclusive, 1 healthy, 2 rollback, 3 incident.",
            labels=["route"],
        )
        for name, controller in sorted(self.controllers.items()):
            weight.add_metric([name], controller.weight)
            for s in STATUSES:
                status.add_metric([name, s], 1.0 if controller.state.status == s else 0.0)
            kind = controller.verdict.kind if controller.verdict else "inconclusive"
            verdict.add_metric([name], _VERDICT_CODE[kind])
        yield weight
        yield status
        yield verdict
