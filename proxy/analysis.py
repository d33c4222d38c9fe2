"""Canary analysis: anytime-valid sequential tests over per-tick counts. Pure.

Why not a threshold checked every few seconds: repeated fixed-sample tests inflate the false
alarm rate without bound the longer a rollout runs. Here every test is a *test martingale*
(an e-process): under the null hypothesis its expected value never grows, so by Ville's
inequality the chance it EVER crosses 1/alpha is at most alpha, however long it is watched and
however often it is looked at. That is what lets the proxy look every second and still promise
"a healthy canary is rolled back in at most `alpha` of rollouts".

Two tests, each a mixture over a grid of alternatives (a mixture of martingales is one):

* `RateTest` (absolute, for an SLO): is a variant's failure probability above `p0`? Each
  request is a Bernoulli trial; alternatives `p1 = p0 * k`. Used for the error-rate SLO
  (p0 = slo.error_rate) and the latency SLO (a "failure" is a request slower than the SLO's
  latency, p0 = 1 - quantile, so p99 over the SLO means more than 1% of requests over it).
* `AttributionTest` (relative, canary vs stable over the same seconds): given that a failure
  happened in a tick, under "the canary is no worse" it belongs to the canary with at most the
  canary's share of that tick's requests. Alternatives: the canary's failure rate is `theta`
  times the stable's. This needs no SLO, adapts to weight changes, and ignores failures that
  hit both versions alike (an outage of a shared dependency is not the canary's fault).

Real failures come in bursts (one bad second, one unlucky user pinned to the canary), which
the per-request nulls above do not model. Two guards keep the tests honest there:
* each tick's likelihood ratio is tempered by the stable's recent overdispersion phi >= 1
  (Pearson's statistic over the last 15 minutes; ~1 for independent failures): LR**(1/phi)
  has E <= E[LR]**(1/phi) <= 1 by Jensen, so the tests stay supermartingales;
* and capped at 4 per tick: E[min(LR, 4)] <= E[LR] <= 1, so a rollback needs evidence from
  at least six distinct seconds, never from one burst.

A martingale that has sunk deep under 1 would take long to climb back if the canary turns bad
late, so when its log falls below `-restart_below` the test restarts; restart k runs at level
alpha * 6 / (pi^2 k^2), so all restarts together still spend at most alpha.

`Analysis.verdict()` combines the tests into one `Verdict` for a rollout.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Analysis",
    "AnalysisSettings",
    "AttributionTest",
    "RateTest",
    "TickCounts",
    "Verdict",
]

VerdictKind = Literal["inconclusive", "healthy", "rollback", "incident"]
_LOG_MAX = 700.0  # keep exp() finite
_RECENT_TICKS = 60
_GATE_TICKS = 10
_INCIDENT_Z = 3.0  # how far past noise both versions must be over an SLO for an incident
_INCIDENT_TICKS = 10  # and on how many ticks at least (the stable's burstiness is known then)
_DISPERSION_TICKS = 900  # fifteen minutes of the stable's burstiness


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _restart_alpha(alpha: float, restart: int) -> float:
    return alpha * 6.0 / (math.pi**2 * restart**2)


@dataclass
class _Mixture:
    """Log-likelihood ratios of equally weighted alternatives, with restart bookkeeping."""

    size: int
    alpha: float
    restart_below: float
    tick_cap: float = math.log(4.0)
    restarts: int = 1
    log_lr: list[float] = field(default_factory=list)
    log_e: float = 0.0  # log of the mixture's e-value (the average likelihood ratio)

    def __post_init__(self) -> None:
        self.log_lr = [0.0] * self.size

    @property
    def level(self) -> float:
        return _restart_alpha(self.alpha, self.restarts)

    @property
    def threshold(self) -> float:
        """log(1/level): the e-value must reach this to reject."""
        return -math.log(self.level)

    def rejected(self) -> bool:
        return self.log_e >= self.threshold

    def settle(self) -> None:
        """Recompute the e-value; restart when the evidence points far the other way."""
        self.log_lr = [min(v, _LOG_MAX) for v in self.log_lr]
        self.log_e = _logsumexp(self.log_lr) - math.log(self.size)
        if self.log_e < -self.restart_below:
            self.restart()

    def restart(self) -> None:
        """Drop the evidence so far and go on at the next, smaller level."""
        self.restarts += 1
        self.log_lr = [0.0] * self.size
        self.log_e = 0.0


class RateTest:
    """H0: failure probability <= p0, against p1 = p0 * k for k in `multipliers`."""

    def __init__(
        self,
        p0: float,
        alpha: float,
        multipliers: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
        restart_below: float = 8.0,
    ) -> None:
        if not 0.0 < p0 < 1.0:
            raise ValueError("p0 must be in (0, 1)")
        alternatives = sorted({min(p0 * k, 0.999) for k in multipliers if p0 * k > p0})
        self.p0 = p0
        # per alternative: (log LR of a failure, log LR of a success)
        self._terms = [
            (math.log(p1 / p0), math.log((1.0 - p1) / (1.0 - p0))) for p1 in alternatives
        ]
        self.mixture = _Mixture(len(self._terms), alpha, restart_below)
        self.trials = 0
        self.failures = 0

    def update(self, trials: int, failures: int, temper: float = 1.0) -> None:
        if trials <= 0:
            return
        self.trials += trials
        self.failures += failures
        successes = trials - failures
        lr = self.mixture.log_lr
        cap = self.mixture.tick_cap
        for i, (on_failure, on_success) in enumerate(self._terms):
            lr[i] += min(temper * (failures * on_failure + successes * on_success), cap)
        self.mixture.settle()

    def rejected(self) -> bool:
        return self.mixture.rejected()

    @property
    def log_e(self) -> float:
        return self.mixture.log_e


class AttributionTest:
    """H0: the canary fails no more often than the stable, per request, in the same ticks."""

    def __init__(
        self,
        alpha: float,
        thetas: tuple[float, ...] = (2.0, 3.0, 5.0, 10.0, 30.0, 100.0),
        restart_below: float = 8.0,
    ) -> None:
        self.thetas = thetas
        self.mixture = _Mixture(len(thetas), alpha, restart_below)
        self.canary_failures = 0
        self.stable_failures = 0

    def update(
        self,
        canary_n: int,
        stable_n: int,
        canary_failures: int,
        stable_failures: int,
        temper: float = 1.0,
    ) -> None:
        failures = canary_failures + stable_failures
        total = canary_n + stable_n
        if failures == 0 or total == 0 or canary_n == 0 or stable_n == 0:
            return
        self.canary_failures += canary_failures
        self.stable_failures += stable_failures
        q0 = canary_n / total
        lr = self.mixture.log_lr
        cap = self.mixture.tick_cap
        for i, theta in enumerate(self.thetas):
            q1 = theta * q0 / (theta * q0 + 1.0 - q0)
            gain = canary_failures * math.log(q1 / q0) + stable_failures * math.log(
                (1.0 - q1) / (1.0 - q0)
            )
            lr[i] += min(temper * gain, cap)
        self.mixture.settle()

    def rejected(self) -> bool:
        return self.mixture.rejected()

    @property
    def log_e(self) -> float:
        return self.mixture.log_e


@dataclass(frozen=True, slots=True)
class TickCounts:
    """One tick (say a second) of one rollout: requests, failures and SLO-slow requests."""

    canary_requests: int
    canary_failures: int
    canary_slow: int
    stable_requests: int
    stable_failures: int
    stable_slow: int
    diverted: int = 0  # of the canary requests: sent to stable as no canary was in rotation


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.01
    error_rate: float | None = None  # SLO: max failure fraction
    latency: float | None = None  # SLO: the quantile below, in seconds
    latency_quantile: float = 0.99
    min_requests: int = 100  # per variant, before any verdict but the fast path
    fast_path_failures: int = 10  # this many canary failures ...
    fast_path_rate: float = 0.5  # ... at this rate or worse, stable healthy: roll back now


@dataclass(frozen=True)
class Verdict:
    """What the analysis concludes now, with the numbers that led there."""

    kind: VerdictKind
    reason: str
    inputs: dict[str, float | int | str | None]


class Analysis:
    """The running analysis of one rollout generation."""

    def __init__(self, settings: AnalysisSettings) -> None:
        self.settings = settings
        s = settings
        self.errors_relative = AttributionTest(s.alpha / 4)
        self.latency_relative = AttributionTest(s.alpha / 4)
        self.errors_slo = RateTest(s.error_rate, s.alpha / 4) if s.error_rate else None
        p_slow = 1.0 - s.latency_quantile
        self.latency_slo = RateTest(p_slow, s.alpha / 4) if s.latency else None
        self.totals = dict.fromkeys(
            ("canary_requests", "canary_failures", "canary_slow", "stable_requests"), 0
        )
        self.totals.update(stable_failures=0, stable_slow=0)
        # The last minute, for judging whether the stable suffers too *now*: a stable that was
        # fine for an hour and fails alike with the canary now is an incident, not a rollback.
        self.recent: deque[TickCounts] = deque(maxlen=_RECENT_TICKS)
        self._error_dispersion = _Dispersion(_DISPERSION_TICKS)
        self._slow_dispersion = _Dispersion(_DISPERSION_TICKS)
        self._errors_gate_open = True
        self._latency_gate_open = True

    def update(self, tick: TickCounts) -> None:
        for key in self.totals:
            self.totals[key] += getattr(tick, key)
        # Burstiness of the stable (before this tick): both versions
        # share the environment, so failures clumped in the stable mean clumped failures in
        # the canary too, and per-request evidence is worth that much less.
        error_temper = 1.0 / self._error_dispersion.value()
        slow_temper = 1.0 / self._slow_dispersion.value()
        self._error_dispersion.add(tick.stable_requests, tick.stable_failures)
        self._slow_dispersion.add(tick.stable_requests, tick.stable_slow)
        self.recent.append(tick)
        self.errors_relative.update(
            tick.canary_requests,
            tick.stable_requests,
            tick.canary_failures,
            tick.stable_failures,
            error_temper,
        )
        # The SLO tests judge the canary only while the stable keeps the SLO itself (over the
        # last few seconds): what both versions suffer is an incident, and evidence gathered
        # then must not roll the canary back once the stable recovers. When the stable starts
        # breaching, the SLO evidence so far is dropped (a restart, at the next level). The
        # gate looks only at stable counts, independent of the canary's under the null, so
        # the tests stay supermartingales.
        stable_n = sum(t.stable_requests for t in list(self.recent)[-_GATE_TICKS:])
        stable_f = sum(t.stable_failures for t in list(self.recent)[-_GATE_TICKS:])
        stable_s = sum(t.stable_slow for t in list(self.recent)[-_GATE_TICKS:])
        s = self.settings
        if self.errors_slo is not None and s.error_rate is not None:
            open_now = stable_n == 0 or stable_f / stable_n <= s.error_rate
            if open_now:
                self.errors_slo.update(tick.canary_requests, tick.canary_failures, error_temper)
            elif self._errors_gate_open:
                self.errors_slo.mixture.restart()
            self._errors_gate_open = open_now
        if self.latency_slo is not None:
            self.latency_relative.update(
                tick.canary_requests,
                tick.stable_requests,
                tick.canary_slow,
                tick.stable_slow,
                slow_temper,
            )
            open_now = stable_n == 0 or stable_s / stable_n <= 1.0 - s.latency_quantile
            if open_now:
                self.latency_slo.update(tick.canary_requests, tick.canary_slow, slow_temper)
            elif self._latency_gate_open:
                self.latency_slo.mixture.restart()
            self._latency_gate_open = open_now

    def _rate(self, failures: str, requests: str) -> float:
        n = self.totals[requests]
        return self.totals[failures] / n if n else 0.0

    def _recent(self) -> TickCounts:
        """The counts of the last minute, summed."""
        recent = self.recent
        return TickCounts(
            canary_requests=sum(t.canary_requests for t in recent),
            canary_failures=sum(t.canary_failures for t in recent),
            canary_slow=sum(t.canary_slow for t in recent),
            stable_requests=sum(t.stable_requests for t in recent),
            stable_failures=sum(t.stable_failures for t in recent),
            stable_slow=sum(t.stable_slow for t in recent),
        )

    def _shared_slos(
        self, recent: TickCounts
    ) -> Iterator[tuple[int, int, float, _Dispersion, str, str]]:
        """For each SLO configured: the canary's and the stable's counts over it in the last
        minute, its limit, the stable's dispersion of them, and what to say when both are
        over it (within noise, and as an incident)."""
        s = self.settings
        cn, sn = recent.canary_requests, recent.stable_requests
        if s.error_rate is not None:
            what = (
                f"both versions over the error SLO of {s.error_rate:.2%} (canary "
                f"{recent.canary_failures / cn:.2%}, stable {recent.stable_failures / sn:.2%} "
                "over the last minute)"
            )
            yield (
                recent.canary_failures, recent.stable_failures, s.error_rate,
                self._error_dispersion, what, f"{what}: not the canary's fault alone",
            )  # fmt: skip
        if s.latency is not None:
            what = (
                f"both versions over the latency SLO of {s.latency * 1000:g}ms (canary "
                f"{recent.canary_slow / cn:.2%}, stable {recent.stable_slow / sn:.2%} of "
                "requests slower, last minute)"
            )
            yield (
                recent.canary_slow, recent.stable_slow, 1.0 - s.latency_quantile,
                self._slow_dispersion, what, what,
            )  # fmt: skip

    def _both_over(
        self, recent: TickCounts, canary: int, stable: int, limit: float, dispersion: _Dispersion
    ) -> str:
        """Whether both versions' last minute is over an SLO's `limit`: "clearly" (beyond
        noise, for each version), "maybe" (over it, within noise) or "" (not both over).
        Noise is widened by the stable's overdispersion: failures that come in bursts put a
        minute over the limit by chance far more often than independent ones; before
        `_INCIDENT_TICKS` ticks that is unknown, and nothing is clear."""
        cn, sn = recent.canary_requests, recent.stable_requests
        if not (cn and sn and canary / cn > limit and stable / sn > limit):
            return ""
        if len(self.recent) < _INCIDENT_TICKS:  # how bursty failures are cannot be told yet
            return "maybe"
        z = _INCIDENT_Z * math.sqrt(dispersion.value())
        clearly = _clearly_over(canary, cn, limit, z) and _clearly_over(stable, sn, limit, z)
        return "clearly" if clearly else "maybe"

    def verdict(self) -> Verdict:
        s = self.settings
        t = self.totals
        canary_rate = self._rate("canary_failures", "canary_requests")
        stable_rate = self._rate("stable_failures", "stable_requests")
        canary_slow = self._rate("canary_slow", "canary_requests")
        stable_slow = self._rate("stable_slow", "stable_requests")
        inputs: dict[str, float | int | str | None] = {
            **t,
            "canary_error_rate": round(canary_rate, 6),
            "stable_error_rate": round(stable_rate, 6),
            "canary_slow_rate": round(canary_slow, 6),
            "stable_slow_rate": round(stable_slow, 6),
            "log_e_errors_relative": round(self.errors_relative.log_e, 3),
            "log_e_errors_slo": _log_e(self.errors_slo),
            "log_e_latency_slo": _log_e(self.latency_slo),
            "log_e_latency_relative": round(self.latency_relative.log_e, 3),
            "threshold_errors_relative": round(self.errors_relative.mixture.threshold, 3),
            "threshold_errors_slo": _threshold(self.errors_slo),
            "threshold_latency_slo": _threshold(self.latency_slo),
            "threshold_latency_relative": round(self.latency_relative.mixture.threshold, 3),
            "alpha": s.alpha,
            "slo_error_rate": s.error_rate,
            "slo_latency": s.latency,
        }
        recent = self._recent()
        cn, sn = recent.canary_requests, recent.stable_requests
        recent_canary = recent.canary_failures / cn if cn else 0.0
        recent_stable = recent.stable_failures / sn if sn else 0.0
        recent_canary_slow = recent.canary_slow / cn if cn else 0.0
        recent_stable_slow = recent.stable_slow / sn if sn else 0.0
        inputs.update(
            recent_canary_error_rate=round(recent_canary, 6),
            recent_stable_error_rate=round(recent_stable, 6),
            recent_canary_slow_rate=round(recent_canary_slow, 6),
            recent_stable_slow_rate=round(recent_stable_slow, 6),
        )
        stable_err_ok = s.error_rate is None or recent_stable <= s.error_rate
        stable_lat_ok = recent_stable_slow <= 1.0 - s.latency_quantile

        # Fast path: a canary failing outright while the stable is fine, before min_requests.
        if (
            t["canary_failures"] >= s.fast_path_failures
            and canary_rate >= s.fast_path_rate
            and recent_stable < s.fast_path_rate / 10
        ):
            return Verdict(
                "rollback",
                f"canary failing outright: {t['canary_failures']} of {t['canary_requests']} "
                f"requests failed ({canary_rate:.1%}) vs stable {stable_rate:.2%}",
                inputs,
            )
        if t["canary_requests"] < s.min_requests or t["stable_requests"] < s.min_requests:
            return Verdict(
                "inconclusive",
                f"not enough data: canary {t['canary_requests']}, stable {t['stable_requests']} "
                f"requests (need {s.min_requests} each)",
                inputs,
            )
        if self.errors_relative.rejected():
            return Verdict(
                "rollback",
                f"canary error rate {recent_canary:.2%} is worse than stable "
                f"{recent_stable:.2%} over the last minute "
                f"(e-value {math.exp(self.errors_relative.log_e):.3g} >= "
                f"{math.exp(self.errors_relative.mixture.threshold):.3g})",
                inputs,
            )
        # The SLO tests are fed only while the stable keeps the SLO (see update), so a
        # rejection here is the canary's own breach.
        if self.errors_slo is not None and self.errors_slo.rejected() and stable_err_ok:
            return Verdict(
                "rollback",
                f"canary error rate {recent_canary:.2%} breaches the SLO of "
                f"{s.error_rate:.2%} while stable is at {recent_stable:.2%} (last minute)",
                inputs,
            )
        if self.latency_slo is not None and self.latency_slo.rejected():
            assert s.latency is not None
            if stable_lat_ok or self.latency_relative.rejected():
                return Verdict(
                    "rollback",
                    f"canary p{s.latency_quantile * 100:g} is over the SLO of "
                    f"{s.latency * 1000:g}ms: {recent_canary_slow:.2%} of canary requests "
                    f"slower (stable {recent_stable_slow:.2%}, last minute)",
                    inputs,
                )
        # Both versions clearly over the SLO in the last minute, on enough requests: an
        # incident of the service (or a shared dependency). Pause and say so; blame nobody.
        # Over it within noise (a service that runs close to its SLO crosses it by chance,
        # minute after minute): hold the schedule, but pause nothing.
        within_noise = ""
        if min(cn, sn) >= s.min_requests:
            for canary, stable, limit, dispersion, what, incident in self._shared_slos(recent):
                over = self._both_over(recent, canary, stable, limit, dispersion)
                if over == "clearly":
                    return Verdict("incident", incident, inputs)
                if over and not within_noise:
                    within_noise = what
        if within_noise:
            return Verdict("inconclusive", f"{within_noise}, within noise: holding", inputs)
        return Verdict(
            "healthy",
            f"no regression: canary errors {canary_rate:.2%} vs stable {stable_rate:.2%}",
            inputs,
        )


class _Dispersion:
    """Pearson's dispersion of the stable's per-tick counts against a binomial with the
    pooled rate, over a sliding window of ticks kept as running sums (O(1) a tick): about 1
    when failures are independent, much more when they come in bursts."""

    def __init__(self, ticks: int) -> None:
        self.window: deque[tuple[int, int]] = deque()
        self.ticks = ticks
        self.n = self.k = self.kk = self.nk = self.nn = 0

    def add(self, n: int, k: int) -> None:
        self.window.append((n, k))
        self._apply(n, k, 1)
        if len(self.window) > self.ticks:
            old_n, old_k = self.window.popleft()
            self._apply(old_n, old_k, -1)

    def _apply(self, n: int, k: int, sign: int) -> None:
        self.n += sign * n
        self.k += sign * k
        self.kk += sign * k * k
        self.nk += sign * n * k
        self.nn += sign * n * n

    def value(self) -> float:
        """At least 1; 1 with too little data to tell."""
        used = sum(1 for n, _ in self.window if n) if len(self.window) < 64 else len(self.window)
        if used < 10 or self.n == 0 or self.k < 3:
            return 1.0
        p = self.k / self.n
        chi2 = self.kk - 2.0 * p * self.nk + p * p * self.nn
        expected = self.n * p * (1.0 - p)
        if expected <= 0:
            return 1.0
        return max(1.0, float(chi2 / expected) * used / (used - 1))


def _clearly_over(count: int, n: int, limit: float, z: float) -> bool:
    """Whether `count` in `n` is a rate over `limit` beyond noise: the lower Wilson score
    bound at `z` is over it (at z = 3, one-sided, 0.13% for one version at one look). The
    incident needs both versions so, so a service on its SLO is paused in a vanishing share of
    looks, while a real outage (5% against 1% on a few hundred requests) is clear at once."""
    z2 = z * z
    p = count / n
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    return (centre - margin) / (1.0 + z2 / n) > limit


def _threshold(test: RateTest | None) -> float | None:
    return None if test is None else round(test.mixture.threshold, 3)


def _log_e(test: RateTest | None) -> float | None:
    return None if test is None else round(test.log_e, 3)
