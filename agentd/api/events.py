"""Rule transitions with the wall-clock time they were recorded at, for ``GET /v1/events``.

The engine's ``Event`` carries only its monotonic ``at`` (rules stay pure and clock-agnostic).
Where the daemon records a tick's events it stamps them with that tick's wall time and a
sequence number (``Stamper``): a ``StampedEvent`` is still an ``Event`` (the demo and the tests
read it as one), and it carries its own JSON, serialised once when recorded (a transition is
rare; a request for 1000 events then joins bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agentd.api.models import EventBody, iso_ms
from rules.engine import Event, format_value


@dataclass(slots=True, frozen=True)
class StampedEvent(Event):
    """An engine event with the tick's wall time (``ts_ns``), a sequence number and its JSON."""

    ts_ns: int
    seq: int
    json: bytes


class Stamper:
    """Numbers and stamps the events of each tick (one per daemon: ``seq`` counts from 1)."""

    def __init__(self) -> None:
        self.seq = 0

    def stamp(self, events: Iterable[Event], ts_ns: int) -> list[StampedEvent]:
        out = []
        for e in events:
            self.seq += 1
            body = EventBody(seq=self.seq, ts=iso_ms(ts_ns), ts_ns=ts_ns, rule=e.rule, gpu=e.gpu,
                             from_state=e.from_state, to_state=e.to_state, severity=e.severity,
                             value=None if e.value is None else format_value(e.value), message=e.message)
            out.append(StampedEvent(e.rule, e.gpu, e.from_state, e.to_state, e.severity, e.at, e.value, e.message,
                                    ts_ns, self.seq, body.model_dump_json().encode()))
        return out
