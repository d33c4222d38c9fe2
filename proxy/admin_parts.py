"""What the admin server is built from: one bundle instead of a long argument list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .api_events import LagMonitor
from .events import EventBus
from .incidents import FlagKeeper
from .runtime import ReloadResult, Runtime
from .state import AuditLog
from .supervisor import Supervisor

__all__ = ["AdminParts"]


@dataclass(frozen=True)
class AdminParts:
    runtime: Runtime
    token: str | None
    reload: Callable[[], ReloadResult]
    supervisor: Supervisor
    audit: AuditLog
    flag_keeper: FlagKeeper
    events: EventBus
    lag: LagMonitor
    stream_interval: float = 1.0  # seconds between Server-Sent Events snapshots
