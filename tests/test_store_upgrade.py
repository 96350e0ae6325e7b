"""Upgrades keep the data: a store written by agentd 0.1 (schema version 0, the committed fixture
made with that version's code, see tests/fixtures/store/make_fixture.py) is migrated in place
and every line is still there to query and to forward; a store from a newer agentd is refused,
untouched, with a message naming both versions and what to do."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.influx import Forwarder, V1Writer
from agentd.store import SCHEMA_VERSION, Store, StoreError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "store"
V0 = FIXTURES / "v0_32080e3"  # made by the store of commit 32080e3 (no user_version, no quarantine_ts)


def copy_fixture(tmp_path: Path, name: Path = V0) -> Path:
    dest = tmp_path / "store.sqlite"
    shutil.copyfile(name.with_suffix(".db"), dest)
    return dest


def fixture_lines(name: Path = V0) -> list[str]:
    return name.with_suffix(".lines").read_text().splitlines()


def fixture_quarantine(name: Path = V0) -> list[tuple[str, str]]:
    return [tuple(row.split("\t", 1)) for row in name.with_suffix(".quarantine").read_text().splitlines()]  # type: ignore[misc]


def schema(path: Path, *, immutable: bool = False) -> tuple[int, set[str]]:
    """(user_version, names in sqlite_master); ``immutable`` reads without making -wal/-shm files."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True) if immutable else sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        return version, names
    finally:
        conn.close()


def test_the_fixture_is_what_0_1_wrote() -> None:
    version, names = schema(V0.with_suffix(".db"), immutable=True)  # the committed file stays as it is
    assert version == 0 and "quarantine_ts" not in names and {"points", "quarantine", "meta"} <= names
    assert len(fixture_lines()) == 280 and len(fixture_quarantine()) == 10


def test_a_0_1_store_is_migrated_in_place_and_keeps_every_line(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    with capture_logs() as logs:
        store = Store(path)
    assert [(e["from_version"], e["to_version"]) for e in logs if e["event"] == "store_migrated"] == [(0, SCHEMA_VERSION)]
    assert store.query() == fixture_lines()
    assert store.quarantined() == fixture_quarantine()
    assert store.backlog() == 280 and store.quarantined_count == 10
    assert store.query("coolant") == [line for line in fixture_lines() if line.startswith("coolant,")]
    # It is a working store: new lines go after the old ones (ids continue from 0.1's).
    store.append([(1, "m v=1i 1")])
    assert store.query()[-1] == "m v=1i 1" and store.oldest(1).lines == fixture_lines()[:1]
    store.close()
    version, names = schema(path)
    assert version == SCHEMA_VERSION and "quarantine_ts" in names
    with capture_logs() as logs:  # migrated once: the next open has nothing to do
        Store(path).close()
    assert not [e for e in logs if e["event"] == "store_migrated"]


async def test_every_line_of_a_0_1_store_is_forwarded_after_the_upgrade(tmp_path: Path) -> None:
    store = Store(copy_fixture(tmp_path))
    shipped: list[str] = []

    class Collect:
        async def write(self, body: str) -> None:
            shipped.extend(body.split("\n"))

        async def close(self) -> None:
            pass

    fwd = Forwarder(store, Collect(), batch_size=64, idle_poll_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    end = time.monotonic() + 10
    while store.backlog() and time.monotonic() < end:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert shipped == fixture_lines() and store.backlog() == 0
    assert store.quarantined() == fixture_quarantine()  # kept for inspection, not shipped
    store.close()


def test_a_store_from_a_newer_agentd_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError) as exc:
        Store(path)
    text = str(exc.value)
    assert str(path) in text and f"schema version {SCHEMA_VERSION + 1}" in text and str(SCHEMA_VERSION) in text
    assert "move" in text and "untouched" in text
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.sqlite"]  # nothing moved aside or added


@pytest.mark.integration
async def test_every_line_of_a_0_1_store_reaches_influxdb1_after_the_upgrade(services, influx1_db,
                                                                             tmp_path: Path) -> None:
    store = Store(copy_fixture(tmp_path))
    writer = V1Writer(services.influxdb1_url, influx1_db, gzip=True, timeout=5)
    fwd = Forwarder(store, writer, batch_size=64, idle_poll_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    end = time.monotonic() + 30
    while store.backlog() and time.monotonic() < end:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    await writer.close()
    lines = fixture_lines()
    for measurement in ("gpu", "coolant", "agent"):
        want = sum(1 for line in lines if line.startswith(measurement + ","))
        assert want and services.influx1_count(measurement, influx1_db) == want, measurement
    store.close()
