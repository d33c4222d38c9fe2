"""Pure tests of proxy/signals.py: sliding windows driven by an injected time."""

from __future__ import annotations

import math
import random

import pytest

from proxy.signals import LATENCY_BOUNDS, SignalWindow, quantile_from_buckets

GROWTH = 2 ** (1 / 8)  # the histogram's bucket ratio: the bound on a quantile's relative error


def true_quantile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `values`."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def within_bucket_error(estimate: float | None, truth: float) -> bool:
    return estimate is not None and truth / GROWTH <= estimate <= truth * GROWTH


def test_counts_errors_and_rate() -> None:
    """Requests and errors add up, and rate is requests per second of the window."""
    window = SignalWindow(horizon=300)
    t = 1000.0
    for i in range(120):
        window.record(t + i * 0.5, latency=0.01, error=i % 4 == 0)  # 2 per second for 60 s
    stats = window.stats(now=t + 59.9, seconds=60)
    assert stats.requests == 120
    assert stats.errors == 30
    assert stats.error_rate == pytest.approx(0.25)
    assert stats.rate == pytest.approx(2.0)
    assert sum(stats.latency_buckets) == 120


def test_empty_window() -> None:
    """No traffic: zero counts, zero rates and no quantiles rather than made-up numbers."""
    stats = SignalWindow().stats(now=500.0, seconds=60)
    assert (stats.requests, stats.errors, stats.rate, stats.error_rate) == (0, 0, 0.0, 0.0)
    assert stats.quantile(0.5) is None
    assert stats.quantile(0.99) is None
    assert quantile_from_buckets([], 0.5) is None


def test_window_with_only_old_traffic_reads_as_empty() -> None:
    """Traffic that fell out of the asked-for window is not counted and gives None quantiles."""
    window = SignalWindow(horizon=300)
    window.record(100.0, 0.2, error=True)
    stats = window.stats(now=200.0, seconds=60)
    assert (stats.requests, stats.errors) == (0, 0)
    assert stats.quantile(0.5) is None


@pytest.mark.parametrize(
    "latencies",
    [
        [0.001 * (i + 1) for i in range(1000)],  # uniform 1 ms .. 1 s
        [random.Random(7).lognormvariate(math.log(0.05), 0.8) for _ in range(20000)],
        [0.002] * 900 + [0.5] * 100,  # bimodal: fast bulk, slow tail
    ],
    ids=["uniform", "lognormal", "bimodal"],
)
def test_quantiles_are_within_the_histogram_bound(latencies: list[float]) -> None:
    """p50, p90 and p99 read from the window are within one bucket ratio (~9%) of the truth."""
    window = SignalWindow()
    for i, latency in enumerate(latencies):
        window.record(5000.0 + i * 50 / len(latencies), latency, error=False)
    stats = window.stats(now=5050.0, seconds=60)
    assert stats.requests == len(latencies)
    for q in (0.5, 0.9, 0.99):
        truth = true_quantile(latencies, q)
        assert within_bucket_error(stats.quantile(q), truth), (q, stats.quantile(q), truth)


def test_quantiles_are_ordered() -> None:
    """Higher quantiles are never below lower ones."""
    window = SignalWindow()
    rng = random.Random(3)
    for i in range(5000):
        window.record(10.0 + i / 1000, rng.expovariate(20.0), error=False)
    stats = window.stats(now=15.0, seconds=60)
    values = [stats.quantile(q) for q in (0.1, 0.5, 0.9, 0.99, 0.999)]
    assert all(v is not None for v in values)
    assert values == sorted(values)  # type: ignore[type-var]


def test_extreme_latencies_stay_in_range() -> None:
    """Latencies below the first bound or beyond the last are clamped, never lost."""
    window = SignalWindow()
    window.record(1.0, 0.0, error=False)
    window.record(1.0, 1000.0, error=False)
    stats = window.stats(now=1.0, seconds=1)
    assert stats.requests == 2
    assert stats.quantile(0.0) == LATENCY_BOUNDS[0]
    assert stats.quantile(1.0) == LATENCY_BOUNDS[-1]


def test_slots_older_than_the_horizon_are_dropped() -> None:
    """Once time moves past the horizon, older traffic is gone even from a wider read."""
    window = SignalWindow(horizon=60)
    window.record(40.0, 0.01, error=True)  # second 40
    window.record(41.0, 0.01, error=False)  # second 41: still inside 41..100
    window.record(100.0, 0.01, error=False)
    stats = window.stats(now=100.0, seconds=300)
    assert stats.requests == 2
    assert stats.errors == 0


def test_horizon_bounds_memory_over_hours() -> None:
    """A window fed for two simulated hours reports only its horizon's worth of traffic."""
    window = SignalWindow(horizon=300)
    for second in range(7200):
        window.record(float(second), 0.01, error=second % 10 == 0)
    everything = window.stats(now=7199.0, seconds=7200)
    assert everything.requests == 300
    assert everything.errors == 30


def test_sixty_and_three_hundred_second_windows_differ() -> None:
    """A 60 s read sees only the recent burst; a 300 s read also sees the older quiet period."""
    window = SignalWindow(horizon=300)
    now = 10_000.0
    for second in range(240):  # minutes 1-4 of the 5: 1 request/s, fast, no errors
        window.record(now - 299 + second, 0.01, error=False)
    for second in range(60):  # the last minute: 5 requests/s, slow, half failing
        for k in range(5):
            window.record(now - 59 + second + k / 10, 0.4, error=k % 2 == 0)
    short = window.stats(now=now, seconds=60)
    long = window.stats(now=now, seconds=300)
    assert (short.requests, short.errors) == (300, 180)
    assert (long.requests, long.errors) == (540, 180)
    assert short.rate == pytest.approx(5.0)
    assert long.rate == pytest.approx(1.8)
    assert short.error_rate == pytest.approx(0.6)
    assert long.error_rate == pytest.approx(180 / 540)
    assert within_bucket_error(short.quantile(0.5), 0.4)
    assert within_bucket_error(long.quantile(0.25), 0.01)


def test_window_includes_the_current_second() -> None:
    """`seconds=1` covers exactly the current whole second."""
    window = SignalWindow()
    window.record(99.9, 0.01, error=False)
    window.record(100.2, 0.01, error=False)
    window.record(100.7, 0.01, error=True)
    stats = window.stats(now=100.99, seconds=1)
    assert (stats.requests, stats.errors) == (2, 1)
    assert window.stats(now=100.99, seconds=2).requests == 3


def test_counts_agree_with_stats_over_any_span() -> None:
    """`counts` (read every supervisor tick for the burn-rate gate) is `stats` without the
    histogram: the same requests and errors over every span, empty ones included."""
    window = SignalWindow(horizon=300)
    for second in range(0, 400, 3):
        for i in range(second % 7 + 1):
            window.record(second + 0.1 * i, 0.01 * (i + 1), i % 3 == 0)
    for now in (0.5, 10.2, 150.0, 399.9, 420.0):
        for seconds in (1, 5, 60, 300):
            stats = window.stats(now, seconds)
            assert window.counts(now, seconds) == (stats.requests, stats.errors)


def test_any_span_reads_what_was_recorded_in_it() -> None:
    """The running totals against a plain record of every request: for random traffic (gaps,
    bursts, a clock that steps back within a second) and random reads (spans short and long,
    empty, reaching past the horizon or into the future; latencies in more buckets over time),
    counts, errors and every latency bucket agree with the requests recorded in the span and
    within the horizon."""
    rng = random.Random(7)
    horizon = 40
    window = SignalWindow(horizon=horizon)
    recorded: list[tuple[int, int, bool]] = []  # (second, bucket, error)
    now = 1000.0
    newest = int(now)
    for step in range(3000):
        now += rng.choice((0.0, 0.01, 0.3, 1.0, 7.0)) if rng.random() < 0.9 else 45.0
        at = now - 0.5 if rng.random() < 0.05 else now  # stepped back: counts in the open slot
        # Latencies reaching new buckets, below and above, as time goes on (the totals keep
        # only the range of buckets used so far).
        latency = rng.choice((0.004, 0.02, 0.0001, 0.3, 500.0, 2.0)[: 2 + step // 600])
        error = rng.random() < 0.2
        window.record(at, latency, error)
        second = max(int(at), newest)
        if second > newest:  # a new second: what falls out of the horizon is gone
            recorded = [r for r in recorded if r[0] > second - horizon]
            newest = second
        bucket = next(
            (i for i, b in enumerate(LATENCY_BOUNDS) if latency <= b), len(LATENCY_BOUNDS)
        )
        recorded.append((second, bucket, error))
        if step % 7:
            continue
        last = newest + rng.randint(-50, 3)
        first = last - rng.choice((0, 1, 4, 9, 59, 299, 1000)) + rng.randint(0, 2)
        inside = [r for r in recorded if first <= r[0] <= last]
        stats = window.between(first, last)
        assert stats.requests == len(inside)
        assert stats.errors == sum(r[2] for r in inside)
        expected = [0] * (len(LATENCY_BOUNDS) + 1)
        for r in inside:
            expected[r[1]] += 1
        assert list(stats.latency_buckets) == expected
        assert window.counts(float(last) + 0.5, last - first + 1) == (stats.requests, stats.errors)


def test_quantiles_match_a_walk_over_the_buckets() -> None:
    """The bisection over running totals finds the bucket a walk over the buckets finds."""
    rng = random.Random(11)
    for _ in range(300):
        counts = [rng.choice((0, 0, 0, 1, 5, 1000)) for _ in range(len(LATENCY_BOUNDS) + 1)]
        for q in (0.0, 0.001, 0.5, 0.95, 0.99, 1.0):
            assert quantile_from_buckets(counts, q) == _walked_quantile(counts, q)
    assert quantile_from_buckets([0] * (len(LATENCY_BOUNDS) + 1), 0.5) is None


def _walked_quantile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = LATENCY_BOUNDS[min(i, len(LATENCY_BOUNDS) - 1)]
            lower = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
            if lower <= 0.0:
                return upper
            return float(lower * math.pow(upper / lower, (rank - seen) / count))
        seen += count
    return LATENCY_BOUNDS[-1]
