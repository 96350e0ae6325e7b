"""Rule expressions: a small typed language, parsed and type-checked once, run as closures.

Why not ``eval`` or a general evaluator: a rule file comes from a site's ``rules.d``; it must not
be able to run code, and every mistake (a misspelt signal, comparing the leak state with a
number, ``10 sec`` for a window) must be a load error that names the column, not a surprise at
3 a.m. So the grammar is ours, small, and each node is compiled to a closure
``fn(gpu, node, windows) -> value`` with constants (numbers, ``params.*``) folded at bind time.

Grammar (precedence low to high)::

    expr    := or
    or      := and ('or' and)*
    and     := not ('and' not)*
    not     := 'not' not | compare
    compare := sum (('<' | '<=' | '>' | '>=' | '==' | '!=') sum)*     # chained: a < b < c
    sum     := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := '-' unary | atom
    atom    := NUMBER | STRING | 'true' | 'false' | SIGNAL | FUNC '(' args ')' | '(' expr ')'

Functions: ``min(a, b, ...)``, ``max(a, b, ...)``, ``abs(a)`` and the windows
``avg_over(x, 10s)``, ``max_over(x, 30s)``, ``min_over(x, 1m)`` (x any number expression; the
engine feeds one window per rule instance each evaluation). A duration literal (``10s``,
``500ms``, ``2m``) is only allowed as a window length.

Values are three-valued: a missing input (``None``: not reported, stale, GPU unreadable) makes
arithmetic and comparisons ``None`` ("unknown"); ``and``/``or``/``not`` follow Kleene logic, so
``coolant.leak == "Critical" or coolant.tcs.supply_temp_c > 45`` is true when the leak is
Critical even if the temperature is unknown. The engine maps a final unknown through the rule's
``stale`` policy.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Mapping

NUMBER, STRING, BOOL, DURATION = "number", "string", "bool", "duration"

# A compiled expression: fn(gpu_values, node_values, windows) -> value | None
Fn = Callable[[Mapping[str, Any], Mapping[str, Any], list], Any]


@dataclass(frozen=True, slots=True)
class Signal:
    """A named input. ``key`` is where the engine finds it: in the GPU's mapping (``gpu`` scope,
    keyed by the short field name, as on ``GpuSample``) or in the node mapping (full name)."""

    name: str
    type: str
    where: str  # "gpu" | "node"
    key: str
    values: tuple[str, ...] = ()  # allowed values of a string signal (checked against literals)
    doc: str = ""


LEAK_STATES = ("OK", "Warning", "Critical", "Unavailable", "Absent")
HEALTH_STATES = ("ok", "warn", "fail")  # collectors.gpu_health (rules does not import collectors)
COOLANT_LOOPS = ("facility", "tcs")
GPU_FIELDS: dict[str, tuple[str, str]] = {
    "power_w": (NUMBER, "instantaneous board power, W"),
    "power_avg_w": (NUMBER, "driver's ~1 s average power, W"),
    "temp_c": (NUMBER, "GPU core temperature, C"),
    "mem_temp_c": (NUMBER, "HBM temperature, C"),
    "slowdown_c": (NUMBER, "the GPU's own HW slowdown threshold, C"),
    "shutdown_c": (NUMBER, "the GPU's own HW shutdown threshold, C"),
    "gpu_max_c": (NUMBER, "the GPU's max operating temperature, C"),
    "mem_max_c": (NUMBER, "the HBM's max operating temperature, C"),
    "limit_w": (NUMBER, "enforced power limit now, W"),
    "limit_max_w": (NUMBER, "device's max power limit, W"),
    "limit_min_w": (NUMBER, "device's min power limit, W"),
    "limit_default_w": (NUMBER, "device's default power limit, W"),
    "util_pct": (NUMBER, "GPU utilisation, %"),
    "sm_clock_mhz": (NUMBER, "SM clock, MHz"),
    "throttled": (BOOL, "clocks held down (power cap, thermal, power brake)"),
    # GPU health (collectors.gpu_health annotates the sample before the rules run; the counters
    # are the last values read, so they are known between two reads)
    "health": (STRING, "GPU health judged from Xid events and health counters: ok / warn / fail"),
    "xid_last": (NUMBER, "the last Xid seen on the GPU since the daemon started"),
    "ecc_dbe_volatile": (NUMBER, "uncorrectable ECC errors since the last driver load or GPU reset"),
    "ecc_sbe_volatile": (NUMBER, "corrected ECC errors since the last driver load or GPU reset"),
    "remap_pending": (BOOL, "a row remap waits for the next GPU reset"),
    "remap_failure": (BOOL, "a row remap failed: the GPU has no spare rows left"),
    "pcie_replay": (NUMBER, "PCIe replay counter"),
}
# The allowed values of the string GPU signals (a literal outside them is a load error).
GPU_FIELD_VALUES: dict[str, tuple[str, ...]] = {"health": HEALTH_STATES}
COOLANT_FIELDS: dict[str, str] = {
    "supply_temp_c": "supply temperature, C",
    "return_temp_c": "return temperature, C",
    "delta_temp_c": "return - supply, C",
    "flow_lpm": "flow, l/min",
    "supply_pressure_kpa": "supply pressure, kPa",
    "return_pressure_kpa": "return pressure, kPa",
    "delta_pressure_kpa": "supply - return pressure, kPa",
    "pump_speed_pct": "CDU pump speed, %",
}


def _build_registry() -> dict[str, Signal]:
    reg: dict[str, Signal] = {}
    for f, (typ, doc) in GPU_FIELDS.items():
        reg[f"gpu.{f}"] = Signal(f"gpu.{f}", typ, "gpu", f, GPU_FIELD_VALUES.get(f, ()), doc=doc)
    for loop in COOLANT_LOOPS:
        for f, doc in COOLANT_FIELDS.items():
            name = f"coolant.{loop}.{f}"
            reg[name] = Signal(name, NUMBER, "node", name, doc=f"{loop} loop {doc}")
    reg["coolant.leak"] = Signal("coolant.leak", STRING, "node", "coolant.leak", LEAK_STATES,
                                 "leak detection state")
    reg["coolant.stale"] = Signal("coolant.stale", BOOL, "node", "coolant.stale",
                                  doc="any coolant input is stale (never masked by staleness itself)")
    reg["node.gpu_power_w"] = Signal("node.gpu_power_w", NUMBER, "node", "node.gpu_power_w",
                                     doc="sum of the node's GPU power, W")
    reg["node.gpus"] = Signal("node.gpus", NUMBER, "node", "node.gpus", doc="GPUs on the node")
    return reg


SIGNALS: dict[str, Signal] = _build_registry()
"""Every signal an expression may name (``params.*`` come from the rule pack on top of these)."""

# Signals that describe staleness themselves: a stale set never masks them.
UNMASKABLE = frozenset({"coolant.stale"})

_DUR_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WINDOW_S = 600.0


class ExprError(Exception):
    """A compile error at a 1-based ``column`` of the expression text."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} at column {column}")
        self.message = message
        self.column = column


# --------------------------------------------------------------------------------------- lexer

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<dur>\d+(?:\.\d+)?(?:ms|s|m|h)(?![A-Za-z0-9_]))
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.]))
  | (?P<str>"[^"\\]*"|'[^'\\]*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\)|,)
  | (?P<bad>\d[\w.]*)
""", re.VERBOSE)

_KEYWORDS = {"and", "or", "not", "true", "false"}


@dataclass(slots=True)
class _Tok:
    kind: str  # num, dur, str, name, op, kw, end
    text: str
    col: int  # 1-based


def _lex(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            bad = text[pos]
            hint = " (use 'and', 'or', 'not')" if bad in "&|!" else ""
            hint = " (use '==' to compare)" if bad == "=" else hint
            raise ExprError(f"unexpected character {bad!r}{hint}", pos + 1)
        kind = m.lastgroup or "bad"
        if kind == "bad":
            raise ExprError(f"bad number or duration {m.group()!r} (durations look like 500ms, 10s, "
                            "5m, 1h)", pos + 1)
        if kind != "ws":
            s = m.group()
            if kind == "name" and s in _KEYWORDS:
                kind = "kw"
            if kind == "name" and s in ("True", "False", "None", "null"):
                raise ExprError(f"unknown name {s!r} (booleans are 'true' and 'false')", pos + 1)
            toks.append(_Tok(kind, s, pos + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


# ----------------------------------------------------------------------------------- syntax tree

class _Const:
    """Marker returned by bind() for a constant-folded value."""
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass(slots=True)
class Node:
    type: str
    col: int

    def bind(self, ctx: _Bind) -> Fn | _Const:  # pragma: no cover - overridden
        raise NotImplementedError

    def signals(self) -> set[str]:
        return set()


@dataclass(slots=True)
class Lit(Node):
    value: Any = None

    def bind(self, ctx):
        return _Const(self.value)


@dataclass(slots=True)
class Param(Node):
    name: str = ""

    def bind(self, ctx):
        return _Const(ctx.params[self.name])


@dataclass(slots=True)
class Sig(Node):
    signal: Signal = None  # type: ignore[assignment]

    def bind(self, ctx):
        key = self.signal.key
        if self.signal.where == "gpu":
            if self.signal.type == BOOL:
                def f(g, n, w, key=key):
                    v = g.get(key)
                    return None if v is None else bool(v)
            else:
                def f(g, n, w, key=key):
                    return g.get(key)
        else:
            if self.signal.type == BOOL:
                def f(g, n, w, key=key):
                    v = n.get(key)
                    return None if v is None else bool(v)
            else:
                def f(g, n, w, key=key):
                    return n.get(key)
        return f

    def signals(self):
        return {self.signal.name}


def _lift2(lf: Fn, rf: Fn, op: Callable[[Any, Any], Any]) -> Fn:
    """``op(left, right)`` as a closure, None when either side is unknown; specialised when one
    side is a constant, since most rule expressions compare a signal with a number."""
    if isinstance(rf, _Const):
        c = rf.value
        if c is None:
            return _Const(None)

        def right_const(g, n, w):
            a = lf(g, n, w)
            return None if a is None else op(a, c)
        return right_const
    if isinstance(lf, _Const):
        c = lf.value
        if c is None:
            return _Const(None)

        def left_const(g, n, w):
            b = rf(g, n, w)
            return None if b is None else op(c, b)
        return left_const

    def both(g, n, w):
        a = lf(g, n, w)
        if a is None:
            return None
        b = rf(g, n, w)
        return None if b is None else op(a, b)
    return both


def _arith(op: str) -> Callable[[Any, Any], Any]:
    if op == "/":
        return lambda a, b: None if b == 0 else a / b
    return {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]


@dataclass(slots=True)
class BinOp(Node):
    op: str = ""
    left: Node = None  # type: ignore[assignment]
    right: Node = None  # type: ignore[assignment]

    def bind(self, ctx):
        fop = _arith(self.op)
        lf, rf = self.left.bind(ctx), self.right.bind(ctx)
        if isinstance(lf, _Const) and isinstance(rf, _Const):
            a, b = lf.value, rf.value
            return _Const(None if a is None or b is None else fop(a, b))
        if isinstance(rf, _Const):
            c = rf.value
            if c is None:
                return _Const(None)
            if self.op == "-":
                c2 = -c

                def f(g, n, w):
                    a = lf(g, n, w)
                    return None if a is None else a + c2
                return f
            if self.op == "/" and c == 0:
                return _Const(None)
        return _lift2(lf, rf, fop)

    def signals(self):
        return self.left.signals() | self.right.signals()


@dataclass(slots=True)
class Neg(Node):
    operand: Node = None  # type: ignore[assignment]

    def bind(self, ctx):
        of = self.operand.bind(ctx)
        if isinstance(of, _Const):
            return _Const(None if of.value is None else -of.value)

        def f(g, n, w):
            a = of(g, n, w)
            return None if a is None else -a
        return f

    def signals(self):
        return self.operand.signals()


_CMP = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}


@dataclass(slots=True)
class Compare(Node):
    ops: list[str] = field(default_factory=list)
    operands: list[Node] = field(default_factory=list)

    def bind(self, ctx):
        fns = [o.bind(ctx) for o in self.operands]
        cmps = [_CMP[o] for o in self.ops]
        if all(isinstance(x, _Const) for x in fns):
            vals = [x.value for x in fns if isinstance(x, _Const)]
            if any(v is None for v in vals):
                return _Const(None)
            return _Const(all(c(a, b) for c, a, b in zip(cmps, vals, vals[1:])))
        if len(cmps) == 1:
            return _lift2(fns[0], fns[1], cmps[0])
        getters = [(lambda g, n, w, v=x.value: v) if isinstance(x, _Const) else x for x in fns]
        pairs = list(zip(cmps, range(len(cmps))))

        def f(g, n, w):
            vals = [gt(g, n, w) for gt in getters]
            unknown = False
            for cmp, i in pairs:
                a, b = vals[i], vals[i + 1]
                if a is None or b is None:
                    unknown = True
                elif not cmp(a, b):
                    return False
            return None if unknown else True
        return f

    def signals(self):
        return set().union(*(o.signals() for o in self.operands))


@dataclass(slots=True)
class BoolOp(Node):
    op: str = ""  # and | or
    operands: list[Node] = field(default_factory=list)

    def bind(self, ctx):
        is_and = self.op == "and"
        stop = not is_and  # 'and' stops on False, 'or' on True
        fns = []
        unknown_const = False
        for o in self.operands:
            x = o.bind(ctx)
            if isinstance(x, _Const):
                if x.value is None:
                    unknown_const = True
                elif bool(x.value) is stop:
                    return _Const(stop)
                # a constant that does not decide is dropped
            else:
                fns.append(x)
        if not fns:
            return _Const(None if unknown_const else (not stop))
        if len(fns) == 1 and not unknown_const:
            return fns[0]
        if len(fns) == 2 and not unknown_const:
            a_f, b_f = fns
            if is_and:
                def f(g, n, w):
                    a = a_f(g, n, w)
                    if a is False:
                        return False
                    b = b_f(g, n, w)
                    if b is False:
                        return False
                    return None if a is None or b is None else True
            else:
                def f(g, n, w):
                    a = a_f(g, n, w)
                    if a is True:
                        return True
                    b = b_f(g, n, w)
                    if b is True:
                        return True
                    return None if a is None or b is None else False
            return f
        fns_t = tuple(fns)

        def f(g, n, w):
            unknown = unknown_const
            for x in fns_t:
                v = x(g, n, w)
                if v is None:
                    unknown = True
                elif v is stop:
                    return stop
            return None if unknown else (not stop)
        return f

    def signals(self):
        return set().union(*(o.signals() for o in self.operands))


@dataclass(slots=True)
class Not(Node):
    operand: Node = None  # type: ignore[assignment]

    def bind(self, ctx):
        of = self.operand.bind(ctx)
        if isinstance(of, _Const):
            return _Const(None if of.value is None else not of.value)

        def f(g, n, w):
            a = of(g, n, w)
            return None if a is None else not a
        return f

    def signals(self):
        return self.operand.signals()


@dataclass(slots=True)
class Call(Node):
    func: str = ""
    args: list[Node] = field(default_factory=list)

    def bind(self, ctx):
        fns = [a.bind(ctx) for a in self.args]
        getters = [(lambda g, n, w, v=x.value: v) if isinstance(x, _Const) else x for x in fns]
        if self.func == "abs":
            (a_f,) = getters

            def f(g, n, w):
                a = a_f(g, n, w)
                return None if a is None else abs(a)
            return f
        red = min if self.func == "min" else max
        if len(getters) == 2:
            a_f, b_f = getters

            def f(g, n, w):
                a = a_f(g, n, w)
                if a is None:
                    return None
                b = b_f(g, n, w)
                return None if b is None else red(a, b)
            return f

        def f(g, n, w):
            vals = [x(g, n, w) for x in getters]
            return None if None in vals else red(vals)
        return f

    def signals(self):
        return set().union(*(a.signals() for a in self.args))


@dataclass(slots=True)
class WindowCall(Node):
    func: str = ""  # avg_over | max_over | min_over
    arg: Node = None  # type: ignore[assignment]
    window_s: float = 0.0

    def bind(self, ctx):
        af = self.arg.bind(ctx)
        if isinstance(af, _Const):
            return af
        k = len(ctx.windows)
        ctx.windows.append(WindowSpec(self.func, self.window_s, af))

        def f(g, n, w):
            return w[k].value()
        return f

    def signals(self):
        return self.arg.signals()


# ------------------------------------------------------------------------------------- windows

@dataclass(slots=True)
class WindowSpec:
    """One ``*_over`` call of a rule; each rule instance holds one Window per spec."""

    func: str
    window_s: float
    source: Fn

    def new(self) -> Window:
        return Window(self.func, self.window_s)


class Window:
    """A time window over one value, fed each evaluation: O(1) amortised push and read.

    Unknown samples are skipped; a window with no known sample in range reads unknown.
    ``max_over``/``min_over`` keep a monotonic deque, ``avg_over`` a running sum.
    """

    __slots__ = ("func", "window_s", "_q", "_sum", "_mono")

    def __init__(self, func: str, window_s: float) -> None:
        self.func = func
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()  # avg: all known samples in range
        self._sum = 0.0
        self._mono: deque[tuple[float, float]] = deque()  # max/min: monotonic candidates

    def push(self, now: float, v: Any) -> None:
        horizon = now - self.window_s
        if self.func == "avg_over":
            q = self._q
            if v is not None:
                q.append((now, v))
                self._sum += v
            while q and q[0][0] < horizon:
                self._sum -= q.popleft()[1]
            if not q:
                self._sum = 0.0  # no drift from float error when it empties
        else:
            m = self._mono
            if v is not None:
                if self.func == "max_over":
                    while m and m[-1][1] <= v:
                        m.pop()
                else:
                    while m and m[-1][1] >= v:
                        m.pop()
                m.append((now, v))
            while m and m[0][0] < horizon:
                m.popleft()

    def value(self) -> float | None:
        if self.func == "avg_over":
            return self._sum / len(self._q) if self._q else None
        return self._mono[0][1] if self._mono else None


# -------------------------------------------------------------------------------------- parser

_FUNCS = {"min", "max", "abs"}
_WINDOW_FUNCS = {"avg_over", "max_over", "min_over"}
_CMP_OPS = set(_CMP)


class _Parser:
    def __init__(self, text: str, params: Mapping[str, str], scope: str) -> None:
        self.text = text
        self.toks = _lex(text)
        self.i = 0
        self.params = params  # name -> type
        self.scope = scope

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect_op(self, text: str) -> _Tok:
        t = self.tok
        if t.kind != "op" or t.text != text:
            raise ExprError(f"expected {text!r}, found {t.text or 'end of expression'!r}", t.col)
        return self.next()

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise ExprError("empty expression", 1)
        node = self.or_()
        t = self.tok
        if t.kind != "end":
            raise ExprError(f"unexpected {t.text!r}", t.col)
        return node

    def _need(self, node: Node, typ: str, what: str) -> None:
        if node.type != typ:
            raise ExprError(f"{what} needs a {typ}, got a {node.type}", node.col)

    def or_(self) -> Node:
        return self._boolop("or", self.and_)

    def and_(self) -> Node:
        return self._boolop("and", self.not_)

    def _boolop(self, op: str, sub: Callable[[], Node]) -> Node:
        first = sub()
        if not (self.tok.kind == "kw" and self.tok.text == op):
            return first
        operands = [first]
        while self.tok.kind == "kw" and self.tok.text == op:
            self.next()
            operands.append(sub())
        for o in operands:
            self._need(o, BOOL, f"'{op}'")
        return BoolOp(BOOL, first.col, op, operands)

    def not_(self) -> Node:
        t = self.tok
        if t.kind == "kw" and t.text == "not":
            self.next()
            operand = self.not_()
            self._need(operand, BOOL, "'not'")
            return Not(BOOL, t.col, operand)
        return self.compare()

    def compare(self) -> Node:
        first = self.sum_()
        if not (self.tok.kind == "op" and self.tok.text in _CMP_OPS):
            return first
        ops: list[str] = []
        operands = [first]
        while self.tok.kind == "op" and self.tok.text in _CMP_OPS:
            op_tok = self.next()
            right = self.sum_()
            left = operands[-1]
            if op_tok.text in ("==", "!="):
                if left.type != right.type:
                    raise ExprError(f"cannot compare a {left.type} with a {right.type} using "
                                    f"{op_tok.text!r}", op_tok.col)
            else:
                for side in (left, right):
                    if side.type != NUMBER:
                        raise ExprError(f"{op_tok.text!r} compares numbers, got a {side.type}", side.col)
            self._check_enum(left, right)
            self._check_enum(right, left)
            ops.append(op_tok.text)
            operands.append(right)
        return Compare(BOOL, first.col, ops, operands)

    @staticmethod
    def _check_enum(sig: Node, lit: Node) -> None:
        if isinstance(sig, Sig) and sig.signal.values and isinstance(lit, Lit) and lit.type == STRING:
            if lit.value not in sig.signal.values:
                raise ExprError(f"{lit.value!r} is never a value of {sig.signal.name} (one of "
                                f"{', '.join(sig.signal.values)})", lit.col)

    def _arith_level(self, ops: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        """A left-associative chain of ``ops`` over numeric operands parsed by ``operand``."""
        node = operand()
        while self.tok.kind == "op" and self.tok.text in ops:
            op_tok = self.next()
            right = operand()
            self._need(node, NUMBER, f"{op_tok.text!r}")
            self._need(right, NUMBER, f"{op_tok.text!r}")
            node = BinOp(NUMBER, node.col, op_tok.text, node, right)
        return node

    def sum_(self) -> Node:
        return self._arith_level(("+", "-"), self.term)

    def term(self) -> Node:
        return self._arith_level(("*", "/"), self.unary)

    def unary(self) -> Node:
        t = self.tok
        if t.kind == "op" and t.text == "-":
            self.next()
            operand = self.unary()
            self._need(operand, NUMBER, "'-'")
            return Neg(NUMBER, t.col, operand)
        node = self.atom()
        if node.type == DURATION:
            raise ExprError("a duration is only allowed as the window of avg_over/max_over/min_over",
                            node.col)
        return node

    def atom(self) -> Node:
        t = self.next()
        if t.kind == "num":
            return Lit(NUMBER, t.col, float(t.text))
        if t.kind == "dur":
            m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", t.text)
            assert m is not None
            return Lit(DURATION, t.col, float(m.group(1)) * _DUR_UNITS[m.group(2)])
        if t.kind == "str":
            return Lit(STRING, t.col, t.text[1:-1])
        if t.kind == "kw" and t.text in ("true", "false"):
            return Lit(BOOL, t.col, t.text == "true")
        if t.kind == "op" and t.text == "(":
            inner = self.or_()
            self.expect_op(")")
            return inner
        if t.kind == "name":
            if self.tok.kind == "op" and self.tok.text == "(":
                return self.call(t)
            return self.name(t)
        what = t.text or "end of expression"
        raise ExprError(f"expected a value, found {what!r}", t.col)

    def name(self, t: _Tok) -> Node:
        name = t.text
        if name.startswith("params."):
            pname = name[len("params."):]
            if pname not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise ExprError(f"unknown parameter {name!r} (declare it in the pack's 'params:'; "
                                f"declared: {known})", t.col)
            return Param(self.params[pname], t.col, pname)
        sig = SIGNALS.get(name)
        if sig is None:
            if name in _FUNCS or name in _WINDOW_FUNCS:
                raise ExprError(f"{name!r} is a function: call it as {name}(...)", t.col)
            close = difflib.get_close_matches(name, list(SIGNALS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExprError(f"unknown signal {name!r}{hint}", t.col)
        if sig.where == "gpu" and self.scope != "gpu":
            raise ExprError(f"{name!r} is a per-GPU signal: it needs 'scope: gpu'", t.col)
        return Sig(sig.type, t.col, sig)

    def call(self, t: _Tok) -> Node:
        fname = t.text
        if fname not in _FUNCS and fname not in _WINDOW_FUNCS:
            known = ", ".join(sorted(_FUNCS | _WINDOW_FUNCS))
            raise ExprError(f"unknown function {fname!r} (known: {known})", t.col)
        self.expect_op("(")
        args: list[Node] = []
        if not (self.tok.kind == "op" and self.tok.text == ")"):
            while True:
                if fname in _WINDOW_FUNCS and len(args) == 1 and self.tok.kind == "dur":
                    args.append(self.atom())
                else:
                    args.append(self.or_())
                if self.tok.kind == "op" and self.tok.text == ",":
                    self.next()
                    continue
                break
        self.expect_op(")")
        if fname in _WINDOW_FUNCS:
            if len(args) != 2 or args[1].type != DURATION:
                raise ExprError(f"{fname} takes a number expression and a duration, "
                                f"e.g. {fname}(gpu.power_w, 10s)", t.col)
            self._need(args[0], NUMBER, fname)
            window_s = args[1].value  # type: ignore[attr-defined]
            if not 0 < window_s <= MAX_WINDOW_S:
                raise ExprError(f"window must be > 0 and at most {MAX_WINDOW_S:g}s", args[1].col)
            return WindowCall(NUMBER, t.col, fname, args[0], window_s)
        if fname == "abs" and len(args) != 1:
            raise ExprError("abs takes one argument", t.col)
        if fname in ("min", "max") and len(args) < 2:
            raise ExprError(f"{fname} takes two or more arguments", t.col)
        for a in args:
            self._need(a, NUMBER, fname)
        return Call(NUMBER, t.col, fname, args)


# ------------------------------------------------------------------------------------ public API

@dataclass(slots=True)
class _Bind:
    params: Mapping[str, Any]
    windows: list[WindowSpec]


@dataclass(slots=True)
class Expr:
    """A parsed, type-checked expression. ``bind`` turns it into a closure for given params."""

    text: str
    root: Node
    type: str

    @property
    def signals(self) -> set[str]:
        """The registry signals it reads (``params.*`` excluded)."""
        return self.root.signals()

    def main_operand(self) -> Node | None:
        """The left-hand side of the first comparison (depth-first, left first), if any: the
        "value" an operator wants to see next to a firing rule (86.0 for ``gpu.temp_c > 84``)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if isinstance(node, Compare):
                return node.operands[0]
            if isinstance(node, BoolOp):
                stack.extend(reversed(node.operands))
            elif isinstance(node, Not):
                stack.append(node.operand)
        return None

    def bind(self, params: Mapping[str, Any], windows: list[WindowSpec]) -> Fn:
        """Closure ``fn(gpu_values, node_values, window_list)``; appends its windows' specs to
        ``windows`` (shared by the expressions of one rule, so their indices agree)."""
        return as_fn(self.root.bind(_Bind(params, windows)))


def as_fn(x: Fn | _Const) -> Fn:
    if isinstance(x, _Const):
        v = x.value
        return lambda g, n, w: v
    return x


def bind_node(node: Node, params: Mapping[str, Any], windows: list[WindowSpec]) -> Fn:
    return as_fn(node.bind(_Bind(params, windows)))


def parse_expr(text: str, params: Mapping[str, str] | None = None, scope: str = "gpu",
               want: str | None = BOOL) -> Expr:
    """Parse and type-check ``text``. ``params`` maps declared parameter names to their types;
    ``scope`` is the rule's (per-GPU signals need ``gpu``); ``want`` the required result type.
    Raises ExprError with a 1-based column."""
    if not isinstance(text, str):
        raise ExprError("expected an expression string", 1)
    root = _Parser(text, params or {}, scope).parse()
    if want is not None and root.type != want:
        what = "a condition (true/false)" if want == BOOL else f"a {want}"
        raise ExprError(f"must be {what}, got a {root.type}", root.col)
    return Expr(text, root, root.type)


def value_type(v: Any) -> str | None:
    """The expression type of a plain value (for params), or None when it has none."""
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, (int, float)):
        return NUMBER
    if isinstance(v, str):
        return STRING
    return None
