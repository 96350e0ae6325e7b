"""Coolant messages -> NodeState and store lines: the daemon side of ``collectors.coolant``.

The MQTT link hands batches of ``(topic, payload)`` here as they arrive. Each message is parsed
(pure, never raising), the readings update the coolant state at once (so rules see them between
ticks), and their encoded lines wait in a bounded list that the next tick appends to the store
in the same transaction as the GPU points: one commit per tick, however many sensors publish.

Bad messages are counted by reason and logged with their topic, rate-limited per reason (a
broken bridge sending 1,000 bad messages a second must not flood journald): the first of each
reason is logged at once, then at most one line per reason every ``LOG_EVERY_S`` carrying the
number suppressed in between.

Each loop's health as this node sees it (how many of the sensors it depends on are degraded:
stale, quality != 1, a leak detector Unavailable) is not in the readings, so ``loop_lines``
writes it as the ``coolant_loop`` measurement at most every ``LOOP_STATUS_EVERY_S``: a board
shows a node going blind on a loop, and why, without the node's logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from agentd.lineproto import Point, encode
from agentd.points import FieldValue, coolant_point
from collectors.coolant import CoolantParser, CoolantState, LoopView, Rejection

if TYPE_CHECKING:
    from agentd.clock import Clock
    from agentd.config import AgentConfig

log = structlog.get_logger("agentd.coolant")

LOG_EVERY_S = 10.0
LOOP_STATUS_EVERY_S = 1.0  # coolant_loop points: at most this often (one per loop)
_STATUSES = ("stale", "bad_quality", "unavailable")  # collectors.coolant_state.SensorStatus, but "ok"


def coolant_loop_point(host: str, site: str, view: LoopView, ts_ns: int) -> Point:
    """The ``coolant_loop`` measurement: one loop as this node's rules see it. Tags ``host``,
    ``site`` (the node's), ``loop``; fields ``degraded_sensors`` (sensors the node depends on that
    are degraded) and its split ``stale_sensors`` / ``bad_quality_sensors`` /
    ``unavailable_sensors``, ``series`` (site/loop/unit/point series seen) and
    ``degraded_fields`` (the degraded fields, comma-separated and sorted; empty when none)."""
    counts = dict.fromkeys(_STATUSES, 0)
    degraded = view.degraded_sensors
    for sensor in degraded:
        counts[sensor.status] = counts.get(sensor.status, 0) + 1
    fields: dict[str, FieldValue] = {"degraded_sensors": len(degraded)}
    fields |= {f"{status}_sensors": counts[status] for status in _STATUSES}
    fields |= {"series": view.series, "degraded_fields": ",".join(sorted(view.degraded_fields))}
    return Point("coolant_loop", {"host": host, "site": site, "loop": view.loop}, fields, ts_ns)


class CoolantIngest:
    """Parser + state + pending store lines + counters, for one daemon."""

    def __init__(self, cfg: AgentConfig, clock: Clock, state: CoolantState | None = None) -> None:
        c = cfg.coolant
        self.clock = clock
        self.host = cfg.node_name
        self.site = cfg.site
        self._loop_status_at: float | None = None
        self.parser = CoolantParser([s.to_subscription() for s in c.subscriptions], default_site=cfg.site,
                                    max_future_s=c.seconds("max_future"), max_age_s=c.seconds("max_age"))
        # A sensor silent for longer than max_age is forgotten: a reading that old would be
        # refused as ts_past anyway (collectors.coolant_state says which sensors count).
        self.state = state if state is not None else CoolantState(
            stale_floor_s=c.seconds("stale_floor"), stale_initial_s=c.seconds("stale_initial"),
            max_sensors=c.max_sensors, expire_after_s=c.seconds("max_age"))
        self.max_pending = c.max_pending
        self.msgs = 0  # messages received
        self.readings = 0  # readings accepted (into the state and the store)
        self.bad: dict[str, int] = {}  # rejections by reason
        self.pending_dropped = 0
        self._pending: list[tuple[int, str]] = []
        self._log_next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def bad_msgs(self) -> int:
        return sum(self.bad.values())

    def handle(self, topic: str, payload: bytes) -> None:
        """One message (see ``handle_batch``)."""
        self.handle_batch(((topic, payload),))

    def handle_batch(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Parse, update the state, queue the store lines. Never raises for any payload."""
        clock = self.clock
        now_mono = clock.monotonic()
        now_ns = clock.wall_ns()
        parse = self.parser.parse
        update = self.state.update
        pending = self._pending
        for topic, payload in messages:
            self.msgs += 1
            readings, rejections = parse(topic, payload, now_ns)
            for rej in rejections:
                self.reject(rej, now_mono)
            for reading in readings:
                extra = update(reading, now_mono, now_ns)
                if extra is None:
                    self.reject(Rejection("too_many_sensors", topic, f"the coolant state holds "
                                          f"{self.state.max_sensors} sensors already (coolant.max_sensors), all "
                                          "of established units; raise coolant.max_sensors, or is a topic level "
                                          "that should be fixed carrying garbage?"), now_mono)
                    continue
                self.readings += 1
                ts_ns = reading.ts_ns if reading.ts_ns is not None else now_ns
                if len(pending) >= self.max_pending:
                    self.pending_dropped += 1
                    continue
                line = encode(coolant_point(reading, ts_ns, extra))
                if line is not None:
                    pending.append((ts_ns, line))

    def reject(self, rej: Rejection, now_mono: float) -> None:
        reason = rej.reason
        self.bad[reason] = self.bad.get(reason, 0) + 1
        if now_mono >= self._log_next.get(reason, float("-inf")):
            self._log_next[reason] = now_mono + LOG_EVERY_S
            suppressed = self._suppressed.pop(reason, 0)
            log.warning("coolant_message_dropped", reason=reason, topic=rej.topic[:200], detail=rej.detail,
                        suppressed_since_last=suppressed)
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1

    def take_lines(self) -> list[tuple[int, str]]:
        """The encoded readings since the last call (the tick appends them to the store)."""
        lines, self._pending = self._pending, []
        return lines

    def loop_lines(self, ts_ns: int) -> list[tuple[int, str]]:
        """One ``coolant_loop`` point per loop seen, when ``LOOP_STATUS_EVERY_S`` has passed since
        the last ones (else none); the daemon's tick stores them with its other lines."""
        now = self.clock.monotonic()
        if self._loop_status_at is not None and now - self._loop_status_at < LOOP_STATUS_EVERY_S:
            return []
        self._loop_status_at = now
        out = []
        for view in self.state.loops(now).values():
            line = encode(coolant_loop_point(self.host, self.site, view, ts_ns))
            if line is not None:
                out.append((ts_ns, line))
        return out

    def agent_fields(self) -> dict[str, int]:
        """Counters for the ``agent`` point: totals, the sensor table (size, sensors forgotten after
        long silence, probationary ones evicted for room) and one ``coolant_bad_<reason>`` per reason seen."""
        state = self.state
        out = {"coolant_msgs": self.msgs, "coolant_readings": self.readings,
               "coolant_bad_msgs": self.bad_msgs, "coolant_pending_dropped": self.pending_dropped,
               "coolant_sensors": len(state), "coolant_sensors_expired": state.expired,
               "coolant_sensors_evicted": state.evicted}
        for reason, n in self.bad.items():
            out[f"coolant_bad_{reason}"] = n
        return out
