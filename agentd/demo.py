"""``agentd demo``: the real daemon on simulated GPUs and a simulated CDU, with a live view.

Nothing here is a mock-up: the demo runs the same Daemon, tick, rules and SQLite store as
``agentd run`` with ``backend = "sim"``; only the view is extra. It needs no server and no GPU.
The CDU model (``collectors.cdu_sim``) runs in-process: before every tick it is stepped by the
time that passed, its messages go through the same coolant parser and state as MQTT messages
would (no broker, so no ``[mqtt]`` section and no "coolant without MQTT" warning), its heat load
is the simulated GPUs' power (times the nodes it cools), and its TCS supply temperature feeds the
GPUs' thermal model.

The view tells what the node would tell a scheduler: a node state that follows the worst firing
rule (a leak Critical is never shown next to "ok"), the advice, the caps, the coolant loops, the
last rule transition; it fits the terminal (80x24 at least) and ends with a timeline of every
rule transition. Without ``--duration``, a run with faults lasts until the faults have done what
they do: a fast preview of the same simulation on a fake clock finds when the last rule fires.

Faults: the CDU's (``pump_failure``, ``leak``, ...) go to the CDU model, a GPU's (``xid79:3@30``,
``ecc_dbe:0@20``, ``row_remap_pending:1@10``: the kinds of ``collectors.cdu_sim.GPU_FAULT_KINDS``)
to the simulated GPUs, which then raise the events and counters the driver would; the daemon's
health tracker judges them like real ones, and the view shows each GPU's health, the
``gpu_health`` pack's advice and, at the end, every GPU event it stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from agentd.clock import Clock, FakeClock
from agentd.config import AgentConfig
from agentd.control import ControlStep
from agentd.coolant_ingest import CoolantIngest
from agentd.daemon import Daemon, make_controller, open_store
from agentd.log import setup_logging
from agentd.service import install_stop_handlers
from agentd.store import Store
from collectors.cdu_sim import CduModel, Fault, is_gpu_kind, subscription_for
from collectors.gpu_health import FAIL, OK, Judged
from collectors.sim import SimBackend
from rules.engine import Event, format_value

CDU_NODES = 14  # nodes the simulated CDU cools: this one and 13 like it (~100 kW)
DEFAULT_DURATION_S = 30.0  # without faults (or when the faults make no rule fire)
PREVIEW_AFTER_S = 240.0  # the preview runs this long past the last fault's start
# The demo site's rule params. The simulated CDU is a W32 plant (25 C facility water, 32 C TCS
# set point), for which rules/packs/coolant.yaml recommends tcs_supply_max_c ~ 35 (its default,
# 45, suits a W40 plant, where --fault hot_facility's 40 C water would be in class).
DEMO_PARAMS = {"tcs_supply_max_c": 35}
MARGIN_S = 10.0  # shown after the last rule fires
PREVIEW_INTERVAL_S = 1.0  # the preview's tick (rule `for` durations are whole seconds)
TIMELINE_MAX = 24  # transitions listed at the end (the first and last half when more)
PIPED_EVERY_S = 5.0  # a frame every 5 s when the output is not a terminal

_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
_COOLANT_FIELDS = (("supply_temp_c", 9, ".1f"), ("return_temp_c", 9, ".1f"), ("delta_temp_c", 6, ".1f"),
                   ("flow_lpm", 11, ".1f"), ("delta_pressure_kpa", 7, ".1f"), ("pump_speed_pct", 7, ".1f"),
                   ("valve_position_pct", 8, ".1f"))
_COOLANT_HEAD = ("loop    " + "".join(h.rjust(w) for h, w in zip(
    ("supply C", "return C", "dT C", "flow L/min", "dP kPa", "pump %", "valve %"), (9, 9, 6, 11, 7, 7, 8)))
    + "  state")
_GPU_HEAD = "GPU  power W  limit W  temp C  HBM C  energy kJ  util %  SM MHz  thr  health"
GPU_EVENTS_MAX = 16  # GPU events listed at the end (the first and last half when more)
_CLEAR = "\x1b[H\x1b[2J"


class DemoDaemon(Daemon):
    """The daemon with the demo's CDU in-process: stepped before every tick, its messages fed
    straight into the coolant ingest (the parser and state MQTT messages go through), and the
    view called after it.

    ``Daemon.__init__`` builds an MQTT link for configured coolant subscriptions and warns when
    there is no broker; here there is none on purpose, so the base is built from the config
    without subscriptions and the coolant ingest and the rules (coolant rules included) are then
    built from the real one.
    """

    def __init__(self, cfg: AgentConfig, backend: SimBackend, store: Store, model: CduModel, *,
                 clock: Clock | None = None,
                 after_tick: Callable[[DemoDaemon], None] | None = None) -> None:
        bare = cfg.model_copy(update={
            "coolant": cfg.coolant.model_copy(update={"subscriptions": []}),
            "rules": cfg.rules.model_copy(update={"enabled": False}),
        })
        super().__init__(bare, backend, store, clock=clock)
        self.cfg = cfg
        self.coolant = CoolantIngest(cfg, self.clock)
        self.state.coolant = self.coolant.state
        self.controller = make_controller(cfg, coolant_fed=bool(cfg.coolant.subscriptions))
        self.sim = backend
        self.model = model
        self.after_tick = after_tick
        self.started_at = self.clock.monotonic()
        self._cdu_at = self.started_at

    async def start(self) -> Any:
        infos = await super().start()
        self.started_at = self._cdu_at = self.clock.monotonic()
        return infos

    async def tick(self) -> None:
        """The CDU first (what it publishes now is what this tick reads, as over MQTT), then
        the daemon's tick, then the view."""
        self._step_cdu()
        await super().tick()
        if self.after_tick is not None:
            self.after_tick(self)

    def _step_cdu(self) -> None:
        """GPU power in, CDU messages and TCS supply temperature out, for the time that passed."""
        now = self.clock.monotonic()
        gpu_w = sum((s.power_w or 0.0) for s in self.state.gpus.values() if s.healthy)
        self.model.step(now - self._cdu_at, CDU_NODES * (gpu_w + 2_000.0))
        self._cdu_at = now
        self.coolant.handle_batch(self.model.messages(self.clock.wall_ns()))
        self.sim.coolant_supply_c = self.model.tcs_supply_c

    @property
    def elapsed_s(self) -> float:
        return self.clock.monotonic() - self.started_at


def demo_config(*, gpus: int, interval_s: float, profile: str, seed: int, state_dir: Path) -> AgentConfig:
    """The demo's configuration: the simulator, the in-process CDU's subscription, no site rules."""
    return AgentConfig.model_validate({
        "backend": "sim", "interval": interval_s, "state_dir": str(state_dir), "node": "demo",
        "sim": {"gpus": gpus, "seed": seed, "profile": profile},
        "coolant": {"subscriptions": [subscription_for("json")]},
        "rules": {"dirs": [], "params": DEMO_PARAMS},
    })


def split_faults(faults: Sequence[Fault]) -> tuple[list[Fault], list[Fault]]:
    """``(cdu_faults, gpu_faults)``: the CDU model plays the first, the simulated GPUs the second."""
    return [f for f in faults if not is_gpu_kind(f.kind)], [f for f in faults if is_gpu_kind(f.kind)]


def check_gpu_faults(faults: Sequence[Fault], gpus: int) -> None:
    """Raise ValueError (naming the fault and the GPUs there are) for a GPU fault whose GPU
    index this node does not have."""
    for f in split_faults(faults)[1]:
        if f.gpu is None or not 0 <= f.gpu < gpus:
            raise ValueError(f"fault {fault_spec(f)}: there is no GPU {f.target} (the demo runs {gpus} GPUs: "
                             f"0-{gpus - 1}; the target of a GPU fault is its index)")


async def run_daemon(cfg: AgentConfig, model: CduModel, duration_s: float, *, clock: Clock | None = None,
                     on_frame: Callable[[DemoDaemon], None] | None = None,
                     signals: bool = False, gpu_faults: Sequence[Fault] = ()) -> DemoDaemon:
    """Run the demo daemon for ``duration_s`` (on ``clock``: a FakeClock runs it at full speed);
    ``gpu_faults`` are played by the simulated GPUs."""
    backend = SimBackend(gpus=cfg.sim.gpus, seed=cfg.sim.seed, profile=cfg.sim.profile,
                         coolant_supply_c=cfg.sim.coolant_supply_c, faults=gpu_faults)
    stop = asyncio.Event()

    def after_tick(d: DemoDaemon) -> None:
        if on_frame is not None:
            on_frame(d)
        if d.elapsed_s >= duration_s - 1e-9:
            stop.set()

    daemon = DemoDaemon(cfg, backend, open_store(cfg), model, clock=clock, after_tick=after_tick)
    await daemon.start()
    if signals:
        install_stop_handlers(stop)
    await daemon.run(stop)
    return daemon


# -- how long to run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DurationPlan:
    """The duration chosen for a run without ``--duration``, and the reason, for the operator."""

    duration_s: float
    reason: str
    fired_s: tuple[tuple[str, float], ...] = ()  # (rule, first firing, s after the start) in the preview


def plan_duration(cfg: AgentConfig, faults: Sequence[Fault], *, model_kwargs: Mapping[str, Any] | None = None,
                  ) -> DurationPlan:
    """How long the demo must run for ``faults`` to show what they do.

    Without faults: ``DEFAULT_DURATION_S``. With faults: the same simulation (same seed, GPUs,
    CDU and rules) runs first on a fake clock up to ``PREVIEW_AFTER_S`` past the last fault's
    start (about a second of CPU); the demo then lasts until the last rule that fired there
    fires, plus ``MARGIN_S``. Releases are not waited for (each rule's ``clear_for`` is minutes).
    """
    if not faults:
        return DurationPlan(DEFAULT_DURATION_S, "")
    horizon_s = max(f.start_s for f in faults) + PREVIEW_AFTER_S
    cdu_faults, gpu_faults = split_faults(faults)
    with tempfile.TemporaryDirectory(prefix="agentd-demo-preview-") as tmp:
        preview = cfg.model_copy(update={"interval": max(cfg.interval, PREVIEW_INTERVAL_S), "state_dir": Path(tmp)})
        model = CduModel(site=cfg.site, unit="cdu-1", seed=cfg.sim.seed, faults=cdu_faults, **(model_kwargs or {}))
        daemon = asyncio.run(run_daemon(preview, model, horizon_s, clock=FakeClock(), gpu_faults=gpu_faults))
    first: dict[str, float] = {}
    per_instance: dict[tuple[str, int | None], float] = {}  # a GPU rule fires on each GPU in turn
    for ev in daemon.recent_events:
        if ev.to_state == "firing":
            first.setdefault(ev.rule, ev.at - daemon.started_at)
            per_instance.setdefault((ev.rule, ev.gpu), ev.at - daemon.started_at)
    specs = ", ".join(fault_spec(f) for f in faults)
    if not first:
        duration = max(DEFAULT_DURATION_S, max(f.start_s for f in faults) + MARGIN_S)
        return DurationPlan(duration, f"running {duration:.0f} s: in a fast preview of this same simulation "
                                      f"({horizon_s:.0f} s), {specs} made no rule fire (--duration S to choose)")
    fired = tuple(sorted(first.items(), key=lambda kv: kv[1]))
    duration = max(DEFAULT_DURATION_S, math.ceil(max(per_instance.values())) + MARGIN_S)
    what = ", ".join(f"{rule} at {_times(rule, per_instance)}" for rule, _ in fired)
    return DurationPlan(duration, f"running {duration:.0f} s, long enough for {specs}: in a fast preview of this "
                                  f"same simulation these rules fire: {what} (then {MARGIN_S:.0f} s more; "
                                  "releases take minutes: --duration S to choose)", fired)


def _times(rule: str, per_instance: Mapping[tuple[str, int | None], float]) -> str:
    """When a rule's instances first fired: ``20 s``, ``20 s and 30 s``, ``20-35 s`` (more)."""
    times = sorted({round(t) for (r, _), t in per_instance.items() if r == rule})
    if len(times) == 1:
        return f"{times[0]} s"
    if len(times) == 2:
        return f"{times[0]} s and {times[1]} s"
    return f"{times[0]}-{times[-1]} s"


def fault_spec(f: Fault) -> str:
    """A fault as it is written on the command line (``leak@10``, ``xid79:3@30``)."""
    target = f":{f.target}" if f.target else ""
    return f"{f.kind}{target}@{f.start_s:g}" + (f"+{f.duration_s:g}" if f.duration_s is not None else "")


# -- the view -----------------------------------------------------------------------------------


def _fmt(value: float | None, width: int, spec: str) -> str:
    return (format(value, spec) if value is not None else "n/a").rjust(width)


def clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` columns, ending in "..." when cut."""
    return line if len(line) <= width else line[:max(0, width - 3)] + "..."


def node_state(firing: Iterable[tuple[str, str]], advice: Mapping[str, Sequence[str]], capped_gpus: int,
               node_capped: bool, degraded: bool) -> str:
    """The node's state as a scheduler would be told it (DESIGN.md section 7), from the worst
    thing going on: a firing critical rule > drain advice > a cap > anything else firing, a
    degraded coolant sensor or advice > ok. ``firing`` is ``(rule, severity)`` pairs."""
    firing = list(firing)
    if any(sev == "critical" for _, sev in firing):
        return "critical"
    if advice.get("drain"):
        return "drain"
    if capped_gpus or node_capped:
        return "throttled"
    if firing or degraded or any(advice.values()):
        return "degraded"
    return "ok"


def _firing(step: ControlStep | None) -> list[tuple[str, str, int]]:
    """Firing rules as ``(rule, severity, instances)``, the most severe first."""
    if step is None:
        return []
    count: dict[tuple[str, str], int] = {}
    for inst in step.evaluation.firing():
        count[(inst.rule, inst.severity)] = count.get((inst.rule, inst.severity), 0) + 1
    return sorted(((r, s, n) for (r, s), n in count.items()), key=lambda x: (-_SEVERITY_RANK.get(x[1], 0), x[0]))


def _capped(daemon: Daemon) -> int:
    """GPUs whose target is below their baseline (written, or only intended in a dry run)."""
    return sum(1 for c in daemon.actuator.controls.values()
               if c.target_w is not None and c.baseline_w is not None and c.target_w < c.baseline_w - 1.0)


def state_of(daemon: Daemon) -> str:
    """``node_state`` of a running daemon."""
    step = daemon.last_step
    now = daemon.clock.monotonic()
    degraded = any(v.degraded for v in daemon.state.coolant.loops(now).values()) or any(
        not s.healthy for s in daemon.state.gpus.values())
    return node_state(((r, s) for r, s, _ in _firing(step)), step.evaluation.advice if step else {},
                      _capped(daemon), bool(step and step.evaluation.node_caps), degraded)


def status_rows(daemon: Daemon) -> list[str]:
    """Node state and the caps, the rules behind them, and the advice to the scheduler."""
    step = daemon.last_step
    if step is None:
        return ["node state: starting (rules not evaluated yet)", "firing: -", "advice: -"]
    firing = _firing(step)
    rules = ", ".join(f"{r} [{s}]" + (f" x{n}" if n > 1 else "") for r, s, n in firing) or "none"
    advice = ", ".join(f"{k} ({', '.join(v)})" for k, v in sorted(step.evaluation.advice.items()) if v) or "none"
    mode = "dry run: nothing written" if daemon.cfg.dry_run else "limits applied"
    return [f"node state: {state_of(daemon).upper()}   capped GPUs: {_capped(daemon)}/{len(daemon.state.gpus)} "
            f"({mode})", f"firing: {rules}", f"advice: {advice}", health_row(daemon)]


def health_row(daemon: Daemon) -> str:
    """The GPUs' health in one line: how many are ok, and each other one with its first reason."""
    states = daemon.health.tracker.gpus
    bad = [g for i, g in sorted(states.items()) if g.state != OK]
    good = len(states) - len(bad)
    if not bad:
        return f"GPU health: ok ({good}/{len(states)})" if states else "GPU health: not judged yet"
    shown = "; ".join(f"GPU {g.index} {g.state.upper()}: {g.reasons[0] if g.reasons else '?'}"
                      + (f" (+{len(g.reasons) - 1})" if len(g.reasons) > 1 else "") for g in bad)
    return f"GPU health: {good} ok; {shown}"


def gpu_rows(daemon: Daemon, budget: int) -> list[str]:
    """One row per GPU; when more GPUs than ``budget`` rows, the rest folded into one line."""
    indexes = sorted(daemon.state.gpus)
    shown = indexes if len(indexes) <= budget else indexes[:max(0, budget - 1)]
    rows = []
    for index in shown:
        s = daemon.state.gpus[index]
        health = (s.health or "?").upper() if s.health != OK else "ok"
        if not s.healthy:
            rows.append(f"{index:>3}  {health}  unhealthy: {s.error}")
            continue
        rows.append(f"{index:>3}  {_fmt(s.power_w, 7, '.1f')}  {_fmt(s.limit_w, 7, '.1f')}  {_fmt(s.temp_c, 6, '.1f')}"
                    f"  {_fmt(s.mem_temp_c, 5, '.1f')}  {_fmt((s.energy_j or 0) / 1000, 9, '.2f')}  "
                    f"{_fmt(s.util_pct, 6, '.1f')}  {_fmt(s.sm_clock_mhz, 6, '.0f')}  "
                    f"{'yes' if s.throttled else 'no ':<3}  {health}")
    rest = [daemon.state.gpus[i] for i in indexes[len(shown):]]
    if rest:
        good = [s for s in rest if s.healthy]
        hottest = max((s.temp_c for s in good if s.temp_c is not None), default=None)
        failed = sum(1 for s in rest if s.health == FAIL)
        rows.append(f"  + GPUs {rest[0].index}-{rest[-1].index}: {sum(s.power_w or 0 for s in good):.0f} W, "
                    f"hottest {_fmt(hottest, 0, '.1f')} C, {len(rest) - len(good)} unhealthy, {failed} failed")
    return rows


def coolant_rows(daemon: Daemon) -> list[str]:
    """One row per coolant loop (worst case over its good sensors) and a line saying why a loop
    is not ok: its leak state, the rules firing on its readings, its degraded sensors."""
    now = daemon.clock.monotonic()
    loops = daemon.state.coolant.loops(now)
    if not loops:
        return ["coolant: no readings yet"]
    step = daemon.last_step
    firing_rules = {i.rule for i in step.evaluation.firing()} if step is not None else set()
    engine = daemon.controller.engine if daemon.controller is not None else None
    rows = [_COOLANT_HEAD]
    notes: list[str] = []
    for name, view in loops.items():
        values = [view.worst(f) if f in view.fields else None for f, _, _ in _COOLANT_FIELDS]
        cells = "".join(_fmt(v, w, spec) for v, (_, w, spec) in zip(values, _COOLANT_FIELDS))
        on_loop = sorted(r for r in firing_rules if engine is not None and f"coolant.{name}." in engine.rule(r).when)
        if view.leak in ("Critical", "Warning"):
            state = f"LEAK {view.leak.upper()}"
        elif on_loop:
            state = "ALARM"
        elif view.degraded:
            state = "degraded"
        elif all(v is None for v in values) and view.leak is None:
            state = "no data"  # silent before it was established: not degraded, but not "ok" either
        else:
            state = "ok"
        rows.append(f"{name:<8}{cells}  {state}")
        if on_loop:
            notes.append(f"{name}: {', '.join(on_loop)}")
        if view.degraded:
            sensors = sorted({f"{s.field} {s.status}" for s in view.degraded_sensors})
            notes.append(f"{name} degraded: {', '.join(sensors)}")
    c = daemon.coolant
    bad = f" ({', '.join(f'{k} {v}' for k, v in sorted(c.bad.items()))})" if c.bad else ""
    rows.append(f"coolant messages {c.msgs}, readings {c.readings}, bad {c.bad_msgs}{bad}")
    if notes:
        rows.append("  " + "; ".join(notes))
    return rows


def render(daemon: DemoDaemon, duration_s: float, *, width: int = 80, height: int = 24) -> str:
    """One frame of the live view, at most ``width`` columns and ``height`` lines."""
    cfg = daemon.cfg
    top = [f"gpu-agentd demo  node={daemon.host}  {len(daemon.state.gpus)} simulated GPUs  {cfg.sim.profile}  "
           f"t={daemon.elapsed_s:5.1f}/{duration_s:.0f} s", *status_rows(daemon), "", _GPU_HEAD]
    last = daemon.recent_events[-1] if daemon.recent_events else None
    bottom = ["", *coolant_rows(daemon),
              "last: " + (_event_text(last, daemon.started_at, compact=True) if last else "no rule transition yet"),
              f"GPU power {sum((s.power_w or 0.0) for s in daemon.state.gpus.values() if s.healthy):.0f} W  "
              f"ticks {daemon.stats.ticks}  tick {daemon.stats.tick_s * 1000:.1f} ms  store {daemon.store.backlog()} "
              f"points, {daemon.store.size_bytes() / 1024:.0f} KiB (local)"]
    rows = top + gpu_rows(daemon, max(1, height - len(top) - len(bottom))) + bottom
    return "\n".join(clip(r, width) for r in rows[:height])


def _event_text(ev: Event, t0: float, gpus: str = "", *, compact: bool = False) -> str:
    who = ev.rule + (f" gpu {gpus}" if gpus else (f" gpu {ev.gpu}" if ev.gpu is not None else ""))
    if compact:
        value = f" ({format_value(ev.value)})" if ev.value is not None else ""
        return f"t={ev.at - t0:.1f} s {who} {ev.from_state} -> {ev.to_state}{value}"
    value = f"  value {format_value(ev.value)}" if ev.value is not None else ""
    return f"t={ev.at - t0:6.1f} s  {who:<24} {ev.from_state} -> {ev.to_state}{value}"


def _ranges(indexes: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out: list[str] = []
    start = prev = indexes[0]
    for i in [*indexes[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def timeline(events: Iterable[Event], t0: float, *, width: int = 80, limit: int = TIMELINE_MAX) -> list[str]:
    """Every rule transition as ``t= s  rule [gpu ...]  from -> to  value``; the GPUs of one
    rule that changed together in one tick share a line (the value shown is the first GPU's)."""
    grouped: dict[tuple[float, str, str, str], list[Event]] = {}
    for ev in events:
        grouped.setdefault((ev.at, ev.rule, ev.from_state, ev.to_state), []).append(ev)
    lines = []
    for group in grouped.values():
        gpus = sorted(e.gpu for e in group if e.gpu is not None)
        lines.append("  " + _event_text(group[0], t0, _ranges(gpus) if len(gpus) > 1 else ""))
    if not lines:
        return ["timeline: no rule changed state"]
    if len(lines) > limit:
        half = limit // 2
        lines = [*lines[:half], f"  ... {len(lines) - 2 * half} more (every one is stored as a throttle_event point)",
                 *lines[-half:]]
    return [clip(line, width) for line in ["timeline (rule transitions, t = seconds since the start):", *lines]]


def gpu_event_lines(events: Iterable[Judged], t0_ns: int, *, width: int = 80, limit: int = GPU_EVENTS_MAX) -> list[str]:
    """The GPU events (Xid, ECC, lost / recovered, health changes) as ``t= s  GPU n  kind ...``,
    ``t0_ns`` the wall clock of the start; nothing when there were none."""
    lines = []
    for ev in events:
        action = f" ({ev.action_source}: {ev.action})" if ev.action not in (None, "none") else ""
        what = "" if ev.kind in ("xid", "health") else f"{ev.kind}: "  # their messages start with it
        t_s = (ev.ts_ns - t0_ns) / 1e9
        lines.append(f"  t={t_s:6.1f} s  GPU {ev.gpu}  {ev.severity}{action}  {what}{ev.message}")
    if not lines:
        return []
    if len(lines) > limit:
        half = limit // 2
        lines = [*lines[:half], f"  ... {len(lines) - 2 * half} more (every one is stored as a gpu_event point)",
                 *lines[-half:]]
    return [clip(line, width) for line in ["GPU events (stored as gpu_event points):", *lines]]


def summary(daemon: DemoDaemon, state_dir: Path) -> tuple[str, str]:
    """What the run produced, read back from the store the daemon wrote: the run and the rules'
    side, then the GPU health side."""
    samples = [s for s in daemon.state.gpus.values() if s.healthy]
    energy_kj = sum((s.energy_j or 0.0) for s in samples) / 1000
    peak_c = max((s.temp_c or 0.0) for s in samples) if samples else float("nan")
    store = Store(Path(state_dir) / "store.sqlite", max_bytes=daemon.cfg.store.max_bytes)
    try:
        counts = {m: len(store.query(measurement=m))
                  for m in ("gpu", "coolant", "agent", "throttle_event", "gpu_health", "gpu_event")}
    finally:
        store.close()
    return (f"summary: {daemon.stats.ticks} ticks, {len(samples)} GPUs, {energy_kj:.1f} kJ drawn, "
            f"hottest GPU {peak_c:.1f} C, node state at the end: {state_of(daemon)}; "
            f"the store holds {counts['gpu']} gpu points, {counts['coolant']} coolant points, "
            f"{counts['agent']} agent points and {counts['throttle_event']} throttle_event points "
            f"({daemon.stats.ticks_missed} ticks missed)"), health_summary(daemon, counts)


def health_summary(daemon: Daemon, counts: Mapping[str, int]) -> str:
    """The GPUs' health at the end and what the health tracker stored."""
    states = [g.state for g in daemon.health.tracker.gpus.values()]
    health = ", ".join(f"{states.count(st)} {st}" for st in ("ok", "warn", "fail") if st in states) or "not judged"
    return (f"GPU health at the end: {health}; the store holds {counts['gpu_health']} gpu_health points and "
            f"{counts['gpu_event']} gpu_event points")


# -- the command --------------------------------------------------------------------------------


def run_demo(*, duration_s: float | None, gpus: int, interval_s: float, profile: str, seed: int,
             state_dir: Path | None, out: IO[str] | None = None, faults: list[Fault] | None = None,
             clock: Clock | None = None, size: tuple[int, int] | None = None,
             model_kwargs: Mapping[str, Any] | None = None) -> DemoDaemon:
    """Run the demo and print the view, a summary and the timeline.

    ``duration_s`` None: ``plan_duration`` chooses (and the choice is printed). ``size``
    (columns, lines) defaults to the terminal's (80x24 when it cannot tell). ``clock`` and
    ``model_kwargs`` (``CduModel`` options, e.g. ``leak_critical_after_s``) are for tests.
    """
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 (got: {duration_s})")
    out = out or sys.stdout
    faults = faults or []
    check_gpu_faults(faults, gpus)
    cdu_faults, gpu_faults = split_faults(faults)
    live = out.isatty()
    width, height = size or tuple(shutil.get_terminal_size((80, 24)))
    # Live, the view shows every transition: log lines on the same terminal would tear it.
    with ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentd-demo-")))
        cfg = demo_config(gpus=gpus, interval_s=interval_s, profile=profile, seed=seed, state_dir=state_dir)
        if duration_s is None:
            # The preview's log lines (rule warnings, the GPU faults' errors) are not news: the run
            # itself says them again. setup_logging below configures the run's logging.
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
            plan = plan_duration(cfg, faults, model_kwargs=model_kwargs)
            duration_s = plan.duration_s
            if plan.reason:
                out.write(textwrap.fill(plan.reason, width, subsequent_indent="  ") + "\n")
                out.flush()
        setup_logging("error" if live else "warning", json=False, stream=sys.stderr)
        shown = -math.inf
        run_for = duration_s

        def frame(d: DemoDaemon) -> None:
            nonlocal shown
            if live:
                out.write(_CLEAR + render(d, run_for, width=width, height=height))
            elif d.elapsed_s - shown >= PIPED_EVERY_S - 1e-9 or d.elapsed_s >= run_for - 1e-9:
                shown = d.elapsed_s
                out.write(render(d, run_for, width=width, height=height) + "\n\n")
            out.flush()

        model = CduModel(site=cfg.site, unit="cdu-1", seed=seed, faults=cdu_faults, **(model_kwargs or {}))
        daemon = asyncio.run(run_daemon(cfg, model, duration_s, clock=clock, on_frame=frame,
                                        signals=clock is None, gpu_faults=gpu_faults))
        for part in summary(daemon, state_dir):
            out.write(("\n" if part.startswith("summary") else "") +
                      textwrap.fill(part, width, subsequent_indent="  ") + "\n")
        out.write("\n".join(timeline(daemon.recent_events, daemon.started_at, width=width)) + "\n")
        t0_ns = daemon.clock.wall_ns() - round(daemon.elapsed_s * 1e9)  # the wall clock at the start
        events = gpu_event_lines(daemon.health.recent, t0_ns, width=width)
        if events:
            out.write("\n".join(events) + "\n")
        out.flush()
    return daemon
