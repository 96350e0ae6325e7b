"""Coolant over the real Mosquitto: simulated CDU -> broker -> daemon -> store / InfluxDB 1.x / VM.

Also: broker stopped and restarted mid-run (readings resume, ticks never pause), 10,000 garbage
messages interleaved with good ones, retained status with last will, and the reconnect backoff.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import aiomqtt
import pytest

from agentd.clock import FakeClock, SystemClock
from agentd.config import AgentConfig, ConfigError, MqttConfig
from agentd.daemon import Daemon, open_store
from agentd.mqtt import MqttLink, _Inbox, backoff_delay_s, status_topic
from agentd.service import make_forwarder
from collectors.cdu_sim import GARBAGE_REASONS, CduModel, garbage_message, run_publisher, subscription_for
from collectors.coolant import parse_line
from collectors.sim import SimBackend

integration = pytest.mark.integration  # uses the real Mosquitto (and InfluxDB 1.x / VictoriaMetrics)


async def wait_for(predicate, timeout_s=20.0, what="condition"):
    """Poll real I/O (the broker delivering, a reconnect happening), never a timer of ours."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def make_daemon(services, tmp_path, *, prefix: str, fmt: str = "json", influx: dict | None = None,
                interval: float = 0.1, clock=None, node: str | None = None, **mqtt) -> Daemon:
    sub = subscription_for(fmt, prefix) | {"qos": 1}
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": node or f"n-{uuid.uuid4().hex[:6]}",
        "site": "s1", "interval": interval, "sim": {"gpus": 2},
        "mqtt": {"host": services.mqtt_host, "port": services.mqtt_port} | mqtt,
        "coolant": {"subscriptions": [sub]},
        "influx": {"backoff_max": 0.5, "timeout": 2.0} | (influx or {}),
    })
    store = open_store(cfg)
    return Daemon(cfg, SimBackend(gpus=2, seed=3), store, forwarder=make_forwarder(cfg, store),
                  clock=clock or SystemClock())


def sim_link(services, name: str) -> MqttLink:
    cfg = MqttConfig(host=services.mqtt_host, port=services.mqtt_port)
    return MqttLink(cfg, client_id=f"{name}-{uuid.uuid4().hex[:6]}")


class Recorder:
    """The simulated CDU's publish function, keeping every message the broker took."""

    def __init__(self, link: MqttLink, qos: int = 1) -> None:
        self.link, self.qos, self.sent = link, qos, []

    async def __call__(self, topic: str, payload: bytes) -> bool:
        ok = await self.link.publish(topic, payload, qos=self.qos)
        if ok:
            self.sent.append((topic, payload))
        return ok


def expected_fields(payload: bytes) -> tuple[int, dict]:
    body = json.loads(payload)
    ts_ns = body.pop("ts") * 10**6
    fields = {k: (float(v) if not isinstance(v, str) else v) for k, v in body.items()}
    fields["delta_temp_c"] = round(fields["return_temp_c"] - fields["supply_temp_c"], 6)
    return ts_ns, fields


@integration
@pytest.mark.parametrize("target", ["store", "influxdb1", "vm"])
async def test_simulated_cdu_through_the_broker_lands_in_store_and_servers(services, influx1_db, tmp_path, target):
    prefix = f"cool-{uuid.uuid4().hex[:8]}"
    influx = {"store": None,
              "influxdb1": {"url": services.influxdb1_url, "api": "v1", "bucket": influx1_db},
              "vm": {"url": services.vm_url, "api": "v2", "org": "o", "bucket": "b"}}[target]
    daemon = make_daemon(services, tmp_path, prefix=prefix, influx=influx)
    await daemon.start()
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
    unit = f"cdu-{uuid.uuid4().hex[:6]}"
    model = CduModel(site="s1", unit=unit, seed=7, topic_prefix=prefix)
    link = sim_link(services, "cdu")
    link_stop = asyncio.Event()
    link_task = asyncio.create_task(link.run(link_stop))
    await wait_for(lambda: link.connected, what="simulator connected")
    rec = Recorder(link)
    await run_publisher(model, rec, interval_s=0.05, duration_s=1.0)
    link_stop.set()
    await link_task
    assert len(rec.sent) == 40  # 20 steps x (facility + tcs)
    await wait_for(lambda: daemon.coolant.readings == 40, what="all readings ingested")
    stop.set()
    await running
    assert daemon.coolant.bad_msgs == 0 and daemon.mqtt.dropped == 0

    expected = {}
    for topic, payload in rec.sent:
        ts_ns, fields = expected_fields(payload)
        expected[(topic.rsplit("/", 1)[1], ts_ns)] = fields
    if target == "store":
        store = open_store(daemon.cfg)
        lines = store.query(measurement="coolant")
        store.close()
        got = {}
        for line in lines:
            _, tags, fields, ts = parse_line(line)
            assert tags == {"site": "s1", "unit": unit, "loop": tags["loop"]}
            got[(tags["loop"], ts)] = fields
        assert got == expected
    elif target == "influxdb1":
        rows = services.influx1_rows("coolant", influx1_db, f"unit = '{unit}'")
        assert len(rows) == 40
        for row in rows:
            want = expected[(row["loop"], row["time"])]
            assert {k: row[k] for k in want} == want
            assert row["site"] == "s1"
    else:
        services.vm_flush()
        got = {}
        for series in services.vm_export(f'coolant_supply_temp_c{{unit="{unit}"}}'):
            for ts_ms, value in zip(series["timestamps"], series["values"]):
                got[(series["metric"]["loop"], ts_ms)] = value
        assert got == {(loop, ts // 10**6): f["supply_temp_c"] for (loop, ts), f in expected.items()}


@integration
async def test_broker_restart_readings_resume_within_5s_and_ticks_never_pause(services, tmp_path):
    prefix = f"cool-{uuid.uuid4().hex[:8]}"
    daemon = make_daemon(services, tmp_path, prefix=prefix, interval=0.1)
    tick_starts: list[float] = []  # monotonic: a wall-clock step must not fake or hide a pause
    real_tick = daemon.tick

    async def timed_tick() -> None:
        tick_starts.append(time.monotonic())
        await real_tick()

    daemon.tick = timed_tick  # type: ignore[method-assign]
    await daemon.start()
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    link = sim_link(services, "cdu")
    link_stop = asyncio.Event()
    link_task = asyncio.create_task(link.run(link_stop))
    await wait_for(lambda: daemon.mqtt.connected and link.connected, what="both connected")
    publisher = asyncio.create_task(run_publisher(CduModel(site="s1", unit="cdu-r", topic_prefix=prefix),
                                                  Recorder(link, qos=0), interval_s=0.1, stop=link_stop))
    try:
        await wait_for(lambda: daemon.coolant.readings >= 10, what="first readings")
        await asyncio.to_thread(services.stop, "mosquitto")
        try:
            await wait_for(lambda: not daemon.mqtt.connected, what="loss noticed")
            ticks_at_loss, failures_at_loss = daemon.stats.ticks, daemon.mqtt.connect_failures
            # the outage: the link is refused at least twice (it retries) while the tick runs on
            await wait_for(lambda: daemon.mqtt.connect_failures >= failures_at_loss + 2
                           and daemon.stats.ticks >= ticks_at_loss + 10, what="reconnects refused, ticks going on")
            assert not daemon.mqtt.connected
            before = daemon.coolant.readings
        finally:  # whatever failed, the broker comes back for the tests after this one
            await asyncio.to_thread(services.start, "mosquitto")
        back = time.monotonic()
        await wait_for(lambda: daemon.coolant.readings >= before + 2, timeout_s=10, what="readings resumed")
        resumed_s = time.monotonic() - back
        assert resumed_s < 5.0, f"readings resumed {resumed_s:.1f} s after the broker came back"
        # the status was republished (the broker keeps no retained messages across a restart here)
        assert await read_retained(services, status_topic("s1", daemon.host)) == b"online"
    finally:
        link_stop.set()
        await asyncio.gather(publisher, link_task)
        stop.set()
        await running
    store = open_store(daemon.cfg)
    agent = store.query(measurement="agent")
    store.close()
    assert len(agent) == len(tick_starts) == daemon.stats.ticks  # one agent point per tick
    gaps_s = [b - a for a, b in zip(tick_starts, tick_starts[1:])]
    assert max(gaps_s) < 0.5, max(gaps_s)  # 0.1 s ticks: never held up by the broker going away
    assert any("mqtt_connected=false" in line for line in agent)
    assert "mqtt_connected=true" in agent[-1]
    assert daemon.mqtt.connects >= 2


async def read_retained(services, topic: str, timeout_s: float = 5.0) -> bytes | None:
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                              identifier=f"check-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in client.messages:
                    return msg.payload
        except TimeoutError:
            return None


@integration
async def test_10000_garbage_messages_interleaved_every_good_one_lands_every_bad_one_counted(services, tmp_path):
    prefix = f"cool-{uuid.uuid4().hex[:8]}"
    daemon = make_daemon(services, tmp_path, prefix=prefix, clock=FakeClock(start_wall_ns=time.time_ns()))
    await daemon.start()
    link_stop = asyncio.Event()
    link_task = asyncio.create_task(daemon.mqtt.run(link_stop))
    await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
    rng = random.Random(11)
    kinds = [k for k in GARBAGE_REASONS if k != "too_large"]
    now_ns = daemon.clock.wall_ns()
    messages, good, expected_bad = [], [], Counter()
    for i in range(10_000):
        kind = "too_large" if i % 500 == 0 else kinds[i % len(kinds)]
        messages.append(garbage_message(kind, rng, f"{prefix}/s1/cdu-g", now_ns))
        expected_bad[GARBAGE_REASONS[kind]] += 1
        if i % 5 == 0:
            payload = json.dumps({"flow_lpm": float(i), "ts": now_ns // 10**6 - 10_000 + i // 5}).encode()
            messages.append((f"{prefix}/s1/cdu-g/tcs", payload))
            good.append(payload)
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                              identifier=f"garbage-{uuid.uuid4().hex[:6]}") as pub:
        for start in range(0, len(messages), 200):
            await asyncio.gather(*(pub.publish(t, p, qos=1) for t, p in messages[start:start + 200]))
    await wait_for(lambda: daemon.coolant.msgs == len(messages), timeout_s=30, what="all messages received")
    link_stop.set()
    await link_task
    assert daemon.mqtt.dropped == 0
    assert daemon.coolant.readings == len(good) == 2_000
    assert dict(daemon.coolant.bad) == dict(expected_bad)
    await daemon.tick()
    lines = daemon.store.query(measurement="coolant")
    assert sorted(float(line.split("flow_lpm=")[1].split(" ")[0]) for line in lines) == \
        sorted(json.loads(p)["flow_lpm"] for p in good)
    agent = daemon.store.query(measurement="agent")[-1]
    assert f"coolant_bad_msgs={sum(expected_bad.values())}i" in agent and "coolant_bad_not_json=" in agent
    await daemon.shutdown()


@integration
async def test_influx_bad_entries_long_topics_and_one_off_units_through_the_broker_cost_only_themselves(
        services, tmp_path):
    from tests.test_lp_parser import BAD_LINES

    prefix = f"cool-{uuid.uuid4().hex[:8]}"
    daemon = make_daemon(services, tmp_path, prefix=prefix, fmt="influx",
                         clock=FakeClock(start_wall_ns=time.time_ns()))
    await daemon.start()
    link_stop = asyncio.Event()
    link_task = asyncio.create_task(daemon.mqtt.run(link_stop))
    await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
    messages = []
    for i, (_, bad, _) in enumerate(BAD_LINES):  # one good entry before and after each bad one
        messages.append((f"{prefix}/s1/cdu-lp/tcs",
                         f"coolant flow_lpm={i}\n{bad}\ncoolant supply_temp_c=30.{i}\n".encode()))
    for i in range(50):  # MQTT allows 64 KiB topics; these are refused before anything is kept
        messages.append((f"{prefix}/s1/{'x' * 60_000}{i}/tcs", b"coolant flow_lpm=1"))
    for i in range(500):  # units seen once
        messages.append((f"{prefix}/s1/ghost-{i}/tcs", b"coolant supply_temp_c=30,flow_lpm=100"))
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port,
                              identifier=f"lp-{uuid.uuid4().hex[:6]}") as pub:
        for topic, payload in messages:
            await pub.publish(topic, payload, qos=1)
    await wait_for(lambda: daemon.coolant.msgs == len(messages), timeout_s=30, what="all messages received")
    link_stop.set()
    await link_task
    assert daemon.mqtt.dropped == 0
    assert dict(daemon.coolant.bad) == {"bad_line_protocol": len(BAD_LINES), "topic_too_long": 50}
    assert daemon.coolant.readings == 2 * len(BAD_LINES) + 500
    daemon.clock.advance(31.0)  # the ghosts are stale now; they never degrade the loop
    await daemon.tick()
    tcs = daemon.state.coolant.loop("tcs", daemon.clock.monotonic())
    assert not tcs.degraded and tcs.series == 501
    lines = daemon.store.query(measurement="coolant")
    assert sum("unit=cdu-lp" in line for line in lines) == 2 * len(BAD_LINES)
    await daemon.shutdown()


@integration
async def test_status_is_retained_online_then_offline_on_a_clean_stop(services, tmp_path):
    daemon = make_daemon(services, tmp_path, prefix=f"cool-{uuid.uuid4().hex[:8]}")
    await daemon.start()
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
    topic = status_topic("s1", daemon.host)
    assert await read_retained(services, topic) == b"online"
    stop.set()
    await running
    assert await read_retained(services, topic) == b"offline"


@integration
def test_the_last_will_marks_a_killed_daemon_offline(services, tmp_path):
    node = f"n-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "agentd.toml"
    config.write_text(f'interval = 0.2\nbackend = "sim"\nstate_dir = "{tmp_path}"\nnode = "{node}"\nsite = "s1"\n'
                      f'[sim]\ngpus = 1\n[mqtt]\nhost = "{services.mqtt_host}"\nport = {services.mqtt_port}\n'
                      'keepalive = 5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")} | {"AGENTD_API__LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    topic = status_topic("s1", node)
    try:
        deadline = time.monotonic() + 30
        while asyncio.run(read_retained(services, topic, 0.5)) != b"online":
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "daemon never said online"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 10  # the broker sees the socket close at once
    while asyncio.run(read_retained(services, topic, 0.5)) != b"offline":
        assert time.monotonic() < deadline, "the last will did not fire"


@integration
def test_agentd_sim_cdu_cli_feeds_a_daemon_in_the_value_format(services, tmp_path):
    prefix = f"cool-{uuid.uuid4().hex[:8]}"

    async def main() -> Daemon:
        daemon = make_daemon(services, tmp_path, prefix=prefix, fmt="value")
        await daemon.start()
        stop = asyncio.Event()
        running = asyncio.create_task(daemon.run(stop))
        await wait_for(lambda: daemon.mqtt.connected, what="daemon connected")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "sim", "cdu", "--broker", f"{services.mqtt_host}:{services.mqtt_port}",
            "--site", "s1", "--unit", "cdu-v", "--format", "value", "--prefix", prefix, "--qos", "1",
            "--interval", "0.1", "--duration", "1", "--fault", "leak@0.2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "messages published" in err.decode()
        await wait_for(lambda: daemon.coolant.readings >= 10 * 15, what="value readings")
        stop.set()
        await running
        return daemon

    daemon = asyncio.run(main())
    assert daemon.coolant.bad_msgs == 0
    tcs = daemon.state.coolant.loop("tcs", daemon.clock.monotonic(), unit="cdu-v")
    assert tcs.leak in ("Warning", "Critical") and 25 < tcs.supply_temp_c < 45 and tcs.flow_lpm > 50


# -- connection handling without a broker ---------------------------------------------------------

class EdgeRng:
    """Stands in for random.Random: ``uniform(a, b)`` answers one end and records the range."""

    def __init__(self, end: str) -> None:
        self.end, self.ranges = end, []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b if self.end == "high" else a


# from 0.1 s doubling per attempt, capped at 2 s: the documented ladder, written out
LADDER = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_backoff_doubles_is_capped_and_jittered():
    high, low = EdgeRng("high"), EdgeRng("low")
    assert [backoff_delay_s(a, high, 0.1, 2.0) for a in range(12)] == pytest.approx(LADDER)
    assert [backoff_delay_s(a, low, 0.1, 2.0) for a in range(12)] == pytest.approx([c / 2 for c in LADDER])
    assert backoff_delay_s(10_000, high, 0.1, 2.0) == 2.0  # no overflow far into an outage
    rng = random.Random(1)
    delays = [backoff_delay_s(a, rng, 0.1, 2.0) for a in range(12)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, LADDER, strict=True))
    assert len(set(delays[6:])) == 6  # capped, but not in lock step


async def test_no_broker_never_blocks_the_tick_and_retries_with_backoff(tmp_path):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path), "node": "n1",
                                      "sim": {"gpus": 1}, "mqtt": {"host": "127.0.0.1", "port": port}})
    daemon = Daemon(cfg, SimBackend(gpus=1), open_store(cfg), clock=FakeClock())
    delays = []

    async def fake_sleep(s: float) -> None:
        delays.append(s)
        await asyncio.sleep(0.001)

    daemon.mqtt.sleep = fake_sleep
    daemon.mqtt.rng = random.Random(3)
    await daemon.start()
    stop = asyncio.Event()
    link_task = asyncio.create_task(daemon.mqtt.run(stop))
    for _ in range(20):
        await daemon.tick()
    await wait_for(lambda: len(delays) >= 8, what="reconnect attempts")
    stop.set()
    await link_task
    assert daemon.stats.ticks == 20 and not daemon.mqtt.connected
    assert all(d <= cfg.mqtt.reconnect_max for d in delays) and max(delays) > cfg.mqtt.reconnect_max / 2
    assert await daemon.mqtt.publish("x/y", b"1") is False
    assert "mqtt_connected=false" in daemon.store.query(measurement="agent")[-1]
    await daemon.shutdown()


async def test_incoming_inbox_is_bounded_counts_drops_and_delivers_in_order_per_loop_turn():
    drops, batches = [], []
    inbox = _Inbox(3, batches.append, lambda: drops.append(1))
    for i in range(5):
        inbox.put_nowait(i)
    assert batches == [] and len(drops) == 2
    await asyncio.sleep(0)  # the next turn of the loop
    inbox.put_nowait(5)
    await asyncio.sleep(0)
    assert batches == [[0, 1, 2], [5]] and inbox.qsize() == 0


def test_tls_with_an_unreadable_ca_file_is_a_config_error_naming_the_key(tmp_path):
    cfg = MqttConfig(host="broker", tls=True, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="mqtt.ca_file: cannot load"):
        MqttLink(cfg, client_id="x")


@integration
async def test_username_password_and_client_id_reach_the_broker(services, tmp_path):
    daemon = make_daemon(services, tmp_path, prefix="p", username="agentd", password="s3cret", client_id="my-id")
    link_stop = asyncio.Event()
    task = asyncio.create_task(daemon.mqtt.run(link_stop))
    await wait_for(lambda: daemon.mqtt.connected, what="connected with credentials")
    assert daemon.mqtt.client_id == "my-id"
    link_stop.set()
    await task
    daemon.store.close()
