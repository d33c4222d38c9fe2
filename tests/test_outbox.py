"""The SQLite outbox: order per sink, retries, dead letters, duplicates, reopening, damage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.events import sign
from proxy.outbox import DamagedOutbox, Outbox, OutboxError, SinkCounts, set_aside


def _event(n: int) -> dict[str, object]:
    return {"id": f"e-{n}", "time": 1000.0 + n, "type": "safe_mode", "details": {"n": n}}


def test_order_retry_and_dead_letters(tmp_path: Path) -> None:
    """Each sink sees its events oldest first; a failed one stays at the head until it is
    delivered or dead; dead letters are listed in order and counted."""
    outbox = Outbox(tmp_path)
    for n in range(3):
        assert outbox.add(_event(n), ["a", "b"] if n != 1 else ["a"])
    head = outbox.head("a")
    assert head is not None and head.event_id == "e-0"
    outbox.failed(head, "503", retry_at=5.0)
    again = outbox.head("a")
    assert again is not None and (again.event_id, again.attempts) == ("e-0", 1)
    outbox.failed(again, "503", retry_at=None)
    assert [d.event_id for d in outbox.dead("a")] == ["e-0"]
    nxt = outbox.head("a")
    assert nxt is not None and nxt.event_id == "e-1"
    outbox.delivered(nxt)
    counts = outbox.counts("a")
    assert (counts.pending, counts.dead, counts.oldest_pending) == (1, 1, 1002.0)
    assert outbox.counts("b").pending == 2
    outbox.close()


def test_duplicate_ids_are_stored_once(tmp_path: Path) -> None:
    """Publishing the same event id twice changes nothing the second time."""
    outbox = Outbox(tmp_path)
    assert outbox.add(_event(7), ["a"])
    assert not outbox.add(_event(7), ["a"])
    assert outbox.counts("a").pending == 1
    outbox.close()


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    """A new process sees the pending and dead deliveries of the old one, bodies intact."""
    outbox = Outbox(tmp_path)
    outbox.add(_event(1), ["a"])
    outbox.add(_event(2), ["a"])
    first = outbox.head("a")
    assert first is not None
    outbox.failed(first, "down", retry_at=None)
    outbox.close()
    reopened = Outbox(tmp_path)
    assert [d.event_id for d in reopened.dead("a")] == ["e-1"]
    head = reopened.head("a")
    assert head is not None and head.to_json()["event"]["details"] == {"n": 2}
    reopened.close()


def test_signature_is_hmac_sha256() -> None:
    """The signature header is sha256=<hex HMAC-SHA256 of the body>, as documented."""
    assert sign(b"key", b"body") == (
        "sha256=515aae133b435d4000956731f68ae5cf5eb85d4f0dc6a546d2bfcd3595ec1ae1"
    )


def _filled(root: Path, events: int) -> None:
    outbox = Outbox(root)
    for n in range(events):
        outbox.add({**_event(n), "details": {"pad": "x" * 300}}, ["a"])
    outbox.close()


def test_a_file_that_is_not_sqlite_is_damaged_and_can_be_set_aside(tmp_path: Path) -> None:
    """Garbage in events.db is a DamagedOutbox naming the file; set_aside keeps the bytes
    (with the -wal and -shm files beside it) under a new name, and a new outbox starts empty."""
    garbage = b"not a database " * 300
    (tmp_path / "events.db").write_bytes(garbage)
    with pytest.raises(DamagedOutbox) as info:
        Outbox(tmp_path)
    assert str(info.value) == (
        f"the event outbox {tmp_path / 'events.db'} is damaged: file is not a database"
    )
    # SQLite drops the log of a file it cannot read when it closes it; one that is still
    # there (another process has it open) goes with the database.
    (tmp_path / "events.db-wal").write_bytes(b"old log")
    (tmp_path / "events.db-shm").write_bytes(b"old index")
    kept = set_aside(tmp_path)
    assert re.fullmatch(r"events\.db\.damaged-\d+", kept)
    assert (tmp_path / kept).read_bytes() == garbage
    assert (tmp_path / f"{kept}-wal").read_bytes() == b"old log"
    assert (tmp_path / f"{kept}-shm").read_bytes() == b"old index"
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept, f"{kept}-shm", f"{kept}-wal"]
    fresh = Outbox(tmp_path)
    assert fresh.counts("a") == SinkCounts(0, None, 0)
    assert fresh.add(_event(1), ["a"])
    fresh.close()


def test_a_damaged_page_is_found_at_open(tmp_path: Path) -> None:
    """A real outbox with one page overwritten opens as a DamagedOutbox (the check reads
    every page), not as an outbox that fails on some later publish."""
    _filled(tmp_path, 200)
    with (tmp_path / "events.db").open("r+b") as db:
        db.seek(4096 * 10)
        db.write(b"\xff" * 4096)
    with pytest.raises(DamagedOutbox, match=r"is damaged: .*Page"):
        Outbox(tmp_path)


def test_an_outbox_that_cannot_be_opened_is_not_called_damaged(tmp_path: Path) -> None:
    """A directory where events.db should be is an OutboxError, never a DamagedOutbox: there
    is nothing damaged to set aside."""
    (tmp_path / "events.db").mkdir()
    with pytest.raises(OutboxError) as info:
        Outbox(tmp_path)
    assert not isinstance(info.value, DamagedOutbox)
    assert str(info.value).startswith(f"cannot open the event outbox {tmp_path / 'events.db'}")
