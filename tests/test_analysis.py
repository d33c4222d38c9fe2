"""The canary analysis, shown by simulation with an injected tick clock (no sockets, no sleep):
healthy canaries are not rolled back, bad ones are, fast, and outages of both are incidents."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from proxy.analysis import (
    Analysis,
    AnalysisSettings,
    AttributionTest,
    RateTest,
    TickCounts,
)
from proxy.rollout import INCIDENT_CLEARED
from proxy.simulation import Scenario, bursty, constant, run_many

SLO = AnalysisSettings(alpha=0.01, error_rate=0.01, latency=0.3, min_requests=100)


def _rollbacks(scenario: Scenario, runs: int, settings: AnalysisSettings = SLO) -> list[int]:
    """Ticks (1-based seconds) at which each run rolled back; runs that did not are left out."""
    outcomes = run_many(scenario, settings, runs)
    return [o.rolled_back_at + 1 for o in outcomes if o.rolled_back_at is not None]


@pytest.mark.parametrize(
    ("rate", "weight", "errors"),
    [(200, 10, 0.001), (200, 10, 0.009), (1000, 50, 0.002), (20, 5, 0.005)],
)
def test_healthy_canary_is_not_rolled_back(rate: float, weight: float, errors: float) -> None:
    """A/A: canary and stable alike (even close to the SLO): at most 1% of runs roll back,
    and none is paused as an incident (a service at 0.9% against a 1% SLO crosses 1% in
    some minute of most runs, by chance alone)."""
    scenario = Scenario("a/a", rate, weight, constant(errors), constant(errors), seconds=900)
    runs = 60
    outcomes = run_many(scenario, SLO, runs)
    assert sum(o.rolled_back_at is not None for o in outcomes) <= 0.01 * runs
    assert [o.paused_at for o in outcomes if o.paused_at is not None] == []


def test_martingale_never_crosses_under_the_null_often() -> None:
    """The error-rate test's crossing probability over a long run stays below alpha."""
    rng = random.Random(7)
    crossed = 0
    trials = 300
    for _ in range(trials):
        test = RateTest(p0=0.05, alpha=0.05)
        for _ in range(400):
            n = 20
            test.update(n, sum(rng.random() < 0.05 for _ in range(n)))
            if test.rejected():
                crossed += 1
                break
    assert crossed / trials <= 0.05


def test_bad_canary_rolled_back_within_10s() -> None:
    """20% errors vs 0.1% at 10% weight and 200 req/s: rolled back within 10 s in every run."""
    scenario = Scenario("bad", 200, 10, constant(0.001), constant(0.2), seconds=60)
    times = _rollbacks(scenario, 100)
    assert len(times) == 100
    assert max(times) <= 10


def test_latency_regression_rolled_back_within_30s() -> None:
    """Canary p99 3x stable's and over the 300 ms SLO (7% of its requests over 300 ms, stable
    0.3%, as for log-normal latencies with stable p99 150 ms): rolled back within 30 s."""
    scenario = Scenario(
        "slow",
        200,
        10,
        constant(0.001),
        constant(0.001),
        stable_slow=constant(0.003),
        canary_slow=constant(0.07),
        seconds=120,
    )
    times = _rollbacks(scenario, 100)
    assert len(times) == 100
    assert max(times) <= 30


def test_lognormal_assumption_of_the_latency_scenario() -> None:
    """The 7% used above is what a 3x slower log-normal with stable p99 150 ms gives at 300 ms."""
    sigma = math.log(3) / 2.326  # p99/median = 3 for the stable
    median_canary = 3 * 150 / math.exp(2.326 * sigma)
    over = 0.5 * math.erfc(math.log(300 / median_canary) / (sigma * math.sqrt(2)))
    assert over == pytest.approx(0.07, abs=0.005)


def test_no_verdict_without_data() -> None:
    """At very low traffic a bad canary is held (inconclusive), never rolled back on no data."""
    analysis = Analysis(SLO)
    for _ in range(600):
        analysis.update(TickCounts(0, 0, 0, 1, 0, 0))
    assert analysis.verdict().kind == "inconclusive"
    # A few failures in a trickle do not reach the fast path either.
    analysis.update(TickCounts(5, 3, 0, 50, 0, 0))
    verdict = analysis.verdict()
    assert verdict.kind == "inconclusive"
    assert "not enough data" in verdict.reason


def test_total_canary_failure_takes_the_fast_path() -> None:
    """A canary failing every request is rolled back before min_requests is reached."""
    analysis = Analysis(SLO)
    analysis.update(TickCounts(12, 12, 0, 100, 0, 0))
    verdict = analysis.verdict()
    assert verdict.kind == "rollback"
    assert "outright" in verdict.reason


def test_stable_outage_is_an_incident_not_a_rollback() -> None:
    """Both versions failing alike (5% vs a 1% SLO) never rolls the canary back."""
    scenario = Scenario("outage", 200, 10, constant(0.05), constant(0.05), seconds=600)
    outcomes = run_many(scenario, SLO, 30)
    assert all(o.rolled_back_at is None for o in outcomes)
    assert statistics.mode(o.verdict for o in outcomes) == "incident"
    # Paused within the first minute of the outage in every run.
    assert all(o.paused_at is not None and o.paused_at < 60 for o in outcomes)


def test_both_versions_just_over_the_slo_hold_the_schedule_without_pausing() -> None:
    """A minute with both versions a little over the SLO (1.17% and 1.11% against 1%, on
    1,200 and 10,800 requests) is within noise: the verdict holds the schedule (inconclusive)
    and says why, where it paused the rollout as an incident; five times the SLO is one."""
    analysis = Analysis(SLO)
    for tick in range(60):
        analysis.update(TickCounts(20, int(tick < 14), 0, 180, 2, 0))
    verdict = analysis.verdict()
    assert verdict.kind == "inconclusive", verdict
    assert "within noise" in verdict.reason and "1.17%" in verdict.reason
    for _ in range(60):
        analysis.update(TickCounts(20, 1, 0, 180, 9, 0))
    verdict = analysis.verdict()
    assert verdict.kind == "incident", verdict
    assert "not the canary's fault alone" in verdict.reason


def test_a_latency_only_slo_reads_its_incidents() -> None:
    """An SLO on latency alone (no error rate): healthy traffic is healthy (the verdict raised
    TypeError formatting the missing error SLO on every tick), and both versions 5% over the
    latency limit against the 1% a p99 allows is an incident of latency."""
    analysis = Analysis(AnalysisSettings(alpha=0.01, latency=0.3, min_requests=100))
    for _ in range(60):
        analysis.update(TickCounts(20, 0, 0, 180, 0, 0))
    assert analysis.verdict().kind == "healthy"
    for _ in range(60):
        analysis.update(TickCounts(20, 0, 1, 180, 0, 9))
    verdict = analysis.verdict()
    assert verdict.kind == "incident", verdict
    assert "latency SLO of 300ms" in verdict.reason


def test_flapping_canary_is_caught() -> None:
    """A canary that fails 30% of the time in every other 5 s burst is rolled back."""
    scenario = Scenario(
        "flap",
        200,
        10,
        constant(0.001),
        lambda tick, _seed: 0.3 if (tick // 5) % 2 else 0.0,
        seconds=120,
    )
    times = _rollbacks(scenario, 50)
    assert len(times) == 50
    assert max(times) <= 30


def test_late_regression_after_a_long_healthy_hour() -> None:
    """Evidence for a healthy canary does not blunt detection when it turns bad an hour in."""
    scenario = Scenario(
        "late",
        200,
        10,
        constant(0.001),
        lambda tick, _seed: 0.001 if tick < 3600 else 0.2,
        seconds=3660,
    )
    times = _rollbacks(scenario, 10)
    assert len(times) == 10
    assert all(3600 < t <= 3600 + 20 for t in times)


def test_attribution_ignores_shared_failures() -> None:
    """Failures split by traffic share (a shared dependency failing) give no evidence."""
    test = AttributionTest(alpha=0.01)
    for _ in range(1000):
        test.update(canary_n=20, stable_n=180, canary_failures=2, stable_failures=18)
    assert not test.rejected()
    assert test.log_e <= 0.0


def test_verdict_records_its_inputs() -> None:
    """Each verdict carries the counts, rates, e-values and thresholds that produced it."""
    analysis = Analysis(SLO)
    for _ in range(10):
        analysis.update(TickCounts(20, 4, 0, 180, 0, 0))
    verdict = analysis.verdict()
    assert verdict.kind == "rollback"
    for key in (
        "canary_requests",
        "canary_error_rate",
        "stable_error_rate",
        "log_e_errors_relative",
        "threshold_errors_relative",
        "alpha",
        "slo_error_rate",
    ):
        assert key in verdict.inputs


def test_bursty_failures_do_not_roll_back_a_healthy_canary() -> None:
    """Both versions at 0.25% errors with independent one-second bursts of 30% (about one a
    minute each, a new schedule each run): a canary-only burst is no proof; at most 1% of
    hour-long runs roll back, and at most 1% are paused as an incident (minutes when both
    versions' bursts put them over the SLO are within the noise of bursty failures)."""
    scenario = Scenario(
        "bursty",
        200,
        10,
        bursty("stable", 60, 0.3, 0.0025),
        bursty("canary", 60, 0.3, 0.0025),
        seconds=3600,
    )
    outcomes = run_many(scenario, SLO, 40)
    assert sum(o.rolled_back_at is not None for o in outcomes) <= 0.01 * 40
    assert sum(o.paused_at is not None for o in outcomes) <= 0.01 * 40


def test_shared_outage_after_a_healthy_half_hour_is_an_incident() -> None:
    """Both versions jumping to 20% errors after 30 healthy minutes pause the rollout as an
    incident (judged on the last minute), never roll the canary back."""
    failing = lambda tick, _seed: 0.001 if tick < 1800 else 0.2  # noqa: E731 - a one-line profile
    scenario = Scenario("shared", 200, 10, failing, failing, seconds=1900)
    outcomes = run_many(scenario, SLO, 20)
    assert all(o.rolled_back_at is None for o in outcomes)
    assert all(o.verdict == "incident" for o in outcomes)
    assert "both versions" in outcomes[0].reason


def test_no_rollback_once_a_shared_outage_ends() -> None:
    """Both versions at 5% errors for five minutes, then both recover: the canary is not
    rolled back afterwards on evidence gathered while the stable failed too. The rollout is
    paused within a minute of the outage and resumes by itself after it: once the last
    minute's window is clear of it and INCIDENT_CLEARED more seconds have been healthy."""
    outage = lambda tick, _seed: 0.05 if 300 <= tick < 600 else 0.001  # noqa: E731
    scenario = Scenario("outage then recovery", 200, 10, outage, outage, seconds=1200)
    outcomes = run_many(scenario, SLO, 20)
    assert [o.rolled_back_at for o in outcomes if o.rolled_back_at is not None] == []
    for o in outcomes:
        assert o.paused_at is not None and 300 <= o.paused_at < 360, o
        assert o.resumed_at is not None, o
        assert 600 + INCIDENT_CLEARED <= o.resumed_at < 600 + 60 + INCIDENT_CLEARED, o
