"""`agentd run --once` (agentd.oneshot.run_once): one tick printed, nothing written (issue 9, item 1).

"Nothing written" is checked against what the code could have done: the simulator's and the
fake NVML's records of every set_power_limit attempt (made before any check), and every file
in state_dir (name, size, mtime, hash) before and after, with a store and an originals file
there as a running daemon leaves them.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from agentd.clock import FakeClock
from agentd.config import AgentConfig, load_config
from agentd.export import point_object
from agentd.oneshot import run_once
from agentd.store import Store
from collectors.lineproto_parse import LineProtocolError, ParsedLine, parse_line, parse_lines
from collectors.sim import SimBackend
from tests.fake_pynvml import FakeNvml, install

SHIPPED = Path(__file__).resolve().parent.parent / "systemd" / "agentd.toml"
CAP_RULE = """\
rules:
  - name: hot_power
    scope: gpu
    when: gpu.power_w > 100
    severity: warning
    actions:
      - type: cap_gpu
        watts: 450
"""


def shipped_config(state_dir: Path, **env: str) -> AgentConfig:
    """systemd/agentd.toml as an operator installs it, on the simulator, with state_dir moved."""
    return load_config(SHIPPED, environ={"AGENTD_BACKEND": "sim", "AGENTD_STATE_DIR": str(state_dir), **env})


def config(tmp_path: Path, *, rules: str | None = CAP_RULE, **over: object) -> AgentConfig:
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir(exist_ok=True)
    if rules is not None:
        (rules_dir / "site.yaml").write_text(rules)
    data = {"backend": "sim", "state_dir": str(tmp_path / "state"), "node": "once1", "sim": {"gpus": 3},
            "rules": {"dirs": [str(rules_dir)]}, "log_level": "warning"} | over
    return AgentConfig.model_validate(data)


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``directory``: size, mtime (ns) and content hash; and every directory's
    mtime, itself included (a file made and removed again changes it)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in [directory, *sorted(directory.rglob("*"))]}


def once(cfg: AgentConfig, fmt: str = "lp", **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_once(cfg, fmt, out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


def points(text: str) -> list[ParsedLine]:
    """Parse the output with the project's own parser; every entry must parse."""
    parsed = list(parse_lines(text))
    errors = [p for p in parsed if isinstance(p, LineProtocolError)]
    assert not errors, errors
    return [p for p in parsed if isinstance(p, ParsedLine)]


def plan(text: str) -> list[dict[str, str]]:
    """The ``# would set`` comment lines as dicts."""
    return [dict(kv.split("=", 1) for kv in line[len("# would set "):].split())
            for line in text.splitlines() if line.startswith("# would set gpu=")]


# -- the shipped config on the simulator ---------------------------------------------------------

def test_the_shipped_config_on_the_simulator_prints_parseable_line_protocol(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = shipped_config(state)
    assert cfg.dry_run and cfg.sim.gpus == 8  # what the file says
    code, out, err = once(cfg)
    assert code == 0, err
    parsed = points(out)
    gpu = [p for p in parsed if p.measurement == "gpu"]
    assert sorted(int(p.tags["gpu"]) for p in gpu) == list(range(8))
    assert all(p.tags["host"] == cfg.node_name and p.fields["power_w"] > 0 and p.ts for p in gpu)
    assert {p.measurement for p in parsed} <= {"gpu", "throttle_event"}  # no agent point, no coolant
    assert "# would set no limit (8 GPUs: nothing asks for a cap)" in out.splitlines()
    # the shipped packs' `for` rules cannot fire on one tick: said, by name
    assert "rules have a `for` duration and cannot fire on one tick" in err
    assert "gpu_near_slowdown (10 s)" in err and "hbm_near_max (10 s)" in err
    assert not state.exists()  # not even created


def test_every_limit_it_would_set_is_printed_and_none_is_written(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    state = Path(cfg.state_dir)
    state.mkdir()
    before = snapshot(state)
    sim = SimBackend(gpus=3)
    code, out, err = once(cfg, backend=sim, clock=FakeClock())
    assert code == 0, err
    changes = plan(out)
    assert [c["gpu"] for c in changes] == ["0", "1", "2"]
    assert all(c["from_w"] == "700" and c["to_w"] == "450" and c["source"] == "hot_power" for c in changes)
    assert [c["uuid"] for c in changes] == [i.uuid for i in SimBackend(gpus=3).open()]
    parsed = points(out)
    events = [p for p in parsed if p.measurement == "throttle_event"]
    assert [(e.tags["gpu"], e.fields["state"]) for e in events] == [("0", "firing"), ("1", "firing"), ("2", "firing")]
    gpus = [p for p in parsed if p.measurement == "gpu"]
    assert all(p.fields["limit_target_w"] == 450.0 and "limit_set_w" not in p.fields for p in gpus)
    assert all(p.fields["limit_w"] == 700.0 for p in gpus)
    assert sim.attempts == [] and sim.writes == []  # not one set_power_limit call, refused or not
    assert sim.limits_w() == {0: 700.0, 1: 700.0, 2: 700.0}
    assert snapshot(state) == before  # no original_limits.json (not even made and removed), no store
    assert "dry_run" not in out  # this config acts: no dry-run remark


def test_dry_run_says_the_daemon_would_write_none_of_it(tmp_path: Path) -> None:
    code, out, _ = once(config(tmp_path, dry_run=True), backend=SimBackend(gpus=3), clock=FakeClock())
    assert code == 0
    assert len(plan(out)) == 3  # the plan is still shown: what acting would do
    assert out.splitlines()[-1].startswith("# dry_run = true: agentd run with this configuration evaluates the same")


def test_the_fake_nvml_sees_no_set_call(tmp_path: Path) -> None:
    fake = FakeNvml.with_gpus(2, power_mw=350_000)
    cfg = config(tmp_path, backend="nvml")
    with install(fake):
        code, out, err = once(cfg)
    assert code == 0, err
    assert [(c["gpu"], c["from_w"], c["to_w"]) for c in plan(out)] == [("0", "700", "450"), ("1", "700", "450")]
    assert [p.fields["power_w"] for p in points(out) if p.measurement == "gpu"] == [352.5, 352.5]
    for gpu in fake.gpus:
        assert gpu.attempts == [] and gpu.sets == []
        assert gpu.calls["nvmlDeviceSetPowerManagementLimit"] == 0
    assert fake.initialized == 0  # nvmlShutdown was called: the driver is left as found


def test_json_is_one_document_with_the_same_points_and_plan(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    code, lp, _ = once(cfg, backend=SimBackend(gpus=3), clock=FakeClock())
    code_j, text, _ = once(cfg, "json", backend=SimBackend(gpus=3), clock=FakeClock())
    assert code == code_j == 0
    doc = json.loads(text)
    assert doc["points"] == [point_object(*parse_line(line)) for line in lp.splitlines() if not line.startswith("#")]
    assert [{k: str(v) if k == "gpu" else v for k, v in c.items() if k != "uuid"} for c in doc["limits"]] == [
        {"gpu": c["gpu"], "from_w": float(c["from_w"]), "to_w": float(c["to_w"]), "source": c["source"]}
        for c in plan(lp)]
    assert doc["dry_run"] is False and doc["rules_enabled"] is True
    assert any("`for` duration" in n for n in doc["notes"])
    assert type(doc["points"][-1]["fields"]["clock_reasons"]) is int


def test_beside_a_running_daemon_state_dir_is_untouched_and_its_baselines_are_used(tmp_path: Path) -> None:
    cfg = config(tmp_path, rules=None)  # the packs only: nothing fires on a cool simulator
    state = Path(cfg.state_dir)
    sim = SimBackend(gpus=3)
    infos = sim.open()
    sim.set_power_limit(1, 450.0)  # the running daemon capped GPU 1 and recorded its baseline
    sim.attempts.clear()
    sim.writes.clear()
    (state).mkdir()
    (state / "original_limits.json").write_text(json.dumps(
        {"version": 2, "gpus": {infos[1].uuid: {"index": 1, "limit_w": 700.0, "saved_at": 1.0}}}))
    daemon_store = Store(state / "store.sqlite", checkpoint_thread=False)  # held open, as the daemon does
    daemon_store.append([(1, "agent,host=once1 x=1i 1")])
    before = snapshot(state)
    assert {"store.sqlite", "store.sqlite-wal", "original_limits.json"} <= before.keys()

    class Reopen(SimBackend):  # the same simulated GPUs, already holding the daemon's cap
        def open(self):
            return infos

        def sample(self, ts_ns):
            return sim.sample(ts_ns)

    code, out, err = once(cfg, backend=Reopen(gpus=3), clock=FakeClock())
    assert code == 0, err
    assert plan(out) == [{"gpu": "1", "uuid": infos[1].uuid, "from_w": "450", "to_w": "700", "source": "baseline"}]
    assert "original_limits.json holds baselines of capped GPUs" in err
    assert snapshot(state) == before
    assert sim.attempts == [] and sim.limits_w()[1] == 450.0
    daemon_store.append([(2, "agent,host=once1 x=2i 2")])  # the daemon carries on
    assert daemon_store.backlog() == 2
    daemon_store.close()


def test_coolant_inputs_are_not_read_and_said_so(tmp_path: Path) -> None:
    cfg = config(tmp_path, rules=None, mqtt={"host": "127.0.0.1", "port": 9},
                 coolant={"subscriptions": [{"topic": "cooling/+/+/tcs", "format": "json"}]})
    code, out, err = once(cfg, backend=SimBackend(gpus=1), clock=FakeClock())
    assert code == 0
    assert "the 1 coolant input(s) are not read" in err and "coolant rules are left out" in err
    assert all(p.tags.get("rule", "") not in ("tcs_supply_hot", "coolant_sensor_stale") for p in points(out))


def test_a_lost_gpu_is_a_note_and_the_others_still_report(tmp_path: Path) -> None:
    fake = FakeNvml.with_gpus(2)
    fake.gpus[1].lost = True
    with install(fake):
        code, out, err = once(config(tmp_path, backend="nvml"))
    assert code == 0
    assert [p.tags["gpu"] for p in points(out) if p.measurement == "gpu"] == ["0"]
    assert "GPU 1 (" in err and "it has no point" in err


# -- refused inputs and failures: the exit code, a clear message, nothing printed as a result ----------

def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    sim = SimBackend(gpus=1)
    code, out, err = once(config(tmp_path), "xml", backend=sim)
    assert code == 2 and out == ""
    assert "--format 'xml': expected one of lp, json" in err
    assert sim.attempts == []


def test_a_bad_rule_file_is_exit_2_with_its_located_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, rules="rules:\n  - name: broken\n    scope: gpu\n    when: gpu.nosuch > 1\n")
    code, out, err = once(cfg, backend=SimBackend(gpus=1))
    assert code == 2 and out == ""
    assert "site.yaml" in err and "broken" in err and "nosuch" in err


def test_no_driver_is_exit_1_with_the_backends_message(tmp_path: Path) -> None:
    import pynvml

    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with install(fake):
        code, out, err = once(config(tmp_path, backend="nvml"))
    assert code == 1 and out == ""
    assert err.startswith("agentd run --once: ") and "sim" in err


def test_a_hung_driver_costs_the_timeout_not_the_command(tmp_path: Path) -> None:
    release = threading.Event()

    class Hung(SimBackend):
        def sample(self, ts_ns):
            release.wait(10)
            return super().sample(ts_ns)

    backend = Hung(gpus=1)
    try:
        code, out, err = once(config(tmp_path, nvml_timeout=0.05), backend=backend)
    finally:
        release.set()
    assert code == 1 and out == ""
    assert "reading the GPUs did not return within nvml_timeout = 0.05 s" in err
    assert "not closing the GPU backend: a call into it has not returned" in err  # no shutdown under a hung call
    assert backend.attempts == []


# -- the real servers take every line ------------------------------------------------------------

def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None


@pytest.mark.integration
def test_the_output_is_accepted_whole_by_victoriametrics_and_influxdb1(tmp_path: Path, services, influx1_db) -> None:
    node = f"once-{uuid.uuid4().hex[:8]}"
    code, out, _ = once(shipped_config(tmp_path / "state", AGENTD_NODE=node))
    assert code == 0
    body = out.encode()  # comments and all, as it was printed
    assert _post(f"{services.vm_url}/api/v2/write?bucket=once", body) == 204
    assert _post(f"{services.vm_url}/write?db=once", body) == 204
    q = urllib.parse.urlencode({"db": influx1_db, "precision": "ns"})
    assert _post(f"{services.influxdb1_url}/write?{q}", body) == 204  # 204: every point stored (else 400 partial write)
    assert services.influx1_count("gpu", influx1_db, f"host = '{node}'") == 8
    services.vm_flush()
    series = services.vm_export(f'{{__name__="gpu_power_w",host="{node}"}}')
    # one series per GPU from each path (/write adds its db as a label)
    assert sorted((s["metric"].get("db", ""), s["metric"]["gpu"]) for s in series) == [
        (db, str(i)) for db in ("", "once") for i in range(8)]
