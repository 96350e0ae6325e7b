"""Closed loop on the simulator with the shipped packs, on the fake clock: a simulated Xid 79 on
GPU 3 of eight -> GPU 3 fails, the drain advice fires, the other seven keep reporting, and the
event is in the store and the log; an uncorrectable ECC error that a GPU reset clears.

The loop is tests/scenario.py's (the CDU takes the node's heat, its readings go through the
coolant parser, the GPUs run on its supply temperature), with GPU faults given to the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from structlog.testing import capture_logs

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.cdu_sim import CduModel, parse_fault, subscription_for
from collectors.lineproto_parse import ParsedLine, parse_lines
from collectors.sim import SimBackend
from tests.scenario import NODES_PER_CDU, OTHER_NODE_W

GPUS = 8


@dataclass
class Tick:
    t_s: float
    health: dict[int, str | None]
    firing: set[tuple[str, int | None]]
    advice: dict[str, list[str]]


@dataclass
class HealthRun:
    daemon: Daemon
    logs: list[dict]
    ticks: list[Tick] = field(default_factory=list)

    def points(self, measurement: str) -> list[ParsedLine]:
        out = []
        for line in self.daemon.store.query(measurement=measurement):
            (p,) = parse_lines(line)
            assert isinstance(p, ParsedLine), p
            out.append(p)
        return out


async def run(tmp: Path, gpu_faults: list[str], seconds: int) -> HealthRun:
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp), "node": "scenario", "interval": 1.0,
        "sim": {"gpus": GPUS, "profile": "training", "seed": 1},
        "coolant": {"subscriptions": [subscription_for("json")]}, "rules": {"dirs": []},
    })
    clock = FakeClock()
    backend = SimBackend(gpus=GPUS, seed=1, profile="training", faults=[parse_fault(f) for f in gpu_faults])
    daemon = Daemon(cfg, backend, open_store(cfg), clock=clock)
    await daemon.start()
    cdu = CduModel(seed=1)
    with capture_logs() as logs:
        result = HealthRun(daemon, logs)
        for k in range(seconds + 1):
            gpu_w = sum((s.power_w or 0.0) for s in daemon.state.gpus.values() if s.healthy)
            cdu.step(1.0 if k else 0.0, NODES_PER_CDU * (gpu_w + OTHER_NODE_W))
            daemon.coolant.handle_batch(cdu.messages(clock.wall_ns()))
            backend.coolant_supply_c = cdu.tcs_supply_c
            await daemon.tick()
            step = daemon.last_step
            assert step is not None
            result.ticks.append(Tick(float(k), {i: s.health for i, s in daemon.state.gpus.items()},
                                     {i.key for i in step.evaluation.firing()},
                                     {a: list(r) for a, r in step.evaluation.advice.items()}))
            clock.advance(1.0)
    return result


async def test_xid79_on_one_gpu_of_eight_fails_it_drains_and_the_others_keep_reporting(tmp_path):
    r = await run(tmp_path, ["xid79:3@30"], 90)
    before, after = r.ticks[:30], r.ticks[30:]
    assert all(set(t.health.values()) == {"ok"} and not t.firing for t in before)  # no false alarm
    for t in after:  # at once (for: 0s), and for as long as the GPU is gone
        assert t.health == {i: ("fail" if i == 3 else "ok") for i in range(GPUS)}, t
        assert t.firing == {("gpu_health_fail", 3)} and t.advice == {"drain": ["gpu_health_fail"]}, t

    # the other seven keep reporting every tick; GPU 3's last gpu point is the one before the fault
    gpu_points = r.points("gpu")
    per_gpu = {i: sorted(p.ts for p in gpu_points if p.tags["gpu"] == str(i)) for i in range(GPUS)}
    t0 = per_gpu[0][0]
    for i in range(GPUS):
        assert len(per_gpu[i]) == (30 if i == 3 else 91), i
    assert per_gpu[3][-1] == t0 + 29 * 10**9

    # the event in the store: the Xid with the catalogue's action, the loss, the health change
    events = [p for p in r.points("gpu_event") if p.tags["gpu"] == "3"]
    assert {p.tags["kind"] for p in r.points("gpu_event")} == {"xid", "gpu_lost", "health"}  # GPU 3's only
    (xid,) = [p for p in events if p.tags["kind"] == "xid"]
    assert xid.ts == t0 + 30 * 10**9 and xid.tags["uuid"].startswith("GPU-") and xid.tags["host"] == "scenario"
    assert (xid.fields["xid"], xid.fields["action"], xid.fields["severity"]) == (79, "drain_node", "critical")
    health = [p for p in r.points("gpu_health") if p.tags["gpu"] == "3" and p.fields["state"] == "fail"]
    assert health and health[0].fields["level"] == 2 and health[0].fields["xid_last"] == 79
    assert health[0].fields["reasons"].startswith("Xid 79: GPU has fallen off the bus")
    firing = [p for p in r.points("throttle_event") if p.fields["state"] == "firing"]
    assert [(p.tags["rule"], p.tags["gpu"], p.tags["severity"]) for p in firing] == [("gpu_health_fail", "3",
                                                                                       "critical")]
    agent = max(r.points("agent"), key=lambda p: p.ts)
    assert agent.fields["gpus_failed"] == 1 and agent.fields["gpus_warned"] == 0 and agent.fields["gpu_events"] == 2

    # and the log
    xid_logs = [e for e in r.logs if e["event"] == "gpu_xid"]
    assert len(xid_logs) == 1 and xid_logs[0]["log_level"] == "error"
    assert (xid_logs[0]["gpu"], xid_logs[0]["xid"], xid_logs[0]["action"]) == (3, 79, "drain_node")
    assert "reboot" in xid_logs[0]["hint"]
    assert [e["gpu"] for e in r.logs if e["event"] == "rule_firing"] == [3]
    await r.daemon.shutdown()


async def test_an_uncorrectable_error_fails_the_gpu_until_the_reset_then_the_drain_releases(tmp_path):
    r = await run(tmp_path, ["ecc_dbe:0@10+20"], 100)  # reset at 30 s (the volatile count back to 0)
    at = {int(t.t_s): t for t in r.ticks}
    assert at[9].health[0] == "ok" and at[10].health[0] == "fail" and at[29].health[0] == "fail"
    assert at[10].advice == {"drain": ["gpu_health_fail"]}
    assert at[30].health[0] == "ok" and ("gpu_health_fail", 0) in at[30].firing  # clear_for: 1 min
    assert ("gpu_health_fail", 0) in at[89].firing and at[90].firing == set() and at[90].advice == {}
    kinds = [p.tags["kind"] for p in r.points("gpu_event")]
    assert kinds.count("counter_reset") == 1 and kinds.count("ecc_dbe") == 1
    assert [e["event"] for e in r.logs if e["event"] == "gpu_counter_reset"] == ["gpu_counter_reset"]
    await r.daemon.shutdown()
