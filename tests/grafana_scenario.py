"""A small simulated site for the Grafana boards and ``agentd plot``: real code writing real points.

Two nodes (``node-a``, ``node-b``), each the real ``agentd.daemon.Daemon`` on simulated GPUs with
``[budget]`` on, both cooled by one simulated CDU (``collectors.cdu_sim``, fed in-process as
``agentd demo`` does), budgeted by the real ``ControllerCore`` over the in-process bus the site
simulation uses, with the real ``JobLedger`` metering jobs on their GPUs. Each rack's manifold also
reports its TCS supply over line protocol, with a ``point`` tag. Everything runs on
fake clocks (minutes in seconds); each node's store is shipped by the real forwarder to a real
InfluxDB when the caller gives one.

Domains: ``site`` (6 kW) -> ``rack-a`` (2.2 kW: holds node-a below its demand, so node-a is
capped) and ``rack-b`` (700 W: below node-b's four 200 W minimums, so rack-b is over its cap
for the whole run, a shortfall the controller publishes).

The timeline (seconds; ``TIMELINE``), what an on-call SRE would be shown:

* 30..50 garbage on the coolant topics (bad messages counted by reason);
* 60..360 hot facility water: TCS supply climbs, ``tcs_supply_hot`` caps; with the site's
  ``gpu_slowdown_margin_c`` the GPU rules fire on the hottest GPUs (limits in the events);
* 120..800 node-a cannot reach InfluxDB (its forwarder does not ship: the backlog grows);
* 400..460 node-b's NVML answers slowly (2.5 s per reading): ticks are missed;
* 600.. GPU 3 of node-a is lost (unhealthy: no ``gpu`` points, ``gpu_info`` says why);
* 660.. a leak on the TCS loop: Warning, then Critical 30 s later (drain, caps to the minimum);
* 720.. node-b is gone (no more ticks: offline).

What ``agentd.daemon`` does not write yet is added the way the lead wires it (``Wired``): the
``gpu_info`` lines (``agentd.gpu_info.GpuInfoWriter``), the ``coolant_loop`` lines
(``CoolantIngest.loop_lines``) and ``agent.ticks_missed``; each only when the daemon's own
tick did not already produce it, so the harness turns into a no-op once the wiring lands.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.gpu_info import GpuInfoWriter
from agentd.job_ledger import JobLedger
from agentd.lineproto import encode
from agentd.points import FieldValue
from agentd.site.bus import InProcessBus
from agentd.site.controller_cli import build_core
from agentd.site.controller_config import load_controller_config
from agentd.site.node import REPORT_QOS
from agentd.site.protocol import load_site_key
from agentd.store import Store
from collectors.base import GpuSample
from collectors.cdu_sim import CduModel, parse_fault, subscription_for
from collectors.jobs import GpuJobs, JobRef
from collectors.sim import SimBackend
from rules.domains import load_domains

SITE = "lab"
NODES = ("node-a", "node-b")
GPUS = 4
INTERVAL_S = 1.0
SHIP_EVERY_S = 10.0
CDU_NODES = 12  # the CDU cools a row of nodes like ours
OTHER_NODE_W = 2_000.0
START_WALL_NS = 1_767_225_600 * 10**9  # FakeClock's default epoch (2026-01-01T00:00:00Z)

TIMELINE = {
    "garbage": (30, 50), "hot_facility": (60, 360), "outage_a": (120, 800), "slow_b": (400, 460),
    "gpu_lost_a": (600, None), "leak": (660, None), "offline_b": (720, None),
}
FAULTS = ["garbage@30+20", "hot_facility@60+300", "leak@660"]
DOMAINS = {"version": 1, "site": SITE, "domains": {
    "site": {"cap_w": 6000}, "rack-a": {"parent": "site", "cap_w": 2200, "nodes": ["node-a"]},
    "rack-b": {"parent": "site", "cap_w": 700, "nodes": ["node-b"]}}}
# The W32 plant of the simulated CDU (as agentd demo) and a site margin that makes the GPU rules
# act in the hot-water phase, so throttle events carry per-GPU limits.
PARAMS = {"tcs_supply_max_c": 35, "tcs_flow_rated_lpm": 140, "gpu_slowdown_margin_c": 26}


# Each rack's manifold sends line protocol (Telegraf style) with a `point` tag, next to the CDU's json.
MANIFOLD_SUBSCRIPTION = {"topic": "telegraf/manifold/+", "format": "influx", "topic_tags": {"unit": 2},
                         "tags": {"loop": "tcs"}}


def manifold_messages(cdu: CduModel, wall_ns: int) -> list[tuple[str, bytes]]:
    """The rack manifolds' readings: the CDU's TCS supply a little warmer after the piping."""
    out = []
    for k, rack in enumerate(("rack-a", "rack-b")):
        supply = cdu.tcs_supply_c + 0.3 + 0.1 * k
        # no flow: a rack's share of the CDU's flow would read as low flow against the CDU's rating
        line = (f"coolant,point=manifold supply_temp_c={supply:.2f},return_temp_c={cdu.tcs_return_c - 0.2:.2f},"
                f"quality=1 {wall_ns}")
        out.append((f"telegraf/manifold/{rack}", line.encode()))
    return out


def jobs_at(node: str, t_s: float) -> dict[int, GpuJobs]:
    """Which job each GPU runs at ``t_s``: node-a runs Slurm job 1001 on GPUs 0-1 for the whole
    run and 1002 on GPUs 2-3 until 480 s, then a Kubernetes pod; node-b runs job 2001 on all."""
    if node == "node-a":
        second = JobRef("slurm", "1002") if t_s < 480 else JobRef("k8s", "7f6e2a10-93d1-4c55-9d1e-0c7b5e1f2a33")
        refs = {0: JobRef("slurm", "1001"), 1: JobRef("slurm", "1001"), 2: second, 3: second}
    else:
        refs = {i: JobRef("slurm", "2001") for i in range(GPUS)}
    return {i: GpuJobs(jobs=(ref,), via={ref: "cgroup"}) for i, ref in refs.items()}


def class_of(ref: JobRef) -> str:
    return {"1001": "high", "2001": "low"}.get(ref.id, "normal")


class FaultySim(SimBackend):
    """The simulator with the two faults it has no switch for: a GPU that is lost from
    ``lost_from_s`` (an unhealthy sample, as NvmlBackend gives for GPU_IS_LOST) and readings
    that take ``slow_s`` of the node's clock during ``slow`` (a driver answering slowly)."""

    def __init__(self, clock: FakeClock, *, lost: tuple[int, float] | None = None,
                 slow: tuple[float, float] | None = None, slow_s: float = 2.5, **kw: Any) -> None:
        super().__init__(**kw)
        self.clock = clock
        self.lost = lost
        self.slow = slow
        self.slow_s = slow_s
        self.t0_ns = clock.wall_ns()

    def sample(self, ts_ns: int) -> list[GpuSample]:
        out = super().sample(ts_ns)
        t_s = (ts_ns - self.t0_ns) / 1e9
        if self.slow is not None and self.slow[0] <= t_s < self.slow[1]:
            self.clock.advance(self.slow_s)
        if self.lost is not None and t_s >= self.lost[1]:
            out = [GpuSample(index=s.index, uuid=s.uuid, model=s.model, ts_ns=ts_ns, healthy=False,
                             error="NVMLError_GpuIsLost: GPU is lost") if s.index == self.lost[0] else s
                   for s in out]
        return out


class Wired(Daemon):
    """The daemon plus the wiring the lead adds to ``agentd.daemon`` (module docstring)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gpu_info = GpuInfoWriter(self.host)
        self.extra_lines: list[tuple[int, str]] = []  # the job ledger's, stored in the next tick's commit

    def _store(self, lines: list[tuple[int, str]]) -> None:
        text = [line for _, line in lines]
        ts_ns = self.clock.wall_ns()
        if not any(line.startswith("gpu_info,") for line in text):
            lines.extend(self.gpu_info.lines(self.state.infos, list(self.state.gpus.values()),
                                             self.clock.monotonic(), ts_ns))
        if not any(line.startswith("coolant_loop,") for line in text):
            lines.extend(self.coolant.loop_lines(ts_ns))
        lines.extend(self.extra_lines)
        self.extra_lines = []
        super()._store(lines)

    def _agent_fields(self) -> dict[str, FieldValue]:
        fields = super()._agent_fields()
        fields.setdefault("ticks_missed", self.stats.ticks_missed)
        return fields


@dataclass
class SimNode:
    name: str
    clock: FakeClock
    daemon: Wired
    backend: FaultySim
    ledger: JobLedger
    stopped: bool = False


@dataclass
class SiteRun:
    """What ran: the nodes, the controller's store, and the wall-clock span of the data."""

    nodes: dict[str, SimNode]
    controller_store: Store
    start_ns: int
    end_ns: int
    shipped: dict[str, int] = field(default_factory=dict)  # points forwarded, per store

    def close(self) -> None:
        for node in self.nodes.values():
            node.daemon.store.close()
        self.controller_store.close()


Ship = Callable[[str, Store], Awaitable[int]]  # (store name, store) -> points shipped


def _node_config(tmp: Path, name: str, domains_file: Path, key_file: Path) -> AgentConfig:
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    return AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(state), "node": name, "site": SITE, "interval": INTERVAL_S,
        "sim": {"gpus": GPUS, "seed": 7},
        # the link is built (budget needs [mqtt]) but never run: no broker in this harness
        "mqtt": {"host": "127.0.0.1"},
        "coolant": {"subscriptions": [subscription_for("json"), MANIFOLD_SUBSCRIPTION]},
        "rules": {"dirs": [], "params": PARAMS},
        "budget": {"enabled": True, "failsafe_w": 1400, "site_key_file": str(key_file),
                   "domains_file": str(domains_file)},
    })


async def run_site(tmp: Path, *, seconds: float = 900.0, ship: Ship | None = None,
                   start_wall_ns: int = START_WALL_NS, nodes: tuple[str, ...] = NODES) -> SiteRun:
    """Run the site for ``seconds`` (module docstring); ``ship`` forwards a store (every
    ``SHIP_EVERY_S`` and at the end; node-a's not during its outage)."""
    tmp.mkdir(parents=True, exist_ok=True)
    domains_file = tmp / "domains.yaml"
    domains_file.write_text(yaml.safe_dump(DOMAINS))
    key_file = tmp / "site.key"
    key_file.write_text(random.Random(13).randbytes(32).hex())
    key_file.chmod(0o600)
    key = load_site_key(key_file)  # what the nodes read from the same file
    bus = InProcessBus()
    run_nodes: dict[str, SimNode] = {}
    for i, name in enumerate(nodes):
        clock = FakeClock(start_wall_ns=start_wall_ns)
        cfg = _node_config(tmp, name, domains_file, key_file)
        backend = FaultySim(clock, gpus=GPUS, seed=7 + i,
                            lost=(3, TIMELINE["gpu_lost_a"][0]) if name == "node-a" else None,
                            slow=TIMELINE["slow_b"] if name == "node-b" else None)
        daemon = Wired(cfg, backend, open_store(cfg), clock=clock)
        await daemon.start()
        assert daemon.site is not None
        site = daemon.site
        lease_filter, _ = site.subscription()
        bus.subscribe(lease_filter, lambda topic, payload, s=site, c=clock: s.on_lease(topic, payload, c.wall_ns() / 1e9))
        run_nodes[name] = SimNode(name, clock, daemon, backend, JobLedger(name, energy_interval_s=60.0))
    settings = load_controller_config({"id": "ctl-1", "site": SITE, "interval": INTERVAL_S})
    core = build_core(load_domains(domains_file), settings, SITE, key, rng=random.Random(5))
    for topic_filter, _qos in core.subscriptions():
        bus.subscribe(topic_filter, lambda topic, payload: core.on_message(topic, payload, wall_s()))
    controller_store = Store(tmp / "controller.sqlite")
    cdu = CduModel(site=SITE, unit="cdu-1", seed=3, faults=[parse_fault(f) for f in FAULTS])
    ticks = int(round(seconds / INTERVAL_S))
    clock0 = FakeClock(start_wall_ns=start_wall_ns)  # the site's schedule (the controller's clock)
    mono0 = clock0.monotonic()

    def wall_s() -> float:
        return clock0.wall_ns() / 1e9

    run = SiteRun(run_nodes, controller_store, start_wall_ns, start_wall_ns)
    for k in range(ticks):
        t_s = k * INTERVAL_S
        clock0.advance(mono0 + t_s - clock0.monotonic())
        gpu_w = sum(s.power_w or 0.0 for n in run_nodes.values() if not n.stopped
                    for s in n.daemon.state.gpus.values() if s.healthy)
        cdu.step(INTERVAL_S if k else 0.0, CDU_NODES / len(run_nodes) * (gpu_w + OTHER_NODE_W * len(run_nodes)))
        messages = cdu.messages(clock0.wall_ns()) + manifold_messages(cdu, clock0.wall_ns())
        for node in run_nodes.values():
            if node.name == "node-b" and t_s >= TIMELINE["offline_b"][0]:
                node.stopped = True
            if node.stopped:
                continue
            d = node.daemon
            behind = node.clock.monotonic() - (mono0 + t_s)
            if behind > 1e-9:  # the last tick is still running at this slot: missed, as Daemon.run counts
                d.stats.ticks_missed += 1
                continue
            node.clock.advance(-behind)
            d.coolant.handle_batch(messages)
            node.backend.coolant_supply_c = cdu.tcs_supply_c
            await d.tick()
            site_step = d.last_site
            if site_step is not None and site_step.publish is not None:
                bus.publish(*site_step.publish, qos=REPORT_QOS)
            step, points = node.ledger.step(list(d.state.gpus.values()), jobs_at(node.name, t_s), class_of,
                                            node.clock.wall_ns())
            d.job_classes = step.classes_by_gpu
            d.extra_lines = [(p.ts_ns, line) for p in points if (line := encode(p)) is not None]
        bus.deliver()
        result = core.cycle(wall_s())
        for m in result.publish:
            bus.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
        bus.deliver()
        controller_store.append([(p.ts_ns, line) for p in result.points if (line := encode(p)) is not None])
        if ship is not None and k and k % int(SHIP_EVERY_S / INTERVAL_S) == 0:
            await _ship_all(run, ship, t_s)
        run.end_ns = clock0.wall_ns()
    if ship is not None:
        await _ship_all(run, ship, None)
    return run


async def _ship_all(run: SiteRun, ship: Ship, t_s: float | None) -> None:
    """Forward every store; node-a's not while its outage lasts (``t_s`` None: at the end, all)."""
    lo, hi = TIMELINE["outage_a"]
    for name, node in run.nodes.items():
        if t_s is not None and name == "node-a" and lo <= t_s < hi:
            continue
        run.shipped[name] = run.shipped.get(name, 0) + await ship(name, node.daemon.store)
    run.shipped["controller"] = run.shipped.get("controller", 0) + await ship("controller", run.controller_store)


def main(argv: list[str]) -> int:
    """``python -m tests.grafana_scenario --plot FILE.png``: node-a's store after the 15-minute
    scenario (ending a minute ago) drawn by ``agentd plot``; how docs/img/agentd-plot.png is made."""
    import asyncio
    import sys
    import tempfile
    import time

    from click.testing import CliRunner

    from agentd.plot_cli import plot_command

    if len(argv) != 2 or argv[0] != "--plot":
        print("usage: python -m tests.grafana_scenario --plot FILE.png", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agentd-scenario-") as tmp:
        start = (time.time_ns() // 10**9 - 900 - 60) * 10**9
        run = asyncio.run(run_site(Path(tmp) / "site", seconds=900.0, start_wall_ns=start))
        state = run.nodes["node-a"].daemon.cfg.state_dir
        run.close()
        cfg = Path(tmp) / "agentd.toml"
        cfg.write_text(f'state_dir = "{state}"\nnode = "node-a"\n')
        result = CliRunner().invoke(plot_command, ["--config", str(cfg), "--since", "1h", "--out", argv[1]])
    print(result.output, end="", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
