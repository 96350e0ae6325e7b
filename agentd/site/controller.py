"""The site power controller's core: reports in, leases out. Transport-agnostic and clock-free.

Every method takes ``now`` (unix seconds, the clock leases are stamped with) and returns what
to publish; the MQTT I/O lives in ``agentd.site.controller_mqtt``, the in-process site
simulation drives the same object through ``agentd.site.bus``. Why: one tested path for the
real broker, the simulation of hundreds of nodes and the unit tests, with no sleeping anywhere.

Ingest (``on_message`` / ``on_report``) is the hot path and stays lean: the node's leaf is looked
up (cached) before the payload is decoded, the report is validated (the ``PowerReport`` model
straight from the JSON bytes; a payload it refuses goes through ``protocol.decode_report`` for
the reason) and kept as that node's latest. It becomes a ``rules.budget.NodeReport`` in the
next cycle, once per node however many reports arrived meanwhile. A bad report
is refused, counted per reason and logged once per reason per interval; it never raises and
never stops the allocation. Reasons: the protocol's (``too_large``, ``not_json``,
``missing_field``, ``wrong_type``, ``non_finite``, ``negative``, ``inconsistent``,
``unknown_version``, ``unknown_field``), plus ``unknown_node`` (the domains file has no leaf
for it), ``ambiguous_node`` (two leaves' globs match it), ``topic_mismatch`` (the report's
node, site or kind differs from its topic's) and ``not_a_topic`` (nothing of ours). Reports of
nodes that sit in the tree but outside what this controller allocates (another subtree, a
delegated child) are not errors: they are counted as ``ignored`` and dropped.

All work is in ``cycle(now)``, once per interval:

1. every known reporter whose last report is older than ``stale_after_s`` is *stale*: counted at
   its last known ``max_w`` and never cut (a silent node cannot make room for others);
2. ``rules.budget.BandTracker`` steps each domain's three bands on the summed reports (or the
   facility meter, when it reads higher): the limit to allocate within; ``SlackReclaim`` adds
   to a capping domain's limit the watts granted but not drawn (feedback on measured power);
3. subtree mode: the subtree root's limit is also at most the parent's lease (the minimum of
   the live ones, ``agentd.site.lease.LeaseTracker``) or, with none live, ``failsafe_w``;
4. ``rules.budget.allocate`` (priority-aware water-filling; every domain's limit holds at
   every level; a shortfall, when floors alone exceed a limit, is reported and logged);
5. ``rules.budget.ReleaseLimiter``: a budget falls at once, rises rate-limited and randomized
   per node, so the site never surges back at once;
6. a signed lease (``protocol.encode_lease``) per node (and per delegated child domain) on its
   retained topic for this controller, sent when its budget changed or every
   ``lease_refresh_s``; one ``domain_power`` point per domain and one ``controller`` point;
   subtree mode: the subtree's aggregate as a ``PowerReport(kind="domain")`` upward.

Replicas (distinct ids) run the same code on the same reports; each keeps every domain under
its limit, so the per-node minimum the nodes enforce does too.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import structlog

from agentd.lineproto import Point
from agentd.site import topics
from collectors.log_limit import RateLimitedLog
from agentd.site.lease import LeaseTracker, NodeBudget
from pydantic import ValidationError

from agentd.site.protocol import (CLASSES, MAX_PAYLOAD_BYTES, Lease, PowerReport, ProtocolError,
                                  decode_report, encode_lease, encode_report)
from rules.budget import Allocation, BandTracker, Level, NodeReport, ReleaseLimiter, allocate, domain_totals
from rules.domains import Domain, Domains, DomainsError

log = structlog.get_logger("agentd.controller")

#: The controller's own refusal reasons (``protocol.decode_report`` adds its ones).
REFUSALS = ("unknown_node", "ambiguous_node", "topic_mismatch", "not_a_topic")
#: ``level`` field of the domain_power point: the band state as an int (graphable).
LEVEL_CODE = {Level.UNCAPPED: 0, Level.CAPPING: 1}
_DELEGATE_PREFIX = "@"  # a delegated domain's reporter in the controlled tree; no node name has it
_VERDICT_CACHE_MAX = 1 << 17
_BUDGET_STEPS_PER_W = 10  # leases are rounded DOWN to 0.1 W, so rounding never lifts a sum over a cap


def delegate_key(domain: str) -> str:
    """The reporter name a delegated child domain has in the controlled tree."""
    return _DELEGATE_PREFIX + domain


# --- the part of the tree this controller allocates ------------------------------------------

def controlled_tree(domains: Domains, root: str, delegates: Collection[str] = ()) -> Domains:
    """``root``'s subtree, with each delegated child domain cut down to one leaf that holds one
    reporter (``delegate_key(d)``): what a controller of ``root`` allocates over.

    Raises ValueError naming the domain when a delegate is unknown, outside ``root``, the root
    itself, or below another delegate (that one's controller delegates it)."""
    if root not in domains:
        raise ValueError(f"domain {root!r} is not in {domains.source} (known: {', '.join(list(domains)[:10])})")
    inside = set(domains.subtree(root))
    for d in delegates:
        if d not in domains:
            raise ValueError(f"delegate {d!r} is not a domain of {domains.source}")
        if d == root:
            raise ValueError(f"delegate {d!r} is the domain this controller allocates; a controller "
                             "cannot delegate its own root")
        if d not in inside:
            raise ValueError(f"delegate {d!r} is not under {root!r}")
        above = [a for a in domains.path_to_root(d)[1:] if a in delegates]
        if above:
            raise ValueError(f"delegate {d!r} is under delegate {above[0]!r}: the controller of "
                             f"{above[0]!r} delegates it, not this one")
    base_depth = domains[root].depth
    built: dict[str, Domain] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        dom = domains[name]
        parent = None if name == root else dom.parent
        if name in delegates:
            built[name] = replace(dom, parent=parent, children=(), nodes=(delegate_key(name),),
                                  depth=dom.depth - base_depth)
            continue
        built[name] = replace(dom, parent=parent, depth=dom.depth - base_depth)
        stack.extend(dom.children)
    return Domains(domains.site, domains.source, built, ())


# --- what a cycle gives back ------------------------------------------------------------------

@dataclass(slots=True)
class Publish:
    """One message for the transport to send."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class DomainSummary:
    domain: str
    level: Level
    power_w: float
    demand_w: float
    cap_w: float
    limit_w: float
    allocated_w: float
    shortfall_w: float
    meter_w: float | None
    nodes: int
    stale_nodes: int
    reclaimed_w: float = 0.0  # the measured-slack correction in limit_w (SlackReclaim), 0 when none

    @property
    def over_cap(self) -> bool:
        return max(self.power_w, self.meter_w or 0.0) > self.cap_w


@dataclass(slots=True)
class CycleResult:
    """What one ``cycle`` decided: messages to send, points to store, and the figures."""

    now: float
    publish: list[Publish]
    points: list[Point]
    allocation: Allocation
    budgets_w: dict[str, float]  # issued (after the release limiter), per reporter
    domains: dict[str, DomainSummary]
    root_limit_w: float  # what the root was allocated within (band, cap, parent lease)
    budget_source: str  # "cap" (whole site), "lease" or "failsafe" (subtree mode)
    nodes: int
    stale_nodes: int
    nodes_capped: int  # issued a budget below their maximum
    leases: int  # leases in ``publish``
    cycle_s: float

    def summary_line(self) -> str:
        """One line for operators: the root's power against its cap, what is capping."""
        root = next(iter(self.domains.values()))
        over = sorted(d.domain for d in self.domains.values() if d.over_cap)
        capping = sorted(d.domain for d in self.domains.values() if d.level is Level.CAPPING)
        short = sum(1 for d in self.domains.values() if d.shortfall_w > 0)
        return (f"{root.domain}: {root.power_w / 1e3:.1f} kW of cap {root.cap_w / 1e3:.1f} kW "
                f"(limit {self.root_limit_w / 1e3:.1f} kW, {self.budget_source}); "
                f"domains over cap {len(over)}{' ' + ','.join(over[:5]) if over else ''}, "
                f"capping {len(capping)}, shortfall {short}; nodes {self.nodes} "
                f"(stale {self.stale_nodes}, capped {self.nodes_capped}); leases sent {self.leases}; "
                f"cycle {self.cycle_s * 1e3:.1f} ms")


@dataclass(slots=True)
class ControllerStats:
    """Cumulative counters (the ``controller`` point)."""

    reports_accepted: int = 0
    reports_refused: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    ignored: int = 0  # reports of nodes in the tree but outside what this controller allocates
    meter_readings: int = 0
    meter_refused: int = 0
    leases_sent: int = 0
    leases_unsent: int = 0  # the transport could not send them (retried next cycle)
    cycles: int = 0
    cycle_s: float = 0.0
    cycle_s_max: float = 0.0


@dataclass(slots=True)
class _Latest:
    """A reporter's last accepted report: kept as received, converted in the next cycle."""

    raw: PowerReport
    received_at: float
    report: NodeReport | None = None  # built from ``raw`` in the cycle after it arrived
    stale_copy: NodeReport | None = None  # built once when it goes stale

    def node_report(self, key: str) -> NodeReport:
        if self.report is None:
            r = self.raw
            flex = cast("Mapping[str, float]", r.flexible_w)  # keys are the protocol's class names
            # The protocol lets floor + flexible exceed max_w by its 1 W tolerance; the allocator
            # does not: such a node's maximum is taken as its want (at most 1 W more).
            want = r.floor_w + sum(flex.values())
            self.report = NodeReport(node=key, power_w=r.gpu_power_w, demand_w=r.demand_w, min_w=r.min_w,
                                     floor_w=r.floor_w, max_w=max(r.max_w, want, r.floor_w), flexible_w=flex)
        return self.report


@dataclass(slots=True)
class _Meter:
    domain: str
    stale_after_s: float
    power_w: float | None = None
    received_at: float = -math.inf


@dataclass(slots=True)
class _Sent:
    budget_w: float
    issued_at: float


# --- measured-slack feedback (reclaiming granted watts that are not drawn) --------------------

@dataclass(slots=True)
class SlackReclaim:
    """Per-domain integrator that lets a capping domain grant again the watts its nodes are
    granted but do not draw, so that the *measured* power, not the sum of power limits, settles
    at the band's target (Dynamo-style feedback on measured power).

    Why: a budget is a sum of power *limits* built from demand estimates that err high (GPU
    minimum limits reserved for idle GPUs drawing less, a peak-hold demand window, the capped
    GPU estimate), so a domain allocated within ``target x cap`` draws far less than that while
    every low and normal GPU is capped (docs/site-sim.md). While domain ``d`` is capping, its
    effective limit is ``limit_w + extra_w[d]``, clamped to ``[limit_w, ceiling_w]``, with
    ``extra_w`` stepped once per cycle on the measured power ``P`` (the summed reports, a stale
    node at its maximum) and ``P_peak``, the highest ``P`` of the last ``peak_window_s``:

    * ``P > threshold_w`` (``cap_threshold x cap``): ``extra -= over_gain x (P - limit)``;
    * ``P > limit_w`` (over the target): ``extra -= P - limit`` (the excess, in one cycle);
    * ``P_peak < limit_w`` and the last allocation cut someone in ``d`` (*binding*):
      ``extra += gain_per_s x dt x (limit - P_peak)``;
    * otherwise it holds. Not capping: dropped.

    So it grows only after a whole window under the target (a training job's swing, an
    inference burst seen in the window hold it back), never while nobody needs the watts (no
    wind-up), and gives back at once what is drawn beyond the target. At rest the window's peak
    sits at ``target x cap``, under the cap threshold. ``limit_w`` is the band's (target x cap,
    a meter's overhead off); the controller passes ``ceiling_w = (target + slack_max_fraction)
    x cap`` and ``threshold_w`` less the same overhead. The extra watts go out in
    ``allocate``'s own order (cuts undone highest class first).

    The price (documented in docs/site-controller.md): the budgets then sum above the band's
    limit, by at most ``slack_max_fraction x cap``. Nodes whose draw jumps onto watts they were
    granted but were not drawing (a job starting on them) can take the domain above its cap
    until the next cycle's cut lands (one report and one lease: about two ticks), by at most the
    reclaimed watts. Pure: values and ``now`` in, limits out; no I/O."""

    gain_per_s: float = 0.5
    over_gain: float = 2.0  # above the cap threshold: give back this many times the excess over the target
    max_step_s: float = 3.0  # the most time one step may integrate (a stalled controller)
    peak_window_s: float = 30.0  # the error is taken against the highest power measured this long
    extra_w: dict[str, float] = field(default_factory=dict)
    _peaks: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    _last_now: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gain_per_s) and self.gain_per_s >= 0):
            raise ValueError(f"slack gain_per_s must be a finite number >= 0 (0 turns the feedback off; "
                             f"got: {self.gain_per_s!r})")
        if not (math.isfinite(self.over_gain) and self.over_gain >= 1):
            raise ValueError(f"slack over_gain must be >= 1 (got: {self.over_gain!r})")
        if not (math.isfinite(self.peak_window_s) and self.peak_window_s >= 0):
            raise ValueError(f"slack peak_window_s must be >= 0 (got: {self.peak_window_s!r})")
        if not (math.isfinite(self.max_step_s) and self.max_step_s > 0):
            raise ValueError(f"slack max_step_s must be > 0 (got: {self.max_step_s!r})")

    def step(self, now: float, capping: Collection[str], limits_w: Mapping[str, float],
             power_w: Mapping[str, float], ceilings_w: Mapping[str, float],
             binding: Collection[str], threshold_w: Mapping[str, float] | None = None) -> dict[str, float]:
        """The effective limits: ``limits_w`` with each capping domain's correction added.

        ``capping``: the domains whose band caps now; ``ceilings_w``: per domain, the most its
        effective limit may be; ``binding``: the domains whose previous allocation cut a node
        (only those may grow their correction). A domain not capping keeps its limit and loses
        its correction."""
        dt = 0.0 if self._last_now is None else min(max(0.0, now - self._last_now), self.max_step_s)
        self._last_now = now
        out = dict(limits_w)
        threshold_w = threshold_w or {}
        extra = self.extra_w
        for d in list(extra):
            if d not in capping:
                del extra[d]
        peaks = self._peaks
        for d in list(peaks):
            if d not in capping:
                del peaks[d]
        if self.gain_per_s == 0:
            extra.clear()
            return out
        for d in capping:
            limit = limits_w.get(d)
            if limit is None:
                continue
            room = max(0.0, ceilings_w.get(d, limit) - limit)
            x = extra.get(d, 0.0)
            power = power_w.get(d, 0.0)
            peak = self._peak(d, now, power)
            if power > threshold_w.get(d, math.inf):  # above the cap threshold: give back faster
                x += self.over_gain * (limit - power)
            elif power > limit:  # over the target: give the excess back at once (one cycle)
                x += limit - power
            elif peak < limit and d in binding:  # under it all window long: grow, only while it cuts
                x += self.gain_per_s * dt * (limit - peak)
            x = min(max(x, 0.0), room)
            if x > 0:
                extra[d] = x
                out[d] = limit + x
            else:
                extra.pop(d, None)
        return out

    def _peak(self, d: str, now: float, power_w: float) -> float:
        """The highest power measured in ``d`` within ``peak_window_s`` (a monotonic deque)."""
        q = self._peaks.get(d)
        if q is None:
            q = self._peaks[d] = deque()
        while q and q[-1][1] <= power_w:
            q.pop()
        q.append((now, power_w))
        horizon = now - self.peak_window_s
        while q[0][0] < horizon:
            q.popleft()
        return q[0][1]


# --- the core ---------------------------------------------------------------------------------

class ControllerCore:
    """See the module docstring. One instance per controller process (or simulated controller)."""

    def __init__(self, domains: Domains, *, site: str, controller_id: str, key: bytes,
                 interval_s: float = 1.0, lease_ttl_s: float = 10.0, lease_refresh_s: float | None = None,
                 stale_after_s: float = 5.0, subtree: str | None = None, delegates: Collection[str] = (),
                 failsafe_w: float | None = None, unseen_node_w: float | None = None,
                 meters: Mapping[str, tuple[str, float]] | None = None,
                 release_w_per_s: float = 200.0, release_jitter: float = 0.2, release_hold_s: float = 5.0,
                 band_hold_s: float = 5.0, slack_gain_per_s: float = 0.5,
                 slack_max_fraction: float = 0.3, max_clock_skew_s: float = 2.0, max_lease_ttl_s: float = 60.0,
                 rng: random.Random | None = None, timer: Callable[[], float] = time.perf_counter) -> None:
        """``meters``: topic -> (domain, stale_after_s). ``timer`` only measures the cycle's cost.
        ``slack_gain_per_s``: the measured-slack feedback's gain (``SlackReclaim``; 0 turns it off);
        ``slack_max_fraction``: the most it may add to a capping domain's limit, as a fraction of
        its cap (the worst excursion over the cap it can allow for about two ticks)."""
        if not key:
            raise ValueError("the site key is empty: leases must be signed (see --site-key-file)")
        if not lease_ttl_s > interval_s > 0:
            raise ValueError(f"lease_ttl_s ({lease_ttl_s}) must exceed interval_s ({interval_s}) > 0")
        self.site = topics.check_level(site, "site")
        self.controller_id = topics.check_level(controller_id, "controller id")
        self.key = key
        self.domains = domains
        self.subtree = subtree
        root = subtree if subtree is not None else domains.root
        self.delegates = tuple(dict.fromkeys(delegates))
        self.tree = controlled_tree(domains, root, self.delegates)
        self.root = root
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self.lease_refresh_s = lease_ttl_s / 3 if lease_refresh_s is None else lease_refresh_s
        self.stale_after_s = stale_after_s
        self.unseen_node_w = unseen_node_w
        self.timer = timer
        self.stats = ControllerStats()
        self.bands = BandTracker(self.tree, min_hold_s=band_hold_s)
        self.slack = SlackReclaim(gain_per_s=slack_gain_per_s, max_step_s=max(3 * interval_s, 1.0))
        if not (math.isfinite(slack_max_fraction) and slack_max_fraction >= 0):
            raise ValueError("slack_max_fraction must be a finite fraction of the cap >= 0 "
                             f"(got: {slack_max_fraction!r})")
        # per domain: the most its effective limit may be (target + slack_max_fraction of the cap)
        # and the measured power above which its correction is dropped at once (cap_threshold x cap)
        self._ceilings_w = {d: (self.tree.bands(d).target + slack_max_fraction) * self.tree.cap_w(d)
                            for d in self.tree}
        self._thresholds_w = {d: self.tree.bands(d).cap_threshold * self.tree.cap_w(d) for d in self.tree}
        self._binding: frozenset[str] = frozenset()  # domains whose last allocation cut a node
        self.release = ReleaseLimiter(rise_w_per_s=release_w_per_s, jitter=release_jitter, hold_s=release_hold_s,
                                      max_step_s=max(3 * interval_s, 1.0), rng=rng or random.Random())
        self._latest: dict[str, _Latest] = {}
        self._sent: dict[str, _Sent] = {}  # reporter -> last lease sent
        self._seq: int | None = None
        self._report_seq = 0
        self._refusal_log = RateLimitedLog(interval_s)
        self._event_log = RateLimitedLog(max(interval_s, 10.0))
        self._first_cycle_at: float | None = None  # for the start-up grace of _log_shortfalls
        self._verdict: dict[str, str | None] = {}  # node -> "ok" / "ignored" / a refusal reason
        self._leaves = frozenset(self.tree.leaves)
        # delegated children: their aggregate report arrives on .../domains/{d}/power
        self._delegate_topics = {topics.domain_power(self.site, d): d for d in self.delegates}
        # facility meters
        self._meters: dict[str, _Meter] = {}
        for topic, (domain, stale_s) in (meters or {}).items():
            if domain not in self.tree:
                raise ValueError(f"meter topic {topic!r}: domain {domain!r} is not allocated by this controller "
                                 f"(not in {root!r}'s subtree of {domains.source}, or inside a delegated child)")
            self._meters[topic] = _Meter(domain, stale_s)
        # subtree mode: the parent's leases for our root
        self.parent_leases: LeaseTracker | None = None
        self._budget_prefix = ""
        if subtree is not None:
            if failsafe_w is None:
                raise ValueError(f"subtree {subtree!r}: failsafe_w is required (the budget while no parent "
                                 "lease is live)")
            self.parent_leases = domain_lease_tracker(self.site, subtree, key, domains.cap_w(subtree), failsafe_w,
                                                      max_clock_skew_s, max_lease_ttl_s, interval_s)
            self._budget_prefix = topics.domain_budget(self.site, subtree, "")
        self._parent_budget: NodeBudget | None = None
        # a node's report topic is prefix + node + suffix
        self._node_prefix, self._node_suffix = topics.node_power(self.site, "\0").split("\0")

    # -- what to subscribe to ------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, qos) the transport subscribes to: the reports of the nodes we allocate (each
        topic when the file names them all exactly, else every node's), delegated children's
        aggregates, the parent's leases (subtree mode) and the meters."""
        subs: list[tuple[str, int]] = []
        exact = self._exact_nodes()
        if exact is not None:
            subs += [(topics.node_power(self.site, n), 0) for n in exact]
        else:
            subs.append((topics.node_power_filter(self.site), 0))
        subs += [(t, 0) for t in self._delegate_topics]
        if self.subtree is not None:
            subs.append((topics.domain_budget_filter(self.site, self.subtree), 1))
        subs += [(t, 0) for t in self._meters]
        return subs

    def _exact_nodes(self) -> list[str] | None:
        """The node names the tree holds when none is a glob and they are few enough to
        subscribe one by one (a subtree controller then receives only its own nodes' reports)."""
        if self.subtree is None:
            return None
        names: list[str] = []
        for leaf in self.tree.leaves:
            for pat in self.tree[leaf].nodes:
                if pat.startswith(_DELEGATE_PREFIX):
                    continue
                if any(c in pat for c in "*?["):
                    return None
                names.append(pat)
        return names if len(names) <= 5000 else None

    # -- ingest (the hot path) -----------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, now: float) -> bool:
        """Route one received message; True when it was taken. Never raises for bad input."""
        meter = self._meters.get(topic)
        if meter is not None:
            return self._on_meter(meter, topic, payload, now)
        delegate = self._delegate_topics.get(topic)
        if delegate is not None:
            return self._on_delegate_report(delegate, topic, payload, now)
        if self._budget_prefix and topic.startswith(self._budget_prefix):
            return self.on_parent_lease(topic, payload, now)
        return self.on_report(topic, payload, now)

    def on_report(self, topic: str, payload: bytes, now: float) -> bool:
        """A node's power report: validated and kept as its latest; refused (counted, logged
        once per reason per interval) when bad. Returns True when accepted."""
        if not (topic.startswith(self._node_prefix) and topic.endswith(self._node_suffix)):
            return self._refuse("not_a_topic", topic, f"not a node report topic (expected "
                                f"{topics.node_power(self.site, '<node>')})", now)
        node = topic[len(self._node_prefix):-len(self._node_suffix)]
        verdict = self._verdict.get(node)
        if verdict is None:
            verdict = self._judge_node(node)
        if verdict != "ok":
            if verdict == "ignored":
                self.stats.ignored += 1
                return False
            return self._refuse(verdict, topic, self._node_detail(verdict, node), now)
        return self._accept(node, "node", node, topic, payload, now)

    def _accept(self, key: str, kind: str, name: str, topic: str, payload: bytes, now: float) -> bool:
        """Decode a report and keep it as ``key``'s latest when it is the ``kind`` report of
        ``name`` in this site, as its topic says; else refuse it (counted, logged)."""
        try:
            report = decode_report_fast(payload)
        except ProtocolError as exc:
            return self._refuse(exc.reason, topic, exc.detail, now)
        if report.node != name or report.site != self.site or report.kind != kind:
            return self._refuse("topic_mismatch", topic,
                                f"the report says kind={report.kind!r} site={report.site!r} node={report.node!r}; "
                                f"its topic says the {kind} report of {name!r} in site {self.site!r}", now)
        self._latest[key] = _Latest(report, now)
        self.stats.reports_accepted += 1
        return True

    def _judge_node(self, node: str) -> str:
        try:
            leaf = self.domains.leaf_of(node)
        except DomainsError:
            verdict = "ambiguous_node"
        else:
            if leaf is None:
                verdict = "unknown_node"
            elif leaf in self._leaves and leaf not in self.delegates:
                verdict = "ok"
            else:
                verdict = "ignored"  # another subtree's, or a delegated child's
        if len(self._verdict) >= _VERDICT_CACHE_MAX:
            self._verdict.clear()  # names from untrusted topics must not grow it without bound
        self._verdict[node] = verdict
        return verdict

    def _node_detail(self, reason: str, node: str) -> str:
        shown = node[:80]
        if reason == "unknown_node":
            return f"node {shown!r} is in no leaf of {self.domains.source}: add it to a leaf's nodes, or fix its name"
        if reason == "ambiguous_node":
            return f"node {shown!r} matches two leaves of {self.domains.source}: narrow the globs"
        return shown

    def _on_delegate_report(self, domain: str, topic: str, payload: bytes, now: float) -> bool:
        return self._accept(delegate_key(domain), "domain", domain, topic, payload, now)

    def _refuse(self, reason: str, topic: str, detail: str, now: float) -> bool:
        st = self.stats
        st.reports_refused += 1
        st.refused[reason] = st.refused.get(reason, 0) + 1
        self._refusal_log.emit(reason, now, log.warning, "report_refused", reason=reason, topic=topic[:200],
                               detail=detail[:300], controller=self.controller_id,
                               hint="the report is dropped; the node is budgeted from its last good report")
        return False

    def on_parent_lease(self, topic: str, payload: bytes, now: float) -> bool:
        """Subtree mode: a parent controller's lease for our subtree (judged like a node's)."""
        if self.parent_leases is None:
            return False
        return self.parent_leases.offer(topic, payload, now).accepted

    def _on_meter(self, meter: _Meter, topic: str, payload: bytes, now: float) -> bool:
        value, problem = parse_meter(payload)
        if problem is not None:
            self.stats.meter_refused += 1
            self._refusal_log.emit("meter:" + topic, now, log.warning, "meter_refused", topic=topic[:200],
                                   domain=meter.domain, detail=problem,
                                   hint='send {"power_w": <watts>} or a bare number of watts')
            return False
        meter.power_w, meter.received_at = value, now
        self.stats.meter_readings += 1
        return True

    # -- the cycle -----------------------------------------------------------------------------

    def cycle(self, now: float) -> CycleResult:
        """Allocate and lease (see the module docstring). Never raises for what was received."""
        started = self.timer()
        if self._seq is None:
            self._seq = int(now * 1000)  # increasing across restarts: nodes refuse a replayed (issued_at, seq)
        tree = self.tree
        reports: dict[str, NodeReport] = {}
        stale_keys: list[str] = []
        newly_stale: list[str] = []
        horizon = now - self.stale_after_s
        for key, latest in self._latest.items():
            if latest.received_at < horizon:
                if latest.stale_copy is None:
                    latest.stale_copy = replace(latest.node_report(key), stale=True)
                    newly_stale.append(key)
                reports[key] = latest.stale_copy
                stale_keys.append(key)
            else:
                latest.stale_copy = None
                reports[key] = latest.node_report(key)
        if newly_stale:
            self._event_log.emit("stale", now, log.warning, "nodes_stale", newly=len(newly_stale),
                                 stale=len(stale_keys), nodes=sorted(newly_stale)[:10],
                                 hint="no report within stale_after: each is counted at its last known maximum "
                                      "and not cut (broker, network or agentd down on those nodes?)")
        # a silent delegated child counts at its cap; a named node that never reported at
        # unseen_node_w (when set): in the bands as in the allocation
        absent = {delegate_key(d): tree.cap_w(d) for d in self.delegates if delegate_key(d) not in reports}
        unseen: dict[str, float] = dict(absent)
        if self.unseen_node_w is not None:
            for n in tree.exact_nodes():
                if n not in reports and n not in unseen:
                    unseen[n] = self.unseen_node_w

        # bands, on the summed reports (or the meter when it reads higher)
        totals = domain_totals(tree, reports)
        meters = self._meter_readings(now)
        power, demand = totals.power_w, totals.demand_w
        if unseen:
            power, demand = dict(power), dict(demand)
            for key, w in unseen.items():
                for d in tree.path_to_root(tree.leaf_of(key) or tree.root):
                    power[d] += w
                    demand[d] += w
        step = self.bands.step(now, power, demand, meters)
        # measured-slack feedback: a capping domain that draws less than its target grants the
        # difference again (SlackReclaim), on the same basis as the band's limit (meter overhead off)
        ceilings, thresholds = self._ceilings_w, self._thresholds_w
        if meters:
            ceilings, thresholds = dict(ceilings), dict(thresholds)
            for d, m in meters.items():
                overhead = max(0.0, m - power.get(d, 0.0))
                ceilings[d] -= overhead
                thresholds[d] -= overhead
        capping = [d for d, lv in step.levels.items() if lv is Level.CAPPING]
        limits = self.slack.step(now, capping, step.limits_w, power, ceilings, self._binding, thresholds)
        budget_source = "cap"
        if self.parent_leases is not None:
            held = self.parent_leases.budget(now)
            budget_source = held.source
            if held.budget_w < limits[self.root]:
                self.slack.extra_w.pop(self.root, None)  # the parent's lease binds, not our band: no wind-up
                limits[self.root] = held.budget_w
            self._parent_budget = held

        alloc = allocate(tree, reports, limits_w=limits, absent_w=absent or None,
                         default_absent_w=self.unseen_node_w)
        self._binding = frozenset(d for d, a in alloc.domains.items() if a.binding and a.allocated_w > 0)
        # nodes rise at the paced rate; a delegated child's budget is passed on at once (its own
        # controller paces its nodes, and a hall cannot rise at one node's rate)
        issued = self.release.step(now, {k: w for k, w in alloc.budgets_w.items()
                                         if k in reports and not k.startswith(_DELEGATE_PREFIX)})
        for d in self.delegates:
            k = delegate_key(d)
            if k in alloc.budgets_w:
                issued[k] = alloc.budgets_w[k]

        publish: list[Publish] = []
        leases = 0
        capped = 0
        refresh_before = now - self.lease_refresh_s
        for key, budget_w in issued.items():
            budget_w = math.floor(budget_w * _BUDGET_STEPS_PER_W) / _BUDGET_STEPS_PER_W
            last = reports.get(key)
            if last is not None and budget_w < last.max_w - 1.0:
                capped += 1
            sent = self._sent.get(key)
            if sent is not None and sent.budget_w == budget_w and sent.issued_at > refresh_before:
                continue
            publish.append(self._lease(key, budget_w, now))
            self._sent[key] = _Sent(budget_w, now)
            leases += 1
        self.stats.leases_sent += leases

        summaries = self._summaries(alloc, step.levels, meters, stale_keys, absent, self.slack.extra_w)
        if self._first_cycle_at is None:
            self._first_cycle_at = now
        # Just started and some named nodes not heard from yet: a shortfall that only counts them
        # at their figure is expected for one stale_after; said at info, published all the same.
        warming_up = bool(unseen) and now - self._first_cycle_at < self.stale_after_s
        self._log_shortfalls(summaries, now, warming_up)
        ts_ns = int(now * 1e9)
        points = [domain_power_point(self.site, self.controller_id, s, ts_ns) for s in summaries.values()]
        if self.subtree is not None:
            publish.append(self._upward_report(reports, absent, alloc, limits[self.root], budget_source, now))
        result = CycleResult(now=now, publish=publish, points=points, allocation=alloc, budgets_w=issued,
                             domains=summaries, root_limit_w=limits[self.root], budget_source=budget_source,
                             nodes=len(reports), stale_nodes=len(stale_keys), nodes_capped=capped,
                             leases=leases, cycle_s=0.0)
        st = self.stats
        st.cycles += 1
        st.cycle_s = result.cycle_s = self.timer() - started
        st.cycle_s_max = max(st.cycle_s_max, st.cycle_s)
        points.append(controller_point(self.site, self.controller_id, st, result, ts_ns))
        return result

    def _meter_readings(self, now: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self._meters.values():
            if m.power_w is not None and now - m.received_at <= m.stale_after_s:
                out[m.domain] = m.power_w
        return out

    def _lease(self, key: str, budget_w: float, now: float) -> Publish:
        assert self._seq is not None
        self._seq += 1
        if key.startswith(_DELEGATE_PREFIX):
            name = key[len(_DELEGATE_PREFIX):]
            target, topic = f"domains/{name}", topics.domain_budget(self.site, name, self.controller_id)
        else:
            target, topic = f"nodes/{key}", topics.node_budget(self.site, key, self.controller_id)
        lease = Lease.model_construct(site=self.site, target=target, controller=self.controller_id,
                                      budget_w=budget_w, issued_at=now, expires_at=now + self.lease_ttl_s,
                                      seq=self._seq, v=1, sig="")
        return Publish(topic, encode_lease(lease, self.key), 1, True)

    def _summaries(self, alloc: Allocation, levels: Mapping[str, Level], meters: Mapping[str, float],
                   stale_keys: Iterable[str], absent: Mapping[str, float],
                   reclaimed: Mapping[str, float]) -> dict[str, DomainSummary]:
        tree = self.tree
        stale_in: dict[str, int] = {}
        for key in (*stale_keys, *alloc.absent):
            try:
                leaf = tree.leaf_of(key)
            except DomainsError:
                continue
            if leaf is not None:
                for d in tree.path_to_root(leaf):
                    stale_in[d] = stale_in.get(d, 0) + 1
        out: dict[str, DomainSummary] = {}
        for d, a in alloc.domains.items():
            out[d] = DomainSummary(domain=d, level=levels.get(d, Level.UNCAPPED), power_w=a.power_w,
                                   demand_w=a.demand_w, cap_w=a.cap_w, limit_w=a.limit_w,
                                   allocated_w=a.allocated_w, shortfall_w=a.shortfall_w, meter_w=meters.get(d),
                                   nodes=a.nodes, stale_nodes=stale_in.get(d, 0),
                                   reclaimed_w=reclaimed.get(d, 0.0))
        return out

    def _log_shortfalls(self, summaries: Mapping[str, DomainSummary], now: float, warming_up: bool) -> None:
        level = log.info if warming_up else log.error
        for s in summaries.values():
            if s.shortfall_w > 0:
                key = ("shortfall_start:" if warming_up else "shortfall:") + s.domain  # the error is not held back
                self._event_log.emit(key, now, level, "domain_shortfall", domain=s.domain,
                                     warming_up=warming_up, shortfall_w=round(s.shortfall_w, 1),
                                     limit_w=round(s.limit_w, 1),
                                     allocated_w=round(s.allocated_w, 1), cap_w=s.cap_w,
                                     hint="the nodes' floors (job floors, GPU minimum limits) and the stale "
                                          "nodes alone exceed this domain's limit: lower class floors, move "
                                          "work, or raise the cap; the shortfall is in domain_power")

    def _upward_report(self, reports: Mapping[str, NodeReport], absent: Mapping[str, float], alloc: Allocation,
                       limit_w: float, budget_source: str, now: float) -> Publish:
        """The subtree's aggregate, as a node's report: what the parent allocates from.

        A stale reporter (and an absent delegated child or unseen node) is fixed: its counted
        watts go into min, floor, max and demand alike, so the parent can never cut them."""
        min_w = floor_w = max_w = demand_w = 0.0
        flex = dict.fromkeys(CLASSES, 0.0)
        gpus = 0
        for key, r in reports.items():
            latest = self._latest.get(key)
            gpus += latest.raw.gpus if latest is not None else 0
            if r.stale:
                min_w += r.max_w
                floor_w += r.max_w
                max_w += r.max_w
                demand_w += r.max_w
                continue
            min_w += r.min_w
            floor_w += r.floor_w
            max_w += r.max_w
            demand_w += r.demand_w
            for c, w in r.flexible_w.items():
                flex[c] += w
        for n in alloc.absent:
            w = absent.get(n, self.unseen_node_w or 0.0)
            min_w, floor_w, max_w, demand_w = min_w + w, floor_w + w, max_w + w, demand_w + w
        # sums of floats: keep the report's invariant (floor + flexible <= max) exactly
        max_w = max(max_w, floor_w + sum(flex.values()))
        root = alloc.domains[self.root]
        held = self._parent_budget
        self._report_seq += 1
        report = PowerReport(kind="domain", site=self.site, node=self.root, ts=now, seq=self._report_seq,
                             gpus=min(gpus, 4096), gpu_power_w=root.power_w, demand_w=demand_w, min_w=min_w,
                             floor_w=floor_w, max_w=max_w, flexible_w=cast(Any, flex), budget_w=limit_w,
                             budget_source="lease" if budget_source == "lease" else "failsafe",
                             lease_age_s=held.lease_age_s if held is not None else None)
        return Publish(topics.domain_power(self.site, self.root), encode_report(report), 0, False)

    # -- transport feedback --------------------------------------------------------------------

    def unsent(self, topic: str) -> None:
        """The transport could not send this lease: send it again at the next cycle."""
        key = self._key_of_lease_topic(topic)
        if key is not None:
            self._sent.pop(key, None)
            self.stats.leases_unsent += 1

    def resend_all(self) -> None:
        """Send every lease again at the next cycle (after a reconnect: a restarted broker
        without persistence lost the retained ones)."""
        self._sent.clear()

    def clear_leases(self) -> list[Publish]:
        """Empty retained messages on every lease topic of this controller (a clean stop with
        ``clear_leases_on_stop``): nodes drop these leases at once instead of at expiry."""
        out = []
        for key in self._sent:
            if key.startswith(_DELEGATE_PREFIX):
                topic = topics.domain_budget(self.site, key[len(_DELEGATE_PREFIX):], self.controller_id)
            else:
                topic = topics.node_budget(self.site, key, self.controller_id)
            out.append(Publish(topic, b"", 1, True))
        return out

    def _key_of_lease_topic(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 7 and parts[5] == "budget":
            return parts[4] if parts[3] == "nodes" else delegate_key(parts[4]) if parts[3] == "domains" else None
        return None

    # -- introspection -------------------------------------------------------------------------

    def known(self) -> dict[str, float]:
        """Reporter -> when its last report arrived (unix s)."""
        return {k: v.received_at for k, v in self._latest.items()}


def domain_lease_tracker(site: str, domain: str, key: bytes, cap_w: float, failsafe_w: float,
                         max_skew_s: float, max_ttl_s: float, log_every_s: float) -> LeaseTracker:
    """The node's ``LeaseTracker``, pointed at a domain's budget topics: a subtree controller
    judges its parent's leases exactly as a node judges its own (signature, site, target, topic,
    expiry, replay; the minimum of the live ones; the failsafe when none is live).

    ``LeaseTracker`` is written for nodes (``nodes/{node}`` targets); its prefix and target are
    re-pointed here until it takes a target kind of its own (see the controller's report)."""
    tracker = LeaseTracker(site, domain, key, max_w=cap_w, failsafe_w=failsafe_w, max_skew_s=max_skew_s,
                           max_ttl_s=max_ttl_s, log_every_s=log_every_s)
    for attr in ("_prefix", "_target"):
        if not hasattr(tracker, attr):  # pragma: no cover - guards against a silent rename
            raise RuntimeError(f"agentd.site.lease.LeaseTracker has no {attr}: update domain_lease_tracker")
    tracker._prefix = topics.domain_budget(site, domain, "")
    tracker._target = f"domains/{domain}"
    return tracker


def decode_report_fast(payload: bytes) -> PowerReport:
    """``protocol.decode_report``, at about half the cost for a good report.

    The fast path validates the JSON bytes in one pydantic call (no json.loads into a dict
    first); whatever it refuses is decoded again by ``decode_report``, so a refusal carries the
    protocol's reason label. Same model, same acceptance (tests compare the two)."""
    if len(payload) <= MAX_PAYLOAD_BYTES:
        try:
            return PowerReport.model_validate_json(payload)
        except ValidationError:
            pass
    try:
        return decode_report(payload)
    except RecursionError:  # json.loads on a deeply nested payload (within the size limit)
        raise ProtocolError("not_json", "nested too deeply to be a report") from None


def parse_meter(payload: bytes) -> tuple[float, None] | tuple[None, str]:
    """A facility meter's reading: ``(watts, None)`` or ``(None, why it is refused)``."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None, f"{len(payload)} bytes (the limit is {MAX_PAYLOAD_BYTES})"
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "not JSON and not a number"
    if isinstance(doc, dict):
        doc = doc.get("power_w", doc.get("value"))
    if isinstance(doc, bool) or not isinstance(doc, (int, float)):
        return None, f"no power_w number (got: {str(doc)[:60]!r})"
    value = float(doc)
    if not math.isfinite(value) or value < 0:
        return None, f"power_w must be a finite number >= 0 (got: {value!r})"
    return value, None


# --- points (DESIGN.md section 3): the controller's own measurements, built from its summaries ---

def domain_power_point(site: str, controller: str, s: DomainSummary, ts_ns: int) -> Point:
    """The ``domain_power`` measurement: one domain's power against its cap, as one controller
    saw it (``controller`` is a tag: replicas write their own series). ``level`` is the band
    state as an int (0 uncapped, 1 capping); ``meter_w`` only when a fresh meter reading exists;
    ``headroom_w = cap_w - max(power_w, meter_w)`` (negative: over the cap)."""
    measured = max(s.power_w, s.meter_w) if s.meter_w is not None else s.power_w
    return Point("domain_power", {"site": site, "domain": s.domain, "controller": controller}, {
        "power_w": s.power_w,
        "demand_w": s.demand_w,
        "cap_w": s.cap_w,
        "limit_w": s.limit_w,
        "reclaimed_w": s.reclaimed_w,
        "allocated_w": s.allocated_w,
        "headroom_w": s.cap_w - measured,
        "shortfall_w": s.shortfall_w,
        "meter_w": s.meter_w,
        "level": LEVEL_CODE[s.level],
        "nodes": s.nodes,
        "stale_nodes": s.stale_nodes,
    }, ts_ns)


def controller_point(site: str, controller: str, st: ControllerStats, r: CycleResult, ts_ns: int) -> Point:
    """The ``controller`` measurement: the controller's own health (cumulative counters, and
    ``refused_<reason>`` for each reason seen)."""
    fields: dict[str, float | int | bool | str | None] = {
        "reports_accepted": st.reports_accepted,
        "reports_refused": st.reports_refused,
        "reports_ignored": st.ignored,
        "meter_readings": st.meter_readings,
        "meter_refused": st.meter_refused,
        "leases_sent": st.leases_sent,
        "leases_unsent": st.leases_unsent,
        "cycle_s": round(r.cycle_s, 6),
        "cycle_s_max": round(st.cycle_s_max, 6),
        "nodes": r.nodes,
        "stale_nodes": r.stale_nodes,
        "nodes_capped": r.nodes_capped,
        "budget_source": r.budget_source,
    }
    for reason, n in sorted(st.refused.items()):
        fields["refused_" + reason] = n
    return Point("controller", {"site": site, "controller": controller}, fields, ts_ns)
