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

Health: every sample carries the health counters a healthy Hopper board reports (ECC counts
zero, no remap pending or failed, PCIe replays zero, 18 NVLinks without errors; no retired pages,
which Ampere and later replaced by row remapping), so the daemon's health tracker says ``ok``.
GPU faults (``faults``: ``collectors.cdu_sim.Fault`` of the kinds in ``GPU_FAULT_KINDS``, each on
one GPU) play what the driver would show:

* ``xid<N>``: an ``xid`` event at the start; ``xid79`` (fallen off the bus) then makes the GPU
  unreadable (unhealthy samples and a ``gpu_lost`` event, as NvmlBackend gives for GPU_IS_LOST);
* ``ecc_dbe``: an uncorrectable error: the volatile and aggregate DBE counts rise, a row remap is
  pending, and ``ecc_dbe``, Xid 48 and Xid 63 events arrive;
* ``ecc_sbe``: corrected errors rise by ``SBE_PER_S`` a second, with an ``ecc_sbe`` event a tick;
* ``row_remap_pending`` (with Xid 63) and ``row_remap_failure``: the flags are set.

A fault with a duration ends as a GPU reset would: the GPU reads again (``gpu_recovered``), the
volatile ECC counts restart at zero and the pending remap is done (the end of a
``row_remap_failure`` stands for a serviced board). Faults are played on the
``ts_ns`` of ``sample`` (seconds since the first sample), so they are as deterministic as the rest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from collectors.base import BackendEvent, GpuInfo, GpuSample, NvlinkErrors
from collectors.cdu_sim import GPU_FAULT_KINDS, Fault, is_gpu_kind

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
NVLINKS = 18  # an H100 / H200 SXM board
SBE_PER_S = 10.0  # corrected ECC errors a second during an ecc_sbe fault
_CLEAN_LINKS = tuple(NvlinkErrors(k, 0, 0, 0, 0) for k in range(NVLINKS))  # immutable, shared


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
    # health counters, as NVML reports them (see the module docstring)
    sbe_volatile: float = 0.0
    dbe_volatile: int = 0
    sbe_aggregate: float = 0.0
    dbe_aggregate: int = 0
    remap_correctable: int = 0
    remap_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    lost: str | None = None  # why, while the GPU has fallen off the bus


@dataclass(slots=True)
class _FaultRun:
    """One GPU fault and how far it has been played."""

    fault: Fault
    gpu: int
    started: bool = False
    ended: bool = False


class SimBackend:
    """A node of simulated GPUs with the GpuBackend interface (see ``collectors.base``)."""

    def __init__(self, gpus: int = 8, seed: int = 1, profile: Profile = "training",
                 coolant_supply_c: float = 30.0, model: str = "Simulated H200",
                 demand_fn: DemandFn | None = None, speed_fn: SpeedFn | None = None,
                 faults: Sequence[Fault] = ()) -> None:
        if gpus < 1:
            raise ValueError("gpus must be at least 1")
        for f in faults:
            if not is_gpu_kind(f.kind):
                raise ValueError(f"fault {f.kind!r} is not a GPU fault (those are {', '.join(GPU_FAULT_KINDS)}); "
                                 "CDU faults go to collectors.cdu_sim.CduModel")
            if f.gpu is None or not 0 <= f.gpu < gpus:
                raise ValueError(f"fault {f.kind}:{f.target}: no GPU {f.target} on this node of {gpus} GPUs "
                                 f"(the target is a GPU index, 0-{gpus - 1})")
        self._faults = [_FaultRun(f, f.gpu) for f in faults if f.gpu is not None]
        self._events: list[BackendEvent] = []
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
        self._start_ts_ns = None
        self._events = []
        for run in self._faults:
            run.started = run.ended = False
        return [g.info for g in self._gpus]

    def close(self) -> None:
        """Nothing to release; kept for the interface."""

    def drain_events(self) -> list[BackendEvent]:
        """The events the GPU faults raised since the last call (simulated GPUs never fail on
        their own)."""
        events, self._events = self._events, []
        return events

    def event_stats(self) -> dict[str, int]:
        """Nothing to count: the simulated faults raise their events directly, unbounded by a
        queue (the ``agent`` point's ``gpu_events`` counts them)."""
        return {}

    def _play_faults(self, t_s: float, dt_s: float, ts_ns: int) -> None:
        """Start, continue and end the GPU faults at ``t_s`` seconds since the first sample."""
        for run in self._faults:
            f, gpu = run.fault, self._gpus[run.gpu]
            if run.ended or t_s < f.start_s:
                continue
            if not run.started:
                run.started = True
                self._start_fault(run, gpu, ts_ns)
            elif f.kind == "ecc_sbe" and f.active(t_s):
                self._corrected(gpu, SBE_PER_S * dt_s, ts_ns)
            if not f.active(t_s):
                run.ended = True
                self._end_fault(run, gpu, ts_ns)

    def _event(self, gpu: _SimGpu, ts_ns: int, kind: str, message: str, xid: int | None = None) -> None:
        self._events.append(BackendEvent(ts_ns, gpu.info.index, kind, message, xid=xid))

    def _corrected(self, gpu: _SimGpu, count: float, ts_ns: int) -> None:
        gpu.sbe_volatile += count
        gpu.sbe_aggregate += count
        self._event(gpu, ts_ns, "ecc_sbe", f"corrected ECC errors on GPU {gpu.info.index} (simulated)")

    def _start_fault(self, run: _FaultRun, gpu: _SimGpu, ts_ns: int) -> None:
        f, i = run.fault, gpu.info.index
        if f.xid is not None:
            self._event(gpu, ts_ns, "xid", f"simulated Xid {f.xid} on GPU {i}", xid=f.xid)
            if f.xid == 79:
                gpu.lost = "GPU has fallen off the bus (simulated Xid 79)"
                self._event(gpu, ts_ns, "gpu_lost", f"GPU {i} ({gpu.info.uuid}) cannot be read: {gpu.lost}")
        elif f.kind == "ecc_dbe":
            gpu.dbe_volatile += 1
            gpu.dbe_aggregate += 1
            gpu.remap_uncorrectable += 1
            gpu.remap_pending = True
            self._event(gpu, ts_ns, "ecc_dbe", f"uncorrectable ECC error on GPU {i} (simulated)")
            self._event(gpu, ts_ns, "xid", f"simulated Xid 48 on GPU {i}", xid=48)
            self._event(gpu, ts_ns, "xid", f"simulated Xid 63 on GPU {i}", xid=63)
        elif f.kind == "ecc_sbe":
            self._corrected(gpu, SBE_PER_S, ts_ns)
        elif f.kind == "row_remap_pending":
            gpu.remap_correctable += 1
            gpu.remap_pending = True
            self._event(gpu, ts_ns, "xid", f"simulated Xid 63 on GPU {i}", xid=63)
        elif f.kind == "row_remap_failure":
            gpu.remap_failure = True

    def _end_fault(self, run: _FaultRun, gpu: _SimGpu, ts_ns: int) -> None:
        """The fault's end: what a GPU reset leaves (the volatile ECC counts restart at zero, the
        pending remap is done); a remap failure's end stands for a serviced board."""
        if gpu.lost is not None:
            gpu.lost = None
            self._event(gpu, ts_ns, "gpu_recovered", f"GPU {gpu.info.index} ({gpu.info.uuid}) reads again")
        gpu.sbe_volatile = 0.0
        gpu.dbe_volatile = 0
        gpu.remap_pending = False
        if run.fault.kind == "row_remap_failure":
            gpu.remap_failure = False

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
        if self._faults:
            self._play_faults(t_s, dt_s, ts_ns)
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
            if gpu.lost is not None:  # fallen off the bus: nothing answers (its physics go on unseen)
                out.append(GpuSample(index=info.index, uuid=info.uuid, model=info.model, ts_ns=ts_ns,
                                     healthy=False, error=gpu.lost))
                continue
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
                ecc_sbe_volatile=int(gpu.sbe_volatile), ecc_dbe_volatile=gpu.dbe_volatile,
                ecc_sbe_aggregate=int(gpu.sbe_aggregate), ecc_dbe_aggregate=gpu.dbe_aggregate,
                remap_correctable_rows=gpu.remap_correctable, remap_uncorrectable_rows=gpu.remap_uncorrectable,
                remap_pending=gpu.remap_pending, remap_failure=gpu.remap_failure, nvlink=_CLEAN_LINKS,
                pcie_replay=0,
            ))
        return out
