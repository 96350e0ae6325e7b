"""The controller through the real Mosquitto (scripts/services): reports published by the test,
leases received retained and verified, the broker stopped and started again (the controller
resumes: it reconnects, re-subscribes and republishes every lease the restarted broker lost),
a subtree controller under a parent through the broker, and the command run as a process
(SIGTERM: a clean stop, exit 0).

Waiting is polling a condition with a deadline (what the broker delivers, how many cycles ran),
never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable

import aiomqtt
import pytest

from agentd.config import MqttConfig
from agentd.site import topics
from agentd.site.controller import ControllerCore
from agentd.site.controller_mqtt import ControllerService
from agentd.site.protocol import Lease, decode_lease, decode_report
from rules.domains import load_domains_text

pytestmark = pytest.mark.integration  # the real Mosquitto

KEY = b"m" * 32
DOMAINS = """
site: {site}
domains:
  site: {{cap_w: 10000}}
  hall-a: {{parent: site, cap_w: 8000, nodes: [a1, a2]}}
  hall-b: {{parent: site, cap_w: 8000, nodes: [b1, b2]}}
"""
NODES = ("a1", "a2", "b1", "b2")


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def report_doc(site: str, node: str, demand_w: float, seq: int, cls: str = "normal", kind: str = "node") -> bytes:
    return json.dumps({"v": 1, "kind": kind, "site": site, "node": node, "ts": time.time(), "seq": seq,
                       "gpus": 8, "gpu_power_w": demand_w, "demand_w": demand_w, "min_w": 800.0,
                       "floor_w": 1000.0, "max_w": 4000.0, "flexible_w": {cls: demand_w - 1000.0}}).encode()


class Reporter:
    """The nodes' side of the test: publishes every node's report every 0.1 s (QoS 0)."""

    def __init__(self, services, site: str, demand_w: dict[str, float]) -> None:
        self.services, self.site, self.demand_w = services, site, demand_w
        self.sent = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            try:
                async with aiomqtt.Client(self.services.mqtt_host, self.services.mqtt_port,
                                          identifier=f"nodes-{uuid.uuid4().hex[:6]}") as c:
                    while not self.stop.is_set():
                        seq += 1
                        for n, w in self.demand_w.items():
                            await c.publish(topics.node_power(self.site, n), report_doc(self.site, n, w, seq), qos=0)
                            self.sent += 1
                        try:
                            await asyncio.wait_for(self.stop.wait(), 0.1)
                        except TimeoutError:
                            pass
            except aiomqtt.MqttError:  # the broker is down (the restart test): try again
                await asyncio.sleep(0.1)


async def retained_leases(services, site: str, nodes, controller: str, timeout_s: float = 5.0) -> dict[str, Lease]:
    """What a node subscribing now would get: the retained lease of each node, verified."""
    want = {topics.node_budget(site, n, controller): n for n in nodes}
    got: dict[str, Lease] = {}
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                              identifier=f"check-{uuid.uuid4().hex[:6]}") as c:
        await c.subscribe([(t, 1) for t in want])
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in c.messages:
                    if not msg.retain:  # a lease sent after we subscribed: live, not what was kept
                        continue
                    got[want[msg.topic.value]] = decode_lease(bytes(msg.payload), KEY)
                    if len(got) == len(want):
                        break
        except TimeoutError:
            pass
    return got


def make_service(services, site: str, cid: str, **kw) -> ControllerService:
    settings = {"interval_s": 0.2, "lease_ttl_s": 3.0, "stale_after_s": 1.0, "release_hold_s": 0.0,
                "band_hold_s": 0.0} | kw.pop("core", {})
    core = ControllerCore(load_domains_text(DOMAINS.format(site=site)), site=site, controller_id=cid, key=KEY,
                          rng=random.Random(1), **settings)
    mqtt = MqttConfig(host=services.mqtt_host, port=services.mqtt_port, reconnect_min=0.05, reconnect_max=0.5)
    return ControllerService(core, mqtt, client_id=f"{cid}-{uuid.uuid4().hex[:6]}", **kw)


async def test_reports_through_the_broker_come_back_as_retained_signed_leases_under_the_cap(services):
    site = f"c-{uuid.uuid4().hex[:8]}"
    service = make_service(services, site, "ctl-a")
    reporter = Reporter(services, site, {"a1": 3500, "a2": 3500, "b1": 3000, "b2": 2500})
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(reporter.run())]
    try:
        await wait_for(lambda: service.core.stats.reports_accepted >= 40 and service.last is not None
                       and service.last.nodes == 4, what="reports accepted")
        await wait_for(lambda: service.last is not None and service.last.stale_nodes == 0
                       and service.core.stats.leases_sent >= 4, what="leases sent")
        got = await retained_leases(services, site, NODES, "ctl-a")
        assert set(got) == set(NODES)
        now = time.time()
        for n, lease in got.items():
            assert lease.target == f"nodes/{n}" and lease.controller == "ctl-a"
            assert lease.issued_at <= now + 0.5 < lease.expires_at
        # 12.5 kW demand on a 10 kW site: capping at 9.5 kW; hall-a (7 kW) within its 8 kW cap
        assert sum(lease.budget_w for lease in got.values()) <= 9500 + 1e-6
        assert service.core.stats.reports_refused == 0 and service.publish_failures == 0
    finally:
        reporter.stop.set()
        stop.set()
        await asyncio.gather(*tasks)


async def test_broker_restart_the_controller_reconnects_and_republishes_the_lost_leases(services):
    site = f"c-{uuid.uuid4().hex[:8]}"
    # a long TTL (refresh every 10 s) and no node going stale within the outage: the leases do
    # not change, so only the reconnect itself can make the controller send them again
    service = make_service(services, site, "ctl-r", core={"lease_ttl_s": 30.0, "stale_after_s": 60.0})
    reporter = Reporter(services, site, {"a1": 2000, "a2": 2000, "b1": 2000, "b2": 2000})
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(reporter.run())]
    try:
        await wait_for(lambda: service.core.stats.leases_sent >= 4 and service.link.connected, what="first leases")
        assert set(await retained_leases(services, site, NODES, "ctl-r")) == set(NODES)
        await asyncio.to_thread(services.stop, "mosquitto")
        try:
            await wait_for(lambda: not service.link.connected, what="loss noticed")
            cycles = service.cycles
            await wait_for(lambda: service.cycles >= cycles + 3, what="cycles going on without a broker")
        finally:
            await asyncio.to_thread(services.start, "mosquitto")
        back = time.monotonic()
        await wait_for(lambda: service.link.connected, what="reconnected")
        accepted = service.core.stats.reports_accepted
        await wait_for(lambda: service.core.stats.reports_accepted > accepted + 8, what="reports resumed")
        # the restarted broker kept nothing (persistence off): every lease was sent again at once
        got = await retained_leases(services, site, NODES, "ctl-r")
        assert set(got) == set(NODES), got
        assert time.monotonic() - back < 10.0  # well before the 10 s refresh would have resent them
        assert min(lease.issued_at for lease in got.values()) >= time.time() - (time.monotonic() - back) - 1.0
        assert service.link.connects >= 2
    finally:
        reporter.stop.set()
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_subtree_controller_under_its_parent_through_the_broker(services):
    site = f"c-{uuid.uuid4().hex[:8]}"
    parent = make_service(services, site, "ctl-site", core={"delegates": ["hall-a"]})
    child = make_service(services, site, "ctl-hall-a", core={"subtree": "hall-a", "failsafe_w": 2500.0})
    reporter = Reporter(services, site, {"a1": 3900, "a2": 3900, "b1": 3000, "b2": 3000})
    stop = asyncio.Event()
    tasks = [asyncio.create_task(parent.run(stop)), asyncio.create_task(child.run(stop)),
             asyncio.create_task(reporter.run())]
    try:
        assert child.core.parent_leases is not None
        await wait_for(lambda: child.last is not None and child.last.budget_source == "lease",
                       what="the parent's lease reached the subtree controller")
        await wait_for(lambda: parent.core.known().keys() >= {"@hall-a", "b1", "b2"}, what="parent's reporters")
        hall = child.last.root_limit_w if child.last else 0.0
        got = await retained_leases(services, site, ("a1", "a2"), "ctl-hall-a")
        assert set(got) == {"a1", "a2"} and sum(x.budget_w for x in got.values()) <= hall + 1e-6
        b = await retained_leases(services, site, ("b1", "b2"), "ctl-site")
        assert hall + sum(x.budget_w for x in b.values()) <= 10000 + 1e-6
        # the parent read the child's aggregate: hall-a's nodes reach it (the site's filter) and are dropped
        assert parent.core.stats.ignored > 0 and not {"a1", "a2"} & set(parent.core.known())
        assert child.core.stats.ignored == 0  # it subscribed to its own nodes only
        async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                                  identifier=f"check-{uuid.uuid4().hex[:6]}") as c:
            await c.subscribe(topics.domain_power(site, "hall-a"), qos=0)
            async with asyncio.timeout(5):
                msg = await anext(aiter(c.messages))
        agg = decode_report(bytes(msg.payload))
        assert agg.kind == "domain" and agg.node == "hall-a" and agg.budget_source == "lease"
    finally:
        reporter.stop.set()
        stop.set()
        await asyncio.gather(*tasks)


async def test_the_command_runs_against_the_broker_and_stops_cleanly_on_sigterm(services, tmp_path):
    site = f"c-{uuid.uuid4().hex[:8]}"
    (tmp_path / "domains.yaml").write_text(DOMAINS.format(site=site))
    (tmp_path / "site.key").write_bytes(KEY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd.site.controller_cli", "--domains", str(tmp_path / "domains.yaml"),
        "--broker", f"{services.mqtt_host}:{services.mqtt_port}", "--site-key-file", str(tmp_path / "site.key"),
        "--id", "ctl-cli", "--interval", "0.2s", "--lease-ttl", "2s", "--print-summary",
        "--state-dir", str(tmp_path / "state"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    reporter = Reporter(services, site, {"a1": 3000, "b1": 3000})
    rtask = asyncio.create_task(reporter.run())
    try:
        got: dict[str, Lease] = {}
        end = time.monotonic() + 30
        while set(got) != {"a1", "b1"}:
            assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            assert time.monotonic() < end, "no leases from the command"
            got = await retained_leases(services, site, ("a1", "b1"), "ctl-cli", timeout_s=1.0)
    finally:
        reporter.stop.set()
        await rtask
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines and all(line.startswith("site: ") for line in lines)  # one summary per cycle
    assert '"event": "controller_stopped"' in err.decode()
    from agentd.store import Store

    store = Store(tmp_path / "state" / "controller.sqlite")
    try:
        rows = store.query(measurement="domain_power")
    finally:
        store.close()
    assert any(",domain=hall-a," in r for r in rows) and any("controller=ctl-cli" in r for r in rows)


async def test_a_large_cycle_goes_out_without_waiting_and_without_aiomqtt_warnings(services, caplog):
    """60 leases in one cycle (aiomqtt's own warning threshold is 10 pending publishes): the
    cycle returns before the broker acknowledges them, every one arrives retained, and aiomqtt
    does not warn about pending calls."""
    import logging

    site = f"c-{uuid.uuid4().hex[:8]}"
    nodes = [f"n{i:02d}" for i in range(60)]
    doc = f"site: {site}\ndomains:\n  site: {{cap_w: 1000000, nodes: [{', '.join(nodes)}]}}\n"
    core = ControllerCore(load_domains_text(doc), site=site, controller_id="ctl-big", key=KEY,
                          rng=random.Random(1), interval_s=0.2, lease_ttl_s=30.0, stale_after_s=30.0)
    mqtt = MqttConfig(host=services.mqtt_host, port=services.mqtt_port, reconnect_min=0.05, reconnect_max=0.5)
    service = ControllerService(core, mqtt, client_id=f"ctl-big-{uuid.uuid4().hex[:6]}", out=lambda s: None)
    service._ingest([(topics.node_power(site, n), report_doc(site, n, 2000.0, 1)) for n in nodes])
    stop = asyncio.Event()
    link_task = asyncio.create_task(service.link.run(stop))
    try:
        await wait_for(lambda: service.link.connected, what="connected")
        caplog.set_level(logging.WARNING, logger="mqtt")
        await service.cycle_once()
        assert service.core.stats.leases_sent == len(nodes)
        assert service.in_flight == len(nodes)  # handed over, none awaited
        got = await retained_leases(services, site, nodes, "ctl-big")
        assert set(got) == set(nodes)
        await service.cycle_once()  # the acknowledgements are taken in the next cycle
        assert service.in_flight == 0 and service.leases_acked == len(nodes) and service.publish_failures == 0
        assert not [r for r in caplog.records if "pending publish calls" in r.getMessage()]
    finally:
        stop.set()
        await link_task
