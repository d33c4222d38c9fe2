"""Golden signals over sliding time windows. Pure: the caller passes the current time.

One `SignalWindow` per (route, variant) keeps, for each second that saw traffic, a request
count, an error count and a log-bucketed latency histogram, as running totals; reading the last
N seconds subtracts two of them. Recording is a few integer additions and one `bisect`, cheap
enough for the hot path (the running total is taken once a second); idle windows hold nothing.
Quantiles are read from the histogram, so their relative error is bounded by the bucket growth
factor (2**(1/8), about 9%).

The canary analysis reads the same windows that the admin API and the dashboard show.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, sub

__all__ = ["LATENCY_BOUNDS", "SignalWindow", "WindowStats", "quantile_from_buckets"]

# Upper bounds in seconds: 50 us to ~105 s, factor 2**(1/8) per bucket; one overflow bucket.
_GROWTH = 2 ** (1 / 8)
LATENCY_BOUNDS: tuple[float, ...] = tuple(0.00005 * _GROWTH**i for i in range(168))
_EMPTY = (0,) * (len(LATENCY_BOUNDS) + 1)


def quantile_from_buckets(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram over LATENCY_BOUNDS, interpolated geometrically
    inside the bucket; None when empty."""
    return _quantile(list(accumulate(counts)), q)


def _quantile(running: list[int], q: float) -> float | None:
    """`quantile_from_buckets` over the histogram's running totals (taken in C, and the bucket
    found by bisection: the dashboard reads three quantiles of every route each second)."""
    total = running[-1] if running else 0
    if total == 0:
        return None
    rank = q * total
    # The first bucket whose running total reaches the rank (at rank 0, the first non-empty).
    i = bisect_left(running, rank) if rank > 0 else bisect_right(running, 0)
    if i >= len(running):
        return LATENCY_BOUNDS[-1]
    upper = LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1]
    lower = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
    if lower <= 0.0:
        return upper
    seen = running[i - 1]
    frac = (rank - seen) / (running[i] - seen)
    return float(lower * math.pow(upper / lower, frac))


@dataclass(slots=True)
class _Slot:
    """The second being recorded: its own counts."""

    second: int
    requests: int = 0
    errors: int = 0
    latency: list[int] | None = None


@dataclass(frozen=True, slots=True)
class _Total:
    """Everything the window recorded up to and including `second`: running totals, so the
    traffic of any run of seconds is the difference of two of them.

    The latency totals are kept only from bucket `low` to the last bucket ever used (every
    other bucket is zero): a service's latencies span a few dozen of the 170 buckets, and five
    minutes of whole histograms held half a megabyte per busy (route, variant)."""

    second: int
    requests: int
    errors: int
    low: int
    latency: array[int]

    def spread(self, low: int, high: int) -> Iterable[int]:
        """The latency totals of buckets `low` to `high` (excluded), a range holding this
        total's own."""
        if not self.latency:
            return repeat(0, high - low)
        return chain(
            repeat(0, self.low - low),
            self.latency,
            repeat(0, high - self.low - len(self.latency)),
        )


def _second(total: _Total) -> int:
    return total.second


_ZERO = _Total(-(2**62), 0, 0, 0, array("q"))


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What a window saw over its last `seconds`."""

    seconds: float
    requests: int
    errors: int
    latency_buckets: tuple[int, ...]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        return self.quantiles(q)[0]

    def quantiles(self, *qs: float) -> list[float | None]:
        """Several quantiles for the cost of one."""
        if not self.requests:  # every request recorded is in one bucket: nothing to find
            return [None] * len(qs)
        running = list(accumulate(self.latency_buckets))
        return [_quantile(running, q) for q in qs]

    def count_over(self, threshold: float) -> int:
        """Requests certainly slower than `threshold` (the bucket straddling it is left out,
        so this never over-counts)."""
        start = bisect_left(LATENCY_BOUNDS, threshold) + 1
        return sum(self.latency_buckets[start:])


class SignalWindow:
    """Per-second traffic, errors and latency for the last `horizon` seconds.

    The second being recorded is a slot of its own counts. When the next second begins, the
    slot is sealed into a running total (all the window ever recorded up to that second), so a
    read of any span costs two look-ups and one subtraction, whatever its length: reading five
    minutes of every route each second (the dashboard, the admin API) merged 300 histograms per
    route, and held the event loop for a second with 1,000 busy routes. Totals older than the
    horizon are dropped; the last one dropped stays as the base the others count from."""

    __slots__ = ("_base", "_open", "_totals", "horizon")

    def __init__(self, horizon: int = 300) -> None:
        self.horizon = horizon
        self._open: _Slot | None = None
        self._totals: deque[_Total] = deque()  # sealed seconds, oldest first
        self._base = _ZERO  # the totals before the oldest kept

    def record(self, now: float, latency: float, error: bool) -> None:
        second = int(now)
        slot = self._open
        if slot is None or second > slot.second:  # (a clock that stepped back: the open slot)
            if slot is not None:
                self._seal(slot, second - self.horizon)
            slot = self._open = _Slot(second)
        slot.requests += 1
        if error:
            slot.errors += 1
        histogram = slot.latency
        if histogram is None:
            histogram = slot.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        histogram[bisect_left(LATENCY_BOUNDS, latency)] += 1

    def _seal(self, slot: _Slot, cutoff: int) -> None:
        """Once a second: the finished slot into the running totals, and the totals of seconds
        at or before `cutoff` dropped."""
        totals = self._totals
        last = totals[-1] if totals else self._base
        histogram = slot.latency
        assert histogram is not None  # a slot exists for a recorded request
        used = bytes(map(bool, histogram))  # in C: where the slot's non-zero buckets are
        low, high = used.find(1), used.rfind(1) + 1
        if last.latency:
            low, high = min(low, last.low), max(high, last.low + len(last.latency))
        latency = array("q", map(add, last.spread(low, high), histogram[low:high]))
        totals.append(
            _Total(
                slot.second, last.requests + slot.requests, last.errors + slot.errors, low, latency
            )
        )
        while totals and totals[0].second <= cutoff:
            self._base = totals.popleft()

    def _upto(self, second: int) -> _Total:
        """The running totals up to and including `second` (sealed seconds only)."""
        totals = self._totals
        index = bisect_right(totals, second, key=_second)
        return totals[index - 1] if index else self._base

    def stats(self, now: float, seconds: int) -> WindowStats:
        """Totals of the last `seconds` whole seconds, including the current one."""
        last = int(now)
        return self.between(last - seconds + 1, last)

    def counts(self, now: float, seconds: int) -> tuple[int, int]:
        """(requests, errors) of the last `seconds` whole seconds, like `stats` without the
        latency histogram."""
        last = int(now)
        first = last - seconds + 1
        if last < first:
            return 0, 0
        high, low = self._upto(last), self._upto(first - 1)
        requests, errors = high.requests - low.requests, high.errors - low.errors
        slot = self._open
        if slot is not None and first <= slot.second <= last:
            requests += slot.requests
            errors += slot.errors
        return requests, errors

    def between(self, first: int, last: int) -> WindowStats:
        """Totals of the whole seconds `first` to `last`, both included; what is older than the
        horizon is gone."""
        span = float(max(0, last - first + 1))
        if last < first:
            return WindowStats(span, 0, 0, _EMPTY)
        high, low = self._upto(last), self._upto(first - 1)
        slot = self._open
        if slot is None or not first <= slot.second <= last:
            slot = None
        if high is low:
            if slot is None:
                return WindowStats(span, 0, 0, _EMPTY)
            assert slot.latency is not None
            return WindowStats(span, slot.requests, slot.errors, tuple(slot.latency))
        requests, errors = high.requests - low.requests, high.errors - low.errors
        # An older total's buckets are within a newer one's: the ranges only grow.
        end = high.low + len(high.latency)
        merged: Iterable[int] = chain(
            repeat(0, high.low),
            map(sub, high.latency, low.spread(high.low, end)),
            repeat(0, len(_EMPTY) - end),
        )
        if slot is not None:
            assert slot.latency is not None
            requests += slot.requests
            errors += slot.errors
            merged = map(add, merged, slot.latency)
        return WindowStats(span, requests, errors, tuple(merged))
