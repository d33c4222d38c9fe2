"""Golden signals over sliding time windows. Pure: the caller passes the current time.

One `SignalWindow` per (route, variant) keeps a slot per second that saw traffic, each with a
request count, an error count and a log-bucketed latency histogram; reading merges the slots of
the last N seconds. Recording is a few integer additions and one `bisect`, cheap enough for the
hot path; idle windows hold no slots. Quantiles are read from the histogram, so their relative
error is bounded by the bucket growth factor (2**(1/8), about 9%).

The canary analysis reads the same windows that the admin API and the dashboard show.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

__all__ = ["LATENCY_BOUNDS", "SignalWindow", "WindowStats", "quantile_from_buckets"]

# Upper bounds in seconds: 50 us to ~105 s, factor 2**(1/8) per bucket; one overflow bucket.
_GROWTH = 2 ** (1 / 8)
LATENCY_BOUNDS: tuple[float, ...] = tuple(0.00005 * _GROWTH**i for i in range(168))
_EMPTY = (0,) * (len(LATENCY_BOUNDS) + 1)


def quantile_from_buckets(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram over LATENCY_BOUNDS, interpolated geometrically
    inside the bucket; None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1]
            lower = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
            if lower <= 0.0:
                return upper
            frac = (rank - seen) / count
            return float(lower * math.pow(upper / lower, frac))
        seen += count
    return LATENCY_BOUNDS[-1]


@dataclass(slots=True)
class _Slot:
    second: int
    requests: int = 0
    errors: int = 0
    latency: list[int] | None = None


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
        return quantile_from_buckets(list(self.latency_buckets), q)

    def count_over(self, threshold: float) -> int:
        """Requests certainly slower than `threshold` (the bucket straddling it is left out,
        so this never over-counts)."""
        start = bisect_left(LATENCY_BOUNDS, threshold) + 1
        return sum(self.latency_buckets[start:])


class SignalWindow:
    """Per-second slots of traffic, errors and latency for the last `horizon` seconds."""

    __slots__ = ("_slots", "horizon")

    def __init__(self, horizon: int = 300) -> None:
        self.horizon = horizon
        self._slots: deque[_Slot] = deque()

    def record(self, now: float, latency: float, error: bool) -> None:
        second = int(now)
        slots = self._slots
        if slots and slots[-1].second == second:
            slot = slots[-1]
        else:
            slot = _Slot(second)
            slots.append(slot)
            cutoff = second - self.horizon
            while slots and slots[0].second <= cutoff:
                slots.popleft()
        slot.requests += 1
        if error:
            slot.errors += 1
        histogram = slot.latency
        if histogram is None:
            histogram = slot.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        histogram[bisect_left(LATENCY_BOUNDS, latency)] += 1

    def _between(self, first: int, last: int) -> list[_Slot]:
        """The slots of the whole seconds `first` to `last`, newest first."""
        out: list[_Slot] = []
        for slot in reversed(self._slots):
            if slot.second > last:
                continue
            if slot.second < first:
                break
            out.append(slot)
        return out

    def stats(self, now: float, seconds: int) -> WindowStats:
        """Totals of the last `seconds` whole seconds, including the current one."""
        last = int(now)
        return self.between(last - seconds + 1, last)

    def counts(self, now: float, seconds: int) -> tuple[int, int]:
        """(requests, errors) of the last `seconds` whole seconds, like `stats` without the
        latency histogram, which is most of the cost of reading minutes of slots."""
        last = int(now)
        slots = self._between(last - seconds + 1, last)
        return sum(slot.requests for slot in slots), sum(slot.errors for slot in slots)

    def between(self, first: int, last: int) -> WindowStats:
        """Totals of the whole seconds `first` to `last`, both included."""
        slots = self._between(first, last)
        histograms = [slot.latency for slot in slots if slot.latency is not None]
        # Bucket by bucket in C (zip, sum): the supervisor reads minutes of slots every second,
        # and a Python loop over them stalled the event loop for milliseconds.
        merged = tuple(map(sum, zip(*histograms, strict=True))) if histograms else _EMPTY
        requests = sum(slot.requests for slot in slots)
        errors = sum(slot.errors for slot in slots)
        return WindowStats(float(max(0, last - first + 1)), requests, errors, merged)
