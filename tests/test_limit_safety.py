"""Power-limit safety of the whole node (rules -> composition -> ramp -> actuator) on the fake NVML.

Each test asserts on every write the daemon *attempted* (``FakeGpu.attempts``), not on what the
fake happened to accept: the daemon must never change a limit that nothing it owns asks to change.
"""

import asyncio
import json
import subprocess
import sys
import textwrap

import structlog
from click.testing import CliRunner

from agentd.actuator import ORIGINALS_FILE, ORPHAN_MAX_AGE_S, RETRY_MIN_S, Actuator
from agentd.cli import main
from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.nvml import NvmlBackend
from tests.fake_pynvml import FakeNvml, install

HOT_RULE = """
pack: test
rules:
  - name: hot
    scope: gpu
    when: gpu.temp_c > 80
    for: 0s
    clear_for: 0s
    severity: warning
    actions:
      - {type: cap_gpu, watts: 400}
  - name: warm
    scope: gpu
    when: gpu.temp_c > 70
    for: 0s
    clear_for: 0s
    severity: info
    actions:
      - {type: cap_gpu, watts: 600}
"""


def make_daemon(tmp_path, fake, *, dry_run=False, clock=None):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "hot.yaml").write_text(HOT_RULE)
    cfg = AgentConfig.model_validate({
        "backend": "nvml", "state_dir": str(tmp_path), "node": "n1", "dry_run": dry_run,
        "rules": {"builtin_packs": False, "dirs": [str(rules_dir)], "ramp_w_per_s": 10_000, "hold_s": 0}})
    return Daemon(cfg, NvmlBackend(fake), open_store(cfg), clock=clock or FakeClock())


async def ticks(daemon, n=1):
    for _ in range(n):
        await daemon.tick()
        daemon.clock.advance(1.0)


def originals(tmp_path):
    path = tmp_path / ORIGINALS_FILE
    return json.loads(path.read_text())["gpus"] if path.exists() else {}


async def test_an_operator_raise_is_never_undone_when_no_rule_fires(tmp_path):
    """The review's reproduction: 500 W at start, `nvidia-smi -pl 700`, nothing fires."""
    fake = FakeNvml.with_gpus(2, limit_mw=500_000)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    await ticks(daemon, 3)
    fake.gpus[0].limit_mw = 700_000  # the operator raises GPU 0
    await ticks(daemon, 10)
    assert [g.attempts for g in fake.gpus] == [[], []]
    assert daemon.actuator.controls[0].baseline_w == 700.0
    await daemon.shutdown()
    assert [g.attempts for g in fake.gpus] == [[], []] and fake.gpus[0].limit_mw == 700_000


async def test_a_raise_while_capped_is_the_new_baseline_and_the_cap_is_reapplied(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=500_000, temp_c=85)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    await ticks(daemon)
    assert fake.gpus[0].attempts == [400_000]
    assert originals(tmp_path)[fake.gpus[0].uuid]["limit_w"] == 500.0
    fake.gpus[0].limit_mw = 700_000  # the operator's raise, while the rule still asks for 400 W
    await ticks(daemon)
    assert fake.gpus[0].attempts == [400_000, 400_000]  # something we own still asks: re-applied
    assert originals(tmp_path)[fake.gpus[0].uuid]["limit_w"] == 700.0  # a crash restores the new one
    fake.gpus[0].temp_c = 50
    await ticks(daemon, 2)
    assert fake.gpus[0].attempts == [400_000, 400_000, 700_000]  # released to the operator's 700
    assert originals(tmp_path) == {}
    await daemon.shutdown()
    assert len(fake.gpus[0].attempts) == 3  # nothing held at stop: nothing to restore


async def test_a_gpu_reset_while_capped_reapplies_the_cap_and_releases_to_the_default(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=600_000, default_limit_mw=700_000, temp_c=85)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    await ticks(daemon)
    fake.gpus[0].limit_mw = fake.gpus[0].default_limit_mw  # nvidia-smi -r: the driver default is back
    await ticks(daemon)
    assert fake.gpus[0].attempts == [400_000, 400_000]
    fake.gpus[0].temp_c = 75  # only "warm" (600 W) now
    await ticks(daemon)
    fake.gpus[0].temp_c = 50
    await ticks(daemon)
    assert fake.gpus[0].attempts == [400_000, 400_000, 600_000, 700_000]


async def test_an_outside_value_below_the_cap_is_kept_and_nothing_is_written(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=700_000, temp_c=85)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    await ticks(daemon)
    fake.gpus[0].limit_mw = 300_000  # someone holds it lower than our 400 W
    await ticks(daemon, 3)
    fake.gpus[0].temp_c = 50
    await ticks(daemon, 3)
    await daemon.shutdown()
    assert fake.gpus[0].attempts == [400_000] and fake.gpus[0].limit_mw == 300_000


async def test_stop_returns_each_gpu_to_its_latest_baseline(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=500_000, temp_c=85)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    await ticks(daemon)
    fake.gpus[0].limit_mw = 650_000
    await ticks(daemon)  # cap re-applied over the operator's 650
    await daemon.shutdown()
    assert fake.gpus[0].attempts == [400_000, 400_000, 650_000] and not originals(tmp_path)


async def test_dry_run_reports_targets_but_no_written_limit(tmp_path):
    fake = FakeNvml.with_gpus(1, temp_c=85)
    daemon = make_daemon(tmp_path, fake, dry_run=True)
    await daemon.start()
    await ticks(daemon, 2)
    gpu_lines = daemon.store.query(measurement="gpu")
    events = daemon.store.query(measurement="throttle_event")
    assert fake.gpus[0].attempts == []
    assert all("limit_target_w=400" in line and "limit_set_w" not in line for line in gpu_lines)
    firing = [e for e in events if 'state="firing"' in e and "rule=hot" in e]
    assert firing and "limit_target_w=400" in firing[0] and "limit_w=" not in firing[0]


async def test_a_dry_run_start_after_a_crash_says_which_caps_are_left(tmp_path):
    fake = FakeNvml.with_gpus(2, limit_mw=700_000)
    backend = NvmlBackend(fake)
    backend.open()
    Actuator(backend, tmp_path).apply({0: 300.0}, {s.index: s for s in backend.sample(0)})  # then kill -9
    fake.gpus[0].attempts.clear()
    daemon = make_daemon(tmp_path, fake, dry_run=True)
    with structlog.testing.capture_logs() as logs:
        await daemon.start()
        await ticks(daemon, 3)
    left = [e for e in logs if e["event"] == "limits_left_from_last_run"]
    assert len(left) == 1 and left[0]["gpu"] == 0 and left[0]["holds_w"] == 300.0
    assert left[0]["baseline_w"] == 700.0 and "agentd restore-limits" in left[0]["hint"]
    assert left[0]["log_level"] == "warning"
    assert [g.attempts for g in fake.gpus] == [[], []]


async def test_a_refused_write_backs_off_is_counted_and_logged_once(tmp_path, monkeypatch):
    fake = FakeNvml.with_gpus(1, temp_c=85)
    fake.gpus[0].errors["nvmlDeviceSetPowerManagementLimit"] = fake.NVML_ERROR_NOT_SUPPORTED
    saves = []
    original_save = Actuator._save_originals
    monkeypatch.setattr(Actuator, "_save_originals", lambda self: (saves.append(1), original_save(self))[1])
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    with structlog.testing.capture_logs() as logs:
        await ticks(daemon, 20)  # 20 s of a GPU that refuses every write
    attempts = fake.gpus[0].attempts
    # retries at 0, +5, +10 (15 s), +20 (35 s): three within 20 s, not twenty
    assert len(attempts) == 3 and RETRY_MIN_S == 5.0
    assert len(saves) <= 2 * len(attempts)  # the originals file is not rewritten every tick
    assert [e["event"] for e in logs].count("power_limit_write_failed") == 1
    agent = daemon.store.query(measurement="agent")[-1]
    assert "limit_write_errors=3i" in agent and "write_errors=0i" in agent


async def test_one_failing_rule_does_not_silence_the_others(tmp_path):
    fake = FakeNvml.with_gpus(2, temp_c=85)
    daemon = make_daemon(tmp_path, fake)
    await daemon.start()
    compiled = next(c for c in daemon.controller.engine._rules if c.name == "warm")

    def boom(g, n, w):
        raise ZeroDivisionError("a site rule's bug")

    compiled.when_fn = boom
    with structlog.testing.capture_logs() as logs:
        await ticks(daemon, 3)
    assert [g.attempts for g in fake.gpus] == [[400_000], [400_000]]  # "hot" still protects
    health = daemon.controller.engine.health["warm"]
    assert not health.healthy and "ZeroDivisionError" in health.last_error and health.errors == 3
    assert daemon.controller.engine.health["hot"].healthy
    assert [e["event"] for e in logs].count("rule_failed") == 1
    assert "rule_errors=3i" in daemon.store.query(measurement="agent")[-1]


def test_restore_is_by_uuid_only_and_an_absent_board_is_kept_then_dropped(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=400_000)  # a new board now sits at index 0
    backend = NvmlBackend(fake)
    backend.open()
    (tmp_path / ORIGINALS_FILE).write_text(json.dumps({"GPU-swapped-out": {"index": 0, "limit_w": 650.0}}))
    clock = FakeClock()
    act = Actuator(backend, tmp_path, wall=lambda: clock.wall_ns() / 1e9)
    act.load_originals()
    outcome = act.restore({fake.gpus[0].uuid: 0})
    assert outcome["GPU-swapped-out"].startswith("kept: GPU not present")
    assert fake.gpus[0].attempts == [] and "GPU-swapped-out" in originals(tmp_path)
    clock.advance(ORPHAN_MAX_AGE_S - 60)
    assert act.restore({fake.gpus[0].uuid: 0})["GPU-swapped-out"].startswith("kept")
    clock.advance(120)
    assert act.restore({fake.gpus[0].uuid: 0})["GPU-swapped-out"].startswith("dropped")
    assert originals(tmp_path) == {} and fake.gpus[0].attempts == []


def test_restore_goes_on_after_a_gpu_whose_write_raises_something_unexpected(tmp_path):
    fake = FakeNvml.with_gpus(2, limit_mw=700_000)

    class FloatPassing(NvmlBackend):  # a future bug: a float reaching the strict c_uint
        def set_power_limit(self, index, limit_w):
            if index == 0:
                self._nv.nvmlDeviceSetPowerManagementLimit(self._nv.nvmlDeviceGetHandleByIndex(0), limit_w * 1000)
            super().set_power_limit(index, limit_w)

    plain = NvmlBackend(fake)
    plain.open()
    Actuator(plain, tmp_path).apply({0: 300.0, 1: 300.0}, {s.index: s for s in plain.sample(0)})
    backend = FloatPassing(fake)
    backend.open()
    act = Actuator(backend, tmp_path)
    act.load_originals()
    outcome = act.restore({g.uuid: i for i, g in enumerate(fake.gpus)})
    assert outcome[fake.gpus[0].uuid].startswith("failed") and outcome[fake.gpus[1].uuid] == "restored 700 W"
    assert fake.gpus[1].limit_mw == 700_000 and list(originals(tmp_path)) == [fake.gpus[0].uuid]


def test_restore_limits_forget_drops_a_record_and_orphans_do_not_fail_the_command(tmp_path):
    fake = FakeNvml.with_gpus(1, limit_mw=400_000)
    (tmp_path / ORIGINALS_FILE).write_text(json.dumps({"GPU-gone": {"index": 0, "limit_w": 650.0}}))
    config = tmp_path / "agentd.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    with install(fake):
        kept = CliRunner().invoke(main, ["restore-limits", "--config", str(config)], env={})
        assert kept.exit_code == 0, kept.output
        assert "GPU-gone: kept" in kept.output and "--forget GPU-gone" in kept.output
        unknown = CliRunner().invoke(main, ["restore-limits", "--config", str(config), "--forget", "GPU-x"], env={})
        assert unknown.exit_code == 2 and "no record for GPU-x" in unknown.output
        forgot = CliRunner().invoke(main, ["restore-limits", "--config", str(config), "--forget", "GPU-gone"],
                                    env={})
    assert forgot.exit_code == 0 and "forgot GPU-gone" in forgot.output
    assert originals(tmp_path) == {} and fake.gpus[0].attempts == []


def test_a_backend_hung_at_start_does_not_keep_the_process_alive(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, threading
        from agentd.config import AgentConfig
        from agentd.daemon import Daemon, open_store
        from collectors.sim import SimBackend

        class Hung(SimBackend):
            def open(self):
                threading.Event().wait()  # a driver that never answers

        cfg = AgentConfig.model_validate({{"backend": "sim", "state_dir": {str(tmp_path)!r},
                                          "nvml_timeout": 0.05}})
        daemon = Daemon(cfg, Hung(gpus=1), open_store(cfg))
        try:
            asyncio.run(daemon.start())
        except Exception as exc:
            print("start failed:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "start failed" in done.stdout and "did not initialise" in done.stdout


def test_the_nvml_worker_runs_calls_in_order_and_reports_errors():
    from agentd.worker import SerialWorker

    async def main_():
        worker = SerialWorker("t")
        loop = asyncio.get_running_loop()
        order = []
        results = await asyncio.gather(*(loop.run_in_executor(worker, lambda k=k: order.append(k) or k)
                                         for k in range(20)))
        try:
            await loop.run_in_executor(worker, lambda: 1 / 0)
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("the error was not handed back")
        worker.shutdown(wait=True)
        return order, results, worker.alive

    order, results, alive = asyncio.run(main_())
    assert order == list(range(20)) and results == list(range(20)) and not alive


def test_a_version_1_originals_file_from_gpu_agentd_0_1_is_restored(tmp_path):
    """The fixture is what 0.1 wrote (a bare uuid -> record map) after capping GPU 0 from 650 W."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "fixtures/state/original_limits_v1.json", tmp_path / ORIGINALS_FILE)
    fake = FakeNvml.with_gpus(1, limit_mw=300_000)
    backend = NvmlBackend(fake)
    backend.open()
    act = Actuator(backend, tmp_path)
    assert act.load_originals()[fake.gpus[0].uuid]["limit_w"] == 650.0
    assert act.restore({fake.gpus[0].uuid: 0}) == {fake.gpus[0].uuid: "restored 650 W"}
    assert fake.gpus[0].limit_mw == 650_000 and not (tmp_path / ORIGINALS_FILE).exists()


def test_an_originals_file_from_a_newer_version_is_refused_and_left_alone(tmp_path):
    import pytest

    text = json.dumps({"version": 99, "gpus": {}})
    (tmp_path / ORIGINALS_FILE).write_text(text)
    fake = FakeNvml.with_gpus(1)
    with pytest.raises(OSError, match="format version 99 is newer"):
        Actuator(NvmlBackend(fake), tmp_path).load_originals()
    assert (tmp_path / ORIGINALS_FILE).read_text() == text
