"""From node state to power-limit targets: the rules engine, composition and ramp, per tick.

The daemon's tick calls :meth:`Controller.step` with the tick's GPU samples and the coolant
signals; the result (per-GPU limits to apply, rule transitions, advice) goes to the actuator on
the NVML thread, to the store as ``throttle_event`` points and to the logs. All of it runs on the
injected clock, so closed-loop tests run minutes of simulated time in milliseconds.

"Uncapped" means each GPU's baseline, which the actuator tracks: the limit the GPU had when the
daemon first saw it, then any limit set outside the daemon (an operator, a GPU reset). Releasing a
cap returns a GPU to it, and a GPU nothing asks a cap for keeps it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

from collectors.base import GpuSample
from collectors.coolant import LEAK_RANK
from rules.actions import Ceiling, GpuLimits, NodeCap, Ramp, compose_with_sources
from rules.engine import Engine, Evaluation, gpu_values
from rules.expr import COOLANT_FIELDS, COOLANT_LOOPS
from rules.model import RuleSet, default_pack_paths, load_rule_files


def load_rules(rule_dirs: Iterable[Path | str], builtin_packs: bool = True) -> RuleSet:
    """The shipped packs (unless disabled) plus every rule file (``*.yaml``, ``*.yml``) in the
    site's rule directories, as ``agentd.rule_files`` finds them.

    Raises ``rules.model.RuleLoadError`` listing every located error. The daemon's start uses
    ``agentd.rule_files.check_rules``, which also says which directories are missing.
    """
    from agentd.rule_files import rule_file_paths

    paths: list[Path] = list(default_pack_paths()) if builtin_packs else []
    paths += rule_file_paths(rule_dirs, explicit=False).paths
    return load_rule_files(paths)


@dataclass(slots=True)
class ControlStep:
    """What one tick decided."""

    evaluation: Evaluation
    limits_w: dict[int, float]  # to apply now (after the ramp), per GPU index
    sources: dict[int, str] = field(default_factory=dict)  # the proposal binding each GPU's target


@dataclass
class Controller:
    """Engine + composition + ramp for one node. Pure: values and a clock in, decisions out."""

    engine: Engine
    ramp: Ramp
    applied_w: dict[int, float] = field(default_factory=dict)  # the ramp's position per GPU
    _baselines_w: dict[int, float] = field(default_factory=dict)  # as seen at the last step

    @classmethod
    def build(cls, rule_set: RuleSet, params: Mapping[str, Any] | None = None, *,
              rise_w_per_s: float = 25.0, hold_s: float = 30.0, seed: str = "",
              interval_s: float = 1.0) -> Controller:
        """A controller whose ramp jitter is seeded by ``seed`` (the node name spreads a fleet);
        one step of the ramp never accounts for more than two tick intervals."""
        return cls(Engine(rule_set, params), Ramp(rise_w_per_s=rise_w_per_s, hold_s=hold_s,
                                                  rng=random.Random(seed), max_step_s=2 * interval_s))

    def adopt(self, old: Controller) -> list[str]:
        """Carry ``old``'s state into this (reloaded) controller: rule states of unchanged rules,
        the ramp's position and hold timers, and the baselines. Returns the rules kept."""
        kept = self.engine.adopt_states(old.engine)
        old.ramp.rise_w_per_s = self.ramp.rise_w_per_s
        old.ramp.hold_s = self.ramp.hold_s
        old.ramp.max_step_s = self.ramp.max_step_s
        self.ramp = old.ramp
        self.applied_w = old.applied_w
        self._baselines_w = old._baselines_w
        return kept

    def step(self, now: float, samples: Mapping[int, GpuSample], node_signals: Mapping[str, Any],
             stale: frozenset[str] = frozenset(),
             baselines_w: Mapping[int, float] | None = None, *,
             node_caps: Iterable[NodeCap] = (),
             classes_by_gpu: Mapping[int, str] | None = None,
             floors_w: Mapping[int, float] | None = None,
             demands_w: Mapping[int, float] | None = None,
             extra: Iterable[Ceiling] = ()) -> ControlStep:
        """Evaluate the rules on this tick's readings and return the limits to apply.

        ``baselines_w`` (from ``Actuator.observe``) is each GPU's uncapped limit; a GPU without
        one (its limit unreadable) gets no target. When a baseline moves (changed outside the
        daemon), the ramp restarts from it: what the GPU holds now is the operator's, not ours.
        ``node_caps`` are node caps from outside the rules (the site budget: ``NodeCap(w,
        "budget")``), composed with the rules' own (the lowest wins) and ramped like them. The
        tightest node cap is split over the GPUs by job class (``classes_by_gpu``; lowest class
        first), honouring each job's floor (``floors_w``) and giving no GPU more than it would draw
        while others want more (``demands_w``); see ``rules.actions.compose_with_sources``.
        ``extra`` are per-GPU ceilings from outside the rules (the API's cap leases:
        ``Ceiling(gpu, w, "lease:<id>")``), composed with the rules' own (the lowest wins).
        """
        gpus = {i: gpu_values(s) for i, s in samples.items()}
        node = dict(node_signals)
        node["node.gpu_power_w"] = sum(s.power_w for s in samples.values() if s.healthy and s.power_w is not None)
        node["node.gpus"] = len(samples)
        evaluation = self.engine.evaluate(now, node, gpus, stale)
        bounds: dict[int, GpuLimits] = {}
        for i, s in samples.items():
            baseline = (baselines_w or {}).get(i)
            if not s.healthy or s.limit_min_w is None or s.limit_max_w is None or baseline is None:
                continue
            if self._baselines_w.get(i) != baseline:
                self._baselines_w[i] = baseline
                self.applied_w[i] = baseline
            bounds[i] = GpuLimits(s.limit_min_w, s.limit_max_w, baseline)
        caps = evaluation.node_caps
        extra_caps = list(node_caps)
        if extra_caps:
            caps = [*caps, *extra_caps]
        targets = compose_with_sources(evaluation.ceilings, bounds, caps, extra, classes=classes_by_gpu,
                                       floors_w=floors_w, demands_w=demands_w)
        limits = self.ramp.step(now, {i: t.watts for i, t in targets.items()}, self.applied_w, bounds)
        self.applied_w.update(limits)
        sources = {i: ("ramp" if limits[i] < t.watts - 1e-9 else t.source) for i, t in targets.items()}
        return ControlStep(evaluation, limits, sources)


def coolant_signals(coolant: Any, now_mono: float) -> tuple[dict[str, Any], frozenset[str]]:
    """The rules' ``coolant.*`` signals from ``collectors.coolant.CoolantState``: per loop the
    worst good value of each field, the worst leak state over all loops, and the stale names
    (a field with a degraded sensor; ``coolant.stale`` when any sensor is degraded)."""
    node: dict[str, Any] = {}
    stale: set[str] = set()
    leak: str | None = None
    for name, view in coolant.loops(now_mono).items():
        if name not in COOLANT_LOOPS:
            continue
        for fld in COOLANT_FIELDS:  # the numeric coolant signals the rules know
            value = view.worst(fld)
            if value is not None:
                node[f"coolant.{name}.{fld}"] = value
            if view.is_degraded(fld):
                stale.add(f"coolant.{name}.{fld}")
        if view.leak is not None and (leak is None or LEAK_RANK[view.leak] > LEAK_RANK[leak]):
            leak = view.leak
        if view.is_degraded("leak"):
            stale.add("coolant.leak")
    if leak is not None:
        node["coolant.leak"] = leak
    node["coolant.stale"] = bool(stale)
    return node, frozenset(stale)
