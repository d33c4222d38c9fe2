"""The rollout controller with an injected clock: steps, gates, rollback, pause, operators."""

from __future__ import annotations

import pytest

from proxy.analysis import AnalysisSettings, TickCounts
from proxy.rollout import (
    INCIDENT_CLEARED,
    Decision,
    GateResult,
    RolloutController,
    RolloutPlan,
    RolloutState,
    Step,
)

HEALTHY = TickCounts(20, 0, 0, 180, 0, 0)
FAILING = TickCounts(20, 10, 0, 180, 0, 0)
OUTAGE = TickCounts(20, 2, 0, 180, 18, 0)  # both versions at 10% errors against a 1% SLO


def _plan(
    steps: tuple[Step, ...] = (Step(5, 60), Step(25, 60), Step(100, 60)),
    on_breach: str = "rollback",
    canary: str = "v2",
) -> RolloutPlan:
    return RolloutPlan(
        route="shop",
        stable="v1",
        canary=canary,
        canary_endpoints=("http://127.0.0.1:9002",),
        weight=10.0,
        steps=steps,
        on_breach=on_breach,  # type: ignore[arg-type]
        analysis=AnalysisSettings(error_rate=0.01, min_requests=100),
    )


def _run(controller: RolloutController, start: float, seconds: int, counts: TickCounts) -> float:
    now = start
    for _ in range(seconds):
        now += 1.0
        controller.tick(now, counts)
    return now


def test_steps_advance_after_hold_and_promote() -> None:
    """Healthy steps advance when each hold has passed, then the canary is promoted."""
    controller = RolloutController(_plan(), None, now=0.0)
    assert controller.weight == 5
    now = _run(controller, 0.0, 59, HEALTHY)
    assert controller.weight == 5  # the hold has not passed
    now = _run(controller, now, 2, HEALTHY)
    assert controller.weight == 25
    now = _run(controller, now, 61, HEALTHY)
    assert controller.weight == 100
    _run(controller, now, 61, HEALTHY)
    assert controller.state.status == "promoted"


def test_no_advance_without_data() -> None:
    """With too little traffic the analysis is inconclusive and the step holds."""
    controller = RolloutController(_plan(), None, now=0.0)
    _run(controller, 0.0, 300, TickCounts(0, 0, 0, 1, 0, 0))
    assert controller.weight == 5
    assert controller.verdict is not None and controller.verdict.kind == "inconclusive"


def test_failing_gate_blocks_the_step() -> None:
    """A failing gate holds the step, and the hold decision says which gate and why."""
    controller = RolloutController(_plan(), None, now=0.0)
    gate = (GateResult("canary_healthy", False, "0 of 1 canary endpoints healthy"),)
    decisions = []
    now = 0.0
    for _ in range(120):
        now += 1.0
        decisions += controller.tick(now, HEALTHY, gate)
    assert controller.weight == 5
    holds = [d for d in decisions if d.action == "hold"]
    assert any("canary_healthy" in d.reason for d in holds)
    assert len(holds) < 5  # recorded when the reason changes, not every tick


def test_rollback_sets_weight_zero_and_stays_down() -> None:
    """A breach rolls back to weight 0; later healthy ticks do not bring the canary back."""
    controller = RolloutController(_plan(), None, now=0.0)
    now = _run(controller, 0.0, 10, FAILING)
    assert controller.state.status == "rolled_back"
    assert controller.weight == 0
    _run(controller, now, 600, HEALTHY)
    assert controller.state.status == "rolled_back"


def test_on_breach_pause() -> None:
    """With on_breach: pause a breach freezes the weight instead of rolling back."""
    controller = RolloutController(_plan(on_breach="pause"), None, now=0.0)
    _run(controller, 0.0, 10, FAILING)
    assert controller.state.status == "paused"
    assert controller.weight == 5


def test_outage_of_both_pauses_with_a_reason() -> None:
    """Both versions failing pauses the rollout and says it is an incident."""
    controller = RolloutController(_plan(), None, now=0.0)
    _run(controller, 0.0, 120, OUTAGE)
    assert controller.state.status == "paused"
    assert "both versions" in controller.state.reason
    assert "resumes by itself" in controller.state.reason and controller.state.auto_resume


def _ticks(
    controller: RolloutController, start: float, seconds: int, counts: TickCounts
) -> tuple[float, list[tuple[float, str, list[Decision]]]]:
    """Like _run, with each tick's time, verdict and decisions."""
    now, seen = start, []
    for _ in range(seconds):
        now += 1.0
        decisions = controller.tick(now, counts)
        assert controller.verdict is not None
        seen.append((now, controller.verdict.kind, decisions))
    return now, seen


def test_an_incident_pause_resumes_once_healthy_for_a_while() -> None:
    """After the outage both versions are healthy again: the pause ends by itself once the
    verdict has been healthy for INCIDENT_CLEARED seconds, not sooner, and the step's hold
    starts again (the incident proved nothing about the canary); the schedule then goes on."""
    controller = RolloutController(_plan(), None, now=0.0)
    now = _run(controller, 0.0, 40, HEALTHY)
    now = _run(controller, now, 120, OUTAGE)
    assert controller.state.status == "paused" and controller.weight == 5
    now, seen = _ticks(controller, now, 100, HEALTHY)
    healthy_from = next(t for t, kind, _ in seen if kind == "healthy")
    assert all(kind == "healthy" for t, kind, _ in seen if t >= healthy_from)
    resumes = [(t, d) for t, _, ds in seen for d in ds if d.action != "hold"]
    assert [(t, d.action, d.actor) for t, d in resumes] == [
        (healthy_from + INCIDENT_CLEARED, "resume", "analysis")
    ]
    resumed_at, decision = resumes[0]
    assert "incident cleared" in decision.reason
    assert controller.state.status == "progressing" and not controller.state.auto_resume
    assert controller.state.step_started == resumed_at
    now = _run(controller, now, int(resumed_at + 59 - now), HEALTHY)
    assert controller.weight == 5  # the hold counts from the resume
    _run(controller, now, 2, HEALTHY)
    assert controller.weight == 25


def test_a_relapse_restarts_the_wait_for_resuming() -> None:
    """Healthy for less than INCIDENT_CLEARED, then both fail again: nothing resumes, and
    the wait starts over once the incident clears anew."""
    controller = RolloutController(_plan(), None, now=0.0)
    now = _run(controller, 0.0, 120, OUTAGE)
    decisions: list[Decision] = []
    healthy = 0
    while healthy < 5:  # healthy verdicts for 5 s
        now += 1.0
        decisions += controller.tick(now, HEALTHY)
        healthy += controller.verdict is not None and controller.verdict.kind == "healthy"
    now, relapse = _ticks(controller, now, 120, OUTAGE)
    assert any(kind != "healthy" for _, kind, _ in relapse[: int(INCIDENT_CLEARED) - 5])
    assert decisions + [d for _, _, ds in relapse for d in ds] == []
    assert controller.state.status == "paused" and controller.state.auto_resume
    now, after = _ticks(controller, now, 300, HEALTHY)
    cleared = next(t for t, kind, _ in after if kind == "healthy")
    assert [(t, d.action) for t, _, ds in after for d in ds if d.action in ("pause", "resume")] == [
        (cleared + INCIDENT_CLEARED, "resume")
    ]


def test_an_operator_takes_over_an_incident_pause() -> None:
    """Pausing a rollout the incident paused keeps it paused after the incident (auto_resume
    off, the operator's reason); so does setting its weight. Resume is the operator's then."""
    for act in (
        lambda c, now: c.operator("pause", now, "alice", "keep it held until the DB is fixed"),
        lambda c, now: c.operator("set_weight", now, "bob", "less canary", weight=1),
    ):
        controller = RolloutController(_plan(), None, now=0.0)
        now = _run(controller, 0.0, 120, OUTAGE)
        decision = act(controller, now)
        assert decision.status_after == "paused" and not controller.state.auto_resume
        _run(controller, now, 600, HEALTHY)
        assert controller.state.status == "paused"
        assert controller.verdict is not None and controller.verdict.kind == "healthy"
    with pytest.raises(ValueError, match="cannot pause a rollout that is paused"):
        controller.operator("pause", now, "alice", "")


def test_an_incident_pause_resumes_by_itself_after_a_restart() -> None:
    """auto_resume is part of the saved state: a proxy restarted during the incident still
    resumes the rollout once it has cleared; a state saved before the field existed (or
    not paused) reads as an ordinary pause."""
    controller = RolloutController(_plan(), None, now=0.0)
    now = _run(controller, 0.0, 120, OUTAGE)
    raw = controller.state.to_json()
    assert raw["auto_resume"] is True
    saved = RolloutState.from_json(raw)
    assert saved is not None and saved.auto_resume
    again = RolloutController(_plan(), saved, now=now)
    _run(again, now, 60, HEALTHY)
    assert again.state.status == "progressing"
    for old in ({k: v for k, v in raw.items() if k != "auto_resume"}, {**raw, "auto_resume": 1}):
        loaded = RolloutState.from_json(old)
        assert loaded is not None and loaded.status == "paused" and not loaded.auto_resume
    progressing = RolloutState.from_json({**raw, "status": "progressing"})
    assert progressing is not None and not progressing.auto_resume


def test_state_survives_a_restart_and_new_generation_resets() -> None:
    """A saved rolled-back state is kept for the same canary; a new canary starts afresh."""
    controller = RolloutController(_plan(), None, now=0.0)
    _run(controller, 0.0, 10, FAILING)
    saved = RolloutState.from_json(controller.state.to_json())
    assert saved is not None
    again = RolloutController(_plan(), saved, now=100.0)
    assert again.state.status == "rolled_back" and again.weight == 0
    fresh = RolloutController(_plan(canary="v3"), saved, now=100.0)
    assert fresh.state.status == "progressing" and fresh.weight == 5


def test_operator_actions() -> None:
    """pause, resume, set_weight, promote, retry and rollback act and refuse what makes no sense."""
    controller = RolloutController(_plan(), None, now=0.0)
    assert controller.operator("pause", 1.0, "alice", "investigating").status_after == "paused"
    with pytest.raises(ValueError, match="cannot pause"):
        controller.operator("pause", 2.0, "alice", "")
    controller.operator("resume", 3.0, "alice", "")
    decision = controller.operator("set_weight", 4.0, "bob", "more", weight=40)
    assert (decision.weight_before, decision.weight_after) == (5, 40)
    with pytest.raises(ValueError, match="between 0 and 100"):
        controller.operator("set_weight", 4.0, "bob", "", weight=140)
    controller.operator("rollback", 5.0, "carol", "bad deploy")
    assert controller.weight == 0
    with pytest.raises(ValueError, match="already rolled back"):
        controller.operator("rollback", 6.0, "carol", "")
    controller.operator("retry", 7.0, "carol", "fixed")
    assert controller.state.status == "progressing" and controller.weight == 5
    controller.operator("promote", 8.0, "dave", "")
    assert controller.weight == 100


@pytest.mark.parametrize("steps", [(Step(5, 60), Step(25, 60)), ()], ids=["steps", "fixed"])
def test_resume_at_zero_brings_back_the_weight_asked_for(steps: tuple[Step, ...]) -> None:
    """Resumed at 0%, a rollout would get no canary traffic and so never a healthy verdict:
    its schedule would hold for ever. It comes back to the weight of its step (or the file's
    fixed weight); resumed at any other weight, the weight stays as it was."""
    plan = _plan(steps=steps)
    asked = 25.0 if steps else 10.0
    controller = RolloutController(plan, None, now=0.0)
    if steps:
        _run(controller, 0.0, 61, HEALTHY)  # on to step 2
    controller.operator("pause", 70.0, "alice", "")
    controller.operator("set_weight", 71.0, "alice", "", weight=0)
    decision = controller.operator("resume", 72.0, "alice", "")
    assert (decision.weight_before, decision.weight_after) == (0, asked)
    assert controller.state.status == "progressing"
    if steps:
        assert controller.state.step == 1
        _run(controller, 72.0, 61, HEALTHY)
        assert controller.state.status == "promoted"
    controller = RolloutController(plan, None, now=0.0)
    controller.operator("pause", 1.0, "alice", "")
    controller.operator("set_weight", 2.0, "alice", "", weight=2)
    assert controller.operator("resume", 3.0, "alice", "").weight_after == 2


@pytest.mark.parametrize("steps", [(Step(5, 60), Step(25, 60)), ()], ids=["steps", "fixed"])
def test_set_weight_to_zero_while_progressing_pauses_a_schedule(steps: tuple[Step, ...]) -> None:
    """0% while walking the steps would hold the schedule for ever (no canary traffic, so never
    a healthy verdict) under the name of progressing: the rollout is paused with it, and says
    why; resume brings back the step's weight and the schedule goes on to promotion. A fixed
    weight has no schedule to hold: 0% stays progressing, and the file's edits still apply."""
    controller = RolloutController(_plan(steps=steps), None, now=0.0)
    decision = controller.operator("set_weight", 1.0, "alice", "canary off", weight=0)
    assert decision.weight_after == 0 and controller.weight == 0
    if not steps:
        assert decision.status_after == "progressing"
        return
    assert (decision.status_before, decision.status_after) == ("progressing", "paused")
    assert decision.reason.startswith("canary off; paused: ")
    _run(controller, 1.0, 120, HEALTHY)
    assert controller.state.status == "paused" and controller.weight == 0
    assert controller.operator("resume", 200.0, "alice", "").weight_after == 5
    _run(controller, 200.0, 125, HEALTHY)
    assert controller.state.status == "promoted"


def test_fixed_weight_change_in_file_wins() -> None:
    """Without steps, a changed weight in the file replaces an operator's set_weight."""
    plan = _plan(steps=())
    controller = RolloutController(plan, None, now=0.0)
    assert controller.weight == 10
    controller.operator("set_weight", 1.0, "alice", "", weight=30)
    controller.replan(plan, 2.0)
    assert controller.weight == 30  # same file: the override stays
    from dataclasses import replace

    controller.replan(replace(plan, weight=50.0), 3.0)
    assert controller.weight == 50


def test_generation_ignores_endpoint_order_and_slashes() -> None:
    """Reordering the canary's endpoints or adding a slash is not a new release."""
    from dataclasses import replace

    plan = replace(_plan(), canary_endpoints=("http://a:1", "http://b:2"))
    same = replace(plan, canary_endpoints=("http://b:2/", "http://a:1"))
    other = replace(plan, canary_endpoints=("http://c:3",))
    assert plan.generation == same.generation != other.generation


def test_replan_follows_edits_of_the_file() -> None:
    """Steps to a fixed weight, fixed to steps, and an edited current step all take effect."""
    from dataclasses import replace

    controller = RolloutController(_plan(), None, now=0.0)
    assert controller.weight == 5
    fixed = replace(_plan(steps=()), weight=0.0)
    controller.replan(fixed, 1.0)
    assert controller.weight == 0
    controller.replan(_plan(steps=(Step(1, 60), Step(10, 60))), 2.0)
    assert controller.weight == 1
    controller.replan(_plan(steps=(Step(2, 60), Step(10, 60))), 3.0)
    assert controller.weight == 2


def test_operator_weight_survives_an_unchanged_reload() -> None:
    """set_weight during a step is kept when the file is reloaded unchanged."""
    controller = RolloutController(_plan(), None, now=0.0)
    _run(controller, 0.0, 61, HEALTHY)  # advanced to step 2 (25%)
    assert controller.weight == 25
    controller.operator("set_weight", 70.0, "alice", "", weight=33)
    controller.replan(_plan(), 71.0)
    assert controller.weight == 33
