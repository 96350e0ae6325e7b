"""``agentd rules check`` and ``agentd rules test`` (click's CliRunner)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agentd.rules_cli import rules

PACK_TESTS = sorted(Path("rules/packs/tests").glob("*.yaml"))


def run(*args: str):
    return CliRunner().invoke(rules, list(args))


def test_each_pack_passes_its_own_tests():
    assert {p.stem for p in PACK_TESTS} >= {"gpu_thermal", "coolant", "leak"}
    for path in PACK_TESTS:
        res = run("test", str(path))
        assert res.exit_code == 0, res.output
        assert "FAIL" not in res.output and "PASS" in res.output and " 0 failed" in res.output


def test_a_wrong_expectation_fails_with_a_readable_diff(tmp_path):
    src = Path("rules/packs/tests/gpu_thermal.yaml").read_text()
    bad = src.replace("rule_files: [../gpu_thermal.yaml]",
                      f"rule_files: [{Path('rules/packs/gpu_thermal.yaml').resolve()}]")
    bad = bad.replace("        limits: {0: 700, 1: 525}", "        limits: {0: 700, 1: 500}", 1)
    bad = bad.replace("""      - at: 15s
        states:
          gpu_near_slowdown[1]: pending""", """      - at: 15s
        states:
          gpu_near_slowdown[1]: firing""", 1)
    assert bad != src
    f = tmp_path / "wrong.yaml"
    f.write_text(bad)
    res = run("test", str(f))
    assert res.exit_code == 1, res.output
    out = res.output
    assert "FAIL  " in out and "GPU near slowdown is capped" in out
    assert "at 15s (t=15s, step 3):" in out
    assert "gpu_near_slowdown[1]: expected firing, got pending (since 10s), value 86" in out
    assert "limit GPU 1: expected 500 W, got 525.0 W (target 525.0 W from gpu_near_slowdown)" in out
    assert "4 passed, 1 failed" in out


def test_firing_set_diff(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(f"""
rule_files: [{Path('rules/packs/leak.yaml').resolve()}]
interval: 10s
defaults: {{node: {{coolant.leak: OK}}}}
tests:
  - name: wrong
    series: {{node: {{coolant.leak: "OK Critical"}}}}
    expect:
      - at: 10s
        firing: [leak_warning]
        advice: []
""")
    res = run("test", str(f))
    assert res.exit_code == 1
    assert "firing instances differ (- expected, missing; + not expected):" in res.output
    assert "- leak_warning" in res.output and "+ leak_critical" in res.output
    assert "advice: expected [], got ['drain'] (drain from leak_critical)" in res.output


def test_an_invalid_test_file_is_an_error_not_a_failure(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("""
rule_files: [nope.yaml]
interval: 7s
tests:
  - name: x
    expect: [{at: 10s}]
""")
    res = run("test", str(f))
    assert res.exit_code == 2
    assert "nope.yaml: cannot read" in res.output
    f.write_text(f"""
rule_files: [{Path('rules/packs/leak.yaml').resolve()}]
interval: 7s
tests:
  - name: x
    series: {{node: {{coolant.leek: OK, coolant.leak: "OK Leaking"}}}}
    expect: [{{at: 10s}}]
""")
    res = run("test", str(f))
    assert res.exit_code == 2
    assert "tests[0].series.node.coolant.leek: unknown node signal" in res.output
    assert "'Leaking' is not a value of this signal" in res.output


def test_check_reports_every_error_and_exits_2(tmp_path):
    a = tmp_path / "site.yaml"
    a.write_text("""
rules:
  - name: gpu_hot
    scope: gpu
    when: gpu.tmp_c > 80
    for: 5 minutes
  - name: leak
    scope: coolant
    when: coolant.leak == "critical"
    actions: [{type: cap_gpu}]
""")
    b = tmp_path / "broken.yaml"
    b.write_text("rules: [\n")
    res = run("check", str(a), str(b))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert f"{a}: rules[0] (gpu_hot): for: expected a duration such as '30s', '5m' or '500ms' (got: '5 minutes')" in lines
    assert any(ln.startswith(f"{a}: rules[0] (gpu_hot): when: unknown signal 'gpu.tmp_c'") for ln in lines)
    assert any(ln.startswith(f"{a}: rules[1] (leak): when: 'critical' is never a value of coolant.leak")
               for ln in lines)
    assert f"{a}: rules[1] (leak): actions[0]: give exactly one of watts, fraction, delta_w" in lines
    assert any(ln.startswith(f"{b}: line ") and "invalid YAML" in ln for ln in lines)
    assert lines[-1] == "5 error(s) in 2 file(s)"


def test_check_passes_on_the_packs_and_a_site_file_using_their_params(tmp_path):
    res = run("check")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("OK: ")
    site = tmp_path / "site.yaml"
    site.write_text("""
rules:
  - name: site_supply_watch
    scope: coolant
    when: coolant.tcs.supply_temp_c > params.tcs_supply_max_c - 3
    actions: [{type: event}]
""")
    assert run("check", str(site)).exit_code == 2  # params.tcs_supply_max_c comes from a pack
    res = run("check", "--with-packs", str(site))
    assert res.exit_code == 0, res.output
