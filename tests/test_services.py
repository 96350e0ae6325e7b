"""The test servers and their fixtures work: each round trip here is what later tests rely on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import unmarked_server_tests
from tests.services import (  # noqa: F401  (prometheus_fixture, slurm_fixture: the fixtures)
    SCRIPT,
    Prometheus,
    ServiceError,
    Services,
    SlurmCluster,
    from_env,
    prometheus_fixture,
    slurm_fixture,
    wait_for,
)

integration = pytest.mark.integration


def _post(url: str, body: str) -> int:
    req = urllib.request.Request(url, data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _script_env(services: Services) -> dict[str, str]:
    """What `scripts/services env` prints now, as a dict."""
    out = subprocess.run(
        [str(SCRIPT), "env"],
        env=dict(os.environ, SERVICES_DIR=str(services.dir)),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    return {k: v for k, v in pairs}


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@integration
def test_mqtt_broker_accepts_a_connection(services: Services) -> None:
    # A bare MQTT 3.1.1 CONNECT (clean session, keepalive 60 s); the broker must CONNACK 0.
    client_id = b"agentd-test"
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(variable) + len(payload)]) + variable + payload
    with socket.create_connection((services.mqtt_host, services.mqtt_port), timeout=5) as s:
        s.sendall(packet)
        assert s.recv(4) == b"\x20\x02\x00\x00"


@integration
def test_influx1_write_then_influxql_reads_it_back(services: Services, influx1_db: str) -> None:
    ts = time.time_ns() - 5_000_000_123  # a few seconds ago, with sub-ms digits
    qs = urllib.parse.urlencode({"db": influx1_db, "precision": "ns"})
    status = _post(
        f"{services.influxdb1_url}/write?{qs}",
        f"gpu,host=n1,gpu=0 power_w=312.5,clock_reasons=4i,throttled=true {ts}\n"
        f"gpu,host=n1,gpu=1 power_w=100 {ts}",
    )
    assert status == 204

    doc = services.influx1_query(
        "SELECT power_w, clock_reasons, throttled FROM gpu WHERE \"gpu\" = '0'", influx1_db
    )
    series = doc["results"][0]["series"][0]
    assert series["columns"] == ["time", "power_w", "clock_reasons", "throttled"]
    assert series["values"] == [[ts, 312.5, 4, True]]  # exact ns, exact value, int stays int

    assert services.influx1_count("gpu", influx1_db) == 2
    assert services.influx1_count("gpu", influx1_db, where="\"gpu\" = '1'") == 1
    assert services.influx1_count("absent", influx1_db) == 0


@integration
def test_influx1_query_error_carries_the_server_text(services: Services, influx1_db: str) -> None:
    with pytest.raises(ServiceError, match="database not found"):
        services.influx1_query("SELECT * FROM gpu", "no_such_db_" + uuid.uuid4().hex[:6])
    with pytest.raises(ServiceError, match="error parsing query"):
        services.influx1_query("SELEC nonsense", influx1_db)


@integration
def test_influx1_db_fixture_gives_a_fresh_database(services: Services, influx1_db: str) -> None:
    [series] = services.influx1_query("SHOW DATABASES")["results"][0]["series"]
    names = [row[0] for row in series["values"]]
    assert influx1_db in names
    assert services.influx1_count("gpu", influx1_db) == 0


@integration
def test_vm_v2_write_reads_back_exact_values_and_ms_timestamps(services: Services) -> None:
    m = _unique("itest")
    ts = time.time_ns() - 7_654_321  # sub-ms digits VM must truncate, not round
    status = _post(
        f"{services.vm_url}/api/v2/write?org=x&bucket=y&precision=ns",
        f"{m},host=n1,gpu=3 power_w=312.25,clock_reasons=4i {ts}",
    )
    assert status == 204
    services.vm_flush()

    [power] = services.vm_export(f'{{__name__="{m}_power_w"}}')
    assert power["metric"] == {"__name__": f"{m}_power_w", "host": "n1", "gpu": "3"}
    assert power["values"] == [312.25]
    assert power["timestamps"] == [ts // 1_000_000]

    [reasons] = services.vm_export(f'{{__name__="{m}_clock_reasons"}}')
    assert reasons["values"] == [4]


@integration
def test_vm_collapses_a_replayed_write(services: Services) -> None:
    m = _unique("itest")
    t0 = time.time_ns() - 10_000_000_000
    url = f"{services.vm_url}/api/v2/write?org=x&bucket=y&precision=ns"
    batch = f"{m},host=n1 f=1 {t0}\n{m},host=n1 f=2 {t0 + 1_000_000_000}"
    _post(url, batch)
    services.vm_flush()
    _post(url, batch)  # the forwarder's at-least-once replay
    services.vm_flush()

    [series] = services.vm_export(f'{{__name__="{m}_f"}}')
    assert series["values"] == [1, 2]
    assert series["timestamps"] == [t0 // 1_000_000, t0 // 1_000_000 + 1000]


@integration
def test_influx1_data_survives_a_restart_on_the_same_port(services: Services, influx1_db: str) -> None:
    ts = time.time_ns() - 1_000_000_000
    services.influx1_write(influx1_db, f"agent,host=n1 tick_s=0.5 {ts}")
    before = _script_env(services)

    services.stop("influxdb1")
    try:
        assert not _answers(f"{services.influxdb1_url}/ping")  # a real outage
    finally:
        services.start("influxdb1")

    assert _script_env(services) == before
    assert before["TEST_INFLUXDB1_URL"] == services.influxdb1_url
    assert services.influx1_rows("agent", influx1_db) == [{"time": ts, "host": "n1", "tick_s": 0.5}]


@integration
def test_vm_data_survives_a_restart(services: Services) -> None:
    m = _unique("itest")
    ts = time.time_ns() - 1_000_000_000
    _post(f"{services.vm_url}/api/v2/write?org=x&bucket=y&precision=ns", f"{m} f=7 {ts}")

    services.stop("vm")
    try:
        assert not _answers(f"{services.vm_url}/health")
    finally:
        services.start("vm")

    [series] = services.vm_export(f'{{__name__="{m}_f"}}')
    assert series["values"] == [7]
    assert series["timestamps"] == [ts // 1_000_000]


@integration
def test_env_names_every_server_and_points_the_slurm_clients_at_the_test_cluster(services: Services) -> None:
    env = _script_env(services)
    assert env["SLURM_CONF"] == env["TEST_SLURM_CONF"]
    assert Path(env["SLURM_CONF"]).is_file()
    assert env["TEST_SLURM_PARTITIONS"].split(",") == ["batch", "prod"]
    assert env["TEST_PROMETHEUS_URL"].startswith("http://127.0.0.1:")
    assert Path(env["TEST_PROMETHEUS_TARGETS"]).parent == services.dir / "prometheus"
    found = from_env(env)
    assert found is not None and found.slurm is not None and found.prometheus is not None


@integration
def test_slurm_runs_a_batch_job_and_takes_drain_resume_and_extra(slurm: SlurmCluster) -> None:
    job = slurm.sbatch("--partition", slurm.partitions[1], "--wrap", "sleep 60")
    slurm.wait_running(job)
    [entry] = [j for j in slurm.jobs() if str(j["job_id"]) == job]
    assert entry["partition"] == slurm.partitions[1]

    node = f"NodeName={slurm.node}"
    slurm.run("scontrol", "update", node, "State=DRAIN", "Reason=test: by hand")
    slurm.run("scontrol", "update", node, 'Extra={"agentd_level": 2}')
    info = slurm.node_info()
    assert "DRAIN" in slurm.node_flags() and info["reason"] == "test: by hand"
    assert json.loads(info["extra"]) == {"agentd_level": 2}
    assert slurm.job_state(job) == "RUNNING"  # a drain lets running jobs finish

    slurm.run("scontrol", "update", node, "State=RESUME")
    assert "DRAIN" not in slurm.node_flags() and slurm.node_info()["reason"] == ""
    with pytest.raises(ServiceError, match="scontrol update .* exited 1: .*Invalid node state"):
        slurm.run("scontrol", "update", node, "State=RESUME")  # the error names the command


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"# TYPE itest_up gauge\nitest_up{gpu=\"0\"} 1\nitest_up{gpu=\"1\"} 1\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@integration
def test_prometheus_scrapes_a_target_written_into_its_file(prometheus: Prometheus) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        prometheus.set_targets([f"127.0.0.1:{server.server_port}"], {"test": "scrape"})
        series = wait_for("both itest_up series scraped",
                          lambda: (r := prometheus.query('itest_up{test="scrape"}')) and len(r) == 2 and r)
        assert sorted(s["metric"]["gpu"] for s in series) == ["0", "1"]
        [target] = [t for t in prometheus.targets() if t["labels"].get("test") == "scrape"]
        assert target["health"] == "up"
    finally:
        prometheus.clear_targets()
        server.shutdown()
        server.server_close()
    with pytest.raises(ServiceError, match="bad_data"):
        prometheus.query("itest_up{")


class _Item:
    """Just what the marker check reads of a pytest.Item."""

    def __init__(self, nodeid: str, fixturenames: list[str], marks: tuple[str, ...] = ()) -> None:
        self.nodeid, self.fixturenames, self._marks = nodeid, fixturenames, marks

    def get_closest_marker(self, name: str) -> object | None:
        return pytest.mark.integration.mark if name in self._marks else None


def test_the_marker_check_names_every_unmarked_server_test() -> None:
    items = [
        _Item("a::uses_broker", ["services", "tmp_path"]),
        _Item("a::uses_db", ["influx1_db"]),  # influx1_db brings services with it
        _Item("a::marked", ["services", "influx1_db"], ("integration",)),
        _Item("a::no_server", ["tmp_path"]),
        _Item("a::other_mark", ["services"], ("asyncio",)),
    ]
    assert unmarked_server_tests(items) == ["a::uses_broker", "a::uses_db", "a::other_mark"]  # type: ignore[arg-type]

