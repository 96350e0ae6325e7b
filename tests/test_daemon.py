"""The tick on an injected clock: store contents, fixed-rate schedule, hung and failing backends."""

import asyncio
import threading

import pytest

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.store import StoreError
from collectors.base import GpuSample
from collectors.sim import SimBackend


def make_cfg(tmp_path, **over) -> AgentConfig:
    data = {"backend": "sim", "state_dir": str(tmp_path), "node": "n1", "interval": 1.0,
            "sim": {"gpus": 4}} | over
    return AgentConfig.model_validate(data)


async def run_ticks(cfg, backend, ticks, clock=None):
    clock = clock or FakeClock()
    daemon = Daemon(cfg, backend, open_store(cfg), clock=clock)
    await daemon.start()
    await daemon.run(asyncio.Event(), max_ticks=ticks)
    return daemon


async def test_every_tick_stores_one_point_per_gpu_and_one_agent_point(tmp_path):
    cfg = make_cfg(tmp_path)
    clock = FakeClock()
    t0 = clock.wall_ns()
    daemon = await run_ticks(cfg, SimBackend(gpus=4), 30, clock)
    assert daemon.stats.ticks == 30 and daemon.stats.ticks_missed == 0
    store = open_store(cfg)
    gpu_lines = store.query(measurement="gpu")
    agent_lines = store.query(measurement="agent")
    store.close()
    assert len(gpu_lines) == 4 * 30 and len(agent_lines) == 30
    # fixed rate on the injected clock: tick k at t0 + k s
    stamps = sorted({int(line.rsplit(" ", 1)[1]) for line in agent_lines})
    assert stamps == [t0 + k * 10**9 for k in range(30)]
    first = sorted(gpu_lines)[0]
    assert first.startswith("gpu,gpu=0,host=n1,model=Simulated\\ H200,uuid=GPU-")
    assert "power_w=" in first and "clock_reasons=" in first and "throttled=" in first


class HangingBackend(SimBackend):
    """A backend whose sample blocks until released, as a wedged NVML call would."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.release = threading.Event()
        self.hang_on_call = 3
        self.calls = 0

    def sample(self, ts_ns):
        self.calls += 1
        if self.calls == self.hang_on_call:
            self.release.wait(10)
        return super().sample(ts_ns)


async def test_a_hung_nvml_call_skips_readings_but_never_stalls_the_tick(tmp_path):
    cfg = make_cfg(tmp_path, nvml_timeout=0.05)
    backend = HangingBackend(gpus=2)
    daemon = Daemon(cfg, backend, open_store(cfg), clock=FakeClock())
    await daemon.start()
    for _ in range(2):
        await daemon.tick()
    await daemon.tick()  # this read hangs: times out after nvml_timeout
    await daemon.tick()  # the worker is still stuck: skipped at once, counted
    assert daemon.stats.nvml_errors == 2 and backend.calls == 3
    backend.release.set()
    await asyncio.wait_for(asyncio.shield(daemon._inflight), 10)  # the stuck call returns
    assert not daemon.nvml_busy
    await daemon.tick()
    assert daemon.stats.ticks == 5
    store = daemon.store
    assert len(store.query(measurement="gpu")) == 2 * 3  # ticks 1, 2 and 5
    assert len(store.query(measurement="agent")) == 5  # self-telemetry every tick
    await daemon.shutdown()


class OneGpuLost(SimBackend):
    """GPU 1 fails on calls 3, 4 and 5, then comes back."""

    calls = 0

    def sample(self, ts_ns):
        out = super().sample(ts_ns)
        if 3 <= self.calls < 6:
            bad = out[1]
            out[1] = GpuSample(index=bad.index, uuid=bad.uuid, model=bad.model, ts_ns=ts_ns,
                               healthy=False, error="GPU is lost")
        self.calls += 1
        return out


async def test_an_unhealthy_gpu_is_left_out_and_counted_while_the_others_report(tmp_path):
    cfg = make_cfg(tmp_path)
    backend = OneGpuLost(gpus=3)
    daemon = await run_ticks(cfg, backend, 8)
    store = open_store(cfg)
    lines = store.query(measurement="gpu")
    per_gpu = {g: sum(1 for line in lines if f",gpu={g}," in line) for g in range(3)}
    store.close()
    assert per_gpu == {0: 8, 1: 5, 2: 8}
    assert daemon.stats.nvml_errors == 3  # one per unreadable GPU per tick


async def test_a_backend_exception_is_counted_and_the_daemon_keeps_ticking(tmp_path):
    class Broken(SimBackend):
        def sample(self, ts_ns):
            raise RuntimeError("driver bug")

    daemon = await run_ticks(make_cfg(tmp_path), Broken(gpus=1), 5)
    assert daemon.stats.ticks == 5 and daemon.stats.nvml_errors == 5


async def test_an_overrunning_tick_skips_missed_slots(tmp_path):
    cfg = make_cfg(tmp_path, interval=0.1)
    clock = FakeClock()

    class Slow(SimBackend):
        def sample(self, ts_ns):
            clock.advance(0.35)  # a tick that takes 3.5 intervals
            return super().sample(ts_ns)

    daemon = await run_ticks(cfg, Slow(gpus=1), 4, clock)
    assert daemon.stats.ticks == 4 and daemon.stats.ticks_missed == 4 * 3


def test_unusable_state_dir_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(StoreError) as err:
        open_store(make_cfg(not_a_dir / "sub"))
    assert str(not_a_dir / "sub") in str(err.value)


async def test_a_failing_store_is_counted_and_protection_keeps_acting(tmp_path):
    """Disk full: telemetry cannot be kept, but the rules still cap the GPUs and stop restores."""
    from agentd.store import StoreError

    cfg = make_cfg(tmp_path, sim={"gpus": 2, "coolant_supply_c": 60.0})
    backend = SimBackend(gpus=2, coolant_supply_c=60.0)  # hot water: the GPUs run into slowdown
    daemon = Daemon(cfg, backend, open_store(cfg), clock=FakeClock())
    await daemon.start()

    def full(lines):
        raise StoreError(f"store {daemon.store.path}: append failed: database or disk is full")

    daemon.store.append = full
    await daemon.run(asyncio.Event(), max_ticks=300)
    assert daemon.stats.store_errors == 300 and daemon.stats.ticks == 300
    assert backend.writes and min(w for _, w in backend.writes) < 700  # capped
    assert backend.limits_w() == {0: 700.0, 1: 700.0}  # restored at stop


async def test_rule_transitions_on_several_gpus_in_one_tick_are_distinct_points(tmp_path):
    cfg = make_cfg(tmp_path, sim={"gpus": 4, "coolant_supply_c": 60.0})
    await run_ticks(cfg, SimBackend(gpus=4, coolant_supply_c=60.0), 200)
    store = open_store(cfg)
    events = store.query(measurement="throttle_event")
    store.close()
    pending = [e for e in events if "rule=gpu_near_slowdown" in e and 'state="pending"' in e]
    series = {e.split(" ")[0] for e in pending}
    assert len(pending) == 4 and len(series) == 4  # one per GPU, tagged gpu=0..3


def test_a_bad_site_rule_file_stops_agentd_run_with_a_located_error(tmp_path):
    from click.testing import CliRunner

    from agentd.cli import main

    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "site.yaml").write_text(
        "rules:\n  - name: hot\n    scope: gpu\n    when: gpu.tmp_c > 80\n    actions: [{type: event}]\n")
    config = tmp_path / "agentd.toml"
    config.write_text(f'backend = "sim"\nstate_dir = "{tmp_path}"\n[rules]\ndirs = ["{rules_d}"]\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config)], env={})
    assert result.exit_code == 2
    assert "site.yaml" in result.output and "unknown signal 'gpu.tmp_c'" in result.output
