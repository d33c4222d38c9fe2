"""`make soak`: constant load with chaos, then a verdict on what happened.

Runs traffic-shaper as a real process in front of two controllable upstreams
(bench/fault_upstream.py), and sends a constant request rate for `--minutes`. Meanwhile:
  * random chaos: stable faults (500s, hangs, resets mid-body, slowness) for a few seconds,
    config reloads, brownout and safe-mode flips through the admin API;
  * at 40% of the run the canary goes bad (half its requests fail) and stays bad.
At the end it prints requests sent / succeeded / failed by reason, and checks:
  * every failure is explained (shed, breaker, upstream fault or injected 5xx, aborted stream);
  * the bad canary was rolled back;
  * file descriptors and memory of the proxy are flat (no leak).
Exit code 0 when all checks pass, 1 otherwise.
Run: python bench/soak.py [--minutes 10] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from loopback import free_port, wait_port  # bench/ is the script directory

HERE = Path(__file__).resolve().parent
TOKEN = "soak-token"


def config_text(port: int, admin: int, stable: int, canary: int, state: Path, weight: int) -> str:
    return f"""# soak config (rewritten during the run to exercise reloads)
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}, token_env: SHAPER_SOAK_TOKEN}}
state_dir: {state}
drain_timeout: 5s
upstreams:
  v1:
    endpoints: ["http://127.0.0.1:{stable}"]
    request_timeout: 2s
    idle_timeout: 2s
    pool: {{keepalive_timeout: 2s}}
    breaker: {{consecutive_failures: 5, open_base: 1s, open_max: 5s}}
  v2:
    endpoints: ["http://127.0.0.1:{canary}"]
    request_timeout: 2s
    idle_timeout: 2s
    pool: {{keepalive_timeout: 2s}}
    breaker: {{consecutive_failures: 5, open_base: 1s, open_max: 5s}}
limits: {{keepalive_timeout: 2s}}
routes:
  - name: static
    match: {{path_prefix: /static}}
    upstream: v1
    priority: sheddable
  - name: shop
    match: {{path_prefix: /}}
    rollout:
      stable: v1
      canary: v2
      weight: {weight}
      sticky: {{header: X-User-Id}}
      slo: {{error_rate: 2%, min_requests: 100}}
"""


def proc_stats(pid: int) -> tuple[int, float]:
    """(open file descriptors, RSS in MB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024.0
    return fds, rss


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.outcomes: Counter[str] = Counter()
        self.sent = 0
        self.samples: list[tuple[float, int, float]] = []
        self.log: list[str] = []
        self.rolled_back_after: float | None = None
        self.baseline_fds = 0
        self.final_fds = 0
        self.bad_since: float | None = None

    def note(self, text: str) -> None:
        stamp = time.monotonic() - self.started
        self.log.append(f"{stamp:7.1f}s  {text}")
        print(f"{stamp:7.1f}s  {text}", flush=True)

    async def one(self, client: aiohttp.ClientSession) -> None:
        user = f"user-{random.randrange(1000)}"
        path = "/static/app.js" if random.random() < 0.2 else f"/items/{random.randrange(100)}"
        try:
            async with client.get(self.proxy + path, headers={"X-User-Id": user}) as r:
                body = await r.read()
                if r.status == 200:
                    self.outcomes["ok"] += 1
                elif r.headers.get("X-Shaper-Shed") == "1":
                    self.outcomes["shed (brownout)"] += 1
                elif r.headers.get("X-Shaper-Error") == "circuit_open":
                    self.outcomes["breaker open"] += 1
                elif r.status in (502, 504) and r.headers.get("X-Shaper-Error"):
                    self.outcomes[f"upstream fault: {r.headers['X-Shaper-Error']}"] += 1
                elif r.status == 500 and b"failing" in body:
                    self.outcomes["upstream 5xx (injected)"] += 1
                else:
                    self.outcomes[f"UNEXPLAINED status {r.status}"] += 1
        except aiohttp.ClientPayloadError:
            self.outcomes["aborted stream (upstream reset mid-body)"] += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.outcomes[f"UNEXPLAINED {type(exc).__name__}"] += 1

    async def load(self, client: aiohttp.ClientSession, until: float) -> None:
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        while time.monotonic() < until:
            task = asyncio.ensure_future(self.one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            self.sent += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=15)

    async def admin_post(
        self, client: aiohttp.ClientSession, path: str, body: dict[str, object]
    ) -> None:
        async with client.post(
            self.admin + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            await r.read()

    async def set_mode(
        self, client: aiohttp.ClientSession, port: int, mode: str, rate: float
    ) -> None:
        async with client.post(
            f"http://127.0.0.1:{port}/__mode", json={"mode": mode, "rate": rate}
        ) as r:
            await r.read()

    async def chaos(self, client: aiohttp.ClientSession, until: float, bad_at: float) -> None:
        weight = 20
        step = max(3.0, self.args.minutes * 60 / 25)
        while time.monotonic() < until - step:
            await asyncio.sleep(step * random.uniform(0.6, 1.0))
            if self.bad_since is None and time.monotonic() >= bad_at:
                self.bad_since = time.monotonic()
                self.note("canary goes bad: 50% of its requests fail from now on")
                await self.set_mode(client, self.canary_port, "errors", 0.5)
                continue
            action = random.choice(["fault", "fault", "reload", "brownout", "safe_mode"])
            if action == "fault":
                mode, rate = random.choice(
                    [("errors", 0.05), ("hang", 0.02), ("reset", 0.05), ("slow", 0.2)]
                )
                self.note(f"stable fault for 4 s: {mode} on {rate:.0%} of requests")
                await self.set_mode(client, self.stable_port, mode, rate)
                await asyncio.sleep(4)
                await self.set_mode(client, self.stable_port, "ok", 0.0)
            elif action == "reload":
                weight = 45 - weight  # 20 <-> 25
                self.config.write_text(self.config_for(weight))
                self.note(f"config rewritten (weight {weight}); the watch reloads it")
            elif action == "brownout":
                self.note("brownout level 1 for 3 s")
                await self.admin_post(client, "/api/flags/brownout", {"level": 1, "reason": "soak"})
                await asyncio.sleep(3)
                await self.admin_post(client, "/api/flags/brownout", {"level": 0, "reason": "soak"})
            else:
                self.note("safe mode for 3 s")
                await self.admin_post(
                    client, "/api/flags/safe-mode", {"enabled": True, "reason": "soak"}
                )
                await asyncio.sleep(3)
                await self.admin_post(
                    client, "/api/flags/safe-mode", {"enabled": False, "reason": "soak"}
                )

    async def watch(self, client: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            fds, rss = proc_stats(self.proxy_pid)
            self.samples.append((time.monotonic() - self.started, fds, rss))
            if self.bad_since is not None and self.rolled_back_after is None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.get(self.admin + "/api/rollouts/shop") as r:
                        if (await r.json())["status"] == "rolled_back":
                            self.rolled_back_after = time.monotonic() - self.bad_since
                            after = self.rolled_back_after
                            self.note(f"canary rolled back {after:.1f} s after it went bad")
            await asyncio.sleep(1.0)

    def config_for(self, weight: int) -> str:
        return config_text(
            self.port,
            self.admin_port,
            self.stable_port,
            self.canary_port,
            self.work / "state",
            weight,
        )

    def start(self) -> list[subprocess.Popen[bytes]]:
        """Start the upstreams and the proxy (before the event loop runs)."""
        self.port, self.admin_port = free_port(), free_port()
        self.stable_port, self.canary_port = free_port(), free_port()
        self.proxy = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        processes = [
            subprocess.Popen([sys.executable, str(HERE / "fault_upstream.py"), str(port), name])
            for port, name in ((self.stable_port, "v1"), (self.canary_port, "v2"))
        ]
        self.config = self.work / "rollouts.yaml"
        self.config.write_text(self.config_for(20))
        env = {**os.environ, "SHAPER_SOAK_TOKEN": TOKEN}
        shaper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "--log-level",
                "error",
                "serve",
                "-c",
                str(self.config),
            ],
            env=env,
        )
        processes.append(shaper)
        self.proxy_pid = shaper.pid
        self.shaper = shaper
        for port in (self.stable_port, self.canary_port, self.port, self.admin_port):
            wait_port(port)
        time.sleep(0.5)
        self.baseline_fds = proc_stats(shaper.pid)[0]
        return processes

    async def run(self) -> None:
        self.started = time.monotonic()
        until = self.started + self.args.minutes * 60
        bad_at = self.started + self.args.minutes * 60 * 0.4
        timeout = aiohttp.ClientTimeout(total=15)
        connector = aiohttp.TCPConnector(limit=500)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
            await asyncio.gather(
                self.load(client, until),
                self.chaos(client, until, bad_at),
                self.watch(client, until),
            )
        # Load over and client connections closed: once the idle keep-alive timeouts (2 s,
        # both sides) have passed, every connection the proxy opened must be gone.
        await asyncio.sleep(4)
        self.final_fds = proc_stats(self.proxy_pid)[0]

    def report(self, exit_code: int) -> int:
        done = sum(self.outcomes.values())
        failed = done - self.outcomes["ok"]
        ok = self.outcomes["ok"]
        print(f"\nrequests sent {self.sent}, answered {done}, succeeded {ok}, failed {failed}")
        for reason, count in sorted(self.outcomes.items(), key=lambda kv: -kv[1]):
            if reason != "ok":
                print(f"  {count:7d}  {reason}")
        if self.samples:
            every = max(1, len(self.samples) // 10)
            shown = ", ".join(
                f"{t:.0f}s {fds}/{rss:.0f}MB" for t, fds, rss in self.samples[::every]
            )
            print(f"\nproxy fds/RSS over time: {shown}")
        checks: list[tuple[str, bool]] = []
        unexplained = sum(n for r, n in self.outcomes.items() if r.startswith("UNEXPLAINED"))
        checks.append((f"every failure explained ({unexplained} unexplained)", unexplained == 0))
        checks.append((f"all {self.sent} requests answered", done == self.sent))
        checks.append(
            (
                "the bad canary was rolled back"
                + (f" ({self.rolled_back_after:.1f} s)" if self.rolled_back_after else ""),
                self.rolled_back_after is not None,
            )
        )
        settled = [s for s in self.samples if s[0] > 10] or self.samples
        if settled:
            first_fds = min(s[1] for s in settled[: max(1, len(settled) // 4)])
            last_fds = settled[-1][1]
            first_rss = min(s[2] for s in settled[: max(1, len(settled) // 4)])
            last_rss = settled[-1][2]
            checks.append(
                (
                    f"file descriptors back to the start once idle ({self.baseline_fds} at start,"
                    f" {self.final_fds} at the end; {first_fds} -> {last_fds} under load)",
                    self.final_fds <= self.baseline_fds + 3,
                )
            )
            checks.append(
                (
                    f"memory flat ({first_rss:.0f} MB -> {last_rss:.0f} MB)",
                    last_rss <= first_rss * 1.3 + 20,
                )
            )
        checks.append((f"SIGTERM drained and exited 0 (exit {exit_code})", exit_code == 0))
        print()
        for text, ok in checks:
            print(f"  [{'ok' if ok else 'FAIL'}] {text}")
        passed = all(ok for _, ok in checks)
        print("\nsoak " + ("passed" if passed else "FAILED"))
        return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="shaper-soak-") as work:
        soak = Soak(args, Path(work))
        processes = soak.start()
        try:
            asyncio.run(soak.run())
            soak.shaper.send_signal(signal.SIGTERM)
            exit_code = soak.shaper.wait(30)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return soak.report(exit_code)


if __name__ == "__main__":
    sys.exit(main())
