"""Where slurm-sync's throttle bodies come from: the retained MQTT topic, or polling node APIs.

Both keep, per agentd node, the latest body that could be read (``latest``). A message or an
answer that cannot be read is logged (at most once a minute per node and cause) and does not
replace the last good body: that one keeps serving until its own ``expires_at``, after which
the decision treats the node as unknown. So a broken publisher never drains or resumes
anything; it only makes its node's body expire.

* ``MqttSource``: one subscription to ``agentd/v1/{site}/nodes/+/throttle`` through the daemon's
  own ``MqttLink`` (reconnect with jittered backoff, TLS, credentials). The topics are
  retained, so a fresh start has every node's latest body within a moment of connecting.
  An empty retained message (the body deleted) removes the node's body.
* ``PollSource``: ``GET {url}/v1/throttle`` of each configured node every ``poll_interval``,
  ``max_in_flight`` at once, each with a timeout and the bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import structlog

from agentd.config import MqttConfig
from agentd.mqtt import MqttLink
from agentd.schedulers.config import PolledNode
from agentd.schedulers.slurm_sync import Observed
from agentd.schedulers.throttle import MAX_BODY_BYTES, BodyError, NodeThrottle, parse_body
from agentd.site import topics
from collectors.log_limit import RateLimitedLog

log = structlog.get_logger("agentd.slurm_sync")
SETTLE_QUIET_S = 0.5  # --once over MQTT: retained messages have all arrived after this much quiet


@dataclass(slots=True)
class _Held:
    body: NodeThrottle | None = None
    error: str | None = None  # why the last message / answer was not taken


class ThrottleSource(Protocol):
    """What the service asks of a source of throttle bodies."""

    @property
    def expected(self) -> Collection[str]:
        """The agentd nodes that should have a body (a missing one is reported)."""
        ...

    def latest(self) -> dict[str, Observed]:
        """Per agentd node: its latest good body, or why it has none."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the bodies current until ``stop`` is set."""
        ...

    async def settle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until a first view of every node is in; True when it is."""
        ...


class _Bodies:
    """The latest body per node, and the rate-limited complaints about the ones refused."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.held: dict[str, _Held] = {}
        self.refused = 0
        self._log = RateLimitedLog()

    def take(self, node: str, raw: bytes, where: str) -> None:
        held = self.held.setdefault(node, _Held())
        try:
            held.body = parse_body(raw, expect_node=node)
            held.error = None
        except BodyError as exc:
            self.refused += 1
            held.error = f"{where}: {exc}"
            self._log.emit(f"{node}:{exc}"[:300], self._monotonic(), log.warning, "throttle_refused", node=node,
                           source=where, error=str(exc),
                           hint="kept the last good body of this node (if any) until it expires")

    def failed(self, node: str, error: str, where: str) -> None:
        held = self.held.setdefault(node, _Held())
        held.error = error
        self._log.emit(f"{node}:fetch", self._monotonic(), log.warning, "throttle_fetch_failed", node=node,
                       source=where, error=error, hint="kept the last good body of this node (if any) until it "
                                                       "expires")

    def forget(self, node: str, why: str) -> None:
        self.held[node] = _Held(None, why)

    def latest(self) -> dict[str, Observed]:
        out: dict[str, Observed] = {}
        for node, held in self.held.items():
            if held.body is not None:
                out[node] = held.body
            elif held.error is not None:
                out[node] = held.error
        return out


class MqttSource:
    """Bodies from the retained ``agentd/v1/{site}/nodes/+/throttle`` topics."""

    def __init__(self, mqtt: MqttConfig, site: str, *, expected: Collection[str] = (),
                 monotonic: Callable[[], float] | None = None, client_id: str | None = None,
                 link_factory: Callable[..., MqttLink] = MqttLink) -> None:
        loop_time = monotonic or (lambda: asyncio.get_running_loop().time())
        self.site = site
        self.filter = topics.node_throttle_filter(site)
        self._expected = frozenset(expected)
        self._bodies = _Bodies(loop_time)
        self._monotonic = loop_time
        self._last_message = float("-inf")
        self.messages = 0
        self.link = link_factory(mqtt, client_id=client_id or mqtt.client_id or
                                 f"agentd-slurm-sync-{socket.gethostname().split('.')[0]}",
                                 subscriptions=[(self.filter, 1)], handler=self.on_messages)

    @property
    def expected(self) -> Collection[str]:
        return self._expected

    @property
    def refused(self) -> int:
        return self._bodies.refused

    def on_messages(self, batch: list[tuple[str, bytes]]) -> None:
        """The link's handler (on the loop, must not block)."""
        self._last_message = self._monotonic()
        for topic, payload in batch:
            self.messages += 1
            node = topics.node_of(topic)
            if node is None or topic != topics.node_throttle(self.site, node):
                continue
            if not payload:
                self._bodies.forget(node, f"{topic}: the retained body was deleted (empty message)")
                continue
            self._bodies.take(node, bytes(payload), topic)

    def latest(self) -> dict[str, Observed]:
        return self._bodies.latest()

    async def run(self, stop: asyncio.Event) -> None:
        await self.link.run(stop)

    async def settle(self, timeout_s: float) -> bool:
        """Connected, every expected node heard from (or none expected), and no message for a
        moment: the retained bodies come right after the subscription."""
        deadline = self._monotonic() + timeout_s
        connected_at: float | None = None
        while self._monotonic() < deadline:
            now = self._monotonic()
            if connected_at is None and self.link.connects:
                connected_at = now
            if connected_at is not None and now - max(connected_at, self._last_message) >= SETTLE_QUIET_S \
                    and self._expected <= set(self._bodies.held):
                return True
            await asyncio.sleep(0.05)
        return False


class PollSource:
    """Bodies from ``GET {url}/v1/throttle`` of every configured node."""

    def __init__(self, nodes: Collection[PolledNode], *, interval_s: float, timeout_s: float, max_in_flight: int = 32,
                 token: str | None = None, monotonic: Callable[[], float] | None = None) -> None:
        self.nodes = list(nodes)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._monotonic = monotonic or (lambda: asyncio.get_running_loop().time())
        self._bodies = _Bodies(lambda: self._monotonic())
        self.rounds = 0
        self._round_done = asyncio.Event()

    @property
    def expected(self) -> Collection[str]:
        return [n.name for n in self.nodes]

    @property
    def refused(self) -> int:
        return self._bodies.refused

    def latest(self) -> dict[str, Observed]:
        return self._bodies.latest()

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """One GET per node, ``max_in_flight`` at once."""
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(node: PolledNode) -> None:
            async with gate:
                await self._fetch(session, node)

        await asyncio.gather(*(one(n) for n in self.nodes))
        self.rounds += 1
        self._round_done.set()

    async def _fetch(self, session: aiohttp.ClientSession, node: PolledNode) -> None:
        url = f"{node.url}/v1/throttle"
        try:
            async with session.get(url, headers=self._headers,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                raw = await resp.content.read(MAX_BODY_BYTES + 1)
                if resp.status != 200:
                    text = raw[:300].decode("utf-8", "replace").strip()
                    hint = " (set api_token_file)" if resp.status in (401, 403) else ""
                    self._bodies.failed(node.name, f"GET {url}: HTTP {resp.status}{hint}: {text}", url)
                    return
        except TimeoutError:
            self._bodies.failed(node.name, f"GET {url}: no answer within {self.timeout_s:g}s (source.timeout)", url)
            return
        except aiohttp.ClientError as exc:
            self._bodies.failed(node.name, f"GET {url}: {type(exc).__name__}: {exc}", url)
            return
        self._bodies.take(node.name, raw, url)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                started = self._monotonic()
                await self.poll_once(session)
                wait_s = max(0.0, self.interval_s - (self._monotonic() - started))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait_s)
                except TimeoutError:
                    pass

    async def settle(self, timeout_s: float) -> bool:
        """One full round of polls done."""
        try:
            await asyncio.wait_for(self._round_done.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True
