"""The SQLite store: order, ack, quarantine, bounds, crash recovery, speed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.store import Batch, Store, StoreError

REPO = Path(__file__).resolve().parents[1]
T0 = 1_795_000_000_000_000_000


def lines(n: int, start: int = 0, *, ts0: int = T0, step_ns: int = 1_000_000, pad: int = 0) -> list[tuple[int, str]]:
    return [(ts0 + (start + i) * step_ns, f"m,t=a{'x' * pad} v={start + i}i {ts0 + (start + i) * step_ns}")
            for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store.sqlite")
    yield s
    s.close()


def values(ls: list[str]) -> list[int]:
    return [int(line.split(" v=")[1].split("i ")[0]) for line in ls]


def test_append_oldest_ack_in_order(store: Store) -> None:
    store.append(lines(5))
    store.append(lines(5, 5))
    assert store.backlog() == 10
    b = store.oldest(4)
    assert isinstance(b, Batch)
    assert b.count == 4 and values(b.lines) == [0, 1, 2, 3]
    assert b.last_id - b.first_id == 3 and b.ids == list(range(b.first_id, b.last_id + 1))
    assert b.body() == "\n".join(b.lines)
    # Lines appended after the batch was taken survive its ack.
    store.append(lines(2, 10))
    store.ack(b)
    assert store.backlog() == 8
    b2 = store.oldest(100)
    assert values(b2.lines) == list(range(4, 12))
    assert values(store.oldest(3, after_id=b2.first_id).lines) == [5, 6, 7]
    store.ack(b2)
    assert store.backlog() == 0
    assert store.oldest(10) is None


def test_empty_append_is_a_noop(store: Store) -> None:
    store.append([])
    assert store.backlog() == 0


def test_ids_are_never_reused(store: Store) -> None:
    store.append(lines(3))
    b = store.oldest(10)
    store.ack(b)
    store.append(lines(1, 3))
    assert store.oldest(10).first_id > b.last_id


def test_quarantine_moves_and_counts(store: Store) -> None:
    store.append(lines(6))
    bad = store.oldest(2)
    moved = store.quarantine(bad, "HTTP 400: partial write: field type conflict")
    assert moved == 2
    assert store.quarantined_count == 2
    assert store.backlog() == 4
    assert values(store.oldest(10).lines) == [2, 3, 4, 5]
    q = store.quarantined()
    assert [r for _, r in q] == ["HTTP 400: partial write: field type conflict"] * 2
    assert values([line for line, _ in q]) == [0, 1]
    path = store.path
    store.close()
    reopened = Store(path)
    assert reopened.quarantined_count == 2 and reopened.backlog() == 4
    reopened.close()


def test_query_filters(store: Store) -> None:
    store.append([(T0 + 1, "gpu,host=a power_w=1.0 1"), (T0 + 2, "gpux,host=a v=1.0 2"),
                  (T0 + 3, "gpu power_w=2.0 3"), (T0 + 4, "coolant,unit=x flow_lpm=3.0 4")])
    assert store.query("gpu") == ["gpu,host=a power_w=1.0 1", "gpu power_w=2.0 3"]
    assert store.query(since_ns=T0 + 3) == ["gpu power_w=2.0 3", "coolant,unit=x flow_lpm=3.0 4"]
    assert store.query(limit=2) == ["gpu power_w=2.0 3", "coolant,unit=x flow_lpm=3.0 4"]
    assert store.query("gpu", limit=1) == ["gpu power_w=2.0 3"]
    assert len(store.query()) == 4


def test_size_cap_drops_oldest_counts_and_warns(tmp_path: Path) -> None:
    cap = 1_048_576
    s = Store(tmp_path / "store.sqlite", max_bytes=cap)
    for k in range(40):
        s.append(lines(250, k * 250, pad=200))  # ~2.5 MiB in all
    assert s.size_bytes() > cap
    with capture_logs() as logs:
        removed = s.enforce_bounds(time.time_ns())
    assert removed > 0
    assert s.size_bytes() <= cap * 0.9
    assert s.dropped == removed
    assert s.backlog() == 10_000 - removed
    # The newest survive, the oldest went.
    rest = values(s.query())
    assert rest == list(range(removed, 10_000))
    warn = [e for e in logs if e["log_level"] == "warning"]
    assert warn and warn[0]["store"] == str(s.path) and warn[0]["dropped"] == removed
    # Within bounds: nothing more goes.
    assert s.enforce_bounds(time.time_ns()) == 0
    s.close()
    # `dropped` survives a restart.
    s2 = Store(tmp_path / "store.sqlite", max_bytes=cap)
    assert s2.dropped == removed
    s2.close()


def test_size_cap_drops_quarantine_first(tmp_path: Path) -> None:
    cap = 1_048_576
    s = Store(tmp_path / "store.sqlite", max_bytes=cap)
    s.append(lines(1000, pad=200))
    s.quarantine(s.oldest(1000), "HTTP 400: bad")
    for k in range(1, 25):
        s.append(lines(250, 1000 + k * 250, pad=200))
    with capture_logs():
        removed = s.enforce_bounds(time.time_ns())
    assert removed >= 1000
    assert s.quarantined_count == 0
    s.close()


def test_retention_deletes_old_lines_without_counting_drops(store: Store) -> None:
    now = T0 + 3600 * 10**9
    store.append(lines(10, ts0=now - 7200 * 10**9, step_ns=10**9))  # two hours ago
    store.append(lines(10, 10, ts0=now - 60 * 10**9 - 10 * 10**9, step_ns=10**9))  # a minute ago
    assert store.enforce_bounds(now, None) == 0  # no retention given: keep everything
    removed = store.enforce_bounds(now, 3600.0)
    assert removed == 10
    assert store.dropped == 0
    assert values(store.query()) == list(range(10, 20))


def test_space_is_reused_and_given_back(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite")
    for k in range(30):
        s.append(lines(2000, k * 2000, pad=400))
    used = s.size_bytes()
    assert used > 24 * 2**20  # above the 16 MiB of free pages worth handing back
    while (b := s.oldest(5000)) is not None:
        s.ack(b)
    assert s.size_bytes() < used / 10
    for _ in range(5):
        s.enforce_bounds(time.time_ns())
    s.close()  # checkpoints the WAL, so the main file shows the vacuum
    assert os.path.getsize(tmp_path / "store.sqlite") < used / 2


def test_reopen_after_kill9_keeps_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from agentd.store import Store
        s = Store({str(path)!r})
        n = 0
        while True:
            s.append([({T0} + n + i, f"m,t=a v={{n + i}}i {{{T0} + n + i}}") for i in range(10)])
            n += 10
            print(n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        for line in proc.stdout:
            committed = int(line)
            if committed >= 3000:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed >= 3000
    assert (tmp_path / "store.sqlite-wal").exists()  # killed with a live WAL
    s = Store(path)
    got = values(s.query())
    # Every commit reported before the kill is there, in order, nothing torn.
    assert len(got) >= committed
    assert got == list(range(len(got)))
    assert s.backlog() == len(got)
    s.append(lines(1, 10**6))
    assert s.backlog() == len(got) + 1
    s.close()


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StoreError) as exc:
        Store(blocker / "store.sqlite")
    assert str(blocker) in str(exc.value)


def test_directory_without_write_permission_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    # As root every directory is writable, so pretend the permission check says no.
    monkeypatch.setattr("agentd.store.os.access", lambda *a, **k: False)
    with pytest.raises(StoreError) as exc:
        Store(tmp_path / "store.sqlite")
    assert str(tmp_path) in str(exc.value) and "not writable" in str(exc.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError) as exc:
            Store(ro / "store.sqlite")
        assert str(ro) in str(exc.value) and "writable" in str(exc.value)
    finally:
        ro.chmod(0o700)


def test_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as exc:
        Store(path)
    assert str(path) in str(exc.value)


def test_wal_mode_and_schema(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.close()


