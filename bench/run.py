"""`make bench`: traffic-shaper against its peers, in one run, on loopback.

Everything is started here and stopped at the end:
  upstream      nginx answering a fixed 20-byte body (bench/upstream.py when nginx is absent)
  peers         the upstream directly; nginx and HAProxy as proxies (when installed); the
                plain aiohttp ClientSession proxy (bench/aiohttp_proxy.py); traffic-shaper
                with every feature on (a sticky 10% rollout with an SLO, breakers, health
                checks, metrics, flags); and traffic-shaper with 1,000 routes
  load          wrk -t1 -c50 (closed loop) for throughput; bench/loadgen.py, an open-loop
                generator at a constant rate of half traffic-shaper's maximum, for the
                latency it adds over going direct
  memory        a 1 GiB download and a 1 GiB upload through traffic-shaper (RSS growth), and
                10,000 idle keep-alive client connections (RSS)
  hot path      bench/hotpath.py: one request through the proxy's code on in-memory
                transports, in microseconds and (with valgrind) instructions

Prints one table: req/s, p50, p99, p99.9, CPU seconds per 10k requests, RSS, and each row's
throughput as a ratio to the others; each row is the median of --rounds runs, interleaved.
Absolute numbers drift between runs; ratios within a run hold. Not a test: nothing here
asserts a timing.
Run: python bench/run.py [--duration 8] [--rounds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loopback import free_port, wait_port  # bench/ is the script directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
_LUA = """
done = function(summary, latency, requests)
  for _, p in pairs({50, 99, 99.9}) do
    io.write(string.format("PCT %g %d\\n", p, latency:percentile(p)))
  end
end
"""


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx's workers, for instance); none for pid 0, whose
    descendants are every process of the machine."""
    if not pid:
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def cpu_ticks() -> tuple[int, int]:
    """(all ticks, stolen ticks) of the machine so far, from /proc/stat's `cpu` line. On a
    virtual machine, steal is time the hypervisor gave to someone else: runs where it is high
    measure the neighbours as much as the peers."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[7]
    return 0, 0


def steal_note(before: tuple[int, int], after: tuple[int, int]) -> str:
    total, stolen = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return "CPU steal: not known (no /proc/stat)"
    share = 100 * stolen / total
    note = f"CPU steal during the run: {share:.1f}% of all CPU time"
    if share > 1.0:
        note += " (over 1%: the neighbours moved these figures; run again when it is quieter)"
    return note


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_mb(pids: list[int], key: str = "VmRSS") -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total / 1024.0


@dataclass
class Result:
    name: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    cpu_per_10k: float | None = None
    rss_mb: float | None = None
    note: str = ""
    best_rps: float = 0.0  # the best of the runs (interference on a shared machine only slows)


@dataclass
class Peer:
    name: str
    port: int
    pid: int | None = None  # the process whose tree is measured; None for no measuring
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def run_wrk(
    port: int, duration: float, lua: str, connections: int = 50
) -> tuple[float, dict[str, float]]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", script.name,
             "-H", "X-User-Id: user-42", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=duration + 60, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    pcts = {m[1]: int(m[2]) / 1000.0 for m in re.finditer(r"PCT ([\d.]+) (\d+)", out)}
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: {port}: {out.strip().splitlines()[-3:]}", file=sys.stderr)
    return rps, pcts


def measure(peer: Peer, duration: float) -> Result:
    pids = tree(peer.pid) if peer.pid else []
    before = cpu_seconds(pids)
    rps, pcts = run_wrk(peer.port, duration, _LUA)
    cpu = cpu_seconds(pids) - before
    requests = rps * duration
    return Result(
        peer.name,
        rps,
        pcts.get("50", 0.0),
        pcts.get("99", 0.0),
        pcts.get("99.9", 0.0),
        cpu / (requests / 10_000) if pids and requests else None,
        rss_mb(pids) if pids else None,
    )


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def upstream(self) -> tuple[int, int | None, str]:
        port = free_port()
        if shutil.which("nginx"):
            conf = self.work / "nginx-upstream.conf"
            conf.write_text(
                (HERE / "nginx-upstream.conf").read_text().replace("{PORT}", str(port))
                .replace("{DIR}", str(self.work))
            )  # fmt: skip
            process = self.spawn(
                "nginx", "-c", str(conf), "-p", str(self.work), "-g", "daemon off;"
            )
            wait_port(port)
            return port, process.pid, "nginx"
        process = self.spawn(PYTHON, str(HERE / "upstream.py"), str(port))
        wait_port(port)
        return port, process.pid, "bench/upstream.py"

    def nginx_proxy(self, upstream: int) -> Peer | None:
        if not shutil.which("nginx"):
            return None
        port = free_port()
        conf = self.work / "nginx-proxy.conf"
        conf.write_text(
            (HERE / "nginx-proxy.conf").read_text().replace("{PORT}", str(port))
            .replace("{UPSTREAM}", str(upstream)).replace("{DIR}", str(self.work))
        )  # fmt: skip
        process = self.spawn("nginx", "-c", str(conf), "-p", str(self.work), "-g", "daemon off;")
        wait_port(port)
        return Peer("nginx as a proxy", port, process.pid)

    def haproxy(self, upstream: int) -> Peer | None:
        if not shutil.which("haproxy"):
            return None
        port = free_port()
        conf = self.work / "haproxy.cfg"
        conf.write_text(
            (HERE / "haproxy.cfg").read_text().replace("{PORT}", str(port))
            .replace("{UPSTREAM}", str(upstream))
        )  # fmt: skip
        process = self.spawn("haproxy", "-f", str(conf), "-db")
        wait_port(port)
        return Peer("HAProxy", port, process.pid)

    def aiohttp_proxy(self, upstream: int) -> Peer:
        port = free_port()
        process = self.spawn(
            PYTHON, str(HERE / "aiohttp_proxy.py"), str(port), f"http://127.0.0.1:{upstream}"
        )
        wait_port(port)
        return Peer("aiohttp ClientSession proxy", port, process.pid)

    def shaper(self, upstream: int, routes: int, name: str) -> Peer:
        port, admin = free_port(), free_port()
        config = self.work / f"shaper-{routes}.yaml"
        config.write_text(shaper_config(port, admin, upstream, routes, self.work))
        process = self.spawn(
            PYTHON, "-m", "proxy", "--log-level", "warning", "serve", "-c", str(config)
        )
        wait_port(port)
        wait_port(admin)
        return Peer(name, port, process.pid)


def shaper_config(port: int, admin: int, upstream: int, routes: int, work: Path) -> str:
    """Every feature on: rollout with sticky split and SLO, breakers, health checks, flags."""
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        f"admin: {{host: 127.0.0.1, port: {admin}, token_env: SHAPER_BENCH_TOKEN}}",
        f"state_dir: {work / f'state-{routes}'}",
        "flags: {auto_brownout: {max_in_flight: 5000}}",
        "upstreams:",
    ]
    for name in ("v1", "v2"):
        lines += [
            f"  {name}:",
            f'    endpoints: ["http://127.0.0.1:{upstream}{"/" if name == "v2" else ""}"]',
            "    pool: {max_connections: 256}",
            "    breaker: {consecutive_failures: 5, slow_call_duration: 2s}",
            "    health_check: {path: /, interval: 5s}",
        ]
    lines.append("routes:")
    for i in range(routes - 1):
        lines += [
            f"  - name: r{i}",
            f"    match: {{path_prefix: /api/v{i}/}}",
            "    upstream: v1",
        ]
    lines += [
        "  - name: shop",
        "    match: {path_prefix: /}",
        "    max_body_size: 2GiB  # the 1 GiB upload of the streaming run",
        "    rollout:",
        "      stable: v1",
        "      canary: v2",
        "      weight: 10",
        "      sticky: {header: X-User-Id}",
        "      override: {header: X-Canary}",
        "      slo: {error_rate: 1%, latency: {p99: 300ms}}",
    ]
    return "\n".join(lines) + "\n"


def measure_rounds(peers: list[Peer], duration: float, rounds: int) -> list[Result]:
    """Each peer `rounds` times, the order rotated each round so no peer always runs right
    after a heavy one; per peer, the run with the median throughput is kept. On two cores a
    single run of the same process moves by 10-20%, more than some differences sought."""
    runs: dict[str, list[Result]] = {peer.name: [] for peer in peers}
    for i in range(rounds):
        shift = i % len(peers)
        for peer in peers[shift:] + peers[:shift]:
            runs[peer.name].append(measure(peer, duration))
    kept = []
    for peer in peers:
        ordered = sorted(runs[peer.name], key=lambda r: r.rps)
        median = ordered[len(ordered) // 2]
        median.best_rps = ordered[-1].rps
        kept.append(median)
    return kept


def routes_cost(one: Peer, many: Peer, duration: float, runs: int = 8) -> str:
    """Throughput with 1,000 routes against 1 route. Measured once each, the two drift apart
    by more than the difference sought (which of two identical processes runs first moves
    throughput by 10-20% on two cores), so the runs alternate (A B B A A B ...) and the
    median runs are compared."""
    result_one, result_many = measure_rounds([one, many], duration, runs)
    cost = 1.0 - result_many.rps / result_one.rps if result_one.rps else 0.0
    return (
        f"1,000 routes against 1 route, {runs} runs of {duration:g} s each, interleaved: "
        f"median {result_many.rps:,.0f} against {result_one.rps:,.0f} req/s ({cost:+.1%} "
        f"cost), CPU s / 10k req {result_many.cpu_per_10k or 0.0:.2f} against "
        f"{result_one.cpu_per_10k or 0.0:.2f}"
    )


def _shaper_native() -> bool:
    """Whether the traffic-shaper under test runs its compiled data path (proxy/native.py)."""
    code = "import proxy.native as n; print(n.active)"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() == "True"


def halting(peers: list[Peer], duration: float, rounds: int = 3) -> str:
    """The same peers with idle CPUs halting (the machine as it boots), for comparison with
    the table, which is measured with them polling. A proxy whose peers (the client and the
    upstream, on the other core) sleep between its requests pays a wake-up for each one it
    sends them; on a virtual machine that is an interrupt to a halted vCPU, an exit to the
    hypervisor. nginx at 80-90k req/s keeps its peers awake; traffic-shaper at a third of that
    does not, so the halts cost it more."""
    results = measure_rounds(peers, duration, rounds)
    parts = [f"{r.name} {r.rps:,.0f} req/s" for r in results]
    line = f"with idle CPUs halting, median of {rounds} interleaved runs: " + ", ".join(parts)
    if len(results) >= 2 and results[0].rps:
        line += f" ({results[-1].rps / results[0].rps:.2f}x)"
    return line


def _pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


_PRIORITY = 10  # SCHED_FIFO priority of the processes under test in the latency rounds
# A real-time process that never blocks would have its core to itself but for the kernel's
# throttling: past this much CPU without a blocking call it gets SIGXCPU, then SIGKILL.
_RTTIME = (1_000_000, 2_000_000)  # microseconds, soft and hard


def _threads(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out += [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    return out


def _realtime_on(pids: list[int]) -> bool:
    """Every thread of `pids` to SCHED_FIFO, with a bound on its CPU time between blocking
    calls; False (and the normal policy back) when this user may not (no CAP_SYS_NICE, or no
    such policy here)."""
    if not hasattr(os, "SCHED_FIFO"):
        return False
    try:
        for pid in pids:  # where permitted: another user's process (nginx's workers) needs
            with contextlib.suppress(OSError):  # CAP_SYS_RESOURCE, which a container may lack
                resource.prlimit(pid, resource.RLIMIT_RTTIME, _RTTIME)
        for tid in _threads(pids):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(_PRIORITY))
    except OSError:  # EPERM without CAP_SYS_NICE; EINVAL where the policy is not built in
        _realtime_off(pids)
        return False
    return True


def _realtime_off(pids: list[int]) -> None:
    """Every thread of `pids` back to the normal policy, thread by thread whatever fails."""
    for tid in _threads(pids):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def _realtime_child() -> None:  # preexec_fn of a generator run at real-time priority
    resource.setrlimit(resource.RLIMIT_RTTIME, _RTTIME)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_PRIORITY))


def _idle_polling() -> int | None:
    """Hold /dev/cpu_dma_latency at 0 (the kernel's PM QoS): while the descriptor is open,
    an idle CPU polls instead of halting. On a virtual machine a halt is an exit to the
    hypervisor, and each request that arrives at an idle core pays the wake-up: at 5,000
    req/s, one at a time, traffic-shaper took 90 µs of user CPU per request and a p99 of
    0.85-3.6 ms with halts, 60 µs and 0.32-0.42 ms polling (2026-12-03). It is what
    latency-tuned hosts do (tuned's latency-performance profile); None where not permitted."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError:
        return None
    try:
        os.write(fd, (0).to_bytes(4, sys.byteorder))
    except OSError:
        os.close(fd)
        return None
    return fd


def run_loadgen(
    port: int, rate: float, duration: float, cpus: set[int] | None, realtime: bool = False
) -> dict[str, float]:
    """bench/loadgen.py at a constant `rate` (open loop); its JSON report."""
    argv = [PYTHON, str(HERE / "loadgen.py"), "--port", str(port), "--rate", f"{rate:.0f}",
            "--duration", str(duration), "--header", "X-User-Id: user-42"]  # fmt: skip
    if cpus is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, check=True,
        preexec_fn=_realtime_child if realtime else None,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report: dict[str, float] = json.loads(out.stdout)
    # The generator's own CPU (user and system: on loopback, sending runs the receiver's TCP
    # input too), to tell when its core, not the server, sets the figure.
    report["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if report["errors"] or report["non_2xx"]:
        print(f"  warning: loadgen on {port}: {report}", file=sys.stderr)
    return report


# p99 added, direct, through shaper, and how busy the generator's core was in the direct run
Round = tuple[float, dict[str, float], dict[str, float], float]
# Past this share of its core (generator and upstream together), the direct run's p99 is the
# generator's queueing; at real-time priority, past 95% the kernel's real-time throttling
# (kernel.sched_rt_runtime_us) also stops them for about 50 ms every second.
_SATURATED = 0.9


def _round(
    direct: Peer, shaper: Peer, rate: float, duration: float, cpus: set[int] | None,
    realtime: bool,
) -> Round:  # fmt: skip
    upstream_before = cpu_seconds(tree(direct.pid or 0))
    through_direct = run_loadgen(direct.port, rate, duration, cpus, realtime)
    upstream = cpu_seconds(tree(direct.pid or 0)) - upstream_before
    busy = (through_direct["cpu_s"] + upstream) / duration
    through_shaper = run_loadgen(shaper.port, rate, duration, cpus, realtime)
    added = through_shaper["p99_ms"] - through_direct["p99_ms"]
    return added, through_direct, through_shaper, busy


def _median_round(results: list[Round], label: str) -> str:
    added, through_direct, through_shaper, _ = sorted(results, key=lambda r: r[0])[
        len(results) // 2
    ]
    busy = sorted(r[3] for r in results)[len(results) // 2]
    line = (
        f"{label}, median of {len(results)} alternating rounds: p50/p99/p99.9 direct "
        f"{through_direct['p50_ms']:.2f}/{through_direct['p99_ms']:.2f}/"
        f"{through_direct['p999_ms']:.2f} ms, through traffic-shaper "
        f"{through_shaper['p50_ms']:.2f}/{through_shaper['p99_ms']:.2f}/"
        f"{through_shaper['p999_ms']:.2f} ms: p99 added {added:.2f} ms "
        f"(rounds: {', '.join(f'{r[0]:.2f}' for r in results)} ms); generator and upstream "
        f"used {busy:.0%} of their core in the direct runs (median)"
    )
    if busy > _SATURATED:
        line += (
            " (SATURATED: the generator's core, not the proxy, sets these p99s; lower the rate "
            "or give the generator a faster machine)"
        )
    return line


def latency_added(
    direct: Peer, shaper: Peer, rate: float, duration: float, rounds: int = 9, shared: int = 5
) -> str:
    """p99 at a constant `rate` through traffic-shaper minus p99 going direct, same rate, from
    bench/loadgen.py (open loop: queueing is counted, not hidden). Direct and proxied runs
    alternate; the median of the rounds is reported, and every round is shown.

    With two cores or more, traffic-shaper gets a core to itself and the generator and the
    upstream share the others. Pinning alone does not make the core its own: the machine's
    other processes (on this virtual machine, its agents, about 100 times a second) still run
    on it, and each time the proxy's event loop stands still for milliseconds, now and then
    for 100 ms or more; at 1% of the requests, p99 is where those stalls land. So the `rounds`
    rounds run everything under test (proxy, upstream, generator) at real-time priority
    (SCHED_FIFO), which nothing else on the machine preempts: the figure is the proxy's, not
    its neighbours'. `shared` rounds at normal priority, as a proxy run without that care would
    see on the same machine, are interleaved with them and reported beside them."""
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    own: set[int] | None = None
    rest: set[int] | None = None

    def under_test() -> list[int]:  # listed anew each time: a respawned worker is in it
        return [*tree(shaper.pid or 0), *tree(direct.pid or 0)]

    if len(all_cpus) >= 2:
        own = {max(all_cpus)}
        rest = all_cpus - own
        _pin(tree(shaper.pid or 0), own)
        _pin(tree(direct.pid or 0), rest)
    placement = (
        "traffic-shaper on a core of its own, generator and upstream on the other"
        if own is not None
        else "no CPU pinning (one core)"
    )
    exclusive: list[Round] = []
    normal: list[Round] = []
    polling = _idle_polling()
    try:
        realtime = _realtime_on(under_test())
        _realtime_off(under_test())
        # The two kinds of round interleaved, so that they see the same moments of the machine.
        for i in range(max(rounds, shared) if realtime else rounds):
            if realtime and i < rounds:
                _realtime_on(under_test())
                try:
                    exclusive.append(_round(direct, shaper, rate, duration, rest, True))
                finally:
                    _realtime_off(under_test())
            if i < shared or not realtime:
                normal.append(_round(direct, shaper, rate, duration, rest, False))
    finally:
        if polling is not None:
            os.close(polling)
        if own is not None:
            _pin(tree(shaper.pid or 0), all_cpus)
            _pin(tree(direct.pid or 0), all_cpus)
    idle = (
        "idle CPUs poll (/dev/cpu_dma_latency held at 0)"
        if polling is not None
        else "CPU idle states as the machine has them (/dev/cpu_dma_latency not writable)"
    )
    head = (
        f"constant rate {rate:.0f} req/s (open loop, bench/loadgen.py; half of "
        f"traffic-shaper's maximum; {placement}; {idle})"
    )
    if not realtime:
        return f"{head}; real-time priority not permitted here: " + _median_round(
            normal, "normal priority"
        )
    return (
        f"{head}; "
        + _median_round(exclusive, "at real-time priority (SCHED_FIFO)")
        + "; "
        + _median_round(normal, "at normal priority, sharing the cores with the machine's agents")
    )


async def _stream_through(port: int, upstream_port: int, size: int) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:
        got = 0
        async with client.get(f"http://127.0.0.1:{port}/big?size={size}") as r:
            async for chunk in r.content.iter_any():
                got += len(chunk)
        assert got == size, (got, size)

        async def body() -> Iterator[bytes]:  # type: ignore[misc]
            chunk = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                yield chunk

        async with client.post(
            f"http://127.0.0.1:{port}/upload", data=body(), headers={"X-User-Id": "u"}
        ) as r:
            assert int(await r.text()) == size


def streaming(bench: Bench, size: int) -> str:
    """RSS growth of traffic-shaper across a `size` download and upload."""
    upstream_port = free_port()
    bench.spawn(PYTHON, str(HERE / "stream_upstream.py"), str(upstream_port))
    wait_port(upstream_port)
    peer = bench.shaper(upstream_port, 1, "traffic-shaper (streaming)")
    pids = tree(peer.pid or 0)
    before = rss_mb(pids)
    started = time.monotonic()
    asyncio.run(_stream_through(peer.port, upstream_port, size))
    peak = rss_mb(pids, "VmHWM")
    shown = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
    return (
        f"{shown} down and {shown} up through traffic-shaper in "
        f"{time.monotonic() - started:.1f} s: "
        f"RSS {before:.0f} MB before, peak {peak:.0f} MB (growth {peak - before:.0f} MB)"
    )


def idle_connections(bench: Bench, upstream: int, count: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    peer = bench.shaper(upstream, 1, "traffic-shaper (idle)")
    pids = tree(peer.pid or 0)
    before = rss_mb(pids)
    sockets = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nX-User-Id: u\r\n\r\n"
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", peer.port))
            s.sendall(request)
            sockets.append(s)
        for s in sockets:
            s.recv(4096)  # one answer each; the connections then stay open and idle
        time.sleep(1.0)
        after = rss_mb(pids)
    finally:
        for s in sockets:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return (
        f"{count:,} idle keep-alive client connections: traffic-shaper RSS {before:.0f} MB "
        f"-> {after:.0f} MB"
    )


_INSTRUCTIONS = re.compile(r"instructions per request \(callgrind\): ([\d,]+)")


def hotpath_cost() -> str:
    """bench/hotpath.py: one proxied request in memory, in microseconds and, with valgrind,
    in instructions (repeatable, unlike every timing above); with valgrind, the same with
    make bench's 1,000-route config, the route table's cost to the instruction."""
    argv = [PYTHON, str(HERE / "hotpath.py"), "--requests", "20000"]
    callgrind = shutil.which("valgrind") is not None
    if callgrind:
        argv.append("--callgrind")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True).stdout
    note = "hot path (bench/hotpath.py, no sockets): " + "; ".join(out.strip().splitlines())
    one = _INSTRUCTIONS.search(out)
    if callgrind and one is not None:
        many_out = subprocess.run(
            [*argv, "--routes", "1000"], capture_output=True, text=True, timeout=900, check=True
        ).stdout
        many = _INSTRUCTIONS.search(many_out)
        if many is not None:
            a, b = (int(m[1].replace(",", "")) for m in (one, many))
            note += f"; with 1,000 routes: {b:,} instructions per request ({b / a - 1:+.2%})"
    return note


def table(results: list[Result], markdown: bool) -> str:
    names = [r.name for r in results]
    header = ["peer", "req/s", "best req/s", "p50 ms", "p99 ms", "p99.9 ms"]
    header += ["CPU s / 10k req", "RSS MB"]
    header += [f"x {n}" for n in names if n.startswith(("nginx", "HAProxy", "aiohttp"))]
    rows = [header]
    for r in results:
        row = [
            r.name,
            f"{r.rps:,.0f}",
            f"{r.best_rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.p999_ms:.2f}",
            "-" if r.cpu_per_10k is None else f"{r.cpu_per_10k:.2f}",
            "-" if r.rss_mb is None else f"{r.rss_mb:.0f}",
        ]
        row.extend(
            f"{r.rps / other.rps:.2f}" if other.rps else "-"
            for other in results
            if other.name.startswith(("nginx", "HAProxy", "aiohttp"))
        )
        rows.append(row)
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per peer (median kept)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--stream-size", type=int, default=1 << 30)
    parser.add_argument("--idle", type=int, default=10_000)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print(
            "bench: wrk is needed (make bench installs it from Debian's packages)", file=sys.stderr
        )
        return 2
    os.environ.setdefault("SHAPER_BENCH_TOKEN", "bench")
    # A `kill` stops the peers too (through the `finally` below), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ticks = cpu_ticks()
    # The whole run with idle CPUs polling, as the README's latency tuning has a host (see
    # _idle_polling); `halting()` gives the two proxies that matter without it, for comparison.
    polling = _idle_polling()
    with tempfile.TemporaryDirectory(prefix="shaper-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            upstream_port, upstream_pid, upstream_kind = bench.upstream()
            peers = [Peer(f"direct to the upstream ({upstream_kind})", upstream_port, upstream_pid)]
            for make in (bench.nginx_proxy, bench.haproxy):
                peer = make(upstream_port)
                if peer is not None:
                    peers.append(peer)
            peers.append(bench.aiohttp_proxy(upstream_port))
            shaper = bench.shaper(upstream_port, 1, "traffic-shaper, every feature on")
            peers.append(shaper)
            peers.append(bench.shaper(upstream_port, 1000, "traffic-shaper, 1,000 routes"))
            for peer in peers:  # warm up pools and caches
                run_wrk(peer.port, 1, _LUA)
            results = measure_rounds(peers, args.duration, args.rounds)
            shaper_result = next(r for r in results if r.name == shaper.name)
            notes = [latency_added(peers[0], shaper, shaper_result.rps / 2, args.duration)]
            notes.append(routes_cost(shaper, peers[-1], args.duration / 2))
            nginx = [peer for peer in peers if peer.name == "nginx as a proxy"]
            if polling is not None and nginx:
                os.close(polling)
                try:
                    notes.append(halting([nginx[0], shaper], args.duration))
                finally:
                    polling = _idle_polling()
            notes.append(streaming(bench, args.stream_size))
            notes.append(idle_connections(bench, upstream_port, args.idle))
            notes.append(hotpath_cost())
            notes.append(steal_note(ticks, cpu_ticks()))
        finally:
            bench.stop_all()
            if polling is not None:
                os.close(polling)
    cpu = platform.processor() or platform.machine()
    print(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), Python "
        f"{platform.python_version()}, wrk -t1 -c50 -d{round(args.duration)}s on loopback, "
        f"median of {args.rounds} runs per peer, "
        + (
            "idle CPUs polling (/dev/cpu_dma_latency held at 0)"
            if polling is not None
            else "CPU idle states as the machine has them (/dev/cpu_dma_latency not writable)"
        )
        + f"; traffic-shaper's data path {'compiled' if _shaper_native() else 'from source'}\n"
    )
    print(table(results, args.markdown))
    print()
    for note in notes:
        print(("- " if args.markdown else "") + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
