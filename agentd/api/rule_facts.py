"""What the API says about a rule, worked out once per rule set: its actions and advice, and the
threshold its main comparison is held against (the ``threshold`` of a throttle reason).

Pure, and cached per engine: a rule set changes only on a reload, so the tick pays for none of
this but a dict lookup and, for a GPU rule whose threshold depends on the GPU (``gpu.slowdown_c
- params.gpu_slowdown_margin_c``), one compiled closure call.

The threshold is the right-hand side of the comparison the engine reports the value of (the
first one, as ``Expr.main_operand`` picks it): ``tcs_supply_max_c=40`` when it is one param,
``98 (tcs_flow_rated_lpm=140, tcs_flow_low_ratio=0.7)`` when it is worked out from params,
``84 (gpu_slowdown_margin_c=5)`` when it depends on the GPU, ``Critical`` for a literal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rules.engine import Engine, format_value
from rules.expr import BoolOp, Compare, Fn, Lit, Node, Not, Param, Sig, WindowCall, WindowSpec, bind_node
from rules.model import Advise, Rule

ADVICE_RANK = {"none": 0, "no_new_work": 1, "drain": 2}


@dataclass(frozen=True, slots=True)
class RuleFacts:
    """One rule as the API reports it."""

    name: str
    scope: str
    severity: str
    description: str
    when: str
    for_s: float
    clear_for_s: float
    stale: str
    actions: tuple[str, ...]  # action types: cap_gpu, cap_node, advise, event
    advice: str  # the strongest advice among its actions, or "none"
    caps: bool  # it has a cap_gpu or cap_node action
    threshold_static: str | None  # the threshold when it depends on params only
    threshold_fn: Fn | None  # else, per GPU: fn(gpu_values, {}, []) -> number
    threshold_params: str  # "name=value, ..." of the params the threshold reads

    def threshold(self, gpu_values: Mapping[str, Any] | None = None) -> str | None:
        """The threshold as text (for a GPU rule, of the GPU whose values are given)."""
        if self.threshold_fn is None or gpu_values is None:
            return self.threshold_static
        try:
            value = self.threshold_fn(gpu_values, {}, [])
        except Exception:  # noqa: BLE001 - a report must never fail the tick
            value = None
        if value is None:
            return self.threshold_static
        text = format_value(value)
        return f"{text} ({self.threshold_params})" if self.threshold_params else text


def _main_compare(root: Node) -> Compare | None:
    """The comparison whose left side ``Expr.main_operand`` reports (depth-first, left first)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Compare):
            return node
        if isinstance(node, BoolOp):
            stack.extend(reversed(node.operands))
        elif isinstance(node, Not):
            stack.append(node.operand)
    return None


def _walk(node: Node) -> list[Node]:
    out = [node]
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, Node):
            out += _walk(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Node):
                    out += _walk(item)
    return out


def _threshold(rule: Rule, params: Mapping[str, Any]) -> tuple[str | None, Fn | None, str]:
    compare = _main_compare(rule.when_expr.root)
    if compare is None or len(compare.operands) < 2:
        return None, None, ""
    rhs = compare.operands[1]
    nodes = _walk(rhs)
    names = list(dict.fromkeys(n.name for n in nodes if isinstance(n, Param)))
    listed = ", ".join(f"{n}={format_value(params.get(n))}" for n in names)
    if isinstance(rhs, Param):
        return listed, None, listed
    if isinstance(rhs, Lit):
        return format_value(rhs.value), None, ""
    windows: list[WindowSpec] = []
    try:
        fn = bind_node(rhs, params, windows)
    except Exception:  # noqa: BLE001 - a report, not a rule: say what we can
        return listed or None, None, listed
    if windows or any(isinstance(n, WindowCall) for n in nodes):
        return listed or None, None, listed  # a window needs the engine's history: name the params only
    if not any(isinstance(n, Sig) for n in nodes):
        try:
            value = fn({}, {}, [])
        except Exception:  # noqa: BLE001
            value = None
        if value is None:
            return listed or None, None, listed
        return (f"{format_value(value)} ({listed})" if listed else format_value(value)), None, listed
    return listed or None, fn, listed


def rule_facts(rule: Rule, params: Mapping[str, Any]) -> RuleFacts:
    """The facts of one loaded rule under the engine's resolved ``params``."""
    advice = "none"
    for a in rule.actions:
        if isinstance(a, Advise) and ADVICE_RANK[a.advice] > ADVICE_RANK[advice]:
            advice = a.advice
    types = tuple(a.type for a in rule.actions)
    static, fn, listed = _threshold(rule, params)
    return RuleFacts(rule.name, rule.scope, rule.severity, rule.description, rule.when, rule.for_,
                     rule.clear_for, rule.stale or "ignore", types, advice,
                     any(t in ("cap_gpu", "cap_node") for t in types), static, fn, listed)


class FactsCache:
    """``RuleFacts`` per rule of the engine last seen; rebuilt when the engine changes (a reload)."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._facts: dict[str, RuleFacts] = {}

    def of(self, engine: Engine) -> dict[str, RuleFacts]:
        if engine is not self._engine:
            self._engine = engine
            self._facts = {r.name: rule_facts(r, engine.params) for r in engine.rule_set.rules}
        return self._facts
