"""Assembly and lifecycle: start-up, reload triggers, drain and shutdown.

`Shaper` wires the pieces together: a `Runtime` (config snapshot + metrics), the data plane
(`listener.ProxyServer`: raw asyncio protocols running `Forwarder.begin`) and the admin
application, each on its own site. Reloads come from SIGHUP, `POST /admin/reload` and a watch
of the config file (polled once a second through its resolved path, so a Kubernetes ConfigMap's
symlink swap is seen). `stop()` closes the listening sockets first, lets in-flight requests
finish up to `drain_timeout`, then closes upstream pools.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ipaddress
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import http_parser, web

from .admin import build_admin_app
from .admin_parts import AdminParts
from .api_dashboard import History
from .api_events import LagMonitor
from .config import Config, ConfigError, load
from .events import EventBus
from .forward import Forwarder
from .health import HealthChecker
from .incidents import FlagKeeper
from .listener import ProxyServer
from .metrics import Metrics
from .outbox import DamagedOutbox, Outbox, OutboxError
from .outbox import set_aside as outbox_set_aside
from .periodic import cancel_and_wait
from .runtime import ReloadResult, Runtime
from .state import AuditLog, FileStateStore
from .supervisor import Supervisor
from .upstream import Endpoint, UpstreamPool

log = logging.getLogger("shaper.server")

SERVER_LOCK_WAIT = 0.05  # seconds the event loop may wait for a lock a CLI holds (one write)

__all__ = ["Shaper", "StartupError", "parser_kind"]


class StartupError(Exception):
    """The proxy cannot start as configured; the message says why in one line."""


def parser_kind() -> str:
    """'c' when aiohttp's llhttp-based parser is in use, 'python' for the pure-Python one."""
    return "c" if http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser" else "python"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that win over the file, on start and on every reload."""

    listen: tuple[str, int] | None = None
    admin: tuple[str, int] | None = None

    def apply(self, config: Config) -> Config:
        update: dict[str, object] = {}
        if self.listen:
            update["listen"] = config.listen.model_copy(
                update={"host": self.listen[0], "port": self.listen[1]}
            )
        if self.admin:
            update["admin"] = config.admin.model_copy(
                update={"host": self.admin[0], "port": self.admin[1]}
            )
        return config.model_copy(update=update) if update else config


def _file_signature(path: Path) -> tuple[int, int, int, str] | None:
    """What changes when the file (or the symlink chain to it) is replaced or edited."""
    try:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, digest)


class Shaper:
    """A whole proxy: data plane, admin server and background tasks."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        overrides: Overrides = Overrides(),
        watch_interval: float = 1.0,
        tick_interval: float = 1.0,
        history_interval: float = 5.0,
        stream_interval: float = 1.0,
        settle_heap: bool = False,
    ) -> None:
        # What can refuse the start comes before the runtime, whose upstream pools would
        # otherwise be left open.
        self.token = self._admin_token(overrides.apply(config))
        secrets = self._webhook_secrets(config)
        self.state_dir = state_root(config, config_path)
        # Past the wait, StoreBusy, and each part carries on without the lock.
        self.store = FileStateStore(self.state_dir, lock_wait=SERVER_LOCK_WAIT)
        self.audit = AuditLog(self.state_dir)
        self.outbox, damage = self._open_outbox()
        self.parser = parser_kind()
        self.metrics = Metrics(time.monotonic, self.parser)
        self.runtime = Runtime(config, config_path, self.metrics, adjust=overrides.apply)
        self.events = EventBus(self.outbox, list(config.events.webhooks), secrets)
        if damage is not None:
            self.events.publish("outbox.set_aside", damage)
        self.runtime.publish = self.events.publish
        self.lag = LagMonitor()
        self.flag_keeper = FlagKeeper(self.runtime, self.store, self.audit)
        self.supervisor = Supervisor(self.runtime, self.store, self.audit)
        self.health = HealthChecker(self._on_health)
        self.watch_interval = watch_interval
        self.tick_interval = tick_interval
        self.history_interval = history_interval
        self.stream_interval = stream_interval
        self.history: History | None = None
        # Taken now, close to when the file was read, so an edit made before the watch task
        # first runs is still seen as a change.
        self._file_seen = _file_signature(config_path) if config_path is not None else None
        self._data_server: ProxyServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.proxy_address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        self.stopped = asyncio.Event()
        self.settle_heap = settle_heap  # `serve`: freeze the heap after start and reloads
        self._settled: _Settled | None = None  # the heap at the last full settle

    @classmethod
    def from_file(
        cls, path: str | Path, overrides: Overrides = Overrides(), settle_heap: bool = False
    ) -> Shaper:
        config_path = Path(path)
        return cls(load(config_path), config_path.absolute(), overrides, settle_heap=settle_heap)

    def _open_outbox(self) -> tuple[Outbox, dict[str, str] | None]:
        """The event outbox, and what was set aside if it was damaged.

        A damaged outbox does not stop the start: a proxy that cannot start loses all its
        traffic, and what it would lose instead is events not yet delivered and dead letters.
        Those are kept in the renamed file for a post-mortem (`sqlite3` opens it), and the
        loss is said loudly: an error in the log, an audit entry, and an event to the
        webhooks. Any other failure to open it (permissions, a directory in its place) stops
        the start with one line."""
        try:
            try:
                return Outbox(self.state_dir), None
            except DamagedOutbox as exc:
                kept = outbox_set_aside(self.state_dir) or "?"
                reason = (
                    f"{exc}; set aside as {kept}, starting with an empty outbox: its pending "
                    "events and dead letters will not be delivered"
                )
                log.error("%s", reason)
                self.audit.append(
                    {"type": "outbox", "action": "set_aside", "actor": "shaper", "reason": reason}
                )
                return Outbox(self.state_dir), {"error": exc.detail, "kept": kept}
        except OutboxError as exc:
            raise StartupError(str(exc)) from None

    @staticmethod
    def _webhook_secrets(config: Config) -> dict[str, bytes]:
        secrets: dict[str, bytes] = {}
        for i, hook in enumerate(config.events.webhooks):
            secret = os.environ.get(hook.secret_env, "")
            if not secret:
                raise StartupError(
                    f"events.webhooks[{i}].secret_env: {hook.secret_env} is not set; "
                    f"webhook {hook.name!r} would send unsigned events"
                )
            secrets[hook.name] = secret.encode()
        return secrets

    @staticmethod
    def _admin_token(config: Config) -> str | None:
        token = os.environ.get(config.admin.token_env or "", "") if config.admin.token_env else ""
        if not token and not _is_loopback(config.admin.host):
            raise StartupError(
                f"admin.host {config.admin.host} is not loopback and no admin token is set "
                f"(export {config.admin.token_env or 'a token variable named in admin.token_env'})"
            )
        return token or None

    async def start(self) -> None:
        config = self.runtime.snapshot.config
        if self.parser != "c":
            log.warning(
                "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS or no compiled "
                "extension); the pure-Python parser is slower"
            )
        forwarder = Forwarder(self.runtime, random.random)
        self._data_server = ProxyServer(forwarder.begin, limits=config.limits, metrics=self.metrics)
        parts = AdminParts(
            runtime=self.runtime,
            token=self.token,
            reload=self.reload,
            supervisor=self.supervisor,
            audit=self.audit,
            flag_keeper=self.flag_keeper,
            events=self.events,
            lag=self.lag,
            stream_interval=self.stream_interval,
        )
        self.history = History(parts, interval=self.history_interval)
        admin_app = build_admin_app(parts, self.history)
        self._admin_runner = web.AppRunner(
            admin_app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
        )
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, config.admin.host, config.admin.port)
        if self.settle_heap:
            # Before listening: the collection takes 15-45 ms, which the first requests
            # would wait out (what is made from here on is little, and young).
            self._settled = _settle_heap()
        try:
            self.proxy_address = await self._data_server.start(
                config.listen.host, config.listen.port
            )
            await admin_site.start()
        except OSError as exc:
            await self._cleanup_runners()
            await self.runtime.snapshot.upstreams.close()  # else asyncio logs their sessions
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        self.admin_address = _bound(admin_site)
        if self.runtime.config_path is not None and self.watch_interval > 0:
            self._spawn(self._watch_config(self.runtime.config_path), "config-watch")
        self.events.start()
        self.lag.start()
        self.history.start()
        self.supervisor.start(self.tick_interval)
        self.flag_keeper.start(min(0.25, self.tick_interval))
        self.health.sync(list(self.runtime.snapshot.upstreams.values()))
        log.info(
            "proxy listening on http://%s:%d, admin on http://%s:%d (parser: %s)",
            *self.proxy_address,
            *self.admin_address,
            self.parser,
        )

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reload(self) -> ReloadResult:
        """Reload from the file now (SIGHUP, admin API and the watch all come here)."""
        result = self.runtime.reload()
        if result.ok and result.changed:
            if self._data_server is not None:
                self._data_server.limits = self.runtime.snapshot.config.limits
            # Each part adopts the new config on its own: one failing (a full disk, say) must
            # not leave the others behind, nor stop the file watch.
            parts: tuple[tuple[str, Callable[[], None]], ...] = (
                ("flags", lambda: self.flag_keeper.sync(self.runtime.snapshot.config)),
                ("rollouts", self.supervisor.sync),
                ("events", self._sync_events),
                (
                    "health checks",
                    lambda: self.health.sync(list(self.runtime.snapshot.upstreams.values())),
                ),
            )
            for part, sync in parts:
                try:
                    sync()
                except Exception:
                    log.exception("after the reload, %s could not adopt the new config", part)
            if self.settle_heap:
                self._settled = _settle_heap(self._settled)
        return result

    def _on_health(self, pool: UpstreamPool, endpoint: Endpoint, healthy: bool, error: str) -> None:
        self.metrics.record_health(pool.name, endpoint.url, healthy)
        self.events.publish(
            "health.healthy" if healthy else "health.unhealthy",
            {"endpoint": endpoint.url, "error": error},
            upstream=pool.name,
        )

    def _sync_events(self) -> None:
        config = self.runtime.snapshot.config
        try:
            secrets = self._webhook_secrets(config)
        except StartupError as exc:
            log.error("webhooks keep their previous settings: %s", exc)
            return
        self.events.configure(list(config.events.webhooks), secrets)

    async def _watch_config(self, path: Path) -> None:
        last = self._file_seen
        while True:
            await asyncio.sleep(self.watch_interval)
            current = _file_signature(path)
            if current is not None and current != last:
                last = current
                log.info("config file changed; reloading")
                self.reload()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)

    async def _cleanup_runners(self) -> None:
        if self._data_server is not None:
            await self._data_server.shutdown(self.runtime.snapshot.config.drain_timeout)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests up to drain_timeout, close everything."""
        await cancel_and_wait(*self._tasks)
        await self.supervisor.stop()
        await self.lag.stop()
        if self.history is not None:
            await self.history.stop()
        await self.flag_keeper.stop()
        await self.health.close()
        await self._cleanup_runners()
        await self.runtime.snapshot.upstreams.close()
        for pool in self.runtime.draining_pools():  # replaced by a reload, busy at the end
            await pool.close()
        await self.events.close()
        log.info("stopped")


def state_root(config: Config, config_path: Path | None) -> Path:
    """The state directory; a relative one is taken from the config file's directory, so the
    same file finds the same state whatever the working directory of the process."""
    path = Path(config.state_dir)
    if not path.is_absolute() and config_path is not None:
        path = config_path.parent / path
    return path


# A reload settles the heap without walking what is frozen, unless the heap has grown by this
# much since the last full settle, or this many reloads have passed since (see `_settle_heap`).
_REGROWTH = 1.25
_PARTIAL_SETTLES = 16


@dataclass
class _Settled:
    """The heap at the last full settle, and the reloads settled without the full walk since."""

    blocks: int
    partial: int = 0


def _settle_heap(last: _Settled | None = None) -> _Settled:
    """Take what is alive now (modules, the config and its route table, pools) out of the
    cyclic garbage collector's reach. Left in, a full collection walks all of it: measured
    at about 25 ms with the example config, a stall every request in flight waits out, which
    put tens of milliseconds on the p99.9 at a constant rate. What is frozen is still freed by
    reference counting.

    With no `last` (at start, before the proxy listens): the full settle, which collects the
    garbage in cycles first (`unfreeze`, `collect`, `freeze`). After a reload, a collection of
    what is not frozen (the new snapshot, what is young) and a freeze: under wrk load on a
    contended machine 0.4-1.4 ms with one route and 3-5 ms with 1,000, against 48-75 ms for
    the full one. The old snapshots are
    freed by reference counting; but a frozen reference cycle is never collected, and a
    reload freezes whatever is in flight. So the full settle runs again when the heap has
    grown by a quarter since the last one (what such cycles hold stays bounded), or after 16
    reloads (it also bounds what the count misses: pymalloc's allocated blocks are objects
    of up to 512 bytes, and a large buffer is one block or none). The blocks are a sum over
    pymalloc's pools, cheap; `gc.get_freeze_count()` walks the frozen list, several
    milliseconds by itself. Where pymalloc is off (PYTHONMALLOC=malloc), the count is 0 and
    every settle is the full one."""
    if (
        last is not None
        and last.partial < _PARTIAL_SETTLES
        and 0 < sys.getallocatedblocks() <= last.blocks * _REGROWTH
    ):
        gc.collect()
        gc.freeze()
        # A heap that shrank (a peak of connections gone) bounds the next growth from there.
        return _Settled(min(last.blocks, sys.getallocatedblocks()), last.partial + 1)
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return _Settled(sys.getallocatedblocks())


def _bound(site: web.TCPSite) -> tuple[str, int]:
    server = site._server  # aiohttp keeps the asyncio server here; there is no public accessor
    sockets = getattr(server, "sockets", None)
    assert sockets, "site is not listening"
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


async def serve(path: str | Path, overrides: Overrides = Overrides()) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    try:
        shaper = Shaper.from_file(path, overrides, settle_heap=True)
        await shaper.start()
    except (ConfigError, StartupError) as exc:
        log.error("%s", exc)
        return 1
    shaper.install_signal_handlers()
    await shaper.stopped.wait()
    log.info("draining")
    await shaper.stop()
    return 0
