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
  ``overruns``) rather than running them back to back. Leases are published QoS 1, retained,
  all at once (the broker's acknowledgements pipelined, not awaited one by one); one that
  cannot be sent (no connection, no acknowledgement within ``mqtt.timeout``) is sent again in
  the next cycle, and after every reconnect every lease is sent again (a restarted broker
  without persistence has lost the retained ones).
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
from agentd.site.lease import RateLimitedLog

log = structlog.get_logger("agentd.controller")

#: QoS 1 publishes in flight at once (paho's default is 20: a 1000-node cycle would queue behind it).
MAX_INFLIGHT = 1000
BOUNDS_ROWS_PER_CYCLE = 1000


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
                             client_factory=functools.partial(aiomqtt.Client, max_inflight_messages=MAX_INFLIGHT))
        self.last: CycleResult | None = None
        self.cycles = 0
        self.overruns = 0
        self.publish_failures = 0
        self.store_errors = 0
        self.ingest_errors = 0
        self._error_log = RateLimitedLog(60.0)
        self._seen_connects = 0
        self._ready = False

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
                await self._send(cleared)
                log.info("leases_cleared", leases=len(cleared))
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
        result = self.core.cycle(self.wall())
        await self._send(result.publish)
        self._record(result)
        self.last = result
        self.cycles += 1
        self._report(result)
        return result

    async def _send(self, messages: list[Publish]) -> None:
        if not messages:
            return
        if not self.link.connected:
            for m in messages:
                if m.retain:
                    self.core.unsent(m.topic)
            self.publish_failures += len(messages)
            return
        results = await asyncio.gather(*(self.link.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                                         for m in messages))
        for m, ok in zip(messages, results):
            if not ok:
                self.publish_failures += 1
                if m.retain:
                    self.core.unsent(m.topic)

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
                 mqtt_connected=self.link.connected, cycle_ms=round(r.cycle_s * 1e3, 2))
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
