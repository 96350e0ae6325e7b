"""Site power allocation: who may draw how much, under every domain's cap. Pure, no I/O.

Time always comes in as an argument (``now``); randomness from an injected ``random.Random``.

Priority classes, lowest first: ``CLASSES = ("idle", "low", "normal", "high")``; a GPU with no
job is ``idle``, its own lowest class. A node reports (``NodeReport``) its power, its demand (what
it would draw uncapped), the sum of its GPUs' minimum limits (``min_w``), its floor (``floor_w``:
the per-GPU floors summed, a job class's floor honoured), its maximum (``max_w``) and its flexible
watts per class (``flexible_w``: what it could shed in each class down to that class's floor).

``allocate`` gives every node a budget such that every domain's limit holds at every level. It
starts each node at its maximum and cuts, domain by domain from the leaves up, in tiers:

1. ``headroom``: budget above the node's want (``floor_w + sum(flexible_w)``);
2. the classes' flexible watts, ``idle`` first, then ``low``, ``normal``, ``high``;
3. ``floor``: between ``floor_w`` and ``min_w``, only when the floors alone exceed a limit.

A domain over its limit takes the whole of a tier across its subtree before it touches the
next, so a higher class loses a watt only when every lower class in that domain is at its floor.
Within a tier the cut is a water level: each node keeps ``min(its watts in that tier, level)``,
so the largest holders are cut first and nobody is cut below the level. When even every node at
``min_w`` exceeds a limit, the excess is that domain's ``shortfall_w``: reported, never hidden.
A stale node (``stale=True``) and a node the file names that sent no report are counted at a
fixed figure (their last known maximum, the caller's default) and are never cut: a silent node
cannot make room for others. Cost: O(n log n) per binding domain (sort-based water levels over
contiguous slices; no per-watt loops).

``BandTracker`` steps the three-band hysteresis per domain (which limit to allocate within);
``ReleaseLimiter`` paces budget rises per node (Thunderbolt: falls at once, rises rate-limited
and randomized); ``split_node_budget`` divides a node's budget over its GPUs by class.
"""

from __future__ import annotations

import math
import random
import struct
from bisect import bisect_right
from collections import Counter
from itertools import accumulate
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, cast

from collectors.classes import CLASSES  # the one list of priority classes, lowest first
from rules.domains import Bands, Domain, Domains, DomainsError

__all__ = ["CLASSES", "TIERS", "Allocation", "BandTracker", "BandState", "BandStep", "BandsStep", "DomainAllocation",
           "DomainBands", "DomainTotals", "GpuDemand", "Level", "NodeBudget", "NodeReport", "ReleaseLimiter",
           "allocate", "domain_totals", "node_report", "split_node_budget"]
#: The order in which ``allocate`` cuts: headroom above want, each class lowest first, then floors.
TIERS: tuple[str, ...] = ("headroom", *CLASSES, "floor")
_RANK = {c: i for i, c in enumerate(CLASSES)}
_ZERO_TIERS = (0.0,) * len(TIERS)
#: the layout of NodeReport._row: column name -> index
_ROW = {name: k for k, name in enumerate(("base", "total", *TIERS, "power", "demand"))}
_PACK = struct.Struct(f"={len(_ROW)}d").pack


def _finite_nonneg(v: float, what: str) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{what} must be a finite number of watts >= 0 (got: {v!r})")


def _tol(w: float) -> float:
    return 1e-6 * max(1.0, abs(w))


@dataclass(frozen=True, slots=True)
class NodeReport:
    """A node's power report, as the controller allocates from it (all figures in W).

    ``flexible_w[c]`` is what the node could shed in class ``c`` down to that class's floor; the
    node's want is ``floor_w + sum(flexible_w)`` (<= ``max_w``). ``demand_w`` is the physical
    estimate of its uncapped draw (it may be below ``floor_w``: idle GPUs draw less than their
    minimum limit); it feeds the domains' demand and the band release, not the cuts.
    ``stale``: the report is missing or old (the controller sets it); the node is counted at
    ``max_w`` (its last known maximum) and not cut.
    """

    node: str
    power_w: float
    demand_w: float
    min_w: float
    floor_w: float
    max_w: float
    flexible_w: Mapping[str, float]
    stale: bool = False
    # Packed once per report (the controller builds one as it arrives), so allocate() only joins
    # bytes: base, total, the watts of each tier (TIERS order), counted power and demand, as
    # doubles in _ROW's order (a stale node: base and total at max_w, no tiers, counted at max_w).
    _row: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        who = f"node report {self.node!r}"
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"{who}: node must be a non-empty name")
        for name in ("power_w", "demand_w", "min_w", "floor_w", "max_w"):
            _finite_nonneg(getattr(self, name), f"{who}: {name}")
        if not self.min_w <= self.floor_w <= self.max_w + _tol(self.max_w):
            raise ValueError(f"{who}: need min_w <= floor_w <= max_w (got: min_w={self.min_w:g}, "
                             f"floor_w={self.floor_w:g}, max_w={self.max_w:g})")
        for c, w in self.flexible_w.items():
            if c not in _RANK:
                raise ValueError(f"{who}: flexible_w: unknown class {c!r} (one of {', '.join(CLASSES)})")
            _finite_nonneg(w, f"{who}: flexible_w.{c}")
        flex = sum(self.flexible_w.values())
        if self.floor_w + flex > self.max_w + _tol(self.max_w):
            raise ValueError(f"{who}: floor_w + sum(flexible_w) = {self.floor_w + flex:g} is above max_w "
                             f"({self.max_w:g}): a node cannot want more than its maximum")
        if self.stale:
            row = (self.max_w, self.max_w, *_ZERO_TIERS, self.max_w, self.max_w)
        else:
            f = self.flexible_w
            tiers = (max(0.0, self.max_w - self.floor_w - flex), *(float(f.get(c, 0.0)) for c in CLASSES),
                     self.floor_w - self.min_w)
            row = (self.min_w, self.min_w + sum(tiers), *tiers, self.power_w, self.demand_w)
        object.__setattr__(self, "_row", _PACK(*row))

    @property
    def want_w(self) -> float:
        """What the node would be allocated with nothing binding but its max: floor + flex."""
        return self.floor_w + sum(self.flexible_w.values())


class GpuDemand(NamedTuple):
    """One GPU as the node splits its budget: its index, its job's class, its demand and its
    bounds (W).

    ``floor_w`` is the job class's floor (clamped into ``[min_w, max_w]``); ``demand_w`` what the
    GPU would draw uncapped (clamped into ``[floor_w, max_w]`` for the split)."""

    gpu: int
    cls: str
    demand_w: float
    floor_w: float
    min_w: float
    max_w: float


def _check_gpu(g: GpuDemand) -> tuple[float, float, float, float]:
    """(min, floor, want, max) of a GPU, validated and clamped."""
    if g.cls not in _RANK:
        raise ValueError(f"gpu {g.gpu}: unknown class {g.cls!r} (one of {', '.join(CLASSES)})")
    for name in ("demand_w", "floor_w", "min_w", "max_w"):
        _finite_nonneg(getattr(g, name), f"gpu {g.gpu}: {name}")
    if g.min_w > g.max_w:
        raise ValueError(f"gpu {g.gpu}: min_w ({g.min_w:g}) is above max_w ({g.max_w:g})")
    fl = min(max(g.floor_w, g.min_w), g.max_w)
    return g.min_w, fl, min(max(g.demand_w, fl), g.max_w), g.max_w


def node_report(node: str, gpus: Iterable[GpuDemand], power_w: float, *, stale: bool = False) -> NodeReport:
    """The report a node sends, built from its GPUs with the same rules ``split_node_budget``
    uses (so what the controller allocates is what the node can split)."""
    mins = floors = maxs = demand = 0.0
    flex = dict.fromkeys(CLASSES, 0.0)
    for g in gpus:
        lo, fl, want, hi = _check_gpu(g)
        mins += lo
        floors += fl
        maxs += hi
        demand += min(g.demand_w, hi)
        flex[g.cls] += want - fl
    return NodeReport(node=node, power_w=power_w, demand_w=demand, min_w=mins, floor_w=floors,
                      max_w=maxs, flexible_w=flex, stale=stale)


# --- node split --------------------------------------------------------------------------------

def _fill(lows: Sequence[float], highs: Sequence[float], total: float) -> float:
    """The level L with ``sum(clamp(L, lo_i, hi_i)) == total`` (sum(lows) <= total <= sum(highs))."""
    points = sorted(set(lows) | set(highs))
    prev_p, prev_f = points[0], sum(lows)
    for p in points[1:]:
        f = sum(min(max(p, lo), hi) for lo, hi in zip(lows, highs))
        if f >= total:
            slope = (f - prev_f) / (p - prev_p)
            return prev_p + (total - prev_f) / slope if slope > 0 else p
        prev_p, prev_f = p, f
    return points[-1]


def _raise_to(cur: dict[int, float], goal: Mapping[int, float], order: Sequence[Sequence[int]],
              room: float) -> float:
    """Raise ``cur`` toward ``goal`` group by group (``order``: first group served first), each
    group max-min fair (one water level); returns the room left."""
    for grp in order:
        if room <= 0:
            return room
        need = sum(goal[i] - cur[i] for i in grp)
        if need <= 0:
            continue
        if need <= room:
            for i in grp:
                cur[i] = goal[i]
            room -= need
            continue
        lows = [cur[i] for i in grp]
        highs = [goal[i] for i in grp]
        level = _fill(lows, highs, sum(lows) + room)
        for i, lo, hi in zip(grp, lows, highs):
            cur[i] = min(max(level, lo), hi)
        return 0.0
    return room


def split_node_budget(budget_w: float, gpus: Iterable[GpuDemand]) -> dict[int, float]:
    """Per-GPU power limits for a node budget, by job class.

    Every GPU gets its floor; the rest goes up to each GPU's demand, highest class first (so a
    cut lands on the lowest class first, idle GPUs first), max-min fair within a class (one
    water level on the GPUs' limits); what is left goes up to each GPU's ``max_w``, highest
    class first (idle GPUs give up their headroom first). When the floors alone exceed the
    budget, floors give way lowest class first down to ``min_w``; when even the minimums exceed
    it every GPU sits at ``min_w`` and ``sum(result) - budget_w`` is the excess, for the caller
    to report. The result is within ``[min_w, max_w]`` per GPU and sums to
    ``min(budget_w, sum(max_w))`` whenever the minimums fit.
    """
    if not isinstance(budget_w, (int, float)) or math.isnan(budget_w):
        raise ValueError(f"budget_w must be a number of watts (got: {budget_w!r})")
    lo: dict[int, float] = {}
    fl: dict[int, float] = {}
    want: dict[int, float] = {}
    hi: dict[int, float] = {}
    by_cls: dict[str, list[int]] = {c: [] for c in CLASSES}
    for g in gpus:
        if g.gpu in lo:
            raise ValueError(f"gpu {g.gpu}: listed twice")
        lo[g.gpu], fl[g.gpu], want[g.gpu], hi[g.gpu] = _check_gpu(g)
        by_cls[g.cls].append(g.gpu)
    budget = max(0.0, float(budget_w))
    floors = sum(fl.values())
    if floors > budget:
        cur = dict(lo)
        # raise back from the minimums toward the floors, highest class first
        _raise_to(cur, fl, [by_cls[c] for c in reversed(CLASSES)], budget - sum(lo.values()))
        return cur
    cur = dict(fl)
    room = _raise_to(cur, want, [by_cls[c] for c in reversed(CLASSES)], budget - floors)
    if room > 0:
        _raise_to(cur, hi, [by_cls[c] for c in reversed(CLASSES)], room)
    return cur


# --- allocation --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NodeBudget:
    """One node's share: ``budget_w`` = ``min_w`` + what it keeps of each tier (for a stale or
    absent node: the figure it is counted at, all in ``min_w``)."""

    node: str
    leaf: str
    budget_w: float
    min_w: float
    floor_kept_w: float  # of floor_w - min_w
    kept_w: Mapping[str, float]  # per class: of its flexible watts
    headroom_w: float  # kept above its want
    stale: bool
    absent: bool  # in the domains file (or absent_w), no report: counted at the caller's figure


class DomainAllocation(NamedTuple):
    """One domain after allocation (W). ``headroom_w = cap_w - power_w`` (measured; negative:
    over the cap); ``unallocated_w = max(0, limit_w - allocated_w)``; ``shortfall_w``: what its
    floors and fixed nodes exceed its limit by (then ``allocated_w - limit_w``), else 0.
    ``cut``: the last tier its own step cut (``"headroom"``, a class, ``"floor"``); None when it
    did not bind on its own (an ancestor may still have cut inside it)."""

    domain: str
    power_w: float
    demand_w: float
    allocated_w: float
    limit_w: float
    cap_w: float
    headroom_w: float
    unallocated_w: float
    shortfall_w: float
    nodes: int
    cut: str | None

    @property
    def binding(self) -> bool:
        return self.allocated_w >= self.limit_w - _tol(self.limit_w)


@dataclass(frozen=True, slots=True)
class Allocation:
    """The outcome: ``budgets_w`` per node, ``domains`` per domain of the allocated subtree
    (preorder).

    ``skipped``: reports not allocated, with the reason (in no leaf, in two leaves, outside the
    subtree); ``absent``: nodes counted at a fixed figure without a report; ``unaccounted``:
    nodes the file names that sent no report and had no figure to be counted at (pass
    ``default_absent_w``)."""

    root: str
    budgets_w: Mapping[str, float]
    domains: Mapping[str, DomainAllocation]
    skipped: Mapping[str, str]
    absent: tuple[str, ...]
    unaccounted: tuple[str, ...]
    _reports: Sequence[NodeReport] = field(repr=False)  # in column order (absent ones included)
    _leaves: Sequence[str] = field(repr=False)
    _start: Sequence[int] = field(repr=False)
    _base: Sequence[float] = field(repr=False)
    _tiers: Sequence[Sequence[float]] = field(repr=False)
    _index: dict[str, int] = field(repr=False, default_factory=dict)

    @property
    def shortfall_w(self) -> float:
        """The largest shortfall of any domain (0: every limit holds)."""
        return max((d.shortfall_w for d in self.domains.values()), default=0.0)

    def node(self, name: str) -> NodeBudget:
        """The detail of one node's budget (built on demand: the hot path needs only budgets_w)."""
        if not self._index:
            self._index.update((r.node, i) for i, r in enumerate(self._reports))
        i = self._index[name]
        t = [tier[i] for tier in self._tiers]
        leaf = self._leaves[bisect_right(self._start, i) - 1]
        return NodeBudget(node=name, leaf=leaf, budget_w=self.budgets_w[name],
                          min_w=self._base[i], floor_kept_w=t[-1],
                          kept_w=dict(zip(CLASSES, t[1:-1])), headroom_w=t[0],
                          stale=self._reports[i].stale and name not in self.absent, absent=name in self.absent)


def _level(values: Sequence[float], cut: float) -> float:
    """The water level L with ``sum(max(0, v - L)) == cut`` (0 < cut < sum(values)): what is
    above L is taken. Walks down from the largest, so a small cut looks at few values."""
    s = sorted(values, reverse=True)
    n = len(s)
    top = 0.0
    for m in range(1, n):
        top += s[m - 1]
        level = (top - cut) / m
        if level >= s[m]:
            return level
    return (top + s[-1] - cut) / n


def _cut(tiers: list[list[float]], lo: int, hi: int, excess: float, d: str, cut_tier: dict[str, str]) -> float:
    """Take ``excess`` watts off nodes ``lo:hi``, tier by tier (a whole tier before the next),
    each partial tier by a water level; returns what could not be taken (the shortfall)."""
    for k, t in enumerate(tiers):
        seg = t[lo:hi]
        have = sum(seg)
        if have <= 0:
            continue
        cut_tier[d] = TIERS[k]
        if have <= excess:
            t[lo:hi] = [0.0] * (hi - lo)
            excess -= have
            if excess <= 0:
                return 0.0
            continue
        n = hi - lo
        level = (have - excess) / n
        if min(seg) >= level:  # an even cut leaves everyone at the level: no sort needed
            t[lo:hi] = [level] * n
            return 0.0
        level = _level(seg, excess)
        t[lo:hi] = [v if v < level else level for v in seg]
        return 0.0
    return excess


def _check_limits(domains: Domains, limits_w: Mapping[str, float]) -> dict[str, float]:
    """``limits_w`` as floats, or ValueError naming the first bad entry."""
    try:
        limits = {d: float(w) for d, w in limits_w.items() if d in domains and (type(w) is float or type(w) is int)}
        ok = len(limits) == len(limits_w) and all(0 <= w < math.inf for w in limits.values())
    except (TypeError, ValueError):
        ok = False
    if not ok:  # find the culprit (or accept float subclasses the fast path passed over)
        limits = {}
        for d, w in limits_w.items():
            if d not in domains:
                raise ValueError(f"allocate: limits_w names unknown domain {d!r} (not in {domains.source})")
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
                raise ValueError(f"allocate: limits_w[{d!r}] must be a finite number of watts >= 0 (got: {w!r})")
            limits[d] = float(w)
    return limits


def allocate(domains: Domains, reports: Iterable[NodeReport] | Mapping[str, NodeReport], *,
             limits_w: Mapping[str, float] | None = None, root: str | None = None,
             absent_w: Mapping[str, float] | None = None,
             default_absent_w: float | None = None) -> Allocation:
    """Per-node budgets under every domain's limit (see the module doc for the semantics).

    ``limits_w``: per domain, the ceiling for this cycle (``BandTracker`` decides it: target x
    cap while capping, the cap otherwise); a domain not in it uses its ``cap_w``. ``root``
    restricts to a subtree (a subtree controller passes ``limits_w[root]`` = the budget its
    parent leased it). Nodes without a report are counted at a fixed figure and never cut:
    those in ``absent_w`` at their value (the controller passes each silent node's last known
    maximum), and every exact name the file lists under ``root`` at ``default_absent_w``
    (e.g. the node model's maximum); with neither they are listed in ``unaccounted``.
    """
    root = domains.root if root is None else root
    if root not in domains:
        raise ValueError(f"allocate: unknown root domain {root!r} in {domains.source}")
    limits = _check_limits(domains, limits_w) if limits_w else {}
    if default_absent_w is not None:
        _finite_nonneg(default_absent_w, "allocate: default_absent_w")
    for n, w in (absent_w or {}).items():
        _finite_nonneg(w, f"allocate: absent_w[{n!r}]")
    plan = domains.postorder(root)
    li, lj = domains.leaf_span(root)
    n_leaves = lj - li
    lpos = domains.leaf_positions

    # intake: where each report goes. Leaves are in preorder, so once the reports are ordered
    # leaf by leaf every domain's nodes are one contiguous slice [lo, hi) of the columns below.
    items = list(reports.values() if isinstance(reports, Mapping) else reports)
    names_in = [r.node for r in items]
    layout = domains.memo.get(("layout", root))
    if layout is None or layout.names_in != names_in:
        # not the same nodes in the same order as last cycle (the controller's table of latest
        # reports keeps its order): place them again
        layout = _place(domains, root, plan, names_in)
        domains.memo[("layout", root)] = layout
    skipped = dict(layout.skipped)
    # nodes that sent nothing: counted at a fixed figure, never cut
    absent: list[tuple[int, NodeReport]] = []
    unaccounted: list[str] = []
    candidates = list(domains.exact_nodes(root))
    if absent_w:
        candidates.extend(absent_w)
    if candidates:
        seen = set(names_in)
        todo = [n for n in dict.fromkeys(candidates) if n not in seen]
        for n, leaf in zip(todo, domains.lookup_leaves(todo)):
            if not isinstance(leaf, str):
                if leaf is not None:
                    skipped[n] = leaf.errors[0]
                continue
            k = lpos[leaf] - li
            if not 0 <= k < n_leaves:
                continue
            count_w = absent_w[n] if absent_w and n in absent_w else default_absent_w
            if count_w is None:
                unaccounted.append(n)
                continue
            absent.append((k, NodeReport(n, 0.0, count_w, count_w, count_w, count_w, {}, stale=True)))
    if absent:
        buckets = [[items[i] for i in layout.perm[layout.start[k]:layout.start[k + 1]]] for k in range(n_leaves)]
        for k, r in absent:
            buckets[k].append(r)
        ordered = [r for b in buckets for r in b]
        start = [0]
        for b in buckets:
            start.append(start[-1] + len(b))
        spans = _spans(domains, plan, li, start)
    else:
        ordered = list(map(items.__getitem__, layout.perm))
        start, spans = layout.start, layout.spans
    names = [r.node for r in ordered]

    # the columns: each report packed its row once (NodeReport._row); one join and strided
    # views give every column at C speed, with no per-node objects for the collector
    flat = memoryview(b"".join([r._row for r in ordered])).cast("d")
    node_tot = list(accumulate(_column(flat, "total"), initial=0.0))  # prefix sums
    base = _column(flat, "base")
    tiers = [_column(flat, t) for t in TIERS]

    # bottom-up: each domain over its limit cuts its slice, tier by tier
    total: dict[str, float] = {}
    shortfall: dict[str, float] = {}
    cut_tier: dict[str, str] = {}
    lim_of: list[float] = []
    for dom, (lo, hi) in zip(plan, spans):
        d = dom.name
        lim = limits.get(d, dom.cap_w) if limits else dom.cap_w
        lim_of.append(lim)
        kids = dom.children
        if kids:
            tot = 0.0
            for c in kids:
                tot += total[c]
        else:
            tot = node_tot[hi] - node_tot[lo]
        excess = tot - lim
        if excess > 1e-9 * lim:
            excess = _cut(tiers, lo, hi, excess, d, cut_tier)
            if excess > 0:
                shortfall[d] = excess
            tot = lim + excess
        total[d] = tot

    budgets = [b + h + i + lw + nw + hw + f for b, h, i, lw, nw, hw, f in zip(base, *tiers)]
    budgets_w = dict(zip(names, budgets))
    if len(budgets_w) != len(budgets):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"allocate: two reports for node {dup!r}; pass one per node")

    # per-domain figures from the final budgets (an ancestor's cut changes its children's
    # sums): prefix sums over the columns, each domain one slice
    pp = list(accumulate(_column(flat, "power"), initial=0.0))
    pd = list(accumulate(_column(flat, "demand"), initial=0.0))
    pb = list(accumulate(budgets, initial=0.0))
    new = tuple.__new__
    out = {dom.name: new(DomainAllocation, (
        dom.name, pp[hi] - pp[lo], pd[hi] - pd[lo], pb[hi] - pb[lo], lim, dom.cap_w, dom.cap_w - (pp[hi] - pp[lo]),
        max(0.0, lim - (pb[hi] - pb[lo])), shortfall.get(dom.name, 0.0), hi - lo, cut_tier.get(dom.name)))
        for dom, (lo, hi), lim in zip(plan, spans, lim_of)}
    return Allocation(root=root, budgets_w=budgets_w, domains={d: out[d] for d in domains.subtree(root)},
                      skipped=skipped, absent=tuple(r.node for _, r in absent), unaccounted=tuple(unaccounted),
                      _reports=ordered, _leaves=domains.leaves[li:lj], _start=start, _base=base, _tiers=tiers)


def _column(flat: memoryview[float], name: str) -> list[float]:
    """One column of the packed rows (a strided view, copied out at C speed)."""
    return cast(list[float], flat[_ROW[name]::len(_ROW)].tolist())


class _Layout(NamedTuple):
    """Where one cycle's reports go: ``perm`` orders them leaf by leaf (``start[k]`` is where
    leaf ``k`` begins), ``spans`` is each domain's slice in ``postorder``; kept between cycles."""

    names_in: list[str]
    perm: list[int]
    start: list[int]
    spans: list[tuple[int, int]]
    skipped: dict[str, str]


def _spans(domains: Domains, plan: Sequence[Domain], li: int, start: Sequence[int]) -> list[tuple[int, int]]:
    lspan = domains.leaf_spans
    return [(start[lspan[d.name][0] - li], start[lspan[d.name][1] - li]) for d in plan]


def _place(domains: Domains, root: str, plan: Sequence[Domain], names_in: list[str]) -> _Layout:
    li, lj = domains.leaf_span(root)
    n_leaves = lj - li
    lpos = domains.leaf_positions
    slots: list[list[int]] = [[] for _ in range(n_leaves)]
    skipped: dict[str, str] = {}
    for i, leaf in enumerate(domains.lookup_leaves(names_in)):
        if isinstance(leaf, str):
            k = lpos[leaf] - li
            if 0 <= k < n_leaves:
                slots[k].append(i)
            else:
                skipped[names_in[i]] = f"in {leaf}, outside {root}"
        elif leaf is None:
            skipped[names_in[i]] = f"not in any leaf of {domains.source}"
        else:
            skipped[names_in[i]] = leaf.errors[0]
    start = [0]
    for sl in slots:
        start.append(start[-1] + len(sl))
    return _Layout(names_in, [i for sl in slots for i in sl], start, _spans(domains, plan, li, start), skipped)


@dataclass(frozen=True, slots=True)
class DomainTotals:
    """Per domain, the summed GPU power and demand of the nodes under it (stale ones at max_w)."""

    power_w: Mapping[str, float]
    demand_w: Mapping[str, float]


def domain_totals(domains: Domains, reports: Iterable[NodeReport] | Mapping[str, NodeReport], *,
                  root: str | None = None) -> DomainTotals:
    """What ``BandTracker.step`` takes: summed power and demand per domain (before allocating).

    Reports that ``allocate`` would skip (no leaf, two leaves, outside ``root``) are left out;
    a stale node counts at its ``max_w``, as in the allocation."""
    root = domains.root if root is None else root
    sub = domains.subtree(root)
    power: dict[str, float] = dict.fromkeys(sub, 0.0)
    demand: dict[str, float] = dict.fromkeys(sub, 0.0)
    items = reports.values() if isinstance(reports, Mapping) else reports
    for r in items:
        try:
            leaf = domains.leaf_of(r.node)
        except DomainsError:
            continue
        if leaf is None or leaf not in power:
            continue
        power[leaf] += r.max_w if r.stale else r.power_w
        demand[leaf] += r.max_w if r.stale else r.demand_w
    for d in reversed(sub):
        kids = domains[d].children
        if kids:
            power[d] = sum(power[c] for c in kids)
            demand[d] = sum(demand[c] for c in kids)
    return DomainTotals(power, demand)


# --- three-band hysteresis -----------------------------------------------------------------------

class Level(StrEnum):
    """A domain's capping state."""

    UNCAPPED = "uncapped"
    CAPPING = "capping"


@dataclass(slots=True)
class BandState:
    level: Level = Level.UNCAPPED
    since: float | None = None  # when it entered ``level`` (None: from the start)
    transitions: int = 0


class BandStep(NamedTuple):
    level: Level
    limit_w: float
    changed: bool


@dataclass(slots=True)
class DomainBands:
    """One domain's three bands (Dynamo) as a state machine.

    UNCAPPED -> CAPPING when the measured power (the summed reports, or the facility meter when
    it reads higher) is above ``cap_threshold x cap``; CAPPING -> UNCAPPED when the uncapped
    demand estimate is below ``uncap_threshold x cap`` (and ``min_hold_s`` has passed). The
    limit to allocate within: ``target x cap`` while capping, ``cap`` otherwise; power the meter
    sees beyond the summed GPU reports (CPUs, fans, the rest of the rack) is taken off it and
    added to the demand, since the GPU budget must leave room for it.
    """

    cap_w: float
    bands: Bands
    min_hold_s: float = 0.0
    state: BandState = field(default_factory=BandState)

    def step(self, now: float, power_w: float, demand_w: float, meter_w: float | None = None) -> BandStep:
        st = self.state
        overhead = max(0.0, meter_w - power_w) if meter_w is not None and math.isfinite(meter_w) else 0.0
        measured = power_w + overhead
        demand = demand_w + overhead
        b = self.bands
        changed = False
        if st.level is Level.UNCAPPED:
            if measured > b.cap_threshold * self.cap_w:
                st.level, st.since, changed = Level.CAPPING, now, True
        elif demand < b.uncap_threshold * self.cap_w and (
                st.since is None or now - st.since >= self.min_hold_s):
            st.level, st.since, changed = Level.UNCAPPED, now, True
        if changed:
            st.transitions += 1
        frac = b.target if st.level is Level.CAPPING else 1.0
        return BandStep(st.level, max(0.0, frac * self.cap_w - overhead), changed)


class BandsStep(NamedTuple):
    levels: dict[str, Level]
    limits_w: dict[str, float]
    transitions: int  # domains that changed level in this step
    changed: tuple[str, ...]


class BandTracker:
    """The bands of every domain of a (sub)tree, stepped together once per controller cycle."""

    __slots__ = ("domains", "bands")

    def __init__(self, domains: Domains, *, root: str | None = None, min_hold_s: float = 0.0) -> None:
        if min_hold_s < 0 or not math.isfinite(min_hold_s):
            raise ValueError(f"min_hold_s must be >= 0 (got: {min_hold_s!r})")
        self.domains = domains
        sub = domains.subtree(domains.root if root is None else root)
        self.bands = {d: DomainBands(domains.cap_w(d), domains.bands(d), min_hold_s) for d in sub}

    def step(self, now: float, power_w: Mapping[str, float], demand_w: Mapping[str, float],
             meter_w: Mapping[str, float] | None = None) -> BandsStep:
        """Step every domain; a domain missing from ``power_w``/``demand_w`` counts as 0 W.
        A meter reading that is not a finite number is ignored (the summed reports stand)."""
        for what, m in (("power_w", power_w), ("demand_w", demand_w)):
            for d, w in m.items():  # all checked before any state moves
                if d in self.bands and not 0 <= w < math.inf:
                    raise ValueError(f"bands: {what}[{d!r}] must be a finite number of watts >= 0 (got: {w!r})")
        levels: dict[str, Level] = {}
        limits: dict[str, float] = {}
        changed: list[str] = []
        meters = meter_w or {}
        for d, db in self.bands.items():
            s = db.step(now, power_w.get(d, 0.0), demand_w.get(d, 0.0), meters.get(d))
            levels[d] = s.level
            limits[d] = s.limit_w
            if s.changed:
                changed.append(d)
        return BandsStep(levels, limits, len(changed), tuple(changed))


# --- paced release -------------------------------------------------------------------------------

@dataclass(slots=True)
class _Rise:
    budget_w: float
    last_fall: float | None = None
    rate: float | None = None


@dataclass(slots=True)
class ReleaseLimiter:
    """Budgets fall at once and rise at most ``rise_w_per_s`` x (1 +/- ``jitter``) per second
    per node (the jittered rate drawn once per rise, per node, from ``rng``), and not within
    ``hold_s`` of that node's last fall; so a site released together does not surge back
    together (Thunderbolt). A node seen for the first time takes its budget at once (it is
    within the allocation); a node missing from a step is forgotten."""

    rise_w_per_s: float = 200.0
    jitter: float = 0.2
    hold_s: float = 0.0
    max_step_s: float | None = None  # the most time one step may account for
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _last_now: float | None = None
    _nodes: dict[str, _Rise] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.rise_w_per_s > 0 and math.isfinite(self.rise_w_per_s)):
            raise ValueError(f"rise_w_per_s must be > 0 (got: {self.rise_w_per_s!r})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1) (got: {self.jitter!r})")
        if not self.hold_s >= 0:
            raise ValueError(f"hold_s cannot be negative (got: {self.hold_s!r})")

    def step(self, now: float, budgets_w: Mapping[str, float]) -> dict[str, float]:
        """The budgets to issue now, given this cycle's allocation."""
        for n, target in budgets_w.items():  # all checked before any state moves
            if not 0 <= target < math.inf:
                raise ValueError(f"release: budget of node {n!r} must be a finite number of watts >= 0 "
                                 f"(got: {target!r}); nothing was issued")
        dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        if self.max_step_s is not None:
            dt = min(dt, self.max_step_s)
        self._last_now = now
        out: dict[str, float] = {}
        nodes = self._nodes
        fresh: dict[str, _Rise] = {}
        for n, target in budgets_w.items():
            st = nodes.get(n)
            if st is None:
                st = _Rise(target)
            elif target <= st.budget_w:
                if target < st.budget_w:
                    st.last_fall = now
                st.budget_w = target
                st.rate = None
            elif st.last_fall is None or now - st.last_fall >= self.hold_s:
                if st.rate is None:
                    j = self.jitter
                    st.rate = self.rise_w_per_s * (1.0 + (self.rng.uniform(-j, j) if j else 0.0))
                st.budget_w = min(target, st.budget_w + st.rate * dt)
                if st.budget_w >= target:
                    st.rate = None
            fresh[n] = st
            out[n] = st.budget_w
        self._nodes = fresh
        return out
