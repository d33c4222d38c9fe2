"""bench/hotpath.py, the in-memory harness behind the instructions-per-request figure: it
really proxies, through the whole feature set, what it claims to measure."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import hotpath  # a script of bench/, imported from its directory


async def test_every_request_goes_upstream_and_back_with_the_proxys_headers(
    tmp_path: Path,
) -> None:
    """Each request reaches a pooled upstream connection rewritten (forwarding headers) and
    each answer reaches the client rewritten (variant, request id), one for one."""
    harness = hotpath.build(tmp_path)
    try:
        answered, sent = hotpath.check(harness, 50)
        assert (answered, sent) == (50, 50)
        upstream_bytes = b"".join(w for _, t in harness.upstreams for w in t.written)
        assert upstream_bytes.count(b"\r\nX-Forwarded-For: 127.0.0.1\r\n") == 50
        assert upstream_bytes.count(b"\r\nVia: 1.1 shaper\r\n") == 50
        client_bytes = b"".join(harness.client_transport.written)
        assert client_bytes.count(b"\r\nX-Shaper-Variant: stable\r\n") == 50
        assert client_bytes.count(b"\r\nContent-Length: 20\r\n\r\nok ok") == 50
        assert harness.runtime is not None
        totals = harness.runtime.metrics.requests
        assert totals[("shop", "stable", "GET", "200")] == 50
    finally:
        await harness.close()


async def test_the_thousand_route_harness_proxies_through_its_whole_table(
    tmp_path: Path,
) -> None:
    """With `--routes 1000` the table holds 1,000 routes and the request still reaches the
    rollout route through it: what the instruction count with 1,000 routes measures."""
    harness = hotpath.build(tmp_path, routes=1000)
    try:
        assert harness.runtime is not None
        assert len(harness.runtime.snapshot.config.routes) == 1000
        assert hotpath.check(harness, 50) == (50, 50)
        assert harness.runtime.metrics.requests[("shop", "stable", "GET", "200")] == 50
    finally:
        await harness.close()


def test_the_bench_reports_cpu_steal_from_two_readings() -> None:
    """make bench prints how much CPU time the hypervisor gave away during the run (the share
    of stolen ticks between two /proc/stat readings), so a noisy run can be told apart."""
    import run  # bench/run.py, on the path above

    noisy = run.steal_note((1000, 10), (3000, 510))
    assert noisy.startswith("CPU steal during the run: 25.0% of all CPU time (over 1%: ")
    assert run.steal_note((1000, 10), (3000, 11)) == (
        "CPU steal during the run: 0.1% of all CPU time"
    )
    assert "not known" in run.steal_note((0, 0), (0, 0))
    total, stolen = run.cpu_ticks()
    assert total > 0 and 0 <= stolen <= total


def test_the_machine_speed_gauge_is_instructions_per_microsecond() -> None:
    """The same instructions in more microseconds: the machine is slower at that moment."""
    assert hotpath.speed(224_800, 27.0) == "machine speed: 8,326 instructions per us of CPU"
    assert hotpath.speed(224_800, 46.0) == "machine speed: 4,887 instructions per us of CPU"


def test_a_latency_line_says_when_the_generators_core_was_full() -> None:
    """The latency rounds report how busy the generator's core was (generator and upstream)
    in the direct runs; past 90% the line says SATURATED, since the p99s are then the
    generator's queueing, not the proxy's (2026-12-03: direct p99 21.9 ms at 6,249 req/s)."""
    import run  # bench/run.py, on the path above

    def one(busy: float) -> run.Round:
        report = {"p50_ms": 0.1, "p99_ms": 0.2, "p999_ms": 0.3}
        return 0.5, report, {**report, "p99_ms": 0.7}, busy

    calm = run._median_round([one(0.4), one(0.5), one(0.95)], "normal")
    assert "used 50% of their core" in calm and "SATURATED" not in calm
    full = run._median_round([one(0.93), one(1.04), one(0.5)], "normal")
    assert "used 93% of their core" in full and "SATURATED" in full
