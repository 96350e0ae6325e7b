"""A small or full state directory: the WAL stays small, the newest readings are kept and the
oldest dropped and counted, loudly; the store recovers when space comes back.

The file-system tests mount a real 3 MiB tmpfs (root only; skipped, with the reason, where
mounting is not permitted). ``PRAGMA max_page_count`` stands in for a full disk in the one test
that runs everywhere: SQLite answers SQLITE_FULL exactly as for a full file system.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.store import Store
from collectors.sim import SimBackend

T0 = 1_795_000_000_000_000_000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB file system for the test (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 3 MiB tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "run as root to test a real small file system (the max_page_count test still runs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def daemon_on(state: Path, **store: object) -> tuple[Daemon, FakeClock]:
    """The real daemon, 64 simulated GPUs at 20 Hz (~66 lines a tick), on a fake clock."""
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(state), "node": "n1", "interval": 0.05,
                                      "sim": {"gpus": 64}, "rules": {"enabled": False}, "store": store})
    clock = FakeClock()
    return Daemon(cfg, SimBackend(gpus=64), open_store(cfg), clock=clock), clock


async def run_ticks(daemon: Daemon, clock: FakeClock, n: int, ticks_ns: list[int]) -> None:
    for _ in range(n):
        ticks_ns.append(clock.wall_ns())
        await daemon.tick()
        clock.advance(daemon.cfg.interval)


def agent_stamps(store: Store) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in store.query("agent")]


def assert_newest_kept(store: Store, ticks_ns: list[int]) -> None:
    """What is left is the newest ticks, every one of them, up to the last: the oldest went."""
    kept = agent_stamps(store)
    assert kept and kept[-1] == ticks_ns[-1], "the newest tick is not in the store"
    assert kept == ticks_ns[len(ticks_ns) - len(kept):], "the store does not hold an unbroken run of the newest ticks"


async def test_a_3_mib_state_dir_keeps_the_newest_and_never_fails_an_append(small_fs: Path) -> None:
    daemon, clock = daemon_on(small_fs)  # max_bytes left at 1 GiB: the file system is the bound
    store = daemon.store
    await daemon.start()
    ticks: list[int] = []
    with capture_logs() as logs:
        for _ in range(600):  # 30 s at 20 Hz: ~20 MB of readings through a 3 MiB file system
            await run_ticks(daemon, clock, 1, ticks)
            assert free_bytes(small_fs) > 0
    assert daemon.stats.store_errors == 0 and not [e for e in logs if e["event"] == "store_append_failed"]
    assert store.dropped > 0 and store.disk_full_events == 0  # dropped ahead of a full disk, not at one
    assert_newest_kept(store, ticks)
    warned = [e for e in logs if e["event"] == "store_full_dropped_oldest"]
    assert warned and warned[0]["reason"] == "disk" and str(small_fs) in warned[0]["hint"]
    await daemon.shutdown()


async def test_when_another_process_fills_the_disk_the_oldest_go_the_newest_stay_and_the_store_recovers(
        small_fs: Path) -> None:
    daemon, clock = daemon_on(small_fs)
    store = daemon.store
    await daemon.start()
    ticks: list[int] = []
    with capture_logs() as logs:
        await run_ticks(daemon, clock, 100, ticks)  # the store is still growing: it needs new pages
        assert Path(f"{store.path}-reserve").exists()
        filler = small_fs / "core.dump"  # a core dump, a runaway log: every free byte taken
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * free_bytes(small_fs))
            except OSError:
                pass  # ENOSPC: the disk is full, which is the point
        assert free_bytes(small_fs) < 64 * 1024
        # Until an append meets the full disk: when it does depends on how much room the WAL
        # file still had at the fill (a checkpoint resets it), so tick on to a bound, not a count.
        for _ in range(40):
            await run_ticks(daemon, clock, 50, ticks)
            if store.disk_full_events:
                break
        assert daemon.stats.store_errors == 0, [e for e in logs if e["event"] == "store_append_failed"][:3]
        assert store.disk_full_events >= 1 and store.dropped > 0
        full = [e for e in logs if e["event"] == "store_disk_full_dropped_oldest"]
        assert full and full[0]["log_level"] == "error" and full[0]["reserve_released"]
        assert str(small_fs) in full[0]["hint"]
        assert_newest_kept(store, ticks)
        # The space comes back: the reserve is made again, and no more appends meet a full disk.
        filler.unlink()
        events = store.disk_full_events
        await run_ticks(daemon, clock, 20, ticks)
        assert Path(f"{store.path}-reserve").exists()
        await run_ticks(daemon, clock, 200, ticks)
        assert daemon.stats.store_errors == 0 and store.disk_full_events == events
        assert_newest_kept(store, ticks)
    assert not [e for e in logs if e["event"] == "store_append_failed"]
    await daemon.shutdown()


async def test_max_bytes_holds_on_a_small_file_system_with_the_wal_counted(small_fs: Path) -> None:
    cap = 1_048_576  # the smallest allowed, a third of the file system
    daemon, clock = daemon_on(small_fs, max_bytes=cap)
    store = daemon.store
    await daemon.start()
    ticks: list[int] = []
    with capture_logs() as logs:
        for _ in range(400):
            await run_ticks(daemon, clock, 1, ticks)
            on_disk = sum(p.stat().st_size for p in small_fs.iterdir() if p.name.startswith("store.sqlite"))
            wal = Path(f"{store.path}-wal")
            assert (wal.stat().st_size if wal.exists() else 0) <= store.wal_allowance
            assert store.size_bytes() <= cap
            assert on_disk < 2 * cap  # the database file (free pages included), WAL, shm, reserve
    assert daemon.stats.store_errors == 0 and store.dropped > 0 and store.disk_full_events == 0
    assert [e["reason"] for e in logs if e["event"] == "store_full_dropped_oldest"] == ["max_bytes"]
    assert_newest_kept(store, ticks)
    await daemon.shutdown()


def test_sqlite_full_on_append_drops_the_oldest_keeps_the_newest_and_counts(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite", checkpoint_thread=False)
    n = 0

    def tick() -> None:
        nonlocal n
        s.append([(T0 + n + i, f"gpu,host=a,gpu={i} power_w={n + i}i {T0 + n + i}") for i in range(64)])
        n += 64

    for _ in range(100):
        tick()
    pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
    s._conn.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow: a full disk
    with capture_logs() as logs:
        for _ in range(100):
            tick()  # raises StoreError if the append is lost
    assert s.disk_full_events >= 1 and s.dropped > 0
    assert s.backlog() == n - s.dropped
    got = [int(line.split("power_w=")[1].split("i ")[0]) for line in s.query()]
    assert got == list(range(n - len(got), n))  # the newest, all of them; the oldest went
    errors = [e for e in logs if e["event"] == "store_disk_full_dropped_oldest"]
    assert errors and errors[0]["log_level"] == "error" and errors[0]["store"] == str(s.path)
    assert errors[0]["dropped_total"] <= s.dropped
    s.close()
