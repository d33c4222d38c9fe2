"""The SQLite outbox: order per sink, retries, dead letters, duplicates, reopening."""

from __future__ import annotations

from pathlib import Path

from proxy.events import sign
from proxy.outbox import Outbox


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
