"""Rule unit tests in the manner of ``promtool test rules``: ``agentd rules test FILE``.

A test file runs the engine, ``compose`` and the ``Ramp`` over input series on a fake clock and
checks rule states, applied limits and advice at given times::

    rule_files: [../gpu_thermal.yaml]     # relative to this file
    params: {slowdown_margin_c: 5}        # site overrides (optional)
    interval: 10s                         # one step of every series
    gpus: {count: 2, limit_min_w: 200, limit_max_w: 700, limit_default_w: 700}
    ramp: {rise_w_per_s: 25, hold: 30s, jitter: 0, seed: 0}
    defaults:                             # values every test starts from (series override them)
      node: {coolant.leak: OK}
      gpu: {slowdown_c: 89, mem_max_c: 95}
    tests:
      - name: hot GPU is capped, then released
        series:
          node: {coolant.tcs.supply_temp_c: "30"}
          gpu:
            all: {temp_c: "70"}
            1: {temp_c: "70x3 86x30 70x100"}
        expect:
          - at: 1m
            firing: [gpu_near_slowdown[1]]       # exactly these instances fire
            states: {gpu_near_slowdown[0]: inactive}
            limits: {0: 700, 1: 490}             # applied limits, W (or all: W)
            advice: []                           # exactly this advice

Series notation: space-separated values, one per interval from t=0. ``VxN`` is N copies of V
(note: promtool's ``a+bxn`` gives n+1 values; here ``A+BxN`` / ``A-BxN`` gives N values A,
A+B, ...). ``_`` is an absent value (unknown), ``stale`` marks a node signal stale (its last
value stays in the mapping, its name goes in the stale set, as the daemon does). After its last
value a series holds that value. Strings (``coolant.leak``) and booleans (``true``/``false``) are
written bare.

The harness feeds what the daemon would: ``gpu.limit_w`` is the limit applied at the previous
step, ``gpu.limit_{min,max,default}_w`` come from ``gpus:``, ``node.gpus`` is the count,
``node.gpu_power_w`` the sum of ``gpu.power_w`` when every GPU has one, and ``coolant.stale``
is true when a coolant signal is stale at that step (each unless a series gives it).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rules.actions import GpuLimits, Ramp, compose_with_sources
from rules.engine import FIRING, Engine, format_value
from rules.expr import BOOL, GPU_FIELDS, NUMBER, SIGNALS, STRING
from rules.model import (RuleLoadError, RuleSet, format_duration, load_rule_files, parse_duration_s,
                         read_yaml)

STALE = object()  # marker in an expanded series
LIMIT_TOLERANCE_W = 0.5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _dur(v: Any) -> float:
    return parse_duration_s(v)


class GpuSpec(_Strict):
    count: int = Field(1, ge=1, le=64)
    limit_min_w: float = Field(200.0, gt=0)
    limit_max_w: float = Field(700.0, gt=0)
    limit_default_w: float | None = None


class RampSpec(_Strict):
    rise_w_per_s: float = Field(25.0, gt=0)
    hold: float = 30.0
    jitter: float = Field(0.0, ge=0, lt=1)
    seed: int = 0

    _d = field_validator("hold", mode="before")(classmethod(lambda cls, v: _dur(v)))


SeriesMap = dict[str, str | float | int | bool]


class Series(_Strict):
    node: SeriesMap = Field(default_factory=dict)
    gpu: dict[int | Literal["all"], SeriesMap] = Field(default_factory=dict)


class Expect(_Strict):
    at: float
    firing: list[str] | None = None
    states: dict[str, Literal["inactive", "pending", "firing"]] = Field(default_factory=dict)
    limits: dict[int | Literal["all"], float] = Field(default_factory=dict)
    advice: list[Literal["no_new_work", "drain"]] | None = None

    _d = field_validator("at", mode="before")(classmethod(lambda cls, v: _dur(v)))


class Case(_Strict):
    name: str
    series: Series = Field(default_factory=Series)
    expect: list[Expect] = Field(min_length=1)


class Defaults(_Strict):
    node: SeriesMap = Field(default_factory=dict)
    gpu: SeriesMap = Field(default_factory=dict)


class TestFile(_Strict):
    rule_files: list[str] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    interval: float = 10.0
    gpus: GpuSpec = Field(default_factory=GpuSpec)
    ramp: RampSpec = Field(default_factory=RampSpec)
    defaults: Defaults = Field(default_factory=Defaults)
    tests: list[Case] = Field(min_length=1)

    _d = field_validator("interval", mode="before")(classmethod(lambda cls, v: _dur(v)))


class TestFileError(Exception):
    """The test file itself is invalid (not a failing test); ``errors`` are located messages."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(slots=True)
class CaseResult:
    file: str
    name: str
    failures: list[str] = field(default_factory=list)  # readable diff lines

    @property
    def ok(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------------------------- series

_SEQ_RE = re.compile(r"^(-?\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)x(\d+)$")
_REP_RE = re.compile(r"^(.+?)x(\d+)$")


def _atom(tok: str, typ: str) -> Any:
    if tok == "_":
        return None
    if tok == "stale":
        return STALE
    if typ == NUMBER:
        try:
            return float(tok)
        except ValueError:
            raise ValueError(f"{tok!r} is not a number") from None
    if typ == BOOL:
        if tok.lower() in ("true", "1"):
            return True
        if tok.lower() in ("false", "0"):
            return False
        raise ValueError(f"{tok!r} is not a boolean (true/false)")
    return tok


def expand_series(text: str | float | int | bool, typ: str = NUMBER,
                  values: tuple[str, ...] = ()) -> list[Any]:
    """``"30 31 45x3 1+2x3 _ stale"`` -> ``[30, 31, 45, 45, 45, 1, 3, 5, None, STALE]``."""
    if isinstance(text, bool):
        text = "true" if text else "false"
    out: list[Any] = []
    for tok in str(text).split():
        m = _SEQ_RE.match(tok) if typ == NUMBER else None
        if m:
            a, b, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
            out.extend(a + b * k for k in range(n))
            continue
        m = _REP_RE.match(tok)
        if m and not (typ == STRING and m.group(1) + "x" + m.group(2) in values):
            out.extend([_atom(m.group(1), typ)] * int(m.group(2)))
            continue
        out.append(_atom(tok, typ))
    if not out:
        raise ValueError("empty series")
    if typ == STRING and values:
        for v in out:
            if isinstance(v, str) and v not in values:
                raise ValueError(f"{v!r} is not a value of this signal (one of {', '.join(values)})")
    return out


def _signal_type(name: str, where: str) -> tuple[str, str, tuple[str, ...]]:
    """(key, type, allowed values) of a series name; raises ValueError for an unknown one."""
    if where == "gpu":
        key = name[4:] if name.startswith("gpu.") else name
        if key not in GPU_FIELDS:
            raise ValueError(f"unknown GPU signal {name!r} (one of {', '.join(GPU_FIELDS)})")
        return key, GPU_FIELDS[key][0], SIGNALS[f"gpu.{key}"].values
    sig = SIGNALS.get(name)
    if sig is None or sig.where != "node":
        raise ValueError(f"unknown node signal {name!r} (coolant.<loop>.<field>, coolant.leak, "
                         "coolant.stale, node.gpu_power_w, node.gpus)")
    return name, sig.type, sig.values


def _at(series: list[Any], step: int) -> Any:
    return series[step] if step < len(series) else series[-1]


# ------------------------------------------------------------------------------------- running

def load_test_file(path: Path | str) -> tuple[TestFile, RuleSet]:
    source, data = _read(path)
    try:
        tf = TestFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling)"
            got = err.get("input")
            got_txt = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got: {got!r})"
            lines.append(f"{source}: {loc}: {msg}{got_txt}")
        raise TestFileError(lines) from exc
    if tf.interval <= 0:
        raise TestFileError([f"{source}: interval: must be positive (got: {tf.interval})"])
    base = Path(path).parent
    try:
        rs = load_rule_files([base / f for f in tf.rule_files])
        rs.resolve_params(tf.params, source=f"{source}: params")
    except RuleLoadError as exc:
        raise TestFileError(exc.errors) from exc
    return tf, rs


def _read(path: Path | str) -> tuple[str, Any]:
    try:
        return read_yaml(path)
    except RuleLoadError as exc:
        raise TestFileError(exc.errors) from exc


def run_test_file(path: Path | str) -> list[CaseResult]:
    """Run every test of one file. Raises TestFileError when the file (or a rule file) is invalid."""
    tf, rs = load_test_file(path)
    return [_run_case(str(path), tf, rs, i, case) for i, case in enumerate(tf.tests)]


def _prepare_series(source: str, where: str, tf: TestFile, case: Case
                    ) -> tuple[dict[str, list[Any]], dict[int, dict[str, list[Any]]]]:
    errors: list[str] = []
    node: dict[str, list[Any]] = {}
    gpu: dict[int, dict[str, list[Any]]] = {i: {} for i in range(tf.gpus.count)}

    def add(target: dict[str, list[Any]], name: str, text: Any, kind: str, loc: str) -> None:
        try:
            key, typ, values = _signal_type(name, kind)
            target[key] = expand_series(text, typ, values)
        except ValueError as exc:
            errors.append(f"{source}: {loc}.{name}: {exc} (got: {text!r})")

    for name, text in tf.defaults.node.items():
        add(node, name, text, "node", "defaults.node")
    for name, text in case.series.node.items():
        add(node, name, text, "node", f"{where}.series.node")
    for i in gpu:
        for name, text in tf.defaults.gpu.items():
            add(gpu[i], name, text, "gpu", "defaults.gpu")
    # "all" first, then per-GPU series on top of it
    for sel in sorted(case.series.gpu, key=lambda s: (s != "all", str(s))):
        targets = list(gpu) if sel == "all" else [sel]
        for i in targets:
            if i not in gpu:
                errors.append(f"{source}: {where}.series.gpu.{sel}: no such GPU (gpus.count is "
                              f"{tf.gpus.count})")
                continue
            for name, text in case.series.gpu[sel].items():
                add(gpu[i], name, text, "gpu", f"{where}.series.gpu.{sel}")
    if errors:
        raise TestFileError(errors)
    return node, gpu


_SEL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.:-]*)(?:\[(\d+)\])?$")


def _select(sel: str, engine: Engine, gpus: int, source: str, loc: str) -> list[tuple[str, int | None]]:
    m = _SEL_RE.match(sel)
    names = {r.name: r for r in engine.rule_set.rules}
    if not m or m.group(1) not in names:
        raise TestFileError([f"{source}: {loc}: unknown rule instance {sel!r} (rules: "
                             f"{', '.join(sorted(names))}; a GPU instance is written rule[INDEX])"])
    rule = names[m.group(1)]
    if rule.scope != "gpu":
        if m.group(2) is not None:
            raise TestFileError([f"{source}: {loc}: {rule.name} has scope {rule.scope}: write it "
                                 f"without [INDEX] (got: {sel!r})"])
        return [(rule.name, None)]
    if m.group(2) is not None:
        idx = int(m.group(2))
        if idx >= gpus:
            raise TestFileError([f"{source}: {loc}: no GPU {idx} (gpus.count is {gpus})"])
        return [(rule.name, idx)]
    return [(rule.name, i) for i in range(gpus)]


def _label(key: tuple[str, int | None]) -> str:
    return key[0] if key[1] is None else f"{key[0]}[{key[1]}]"


def _run_case(source: str, tf: TestFile, rs: RuleSet, ci: int, case: Case) -> CaseResult:
    where = f"tests[{ci}]"
    node_series, gpu_series = _prepare_series(source, where, tf, case)
    engine = Engine(rs, tf.params)
    rspec = tf.ramp
    ramp = Ramp(rise_w_per_s=rspec.rise_w_per_s, hold_s=rspec.hold, jitter=rspec.jitter,
                rng=random.Random(rspec.seed))
    g = tf.gpus
    default_w = g.limit_default_w if g.limit_default_w is not None else g.limit_max_w
    bounds = {i: GpuLimits(g.limit_min_w, g.limit_max_w, default_w) for i in range(g.count)}
    applied = {i: default_w for i in range(g.count)}

    by_step: dict[int, list[tuple[int, Expect]]] = {}
    for ei, exp in enumerate(case.expect):
        k = exp.at / tf.interval
        step = round(k)
        if not math.isclose(k, step, abs_tol=1e-9):
            raise TestFileError([f"{source}: {where}.expect[{ei}].at: {format_duration(exp.at)} is not a "
                                 f"multiple of the interval {format_duration(tf.interval)}"])
        by_step.setdefault(step, []).append((ei, exp))
    result = CaseResult(source, case.name)
    last_node: dict[str, Any] = {}
    for step in range(max(by_step) + 1):
        now = step * tf.interval
        node: dict[str, Any] = {"node.gpus": g.count}
        stale: set[str] = set()
        for name, series in node_series.items():
            v = _at(series, step)
            if v is STALE:
                stale.add(name)
                v = last_node.get(name)
            else:
                last_node[name] = v
            node[name] = v
        gpus: dict[int, dict[str, Any]] = {}
        for i in range(g.count):
            vals: dict[str, Any] = {"limit_w": applied[i], "limit_min_w": g.limit_min_w,
                                    "limit_max_w": g.limit_max_w, "limit_default_w": default_w}
            for key, series in gpu_series[i].items():
                v = _at(series, step)
                vals[key] = None if v is STALE else v
            gpus[i] = vals
        if "node.gpu_power_w" not in node_series:
            powers = [v.get("power_w") for v in gpus.values()]
            node["node.gpu_power_w"] = None if None in powers else sum(powers)
        if "coolant.stale" not in node_series:
            node["coolant.stale"] = any(s.startswith("coolant.") for s in stale)
        ev = engine.evaluate(now, node, gpus, stale)
        targets = compose_with_sources(ev.ceilings, bounds, ev.node_caps)
        applied = ramp.step(now, {i: t.watts for i, t in targets.items()}, applied, bounds)
        for ei, exp in by_step.get(step, []):
            lines = _check(source, f"{where}.expect[{ei}]", exp, engine, ev.advice, applied, targets, g.count)
            if lines:
                result.failures.append(f"at {format_duration(now) if now else '0s'} (t={now:g}s, step {step}):")
                result.failures.extend("  " + ln for ln in lines)
    return result


def _check(source: str, loc: str, exp: Expect, engine: Engine, advice: dict[str, list[str]],
           applied: dict[int, float], targets: dict[int, Any], count: int) -> list[str]:
    out: list[str] = []
    states = engine.states
    if exp.firing is not None:
        want: set[tuple[str, int | None]] = set()
        for sel in exp.firing:
            want.update(_select(sel, engine, count, source, f"{loc}.firing"))
        got = {k for k, inst in states.items() if inst.state == FIRING}
        if want != got:
            out.append("firing instances differ (- expected, missing; + not expected):")
            out.extend(f"  - {_label(k)}" for k in sorted(want - got, key=str))
            out.extend(f"  + {_label(k)}" for k in sorted(got - want, key=str))
    for sel, state in exp.states.items():
        for key in _select(sel, engine, count, source, f"{loc}.states"):
            inst = states.get(key)
            got_state = inst.state if inst is not None else "inactive"
            if got_state != state:
                since = f" (since {format_duration(inst.since) if inst.since else '0s'})" if inst else ""
                val = f", value {format_value(inst.value)}" if inst is not None and inst.value is not None else ""
                out.append(f"{_label(key)}: expected {state}, got {got_state}{since}{val}")
    limits: dict[int, float] = {}
    if "all" in exp.limits:
        limits = {i: exp.limits["all"] for i in range(count)}
    for gpu_sel, w in exp.limits.items():
        if isinstance(gpu_sel, int):
            if not 0 <= gpu_sel < count:
                raise TestFileError([f"{source}: {loc}.limits.{gpu_sel}: no such GPU (gpus.count is {count})"])
            limits[gpu_sel] = w
    for i, w in sorted(limits.items()):
        got_w = applied[i]
        if abs(got_w - w) > LIMIT_TOLERANCE_W:
            t = targets[i]
            out.append(f"limit GPU {i}: expected {w:g} W, got {got_w:.1f} W "
                       f"(target {t.watts:.1f} W from {t.source})")
    if exp.advice is not None:
        want_a, got_a = set(exp.advice), set(advice)
        if want_a != got_a:
            srcs = "; ".join(f"{a} from {', '.join(advice[a])}" for a in sorted(got_a)) or "none"
            out.append(f"advice: expected {sorted(want_a)}, got {sorted(got_a)} ({srcs})")
    return out


def format_results(results: list[CaseResult]) -> str:
    lines = []
    for r in results:
        if r.ok:
            lines.append(f"PASS  {r.file}: {r.name}")
        else:
            lines.append(f"FAIL  {r.file}: {r.name}")
            lines.extend("    " + ln for ln in r.failures)
    return "\n".join(lines)
