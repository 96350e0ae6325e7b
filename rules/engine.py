"""The rule engine: one Prometheus-style state machine per rule instance, on an injected clock.

States: ``inactive`` -> ``pending`` (``when`` true; for ``for: 0s`` straight to ``firing``) ->
``firing`` (``when`` held for ``for``) -> resolved (``clear_when``, default ``not when``, held for
``clear_for``: an event ``firing -> resolved``, and the instance is ``inactive`` again). A pending
instance whose ``when`` turns false goes back to ``inactive``. Every transition is an ``Event``.

Instances: one per GPU for ``scope: gpu`` (keyed ``(rule, gpu_index)``), one per rule otherwise
(``(rule, None)``).

Inputs, fed by the daemon each tick (``Engine.evaluate``):
  - ``node``: ``{full signal name: value}`` for every non-GPU signal (``coolant.tcs.flow_lpm``,
    ``coolant.leak``, ``coolant.stale``, ``node.gpu_power_w``, ``node.gpus``); absent = unknown;
  - ``gpus``: ``{index: {field: value}}`` with the ``GpuSample`` field names (``temp_c``,
    ``limit_w``, ``throttled``...; ``gpu_values(sample)`` builds one); an unreadable GPU gives
    ``None`` values;
  - ``stale``: names of node signals that are stale, or prefixes of them (``coolant.tcs`` makes
    every ``coolant.tcs.*`` stale, ``coolant`` all coolant signals except ``coolant.stale``).
    A stale signal reads as unknown; a condition that stays unknown follows the rule's ``stale``
    policy: ``ignore`` holds the state, ``fire`` treats it as true (pending/firing continue,
    firing does not clear), ``resolve`` treats it as false.

Cost: expressions are closures compiled once (rules/expr.py); evaluate allocates only the
result lists and, when a rule reads a stale signal, one masked copy of the node mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping

from rules.actions import Ceiling, NodeCap
from rules.expr import GPU_FIELDS, UNMASKABLE, Fn, Window, WindowSpec, bind_node
from rules.model import Advise, CapGpu, CapNode, Rule, RuleSet, format_duration, resolve_number

INACTIVE, PENDING, FIRING, RESOLVED = "inactive", "pending", "firing", "resolved"

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_NODE_ONLY = ((None, _EMPTY),)  # the one "instance" of a node/coolant-scope rule


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gpu_values(sample: Any) -> dict[str, Any]:
    """The ``gpus[i]`` mapping for one ``collectors.base.GpuSample`` (read by attribute name, so
    rules needs no import of collectors)."""
    return {f: getattr(sample, f, None) for f in GPU_FIELDS}


@dataclass(slots=True)
class Instance:
    """One rule instance's state. A live object: it changes at the next ``evaluate``."""

    rule: str
    gpu: int | None
    severity: str
    state: str = INACTIVE
    since: float = 0.0  # when it entered ``state``
    value: Any = None  # left-hand side of the main comparison, while pending/firing
    clearing_since: float | None = None  # firing and the clear condition holds since then
    stale: bool = False  # the last evaluation fell back on the rule's ``stale`` policy
    windows: list[Window] = field(default_factory=list, repr=False)
    latch: dict[int, float] = field(default_factory=dict, repr=False)  # cap_gpu delta_w ceilings

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.rule, self.gpu)


@dataclass(slots=True, frozen=True)
class Event:
    """A transition; the daemon stores it as a ``throttle_event``, logs and publishes it."""

    rule: str
    gpu: int | None
    from_state: str
    to_state: str  # pending | firing | inactive | resolved
    severity: str
    at: float  # the engine's clock (monotonic seconds)
    value: Any  # float, or a string (coolant.leak)
    message: str


@dataclass(slots=True)
class Evaluation:
    """What one ``evaluate`` produced."""

    at: float
    states: Mapping[tuple[str, int | None], Instance]  # live view of every instance
    events: list[Event]
    ceilings: list[Ceiling]  # per-GPU proposals from firing rules (source = rule name)
    node_caps: list[NodeCap]
    advice: dict[str, list[str]]  # "no_new_work" / "drain" -> rules advising it
    errors: list[tuple[str, str]] = field(default_factory=list)  # (rule, error) that raised this tick

    def firing(self) -> list[Instance]:
        return [i for i in self.states.values() if i.state == FIRING]


@dataclass(slots=True)
class RuleHealth:
    """Whether a rule's last evaluation succeeded, and its last error (for logs, API, metrics).

    An unhealthy rule's instances hold their state (a firing cap stays: fail safe) until it
    evaluates again.
    """

    healthy: bool = True
    errors: int = 0  # evaluations that raised, since the engine started
    last_error: str | None = None
    last_error_at: float | None = None  # engine clock


# Per action, resolved at bind time: (kind, number) with kind in watts|fraction|delta|node|advise
_ActionSpec = tuple[str, Any]


@dataclass(slots=True)
class _Compiled:
    rule: Rule
    name: str
    is_gpu: bool
    severity: str
    when_fn: Fn
    clear_fn: Fn | None
    value_fn: Fn | None
    for_s: float
    clear_for_s: float
    when_unknown: bool | None  # what an unknown ``when`` counts as (None = hold)
    clear_unknown: bool | None  # what an unknown ``clear_when`` counts as
    stale_keys: frozenset[str]
    node_signal_keys: tuple[tuple[str, tuple[str, ...]], ...]
    window_specs: list[WindowSpec]
    window_sources: tuple[Fn, ...]
    actions: tuple[_ActionSpec, ...]
    label: str
    instances: dict[int | None, Instance] = field(default_factory=dict)


def _prefixes(name: str) -> tuple[str, ...]:
    parts = name.split(".")
    return tuple(".".join(parts[:k]) for k in range(len(parts), 0, -1))


class Engine:
    """Evaluate a RuleSet with site ``params`` (overrides of the packs' defaults)."""

    def __init__(self, rules: RuleSet, params: Mapping[str, Any] | None = None) -> None:
        self.params = rules.resolve_params(dict(params or {}))
        self.rule_set = rules
        self._rules: list[_Compiled] = [self._compile(r) for r in rules.rules]
        self._by_name = {c.name: c for c in self._rules}
        self._states: dict[tuple[str, int | None], Instance] = {}
        self._states_view = MappingProxyType(self._states)
        self._firing: dict[tuple[str, int | None], Instance] = {}
        self._health: dict[str, RuleHealth] = {c.name: RuleHealth() for c in self._rules}

    # ------------------------------------------------------------------------------ compile
    def _compile(self, r: Rule) -> _Compiled:
        specs: list[WindowSpec] = []
        when_fn = r.when_expr.bind(self.params, specs)
        clear_fn = r.clear_expr.bind(self.params, specs) if r.clear_expr is not None else None
        main = r.when_expr.main_operand()
        value_fn = bind_node(main, self.params, specs) if main is not None else None
        policy = r.stale or "ignore"  # always set by Rule's validator; "or" for the type checker
        when_unknown = {"ignore": None, "fire": True, "resolve": False}[policy]
        clear_unknown = {"ignore": None, "fire": False, "resolve": True}[policy]
        signals = set(r.when_expr.signals)
        if r.clear_expr is not None:
            signals |= r.clear_expr.signals
        node_sigs = sorted(s for s in signals if not s.startswith("gpu.") and s not in UNMASKABLE)
        keys = tuple((s, _prefixes(s)) for s in node_sigs)
        actions: list[_ActionSpec] = []
        for a in r.actions:
            if isinstance(a, CapGpu):
                if a.watts is not None:
                    actions.append(("watts", resolve_number(a.watts, self.params)))
                elif a.fraction is not None:
                    actions.append(("fraction", resolve_number(a.fraction, self.params)))
                else:
                    actions.append(("delta", resolve_number(a.delta_w, self.params)))
            elif isinstance(a, CapNode):
                actions.append(("node", resolve_number(a.watts, self.params)))
            elif isinstance(a, Advise):
                actions.append(("advise", a.advice))
        return _Compiled(
            rule=r, name=r.name, is_gpu=r.scope == "gpu", severity=r.severity, when_fn=when_fn,
            clear_fn=clear_fn, value_fn=value_fn, for_s=r.for_, clear_for_s=r.clear_for,
            when_unknown=when_unknown, clear_unknown=clear_unknown,
            stale_keys=frozenset(k for _, ks in keys for k in ks), node_signal_keys=keys,
            window_specs=specs, window_sources=tuple(s.source for s in specs),
            actions=tuple(actions), label=r.description or r.when)

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self, now: float, node: Mapping[str, Any], gpus: Mapping[int, Mapping[str, Any]],
                 stale: set[str] | frozenset[str] = frozenset()) -> Evaluation:
        """One tick at monotonic time ``now`` (see the module doc for the inputs)."""
        events: list[Event] = []
        errors: list[tuple[str, str]] = []
        for cr in self._rules:
            # One failing rule (a site's own, say) must not silence the others (Prometheus' rule
            # group does the same): its instances hold their state, it is marked unhealthy with
            # its last error, and every other rule still evaluates this tick.
            try:
                self._evaluate_rule(cr, now, node, gpus, stale, events)
            except Exception as exc:  # noqa: BLE001 - any bug in one rule is contained here
                error = f"{type(exc).__name__}: {exc}"
                health = self._health[cr.name]
                health.healthy, health.last_error, health.errors = False, error, health.errors + 1
                health.last_error_at = now
                errors.append((cr.name, error))
            else:
                self._health[cr.name].healthy = True
        ceilings, node_caps, advice = self._proposals(gpus)
        return Evaluation(now, self._states_view, events, ceilings, node_caps, advice, errors)

    def _evaluate_rule(self, cr: _Compiled, now: float, node: Mapping[str, Any],
                       gpus: Mapping[int, Mapping[str, Any]], stale: set[str] | frozenset[str],
                       events: list[Event]) -> None:
        """Advance every instance of one rule by one tick (raises what the rule raises)."""
        to = self._to
        n = node
        if stale and cr.stale_keys and not cr.stale_keys.isdisjoint(stale):
            n = self._mask(cr, node, stale)
        when_fn, clear_fn, value_fn = cr.when_fn, cr.clear_fn, cr.value_fn
        wsrc = cr.window_sources
        insts = cr.instances
        # The state machine, inlined (this loop runs rules x GPUs times per tick).
        for idx, g in (gpus.items() if cr.is_gpu else _NODE_ONLY):
            inst = insts.get(idx)
            if inst is None:
                inst = self._new(cr, idx, now)
            w = inst.windows
            if wsrc:
                for k, src in enumerate(wsrc):
                    w[k].push(now, src(g, n, w))
            state = inst.state
            if state is not FIRING:
                v = when_fn(g, n, w)
                if v is None:
                    inst.stale = True
                    v = cr.when_unknown
                    if v is None:
                        continue  # stale: ignore -> hold
                elif inst.stale:
                    inst.stale = False
                if v:
                    if value_fn is not None:
                        inst.value = value_fn(g, n, w)
                    if state is INACTIVE:
                        to(cr, inst, now, FIRING if cr.for_s <= 0 else PENDING, events)
                    elif now - inst.since >= cr.for_s:
                        to(cr, inst, now, FIRING, events)
                elif state is PENDING:
                    to(cr, inst, now, INACTIVE, events)
                continue
            # firing: does the clear condition hold, and long enough?
            if clear_fn is not None:
                c = clear_fn(g, n, w)
                if c is None:
                    inst.stale = True
                    c = cr.clear_unknown
                else:
                    inst.stale = False
            else:
                v = when_fn(g, n, w)
                if v is None:
                    inst.stale = True
                    v = cr.when_unknown
                else:
                    inst.stale = False
                c = None if v is None else not v
            if value_fn is not None:
                inst.value = value_fn(g, n, w)
            if c is None:
                continue  # unknown and stale: ignore -> hold everything
            if c:
                if inst.clearing_since is None:
                    inst.clearing_since = now
                if now - inst.clearing_since >= cr.clear_for_s:
                    to(cr, inst, now, INACTIVE, events, resolved=True)
            else:
                inst.clearing_since = None

    def _new(self, cr: _Compiled, gpu: int | None, now: float) -> Instance:
        inst = Instance(cr.name, gpu, cr.severity, INACTIVE, now,
                        windows=[s.new() for s in cr.window_specs])
        cr.instances[gpu] = inst
        self._states[(cr.name, gpu)] = inst
        return inst

    @staticmethod
    def _mask(cr: _Compiled, node: Mapping[str, Any], stale: set[str] | frozenset[str]) -> dict[str, Any]:
        masked = dict(node)
        for name, keys in cr.node_signal_keys:
            for k in keys:
                if k in stale:
                    masked[name] = None
                    break
        return masked

    def _to(self, cr: _Compiled, inst: Instance, now: float, to: str, events: list[Event],
            resolved: bool = False) -> None:
        frm = inst.state
        shown = RESOLVED if resolved else to
        events.append(Event(cr.name, inst.gpu, frm, shown, cr.severity, now, inst.value,
                            self._message(cr, inst, shown, now)))
        inst.state = to
        inst.since = now
        inst.clearing_since = None
        if to is FIRING:
            self._firing[(cr.name, inst.gpu)] = inst
        elif frm is FIRING:
            self._firing.pop((cr.name, inst.gpu), None)
            inst.latch.clear()
        if to is INACTIVE:
            inst.value = None

    @staticmethod
    def _message(cr: _Compiled, inst: Instance, to: str, now: float) -> str:
        where = f" on GPU {inst.gpu}" if inst.gpu is not None else ""
        val = "" if inst.value is None else f" (value {format_value(inst.value)})"
        if to == PENDING:
            text = f"{cr.name} pending{where}: {cr.label}{val}; fires if it holds {format_duration(cr.for_s)}"
        elif to == FIRING:
            text = f"{cr.name} firing{where}: {cr.label}{val}"
        elif to == RESOLVED:
            text = (f"{cr.name} resolved{where}: clear condition held "
                    f"{format_duration(cr.clear_for_s)}{val}")
        else:
            text = f"{cr.name} inactive{where}: condition no longer holds after {format_duration(now - inst.since)}"
        if inst.stale:
            text += f" [input stale/unknown, handled by stale: {cr.rule.stale}]"
        return text

    def _proposals(self, gpus: Mapping[int, Mapping[str, Any]]
                   ) -> tuple[list[Ceiling], list[NodeCap], dict[str, list[str]]]:
        ceilings: list[Ceiling] = []
        node_caps: list[NodeCap] = []
        advice: dict[str, list[str]] = {}
        if not self._firing:
            return ceilings, node_caps, advice
        for (name, gpu), inst in self._firing.items():
            cr = self._by_name[name]
            for kind, x in cr.actions:
                if kind == "node":
                    node_caps.append(NodeCap(x, name))
                elif kind == "advise":
                    sources = advice.setdefault(x, [])
                    if name not in sources:
                        sources.append(name)
                else:
                    targets = (gpu,) if cr.is_gpu and gpu is not None else tuple(gpus)
                    for i in targets:
                        g = gpus.get(i)
                        if g is None:
                            continue
                        watts = self._cap_watts(kind, x, inst, i, g)
                        if watts is not None:
                            ceilings.append(Ceiling(i, watts, name))
        return ceilings, node_caps, advice

    @staticmethod
    def _cap_watts(kind: str, x: float, inst: Instance, i: int, g: Mapping[str, Any]) -> float | None:
        if kind == "watts":
            return x
        if kind == "fraction":
            mx = g.get("limit_max_w")
            return None if mx is None else round(x * mx, 3)
        latched = inst.latch.get(i)
        if latched is None:
            base = g.get("limit_w")
            if base is None:
                base = g.get("limit_max_w")
            if base is None:
                return None
            latched = inst.latch[i] = base + x
        return latched

    # ------------------------------------------------------------------------------ queries
    @property
    def states(self) -> Mapping[tuple[str, int | None], Instance]:
        return self._states_view

    def adopt_states(self, old: Engine) -> list[str]:
        """Take over the rule instances of ``old`` for every rule whose definition is unchanged
        (a reload must not reset a firing cap or a pending ``for``); returns their names.

        A rule whose text changed starts afresh (its windows may differ); a rule that is gone
        takes its instances with it. Param changes keep the state: the next evaluation applies
        the new values (a firing rule then clears through its own ``clear_for``).
        """
        kept: list[str] = []
        for cr in self._rules:
            prev = old._by_name.get(cr.name)
            if prev is None or prev.rule.model_dump() != cr.rule.model_dump():
                continue
            cr.instances = prev.instances
            for gpu, inst in prev.instances.items():
                self._states[(cr.name, gpu)] = inst
                if inst.state is FIRING:
                    self._firing[(cr.name, gpu)] = inst
            self._health[cr.name] = old._health[cr.name]
            kept.append(cr.name)
        return kept

    @property
    def health(self) -> Mapping[str, RuleHealth]:
        """Per rule name: healthy or not, with its last error."""
        return MappingProxyType(self._health)

    def rule(self, name: str) -> Rule:
        return self._by_name[name].rule
