"""The node side of site power caps through the real Mosquitto (scripts/services).

A signed retained lease published by the test caps a daemon on simulated GPUs; forged and
unsigned leases are refused and change nothing; the node's power report arrives on its topic
and decodes; a broker restart (Mosquitto here keeps no retained messages) leaves the node on its
last lease until it expires, then on its failsafe, and a lease after the restart caps it again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiomqtt
import pytest

from agentd.clock import SystemClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.site import topics
from agentd.site.protocol import Lease, decode_report, encode_lease
from collectors.sim import SimBackend

pytestmark = pytest.mark.integration

KEY = b"integration-site-key-0123456789"


async def wait_for(predicate, timeout_s=20.0, what="condition"):
    """Poll real I/O (the broker delivering, a reconnect), never a timer of ours."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def signed(site: str, node: str, ctrl: str, budget_w: float, ttl_s: float, seq: int, key: bytes = KEY) -> bytes:
    now = time.time()
    return encode_lease(Lease(site=site, target=f"nodes/{node}", controller=ctrl, budget_w=budget_w,
                              issued_at=now, expires_at=now + ttl_s, seq=seq), key)


def capped_sum(backend: SimBackend) -> float:
    return sum(backend.limits_w().values())


async def test_a_signed_retained_lease_caps_the_node_and_forged_ones_are_refused(services, tmp_path):
    site, node = f"t{uuid.uuid4().hex[:8]}", "gpu-001"
    (tmp_path / "site.key").write_bytes(KEY)
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": node, "site": site, "interval": 0.1,
        "sim": {"gpus": 2}, "mqtt": {"host": services.mqtt_host, "port": services.mqtt_port},
        "rules": {"builtin_packs": False, "dirs": [], "ramp_w_per_s": 10_000.0, "hold_s": 0.0},
        "budget": {"enabled": True, "failsafe_w": 1000.0, "site_key_file": str(tmp_path / "site.key"),
                   "max_lease_ttl": "4s"}})
    backend = SimBackend(gpus=2, seed=4, profile="training")  # ~690 W per GPU, 1400 W uncapped
    daemon = Daemon(cfg, backend, open_store(cfg), clock=SystemClock())
    await daemon.start()
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    reports: list[bytes] = []
    try:
        async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                                  identifier=f"ctrl-{uuid.uuid4().hex[:6]}") as ctrl:
            await ctrl.subscribe(topics.node_power(site, node), qos=0)

            async def collect():
                async for msg in ctrl.messages:
                    reports.append(bytes(msg.payload))

            collector = asyncio.create_task(collect())
            await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
            await wait_for(lambda: daemon.last_site is not None and daemon.last_site.level == "failsafe",
                           what="failsafe before any lease")
            # the failsafe binds (1000 < 1400); the write follows the site step on the NVML thread
            await wait_for(lambda: abs(capped_sum(backend) - 1000.0) < 1e-6, what="the failsafe written")

            good = topics.node_budget(site, node, "ctrl-t")
            await ctrl.publish(good, signed(site, node, "ctrl-t", 700.0, 60.0, 1), qos=1, retain=True)
            await wait_for(lambda: capped_sum(backend) <= 700.0 + 1e-6, what="the lease's budget written")
            assert daemon.last_site.budget.source == "lease"
            assert {c.source for c in daemon.actuator.controls.values()} == {"node:budget"}

            forged = topics.node_budget(site, node, "ctrl-f")
            await ctrl.publish(forged, signed(site, node, "ctrl-f", 100.0, 60.0, 1, key=b"wrong-key-" * 4),
                               qos=1, retain=True)
            unsigned = topics.node_budget(site, node, "ctrl-u")
            doc = json.loads(signed(site, node, "ctrl-u", 50.0, 60.0, 1))
            doc.pop("sig")
            await ctrl.publish(unsigned, json.dumps(doc).encode(), qos=1, retain=True)
            tracker = daemon.site.tracker
            await wait_for(lambda: tracker.refused.get("bad_signature") == 1 and tracker.refused.get("unsigned") == 1,
                           what="forged and unsigned leases refused")
            await asyncio.sleep(0.3)  # three more ticks with them around
            assert capped_sum(backend) == pytest.approx(700.0)  # not 400 (both GPUs at their minimum)
            assert daemon.last_site.budget.controllers == ["ctrl-t"]

            await wait_for(lambda: any(decode_report(p).budget_source == "lease" for p in reports),
                           what="a report with the lease's budget")
            last = decode_report(reports[-1])
            assert (last.site, last.node, last.gpus, last.budget_w) == (site, node, 2, 700.0)
            assert last.max_w == 1400.0 and last.min_w == 400.0
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            for t in (good, forged, unsigned):  # leave no retained lease behind
                await ctrl.publish(t, b"", qos=1, retain=True)
        await wait_for(lambda: daemon.last_site.budget.source == "failsafe", what="cleared leases: failsafe")
    finally:
        stop.set()
        await running
    assert daemon.mqtt.handler_errors == 0


async def test_a_broker_restart_leaves_the_node_on_its_last_lease_until_expiry_then_failsafe(services, tmp_path):
    site, node = f"t{uuid.uuid4().hex[:8]}", "gpu-002"
    (tmp_path / "site.key").write_bytes(KEY)
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": node, "site": site, "interval": 0.1,
        "sim": {"gpus": 2}, "mqtt": {"host": services.mqtt_host, "port": services.mqtt_port,
                                     "reconnect_max": 0.5},
        "rules": {"builtin_packs": False, "dirs": [], "ramp_w_per_s": 10_000.0, "hold_s": 0.0},
        "budget": {"enabled": True, "failsafe_w": 1000.0, "site_key_file": str(tmp_path / "site.key"),
                   "max_lease_ttl": "10s"}})
    backend = SimBackend(gpus=2, seed=4, profile="training")
    daemon = Daemon(cfg, backend, open_store(cfg), clock=SystemClock())
    await daemon.start()
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    topic = topics.node_budget(site, node, "ctrl-t")
    try:
        await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
        async with aiomqtt.Client(services.mqtt_host, services.mqtt_port) as ctrl:
            await ctrl.publish(topic, signed(site, node, "ctrl-t", 600.0, 3.0, 1), qos=1, retain=True)
        await wait_for(lambda: capped_sum(backend) <= 600.0 + 1e-6, what="capped by the lease")
        expires_at = daemon.site.tracker.budget(time.time()).expires_at
        services.stop("mosquitto")
        try:
            await wait_for(lambda: not daemon.mqtt.connected, what="the daemon sees the broker gone")
            while time.time() < expires_at - 0.3:  # rides its last lease while the broker is away
                assert capped_sum(backend) <= 600.0 + 1e-6 and daemon.last_site.budget.source == "lease"
                await asyncio.sleep(0.1)
            await wait_for(lambda: daemon.last_site.budget.source == "failsafe", timeout_s=5.0,
                           what="failsafe after the lease expired")
            await wait_for(lambda: capped_sum(backend) == pytest.approx(1000.0), timeout_s=5.0,
                           what="the failsafe budget written")
        finally:
            services.start("mosquitto")
        await wait_for(lambda: daemon.mqtt.connected, what="reconnected")
        async with aiomqtt.Client(services.mqtt_host, services.mqtt_port) as ctrl:
            await ctrl.publish(topic, signed(site, node, "ctrl-t", 500.0, 5.0, 2), qos=1, retain=True)
            await wait_for(lambda: capped_sum(backend) <= 500.0 + 1e-6, what="capped again after the restart")
            await ctrl.publish(topic, b"", qos=1, retain=True)
        assert daemon.site.tracker.refused == {}
    finally:
        stop.set()
        await running
