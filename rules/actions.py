"""Composition of power-limit proposals, and the ramp that paces their release. Pure functions.

Every source of a limit proposes a ceiling: each firing rule (``Ceiling`` per GPU, ``NodeCap`` for
the node), the site budget share (a ``NodeCap``), operator / scheduler leases (``Ceiling``, with
``gpu=None`` for every GPU). The target of a GPU is the minimum of its ceilings, clamped to the
device's ``[min_w, max_w]``; a GPU nothing proposes for stays at (or goes back to) its
``baseline_w``: the limit an operator (or the driver default) gave it, which the daemon never
changes on its own.

Then ``Ramp``: a target below the applied limit is applied at once (protection never waits);
a target above it is approached at a bounded rate (W/s, each rise with its own jittered rate from
an injected RNG) and only after ``hold_s`` has passed since that GPU's last fall, so thousands of
GPUs released together do not surge back together, and a GPU reverses direction (cap -> uncap)
at most once per ``hold_s``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple
from collections.abc import Iterable, Mapping

from rules.budget import GpuDemand, split_node_budget


class Ceiling(NamedTuple):
    """A proposed per-GPU ceiling. ``gpu=None`` applies to every GPU of the node."""

    gpu: int | None
    watts: float
    source: str


class NodeCap(NamedTuple):
    """A proposed ceiling on the sum of the node's GPU power limits."""

    watts: float
    source: str


class GpuLimits(NamedTuple):
    """A GPU's constraints (NVML's min/max management limits) and its baseline, in W.

    ``baseline_w`` is the operator's latest intent (the limit set outside the daemon, or the
    driver default): what the GPU holds when nothing asks for a cap, and what a release returns to.
    """

    min_w: float
    max_w: float
    baseline_w: float


class Target(NamedTuple):
    watts: float
    source: str  # the binding proposal: a rule name, "node:<source>", or "baseline"


def _limits(v: GpuLimits | tuple[float, float, float]) -> GpuLimits:
    return v if isinstance(v, GpuLimits) else GpuLimits(*v)


def compose_with_sources(ceilings: Iterable[Ceiling],
                         gpus: Mapping[int, GpuLimits | tuple[float, float, float]],
                         node_caps: Iterable[NodeCap] = (),
                         extra: Iterable[Ceiling] = (), *,
                         classes: Mapping[int, str] | None = None,
                         floors_w: Mapping[int, float] | None = None,
                         demands_w: Mapping[int, float] | None = None) -> dict[int, Target]:
    """Per-GPU target with the proposal that binds it (see the module doc).

    The tightest node cap (a ``cap_node`` rule, the site budget) is split across the GPUs by
    ``rules.budget.split_node_budget``: each GPU's target from the other sources is its most,
    ``classes`` (GPU -> ``idle``/``low``/``normal``/``high``; absent: ``normal``) decides who is
    cut first, ``floors_w`` are the jobs' floors (absent: the device minimum; never above the
    other sources' target: protection wins over a job's floor) and ``demands_w`` what each GPU
    would draw (absent: its target, i.e. today's max-min fair equal split). A GPU never goes
    below its minimum: when the cap is under the sum of minimums every GPU sits at its minimum.
    """
    lim = {i: _limits(v) for i, v in gpus.items()}
    best: dict[int, Target] = {i: Target(v.baseline_w, "baseline") for i, v in lim.items()}
    for c in list(ceilings) + list(extra):
        targets = best.keys() if c.gpu is None else ((c.gpu,) if c.gpu in best else ())
        for i in targets:
            if c.watts < best[i].watts:
                best[i] = Target(c.watts, c.source)
    # Clamp to the device before the node split, so the split shares what GPUs can really use.
    for i, t in best.items():
        lo, hi = lim[i].min_w, lim[i].max_w
        w = min(max(t.watts, lo), hi)
        if w != t.watts:
            best[i] = Target(w, t.source)
    caps = list(node_caps)
    if caps and best:
        node = min(caps, key=lambda c: c.watts)
        if node.watts < sum(t.watts for t in best.values()):
            cls = classes or {}
            fl = floors_w or {}
            dem = demands_w or {}
            split = split_node_budget(node.watts, [
                GpuDemand(i, cls.get(i, "normal"), min(dem.get(i, t.watts), t.watts),
                          min(max(fl.get(i, lim[i].min_w), lim[i].min_w), t.watts), lim[i].min_w, t.watts)
                for i, t in best.items()])
            for i, t in best.items():
                if split[i] < t.watts:
                    best[i] = Target(split[i], f"node:{node.source}")
    return best


def compose(ceilings: Iterable[Ceiling], gpus: Mapping[int, GpuLimits | tuple[float, float, float]],
            node_caps: Iterable[NodeCap] = (), extra: Iterable[Ceiling] = ()) -> dict[int, float]:
    """``{gpu: target_w}``: min of all proposals, clamped to [min_w, max_w]; baseline when none."""
    return {i: t.watts for i, t in compose_with_sources(ceilings, gpus, node_caps, extra).items()}


@dataclass(slots=True)
class _RampGpu:
    last_fall: float | None = None
    rate: float | None = None  # W/s of the rise in progress (drawn when it starts)


@dataclass(slots=True)
class Ramp:
    """Limits fall at once and rise at ``rise_w_per_s`` x (1 +/- ``jitter``), after ``hold_s``.

    ``step`` is deterministic for a given ``rng`` (inject ``random.Random(seed)``; the daemon can
    seed with the node name so a fleet spreads). The jittered rate is drawn once per rise.
    """

    rise_w_per_s: float = 25.0
    hold_s: float = 30.0
    jitter: float = 0.2
    max_step_s: float | None = None  # the most time one step may account for (the daemon: 2 ticks)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _last_now: float | None = None
    _gpus: dict[int, _RampGpu] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rise_w_per_s > 0:
            raise ValueError("rise_w_per_s must be > 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.hold_s < 0:
            raise ValueError("hold_s cannot be negative")

    def step(self, now: float, targets: Mapping[int, float], current_applied: Mapping[int, float],
             bounds: Mapping[int, GpuLimits | tuple[float, float, float]] | None = None) -> dict[int, float]:
        """The limits to apply now. ``current_applied`` is what each GPU holds (what we applied
        last, or the read-back limit at start); a GPU missing there takes its target at once.
        With ``bounds`` the result is clamped to each GPU's [min_w, max_w] as a last guard."""
        # A gap between steps (NVML hung, the daemon paused) must not turn into one big jump:
        # the ramp resumes from where it was, at its rate.
        dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        if self.max_step_s is not None:
            dt = min(dt, self.max_step_s)
        self._last_now = now
        out: dict[int, float] = {}
        for i, target in targets.items():
            st = self._gpus.get(i)
            if st is None:
                st = self._gpus[i] = _RampGpu()
            cur = current_applied.get(i)
            if cur is None:
                new = target
            elif target <= cur:
                new = target
                if target < cur:
                    st.last_fall = now
                st.rate = None
            elif st.last_fall is not None and now - st.last_fall < self.hold_s:
                new = cur  # recently capped: hold before releasing
            else:
                if st.rate is None:
                    j = self.jitter
                    st.rate = self.rise_w_per_s * (1.0 + (self.rng.uniform(-j, j) if j else 0.0))
                new = min(target, cur + st.rate * dt)
                if new >= target:
                    st.rate = None
            if bounds is not None and i in bounds:
                lo, hi, _ = _limits(bounds[i])
                new = min(max(new, lo), hi)
            out[i] = new
        return out
