"""A short run of `make soak`'s script: chaos, a canary going bad, and a passing verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_short_soak_passes() -> None:
    """Half a minute of load with faults, reloads and flag flips: every failure explained,
    the bad canary rolled back, no leak, a clean drain."""
    result = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "0.5", "--rate", "100", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "soak passed" in result.stdout
    assert "canary rolled back" in result.stdout
