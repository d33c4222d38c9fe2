"""Rollout control: status, weight and steps of one route's rollout, decided once a tick.

Pure-ish: `RolloutController` holds a state and an `Analysis`, takes the current time and the
tick's counts and gate results as arguments, and returns `Decision`s; it never reads a clock,
a socket or a file. The I/O shell (rollouts.RolloutManager) persists the state after every
decision, appends decisions to the audit log and publishes them.

Statuses:
    progressing  walking the steps (or holding a fixed weight) with the analysis watching
    paused       weight frozen, no automatic step; the analysis can still roll back;
                 resume goes on from the same step (from 0% with the step's weight).
                 A pause the analysis made for an incident (both versions over the SLO)
                 resumes by itself once the verdict has been healthy for
                 INCIDENT_CLEARED seconds; any other decision (an operator's pause among
                 them) makes the pause an ordinary one
    rolled_back  canary weight 0 until an operator retries or the config names a new canary
                 (a rename of the route keeps it)
    promoted     the canary takes all traffic
A rollout is identified by its generation (stable, canary and the canary's endpoints): a
config that names a different canary starts a new generation from the first step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .analysis import Analysis, AnalysisSettings, TickCounts, Verdict

__all__ = [
    "INCIDENT_CLEARED",
    "Decision",
    "GateResult",
    "OperatorAction",
    "RolloutController",
    "RolloutPlan",
    "RolloutState",
    "Step",
    "held_state",
]

RolloutStatus = Literal["progressing", "paused", "rolled_back", "promoted"]
OperatorAction = Literal["pause", "resume", "promote", "rollback", "retry", "set_weight"]
STATUSES: tuple[RolloutStatus, ...] = ("progressing", "paused", "rolled_back", "promoted")
# How long the verdict must stay healthy after an incident before its pause ends by itself.
INCIDENT_CLEARED = 30.0


@dataclass(frozen=True, slots=True)
class Step:
    weight: float
    hold: float  # seconds


@dataclass(frozen=True)
class RolloutPlan:
    """What the config asks for one route."""

    route: str
    stable: str
    canary: str
    canary_endpoints: tuple[str, ...]
    weight: float  # the fixed weight, when there are no steps
    steps: tuple[Step, ...]
    on_breach: Literal["rollback", "pause"]
    analysis: AnalysisSettings

    @property
    def generation(self) -> str:
        """Which release this is: the two upstream names and the canary's endpoints, order
        and trailing slashes aside (reformatting the list is not a new release)."""
        endpoints = sorted({e.rstrip("/").lower() for e in self.canary_endpoints})
        text = f"{self.stable}|{self.canary}|{','.join(endpoints)}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def weight_at(self, step: int) -> float:
        """The weight the file asks for at `step` (the fixed weight when there are no steps)."""
        return self.steps[min(step, len(self.steps) - 1)].weight if self.steps else self.weight

    def initial_weight(self) -> float:
        return self.steps[0].weight if self.steps else self.weight


@dataclass(frozen=True)
class RolloutState:
    """What survives restarts and reloads for one route."""

    route: str
    generation: str
    status: RolloutStatus
    weight: float
    step: int = 0
    step_started: float = 0.0
    reason: str = ""
    config_weight: float = 0.0  # the weight the file asked for when last applied
    updated: float = 0.0
    auto_resume: bool = False  # paused by the analysis for an incident: ends by itself

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "generation": self.generation,
            "status": self.status,
            "weight": self.weight,
            "step": self.step,
            "step_started": self.step_started,
            "reason": self.reason,
            "config_weight": self.config_weight,
            "updated": self.updated,
            "auto_resume": self.auto_resume,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RolloutState | None:
        try:
            status = raw["status"]
            if status not in STATUSES:
                return None
            return cls(
                route=str(raw["route"]),
                generation=str(raw["generation"]),
                status=status,
                weight=float(raw["weight"]),
                step=int(raw.get("step", 0)),
                step_started=float(raw.get("step_started", 0.0)),
                reason=str(raw.get("reason", "")),
                config_weight=float(raw.get("config_weight", 0.0)),
                updated=float(raw.get("updated", 0.0)),
                auto_resume=raw.get("auto_resume", False) is True and status == "paused",
            )
        except (KeyError, TypeError, ValueError):
            return None


def held_state(plan: RolloutPlan, now: float, lost: str) -> RolloutState:
    """Where a rollout starts when its saved state was there but unreadable (`lost` says
    why): paused with the canary at 0%. A fresh start would forget a rollback, and give a
    canary that was stopped for being bad its traffic back."""
    return RolloutState(
        route=plan.route,
        generation=plan.generation,
        status="paused",
        weight=0.0,
        step=0,
        step_started=now,
        reason=f"{lost}: held at the stable; resume or retry starts the schedule over",
        config_weight=plan.initial_weight(),
        updated=now,
    )


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    """One decision, automatic or an operator's, with everything that led to it."""

    route: str
    action: str
    actor: str
    reason: str
    at: float
    status_before: str
    status_after: str
    weight_before: float
    weight_after: float
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "decision",
            "route": self.route,
            "action": self.action,
            "actor": self.actor,
            "reason": self.reason,
            "time": self.at,
            "status_before": self.status_before,
            "status_after": self.status_after,
            "weight_before": self.weight_before,
            "weight_after": self.weight_after,
            "inputs": self.inputs,
        }


class RolloutController:
    """Decides for one route; feed it `tick()` once a second."""

    def __init__(self, plan: RolloutPlan, saved: RolloutState | None, now: float) -> None:
        self.plan = plan
        self.analysis = Analysis(plan.analysis)
        self.verdict: Verdict | None = None
        self.gates: tuple[GateResult, ...] = ()
        self._last_hold_reason = ""
        self._cleared_since: float | None = None  # healthy since, while paused for an incident
        if saved is not None and saved.generation == plan.generation:
            self.state = saved
            self.replan(plan, saved.updated)
        else:
            self.state = RolloutState(
                route=plan.route,
                generation=plan.generation,
                status="progressing",
                weight=plan.initial_weight(),
                step=0,
                step_started=now,
                reason="new rollout generation" if saved else "rollout started",
                config_weight=plan.initial_weight(),
                updated=now,
            )

    def replan(self, plan: RolloutPlan, now: float) -> None:
        """A reload with the same generation: keep the state and the analysis' evidence."""
        state = self.state
        old = self.plan
        if plan.analysis != old.analysis:
            self.analysis = Analysis(plan.analysis)  # new SLO: evidence starts again
        self.plan = plan
        if plan.steps and state.step >= len(plan.steps):
            state = replace(state, step=len(plan.steps) - 1, updated=now)
        # What the file asks for now; `config_weight` remembers what it asked for when last
        # applied, so an operator's set-weight survives reloads of an unchanged file, and an
        # edit of the file (a new fixed weight, steps added or removed, the current step's
        # weight changed) wins over it.
        asked = plan.weight_at(state.step)
        if state.status == "progressing" and (
            asked != state.config_weight or bool(plan.steps) != bool(old.steps)
        ):
            state = replace(state, weight=asked, config_weight=asked, updated=now)
        self.state = state

    @property
    def weight(self) -> float:
        return self.state.weight

    def _decide(
        self,
        action: str,
        now: float,
        actor: str,
        reason: str,
        inputs: dict[str, Any] | None = None,
        **changes: Any,
    ) -> Decision:
        before = self.state
        # Only the incident pause sets auto_resume; every other decision, an operator's or
        # the analysis', makes the rollout's status its own (an operator who pauses, sets a
        # weight or resumes while an incident holds it has taken it over).
        changes.setdefault("auto_resume", False)
        self._cleared_since = None
        self.state = replace(before, updated=now, reason=reason, **changes)
        return Decision(
            route=self.plan.route,
            action=action,
            actor=actor,
            reason=reason,
            at=now,
            status_before=before.status,
            status_after=self.state.status,
            weight_before=before.weight,
            weight_after=self.state.weight,
            inputs=inputs or {},
        )

    def tick(
        self, now: float, counts: TickCounts, gates: tuple[GateResult, ...] = ()
    ) -> list[Decision]:
        """Account one tick and decide. Returns the decisions taken (often none)."""
        self.gates = gates
        status = self.state.status
        if status in ("rolled_back", "promoted"):
            return []
        self.analysis.update(counts)
        verdict = self.verdict = self.analysis.verdict()
        inputs: dict[str, Any] = {"verdict": verdict.kind, **verdict.inputs}
        if verdict.kind == "rollback":
            if self.plan.on_breach == "pause":
                if status == "paused":
                    return []
                return [
                    self._decide("pause", now, "analysis", verdict.reason, inputs, status="paused")
                ]
            return [
                self._decide(
                    "rollback",
                    now,
                    "analysis",
                    verdict.reason,
                    inputs,
                    status="rolled_back",
                    weight=0.0,
                )
            ]
        if verdict.kind == "incident":
            self._cleared_since = None
            if status == "paused":
                return []
            return [
                self._decide(
                    "pause",
                    now,
                    "analysis",
                    f"{verdict.reason}; resumes by itself once healthy for "
                    f"{INCIDENT_CLEARED:g}s (pause it to keep it paused)",
                    inputs,
                    status="paused",
                    auto_resume=True,
                )
            ]
        if status == "paused" and self.state.auto_resume:
            return self._maybe_resume(now, verdict, inputs)
        if status != "progressing" or not self.plan.steps:
            return []
        return self._maybe_advance(now, verdict, gates, inputs)

    def _maybe_resume(self, now: float, verdict: Verdict, inputs: dict[str, Any]) -> list[Decision]:
        """Paused for an incident: resume once the verdict has stayed healthy for
        INCIDENT_CLEARED seconds. An incident needs both versions clearly over the SLO, and
        healthy needs them not both over it even within noise, so the two do not flap on one
        noisy minute. The step's hold starts again: time spent in the incident proved nothing
        about the canary."""
        if verdict.kind != "healthy":
            self._cleared_since = None
            return []
        if self._cleared_since is None:
            self._cleared_since = now
        healthy_for = now - self._cleared_since
        if healthy_for < INCIDENT_CLEARED:
            return []
        return [
            self._decide(
                "resume",
                now,
                "analysis",
                f"the incident cleared: healthy for {healthy_for:.0f}s; resuming",
                inputs,
                status="progressing",
                step_started=now,
            )
        ]

    def _maybe_advance(
        self,
        now: float,
        verdict: Verdict,
        gates: tuple[GateResult, ...],
        inputs: dict[str, Any],
    ) -> list[Decision]:
        steps = self.plan.steps
        state = self.state
        step = steps[state.step]
        waiting = now - state.step_started
        blockers: list[str] = []
        if waiting < step.hold:
            blockers.append(f"holding step {state.step + 1} for {step.hold - waiting:.0f}s more")
        if verdict.kind != "healthy":
            blockers.append(f"analysis {verdict.kind}: {verdict.reason}")
        blockers.extend(f"gate {g.name}: {g.reason}" for g in gates if not g.passed)
        if blockers:
            reason = "; ".join(blockers)
            # Holds are recorded when their reason changes, not every tick.
            kind = reason.split(":")[0] if not reason.startswith("holding") else "holding"
            if kind != self._last_hold_reason:
                self._last_hold_reason = kind
                return [
                    Decision(
                        route=self.plan.route,
                        action="hold",
                        actor="controller",
                        reason=reason,
                        at=now,
                        status_before=state.status,
                        status_after=state.status,
                        weight_before=state.weight,
                        weight_after=state.weight,
                        inputs={**inputs, "gates": _gates(gates)},
                    )
                ]
            return []
        self._last_hold_reason = ""
        inputs = {**inputs, "gates": _gates(gates), "step": state.step + 1}
        if state.step + 1 < len(steps):
            nxt = steps[state.step + 1]
            return [
                self._decide(
                    "advance",
                    now,
                    "controller",
                    f"step {state.step + 1} held {step.hold:g}s healthy; to {nxt.weight:g}%",
                    inputs,
                    step=state.step + 1,
                    weight=nxt.weight,
                    config_weight=nxt.weight,
                    step_started=now,
                )
            ]
        return [
            self._decide(
                "promote",
                now,
                "controller",
                f"all {len(steps)} steps passed; canary promoted",
                inputs,
                status="promoted",
                weight=100.0,
            )
        ]

    def operator(
        self,
        action: OperatorAction,
        now: float,
        actor: str,
        reason: str,
        weight: float | None = None,
    ) -> Decision:
        """An operator's action; raises ValueError when it makes no sense in this status."""
        status = self.state.status
        note = reason or f"{action} by {actor}"
        if action == "pause":
            # Paused for an incident, an operator's pause keeps it paused after the incident.
            if status != "progressing" and not self.state.auto_resume:
                raise ValueError(f"cannot pause a rollout that is {status}")
            return self._decide("pause", now, actor, note, status="paused")
        if action == "resume":
            if status != "paused":
                raise ValueError(f"cannot resume a rollout that is {status}")
            changes: dict[str, Any] = {}
            asked = self.plan.weight_at(self.state.step)
            if self.state.weight == 0.0 and asked > 0.0:
                # At 0% the canary gets no traffic, so the analysis could never find it
                # healthy and the schedule would hold for ever: it comes back to what the
                # step (or the file) asks for. A rollout held after its state was lost, or
                # one an operator set to 0% while paused.
                changes = {"weight": asked, "config_weight": asked}
            return self._decide(
                "resume", now, actor, note, status="progressing", step_started=now, **changes
            )
        if action == "promote":
            if status == "promoted":
                raise ValueError("the rollout is already promoted")
            return self._decide("promote", now, actor, note, status="promoted", weight=100.0)
        if action == "rollback":
            if status == "rolled_back":
                raise ValueError("the rollout is already rolled back")
            return self._decide("rollback", now, actor, note, status="rolled_back", weight=0.0)
        if action == "retry":
            if status not in ("rolled_back", "promoted", "paused"):
                raise ValueError(f"cannot retry a rollout that is {status}")
            self.analysis = Analysis(self.plan.analysis)
            return self._decide(
                "retry",
                now,
                actor,
                note,
                status="progressing",
                weight=self.plan.initial_weight(),
                config_weight=self.plan.initial_weight(),
                step=0,
                step_started=now,
            )
        if action == "set_weight":
            if weight is None or not 0.0 <= weight <= 100.0:
                raise ValueError("weight must be between 0 and 100")
            if status in ("rolled_back", "promoted"):
                raise ValueError(f"cannot set the weight of a rollout that is {status}; retry it")
            if weight == 0.0 and status == "progressing" and self.plan.steps:
                # At 0% the canary gets no traffic, so the analysis can never find it healthy
                # and the schedule would hold for ever while calling itself progressing: the
                # rollout is paused as well, and resume brings back the step's weight.
                note += "; paused: a schedule cannot advance without canary traffic"
                return self._decide("set_weight", now, actor, note, weight=0.0, status="paused")
            return self._decide("set_weight", now, actor, note, weight=weight)
        raise ValueError(f"unknown action {action!r}")


def _gates(gates: tuple[GateResult, ...]) -> list[dict[str, Any]]:
    return [{"name": g.name, "passed": g.passed, "reason": g.reason} for g in gates]
