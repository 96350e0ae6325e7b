"""rules/expr.py: grammar, types, three-valued semantics, windows, located errors."""

from __future__ import annotations

import pytest

from rules.expr import SIGNALS, ExprError, Window, parse_expr

PARAMS = {"margin_c": "number", "site": "string", "armed": "bool"}
PARAM_VALUES = {"margin_c": 5.0, "site": "hall-a", "armed": True}


def ev(text: str, gpu: dict | None = None, node: dict | None = None, scope: str = "gpu",
       params: dict | None = None):
    expr = parse_expr(text, PARAMS, scope)
    specs: list = []
    fn = expr.bind(params or PARAM_VALUES, specs)
    return fn(gpu or {}, node or {}, [s.new() for s in specs])


def err(text: str, scope: str = "gpu", want: str | None = "bool") -> ExprError:
    with pytest.raises(ExprError) as info:
        parse_expr(text, PARAMS, scope, want=want)
    return info.value


def test_arithmetic_and_comparisons():
    g = {"temp_c": 86.0, "slowdown_c": 89.0, "power_w": 600.0, "limit_w": 700.0}
    assert ev("gpu.temp_c > gpu.slowdown_c - params.margin_c", g) is True
    assert ev("gpu.temp_c > gpu.slowdown_c - params.margin_c * 0.2", g) is False
    assert ev("gpu.power_w / gpu.limit_w >= 0.85", g) is True
    assert ev("-gpu.temp_c < -80", g) is True
    assert ev("(1 + 2) * 3 == 9") is True
    assert ev("2 + 3 * 4 == 14 and 10 / 4 == 2.5 and 7 - 2 - 1 == 4") is True
    assert ev("1.5e2 == 150") is True


def test_chained_comparison_reads_like_maths():
    assert ev("80 < gpu.temp_c <= 90", {"temp_c": 85.0}) is True
    assert ev("80 < gpu.temp_c <= 90", {"temp_c": 95.0}) is False
    assert ev("80 < gpu.temp_c < 90 < gpu.slowdown_c", {"temp_c": 85.0, "slowdown_c": 95.0}) is True
    assert ev("80 < gpu.temp_c < 90 < gpu.slowdown_c", {"temp_c": 85.0}) is None


def test_functions():
    g = {"temp_c": 70.0, "mem_temp_c": 90.0}
    assert ev("max(gpu.temp_c, gpu.mem_temp_c - 5) == 85", g) is True
    assert ev("min(gpu.temp_c, gpu.mem_temp_c, 50) == 50", g) is True
    assert ev("abs(gpu.temp_c - gpu.mem_temp_c) == 20", g) is True
    assert ev("max(gpu.temp_c, gpu.power_w) > 0", g) is None


def test_strings_bools_and_params():
    n = {"coolant.leak": "Warning", "coolant.stale": 0}
    assert ev('coolant.leak == "Warning"', node=n, scope="coolant") is True
    assert ev("coolant.leak != 'OK'", node=n, scope="coolant") is True
    assert ev("not coolant.stale", node=n, scope="coolant") is True
    assert ev('params.site == "hall-a" and params.armed', scope="node") is True
    assert ev("gpu.throttled", {"throttled": 1}) is True
    assert ev("true and not false") is True


def test_unknown_is_three_valued():
    # a missing input makes arithmetic and comparisons unknown (None) ...
    assert ev("gpu.temp_c > 80", {}) is None
    assert ev("gpu.temp_c + 1 > 80", {"temp_c": None}) is None
    # ... and and/or/not follow Kleene logic
    assert ev("gpu.temp_c > 80 or gpu.mem_temp_c > 80", {"mem_temp_c": 90.0}) is True
    assert ev("gpu.temp_c > 80 or gpu.mem_temp_c > 80", {"mem_temp_c": 70.0}) is None
    assert ev("gpu.temp_c > 80 and gpu.mem_temp_c > 80", {"mem_temp_c": 70.0}) is False
    assert ev("gpu.temp_c > 80 and gpu.mem_temp_c > 80", {"mem_temp_c": 90.0}) is None
    assert ev("not (gpu.temp_c > 80)", {}) is None
    assert ev("gpu.temp_c > 1 and gpu.temp_c > 2 and gpu.temp_c > 3", {"temp_c": 2.5}) is False
    # division by zero is unknown, not an exception
    assert ev("gpu.power_w / gpu.limit_w > 0.5", {"power_w": 1.0, "limit_w": 0.0}) is None


def test_constants_fold_with_site_params():
    expr = parse_expr("gpu.temp_c > 90 - params.margin_c", PARAMS)
    fn = expr.bind({"margin_c": 10.0, "site": "x", "armed": False}, [])
    assert fn({"temp_c": 85.0}, {}, []) is True
    fn = expr.bind({"margin_c": 2.0, "site": "x", "armed": False}, [])
    assert fn({"temp_c": 85.0}, {}, []) is False
    # a constant condition that decides folds the whole expression
    fn = parse_expr("params.armed or gpu.temp_c > 1", PARAMS).bind(PARAM_VALUES, [])
    assert fn({}, {}, []) is True


def test_main_operand_is_the_left_of_the_first_comparison():
    expr = parse_expr("gpu.power_w > 600 and gpu.temp_c > 80")
    specs: list = []
    from rules.expr import bind_node
    fn = bind_node(expr.main_operand(), {}, specs)
    assert fn({"power_w": 650.0}, {}, []) == 650.0
    assert parse_expr("gpu.throttled").main_operand() is None


def test_windows():
    expr = parse_expr("avg_over(gpu.power_w, 10s) > 500 and max_over(gpu.temp_c, 30s) < 90")
    specs: list = []
    fn = expr.bind({}, specs)
    assert [(s.func, s.window_s) for s in specs] == [("avg_over", 10.0), ("max_over", 30.0)]
    ws = [s.new() for s in specs]
    results = []
    for t in range(0, 40):
        g = {"power_w": 400.0 if t < 20 else 700.0, "temp_c": 95.0 if t == 5 else 80.0}
        for w, s in zip(ws, specs):
            w.push(float(t), s.source(g, {}, ws))
        results.append(fn(g, {}, ws))
    assert results[4] is False  # avg 400
    assert results[21] is False  # avg over 11..21: 2 of 11 at 700 -> < 500; max still 95
    assert results[30] is False  # avg 700 over 20..30, but the 95 C at t=5 is still in 0..30
    assert results[35] is False  # the window is closed: t=5 is still in 5..35
    assert results[36] is True  # aged out


@pytest.mark.parametrize("func", ["avg_over", "max_over", "min_over"])
def test_window_matches_brute_force(func):
    import random
    rng = random.Random(4)
    w = Window(func, 5.0)
    hist: list[tuple[float, float | None]] = []
    for k in range(400):
        t = k * 0.25
        v = None if rng.random() < 0.1 else rng.uniform(0, 100)
        w.push(t, v)
        hist.append((t, v))
        vals = [x for tt, x in hist if tt >= t - 5.0 and x is not None]
        want = None if not vals else (sum(vals) / len(vals) if func == "avg_over"
                                      else max(vals) if func == "max_over" else min(vals))
        got = w.value()
        assert (got is None and want is None) or abs(got - want) < 1e-6


@pytest.mark.parametrize("text, column, needle", [
    ("gpu.tmp_c > 80", 1, "unknown signal 'gpu.tmp_c' (did you mean 'gpu.temp_c'?)"),
    ("gpu.temp_c > 80 and coolant.tcs.suply_temp_c > 3", 21, "unknown signal 'coolant.tcs.suply_temp_c'"),
    ("gpu.temp_c > params.nope", 14, "unknown parameter 'params.nope'"),
    ('coolant.leak > 3', 1, "'>' compares numbers, got a string"),
    ('gpu.temp_c == "hot"', 12, "cannot compare a number with a string"),
    ('coolant.leak == "Critcal"', 17, "'Critcal' is never a value of coolant.leak"),
    ("gpu.temp_c + coolant.leak > 3", 14, "'+' needs a number, got a string"),
    ("gpu.temp_c > 80 and 5", 21, "'and' needs a bool, got a number"),
    ("not gpu.temp_c", 5, "'not' needs a bool"),
    ("gpu.temp_c", 1, "must be a condition (true/false), got a number"),
    ("avg_over(gpu.power_w, 10sec) > 3", 23, "bad number or duration '10sec'"),
    ("avg_over(gpu.power_w) > 3", 1, "avg_over takes a number expression and a duration"),
    ("avg_over(gpu.power_w, 0s) > 3", 23, "window must be > 0"),
    ("avg_over(gpu.power_w, 2h) > 3", 23, "window must be > 0 and at most 600s"),
    ("gpu.temp_c > 10s", 14, "a duration is only allowed as the window"),
    ("sqrt(gpu.temp_c) > 3", 1, "unknown function 'sqrt'"),
    ("gpu.temp_c = 3", 12, "unexpected character '=' (use '==' to compare)"),
    ("gpu.temp_c > 3 && true", 16, "use 'and', 'or', 'not'"),
    ("(gpu.temp_c > 3", 16, "expected ')'"),
    ("gpu.temp_c > 3)", 15, "unexpected ')'"),
    ("", 1, "empty expression"),
    ("gpu.temp_c >", 13, "expected a value"),
    ("True", 1, "booleans are 'true' and 'false'"),
    ("abs(1, 2) > 0", 1, "abs takes one argument"),
    ("min(1) > 0", 1, "min takes two or more arguments"),
    ("__import__('os') > 0", 1, "unknown function '__import__'"),
    ("gpu.temp_c.__class__ > 0", 1, "unknown signal"),
])
def test_errors_name_the_column(text, column, needle):
    e = err(text)
    assert needle in e.message, e.message
    assert e.column == column, (e.column, e.message)
    assert str(e).endswith(f"at column {column}")


def test_gpu_signals_need_gpu_scope():
    e = err("gpu.temp_c > 80", scope="node")
    assert "needs 'scope: gpu'" in e.message and e.column == 1
    parse_expr("coolant.tcs.supply_temp_c > 45 and node.gpu_power_w > 1", scope="coolant")


def test_registry_lists_the_documented_signals():
    for name in ("gpu.power_w", "gpu.power_avg_w", "gpu.mem_temp_c", "gpu.slowdown_c", "gpu.limit_min_w",
                 "gpu.sm_clock_mhz", "gpu.throttled", "coolant.facility.supply_temp_c",
                 "coolant.tcs.delta_pressure_kpa", "coolant.tcs.pump_speed_pct", "coolant.leak",
                 "coolant.stale", "node.gpu_power_w", "node.gpus"):
        assert name in SIGNALS
    assert SIGNALS["gpu.throttled"].type == "bool" and SIGNALS["coolant.leak"].type == "string"
    assert SIGNALS["gpu.temp_c"].where == "gpu" and SIGNALS["gpu.temp_c"].key == "temp_c"
    assert SIGNALS["coolant.tcs.flow_lpm"].key == "coolant.tcs.flow_lpm"
