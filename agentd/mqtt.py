"""The daemon's one MQTT connection (aiomqtt): subscribe, receive, publish, survive broker loss.

Why one long-lived task and not a client per feature: one connection per node is what a site
broker with thousands of nodes can carry, and one place owns reconnecting. The task

* connects (TLS and username/password when configured) with a last will that marks the node
  ``offline`` (retained), then publishes ``online`` (retained) on
  ``agentd/v1/{site}/nodes/{node}/status``;
* subscribes to every configured filter on *every* connect (a clean session remembers nothing);
* hands received messages, in batches (what arrived in one turn of the event loop), to a
  handler (the coolant ingest) that must not block; a ``Route`` sends the messages of its topic
  filter to a handler of its own instead (the node's budget leases), in arrival order;
* on any loss waits a capped, jittered backoff ("equal jitter": half fixed, half random, so a
  site's nodes spread out after a broker restart and none spins) and starts over;
* on stop publishes ``offline`` itself (a will only fires on an unclean loss) and disconnects.

Nothing here is awaited by the tick: a dead broker costs the tick nothing, ``publish`` returns
False at once when there is no connection, and ``publish_nowait`` (the power report, QoS 0,
every tick) hands the message to a task and returns at once. Incoming messages wait in a bounded inbox
(``mqtt.queue_size``) until the next turn of the loop; beyond the bound they are dropped and
counted (``dropped``) rather than growing memory without bound. (The handler runs on the loop,
so a backlog beyond one turn stays in the socket and the broker, whose own per-client limits
apply: Mosquitto's ``max_queued_messages``.)
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import aiomqtt
import structlog

from agentd.backoff import equal_jitter_s
from agentd.config import ConfigError, MqttConfig

log = structlog.get_logger("agentd.mqtt")

Handler = Callable[[list[tuple[str, bytes]]], None]
FAIL_LOG_EVERY_S = 60.0
MAX_PUBLISHES_IN_FLIGHT = 64  # publish_nowait beyond this many unconfirmed is dropped and counted


class Route(NamedTuple):
    """Messages whose topic matches ``topic_filter`` go to ``handler`` (not the default one);
    the filter is subscribed with ``qos`` on every connect."""

    topic_filter: str
    qos: int
    handler: Handler


def status_topic(site: str, node: str) -> str:
    """DESIGN.md section 6: the retained online/offline topic of one node."""
    return f"agentd/v1/{site}/nodes/{node}/status"


STABLE_CONNECTION_S = 10.0


def backoff_delay_s(attempt: int, rng: random.Random, min_s: float, max_s: float) -> float:
    """Delay before reconnect ``attempt`` (0-based): doubling from ``min_s``, capped at ``max_s``,
    uniformly jittered over the upper half of that value."""
    return equal_jitter_s(attempt, rng, min_s, max_s)


def make_tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for ``mqtt.tls``; raises ConfigError naming the key when a file is unusable."""
    if not cfg.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"mqtt.ca_file: cannot load {cfg.ca_file}: {exc} (a PEM CA bundle is expected)"]) from exc
    if cfg.cert_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"mqtt.cert_file/key_file: cannot load {cfg.cert_file}: {exc}"]) from exc
    return ctx


class _Inbox(asyncio.Queue):
    """aiomqtt's incoming queue, replaced (``queue_type``) by a bounded batch inbox.

    aiomqtt puts each received message with ``put_nowait`` from paho's read callback and its
    ``messages`` iterator costs a task and an ``asyncio.wait`` per message. Here ``put_nowait``
    appends to a bounded list (a message beyond ``limit`` is dropped and counted) and schedules
    one ``deliver`` call for everything that arrived in this turn of the event loop: same
    order, one Python call per batch. The asyncio.Queue itself stays empty, so iterating
    ``client.messages`` only ever ends with the MqttError that reports a lost connection.
    """

    def __init__(self, limit: int, deliver: Callable[[list[Any]], None], on_drop: Callable[[], None]) -> None:
        super().__init__()
        self.limit = limit
        self._deliver = deliver
        self._on_drop = on_drop
        self._pending: list[Any] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def put_nowait(self, item: Any) -> None:
        if len(self._pending) >= self.limit:
            self._on_drop()
            return
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Deliver everything pending now (also called when the connection ends)."""
        self._scheduled = False
        if self._pending:
            batch, self._pending = self._pending, []
            self._deliver(batch)


class MqttLink:
    """One MQTT client with reconnect; see the module docstring. ``run`` is the task."""

    def __init__(self, cfg: MqttConfig, *, client_id: str, status_topic: str | None = None,
                 subscriptions: Sequence[tuple[str, int]] = (), handler: Handler | None = None,
                 routes: Sequence[Route] = (), rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 client_factory: Callable[..., aiomqtt.Client] = aiomqtt.Client) -> None:
        if not cfg.host:
            raise ValueError("mqtt.host is not set (MQTT is off)")
        self.cfg = cfg
        self.client_id = client_id
        self.status_topic = status_topic
        self.routes = list(routes)
        self.subscriptions = list(subscriptions) + [(r.topic_filter, r.qos) for r in self.routes
                                                    if (r.topic_filter, r.qos) not in subscriptions]
        self.handler = handler
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.client_factory = client_factory
        self.tls_context = make_tls_context(cfg)
        self.connected = False
        self.connects = 0
        self.connect_failures = 0
        self.received = 0
        self.dropped = 0
        self.handler_errors = 0
        self.published = 0  # publish_nowait messages the broker took (QoS 0: handed to the socket)
        self.publish_dropped = 0  # publish_nowait messages not sent: no connection, too many in flight, error
        self.last_delay_s = 0.0
        self._in_flight: set[asyncio.Task[bool]] = set()
        self._client: aiomqtt.Client | None = None
        self._inbox: _Inbox | None = None
        self._last_fail_log = float("-inf")

    def _count_drop(self) -> None:
        self.dropped += 1

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        self._inbox = queue = _Inbox(cfg.queue_size, self._deliver, self._count_drop)
        will = (aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True)
                if self.status_topic else None)
        return self.client_factory(
            cfg.host, cfg.port, username=cfg.username or None,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=self.client_id, queue_type=lambda maxsize=0: queue, will=will,
            clean_session=True, keepalive=cfg.keepalive, timeout=cfg.timeout,
            tls_context=self.tls_context)

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; then say offline and disconnect."""
        attempt = 0
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                session = asyncio.ensure_future(self._session())
                done, _ = await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if session not in done:  # stopping: leave cleanly from inside the connection
                    await self._say_offline()
                    session.cancel()
                    await asyncio.gather(session, return_exceptions=True)
                    break
                if session.result() >= STABLE_CONNECTION_S:
                    attempt = 0  # only a connection that held resets the backoff (no flapping
                    # at full speed when, say, two nodes share a client id and kick each other)
                self.last_delay_s = delay = backoff_delay_s(attempt, self.rng, self.cfg.reconnect_min,
                                                            self.cfg.reconnect_max)
                attempt += 1
                sleeper = asyncio.ensure_future(self.sleep(delay))
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
        finally:
            stopper.cancel()
            self.connected = False
            self._client = None

    async def _session(self) -> float:
        """One connection, until it is lost. Returns how long it stayed connected (0: never)."""
        loop = asyncio.get_running_loop()
        connected = False
        connected_at = 0.0
        client = self._make_client()
        try:
            async with client:
                connected = True
                connected_at = loop.time()
                self._client = client
                self.connected = True
                self.connects += 1
                if self.subscriptions:
                    granted = await client.subscribe(list(self.subscriptions), timeout=self.cfg.timeout)
                    self._check_granted(granted)
                if self.status_topic:
                    await client.publish(self.status_topic, b"online", qos=1, retain=True,
                                         timeout=self.cfg.timeout)
                log.info("mqtt_connected", broker=f"{self.cfg.host}:{self.cfg.port}", client_id=self.client_id,
                         subscriptions=[t for t, _ in self.subscriptions], tls=self.cfg.tls)
                await self._pump(client)
        except aiomqtt.MqttError as exc:
            self._log_loss(connected, exc, loop.time())
        except Exception as exc:  # anything else must not end the link; the backoff retries
            self._log_loss(connected, exc, loop.time())
        finally:
            self.connected = False
            self._client = None
            self._drain()
        return loop.time() - connected_at if connected else 0.0

    def _check_granted(self, granted: Any) -> None:
        """The broker may refuse a subscription (an ACL): say which, instead of going stale silently."""
        for (topic, _qos), code in zip(self.subscriptions, granted or ()):
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log.error("mqtt_subscription_refused", topic=topic, reason=str(code),
                          hint="the broker refused this topic filter: check its ACL for this client's user")

    def _log_loss(self, was_connected: bool, exc: BaseException, now: float) -> None:
        broker = f"{self.cfg.host}:{self.cfg.port}"
        if was_connected:
            log.warning("mqtt_disconnected", broker=broker, error=str(exc) or repr(exc),
                        hint="reconnecting with backoff; GPU telemetry continues")
            return
        self.connect_failures += 1
        if now - self._last_fail_log >= FAIL_LOG_EVERY_S:
            self._last_fail_log = now
            log.warning("mqtt_connect_failed", broker=broker, error=str(exc) or repr(exc),
                        failures=self.connect_failures,
                        hint="check mqtt.host/port/tls/username; retrying with backoff")

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Wait for the connection to end; messages are delivered by the inbox meanwhile."""
        async for _ in client.messages:  # pragma: no cover - the inbox keeps the queue empty
            pass

    def _drain(self) -> None:
        """Hand over what was received before the connection dropped."""
        if self._inbox is not None:
            self._inbox.flush()

    def _deliver(self, messages: list[aiomqtt.Message]) -> None:
        self.received += len(messages)
        if not self.routes:
            self._hand(self.handler, [(m.topic.value, m.payload) for m in messages])
            return
        rest: list[tuple[str, bytes]] = []
        routed: list[list[tuple[str, bytes]]] = [[] for _ in self.routes]
        for m in messages:
            for i, route in enumerate(self.routes):
                if m.topic.matches(route.topic_filter):
                    routed[i].append((m.topic.value, m.payload))
                    break
            else:
                rest.append((m.topic.value, m.payload))
        for route, batch in zip(self.routes, routed):
            if batch:
                self._hand(route.handler, batch)
        if rest:
            self._hand(self.handler, rest)

    def _hand(self, handler: Handler | None, batch: list[tuple[str, bytes]]) -> None:
        if handler is None:
            return
        try:
            handler(batch)
        except Exception as exc:  # a handler bug costs this batch, not the connection
            self.handler_errors += 1
            log.error("mqtt_handler_failed", error=repr(exc), messages=len(batch))

    async def _say_offline(self) -> None:
        if self.status_topic and self.connected:
            await self.publish(self.status_topic, b"offline", qos=1, retain=True)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Start a publish and return at once (for the tick): False, counted in
        ``publish_dropped``, when there is no connection or ``MAX_PUBLISHES_IN_FLIGHT`` are
        still unconfirmed (a stalled broker must not grow tasks without bound)."""
        if self._client is None or len(self._in_flight) >= MAX_PUBLISHES_IN_FLIGHT:
            self.publish_dropped += 1
            return False
        task = asyncio.ensure_future(self.publish(topic, payload, qos=qos, retain=retain))
        self._in_flight.add(task)
        task.add_done_callback(self._published)
        return True

    def _published(self, task: asyncio.Task[bool]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is None and task.result():
            self.published += 1
        else:
            self.publish_dropped += 1

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        """Publish when connected; False (at once) when not, or when the broker did not confirm
        within ``mqtt.timeout``. Never raises for a lost connection: callers decide to retry."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=self.cfg.timeout)
        except aiomqtt.MqttError as exc:
            log.debug("mqtt_publish_failed", topic=topic, error=str(exc))
            return False
        return True
