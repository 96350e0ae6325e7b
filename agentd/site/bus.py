"""Message transports for the site simulation: an in-process bus and one shared MQTT connection.

The node side (``agentd.site.node``) and the controller core (``agentd.site.controller``) are
transport-agnostic: they take ``(topic, payload, now)`` and return what to publish. This module
carries those bytes:

* :class:`InProcessBus`: the MQTT semantics the site protocol relies on, in one process, for
  tests, ``agentd demo --site`` and the simulated-clock runs: ``+`` / ``#`` filters (a ``$``
  topic is not matched by a leading wildcard), retained messages (kept per topic, replaced by
  the next retained publish, removed by an empty one, delivered to a new subscription at once),
  and FIFO delivery. Delivery is explicit (:meth:`InProcessBus.deliver`), so a simulation
  decides when messages "arrive" and stays deterministic. QoS is accepted and ignored (nothing
  is lost in-process); a broker outage can be simulated with :meth:`InProcessBus.set_online`.
* :class:`SharedMqttBus`: the same interface over ONE MQTT connection (``agentd.mqtt.MqttLink``:
  reconnect with backoff, re-subscribe, a bounded inbox), so hundreds of simulated nodes share
  one client instead of opening one each; what the broker delivers is dispatched locally with
  the same filter tree.

Both deliver each message once per subscriber (handler), however many of its filters match,
as Mosquitto 2 does for one client with overlapping subscriptions.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agentd.config import MqttConfig

Handler = Callable[[str, bytes], object]  # (topic, payload); what it returns is ignored


class Transport(Protocol):
    """What a simulated node or controller needs from its connection."""

    def subscribe(self, topic_filter: str, handler: Handler) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None: ...


def check_topic(topic: str) -> str:
    """``topic`` if it can be published to, else ValueError naming it (MQTT 3.1.1 section 4.7)."""
    if not topic:
        raise ValueError("a topic cannot be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r}: '+' and '#' are for subscriptions, not for publishing")
    if "\x00" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"topic {topic[:80]!r}: holds NUL or is longer than 65535 bytes")
    return topic


def check_filter(topic_filter: str) -> str:
    """``topic_filter`` if valid ('+' a whole level, '#' a whole last level), else ValueError."""
    if not topic_filter or "\x00" in topic_filter:
        raise ValueError("a topic filter cannot be empty or hold NUL")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"filter {topic_filter!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


@dataclass(slots=True)
class _Level:
    children: dict[str, _Level] = field(default_factory=dict)
    handlers: list[Handler] = field(default_factory=list)


class TopicTree:
    """Topic filters -> handlers, matched level by level (cost grows with the topic's depth and
    the wildcards on its path, not with the number of filters)."""

    def __init__(self) -> None:
        self._root = _Level()
        self.filters = 0

    def add(self, topic_filter: str, handler: Handler) -> None:
        node = self._root
        for level in check_filter(topic_filter).split("/"):
            node = node.children.setdefault(level, _Level())
        node.handlers.append(handler)
        self.filters += 1

    def remove(self, topic_filter: str, handler: Handler) -> bool:
        node = self._root
        for level in topic_filter.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                return False
            node = nxt
        if handler in node.handlers:
            node.handlers.remove(handler)
            self.filters -= 1
            return True
        return False

    def match(self, topic: str) -> list[Handler]:
        """Every handler with a filter matching ``topic``, each once, in subscription order."""
        out: list[Handler] = []
        levels = topic.split("/")
        self._walk(self._root, levels, 0, out, topic.startswith("$"))
        if len(out) > 1:
            out = list(dict.fromkeys(out))
        return out

    def _walk(self, node: _Level, levels: list[str], i: int, out: list[Handler], dollar: bool) -> None:
        wild_ok = not (dollar and i == 0)
        if wild_ok:
            rest = node.children.get("#")
            if rest is not None:
                out.extend(rest.handlers)  # '#' also matches the parent level itself
        if i == len(levels):
            out.extend(node.handlers)
            return
        exact = node.children.get(levels[i])
        if exact is not None:
            self._walk(exact, levels, i + 1, out, dollar)
        if wild_ok:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, out, dollar)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT rules; for tests and one-off checks)."""
    tree = TopicTree()
    tree.add(topic_filter, _MARK)
    return bool(tree.match(check_topic(topic)))


def _MARK(topic: str, payload: bytes) -> None:  # pragma: no cover - never called
    pass


@dataclass(slots=True)
class BusStats:
    published: int = 0
    delivered: int = 0  # handler calls
    dropped_offline: int = 0  # published while the bus was offline
    handler_errors: int = 0


class InProcessBus:
    """MQTT semantics in one process (module doc). Not thread-safe: one event loop or one thread.

    ``publish`` queues; :meth:`deliver` hands queued messages to the matching handlers in
    publish order, including messages published by those handlers, until the queue is empty.
    A handler that raises is counted (``stats.handler_errors``) and the others still get the
    message, as a broker's other clients would.
    """

    def __init__(self) -> None:
        self._tree = TopicTree()
        self._queue: deque[tuple[str, bytes, list[Handler] | None]] = deque()
        self._retained: dict[str, bytes] = {}
        self._online = True
        self.stats = BusStats()
        self.last_error: str | None = None

    @property
    def online(self) -> bool:
        return self._online

    @property
    def pending(self) -> int:
        return len(self._queue)

    def retained(self) -> dict[str, bytes]:
        """A copy of the retained messages, topic -> payload."""
        return dict(self._retained)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Add a subscription; the retained messages it matches are queued for it at once."""
        self._tree.add(topic_filter, handler)
        if not self._online:
            return
        probe = TopicTree()
        probe.add(topic_filter, handler)
        for topic, payload in self._retained.items():
            if probe.match(topic):
                self._queue.append((topic, payload, [handler]))

    def unsubscribe(self, topic_filter: str, handler: Handler) -> bool:
        return self._tree.remove(topic_filter, handler)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Queue ``payload`` on ``topic``; with ``retain`` it is also kept for later subscribers
        (an empty retained payload removes the topic's retained message)."""
        check_topic(topic)
        if not 0 <= qos <= 2:
            raise ValueError(f"qos must be 0, 1 or 2 (got {qos})")
        if not self._online:
            self.stats.dropped_offline += 1
            return
        self.stats.published += 1
        if retain:
            if payload:
                self._retained[topic] = bytes(payload)
            else:
                self._retained.pop(topic, None)
        self._queue.append((topic, bytes(payload), None))

    def deliver(self, limit: int | None = None) -> int:
        """Deliver queued messages (at most ``limit``); returns how many messages went out."""
        n = 0
        queue = self._queue
        while queue and (limit is None or n < limit):
            topic, payload, only = queue.popleft()
            n += 1
            for handler in (only if only is not None else self._tree.match(topic)):
                self.stats.delivered += 1
                try:
                    handler(topic, payload)
                except Exception as exc:  # a subscriber's bug must not stop the others
                    self.stats.handler_errors += 1
                    self.last_error = f"{topic}: {exc!r}"
        return n

    def set_online(self, online: bool, *, keep_retained: bool = True) -> None:
        """Simulate a broker outage (``False``: queued messages are lost and publishes dropped)
        and its return (``True``: the retained messages, unless ``keep_retained`` is False, are
        delivered again to every matching subscription, as after a reconnect)."""
        if not online:
            self._online = False
            self._queue.clear()
            if not keep_retained:
                self._retained.clear()
            return
        if self._online:
            return
        self._online = True
        for topic, payload in self._retained.items():
            self._queue.append((topic, payload, self._tree.match(topic)))


class SharedMqttBus:
    """The :class:`Transport` interface over one MQTT connection (module doc).

    Subscriptions made before :meth:`run` starts go out in one SUBSCRIBE at every (re)connect;
    later ones are sent at once as well. They are QoS 0 by default (``sub_qos``): one connection
    stands for many clients, and at QoS 1 the broker's per-client window (Mosquitto: 20 messages
    in flight, 1000 queued) would throttle, and beyond it drop, what many clients would each
    receive; retained messages (leases) are delivered again at every reconnect either way.
    ``publish`` queues and returns (a simulated node's
    tick never waits on the network); one task sends the queue in order. Use as::

        bus = SharedMqttBus(MqttConfig(host=..., port=...), client_id="sim-nodes")
        bus.subscribe(filter, handler) ...
        task = asyncio.create_task(bus.run(stop))
        await bus.wait_connected(10.0)
    """

    def __init__(self, cfg: MqttConfig, *, client_id: str, outbox_max: int = 100_000, sub_qos: int = 0) -> None:
        from agentd.mqtt import MqttLink

        self._tree = TopicTree()
        self._filters: list[str] = []
        self._outbox: deque[tuple[str, bytes, int, bool]] = deque()
        self._outbox_max = outbox_max
        self.sub_qos = sub_qos
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.link = MqttLink(cfg, client_id=client_id, handler=self._on_batch)
        self.stats = BusStats()
        self.outbox_dropped = 0
        self.publish_failed = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.link.connected

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self._tree.add(topic_filter, handler)
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
            self.link.subscriptions.append((topic_filter, self.sub_qos))
            client = self.link._client  # noqa: SLF001 - a live subscribe between reconnects
            if client is not None:
                asyncio.ensure_future(self._subscribe_now(client, topic_filter))

    async def _subscribe_now(self, client: object, topic_filter: str) -> None:
        try:
            await client.subscribe(topic_filter, qos=self.sub_qos, timeout=self.link.cfg.timeout)  # type: ignore[attr-defined]
        except Exception as exc:  # the next reconnect subscribes again
            self.last_error = f"subscribe {topic_filter}: {exc!r}"

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        check_topic(topic)
        if len(self._outbox) >= self._outbox_max:
            self.outbox_dropped += 1
            return
        self._outbox.append((topic, payload, qos, retain))
        self._idle.clear()
        self._wake.set()

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued publish was handed to the connection (False on timeout)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_connected(self, timeout_s: float) -> None:
        """Return once connected; ConnectionError naming the broker after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.link.connected:
            if loop.time() > deadline:
                cfg = self.link.cfg
                raise ConnectionError(f"cannot reach the MQTT broker at {cfg.host}:{cfg.port} within "
                                      f"{timeout_s:g} s (is it running? check --broker)")
            await asyncio.sleep(0.02)

    async def run(self, stop: asyncio.Event) -> None:
        """The connection and the sender, until ``stop``."""
        sender = asyncio.ensure_future(self._send(stop))
        try:
            await self.link.run(stop)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _send(self, stop: asyncio.Event) -> None:
        outbox = self._outbox
        while not stop.is_set():
            if not outbox:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            topic, payload, qos, retain = outbox.popleft()
            if not self.link.connected:
                self.publish_failed += 1  # QoS 0 semantics: a message with no connection is lost
                continue
            if await self.link.publish(topic, payload, qos=qos, retain=retain):
                self.stats.published += 1
            else:
                self.publish_failed += 1

    def _on_batch(self, messages: list[tuple[str, bytes]]) -> None:
        match = self._tree.match
        for topic, payload in messages:
            for handler in match(topic):
                self.stats.delivered += 1
                try:
                    handler(topic, payload)
                except Exception as exc:
                    self.stats.handler_errors += 1
                    self.last_error = f"{topic}: {exc!r}"
