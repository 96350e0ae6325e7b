"""The shipped Mosquitto ACL (systemd/mosquitto-acl.example), as shipped, on a real Mosquitto.

This test starts its OWN broker (not the shared one of scripts/services: that one allows
anonymous clients), with ``allow_anonymous false``, a password file made by
``mosquitto_passwd`` and the example ACL, and checks with real clients (one per user) that:

* a controller's signed lease reaches its node (retained: the node subscribes afterwards);
* a node cannot publish a budget (for itself or another node), nor another node's report;
* a node cannot read another node's lease;
* one controller replica cannot overwrite another's lease topic;
* an anonymous client and a wrong password are refused.

A denied publish is dropped silently (MQTT 3.1.1), so "nothing arrived" is proven without
waiting on a timer: the forbidden message is published first (QoS 1, its PUBACK awaited, so
the broker has handled it), then an allowed *sentinel* that the same subscriber does receive.
Mosquitto handles messages one at a time in arrival order, so had the forbidden one been
allowed it would have been queued to that subscriber before the sentinel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from agentd.site import topics
from agentd.site.protocol import Lease, decode_lease, encode_lease

pytestmark = pytest.mark.integration  # a real Mosquitto (its own, started here)

ACL_EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "mosquitto-acl.example"
KEY = b"k" * 32
NODES = ("gpu-001", "gpu-002")
CONTROLLERS = ("controller-a", "controller-b", "controller-hall-a")
TIMEOUT_S = 10.0


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return None


def _require(name: str) -> str:
    path = _binary(name)
    if path is None:
        why = f"{name} not installed (apt-get install mosquitto mosquitto-clients)"
        if os.environ.get("CI"):
            pytest.fail(f"$CI is set but {why}: the ACL must be tested in CI")
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _password(user: str) -> str:
    return f"pw-{user}"


@dataclass
class Broker:
    host: str
    port: int
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto with passwords and the shipped ACL, on a free loopback port."""
    mosquitto = _require("mosquitto")
    passwd_bin = _require("mosquitto_passwd")
    d = tmp_path_factory.mktemp("acl-broker")
    passwd = d / "passwd"
    for i, user in enumerate((*NODES, *CONTROLLERS)):
        args = [passwd_bin, "-b", *(["-c"] if i == 0 else []), str(passwd), user, _password(user)]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    port = _free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        f"acl_file {ACL_EXAMPLE}\n"
        "persistence false\n"
        f"user {os.environ.get('USER') or subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip()}\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")
    log = d / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # poll the port: the broker answers once it has read the ACL
            assert proc.poll() is None, f"mosquitto exited: {log.read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert time.monotonic() < deadline, f"mosquitto did not listen on {port}: {log.read_text()}"
            time.sleep(0.02)
        yield Broker("127.0.0.1", port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.asynccontextmanager
async def client(broker: Broker, user: str | None, password: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    pw = password if password is not None else (_password(user) if user else None)
    async with aiomqtt.Client(broker.host, broker.port, username=user, password=pw,
                              identifier=f"{user or 'anon'}-{os.urandom(3).hex()}", timeout=TIMEOUT_S) as c:
        yield c


async def collect_until(c: aiomqtt.Client, sentinel: bytes) -> list[tuple[str, bytes]]:
    """Every message ``c`` receives up to and including the one whose payload is ``sentinel``."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(TIMEOUT_S):
        async for msg in c.messages:
            got.append((msg.topic.value, bytes(msg.payload)))
            if msg.payload == sentinel:
                return got
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture
def site() -> str:
    """A site of its own per test, so one test's retained leases never reach another's clients
    (the ACL's patterns match any site)."""
    return f"acl-{uuid.uuid4().hex[:8]}"


def lease_payload(site: str, node: str, controller: str, budget_w: float, seq: int) -> bytes:
    now = time.time()
    return encode_lease(Lease(site=site, target=f"nodes/{node}", controller=controller, budget_w=budget_w,
                              issued_at=now, expires_at=now + 10, seq=seq), KEY)


async def test_a_controllers_lease_reaches_its_node_retained_and_verifies(broker, site):
    topic = topics.node_budget(site, "gpu-001", "controller-a")
    async with client(broker, "controller-a") as ctl:
        await ctl.publish(topic, lease_payload(site, "gpu-001", "controller-a", 4321.0, 1), qos=1, retain=True)
    async with client(broker, "gpu-001") as node:  # subscribes after: the retained lease is there
        await node.subscribe(topics.node_budget_filter(site, "gpu-001"), qos=1)
        async with asyncio.timeout(TIMEOUT_S):
            msg = await anext(aiter(node.messages))
    assert msg.topic.value == topic and msg.retain
    assert decode_lease(bytes(msg.payload), KEY).budget_w == 4321.0


async def test_a_node_cannot_publish_a_budget_for_itself_or_another_node(broker, site):
    own = topics.node_budget(site, "gpu-002", "controller-a")       # posing as the controller
    as_node = topics.node_budget(site, "gpu-002", "gpu-002")         # its own "controller" id
    other = topics.node_budget(site, "gpu-001", "controller-a")
    async with client(broker, "gpu-002") as rogue, client(broker, "gpu-001") as victim, \
            client(broker, "gpu-002") as rogue_reader, client(broker, "controller-a") as ctl:
        await victim.subscribe(topics.node_budget_filter(site, "gpu-001"), qos=1)
        await rogue_reader.subscribe(topics.node_budget_filter(site, "gpu-002"), qos=1)
        for topic, node in ((own, "gpu-002"), (as_node, "gpu-002"), (other, "gpu-001")):
            await rogue.publish(topic, lease_payload(site, node, "controller-a", 0.0, 99), qos=1, retain=True)
        # the sentinels: real leases from the controller, after the rogue's were handled
        await ctl.publish(other, b"sentinel-1", qos=1)
        await ctl.publish(own, b"sentinel-2", qos=1)
        seen_by_victim = await collect_until(victim, b"sentinel-1")
        seen_by_rogue = await collect_until(rogue_reader, b"sentinel-2")
    assert seen_by_victim == [(other, b"sentinel-1")]
    assert seen_by_rogue == [(own, b"sentinel-2")]
    # nor was anything retained: a fresh subscriber sees only what the controller left
    async with client(broker, "gpu-002") as fresh, client(broker, "controller-a") as ctl:
        await fresh.subscribe(topics.node_budget_filter(site, "gpu-002"), qos=1)
        await ctl.publish(own, b"sentinel-3", qos=1)
        seen = await collect_until(fresh, b"sentinel-3")
    assert seen == [(own, b"sentinel-3")]  # no zero budget was retained on any of those topics


async def test_a_node_cannot_publish_another_nodes_report(broker, site):
    theirs = topics.node_power(site, "gpu-001")
    mine = topics.node_power(site, "gpu-002")
    async with client(broker, "controller-a") as ctl, client(broker, "gpu-002") as rogue:
        await ctl.subscribe(topics.node_power_filter(site), qos=1)
        await rogue.publish(theirs, b"forged", qos=1)
        await rogue.publish(mine, b"own-report", qos=1)  # same client: handled after the forged one
        seen = await collect_until(ctl, b"own-report")
    assert seen == [(mine, b"own-report")]


async def test_a_node_cannot_read_another_nodes_lease(broker, site):
    other = topics.node_budget(site, "gpu-001", "controller-b")
    mine = topics.node_budget(site, "gpu-002", "controller-b")
    async with client(broker, "gpu-002") as snoop, client(broker, "controller-b") as ctl:
        # subscribing is not refused outright by Mosquitto 2.0; what matters is what arrives
        await snoop.subscribe([(topics.node_budget_filter(site, "gpu-001"), 1),
                               (f"agentd/v1/{site}/nodes/+/budget/+", 1)])
        await ctl.publish(other, lease_payload(site, "gpu-001", "controller-b", 1000.0, 1), qos=1, retain=True)
        await ctl.publish(mine, b"sentinel", qos=1)
        seen = await collect_until(snoop, b"sentinel")
    assert {t for t, _ in seen} == {mine}, seen


async def test_one_controller_cannot_overwrite_another_replicas_lease(broker, site):
    a_topic = topics.node_budget(site, "gpu-002", "controller-a")
    async with client(broker, "gpu-002") as node, client(broker, "controller-a") as a, \
            client(broker, "controller-b") as b:
        await node.subscribe(a_topic, qos=1)
        await b.publish(a_topic, b"forged-by-b", qos=1)
        await a.publish(a_topic, b"sentinel", qos=1)
        seen = await collect_until(node, b"sentinel")
    assert [p for _, p in seen if p == b"forged-by-b"] == []


async def test_the_subtree_controller_gets_its_parents_lease_and_reports_upward_but_no_node_can(broker, site):
    lease_topic = topics.domain_budget(site, "hall-a", "controller-a")
    forged = topics.domain_budget(site, "hall-a", "gpu-001")
    up = topics.domain_power(site, "hall-a")
    async with client(broker, "controller-hall-a") as child, client(broker, "controller-a") as parent, \
            client(broker, "gpu-001") as rogue:
        await child.subscribe(topics.domain_budget_filter(site, "hall-a"), qos=1)
        await parent.subscribe(f"agentd/v1/{site}/domains/+/power", qos=1)
        await rogue.publish(forged, b"forged", qos=1, retain=True)        # a node posing as a parent
        await rogue.publish(up, b"forged-aggregate", qos=1)               # ... or as the subtree
        await parent.publish(lease_topic, b"parent-lease", qos=1, retain=True)
        await child.publish(up, b"aggregate", qos=1)
        assert await collect_until(child, b"parent-lease") == [(lease_topic, b"parent-lease")]
        assert await collect_until(parent, b"aggregate") == [(up, b"aggregate")]


async def test_anonymous_and_wrong_password_clients_are_refused(broker, site):
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, None):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, "gpu-001", password="wrong"):
            pass
