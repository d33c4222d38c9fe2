"""Shared fixtures: real upstream servers and a real proxy, both on loopback port 0."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.config import Config, load_text
from proxy.server import Shaper

from .rawbytes import RecordingUpstream

StartUpstream = Callable[[web.Application], Awaitable[str]]
StartShaper = Callable[..., Awaitable[Shaper]]


def make_config(
    upstreams: dict[str, list[str]] | dict[str, dict[str, Any]],
    routes: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A config dict listening on port 0; upstream values are endpoint lists or full dicts."""
    ups = {
        name: ({"endpoints": spec} if isinstance(spec, list) else spec)
        for name, spec in upstreams.items()
    }
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0, "token_env": "SHAPER_TEST_TOKEN"},
        "upstreams": ups,
        "routes": routes,
    }
    raw.update(extra)
    return raw


def to_config(raw: dict[str, Any]) -> Config:
    return load_text(yaml.safe_dump(raw), "test")


_PORTS = random.Random()  # its own: a test that seeds the global generator does not repeat ports


def free_port() -> int:
    """A loopback port free now, for a process that binds it later. Taken below the kernel's
    ephemeral range: a port of that range, free when asked, can be given to an outgoing
    connection (a health check, a client) before the process binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = _PORTS.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """Start an aiohttp application on 127.0.0.1:0; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def start_shaper(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StartShaper]:
    """Start a whole proxy (data plane + admin) from a config dict; stopped after the test.

    Pass `path=` to have it reload from (and watch) a file holding the same YAML."""
    shapers: list[Shaper] = []

    async def start(raw: dict[str, Any], path: Path | None = None, **kwargs: Any) -> Shaper:
        raw.setdefault("state_dir", str(tmp_path_factory.mktemp("state")))
        if path is not None:
            path.write_text(yaml.safe_dump(raw))
        shaper = Shaper(to_config(raw), path, **kwargs)
        await shaper.start()
        shapers.append(shaper)
        return shaper

    yield start
    for shaper in reversed(shapers):
        await shaper.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    """A `RecordingUpstream` (tests/rawbytes.py) on 127.0.0.1:0, closed after the test."""
    recording = RecordingUpstream()
    await recording.start()
    yield recording
    await recording.close()
