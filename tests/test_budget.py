"""rules/budget.py: node reports, the node split, allocate(), the three bands, the paced release."""

from __future__ import annotations

import math
import random

import pytest

from rules.budget import (CLASSES, BandTracker, DomainBands, GpuDemand, Level, NodeReport, ReleaseLimiter,
                          allocate, domain_totals, node_report, split_node_budget)
from rules.domains import Bands, Domains, load_domains_text


def tree(**leaves: tuple[float, list[str]]) -> Domains:
    """site (cap 1e9 unless 'site' given) -> one leaf per keyword: (cap_w, nodes)."""
    site_cap = leaves.pop("site", (1e9, []))[0]
    doms: dict[str, dict] = {"site": {"cap_w": site_cap}}
    for name, (cap, nodes) in leaves.items():
        doms[name] = {"parent": "site", "cap_w": cap, "nodes": nodes}
    return Domains.from_data({"site": "t", "domains": doms}, "t.yaml")


def rep(node: str, *, min_w: float = 1000, floor_w: float | None = None, max_w: float = 5000,
        power_w: float = 3000, demand_w: float | None = None, stale: bool = False, **flex: float) -> NodeReport:
    floor = min_w if floor_w is None else floor_w
    return NodeReport(node, power_w, floor + sum(flex.values()) if demand_w is None else demand_w,
                      min_w, floor, max_w, flex, stale=stale)


# --- reports ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"power_w": -1}, r"node report 'n': power_w must be a finite number of watts >= 0 \(got: -1\)"),
    ({"max_w": math.nan}, "max_w must be a finite number"),
    ({"demand_w": math.inf}, "demand_w must be a finite number"),
    ({"min_w": True}, "min_w must be a finite number"),
    ({"node": ""}, "node report '': node must be a non-empty name"),
    ({"floor_w": 500}, r"need min_w <= floor_w <= max_w \(got: min_w=1000, floor_w=500, max_w=5000\)"),
    ({"flexible_w": {"urgent": 1}}, "flexible_w: unknown class 'urgent' \\(one of idle, low, normal, high\\)"),
    ({"flexible_w": {"low": -1}}, "flexible_w.low must be a finite number of watts >= 0"),
    ({"flexible_w": {"low": 3000, "high": 2000}}, r"floor_w \+ sum\(flexible_w\) = 6000 is above max_w \(5000\)"),
])
def test_a_bad_report_is_refused_with_what_is_wrong(kw, match):
    args = {"node": "n", "power_w": 100, "demand_w": 100, "min_w": 1000, "floor_w": 1000, "max_w": 5000,
            "flexible_w": {}} | kw
    with pytest.raises(ValueError, match=match):
        NodeReport(**args)


def test_node_report_from_gpus_sums_bounds_and_flex_per_class():
    gpus = [GpuDemand(0, "high", 650, 400, 200, 700), GpuDemand(1, "low", 900, 100, 200, 700),
            GpuDemand(2, "idle", 60, 0, 200, 700), GpuDemand(3, "high", 300, 400, 200, 700)]
    r = node_report("n1", gpus, power_w=1800)
    assert (r.min_w, r.floor_w, r.max_w) == (800, 1200, 2800)  # floors clamped into [min, max]
    assert r.flexible_w == {"idle": 0.0, "low": 500.0, "normal": 0.0, "high": 250.0}
    assert r.demand_w == 650 + 700 + 60 + 300  # physical (capped at max), may sit below the floor
    assert r.want_w == 1200 + 750 and not r.stale
    with pytest.raises(ValueError, match="gpu 5: unknown class 'vip'"):
        node_report("n", [GpuDemand(5, "vip", 1, 1, 1, 2)], 0)


# --- the node split -----------------------------------------------------------------------------

def g(i: int, cls: str, demand: float, floor: float = 200, lo: float = 200, hi: float = 700) -> GpuDemand:
    return GpuDemand(i, cls, demand, floor, lo, hi)


def test_split_cuts_the_lowest_class_first_idle_first():
    gpus = [g(0, "high", 700, 400), g(1, "normal", 700, 300), g(2, "low", 700), g(3, "idle", 90)]
    # wants 700+700+700+200 = 2300, maxes 2800
    assert split_node_budget(2800, gpus) == {0: 700, 1: 700, 2: 700, 3: 700}  # idle gets headroom last
    assert split_node_budget(2400, gpus) == {0: 700, 1: 700, 2: 700, 3: 300}
    assert split_node_budget(2300, gpus) == {0: 700, 1: 700, 2: 700, 3: 200}
    assert split_node_budget(1900, gpus) == {0: 700, 1: 700, 2: 300, 3: 200}  # low cut before normal
    assert split_node_budget(1500, gpus) == {0: 700, 1: 400, 2: 200, 3: 200}  # low at floor, normal cut
    assert split_node_budget(1100, gpus) == {0: 400, 1: 300, 2: 200, 3: 200}  # every floor honoured


def test_split_gives_headroom_above_demand_highest_class_first():
    gpus = [g(0, "idle", 90), g(1, "high", 400, 300), g(2, "low", 300)]  # wants 200 + 400 + 300
    assert split_node_budget(1200, gpus) == {0: 200, 1: 700, 2: 300}  # high's headroom first
    assert split_node_budget(1500, gpus) == {0: 200, 1: 700, 2: 600}  # then low's; idle's last
    assert split_node_budget(9999, gpus) == {0: 700, 1: 700, 2: 700}


def test_split_is_max_min_fair_within_a_class():
    gpus = [g(0, "normal", 700), g(1, "normal", 350), g(2, "normal", 700), g(3, "normal", 700)]
    out = split_node_budget(2000, gpus)
    assert out[1] == 350 and all(abs(out[i] - 550) < 1e-9 for i in (0, 2, 3))
    assert abs(sum(out.values()) - 2000) < 1e-9


def test_split_below_the_floors_gives_way_lowest_class_first_then_reports_the_excess():
    gpus = [g(0, "high", 700, 500), g(1, "low", 700, 400)]
    assert split_node_budget(800, gpus) == {0: 500, 1: 300}  # high's floor kept, low's floor given way
    assert split_node_budget(600, gpus) == {0: 400, 1: 200}  # low at its minimum, then high's floor
    out = split_node_budget(300, gpus)  # under the sum of minimums: every GPU at its minimum
    assert out == {0: 200, 1: 200} and sum(out.values()) - 300 == 100
    assert split_node_budget(-50, gpus) == {0: 200, 1: 200}


def test_split_refuses_nonsense():
    with pytest.raises(ValueError, match="budget_w must be a number of watts"):
        split_node_budget(math.nan, [g(0, "low", 1)])
    with pytest.raises(ValueError, match="gpu 0: listed twice"):
        split_node_budget(100, [g(0, "low", 1), g(0, "low", 1)])
    with pytest.raises(ValueError, match=r"gpu 1: min_w \(800\) is above max_w \(700\)"):
        split_node_budget(100, [g(1, "low", 1, lo=800)])
    with pytest.raises(ValueError, match="gpu 2: demand_w must be a finite number of watts >= 0"):
        split_node_budget(100, [g(2, "low", -1)])
    assert split_node_budget(100, []) == {}


# --- allocate -----------------------------------------------------------------------------------

def test_nothing_binds_every_node_keeps_its_max():
    d = tree(r1=(20000, ["a", "b"]))
    a = allocate(d, [rep("a", low=1000), rep("b", high=2000)])
    assert a.budgets_w == {"a": 5000, "b": 5000}
    assert a.domains["r1"].cut is None and a.domains["r1"].unallocated_w == 10000 and a.shortfall_w == 0


def test_headroom_goes_first_then_classes_lowest_first():
    d = tree(r1=(1e9, ["a", "b"]))  # cap replaced per case through limits_w
    a_ = rep("a", idle=500, low=1000, high=500)  # want 3000, headroom 2000
    b_ = rep("b", normal=1000, high=1000)  # want 3000, headroom 2000

    def run(limit):
        al = allocate(d, [a_, b_], limits_w={"r1": limit})
        return al, al.node("a"), al.node("b")

    al, na, nb = run(8000)  # 2000 of headroom cut, max-min fair: 1000 each
    assert (na.budget_w, nb.budget_w) == (4000, 4000) and na.headroom_w == 1000 and al.domains["r1"].cut == "headroom"
    al, na, nb = run(6000)  # exactly the wants
    assert (na.budget_w, nb.budget_w) == (3000, 3000) and al.domains["r1"].cut == "headroom"
    al, na, nb = run(5700)  # idle before low
    assert na.kept_w == {"idle": 200, "low": 1000, "normal": 0, "high": 500} and nb.budget_w == 3000
    assert al.domains["r1"].cut == "idle"
    al, na, nb = run(5000)  # idle gone, low cut
    assert na.kept_w["idle"] == 0 and na.kept_w["low"] == 500 and nb.budget_w == 3000 and al.domains["r1"].cut == "low"
    al, na, nb = run(4000)  # low gone: normal (b) before anyone's high
    assert na.kept_w["high"] == 500 and nb.kept_w == {"idle": 0, "low": 0, "normal": 500, "high": 1000}
    al, na, nb = run(3000)  # high, water level: b's 1000 cut to 500, a's 500 kept
    assert na.kept_w["high"] == 500 and nb.kept_w["high"] == 500 and al.domains["r1"].cut == "high"
    assert al.domains["r1"].allocated_w == 3000 and al.domains["r1"].shortfall_w == 0


def test_a_cut_within_a_class_goes_to_the_largest_holders_first():
    d = tree(r=(1e9, ["a", "b", "c"]))
    reps = [rep("a", max_w=3000, normal=400), rep("b", max_w=3000, normal=1200), rep("c", max_w=3000, normal=2000)]
    al = allocate(d, reps, limits_w={"r": 3000 + 1800})  # floors 3000; flex 3600 -> keep 1800
    kept = {n: al.node(n).kept_w["normal"] for n in "abc"}
    assert kept == {"a": 400, "b": 700, "c": 700}  # level 700: a untouched, b and c cut to it


def test_floors_alone_over_a_limit_cut_toward_min_then_report_the_shortfall():
    d = tree(r=(1e9, ["a", "b"]))
    reps = [rep("a", min_w=1000, floor_w=2000, high=500), rep("b", min_w=1000, floor_w=1500, low=500)]
    # floors 3500 > 3000: the 1500 above the minimums keeps 1000, by a water level (500 each)
    al = allocate(d, reps, limits_w={"r": 3000})
    assert al.budgets_w == {"a": 1500, "b": 1500} and al.domains["r"].cut == "floor"
    assert al.node("a").floor_kept_w == 500 and al.node("a").kept_w["high"] == 0
    assert al.domains["r"].shortfall_w == 0
    al = allocate(d, reps, limits_w={"r": 1500})  # under the minimums (2000): the excess is reported
    assert al.budgets_w == {"a": 1000, "b": 1000}
    r = al.domains["r"]
    assert r.shortfall_w == 500 and r.allocated_w - r.limit_w == 500 and al.shortfall_w == 500
    assert r.unallocated_w == 0 and not math.isnan(r.headroom_w)


def test_every_level_holds_and_an_ancestor_cuts_across_its_children():
    d = load_domains_text("""
site: t
domains:
  site: {cap_w: 9000}
  h1: {parent: site, cap_w: 8000}
  r1: {parent: h1, cap_w: 4000, nodes: [a]}
  r2: {parent: h1, cap_w: 6000, nodes: [b]}
  h2: {parent: site, cap_w: 8000}
  r3: {parent: h2, cap_w: 6000, nodes: [c]}
""")
    reps = [rep("a", low=2000), rep("b", high=4000), rep("c", low=1000, high=2000)]
    al = allocate(d, reps)
    # r1: a 5000 -> 4000 (headroom); h1: 4000 + 5000 over 8000: a's last 1000 of headroom;
    # site: 8000 + c's 5000 over 9000 by 4000: c's headroom (1000), then low (a 2000, c 1000);
    # b's high class is never touched
    assert al.budgets_w == {"a": 1000, "b": 5000, "c": 3000}
    for dom in al.domains.values():
        assert dom.allocated_w <= dom.limit_w + 1e-9
    assert al.domains["site"].cut == "low" and al.domains["r1"].cut == "headroom"
    assert al.domains["h1"].cut == "headroom" and al.domains["h1"].allocated_w == 6000
    assert al.domains["h2"].cut is None and al.domains["r3"].allocated_w == 3000


def test_stale_nodes_count_at_max_and_are_not_cut():
    d = tree(r=(1e9, ["a", "b"]))
    reps = [rep("a", max_w=5000, stale=True, low=3000), rep("b", normal=3000)]
    al = allocate(d, reps, limits_w={"r": 7000})
    assert al.budgets_w["a"] == 5000 and al.budgets_w["b"] == 2000  # b at its floor + 1000 of normal
    assert al.node("a").stale and not al.node("a").absent
    assert al.domains["r"].power_w == 5000 + 3000  # a counted at its max in the figures too
    al = allocate(d, reps, limits_w={"r": 4000})
    assert al.budgets_w == {"a": 5000, "b": 1000} and al.domains["r"].shortfall_w == 2000


def test_nodes_without_reports_are_counted_so_they_cannot_make_room():
    d = tree(r=(10000, ["a", "b", "gpu-*"]))
    reps = [rep("a", normal=4000)]
    al = allocate(d, reps)
    assert al.unaccounted == ("b",) and al.absent == () and al.budgets_w == {"a": 5000}
    al = allocate(d, reps, default_absent_w=6000)
    assert al.absent == ("b",) and al.budgets_w == {"a": 4000, "b": 6000}
    assert al.node("b").absent and al.domains["r"].nodes == 2
    # a glob-matched node the controller knows of (it reported before) at its last known max
    al = allocate(d, reps, absent_w={"gpu-7": 3000}, default_absent_w=6000)
    assert al.budgets_w == {"a": 1000, "b": 6000, "gpu-7": 3000} and set(al.absent) == {"b", "gpu-7"}
    assert al.domains["r"].shortfall_w == 0 and al.domains["r"].cut == "normal"
    al = allocate(d, reps, absent_w={"zz": 3000, "a": 9999})  # not in the tree / has a report: ignored
    assert al.budgets_w == {"a": 5000} and al.absent == ()
    with pytest.raises(ValueError, match=r"absent_w\['x'\] must be a finite number of watts >= 0"):
        allocate(d, reps, absent_w={"x": -1})
    with pytest.raises(ValueError, match="default_absent_w must be a finite number"):
        allocate(d, reps, default_absent_w=math.nan)


def test_reports_outside_the_tree_are_skipped_with_the_reason():
    d = load_domains_text("""
site: t
domains:
  site: {cap_w: 1e9}
  h1: {parent: site, cap_w: 1e9}
  x: {parent: h1, cap_w: 1e9, nodes: ["gpu-a*"]}
  y: {parent: site, cap_w: 1e9, nodes: ["gpu-*7", "q"]}
""", "t.yaml")
    reps = [rep("gpu-a1"), rep("gpu-a7"), rep("zz"), rep("gpu-b7")]
    al = allocate(d, reps, default_absent_w=100)
    assert set(al.budgets_w) == {"gpu-a1", "gpu-b7", "q"}
    assert al.skipped["zz"] == "not in any leaf of t.yaml"
    assert al.skipped["gpu-a7"].startswith("t.yaml: node 'gpu-a7' matches 2 leaves")
    sub = allocate(d, reps, root="h1", limits_w={"h1": 2000}, default_absent_w=100)  # a subtree controller
    assert sub.budgets_w == {"gpu-a1": 2000} and set(sub.domains) == {"h1", "x"}
    assert sub.skipped["gpu-b7"] == "in y, outside h1" and sub.root == "h1"


def test_allocate_refuses_bad_arguments():
    d = tree(r=(1000, ["a"]))
    with pytest.raises(ValueError, match="unknown root domain 'q'"):
        allocate(d, [], root="q")
    with pytest.raises(ValueError, match="limits_w names unknown domain 'rr'"):
        allocate(d, [], limits_w={"rr": 5})
    for bad in (-1, math.nan, math.inf, "5"):
        with pytest.raises(ValueError, match=r"limits_w\['r'\] must be a finite number of watts >= 0"):
            allocate(d, [], limits_w={"r": bad})
    class Watts(float):
        pass

    assert allocate(d, [rep("a")], limits_w={"r": Watts(500)}).domains["r"].limit_w == 500  # a float subclass
    with pytest.raises(ValueError, match="two reports for node 'a'"):
        allocate(d, [rep("a"), rep("a")])


def test_same_nodes_next_cycle_reuse_the_layout_and_give_the_same_answer():
    d = tree(r1=(6000, ["a", "b"]), r2=(6000, ["c*"]))
    first = [rep("a", low=2000), rep("c1", high=3000), rep("b", normal=1000)]
    x = allocate(d, first)
    y = allocate(d, {r.node: r for r in first})  # a Mapping, same order: the cached layout
    assert x.budgets_w == y.budgets_w and x.domains == y.domains
    again = [rep("a", low=500), rep("c1", high=3000), rep("b", normal=3000)]  # same names, new figures
    z = allocate(d, again)
    fresh = allocate(tree(r1=(6000, ["a", "b"]), r2=(6000, ["c*"])), again)
    assert z.budgets_w == fresh.budgets_w and z.domains == fresh.domains
    w = allocate(d, list(reversed(again)))  # another order
    assert w.budgets_w == z.budgets_w


def test_domain_figures_and_totals():
    d = tree(r1=(6000, ["a", "b"]), r2=(9000, ["c"]))
    reps = [rep("a", power_w=1000, demand_w=1200, low=2000), rep("b", power_w=2000, normal=1000),
            rep("c", power_w=500, stale=True)]
    al = allocate(d, reps)
    r1 = al.domains["r1"]
    assert (r1.power_w, r1.demand_w, r1.cap_w, r1.limit_w, r1.nodes) == (3000, 1200 + 2000, 6000, 6000, 2)
    assert r1.headroom_w == 3000 and r1.allocated_w == 6000 and r1.binding
    assert al.domains["site"].power_w == 3000 + 5000  # stale c at its max
    assert not al.domains["r2"].binding and al.domains["r2"].unallocated_w == 4000
    t = domain_totals(d, reps)
    assert t.power_w == {"site": 8000, "r1": 3000, "r2": 5000}
    assert t.demand_w == {"site": 8200, "r1": 3200, "r2": 5000}
    t = domain_totals(d, reps + [rep("zz")], root="r1")
    assert t.power_w == {"r1": 3000}


# --- three bands --------------------------------------------------------------------------------

def test_bands_cap_above_the_threshold_and_release_only_below_the_uncap_threshold():
    b = DomainBands(cap_w=1000, bands=Bands(0.98, 0.95, 0.90))
    assert b.step(0, 970, 990) == (Level.UNCAPPED, 1000, False)
    assert b.step(1, 981, 1100) == (Level.CAPPING, 950, True)  # measured power above 980
    assert b.step(2, 940, 1100) == (Level.CAPPING, 950, False)  # demand still high: stays capped
    assert b.step(3, 800, 901) == (Level.CAPPING, 950, False)  # 901 >= 900
    assert b.step(4, 800, 899) == (Level.UNCAPPED, 1000, True)
    assert b.state.transitions == 2 and b.state.since == 4


def test_bands_hold_and_meter():
    b = DomainBands(cap_w=1000, bands=Bands(0.98, 0.95, 0.90), min_hold_s=30)
    assert b.step(0, 900, 900, meter_w=990).level is Level.CAPPING  # the meter reads higher
    s = b.step(1, 900, 900, meter_w=990)
    assert s.limit_w == pytest.approx(950 - 90)  # the meter's non-GPU 90 W comes off the GPU budget
    assert b.step(10, 100, 100).level is Level.CAPPING  # demand low, but within min_hold_s
    assert b.step(31, 100, 100) == (Level.UNCAPPED, 1000, True)
    assert b.step(32, 900, 900, meter_w=500).level is Level.UNCAPPED  # a lower meter is ignored
    assert b.step(33, 900, 900, meter_w=math.nan).level is Level.UNCAPPED
    assert b.step(34, 900, 800, meter_w=2000) == (Level.CAPPING, 0.0, True)  # never a negative limit


def test_band_tracker_steps_every_domain_and_counts_transitions():
    d = tree(r1=(1000, ["a"]), r2=(1000, ["b"]))
    bt = BandTracker(d)
    s = bt.step(0, {"site": 1500, "r1": 990, "r2": 500}, {"site": 1500, "r1": 990, "r2": 500})
    assert s.levels == {"site": Level.UNCAPPED, "r1": Level.CAPPING, "r2": Level.UNCAPPED}
    assert s.limits_w == {"site": 1e9, "r1": 950, "r2": 1000} and s.transitions == 1 and s.changed == ("r1",)
    s = bt.step(1, {}, {})  # nothing known: 0 W, r1 releases
    assert s.transitions == 1 and s.levels["r1"] is Level.UNCAPPED
    sub = BandTracker(d, root="r1")
    assert set(sub.step(0, {}, {}).levels) == {"r1"}
    with pytest.raises(ValueError, match="min_hold_s must be >= 0"):
        BandTracker(d, min_hold_s=-1)
    bt = BandTracker(d)
    bt.step(0, {"r1": 990}, {"r1": 990})
    for bad in (math.nan, -5, math.inf):
        with pytest.raises(ValueError, match=r"bands: demand_w\['r1'\] must be a finite number of watts >= 0"):
            bt.step(1, {"r1": 100, "r2": 990}, {"r1": bad})
    assert bt.bands["r2"].state.level is Level.UNCAPPED  # the refused step moved nothing
    assert bt.bands["r1"].state.level is Level.CAPPING


# --- paced release ------------------------------------------------------------------------------

def test_release_falls_at_once_rises_at_the_rate_after_hold():
    rl = ReleaseLimiter(rise_w_per_s=100, jitter=0, hold_s=5)
    assert rl.step(0, {"a": 3000}) == {"a": 3000}  # first seen: at once
    assert rl.step(1, {"a": 1000}) == {"a": 1000}  # a fall: at once
    assert rl.step(3, {"a": 5000}) == {"a": 1000}  # within hold_s of the fall
    assert rl.step(6, {"a": 5000}) == {"a": 1300}  # 3 s x 100 W/s
    assert rl.step(7, {"a": 5000}) == {"a": 1400}
    assert rl.step(8, {"a": 1350}) == {"a": 1350}  # a fall interrupts the rise
    assert rl.step(9, {"b": 10}) == {"b": 10}  # a forgotten; b new
    assert rl.step(10, {"a": 4000}) == {"a": 4000}  # a comes back as new


def test_release_jitter_is_per_node_deterministic_and_bounded():
    def run(seed: int) -> dict[str, float]:
        rl = ReleaseLimiter(rise_w_per_s=100, jitter=0.3, rng=random.Random(seed), max_step_s=2)
        nodes = {f"n{i}": 1000.0 for i in range(200)}
        rl.step(0, nodes)
        return rl.step(10, {n: 9000.0 for n in nodes})  # 10 s gap counted as 2
    a, b = run(1), run(1)
    assert a == b
    rises = sorted(v - 1000 for v in a.values())
    assert 140 <= rises[0] < rises[-1] <= 260 and rises[-1] - rises[0] > 60


def test_release_refuses_nonsense():
    for kw in ({"rise_w_per_s": 0}, {"rise_w_per_s": math.inf}, {"jitter": 1.0}, {"hold_s": -1}):
        with pytest.raises(ValueError):
            ReleaseLimiter(**kw)
    rl = ReleaseLimiter(rise_w_per_s=100, jitter=0)
    rl.step(0, {"a": 1000, "b": 2000})
    for bad in (math.nan, -1, math.inf):
        with pytest.raises(ValueError, match="release: budget of node 'b' must be a finite number of watts >= 0"):
            rl.step(1, {"a": 1050, "b": bad})
    # the refused steps changed nothing: a rises from 1000 over the 2 s since the last good step
    assert rl.step(2, {"a": 5000, "b": 2000}) == {"a": 1200, "b": 2000}


def test_classes_are_lowest_first():
    assert CLASSES == ("idle", "low", "normal", "high")
