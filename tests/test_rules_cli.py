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
    f.write_text(f"""
rule_files: [{Path('rules/packs/gpu_health.yaml').resolve()}]
tests:
  - name: x
    series: {{gpu: {{all: {{health: "ok failed"}}}}}}
    expect: [{{at: 10s}}]
""")
    res = run("test", str(f))
    assert res.exit_code == 2  # a GPU signal's values are checked as a node signal's are
    assert "'failed' is not a value of this signal" in res.output


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


# -- directories, *.yml, and files that are not loaded ------------------------------------------

SITE_RULE = """
rules:
  - name: {name}
    scope: gpu
    when: gpu.temp_c > 80
    actions: [{{type: event}}]
"""


def rule_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "a.yaml").write_text(SITE_RULE.format(name="site_a"))
    (d / "b.yml").write_text(SITE_RULE.format(name="site_b") + SITE_RULE.format(name="site_c")[len("\nrules:"):])
    (d / "README").write_text("not a rule file\n")
    (d / ".c.yaml.swp").write_text("")
    (d / "old").mkdir()
    return d


def test_check_accepts_a_directory_and_loads_yml_like_yaml(tmp_path):
    d = rule_dir(tmp_path)
    res = run("check", str(d))
    assert res.exit_code == 0, res.output
    assert "OK: 3 rules (3 gpu), 0 params, 2 file(s)" in res.output
    assert f"  {d}/a.yaml: 1 rule\n  {d}/b.yml: 2 rules\n" in res.output
    assert f"{d}: note: not loaded (not *.yaml or *.yml, or hidden): .c.yaml.swp, README, old/" in res.output


def test_check_of_a_missing_or_empty_directory(tmp_path):
    res = run("check", str(tmp_path / "nope"))
    assert res.exit_code == 2
    assert f"{tmp_path}/nope: no such file or directory; create it, or check the path" in res.output
    (tmp_path / "empty").mkdir()
    res = run("check", str(tmp_path / "empty"))
    assert res.exit_code == 0, res.output  # an empty rule directory is a fact, not a mistake: said, not failed
    assert f"{tmp_path}/empty: note: holds no *.yaml or *.yml rule files" in res.output
    assert "OK: 0 rules (none), 0 params, 0 file(s)" in res.output  # not the packs instead


def test_a_broken_yml_file_is_reported_by_name(tmp_path):
    d = rule_dir(tmp_path)
    (d / "b.yml").write_text("rules: [\n")
    res = run("check", str(d))
    assert res.exit_code == 2 and f"{d}/b.yml: line " in res.output and "invalid YAML" in res.output


# -- --config: the site's params, named by the config file ---------------------------------------

def test_check_with_config_binds_its_params_and_names_the_file(tmp_path):
    d = rule_dir(tmp_path)
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f"[rules]\ndirs = ['{d}']\nparams = {{ tcs_supply_max = 43 }}\n")
    res = run("check", "--config", str(cfg))
    assert res.exit_code == 2
    assert f"{cfg}: rules.params.tcs_supply_max: no loaded rule pack declares this parameter" in res.output
    cfg.write_text(f"[rules]\ndirs = ['{d}']\nparams = {{ low_flow_node_cap_w = -5 }}\n")
    res = run("check", "--config", str(cfg))
    assert res.exit_code == 2
    assert any(ln.startswith(f"{cfg}: rules.params: ") and "coolant.yaml: rules[" in ln and "actions[" in ln
               for ln in res.output.splitlines()), res.output
    cfg.write_text(f"[rules]\ndirs = ['{d}']\nparams = {{ tcs_supply_max_c = 43 }}\n")
    res = run("check", "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert f", site params from {cfg}" in res.output and f"  {d}/b.yml: 2 rules" in res.output
    assert "rules/packs/leak.yaml: 3 rules" in res.output  # the packs, as the daemon loads them
    res = run("check", "--config", str(cfg), str(d / "a.yaml"))  # FILES: those, with the config's params
    assert res.exit_code == 2 and "rules.params.tcs_supply_max_c: no loaded rule pack" in res.output
    assert run("check", "--config", str(cfg), "--with-packs", str(d / "a.yaml")).exit_code == 0


def test_check_with_config_refuses_a_named_directory_that_is_missing(tmp_path):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f"[rules]\ndirs = ['{tmp_path}/absent']\n")
    res = run("check", "--config", str(cfg))
    assert res.exit_code == 2
    assert (f"{cfg}: rules.dirs[0]: no such file or directory; create it, or remove it from rules.dirs "
            f"(got: '{tmp_path}/absent')") in res.output


# -- rule_file_paths itself -------------------------------------------------------------------

def test_rule_file_paths_says_what_it_found(tmp_path):
    from agentd.rule_files import rule_file_paths

    d = rule_dir(tmp_path)
    default = tmp_path / "default-rules.d"
    found = rule_file_paths([d, d / "a.yaml", default, tmp_path / "named"], explicit=True, default_dir=default)
    assert found.paths == [d / "a.yaml", d / "b.yml"]  # each file once
    assert found.warnings == [f"rules.dirs[3]: no such file or directory; create it, or remove it from rules.dirs "
                              f"(got: '{tmp_path}/named')"]
    assert (f"rules.dirs[2]: note: the default rule directory does not exist; create it to add site rules "
            f"(got: '{default}')") in found.infos
    quiet = rule_file_paths([tmp_path / "named"], explicit=False, default_dir=default)
    assert quiet.warnings == [] and quiet.infos and quiet.paths == []


def test_rule_counts_list_every_file():
    from agentd.rule_files import rule_counts
    from rules.model import default_pack_paths, load_rule_files

    rs = load_rule_files(default_pack_paths())
    counts = rule_counts(rs)
    assert list(counts) == [str(p) for p in default_pack_paths()]
    assert sum(counts.values()) == len(rs.rules) and all(n > 0 for n in counts.values())
