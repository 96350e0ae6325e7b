"""The site simulation: N simulated nodes and the real controller, and the figures that judge them.

Each simulated node runs the REAL node control path, in the daemon's order (``agentd.daemon``'s
``_control``): the simulated GPUs are read (``collectors.sim.SimBackend``, each GPU following its
own demand curve from ``agentd.site.workload``), ``Actuator.observe`` tracks the baselines,
``NodeSite.step`` gives the budget (the minimum of the live leases, or the failsafe) and the
power report, ``Controller.step`` composes the budget with the shipped rule packs and ramps it,
and ``Actuator.plan`` / ``write`` set the limits on the simulated GPUs. Only the GPUs (and the
jobs on them) are simulated. The controller is the real ``ControllerCore``, built as
``agentd controller`` builds it (``controller_cli.build_core`` from a ``ControllerConfig``),
with its signed leases.

Two transports, one schedule. Time is cut into ticks (``tick_s``) of ``slots`` slots; each node
ticks once per tick, in its own slot (nodes are spread over the slots, as real nodes are not in
phase); the controller cycles in its own slot; the site is measured once per tick at the last
slot, after that slot's nodes ticked (the instant power: each GPU draws ``min(demand, limit)``).

* ``run_sim_time``: the in-process bus (``agentd.site.bus.InProcessBus``) on a simulated clock.
  Messages are delivered at once after each slot (a network with no latency): fast and
  deterministic, for tests, ``agentd demo --site`` and the CI variant.
* ``run_broker``: a real MQTT broker in real time. All nodes share one connection
  (``SharedMqttBus``); the controller runs ``ControllerService`` (its MQTT layer) on its own
  connection and its own 1 s timer.

The scenario (``SiteScenario``; defaults as in issue 10): the site cap is ``cap_fraction`` of the
site's mean uncapped demand after the step; before the step (``warmup_s``) some jobs have not
started and the site draws ``warmup_load`` of its cap; at the step they start, and demand is
``1 / cap_fraction`` of the cap (125 %). What is measured, from the step to the end:

* ``over_cap_s``: seconds (ticks x ``tick_s``) whose site power is above the cap;
* ``overshoot_pct``: the largest excess over the cap (% of the cap) seen after the first second
  of an excursion (a breaker or UPS rides a short one; one that lasts is what trips);
* ``hp_kept_pct``: the high-priority GPUs' throughput, % of uncapped (``workload.speed_fraction``
  per GPU per tick, on its limit and its demand);
* ``vs_uniform_pp``: aggregate throughput (GPUs running a job) minus that of a uniform static
  per-GPU cap U on the same demand traces, in percentage points; U is the highest cap under
  which the site never exceeds its cap in the window (``uniform_cap_w``);
* ``reversals_per_30s``: direction changes (a rise after a fall, or a fall after a rise) of each
  GPU's limit, per GPU per 30 s.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import tempfile
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from agentd.actuator import Actuator
from agentd.config import AgentConfig, MqttConfig
from agentd.control import Controller, load_rules
from agentd.site import topics
from agentd.site.bus import InProcessBus, SharedMqttBus, Transport
from agentd.site.controller import ControllerCore
from agentd.site.node import REPORT_QOS, NodeSite
from agentd.site.workload import CLASSES, JOB_CLASSES, Workload, WorkloadConfig, build_workload, speed_fraction
from collectors.sim import MAX_W, MIN_W, SimBackend
from rules.domains import Domains

log = structlog.get_logger("agentd.sim")

WALL0_S = 1_767_225_600.0  # the simulated clock's epoch (2026-01-01), as tests.FakeClock
MONO0_S = 1000.0
SITE_KEY_BYTES = 32


def _positive(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 (got {value!r})")
    return float(value)


@dataclass(frozen=True, slots=True)
class SiteScenario:
    """A simulated site and what happens to it (module doc). Every duration is in seconds."""

    nodes: int = 200
    gpus_per_node: int = 8
    nodes_per_rack: int = 4
    racks_per_row: int = 5
    cap_fraction: float = 0.8  # site cap / mean uncapped demand after the step
    warmup_load: float = 0.8  # mean demand before the step / the site cap
    rack_cap_fraction: float = 0.9  # rack cap / the rack's maximum (its GPUs at 700 W)
    row_cap_share: float = 1.1  # row cap / the row's share (by nodes) of the site cap
    tick_s: float = 1.0
    slots: int = 10  # per tick: nodes tick in their slot, spread over the tick
    warmup_s: float = 60.0
    after_s: float = 120.0  # measured after the step
    seed: int = 1
    site: str = "sim"
    controller_id: str = "sim-ctl"
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    controller: Mapping[str, Any] = field(default_factory=dict)  # ControllerConfig keys (interval, ...)
    ramp_w_per_s: float = 25.0  # the nodes' rules.ramp_w_per_s
    hold_s: float = 30.0  # the nodes' rules.hold_s
    class_floor_fraction: Mapping[str, float] = field(default_factory=dict)  # budget.class_floor_fraction
    rule_packs: bool = True  # the shipped rule packs run on every node (their thermal caps compose)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "nodes_per_rack", "racks_per_row", "slots"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1 (got {v!r})")
        for name in ("cap_fraction", "warmup_load", "rack_cap_fraction", "row_cap_share", "tick_s",
                     "warmup_s", "after_s", "ramp_w_per_s"):
            _positive(getattr(self, name), name)
        if self.hold_s < 0:
            raise ValueError(f"hold_s cannot be negative (got {self.hold_s!r})")
        if self.cap_fraction > 1:
            raise ValueError(f"cap_fraction must be at most 1: a cap above the demand never binds "
                             f"(got {self.cap_fraction})")
        if self.warmup_load * self.cap_fraction > 1:
            raise ValueError(f"warmup_load x cap_fraction must be at most 1 (got {self.warmup_load} x "
                             f"{self.cap_fraction}): the site cannot draw more before the step than after it")
        if self.warmup_s < 2 * self.tick_s or self.after_s < 2 * self.tick_s:
            raise ValueError("warmup_s and after_s must each hold at least two ticks")
        topics.check_level(self.site, "site")
        topics.check_level(self.controller_id, "controller id")

    @property
    def step_s(self) -> float:
        return self.warmup_s

    @property
    def duration_s(self) -> float:
        return self.warmup_s + self.after_s

    @property
    def step_load(self) -> float:
        """Demand after the step as a multiple of the cap (1.25 for the default 0.8)."""
        return 1.0 / self.cap_fraction

    def describe(self) -> list[str]:
        return [
            f"site: {self.nodes} nodes x {self.gpus_per_node} GPUs (min {MIN_W:g} W, max {MAX_W:g} W, static "
            f"{self.workload.static_w:g} W), racks of {self.nodes_per_rack} nodes (cap {self.rack_cap_fraction:.0%} "
            f"of max), rows of {self.racks_per_row} racks (cap {self.row_cap_share:.2f}x their share)",
            f"scenario: cap {self.cap_fraction:.0%} of uncapped demand; {self.warmup_s:g} s at "
            f"{self.warmup_load:.0%} of the cap, then a step to {self.step_load:.0%} of it, measured for "
            f"{self.after_s:g} s; tick {self.tick_s:g} s; seed {self.seed}",
            f"nodes: real NodeSite + Controller (ramp {self.ramp_w_per_s:g} W/s, hold {self.hold_s:g} s"
            f"{', shipped rule packs' if self.rule_packs else ''}) + Actuator on simulated GPUs",
        ]


# --- the site's layout ----------------------------------------------------------------------

def node_name(index: int, nodes_per_rack: int) -> str:
    return f"r{index // nodes_per_rack:03d}-n{index % nodes_per_rack}"


def domains_data(sc: SiteScenario, site_cap_w: float) -> dict[str, Any]:
    """The domains file (as data) of the scenario: site -> rows -> racks -> nodes."""
    node_max_w = sc.gpus_per_node * MAX_W
    racks = math.ceil(sc.nodes / sc.nodes_per_rack)
    rows = math.ceil(racks / sc.racks_per_row)
    doms: dict[str, Any] = {"site": {"cap_w": round(site_cap_w, 1), "description": "the utility feed"}}
    for r in range(rows):
        row = f"row-{r:02d}"
        row_nodes = 0
        for k in range(r * sc.racks_per_row, min(racks, (r + 1) * sc.racks_per_row)):
            names = [node_name(i, sc.nodes_per_rack)
                     for i in range(k * sc.nodes_per_rack, min(sc.nodes, (k + 1) * sc.nodes_per_rack))]
            row_nodes += len(names)
            doms[f"rack-{k:03d}"] = {"parent": row, "cap_w": round(sc.rack_cap_fraction * len(names) * node_max_w, 1),
                                     "nodes": names}
        doms[row] = {"parent": "site", "cap_w": round(sc.row_cap_share * site_cap_w * row_nodes / sc.nodes, 1)}
    return {"version": 1, "site": sc.site, "domains": doms}


def failsafe_w(domains: Domains, node: str, nodes_under: Mapping[str, int]) -> float:
    """A node's static share: the smallest of (cap / nodes) over its domains, so that the
    failsafes of all nodes sum under every cap."""
    leaf = domains.leaf_of(node)
    assert leaf is not None
    return min(domains.cap_w(d) / nodes_under[d] for d in domains.path_to_root(leaf))


# --- one simulated node -----------------------------------------------------------------------

class SimNode:
    """One node: simulated GPUs under the real NodeSite, Controller and Actuator."""

    __slots__ = ("name", "index", "base", "backend", "actuator", "controller", "site", "last_source",
                 "ticks", "writes", "last_t_s")

    def __init__(self, name: str, index: int, work: Workload, cfg: AgentConfig, domains: Domains, key: bytes,
                 rules: Any, site_time: Callable[[int], float], clock_mono: Callable[[], float],
                 clock_wall: Callable[[], float]) -> None:
        """``site_time(ts_ns)``: the site time (seconds since the run's start) of a reading's
        timestamp; read at every sample, so a run that restarts the clock (real time) is seen."""
        self.name = name
        self.index = index
        self.base = base = index * work.gpus_per_node
        demand = work.demand_w
        static_w = work.cfg.static_w
        self.last_t_s = math.nan  # the site time of the last sample (tests check the clocks agree)

        def demand_fn(i: int, ts_ns: int) -> float:
            t_s = self.last_t_s = site_time(ts_ns)
            return demand(base + i, t_s)

        self.backend = SimBackend(gpus=work.gpus_per_node, seed=index + 1, demand_fn=demand_fn,
                                  speed_fn=lambda limit, d: speed_fraction(limit, d, static_w))
        self.backend.open()
        self.actuator = Actuator(self.backend, cfg.state_dir, monotonic=clock_mono, wall=clock_wall)
        self.controller = Controller.build(rules, cfg.rules.params, rise_w_per_s=cfg.rules.ramp_w_per_s,
                                           hold_s=cfg.rules.hold_s, seed=name, interval_s=cfg.interval)
        self.site = NodeSite(cfg, domains, key)
        self.last_source = "none"
        self.ticks = 0
        self.writes = 0

    def on_lease(self, topic: str, payload: bytes, now: float) -> None:
        self.site.on_lease(topic, payload, now)

    def tick(self, mono: float, ts_ns: int, classes: Mapping[int, str]) -> tuple[str, bytes] | None:
        """One daemon tick (agentd.daemon order); returns the report to publish."""
        samples = {s.index: s for s in self.backend.sample(ts_ns)}
        baselines = self.actuator.observe(samples)
        st = self.site.step(ts_ns / 1e9, samples, baselines, classes, ts_ns=ts_ns)
        self.last_source = st.budget.source
        step = self.controller.step(mono, samples, {}, frozenset(), baselines, node_caps=[st.node_cap],
                                    classes_by_gpu=st.classes_by_gpu, floors_w=st.floors_w,
                                    demands_w=st.demands_w)
        writes = self.actuator.plan(step.limits_w, samples, step.sources)
        if writes:
            self.actuator.write(writes)
            self.writes += len(writes)
        self.ticks += 1
        return st.publish


# --- measurement ----------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    """The site at one measuring instant."""

    t_s: float
    site_w: float
    demand_w: float
    capped: dict[str, int]  # GPUs held below their maximum, per class
    over: list[str]  # domains over their cap
    failsafe_nodes: int


def uniform_level_w(demands: Sequence[float], cap_w: float, lo_w: float, hi_w: float) -> float:
    """The per-GPU cap U in [lo, hi] with sum(min(d, U)) == cap_w (hi when the demand fits, lo
    when even lo does not)."""
    if sum(demands) <= cap_w:
        return hi_w
    s = sorted(demands)
    prefix = 0.0
    n = len(s)
    for i, d in enumerate(s):
        if prefix + d * (n - i) >= cap_w:
            return min(hi_w, max(lo_w, (cap_w - prefix) / (n - i)))
        prefix += d
    return hi_w  # pragma: no cover - unreachable: sum(demands) > cap_w


@dataclass(slots=True)
class SiteResult:
    """The figures of a run (module doc), and what they were computed from."""

    nodes: int
    gpus: int
    cap_w: float
    step_s: float
    window_s: float
    over_cap_s: float
    overshoot_pct: float
    max_overshoot_pct: float
    recovery_s: float | None  # from the step to the first measurement under the cap (None: never)
    hp_kept_pct: float
    kept_pct: dict[str, float]  # per class, ours
    uniform_kept_pct: dict[str, float]  # per class, the uniform cap
    aggregate_pct: float
    uniform_pct: float
    vs_uniform_pp: float
    uniform_cap_w: float
    reversals_per_30s: float
    reversals_max: int  # the most any GPU made in the window
    pre_step_over_cap_s: float
    domains_over_cap_s: dict[str, float]  # after the step, per domain that was ever over its cap
    mean_power_pct: float  # site power after the step, mean, % of the cap
    failsafe_node_s: float  # node-seconds on the failsafe budget after the step
    extra: dict[str, Any] = field(default_factory=dict)

    def final_line(self) -> str:
        return (f"over_cap_s={self.over_cap_s:g} overshoot_pct={self.overshoot_pct:.2f} "
                f"hp_kept_pct={self.hp_kept_pct:.2f} vs_uniform_pp={self.vs_uniform_pp:+.2f} "
                f"reversals_per_30s={self.reversals_per_30s:.3f}")

    def goals(self) -> list[tuple[str, str, bool]]:
        """(figure, goal, met) for each goal of issue 10."""
        return [
            ("over_cap_s", "<= 2 s", self.over_cap_s <= 2.0),
            ("overshoot_pct", "<= 2 %", self.overshoot_pct <= 2.0),
            ("hp_kept_pct", ">= 98 %", self.hp_kept_pct >= 98.0),
            ("vs_uniform_pp", ">= +5 pp", self.vs_uniform_pp >= 5.0),
            ("reversals_per_30s", "<= 1", self.reversals_per_30s <= 1.0),
        ]

    def report_lines(self) -> list[str]:
        kept = ", ".join(f"{c} {self.kept_pct.get(c, 0):.1f} % (uniform {self.uniform_kept_pct.get(c, 0):.1f} %)"
                         for c in reversed(JOB_CLASSES))
        over = ", ".join(f"{d} {s:g} s" for d, s in sorted(self.domains_over_cap_s.items())) or "none"
        lines = [
            f"result: {self.nodes} nodes, {self.gpus} GPUs, cap {self.cap_w / 1e3:.1f} kW, "
            f"{self.window_s:g} s measured from the step at t={self.step_s:g} s",
            f"  site over cap {self.over_cap_s:g} s (before the step {self.pre_step_over_cap_s:g} s); back under "
            f"{'never' if self.recovery_s is None else f'{self.recovery_s:.1f} s'} after the step; largest excess "
            f"{self.max_overshoot_pct:.2f} %, beyond 1 s {self.overshoot_pct:.2f} %; mean power "
            f"{self.mean_power_pct:.1f} % of the cap",
            f"  domains over cap after the step: {over}",
            f"  throughput kept: {kept}; aggregate {self.aggregate_pct:.2f} % vs uniform "
            f"{self.uniform_pct:.2f} % (U = {self.uniform_cap_w:.0f} W per GPU)",
            f"  limit reversals {self.reversals_per_30s:.3f} per GPU per 30 s (most on one GPU: "
            f"{self.reversals_max}); node-seconds on failsafe {self.failsafe_node_s:g}",
        ]
        misses = [f"{name} (goal {goal})" for name, goal, ok in self.goals() if not ok]
        lines.append("  goals: " + ("all met" if not misses else "NOT met: " + ", ".join(misses)))
        return lines


class SiteRecorder:
    """Measures the site once per tick (module doc); ``result`` computes the figures."""

    def __init__(self, work: Workload, domains: Domains, names: Sequence[str], cap_w: float, step_s: float,
                 tick_s: float) -> None:
        self.work = work
        self.cap_w = cap_w
        self.step_s = step_s
        self.tick_s = tick_s
        self.static_w = work.cfg.static_w
        self.dom_names = list(domains)
        self.dom_caps = [domains.cap_w(d) for d in self.dom_names]
        idx = {d: i for i, d in enumerate(self.dom_names)}
        self.node_paths = [[idx[d] for d in domains.path_to_root(domains.leaf_of(n) or domains.root)] for n in names]
        self.gpn = work.gpus_per_node
        n = work.gpu_count
        self.samples: list[Sample] = []
        self.post_demands: list[array] = []
        self.post_classes: list[str] | None = None
        self.speed_sum = dict.fromkeys(CLASSES, 0.0)
        self.speed_n = dict.fromkeys(CLASSES, 0)
        self._last = [math.nan] * n
        self._dir = [0] * n
        self.reversals = [0] * n
        self.dom_over = [0] * len(self.dom_names)
        self.failsafe_ticks = 0

    def record(self, t_s: float, limits: Sequence[float], failsafe_nodes: int) -> Sample:
        """Measure at site time ``t_s``; ``limits`` is every GPU's limit (global index order)."""
        work = self.work
        demand_of = work.demand_w
        post = t_s >= self.step_s
        n = work.gpu_count
        demands = array("d", (demand_of(g, t_s) for g in range(n)))
        if post and self.post_classes is None:
            self.post_classes = [work.class_of(g, t_s) for g in range(n)]
        classes = self.post_classes if post and self.post_classes is not None else [
            work.class_of(g, t_s) for g in range(n)]
        dom_w = [0.0] * len(self.dom_names)
        capped = dict.fromkeys(CLASSES, 0)
        site_w = 0.0
        static_w = self.static_w
        sums, counts = self.speed_sum, self.speed_n
        gpn = self.gpn
        for node, path in enumerate(self.node_paths):
            node_w = 0.0
            for g in range(node * gpn, node * gpn + gpn):
                lim = limits[g]
                d = demands[g]
                node_w += d if d < lim else lim
                cls = classes[g]
                if lim < MAX_W - 1.0:
                    capped[cls] += 1
                if post:
                    sums[cls] += speed_fraction(lim, d, static_w)
                    counts[cls] += 1
                    last = self._last[g]
                    if last == last:  # not NaN
                        delta = lim - last
                        direction = 1 if delta > 0.5 else -1 if delta < -0.5 else 0
                        if direction:
                            if self._dir[g] and direction != self._dir[g]:
                                self.reversals[g] += 1
                            self._dir[g] = direction
                self._last[g] = lim
            site_w += node_w
            for i in path:
                dom_w[i] += node_w
        over = [self.dom_names[i] for i, w in enumerate(dom_w) if w > self.dom_caps[i] * (1 + 1e-9)]
        if post:
            self.post_demands.append(demands)
            for i, w in enumerate(dom_w):
                if w > self.dom_caps[i] * (1 + 1e-9):
                    self.dom_over[i] += 1
            self.failsafe_ticks += failsafe_nodes
        s = Sample(t_s, site_w, sum(demands), capped, over, failsafe_nodes)
        self.samples.append(s)
        return s

    def result(self, nodes: int, extra: dict[str, Any] | None = None) -> SiteResult:
        tick = self.tick_s
        cap = self.cap_w
        post = [s for s in self.samples if s.t_s >= self.step_s]
        pre = [s for s in self.samples if s.t_s < self.step_s]
        if not post:
            raise ValueError("no measurement after the step: run longer than warmup_s")
        over = [s.site_w > cap * (1 + 1e-9) for s in post]
        over_cap_s = tick * sum(over)
        recovery = next((s.t_s - self.step_s for s, o in zip(post, over) if not o), None)
        overshoot = max_over = 0.0
        run_start: float | None = None
        for s, o in zip(post, over):
            if not o:
                run_start = None
                continue
            excess = 100.0 * (s.site_w - cap) / cap
            max_over = max(max_over, excess)
            if run_start is None:
                run_start = s.t_s
            if s.t_s - run_start >= 1.0 - 1e-9:
                overshoot = max(overshoot, excess)
        # the uniform static cap on the same traces, and its throughput
        assert self.post_classes is not None
        classes = self.post_classes
        u = min(uniform_level_w(d, cap, MIN_W, MAX_W) for d in self.post_demands)
        static_w = self.static_w
        usum = dict.fromkeys(CLASSES, 0.0)
        for d in self.post_demands:
            for g, dw in enumerate(d):
                usum[classes[g]] += speed_fraction(u, dw, static_w)
        counts = self.speed_n
        kept = {c: 100.0 * self.speed_sum[c] / counts[c] for c in JOB_CLASSES if counts[c]}
        ukept = {c: 100.0 * usum[c] / counts[c] for c in JOB_CLASSES if counts[c]}
        running = sum(counts[c] for c in JOB_CLASSES) or 1
        agg = 100.0 * sum(self.speed_sum[c] for c in JOB_CLASSES) / running
        uagg = 100.0 * sum(usum[c] for c in JOB_CLASSES) / running
        window_s = tick * len(post)
        n_gpus = self.work.gpu_count
        return SiteResult(
            nodes=nodes, gpus=n_gpus, cap_w=cap, step_s=self.step_s, window_s=window_s,
            over_cap_s=over_cap_s, overshoot_pct=overshoot, max_overshoot_pct=max_over, recovery_s=recovery,
            hp_kept_pct=kept.get("high", 100.0), kept_pct=kept, uniform_kept_pct=ukept, aggregate_pct=agg,
            uniform_pct=uagg, vs_uniform_pp=agg - uagg, uniform_cap_w=u,
            reversals_per_30s=sum(self.reversals) / n_gpus / (window_s / 30.0),
            reversals_max=max(self.reversals), pre_step_over_cap_s=tick * sum(s.site_w > cap * (1 + 1e-9) for s in pre),
            domains_over_cap_s={d: tick * k for d, k in zip(self.dom_names, self.dom_over) if k},
            mean_power_pct=100.0 * sum(s.site_w for s in post) / len(post) / cap,
            failsafe_node_s=tick * self.failsafe_ticks, extra=dict(extra or {}))


def live_line(s: Sample, cap_w: float, step_s: float, domains_capping: int | None = None) -> str:
    """One line of the live summary."""
    capped = " ".join(f"{c} {s.capped[c]}" for c in reversed(CLASSES))
    phase = "warm-up" if s.t_s < step_s else f"step+{s.t_s - step_s:.0f}s"
    over = f"over cap: {','.join(s.over[:3])}{'...' if len(s.over) > 3 else ''}" if s.over else "under every cap"
    capping = f", {domains_capping} capping" if domains_capping is not None else ""
    return (f"t={s.t_s:6.1f} s {phase:>10}  site {s.site_w / 1e3:7.1f} kW of {cap_w / 1e3:.1f} "
            f"({100 * s.site_w / cap_w:5.1f} %), demand {100 * s.demand_w / cap_w:5.1f} %  {over}{capping}  "
            f"capped GPUs: {capped}  failsafe nodes {s.failsafe_nodes}")


# --- the site ---------------------------------------------------------------------------------

class SiteSim:
    """A built site: workload, domains, nodes, controller settings; run it with one of the
    ``run_*`` methods (once)."""

    def __init__(self, sc: SiteScenario, state_dir: Path, *, t0_ns: int | None = None,
                 clock_mono: Callable[[], float] | None = None, clock_wall: Callable[[], float] | None = None) -> None:
        self.sc = sc
        self.state_dir = Path(state_dir)
        horizon = sc.duration_s + 60.0
        wcfg = replace(sc.workload, step_s=sc.step_s, warmup_load=min(1.0, sc.warmup_load * sc.cap_fraction))
        self.work = build_workload(wcfg, sc.nodes, sc.gpus_per_node, sc.seed, horizon_s=horizon)
        samples = min(600, max(60, int(sc.after_s / sc.tick_s)))
        self.uncapped_w = self.work.mean_site_demand_w(sc.step_s, sc.duration_s, samples)
        self.cap_w = sc.cap_fraction * self.uncapped_w
        self.domains_data = domains_data(sc, self.cap_w)
        self.domains = Domains.from_data(self.domains_data, source="<simulated site>")
        self.names = [node_name(i, sc.nodes_per_rack) for i in range(sc.nodes)]
        under: dict[str, int] = {}
        for n in self.names:
            for d in self.domains.path_to_root(self.domains.leaf_of(n) or self.domains.root):
                under[d] = under.get(d, 0) + 1
        self.controller_settings = self._controller_settings()  # a bad setting is refused before any node
        self.key = random.Random(f"site-key-{sc.seed}").randbytes(SITE_KEY_BYTES)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key_file = self.state_dir / "site.key"
        key_file.write_bytes(self.key.hex().encode())
        key_file.chmod(0o600)
        # the clocks: simulated (run_sim_time) or real (run_broker), read through these
        self._t = 0.0  # site time, seconds since the start
        self.t0_ns = int(WALL0_S * 1e9) if t0_ns is None else t0_ns
        self._mono = clock_mono or (lambda: MONO0_S + self._t)
        self._wall = clock_wall or (lambda: self.t0_ns / 1e9 + self._t)

        def site_time(ts_ns: int) -> float:
            return (ts_ns - self.t0_ns) / 1e9
        rules = load_rules([], builtin_packs=sc.rule_packs)
        rules.rules = [r for r in rules.rules if r.scope != "coolant"]  # no coolant feed in the simulation
        self.nodes: list[SimNode] = []
        for i, name in enumerate(self.names):
            node_dir = self.state_dir / name
            node_dir.mkdir(exist_ok=True)
            cfg = AgentConfig.model_validate({
                "backend": "sim", "node": name, "site": sc.site, "state_dir": str(node_dir),
                "interval": sc.tick_s, "mqtt": {"host": "simulated"},
                "rules": {"dirs": [], "builtin_packs": sc.rule_packs, "ramp_w_per_s": sc.ramp_w_per_s,
                          "hold_s": sc.hold_s},
                "budget": {"enabled": True, "failsafe_w": round(failsafe_w(self.domains, name, under), 1),
                           "site_key_file": str(key_file),
                           "class_floor_fraction": dict(sc.class_floor_fraction)},
            })
            self.nodes.append(SimNode(name, i, self.work, cfg, self.domains, self.key, rules, site_time,
                                      lambda: self._mono(), lambda: self._wall()))
        self.recorder = SiteRecorder(self.work, self.domains, self.names, self.cap_w, sc.step_s, sc.tick_s)
        self.cycles = 0
        self.controller_running = True  # run_sim_time: False stops the cycles (a killed controller)
        self.cycle_s: list[float] = []
        self.reports_sent = 0
        self.leases_received = 0

    def _controller_settings(self) -> Any:
        from agentd.site.controller_config import load_controller_config

        data = {"id": self.sc.controller_id, "site": self.sc.site, "interval": self.sc.tick_s,
                "unseen_node_w": self.sc.gpus_per_node * MAX_W}
        data.update(self.sc.controller)
        return load_controller_config(data, source="controller")

    def make_core(self) -> ControllerCore:
        from agentd.site.controller_cli import build_core

        core: ControllerCore = build_core(self.domains, self.controller_settings, self.sc.site, self.key,
                                          rng=random.Random(f"controller-{self.sc.seed}"))
        return core

    def describe(self) -> list[str]:
        sc = self.sc
        d = self.domains
        return [
            *sc.describe(),
            *sc.workload.describe(),
            *self.work.summary(),
            f"power: uncapped demand after the step {self.uncapped_w / 1e3:.1f} kW (mean); site cap "
            f"{self.cap_w / 1e3:.1f} kW; {len(d)} domains ({sum(1 for x in d if d.is_leaf(x))} racks); node "
            f"failsafe {self.nodes[0].site.tracker.failsafe_w:g} W",
            f"controller: {self.controller_settings.id}, interval {self.controller_settings.interval_s:g} s, lease "
            f"ttl {self.controller_settings.lease_ttl_s:g} s, release {self.controller_settings.release_w_per_s:g} "
            f"W/s per node (hold {self.controller_settings.release_hold_s:g} s)",
        ]

    # -- one slot of the schedule, shared by both transports ------------------------------------

    def slot_nodes(self) -> list[list[SimNode]]:
        slots: list[list[SimNode]] = [[] for _ in range(self.sc.slots)]
        for node in self.nodes:
            slots[node.index % self.sc.slots].append(node)
        return slots

    def tick_nodes(self, nodes: Sequence[SimNode], t_s: float, bus: Transport) -> None:
        ts_ns = self.t0_ns + round(t_s * 1e9)
        mono = self._mono()
        work = self.work
        for node in nodes:
            report = node.tick(mono, ts_ns, work.classes_by_gpu(node.index, t_s))
            if report is not None:
                bus.publish(report[0], report[1], qos=REPORT_QOS)
                self.reports_sent += 1

    def measure(self, t_s: float) -> Sample:
        limits: list[float] = []
        for node in self.nodes:
            held = node.backend.limits_w()
            limits.extend(held[i] for i in range(len(held)))
        failsafe = sum(1 for node in self.nodes if node.last_source == "failsafe")
        return self.recorder.record(t_s, limits, failsafe)

    def subscribe_nodes(self, bus: Transport) -> None:
        for node in self.nodes:
            lease_filter, _qos = node.site.subscription()

            def handler(topic: str, payload: bytes, node: SimNode = node) -> None:
                self.leases_received += 1
                node.on_lease(topic, payload, self._wall())  # the clock in use now (run_broker swaps it)
            bus.subscribe(lease_filter, handler)

    def result(self, **extra: Any) -> SiteResult:
        cycles = sorted(self.cycle_s)
        if cycles:
            extra.setdefault("cycle_ms_p50", 1e3 * cycles[len(cycles) // 2])
            extra.setdefault("cycle_ms_max", 1e3 * cycles[-1])
        extra.setdefault("reports_sent", self.reports_sent)
        extra.setdefault("leases_received", self.leases_received)
        refused: dict[str, int] = {}
        for n in self.nodes:
            for reason, k in n.site.tracker.refused.items():
                refused[reason] = refused.get(reason, 0) + k
        extra.setdefault("refused_leases", sum(refused.values()))
        if refused:
            extra.setdefault("refused_by_reason", ",".join(f"{r}:{k}" for r, k in sorted(refused.items())))
        return self.recorder.result(len(self.nodes), extra)

    # -- in-process, simulated time -------------------------------------------------------------

    def run_sim_time(self, on_sample: Callable[[Sample, ControllerCore], None] | None = None,
                     bus: InProcessBus | None = None,
                     between_ticks: Callable[[float, InProcessBus, ControllerCore], None] | None = None) -> SiteResult:
        """Run the scenario on the in-process bus and the simulated clock (module doc).

        ``on_sample`` sees each measurement (the live view); ``between_ticks(t, bus, core)`` runs
        before each tick (tests inject faults there)."""
        sc = self.sc
        bus = bus or InProcessBus()
        core = self.make_core()
        for topic_filter, _qos in core.subscriptions():
            bus.subscribe(topic_filter, lambda topic, payload: core.on_message(topic, payload, self._wall()))
        self.subscribe_nodes(bus)
        slots = self.slot_nodes()
        ctl_slot = sc.slots // 2
        slot_s = sc.tick_s / sc.slots
        ticks = int(round(sc.duration_s / sc.tick_s))
        self.core = core
        for k in range(ticks):
            if between_ticks is not None:
                self._t = k * sc.tick_s
                between_ticks(self._t, bus, core)
            for j, nodes in enumerate(slots):
                self._t = k * sc.tick_s + j * slot_s
                self.tick_nodes(nodes, self._t, bus)
                bus.deliver()
                if j == ctl_slot:
                    if self.controller_running:
                        started = time.perf_counter()
                        result = core.cycle(self._wall())
                        self.cycle_s.append(time.perf_counter() - started)
                        self.cycles += 1
                        for m in result.publish:
                            bus.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                        bus.deliver()
            sample = self.measure(self._t)
            if on_sample is not None:
                on_sample(sample, core)
        return self.result(transport="in-process bus, simulated time")

    # -- a real broker, real time ---------------------------------------------------------------

    async def run_broker(self, host: str, port: int, *, on_sample: Callable[[Sample, Any], None] | None = None,
                         username: str | None = None, password: str | None = None,
                         connect_timeout_s: float = 10.0) -> SiteResult:
        """Run the scenario through the MQTT broker at ``host:port`` in real time (module doc).
        Raises ConnectionError naming the broker when it cannot be reached."""
        from agentd.site.controller_mqtt import ControllerService

        sc = self.sc
        mqtt = MqttConfig.model_validate({"host": host, "port": port, "username": username, "password": password,
                                          "queue_size": max(10_000, 4 * sc.nodes)})
        tag = f"{os.getpid()}-{random.Random().getrandbits(24):06x}"
        # the real clock, before anything can receive or send: site time 0 is set again at the
        # first tick; until then (connecting) the nodes' wall clock is already the real one
        self.t0_ns = time.time_ns()
        self._t = 0.0
        self._wall = time.time
        bus = SharedMqttBus(mqtt, client_id=f"agentd-sim-nodes-{tag}")
        self.subscribe_nodes(bus)
        core = self.make_core()
        self.core = core
        cycle = core.cycle

        def timed_cycle(now: float) -> Any:
            started = time.perf_counter()
            try:
                return cycle(now)
            finally:
                self.cycle_s.append(time.perf_counter() - started)
        core.cycle = timed_cycle  # type: ignore[method-assign]  # the service calls it; we time it
        quiet = _Silent()
        # clear_leases_on_stop: the run leaves no retained leases behind for the next one to refuse
        service = ControllerService(core, mqtt, client_id=f"agentd-sim-ctl-{tag}", out=quiet,
                                    clear_leases_on_stop=True)
        stop = asyncio.Event()
        ctl_stop = asyncio.Event()
        bus_task = asyncio.create_task(bus.run(stop), name="sim-nodes-mqtt")
        try:
            await bus.wait_connected(connect_timeout_s)
            await asyncio.sleep(0.3)  # the nodes' SUBSCRIBE lands before the first lease is sent
            ctl_task = asyncio.create_task(service.run(ctl_stop), name="sim-controller")
            loop = asyncio.get_running_loop()
            slots = self.slot_nodes()
            slot_s = sc.tick_s / sc.slots
            ticks = int(round(sc.duration_s / sc.tick_s))
            start_mono = loop.time()
            self.t0_ns = time.time_ns()  # site time 0 = now (demand curves start here)
            self._t = 0.0
            lag_max = 0.0
            for k in range(ticks):
                for j, nodes in enumerate(slots):
                    due = start_mono + k * sc.tick_s + j * slot_s
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    lag_max = max(lag_max, loop.time() - due)
                    t_s = (time.time_ns() - self.t0_ns) / 1e9
                    self._t = t_s
                    self.tick_nodes(nodes, t_s, bus)
                    if ctl_task.done():
                        ctl_task.result()  # the controller died: say why
                sample = self.measure(self._t)
                if on_sample is not None:
                    on_sample(sample, core)
            ctl_stop.set()
            await ctl_task
            self.cycles = service.cycles
            return self.result(transport=f"MQTT broker {host}:{port}, real time", tick_lag_max_s=lag_max,
                               overruns=service.overruns, publish_failures=service.publish_failures,
                               bus_publish_failed=bus.publish_failed, bus_outbox_dropped=bus.outbox_dropped,
                               mqtt_dropped=bus.link.dropped, cycles=service.cycles)
        finally:
            ctl_stop.set()
            stop.set()
            await asyncio.gather(bus_task, return_exceptions=True)


class _Silent:
    def __call__(self, line: str) -> None:
        pass


def sim_state_dir(stack: ExitStack, state_dir: Path | None) -> Path:
    """``state_dir``, or a temporary folder removed when ``stack`` closes (the nodes' original
    limits records live there; on Linux /dev/shm when it exists, so the nodes' fsyncs are cheap)."""
    if state_dir is not None:
        return Path(state_dir)
    base = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentd-sim-site-", dir=base)))


__all__ = ["SiteScenario", "SiteSim", "SiteResult", "SiteRecorder", "SimNode", "Sample", "domains_data",
           "failsafe_w", "live_line", "node_name", "sim_state_dir", "uniform_level_w"]
