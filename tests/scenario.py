"""Closed-loop harness: the real Daemon on simulated GPUs coupled to a simulated CDU, on a fake
clock. Each tick: the CDU takes the node's heat, its readings go through the coolant parser, the
GPUs' thermal model takes the CDU's TCS supply temperature, and the daemon ticks (rules,
actuator, store). Minutes of plant time run in well under a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.cdu_sim import CduModel, parse_fault, subscription_for
from collectors.sim import SimBackend

NODES_PER_CDU = 12  # the CDU cools a row; our node is one of twelve alike
OTHER_NODE_W = 2_000.0  # CPUs, NICs, fans of a node besides its GPUs


@dataclass
class Frame:
    t_s: float
    limits_w: dict[int, float]
    temps_c: dict[int, float]
    firing: set[tuple[str, int | None]]
    advice: dict[str, list[str]]
    tcs_supply_c: float
    tcs_flow_lpm: float
    leak: str


@dataclass
class Run:
    daemon: Daemon
    backend: SimBackend
    cdu: CduModel
    clock: FakeClock
    frames: list[Frame] = field(default_factory=list)

    def limit_series(self, gpu: int) -> list[float]:
        return [f.limits_w[gpu] for f in self.frames]


async def run_scenario(state_dir: Path, faults: list[str], seconds: float, *, interval_s: float = 1.0,
                       gpus: int = 8, profile: str = "training", dry_run: bool = False, seed: int = 1,
                       garbage: int = 0, cdu_kwargs: dict | None = None, rules: dict | None = None) -> Run:
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(state_dir), "node": "scenario", "interval": interval_s,
        "dry_run": dry_run, "sim": {"gpus": gpus, "profile": profile, "seed": seed},
        "coolant": {"subscriptions": [subscription_for("json")]},
        "rules": {"dirs": []} | (rules or {}),
    })
    clock = FakeClock()
    backend = SimBackend(gpus=gpus, seed=seed, profile=profile)
    daemon = Daemon(cfg, backend, open_store(cfg), clock=clock)
    await daemon.start()
    cdu = CduModel(seed=seed, faults=[parse_fault(f) for f in faults], garbage_per_step=garbage,
                   **(cdu_kwargs or {}))
    run = Run(daemon, backend, cdu, clock)
    for _ in range(int(seconds / interval_s)):
        gpu_w = sum((s.power_w or 0.0) for s in daemon.state.gpus.values() if s.healthy)
        cdu.step(interval_s, NODES_PER_CDU * (gpu_w + OTHER_NODE_W))
        daemon.coolant.handle_batch(cdu.messages(clock.wall_ns()))
        backend.coolant_supply_c = cdu.tcs_supply_c
        await daemon.tick()
        step = daemon.last_step
        run.frames.append(Frame(
            t_s=cdu.t_s,
            limits_w=backend.limits_w(),
            temps_c={i: g.temp_c for i, g in daemon.state.gpus.items()},
            firing={i.key for i in step.evaluation.firing()} if step else set(),
            advice={k: list(v) for k, v in step.evaluation.advice.items()} if step else {},
            tcs_supply_c=cdu.tcs_supply_c, tcs_flow_lpm=cdu.tcs_flow_lpm, leak=cdu.leak,
        ))
        clock.advance(interval_s)
    return run
