"""The controller's MQTT I/O: one connection, the reports in, a cycle every interval, leases out.

A thin layer over ``ControllerCore`` (which decides everything) and ``agentd.mqtt.MqttLink``
(the daemon's one connection: reconnect with capped, jittered backoff from ``agentd.backoff``,
re-subscribe on every connect, a bounded inbox that hands over every message received in one
turn of the event loop as one batch). Why so thin: the site simulation and the tests drive the
same core without a broker, so all that is left here is moving bytes and keeping time.

* Ingest: each batch is fed to ``core.on_message`` with one wall-clock reading; the per-message
  path is the core's decode-and-keep, nothing else.
* The cycle runs every ``interval_s`` on the monotonic clock (a wall-clock step neither
  bunches nor skips cycles); a cycle that overran its slot skips the missed slots (counted as
  ``overruns``) rather than running them back to back.
* Leases are published QoS 1, retained, and never awaited by the cycle: each is handed to the
  MQTT client (paho's ``publish``, under aiomqtt, which queues it and keeps ``MAX_INFLIGHT``
  unacknowledged on the wire) and its acknowledgement is looked at in the following cycles
  (``Outstanding``: at most ``MAX_OUTSTANDING`` at once). One that cannot be sent (no
  connection, the bound reached, no acknowledgement within ``mqtt.timeout``, the connection
  lost before it) is handed back to the core (``unsent``) and so sent again in the next cycle.
  Why: awaiting the acknowledgements inside the loop cost up to a second of every cycle at
  1,000 nodes (a cut waited behind them), and aiomqtt's own ``publish`` costs an Event, a
  ``wait_for`` task and a scan of every pending call per message: a task per lease saturates
  the event loop at 1,000 leases a cycle.
* A lease whose budget changed (above all a cut) or that this connection has not sent yet goes
  out at once. A lease the core re-issues only to refresh it (same budget as the last one sent
  on that topic) is paced (``RefreshPacer``): the refreshes of one cycle are spread evenly over
  the cycles before the next refresh is due, so a site whose leases were all issued together
  does not send them all in one burst every ``lease_refresh``. A newer lease on the same topic
  replaces a paced one (a stale refresh is never sent after a cut). After every reconnect
  every lease is sent again at once (a restarted broker without persistence has lost the
  retained ones).
* The points (``domain_power`` per domain, ``controller``) go to a local ``agentd.store.Store``
  when one is given, and from there to InfluxDB with the daemon's forwarder; a one-line summary
  is logged at info level every cycle (``controller_cycle``), and printed with ``print_summary``.
* systemd: READY=1 after the first cycle, WATCHDOG=1 after each one (a wedged loop is restarted
  by ``WatchdogSec``), STOPPING=1 at stop. SIGTERM / SIGINT stop it cleanly: the current cycle
  finishes, the leases stay retained (nodes hold them until they expire, so a restart within
  one TTL is invisible to them) unless ``clear_leases_on_stop``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import structlog

from agentd import sdnotify
from agentd.config import MqttConfig
from agentd.lineproto import encode
from agentd.mqtt import MqttLink
from agentd.site.controller import ControllerCore, CycleResult, Publish
from collectors.log_limit import RateLimitedLog

log = structlog.get_logger("agentd.controller")

#: QoS 1 publishes on the wire unacknowledged at once (paho's default is 20: a 1000-node cycle
#: would queue behind it); paho queues the rest in order.
MAX_INFLIGHT = 1000
#: leases handed to the client and not yet acknowledged (on the wire or queued in paho): beyond
#: this a lease is handed back to the core and sent in the next cycle (a stalled broker must not
#: grow the queue without bound).
MAX_OUTSTANDING = 5 * MAX_INFLIGHT
#: aiomqtt warns once per message loop turn when more publish calls than this are pending; every
#: lease in flight is one, so the threshold sits above the bound (no warning in normal running).
PENDING_CALLS_THRESHOLD = MAX_INFLIGHT + 100
BOUNDS_ROWS_PER_CYCLE = 1000
STOP_DRAIN_S = 5.0  # at stop, how long the leases still in flight may take to be acknowledged


def make_client(*args: Any, **kwargs: Any) -> aiomqtt.Client:
    """aiomqtt.Client sized for a controller: ``MAX_INFLIGHT`` QoS 1 messages unacknowledged at
    once and no "pending publish calls" warning below that bound (aiomqtt's threshold is 10,
    an attribute, not a constructor argument)."""
    client = aiomqtt.Client(*args, max_inflight_messages=MAX_INFLIGHT, **kwargs)
    client.pending_calls_threshold = PENDING_CALLS_THRESHOLD
    return client


def lease_budget_w(m: Publish) -> float | None:
    """The budget of a lease publish (None: not a lease, or an empty retained message that
    deletes one). Parsed from the signed payload the core made, so pacing needs nothing from
    the core's internals."""
    if not m.retain or not m.payload or "/budget/" not in m.topic:
        return None
    try:
        value = json.loads(m.payload)["budget_w"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


class RefreshPacer:
    """Spreads unchanged-lease refreshes over the refresh period. Pure: values and ``now`` in.

    ``offer(now, refreshes)`` queues the refreshes of one cycle with due times spread evenly over
    ``spread_s`` (the first one due at once); ``take(now)`` returns those due. A queued topic that
    is offered again keeps its earlier due time (so a refresh can never be pushed back for
    ever), and ``drop(topic)`` forgets it (a newer lease went out at once). ``spread_s`` is the
    refresh period less one cycle, so a cycle's refreshes are all out before the core re-issues
    them: a paced lease reaches its node at most ``spread_s`` after it was issued, with
    ``lease_ttl - spread_s`` of its life left (2/3 of it and more with the defaults).
    """

    __slots__ = ("spread_s", "_queued")

    def __init__(self, refresh_s: float, interval_s: float) -> None:
        cycles = max(0, math.ceil(refresh_s / interval_s - 1e-9) - 1)
        self.spread_s = cycles * interval_s
        self._queued: dict[str, tuple[float, Publish]] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def offer(self, now: float, refreshes: list[Publish]) -> None:
        n = len(refreshes)
        queued = self._queued
        for i, m in enumerate(refreshes):
            due = now + self.spread_s * i / n
            old = queued.get(m.topic)
            queued[m.topic] = (due if old is None else min(old[0], due), m)

    def drop(self, topic: str) -> None:
        self._queued.pop(topic, None)

    def clear(self) -> None:
        self._queued.clear()

    def take(self, now: float) -> list[Publish]:
        queued = self._queued
        due = [topic for topic, (at, _) in queued.items() if at <= now]
        return [queued.pop(topic)[1] for topic in due]


class ControllerService:
    """Runs one ``ControllerCore`` against a broker until ``stop`` is set. ``run`` is the task."""

    def __init__(self, core: ControllerCore, mqtt: MqttConfig, *, client_id: str | None = None,
                 store: Any | None = None, forwarder: Any | None = None, retention_s: float | None = None,
                 print_summary: bool = False, clear_leases_on_stop: bool = False,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 out: Callable[[str], None] = print, rng: random.Random | None = None,
                 link_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.core = core
        self.interval_s = core.interval_s
        self.store = store
        self.forwarder = forwarder
        self.retention_s = retention_s
        self.print_summary = print_summary
        self.clear_leases_on_stop = clear_leases_on_stop
        self.monotonic = monotonic
        self.wall = wall
        self.out = out
        self.link = MqttLink(mqtt, client_id=client_id or mqtt.client_id or f"agentd-controller-{core.controller_id}",
                             subscriptions=core.subscriptions(), handler=self._ingest, rng=rng, sleep=link_sleep,
                             client_factory=self._make_client)
        self.last: CycleResult | None = None
        self.cycles = 0
        self.overruns = 0
        self.publish_failures = 0
        self.store_errors = 0
        self.ingest_errors = 0
        self._error_log = RateLimitedLog(60.0)
        self._seen_connects = 0
        self._ready = False
        self.pacer = RefreshPacer(core.lease_refresh_s, core.interval_s)
        self._sent_budget: dict[str, float] = {}  # lease topic -> budget last handed to this connection
        self._outstanding: dict[int, tuple[float, Publish, Any]] = {}  # mid -> (deadline, message, paho info)
        self._client: aiomqtt.Client | None = None  # the link's client of the current session
        self._tasks: set[asyncio.Task[bool]] = set()  # publishes through the link (no client of ours)
        self._client_connects = -1  # link.connects when the outstanding set was last valid
        self.leases_paced = 0  # refreshes that went through the pacer
        self.leases_acked = 0  # leases the broker acknowledged

    # -- ingest --------------------------------------------------------------------------------

    def _ingest(self, messages: list[tuple[str, bytes]]) -> None:
        now = self.wall()
        on_message = self.core.on_message
        for topic, payload in messages:
            try:
                on_message(topic, payload if isinstance(payload, bytes) else bytes(payload), now)
            except Exception as exc:  # a bug must cost one message, not the batch (the link drops it whole)
                self.ingest_errors += 1
                self._error_log.emit("ingest", now, log.error, "controller_ingest_failed", topic=topic[:200],
                                     error=repr(exc)[:300], hint="a bug: the message is dropped, ingest goes on")

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, cycle every interval, until ``stop``; then finish cleanly."""
        link_stop = asyncio.Event()
        link_task = asyncio.create_task(self.link.run(link_stop), name="controller-mqtt")
        fw_task = (asyncio.create_task(self.forwarder.run(stop), name="controller-forwarder")
                   if self.forwarder is not None else None)
        log.info("controller_started", controller=self.core.controller_id, site=self.core.site, root=self.core.root,
                 subtree=self.core.subtree is not None, delegates=list(self.core.delegates),
                 broker=f"{self.link.cfg.host}:{self.link.cfg.port}", interval_s=self.interval_s,
                 lease_ttl_s=self.core.lease_ttl_s, subscriptions=[t for t, _ in self.core.subscriptions()][:20])
        try:
            next_at = self.monotonic()
            while not stop.is_set():
                await self.cycle_once()
                next_at += self.interval_s
                now = self.monotonic()
                if next_at < now:  # overran: skip the missed slots, keep the phase
                    missed = int((now - next_at) // self.interval_s) + 1
                    self.overruns += missed
                    next_at += missed * self.interval_s
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_at - self.monotonic()))
                except TimeoutError:
                    pass
        finally:
            sdnotify.stopping()
            if self.clear_leases_on_stop and self.link.connected:
                cleared = self.core.clear_leases()
                self.pacer.clear()
                self._dispatch(cleared)
                log.info("leases_cleared", leases=len(cleared))
            await self._drain_outstanding(STOP_DRAIN_S)
            link_stop.set()
            await link_task
            if fw_task is not None:
                await asyncio.gather(fw_task, return_exceptions=True)
                await self._flush()
            if self.store is not None:
                self.store.close()
            log.info("controller_stopped", controller=self.core.controller_id, cycles=self.cycles,
                     leases_sent=self.core.stats.leases_sent)

    async def cycle_once(self) -> CycleResult:
        """One cycle: allocate, publish, record. Also what a test calls directly."""
        if self.link.connects != self._seen_connects:  # (re)connected: the broker may hold nothing
            self._seen_connects = self.link.connects
            self.core.resend_all()
            self._sent_budget.clear()  # so that all of them go out at once, none paced
            self.pacer.clear()
        self._check_outstanding(self.monotonic())  # failures go back to the core before it cycles
        result = self.core.cycle(self.wall())
        await self._send(result.publish, result.now)
        self._record(result)
        self.last = result
        self.cycles += 1
        self._report(result)
        return result

    async def _send(self, messages: list[Publish], now: float | None = None) -> None:
        """Hand a cycle's messages to the connection without waiting for the broker: changed
        leases and everything else at once, unchanged refreshes through the pacer (plus the
        paced ones now due). Async so that a caller may await it; it never blocks."""
        now = self.wall() if now is None else now
        sent_budget = self._sent_budget
        pacer = self.pacer
        out: list[Publish] = []
        refreshes: list[Publish] = []
        for m in messages:
            budget_w = lease_budget_w(m)
            if budget_w is not None and sent_budget.get(m.topic) == budget_w:
                refreshes.append(m)
                continue
            pacer.drop(m.topic)  # a newer lease supersedes a paced refresh of that topic
            out.append(m)
        if refreshes:
            self.leases_paced += len(refreshes)
            pacer.offer(now, refreshes)
        out.extend(pacer.take(now))
        self._dispatch(out)
        if self._tasks:
            await asyncio.sleep(0)  # let the publishes started as tasks reach the link

    def _make_client(self, *args: Any, **kwargs: Any) -> aiomqtt.Client:
        """The link's client factory: ``make_client``, remembered so that leases can be handed
        to it without a task each (a new one per session: the link reconnects with a new client)."""
        self._client = client = make_client(*args, **kwargs)
        return client

    def _dispatch(self, messages: list[Publish]) -> None:
        """Hand each message to the MQTT client at once (no task, no await); a lease that
        cannot be started is handed back to the core, which sends it again next cycle."""
        if not messages:
            return
        client = self._client
        if self._client_connects != self.link.connects:
            self._lose_outstanding()  # a new session: what the old client held is gone
        if not self.link.connected:
            for m in messages:
                self._failed(m)
            return
        if client is None:  # a link this service's factory did not connect (a test double)
            self._dispatch_tasks(messages)
            return
        paho = client._client  # aiomqtt's paho client; its publish is what aiomqtt.publish calls
        outstanding = self._outstanding
        deadline = self.monotonic() + self.link.cfg.timeout
        for m in messages:
            if m.qos > 0 and len(outstanding) >= MAX_OUTSTANDING:
                self._failed(m)
                continue
            try:
                info = paho.publish(m.topic, m.payload, m.qos, m.retain)
            except (ValueError, OSError) as exc:  # a bad topic or payload, a broken socket
                log.debug("mqtt_publish_failed", topic=m.topic, error=str(exc))
                self._failed(m)
                continue
            if info.rc != 0:
                self._failed(m)
                continue
            budget_w = lease_budget_w(m)
            if budget_w is not None:
                self._sent_budget[m.topic] = budget_w
            if m.qos > 0:
                outstanding[info.mid] = (deadline, m, info)

    def _dispatch_tasks(self, messages: list[Publish]) -> None:
        """The slow path, through ``MqttLink.publish`` (one task per message, bounded like the
        fast one); used only when there is no client of ours to hand messages to."""
        for m in messages:
            if len(self._tasks) + len(self._outstanding) >= MAX_OUTSTANDING:
                self._failed(m)
                continue
            budget_w = lease_budget_w(m)
            if budget_w is not None:
                self._sent_budget[m.topic] = budget_w
            task = asyncio.ensure_future(self.link.publish(m.topic, m.payload, qos=m.qos, retain=m.retain))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, m))

    def _task_done(self, m: Publish, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None or not task.result():
            self._failed(m)
        else:
            self.leases_acked += 1

    def _check_outstanding(self, now: float) -> None:
        """Acknowledged leases leave the set; one past its deadline is a failure (sent again)."""
        if self._client_connects != self.link.connects or not self.link.connected:
            self._lose_outstanding()
            return
        outstanding = self._outstanding
        done: list[int] = []
        for mid, (deadline, m, info) in outstanding.items():
            if info._published:  # set by paho on PUBACK (is_published() less its lock)
                self.leases_acked += 1
                done.append(mid)
            elif deadline <= now:
                self._failed(m)
                done.append(mid)
        for mid in done:
            del outstanding[mid]

    def _lose_outstanding(self) -> None:
        """The connection changed: nothing outstanding will be acknowledged any more."""
        self._client_connects = self.link.connects
        for _, m, info in self._outstanding.values():
            if info._published:
                self.leases_acked += 1
            else:
                self._failed(m)
        self._outstanding.clear()

    def _failed(self, m: Publish) -> None:
        self.publish_failures += 1
        if m.retain:
            if self._sent_budget.get(m.topic) is not None:
                del self._sent_budget[m.topic]  # the retry must go out at once, not paced
            self.core.unsent(m.topic)

    @property
    def in_flight(self) -> int:
        """Leases handed to the client and not yet acknowledged (as of the last check)."""
        return len(self._outstanding) + len(self._tasks)

    async def _drain_outstanding(self, timeout_s: float) -> None:
        """At stop: let the leases handed to the client be acknowledged (bounded) before
        disconnecting; polled, as the cycle does."""
        end = self.monotonic() + timeout_s
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        while self._outstanding and self.link.connected and self.monotonic() < end:
            await asyncio.sleep(0.01)
            self._check_outstanding(self.monotonic())

    def _record(self, result: CycleResult) -> None:
        if self.store is None:
            return
        lines = [(p.ts_ns, line) for p in result.points if (line := encode(p)) is not None]
        try:
            self.store.append(lines)
            self.store.enforce_bounds(int(result.now * 1e9), self.retention_s,
                                      max_rows=max(BOUNDS_ROWS_PER_CYCLE, 2 * len(lines)))
        except Exception as exc:  # a failing disk costs the points, never the leases
            self.store_errors += 1
            log.error("controller_store_failed", error=str(exc), lost_points=len(lines),
                      hint="free space in the state directory; allocation goes on")
            return
        if self.forwarder is not None:
            self.forwarder.wake()

    def _report(self, r: CycleResult) -> None:
        root = r.domains[self.core.root]
        st = self.core.stats
        over = sorted(d.domain for d in r.domains.values() if d.over_cap)
        log.info("controller_cycle", root=root.domain, power_w=round(root.power_w, 1), cap_w=root.cap_w,
                 limit_w=round(r.root_limit_w, 1), level=root.level.value, budget_source=r.budget_source,
                 domains_over_cap=len(over), over=over[:5],
                 domains_capping=sum(1 for d in r.domains.values() if d.level.value == "capping"),
                 shortfall_w=round(max((d.shortfall_w for d in r.domains.values()), default=0.0), 1),
                 nodes=r.nodes, stale_nodes=r.stale_nodes, nodes_capped=r.nodes_capped, leases=r.leases,
                 reports_accepted=st.reports_accepted, reports_refused=st.reports_refused,
                 mqtt_connected=self.link.connected, leases_in_flight=len(self._outstanding),
                 leases_paced_queued=len(self.pacer), cycle_ms=round(r.cycle_s * 1e3, 2))
        if self.print_summary:
            self.out(r.summary_line() + ("" if self.link.connected else "  [broker: disconnected]"))
        status = (f"{root.domain} {root.power_w / 1e3:.1f}/{root.cap_w / 1e3:.1f} kW, {len(over)} over cap, "
                  f"{r.nodes} nodes ({r.stale_nodes} stale), broker "
                  f"{'connected' if self.link.connected else 'disconnected'}")
        if not self._ready:
            self._ready = True
            sdnotify.ready(status)
        else:
            sdnotify.watchdog(status)

    async def _flush(self) -> None:
        assert self.forwarder is not None
        try:
            await self.forwarder.flush(5.0)
        finally:
            await self.forwarder.writer.close()
