"""The retained throttle topic: when a body goes out (pure, with a fake link) and, against the real
Mosquitto (scripts/services), that it is retained, republished on a change, not republished when
only timestamps and readings move, and at least every api.publish_every_s; events on their topic."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import aiomqtt
import pytest

from agentd.api.models import EventMessage, Throttle
from agentd.api.publish import MIN_GAP_S, ThrottlePublisher
from agentd.api.snapshot import ControlView
from agentd.site import topics
from tests.api_harness import SITE_CAP, live_daemon, make_cfg
from tests.test_api_snapshot import control, judge, sample, tick


class FakeLink:
    def __init__(self) -> None:
        self.connected = True
        self.connects = 1
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        self.sent.append((topic, payload, qos, retain))
        return True


def body(**kw) -> Throttle:
    return judge(tick(**kw))


def test_a_body_goes_out_first_then_on_change_or_when_due():
    pub = ThrottlePublisher("s1", "n1", every_s=30.0)
    link = FakeLink()
    t0 = body()
    assert pub.step(link, t0, lambda: b"{}", 0.0) and link.sent[0][:1] + link.sent[0][2:] == (
        "agentd/v1/s1/nodes/n1/throttle", 1, True)
    readings_only = body(samples={0: sample(0, power_w=123.0, temp_c=70.0), 1: sample(1)})
    assert not pub.step(link, readings_only, lambda: b"{}", 5.0)  # power and temperature moved: not news
    rebased = body(controls={0: ControlView(650.0, 650.0, None, "baseline", False, False, None), 1: control()})
    assert pub.step(link, rebased, lambda: b"{}", 5.0)  # an operator set 650 W: a limit changed, still ok
    capped = body(controls={0: control(400.0, "lease:x"), 1: control()})
    assert pub.step(link, capped, lambda: b"{}", 5.2)  # throttled now: at once, however soon
    assert not pub.step(link, capped, lambda: b"{}", 35.1)
    assert pub.step(link, capped, lambda: b"{}", 35.2)  # due: every_s since the last one
    assert pub.published == 4


def test_a_change_in_limits_only_waits_for_the_minimum_gap():
    pub = ThrottlePublisher("s1", "n1", every_s=30.0)
    link = FakeLink()
    pub.step(link, body(controls={0: control(400.0, "ramp"), 1: control()}), lambda: b"", 0.0)
    rising = body(controls={0: control(410.0, "ramp"), 1: control()})  # a ramp: same state, new limit
    assert not pub.step(link, rising, lambda: b"", MIN_GAP_S / 2)
    assert pub.step(link, rising, lambda: b"", MIN_GAP_S)


def test_nothing_goes_out_without_a_connection_and_everything_after_a_reconnect():
    pub = ThrottlePublisher("s1", "n1", every_s=30.0)
    link = FakeLink()
    serialised = []

    def payload():
        serialised.append(1)
        return b"{}"

    link.connected = False
    assert not pub.step(link, body(), payload, 0.0) and not serialised  # not even serialised
    link.connected = True
    assert pub.step(link, body(), payload, 1.0)
    assert not pub.step(link, body(), payload, 2.0) and len(serialised) == 1
    link.connects = 2  # the broker may have lost its retained copy
    assert pub.step(link, body(), payload, 3.0)


# -- against the real broker ------------------------------------------------------------------


async def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll real I/O (the broker delivering), never a timer of ours."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def subscribed(services, topic: str, into: list):
    """A client of the test's own subscribed to ``topic``, collecting into ``into``."""
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                              identifier=f"sub-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(topic, qos=1)

        async def collect():
            async for msg in client.messages:
                into.append(msg)

        task = asyncio.create_task(collect())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.integration
async def test_the_throttle_topic_is_retained_republished_on_change_and_when_due(services, tmp_path):
    site = f"t{uuid.uuid4().hex[:8]}"
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "site.yaml").write_text(SITE_CAP)
    cfg = make_cfg(tmp_path, site=site, mqtt={"host": services.mqtt_host, "port": services.mqtt_port},
                   api={"publish_every_s": 30.0}, rules={"builtin_packs": False, "dirs": [str(rules_d)]})
    got: list[aiomqtt.Message] = []
    events: list[aiomqtt.Message] = []
    async with live_daemon(cfg) as live:
        stop = asyncio.Event()
        link = asyncio.create_task(live.daemon.mqtt.run(stop))
        publisher = live.daemon.api.publisher
        try:
            await wait_for(lambda: live.daemon.mqtt.connected, what="the daemon's MQTT link")
            async with subscribed(services, topics.events(site), events):
                await live.tick()  # t=0: site_cap fires on the first tick: one event, the first body
                await wait_for(lambda: events, what="the rule transition on the events topic")
            ev = EventMessage.model_validate_json(bytes(events[0].payload))
            assert (ev.site, ev.node, ev.rule, ev.to_state, events[0].retain) == (site, "n1", "site_cap", "firing",
                                                                                 False)
            await live.tick(2)  # t=1: the cap is enforced, the limits read back lower (a change: published)
            assert publisher.published == 2
            # a subscriber that comes later gets the retained body at once: the latest one
            async with subscribed(services, topics.node_throttle(site, "n1"), got):
                await wait_for(lambda: got, what="the retained throttle body")
                first = Throttle.model_validate_json(bytes(got[0].payload))
                assert got[0].retain and (first.node, first.state, first.level) == ("n1", "throttled", 2)
                assert [g.limit_w for g in first.gpus] == [450.0] * 4
                await live.tick(10)  # t=3..12: power, temperature and timestamps move; nothing else does
                await live.put("/v1/caps/x", {"watts": 300, "ttl_s": 600, "gpus": [0]})
                await live.tick()  # t=13: a lease reason appears: published at once
                await wait_for(lambda: len(got) >= 2, what="the changed body")
                second = Throttle.model_validate_json(bytes(got[1].payload))
                assert "lease:x" in {r.source for r in second.reasons}  # the very next one is the change
                assert not got[1].retain and second.generated_at == "2026-01-01T00:00:13.000Z"
                await live.tick()  # t=14: GPU 0 reads back 300 W (a limit changed: published)
                await wait_for(lambda: len(got) >= 3, what="the enforced limit")
                await live.tick(29)  # t=15..43: no change, not due
                await live.tick()  # t=44: 30 s after the last one: due
                await wait_for(lambda: len(got) >= 4, what="the periodic republish")
            stamps = [json.loads(m.payload)["generated_at"][-13:] for m in got]
            assert stamps == ["00:00:01.000Z", "00:00:13.000Z", "00:00:14.000Z", "00:00:44.000Z"]
            assert publisher.published == 5
        finally:
            stop.set()
            await asyncio.wait_for(link, 10)
