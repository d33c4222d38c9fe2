"""I/O: background tasks. `Periodic` runs a function every `interval` seconds as one named
task whose errors are logged and never end it (the data path must outlive a bug in a
background job); `cancel_and_wait()` stops any task and waits until it has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["Periodic", "cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every task (None is skipped), then wait until each has ended."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Periodic:
    def __init__(self, name: str, tick: Callable[[], object], logger: logging.Logger) -> None:
        self.name = name
        self.tick = tick
        self.logger = logger
        self._task: asyncio.Task[None] | None = None

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:
                self.logger.exception("%s failed", self.name)

    def start(self, interval: float) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(interval), name=self.name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
