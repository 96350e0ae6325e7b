"""The daemon's side of GPU health: judge, log, store (one call from the tick).

``HealthMonitor.step`` takes the tick's samples and the backend's events, runs the pure tracker
(``collectors.gpu_health``: ok / warn / fail with reasons, the samples annotated with ``health``,
``xid_last`` and the last known counters before the rules see them), and returns the line-protocol
lines of the tick:

* ``gpu_event``: each event (backend or tracker) as a point; the events of one GPU, kind, Xid
  and action drained in one tick are one point with their ``count``, so a broken GPU raising
  thousands of events a second adds a point a tick, not thousands;
* ``gpu_health``: one point per GPU when its state or reasons changed, when a counter it reports
  changed, and otherwise every ``every_s`` (60 s, ``agentd.gpu_info``'s cadence: a board's
  window always holds a few). Unchanged counters are not rewritten every read: they would add
  rows that say nothing.

Events are logged as a fixed event name (``gpu_xid``, ``gpu_lost``, ``gpu_ecc_dbe``,
``gpu_health_changed`` ...) at error (critical) or warning, one line per group of a tick (its
``count`` when more than one), rate-limited per GPU, kind, Xid and severity: the first at once,
then one line per ``log_every_s`` carrying ``suppressed=N`` (the lines held back since). A flood
logs a few lines, the events not logged are counted (``agent_fields``), and a flood of one Xid
never hides the first line of another. Nothing here grows with the number of events: ``recent``
is a bounded deque (for the demo and the API).

Should the tracker fail (a bug), the tick goes on: the events are still logged and stored,
unjudged (severity ``unknown``), and ``health`` stays unknown, so the gpu_health rules hold.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd.gpu_info import EVERY_S, Cadence
from agentd.lineproto import encode
from agentd.points import HEALTH_COUNTER_FIELDS, FieldValue, gpu_event_point, gpu_health_point
from collectors.log_limit import RateLimitedLog
from collectors.base import BackendEvent, GpuInfo, GpuSample
from collectors.gpu_health import FAIL, WARN, HealthTracker, Judged

log = structlog.get_logger("agentd.health")

LOG_EVERY_S = 10.0
_counters_of = operator.attrgetter(*HEALTH_COUNTER_FIELDS, "nvlink")  # what a gpu_health point carries
RECENT_EVENTS = 200

# The log line of each event kind (a fixed snake_case name); other kinds log as gpu_event.
_LOG_NAMES = {"xid": "gpu_xid", "ecc_dbe": "gpu_ecc_dbe", "ecc_sbe": "gpu_ecc_sbe",
              "recovery_action": "gpu_recovery_action", "gpu_lost": "gpu_lost", "gpu_recovered": "gpu_recovered",
              "counter_reset": "gpu_counter_reset", "health": "gpu_health_changed"}
# What an operator does about an action (the catalogue's or the driver's).
_HINTS = {"reset_gpu": "drain the GPU's work, then reset it (nvidia-smi -r -i INDEX); reboot if it recurs",
          "drain_node": "drain the node and reboot it; have the board checked if it recurs",
          "reboot": "drain the node and reboot it",
          "drain_p2p": "drain peer-to-peer (NVLink) work from the GPU",
          "drain_and_reset": "drain the node's work, then reset the GPU (nvidia-smi -r -i INDEX)"}


def _error(event: str, **kw: object) -> None:
    log.error(event, **kw)


def _warning(event: str, **kw: object) -> None:
    log.warning(event, **kw)  # looked up only for a line that is written: a flood costs no logger


@dataclass(slots=True)
class HealthMonitor:
    """The tracker, its log lines and its points (module docstring). ``step`` is the tick's one
    call; ``agent_fields`` goes into the ``agent`` point."""

    host: str
    tracker: HealthTracker = field(default_factory=HealthTracker)
    every_s: float = EVERY_S
    log_every_s: float = LOG_EVERY_S
    events_seen: int = 0  # backend events taken since start
    log_suppressed: int = 0  # events whose log line the rate limit held back, since start
    errors: int = 0  # steps that raised (a bug; logged once per distinct error)
    recent: deque[Judged] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    _cadence: Cadence = field(init=False)
    _limiter: RateLimitedLog = field(init=False)
    _written: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # counters last written
    _last_error: str | None = None

    def __post_init__(self) -> None:
        self._cadence = Cadence(self.every_s)
        self._limiter = RateLimitedLog(self.log_every_s)

    def step(self, samples: Iterable[GpuSample], events: Iterable[BackendEvent], infos: Mapping[int, GpuInfo],
             now: float, ts_ns: int) -> list[tuple[int, str]]:
        """Judge, log, and return this tick's ``gpu_event`` and ``gpu_health`` lines. ``now`` is
        the monotonic time, ``ts_ns`` the tick's wall clock; ``infos`` name a GPU that sent an
        event but no sample."""
        samples = list(samples)
        events = list(events)
        self.events_seen += len(events)
        try:
            return self._step(samples, events, infos, now, ts_ns)
        except Exception as exc:  # a bug here must not stop the tick: the rules hold (health unknown)
            self.errors += 1
            if repr(exc) != self._last_error:
                self._last_error = repr(exc)
                log.error("gpu_health_failed", error=repr(exc), events=len(events),
                          hint="GPU health is unknown this tick (the gpu_health rules hold their state); its "
                               "events are stored unjudged; please report this with the log line")
        unjudged = [Judged(e.ts_ns, e.gpu_index, e.kind, e.message, "unknown", e.xid, e.action,
                           "driver" if e.action is not None else None) for e in events]
        ids = {i: (info.uuid, info.model) for i, info in infos.items()}
        ids.update((s.index, (s.uuid, s.model)) for s in samples)
        return self._events(unjudged, now, ids)

    def _step(self, samples: list[GpuSample], events: list[BackendEvent], infos: Mapping[int, GpuInfo],
              now: float, ts_ns: int) -> list[tuple[int, str]]:
        step = self.tracker.update(samples, events, now, ts_ns)
        self._last_error = None
        ids = {i: (info.uuid, info.model) for i, info in infos.items()}
        ids.update((s.index, (s.uuid, s.model)) for s in samples)
        self.recent.extend(step.events)
        lines = self._events(step.events, now, ids)
        due = self._cadence.due(now)
        states = self.tracker.gpus
        for s in samples:
            g = states[s.index]
            counters = None
            if s.index in step.counters_read:  # compared only when read (most ticks read none)
                counters = _counters_of(s)
                if counters == self._written.get(s.index):
                    counters = None
            if not (due or counters is not None or s.index in step.changed):
                continue
            if counters is not None:
                self._written[s.index] = counters
            line = encode(gpu_health_point(s, self.host, state=g.state, level=g.level, reasons="; ".join(g.reasons)))
            if line is not None:
                lines.append((s.ts_ns, line))
        return lines

    def _events(self, events: list[Judged], now: float, ids: Mapping[int, tuple[str, str]]) -> list[tuple[int, str]]:
        """The tick's events in groups of one GPU, kind, Xid, action and severity: one log line
        (rate-limited) and one ``gpu_event`` point each, with the group's ``count``; timestamps
        kept distinct within a series (a point on the same series and time overwrites another)."""
        groups: dict[tuple[int, str, int | None, str | None, str], list] = {}
        for ev in events:
            group = groups.get((ev.gpu, ev.kind, ev.xid, ev.action, ev.severity))
            if group is None:
                groups[(ev.gpu, ev.kind, ev.xid, ev.action, ev.severity)] = [ev, 1]
            else:
                group[1] += 1
        used: set[tuple[int, str, int]] = set()
        out: list[tuple[int, str]] = []
        for (gpu, kind, _, _, _), (ev, n) in groups.items():
            uuid, model = ids.get(gpu, ("", ""))
            self._log(ev, n, now, uuid)
            ts = ev.ts_ns
            while (gpu, kind, ts) in used:
                ts += 1
            used.add((gpu, kind, ts))
            line = encode(gpu_event_point(self.host, ts, gpu=gpu, uuid=uuid, model=model, kind=kind,
                                          message=ev.message, severity=ev.severity, xid=ev.xid, action=ev.action,
                                          action_source=ev.action_source, count=n))
            if line is not None:
                out.append((ts, line))
        return out

    def _log(self, ev: Judged, count: int, now: float, uuid: str) -> None:
        """One group's line: per GPU, kind, Xid and severity at most one per ``log_every_s`` (a
        flood of Xid 13 never holds back the first Xid 79); ``count`` the events it stands for,
        ``suppressed`` (added by the limiter) the lines held back since the last one."""
        kw: dict[str, object] = {"gpu": ev.gpu, "uuid": uuid or None, "severity": ev.severity,
                                 "message": ev.message}
        if count > 1:
            kw["count"] = count
        if ev.xid is not None:
            kw["xid"] = ev.xid
        if ev.action is not None:
            kw["action"], kw["action_source"] = ev.action, ev.action_source
            hint = _HINTS.get(ev.action)
            if hint:
                kw["hint"] = hint.replace("INDEX", str(ev.gpu))
        fn = _error if ev.severity == "critical" else _warning
        key = f"{ev.gpu}:{ev.kind}:{ev.xid}:{ev.severity}"
        if not self._limiter.emit(key, now, fn, _LOG_NAMES.get(ev.kind, "gpu_event"), kind=ev.kind, **kw):
            self.log_suppressed += count

    def agent_fields(self) -> dict[str, FieldValue]:
        """For the ``agent`` point: events taken, log lines held back and steps that failed
        (cumulative), and the GPUs failed and warned now."""
        states = [g.state for g in self.tracker.gpus.values()]
        return {"gpu_events": self.events_seen, "gpu_events_log_suppressed": self.log_suppressed,
                "gpus_failed": states.count(FAIL), "gpus_warned": states.count(WARN), "gpu_health_errors": self.errors}
