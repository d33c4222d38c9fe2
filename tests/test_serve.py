"""`shaper serve` as a real process: command-line overrides, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from .conftest import StartUpstream, make_config

_LISTENING = re.compile(
    rb"proxy listening on http://([\d.]+):(\d+), admin on http://([\d.]+):(\d+)"
)


class ServeProcess:
    """A `python -m proxy serve` child whose addresses are read from its start-up log line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.proxy = ""
        self.admin = ""
        self.log = b""
        self.terminated = False

    @classmethod
    async def start(
        cls, config: Path, *extra: str, env: dict[str, str] | None = None
    ) -> ServeProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "-c",
            str(config),
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        me = cls(process)
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = await process.stderr.readline()
                assert line, f"serve exited early: {me.log.decode()}"
                me.log += line
                if m := _LISTENING.search(line):
                    me.proxy = f"http://{m[1].decode()}:{m[2].decode()}"
                    me.admin = f"http://{m[3].decode()}:{m[4].decode()}"
                    return me

    def terminate(self) -> None:
        """One SIGTERM only: a second one during the drain would kill the process outright."""
        if not self.terminated and self.process.returncode is None:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        self.terminate()
        async with asyncio.timeout(20):
            _, err = await self.process.communicate()
        self.log += err
        assert self.process.returncode is not None
        return self.process.returncode


def _write(path: Path, upstream: str, port: int = 0, admin_port: int = 0) -> None:
    raw = make_config(
        {"app": [upstream]}, [{"name": "main", "match": {"path_prefix": "/"}, "upstream": "app"}]
    )
    raw["listen"]["port"] = port
    raw["admin"]["port"] = admin_port
    raw["state_dir"] = str(path.parent / "state")
    path.write_text(yaml.safe_dump(raw))


async def _reload_successes(admin: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(admin + "/metrics") as r:
        text = await r.text()
    m = re.search(r'shaper_config_reloads_total\{result="success"\} ([\d.]+)', text)
    return float(m[1]) if m else 0.0


def _slow_app(release: asyncio.Event, started: asyncio.Event) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        if request.path == "/slow":
            started.set()
            await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def test_serve_sighup_and_sigterm_drain(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """SIGHUP reloads; SIGTERM stops accepting, lets the in-flight request finish, exits 0."""
    release, started = asyncio.Event(), asyncio.Event()
    upstream = await start_upstream(_slow_app(release, started))
    config = tmp_path / "rollouts.yaml"
    _write(config, upstream)
    # The file names ports that are taken; the command-line overrides must win.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    _write(config, upstream, port=busy, admin_port=busy)
    try:
        serve = await ServeProcess.start(
            config, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"
        )
    finally:
        taken.close()
    assert not serve.proxy.endswith(f":{busy}") and not serve.admin.endswith(f":{busy}")
    try:
        assert await _reload_successes(serve.admin) == 1.0
        serve.process.send_signal(signal.SIGHUP)
        for _ in range(200):
            if await _reload_successes(serve.admin) == 2.0:
                break
            await asyncio.sleep(0.05)
        assert await _reload_successes(serve.admin) == 2.0

        async with aiohttp.ClientSession() as client:
            slow = asyncio.ensure_future(client.get(serve.proxy + "/slow"))
            await asyncio.wait_for(started.wait(), 10)
            serve.terminate()
            # The listener closes first: new connections are refused while the slow one drains.
            for _ in range(200):
                try:
                    async with aiohttp.ClientSession() as fresh:
                        async with fresh.get(serve.proxy + "/"):
                            pass
                except aiohttp.ClientConnectorError:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("listener still accepting after SIGTERM")
            release.set()
            response = await slow
            assert response.status == 200
            assert await response.text() == "done"
        assert await serve.stop() == 0
    finally:
        release.set()
        await serve.stop()


async def test_serve_bad_config_exits_1(tmp_path: Path) -> None:
    """`serve` on an invalid file prints the errors with their paths and exits 1."""
    config = tmp_path / "rollouts.yaml"
    config.write_text("upstreams: {}\nroutes: []\nlisten: {port: 99999}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    text = err.decode()
    assert "listen.port" in text
    assert "upstreams" in text
    assert "Traceback" not in text


async def test_parser_check_at_start_up(start_upstream: StartUpstream, tmp_path: Path) -> None:
    """With aiohttp's C parser disabled, serve warns at start-up and build_info says python."""
    upstream = await start_upstream(web.Application())
    config = tmp_path / "rollouts.yaml"
    _write(config, upstream)
    serve = await ServeProcess.start(config, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    try:
        assert b"C HTTP parser is not in use" in serve.log
        async with aiohttp.ClientSession() as client:
            async with client.get(serve.admin + "/metrics") as r:
                assert 'parser="python"' in await r.text()
    finally:
        assert await serve.stop() == 0
