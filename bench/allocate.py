"""allocate() for 10,000 nodes x 8 GPUs in a 4-level tree (site -> halls -> rows -> racks).

Each node's report is built from 8 simulated GPUs (``rules.budget.node_report``): per GPU a
class (10 % idle, and of the busy ones 20 % high, 50 % normal, 30 % low), a demand between 55 %
and 100 % of its 700 W max, a 200 W minimum limit and a class floor (high 400 W, normal 300 W,
low and idle at the minimum). Caps bind at several levels: the site at 80 % of the summed
want, one hall at 70 % of its want, one row in every hall at 75 %, and 5 % of the racks at 85 %
of theirs; every other domain's cap sits above its want but below its nodes' maximum, so it
binds on headroom (1,302 of the 1,306 domains cut: a hard case). 1 % of the nodes are stale.
``allocate`` is called as the controller calls it: its table of latest reports (the same order
every cycle) and every domain's limit.

The figure is the wall time of ``allocate`` (p50 and min over ``--repeats`` runs, a full
collection before each and the collector on during it; after one warm-up that fills the domain
tree's node-to-leaf cache and the layout, as a controller's every cycle after its first; the
cold first call, and the p50 with the collector off as timeit measures, are printed too).
The baseline, measured in the same run on the same reports: a naive hierarchical proportional
allocator (every node's want scaled by the tightest ratio limit/want of its ancestors, one
pass), which knows nothing of classes or floors; the ratio says what the priority-aware water
levels cost over it.

    python bench/allocate.py [--nodes 10000] [--repeats 30] [--seed 1]

Last line: ``allocate_ms=.. nodes=.. gpus=.. domains=.. levels=.. min_ms=.. nogc_ms=.. baseline_ms=.. ratio=..``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rules.budget import CLASSES, GpuDemand, NodeReport, allocate, node_report  # noqa: E402
from rules.domains import Domains  # noqa: E402

HALLS, ROWS, RACKS = 5, 10, 25  # 5 x 10 x 25 = 1250 racks of 8 nodes = 10,000 nodes
FLOOR_W = {"high": 400.0, "normal": 300.0, "low": 200.0, "idle": 200.0}


def build(n_nodes: int, seed: int) -> tuple[Domains, list[NodeReport]]:
    """The tree (racks of 8 nodes named by glob) and one report per node."""
    rng = random.Random(seed)
    racks = -(-n_nodes // 8)
    per_row = max(1, -(-racks // (HALLS * ROWS)))
    reports: list[NodeReport] = []
    rack_nodes: dict[str, list[NodeReport]] = {}
    k = 0
    for h in range(HALLS):
        for r in range(ROWS):
            for q in range(per_row):
                rack = f"h{h}-r{r}-k{q}"
                rack_nodes[rack] = []
                for m in range(8):
                    if k >= n_nodes:
                        break
                    k += 1
                    gpus = []
                    for g in range(8):
                        cls = "idle" if rng.random() < 0.1 else rng.choices(("high", "normal", "low"), (20, 50, 30))[0]
                        demand = 90.0 if cls == "idle" else 700.0 * rng.uniform(0.55, 1.0)
                        gpus.append(GpuDemand(g, cls, demand, FLOOR_W[cls], 200.0, 700.0))
                    rep = node_report(f"n-{rack}-{m}", gpus, power_w=sum(min(x.demand_w, 700.0) for x in gpus),
                                      stale=rng.random() < 0.01)
                    reports.append(rep)
                    rack_nodes[rack].append(rep)
    want = {rack: sum(x.max_w if x.stale else x.want_w for x in reps) for rack, reps in rack_nodes.items()}
    doms: dict[str, dict[str, object]] = {}
    site_want = sum(want.values())
    doms["site"] = {"cap_w": 0.80 * site_want}
    for h in range(HALLS):
        hall_want = sum(w for rk, w in want.items() if rk.startswith(f"h{h}-"))
        doms[f"hall{h}"] = {"parent": "site", "cap_w": (0.70 if h == 0 else 1.10) * max(hall_want, 1.0)}
        for r in range(ROWS):
            row_want = sum(w for rk, w in want.items() if rk.startswith(f"h{h}-r{r}-"))
            doms[f"row{h}-{r}"] = {"parent": f"hall{h}", "cap_w": (0.75 if r == 3 else 1.10) * max(row_want, 1.0)}
            for q in range(per_row):
                rack = f"h{h}-r{r}-k{q}"
                if rack not in want or not rack_nodes[rack]:
                    continue
                tight = rng.random() < 0.05
                doms[f"rack{rack}"] = {"parent": f"row{h}-{r}", "cap_w": (0.85 if tight else 1.2) * want[rack],
                                       "nodes": [f"n-{rack}-*"]}
    return Domains.from_data({"site": "bench", "domains": doms}, "<bench>"), reports


def proportional(domains: Domains, reports: list[NodeReport]) -> dict[str, float]:
    """The baseline: scale each node's want by the tightest limit/want ratio on its path."""
    want: dict[str, float] = dict.fromkeys(domains, 0.0)
    leaf_of = {r.node: domains.leaf_of(r.node) for r in reports}
    for r in reports:
        want[leaf_of[r.node]] += r.max_w if r.stale else r.want_w  # type: ignore[index]
    for d in reversed(list(domains)):
        kids = domains.children(d)
        if kids:
            want[d] = sum(want[c] for c in kids)
    ratio: dict[str, float] = {}
    for d in domains:
        own = min(1.0, domains.cap_w(d) / want[d]) if want[d] > 0 else 1.0
        p = domains.parent(d)
        ratio[d] = own if p is None else min(own, ratio[p])
    return {r.node: (r.max_w if r.stale else r.want_w) * ratio[leaf_of[r.node]] for r in reports}  # type: ignore[index]


def timed(fn, repeats: int, gc_on: bool = True) -> list[float]:
    """Wall ms per call; a full collection before each (the previous call's garbage is not
    charged to the next), the collector left on during the call unless ``gc_on`` is False."""
    out = []
    for _ in range(repeats):
        gc.collect()
        if not gc_on:
            gc.disable()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        gc.enable()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    domains, reports = build(args.nodes, args.seed)
    # as the controller calls it: the latest report per node (kept in one table, so the same
    # order each cycle) and every domain's limit for this cycle from the bands (here the caps)
    table = {r.node: r for r in reports}
    limits = {d: domains.cap_w(d) for d in domains}
    t0 = time.perf_counter()
    alloc = allocate(domains, table, limits_w=limits)
    cold_ms = (time.perf_counter() - t0) * 1000
    ms = timed(lambda: allocate(domains, table, limits_w=limits), args.repeats)
    ms_nogc = timed(lambda: allocate(domains, table, limits_w=limits), args.repeats, gc_on=False)
    base_ms = timed(lambda: proportional(domains, reports), args.repeats)
    binding = sorted((d for d, a in alloc.domains.items() if a.cut), key=lambda d: domains[d].depth)
    by_level: dict[int, int] = {}
    for d in binding:
        by_level[domains[d].depth] = by_level.get(domains[d].depth, 0) + 1
    cuts = {d: alloc.domains[d].cut for d in binding[:4]}
    flex = {c: sum(r.flexible_w.get(c, 0.0) for r in reports if not r.stale) for c in CLASSES}
    kept = {c: sum(alloc.node(r.node).kept_w[c] for r in reports if not r.stale) / flex[c] for c in CLASSES if flex[c] > 0}
    p50, p50b, p50n = statistics.median(ms), statistics.median(base_ms), statistics.median(ms_nogc)
    print(f"nodes={len(reports)} gpus={8 * len(reports)} domains={len(domains)} levels={domains.depth} "
          f"binding domains per level {dict(sorted(by_level.items()))} (first: {cuts})")
    print("flexible watts kept per class: " + " ".join(f"{c}={v:.1%}" for c, v in kept.items()))
    print(f"allocate: cold {cold_ms:.1f} ms (first call: every node's leaf resolved, the globs compiled); "
          f"then p50 {p50:.1f} ms, min {min(ms):.1f} ms over {args.repeats} (collector on); "
          f"p50 {p50n:.1f} ms with the collector off (timeit style)")
    print(f"proportional baseline: p50 {p50b:.1f} ms, min {min(base_ms):.1f} ms; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}")
    print(f"allocate_ms={p50:.1f} nodes={len(reports)} gpus={8 * len(reports)} domains={len(domains)} "
          f"levels={domains.depth} min_ms={min(ms):.1f} nogc_ms={p50n:.1f} baseline_ms={p50b:.1f} ratio={p50 / p50b:.2f}")


if __name__ == "__main__":
    main()
