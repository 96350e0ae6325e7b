"""`agentd run` as systemd runs it: a real process under a test-owned NOTIFY_SOCKET, signals, and
the fake NVML (installed in the child by a sitecustomize, so the daemon's own NVML path runs).

What systemd relies on: READY -> WATCHDOG at every completed tick (and only then) -> RELOADING
with MONOTONIC_USEC -> READY on SIGHUP -> STOPPING on SIGTERM, a clean exit 0, and the GPUs back
at their baselines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from agentd.store import Store

REPO = Path(__file__).resolve().parent.parent
INTERVAL_S = 0.2
DEADLINE_S = 30.0

SITECUSTOMIZE = """
import atexit, json, os, sys, time
sys.path.insert(0, {repo!r})
from tests.fake_pynvml import FakeNvml, install

fake = FakeNvml.with_gpus(2, limit_mw=700_000, temp_c=60)

def _maybe_hang(name):
    while os.path.exists({hang!r}):  # a driver that stops answering while the file exists
        time.sleep(0.02)

for gpu in fake.gpus:
    gpu.on_call = _maybe_hang
install(fake)

@atexit.register
def _dump():
    with open({dump!r}, "w") as fh:
        json.dump({{"limits_mw": [g.limit_mw for g in fake.gpus],
                   "attempts": [g.attempts for g in fake.gpus]}}, fh)
"""

CAP_RULE = """
pack: site
rules:
  - name: warm_cap
    scope: gpu
    when: gpu.temp_c > 50
    for: 0s
    severity: warning
    actions:
      - {{type: cap_gpu, watts: {watts}}}
"""


class Notifications:
    """A datagram socket standing in for systemd's; collects what the daemon sends."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"agentd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # AF_UNIX paths are short
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def count(self, prefix: str) -> int:
        return sum(1 for m in self.snapshot() if m.startswith(prefix))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Agent:
    """One `agentd run` child; its JSON log lines are collected as they come."""

    def __init__(self, tmp: Path, notify: Notifications | None = None, *, influx: str = "", watts: int = 400) -> None:
        self.tmp = tmp
        self.hang = tmp / "hang"
        self.dump = tmp / "nvml.json"
        site = tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(repo=str(REPO), hang=str(self.hang),
                                                                    dump=str(self.dump)))
        rules = tmp / "rules.d"
        rules.mkdir(exist_ok=True)
        self.rule_file = rules / "site.yaml"
        if not self.rule_file.exists():
            self.rule_file.write_text(CAP_RULE.format(watts=watts))
        self.config = tmp / "agentd.toml"
        self.config.write_text(textwrap.dedent(f"""
            backend = "nvml"
            state_dir = "{tmp / 'state'}"
            node = "n1"
            interval = {INTERVAL_S}
            nvml_timeout = 0.3
            {influx}
            [rules]
            builtin_packs = false
            dirs = ["{rules}"]
            ramp_w_per_s = 10000
            hold_s = 0
        """))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_", "WATCHDOG_"))}
        env["PYTHONPATH"] = str(site)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.address
            env["WATCHDOG_USEC"] = "10000000"
        self.proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"event": "not_json", "line": line})

    def events(self, name: str) -> list[dict]:
        with self._lock:
            return [e for e in self.lines if e.get("event") == name]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)

    def nvml(self) -> dict:
        return json.loads(self.dump.read_text())

    def output(self) -> str:
        with self._lock:
            return "".join(self.raw[-60:])


def wait_for(condition, what: str, agent: Agent | None = None, deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` until it holds (a deadline, never a fixed sleep)."""
    end = time.monotonic() + deadline_s
    while not condition():
        if agent is not None and agent.proc.poll() is not None:
            pytest.fail(f"agentd exited ({agent.proc.returncode}) while waiting for {what}:\n{agent.output()}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}" + (f":\n{agent.output()}" if agent else ""))
        time.sleep(0.02)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify(request):
    n = Notifications(abstract=request.param)
    yield n
    n.close()


def test_notify_sequence_reload_and_stop_restore_the_gpus(tmp_path, notify):
    agent = Agent(tmp_path, notify)
    try:
        wait_for(lambda: notify.count("READY=1") == 1 and notify.count("WATCHDOG=1") >= 3, "READY + watchdogs", agent)
        first = notify.snapshot()
        assert first[0].startswith("READY=1\nSTATUS=") and "GPUs" in first[0]
        wait_for(lambda: agent.events("power_limit_set"), "the cap", agent)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: notify.count("READY=1") == 2, "READY after the reload", agent)
        msgs = notify.snapshot()
        reloading = next(i for i, m in enumerate(msgs) if m.startswith("RELOADING=1"))
        assert "\nMONOTONIC_USEC=" in msgs[reloading]
        usec = int(msgs[reloading].split("MONOTONIC_USEC=")[1])
        assert abs(usec / 1e6 - time.monotonic()) < 60
        assert any(m.startswith("READY=1") for m in msgs[reloading + 1:])
        watchdogs_before = notify.count("WATCHDOG=1")
        wait_for(lambda: notify.count("WATCHDOG=1") >= watchdogs_before + 2, "watchdogs after the reload", agent)
        assert agent.stop() == 0, agent.output()
    finally:
        agent.stop()
    msgs = notify.snapshot()
    assert msgs[-1] == "STOPPING=1"
    assert agent.events("reloaded") and not agent.events("not_json")
    state = agent.nvml()
    assert state["limits_mw"] == [700_000, 700_000]  # both GPUs back at their baseline
    assert all(a[0] == 400_000 and a[-1] == 700_000 for a in state["attempts"])


def test_a_hung_nvml_call_stops_the_watchdog(tmp_path):
    notify = Notifications(abstract=False)
    agent = Agent(tmp_path, notify)
    try:
        wait_for(lambda: notify.count("WATCHDOG=1") >= 2, "watchdogs", agent)
        agent.hang.touch()
        wait_for(lambda: agent.events("nvml_timeout"), "the hung read", agent)
        hung_at = notify.count("WATCHDOG=1")
        wait_for(lambda: len(agent.events("nvml_still_hung")) >= 5, "ticks while hung", agent)
        assert notify.count("WATCHDOG=1") == hung_at  # ticks go on, the watchdog is not fed
        agent.hang.unlink()
        wait_for(lambda: notify.count("WATCHDOG=1") >= hung_at + 2, "watchdogs once NVML answers", agent)
        assert agent.stop() == 0, agent.output()
    finally:
        agent.stop()
        notify.close()


def test_reload_keeps_the_old_rules_on_a_broken_file_and_applies_a_valid_one(tmp_path):
    (tmp_path / "rules.d").mkdir()
    keep = CAP_RULE.format(watts=500).replace("pack: site", "pack: keep").replace("warm_cap", "steady_cap")
    (tmp_path / "rules.d" / "keep.yaml").write_text(keep)  # unchanged by both reloads
    notify = Notifications(abstract=False)
    agent = Agent(tmp_path, notify)
    try:
        wait_for(lambda: any(e["to_w"] == 400 for e in agent.events("power_limit_set")), "the 400 W cap", agent)
        agent.rule_file.write_text(CAP_RULE.format(watts=400).replace("gpu.temp_c > 50", "gpu.temp_c >> 50"))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: len(agent.events("reload_rejected")) >= 2, "the rejection", agent)
        assert any("site.yaml" in e.get("error", "") for e in agent.events("reload_rejected"))
        ticks = len(agent.events("power_limit_set"))
        agent.rule_file.write_text(CAP_RULE.format(watts=300))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: any(e["to_w"] == 300 for e in agent.events("power_limit_set")), "the new 300 W cap", agent)
        sets = agent.events("power_limit_set")
        assert all(e["to_w"] == 400 for e in sets[:ticks])  # the old rule held while the file was broken
        wait_for(lambda: notify.count("WATCHDOG=1") >= 15, "ticks after the reloads", agent)
        assert agent.stop() == 0, agent.output()
    finally:
        agent.stop()
        notify.close()
    firing = [(e["rule"], e["gpu"]) for e in agent.events("rule_firing")]
    assert firing.count(("steady_cap", 0)) == firing.count(("steady_cap", 1)) == 1  # kept its state
    assert firing.count(("warm_cap", 0)) == 2  # kept across the rejected reload, afresh once changed
    assert agent.events("reloaded")[-1]["rule_states_kept"] == 1
    store = Store(tmp_path / "state" / "store.sqlite")
    stamps = sorted(int(line.rsplit(" ", 1)[1]) for line in store.query(measurement="agent"))
    store.close()
    gaps = [(b - a) / 1e9 for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) > 10 and max(gaps) < 3 * INTERVAL_S  # no gap in the stored ticks


@pytest.mark.integration
def test_sigterm_restores_the_gpus_keeps_unsent_data_and_the_next_start_ships_it(tmp_path, services, influx1_db):
    dead = f'[influx]\nurl = "http://127.0.0.1:9"\napi = "v1"\nbucket = "{influx1_db}"\ntimeout = 1.0\n'
    agent = Agent(tmp_path, influx=dead)
    try:
        wait_for(lambda: any(e["to_w"] == 400 for e in agent.events("power_limit_set")), "the cap", agent)
        wait_for(lambda: len(agent.events("rule_firing")) >= 2 and agent.tmp.joinpath("state").exists(), "ticks", agent)
        assert agent.stop() == 0, agent.output()
    finally:
        agent.stop()
    assert agent.nvml()["limits_mw"] == [700_000, 700_000]
    store = Store(tmp_path / "state" / "store.sqlite")
    unsent = store.backlog()
    gpu_points = len(store.query(measurement="gpu"))
    store.close()
    assert unsent > 0 and gpu_points > 0
    live = f'[influx]\nurl = "{services.influxdb1_url}"\napi = "v1"\nbucket = "{influx1_db}"\n'
    again = Agent(tmp_path, influx=live)
    try:
        wait_for(lambda: services.influx1_count("gpu", influx1_db) >= gpu_points, "the old backlog in InfluxDB",
                 again)
        assert again.stop() == 0, again.output()
    finally:
        again.stop()
