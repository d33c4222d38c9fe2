"""`shaper demo` end to end: upstreams, proxy, traffic and the per-second status line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import free_port

_LINE = re.compile(
    r"req/s\s+([\d.]+) \| canary share\s+([\d.]+)% \| stable err\s+([\d.]+)% p99\s+\S+"
    r"\s+\| canary err\s+([\d.]+)% p99"
)


def _demo_config(tmp_path: Path, weight: float) -> Path:
    raw = yaml.safe_load(Path("rollouts.yaml").read_text())
    raw["listen"]["port"] = free_port()
    raw["admin"]["port"] = free_port()
    raw["upstreams"]["shop-v1"]["endpoints"] = [f"http://127.0.0.1:{free_port()}"]
    raw["upstreams"]["shop-v2"]["endpoints"] = [f"http://127.0.0.1:{free_port()}"]
    raw["routes"][0]["rollout"]["weight"] = weight
    path = tmp_path / "rollouts.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_runs_and_reports_the_split(tmp_path: Path) -> None:
    """The demo prints URLs, then one line a second whose canary share follows the weight."""
    config = _demo_config(tmp_path, 50)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "-c", str(config), "--duration", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "proxy:" in result.stdout and "admin:" in result.stdout
    lines = [m for m in map(_LINE.search, result.stdout.splitlines()) if m]
    assert len(lines) >= 3, result.stdout
    # Lines of seconds that saw traffic (a loaded CI machine may start slowly).
    busy = [m for m in lines if float(m[1]) > 0]
    assert len(busy) >= 2, result.stdout
    shares = [float(m[2]) for m in busy]
    # Both versions answer: with 50% of 1,000 sticky users, neither share can be 0 or 100.
    assert 10.0 < sum(shares) / len(shares) < 90.0, result.stdout
    assert result.stdout.rstrip().endswith("demo stopped")
    assert "Traceback" not in result.stderr


def test_demo_ctrl_c_exits_cleanly(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) stops upstreams, proxy and traffic, and the demo exits 0."""
    config = _demo_config(tmp_path, 10)
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("req/s"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "demo stopped" in out
    assert "Traceback" not in err


def _demo_with_a_busy_port(
    tmp_path: Path, where: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """The demo run with one of its ports already taken: `where` is "upstream" (shop-v1's
    endpoint) or "listen" (the proxy's own port). The result, and the port."""
    import socket

    config = _demo_config(tmp_path, 10)
    raw = yaml.safe_load(config.read_text())
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    if where == "upstream":
        raw["upstreams"]["shop-v1"]["endpoints"] = [f"http://127.0.0.1:{port}"]
    else:
        raw["listen"]["port"] = port
    config.write_text(yaml.safe_dump(raw))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "-c", str(config), "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        busy.close()
    return result, port


def test_demo_reports_busy_port(tmp_path: Path) -> None:
    """A demo upstream port already in use gives one clear line and exit 1, no traceback."""
    result, port = _demo_with_a_busy_port(tmp_path, "upstream")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_proxy_port_in_use_is_one_line(tmp_path: Path) -> None:
    """The proxy's own port already in use: exit 1, and stderr is the one line that says so
    (the upstream pools made before the failed listen are closed, so asyncio has no unclosed
    sessions to log)."""
    result, port = _demo_with_a_busy_port(tmp_path, "listen")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "cannot listen" in lines[0] and str(port) in lines[0]
