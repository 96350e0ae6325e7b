"""Property tests of allocate() and split_node_budget() (hypothesis, bounded examples).

Random trees (1-4 levels, 1-50 nodes), random reports (classes, floors, stale nodes) and random
limits, checked against what the allocator promises:

- no domain's allocated sum exceeds its limit, unless its shortfall_w reports the excess exactly;
- no node below its floor unless the floors alone (with the fixed nodes) exceed some ancestor's
  limit; never below min_w, never above max_w; a stale node at exactly its max;
- a node loses watts of a tier (headroom, a class, its floor) only where some ancestor domain
  binds with every lower tier in its subtree at zero (a higher class loses power in a domain only
  when every lower class in that domain is at its floor);
- nothing is left on the table: a node below its max has a binding ancestor.

Sums are recomputed here from the per-node budgets, never read back from the allocation.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.budget import CLASSES, TIERS, GpuDemand, NodeReport, allocate, split_node_budget
from rules.domains import Domains

REL = 1e-7


def tol(w: float) -> float:
    return 1e-6 + REL * abs(w)


_W = st.integers(0, 2000).map(float)
_NODE = st.tuples(
    st.integers(0, 3000).map(float),  # min_w
    _W,  # floor_w - min_w
    st.lists(st.one_of(st.just(0.0), _W), min_size=4, max_size=4),  # flex per class
    st.one_of(st.just(0.0), _W),  # headroom above want
    _W, _W,  # power, demand
    st.integers(0, 9),  # 0: stale
    st.integers(0, 99),  # which leaf (mod the leaf count)
)


@st.composite
def sites(draw):
    """(domains, reports, limits): a tree of 1-4 levels with 1-50 nodes in its leaves."""
    levels = draw(st.integers(1, 4))
    fanout = draw(st.lists(st.integers(1, 3), min_size=40, max_size=40))
    doms: dict[str, dict] = {"d0": {}}
    frontier = ["d0"]
    k = 1
    for _ in range(levels - 1):
        nxt = []
        for p in frontier:
            for _ in range(fanout[k % len(fanout)]):
                name = f"d{k}"
                k += 1
                doms[name] = {"parent": p}
                nxt.append(name)
        frontier = nxt
    parents = {v.get("parent") for v in doms.values()}
    leaves = [d for d in doms if d not in parents]
    n_nodes = draw(st.integers(1, 50))
    raw = draw(st.lists(_NODE, min_size=n_nodes, max_size=n_nodes))
    nodes_of: dict[str, list[str]] = {leaf: [] for leaf in leaves}
    reports = []
    for i, (lo, fl, flex, head, power, demand, stale, where) in enumerate(raw):
        nodes_of[leaves[where % len(leaves)]].append(f"n{i}")
        floor = lo + fl
        reports.append(NodeReport(f"n{i}", power, demand, lo, floor, floor + sum(flex) + head,
                                  dict(zip(CLASSES, flex)), stale=stale == 0))
    for leaf in leaves:
        doms[leaf]["nodes"] = nodes_of[leaf]
    by_node = {r.node: r for r in reports}
    tmp = Domains.from_data({"site": "p", "domains": {d: {**v, "cap_w": 1.0} for d, v in doms.items()}}, "p.yaml")
    # caps from a fraction of each subtree's max, so every regime shows up (slack to shortfall)
    frac = st.one_of(st.floats(0.6, 1.2), st.floats(0.6, 1.2), st.floats(0.05, 1.5))
    fracs = draw(st.lists(frac, min_size=len(doms), max_size=len(doms)))
    for (d, frac) in zip(doms, fracs):
        i, j = tmp.leaf_span(d)
        mx = sum(by_node[n].max_w for leaf in tmp.leaves[i:j] for n in nodes_of[leaf])
        doms[d]["cap_w"] = max(1.0, mx * frac)
    tree = Domains.from_data({"site": "p", "domains": doms}, "p.yaml")
    cut = draw(st.lists(st.sampled_from((1.0, 1.0, 0.95, 0.5)), min_size=len(doms), max_size=len(doms)))
    limits = {d: tree.cap_w(d) * c for d, c in zip(doms, cut)}
    return tree, reports, limits


def subtree_nodes(tree: Domains, d: str, reports) -> list[NodeReport]:
    under = set(tree.subtree(d))
    return [r for r in reports if tree.leaf_of(r.node) in under]


def tier_amounts(r: NodeReport) -> list[float]:
    """What the node holds of each tier (TIERS order) before any cut."""
    if r.stale:
        return [0.0] * len(TIERS)
    return [max(0.0, r.max_w - r.want_w), *(r.flexible_w.get(c, 0.0) for c in CLASSES), r.floor_w - r.min_w]


def tier_kept(al, r: NodeReport) -> list[float]:
    nb = al.node(r.node)
    return [nb.headroom_w, *(nb.kept_w[c] for c in CLASSES), nb.floor_kept_w]


@settings(max_examples=80, deadline=None)
@given(sites())
def test_allocate_keeps_every_limit_floors_and_priority(site):
    tree, reports, limits = site
    al = allocate(tree, reports, limits_w=limits)
    budget = al.budgets_w
    assert set(budget) == {r.node for r in reports}
    members = {d: subtree_nodes(tree, d, reports) for d in tree}
    alloc_sum = {d: sum(budget[r.node] for r in members[d]) for d in tree}
    binding = {d: alloc_sum[d] >= limits[d] - tol(limits[d]) for d in tree}
    floors_alone = {d: sum(r.max_w if r.stale else r.floor_w for r in members[d]) for d in tree}
    have = {r.node: tier_amounts(r) for r in reports}
    kept = {r.node: tier_kept(al, r) for r in reports}
    # per domain: the first tier some node of its subtree still holds (all below it are at zero)
    def first_held(n: str) -> int:
        return next((k for k in range(len(TIERS)) if kept[n][k] > tol(have[n][k])), len(TIERS))
    lowest_held = {d: min((first_held(r.node) for r in members[d]), default=len(TIERS)) for d in tree}

    for d in tree:
        dom = al.domains[d]
        assert abs(dom.allocated_w - alloc_sum[d]) <= tol(alloc_sum[d])
        if dom.shortfall_w > 0:  # the excess is reported exactly, and only when there is one
            assert abs(alloc_sum[d] - limits[d] - dom.shortfall_w) <= tol(limits[d]), (d, dom)
        else:
            assert alloc_sum[d] <= limits[d] + tol(limits[d]), (d, alloc_sum[d], limits[d])

    for r in reports:
        b = budget[r.node]
        path = tree.path_to_root(tree.leaf_of(r.node))
        if r.stale:
            assert b == r.max_w
            continue
        assert r.min_w - tol(r.min_w) <= b <= r.max_w + tol(r.max_w)
        if b < r.floor_w - tol(r.floor_w):
            assert any(floors_alone[d] > limits[d] for d in path), (r, b)
        if b < r.max_w - tol(r.max_w):  # nothing left on the table
            assert any(binding[d] for d in path), (r, b)
        h, k_ = have[r.node], kept[r.node]
        for k in range(len(TIERS)):
            assert -1e-9 <= k_[k] <= h[k] + tol(h[k])
            if k_[k] < h[k] - tol(h[k]):
                # cut in tier k: some binding ancestor has every lower tier at zero in its subtree
                assert any(binding[d] and lowest_held[d] >= k for d in path), (r.node, TIERS[k], k_, h)


@settings(max_examples=30, deadline=None)
@given(sites(), st.data())
def test_a_subtree_allocated_within_its_lease_holds_the_same_promises(site, data):
    tree, reports, limits = site
    root = data.draw(st.sampled_from(list(tree)))
    lease = data.draw(st.floats(0, 1.2)) * sum(r.max_w for r in subtree_nodes(tree, root, reports))
    al = allocate(tree, reports, limits_w={**limits, root: lease}, root=root)
    mine = subtree_nodes(tree, root, reports)
    assert set(al.budgets_w) == {r.node for r in mine}
    for d in tree.subtree(root):
        s = sum(al.budgets_w[r.node] for r in subtree_nodes(tree, d, reports))
        lim = lease if d == root else limits[d]
        if al.domains[d].shortfall_w > 0:
            assert abs(s - lim - al.domains[d].shortfall_w) <= tol(lim)
        else:
            assert s <= lim + tol(lim)


# (class, demand as a fraction of the range, floor above min, min_w, range max_w - min_w)
gpu = st.tuples(st.sampled_from(CLASSES), st.floats(0, 1.3), st.floats(0, 500), st.floats(50, 300), st.floats(0, 600))


@settings(max_examples=300, deadline=None)
@given(st.lists(gpu, min_size=1, max_size=8), st.floats(-0.1, 1.2))
def test_split_node_budget_invariants(raw, budget_frac):
    gpus = [GpuDemand(i, cls, lo + frac * span, lo + fl, lo, lo + span)
            for i, (cls, frac, fl, lo, span) in enumerate(raw)]
    budget = budget_frac * sum(x.max_w for x in gpus)
    out = split_node_budget(budget, gpus)
    lo = {x.gpu: x.min_w for x in gpus}
    hi = {x.gpu: x.max_w for x in gpus}
    fl = {x.gpu: min(max(x.floor_w, x.min_w), x.max_w) for x in gpus}
    want = {x.gpu: min(max(x.demand_w, fl[x.gpu]), x.max_w) for x in gpus}
    rank = {x.gpu: CLASSES.index(x.cls) for x in gpus}
    total = sum(out.values())
    for i, w in out.items():
        assert lo[i] - 1e-9 <= w <= hi[i] + 1e-9
    if sum(lo.values()) <= budget:
        assert abs(total - min(budget, sum(hi.values()))) <= 1e-6 * max(1.0, budget)
    else:
        assert out == lo  # every GPU at its minimum; the excess is sum - budget
    floors_fit = sum(fl.values()) <= budget + 1e-9
    for i in out:
        if out[i] < fl[i] - 1e-6:  # below its floor: the floors do not fit, and lower classes are at min
            assert not floors_fit
            assert all(out[j] <= lo[j] + 1e-6 for j in out if rank[j] < rank[i])
        if out[i] < want[i] - 1e-6:  # short of its demand: every lower class at (or under) its floor
            assert all(out[j] <= fl[j] + 1e-6 for j in out if rank[j] < rank[i])
            # max-min fair within the class: nobody of the class holds more above its floor
            assert all(out[j] <= max(out[i], fl[j]) + 1e-6 for j in out if rank[j] == rank[i])
        if out[i] > want[i] + 1e-6:  # headroom: every GPU has its demand, higher classes at max
            assert all(out[j] >= want[j] - 1e-6 for j in out)
            assert all(out[j] >= hi[j] - 1e-6 for j in out if rank[j] > rank[i])
