"""The node's side of site power caps, transport-agnostic: leases in, budget and report out.

``NodeSite`` is what one node needs of the site protocol, as plain methods: ``on_lease(topic,
payload, now)`` for every message on the node's budget topics, and ``step(now, samples,
baselines_w, classes_by_gpu)`` once per tick, which returns

* the budget as a ``rules.actions.NodeCap(watts, "budget")`` for the composition (minimum with
  the rule ceilings, then the ramp), with each GPU's class and demand for the split;
* the power report (``protocol.PowerReport``) as ``(topic, payload)`` to publish (QoS 0, not
  retained: the next tick supersedes it);
* the ``node_power`` point.

The daemon carries the bytes over its MQTT link; the site simulation runs hundreds of these in
one process over an in-process bus or one shared connection, so a step is a few dict operations
per GPU and one JSON document (no I/O, no logging on the steady path).

Per GPU (healthy, with its limits known): ``max`` is its ceiling (the baseline: the limit it
holds with no cap of ours), ``min`` its minimum limit, ``floor`` its class's floor
(``budget.class_floor_fraction`` of its maximum limit, within [min, max]), ``demand`` the
estimate of ``agentd.site.demand``, its highest over ``budget.demand_window`` (``DemandWindow``:
a training job's dips are not a fall in demand). The report's sums clamp each GPU as
``rules.budget.GpuDemand`` does for ``node_report`` and ``split_node_budget`` (a test holds them
equal), so what the controller allocates is what the node can split. A GPU the daemon
cannot control (unhealthy, limits unreadable) counts at the last limit it was seen holding, in
min, floor and max alike (nothing of it can be shed), and that much is taken off the NodeCap,
since the split only sets the GPUs it controls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from agentd.lineproto import Point
from agentd.points import node_power_point
from agentd.site import topics
from agentd.site.demand import DemandEstimator, DemandWindow
from collectors.log_limit import RateLimitedLog
from agentd.site.lease import Decision, LeaseTracker, NodeBudget
from agentd.site.protocol import ClassName, PowerReport, encode_report
from collectors.base import GpuSample
from rules.actions import NodeCap
from rules.budget import CLASSES

if TYPE_CHECKING:
    from agentd.clock import Clock
    from agentd.config import AgentConfig

log = structlog.get_logger("agentd.site")

BUDGET_SOURCE = "budget"  # the NodeCap's source: power_limit_set lines say source=node:budget
REPORT_QOS = 0  # a report is superseded next tick; QoS 1 would make a reconnect replay old ones
LEASE_QOS = 1
LEVELS = ("uncapped", "capped", "failsafe")


class DomainsLike(Protocol):
    """What the node needs of ``rules.domains.Domains``."""

    site: str

    def leaf_of(self, node: str) -> str | None: ...


@dataclass(slots=True)
class NodeSiteStep:
    """What one tick of the node's site logic decided (see the module docstring)."""

    budget: NodeBudget
    node_cap: NodeCap  # the budget less what GPUs outside the split hold
    classes_by_gpu: dict[int, str]  # per controllable GPU: its job class
    level: str  # uncapped | capped | failsafe
    report: PowerReport
    publish: tuple[str, bytes] | None  # (topic, payload) of the report; None: publishing is off
    point: Point
    demand_w: float  # the physical estimate (the report's demand_w is floor + flexible; see below)
    estimated: int = 0  # GPUs whose demand is estimated (held at a limit below their ceiling)
    uncontrolled_w: float = 0.0
    floors_w: dict[int, float] = field(default_factory=dict)  # per controllable GPU: its job's floor
    demands_w: dict[int, float] = field(default_factory=dict)  # per controllable GPU: its demand estimate


@dataclass(slots=True)
class _Seen:
    """The last limits a GPU was seen with (for when it stops answering)."""

    uuid: str
    limit_w: float
    ceiling_w: float


class NodeSite:
    """Lease tracking, demand, report and budget for one node; see the module docstring."""

    def __init__(self, cfg: AgentConfig, domains: DomainsLike | None, key: bytes | None,
                 clock: Clock | None = None) -> None:
        b = cfg.budget
        if b.failsafe_w is None:
            raise ValueError("budget.failsafe_w: required when budget.enabled = true")
        self.site = topics.check_level(cfg.site, "site")
        self.node = topics.check_level(cfg.node_name, "node")
        self.clock = clock
        self.publish_reports = b.publish_reports
        self.floor_fraction = {c: b.class_floor_fraction.get(c, 0.0) for c in CLASSES}
        default = cfg.jobs.default_class
        self.default_class = default if default in CLASSES else "normal"
        self.domain: str | None = None
        if domains is not None:
            if domains.site != self.site:
                raise ValueError(f"budget.domains_file: the file is for site {domains.site!r} but this node's "
                                 f"site = {self.site!r}; set site, or point budget.domains_file at this site's file")
            self.domain = domains.leaf_of(self.node)  # DomainsError when two leaves claim it
            if self.domain is None:
                log.warning("node_not_in_domains", node=self.node, site=self.site,
                            hint="no leaf of the domains file names this node: the controller refuses its reports "
                                 "and it stays on its failsafe; add it to a leaf's nodes")
        self.tracker = LeaseTracker(self.site, self.node, key, max_w=0.0, failsafe_w=b.failsafe_w,
                                    max_skew_s=b.max_clock_skew_s, max_ttl_s=b.max_lease_ttl_s)
        self.estimator = DemandEstimator()
        self.window = DemandWindow(b.demand_window_s)
        self.report_topic = topics.node_power(self.site, self.node)
        self.lease_filter = topics.node_budget_filter(self.site, self.node)
        self.seq = 0
        self._seen: dict[int, _Seen] = {}
        self._log = RateLimitedLog()
        self._warned_failsafe = False
        if key is None:
            log.warning("leases_unsigned", node=self.node,
                        hint="budget.allow_unsigned = true: any client that can publish to this node's budget "
                             "topics can set its budget; set budget.site_key_file")

    # -- leases --------------------------------------------------------------------------------

    def subscription(self) -> tuple[str, int]:
        """The topic filter (and QoS) of this node's leases, one retained topic per controller."""
        return self.lease_filter, LEASE_QOS

    def on_lease(self, topic: str, payload: bytes, now: float | None = None) -> Decision:
        """One message from the budget topics (``now``: unix seconds; default the clock's)."""
        return self.tracker.offer(topic, payload, self._now(now))

    def on_leases(self, messages: Iterable[tuple[str, bytes]], now: float | None = None) -> list[Decision]:
        """A batch, in arrival order (the MQTT link's handler)."""
        t = self._now(now)
        return [self.tracker.offer(topic, payload, t) for topic, payload in messages]

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self.clock is None:
            raise ValueError("now is required when NodeSite has no clock")
        return self.clock.wall_ns() / 1e9

    # -- the tick ------------------------------------------------------------------------------

    def step(self, now: float, samples: Mapping[int, GpuSample] | Iterable[GpuSample],
             baselines_w: Mapping[int, float] | None = None,
             classes_by_gpu: Mapping[int, str] | None = None, *, ts_ns: int | None = None) -> NodeSiteStep:
        """This tick's budget, report and point (``now``: unix seconds, the wall clock that leases
        use). ``baselines_w``: each GPU's uncapped limit (``Actuator.observe``); a GPU without one
        is one the composition does not set (the daemon's Controller skips it): it counts as a GPU
        that cannot be controlled. ``baselines_w=None``: every GPU is controllable, with its maximum
        limit as its ceiling. ``classes_by_gpu``: each GPU's job class (a GPU missing
        there, or of an unknown class, takes ``jobs.default_class``)."""
        rows = samples.values() if isinstance(samples, Mapping) else samples
        baselines = baselines_w or {}
        every_baseline = baselines_w is None  # None: every GPU is controllable, at its maximum
        classes = classes_by_gpu or {}
        flex = dict.fromkeys(CLASSES, 0.0)
        classes_out: dict[int, str] = {}
        floors: dict[int, float] = {}
        demands: dict[int, float] = {}
        power_w = demand_w = uncontrolled_w = min_w = floor_w = max_w = 0.0
        estimated = 0
        n = 0
        seen_by_gpu, window, estimate, fractions = self._seen, self.window, self.estimator.estimate, self.floor_fraction
        for s in rows:
            n += 1
            i = s.index
            lo, hi = s.limit_min_w, s.limit_max_w
            if not s.healthy or lo is None or hi is None or hi < lo or not (every_baseline or i in baselines):
                # the composition sets no limit on it: it counts at what it holds (or last held),
                # none of it to shed, and that much comes off the node cap
                seen = seen_by_gpu.get(i)
                fixed = s.limit_w if s.healthy and s.limit_w is not None else (seen.limit_w if seen else None)
                if fixed is not None:
                    min_w += fixed
                    floor_w += fixed
                    max_w += fixed
                    uncontrolled_w += fixed
                if s.healthy and s.power_w is not None:
                    power_w += s.power_w
                continue
            ceiling = min(max(baselines.get(i, hi), lo), hi)
            held = s.limit_w if s.limit_w is not None else ceiling
            seen = seen_by_gpu.get(i)
            if seen is None:
                seen_by_gpu[i] = _Seen(s.uuid, held, ceiling)
            else:
                if seen.uuid != s.uuid:  # another board at this index
                    window.forget(i)
                    seen.uuid = s.uuid
                seen.limit_w, seen.ceiling_w = held, ceiling
            cls = classes.get(i, self.default_class)
            if cls not in CLASSES:
                self._log.emit(f"class:{cls}", now, log.warning, "unknown_job_class", gpu=i, job_class=cls,
                               using=self.default_class, known=list(CLASSES))
                cls = self.default_class
            classes_out[i] = cls
            demand, was_estimated = estimate(s, ceiling)
            demand = window.update(i, now, demand)
            estimated += was_estimated
            # the clamps of rules.budget.GpuDemand (node_report / split_node_budget), inlined: this
            # runs for every GPU of hundreds of simulated nodes each tick
            floor = min(max(fractions[cls] * hi, lo), ceiling)
            flex[cls] += min(max(demand, floor), ceiling) - floor
            min_w += lo
            floor_w += floor
            max_w += ceiling
            floors[i] = floor
            demands[i] = demand
            demand_w += demand
            if s.power_w is not None:
                power_w += s.power_w
        self.tracker.max_w = max_w
        if min_w > self.tracker.failsafe_w and not self._warned_failsafe:
            self._warned_failsafe = True
            log.warning("failsafe_below_minimum", failsafe_w=self.tracker.failsafe_w, min_w=round(min_w, 1),
                        hint="budget.failsafe_w is below the sum of this node's minimum GPU limits: on failsafe "
                             "every GPU sits at its minimum and the node draws more than failsafe_w; raise it or "
                             "count the difference in the domains' caps")
        budget = self.tracker.budget(now)
        want = floor_w + sum(flex.values())
        if budget.source == "failsafe":
            level = "failsafe"
        elif budget.budget_w < want - 0.5:
            level = "capped"
        else:
            level = "uncapped"
        flexible: dict[ClassName, float] = {cast(ClassName, c): round(w, 1) for c, w in flex.items()}
        floor_r = round(floor_w, 1)
        # The report's demand is the node's want (idle GPUs counted at their floor, never under
        # their minimum limit): higher than the physical estimate, which errs safe (the controller
        # releases a domain's cap on it); the node_power point carries the physical one.
        report = PowerReport(
            site=self.site, node=self.node, ts=now, seq=self.seq, gpus=n,
            gpu_power_w=round(power_w, 1), demand_w=round(floor_r + sum(flexible.values()), 1),
            min_w=round(min_w, 1), floor_w=floor_r, max_w=round(max_w, 1), flexible_w=flexible,
            budget_w=round(budget.budget_w, 1), budget_source=budget.source,
            lease_age_s=None if budget.lease_age_s is None else round(budget.lease_age_s, 3))
        self.seq += 1
        publish = (self.report_topic, encode_report(report)) if self.publish_reports else None
        point = node_power_point(
            self.node, self.site, self.domain, round(now * 1e9) if ts_ns is None else ts_ns,
            gpu_power_w=report.gpu_power_w, budget_w=round(budget.budget_w, 1), demand_w=round(demand_w, 1),
            flexible_w=cast("Mapping[str, float]", flexible), floor_w=report.floor_w, min_w=report.min_w,
            max_w=report.max_w,
            level=level, budget_source=budget.source, lease_age_s=report.lease_age_s,
            leases_live=len(budget.controllers), refused=self.tracker.refused)
        cap_w = max(0.0, budget.budget_w - uncontrolled_w)
        return NodeSiteStep(budget, NodeCap(cap_w, BUDGET_SOURCE), classes_out, level, report, publish,
                            point, demand_w, estimated, uncontrolled_w, floors, demands)

    def forget_gpu(self, index: int) -> None:
        """A GPU left the node (its index is no longer sampled)."""
        self._seen.pop(index, None)
        self.estimator.forget(index)
        self.window.forget(index)


def make_node_site(cfg: AgentConfig, clock: Clock | None = None) -> NodeSite | None:
    """The daemon's NodeSite, or None when ``budget.enabled`` is false.

    Reads the domains file and the site key; raises ``agentd.config.ConfigError`` with located
    lines (``budget.enabled: needs mqtt.host ...``, ``budget.domains_file: ...``,
    ``budget.site_key_file: ...``) for what stops the start.
    """
    from agentd.config import ConfigError
    from agentd.site.config import budget_start_errors
    from agentd.site.protocol import load_site_key
    from rules.domains import DomainsError, load_domains

    b = cfg.budget
    if not b.enabled:
        return None
    errors = budget_start_errors(cfg)
    domains = key = None
    if b.domains_file is not None:
        try:
            domains = load_domains(b.domains_file)
        except DomainsError as exc:
            errors += [f"budget.domains_file: {line}" for line in exc.errors]
        except OSError as exc:
            errors.append(f"budget.domains_file: cannot read {b.domains_file}: {exc.strerror or exc}")
    if b.site_key_file is not None:
        try:
            key = load_site_key(b.site_key_file)
        except ValueError as exc:
            errors.append(f"budget.site_key_file: {exc}")
    if errors:
        raise ConfigError(errors)
    try:
        return NodeSite(cfg, domains, key, clock)
    except DomainsError as exc:  # the node matches two leaves
        raise ConfigError([f"budget.domains_file: {line}" for line in exc.errors]) from exc
    except ValueError as exc:
        raise ConfigError([str(exc)]) from exc
