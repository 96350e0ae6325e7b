"""The throttle body on MQTT, so a large site subscribes instead of polling every node.

``agentd/v1/{site}/nodes/{node}/throttle`` carries the same body as ``GET /v1/throttle``, QoS 1,
retained: a scheduler that subscribes gets every node's last word at once. It is published when
what it says changes and at least every ``api.publish_every_s`` (a fresh ``generated_at`` and
``expires_at``, so a subscriber can tell a live node from a dead one's retained copy).

"What it says" leaves out the timestamps and the live readings that move every tick (power, draw,
temperature, a firing rule's current value and the message that quotes it): republishing 8 GPUs'
power at 10 Hz from every node would make the topic a telemetry stream, which InfluxDB and
/metrics already are. Everything else counts: a change of level, state, advice, accept_new_work,
a reason appearing or going, the node cap, publishes at once; a change only in per-GPU limits or
job fractions (a ramp rising back, 25 W/s) publishes at most once per ``MIN_GAP_S``.

Rule transitions go to ``agentd/v1/{site}/events`` (QoS 1, not retained), one message each.
Nothing here waits: ``MqttLink.publish_nowait`` hands the message to a task; with no connection
nothing is sent, and the throttle body goes out again as soon as the link reconnects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Protocol

from agentd.api.events import StampedEvent
from agentd.api.models import Throttle
from agentd.site import topics

THROTTLE_QOS = 1
EVENT_QOS = 1
MIN_GAP_S = 1.0


class Link(Protocol):
    """What the publisher needs of ``agentd.mqtt.MqttLink``."""

    connected: bool
    connects: int

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool: ...


def change_keys(t: Throttle) -> tuple[tuple, tuple]:
    """(what publishes at once, what publishes at most every MIN_GAP_S) of a throttle body."""
    major = (t.level, t.state, t.accept_new_work, t.advice, t.node_cap_w, t.node_cap_source, t.dry_run,
             tuple((r.kind, r.rule, r.severity, r.gpu, r.advice, r.action, r.source, r.level, r.threshold)
                   for r in t.reasons))
    minor = (tuple((g.index, g.uuid, g.limit_w, g.target_w, g.baseline_w, g.source, g.health) for g in t.gpus),
             tuple((j.job_id, tuple(j.gpus), j.throttle_fraction, j.class_) for j in t.jobs))
    return major, minor


class ThrottlePublisher:
    """Decides, each tick, whether the retained throttle topic needs the new body; sends events."""

    def __init__(self, site: str, node: str, every_s: float, min_gap_s: float = MIN_GAP_S) -> None:
        self.topic = topics.node_throttle(site, node)
        self.events_topic = topics.events(site)
        self.every_s = every_s
        self.min_gap_s = min_gap_s
        self._prefix = b'{"site":' + _quote(site) + b',"node":' + _quote(node) + b","
        self._last_at: float | None = None
        self._connects = -1
        self._major: tuple | None = None
        self._minor: tuple | None = None
        self.published = 0  # throttle bodies handed to the link
        self.events_sent = 0
        self.events_unsent = 0  # transitions while the link was down (they stay in /v1/events and the store)

    def due(self, keys: tuple[tuple, tuple], now_mono: float, connects: int) -> bool:
        """Whether a body with ``keys`` (``change_keys``) should go out now."""
        if self._last_at is None or connects != self._connects:
            return True
        major, minor = keys
        since = now_mono - self._last_at
        return (major != self._major or since >= self.every_s
                or (minor != self._minor and since >= self.min_gap_s))

    def step(self, link: Link | None, throttle: Throttle, payload: Callable[[], bytes], now_mono: float,
             events: Iterable[StampedEvent] = ()) -> bool:
        """Publish the body when due (``payload`` serialises it: only then) and this tick's events;
        True when the body went out."""
        if link is None:
            return False
        sent = False
        if link.connected:
            keys = change_keys(throttle)
            if self.due(keys, now_mono, link.connects) and link.publish_nowait(
                    self.topic, payload(), qos=THROTTLE_QOS, retain=True):
                self._last_at = now_mono
                self._connects = link.connects
                self._major, self._minor = keys
                self.published += 1
                sent = True
        for event in events:
            if link.connected and link.publish_nowait(self.events_topic, self._prefix + event.json[1:],
                                                      qos=EVENT_QOS, retain=False):
                self.events_sent += 1
            else:
                self.events_unsent += 1
        return sent


def _quote(text: str) -> bytes:
    return json.dumps(text).encode()
