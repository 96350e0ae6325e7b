"""The SQLite store: order, ack, quarantine, bounds (bounded per call, every tick), crash recovery."""

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

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.store import Batch, BoundsStep, Store, StoreError
from collectors.sim import SimBackend

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


def converge(s: Store, now_ns: int, retention_s: float | None = None, *, max_rows: int,
             calls: int = 1000) -> list[BoundsStep]:
    """Call enforce_bounds until the store is within its bounds; every step, in order."""
    steps = []
    for _ in range(calls):
        steps.append(s.enforce_bounds(now_ns, retention_s, max_rows=max_rows))
        if steps[-1].within_bounds:
            return steps
    raise AssertionError(f"not within bounds after {calls} calls: {steps[-1]}")


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
        steps = converge(s, T0, max_rows=2000)
    removed = sum(st.dropped for st in steps)
    assert removed > 0 and all(st.aged == 0 for st in steps)
    assert s.size_bytes() <= cap and steps[-1].used_bytes == s.size_bytes()
    assert s.dropped == removed
    assert s.backlog() == 10_000 - removed
    # The newest survive, the oldest went.
    rest = values(s.query())
    assert rest == list(range(removed, 10_000))
    warn = [e for e in logs if e["log_level"] == "warning"]
    assert len(warn) == 1  # the steps ran within a minute: one warning
    assert warn[0]["event"] == "store_full_dropped_oldest" and warn[0]["store"] == str(s.path)
    assert warn[0]["dropped"] == steps[0].dropped and warn[0]["dropped_total"] == steps[0].dropped
    # Within bounds: nothing more goes.
    assert s.enforce_bounds(T0).deleted == 0
    s.close()
    # `dropped` survives a restart.
    s2 = Store(tmp_path / "store.sqlite", max_bytes=cap)
    assert s2.dropped == removed
    s2.close()


def test_one_call_deletes_at_most_max_rows_and_the_store_converges_under_ingest(tmp_path: Path) -> None:
    cap = 1_048_576
    s = Store(tmp_path / "store.sqlite", max_bytes=cap)
    for k in range(40):
        s.append(lines(250, k * 250, pad=200))  # ~2.5x the cap
    n, per_call, ingest = 10_000, 300, 100  # the budget exceeds what is appended between calls
    with capture_logs():
        steps = []
        for _ in range(200):
            steps.append(s.enforce_bounds(T0, max_rows=per_call))
            if steps[-1].within_bounds:
                break
            s.append(lines(ingest, n, pad=200))
            n += ingest
    assert steps[-1].within_bounds and s.size_bytes() <= cap
    assert max(st.dropped for st in steps) == per_call  # the budget was used, never exceeded
    assert len(steps) > 10  # more than a few calls: each did a bounded part of the work
    assert s.dropped == sum(st.dropped for st in steps)
    rest = values(s.query())
    assert rest == list(range(n - len(rest), n))  # still oldest first
    # Bounded ingest at the bound stays at the bound.
    for _ in range(50):
        s.append(lines(ingest, n, pad=200))
        n += ingest
        with capture_logs():
            st = s.enforce_bounds(T0, max_rows=per_call)
        assert st.dropped <= per_call and st.within_bounds and s.size_bytes() <= cap
    s.close()


def test_size_cap_drops_quarantine_first(tmp_path: Path) -> None:
    cap = 1_048_576
    s = Store(tmp_path / "store.sqlite", max_bytes=cap)
    s.append(lines(1000, pad=200))
    s.quarantine(s.oldest(1000), "HTTP 400: bad")
    for k in range(1, 25):
        s.append(lines(250, 1000 + k * 250, pad=200))
    pending = s.backlog()
    with capture_logs() as logs:
        first = s.enforce_bounds(T0, max_rows=600)
        assert first.dropped == first.dropped_quarantined == 600  # quarantine first ...
        assert s.quarantined_count == 400 and s.backlog() == pending
        steps = [first, *converge(s, T0, max_rows=600)]
    assert steps[1].dropped_quarantined == 400 and steps[1].dropped == 600  # ... then the oldest pending
    assert s.quarantined_count == 0 and s.size_bytes() <= cap
    assert s.dropped == sum(st.dropped for st in steps)
    assert logs[0]["dropped_quarantined"] == 600
    s.close()


def test_retention_deletes_old_lines_without_counting_drops(store: Store) -> None:
    now = T0 + 3600 * 10**9
    store.append(lines(10, ts0=now - 7200 * 10**9, step_ns=10**9))  # two hours ago
    store.append(lines(10, 10, ts0=now - 60 * 10**9 - 10 * 10**9, step_ns=10**9))  # a minute ago
    assert store.enforce_bounds(now, None).deleted == 0  # no retention given: keep everything
    step = store.enforce_bounds(now, 3600.0)
    assert (step.aged, step.dropped, step.within_bounds) == (10, 0, True)
    assert store.dropped == 0
    assert values(store.query()) == list(range(10, 20))


def test_retention_is_bounded_per_call_oldest_first_quarantine_included(store: Store) -> None:
    now = T0 + 10**12
    # Appended newest first: retention goes by timestamp, not by the order of appending.
    store.append(lines(2500, 2500, ts0=now - 10**12, step_ns=10**6))
    store.append(lines(2500, ts0=now - 10**12, step_ns=10**6))
    store.quarantine(store.oldest(500), "HTTP 400: bad")  # lines 2500..2999, the oldest appended
    store.append(lines(10, 5000, ts0=now))  # fresh
    steps = converge(store, now, 60.0, max_rows=1000)
    assert [st.aged for st in steps] == [1000] * 5
    assert [st.within_bounds for st in steps] == [False] * 4 + [True]
    assert store.enforce_bounds(now, 60.0, max_rows=1000).deleted == 0
    assert all(st.dropped == 0 for st in steps) and store.dropped == 0
    assert store.quarantined_count == 0 and values(store.query()) == list(range(5000, 5010))


def test_retention_of_one_second_holds_at_every_call(store: Store) -> None:
    now = T0
    for k in range(40):  # 10 s of 4 lines a second; retention 1 s enforced as time passes
        store.append(lines(1, k, ts0=T0, step_ns=250_000_000))
        now = T0 + k * 250_000_000
        store.enforce_bounds(now, 1.0, max_rows=10)
        got = values(store.query())
        assert got == list(range(max(0, k - 4), k + 1))  # 1 s back, at 4 Hz: 5 lines at most


def test_within_bounds_a_call_writes_nothing_and_scans_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite")
    for k in range(10):
        s.append(lines(2000, k * 2000))
    s.quarantine(s.oldest(10_000), "HTTP 400: bad")  # a large quarantine, to tempt a scan
    conn = s._conn
    steps = []
    conn.set_progress_handler(lambda: steps.append(1), 100)  # every 100 SQLite VM instructions
    changes = conn.total_changes
    st = s.enforce_bounds(T0, 3600.0)  # nothing older than an hour, far below the size bound
    conn.set_progress_handler(None, 0)
    assert st == BoundsStep(used_bytes=s.size_bytes())
    assert conn.total_changes == changes
    # A table scan of 10,000 rows takes well over 10,000 instructions; index lookups take tens.
    assert len(steps) < 20, f"{len(steps) * 100} VM instructions for a store within its bounds"
    s.close()


def test_old_file_gets_the_quarantine_ts_index(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX quarantine_ts")  # as a file made before the index was added
    conn.execute("PRAGMA user_version = 0")   # (and before the schema had a version)
    conn.close()
    Store(path).close()
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    plan = " ".join(str(r) for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM quarantine WHERE ts_ns < 1 ORDER BY ts_ns LIMIT 10"))
    conn.close()
    assert {"points_ts", "quarantine_ts"} <= names
    assert "quarantine_ts" in plan


def test_store_full_warning_is_rate_limited_and_sums_the_drops(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite", max_bytes=1_048_576)
    s.append(lines(2000, pad=600))  # over the bound from the start
    n = 2000
    with capture_logs() as logs:
        dropped = []
        for t in range(130):  # two minutes of 1 s ticks, with drops every few ticks
            s.append(lines(60, n, pad=600))
            n += 60
            dropped.append(s.enforce_bounds(T0 + t * 10**9, max_rows=1000).dropped)
    warns = [e for e in logs if e["event"] == "store_full_dropped_oldest"]
    assert dropped[0] > 0 and len(warns) == 3  # at the first drop, then at the first a minute later
    assert sum(w["dropped"] for w in warns) <= sum(dropped) and warns[-1]["dropped_total"] <= s.dropped
    s.close()


def test_space_is_given_back_a_bounded_step_per_call(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite")
    for k in range(30):
        s.append(lines(2000, k * 2000, pad=400))
    used = s.size_bytes() - s.wal_bytes()  # the rows' pages
    assert used > 24 * 2**20  # above the 16 MiB of free pages worth handing back
    while (b := s.oldest(5000)) is not None:
        s.ack(b)
    assert s.size_bytes() - s.wal_bytes() < used / 10
    steps = converge(s, T0, max_rows=1000)  # within bounds from the start: only the vacuum works
    for _ in range(200):
        steps.append(s.enforce_bounds(T0))
        if steps[-1].vacuumed_pages == 0:
            break
    handed = [st.vacuumed_pages for st in steps]
    assert max(handed) == 64 and sum(handed) * 16384 > used / 2 and handed[-1] == 0
    s.close()  # checkpoints the WAL, so the main file shows the vacuum
    assert os.path.getsize(tmp_path / "store.sqlite") < used / 2


# -- the WAL: checkpointed off the tick, counted in the size, kept small ----------------------------

def gpu_tick(k: int) -> list[tuple[int, str]]:
    """A tick of 64 GPUs: ~66 lines of ~300 bytes (what the daemon appends at 20 Hz)."""
    ts = T0 + k * 50_000_000
    return [(ts, f"gpu,host=node01,gpu={g},uuid=GPU-{g:04d} power_w={300 + g}.5,temp_c=55.2,util_pct=97.0,"
                 f"mem_used_bytes=12345678i,sm_clock_mhz=1980.0,limit_w=700.0,energy_j={k}.9 {ts}")
            for g in range(64)]


def test_the_ticks_commits_never_checkpoint_the_stores_thread_does(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite", max_bytes=64 * 2**20)
    assert s._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # none inside a commit
    k = 0
    while s.wal_bytes() <= s.checkpoint_bytes:  # ticks, as the daemon makes them
        s.append(gpu_tick(k))
        s.enforce_bounds(T0 + k * 50_000_000)
        k += 1
    end = time.monotonic() + 10
    while s.checkpoint_stats.runs == 0 and time.monotonic() < end:  # woken by that bounds step
        time.sleep(0.01)
    assert s.checkpoint_stats.runs >= 1 and s.checkpoint_stats.inline == 0
    wal = s.wal_bytes()
    s.append(gpu_tick(k))  # the WAL starts over from its beginning: it does not grow
    assert s.wal_bytes() <= max(wal, s.checkpoint_bytes)
    s.close()


def test_the_wal_stays_small_next_to_the_bound_and_counts_in_size_bytes(tmp_path: Path) -> None:
    cap = 2 * 2**20
    s = Store(tmp_path / "store.sqlite", max_bytes=cap)
    wal_file = tmp_path / "store.sqlite-wal"
    for k in range(500):  # 25 s of 64 GPUs at 20 Hz: ~10 MB of lines through a 2 MiB store
        s.append(gpu_tick(k))
        with capture_logs():
            s.enforce_bounds(T0 + k * 50_000_000)
        wal = wal_file.stat().st_size if wal_file.exists() else 0
        assert wal <= cap // 4, f"tick {k}: a {wal}-byte WAL next to a {cap}-byte bound"
        assert wal <= s.size_bytes() <= cap
    assert s.dropped > 0 and s.backlog() == 500 * 64 - s.dropped
    s.close()


# -- the daemon enforces the bounds at every tick (DESIGN.md section 8) ---------------------------

async def test_daemon_holds_retention_of_one_second_at_every_tick(tmp_path: Path) -> None:
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path), "node": "n1",
                                      "interval": 0.1, "sim": {"gpus": 2}, "rules": {"enabled": False},
                                      "store": {"retention": "1s"}})
    clock = FakeClock()
    daemon = Daemon(cfg, SimBackend(gpus=2), open_store(cfg), clock=clock)
    await daemon.start()
    for _ in range(50):  # 5 s, far less than the minute the bounds used to wait
        await daemon.tick()
        oldest = min(int(line.rsplit(" ", 1)[1]) for line in daemon.store.query())
        assert oldest >= clock.wall_ns() - 10**9
        clock.advance(cfg.interval)
    assert daemon.store.dropped == 0 and daemon.stats.store_errors == 0
    await daemon.shutdown()


async def test_daemon_holds_the_size_bound_at_every_tick(tmp_path: Path) -> None:
    cap = 1_048_576  # the smallest allowed; 64 GPUs at 20 Hz fill it in ~2 s
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path), "node": "n1",
                                      "interval": 0.05, "sim": {"gpus": 64}, "rules": {"enabled": False},
                                      "store": {"max_bytes": cap}})
    clock = FakeClock()
    daemon = Daemon(cfg, SimBackend(gpus=64), open_store(cfg), clock=clock)
    await daemon.start()
    with capture_logs() as logs:
        for _ in range(300):  # 15 s
            await daemon.tick()
            assert daemon.store.size_bytes() <= cap
            clock.advance(cfg.interval)
    assert daemon.store.dropped > 0 and daemon.stats.store_errors == 0
    assert len([e for e in logs if e["event"] == "store_full_dropped_oldest"]) == 1  # once a minute
    await daemon.shutdown()


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


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_directory_without_write_permission_is_a_clear_error() -> None:
    # CI runs as root, for whom chmod proves nothing; /proc/self is a directory no one, root
    # included, may create files in.
    with pytest.raises(StoreError) as exc:
        Store(Path("/proc/self/store.sqlite"))
    assert "/proc/self" in str(exc.value) and "not writable" in str(exc.value)


def test_wal_mode_and_schema(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.close()




def test_a_read_only_state_dir_is_named_as_such_not_as_ownership(tmp_path):
    """A read-only file system (ProtectSystem=strict outside StateDirectory) is not an ownership
    problem: mount a read-only tmpfs where the machine allows it."""
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not permitted here")
    try:
        with pytest.raises(StoreError, match="read-only file system") as err:
            Store(mnt / "store.sqlite")
        assert "ownership" not in str(err.value) and "ReadWritePaths" in str(err.value)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
