"""The API's view of one tick: built once at the end of the tick, immutable, swapped whole.

Every read the API serves comes from the last ``Snapshot``: no request touches NVML, the rule
engine or the actuator, and none waits for the tick. ``build_snapshot`` is pure: plain values
of one tick in (``TickInput``, gathered by ``agentd.api.runtime``), the snapshot out. It builds
the throttle body at once (the MQTT publisher compares it every tick); the other bodies are built
on the first request for them, and every body's JSON is serialised once per snapshot, so 500
requests a second cost 500 copies of cached bytes, not 500 serialisations.

The state, worst wins (docs/api.md):

====  ==========  ============================================================================
0     ok          nothing firing and every input fresh
1     degraded    a stale input (a coolant sensor the node depends on, no GPU reading this
                  tick), a GPU's health warn/fail or a GPU that could not be read, or a firing
                  rule that neither caps nor advises
2     throttled   a cap applied: some GPU's target below its baseline (a rule, a lease, the site
                  budget, or the ramp still rising back after a release)
3     drain       a firing rule advises drain
4     critical    a critical-severity rule is firing
====  ==========  ============================================================================

``accept_new_work`` is false when a firing rule advises ``no_new_work`` or ``drain``, or the state
is critical; ``no_new_work`` advice does not change the state beyond what the rest says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agentd.api.leases import Lease
from agentd.api.models import (
    CapLease,
    CapLeases,
    Coolant,
    CoolantField,
    CoolantLoop,
    CoolantSensor,
    GpuDetail,
    Gpus,
    KubernetesRecommendation,
    LeaseGpu,
    Reason,
    Recommendations,
    RuleBody,
    RuleInstance,
    Rules,
    SlurmRecommendation,
    Taint,
    Throttle,
    ThrottleGpu,
    ThrottleJob,
    iso_ms,
)
from agentd.api.rule_facts import ADVICE_RANK, RuleFacts
from collectors.base import GpuSample
from collectors.coolant_state import LoopView, SensorView
from rules.actions import NodeCap
from rules.engine import format_value, gpu_values

STATES = ("ok", "degraded", "throttled", "drain", "critical")
OK, DEGRADED, THROTTLED, DRAIN, CRITICAL = range(5)
CAPPED_BELOW_W = 0.01  # a target this far under the baseline is a cap (the actuator's CHANGE_W)
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
KIND_ORDER = {"rule": 0, "health": 1, "stale": 2, "lease": 3, "budget": 4}
TAINT_KEY = "agentd.io/throttle"
SLURM_REASON_CHARS = 200
MAX_SENSORS_LISTED = 512


def public_source(source: str) -> str:
    """The composition's source names as the API spells them: ``rule:<name>``, ``lease:<id>``,
    ``budget``, ``baseline``, ``ramp``."""
    if not source or source == "baseline":
        return "baseline"
    if source == "ramp" or source.startswith("lease:"):
        return source
    if source == "node:budget":
        return "budget"
    if source.startswith("node:"):
        return "rule:" + source[5:]
    return "rule:" + source


# -- the plain values of one tick --------------------------------------------------------------


class ControlView(NamedTuple):
    """A copy of ``agentd.actuator.GpuControl`` at the end of the tick (the actuator's is live)."""

    baseline_w: float | None
    target_w: float | None
    set_w: float | None
    source: str
    externally_limited: bool
    observe_only: bool
    error: str | None


class Firing(NamedTuple):
    """One rule instance in the pending or firing state (a copy: the engine's are live)."""

    rule: str
    gpu: int | None
    state: str  # pending | firing
    since_mono: float
    value: Any
    facts: RuleFacts


@dataclass(frozen=True, slots=True)
class RuleHealthView:
    healthy: bool
    errors: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class BudgetView:
    """The site budget this tick (``agentd.site.node.NodeSiteStep``)."""

    budget_w: float
    source: str  # lease | failsafe
    level: str  # uncapped | capped | failsafe
    node_cap_w: float
    lease_age_s: float | None
    why: str | None


@dataclass(frozen=True, slots=True)
class JobView:
    kind: str
    job_id: str
    gpus: tuple[int, ...]
    cls: str


@dataclass(frozen=True, slots=True)
class TickInput:
    """Everything the API shows of one tick, as plain values (see ``agentd.api.runtime``)."""

    site: str
    node: str
    interval_s: float
    dry_run: bool
    expires_after_s: float
    wall_ns: int  # the tick's wall time
    mono: float  # the tick's monotonic time
    read_ok: bool  # this tick read the GPUs
    last_read_mono: float | None  # the last tick that did
    ticks: int
    samples: Mapping[int, GpuSample]
    controls: Mapping[int, ControlView]
    instances: Sequence[Firing] = ()  # pending and firing
    advice: Mapping[str, Sequence[str]] = field(default_factory=dict)
    rule_caps: Sequence[NodeCap] = ()  # the firing rules' node caps
    budget: BudgetView | None = None
    coolant_fed: bool = False
    loops: Mapping[str, LoopView] = field(default_factory=dict)
    sensors: Sequence[SensorView] = ()
    sensors_total: int = 0
    jobs: Sequence[JobView] = ()
    leases: Sequence[Lease] = ()
    rules: Sequence[RuleFacts] = ()
    rule_health: Mapping[str, RuleHealthView] = field(default_factory=dict)
    events: Sequence[Any] = ()  # agentd.api.events.StampedEvent, oldest first

    def wall_of(self, mono: float) -> int:
        """A monotonic instant of this tick's clock as wall ns."""
        return self.wall_ns - round((self.mono - mono) * 1e9)


# -- the judgement --------------------------------------------------------------------------


def _capped(c: ControlView | None) -> bool:
    return (c is not None and c.target_w is not None and c.baseline_w is not None
            and c.target_w < c.baseline_w - CAPPED_BELOW_W)


def _rule_reason(inp: TickInput, f: Firing) -> Reason:
    facts = f.facts
    if f.gpu is not None:
        sample = inp.samples.get(f.gpu)
        threshold = facts.threshold(gpu_values(sample) if sample is not None and sample.healthy else None)
    else:
        threshold = facts.threshold()
    level = (CRITICAL if facts.severity == "critical" else DRAIN if facts.advice == "drain"
             else THROTTLED if facts.caps else DEGRADED)
    value = None if f.value is None else format_value(f.value)
    where = f" on GPU {f.gpu}" if f.gpu is not None else ""
    shown = ", ".join(x for x in (f"value {value}" if value is not None else "",
                                  f"threshold {threshold}" if threshold else "") if x)
    return Reason(kind="rule", rule=f.rule, severity=_severity(facts.severity), gpu=f.gpu, value=value,
                  threshold=threshold, since=iso_ms(inp.wall_of(f.since_mono)), advice=facts.advice,
                  action=",".join(facts.actions) or "none",
                  message=f"{f.rule}{where}: {facts.description or facts.when}" + (f" ({shown})" if shown else ""),
                  source="rule:" + f.rule, level=level)


def _severity(value: str) -> str:
    return value if value in SEVERITY_RANK else "warning"


def _stale_reasons(inp: TickInput) -> list[Reason]:
    out: list[Reason] = []
    if not inp.read_ok:
        age = None if inp.last_read_mono is None else inp.mono - inp.last_read_mono
        since = None if inp.last_read_mono is None else iso_ms(inp.wall_of(inp.last_read_mono))
        out.append(Reason(kind="stale", severity="warning", value="no reading", since=since,
                          message="no GPU reading this tick (NVML hung or failing); values shown are "
                                  + ("from no reading yet" if age is None else f"{age:.1f} s old"),
                          source="gpu", level=DEGRADED))
    for name, view in sorted(inp.loops.items()):
        if not view.degraded:
            continue
        by_field: dict[str, list[SensorView]] = {}
        for s in view.degraded_sensors:
            by_field.setdefault(s.field, []).append(s)
        for fld in sorted(view.degraded_fields):
            sensors = by_field.get(fld, [])
            statuses = sorted({s.status for s in sensors}) or ["stale"]
            worst = max(sensors, key=lambda s: s.age_s, default=None)
            detail = (f"; e.g. {worst.key} {worst.status}, last heard {worst.age_s:.0f} s ago "
                      f"(stale after {worst.stale_after_s:.0f} s)") if worst is not None else ""
            out.append(Reason(kind="stale", severity="warning", value=",".join(statuses),
                              threshold=None if worst is None else f"stale_after_s={worst.stale_after_s:.4g}",
                              message=f"coolant {name} {fld}: {len(sensors) or 'a'} sensor(s) the node depends on "
                                      f"{'/'.join(statuses)}{detail}",
                              source=f"coolant.{name}.{fld}", level=DEGRADED))
    return out


def _health_reasons(inp: TickInput) -> list[Reason]:
    out: list[Reason] = []
    for i in sorted(inp.samples):
        s = inp.samples[i]
        if not s.healthy:
            out.append(Reason(kind="health", severity="critical", gpu=i, value="unreadable",
                              message=f"GPU {i} could not be read: {s.error or 'unknown error'}",
                              source="gpu", level=DEGRADED))
            continue
        health = s.health
        if health in ("warn", "fail"):
            xid = f" (xid {s.xid_last})" if s.xid_last is not None else ""
            out.append(Reason(kind="health", severity="warning" if health == "warn" else "critical", gpu=i,
                              value=health, message=f"gpu {i} health {health}{xid}", source="gpu",
                              level=DEGRADED))
    return out


def _scope_text(lease: Lease) -> str:
    if lease.job is not None:
        return f"job {lease.job}'s GPUs"
    if lease.gpus is not None:
        return "GPUs " + ",".join(str(g) for g in lease.gpus)
    return "every GPU"


def _lease_reasons(inp: TickInput) -> list[Reason]:
    out = []
    for lease in inp.leases:
        source = f"lease:{lease.id}"
        binds = any(c.source == source and _capped(c) for c in inp.controls.values())
        why = f" ({lease.reason})" if lease.reason else ""
        out.append(Reason(kind="lease", severity="info", value=f"{lease.watts:g} W",
                          since=iso_ms(lease.created_ns), action="cap",
                          message=f"cap lease {lease.id}: {lease.watts:g} W per GPU on {_scope_text(lease)} "
                                  f"until {iso_ms(lease.expires_ns)}{why}",
                          source=source, level=THROTTLED if binds else OK))
    return out


def _budget_reasons(inp: TickInput) -> list[Reason]:
    b = inp.budget
    if b is None or b.level == "uncapped":
        return []
    binds = any(c.source == "node:budget" and _capped(c) for c in inp.controls.values())
    if b.source == "failsafe":
        text = f"no live budget lease ({b.why or 'none'}): the failsafe budget {b.budget_w:g} W holds"
    else:
        age = "" if b.lease_age_s is None else f", lease {b.lease_age_s:.0f} s old"
        text = f"site budget {b.budget_w:g} W for the node's GPUs{age}"
    return [Reason(kind="budget", severity="warning" if b.source == "failsafe" else "info",
                   value=f"{b.budget_w:g} W", action="cap", message=text, source="budget",
                   level=THROTTLED if binds else OK)]


def _order(r: Reason) -> tuple:
    return (-r.level, -SEVERITY_RANK[r.severity], KIND_ORDER[r.kind], r.source, -1 if r.gpu is None else r.gpu)


def _recommendations(state: str, level: int, advice: str, accept: bool, reasons: list[Reason]) -> Recommendations:
    if accept:
        slurm = SlurmRecommendation(state="RESUME", reason=f"agentd: {state}", extra={"agentd_level": level})
    else:
        head = advice if advice != "none" else "critical"
        why = []
        for r in reasons:
            if r.kind != "rule" or r.rule is None:
                continue
            if (advice != "none" and r.advice == advice) or (advice == "none" and r.level == CRITICAL):
                item = r.rule if r.gpu is None else f"{r.rule} gpu {r.gpu}"
                if item not in why:
                    why.append(item)
        text = f"agentd: {head}: {', '.join(why) or state}"
        if len(text) > SLURM_REASON_CHARS:
            text = text[:SLURM_REASON_CHARS - 3] + "..."
        slurm = SlurmRecommendation(state="DRAIN", reason=text, extra={"agentd_level": level})
    effect = ("NoExecute" if advice == "drain" or level == CRITICAL else "NoSchedule" if advice == "no_new_work"
              else None)
    return Recommendations(slurm=slurm, kubernetes=KubernetesRecommendation(
        taint=Taint(key=TAINT_KEY, value=state, effect=effect)))


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def build_throttle(inp: TickInput) -> Throttle:
    """The throttle body of one tick (``age_s`` 0: the server sets it when serving)."""
    reasons = [_rule_reason(inp, f) for f in inp.instances if f.state == "firing"]
    reasons += _health_reasons(inp) + _stale_reasons(inp) + _lease_reasons(inp) + _budget_reasons(inp)
    reasons.sort(key=_order)
    level = max((r.level for r in reasons), default=OK)
    if level < THROTTLED and any(_capped(c) for c in inp.controls.values()):
        level = THROTTLED
    state = STATES[level]
    advice = "none"
    for name, rules in inp.advice.items():
        if rules and ADVICE_RANK.get(name, 0) > ADVICE_RANK[advice]:
            advice = name
    accept = advice == "none" and level < CRITICAL
    caps = [(c.watts, "rule:" + c.source) for c in inp.rule_caps]
    if inp.budget is not None:
        caps.append((inp.budget.node_cap_w, "budget"))
    node_cap = min(caps, default=None)
    gpus, draw = [], 0.0
    for i in sorted(inp.samples):
        s = inp.samples[i]
        c = inp.controls.get(i)
        if s.healthy and s.power_w is not None:
            draw += s.power_w
        gpus.append(ThrottleGpu(index=i, uuid=s.uuid, power_w=_round(s.power_w, 1), limit_w=s.limit_w,
                                target_w=_round(c.target_w) if c else None, baseline_w=c.baseline_w if c else None,
                                source=public_source(c.source) if c else "baseline", health=s.health,
                                temp_c=s.temp_c))
    jobs = []
    for j in inp.jobs:
        base = sum(c.baseline_w for g in j.gpus if (c := inp.controls.get(g)) is not None and c.baseline_w)
        held = sum(c.target_w if c.target_w is not None else c.baseline_w
                   for g in j.gpus if (c := inp.controls.get(g)) is not None and c.baseline_w)
        fraction = min(1.0, max(0.0, 1.0 - held / base)) if base > 0 else 0.0
        jobs.append(ThrottleJob(job_id=j.job_id, kind=j.kind, gpus=list(j.gpus), throttle_fraction=round(fraction, 3),
                                class_=j.cls))
    return Throttle(site=inp.site, node=inp.node, level=level, state=state,
                    accept_new_work=accept, advice=advice, reasons=reasons,
                    node_cap_w=None if node_cap is None else round(node_cap[0], 1),
                    node_cap_source=None if node_cap is None else node_cap[1], draw_w=round(draw, 1),
                    dry_run=inp.dry_run, gpus=gpus, jobs=jobs,
                    recommendations=_recommendations(state, level, advice, accept, reasons),
                    generated_at=iso_ms(inp.wall_ns),
                    expires_at=iso_ms(inp.wall_ns + round(inp.expires_after_s * 1e9)))


# -- the other bodies ----------------------------------------------------------------------


def _sensor(s: SensorView) -> CoolantSensor:
    return CoolantSensor(series=str(s.key), loop=s.key.loop, unit=s.key.unit, field=s.field, value=s.value,
                         quality=s.quality, age_s=round(s.age_s, 3), stale_after_s=round(s.stale_after_s, 3),
                         status=s.status)


def build_coolant(inp: TickInput) -> Coolant:
    loops = []
    for name, v in sorted(inp.loops.items()):
        loops.append(CoolantLoop(
            loop=name, degraded=v.degraded, degraded_fields=sorted(v.degraded_fields), leak=v.leak, series=v.series,
            fields={f: CoolantField(min=a.min, max=a.max, good=a.good, degraded=a.degraded) for f, a in
                    sorted(v.fields.items())},
            degraded_sensors=[_sensor(s) for s in v.degraded_sensors]))
    sensors = [_sensor(s) for s in inp.sensors[:MAX_SENSORS_LISTED]]
    return Coolant(node=inp.node, generated_at=iso_ms(inp.wall_ns), fed=inp.coolant_fed, loops=loops,
                   sensors=sensors, sensors_total=inp.sensors_total, sensors_omitted=inp.sensors_total - len(sensors))


def build_gpus(inp: TickInput) -> Gpus:
    out = []
    for i in sorted(inp.samples):
        s = inp.samples[i]
        c = inp.controls.get(i)
        out.append(GpuDetail(
            index=i, uuid=s.uuid, model=s.model, healthy=s.healthy, error=s.error, health=s.health,
            xid_last=s.xid_last, power_w=s.power_w, power_avg_w=s.power_avg_w, energy_j=s.energy_j, temp_c=s.temp_c,
            mem_temp_c=s.mem_temp_c, util_pct=s.util_pct, mem_util_pct=s.mem_util_pct,
            mem_used_bytes=s.mem_used_bytes, sm_clock_mhz=s.sm_clock_mhz, clock_reasons=s.clock_reasons,
            throttled=s.throttled if s.healthy else None, limit_w=s.limit_w, limit_min_w=s.limit_min_w,
            limit_max_w=s.limit_max_w, limit_default_w=s.limit_default_w,
            baseline_w=c.baseline_w if c else None, target_w=_round(c.target_w) if c else None,
            set_w=_round(c.set_w) if c else None, source=public_source(c.source) if c else "baseline",
            externally_limited=c.externally_limited if c else False,
            observe_only=c.observe_only if c else inp.dry_run, write_error=c.error if c else None,
            sampled_at=iso_ms(s.ts_ns) if s.ts_ns else None))
    return Gpus(node=inp.node, generated_at=iso_ms(inp.wall_ns), gpus=out)


def build_rules(inp: TickInput) -> Rules:
    by_rule: dict[str, list[RuleInstance]] = {}
    for f in inp.instances:
        by_rule.setdefault(f.rule, []).append(RuleInstance(
            gpu=f.gpu, state=f.state, since=iso_ms(inp.wall_of(f.since_mono)),
            value=None if f.value is None else format_value(f.value)))
    health = inp.rule_health
    out = []
    for facts in inp.rules:
        h = health.get(facts.name)
        out.append(RuleBody(
            name=facts.name, scope=facts.scope, severity=facts.severity, description=facts.description,
            when=facts.when, for_s=facts.for_s, clear_for_s=facts.clear_for_s, stale=facts.stale,
            actions=list(facts.actions), advice=facts.advice, healthy=h.healthy if h else True,
            errors=h.errors if h else 0, last_error=h.last_error if h else None,
            instances=sorted(by_rule.get(facts.name, []), key=lambda r: -1 if r.gpu is None else r.gpu)))
    return Rules(node=inp.node, generated_at=iso_ms(inp.wall_ns), rules=out)


def lease_body(inp: TickInput | None, lease: Lease, in_scope: Sequence[int] | None = None, note: str = "") -> CapLease:
    """A lease with what it does per GPU at the tick of ``inp`` (None: before the first tick)."""
    samples = inp.samples if inp is not None else {}
    controls = inp.controls if inp is not None else {}
    if in_scope is None:
        in_scope = lease_scope(inp, lease)
    per_gpu = []
    source = f"lease:{lease.id}"
    for i in in_scope:
        s = samples.get(i)
        c = controls.get(i)
        lo = s.limit_min_w if s is not None else None
        hi = s.limit_max_w if s is not None else None
        clamped_w = None if lo is None or hi is None else min(max(lease.watts, lo), hi)
        clamped = clamped_w is not None and clamped_w != lease.watts
        per_gpu.append(LeaseGpu(index=i, clamped_w=clamped_w, clamped=clamped, min_w=lo, max_w=hi,
                                target_w=_round(c.target_w) if c else None,
                                enforced_w=s.limit_w if s is not None else None,
                                binding=c is not None and c.source == source))
    if not note and any(g.clamped for g in per_gpu):
        note = ("watts is outside some GPUs' limits: they hold the nearest limit they can (clamped_w); "
                "target_w and enforced_w are from the last tick")
    return CapLease(id=lease.id, watts=lease.watts, ttl_s=lease.ttl_s, scope=lease.scope, gpus=
                    list(lease.gpus) if lease.gpus is not None else None, job=lease.job, reason=lease.reason,
                    created_at=iso_ms(lease.created_ns), renewed_at=iso_ms(lease.renewed_ns),
                    expires_at=iso_ms(lease.expires_ns), in_scope=list(in_scope), per_gpu=per_gpu,
                    note=note or "target_w and enforced_w are from the last tick: a new or changed lease shows "
                                 "from the next one")


def lease_scope(inp: TickInput | None, lease: Lease) -> list[int]:
    """The GPUs ``lease`` covers at the tick of ``inp``."""
    present = sorted(inp.samples) if inp is not None else []
    if lease.gpus is not None:
        return [g for g in lease.gpus if g in present] if inp is not None else list(lease.gpus)
    if lease.job is not None:
        gpus: set[int] = set()
        for j in inp.jobs if inp is not None else ():
            if j.job_id == lease.job:
                gpus.update(j.gpus)
        return sorted(gpus)
    return present


def build_caps(inp: TickInput) -> CapLeases:
    return CapLeases(node=inp.node, generated_at=iso_ms(inp.wall_ns),
                     leases=[lease_body(inp, lease) for lease in inp.leases])


# -- the snapshot ---------------------------------------------------------------------------


class Snapshot:
    """One tick's bodies; JSON serialised once each, on first use. Never changed once built."""

    __slots__ = ("inp", "throttle", "_throttle_json", "_json")

    def __init__(self, inp: TickInput, throttle: Throttle) -> None:
        self.inp = inp
        self.throttle = throttle
        self._throttle_json: bytes | None = None
        self._json: dict[str, bytes] = {}

    @property
    def gpu_indices(self) -> frozenset[int]:
        return frozenset(self.inp.samples)

    def throttle_bytes(self, now_wall_ns: int) -> bytes:
        """The throttle body with ``age_s`` as of ``now_wall_ns`` (cached bytes + one number)."""
        base = self._throttle_json
        if base is None:
            base = self._throttle_json = self.throttle.model_dump_json(exclude={"age_s"}).encode()
        age = max(0.0, (now_wall_ns - self.inp.wall_ns) / 1e9)
        return base[:-1] + b',"age_s":' + f"{age:.3f}".encode() + b"}"

    def body(self, name: str) -> bytes:
        """``gpus``, ``coolant``, ``rules`` or ``caps`` as JSON bytes (built on first use)."""
        cached = self._json.get(name)
        if cached is None:
            model = _BUILDERS[name](self.inp)
            cached = self._json[name] = model.model_dump_json(by_alias=True).encode()
        return cached

    def events_bytes(self, since_ns: int | None, after_seq: int | None, limit: int) -> bytes:
        """The recorded events after ``since_ns`` / ``after_seq``, oldest first, at most ``limit``."""
        chosen = [e for e in self.inp.events
                  if (since_ns is None or e.ts_ns > since_ns) and (after_seq is None or e.seq > after_seq)]
        chosen = chosen[:limit]
        head = (b'{"node":' + _json_str(self.inp.node) + b',"generated_at":"' + iso_ms(self.inp.wall_ns).encode()
                + b'","events":[')
        return head + b",".join(e.json for e in chosen) + b"]}"


def _json_str(text: str) -> bytes:
    return json.dumps(text).encode()


_BUILDERS = {"gpus": build_gpus, "coolant": build_coolant, "rules": build_rules, "caps": build_caps}


def build_snapshot(inp: TickInput) -> Snapshot:
    """The snapshot of one tick (pure: values in, immutable bodies out)."""
    return Snapshot(inp, build_throttle(inp))
