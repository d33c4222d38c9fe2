"""Durable runtime state: a small key-document store and the append-only audit log.

`StateStore` is the whole interface the rest of the proxy uses: `get`, `put`, `keys`,
`set_aside`, `locked` and `version`. The
default `FileStateStore` keeps one JSON document per key under `<state_dir>/state/`, each
written atomically (temporary file, fsync, rename, fsync of the directory), so a kill -9 at any
instant leaves either the old or the new document, never a torn one. A shared store for
several replicas (Redis, etcd, a database) only has to implement the same methods.

A document that is there but cannot be read (edited by hand, damaged on disk) is never taken
for an absent one, which would forget rollbacks and overrides: `get` raises `DamagedState`,
and the reader sets it aside (`set_aside`: renamed, kept for a post-mortem) before anything
writes that key again; what it then assumes is up to the reader (the supervisor holds the
rollouts at the stable; the flag keeper turns safe mode on).

`locked()` is exclusive across processes (the server and the CLI's local mode). The CLI waits
for it as long as it takes; the server (`lock_wait`) at most a few milliseconds, then gets
`StoreBusy`: its event loop must not stop serving because a CLI holding the lock was
suspended (Ctrl-Z) or sits on a slow disk. What it does then is the caller's choice.

`AuditLog` appends one JSON object per line to `<state_dir>/audit.log`, fsync'd before
`append()` returns; a torn last line (a crash mid-write) is skipped when reading.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "AuditLog",
    "DamagedState",
    "FileStateStore",
    "StateStore",
    "StoreBusy",
    "atomic_write",
    "locked_unless_busy",
    "new_id",
]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class DamagedState(Exception):
    """A state document is there but is not a JSON object."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"state document {key!r} is damaged: {detail}")
        self.key = key
        self.detail = detail


class StoreBusy(OSError):
    """Another process held the store's lock for longer than this process may wait."""


@contextlib.contextmanager
def locked_unless_busy(store: StateStore) -> Iterator[StoreBusy | None]:
    """The store's lock, or none when another process holds it past the store's wait: yields
    None when locked, the StoreBusy when not (for the caller to say so and carry on). Other
    failures to lock raise."""
    stack = contextlib.ExitStack()
    busy: StoreBusy | None = None
    try:
        stack.enter_context(store.locked())
    except StoreBusy as exc:
        busy = exc
    with stack:
        yield busy


def new_id(prefix: str, wall: float | None = None) -> str:
    """A sortable, unique id: prefix, milliseconds since the epoch, random suffix."""
    millis = int((time.time() if wall is None else wall) * 1000)
    return f"{prefix}-{millis:013d}-{secrets.token_hex(3)}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers and crashes see the old or the new bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class StateStore(Protocol):
    """Documents by key; each put is atomic and durable when it returns."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def set_aside(self, key: str) -> str: ...

    def put(self, key: str, document: dict[str, Any]) -> None: ...

    def keys(self) -> list[str]: ...

    def locked(self) -> contextlib.AbstractContextManager[None]: ...

    def version(self, key: str) -> int: ...


class FileStateStore:
    """One JSON file per key in `<root>/state/`."""

    def __init__(self, root: Path, lock_wait: float | None = None) -> None:
        """`lock_wait`: None waits for the lock as long as another process holds it; seconds
        bound the wait, after which `locked()` raises StoreBusy."""
        self.lock_wait = lock_wait
        self._stuck = False  # the last bounded wait ran out: try without waiting until it is had
        self.directory = root / "state"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._depth = 0  # how deep `locked()` is entered in this process

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"bad state key {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            document = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # Not from our atomic writes: a hand edit, or the disk.
            raise DamagedState(key, f"not valid JSON ({exc})") from None
        if not isinstance(document, dict):
            raise DamagedState(key, f"a JSON {type(document).__name__}, not an object")
        return document

    def set_aside(self, key: str) -> str:
        """Rename a damaged document out of the way (it is kept, never read again); the name
        it now has, or "" when it was gone already."""
        path = self._path(key)
        kept = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
        try:
            os.replace(path, kept)
        except FileNotFoundError:
            return ""
        _fsync_dir(path.parent)
        return kept.name  # the reader logs it, with what it does about it

    def put(self, key: str, document: dict[str, Any]) -> None:
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self._path(key), data)

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.json") if not p.name.startswith("."))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (the server and the CLI's local mode), for
        read-modify-write of a document. Re-entrant: inside it, it is held already (a flock
        on a second descriptor would wait forever for the first). One thread only."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._acquire(fd)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _acquire(self, fd: int) -> None:
        if self.lock_wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        # Once a wait has run out, the holder is stuck (suspended, a hung disk): the callers'
        # next attempts, several a second, do not wait again until one gets it.
        deadline = time.monotonic() + (0.0 if self._stuck else self.lock_wait)
        pause = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._stuck = False
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._stuck = True
                    raise StoreBusy(
                        errno.EWOULDBLOCK,
                        "another process holds the state store's lock (a `shaper` command "
                        "in local mode, suspended or on a slow disk?); this process waits "
                        f"at most {self.lock_wait * 1000:g} ms for it",
                        str(self.directory / ".lock"),
                    ) from None
                time.sleep(pause)  # short and bounded: the holder writes one small file
                pause = min(pause * 2, 0.005)

    def version(self, key: str) -> int:
        """A number that changes whenever the document does (0 if absent), for noticing writes
        by other processes (the CLI in local mode)."""
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return 0
        # Every put renames a new file into place, so the inode changes even when two writes
        # land within the file system's timestamp granularity.
        return hash((st.st_ino, st.st_mtime_ns, st.st_size)) or 1


def _entries(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The audit entries among `lines`; a line torn by a crash mid-append (or otherwise not
    a JSON object) is skipped."""
    for raw in lines:
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict):
            yield entry


class AuditLog:
    """Append-only JSON lines, durable on return."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "audit.log"
        self._recent: list[dict[str, Any]] = []
        self._recent_size = -1

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write `record` (given an `id` and `time` if it lacks them); returns what was written."""
        entry = dict(record)
        entry.setdefault("time", time.time())
        entry.setdefault("id", new_id("d", entry["time"]))
        data = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash tore the last line; end it, so this entry starts a line of its own.
                data = b"\n" + data
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            yield from _entries(handle)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest entries, newest first, from at most the last 256 KiB of the file;
        re-read only when the file grew (another process may append too)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size != self._recent_size:
            with self.path.open("rb") as handle:
                start = max(0, size - 256 * 1024)
                handle.seek(start)
                lines = handle.read().splitlines()
            if start:
                lines = lines[1:]  # the first line may be cut
            self._recent = list(_entries(reversed(lines[-200:])))
            self._recent_size = size
        return self._recent[:limit]

    def newest_first(self, block: int = 64 * 1024) -> Iterator[dict[str, Any]]:
        """The entries from the end of the file back, read a `block` at a time: what is
        asked about is almost always recent, and the log only grows. Torn lines are skipped,
        as by `__iter__`."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            end = handle.seek(0, os.SEEK_END)
            rest = b""  # the start of a line whose beginning is in the block before
            while end > 0:
                start = max(0, end - block)
                handle.seek(start)
                lines = (handle.read(end - start) + rest).split(b"\n")
                end = start
                rest = lines[0] if start > 0 else b""
                yield from _entries(reversed(lines[1:] if start > 0 else lines))

    def missing(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Those of `entries` (decisions that were saved with a state before their line was
        appended, so each comes after every earlier state-changing decision of its route)
        that are not in the log, in their order. Read from the end back only until each
        route's newest earlier decision: lines that change no state (`hold`, `refuse`) do
        not count."""
        wanted: dict[str, set[str]] = {}
        for entry in entries:
            wanted.setdefault(str(entry.get("route")), set()).add(str(entry.get("id")))
        absent: set[str] = set()
        for line in self.newest_first():
            if not wanted:
                break
            route = str(line.get("route"))
            ids = wanted.get(route)
            if ids is None or line.get("type") != "decision":
                continue
            if line.get("id") in ids:
                ids.discard(str(line.get("id")))
            elif line.get("action") not in ("hold", "refuse"):
                absent |= ids  # older than all of them: the rest were never written
                ids.clear()
            if not ids:
                del wanted[route]
        for ids in wanted.values():
            absent |= ids
        return [e for e in entries if e.get("id") in absent]

    def find(self, entry_id: str) -> dict[str, Any] | None:
        for entry in self.newest_first():
            if entry.get("id") == entry_id:
                return entry
        return None

    def tail(self, limit: int = 100, **match: str) -> list[dict[str, Any]]:
        """The last `limit` entries whose fields equal `match` (oldest first), read from the
        end back until there are `limit` of them."""
        selected: list[dict[str, Any]] = []
        if limit <= 0:
            return selected
        for entry in self.newest_first():
            if all(entry.get(k) == v for k, v in match.items()):
                selected.append(entry)
                if len(selected) == limit:
                    break
        return selected[::-1]
