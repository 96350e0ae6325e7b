"""End to end against the real servers: daemon (simulator) -> store -> forwarder -> InfluxDB.

Every point produced arrives, with its tags and values; an outage loses none and counts none
twice; a daemon killed with SIGKILL ships what it had committed after its restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.service import make_forwarder
from collectors.sim import SimBackend

pytestmark = pytest.mark.integration  # every test here runs against the real servers

GPUS = 4


class RecordingSim(SimBackend):
    """The simulator, keeping every sample it produced so tests can compare with the server."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.produced = []

    def sample(self, ts_ns):
        out = super().sample(ts_ns)
        self.produced.extend(out)
        return out


def pipeline(tmp_path, influx: dict, node: str) -> tuple[Daemon, RecordingSim]:
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": node, "interval": 1.0,
        "influx": {"backoff_max": 0.5, "timeout": 2.0} | influx,
    })
    store = open_store(cfg)
    backend = RecordingSim(gpus=GPUS, seed=5)
    # Wall time near now: VictoriaMetrics refuses samples older than its retention.
    clock = FakeClock(start_wall_ns=(time.time_ns() // 10**9 - 3600) * 10**9)
    return Daemon(cfg, backend, store, forwarder=make_forwarder(cfg, store), clock=clock), backend


def influx1_rows_by_key(services, db, node):
    result = services.influx1_query(
        f"SELECT power_w, energy_j, temp_c, limit_w FROM gpu WHERE host = '{node}' GROUP BY gpu, uuid, model", db)
    rows = {}
    for series in result["results"][0].get("series", []):
        for ts, power_w, energy_j, temp_c, limit_w in series["values"]:
            rows[(int(series["tags"]["gpu"]), ts)] = (power_w, energy_j, temp_c, limit_w, series["tags"])
    return rows


async def test_every_point_reaches_influxdb1_over_v1_with_tags_and_values(services, influx1_db, tmp_path):
    node = f"n-{uuid.uuid4().hex[:6]}"
    daemon, sim = pipeline(tmp_path, {"url": services.influxdb1_url, "api": "v1", "bucket": influx1_db}, node)
    await daemon.start()
    await daemon.run(asyncio.Event(), max_ticks=25)
    rows = influx1_rows_by_key(services, influx1_db, node)
    assert len(rows) == len(sim.produced) == 25 * GPUS
    for s in sim.produced:
        power_w, energy_j, temp_c, limit_w, tags = rows[(s.index, s.ts_ns)]
        assert (power_w, energy_j, temp_c, limit_w) == (s.power_w, s.energy_j, s.temp_c, s.limit_w)
        assert tags == {"gpu": str(s.index), "uuid": s.uuid, "model": s.model}
    assert services.influx1_count("agent", influx1_db, f"host = '{node}'") == 25


def vm_values(services, metric: str, node: str) -> dict[tuple[str, int], float]:
    services.vm_flush()
    out = {}
    for series in services.vm_export(f'{metric}{{host="{node}"}}'):
        for ts_ms, value in zip(series["timestamps"], series["values"]):
            out[(series["metric"].get("gpu", ""), ts_ms)] = value
    return out


async def test_every_point_reaches_victoriametrics_over_v2(services, tmp_path):
    node = f"n-{uuid.uuid4().hex[:6]}"
    daemon, sim = pipeline(tmp_path, {"url": services.vm_url, "api": "v2", "org": "o", "bucket": "b"}, node)
    await daemon.start()
    await daemon.run(asyncio.Event(), max_ticks=25)
    power = vm_values(services, "gpu_power_w", node)
    assert len(power) == 25 * GPUS
    for s in sim.produced:
        assert power[(str(s.index), s.ts_ns // 10**6)] == s.power_w
    assert len(vm_values(services, "agent_tick_s", node)) == 25


async def ticks(daemon: Daemon, n: int) -> None:
    for _ in range(n):
        await daemon.tick()
        daemon.clock.advance(daemon.cfg.interval)


async def wait_for(predicate, timeout_s=20.0):
    """Poll real I/O (a server answering, a retry happening), never a rule or a timer of ours."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("target", ["influxdb1", "vm"])
async def test_an_outage_loses_nothing_and_counts_nothing_twice(services, influx1_db, tmp_path, target):
    node = f"n-{uuid.uuid4().hex[:6]}"
    influx = ({"url": services.influxdb1_url, "api": "v1", "bucket": influx1_db} if target == "influxdb1"
              else {"url": services.vm_url, "api": "v2", "org": "o", "bucket": "b"})
    daemon, sim = pipeline(tmp_path, influx, node)
    await daemon.start()
    stop = asyncio.Event()
    forwarding = asyncio.create_task(daemon.forwarder.run(stop))
    try:
        await ticks(daemon, 10)
        await wait_for(lambda: daemon.store.backlog() == 0)
        services.stop(target)
        await ticks(daemon, 10)
        await wait_for(lambda: daemon.forwarder.write_errors > 0)
        assert daemon.store.backlog() == 10 * (GPUS + 1)  # kept while the server is away
        services.start(target)
        await ticks(daemon, 10)
        await wait_for(lambda: daemon.store.backlog() == 0)
    finally:
        stop.set()
        await forwarding
        await daemon.shutdown()
    if target == "influxdb1":
        assert len(influx1_rows_by_key(services, influx1_db, node)) == 30 * GPUS
        assert services.influx1_count("agent", influx1_db, f"host = '{node}'") == 30
    else:
        assert len(vm_values(services, "gpu_power_w", node)) == 30 * GPUS
        assert len(vm_values(services, "agent_tick_s", node)) == 30


def test_sigkill_mid_run_then_restart_ships_every_committed_point(services, tmp_path):
    node = f"n-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'interval = 0.1\nbackend = "sim"\nstate_dir = "{tmp_path}"\nnode = "{node}"\n'
        f'[sim]\ngpus = {GPUS}\n[influx]\nurl = "{services.vm_url}"\napi = "v2"\norg = "o"\nbucket = "b"\n'
        'backoff_max = 0.5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    cmd = [sys.executable, "-m", "agentd", "run", "--config", str(config)]
    store_path = tmp_path / "store.sqlite"

    # First run: stop VictoriaMetrics so a backlog builds up, then SIGKILL the daemon.
    services.stop("vm")
    try:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while sum(1 for _, line in _rows(store_path) if line.startswith("agent,")) < 20:
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "daemon produced no ticks"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        services.start("vm")
    committed = _rows(store_path)
    assert committed, "the killed daemon left nothing committed"
    last_committed_id = committed[-1][0]

    # Second run on the same state directory: replays the backlog, commits ticks of its own, then
    # shuts down cleanly (SIGTERM: the flush on stop must ship those too).
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        own_ticks = 3 * (GPUS + 1)  # rows: three ticks of gpu points + agent point
        while (any(row_id <= last_committed_id for row_id, _ in _rows(store_path))
               or _last_id(store_path) < last_committed_id + own_ticks):
            assert second.poll() is None, second.stderr.read().decode()
            assert time.monotonic() < deadline, "backlog not drained, or no new ticks committed"
            time.sleep(0.1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, second.stderr.read().decode()
    finally:
        if second.poll() is None:  # a failed check must not leave a daemon running
            second.kill()
            second.wait()
    assert _rows(store_path) == []  # flushed on the clean stop

    power = vm_values(services, "gpu_power_w", node)
    ticks = vm_values(services, "agent_tick_s", node)
    # every tick committed gpu + agent points in one transaction: none half-shipped
    assert len(power) == GPUS * len(ticks)
    # every point the killed daemon had committed is in the server, and the second run's own
    committed_ticks = 0
    for _, line in committed:
        if line.startswith("agent,"):
            committed_ticks += 1
            ts_ms = int(line.rsplit(" ", 1)[1]) // 10**6
            assert ("", ts_ms) in ticks
    assert len(ticks) >= committed_ticks + 3


def _last_id(path: Path) -> int:
    """The highest row id the store ever gave out (ids are AUTOINCREMENT: never reused)."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'points'").fetchone()
    return row[0] if row else 0


def _rows(path: Path) -> list[tuple[int, str]]:
    """(id, line) of every point in the store, oldest first, read beside the running daemon."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT id, line FROM points ORDER BY id"))
