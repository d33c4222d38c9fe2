"""`make bench-hotpath`: the CPU cost of one proxied request, without sockets or noise.

The proxy's own code for the common request, whole: the client connection's protocol fed the
bytes of a request (aiohttp's C parser, the forwarder with every feature of make bench's config
on: sticky 10% rollout with an SLO, breakers, metrics, flags), the request written to a pooled
upstream connection, that connection's protocol fed the upstream's answer (aiohttp's response
parser), and the response written back to the client. The transports are in memory, so what is
measured is the proxy's user-space work and nothing of the kernel's, the load generator's or
the upstream's.

Two figures, and their ratio:
  * microseconds per request (timeit, best of several runs): moves with the machine's load;
  * instructions per request, with `--callgrind` when valgrind is installed: the program run
    under callgrind twice, with two request counts, and the difference divided, so start-up
    cancels out. Whatever else the machine is doing, two runs in a row agree to a few dozen
    instructions and runs of different moments to a few hundred (the temporary paths differ,
    and the hashing with them), which is what tells a 1% change from this machine's 10-20%
    run-to-run noise in wrk runs;
  * instructions per microsecond: the machine's speed at the time, a gauge of the contention
    that slows every timing of the same run (and that CPU steal does not always show).

With `--routes 1000` the config has 1,000 routes (make bench's second config; the request still
goes to the rollout route): the cost of a large route table, to the instruction.

Run: python bench/hotpath.py [--requests 50000] [--callgrind] [--routes N]
Not a test: nothing here asserts a timing (tests/test_hotpath.py checks that the harness really
proxies what it claims to).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from run import shaper_config  # bench/ is the script directory

from proxy.client import _Connection
from proxy.config import load
from proxy.forward import Forwarder
from proxy.listener import ClientConnection, ProxyServer
from proxy.metrics import Metrics
from proxy.runtime import Runtime

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nX-User-Id: user-42\r\n\r\n"
# What the bench's nginx upstream answers (bench/nginx-upstream.conf), byte for byte in shape.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 20\r\nConnection: keep-alive\r\n\r\n"
    b"ok ok ok ok ok ok o\n"
)


class MemoryTransport(asyncio.Transport):
    """A transport that keeps what is written; never paused, never closed by the peer."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


@dataclass
class Harness:
    """One client connection and one idle pooled connection per upstream endpoint."""

    client: ClientConnection
    client_transport: MemoryTransport
    upstreams: list[tuple[_Connection, MemoryTransport]] = field(default_factory=list)
    runtime: Runtime | None = None

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.snapshot.upstreams.close()

    def one(self) -> None:
        """One request through the proxy: client bytes in, upstream answer in, response out."""
        self.client.data_received(REQUEST)
        for connection, _ in self.upstreams:
            if connection.listener is not None:  # the request went out on this one
                connection.data_received(RESPONSE)


def build(work: Path, routes: int = 1) -> Harness:
    """The proxy's pieces as `shaper serve` assembles them, on in-memory transports. Must be
    called with the event loop running (the protocols take it)."""
    os.environ.setdefault("SHAPER_BENCH_TOKEN", "bench")
    path = work / "shaper.yaml"
    path.write_text(shaper_config(8080, 9901, 9000, routes, work))
    config = load(path)
    metrics = Metrics(time.monotonic, "c")
    runtime = Runtime(config, path, metrics)
    forwarder = Forwarder(runtime, random.random)
    server = ProxyServer(forwarder.begin, limits=config.limits, metrics=metrics)
    loop = asyncio.get_running_loop()
    client_transport = MemoryTransport()
    client = server()
    client.connection_made(client_transport)
    harness = Harness(client, client_transport, runtime=runtime)
    for pool in runtime.snapshot.upstreams.values():
        for endpoint in pool.endpoints:
            transport = MemoryTransport()
            connection = _Connection(loop)
            connection.connection_made(transport)
            # Into the endpoint's pool as a connection released after a first exchange would
            # be (the pool's own bookkeeping, which only a real connect would otherwise do).
            endpoint.connections._busy += 1
            endpoint.connections.release(connection, True)
            harness.upstreams.append((connection, transport))
    return harness


def check(harness: Harness, count: int) -> tuple[int, int]:
    """Run `count` requests; (responses the client got with status 200, requests the
    upstreams got), both counted from the bytes written."""
    harness.client_transport.written.clear()
    for _, transport in harness.upstreams:
        transport.written.clear()
    for _ in range(count):
        harness.one()
    answered = sum(w.startswith(b"HTTP/1.1 200 ") for w in harness.client_transport.written)
    sent = sum(w.startswith(b"GET / HTTP/1.1\r\n") for _, t in harness.upstreams for w in t.written)
    return answered, sent


async def _measure(requests: int, count: int | None, routes: int) -> float | None:
    with tempfile.TemporaryDirectory(prefix="shaper-hotpath-") as tmp:
        harness = build(Path(tmp), routes)
        try:
            answered, sent = check(harness, 1000)  # warm up caches, and prove it proxies
            if answered != 1000 or sent != 1000:
                raise SystemExit(f"hotpath: harness broken: {answered} answered, {sent} sent")
            if count is not None:
                for _ in range(count):
                    harness.one()
                return None
            runs = []
            for _ in range(5):
                runs.append(timeit.timeit(harness.one, number=requests) / requests)
                harness.client_transport.written.clear()
                for _, transport in harness.upstreams:
                    transport.written.clear()
            return min(runs) * 1e6
        finally:
            await harness.close()


def instructions_per_request(routes: int = 1, low: int = 2000, high: int = 6000) -> float:
    """Instructions of one request: callgrind at two request counts, subtracted."""
    totals = []
    for count in (low, high):
        with tempfile.TemporaryDirectory(prefix="shaper-callgrind-") as tmp:
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
                 sys.executable, __file__, "--count", str(count), "--routes", str(routes)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            ).stderr  # fmt: skip
        match = re.search(r"Collected : (\d+)", out)
        if match is None:
            raise SystemExit(f"hotpath: callgrind printed no total:\n{out[-2000:]}")
        totals.append(int(match[1]))
    return (totals[1] - totals[0]) / (high - low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="requests per timed run")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument("--routes", type=int, default=1, help="routes in the config (1 or more)")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # callgrind's runs
    args = parser.parse_args()
    if args.routes < 1:
        parser.error("--routes must be 1 or more")
    if args.count is not None:
        uvloop.run(_measure(0, args.count, args.routes))
        return 0
    per_request = uvloop.run(_measure(args.requests, None, args.routes))
    print(f"one proxied request, in memory: {per_request:.2f} us of CPU (best of 5 runs)")
    if args.callgrind:
        if not shutil.which("valgrind"):
            print("hotpath: valgrind is not installed; no instruction count", file=sys.stderr)
            return 0
        instructions = instructions_per_request(args.routes)
        print(f"instructions per request (callgrind): {instructions:,.0f}")
        print(speed(instructions, per_request))
    return 0


def speed(instructions: float, micros: float) -> str:
    """The machine's speed as this harness saw it: the same instructions in fewer µs on a
    quiet machine. Steal time misses contention for caches and memory; this shows it (a
    figure well below the usual one says the timings of the same run are slowed too)."""
    return f"machine speed: {instructions / micros:,.0f} instructions per us of CPU"


if __name__ == "__main__":
    sys.exit(main())
