"""GPU health judgement: ok / warn / fail with reasons, from NVML events and health counters.

Pure: samples, backend events and an injected monotonic time in; each GPU's state, the events as
judged, and the samples annotated (``health``, ``xid_last``, last known counters) out. No I/O;
the daemon's glue (``agentd.health``) logs, stores and rate-limits.

What each state means for the scheduler (the ``gpu_health`` rule pack turns them into advice):

* ``fail`` (drain): GPU lost (a ``gpu_lost`` or ``gpu_unavailable`` event, or an unreadable
  sample), Xid 79, an Xid whose action (the driver's when it reports one, else
  ``collectors.xid_catalog``) is not ``none``, the driver's recovery action other than ``none``
  (``recovery_action`` on the sample or in an event), an uncorrectable ECC error (the volatile
  DBE counter rising, an ``ecc_dbe`` or ``poison_fatal`` event), a row-remap failure (the flag,
  or a ``dram_retirement_failure`` event);
* ``warn`` (no new work until reset): a row remap pending, a page retirement pending, corrected
  ECC errors rising fast (``SBE_WARN_COUNT`` or more within ``SBE_WINDOW_S``);
* ``ok`` otherwise. ``reasons`` says why, worst first.

How a fail clears. Conditions (lost, row-remap failure, the pending flags, the corrected-error
rate, the driver's current recovery action) are re-judged from the last known values every
tick, so they clear when the GPU reads again or the flag goes away. Event-driven fails (an Xid,
an uncorrectable error) are *latched*: an SRE wants a failed GPU to stay failed until someone
has reset it, not to look healthy a tick later. A latch clears on evidence of a reset only:

1. ``gpu_recovered`` (the GPU reads again after being lost: it was reset or re-enumerated); the
   next counter read is then judged like a first one, so a GPU that was never really reset and
   still holds volatile DBEs fails again;
2. a volatile ECC counter going backwards (only a GPU reset or a driver reload zeroes them);
3. the driver's recovery action turning ``none`` after it was something else (on the sample, in
   a ``recovery_action`` event, or carried by an Xid event): where the driver gives a verdict,
   its verdict decides. A first ``none`` read proves nothing (the driver may not have judged
   the error the counters show), so only the change clears.

A daemon restart starts clean, but what the hardware still says re-triggers at the first read:
volatile DBEs > 0 (errors since the last driver load, so no reset since), a pending remap, a
remap failure. An Xid seen before the restart is not re-judged (NVML does not replay events).

Counters arrive on some ticks only (each is read only as often as it can change): the tracker
keeps the last value of each and puts it on samples that did not read it, so the rules never see
"unknown" between two reads. A counter that goes backwards (driver reload, GPU reset) is a reset,
never a negative rate: the new value becomes the baseline and a ``counter_reset`` event says so.

Corrected errors: ``SBE_WARN_COUNT`` (100) corrected ECC errors within ``SBE_WINDOW_S`` (1 h) is
"rising fast". Chosen, not measured: a healthy HBM stack reports corrected errors rarely, a
stream of them points at a failing row or stack that the remapper may not keep up with, and 100
per hour is well above noise while still ahead of the driver's own Xid 92. A site with a
different view passes its own threshold to ``HealthTracker``.

Memory: per GPU a fixed set of counters, the links it reported and at most ``SBE_WINDOW_MAX``
window entries; events are judged in the tick that drains them and never kept here, so a flood
costs CPU in that tick, not memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from collectors.base import NVLINK_ERRORS, BackendEvent, GpuSample, NvlinkErrors
from collectors.durations import format_duration
from collectors.xid_catalog import NONE, lookup

OK, WARN, FAIL = "ok", "warn", "fail"
STATES = (OK, WARN, FAIL)
LEVELS = {OK: 0, WARN: 1, FAIL: 2}
SEVERITY_OF_STATE = {OK: "info", WARN: "warning", FAIL: "critical"}

SBE_WARN_COUNT = 100
SBE_WINDOW_S = 3600.0
SBE_WINDOW_MAX = 2048  # window entries kept per GPU (two per distinct value at most)

# Cumulative integer counters: a decrease is a reset. Volatile ECC counts restart at zero on a
# GPU reset or a driver reload, which makes their decrease evidence of a reset.
COUNTERS = ("ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate",
            "retired_pages_sbe", "retired_pages_dbe", "remap_correctable_rows", "remap_uncorrectable_rows",
            "pcie_replay")
VOLATILE = frozenset({"ecc_sbe_volatile", "ecc_dbe_volatile"})
FLAGS = ("retired_pages_pending", "remap_pending", "remap_failure")

# Actions (the driver's or the catalogue's) that leave the GPU usable; anything else fails it.
_NO_ACTION = frozenset({NONE, ""})
# Event kinds that fail the GPU until a reset: latch key, reason.
_LATCHING_EVENTS = {
    "ecc_dbe": ("dbe", "uncorrectable ECC error (ecc_dbe event)"),
    "poison_fatal": ("poison", "uncorrectable memory error reached a consumer (poison_fatal event)"),
    "dram_retirement_failure": ("remap_failed", "row remap / page retirement failed (driver event)"),
    "gpu_unavailable": ("unavailable", "the driver reported the GPU unavailable"),
}
# The severity of the other kinds (no effect on the state; the counters carry what they mean).
_EVENT_SEVERITY = {"ecc_sbe_storm": "warning", "dram_retirement": "warning", "poison_nonfatal": "warning"}


class Judged(NamedTuple):
    """One event as the tracker judged it: a backend event given a severity (and, for an Xid,
    the action that decided and where it came from), or one the tracker raised itself
    (``counter_reset``, ``health``: a change of state or reasons)."""

    ts_ns: int
    gpu: int
    kind: str
    message: str
    severity: str  # info | warning | critical
    xid: int | None = None
    action: str | None = None
    action_source: str | None = None  # "driver" | "catalogue"


@dataclass(slots=True)
class GpuHealth:
    """One GPU's health as judged at the last update (a live object of the tracker)."""

    index: int
    uuid: str = ""
    state: str = OK
    reasons: tuple[str, ...] = ()
    since: float | None = None  # monotonic time of the last change of state (None: never changed)
    xid_last: int | None = None
    lost: str | None = None  # why, while the GPU cannot be read
    recovery_action: str | None = None  # the driver's recommended action, as last reported
    counters: dict[str, int | bool] = field(default_factory=dict)  # last known values
    nvlink: dict[int, NvlinkErrors] = field(default_factory=dict)  # last known, per link
    links: tuple[NvlinkErrors, ...] | None = None  # the same, in link order (what samples get)
    latched: dict[str, str] = field(default_factory=dict)  # fail reasons held until a reset
    rearm: bool = True  # judge the next counter read like a first one
    sbe_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=SBE_WINDOW_MAX))

    @property
    def level(self) -> int:
        return LEVELS[self.state]


@dataclass(slots=True)
class HealthStep:
    """What one ``update`` produced: the events judged (backend ones in order, then the
    tracker's own), the GPUs whose state or reasons changed, and those with a counter read."""

    events: list[Judged]
    changed: set[int]
    counters_read: set[int]


class HealthTracker:
    """Per-GPU health (module docstring). ``update`` is the one entry point, once per tick."""

    def __init__(self, *, sbe_warn_count: int = SBE_WARN_COUNT, sbe_window_s: float = SBE_WINDOW_S) -> None:
        if sbe_warn_count < 1 or sbe_warn_count >= SBE_WINDOW_MAX // 2:
            raise ValueError(f"sbe_warn_count must be within 1..{SBE_WINDOW_MAX // 2 - 1} (got: {sbe_warn_count})")
        if not sbe_window_s > 0:
            raise ValueError(f"sbe_window_s must be > 0 (got: {sbe_window_s})")
        self.sbe_warn_count = sbe_warn_count
        self.sbe_window_s = sbe_window_s
        self._sbe_reason = (f"corrected ECC errors rising fast ({sbe_warn_count} or more within "
                            f"{format_duration(sbe_window_s)})")
        self.gpus: dict[int, GpuHealth] = {}

    def _gpu(self, index: int, uuid: str = "") -> GpuHealth:
        g = self.gpus.get(index)
        if g is None or (uuid and g.uuid and uuid != g.uuid):  # first sight, or another board here
            g = self.gpus[index] = GpuHealth(index, uuid)
        elif uuid and not g.uuid:
            g.uuid = uuid
        return g

    def update(self, samples: Iterable[GpuSample], events: Iterable[BackendEvent], now: float,
               ts_ns: int) -> HealthStep:
        """Judge this tick's events, then its samples; annotate the samples in place. ``now`` is
        the monotonic time (the corrected-error window), ``ts_ns`` the wall clock that stamps the
        events the tracker raises itself."""
        samples = list(samples)
        for s in samples:
            self._gpu(s.index, s.uuid)
        out: list[Judged] = []
        touched: set[int] = set()
        for ev in events:
            g = self._gpu(ev.gpu_index)
            out.append(self._event(g, ev))
            touched.add(g.index)
        read: set[int] = set()
        for s in samples:
            g = self.gpus[s.index]
            touched.add(s.index)
            if not s.healthy:  # the sample's own error is the shorter why; the event's otherwise
                g.lost = s.error or g.lost or "the GPU cannot be read"
                continue
            g.lost = None  # reads again (gpu_recovered, when the backend sends it, clears latches)
            if self._counters(g, s, now, out):
                read.add(s.index)
        changed = {i for i in touched if self._judge(self.gpus[i], now, ts_ns, out)}
        for s in samples:
            self._annotate(self.gpus[s.index], s)
        return HealthStep(out, changed, read)

    # -- events --------------------------------------------------------------------------------

    def _event(self, g: GpuHealth, ev: BackendEvent) -> Judged:
        kind = ev.kind
        if kind == "xid" and ev.xid is not None:
            info = lookup(ev.xid)
            g.xid_last = ev.xid
            action, source = (ev.action, "driver") if ev.action is not None else (info.action, "catalogue")
            message = f"Xid {ev.xid}: {info.meaning}"
            if ev.message and ev.message not in message:
                message += f" ({ev.message})"
            fails = action not in _NO_ACTION
            if ev.action is not None:  # read just after the Xid: the driver's verdict now
                self._driver_action(g, ev.action)
            if fails:
                g.latched[f"xid:{ev.xid}"] = f"Xid {ev.xid}: {info.meaning.split(';')[0]} ({source} action: {action})"
            # the driver saying "none" for an Xid the table calls critical: a warning at most
            severity = "critical" if fails else ("warning" if info.severity == "critical" else info.severity)
            return Judged(ev.ts_ns, g.index, kind, message, severity, ev.xid, action, source)
        latch = _LATCHING_EVENTS.get(kind)
        if latch is not None:
            key, reason = latch
            g.latched[key] = reason
            return Judged(ev.ts_ns, g.index, kind, ev.message or reason, "critical")
        if kind == "recovery_action":
            action = ev.action or NONE
            self._driver_action(g, action)
            fails = action not in _NO_ACTION
            return Judged(ev.ts_ns, g.index, kind, ev.message or f"driver recovery action: {action}",
                          "critical" if fails else "info", action=action, action_source="driver")
        if kind == "gpu_lost":
            g.lost = ev.message or "gpu_lost"
            return Judged(ev.ts_ns, g.index, kind, ev.message, "critical")
        if kind == "gpu_recovered":
            g.lost = None
            g.latched.clear()  # it was reset or re-attached; what the hardware still says re-triggers
            g.rearm = True
            return Judged(ev.ts_ns, g.index, kind, ev.message, "info")
        return Judged(ev.ts_ns, g.index, kind, ev.message, _EVENT_SEVERITY.get(kind, "info"), ev.xid, ev.action,
                      "driver" if ev.action is not None else None)

    @staticmethod
    def _driver_action(g: GpuHealth, action: str) -> None:
        """The driver's recommended action now; its turn to ``none`` clears the latches."""
        before = g.recovery_action
        g.recovery_action = action
        if action in _NO_ACTION and before is not None and before not in _NO_ACTION:
            g.latched.clear()  # the driver's verdict: the GPU is usable again

    # -- counters ------------------------------------------------------------------------------

    def _counters(self, g: GpuHealth, s: GpuSample, now: float, out: list[Judged]) -> bool:
        """Take the counters this sample read; True when it read any."""
        last = g.counters
        first = g.rearm
        resets: list[str] = []
        any_read = False
        dbe_before = last.get("ecc_dbe_volatile")
        dbe_agg_before = last.get("ecc_dbe_aggregate")
        for name in COUNTERS:
            v = getattr(s, name)
            if v is None:
                continue
            any_read = True
            before = last.get(name)
            if before is not None and v < before:
                resets.append(f"{name} {before} -> {v}")
            last[name] = v
        for name in FLAGS:
            v = getattr(s, name)
            if v is not None:
                any_read = True
                last[name] = bool(v)
        if s.recovery_action is not None:
            any_read = True
            self._driver_action(g, s.recovery_action)
        links = s.nvlink
        if links is not None:
            any_read = True
            if links is not g.links and links != g.links:  # 18 links unchanged: nothing to look at
                for link in links:
                    old = g.nvlink.get(link.link)
                    if old is not None and old != link:
                        for name in NVLINK_ERRORS:
                            a, b = getattr(old, name), getattr(link, name)
                            if a is not None and b is not None and b < a:
                                resets.append(f"nvlink {link.link} {name} {a} -> {b}")
                    g.nvlink[link.link] = link
                g.links = tuple(g.nvlink[k] for k in sorted(g.nvlink))
        if not any_read:
            return False
        g.rearm = False
        volatile_reset = any(r.split(" ", 1)[0] in VOLATILE for r in resets)
        if resets:
            out.append(Judged(s.ts_ns, g.index, "counter_reset",
                              "counter reset (GPU reset or driver reload), new baseline: " + ", ".join(resets),
                              "warning"))
        if volatile_reset:
            g.latched.clear()  # only a GPU reset or a driver reload zeroes the volatile ECC counts
            g.sbe_window.clear()
            first = True
        dbe = last.get("ecc_dbe_volatile")
        if s.ecc_dbe_volatile is not None and dbe:
            if first or volatile_reset or dbe_before is None:
                g.latched["dbe"] = f"uncorrectable ECC errors since the driver loaded or the GPU was reset: {dbe}"
            elif dbe > dbe_before:
                g.latched["dbe"] = f"uncorrectable ECC errors rose to {dbe} (volatile count)"
        elif s.ecc_dbe_volatile is None and s.ecc_dbe_aggregate is not None and dbe_agg_before is not None:
            agg = last["ecc_dbe_aggregate"]
            if agg > dbe_agg_before:  # no volatile counter on this board: the lifetime one rising
                g.latched["dbe"] = f"uncorrectable ECC errors rose to {agg} (aggregate count)"
        sbe = s.ecc_sbe_volatile if s.ecc_sbe_volatile is not None else s.ecc_sbe_aggregate
        if sbe is not None:
            if any(r.startswith(("ecc_sbe_volatile", "ecc_sbe_aggregate")) for r in resets):
                g.sbe_window.clear()
            self._window_push(g.sbe_window, now, int(sbe))
        return True

    def _window_push(self, w: deque[tuple[float, int]], now: float, value: int) -> None:
        """Keep (time, value) reads: runs of one value are kept as their first and last read."""
        if len(w) >= 2 and w[-1][1] == value and w[-2][1] == value:
            w[-1] = (now, value)
        else:
            w.append((now, value))
        start = now - self.sbe_window_s
        while len(w) > 1 and w[1][0] <= start:  # w[0]: the last read at or before the window start
            w.popleft()

    def _sbe_rising(self, g: GpuHealth) -> bool:
        w = g.sbe_window
        return len(w) > 1 and w[-1][1] - w[0][1] >= self.sbe_warn_count

    # -- judgement -----------------------------------------------------------------------------

    def _judge(self, g: GpuHealth, now: float, ts_ns: int, out: list[Judged]) -> bool:
        """Recompute state and reasons; on a change, a ``health`` event. True when changed."""
        fail: list[str] = []
        warn: list[str] = []
        c = g.counters
        fail.extend(g.latched[k] for k in sorted(g.latched))  # the cause (an Xid 79) before its effect
        if g.lost is not None:
            fail.append(f"GPU lost: {g.lost}")
        if c.get("remap_failure"):
            fail.append("row remapping failed: no spare rows left (the board needs service)")
        if g.recovery_action is not None and g.recovery_action not in _NO_ACTION:
            fail.append(f"driver recovery action: {g.recovery_action}")
        if c.get("remap_pending"):
            warn.append("row remap pending: reset the GPU at the next idle")
        if c.get("retired_pages_pending"):
            warn.append("page retirement pending: reset the GPU at the next idle")
        if self._sbe_rising(g):
            warn.append(self._sbe_reason)
        state = FAIL if fail else WARN if warn else OK
        reasons = (*fail, *warn)
        if state == g.state and reasons == g.reasons:
            return False
        before = g.state
        if state != before:
            g.since = now
        g.state, g.reasons = state, reasons
        why = "; ".join(reasons) if reasons else "no reason left"
        out.append(Judged(ts_ns, g.index, "health", f"health {before} -> {state}: {why}",
                          SEVERITY_OF_STATE[state]))
        return True

    @staticmethod
    def _annotate(g: GpuHealth, s: GpuSample) -> None:
        """``health``, ``xid_last`` and, on a readable GPU, the last known counters."""
        s.health = g.state
        s.xid_last = g.xid_last
        if not s.healthy:
            return  # an unreadable GPU's sample carries no values (collectors.base)
        c = g.counters
        for name in (*COUNTERS, *FLAGS):
            if getattr(s, name) is None and name in c:
                setattr(s, name, c[name])
        if s.nvlink is None:
            s.nvlink = g.links
        if s.recovery_action is None:
            s.recovery_action = g.recovery_action

    def states(self) -> Mapping[int, GpuHealth]:
        """Every GPU's health as of the last update."""
        return self.gpus

