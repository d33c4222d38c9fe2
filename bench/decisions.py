"""`make bench-decisions`: how the canary analysis decides, over many simulated rollouts.

Each row is one scenario run many times with different seeds (proxy/simulation.py, an
injected tick clock: hours of traffic in seconds). Columns: how many runs rolled back, the
median and worst time to the rollback decision, and the median number of canary requests
(and failed ones) users had sent before it. Healthy rows should roll back (almost) never; bad
rows always and fast. Run: python bench/decisions.py [--runs N] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.analysis import AnalysisSettings
from proxy.simulation import Outcome, Scenario, bursty, constant, run_many

SETTINGS = AnalysisSettings(alpha=0.01, error_rate=0.01, latency=0.3, min_requests=100)


def _flapping(tick: int, _seed: int) -> float:
    return 0.3 if (tick // 5) % 2 else 0.0


def _late(tick: int, _seed: int) -> float:
    return 0.001 if tick < 1800 else 0.2


def _down(tick: int, _seed: int) -> float:
    return 0.2 if 600 <= tick < 900 else 0.001


_bursts_s = bursty("stable", 60, 0.3, 0.0025)
_bursts_c = bursty("canary", 60, 0.3, 0.0025)


def scenarios(long: int) -> list[tuple[str, Scenario]]:
    """(kind, scenario): kind is what should happen: healthy = never roll back (nor pause),
    bad = roll back fast, hold = no rollback but a pause (an outage of both versions) that
    ends by itself once the outage has, low
    data = no verdict until min_requests, except the fast path for a canary failing most of
    its requests."""
    c = constant
    rows: list[tuple[str, str, float, float, object, object, int, float, float]] = [
        # kind, name, rps, weight %, stable errors, canary errors, seconds, slow s/c
        ("healthy", "A/A 0.1% errors, 200 rps, 10%", 200, 10, 0.001, 0.001, long, 0.005, 0.005),
        ("healthy", "A/A 0.9% errors (near SLO)", 200, 10, 0.009, 0.009, long, 0.005, 0.005),
        ("healthy", "A/A 0.2% errors, 1000 rps, 50%", 1000, 50, 0.002, 0.002, long, 0.005, 0.005),
        ("healthy", "A/A 0.5% errors, 20 rps, 5%", 20, 5, 0.005, 0.005, long, 0.005, 0.005),
        ("bad", "20% vs 0.1% errors, 200 rps, 10%", 200, 10, 0.001, 0.2, 120, 0.005, 0.005),
        ("bad", "20% vs 0.1% errors, 200 rps, 1%", 200, 1, 0.001, 0.2, 300, 0.005, 0.005),
        ("bad", "5% vs 0.1% errors, 200 rps, 10%", 200, 10, 0.001, 0.05, 300, 0.005, 0.005),
        ("bad", "total failure, 200 rps, 10%", 200, 10, 0.001, 1.0, 60, 0.005, 0.005),
        ("bad", "20% vs 0.1% errors, 2000 rps, 5%", 2000, 5, 0.001, 0.2, 60, 0.005, 0.005),
        ("bad", "p99 3x stable and over SLO", 200, 10, 0.001, 0.001, 300, 0.003, 0.07),
        ("bad", "flapping: 30% errors every other 5s", 200, 10, 0.001, _flapping, 300, 0.005, 0.01),
        ("low data", "1 rps total, canary 20% errors", 1, 10, 0.001, 0.2, 600, 0.005, 0.005),
        ("hold", "stable outage: both 5% errors", 200, 10, 0.05, 0.05, 600, 0.005, 0.005),
        ("hold", "shared outage after 30 healthy min", 200, 10, _late, _late, 1900, 0.005, 0.005),
        ("hold", "shared outage from 600 s to 900 s", 200, 10, _down, _down, 1800, 0.005, 0.005),
        ("healthy", "A/A 0.25%, bursts of 30%", 200, 10, _bursts_s, _bursts_c, long, 0.005, 0.005),
    ]  # fmt: skip
    out = []
    for kind, name, rate, weight, stable, canary, seconds, slow_s, slow_c in rows:
        out.append(
            (
                kind,
                Scenario(
                    name,
                    rate,
                    weight,
                    stable if callable(stable) else c(float(stable)),  # type: ignore[arg-type]
                    canary if callable(canary) else c(float(canary)),  # type: ignore[arg-type]
                    c(slow_s),
                    c(slow_c),
                    seconds=seconds,
                ),
            )
        )
    return out


def _resumed(outcomes: list[Outcome]) -> str:
    """How many runs resumed after their incident pause, and the median tick they did."""
    ticks = [o.resumed_at for o in outcomes if o.resumed_at is not None]
    return f"{len(ticks)} (at {statistics.median(ticks):.0f} s)" if ticks else "0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--long", type=int, default=3600, help="seconds of a healthy run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    header = (
        "kind",
        "scenario",
        "runs",
        "rolled back",
        "paused (incident)",
        "resumed",
        "median s",
        "worst s",
        "canary req before",
        "failed before",
    )
    rows = []
    started = time.monotonic()
    for kind, scenario in scenarios(args.long):
        runs = args.runs if kind != "healthy" else max(20, args.runs // 2)
        outcomes = run_many(scenario, SETTINGS, runs)
        hit = [o for o in outcomes if o.rolled_back_at is not None]
        times = [o.rolled_back_at + 1 for o in hit if o.rolled_back_at is not None]
        rows.append(
            (
                kind,
                f"{scenario.name} ({scenario.seconds} s)",
                str(runs),
                f"{len(hit)} ({100 * len(hit) / runs:.1f}%)",
                f"{sum(o.paused_at is not None for o in outcomes)}",
                _resumed(outcomes),
                f"{statistics.median(times):.0f}" if times else "-",
                f"{max(times)}" if times else "-",
                f"{statistics.median(o.canary_requests_before for o in hit):.0f}" if hit else "-",
                f"{statistics.median(o.canary_failures_before for o in hit):.0f}" if hit else "-",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        f"\nSLO: error rate 1%, p99 300 ms, min 100 requests per variant, "
        f"false-rollback budget 1%; {time.monotonic() - started:.0f} s of compute"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
