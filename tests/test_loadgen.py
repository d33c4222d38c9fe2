"""bench/loadgen.py, the open-loop generator behind make bench's latency figure, against real
upstreams on loopback: it sends what the rate asks for, counts every answer and failure, and
counts queueing (coordinated omission) instead of hiding it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from .conftest import StartUpstream

_LOADGEN = Path(__file__).resolve().parent.parent / "bench" / "loadgen.py"


async def _loadgen(*args: str) -> tuple[int, dict[str, Any], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(_LOADGEN),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    report = json.loads(out) if process.returncode == 0 else {}
    return process.returncode, report, err.decode()


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].strip("/")


async def test_every_request_the_rate_asks_for_is_sent_and_answered(
    start_upstream: StartUpstream,
) -> None:
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-User-Id", ""))
        return web.Response(text="ok", status=200 if len(seen) % 10 else 503)

    app = web.Application()
    app.router.add_get("/", answer)
    url = await start_upstream(app)
    code, report, err = await _loadgen(
        "--port", _port(url), "--rate", "200", "--duration", "1", "--header", "X-User-Id: u7"
    )
    assert code == 0, err
    assert report["sent"] == report["completed"] == 200 == len(seen)
    assert report["errors"] == 0
    assert report["non_2xx"] == 20  # every tenth answer was a 503
    assert set(seen) == {"u7"}
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["p999_ms"] <= report["max_ms"]


async def test_queueing_behind_a_slow_server_is_counted(start_upstream: StartUpstream) -> None:
    """One connection, 50 ms per answer, 100 requests due per second: the server can answer 20
    a second, so requests queue, and an open-loop generator counts each from when it was due.
    (A closed-loop one would report about 50 ms, the service time, however long they waited.)
    By the arithmetic the last of the 50 requests is due at 0.49 s and answered no sooner than
    2.5 s: at least 2 s of queueing, whatever the machine's speed."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/", slow)
    url = await start_upstream(app)
    code, report, err = await _loadgen(
        "--port", _port(url), "--rate", "100", "--duration", "0.5", "--max-connections", "1"
    )
    assert code == 0, err
    assert report["completed"] == 50 and report["errors"] == 0
    assert report["connections"] == 1
    assert report["max_ms"] >= 2000.0
    assert report["p50_ms"] >= 500.0


async def test_a_closed_port_fails_with_one_line(tmp_path: Path) -> None:
    from .conftest import free_port

    code, _, err = await _loadgen("--port", str(free_port()), "--rate", "10", "--duration", "1")
    assert code == 1
    assert err.startswith("loadgen: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


async def test_bad_arguments_exit_2() -> None:
    code, _, err = await _loadgen("--port", "1", "--rate", "0", "--duration", "1")
    assert code == 2 and "--rate and --duration must be positive" in err


async def test_chunked_and_closing_answers_are_read_whole(start_upstream: StartUpstream) -> None:
    """Answers framed by chunks (one split across writes, with a trailer-free end) and answers
    that close their connection are each counted once, complete, without errors: the generator
    reads HTTP/1.1 framing itself now, not through aiohttp's parser."""
    count = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal count
        count += 1
        if count % 3 == 0:
            return web.Response(text="bye", headers={"Connection": "close"})
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"x" * 5000)
        await response.write(b"y" * 70000)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", answer)
    url = await start_upstream(app)
    code, report, err = await _loadgen("--port", _port(url), "--rate", "150", "--duration", "1")
    assert code == 0, err
    assert report["sent"] == report["completed"] == 150 == count
    assert report["errors"] == 0 and report["non_2xx"] == 0
