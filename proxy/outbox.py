"""The durable event outbox and dead-letter queue: SQLite in WAL mode in the state directory.

Two tables. `events` holds each event once (id, time, type, JSON body). `deliveries` holds one
row per (event, sink) with a state: `pending` (the outbox), `delivered`, or `dead` (the
dead-letter queue), the attempts so far, when the next attempt is due, and the last error.

`add()` commits the event and its pending deliveries in one transaction with
`synchronous=FULL`, so when it returns the event survives a kill -9 or a power cut. Delivery
order per sink is the order of `seq`, the insertion sequence. Delivered rows are pruned after
a while; pending and dead ones never are.

A database that cannot be opened raises `OutboxError`; one that is there but damaged (not
SQLite, or failing `PRAGMA quick_check` at open) raises its subclass `DamagedOutbox`. What to
do about it is the caller's choice: `set_aside()` renames the files out of the way (kept for a
post-mortem, never read again), after which a new `Outbox` starts empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DamagedOutbox", "Delivery", "Outbox", "OutboxError", "SinkCounts", "set_aside"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER NOT NULL REFERENCES events(seq),
    sink TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (sink, seq)
);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (sink, state, seq);
"""
KEEP_DELIVERED = 24 * 3600.0
_FILE = "events.db"
# SQLite's primary result codes that mean the file itself is bad (its extended codes carry
# these in the low byte); others (locked, read-only, cannot open) are not damage.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class OutboxError(Exception):
    """The outbox database cannot be used; the message names the file and why."""


class DamagedOutbox(OutboxError):
    """The outbox database is there but damaged: garbage, or a page that fails its check."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"the event outbox {path} is damaged: {detail}")
        self.path = path
        self.detail = detail


def set_aside(root: Path) -> str:
    """Rename a damaged `events.db` and its `-wal` and `-shm` files to
    `events.db.damaged-<nanoseconds>[-wal|-shm]` (so SQLite opens the kept copy with its log);
    the new name of the database, or "" when it was gone already. The log goes first: left
    behind, a fresh database would replay it. (SQLite itself deletes the log of a file it
    could not read when the last connection closes; a log still there goes with the file.)"""
    path = root / _FILE
    kept = path.with_name(f"{_FILE}.damaged-{time.time_ns()}")
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{kept}{suffix}")
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves survive a power cut
    finally:
        os.close(fd)
    return kept.name if kept.exists() else ""


@dataclass(frozen=True)
class Delivery:
    """One event on its way to one sink."""

    seq: int
    event_id: str
    sink: str
    type: str
    time: float
    body: str  # the JSON document sent, byte for byte, on every attempt
    attempts: int
    next_attempt: float
    last_error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "event_id": self.event_id,
            "sink": self.sink,
            "type": self.type,
            "time": self.time,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "event": json.loads(self.body),
        }


@dataclass(frozen=True)
class SinkCounts:
    pending: int
    oldest_pending: float | None  # event time of the oldest undelivered event
    dead: int


class Outbox:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / _FILE
        try:
            # One connection, used from the event loop thread only; autocommit off (explicit
            # transactions below).
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:  # a directory in its place, no permission, ...
            raise OutboxError(f"cannot open the event outbox {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Every page, read once at open (milliseconds for an outbox of thousands of
            # rows): damage found now is set aside, not hit by each publish while running.
            (verdict,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                raise DamagedOutbox(self.path, " ".join(str(verdict).split()))  # one line
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if exc.sqlite_errorcode & 0xFF in _DAMAGE_CODES:
                raise DamagedOutbox(self.path, str(exc)) from None
            raise OutboxError(f"cannot open the event outbox {self.path}: {exc}") from None
        except DamagedOutbox:
            self._db.close()
            raise
        self._last_prune = 0.0

    def close(self) -> None:
        self._db.close()

    def add(self, event: dict[str, Any], sinks: Iterable[str]) -> bool:
        """Store an event and a pending delivery to each sink; False if the id was stored
        already (a duplicate publish changes nothing)."""
        body = json.dumps(event, sort_keys=True, separators=(",", ":"))
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO events (id, time, type, body) VALUES (?, ?, ?, ?)",
                (event["id"], event["time"], event["type"], body),
            )
            if cursor.rowcount == 0:
                return False
            seq = cursor.lastrowid
            self._db.executemany(
                "INSERT INTO deliveries (seq, sink, state, updated) VALUES (?, ?, 'pending', ?)",
                [(seq, sink, now) for sink in sinks],
            )
        return True

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _rows(self, where: str, args: tuple[Any, ...], limit: int) -> list[Delivery]:
        rows = self._db.execute(
            "SELECT d.seq, e.id, d.sink, e.type, e.time, e.body, d.attempts, d.next_attempt, "
            f"d.last_error FROM deliveries d JOIN events e ON e.seq = d.seq WHERE {where} "
            "ORDER BY d.seq LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [Delivery(*row) for row in rows]

    def head(self, sink: str) -> Delivery | None:
        """The oldest pending delivery of a sink (deliveries go out in order)."""
        rows = self._rows("d.sink = ? AND d.state = 'pending'", (sink,), 1)
        return rows[0] if rows else None

    def delivered(self, delivery: Delivery) -> None:
        self._set(delivery, "delivered", delivery.attempts + 1, 0.0, "")
        self._prune()

    def failed(self, delivery: Delivery, error: str, retry_at: float | None) -> None:
        """A failed attempt: retry at `retry_at`, or to the dead-letter queue when None."""
        state = "pending" if retry_at is not None else "dead"
        self._set(delivery, state, delivery.attempts + 1, retry_at or 0.0, error[:500])

    def _set(self, delivery: Delivery, state: str, attempts: int, due: float, error: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt = ?, "
                "last_error = ?, updated = ? WHERE sink = ? AND seq = ?",
                (state, attempts, due, error, time.time(), delivery.sink, delivery.seq),
            )

    def dead(
        self, sink: str | None = None, limit: int = 1000, *, after: int = 0, through: int = -1
    ) -> list[Delivery]:
        """Dead letters oldest first, at most `limit`: a page. `after` and `through` (seq
        values; -1: no upper bound) page through the queue as it was at some point."""
        where = "d.state = 'dead' AND d.seq > ? AND (? < 0 OR d.seq <= ?)"
        args: tuple[Any, ...] = (after, through, through)
        if sink is not None:
            where, args = "d.sink = ? AND " + where, (sink, *args)
        return self._rows(where, args, limit)

    def last_dead(self, sink: str) -> int:
        """The seq of the newest dead letter of a sink, 0 when there is none."""
        (seq,) = self._db.execute(
            "SELECT MAX(seq) FROM deliveries WHERE sink = ? AND state = 'dead'", (sink,)
        ).fetchone()
        return int(seq or 0)

    def pending(self, sink: str, limit: int = 1000) -> list[Delivery]:
        return self._rows("d.sink = ? AND d.state = 'pending'", (sink,), limit)

    def counts(self, sink: str) -> SinkCounts:
        pending, oldest = self._db.execute(
            "SELECT COUNT(*), MIN(e.time) FROM deliveries d JOIN events e ON e.seq = d.seq "
            "WHERE d.sink = ? AND d.state = 'pending'",
            (sink,),
        ).fetchone()
        (dead,) = self._db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND state = 'dead'", (sink,)
        ).fetchone()
        return SinkCounts(int(pending), oldest, int(dead))

    def recent(self, limit: int = 25) -> list[dict[str, Any]]:
        """The newest events, newest first, whether or not any sink wanted them."""
        rows = self._db.execute(
            "SELECT body FROM events ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def sinks_with_rows(self) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT sink FROM deliveries WHERE state != 'delivered'"
        ).fetchall()
        return sorted(r[0] for r in rows)

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        with self._transaction():
            self._db.execute(
                "DELETE FROM deliveries WHERE state = 'delivered' AND updated < ?",
                (now - KEEP_DELIVERED,),
            )
            self._db.execute(
                "DELETE FROM events WHERE seq NOT IN (SELECT seq FROM deliveries) AND time < ?",
                (now - KEEP_DELIVERED,),
            )
