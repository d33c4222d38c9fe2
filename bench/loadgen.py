"""An open-loop, constant-rate HTTP/1.1 load generator for latency figures.

wrk is closed-loop: each connection sends its next request only after the previous answer, so
when the server slows down, fewer requests are sent and the slow period is under-sampled
("coordinated omission"). Here request i is due at `start + i / rate` whatever happened before:

  * a due request goes out on an idle keep-alive connection, or on a new one (up to
    --max-connections), or waits for one to come free;
  * its latency runs from when it went out to when its whole response arrived; when it had to
    wait for a connection because all of them were busy (the server is behind), from when it
    was due, so queueing the server causes is counted, not hidden. The generator's own timer
    slack (its loop wakes up to about a millisecond late, and sends what fell due meanwhile)
    is not counted against the server.

Prints one JSON object: the rate asked and achieved, counts, errors, and latency percentiles in
milliseconds. Not a test: nothing asserts on these numbers.
Run: python bench/loadgen.py --port 8080 --rate 5000 --duration 8 [--header 'X-User-Id: u']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import sys
from array import array
from collections import deque
from time import perf_counter  # loop.time() under uvloop has millisecond resolution

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser


class _Connection(BaseProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, gen: Generator) -> None:
        super().__init__(gen.loop)
        self.gen = gen
        self.parser = HttpResponseParser(
            self, gen.loop, 2**16, response_with_body=True, read_until_eof=True
        )
        self.started = 0.0  # when the request in flight counts from; 0 when idle

    def send(self, counts_from: float) -> None:
        assert self.transport is not None
        self.started = counts_from
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        try:
            messages, _, _ = self.parser.feed_data(data)
        except Exception:
            self.gen.failed(self)
            return
        for message, payload in messages:
            if payload.is_eof():
                self.gen.done(self, message.code, message.should_close)
            else:
                payload.on_eof(
                    lambda code=message.code, close=message.should_close: self.gen.done(
                        self, code, close
                    )
                )

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.started:
            self.gen.failed(self)
        self.gen.lost(self)


class Generator:
    def __init__(
        self, host: str, port: int, rate: float, duration: float, max_connections: int,
        headers: list[str],
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.rate, self.duration = rate, duration
        self.max_connections = max_connections
        lines = ["GET / HTTP/1.1", f"Host: {host}:{port}", *headers]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.idle: list[_Connection] = []
        self.connections = 0  # open or opening
        self.waiting: deque[float] = deque()  # due times of requests waiting for a connection
        self.latencies = array("d")
        self.sent = self.errors = self.non_2xx = 0
        self.in_flight = 0
        self.finished = asyncio.Event()
        self.start = 0.0
        self.sending = True

    async def run(self) -> dict[str, object]:
        for _ in range(min(16, self.max_connections)):
            await self._open()
        self.start = perf_counter() + 0.01
        total = int(self.rate * self.duration)
        next_index = 0
        while next_index < total:
            now = perf_counter()
            due_index = min(total, int((now - self.start) * self.rate) + 1)
            while next_index < due_index:
                due = self.start + next_index / self.rate
                next_index += 1
                self.sent += 1
                self.in_flight += 1
                if self.idle:
                    self.idle.pop().send(now)
                else:
                    self.waiting.append(due)
                    if self.connections < self.max_connections:
                        self.loop.create_task(self._open_for_waiting())
            next_due = self.start + next_index / self.rate
            await asyncio.sleep(max(0.0, next_due - perf_counter()))
        self.sending = False
        if self.in_flight:
            try:
                async with asyncio.timeout(10.0):
                    await self.finished.wait()
            except TimeoutError:
                self.errors += self.in_flight
        elapsed = perf_counter() - self.start
        return self._report(elapsed)

    async def _open(self) -> None:
        self.connections += 1
        try:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError:
            self.connections -= 1
            raise
        self.idle.append(conn)

    async def _open_for_waiting(self) -> None:
        try:
            await self._open()
        except OSError:
            if self.waiting:
                self.waiting.popleft()
                self._count_error()
            return
        self._next_waiting()

    def _next_waiting(self) -> None:
        while self.waiting and self.idle:
            self.idle.pop().send(self.waiting.popleft())

    def done(self, conn: _Connection, status: int, close: bool) -> None:
        self.latencies.append(perf_counter() - conn.started)
        conn.started = 0.0
        if not 200 <= status < 300:
            self.non_2xx += 1
        self.in_flight -= 1
        if close:
            if conn.transport is not None:
                conn.transport.close()
        else:
            self.idle.append(conn)
            self._next_waiting()
        self._check_finished()

    def failed(self, conn: _Connection) -> None:
        conn.started = 0.0
        self._count_error()
        if conn.transport is not None:
            conn.transport.close()

    def lost(self, conn: _Connection) -> None:
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if self.waiting and self.connections < self.max_connections:
            self.loop.create_task(self._open_for_waiting())

    def _count_error(self) -> None:
        self.errors += 1
        self.in_flight -= 1
        self._check_finished()

    def _check_finished(self) -> None:
        if not self.sending and self.in_flight == 0:
            self.finished.set()

    def _report(self, elapsed: float) -> dict[str, object]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(p / 100.0 * len(ordered)))] * 1000.0

        return {
            "rate": self.rate,
            "achieved": round(len(ordered) / elapsed, 1) if elapsed > 0 else 0.0,
            "sent": self.sent,
            "completed": len(ordered),
            "errors": self.errors,
            "non_2xx": self.non_2xx,
            "connections": self.connections,
            "p50_ms": round(pct(50), 3),
            "p99_ms": round(pct(99), 3),
            "p999_ms": round(pct(99.9), 3),
            "max_ms": round(ordered[-1] * 1000.0, 3) if ordered else 0.0,
        }


def _fine_timer_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def _main(args: argparse.Namespace) -> dict[str, object]:
    generator = Generator(
        args.host, args.port, args.rate, args.duration, args.max_connections, args.header
    )
    return await generator.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds")
    parser.add_argument("--max-connections", type=int, default=256, help="at most 900 (select)")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if not 1 <= args.max_connections <= 900:
        parser.error("--max-connections must be between 1 and 900 (select's descriptor limit)")
    try:
        # The stdlib loop on select(2): its timers wake to the microsecond, so requests go out
        # evenly spaced. uvloop's (libuv's) and epoll's timers have millisecond resolution,
        # which would send them in bursts and measure the queueing of the bursts.
        with asyncio.Runner(loop_factory=_fine_timer_loop) as runner:
            result = runner.run(_main(args))
    except OSError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
