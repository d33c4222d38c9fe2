"""Circuit breakers: a pure state machine, and a small async wrapper for library use.

`Breaker` is pure: every method takes `now` (seconds, from any monotonic clock) and returns
what changed; it never sleeps, awaits or reads a clock. The proxy keeps one per upstream
endpoint; the event sinks keep one per sink; applications can guard their own calls with
`CircuitBreaker` (`async with breaker:` or `@breaker`), which only adds a clock and exceptions.

States: closed -> open -> half-open -> closed (or back to open).
  * closed trips to open on the first of: `consecutive_failures` failures in a row; a failure
    rate over `failure_rate` in the last `window` once `min_calls` calls were seen; a slow-call
    rate over `slow_call_rate` (calls longer than `slow_call_duration`) on the same terms.
  * open lasts `open_base * 2**(k-1)` for the k-th trip in a row, capped at `open_max`, with
    +-`jitter` spread so a fleet of proxies does not probe in lock step.
  * half-open admits `half_open_probes` calls at once. Each holds a lease; an expired lease is a
    failure, so a probe that never returns cannot wedge the breaker. `close_after` successes in
    a row close it; any failure opens it again with a longer open time.
  * every call carries the generation it started in; outcomes of calls that started before a
    transition do not decide the new state.
Outcomes the proxy must not count (4xx, a client that went away, requests it shed itself) are
reported with `release()`, which frees a probe slot and counts nothing.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar

__all__ = [
    "Breaker",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "Permit",
    "Transition",
]

BreakerState = Literal["closed", "open", "half_open"]
STATE_CODE: dict[BreakerState, int] = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window: float = 10.0
    min_calls: int = 20
    slow_call_duration: float | None = None
    slow_call_rate: float = 0.8
    open_base: float = 5.0
    open_max: float = 300.0
    jitter: float = 0.1
    half_open_probes: int = 1
    probe_lease: float = 30.0
    close_after: int = 3


class Permit(NamedTuple):
    """A call admitted by the breaker; hand it back with the outcome. (A NamedTuple: one is
    made per proxied request, in half the time of a frozen dataclass.)"""

    generation: int
    probe: bool
    started: float


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change, for metrics, logs and events."""

    old: BreakerState
    new: BreakerState
    at: float
    reason: str
    open_until: float | None = None


@dataclass(slots=True)
class _Second:
    second: int
    calls: int = 0
    failures: int = 0
    slow: int = 0


@dataclass
class Breaker:
    """One breaker. Not thread-safe; the proxy uses it from its event loop only."""

    settings: BreakerSettings = field(default_factory=BreakerSettings)
    rng: Callable[[], float] = field(default=random.random, repr=False)
    state: BreakerState = "closed"
    generation: int = 0
    open_until: float = 0.0
    trips_in_a_row: int = 0
    consecutive: int = 0
    probe_successes: int = 0
    _seconds: deque[_Second] = field(default_factory=deque, repr=False)
    # Totals of `_seconds`, kept as they change, so reading the window is O(1).
    _calls: int = 0
    _failures: int = 0
    _slow: int = 0
    _leases: dict[int, float] = field(default_factory=dict, repr=False)
    _next_lease: int = 0

    # -- admission ---------------------------------------------------------------------------

    def poll(self, now: float) -> Transition | None:
        """Advance time-driven changes: open -> half-open when due, expired probe leases."""
        if self.state == "open" and now >= self.open_until:
            return self._move("half_open", now, "open time elapsed")
        if self.state == "half_open":
            expired = [k for k, until in self._leases.items() if until <= now]
            if expired:
                for key in expired:
                    del self._leases[key]
                return self._trip(now, "half-open probe lease expired")
        return None

    def allows(self, now: float) -> bool:
        """Whether a call would be admitted now (without taking a probe slot)."""
        self.poll(now)
        if self.state == "closed":
            return True
        if self.state == "half_open":
            return len(self._leases) < self.settings.half_open_probes
        return False

    def acquire(self, now: float) -> Permit | None:
        """Admit a call, or None when open (or half-open with every probe slot taken)."""
        if self.state != "closed":  # nothing time-driven can change a closed breaker
            self.poll(now)
        if self.state == "closed":
            return Permit(self.generation, False, now)
        if self.state == "half_open" and len(self._leases) < self.settings.half_open_probes:
            self._next_lease += 1
            self._leases[self._next_lease] = now + self.settings.probe_lease
            return Permit(self.generation, True, now)
        return None

    # -- outcomes ----------------------------------------------------------------------------

    def release(self, permit: Permit) -> None:
        """The call ended in a way that says nothing about the upstream (4xx, client gone)."""
        if permit.probe and permit.generation == self.generation:
            self._drop_one_lease()

    def success(self, permit: Permit, now: float) -> Transition | None:
        duration = now - permit.started
        slow = self._is_slow(duration)
        if permit.generation != self.generation:
            return None
        if self.state == "half_open":
            self._drop_one_lease()
            if slow:
                return self._trip(now, f"slow half-open probe ({duration:.3f}s)")
            self.probe_successes += 1
            if self.probe_successes >= self.settings.close_after:
                self.trips_in_a_row = 0
                return self._move("closed", now, f"{self.probe_successes} probes succeeded")
            return None
        if self.state != "closed":
            return None
        self.consecutive = 0
        self._count(now, failed=False, slow=slow)
        if not self._failures and not self._slow:
            return None  # nothing in the window could trip it (the common case)
        return self._check_rates(now)

    def failure(self, permit: Permit, now: float, reason: str = "failure") -> Transition | None:
        if permit.generation != self.generation:
            return None
        if self.state == "half_open":
            self._drop_one_lease()
            return self._trip(now, f"half-open probe failed: {reason}")
        if self.state != "closed":
            return None
        self.consecutive += 1
        self._count(now, failed=True, slow=self._is_slow(now - permit.started))
        if self.consecutive >= self.settings.consecutive_failures:
            return self._trip(now, f"{self.consecutive} consecutive failures ({reason})")
        return self._check_rates(now)

    # -- reading -----------------------------------------------------------------------------

    def window_counts(self, now: float) -> tuple[int, int, int]:
        """(calls, failures, slow calls) in the sliding window."""
        self._evict(now)
        return self._calls, self._failures, self._slow

    # -- internals ---------------------------------------------------------------------------

    def _is_slow(self, duration: float) -> bool:
        limit = self.settings.slow_call_duration
        return limit is not None and duration > limit

    def _drop_one_lease(self) -> None:
        if self._leases:
            del self._leases[next(iter(self._leases))]

    def _evict(self, now: float) -> None:
        cutoff = now - self.settings.window
        seconds = self._seconds
        while seconds and seconds[0].second + 1 <= cutoff:
            gone = seconds.popleft()
            self._calls -= gone.calls
            self._failures -= gone.failures
            self._slow -= gone.slow

    def _count(self, now: float, failed: bool, slow: bool) -> None:
        second = int(now)
        seconds = self._seconds
        if not seconds or seconds[-1].second != second:
            seconds.append(_Second(second))
        bucket = seconds[-1]
        bucket.calls += 1
        bucket.failures += failed
        bucket.slow += slow
        self._calls += 1
        self._failures += failed
        self._slow += slow

    def _check_rates(self, now: float) -> Transition | None:
        calls, failures, slow = self.window_counts(now)
        s = self.settings
        if calls < s.min_calls:
            return None
        if failures / calls >= s.failure_rate:
            return self._trip(now, f"failure rate {failures}/{calls} over {s.window:g}s")
        if s.slow_call_duration is not None and slow / calls >= s.slow_call_rate:
            return self._trip(now, f"slow-call rate {slow}/{calls} over {s.slow_call_duration:g}s")
        return None

    def _trip(self, now: float, reason: str) -> Transition:
        self.trips_in_a_row += 1
        s = self.settings
        base = min(s.open_base * 2 ** (self.trips_in_a_row - 1), s.open_max)
        spread = 1.0 + s.jitter * (2.0 * self.rng() - 1.0)
        self.open_until = now + base * spread
        return self._move("open", now, reason)

    def _move(self, new: BreakerState, now: float, reason: str) -> Transition:
        old = self.state
        self.state = new
        self.generation += 1
        self.consecutive = 0
        self.probe_successes = 0
        self._leases.clear()
        self._seconds.clear()
        self._calls = self._failures = self._slow = 0
        return Transition(old, new, now, reason, self.open_until if new == "open" else None)


class CircuitOpenError(Exception):
    """Raised by `CircuitBreaker` instead of making a call while the circuit is open."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_after:.1f}s")
        self.name = name
        self.retry_after = retry_after


P = ParamSpec("P")
T = TypeVar("T")


class CircuitBreaker:
    """A `Breaker` for application code::

        db_breaker = CircuitBreaker("orders-db", BreakerSettings(consecutive_failures=3))

        async with db_breaker:               # CircuitOpenError when open
            rows = await db.fetch(query)

        @db_breaker                          # the same, as a decorator
        async def load_order(order_id): ...

    Exceptions count as failures except those in `ignore` (which count as nothing) and
    CancelledError (the caller went away). Transitions go to `on_transition`, if given.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        ignore: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.breaker = Breaker(settings or BreakerSettings())
        self.ignore = ignore
        self.clock = clock
        self.on_transition = on_transition
        # Concurrent tasks share one breaker; each task's calls (possibly nested) keep their
        # own permits.
        self._permits: dict[asyncio.Task[Any] | None, list[Permit]] = {}

    @property
    def state(self) -> BreakerState:
        self._emit(self.breaker.poll(self.clock()))
        return self.breaker.state

    def _emit(self, transition: Transition | None) -> None:
        if transition is not None and self.on_transition is not None:
            self.on_transition(self.name, transition)

    async def __aenter__(self) -> CircuitBreaker:
        now = self.clock()
        self._emit(self.breaker.poll(now))
        permit = self.breaker.acquire(now)
        if permit is None:
            raise CircuitOpenError(self.name, max(0.0, self.breaker.open_until - now))
        self._permits.setdefault(asyncio.current_task(), []).append(permit)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        task = asyncio.current_task()
        stack = self._permits[task]
        permit = stack.pop()
        if not stack:
            del self._permits[task]
        now = self.clock()
        if exc_type is None:
            self._emit(self.breaker.success(permit, now))
        elif issubclass(exc_type, asyncio.CancelledError | GeneratorExit) or (
            self.ignore and issubclass(exc_type, self.ignore)
        ):
            self.breaker.release(permit)
        else:
            self._emit(self.breaker.failure(permit, now, exc_type.__name__))

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            async with self:
                return await func(*args, **kwargs)

        return guarded
