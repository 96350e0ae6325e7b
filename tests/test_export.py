"""`agentd export` and `agentd store info` on a store a simulated daemon wrote (issue 9, item 2).

The store comes from a real Daemon on the sim backend, 60 ticks of 1 s on a fake clock (started
two minutes ago, so VictoriaMetrics' retention takes the points). Every count is checked
against the store's own (Store.query / backlog), and the store is checked unchanged (file
hashes, row counts) after everything here, since an export is a read and a replay a copy.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import re
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentd.clock import FakeClock
from agentd.config import load_config
from agentd.daemon import Daemon, open_store
from agentd.export_cli import export_command, store_group
from agentd.store import Batch, PointFilter, Store, StoreReader
from collectors.lineproto_parse import parse_line
from collectors.sim import SimBackend

GPUS = 4
SECONDS = 60
RULE = """\
rules:
  - name: export_test_power
    scope: gpu
    when: gpu.power_w > 650
    clear_when: gpu.power_w < 300
    severity: warning
    actions:
      - type: cap_gpu
        watts: 600
"""


class SimRun:
    """A config file, its state_dir and the store a 60 s simulated run left there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"exp-{uuid.uuid4().hex[:8]}"
        self.state_dir = root / "state"
        rules = root / "rules.d"
        rules.mkdir(parents=True)
        (rules / "power.yaml").write_text(RULE)
        self.config = root / "agentd.toml"
        self.config.write_text(f'backend = "sim"\nstate_dir = "{self.state_dir}"\nnode = "{self.node}"\n'
                               f'[sim]\ngpus = {GPUS}\n[rules]\ndirs = ["{rules}"]\n')
        self.store_path = self.state_dir / "store.sqlite"
        self.t0_ns = time.time_ns() - 120 * 10**9

    def run(self) -> None:
        async def go() -> None:
            cfg = load_config(self.config, environ={})
            daemon = Daemon(cfg, SimBackend(gpus=GPUS), open_store(cfg), clock=FakeClock(self.t0_ns))
            await daemon.start()
            await daemon.run(asyncio.Event(), max_ticks=SECONDS)

        asyncio.run(go())

    def lines(self, measurement: str | None = None) -> list[str]:
        """What the store holds, in id order (through sqlite3 directly: not the code under test)."""
        uri = self.store_path.as_uri() + ("?mode=ro" if Path(f"{self.store_path}-wal").exists()
                                          else "?mode=ro&immutable=1")
        conn = sqlite3.connect(uri, uri=True)
        try:
            rows = [r[0] for r in conn.execute("SELECT line FROM points ORDER BY id")]
        finally:
            conn.close()
        return [r for r in rows if measurement is None or r.startswith((measurement + ",", measurement + " "))]

    def fingerprint(self) -> dict[str, str]:
        """Every file in state_dir and its hash (what "unchanged" means here; the -shm is the
        WAL index SQLite readers share, not the store's data)."""
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.state_dir.iterdir()) if not p.name.endswith("-shm")}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimRun:
    run = SimRun(tmp_path_factory.mktemp("export"))
    run.run()
    return run


def invoke(command, *args: str, env: dict[str, str] | None = None):
    runner = CliRunner()
    return runner.invoke(command, list(args), env={"AGENTD_CONFIG": None, **(env or {})}, catch_exceptions=False)


# -- the 60 s store, exported ------------------------------------------------------------------

def test_export_returns_every_point_the_store_holds(sim: SimRun) -> None:
    before = sim.fingerprint()
    stored = sim.lines()
    measurements = {line.split(",", 1)[0] for line in stored}
    assert {"gpu", "agent", "throttle_event"} <= measurements  # the run stored all three
    assert len(sim.lines("gpu")) == GPUS * SECONDS and len(sim.lines("agent")) == SECONDS
    result = invoke(export_command, "--config", str(sim.config))
    assert result.exit_code == 0, result.stderr
    exported = result.stdout.splitlines()
    assert exported == stored  # every point, in the order stored, as stored
    assert f"{len(stored)} points from {sim.store_path}" in result.stderr
    with StoreReader(sim.store_path) as reader:
        assert reader.count() == len(stored)
    assert sim.fingerprint() == before


def test_measurement_filter_is_repeatable_and_exact(sim: SimRun) -> None:
    result = invoke(export_command, "--config", str(sim.config), "--measurement", "gpu")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == sim.lines("gpu")
    want = [line for line in sim.lines() if line.startswith(("agent,", "throttle_event,"))]
    result = invoke(export_command, "--config", str(sim.config), "--measurement", "agent",
                    "--measurement", "throttle_event")
    assert result.stdout.splitlines() == want
    result = invoke(export_command, "--config", str(sim.config), "--measurement", "nosuch")
    assert result.exit_code == 0 and result.stdout == "" and "0 points" in result.stderr


def test_since_and_until_select_a_half_open_window(sim: SimRun) -> None:
    lo, hi = sim.t0_ns + 10 * 10**9, sim.t0_ns + 20 * 10**9
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(lo // 10**9)) + f".{lo % 10**9:09d}Z"
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(hi // 10**9)) + f".{hi % 10**9:09d}Z"
    want = [line for line in sim.lines() if lo <= int(line.rsplit(" ", 1)[1]) < hi]
    result = invoke(export_command, "--config", str(sim.config), "--since", since, "--until", until)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == want
    assert len(want) == (GPUS + 1) * 10 + sum(line.startswith("throttle_event") for line in want)
    # durations count back from now: the run ended about 60 s ago
    result = invoke(export_command, "--config", str(sim.config), "--since", "1h")
    assert result.stdout.splitlines() == sim.lines()
    result = invoke(export_command, "--config", str(sim.config), "--until", "30s", "--measurement", "agent")
    assert result.stdout.splitlines() == sim.lines("agent")
    result = invoke(export_command, "--config", str(sim.config), "--since", "1s")
    assert result.stdout == ""


def test_csv_parses_back_to_the_stored_points(sim: SimRun) -> None:
    result = invoke(export_command, "--config", str(sim.config), "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    stored = sim.lines()
    assert len(rows) == len(stored)
    for row, line in zip(rows, stored):
        measurement, tags, fields, ts = parse_line(line)
        assert row["measurement"] == measurement and int(row["timestamp_ns"]) == ts
        assert row["time"].endswith("Z") and row["time"][:19] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 10**9))
        for key, value in tags.items():
            assert row[key] == value
        for key, value in fields.items():
            text = row[key]
            if isinstance(value, bool):
                assert text == ("true" if value else "false")
            elif isinstance(value, float):
                assert float(text) == value
            elif isinstance(value, int):
                assert int(text) == value
            else:
                assert text == value
        assert all(row[k] == "" for k in row if k not in (*tags, *fields, "time", "timestamp_ns", "measurement"))


def test_json_lines_parse_back_to_the_stored_points(sim: SimRun) -> None:
    out = sim.root / "out.json"
    result = invoke(export_command, "--config", str(sim.config), "--format", "json", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    objects = [json.loads(line) for line in out.read_text().splitlines()]
    stored = sim.lines()
    assert len(objects) == len(stored)
    for obj, line in zip(objects, stored):
        measurement, tags, fields, ts = parse_line(line)
        assert obj == {"name": measurement, "tags": tags, "fields": fields, "timestamp_ns": ts}
        assert type(obj["fields"].get("clock_reasons", 0)) is int  # integers stay integers
    assert not list(sim.root.glob(".out.json.tmp-*"))  # written aside, then renamed


def test_output_file_holds_what_stdout_holds(sim: SimRun) -> None:
    out = sim.root / "out.lp"
    out.write_text("old content\n")
    result = invoke(export_command, "--config", str(sim.config), "-o", str(out))
    assert result.exit_code == 0
    assert out.read_text().splitlines() == sim.lines()
    result = invoke(export_command, "--config", str(sim.config), "-o", str(sim.root / "no" / "such" / "dir.lp"))
    assert result.exit_code == 1
    assert f"cannot write {sim.root / 'no' / 'such' / 'dir.lp'}" in result.stderr


# -- beside a writer -----------------------------------------------------------------------------

def test_export_while_a_writer_holds_the_store_open(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = Store(path, checkpoint_thread=False)
    store.append([(i, f"gpu,host=h,gpu=0 power_w={i}.5 {i}") for i in range(1, 2001)])
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # a writer mid-transaction: uncommitted rows, the write lock held
    other.execute("INSERT INTO points (ts_ns, line) VALUES (1, 'gpu,host=h power_w=0 1')")
    reader = StoreReader(path, chunk_rows=300)  # not a divisor of 2000: the last chunk could run past the top
    started = time.monotonic()
    chunks = reader.chunks(PointFilter())
    first = next(chunks)
    other.execute("ROLLBACK")
    # between two chunks the reader holds no snapshot: the writer commits at once, and a
    # checkpoint copies every frame (the WAL can start over) rather than stopping at the reader
    store.append([(9999, "agent,host=h x=1i 9999")])
    frames, copied = store.checkpoint()
    assert frames > 0 and copied == frames
    rest = [row for chunk in chunks for row in chunk]
    assert time.monotonic() - started < 1.0  # nobody waited on a lock
    got = [line for _, _, line in first + rest]
    assert got == [f"gpu,host=h,gpu=0 power_w={i}.5 {i}" for i in range(1, 2001)]  # committed, up to the top at start
    assert "agent,host=h x=1i 9999" not in got  # appended after the export began: left for the next
    reader.close()
    assert store.backlog() == 2001 and len(store.query()) == 2001  # the writer's rows all there, none lost
    store.close()


def test_cli_export_beside_an_open_daemon_store_changes_nothing(tmp_path: Path) -> None:
    run = SimRun(tmp_path)
    run.run()
    store = Store(run.store_path, checkpoint_thread=False)  # the "running daemon": open, WAL present
    store.append([(run.t0_ns, f"agent,host={run.node} x=1i {run.t0_ns}")])
    wal = Path(f"{run.store_path}-wal")
    assert wal.exists() and wal.stat().st_size > 0
    before = run.fingerprint()
    count = store.backlog()
    result = invoke(export_command, "--config", str(run.config), "--format", "csv")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == count + 1  # the header
    assert invoke(store_group, "info", "--config", str(run.config)).exit_code == 0
    assert run.fingerprint() == before  # neither the database nor the WAL was written (no checkpoint)
    store.append([(run.t0_ns + 1, f"agent,host={run.node} x=2i {run.t0_ns + 1}")])  # the writer carries on
    assert store.backlog() == count + 1
    store.close()


# -- store info ----------------------------------------------------------------------------------

def test_store_info_reports_the_stores_own_figures(tmp_path: Path) -> None:
    run = SimRun(tmp_path)
    run.run()
    stored = run.lines()
    stamps = [int(line.rsplit(" ", 1)[1]) for line in stored]
    with Store(run.store_path, checkpoint_thread=False) as store:  # two lines a server refused
        batch = store.oldest(2)
        assert batch is not None
        store.quarantine(Batch(batch.first_id, batch.first_id, batch.lines[:1], 1, batch.ids[:1]), "HTTP 400: first")
        store.quarantine(Batch(batch.last_id, batch.last_id, batch.lines[1:], 1, batch.ids[1:]), "HTTP 400: newest")
        points = store.backlog()
    result = invoke(store_group, "info", "--config", str(run.config), "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["points"] == points == len(stored) - 2
    assert info["quarantined"] == 2 and info["quarantine_newest_reason"] == "HTTP 400: newest"
    assert info["oldest_ns"] == min(stamps[2:]) and info["newest_ns"] == max(stamps)
    assert info["schema_version"] == 1 and info["dropped"] == 0
    assert info["backlog"] is None and info["forwarding_to"] is None  # no influx.url: nothing is forwarded
    wal = Path(f"{run.store_path}-wal")
    assert info["db_bytes"] == run.store_path.stat().st_size
    assert info["size_bytes"] == info["db_bytes"] + (wal.stat().st_size if wal.exists() else 0)
    assert info["config"] == str(run.config)
    text = invoke(store_group, "info", "--config", str(run.config))
    assert text.exit_code == 0
    assert f"points       {points} " in text.stdout
    assert "quarantined  2 (newest " in text.stdout and "HTTP 400: newest" in text.stdout
    assert "backlog      none: no influx.url" in text.stdout
    env = {"AGENTD_INFLUX__URL": "http://influx.example:8086"}
    forwarding = json.loads(invoke(store_group, "info", "--config", str(run.config), "--json", env=env).stdout)
    assert forwarding["backlog"] == points and forwarding["forwarding_to"] == "http://influx.example:8086"


# -- refused inputs: a clear message, the right exit code, nothing changed ---------------------

@pytest.mark.parametrize("args, message", [
    (["--since", "0s"], "--since '0s': a duration must be positive"),
    (["--since", "-1h"], "--since '-1h': a duration must be positive"),
    (["--until", "0"], "--until '0': a duration must be positive"),
    (["--since", "yesterday"], "expected a duration back from now"),
    (["--since", "2026-12-01T10:00:00"], "give the time zone"),
    (["--since", "1h", "--until", "2h"], "--since 1h is not before --until 2h"),
    (["--format", "xml"], "'xml' is not one of"),
    (["--to", "http://127.0.0.1:9", "--format", "csv"], "--format and --output do not apply"),
    (["--token-file", "/x"], "--token-file only apply with --to"),
    (["--to", "http://127.0.0.1:9", "--db", "d", "--bucket", "b"], "give one or the other"),
    (["--to", "ftp://example.com"], "must be an http:// or https:// URL"),
    (["--to", "http://127.0.0.1:9", "--token-file", "/nonexistent/token"], "/nonexistent/token: cannot read"),
])
def test_bad_options_are_usage_errors(sim: SimRun, args: list[str], message: str) -> None:
    before = sim.fingerprint()
    result = invoke(export_command, "--config", str(sim.config), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""
    assert sim.fingerprint() == before


def test_a_missing_store_names_the_path_and_the_config(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'state_dir = "{tmp_path / "empty"}"\n')
    for command, args in ((export_command, []), (store_group, ["info"])):
        result = invoke(command, *args, "--config", str(config))
        assert result.exit_code == 1
        assert f"store {tmp_path / 'empty' / 'store.sqlite'}: no such file" in result.stderr
        assert f"from {config}" in result.stderr and "--config" in result.stderr
    assert not (tmp_path / "empty").exists()  # nothing was created looking for it


def test_an_invalid_config_is_exit_2_with_the_located_error(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text("intervall = 1\n")
    result = invoke(export_command, "--config", str(config))
    assert result.exit_code == 2 and f"{config}: intervall: unknown key" in result.stderr
    result = invoke(store_group, "info", "--config", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2 and "absent.toml: no such file" in result.stderr


def test_a_store_from_a_newer_agentd_is_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state / "store.sqlite", checkpoint_thread=False).close()
    conn = sqlite3.connect(state / "store.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    digest = hashlib.sha256((state / "store.sqlite").read_bytes()).hexdigest()
    config = tmp_path / "agentd.toml"
    config.write_text(f'state_dir = "{state}"\n')
    result = invoke(export_command, "--config", str(config))
    assert result.exit_code == 1 and "schema version 99, newer than this agentd's 1" in result.stderr
    assert hashlib.sha256((state / "store.sqlite").read_bytes()).hexdigest() == digest


def test_a_line_that_does_not_parse_is_told_and_exits_1_never_dropped_silently(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Store(state / "store.sqlite", checkpoint_thread=False) as store:
        store.append([(1, "gpu,host=h power_w=1 1"), (2, "gpu,host=h power_w=oops 2"), (3, "gpu,host=h power_w=3 3")])
    config = tmp_path / "agentd.toml"
    config.write_text(f'state_dir = "{state}"\n')
    for fmt in ("json", "csv"):
        result = invoke(export_command, "--config", str(config), "--format", fmt)
        assert result.exit_code == 1
        assert "stored line 2 does not parse" in result.stderr and "power_w=oops" in result.stderr
        assert "1 stored lines do not parse and are not in the" in result.stderr
        body = result.stdout.splitlines()
        assert len(body) == (2 if fmt == "json" else 3)  # the two good ones are there (csv: + header)
    lp = invoke(export_command, "--config", str(config))
    assert lp.exit_code == 0 and lp.stdout.splitlines()[1] == "gpu,host=h power_w=oops 2"  # lp: as stored


# -- replay: a server that is not there --------------------------------------------------------

def test_replay_to_a_server_that_is_down_fails_clearly_and_keeps_the_store(sim: SimRun) -> None:
    before = sim.fingerprint()
    count = len(sim.lines())
    result = invoke(export_command, "--config", str(sim.config), "--to", "http://127.0.0.1:9", "--retries", "1")
    assert result.exit_code == 1
    assert f"replay to http://127.0.0.1:9 (v2, bucket telemetry) stopped after 0 of {count} points" in result.stderr
    assert "127.0.0.1:9" in result.stderr and "Connect" in result.stderr  # the writer's own reason
    assert "the store is unchanged" in result.stderr
    assert result.stdout == ""
    assert sim.fingerprint() == before and len(sim.lines()) == count
    v1 = invoke(export_command, "--config", str(sim.config), "--to", "http://127.0.0.1:9", "--db", "x",
                "--retries", "0")
    assert v1.exit_code == 1 and "(v1, database x) stopped after 0 of" in v1.stderr


def test_a_stopped_store_is_read_without_creating_a_file_and_a_daemon_opening_it_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path, checkpoint_thread=False) as store:
        store.append([(i, f"gpu,host=h power_w={i} {i}") for i in range(1, 101)])
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert not Path(f"{path}-wal").exists()  # closed cleanly: no WAL files
    reader = StoreReader(path, chunk_rows=30)
    assert reader.immutable
    chunks = reader.chunks(PointFilter())
    first = next(chunks)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing created beside it
    writer = Store(path, checkpoint_thread=False)  # a daemon starts mid-export
    writer.append([(1000, "agent,host=h x=1i 1000")])
    rest = [row for chunk in chunks for row in chunk]
    assert not reader.immutable  # followed it as a WAL reader
    assert [r[2] for r in first + rest] == [f"gpu,host=h power_w={i} {i}" for i in range(1, 101)]
    assert reader.count() == 101  # and sees what the daemon committed since
    reader.close()
    writer.close()


def test_since_starts_at_the_lowest_id_that_matches_not_the_first_timestamp_in_id_order(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path, checkpoint_thread=False) as store:  # a coolant sender's old stamps arrive late
        store.append([(100, "gpu,host=h v=1 100"), (50, "coolant,site=s v=2 50"), (200, "gpu,host=h v=3 200"),
                      (150, "coolant,site=s v=4 150"), (90, "coolant,site=s v=5 90")])
    with StoreReader(path, chunk_rows=1) as reader:
        got = [r[2] for c in reader.chunks(PointFilter(since_ns=95)) for r in c]
        assert got == ["gpu,host=h v=1 100", "gpu,host=h v=3 200", "coolant,site=s v=4 150"]
        assert reader.count(PointFilter(since_ns=95)) == 3
        got = [r[2] for c in reader.chunks(PointFilter(("coolant",), until_ns=150)) for r in c]
        assert got == ["coolant,site=s v=2 50", "coolant,site=s v=5 90"]


# -- replay into the real servers ---------------------------------------------------------------

def _vm_expected(lines: list[str]) -> dict[tuple[str, frozenset, int], float | None]:
    """VictoriaMetrics' view of line protocol: field f of measurement m is series m_f with the
    tags as labels, at millisecond precision; booleans 1/0 (string fields hold no value)."""
    want: dict[tuple[str, frozenset, int], float | None] = {}
    for line in lines:
        measurement, tags, fields, ts = parse_line(line)
        assert ts is not None
        for name, value in fields.items():
            key = (f"{measurement}_{name}", frozenset(tags.items()), ts // 10**6)
            want[key] = None if isinstance(value, str) else float(value)
    return want


@pytest.mark.integration
def test_replay_into_victoriametrics_lands_every_point(sim: SimRun, services) -> None:
    before = sim.fingerprint()
    stored = sim.lines()
    result = invoke(export_command, "--config", str(sim.config), "--to", services.vm_url, "--bucket", "replay")
    assert result.exit_code == 0, result.stderr
    assert f"replayed {len(stored)} points to {services.vm_url} (v2, bucket replay)" in result.stderr
    assert "the store is unchanged" in result.stderr
    services.vm_flush()
    got: dict[tuple[str, frozenset, int], float | None] = {}
    for series in services.vm_export(f'{{host="{sim.node}"}}', start=sim.t0_ns // 10**9 - 10):
        labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
        for value, ts in zip(series["values"], series["timestamps"]):
            got[(series["metric"]["__name__"], frozenset(labels.items()), ts)] = value
    want = _vm_expected(stored)
    assert got.keys() == want.keys()  # every field of every point, nothing else
    # VictoriaMetrics keeps about 12 significant digits (its own float compression)
    wrong = {k: (got[k], want[k]) for k in want if want[k] is not None and not math.isclose(got[k], want[k], rel_tol=1e-11)}
    assert not wrong, list(wrong.items())[:5]
    assert sim.fingerprint() == before and sim.lines() == stored  # a copy: the store still holds them all


@pytest.mark.integration
def test_replay_into_influxdb1_with_db_and_refused_lines_are_counted_not_lost(sim: SimRun, services, influx1_db) -> None:
    before = sim.fingerprint()
    result = invoke(export_command, "--config", str(sim.config), "--to", services.influxdb1_url, "--db", influx1_db)
    assert result.exit_code == 0, result.stderr
    for measurement in ("gpu", "agent", "throttle_event"):
        assert services.influx1_count(measurement, influx1_db) == len(sim.lines(measurement))
    # a field type conflict: the database now holds agent.tick_s as a string, so InfluxDB refuses
    # every agent line (400 partial write); the forwarder's bisection ships the rest
    services.influx1_drop_db(influx1_db)
    services.influx1_create_db(influx1_db)
    services.influx1_write(influx1_db, f'agent,host=other tick_s="text" {sim.t0_ns}')
    result = invoke(export_command, "--config", str(sim.config), "--to", services.influxdb1_url, "--db", influx1_db)
    agents, total = len(sim.lines("agent")), len(sim.lines())
    assert result.exit_code == 1
    found = re.search(rf"(\d+) of {total} points were in batches that {re.escape(services.influxdb1_url)} "
                      r"\(v1, database \w+\) refused \(HTTP 400: partial write: field type conflict"
                      r".*?; (\d+) were accepted; the store is unchanged", result.stderr)
    assert found, result.stderr
    refused, accepted = int(found.group(1)), int(found.group(2))
    assert refused + accepted == total and refused >= agents  # each refused agent line counted, none lost
    assert services.influx1_count("gpu", influx1_db) == len(sim.lines("gpu"))
    assert sim.fingerprint() == before
