"""Simulated rollouts for judging the analysis: seeded, pure, no clock but the tick counter.

A `Scenario` describes traffic (requests per second, canary weight) and how each version
behaves over time (error probability, probability of exceeding the latency SLO). `run()` feeds
one rollout's ticks into a fresh `RolloutController` (the proxy's own, with its `Analysis`)
and reports when (if ever) it decided to roll back, to pause for an incident and to resume
after it, and how many canary requests (and failed ones) users had sent before a rollback.
`bench/decisions.py` prints the table of many runs; tests assert the false and true rollback
rates on it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .analysis import AnalysisSettings, TickCounts
from .rollout import RolloutController, RolloutPlan

__all__ = ["Outcome", "Scenario", "bursty", "constant", "poisson", "run", "run_many"]

# (tick, seed) -> probability, so behaviour can change over time (a canary going bad,
# flapping) and random schedules (bursts) differ from run to run.
Profile = Callable[[int, int], float]


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw: Knuth's method for small means, a rounded normal for large ones."""
    if lam <= 0:
        return 0
    if lam > 40:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def binomial(rng: random.Random, n: int, p: float) -> int:
    if n <= 0 or p <= 0:
        return 0
    if p >= 1:
        return n
    if n * p < 20 and p < 0.1:
        return min(n, poisson(rng, n * p))
    if n <= 60:
        return sum(rng.random() < p for _ in range(n))
    sd = math.sqrt(n * p * (1 - p))
    return min(n, max(0, round(rng.gauss(n * p, sd))))


def constant(p: float) -> Profile:
    return lambda _tick, _seed: p


def bursty(tag: str, every: int, burst: float, base: float) -> Profile:
    """`base` failure probability, with a one-second burst at `burst` on about one tick in
    `every`; `tag` picks an independent burst schedule (one per version)."""

    def profile(tick: int, seed: int) -> float:
        digest = hashlib.blake2b(f"{tag}:{seed}:{tick}".encode(), digest_size=4).digest()
        return burst if int.from_bytes(digest, "big") % every == 0 else base

    return profile


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float  # requests per second, both versions together
    weight: float  # percent to the canary
    stable_errors: Profile
    canary_errors: Profile
    # share of requests over the latency SLO
    stable_slow: Profile = field(default_factory=lambda: constant(0.005))
    canary_slow: Profile = field(default_factory=lambda: constant(0.005))
    seconds: int = 600
    bad_from: int | None = None  # tick at which the canary is bad (for time to rollback)


@dataclass(frozen=True)
class Outcome:
    rolled_back_at: int | None  # tick of the rollback decision
    paused_at: int | None  # tick of the first pause for an incident
    resumed_at: int | None  # tick of the first resume after it, once the incident cleared
    verdict: str
    canary_requests_before: int  # sent to the canary before the decision (or in total)
    canary_failures_before: int
    reason: str


def run(scenario: Scenario, settings: AnalysisSettings, seed: int) -> Outcome:
    rng = random.Random(seed)
    plan = RolloutPlan("sim", "stable", "canary", (), scenario.weight, (), "rollback", settings)
    controller = RolloutController(plan, None, 0.0)
    share = scenario.weight / 100.0
    canary_total = canary_failed = 0
    paused_at: int | None = None
    resumed_at: int | None = None
    for tick in range(scenario.seconds):
        canary_n = poisson(rng, scenario.rate * share)
        stable_n = poisson(rng, scenario.rate * (1.0 - share))
        counts = TickCounts(
            canary_requests=canary_n,
            canary_failures=binomial(rng, canary_n, scenario.canary_errors(tick, seed)),
            canary_slow=binomial(rng, canary_n, scenario.canary_slow(tick, seed)),
            stable_requests=stable_n,
            stable_failures=binomial(rng, stable_n, scenario.stable_errors(tick, seed)),
            stable_slow=binomial(rng, stable_n, scenario.stable_slow(tick, seed)),
        )
        canary_total += canary_n
        canary_failed += counts.canary_failures
        for decision in controller.tick(float(tick), counts):
            if decision.action == "pause" and paused_at is None:
                paused_at = tick
            elif decision.action == "resume" and resumed_at is None:
                resumed_at = tick
            elif decision.action == "rollback":
                return Outcome(
                    tick, paused_at, resumed_at, "rollback", canary_total, canary_failed,
                    decision.reason,
                )  # fmt: skip
    verdict = controller.verdict
    assert verdict is not None
    return Outcome(
        None, paused_at, resumed_at, verdict.kind, canary_total, canary_failed, verdict.reason
    )


def run_many(
    scenario: Scenario, settings: AnalysisSettings, runs: int, seed: int = 1
) -> list[Outcome]:
    return [run(scenario, settings, seed * 100_003 + i) for i in range(runs)]
