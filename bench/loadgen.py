"""An open-loop, constant-rate HTTP/1.1 load generator for latency figures.

wrk is closed-loop: each connection sends its next request only after the previous answer, so
when the server slows down, fewer requests are sent and the slow period is under-sampled
("coordinated omission"). Here request i is due at `start + i / rate` whatever happened before:

  * a due request goes out on an idle keep-alive connection, or on a new one (up to
    --max-connections), or waits for one to come free;
  * its latency runs from when it went out to when its whole response arrived; when it had to
    wait for a connection because all of them were busy (the server is behind), from when it
    was due, so queueing the server causes is counted, not hidden. The generator's own timer
    slack is not counted against the server.

One loop over select(2), without asyncio: select's timeout is in microseconds, so requests go
out evenly spaced (epoll's and libuv's millisecond timers would send them in bursts, and the
figure would measure the queueing of the bursts), and only the connections waiting for an
answer are polled, so its cost does not grow with the connections a stall made it open. At
40-60 µs of CPU per request (the asyncio version it replaced took about 130), it drives about
twice the rate on its core before that core, not the server, sets the figure.

Prints one JSON object: the rate asked and achieved, counts, errors, and latency percentiles in
milliseconds. Not a test: nothing asserts on these numbers.
Run: python bench/loadgen.py --port 8080 --rate 5000 --duration 8 [--header 'X-User-Id: u']
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
from array import array
from collections import deque
from time import perf_counter

_READ = 65536
_UNTIL_CLOSE = 1 << 62  # a body without Content-Length or chunked framing: until EOF


class _Connection:
    """One keep-alive connection, one request at a time, and the response it is reading."""

    __slots__ = ("buf", "chunked", "close", "fd", "need", "sock", "started", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.started = 0.0  # when the request in flight counts from
        self.buf = b""
        self.need = -1  # body bytes still to come; -1 while the head is incomplete
        self.status = 0
        self.close = False
        self.chunked = False

    def response_done(self) -> bool:
        """Whether `buf` now holds the whole response (then consumed from it)."""
        if self.need < 0 and not self._head():
            return False
        if self.chunked:
            return self._chunks()
        if len(self.buf) < self.need:
            return False
        self.buf = self.buf[self.need :]
        self.need = -1
        return True

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4 :]
        version, status = lines[0].split(" ", 2)[:2]
        self.status = int(status)
        self.close = version == "HTTP/1.0"
        self.chunked = False
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                self.chunked = value.endswith("chunked")
            elif name == "connection" and value in ("close", "keep-alive"):
                self.close = value == "close"
        if self.chunked:
            self.need = 0
        elif length >= 0:
            self.need = length
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.need = 0
        else:
            self.need, self.close = _UNTIL_CLOSE, True
        return True

    def _chunks(self) -> bool:
        buf = self.buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            size = int(buf[:line_end].split(b";", 1)[0], 16)
            if size:
                if len(buf) < line_end + 4 + size:
                    break
                buf = buf[line_end + 4 + size :]  # size line, data, CRLF
                continue
            if buf[line_end : line_end + 4] == b"\r\n\r\n":
                trailer_end = line_end
            else:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    break
            self.buf = buf[trailer_end + 4 :]
            self.need = -1
            return True
        self.buf = buf
        return False


class Generator:
    def __init__(
        self, host: str, port: int, rate: float, duration: float, max_connections: int,
        headers: list[str],
    ) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.rate, self.duration = rate, duration
        self.max_connections = max_connections
        lines = ["GET / HTTP/1.1", f"Host: {host}:{port}", *headers]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.idle: list[_Connection] = []
        self.busy: dict[int, _Connection] = {}  # by descriptor: the ones select watches
        self.connections = 0  # open
        self.waiting: deque[float] = deque()  # due times of requests waiting for a connection
        self.latencies = array("d")
        self.sent = self.errors = self.non_2xx = 0

    def run(self) -> dict[str, object]:
        for _ in range(min(16, self.max_connections)):
            self.idle.append(self._open())
        start = perf_counter() + 0.01
        total = int(self.rate * self.duration)
        next_index = 0
        drain_until = 0.0
        while True:
            now = perf_counter()
            if next_index < total:
                due_index = min(total, int((now - start) * self.rate) + 1)
                while next_index < due_index:
                    self._due(start + next_index / self.rate, now)
                    next_index += 1
                timeout = max(0.0, start + next_index / self.rate - perf_counter())
            elif self.busy or self.waiting:
                drain_until = drain_until or now + 10.0
                if now >= drain_until:  # answers that never came
                    self.errors += len(self.busy) + len(self.waiting)
                    break
                timeout = drain_until - now
            else:
                break
            ready = select.select(list(self.busy), [], [], timeout)[0] if self.busy else []
            if not ready and not self.busy:
                select.select([], [], [], timeout)  # nothing to watch: sleep to the next due
            for fd in ready:
                self._readable(self.busy[fd])
        elapsed = perf_counter() - start
        for conn in [*self.idle, *self.busy.values()]:
            conn.sock.close()
        return self._report(elapsed)

    def _open(self) -> _Connection:
        sock = socket.create_connection((self.host, self.port), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.connections += 1
        return _Connection(sock)

    def _due(self, due: float, now: float) -> None:
        self.sent += 1
        if self.idle:
            self._send(self.idle.pop(), now)
        elif self.connections < self.max_connections:
            try:
                conn = self._open()
            except OSError:
                self.errors += 1
                return
            self._send(conn, due)  # it waited for the connection: counted from when due
        else:
            self.waiting.append(due)

    def _send(self, conn: _Connection, counts_from: float) -> None:
        conn.started = counts_from
        try:
            conn.sock.send(self.request)
        except OSError:
            self._failed(conn)
            return
        self.busy[conn.fd] = conn

    def _readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if conn.need == _UNTIL_CLOSE:  # a body delimited by the close: complete now
                conn.need = len(conn.buf)
                self._answered(conn)
            else:
                self._failed(conn)
            return
        conn.buf += data
        if conn.response_done():
            self._answered(conn)

    def _answered(self, conn: _Connection) -> None:
        self.latencies.append(perf_counter() - conn.started)
        if not 200 <= conn.status < 300:
            self.non_2xx += 1
        del self.busy[conn.fd]
        if conn.close:
            self._drop(conn)
            if self.waiting and self.connections < self.max_connections:
                try:
                    self._send(self._open(), self.waiting.popleft())
                except OSError:
                    self.errors += 1
        elif self.waiting:
            self._send(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)

    def _failed(self, conn: _Connection) -> None:
        self.errors += 1
        self.busy.pop(conn.fd, None)
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.sock.close()
        self.connections -= 1

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
    generator = Generator(
        args.host, args.port, args.rate, args.duration, args.max_connections, args.header
    )
    try:
        result = generator.run()
    except OSError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
