"""Simulated GPUs: the backend behind ``agentd demo``, the scenario tests and site simulations.

Each GPU draws the power its workload asks for, clipped at its power limit; its temperature
follows a first-order model driven by the coolant supply temperature; its energy counter
integrates power. Time comes from the ``ts_ns`` of each ``sample`` call, never from the machine,
so a simulation over an injected clock is as deterministic as its seed.

Numbers are H100/H200-like (700 W max, 200 W min). They are a plausible plant for closed-loop
tests, not a calibrated model of any product.

A site simulation gives each GPU its own demand curve instead of a profile (``demand_fn``:
``(gpu index, ts_ns) -> W``, e.g. ``agentd.site.workload``), and its own model of what a cap
costs in clock speed (``speed_fn``: ``(limit_w, demand_w) -> fraction of full speed``), so the
clocks a capped GPU reports (what a node's demand estimate reads) follow the same model that
scores the run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from collectors.base import BackendEvent, GpuInfo, GpuSample

Profile = Literal["idle", "training", "inference"]
DemandFn = Callable[[int, int], float]  # (gpu index, ts_ns) -> W the GPU would draw uncapped
SpeedFn = Callable[[float, float], float]  # (limit_w, demand_w) -> share of full speed kept

MAX_W = 700.0
MIN_W = 200.0
IDLE_W = 70.0
SM_CLOCK_MAX_MHZ = 1980.0
THERMAL_R_C_PER_W = 0.05  # steady-state rise over coolant supply: 700 W -> +35 C
THERMAL_TAU_S = 20.0
MEM_OFFSET_C = 6.0
TRAINING_PERIOD_S = 10.0  # one compute phase + one all-reduce dip, in step on every GPU
TRAINING_DIP_S = 2.0

_REASON_IDLE = 0x1
_REASON_SW_POWER_CAP = 0x4
_REASON_HW_SLOWDOWN = 0x8
_REASON_SW_THERMAL = 0x20


@dataclass(slots=True)
class _SimGpu:
    info: GpuInfo
    rng: random.Random
    limit_w: float
    temp_c: float
    power_w: float = IDLE_W
    energy_j: float = 0.0
    burst_until_s: float = 0.0
    burst_w: float = 0.0


class SimBackend:
    """A node of simulated GPUs with the GpuBackend interface (see ``collectors.base``)."""

    def __init__(self, gpus: int = 8, seed: int = 1, profile: Profile = "training",
                 coolant_supply_c: float = 30.0, model: str = "Simulated H200",
                 demand_fn: DemandFn | None = None, speed_fn: SpeedFn | None = None) -> None:
        if gpus < 1:
            raise ValueError("gpus must be at least 1")
        self.demand_fn = demand_fn  # replaces the profile when set
        self.speed_fn = speed_fn
        self.profile: Profile = profile
        self.coolant_supply_c = coolant_supply_c
        self._seed = seed
        self._count = gpus
        self._model = model
        self._gpus: list[_SimGpu] = []
        self._last_ts_ns: int | None = None
        self._start_ts_ns: int | None = None
        # for tests: (index, watts) of every set_power_limit call, as passed and before any check,
        # and of the writes that were accepted
        self.attempts: list[tuple[int, float]] = []
        self.writes: list[tuple[int, float]] = []

    def open(self) -> list[GpuInfo]:
        master = random.Random(self._seed)
        self._gpus = []
        for index in range(self._count):
            uuid = f"GPU-5151{self._seed:04x}-{index:04x}-4000-8000-{master.getrandbits(48):012x}"
            info = GpuInfo(index=index, uuid=uuid, model=self._model, limit_min_w=MIN_W,
                           limit_max_w=MAX_W, limit_default_w=MAX_W, slowdown_c=87.0,
                           shutdown_c=92.0, gpu_max_c=85.0, mem_max_c=95.0)
            rng = random.Random(master.getrandbits(64))
            self._gpus.append(_SimGpu(info=info, rng=rng, limit_w=MAX_W,
                                      temp_c=self.coolant_supply_c + IDLE_W * THERMAL_R_C_PER_W))
        self._last_ts_ns = None
        return [g.info for g in self._gpus]

    def close(self) -> None:
        """Nothing to release; kept for the interface."""

    def drain_events(self) -> list[BackendEvent]:
        """Simulated GPUs never fail on their own."""
        return []

    def set_power_limit(self, index: int, limit_w: float) -> None:
        """Refuses what NvmlBackend refuses, with the same exception types: ValueError for an
        unknown index or a limit outside [MIN_W, MAX_W] (NaN and infinities included)."""
        self.attempts.append((index, limit_w))
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no GPU with index {index} (this node has {len(self._gpus)})")
        if not MIN_W <= limit_w <= MAX_W:  # also refuses NaN
            raise ValueError(f"GPU {index}: power limit {limit_w} W is outside the device's range "
                             f"[{MIN_W:g}, {MAX_W:g}] W")
        self._gpus[index].limit_w = float(limit_w)
        self.writes.append((index, float(limit_w)))

    def limits_w(self) -> dict[int, float]:
        """The limit each simulated GPU holds right now (what a write changed, before any read)."""
        return {g.info.index: g.limit_w for g in self._gpus}

    def _demand_w(self, gpu: _SimGpu, t_s: float) -> float:
        noise = gpu.rng.gauss(0.0, 8.0)
        if self.profile == "idle":
            return IDLE_W + noise * 0.3
        if self.profile == "training":
            in_dip = (t_s % TRAINING_PERIOD_S) >= TRAINING_PERIOD_S - TRAINING_DIP_S
            return (260.0 if in_dip else 690.0) + noise
        # inference: independent bursts per GPU
        if t_s >= gpu.burst_until_s and gpu.rng.random() < 0.15:
            gpu.burst_until_s = t_s + gpu.rng.uniform(0.5, 4.0)
            gpu.burst_w = gpu.rng.uniform(300.0, 620.0)
        return (gpu.burst_w if t_s < gpu.burst_until_s else 95.0) + noise

    def sample(self, ts_ns: int) -> list[GpuSample]:
        if self._start_ts_ns is None:
            self._start_ts_ns = ts_ns
        dt_s = 0.0 if self._last_ts_ns is None else max(0.0, (ts_ns - self._last_ts_ns) / 1e9)
        self._last_ts_ns = ts_ns
        t_s = (ts_ns - self._start_ts_ns) / 1e9
        out = []
        demand_fn = self.demand_fn
        for gpu in self._gpus:
            if demand_fn is not None:
                demand = min(MAX_W, max(0.0, float(demand_fn(gpu.info.index, ts_ns))))
            else:
                demand = max(IDLE_W * 0.8, self._demand_w(gpu, t_s))
            power = min(demand, gpu.limit_w)
            gpu.energy_j += 0.5 * (gpu.power_w + power) * dt_s
            gpu.power_w = power
            steady_c = self.coolant_supply_c + power * THERMAL_R_C_PER_W
            gpu.temp_c += (steady_c - gpu.temp_c) * (1.0 - math.exp(-dt_s / THERMAL_TAU_S))
            reasons = 0
            clock = SM_CLOCK_MAX_MHZ
            if demand > gpu.limit_w:
                reasons |= _REASON_SW_POWER_CAP
                if self.speed_fn is not None:
                    clock *= self.speed_fn(gpu.limit_w, demand)
                else:
                    clock *= (gpu.limit_w / demand) ** 0.5
            if demand < IDLE_W * 1.5:
                reasons |= _REASON_IDLE
                clock = 345.0
            if gpu.info.slowdown_c is not None and gpu.temp_c >= gpu.info.slowdown_c:
                reasons |= _REASON_HW_SLOWDOWN | _REASON_SW_THERMAL
                clock *= 0.6
            util = min(100.0, max(0.0, 100.0 * (demand - IDLE_W) / (MAX_W - IDLE_W)))
            busy = self.profile != "idle" if demand_fn is None else demand >= IDLE_W * 1.5
            info = gpu.info
            out.append(GpuSample(
                index=info.index, uuid=info.uuid, model=info.model, ts_ns=ts_ns,
                power_w=round(power, 3), power_avg_w=round(power, 3), energy_j=round(gpu.energy_j, 3),
                temp_c=round(gpu.temp_c, 2), mem_temp_c=round(gpu.temp_c + MEM_OFFSET_C, 2),
                limit_w=gpu.limit_w, limit_current_w=gpu.limit_w, limit_default_w=info.limit_default_w,
                limit_min_w=info.limit_min_w, limit_max_w=info.limit_max_w,
                slowdown_c=info.slowdown_c, shutdown_c=info.shutdown_c, gpu_max_c=info.gpu_max_c,
                mem_max_c=info.mem_max_c, util_pct=round(util, 1), mem_util_pct=round(util * 0.6, 1),
                mem_used_bytes=int(80e9 if busy else 1e9),
                sm_clock_mhz=round(clock, 0), clock_reasons=reasons,
            ))
        return out
