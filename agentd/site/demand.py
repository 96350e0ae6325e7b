"""Each GPU's demand: what it would draw if nothing of ours capped it. Pure, no I/O.

The controller allocates from demand, and leaves its capping band only when demand falls under
the uncap threshold, so an estimate that is too low releases a site that is still over its cap
(a surge, then a re-cap), while one that is too high only keeps it capped a little longer and
leaves a few watts of a budget unused. Every choice below therefore errs high.

The formula (per GPU, every tick; P = max(instant, average) power, L = the enforced limit,
C = the GPU's ceiling: its baseline, the limit it holds with no cap of ours):

* **Unconstrained** (P below L - max(10 W, 5 % of L), and the driver's SW power-cap reason not
  set), or constrained only by its own ceiling (L >= C - 1 W: no cap of ours holds it, so
  releasing ours frees nothing): demand = P. An unconstrained tick is also the GPU's reference:
  its power ``P_ref`` and utilisation ``u_ref`` (when busy, u >= 5 %), and the highest SM clock
  ``f_ref`` seen on such ticks (its uncapped speed).
* **Held below its ceiling and at its limit** (a cap of ours, or another limiter, binds): the
  demand is not observable, so it is estimated as

      demand = max(P, P * (f_ref / f) ** 3, P_ref * u / u_ref), then at most C

  The clock term inverts the power model of the site simulation (clock ~ cube root of dynamic
  power, as DVFS lowers voltage with frequency), taking all power as dynamic: with a static
  part the true exponent is lower, so this over-estimates. The utilisation term scales the last
  uncapped draw by how much busier the GPU is now than then (more work at the same clock, more
  power). The larger of the two wins; a term whose inputs are missing is left out, and with
  neither (no reference yet, e.g. capped since the daemon started) the demand is C: no evidence,
  so assume the most. The same holds for a GPU with no power or no limit reading.

A capped GPU whose work goes away falls under its limit and is back in the first case at the
next tick, so an over-estimate lasts only while the GPU is held at its limit. There is no drift
towards C over time: a GPU held for long keeps the estimate of its clocks, which see heavier
work directly (the clock falls further under the same limit).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from collectors.base import GpuSample, _reason_bit

MARGIN_W = 10.0  # a GPU this close to its enforced limit is held by it ...
MARGIN_FRACTION = 0.05  # ... or this fraction of the limit, whichever is larger
BUSY_UTIL_PCT = 5.0  # a reference below this utilisation says nothing about the work's intensity
CLOCK_EXPONENT = 3.0
SW_POWER_CAP = _reason_bit("SwPowerCap")


@dataclass(slots=True)
class _Reference:
    """What a GPU drew when nothing of ours held it (see the module docstring)."""

    uuid: str
    power_w: float | None = None
    util_pct: float | None = None
    clock_mhz: float = 0.0


class DemandEstimator:
    """Per-GPU demand estimates for one node; keeps each GPU's last uncapped reference."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, _Reference] = {}

    def estimate(self, sample: GpuSample, ceiling_w: float) -> tuple[float, bool]:
        """``(demand_w, estimated)`` for a healthy sample; ``estimated`` is True when the GPU is
        held at a limit below ``ceiling_w`` and its demand is the estimate, not its power."""
        ref = self._refs.get(sample.index)
        if ref is None or ref.uuid != sample.uuid:  # a new board at this index knows nothing old
            ref = self._refs[sample.index] = _Reference(sample.uuid)
        power = _power_w(sample)
        if power is None:
            return ceiling_w, True
        limit = sample.limit_w if sample.limit_w is not None else sample.limit_current_w
        if limit is None:  # no limit reading: whether it is held is unknown, so assume the most
            return max(power, ceiling_w), True
        margin = max(MARGIN_W, MARGIN_FRACTION * limit)
        at_limit = power >= limit - margin or bool((sample.clock_reasons or 0) & SW_POWER_CAP)
        held = at_limit and limit < ceiling_w - 1.0
        if not held:
            if not at_limit:  # the draw it chose: its speed and, when busy, its work's intensity
                if sample.sm_clock_mhz is not None and sample.sm_clock_mhz > ref.clock_mhz:
                    ref.clock_mhz = sample.sm_clock_mhz
                if sample.util_pct is not None and sample.util_pct >= BUSY_UTIL_PCT:
                    ref.power_w, ref.util_pct = power, sample.util_pct
            return power, False
        estimate = None
        clock = sample.sm_clock_mhz
        if clock is not None and clock > 0 and ref.clock_mhz > 0:
            estimate = power * max(1.0, ref.clock_mhz / clock) ** CLOCK_EXPONENT
        if ref.power_w is not None and ref.util_pct and sample.util_pct is not None:
            by_util = ref.power_w * sample.util_pct / ref.util_pct
            estimate = by_util if estimate is None else max(estimate, by_util)
        if estimate is None:
            return max(power, ceiling_w), True
        return max(power, min(ceiling_w, estimate)), True

    def forget(self, index: int) -> None:
        """Drop a GPU's reference (it left the node)."""
        self._refs.pop(index, None)


def _power_w(sample: GpuSample) -> float | None:
    """The larger of the instant and the averaged power (the higher reading errs safe)."""
    a, b = sample.power_w, sample.power_avg_w
    if a is None:
        return b
    return a if b is None or a >= b else b


class DemandWindow:
    """Each GPU's highest demand estimate over the last ``window_s`` seconds.

    What the node reports and splits its budget by is this peak, not the tick's value: a training
    job's all-reduce dips (every GPU of the job at once, every few seconds) are not a fall in
    what the job needs. Taken tick by tick, the controller would release a domain in every dip
    and cap it again at the next peak (a reversal per step), and the node's split would give a
    dipping GPU's watts away just before it needs them back. A job that really stops wants less
    ``window_s`` later. ``window_s = 0`` follows the tick's value. A sliding-window maximum (a
    monotonic queue per GPU): O(1) amortised per reading.
    """

    __slots__ = ("window_s", "_peaks")

    def __init__(self, window_s: float) -> None:
        if not window_s >= 0:
            raise ValueError(f"window_s must be >= 0 (got {window_s!r})")
        self.window_s = window_s
        self._peaks: dict[int, deque[tuple[float, float]]] = {}

    def update(self, index: int, now: float, demand_w: float) -> float:
        """Add this tick's estimate of GPU ``index``; the highest within the window."""
        if self.window_s == 0:
            return demand_w
        q = self._peaks.get(index)
        if q is None:
            q = self._peaks[index] = deque()
        while q and q[-1][1] <= demand_w:
            q.pop()
        q.append((now, demand_w))
        horizon = now - self.window_s
        while q[0][0] <= horizon:
            q.popleft()
        return q[0][1]

    def forget(self, index: int) -> None:
        self._peaks.pop(index, None)
