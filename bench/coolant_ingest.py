"""Coolant ingest rate from a real broker vs a bare aiomqtt subscriber; CPU of a site feed.

Three processes per phase, all on this machine and the same broker: a publisher (paho, QoS 0,
as fast as it can), and one subscriber, run in turn:

* ``bare``: an aiomqtt client doing nothing but ``async for msg in client.messages`` (the
  ceiling any aiomqtt-based consumer can reach here);
* ``ingest``: the real daemon (``agentd.daemon.Daemon`` with its MqttLink, the coolant parser,
  CoolantState and the SQLite store; 1 simulated GPU ticking at 1 Hz alongside).

Each subscriber counts the messages it *processed* and the CPU seconds its process used from
the first message to the end (the store append of the last readings included), so
``msgs / cpu_s`` is the rate at 100 % of one core whatever else the two processes shared the
machine with. The payloads are realistic: CDU json messages (``collectors.cdu_sim``) for 100
units, with fresh timestamps.

Then the site feed: 200 sensors at 1 Hz into the daemon for ``--feed-s`` seconds, as DSX
``value`` messages (one topic per sensor: 200 msgs/s; the figure on the last line) and as json
(one message per CDU loop: 25 msgs/s); CPU in % of one core, next to the same daemon idle and a
bare aiomqtt subscriber under the same value feed (the floor any aiomqtt consumer pays).

Usage: ``python bench/coolant_ingest.py [--broker HOST:PORT] [--messages N] [--rounds R] [--feed-s S]``
(broker defaults to ``$TEST_MQTT_HOST:$TEST_MQTT_PORT``, see ``scripts/services``). The last line
is ``ingest_msgs_s=.. bare_msgs_s=.. ratio=.. site_feed_cpu_pct=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNITS = 100
SITE_SENSORS = 200
IDLE_END_S = 1.5  # a subscriber ends this long after its last message


def _payloads(prefix: str, n: int) -> list[tuple[str, bytes]]:
    from collectors.cdu_sim import CduModel

    models = [CduModel(site="bench", unit=f"cdu-{u:03d}", seed=u, topic_prefix=prefix) for u in range(UNITS)]
    base_ns = time.time_ns()
    out: list[tuple[str, bytes]] = []
    step = 0
    while len(out) < n:
        for m in models:
            m.step(1.0, 80_000.0)
            out.extend(m.messages(base_ns + step * 1_000_000))
        step += 1
    return out[:n]


# -- roles (each its own process) -------------------------------------------------------------

def role_publish(host: str, port: int, prefix: str, n: int) -> None:
    import paho.mqtt.client as mqtt

    msgs = _payloads(prefix, n)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    started = time.perf_counter()
    for topic, payload in msgs:
        while client.publish(topic, payload, qos=0).rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.0005)
    # wait until paho has written everything out
    while client._out_packet:  # noqa: SLF001 (no public "flushed" signal in paho)
        time.sleep(0.01)
    wall = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"published": n, "wall_s": wall}), flush=True)


def role_site_feed(host: str, port: int, prefix: str, seconds: float, fmt: str) -> None:
    """200 sensors at 1 Hz: ``value`` = one DSX message per sensor (200 msgs/s), ``json`` = one
    message per CDU loop with its 8 sensors (25 msgs/s). Spread over each second in 10 slices."""
    import paho.mqtt.client as mqtt

    names = ["RackLiquidSupplyTemperature", "RackLiquidReturnTemperature", "RackLiquidFlowRate",
             "RackLiquidSupplyPressure", "RackLiquidReturnPressure", "RackLiquidDifferentialPressure",
             "CduPumpSpeed", "LeakDetectorState"]
    fields = ["supply_temp_c", "return_temp_c", "flow_lpm", "supply_pressure_kpa", "return_pressure_kpa",
              "delta_pressure_kpa", "pump_speed_pct", "leak"]
    loops = [f"{prefix}/bench/cdu-{i // 2:02d}/{'tcs' if i % 2 == 0 else 'facility'}" for i in range(SITE_SENSORS // 8)]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-feed-{uuid.uuid4().hex[:6]}")
    client.connect(host, port)
    client.loop_start()
    start = time.monotonic()
    k = sent = 0
    while time.monotonic() - start < seconds:
        ts = time.time_ns() // 1_000_000
        for chunk in range(10):
            for j, loop in enumerate(loops):
                if j % 10 != chunk:
                    continue
                values = [30.0 + j % 7 + (k % 3) * 0.1 + f for f in range(7)]
                if fmt == "json":
                    body = ",".join(f'"{f}": {v:.2f}' for f, v in zip(fields, values))
                    client.publish(loop, f'{{{body}, "leak": "OK", "ts": {ts}}}', qos=0)
                    sent += 1
                else:
                    for name, v in zip(names, [*values, '"OK"']):
                        value = v if isinstance(v, str) else f"{v:.2f}"
                        client.publish(f"{loop}/{name}", f'{{"value": {value}, "timestamp": {ts}, "quality": 1}}', qos=0)
                        sent += 1
            time.sleep(max(0.0, start + k + (chunk + 1) / 10.0 - time.monotonic()))
        k += 1
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"published": sent}), flush=True)


async def _bare(host: str, port: int, prefix: str, fixed_s: float | None) -> dict:
    import aiomqtt

    n = 0
    first_cpu = first_wall = None
    async with aiomqtt.Client(host, port, identifier=f"bench-bare-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(f"{prefix}/#", qos=0)
        print("ready", flush=True)
        if fixed_s is not None:  # site feed: CPU over a fixed window
            async def count() -> None:
                nonlocal n
                async for _ in client.messages:
                    n += 1
            counter = asyncio.create_task(count())
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(fixed_s)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            counter.cancel()
            return {"n": n, "cpu_s": cpu, "wall_s": wall}
        messages = client.messages.__aiter__()
        while True:
            try:
                await asyncio.wait_for(messages.__anext__(), IDLE_END_S if n else 120)
            except TimeoutError:
                break
            if n == 0:
                first_cpu, first_wall = time.process_time(), time.perf_counter()
            n += 1
        cpu = time.process_time() - first_cpu if n else 0.0
        wall = time.perf_counter() - first_wall - IDLE_END_S if n else 0.0
    return {"n": n, "cpu_s": cpu, "wall_s": wall}


async def _ingest(host: str, port: int, prefix: str, fmt: str, fixed_s: float | None) -> dict:
    from agentd.config import AgentConfig
    from agentd.daemon import Daemon, open_store
    from collectors.cdu_sim import subscription_for
    from collectors.sim import SimBackend

    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as state_dir:
        cfg = AgentConfig.model_validate({
            "backend": "sim", "state_dir": state_dir, "node": f"bench-{uuid.uuid4().hex[:6]}", "interval": 1.0,
            "sim": {"gpus": 1}, "mqtt": {"host": host, "port": port},
            "coolant": {"subscriptions": [subscription_for(fmt, prefix)]},
        })
        daemon = Daemon(cfg, SimBackend(gpus=1), open_store(cfg))
        await daemon.start()
        stop = asyncio.Event()
        running = asyncio.create_task(daemon.run(stop))
        while not daemon.mqtt.connected:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # subscribed
        print("ready", flush=True)
        if fixed_s is not None:  # site feed: CPU over a fixed window
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(fixed_s)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            n = daemon.coolant.msgs
        else:
            while daemon.coolant.msgs == 0:
                await asyncio.sleep(0.001)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            last, last_change = 0, time.monotonic()
            while time.monotonic() - last_change < IDLE_END_S:
                await asyncio.sleep(0.05)
                if daemon.coolant.msgs != last:
                    last, last_change = daemon.coolant.msgs, time.monotonic()
            await daemon.tick()  # the store append of the last readings is part of the cost
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0 - IDLE_END_S
            n = daemon.coolant.msgs
        result = {"n": n, "cpu_s": cpu, "wall_s": wall, "readings": daemon.coolant.readings,
                  "bad": daemon.coolant.bad_msgs, "dropped": daemon.mqtt.dropped,
                  "stored": len(daemon.store.query(measurement="coolant"))}
        stop.set()
        await running
    return result


# -- orchestration -------------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise SystemExit(f"subscriber failed to start: {line}{proc.stderr.read()}")


def _result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench process failed ({proc.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def phase(subscriber: str, host: str, port: int, n: int) -> dict:
    """One flood of ``n`` CDU json messages into one subscriber process."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    sub = _spawn(subscriber, host, str(port), prefix, "json", "0")
    _wait_ready(sub)
    pub = _spawn("pub", host, str(port), prefix, str(n))
    pub_result = _result(pub)
    result = _result(sub)
    result["published"] = pub_result["published"]
    result["pub_wall_s"] = pub_result["wall_s"]
    return result


def feed_phase(subscriber: str, host: str, port: int, seconds: float, feed: str | None) -> dict:
    """``subscriber`` for ``seconds`` under the site feed (``value``: one message per sensor per
    second; ``json``: one message per loop per second), or idle when ``feed`` is None."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    sub = _spawn(subscriber, host, str(port), prefix, feed or "value", str(seconds))
    _wait_ready(sub)
    if feed:
        _result(_spawn("feed", host, str(port), prefix, str(seconds + 0.5), feed))
    return _result(sub)


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=None, help="HOST:PORT (default $TEST_MQTT_HOST:$TEST_MQTT_PORT)")
    ap.add_argument("--messages", type=int, default=50_000, help="messages per flood")
    ap.add_argument("--rounds", type=int, default=3, help="floods per subscriber (alternating); medians reported")
    ap.add_argument("--feed-s", type=float, default=20.0, help="seconds per site-feed measurement")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        from agentd.log import setup_logging

        setup_logging("warning", json=True, stream=sys.stderr)  # stdout carries the result
        role, host, port, prefix, *rest = args.role
        if role == "pub":
            role_publish(host, int(port), prefix, int(rest[0]))
        elif role == "feed":
            role_site_feed(host, int(port), prefix, float(rest[0]), rest[1])
        elif role == "bare":
            fixed = float(rest[1]) or None
            print(json.dumps(asyncio.run(_bare(host, int(port), prefix, fixed))), flush=True)
        else:
            fixed = float(rest[1]) or None
            print(json.dumps(asyncio.run(_ingest(host, int(port), prefix, rest[0], fixed))), flush=True)
        return
    broker = args.broker or (f"{os.environ['TEST_MQTT_HOST']}:{os.environ['TEST_MQTT_PORT']}"
                             if os.environ.get("TEST_MQTT_HOST") else None)
    if not broker:
        raise SystemExit('no broker: pass --broker HOST:PORT or run scripts/services start && eval "$(scripts/services env)"')
    host, _, port = broker.rpartition(":")
    port_i = int(port)

    print(f"coolant ingest bench: broker {broker}, {args.rounds} x {args.messages} CDU json messages per "
          f"subscriber, {os.cpu_count()} CPUs")
    rates: dict[str, list[float]] = {"bare": [], "ingest": []}
    for _ in range(args.rounds):
        for who in ("bare", "ingest"):
            r = phase(who, host, port_i, args.messages)
            rates[who].append(r["n"] / r["cpu_s"])
            extra = (f"; readings {r['readings']}, stored {r['stored']}, bad {r['bad']}, inbox-dropped {r['dropped']}"
                     if who == "ingest" else "")
            print(f"  {who:>6}: {r['n']:>7} of {r['published']} received (the broker drops QoS 0 for a slow "
                  f"reader) in {r['wall_s']:.2f} s, {r['cpu_s']:.2f} s CPU -> {r['n'] / r['cpu_s']:,.0f} "
                  f"msgs per CPU-second{extra}")
    bare_rate, ingest_rate = _median(rates["bare"]), _median(rates["ingest"])
    print(f"median msgs per CPU-second: daemon ingest {ingest_rate:,.0f}, bare aiomqtt {bare_rate:,.0f}")

    pct = {}
    for label, who, feed in (("daemon idle (no feed)", "ingest", None),
                             ("daemon, DSX value feed (200 msgs/s)", "ingest", "value"),
                             ("daemon, json feed (25 msgs/s)", "ingest", "json"),
                             ("bare aiomqtt, DSX value feed", "bare", "value")):
        r = feed_phase(who, host, port_i, args.feed_s, feed)
        pct[label] = 100.0 * r["cpu_s"] / r["wall_s"]
        print(f"  site feed, {label}: {pct[label]:.2f} % of a core ({r['n']} messages in {r['wall_s']:.1f} s"
              + (f", {r['readings']} readings, {r['bad']} bad)" if "readings" in r else ")"))
    feed_pct = pct["daemon, DSX value feed (200 msgs/s)"]
    print(f"site feed = {SITE_SENSORS} sensors at 1 Hz; the daemon figures include its own 1 Hz tick "
          "(1 simulated GPU) and the SQLite append")
    print(f"ingest_msgs_s={ingest_rate:.0f} bare_msgs_s={bare_rate:.0f} ratio={ingest_rate / bare_rate:.2f} "
          f"site_feed_cpu_pct={feed_pct:.2f}")

if __name__ == "__main__":
    main()
