"""The controller's MQTT layer without a broker: leases handed to the client without waiting for
acknowledgements (bounded; a failed one sent again next cycle), unchanged refreshes spread
over the refresh period while changed budgets (cuts above all) go out at once, and the
aiomqtt client sized so it does not warn every cycle.

The aiomqtt client is replaced by a recorder of paho ``publish`` calls whose acknowledgements
the test gives (or withholds); the clocks are injected. tests/test_controller_mqtt.py runs the
same service through the real Mosquitto.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from agentd.config import MqttConfig
from agentd.site import controller_mqtt, topics
from agentd.site.controller import ControllerCore, Publish
from agentd.site.controller_mqtt import ControllerService, RefreshPacer, lease_budget_w, make_client
from agentd.site.protocol import decode_lease
from rules.domains import load_domains_text

KEY = b"p" * 32
SITE = "pace"
NODES = [f"n{i:02d}" for i in range(12)]
DOMAINS = f"""
site: {SITE}
domains:
  site: {{cap_w: 60000, nodes: [{", ".join(NODES)}]}}
"""


# -- the pacer (pure) ----------------------------------------------------------------------------

def lease(topic: str, budget_w: float = 1000.0) -> Publish:
    return Publish(topic, json.dumps({"budget_w": budget_w}).encode(), 1, True)


def test_the_refreshes_of_one_cycle_are_spread_evenly_and_all_out_before_the_next_refresh():
    pacer = RefreshPacer(refresh_s=10 / 3, interval_s=1.0)
    assert pacer.spread_s == 3.0  # the core re-issues at the 4th cycle: everything is out by the 3rd
    batch = [lease(f"t/{i}/budget/c") for i in range(300)]
    pacer.offer(100.0, batch)
    per_cycle = [len(pacer.take(100.0 + k)) for k in range(4)]
    assert per_cycle == [1, 100, 100, 99]  # not 300 at once
    assert len(pacer) == 0


def test_a_refresh_offered_again_keeps_its_earlier_due_time_so_none_is_pushed_back_for_ever():
    pacer = RefreshPacer(refresh_s=3.0, interval_s=1.0)
    batch = [lease(f"t/{i}/budget/c") for i in range(10)]
    pacer.offer(0.0, batch)
    pacer.offer(1.0, list(reversed(batch)))  # the last of the first batch is now first: due at 1.0
    out = pacer.take(2.0)
    # due at <= 2.0: from the first offer i/10 x 2 s <= 2 s (all), so all ten, each once
    assert sorted(m.topic for m in out) == sorted(m.topic for m in batch)


def test_dropped_refreshes_are_never_sent_and_a_short_refresh_sends_at_once():
    pacer = RefreshPacer(refresh_s=3.0, interval_s=1.0)
    pacer.offer(0.0, [lease("a/budget/c"), lease("b/budget/c")])
    pacer.drop("b/budget/c")
    assert [m.topic for m in pacer.take(10.0)] == ["a/budget/c"]
    assert RefreshPacer(refresh_s=1.0, interval_s=1.0).spread_s == 0.0  # nothing to spread over
    fast = RefreshPacer(refresh_s=0.5, interval_s=1.0)
    fast.offer(0.0, [lease("a/budget/c"), lease("b/budget/c")])
    assert len(fast.take(0.0)) == 2


def test_lease_budget_reads_leases_only():
    assert lease_budget_w(lease("x/nodes/n/budget/c", 812.5)) == 812.5
    assert lease_budget_w(Publish("x/nodes/n/budget/c", b"", 1, True)) is None  # a cleared lease
    assert lease_budget_w(Publish("x/domains/d/power", b'{"budget_w": 1}', 0, False)) is None
    assert lease_budget_w(Publish("x/nodes/n/budget/c", b"not json", 1, True)) is None


async def test_the_client_does_not_warn_below_the_in_flight_bound():
    client = make_client("127.0.0.1", 1)
    assert client.pending_calls_threshold > controller_mqtt.MAX_INFLIGHT
    assert client._client._max_inflight_messages == controller_mqtt.MAX_INFLIGHT


# -- the service with a recording client ---------------------------------------------------------

@dataclass
class Info:
    mid: int
    rc: int = 0
    _published: bool = False


@dataclass
class FakePaho:
    """What the service calls on aiomqtt's paho client: ``publish`` (never blocks, never acks by itself)."""

    sent: list[tuple[str, bytes, Info]] = field(default_factory=list)
    rc: int = 0

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        info = Info(len(self.sent) + 1, self.rc)
        self.sent.append((topic, payload, info))
        return info

    def ack_all(self) -> None:
        for _, _, info in self.sent:
            info._published = True

    def budgets(self, start: int = 0) -> dict[str, float]:
        return {t.split("/")[4]: decode_lease(p, KEY).budget_w for t, p, _ in self.sent[start:]}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def wall(self) -> float:
        return self.t

    def mono(self) -> float:
        return self.t - 1_600_000_000.0


def report(node: str, demand_w: float, now: float, seq: int) -> bytes:
    return json.dumps({"v": 1, "kind": "node", "site": SITE, "node": node, "ts": now, "seq": seq, "gpus": 8,
                       "gpu_power_w": demand_w, "demand_w": demand_w, "min_w": 800.0, "floor_w": 1000.0,
                       "max_w": 8000.0, "flexible_w": {"low": demand_w - 1000.0}}).encode()


def make(clock: Clock, **core_kw: Any) -> tuple[ControllerService, FakePaho]:
    settings = {"interval_s": 1.0, "lease_ttl_s": 10.0, "stale_after_s": 30.0, "release_hold_s": 0.0,
                "band_hold_s": 0.0} | core_kw
    core = ControllerCore(load_domains_text(DOMAINS), site=SITE, controller_id="ctl", key=KEY,
                          rng=random.Random(3), timer=lambda: 0.0, **settings)
    service = ControllerService(core, MqttConfig(host="127.0.0.1", port=1, timeout=2.0), wall=clock.wall,
                                monotonic=clock.mono, out=lambda s: None)
    paho = FakePaho()
    service._client = type("C", (), {"_client": paho})()  # what the link's factory would have made
    service.link.connected = True
    service.link.connects = 1
    return service, paho


def feed(service: ControllerService, clock: Clock, demand_w: dict[str, float], seq: int) -> None:
    service._ingest([(topics.node_power(SITE, n), report(n, w, clock.t, seq)) for n, w in demand_w.items()])


async def test_unchanged_refreshes_are_spread_and_a_cut_goes_out_in_its_own_cycle(monkeypatch):
    clock = Clock()
    service, paho = make(clock)
    feed(service, clock, {n: 3000.0 for n in NODES}, 1)  # 36 kW on a 60 kW site: uncapped
    await service.cycle_once()
    assert len(paho.sent) == len(NODES)  # first leases: all at once
    first = paho.budgets()
    paho.ack_all()
    per_cycle = []
    for k in range(1, 12):
        clock.t += 1.0
        feed(service, clock, {n: 3000.0 for n in NODES}, k + 1)
        before = len(paho.sent)
        await service.cycle_once()
        per_cycle.append(len(paho.sent) - before)
        paho.ack_all()
    # the core re-issues all 12 every 10/3 s (at the 4th and 8th cycles); the pacer sends them
    # over that cycle and the next two, never all 12 in one cycle
    assert sum(per_cycle) == 2 * len(NODES) and max(per_cycle) < len(NODES), per_cycle
    assert paho.budgets(len(NODES)) == first  # refreshes: the same budgets
    assert service.leases_paced == 2 * len(NODES)

    # the site steps over its cap: every cut goes out in the cycle that computed it, not paced
    clock.t += 1.0
    feed(service, clock, {n: 7000.0 for n in NODES}, 20)
    before = len(paho.sent)
    result = await service.cycle_once()
    cut = {n for n, w in result.budgets_w.items() if w < first[n] - 1.0}
    assert cut, result.budgets_w
    sent_now = paho.budgets(before)
    assert cut <= set(sent_now), (cut, sent_now)
    for n in cut:
        assert sent_now[n] < first[n]
    # and no older, higher refresh of a cut node is queued behind it
    assert not {m.topic for _, m in service.pacer._queued.items()} & {topics.node_budget(SITE, n, "ctl") for n in cut}


async def test_the_cycle_never_waits_for_acknowledgements_and_an_unacknowledged_lease_is_sent_again():
    clock = Clock()
    service, paho = make(clock)
    feed(service, clock, {n: 3000.0 for n in NODES}, 1)
    await service.cycle_once()  # returns with every lease unacknowledged: nothing awaited
    assert len(paho.sent) == len(NODES) and service.in_flight == len(NODES)
    clock.t += 1.0
    await service.cycle_once()
    assert len(paho.sent) == len(NODES)  # within mqtt.timeout (2 s): not yet a failure
    clock.t += 1.5
    await service.cycle_once()  # past the deadline: each is handed back and sent again at once
    assert service.publish_failures == len(NODES)
    assert len(paho.sent) == 2 * len(NODES)
    assert set(paho.budgets(len(NODES))) == set(NODES)
    paho.ack_all()
    clock.t += 1.0
    await service.cycle_once()
    assert service.in_flight == 0 and service.leases_acked == len(NODES)  # the resent ones
    assert service.publish_failures == len(NODES)  # the acknowledged ones are not failures


async def test_beyond_the_outstanding_bound_a_lease_waits_for_the_next_cycle(monkeypatch):
    monkeypatch.setattr(controller_mqtt, "MAX_OUTSTANDING", 5)
    clock = Clock()
    service, paho = make(clock)
    feed(service, clock, {n: 3000.0 for n in NODES}, 1)
    await service.cycle_once()
    assert len(paho.sent) == 5 and service.publish_failures == len(NODES) - 5  # bounded, none lost:
    paho.ack_all()
    clock.t += 1.0
    await service.cycle_once()  # the 7 refused ones are issued again (5 of them fit)
    paho.ack_all()
    clock.t += 1.0
    await service.cycle_once()
    assert set(paho.budgets()) == set(NODES)  # every node got its lease


async def test_a_refused_publish_and_a_lost_connection_are_retried_not_lost():
    clock = Clock()
    service, paho = make(clock)
    paho.rc = 4  # paho: MQTT_ERR_NO_CONN
    feed(service, clock, {n: 3000.0 for n in NODES}, 1)
    await service.cycle_once()
    assert service.publish_failures == len(NODES)
    paho.rc = 0
    clock.t += 1.0
    await service.cycle_once()
    ok = [t for t, _, i in paho.sent if i.rc == 0]
    assert len(ok) == len(NODES)
    # the connection drops with them unacknowledged: failures; the reconnect resends all at once
    service.link.connected = False
    clock.t += 1.0
    await service.cycle_once()
    assert service.in_flight == 0 and service.publish_failures == 2 * len(NODES) + len(NODES)
    service.link.connected, service.link.connects = True, 2
    before = len(paho.sent)
    clock.t += 1.0
    await service.cycle_once()
    assert set(paho.budgets(before)) == set(NODES)


@pytest.mark.parametrize("bad", [b"", b"{}"])
def test_a_cleared_or_odd_retained_message_is_sent_at_once_not_paced(bad):
    clock = Clock()
    service, paho = make(clock)
    topic = topics.node_budget(SITE, NODES[0], "ctl")
    service._dispatch([Publish(topic, bad, 1, True)])
    service._dispatch([Publish(topic, bad, 1, True)])
    assert len(paho.sent) == 2 and len(service.pacer) == 0
