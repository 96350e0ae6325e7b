"""A partly damaged store: found at the open or by the first call that reads the damage, moved
aside (loudly, saying where), every readable row salvaged into a fresh store, and forwarding
and appends carry on. The damage is real: pages of a real populated file overwritten."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.influx import Forwarder, V1Writer
from agentd.lineproto import encode
from agentd.points import gpu_point
from agentd.store import Batch, Store
from collectors.sim import SimBackend

T0 = 1_795_000_000_000_000_000
PAGE = 16384


def populate(path: Path, ticks: int = 1000, gpus: int = 8) -> list[str]:
    """A store of the simulator's gpu lines (``ticks`` x ``gpus``), closed; returns them in order."""
    sim = SimBackend(gpus=gpus, seed=5)
    sim.open()
    store = Store(path)
    out: list[str] = []
    for k in range(ticks):
        ts = T0 + k * 10**9
        lines = [encode(gpu_point(s, "dmg-node")) for s in sim.sample(ts)]
        store.append([(ts, line) for line in lines])
        out.extend(lines)
    store.close()
    assert not Path(f"{path}-wal").exists()
    return out


def _varint(b: bytes, o: int) -> tuple[int, int]:
    v = 0
    for j in range(8):
        x = b[o + j]
        v = (v << 7) | (x & 0x7F)
        if not x & 0x80:
            return v, o + j + 1
    return (v << 8) | b[o + 8], o + 9


def leaf_rowids(path: Path, page: int) -> list[int]:
    """The rowids on a table b-tree leaf page, read from the file (SQLite's page format)."""
    with open(path, "rb") as f:
        f.seek((page - 1) * PAGE)
        b = f.read(PAGE)
    assert b[0] == 0x0D, f"page {page} is not a table leaf"
    out = []
    for i in range(int.from_bytes(b[3:5], "big")):
        cell = int.from_bytes(b[8 + 2 * i:10 + 2 * i], "big")
        _, o = _varint(b, cell)          # payload size
        out.append(_varint(b, o)[0])     # rowid
    return out


def leaves(path: Path, table: str = "points") -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno", (table,))]
    finally:
        conn.close()


def overwrite(path: Path, pages: list[int], seed: int = 1) -> None:
    """Overwrite whole pages with random bytes, as a bad sector or a stray write would."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * PAGE)
            f.write(rng.randbytes(PAGE))


def damage_three_pages(path: Path, which: tuple[int, ...] = (7, 60, 61)) -> set[int]:
    """Overwrite three leaf pages of ``points``; returns the ids of the rows that were on them."""
    ls = leaves(path)
    victims = [ls[i] for i in which]
    lost = {rowid for page in victims for rowid in leaf_rowids(path, page)}
    overwrite(path, victims)
    return lost


def expected(lines: list[str], lost: set[int]) -> list[str]:
    return [line for i, line in enumerate(lines, start=1) if i not in lost]  # ids start at 1


def aside_copies(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f"{path.name}.damaged-*")
                  if not p.name.endswith(("-wal", "-shm", ".salvage")))


class Collect:
    """A writer that keeps every body (the forwarder's view of a server that takes everything)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def write(self, body: str) -> None:
        self.lines.extend(body.split("\n"))

    async def close(self) -> None:
        pass


async def forward_all(store: Store, writer: object, until: int, timeout_s: float = 30.0) -> None:
    """Run the forwarder until ``until`` lines were written (or the timeout)."""
    fwd = Forwarder(store, writer, batch_size=500, idle_poll_s=0.05)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    end = time.monotonic() + timeout_s
    while fwd.written < until and time.monotonic() < end and not task.done():
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)  # a forwarder that died raises here


def test_three_overwritten_pages_are_found_at_open_and_every_readable_row_is_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    lines = populate(path)
    lost = damage_three_pages(path)
    assert 0 < len(lost) < len(lines) // 20
    with capture_logs() as logs:
        store = Store(path)
        assert store.wait_salvaged(30)
    (moved,) = [e for e in logs if e["event"] == "store_damaged_moved_aside"]
    assert moved["log_level"] == "error" and moved["store"] == str(path) and "malformed" in moved["reason"]
    (copy,) = aside_copies(path)
    assert moved["moved_to"] == str(copy) and copy.stat().st_size > 0  # kept for inspection
    assert "damaged-" in copy.name and not Path(f"{copy}.salvage").exists()  # salvage done
    # Every row not on a damaged page, in order, nothing else; the salvage says how much it lost.
    assert store.query() == expected(lines, lost)
    assert store.backlog() == len(lines) - len(lost) == store.salvaged
    (salvaged,) = [e for e in logs if e["event"] == "store_salvaged"]
    assert salvaged["rows"] == len(lines) - len(lost) and salvaged["lost_ids"] >= len(lost)
    # New readings go after the salvaged ones (ids above the damaged store's).
    store.append([(T0, "gpu,host=dmg-node power_w=1.0 1")])
    assert store.oldest(1, after_id=len(lines)).lines == ["gpu,host=dmg-node power_w=1.0 1"]
    assert store.query()[-1] == "gpu,host=dmg-node power_w=1.0 1"
    store.close()
    # The fresh store is sound, and a reopen does not salvage again.
    with capture_logs() as logs:
        again = Store(path)
    assert not [e for e in logs if e["event"].startswith("store_damaged")]
    assert again.backlog() == len(lines) - len(lost) + 1
    again.close()


async def test_damage_the_open_did_not_reach_is_found_by_the_forwarder_and_everything_flows(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    lines = populate(path)
    lost = damage_three_pages(path)
    with capture_logs() as logs:
        store = Store(path, check_s=0)  # as a 1 GiB store whose check ran out of budget first
        assert not [e for e in logs if e["event"] == "store_damaged_moved_aside"]
        new = [f"gpu,host=dmg-node,gpu=9 power_w={i}.5 {T0 + 10**12 + i}" for i in range(300)]
        store.append([(T0, line) for line in new[:100]])
        writer = Collect()
        want = len(lines) - len(lost) + len(new)

        async def ticks() -> None:  # readings keep arriving while the forwarder meets the damage
            for k in range(1, 3):
                await asyncio.sleep(0.05)
                store.append([(T0, line) for line in new[k * 100:(k + 1) * 100]])

        await asyncio.gather(forward_all(store, writer, want), ticks())
    assert [e["event"] for e in logs].count("store_damaged_moved_aside") == 1
    assert sorted(writer.lines) == sorted(expected(lines, lost) + new)  # every readable row, the new ones too
    assert store.backlog() == 0 and len(aside_copies(path)) == 1
    store.close()


def test_damage_under_the_append_moves_the_store_aside_and_the_readings_go_into_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    lines = populate(path, ticks=300)
    newest = max(leaves(path), key=lambda p: max(leaf_rowids(path, p)))  # the leaf the next append writes into
    lost = set(leaf_rowids(path, newest))
    overwrite(path, [newest])
    with capture_logs() as logs:
        store = Store(path, check_s=0)
        store.append([(T0, "gpu,host=dmg-node power_w=2.0 2")])  # no StoreError: the reading is kept
        assert store.wait_salvaged(30)
    (moved,) = [e for e in logs if e["event"] == "store_damaged_moved_aside"]
    assert "during append" in moved["reason"]
    assert store.query() == expected(lines, lost) + ["gpu,host=dmg-node power_w=2.0 2"]
    store.close()


def test_an_ack_deletes_only_the_batchs_rows_not_a_salvaged_one_that_arrived_in_its_span(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    store.append([(T0 + i, f"m v={i}i {i}") for i in range(1, 11)])  # ids 1..10
    store.quarantine(Batch(5, 5, ["m v=5i 5"], 1, [5]), "HTTP 400: bad")  # a gap at id 5
    batch = store.oldest(100)
    assert batch.ids == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    store._insert_salvaged("points", "ts_ns, line", [(5, T0 + 5, "m v=55i 5")])  # the salvage fills it
    store.ack(batch)
    assert store.query() == ["m v=55i 5"] and store.backlog() == 1  # not shipped: still here
    store.close()


def test_a_salvage_cut_short_by_a_stop_resumes_at_the_next_open(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "store.sqlite"
    lines = populate(path)
    lost = damage_three_pages(path)
    monkeypatch.setattr("agentd.store._SALVAGE_CHUNK", 100)
    reached = __import__("threading").Event()
    original = Store._insert_salvaged
    calls = []

    def slow(self: Store, table: str, cols: str, rows: list[tuple]) -> None:
        original(self, table, cols, rows)
        calls.append(len(rows))
        if len(calls) == 3:  # a stop arrives mid-salvage
            reached.set()
            assert self._stop.wait(10), "close() never asked the salvage to stop"

    monkeypatch.setattr(Store, "_insert_salvaged", slow)
    with capture_logs():
        store = Store(path)
        assert reached.wait(10)
        store.close()
    (copy,) = aside_copies(path)
    assert Path(f"{copy}.salvage").exists()  # unfinished: the marker stays with its progress
    monkeypatch.setattr(Store, "_insert_salvaged", original)
    with capture_logs() as logs:
        store = Store(path)
        assert store.wait_salvaged(30)
    assert [e["event"] for e in logs].count("store_salvaged") == 1
    assert not Path(f"{copy}.salvage").exists()
    assert store.query() == expected(lines, lost)  # each row once: the resume went on from the marker
    store.close()


def test_a_file_that_is_not_a_database_is_moved_aside_and_a_new_store_starts(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"this is not a database" * 1000)
    with capture_logs() as logs:
        store = Store(path)
        assert store.wait_salvaged(10)
    (moved,) = [e for e in logs if e["event"] == "store_damaged_moved_aside"]
    assert str(path) in moved["hint"] and Path(moved["moved_to"]).read_bytes().startswith(b"this is not")
    assert any(e["event"] == "store_salvage_failed" for e in logs)  # nothing readable, and it says so
    store.append([(T0, "m v=1i 1")])
    assert store.query() == ["m v=1i 1"]
    store.close()


async def test_the_daemon_keeps_forwarding_from_a_damaged_store_new_readings_included(tmp_path: Path) -> None:
    """The issue's scenario, without a server: before, ``forwarder_failed`` every 5 s and nothing sent."""
    lines = populate(tmp_path / "store.sqlite")
    lost = damage_three_pages(tmp_path / "store.sqlite")
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path), "node": "n1", "interval": 0.05,
                                      "sim": {"gpus": 2}, "rules": {"enabled": False}})
    store = open_store(cfg)
    writer = Collect()
    forwarder = Forwarder(store, writer, batch_size=500, idle_poll_s=0.05)  # type: ignore[arg-type]
    daemon = Daemon(cfg, SimBackend(gpus=2), store, forwarder=forwarder, clock=FakeClock())
    await daemon.start()
    with capture_logs() as logs:
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop))
        end = time.monotonic() + 30
        while (store.salvaging or forwarder.written < len(lines) - len(lost) or daemon.stats.ticks < 100) \
                and time.monotonic() < end:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(run, 30)  # the shutdown flushes what the last ticks appended
    assert not [e for e in logs if e["event"] == "forwarder_failed"]
    shipped = set(writer.lines)
    assert set(expected(lines, lost)) <= shipped
    assert len([line for line in shipped if line.startswith("gpu,") and "host=n1" in line]) == 2 * daemon.stats.ticks
    assert daemon.stats.ticks >= 100 and daemon.stats.store_errors == 0


@pytest.mark.integration
async def test_salvaged_and_new_lines_reach_influxdb1(services, influx1_db, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    lines = populate(path, ticks=500)
    lost = damage_three_pages(path, which=(3, 20, 21))
    with capture_logs():
        store = Store(path, check_s=0)
        fresh = [f"gpu,host=dmg-new,gpu=0 power_w={i}.25 {T0 + 10**12 + i * 10**9}" for i in range(50)]
        store.append([(T0, line) for line in fresh])
        writer = V1Writer(services.influxdb1_url, influx1_db, gzip=True, timeout=5)
        try:
            await forward_all(store, writer, len(lines) - len(lost) + len(fresh))
        finally:
            await writer.close()
    assert store.backlog() == 0
    assert services.influx1_count("gpu", influx1_db, "host = 'dmg-node'") == len(lines) - len(lost)
    assert services.influx1_count("gpu", influx1_db, "host = 'dmg-new'") == len(fresh)
    store.close()
    assert os.path.exists(aside_copies(path)[0])
