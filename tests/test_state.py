"""The state store and the audit log: atomic documents, durable appends, survival of kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.state import AuditLog, DamagedState, FileStateStore, StoreBusy, new_id


def test_put_get_round_trip(tmp_path: Path) -> None:
    """Documents come back as written; unknown keys are None; keys are listed."""
    store = FileStateStore(tmp_path)
    assert store.get("rollouts") is None
    store.put("rollouts", {"shop": {"status": "rolled_back"}})
    store.put("flags", {"safe_mode": True})
    assert store.get("rollouts") == {"shop": {"status": "rolled_back"}}
    assert FileStateStore(tmp_path).keys() == ["flags", "rollouts"]
    assert not list((tmp_path / "state").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b"null", "a JSON NoneType, not an object"),
    ],
)
def test_damaged_document_is_never_read_as_absent(
    tmp_path: Path, content: bytes, detail: str
) -> None:
    """A document that is there but unreadable raises (absent would forget what it held);
    set aside, it is kept under another name that is no key, and the key reads as absent."""
    store = FileStateStore(tmp_path)
    (tmp_path / "state" / "rollouts.json").write_bytes(content)
    with pytest.raises(DamagedState, match=detail) as raised:
        store.get("rollouts")
    assert raised.value.key == "rollouts"
    with pytest.raises(DamagedState):
        store.get("rollouts")  # every time, until someone sets it aside
    kept = store.set_aside("rollouts")
    assert kept.startswith("rollouts.json.damaged-")
    assert (tmp_path / "state" / kept).read_bytes() == content
    assert store.get("rollouts") is None
    assert store.keys() == []
    assert store.set_aside("rollouts") == ""  # nothing left to set aside


def test_audit_log_appends_and_skips_torn_lines(tmp_path: Path) -> None:
    """Entries get ids and times; a line torn by a crash is skipped when reading."""
    audit = AuditLog(tmp_path)
    first = audit.append({"route": "shop", "action": "pause", "actor": "alice"})
    with audit.path.open("ab") as handle:
        handle.write(b'{"route": "shop", "act')  # a crash mid-append
    second = audit.append({"route": "shop", "action": "resume", "actor": "bob"})
    entries = list(audit)
    # The torn fragment and the next line share a line; only whole lines parse.
    assert entries[0]["id"] == first["id"]
    assert audit.find(first["id"]) is not None
    assert second["id"] > first["id"] or second["id"] != first["id"]
    assert audit.tail(10, actor="alice")[0]["action"] == "pause"


@pytest.mark.parametrize("block", [1, 7, 100, 64 * 1024])
def test_audit_log_reads_newest_first_from_the_end(tmp_path: Path, block: int) -> None:
    """Read back from the end a block at a time, the entries come newest first, the same as
    a read from the start reversed, whatever the block size against the line lengths (torn
    lines and blank ones skipped); `tail` and `find` read from the end."""
    audit = AuditLog(tmp_path)
    written = [
        audit.append({"route": "shop" if i % 3 else "cart", "n": i, "pad": "x" * (i * 7 % 50)})
        for i in range(60)
    ]
    with audit.path.open("ab") as handle:
        handle.write(b'{"route": "shop", "n": 60, "torn\n\n\xff\xfe\n')  # a crash, then junk
    audit.append({"route": "shop", "n": 61})
    newest = list(audit.newest_first(block))
    assert [e["n"] for e in newest] == [61, *range(59, -1, -1)]
    assert newest == list(audit)[::-1]
    assert [e["n"] for e in audit.tail(4, route="cart")] == [48, 51, 54, 57]
    assert [e["n"] for e in audit.tail(3)] == [58, 59, 61]
    assert audit.tail(0) == []
    assert audit.find(written[0]["id"]) == written[0]
    assert audit.find("d-0000000000000-000000") is None
    assert list(AuditLog(tmp_path / "none").newest_first(block)) == []


def test_missing_finds_the_saved_decisions_not_in_the_log(tmp_path: Path) -> None:
    """Of decisions saved before their lines were appended, `missing` names those the log
    lacks, in their order: for each route it reads back only to that route's newest earlier
    decision (holds do not count), and to the start when there is none."""
    audit = AuditLog(tmp_path)

    def decision(route: str, action: str) -> dict[str, Any]:
        return {"type": "decision", "route": route, "action": action, "id": f"d-{route}-{action}"}

    audit.append(decision("shop", "start"))
    audit.append(decision("cart", "start"))
    written = audit.append(decision("shop", "pause"))
    audit.append(decision("shop", "hold"))
    audit.append({"type": "flag", "route": "shop", "id": "f-1"})
    saved = [written, decision("shop", "rollback"), decision("cart", "promote")]
    assert audit.missing(saved) == saved[1:]
    assert audit.missing([decision("feed", "start")]) == [decision("feed", "start")]
    assert audit.missing([]) == []


def test_lock_is_reentrant_and_excludes_other_processes(tmp_path: Path) -> None:
    """`locked()` inside `locked()` goes on (a second flock in one process would wait for the
    first for ever); while it is held, another process waits, and gets it once released."""
    store = FileStateStore(tmp_path)
    probe = (
        "import sys, time; from pathlib import Path; from proxy.state import FileStateStore\n"
        "store = FileStateStore(Path(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "with store.locked(): print(time.monotonic(), flush=True)"
    )
    with store.locked():
        with store.locked():
            store.put("rollouts", {"n": 1})
        other = subprocess.Popen(
            [sys.executable, "-c", probe, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert other.stdout is not None
        assert other.stdout.readline() == "ready\n"
        store.put("rollouts", {"n": 2})  # still held after the inner block
        time.sleep(0.2)  # the other process is at the lock by now, waiting
        released = time.monotonic()
    out, _ = other.communicate(timeout=20)
    assert float(out) >= released
    assert store.get("rollouts") == {"n": 2}


def test_a_bounded_wait_for_the_lock_ends_in_store_busy(tmp_path: Path) -> None:
    """With `lock_wait` (the server's store), a lock held elsewhere (here another descriptor,
    which flock treats as another process) is waited for that long, then StoreBusy says who
    to look for. The holder is stuck then: later attempts do not wait again (the event loop
    would stall at every tick) until one gets the lock, and the next wait is whole again.
    Without `lock_wait` (the CLI's store), the wait is unbounded."""
    holder = FileStateStore(tmp_path)
    server = FileStateStore(tmp_path, lock_wait=1.0)
    with holder.locked():
        started = time.monotonic()
        with pytest.raises(StoreBusy, match="local mode") as caught, server.locked():
            pass
        assert time.monotonic() - started >= 1.0
        assert isinstance(caught.value, OSError) and caught.value.filename.endswith(".lock")
        started = time.monotonic()
        with pytest.raises(StoreBusy), server.locked():
            pass
        assert time.monotonic() - started < 0.5  # a second wait would take 1 s
    with server.locked():
        server.put("rollouts", {"n": 1})
    assert holder.get("rollouts") == {"n": 1}
    with holder.locked():
        started = time.monotonic()
        with pytest.raises(StoreBusy), server.locked():
            pass
        assert time.monotonic() - started >= 1.0


def test_ids_sort_by_time() -> None:
    """Ids carry the time first, so they sort chronologically."""
    assert new_id("d", 1000.0) < new_id("d", 1000.5) < new_id("d", 2000.0)


_WRITER = """
import sys, itertools
from pathlib import Path
from proxy.state import AuditLog, FileStateStore
root = Path(sys.argv[1])
store, audit = FileStateStore(root), AuditLog(root)
for i in itertools.count():
    store.put("rollouts", {"counter": i, "padding": "x" * 4096})
    audit.append({"n": i})
    if i == 5:
        print("writing", flush=True)
"""


def test_kill_9_leaves_whole_documents(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream leaves a whole document and whole log lines."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.2)  # let it write a while; the kill lands at an arbitrary point
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    writer.stdout.close()
    document = FileStateStore(tmp_path).get("rollouts")
    assert document is not None and document["counter"] >= 5
    numbers = [entry["n"] for entry in AuditLog(tmp_path)]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= document["counter"]
    raw = (tmp_path / "state" / "rollouts.json").read_text()
    assert json.loads(raw)["padding"] == "x" * 4096


def test_append_after_a_torn_line_is_readable(tmp_path: Path) -> None:
    """An entry appended after a crash tore the last line still reads back whole."""
    audit = AuditLog(tmp_path)
    audit.append({"n": 1})
    with audit.path.open("ab") as handle:
        handle.write(b'{"n": 2, "torn')
    entry = audit.append({"n": 3, "action": "rollback"})
    assert audit.find(entry["id"]) is not None
    assert [e["n"] for e in audit] == [1, 3]
