"""The event bus: every state change becomes an event, logged, stored, then delivered.

`EventBus.publish()` builds the event (id, time, type, route/upstream, details) and writes it
to the structured log. It then commits it to the SQLite outbox with one pending delivery per
interested webhook, and only then returns. A crash after that point loses nothing. It never
raises into its caller: a state change on the data path must not fail because a disk is full.
The failure is logged and counted instead.

One delivery task per webhook sends that sink's pending events in order, as a JSON POST with:
  X-Shaper-Event-Id        the event id (receivers deduplicate on it: delivery is at least once)
  X-Shaper-Event-Type      the type
  X-Shaper-Signature       sha256=<hex HMAC-SHA256 of the body with the sink's secret>
Each sink has its own `CircuitBreaker` (proxy/breaker.py used as a library), so a dead
receiver costs no time to the proxy or to the other sinks. Failed attempts are retried with
exponential backoff; after `retries` they move to the sink's dead-letter queue, which
`drain()` re-delivers in order on an operator's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .breaker import CircuitBreaker, CircuitOpenError, Transition
from .config import Webhook
from .outbox import KEEP_DELIVERED, Delivery, Outbox
from .periodic import cancel_and_wait
from .state import new_id

log = logging.getLogger("shaper.events")

__all__ = ["DrainReport", "EventBus", "sign"]

_MAX_BACKOFF = 300.0
_DRAIN_PAGE = 500  # dead letters read at a time


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value receivers recompute to verify a delivery."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass
class DrainReport:
    delivered: int = 0
    failed: int = 0
    remaining: int = 0
    would_deliver: int = 0  # dry run

    def to_json(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "remaining": self.remaining,
            "would_deliver": self.would_deliver,
        }


class _Sink:
    def __init__(self, webhook: Webhook, secret: bytes, breaker_changed: Any) -> None:
        self.webhook = webhook
        self.secret = secret
        self.breaker = CircuitBreaker(
            f"webhook:{webhook.name}",
            webhook.breaker.settings(),
            on_transition=breaker_changed,
        )
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class EventBus:
    def __init__(
        self,
        outbox: Outbox,
        webhooks: list[Webhook],
        secrets: dict[str, bytes],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.wall = wall
        self.publish_failures = 0
        self.published = 0
        self._session: aiohttp.ClientSession | None = None
        self._sinks: dict[str, _Sink] = {}
        self._running = False
        self.configure(webhooks, secrets)

    # -- configuration -----------------------------------------------------------------------

    def configure(self, webhooks: list[Webhook], secrets: dict[str, bytes]) -> None:
        """Adopt the sinks of a (re)loaded config; unchanged sinks keep their breaker."""
        wanted = {w.name: w for w in webhooks}
        for name in list(self._sinks):
            if name not in wanted:
                gone = self._sinks.pop(name)
                if gone.task is not None:
                    gone.task.cancel()
        for name, webhook in wanted.items():
            old = self._sinks.get(name)
            if old is not None and old.webhook == webhook and old.secret == secrets[name]:
                continue
            if old is not None and old.task is not None:
                old.task.cancel()
            self._sinks[name] = _Sink(webhook, secrets[name], self._breaker_changed)
            if self._running:
                self._start_sink(self._sinks[name])

    def _breaker_changed(self, name: str, change: Transition) -> None:
        log.warning("%s breaker %s -> %s (%s)", name, change.old, change.new, change.reason)

    @property
    def sinks(self) -> dict[str, _Sink]:
        return self._sinks

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self,
        event_type: str,
        details: dict[str, Any] | None = None,
        *,
        route: str | None = None,
        upstream: str | None = None,
        at: float | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Commit an event to the outbox and wake its sinks. `event_id`: an id of the
        caller's (derived from what the event is about), so that publishing the same event
        again, after a crash left it unclear whether it was, stores nothing twice."""
        when = self.wall() if at is None else at
        if event_id and when < self.wall() - KEEP_DELIVERED:
            # Older than the outbox keeps a delivered event: it may have been delivered and
            # pruned, and old news is not sent again.
            log.warning("event %s (%s) not published again: too old", event_id, event_type)
            return {"id": event_id, "time": when, "type": event_type}
        event: dict[str, Any] = {
            "id": event_id or new_id("e", when),
            "time": when,
            "type": event_type,
            "route": route,
            "upstream": upstream,
            "details": details or {},
        }
        log.info("event %s", json.dumps(event, sort_keys=True, default=str))
        interested = [n for n, s in self._sinks.items() if s.webhook.wants(event_type)]
        try:
            if not self.outbox.add(event, interested):
                return event  # published already
        except Exception:
            self.publish_failures += 1
            log.exception("cannot store event %s in the outbox", event["id"])
            return event
        self.published += 1
        for name in interested:
            self._sinks[name].wake.set()
        return event

    # -- delivery ----------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        for sink in self._sinks.values():
            self._start_sink(sink)

    def _start_sink(self, sink: _Sink) -> None:
        sink.task = asyncio.get_running_loop().create_task(
            self._deliver_forever(sink), name=f"webhook-{sink.webhook.name}"
        )

    async def close(self) -> None:
        self._running = False
        await cancel_and_wait(*(s.task for s in self._sinks.values()))
        if self._session is not None:
            await self._session.close()
        self.outbox.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _post(self, sink: _Sink, delivery: Delivery) -> None:
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "traffic-shaper-events",
            "X-Shaper-Event-Id": delivery.event_id,
            "X-Shaper-Event-Type": delivery.type,
            "X-Shaper-Delivery-Attempt": str(delivery.attempts + 1),
            "X-Shaper-Signature": sign(sink.secret, body),
        }
        timeout = aiohttp.ClientTimeout(total=sink.webhook.timeout)
        async with self._client().post(
            sink.webhook.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            await response.read()
            if not 200 <= response.status < 300:
                raise RuntimeError(f"the receiver answered {response.status}")

    def _retry_at(self, sink: _Sink, delivery: Delivery) -> float | None:
        attempt = delivery.attempts + 1  # the one that just failed
        if attempt > sink.webhook.retries:
            return None
        delay: float = min(sink.webhook.backoff * 2.0 ** (attempt - 1), _MAX_BACKOFF)
        return self.wall() + delay * random.uniform(0.8, 1.2)

    async def _deliver_forever(self, sink: _Sink) -> None:
        while True:
            try:
                await self._deliver_next(sink)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook %s: delivery loop error", sink.webhook.name)
                await asyncio.sleep(1.0)

    async def _deliver_next(self, sink: _Sink) -> None:
        delivery = self.outbox.head(sink.webhook.name)
        if delivery is None:
            sink.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink.wake.wait(), 5.0)
            return
        wait = delivery.next_attempt - self.wall()
        if wait > 0:
            await asyncio.sleep(min(wait, 5.0))
            return
        try:
            async with sink.breaker:
                await self._post(sink, delivery)
        except CircuitOpenError as exc:
            # Counts as an attempt: a receiver that stays down fills the dead-letter queue at
            # the pace of the retries, never a backlog that grows without bound in the outbox.
            self._failed(sink, delivery, str(exc))
        except (aiohttp.ClientError, TimeoutError, RuntimeError, OSError) as exc:
            self._failed(sink, delivery, str(exc) or type(exc).__name__)
        else:
            self.outbox.delivered(delivery)

    def _failed(self, sink: _Sink, delivery: Delivery, error: str) -> None:
        retry_at = self._retry_at(sink, delivery)
        self.outbox.failed(delivery, error, retry_at)
        if retry_at is None:
            log.error(
                "webhook %s: event %s moved to the dead-letter queue after %d attempts: %s",
                sink.webhook.name,
                delivery.event_id,
                delivery.attempts + 1,
                error,
            )

    # -- dead letters ------------------------------------------------------------------------

    async def drain(self, sink_name: str | None = None, dry_run: bool = False) -> DrainReport:
        """Re-deliver dead letters, oldest first, one attempt each; a sink stops at its first
        failure so its events stay in order. `remaining` is what the queue holds afterwards.
        Unknown sink names raise KeyError."""
        if sink_name is not None and sink_name not in self._sinks:
            raise KeyError(sink_name)
        report = DrainReport()
        names = [sink_name] if sink_name else sorted(self._sinks)
        for name in names:
            if dry_run:
                dead = self.outbox.counts(name).dead
                report.would_deliver += dead
                report.remaining += dead
                continue
            await self._drain_sink(self._sinks[name], report)
            report.remaining += self.outbox.counts(name).dead
        return report

    async def _drain_sink(self, sink: _Sink, report: DrainReport) -> None:
        """Page through the sink's queue as it was when the drain began: letters that die
        meanwhile (a receiver that fails again) wait for the next drain, so a drain ends."""
        name = sink.webhook.name
        through = self.outbox.last_dead(name)
        after = 0
        while page := self.outbox.dead(name, _DRAIN_PAGE, after=after, through=through):
            for letter in page:
                try:
                    # An operator asked for this: try now, whatever the breaker thinks.
                    await self._post(sink, letter)
                except (aiohttp.ClientError, TimeoutError, RuntimeError, OSError) as exc:
                    self.outbox.failed(letter, f"drain: {exc}", None)
                    report.failed += 1
                    return
                self.outbox.delivered(letter)
                report.delivered += 1
            after = page[-1].seq
