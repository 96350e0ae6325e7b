"""rules/domains.py: the power-domain file (located errors, reports, the tree's lookups) and
``agentd domains check`` (agentd/site/domains_cli.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentd.site.domains_cli import domains as domains_group
from rules.domains import DEFAULT_BANDS, Bands, Domains, DomainsError, Severity, load_domains, load_domains_text

GOOD = """\
site: dc1
bands: {cap_threshold: 0.98, target: 0.95, uncap_threshold: 0.90}
domains:
  site:    {cap_w: 2.4e6}
  hall-a:  {parent: site, cap_w: 1.3 MW, bands: {target: 0.93}}
  hall-b:  {parent: site, cap_w: "1300 kW"}
  rack-a1: {parent: hall-a, cap_w: 42000, nodes: ["gpu-a1-*", "gpu-x07"]}
  rack-a2: {parent: hall-a, cap_w: 50000, nodes: ["gpu-a2-0?"]}
  rack-b1: {parent: hall-b, cap_w: 42000, nodes: ["gpu-b1-[0-4]*"]}
"""


def write(tmp_path: Path, text: str, name: str = "domains.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def errors_of(text: str) -> list[str]:
    with pytest.raises(DomainsError) as exc:
        load_domains_text(textwrap.dedent(text), "f.yaml")
    return exc.value.errors


def test_good_file_loads_with_the_tree_and_its_lookups(tmp_path):
    d = load_domains(write(tmp_path, GOOD))
    assert d.site == "dc1" and d.root == "site" and d.source.endswith("domains.yaml")
    assert list(d) == ["site", "hall-a", "rack-a1", "rack-a2", "hall-b", "rack-b1"]  # preorder
    assert d.leaves == ("rack-a1", "rack-a2", "rack-b1")
    assert d.cap_w("site") == 2.4e6  # "2.4e6" is a string to PyYAML: taken as watts
    assert d.cap_w("hall-a") == 1.3e6 and d.cap_w("hall-b") == 1.3e6
    assert d.children("hall-a") == ("rack-a1", "rack-a2") and d.parent("rack-a1") == "hall-a"
    assert d.path_to_root("rack-a2") == ("rack-a2", "hall-a", "site")
    assert d.subtree("hall-a") == ("hall-a", "rack-a1", "rack-a2")
    assert d.leaf_span("hall-a") == (0, 2) and d.leaf_span("rack-b1") == (2, 3)
    assert d.depth == 3 and d["rack-a1"].depth == 2 and d.is_leaf("rack-b1") and not d.is_leaf("site")
    assert [x.name for x in d.postorder("hall-a")] == ["rack-a2", "rack-a1", "hall-a"]
    assert d.bands("hall-a") == Bands(0.98, 0.93, 0.90)
    assert d.bands("rack-a1") == DEFAULT_BANDS  # a child does not take its parent's bands
    assert d.leaf_of("gpu-a1-17") == "rack-a1" and d.leaf_of("gpu-x07") == "rack-a1"
    assert d.leaf_of("gpu-a2-05") == "rack-a2" and d.leaf_of("gpu-a2-123") is None
    assert d.leaf_of("gpu-b1-3x") == "rack-b1" and d.leaf_of("gpu-b1-9") is None
    assert d.leaf_of("GPU-A1-17") is None  # case-sensitive
    assert d.exact_nodes() == ("gpu-x07",) and d.exact_nodes("hall-b") == ()
    assert d.nodes_in("hall-a", ["gpu-a1-1", "gpu-b1-1", "gpu-x07", "zz"]) == ["gpu-a1-1", "gpu-x07"]
    with pytest.raises(KeyError, match="unknown domain 'nope'"):
        d["nope"]
    assert "site" in d and "nope" not in d and len(d) == 6


def test_bands_resolve_key_by_key_over_the_file_default_then_the_builtins():
    d = load_domains_text("""
site: s
bands: {uncap_threshold: 0.8}
domains:
  root: {cap_w: 100}
  leaf: {parent: root, cap_w: 50, bands: {cap_threshold: 0.99}}
""")
    assert d.bands("root") == Bands(0.98, 0.95, 0.8)
    assert d.bands("leaf") == Bands(0.99, 0.95, 0.8)


def test_reports_are_not_errors():
    d = load_domains_text("""
site: s
domains:
  root:  {cap_w: 100000}
  big:   {parent: root, cap_w: 120000, nodes: [a]}
  small: {parent: root, cap_w: 30000, nodes: [b, b]}
  empty: {parent: root, cap_w: 1000}
  mid:   {parent: root, cap_w: 50000}
  x:     {parent: mid, cap_w: 10000, nodes: [c]}
""", "f.yaml")
    text = [f.format("f.yaml") for f in d.reports]
    assert all(f.severity is Severity.REPORT for f in d.reports)
    assert "f.yaml: domains.big.cap_w: 120 kW is above its parent root's cap (100 kW): it can never bind" in text
    assert any(t.startswith("f.yaml: domains.root: children's caps sum to 201 kW, 2.01x its cap (100 kW): "
                            "oversubscribed") for t in text)
    assert any(t.startswith("f.yaml: domains.mid: children's caps sum to 10 kW, under its cap (50 kW): "
                            "mid's own cap can never bind") for t in text)
    assert "f.yaml: domains.empty: a leaf with no nodes: its cap holds nothing" in text
    assert "f.yaml: domains.small.nodes[1]: 'b' is listed twice in small" in text
    assert d.check() == list(d.reports)


@pytest.mark.parametrize("body, expected", [
    # unknown keys, at every level, with the known ones named
    ("site: s\nsitee: 1\ndomains: {r: {cap_w: 1}}",
     "f.yaml: sitee: unknown key (check the spelling; known: version, site, bands, domains) (got: 1)"),
    ("site: s\ndomains: {r: {cap_w: 1, cap: 2}}",
     "f.yaml: domains.r.cap: unknown key (check the spelling; known: parent, cap_w, bands, nodes, description) (got: 2)"),
    ("site: s\ndomains: {r: {cap_w: 1, bands: {targett: 0.9}}}",
     "f.yaml: domains.r.bands.targett: unknown key (check the spelling; known: cap_threshold, target, uncap_threshold) (got: 0.9)"),
    # caps
    ("site: s\ndomains: {r: {parent: null}}", "f.yaml: domains.r.cap_w: missing (required)"),
    ("site: s\ndomains: {r: {cap_w: 0}}", "f.yaml: domains.r.cap_w: a cap must be a positive, finite number of watts (got: 0)"),
    ("site: s\ndomains: {r: {cap_w: -5}}", "f.yaml: domains.r.cap_w: a cap must be a positive, finite number of watts (got: -5)"),
    ("site: s\ndomains: {r: {cap_w: .nan}}", "f.yaml: domains.r.cap_w: a cap must be a positive, finite number of watts (got: nan)"),
    ("site: s\ndomains: {r: {cap_w: .inf}}", "f.yaml: domains.r.cap_w: a cap must be a positive, finite number of watts (got: inf)"),
    ("site: s\ndomains: {r: {cap_w: true}}", "f.yaml: domains.r.cap_w: expected a number of watts, e.g. 42000 or '42 kW' (got: True)"),
    ("site: s\ndomains: {r: {cap_w: 12 GW}}",
     "f.yaml: domains.r.cap_w: expected a number of watts, e.g. 42000, '42 kW' or '1.3 MW' (got: '12 GW')"),
    # bands: the rule is stated, for the file default and for a domain
    ("site: s\nbands: {target: 0.99}\ndomains: {r: {cap_w: 1}}",
     "f.yaml: bands: bands must satisfy 0 < uncap_threshold < target < cap_threshold <= 1 "
     "(got: uncap_threshold=0.9, target=0.99, cap_threshold=0.98)"),
    ("site: s\ndomains: {r: {cap_w: 1, bands: {uncap_threshold: 0.96}}}",
     "f.yaml: domains.r.bands: bands must satisfy 0 < uncap_threshold < target < cap_threshold <= 1 "
     "(got: uncap_threshold=0.96, target=0.95, cap_threshold=0.98) (resolved over the file's bands and the defaults)"),
    ("site: s\ndomains: {r: {cap_w: 1, bands: {cap_threshold: 1.2}}}",
     "f.yaml: domains.r.bands.cap_threshold: Input should be less than or equal to 1 (got: 1.2)"),
    # the tree
    ("site: s\ndomains: {r: {cap_w: 1}, a: {parent: hall-x, cap_w: 1}, hall-a: {parent: r, cap_w: 1}}",
     "f.yaml: domains.a.parent: unknown domain 'hall-x'; did you mean 'hall-a'?"),
    ("site: s\ndomains: {r: {cap_w: 1}, a: {parent: a, cap_w: 1}}",
     "f.yaml: domains.a.parent: a domain cannot be its own parent"),
    ("site: s\ndomains: {r: {cap_w: 1}, a: {parent: c, cap_w: 1}, b: {parent: a, cap_w: 1}, c: {parent: b, cap_w: 1}}",
     "f.yaml: domains.a.parent: cycle a -> c -> b -> a: every parent chain must end at the root"),
    ("site: s\ndomains: {r: {cap_w: 1}, r2: {cap_w: 1}}",
     "f.yaml: domains: 2 root domains (r, r2): exactly one domain has no parent; give the others a parent"),
    ("site: s\ndomains: {r: {cap_w: 1, nodes: [a]}, x: {parent: r, cap_w: 1}}",
     "f.yaml: domains.r.nodes: only a leaf holds nodes (r has children: x); move them to a leaf"),
    # nodes
    ("site: s\ndomains: {r: {cap_w: 1}, x: {parent: r, cap_w: 1, nodes: [n1]}, y: {parent: r, cap_w: 1, nodes: [n2, n1]}}",
     "f.yaml: domains.y.nodes[1]: 'n1' is also in x (nodes[0]): a node sits in exactly one leaf"),
    ("site: s\ndomains: {r: {cap_w: 1}, x: {parent: r, cap_w: 1, nodes: [gpu-*]}, y: {parent: r, cap_w: 1, nodes: [gpu-7]}}",
     "f.yaml: domains.y.nodes[0]: 'gpu-7' also matches x's 'gpu-*': a node sits in exactly one leaf"),
    ("site: s\ndomains: {r: {cap_w: 1, nodes: ['a/b']}}",
     "f.yaml: domains.r.nodes[0]: a node name or glob is letters, digits, _ . : - and * ? [ ] ! (got: 'a/b')"),
    ("site: s\ndomains: {r: {cap_w: 1, nodes: a}}", "f.yaml: domains.r.nodes: Input should be a valid list (got: 'a')"),
    # names and shape
    ("site: s\ndomains: {'hall a': {cap_w: 1}}",
     "f.yaml: domains.hall a: a domain name is letters, digits and _ . : - (an MQTT topic segment)"),
    ("site: 'dc/1'\ndomains: {r: {cap_w: 1}}",
     "f.yaml: site: Value error, a site name is letters, digits and _ . : - (an MQTT topic segment) (got: 'dc/1')"),
    ("domains: {r: {cap_w: 1}}", "f.yaml: site: missing (required)"),
    ("site: s\ndomains: {}", "f.yaml: domains: Dictionary should have at least 1 item after validation, not 0"),
    ("site: s\nversion: 2\ndomains: {r: {cap_w: 1}}", "f.yaml: version: Input should be 1 (got: 2)"),
    ("site: s\ndomains: {r: 5}", "f.yaml: domains.r: expected a mapping with cap_w (got: 5)"),
    ("[1, 2]", "f.yaml: (top level): expected a mapping with 'site:' and 'domains:' (got: list)"),
])
def test_each_error_is_located_and_says_what_to_do(body, expected):
    errs = errors_of(body)
    assert any(e == expected or e.replace("Value error, ", "") == expected.replace("Value error, ", "")
               for e in errs), errs


def test_every_error_comes_at_once():
    errs = errors_of("""
site: s
domains:
  root: {cap_w: 100}
  a: {parent: root, cap_w: -1}
  b: {parent: nowhere, cap_w: 10}
  c: {parent: root, cap_w: 10, colour: red}
  d: {parent: e, cap_w: 1}
  e: {parent: d, cap_w: 1}
""")
    where = [e.split(": ")[1] for e in errs]
    assert where == ["domains.a.cap_w", "domains.c.colour", "domains.b.parent", "domains.d.parent"], errs


def test_yaml_and_file_errors_are_located(tmp_path):
    with pytest.raises(DomainsError) as exc:
        load_domains(write(tmp_path, "site: s\ndomains:\n  r: {cap_w: 1\n"))
    assert exc.value.errors[0].startswith(f"{tmp_path / 'domains.yaml'}: line ") and "invalid YAML" in exc.value.errors[0]
    with pytest.raises(DomainsError) as exc:
        load_domains(tmp_path / "missing.yaml")
    assert exc.value.errors == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"]
    with pytest.raises(DomainsError, match="invalid YAML"):
        load_domains_text("a: [", "t.yaml")


def test_a_node_matching_two_leaves_globs_is_refused_not_guessed():
    d = load_domains_text("""
site: s
domains:
  r: {cap_w: 100}
  x: {parent: r, cap_w: 50, nodes: ["gpu-a*"]}
  y: {parent: r, cap_w: 50, nodes: ["gpu-*7"]}
""", "f.yaml")
    assert d.leaf_of("gpu-a1") == "x" and d.leaf_of("gpu-b7") == "y"
    for _ in range(2):  # the second answer comes from the cache: the same refusal
        with pytest.raises(DomainsError) as exc:
            d.leaf_of("gpu-a7")
        assert exc.value.errors == ["f.yaml: node 'gpu-a7' matches 2 leaves (x (gpu-a*), y (gpu-*7)): "
                                    "a node must match exactly one leaf; narrow the globs"]
    got = d.lookup_leaves(["gpu-a1", "gpu-a7", "zz"])
    assert got[0] == "x" and isinstance(got[1], DomainsError) and got[2] is None
    findings = d.check(["gpu-a1", "gpu-a7", "zz", "gpu-a1"])
    errs = [f for f in findings if f.severity is Severity.ERROR]
    assert [(f.location, f.message) for f in errs] == [
        ("node gpu-a7", "matches 2 leaves (x (gpu-a*), y (gpu-*7)): a node must match exactly one leaf; narrow the globs")]
    reps = [f.format("f.yaml") for f in findings if f.severity is Severity.REPORT]
    assert "f.yaml: node zz: in no leaf of the tree: it gets no site budget and its power is not counted" in reps
    # y's glob matched only the ambiguous node: it is used, so not reported
    assert not any("matches none" in r for r in reps)
    assert [f.format("f.yaml") for f in d.check(["gpu-a1"]) if "matches none" in f.message] == [
        "f.yaml: domains.y.nodes[0]: 'gpu-*7' matches none of the 1 given nodes"]


def test_summary_shows_the_tree_and_counts():
    d = load_domains_text(GOOD)
    lines = d.summary(["gpu-a1-1", "gpu-a1-2", "gpu-b1-1"])
    assert lines[0] == "site dc1: 6 domains, 3 leaves, 3 levels, root site cap 2.4 MW"
    assert lines[1] == "site  cap 2.4 MW  children 2 sum 2.6 MW (1.08x)"
    assert lines[2] == "  hall-a  cap 1.3 MW  bands 0.98/0.93/0.9  children 2 sum 92 kW (0.07x)"
    assert lines[3] == "    rack-a1  cap 42 kW  nodes 2 entries, 2 matched"
    assert lines[-1] == "    rack-b1  cap 42 kW  nodes 1 entries, 1 matched"
    short = d.summary(max_lines=3)  # only the levels that fit, with what is below
    assert short[1:] == ["site  cap 2.4 MW  children 2 sum 2.6 MW (1.08x)",
                         "  hall-a  cap 1.3 MW  bands 0.98/0.93/0.9  children 2 sum 92 kW (0.07x)  (+2 below)",
                         "  hall-b  cap 1.3 MW  children 1 sum 42 kW (0.03x)  (+1 below)"]


def test_from_data_and_the_constructor_refuse_a_tree_without_one_root():
    d = Domains.from_data({"site": "s", "domains": {"r": {"cap_w": 5}}})
    assert d.root == "r" and d.leaves == ("r",) and d.depth == 1
    with pytest.raises(ValueError, match="exactly one root"):
        Domains("s", "x", {})
    from dataclasses import replace

    r = d["r"]
    looped = {"r": replace(r, children=("a",)), "a": replace(r, name="a", parent="r", children=("r",))}
    with pytest.raises(ValueError, match="reached twice from the root"):
        Domains("s", "x", looped)
    with pytest.raises(ValueError, match="reachable from the root"):
        Domains("s", "x", {"r": r, "z": replace(r, name="z", parent="r")})


def test_the_leaf_cache_is_bounded(monkeypatch):
    import rules.domains as mod

    monkeypatch.setattr(mod, "_LEAF_CACHE_MAX", 10)
    d = load_domains_text(GOOD)
    for i in range(25):
        assert d.leaf_of(f"junk-{i}") is None
    assert len(d._leaf_cache) <= 10
    assert d.leaf_of("gpu-a1-1") == "rack-a1"


# --- agentd domains check ----------------------------------------------------------------------

def test_cli_check_ok_prints_reports_and_the_tree(tmp_path):
    p = write(tmp_path, GOOD)
    res = CliRunner().invoke(domains_group, ["check", str(p)])
    assert res.exit_code == 0, res.output
    assert f"{p}: domains.site: children's caps sum to 2.6 MW, 1.08x its cap (2.4 MW): oversubscribed" in res.output
    assert "site dc1: 6 domains, 3 leaves, 3 levels" in res.output
    assert res.output.strip().endswith("OK: 0 error(s), 3 report(s)")


def test_cli_check_with_nodes_exits_2_on_a_node_in_two_leaves(tmp_path):
    p = write(tmp_path, """
site: s
domains:
  r: {cap_w: 100}
  x: {parent: r, cap_w: 50, nodes: ["gpu-a*"]}
  y: {parent: r, cap_w: 50, nodes: ["gpu-*7"]}
""")
    nf = tmp_path / "nodes.txt"
    nf.write_text("# the fleet\ngpu-a1\n\ngpu-b7  # comment\n")
    res = CliRunner().invoke(domains_group, ["check", str(p), "--nodes-file", str(nf)])
    assert res.exit_code == 0, res.output
    assert "3 node(s) checked" not in res.output and "2 node(s) checked" in res.output
    res = CliRunner().invoke(domains_group, ["check", str(p), "--nodes", "gpu-a1,gpu-a7, zz"])
    assert res.exit_code == 2
    assert f"{p}: node gpu-a7: matches 2 leaves" in res.output
    assert f"{p}: node zz: in no leaf of the tree" in res.output
    assert "1 error(s), 1 report(s), 3 node(s) checked" in res.output


def test_cli_check_bad_file_exits_2_with_every_error(tmp_path):
    p = write(tmp_path, "site: s\ndomains:\n  r: {cap_w: 0}\n  a: {parent: q, cap_w: 1}\n")
    res = CliRunner().invoke(domains_group, ["check", str(p)])
    assert res.exit_code == 2
    assert f"{p}: domains.r.cap_w: a cap must be a positive, finite number of watts (got: 0)" in res.output
    assert f"{p}: domains.a.parent: unknown domain 'q'" in res.output
    assert "2 error(s) in" in res.output
    res = CliRunner().invoke(domains_group, ["check", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "cannot read" in res.output


def test_cli_unreadable_nodes_file_is_a_usage_error(tmp_path):
    p = write(tmp_path, GOOD)
    res = CliRunner().invoke(domains_group, ["check", str(p), "--nodes-file", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "cannot read" in res.output and "--nodes-file" in res.output
