"""The circuit breaker state machine, pure with an injected clock, and its library wrapper."""

from __future__ import annotations

import asyncio

import pytest

from proxy.breaker import Breaker, BreakerSettings, CircuitBreaker, CircuitOpenError


def _fail(breaker: Breaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        permit = breaker.acquire(now)
        assert permit is not None
        breaker.failure(permit, now)


def _ok(breaker: Breaker, now: float, n: int = 1, duration: float = 0.0) -> None:
    for _ in range(n):
        permit = breaker.acquire(now)
        assert permit is not None
        breaker.success(permit, now + duration)


def test_consecutive_failures_trip() -> None:
    """Five gateway failures in a row open the breaker; four do not."""
    breaker = Breaker(BreakerSettings(consecutive_failures=5))
    _fail(breaker, 0.0, 4)
    assert breaker.state == "closed"
    _ok(breaker, 0.0)
    _fail(breaker, 0.0, 4)
    assert breaker.state == "closed"  # the success reset the run
    _fail(breaker, 0.0)
    assert breaker.state == "open"
    assert breaker.acquire(0.1) is None


def test_failure_rate_needs_min_calls() -> None:
    """A 50% failure rate trips only once min_calls calls are in the window."""
    breaker = Breaker(BreakerSettings(consecutive_failures=100, min_calls=20))
    for i in range(19):
        (_fail if i % 2 else _ok)(breaker, float(i) * 0.1)
    assert breaker.state == "closed"
    _fail(breaker, 2.0)
    assert breaker.state == "open"


def test_failure_rate_window_slides() -> None:
    """Failures older than the window no longer count towards the rate."""
    breaker = Breaker(BreakerSettings(consecutive_failures=100, min_calls=20, window=10))
    _fail(breaker, 0.0, 9)
    _ok(breaker, 0.0, 1)
    _ok(breaker, 20.0, 19)  # the early failures have left the window
    _fail(breaker, 20.0, 1)
    assert breaker.state == "closed"
    assert breaker.window_counts(20.0) == (20, 1, 0)


def test_slow_calls_trip() -> None:
    """Calls slower than slow_call_duration trip the breaker at the slow-call rate."""
    settings = BreakerSettings(min_calls=10, slow_call_duration=0.5, slow_call_rate=0.8)
    breaker = Breaker(settings)
    _ok(breaker, 0.0, 2, duration=0.1)
    _ok(breaker, 0.0, 7, duration=2.0)
    assert breaker.state == "closed"
    _ok(breaker, 0.0, 1, duration=2.0)
    assert breaker.state == "open"


def test_open_time_grows_and_is_capped() -> None:
    """Open time is base * 2**(k-1) for the k-th trip in a row, capped, jittered within bounds."""
    settings = BreakerSettings(
        consecutive_failures=1, open_base=5, open_max=40, jitter=0.1, close_after=1
    )
    breaker = Breaker(settings, rng=lambda: 1.0)  # the largest jitter
    _fail(breaker, 0.0)
    opened_at, lengths = 0.0, []
    for _ in range(5):
        lengths.append(breaker.open_until - opened_at)
        opened_at = breaker.open_until
        probe = breaker.acquire(opened_at)  # half-open now; the probe fails
        assert probe is not None
        breaker.failure(probe, opened_at)
    assert lengths == pytest.approx([5.5, 11.0, 22.0, 44.0, 44.0])
    low = Breaker(settings, rng=lambda: 0.0)
    _fail(low, 0.0)
    assert low.open_until == pytest.approx(4.5)


def test_half_open_probes_then_close() -> None:
    """After the open time, one probe at a time is admitted; three successes close it."""
    breaker = Breaker(BreakerSettings(consecutive_failures=1, jitter=0, close_after=3))
    _fail(breaker, 0.0)
    assert breaker.acquire(4.9) is None
    probe = breaker.acquire(5.0)
    assert probe is not None and probe.probe and breaker.state == "half_open"
    assert breaker.acquire(5.0) is None  # one probe at a time
    for _ in range(2):
        breaker.success(probe, 5.1)
        probe = breaker.acquire(5.1)
        assert probe is not None
    transition = breaker.success(probe, 5.2)
    assert transition is not None and transition.new == "closed"
    assert breaker.trips_in_a_row == 0


def test_half_open_failure_reopens_longer() -> None:
    """A failed probe opens the breaker again for twice as long."""
    breaker = Breaker(BreakerSettings(consecutive_failures=1, jitter=0, open_base=5))
    _fail(breaker, 0.0)
    probe = breaker.acquire(5.0)
    assert probe is not None
    transition = breaker.failure(probe, 5.0)
    assert transition is not None and transition.new == "open"
    assert breaker.open_until == pytest.approx(15.0)


def test_expired_probe_lease_counts_as_failure() -> None:
    """A probe that never reports back cannot wedge the breaker half-open."""
    breaker = Breaker(BreakerSettings(consecutive_failures=1, jitter=0, probe_lease=30))
    _fail(breaker, 0.0)
    assert breaker.acquire(5.0) is not None  # the probe hangs forever
    assert breaker.acquire(20.0) is None
    transition = breaker.poll(35.0)
    assert transition is not None and transition.new == "open"
    assert "lease expired" in transition.reason


def test_old_generation_outcomes_are_ignored() -> None:
    """Calls that started before a transition do not decide the new state."""
    breaker = Breaker(BreakerSettings(consecutive_failures=1, jitter=0, close_after=1))
    old_call = breaker.acquire(0.0)
    assert old_call is not None
    _fail(breaker, 0.0)  # opens
    probe = breaker.acquire(5.0)
    assert probe is not None
    assert breaker.failure(old_call, 5.0) is None  # a pre-open call failing late: ignored
    assert breaker.state == "half_open"
    breaker.success(probe, 5.0)
    assert breaker.state == "closed"
    assert breaker.success(probe, 5.0) is None  # a half-open call finishing after the close


def test_release_counts_nothing() -> None:
    """4xx answers and client disconnects free a probe slot without deciding anything."""
    breaker = Breaker(BreakerSettings(consecutive_failures=1, jitter=0))
    _fail(breaker, 0.0)
    probe = breaker.acquire(5.0)
    assert probe is not None
    breaker.release(probe)
    assert breaker.state == "half_open"
    assert breaker.acquire(5.0) is not None


async def test_library_context_manager_and_decorator() -> None:
    """`async with` and the decorator count failures, skip ignored errors, and refuse when open."""
    now = [0.0]
    seen: list[str] = []
    guard = CircuitBreaker(
        "db",
        BreakerSettings(consecutive_failures=2, jitter=0, open_base=10),
        ignore=(KeyError,),
        clock=lambda: now[0],
        on_transition=lambda name, t: seen.append(f"{name}:{t.new}"),
    )

    @guard
    async def query(fail: type[Exception] | None) -> str:
        if fail is not None:
            raise fail("boom")
        return "rows"

    assert await query(None) == "rows"
    for _ in range(3):
        with pytest.raises(KeyError):
            await query(KeyError)
    assert guard.state == "closed"
    for _ in range(2):
        with pytest.raises(ConnectionError):
            async with guard:
                raise ConnectionError("db down")
    assert guard.state == "open"
    with pytest.raises(CircuitOpenError) as refused:
        await query(None)
    assert refused.value.retry_after == pytest.approx(10.0)
    now[0] = 10.0
    assert await query(None) == "rows"
    assert seen == ["db:open", "db:half_open"]


async def test_library_concurrent_tasks_keep_their_permits() -> None:
    """Concurrent tasks through one breaker each report their own outcome."""
    guard = CircuitBreaker("q", BreakerSettings(consecutive_failures=3))
    gate = asyncio.Event()

    async def call(fail: bool) -> None:
        async with guard:
            await gate.wait()
            if fail:
                raise OSError("x")

    tasks = [asyncio.ensure_future(call(i % 2 == 0)) for i in range(4)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, OSError) for r in results) == 2
    assert guard.breaker.window_counts(guard.clock()) == (4, 2, 0)


def test_window_totals_match_a_recount_as_seconds_slide_out() -> None:
    """The window's running totals (kept so each call costs O(1)) equal a recount of the calls
    of the last `window` seconds, through evictions and a trip that clears the window."""
    import random

    rng = random.Random(7)
    settings = BreakerSettings(
        window=5.0, min_calls=1000, consecutive_failures=1000, slow_call_duration=0.5
    )
    breaker = Breaker(settings)
    calls: list[tuple[float, bool, bool]] = []  # (time, failed, slow) since the last reset
    now = 0.0
    for _ in range(2000):
        now += rng.random() * 0.05
        failed = rng.random() < 0.2
        duration = 0.6 if rng.random() < 0.1 else 0.01
        permit = breaker.acquire(now - duration)
        assert permit is not None
        if failed:
            breaker.failure(permit, now)
        else:
            breaker.success(permit, now)
        calls.append((now, failed, duration > 0.5))
        # a whole second stays while any of it is within `window` of now
        recent = [c for c in calls if int(c[0]) + 1 > now - settings.window]
        expected = (len(recent), sum(c[1] for c in recent), sum(c[2] for c in recent))
        assert breaker.window_counts(now) == expected
    # a trip clears the window, totals included
    breaker.failure(breaker.acquire(now) or pytest.fail("closed breaker refused"), now)
    breaker._trip(now, "test")
    assert breaker.window_counts(now) == (0, 0, 0)
