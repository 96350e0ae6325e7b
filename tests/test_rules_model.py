"""rules/model.py: rule files, located load errors (all of them), params."""

from __future__ import annotations

import textwrap

import pytest

from rules.engine import Engine
from rules.model import (CapGpu, RuleLoadError, default_pack_paths, load_rule_files, load_rules_text,
                         parse_duration_s)


def load(text: str, source: str = "rules.yaml"):
    return load_rules_text(textwrap.dedent(text), source)


def errors_of(text: str, source: str = "rules.yaml") -> list[str]:
    with pytest.raises(RuleLoadError) as info:
        load(text, source)
    return info.value.errors


def test_a_valid_file_and_its_defaults():
    rs = load("""
        pack: demo
        params: {margin_c: 5}
        rules:
          - name: gpu_hot
            scope: gpu
            when: gpu.temp_c > gpu.slowdown_c - params.margin_c
            for: 10s
            clear_for: 1m
            actions:
              - {type: cap_gpu, fraction: 0.7}
              - {type: advise, advice: no_new_work}
              - {type: event}
          - name: tcs_hot
            scope: coolant
            when: coolant.tcs.supply_temp_c > 45
            actions: [{type: cap_node, watts: 3000}]
    """)
    gpu_hot, tcs_hot = rs.rules
    assert gpu_hot.for_ == 10 and gpu_hot.clear_for == 60 and gpu_hot.severity == "warning"
    assert gpu_hot.stale == "ignore" and tcs_hot.stale == "fire"  # coolant inputs fail safe
    assert isinstance(gpu_hot.actions[0], CapGpu) and gpu_hot.actions[0].fraction == 0.7
    assert gpu_hot.when_expr.signals == {"gpu.temp_c", "gpu.slowdown_c"}
    assert rs.params["margin_c"].default == 5.0


def test_the_example_error_from_the_brief():
    errs = errors_of("""
        rules:
          - {name: a, scope: gpu, when: gpu.temp_c > 1}
          - {name: b, scope: gpu, when: gpu.temp_c > 2}
          - {name: gpu_hot, scope: gpu, when: gpu.tmp_c > 80}
    """)
    assert errs == ["rules.yaml: rules[2] (gpu_hot): when: unknown signal 'gpu.tmp_c' "
                    "(did you mean 'gpu.temp_c'?) at column 1"]


def test_every_error_is_reported_at_once_and_located():
    errs = errors_of("""
        params: {margin_c: 5}
        rules:
          - name: ok
            scope: gpu
            when: gpu.temp_c > 80
          - name: bad_for
            scope: gpu
            when: gpu.tmp_c > 80
            for: 10 sec
          - name: bad_actions
            scope: node
            when: coolant.leak == "Critcal"
            actions:
              - {type: cap_gpu, fraction: 0.5, watts: 300}
              - {type: cap_gpu, fraction: 1.5}
              - {type: throttle}
              - {type: cap_node, watts: params.nope}
              - {type: advise, advice: panic}
          - name: ok
            scope: sideways
            when: gpu.temp_c > 80
            colour: red
          - scope: gpu
            when: gpu.temp_c > 80
            clear_when: gpu.temp_c < params.margin
    """)
    text = "\n".join(errs)
    expected = [
        "rules.yaml: rules[1] (bad_for): for: expected a duration such as '30s', '5m' or '500ms' (got: '10 sec')",
        "rules.yaml: rules[1] (bad_for): when: unknown signal 'gpu.tmp_c'",
        "rules.yaml: rules[2] (bad_actions): actions[0]: give exactly one of watts, fraction, delta_w (got watts, fraction)",
        "rules.yaml: rules[2] (bad_actions): actions[1]: fraction must be in (0, 1] (got: 1.5)",
        "rules.yaml: rules[2] (bad_actions): actions[2]: unknown action type (one of cap_gpu, cap_node, advise, event)",
        "rules.yaml: rules[2] (bad_actions): actions[4].advice: Input should be 'no_new_work' or 'drain' (got: 'panic')",
        "rules.yaml: rules[2] (bad_actions): when: 'Critcal' is never a value of coolant.leak",
        "rules.yaml: rules[3] (ok): scope: Input should be 'node', 'gpu' or 'coolant' (got: 'sideways')",
        "rules.yaml: rules[3] (ok): colour: unknown key (check the spelling) (got: 'red')",
        "rules.yaml: rules[4]: name: missing (required)",
        "rules.yaml: rules[4]: clear_when: unknown parameter 'params.margin'",
    ]
    for line in expected:
        assert any(e.startswith(line) for e in errs), f"missing: {line}\n--- got:\n{text}"


def test_param_references_in_actions_are_checked():
    errs = errors_of("""
        params: {cap_w: 300, label: x}
        rules:
          - name: a
            scope: gpu
            when: gpu.temp_c > 80
            actions: [{type: cap_gpu, watts: params.nope}, {type: cap_gpu, watts: params.label},
                      {type: cap_gpu, watts: "300W"}]
    """)
    assert errs[0].startswith("rules.yaml: rules[0] (a): actions[2].watts: expected a number or a parameter reference")
    assert "actions[0].watts: parameter 'nope' is not declared" in errs[1]
    assert "actions[1].watts: parameter 'label' is not a number" in errs[2]


def test_duplicate_names_and_param_conflicts_across_files(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("params: {limit_c: 45}\nrules:\n  - {name: hot, scope: coolant, when: coolant.tcs.supply_temp_c > params.limit_c}\n")
    b.write_text("params: {limit_c: 40}\nrules:\n  - {name: hot, scope: coolant, when: coolant.tcs.flow_lpm < 3}\n")
    with pytest.raises(RuleLoadError) as info:
        load_rule_files([a, b])
    errs = info.value.errors
    assert any(e.startswith(f"{b}: params.limit_c: already declared by {a}") for e in errs), errs
    assert any(e.startswith(f"{b}: rules[0] (hot): name: duplicate rule name (first defined at {a}: rules[0])")
               for e in errs), errs


def test_yaml_and_io_errors_are_located(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n   scope: gpu\n")
    with pytest.raises(RuleLoadError) as info:
        load_rule_files([bad, tmp_path / "missing.yaml"])
    errs = info.value.errors
    assert errs[0].startswith(f"{bad}: line 3, column 4: invalid YAML")
    assert errs[1].startswith(f"{tmp_path / 'missing.yaml'}: cannot read")
    assert errors_of("- just a list") == ["rules.yaml: (top level): expected a mapping with 'rules:' (got: list)"]


def test_site_params_override_defaults_and_are_checked():
    rs = load("""
        params: {tcs_supply_max_c: 45, cap_fraction: 0.8}
        rules:
          - name: tcs_hot
            scope: coolant
            when: coolant.tcs.supply_temp_c > params.tcs_supply_max_c
            actions: [{type: cap_gpu, fraction: params.cap_fraction}]
    """)
    e = Engine(rs, {"tcs_supply_max_c": 32})
    ev = e.evaluate(0.0, {"coolant.tcs.supply_temp_c": 40.0}, {0: {"limit_max_w": 700.0}})
    assert [c.watts for c in ev.ceilings] == [560.0]
    with pytest.raises(RuleLoadError) as info:
        Engine(rs, {"tcs_supply_max": 40, "cap_fraction": "high"})
    assert info.value.errors[0].startswith("site params: params.tcs_supply_max: no loaded rule pack declares")
    assert info.value.errors[1].startswith("site params: params.cap_fraction: expected a number")
    with pytest.raises(RuleLoadError) as info:
        Engine(rs, {"cap_fraction": 1.5})
    assert "actions[0]: fraction must be in (0, 1] (got: 1.5)" in info.value.errors[0]


def test_durations():
    assert parse_duration_s("250ms") == 0.25 and parse_duration_s("2m") == 120 and parse_duration_s(5) == 5
    for bad in ("10 sec", "-5s", True, "5x", [1]):
        with pytest.raises(ValueError):
            parse_duration_s(bad)


def test_the_shipped_packs_load_together_and_bind():
    paths = default_pack_paths()
    assert {p.stem for p in paths} >= {"gpu_thermal", "coolant", "leak"}
    rs = load_rule_files(paths)
    names = {r.name for r in rs.rules}
    assert {"gpu_near_slowdown", "hbm_near_max", "tcs_supply_hot", "tcs_flow_low", "tcs_delta_t_high",
            "leak_warning", "leak_critical", "coolant_sensor_stale"} <= names
    for r in rs.rules:
        assert r.clear_for > 0, f"{r.name} has no clear_for hysteresis"
    Engine(rs)


def test_rules_never_imports_agentd_or_collectors():
    """rules is pure logic: it imports nothing of agentd, and of collectors only the
    dependency-free leaf modules every package shares (one duration parser, one class list)."""
    import subprocess
    import sys
    mods = "rules.model, rules.expr, rules.engine, rules.actions, rules.testing, rules.budget, rules.domains"
    code = (f"import sys, {mods}; "
            "leaves = {'collectors', 'collectors.durations', 'collectors.classes'}; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('agentd', 'collectors') and m not in leaves]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
