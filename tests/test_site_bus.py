"""The in-process bus (MQTT semantics the site protocol needs) and the shared MQTT connection."""

import asyncio

import pytest

from agentd.config import MqttConfig
from agentd.site.bus import InProcessBus, SharedMqttBus, TopicTree, check_filter, check_topic, topic_matches


def recorder():
    got = []

    def handler(topic, payload):
        got.append((topic, payload))
    return got, handler


@pytest.mark.parametrize("flt, topic, expected", [
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b", False),
    ("a/+/c", "a/x/c", True),
    ("a/+/c", "a/x/y/c", False),
    ("a/+", "a/", True),  # an empty level is a level
    ("a/#", "a", True),  # '#' also matches the parent level
    ("a/#", "a/b/c/d", True),
    ("#", "a/b", True),
    ("+/+", "a/b", True),
    ("+", "a/b", False),
    ("#", "$SYS/broker/load", False),  # a leading wildcard does not match '$' topics
    ("+/broker/load", "$SYS/broker/load", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("agentd/v1/s/nodes/+/budget/+", "agentd/v1/s/nodes/n1/budget/c1", True),
    ("agentd/v1/s/nodes/+/budget/+", "agentd/v1/s/nodes/n1/power", False),
])
def test_filter_matching(flt, topic, expected):
    assert topic_matches(flt, topic) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "", "a/\x00"])
def test_bad_filters_are_refused(bad):
    with pytest.raises(ValueError):
        check_filter(bad)


@pytest.mark.parametrize("bad", ["a/+/b", "a/#", "", "a\x00b"])
def test_bad_topics_are_refused(bad):
    with pytest.raises(ValueError):
        check_topic(bad)
    with pytest.raises(ValueError):
        InProcessBus().publish(bad, b"x")


def test_delivery_is_fifo_and_once_per_subscriber():
    bus = InProcessBus()
    got, h = recorder()
    other, h2 = recorder()
    bus.subscribe("a/#", h)
    bus.subscribe("a/+", h)  # overlapping: still one copy per message
    bus.subscribe("a/2", h2)
    for k in range(3):
        bus.publish(f"a/{k}", str(k).encode())
    assert got == [] and bus.pending == 3  # nothing arrives before deliver
    assert bus.deliver() == 3
    assert got == [("a/0", b"0"), ("a/1", b"1"), ("a/2", b"2")]
    assert other == [("a/2", b"2")]


def test_messages_published_by_handlers_are_delivered_in_the_same_call_in_order():
    bus = InProcessBus()
    got, h = recorder()

    def echo(topic, payload):
        bus.publish("reply/" + topic, payload)
    bus.subscribe("req/#", echo)
    bus.subscribe("reply/#", h)
    bus.publish("req/1", b"a")
    bus.publish("req/2", b"b")
    bus.deliver()
    assert got == [("reply/req/1", b"a"), ("reply/req/2", b"b")]


def test_retained_messages_reach_later_subscribers_and_are_replaced_and_removed():
    bus = InProcessBus()
    bus.publish("n/1/budget/c1", b"old", retain=True)
    bus.publish("n/1/budget/c1", b"new", retain=True)
    bus.publish("n/1/budget/c2", b"x", retain=True)
    bus.publish("n/1/budget/c2", b"", retain=True)  # empty retained payload: removed
    bus.publish("n/1/power", b"not retained")
    bus.deliver()
    got, h = recorder()
    bus.subscribe("n/1/#", h)
    bus.deliver()
    assert got == [("n/1/budget/c1", b"new")]
    assert bus.retained() == {"n/1/budget/c1": b"new"}


def test_a_failing_handler_is_counted_and_the_others_still_get_the_message():
    bus = InProcessBus()
    got, h = recorder()

    def broken(topic, payload):
        raise RuntimeError("boom")
    bus.subscribe("t", broken)
    bus.subscribe("t", h)
    bus.publish("t", b"1")
    bus.deliver()
    assert got == [("t", b"1")]
    assert bus.stats.handler_errors == 1 and "boom" in bus.last_error


def test_an_outage_loses_messages_and_a_return_redelivers_retained():
    bus = InProcessBus()
    got, h = recorder()
    bus.subscribe("n/+/budget/+", h)
    bus.publish("n/1/budget/c", b"lease", retain=True)
    bus.set_online(False)  # queued but undelivered: lost, as in a broker crash
    bus.publish("n/1/budget/c", b"during", retain=True)
    assert bus.stats.dropped_offline == 1
    bus.deliver()
    assert got == []
    bus.set_online(True)
    bus.deliver()
    assert got == [("n/1/budget/c", b"lease")]  # the retained lease from before the outage
    bus.set_online(False, keep_retained=False)
    bus.set_online(True)
    assert bus.retained() == {} and bus.deliver() == 0


def test_unsubscribe_and_qos_checks():
    bus = InProcessBus()
    got, h = recorder()
    bus.subscribe("t/+", h)
    assert bus.unsubscribe("t/+", h) and not bus.unsubscribe("t/+", h)
    bus.publish("t/1", b"x")
    bus.deliver()
    assert got == []
    with pytest.raises(ValueError, match="qos"):
        bus.publish("t/1", b"x", qos=3)


def test_tree_cost_does_not_grow_with_filters():
    tree = TopicTree()
    hits = []
    for n in range(5000):
        tree.add(f"agentd/v1/s/nodes/n{n}/budget/+", lambda t, p, n=n: hits.append(n))
    handlers = tree.match("agentd/v1/s/nodes/n4321/budget/ctl")
    assert len(handlers) == 1
    handlers[0]("", b"")
    assert hits == [4321]


@pytest.mark.integration
async def test_shared_connection_carries_many_nodes_through_a_real_broker(services):
    cfg = MqttConfig(host=services.mqtt_host, port=services.mqtt_port)
    nodes = SharedMqttBus(cfg, client_id="test-sim-nodes")
    ctl = SharedMqttBus(cfg, client_id="test-sim-ctl")
    site = f"t{id(nodes) % 100000}"
    leases: dict[str, list[bytes]] = {}
    reports: list[str] = []
    for k in range(50):
        name = f"n{k}"
        nodes.subscribe(f"agentd/v1/{site}/nodes/{name}/budget/+",
                        lambda t, p, name=name: leases.setdefault(name, []).append(p))
    ctl.subscribe(f"agentd/v1/{site}/nodes/+/power", lambda t, p: reports.append(t.split("/")[4]))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(b.run(stop)) for b in (nodes, ctl)]
    try:
        await nodes.wait_connected(10)
        await ctl.wait_connected(10)
        await asyncio.sleep(0.2)  # let the SUBSCRIBEs land (a connect is not a subscription)
        for k in range(50):
            nodes.publish(f"agentd/v1/{site}/nodes/n{k}/power", b"{}")
        await nodes.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(reports) < 50 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert sorted(reports, key=lambda n: int(n[1:])) == [f"n{k}" for k in range(50)]
        for k in range(50):
            ctl.publish(f"agentd/v1/{site}/nodes/n{k}/budget/c1", f"lease-{k}".encode(), qos=1, retain=True)
        await ctl.flush()
        while len(leases) < 50 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert {n: v for n, v in leases.items()} == {f"n{k}": [f"lease-{k}".encode()] for k in range(50)}
        assert nodes.stats.handler_errors == 0
    finally:
        for k in range(50):  # leave no retained leases behind on the shared broker
            ctl.publish(f"agentd/v1/{site}/nodes/n{k}/budget/c1", b"", qos=1, retain=True)
        await ctl.flush()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
