"""The daemon's side of the API: what the tick calls, in a line each.

* ``stamp(events, ts_ns)``: the tick's rule transitions, stamped with its wall time, for
  ``Daemon.recent_events`` (and, at the end of the tick, the events topic);
* ``lease_ceilings(now, samples)``: the live cap leases as ceilings for ``Controller.step``;
* ``after_tick(read_ok, started, ts_ns)``: copies what the API shows out of the daemon's live
  objects into a ``TickInput`` (plain values), builds the snapshot (``agentd.api.snapshot``),
  swaps it in (one reference assignment: a request sees the old one or the new one) and hands
  the throttle body to the MQTT publisher.

It also holds what the HTTP handlers change: the lease table and, through the daemon, the job
tracker's hints. A failure here is logged (once per distinct error) and never stops the tick:
the previous snapshot stays, and its ages grow until ``/readyz`` says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agentd.api.events import StampedEvent, Stamper
from agentd.api.leases import CAPS_FILE, LeaseTable
from agentd.api.metrics import MetricsInput, MetricsRenderer, metrics_input_from_daemon
from agentd.api.publish import ThrottlePublisher
from agentd.api.rule_facts import FactsCache, RuleFacts
from agentd.api.snapshot import (
    MAX_SENSORS_LISTED,
    BudgetView,
    ControlView,
    Firing,
    JobView,
    RuleHealthView,
    Snapshot,
    TickInput,
    build_snapshot,
)
from collectors.base import GpuSample
from collectors.jobs import JobRef
from rules.actions import Ceiling, NodeCap
from rules.engine import FIRING, PENDING, Event

if TYPE_CHECKING:
    from agentd.daemon import Daemon

log = structlog.get_logger("agentd.api")


def stale_after_s(interval_s: float, nvml_timeout_s: float) -> float:
    """GPU telemetry older than this is stale (``/readyz`` says not ready): three ticks, and never
    less than one hung NVML call plus a tick."""
    return max(3.0 * interval_s, nvml_timeout_s + interval_s)


class ApiRuntime:
    """See the module docstring. Built by the daemon once its parts exist (``Daemon.__init__``)."""

    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.cfg
        self.daemon = daemon
        self.clock = daemon.clock
        self.node = cfg.node_name
        self.interval_s = cfg.interval
        self.stale_after_s = stale_after_s(cfg.interval, cfg.nvml_timeout)
        self.forward_url = cfg.influx.url or None
        self.expires_after_s = cfg.api.publish_every_s + 3.0 * cfg.interval
        self.leases = LeaseTable(Path(cfg.state_dir) / CAPS_FILE)
        self.leases.load(self.clock.monotonic(), self.clock.wall_ns())
        self.lease_lock = asyncio.Lock()  # one lease change (prepare, write, commit) at a time
        self.snapshot: Snapshot | None = None
        self.stamper = Stamper()
        self.publisher = ThrottlePublisher(cfg.site, cfg.node_name, cfg.api.publish_every_s)
        self._facts = FactsCache()
        self.metrics: MetricsInput | None = None  # GET /metrics' and /v1/agent's view of the last tick
        self.metrics_renderer = MetricsRenderer(dcgm_compat=cfg.api.metrics_dcgm_compat)
        self._new_events: list[StampedEvent] = []
        self._last_read_mono: float | None = None
        self._error: str | None = None

    # -- what the tick calls -----------------------------------------------------------------

    def stamp(self, events: Iterable[Event], ts_ns: int) -> list[StampedEvent]:
        """The events of this tick with its wall time (kept to publish at the end of the tick)."""
        stamped = self.stamper.stamp(events, ts_ns)
        self._new_events += stamped
        return stamped

    def gpus_of_job(self, job_id: str) -> list[int]:
        """The GPUs whose processes belong to ``job_id`` at the last tick."""
        return [g for g, refs in self.daemon.jobs_by_gpu.items() if any(r.id == job_id for r in refs)]

    def lease_ceilings(self, now_mono: float, samples: Mapping[int, GpuSample]) -> list[Ceiling]:
        """The live cap leases as per-GPU ceilings for this tick's composition."""
        return self.leases.ceilings(now_mono, samples, self.gpus_of_job)

    def after_tick(self, read_ok: bool, started: float, ts_ns: int) -> None:
        """Build and swap in this tick's snapshot; publish it (never raises)."""
        events, self._new_events = self._new_events, []
        try:
            snap = build_snapshot(self._gather(read_ok, started, ts_ns))
        except Exception as exc:  # the API must never stop the tick; the old snapshot stays
            self._log_once("api_snapshot_failed", exc)
            return
        self.snapshot = snap
        try:
            self.metrics = metrics_input_from_daemon(self.daemon, snap.throttle.level, snap.throttle.state,
                                                     previous=self.metrics)
        except Exception as exc:  # /metrics and /v1/agent keep the last tick's view
            self._log_once("api_metrics_failed", exc)
        link = self.daemon.mqtt
        if link is None:
            return
        try:
            self.publisher.step(link, snap.throttle, lambda: snap.throttle_bytes(self.clock.wall_ns()), started,
                                events)
        except Exception as exc:
            self._log_once("api_publish_failed", exc)
            return
        self._error = None

    def _log_once(self, event: str, exc: Exception) -> None:
        text = f"{event}: {exc!r}"
        if text != self._error:
            self._error = text
            log.error(event, error=repr(exc), hint="the API serves the last good snapshot; please report this")

    # -- what the handlers call --------------------------------------------------------------

    def set_job_hint(self, job_id: str, cls: str | None) -> None:
        """The class of ``job_id`` from the API (None clears it); ValueError when refused."""
        self.daemon.jobs.set_hint(job_id, cls)

    def job_hint(self, job_id: str) -> str | None:
        return self.daemon.jobs.classes.hints().get(job_id)

    def cap_refusal(self) -> str | None:
        """Why a cap lease could not be enforced on this node now (None: it can)."""
        if self.daemon.controller is None:
            return ("this node runs without the limit controller (rules.enabled = false and budget.enabled = "
                    "false), so nothing would apply a cap lease; enable rules (rules.enabled = true) and restart")
        return None

    # -- gathering ---------------------------------------------------------------------------

    def _gather(self, read_ok: bool, started: float, ts_ns: int) -> TickInput:
        d = self.daemon
        cfg = d.cfg
        if read_ok:
            self._last_read_mono = started
        controls = {i: ControlView(c.baseline_w, c.target_w, c.set_w, c.source, c.externally_limited,
                                   c.observe_only, c.error) for i, c in d.actuator.controls.items()}
        instances: tuple[Firing, ...] = ()
        advice: dict[str, tuple[str, ...]] = {}
        rule_caps: tuple[NodeCap, ...] = ()
        facts_list: tuple[RuleFacts, ...] = ()
        health: dict[str, RuleHealthView] = {}
        controller = d.controller
        if controller is not None:
            engine = controller.engine
            facts = self._facts.of(engine)
            instances = tuple(Firing(i.rule, i.gpu, i.state, i.since, i.value, facts[i.rule])
                              for i in engine.states.values()
                              if (i.state is FIRING or i.state is PENDING) and i.rule in facts)
            step = d.last_step
            if step is not None:
                advice = {k: tuple(v) for k, v in step.evaluation.advice.items()}
                rule_caps = tuple(step.evaluation.node_caps)
            facts_list = tuple(facts.values())
            health = {n: RuleHealthView(h.healthy, h.errors, h.last_error) for n, h in engine.health.items()}
        budget = None
        if d.site is not None:
            st = d.last_site
            if st is not None:
                budget = BudgetView(st.budget.budget_w, st.budget.source, st.level, st.node_cap.watts,
                                    st.budget.lease_age_s, st.budget.why)
            else:  # the site step failed: the daemon holds the failsafe
                w = d.site.tracker.failsafe_w
                budget = BudgetView(w, "failsafe", "failsafe", w, None, "site step failed")
        coolant = d.state.coolant
        loops = coolant.loops(started)
        total = len(coolant)
        sensors = tuple(coolant.sensors(started)) if total <= MAX_SENSORS_LISTED else ()
        return TickInput(
            site=cfg.site, node=self.node, interval_s=cfg.interval, dry_run=cfg.dry_run,
            expires_after_s=self.expires_after_s, wall_ns=ts_ns, mono=started, read_ok=read_ok,
            last_read_mono=self._last_read_mono, ticks=d.stats.ticks, samples=dict(d.state.gpus),
            controls=controls, instances=instances, advice=advice, rule_caps=rule_caps, budget=budget,
            coolant_fed=bool(cfg.coolant.subscriptions), loops=loops, sensors=sensors, sensors_total=total,
            jobs=self._jobs(d.jobs_by_gpu), leases=tuple(self.leases.live(started)), rules=facts_list,
            rule_health=health, events=tuple(d.recent_events))

    def _jobs(self, jobs_by_gpu: Mapping[int, tuple[JobRef, ...]]) -> tuple[JobView, ...]:
        if not jobs_by_gpu:
            return ()
        by_job: dict[tuple[str, str], tuple[JobRef, set[int]]] = {}
        for gpu, refs in jobs_by_gpu.items():
            for ref in refs:
                by_job.setdefault(ref.key, (ref, set()))[1].add(gpu)
        class_of = self.daemon.jobs.classes.class_of
        return tuple(JobView(ref.kind, ref.id, tuple(sorted(gpus)), class_of(ref))
                     for _, (ref, gpus) in sorted(by_job.items()))
