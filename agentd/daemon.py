"""The tick: one clock drives the node (DESIGN.md section 2).

Every ``interval`` the GPU backend is sampled off the event loop (NVML calls block and can hang),
the readings go into the node state and, in the same tick, into the local store; the forwarder
ships the store to InfluxDB on its own task. Coolant readings arrive over MQTT on their own task
(``agentd.mqtt``), update ``NodeState.coolant`` as they come, and wait for the next tick's store
append, so one commit per tick holds everything; a lost broker never delays a tick. The rules
run in the tick on what it read, and the actuator writes limits on the NVML thread. With
``budget.enabled`` the node's site logic (``agentd.site.node``) runs in the same tick: its
budget composes with the rule ceilings, its power report goes out on the MQTT link and its
``node_power`` point into the store; leases arrive on the link between ticks. The systemd
watchdog is fed only after a tick that read the GPUs, so a wedged daemon is restarted rather
than trusted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agentd import sdnotify
from agentd.clock import Clock, SystemClock
from agentd.config import AgentConfig, config_source
from agentd.actuator import Actuator
from agentd.api.events import StampedEvent
from agentd.api.runtime import ApiRuntime
from agentd.control import ControlStep, Controller, coolant_signals
from agentd.coolant_ingest import CoolantIngest
from agentd.gpu_info import GpuInfoWriter
from agentd.health import HealthMonitor
from agentd.job_ledger import JobTracker
from agentd.lineproto import encode
from agentd.points import FieldValue, agent_point, gpu_point, throttle_event_point
from agentd.log import setup_logging
from agentd.reload import ReloadError, prepare
from agentd.site.node import REPORT_QOS, NodeSite, NodeSiteStep, make_node_site
from agentd.store import STORE_FILE, Store, StoreError
from agentd.worker import SerialWorker
from collectors.base import BackendError, GpuBackend, GpuInfo, GpuSample
from collectors.coolant import CoolantState
from collectors.jobs import JobRef
from rules.actions import NodeCap
from rules.model import RuleLoadError, RuleSet

log = structlog.get_logger("agentd")

# Store deletes one tick may make (retention + size bound; ~2 us a row, so ~2-3 ms at most),
# raised to twice the tick's own lines so the store converges whatever the ingest.
BOUNDS_ROWS_PER_TICK = 1000
FLUSH_ON_STOP_S = 5.0
MQTT_STOP_S = 3.0  # bound on saying "offline" and disconnecting at shutdown
RECENT_EVENTS = 1000


@dataclass(slots=True)
class NodeState:
    """The latest reading of every GPU and coolant sensor, as the rules and the API see the node.

    ``coolant`` judges freshness on the daemon's monotonic clock: ask it with
    ``clock.monotonic()`` (``state.coolant.loop("tcs", now).supply_temp_c``, ``.degraded``).
    """

    gpus: dict[int, GpuSample] = field(default_factory=dict)
    infos: dict[int, GpuInfo] = field(default_factory=dict)
    coolant: CoolantState = field(default_factory=CoolantState)


@dataclass(slots=True)
class TickStats:
    ticks: int = 0
    ticks_missed: int = 0
    nvml_errors: int = 0
    store_errors: int = 0
    rule_errors: int = 0  # rule evaluations that raised (each rule is isolated; see rules.engine)
    tick_s: float = 0.0
    tick_lag_s: float = 0.0


def make_backend(cfg: AgentConfig) -> GpuBackend:
    """The GPU backend named by ``backend`` in the config."""
    if cfg.backend == "sim":
        from collectors.sim import SimBackend

        return SimBackend(gpus=cfg.sim.gpus, seed=cfg.sim.seed, profile=cfg.sim.profile,
                          coolant_supply_c=cfg.sim.coolant_supply_c)
    from collectors.nvml import NvmlBackend

    return NvmlBackend()


def make_mqtt_link(cfg: AgentConfig, ingest: CoolantIngest, site: NodeSite | None = None, clock: Clock | None = None):
    """The MQTT link (subscribed to the coolant inputs, and to the node's leases when ``site``
    is given), or None when ``mqtt.host`` is unset."""
    if not cfg.mqtt.host:
        if cfg.coolant.subscriptions:
            log.warning("coolant_without_mqtt", subscriptions=len(cfg.coolant.subscriptions),
                        hint="coolant.subscriptions are configured but mqtt.host is not; set mqtt.host")
        return None
    from agentd.mqtt import MqttLink, Route, status_topic

    routes = []
    if site is not None:
        wall = (clock or SystemClock()).wall_ns

        def on_leases(messages: list[tuple[str, bytes]]) -> None:
            site.on_leases(messages, wall() / 1e9)

        routes.append(Route(*site.subscription(), on_leases))
    return MqttLink(cfg.mqtt, client_id=cfg.mqtt_client_id,
                    status_topic=status_topic(cfg.site, cfg.node_name),
                    subscriptions=[(s.topic, s.qos) for s in cfg.coolant.subscriptions],
                    handler=ingest.handle_batch, routes=routes)


def _checked_rules(cfg: AgentConfig, source: str | None) -> RuleSet:
    """The packs and site rule files, each directory's state said once at the default level."""
    from agentd.config import config_source
    from agentd.rule_files import check_rules, rule_counts

    checked = check_rules(cfg, source or config_source(None))
    for line in checked.files.warnings:
        log.warning("rule_dir_missing", detail=line, hint="fix rules.dirs; the other rules still load")
    for line in checked.files.infos:
        log.info("rule_dir_note", detail=line)
    if checked.errors or checked.rule_set is None:
        raise RuleLoadError(checked.errors)
    log.info("rules_loaded", rules=len(checked.rule_set.rules), files=rule_counts(checked.rule_set))
    return checked.rule_set


def make_controller(cfg: AgentConfig, *, coolant_fed: bool, source: str | None = None) -> Controller | None:
    """The rules controller, or None when ``rules.enabled`` is false (and no budget needs the
    composition and ramp: with ``budget.enabled`` it runs with no rules).

    Coolant-scope rules need coolant inputs: on a node with none, an absent supply temperature
    would read as "unknown" for ever and fail-safe rules would cap the node for no reason, so
    those rules are left out (and that is logged).
    """
    if not cfg.rules.enabled and not cfg.budget.enabled:
        return None
    rule_set = _checked_rules(cfg, source) if cfg.rules.enabled else RuleSet()
    if not coolant_fed:
        dropped = [r.name for r in rule_set.rules if r.scope == "coolant"]
        rule_set.rules = [r for r in rule_set.rules if r.scope != "coolant"]
        if dropped:
            log.info("coolant_rules_off", rules=dropped, hint="no coolant.subscriptions configured")
    return Controller.build(rule_set, cfg.rules.params, rise_w_per_s=cfg.rules.ramp_w_per_s,
                            hold_s=cfg.rules.hold_s, seed=cfg.node_name, interval_s=cfg.interval)


def open_store(cfg: AgentConfig) -> Store:
    return Store(Path(cfg.state_dir) / STORE_FILE, max_bytes=cfg.store.max_bytes)


class Daemon:
    """One node's agent. ``run`` is the daemon; ``tick`` is one step, callable from tests."""

    def __init__(self, cfg: AgentConfig, backend: GpuBackend, store: Store, *,
                 forwarder: Any | None = None, clock: Clock | None = None,
                 config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path  # what a reload re-reads (None: $AGENTD_CONFIG or the default)
        self.backend = backend
        self.store = store
        self.forwarder = forwarder
        self.clock = clock or SystemClock()
        self.host = cfg.node_name
        self.coolant = CoolantIngest(cfg, self.clock)
        self.state = NodeState(coolant=self.coolant.state)
        self.stats = TickStats()
        self.site = make_node_site(cfg, self.clock)  # site power caps; None unless budget.enabled
        self.last_site: NodeSiteStep | None = None
        # GPU processes -> jobs -> priority classes (for the budget split) and per-job energy.
        self.jobs = JobTracker(cfg.jobs, host=self.host, monotonic=self.clock.monotonic)
        self.gpu_info = GpuInfoWriter(self.host)  # device thresholds and health, at start and slowly
        self.health = HealthMonitor(self.host)  # GPU health (Xid, ECC, remap): gpu_health / gpu_event
        self.job_classes: Mapping[int, str] | None = None  # set every tick from self.jobs
        self.jobs_by_gpu: Mapping[int, tuple[JobRef, ...]] = {}  # likewise: the jobs on each GPU
        self._squeue = SerialWorker("squeue")  # squeue --json runs here, never on the loop
        self._site_error: str | None = None
        self.mqtt = make_mqtt_link(cfg, self.coolant, self.site, self.clock)
        self.controller = make_controller(cfg, coolant_fed=bool(cfg.coolant.subscriptions),
                                          source=config_source(config_path))
        self.actuator = Actuator(backend, Path(cfg.state_dir), dry_run=cfg.dry_run,
                                 monotonic=self.clock.monotonic, wall=lambda: self.clock.wall_ns() / 1e9)
        self.last_step: ControlStep | None = None
        # Recent rule transitions, newest last, with the tick's wall time, for the API (GET
        # /v1/events?since=) and the demo.
        self.recent_events: deque[StampedEvent] = deque(maxlen=RECENT_EVENTS)
        # One worker: NVML calls are serialised, a hung call blocks only this thread, and it
        # never keeps the process from exiting (agentd.worker).
        self._nvml = SerialWorker("nvml")
        self._rule_errors: dict[str, str] = {}  # unhealthy rule -> the error last logged
        self._inflight: asyncio.Future[Any] | None = None
        self._ready_sent = False
        self._status_sent: str | None = None
        self._reload_requested = False
        self.hurry = asyncio.Event()  # a second SIGTERM: cut the flush short
        self._mqtt_stop = asyncio.Event()
        self._mqtt_task: asyncio.Task | None = None
        # Retention only applies when the store is the embedded database, not an outage buffer.
        self._retention_s = None if cfg.influx.url else cfg.store.retention_s
        self.api = ApiRuntime(self)  # the throttle API's side: cap leases, the snapshot, the MQTT throttle topic

    async def start(self) -> list[GpuInfo]:
        """Open the backend (off the loop, with the NVML timeout). Raises BackendError."""
        try:
            infos = await self._on_nvml_thread(self.cfg.nvml_timeout * 5, self.backend.open)
        except TimeoutError as exc:
            raise BackendError(f"GPU backend {self.cfg.backend!r} did not initialise within "
                               f"{self.cfg.nvml_timeout * 5:.0f} s (driver hung?)") from exc
        self.state.infos = {i.index: i for i in infos}
        log.info("backend_open", backend=self.cfg.backend, gpus=len(infos),
                 models=sorted({i.model for i in infos}), host=self.host, dry_run=self.cfg.dry_run)
        records = self.actuator.load_originals()
        if not records:
            return infos
        if self.cfg.dry_run:
            await self._report_left_caps(records)
        else:
            # A previous run ended without restoring (crash, kill -9): repair before anything else.
            outcome = await self._restore_limits()
            log.warning("limits_restored_after_unclean_stop", outcome=outcome)
        return infos

    async def _report_left_caps(self, records: dict[str, dict]) -> None:
        """Dry run after an unclean stop: the GPUs may still hold the last run's caps, and a dry
        run writes nothing, so they stay. Say so loudly, GPU by GPU, with the command that helps."""
        try:
            samples = await self._on_nvml_thread(self.cfg.nvml_timeout * 5, self.backend.sample,
                                                 self.clock.wall_ns())
        except Exception:  # the report must not stop the start; the records alone still say it
            samples = []
        by_uuid = {s.uuid: s for s in samples}
        for uuid, record in sorted(records.items()):
            sample = by_uuid.get(uuid)
            log.warning("limits_left_from_last_run", uuid=uuid, gpu=sample.index if sample else None,
                        holds_w=sample.limit_current_w if sample else None, baseline_w=record["limit_w"],
                        file=str(self.actuator.originals_path),
                        hint="dry_run writes nothing, so the last run's caps stay; run `agentd "
                             "restore-limits` to put the baselines back")

    @property
    def nvml_busy(self) -> bool:
        """True while a call on the NVML thread has not returned (hung driver)."""
        return self._inflight is not None and not self._inflight.done()

    async def _on_nvml_thread(self, timeout_s: float, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the one NVML thread; raises TimeoutError (the call keeps running there)."""
        loop = asyncio.get_running_loop()
        inflight = self._inflight = loop.run_in_executor(self._nvml, fn, *args)
        return await asyncio.wait_for(asyncio.shield(inflight), timeout_s)

    async def _restore_limits(self) -> dict[str, str]:
        """Put back the limits the GPUs had before we took them over (bounded by the NVML timeout)."""
        uuids = {i.uuid: i.index for i in self.state.infos.values() if i.uuid}
        if self.nvml_busy:
            log.error("limits_not_restored", reason="an NVML call is hung",
                      hint="run `agentd restore-limits` (ExecStopPost does) once the driver answers")
            return {}
        try:
            return await self._on_nvml_thread(self.cfg.nvml_timeout * 5, self.actuator.restore, uuids)
        except TimeoutError:
            log.error("limits_restore_timeout", hint="NVML hung; run `agentd restore-limits` (ExecStopPost)")
        except Exception as exc:  # the originals stay persisted for restore-limits
            log.error("limits_restore_failed", error=repr(exc), file=str(self.actuator.originals_path),
                      hint="run `agentd restore-limits` once the cause is fixed")
        return {}

    async def _control(self, now: float, samples: dict[int, GpuSample], ts_ns: int,
                       lines: list[tuple[int, str]]) -> None:
        """Rules -> targets -> actuator (on the NVML thread), and the rule transitions as events."""
        controller = self.controller
        assert controller is not None
        node, stale = coolant_signals(self.state.coolant, now)
        baselines = self.actuator.observe(samples)
        caps = self._site_step(samples, baselines, ts_ns, lines)
        site = self.last_site
        try:
            step = controller.step(now, samples, node, stale, baselines, node_caps=caps,
                                   classes_by_gpu=site.classes_by_gpu if site else self.job_classes,
                                   floors_w=site.floors_w if site else None,
                                   demands_w=site.demands_w if site else None,
                                   extra=self.api.lease_ceilings(now, samples))
        except Exception as exc:  # a bug outside the rules (each rule is isolated in the engine)
            self.stats.rule_errors += 1
            log.error("rules_failed", error=repr(exc), hint="limits stay as they are this tick")
            return
        self.last_step = step
        self._note_rule_health(step)
        try:
            writes = self.actuator.plan(step.limits_w, samples, step.sources)
            if writes:  # a steady node makes no trip to the NVML thread
                await self._on_nvml_thread(self.cfg.nvml_timeout, self.actuator.write, writes)
        except TimeoutError:
            self.stats.nvml_errors += 1
            log.error("limit_write_timeout", timeout_s=self.cfg.nvml_timeout, targets_w=step.limits_w,
                      hint="NVML did not return; the writes are retried when it answers")
        except Exception as exc:
            log.error("limit_apply_failed", error=repr(exc), targets_w=step.limits_w)
        engine = controller.engine
        self.recent_events.extend(self.api.stamp(step.evaluation.events, ts_ns))
        controls = self.actuator.controls
        for ev in step.evaluation.events:
            actions = ",".join(a.type for a in engine.rule(ev.rule).actions)
            control = controls.get(ev.gpu) if ev.gpu is not None else None
            (log.warning if ev.to_state == "firing" else log.info)(
                "rule_" + ev.to_state, rule=ev.rule, gpu=ev.gpu, severity=ev.severity, value=ev.value,
                message=ev.message)
            line = encode(throttle_event_point(
                self.host, ts_ns, rule=ev.rule, severity=ev.severity, state=ev.to_state, action=actions,
                gpu=ev.gpu, value=ev.value, limit_w=control.set_w if control else None,
                limit_target_w=control.target_w if control else None, message=ev.message))
            if line is not None:
                lines.append((ts_ns, line))

    def _track_jobs(self, samples: list[GpuSample], ts_ns: int, lines: list[tuple[int, str]]) -> None:
        """Which job holds each GPU (its class feeds the budget split), job_gpu/job_energy points;
        a Slurm class refresh, when due, goes to its own thread and lands by a later tick."""
        try:
            step = self.jobs.step(samples, ts_ns)
        except Exception as exc:  # attribution is advisory: the tick goes on with the last classes
            log.error("job_tracking_failed", error=repr(exc))
            return
        self.job_classes = step.classes_by_gpu
        self.jobs_by_gpu = step.jobs_by_gpu
        lines.extend(step.lines)
        if self.jobs.refresh_due():
            self._squeue.submit(self.jobs.refresh_classes)

    def _site_step(self, samples: dict[int, GpuSample], baselines: Mapping[int, float], ts_ns: int,
                   lines: list[tuple[int, str]]) -> list[NodeCap]:
        """The site budget for this tick (as a node cap), its report published, its point stored.

        Should the site logic itself fail (a bug), the node holds its failsafe budget: a budget
        that silently stopped applying would let the node draw past its share.
        """
        site = self.site
        if site is None:
            return []
        try:
            st = self.last_site = site.step(ts_ns / 1e9, samples, baselines, self.job_classes, ts_ns=ts_ns)
        except Exception as exc:
            if repr(exc) != self._site_error:
                self._site_error = repr(exc)
                log.error("site_step_failed", error=repr(exc), failsafe_w=site.tracker.failsafe_w,
                          hint="holding the failsafe budget until the site step works again")
            self.last_site = None
            return [NodeCap(site.tracker.failsafe_w, "budget")]
        self._site_error = None
        if st.publish is not None and self.mqtt is not None:
            self.mqtt.publish_nowait(*st.publish, qos=REPORT_QOS)
        line = encode(st.point)
        if line is not None:
            lines.append((ts_ns, line))
        return [st.node_cap]

    def _note_rule_health(self, step: ControlStep) -> None:
        """Count rule failures; log a rule going unhealthy (or changing error) and recovering once."""
        errors = step.evaluation.errors
        self.stats.rule_errors += len(errors)
        for rule, error in errors:
            if self._rule_errors.get(rule) != error:
                self._rule_errors[rule] = error
                log.error("rule_failed", rule=rule, error=error,
                          hint="this rule holds its state until it evaluates again; the other rules act")
        if len(self._rule_errors) > len(errors):  # some rule that failed before did not now
            failing = {rule for rule, _ in errors}
            for rule in [r for r in self._rule_errors if r not in failing]:
                del self._rule_errors[rule]
                log.info("rule_recovered", rule=rule)

    async def _sample(self, ts_ns: int) -> list[GpuSample] | None:
        """Read every GPU off the loop; None when the backend is hung or failed this tick."""
        if self.nvml_busy:
            self.stats.nvml_errors += 1
            log.warning("nvml_still_hung", timeout_s=self.cfg.nvml_timeout,
                        hint="a previous NVML call has not returned; skipping this tick's reading")
            return None
        try:
            return await self._on_nvml_thread(self.cfg.nvml_timeout, self.backend.sample, ts_ns)
        except TimeoutError:
            self.stats.nvml_errors += 1
            log.error("nvml_timeout", timeout_s=self.cfg.nvml_timeout,
                      hint="the driver did not answer; check nvidia-smi and the kernel log (Xid errors)")
        except Exception as exc:  # a backend bug must not stop the node's telemetry
            self.stats.nvml_errors += 1
            log.error("sample_failed", error=repr(exc))
        return None

    async def tick(self) -> None:
        """One step: sample, update state, store. Feeds the watchdog when it completes."""
        started = self.clock.monotonic()
        ts_ns = self.clock.wall_ns()
        samples = await self._sample(ts_ns)
        lines: list[tuple[int, str]] = []
        if samples is not None:  # the backend is idle now: its event list is ours to take
            # health judged, events logged and stored, samples annotated before the rules run
            lines.extend(self.health.step(samples, self.backend.drain_events(), self.state.infos, started, ts_ns))
        for sample in samples or ():
            self.state.gpus[sample.index] = sample
            if not sample.healthy:
                self.stats.nvml_errors += 1
        if samples is not None:
            self._track_jobs(samples, ts_ns, lines)
        if samples and self.controller is not None:
            await self._control(started, {s.index: s for s in samples}, ts_ns, lines)
        controls = self.actuator.controls
        for sample in samples or ():
            if sample.healthy:
                control = controls.get(sample.index)
                line = encode(gpu_point(sample, self.host, control.set_w if control else None,
                                        control.target_w if control else None))
                if line is not None:
                    lines.append((sample.ts_ns, line))
        lines.extend(self.gpu_info.lines(self.state.infos, samples, started, ts_ns))
        lines.extend(self.coolant.take_lines())
        lines.extend(self.coolant.loop_lines(ts_ns))
        agent_line = encode(agent_point(self.host, ts_ns, self._agent_fields()))
        if agent_line is not None:
            lines.append((ts_ns, agent_line))
        self._store(lines)
        if self.forwarder is not None:
            self.forwarder.wake()
        try:  # every tick, a bounded step: bounds hold within a tick and never stall it
            self.store.enforce_bounds(ts_ns, self._retention_s,
                                      max_rows=max(BOUNDS_ROWS_PER_TICK, 2 * len(lines)))
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store_bounds_failed", error=str(exc))
        self.stats.ticks += 1
        self.api.after_tick(samples is not None, started, ts_ns)  # the API's snapshot swapped, MQTT throttle topic
        self.stats.tick_s = self.clock.monotonic() - started
        if samples is None:
            return  # no reading this tick: systemd's watchdog is fed only by good ticks
        status = self.status_line()
        if not self._ready_sent:
            self._ready_sent = True
            sdnotify.ready(status)
        sdnotify.watchdog(status if status != self._status_sent else None)
        self._status_sent = status

    def status_line(self) -> str:
        """systemd's one-line STATUS=: what an operator sees in ``systemctl status agentd``."""
        gpus = sum(1 for s in self.state.gpus.values() if s.healthy)
        step = self.last_step
        firing = len(step.evaluation.firing()) if step is not None else 0
        capped = sum(1 for c in self.actuator.controls.values() if c.set_w is not None)
        mode = " (dry run)" if self.cfg.dry_run else ""
        return (f"{gpus}/{len(self.state.gpus)} GPUs, {firing} rules firing, {capped} GPUs capped{mode}, "
                f"store backlog {self.store.backlog()}")

    def _store(self, lines: list[tuple[int, str]]) -> None:
        """Append to the store; a failing disk is counted and logged, and protection goes on."""
        try:
            self.store.append(lines)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store_append_failed", error=str(exc), lost_points=len(lines),
                      hint="free space in state_dir (or lower store.max_bytes); rules keep acting")

    def _agent_fields(self) -> dict[str, FieldValue]:
        fw = self.forwarder
        return {
            "tick_s": round(self.stats.tick_s, 6),
            "tick_lag_s": round(self.stats.tick_lag_s, 6),
            "ticks_missed": self.stats.ticks_missed,
            "store_backlog": self.store.backlog(),
            "store_bytes": self.store.size_bytes(),
            "dropped": self.store.dropped,
            "quarantined": self.store.quarantined_count,
            "write_errors": fw.write_errors if fw is not None else 0,
            "nvml_errors": self.stats.nvml_errors,
            "store_errors": self.stats.store_errors,
            "store_wal_bytes": self.store.wal_bytes(),
            "store_disk_full": self.store.disk_full_events,  # a full disk met: oldest dropped, newest kept
            "store_recoveries": self.store.recoveries,  # damaged store files moved aside since start
            "store_salvaging": self.store.salvaging,
            "limit_write_errors": self.actuator.write_errors,
            "rule_errors": self.stats.rule_errors,
            **self._mqtt_fields(),
            **self.coolant.agent_fields(),
            **self._site_fields(),
            **self.jobs.agent_fields(),
            **self.health.agent_fields(),
            **self.backend.event_stats(),  # the NVML event thread: seen, dropped by its bound, errors
        }

    def _site_fields(self) -> dict[str, FieldValue]:
        if self.site is None:
            return {}
        t = self.site.tracker
        fields: dict[str, FieldValue] = {
            "budget_leases_accepted": t.accepted, "budget_leases_refused": sum(t.refused.values())}
        if self.mqtt is not None:
            fields |= {"budget_reports_sent": self.mqtt.published, "budget_reports_dropped": self.mqtt.publish_dropped}
        return fields

    def _mqtt_fields(self) -> dict[str, bool | int]:
        if self.mqtt is None:
            return {}  # MQTT off: no mqtt_connected=false to alarm on
        return {"mqtt_connected": self.mqtt.connected, "mqtt_dropped": self.mqtt.dropped}

    async def run(self, stop: asyncio.Event, max_ticks: int | None = None) -> None:
        """Tick at a fixed rate until ``stop`` is set (or ``max_ticks``), then shut down cleanly.

        The schedule is fixed-rate (tick k at start + k * interval); when a tick overruns, the
        missed slots are skipped and counted rather than run back to back. A requested reload
        runs between two ticks.
        """
        fw_task = None
        if self.forwarder is not None:
            fw_task = asyncio.create_task(self._forward(stop), name="forwarder")
        self._start_mqtt()
        try:
            next_at = self.clock.monotonic()
            while not stop.is_set() and (max_ticks is None or self.stats.ticks < max_ticks):
                if self._reload_requested:
                    await self.reload()
                interval = self.cfg.interval
                self.stats.tick_lag_s = max(0.0, self.clock.monotonic() - next_at)
                await self.tick()
                next_at += interval
                now = self.clock.monotonic()
                if now > next_at:
                    missed = int((now - next_at) // interval) + 1
                    self.stats.ticks_missed += missed
                    next_at += missed * interval
                    log.warning("ticks_missed", missed=missed, interval_s=interval)
                await self._sleep_or_stop(next_at - now, stop)
        finally:
            sdnotify.stopping()
            try:
                await self.stop_mqtt(self._mqtt_task, self._mqtt_stop)
            finally:
                await self.shutdown(fw_task)

    def _start_mqtt(self) -> None:
        self._mqtt_stop = asyncio.Event()
        self._mqtt_task = None
        if self.mqtt is not None:
            self._mqtt_task = asyncio.create_task(self.mqtt.run(self._mqtt_stop), name="mqtt")

    def request_reload(self) -> None:
        """SIGHUP: reload the configuration and rules at the next tick boundary."""
        self._reload_requested = True

    async def reload(self) -> bool:
        """Re-read config and rules off the loop; swap a valid set in, keep the old on any error.

        Kept across a reload: rule states of unchanged rules, the ramp, baselines, applied
        limits and originals (the actuator is untouched), the store and its backlog, the
        forwarder, and the MQTT connection unless ``mqtt`` changed.
        """
        self._reload_requested = False
        sdnotify.reloading()
        try:
            candidate = await asyncio.to_thread(
                prepare, self.config_path, self.cfg,
                lambda c: make_controller(c, coolant_fed=bool(c.coolant.subscriptions),
                                          source=config_source(self.config_path)))
        except ReloadError as exc:
            for line in exc.errors:
                log.error("reload_rejected", error=line)
            log.error("reload_rejected", errors=len(exc.errors), config=str(self.config_path or "(default)"),
                      hint="the running configuration and rules are kept; fix them (agentd check-config) "
                           "and reload again")
            sdnotify.ready(f"reload rejected ({len(exc.errors)} errors); running the previous configuration")
            return False
        if candidate.needs_restart:
            log.warning("reload_needs_restart", settings=candidate.needs_restart,
                        hint="kept at their running values; restart agentd to apply them")
        kept: list[str] = []
        if candidate.controller is not None and self.controller is not None:
            kept = candidate.controller.adopt(self.controller)
        old, self.cfg, self.controller = self.cfg, candidate.cfg, candidate.controller
        if self.cfg.jobs != old.jobs:
            self.jobs.reconfigure(self.cfg.jobs)
        if self.cfg.log_level != old.log_level:
            setup_logging(self.cfg.log_level)
        if self.cfg.mqtt != old.mqtt:
            await self.stop_mqtt(self._mqtt_task, self._mqtt_stop)
            self.mqtt = make_mqtt_link(self.cfg, self.coolant, self.site, self.clock)
            self._start_mqtt()
        rules = self.controller.engine.rule_set.rules if self.controller is not None else []
        log.info("reloaded", changed=candidate.changed, rules=len(rules), rule_states_kept=len(kept))
        sdnotify.ready(self.status_line())
        return True

    async def _forward(self, stop: asyncio.Event) -> None:
        """The forwarder, restarted if it ever fails: readings wait in the store meanwhile."""
        while not stop.is_set():
            try:
                await self.forwarder.run(stop)  # type: ignore[union-attr]
                return
            except Exception as exc:
                log.error("forwarder_failed", error=repr(exc), hint="restarting in 5 s; nothing is lost")
                await self._sleep_or_stop(5.0, stop)

    async def stop_mqtt(self, task: asyncio.Task | None, stop: asyncio.Event) -> None:
        """Say offline and disconnect, bounded: a hung broker must not hold up the shutdown."""
        if task is not None:
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), MQTT_STOP_S)
            except Exception:  # TimeoutError included
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # Readings that arrived after the last tick still go to the store.
        lines = self.coolant.take_lines()
        if lines:
            self._store(lines)

    async def _sleep_or_stop(self, delay_s: float, stop: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(delay_s))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sleeper, stopper):
            task.cancel()

    async def shutdown(self, fw_task: asyncio.Task | None = None) -> None:
        """Restore the GPUs first (safety before telemetry), then flush what can be shipped
        within a bound, release the driver and close the store; each step runs even if an
        earlier one failed."""
        try:
            if not self.cfg.dry_run and self.actuator.holds_originals:
                log.info("limits_restored", outcome=await self._restore_limits())
        except Exception as exc:
            log.error("limits_restore_failed", error=repr(exc), hint="run `agentd restore-limits`")
        if fw_task is not None:
            fw_task.cancel()
            await asyncio.gather(fw_task, return_exceptions=True)
        if self.forwarder is not None:
            flush = asyncio.ensure_future(self.forwarder.flush(FLUSH_ON_STOP_S))
            hurry = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait({flush, hurry}, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if not flush.done():
                flush.cancel()  # only acked batches leave the store: nothing is lost
            try:
                await flush
            except asyncio.CancelledError:
                log.warning("flush_cut_short", store_backlog=self.store.backlog())
            except Exception as exc:  # what is left stays in the store for the next start
                log.error("flush_failed", error=repr(exc))
            finally:
                await self.forwarder.writer.close()
        if self.nvml_busy:
            log.error("nvml_hung_at_stop", hint="not calling nvmlShutdown while a call is stuck")
        else:
            try:
                self.backend.close()
            except Exception as exc:  # closing must not hide the reason we are stopping
                log.warning("backend_close_failed", error=repr(exc))
        self._nvml.shutdown(wait=False, cancel_futures=True)
        self._squeue.shutdown(wait=False, cancel_futures=True)
        backlog = self.store.backlog()
        self.store.close()
        log.info("stopped", ticks=self.stats.ticks, store_backlog=backlog)
