"""The site loop through a real broker: 1,000 light nodes, the real controller, and a bare subscriber.

Processes (all on this machine and the same broker):

* ``gen``: the report generator, as light as it can be (paho, one connection, no pydantic, no
  HMAC): N nodes, each ticking once a second in its own tenth of the second, publishing a
  protocol-valid power report (QoS 0) and taking its leases (a JSON parse of ``budget_w``). A
  node draws ``min(demand, the budget it applied at its last tick)``, like a real node whose
  limits follow its budget at its tick. It also publishes the site's facility meter (the nodes'
  power plus a non-GPU load) once a second. Its CPU is reported: it shares the cores with the
  controller.
* ``controller``: the real controller (``controller_cli.build_core`` + ``ControllerService``:
  ingest, bands, allocation, release limiter, signed QoS 1 retained leases), whose site domain
  has the meter configured.
* ``bare``: an aiomqtt client doing nothing but ``async for msg in client.messages`` on the same
  report feed (the ceiling of any aiomqtt-based consumer here).

**Latency.** In this design the controller always allocates within every domain's limit (the
cap itself while uncapped: the headroom is shared out), so nodes that follow their budgets can
never push a domain over its cap with their own draw; what can is load that no budget controls,
which the facility meter reports. Every ``--event-every`` seconds the meter's non-GPU load steps
up by ``--push`` of the cap (a chiller starting, say), which pushes the site over its cap; 10 s
later it steps back down. For each such report, the nodes that must shed are those whose next
lease is below what they draw; the latency is from the generator publishing the meter report
to the node writing its new limits at its next tick after the lease arrived (``report ->
lease`` is shown apart). p50 / p99 over every node of every event.

**Ingest.** Reports per CPU-second of the controller process over the measurement window
(its whole work: ingest, cycles, leases), against messages per CPU-second of the bare
subscriber on the same feed in the same window: ``ingest_ratio``.

**Largest site at 1 Hz.** The controller's CPU per second is ``N x c_report + cycle(N)``:
``c_report`` (ingest and lease traffic per node, measured in the broker run: the controller's
CPU less the time inside ``cycle``) and ``cycle(N)`` (``ControllerCore.cycle`` in-process with N
nodes whose reports change every cycle, so every lease is re-sent: the worst case), measured
for N up to 20,000. ``max_nodes_1hz`` is the largest N whose CPU per second fits in one core.
It is derived from those measurements, not from a broker run at that size (the generator and
the broker share the same two cores).

Usage: ``python bench/site_loop.py [--broker HOST:PORT] [--nodes 1000] [--events 6]
[--event-every 20] [--push 0.08]``; broker default ``$TEST_MQTT_HOST:$TEST_MQTT_PORT``
(``scripts/services``). Last line ``p50_s=.. p99_s=.. ingest_ratio=.. max_nodes_1hz=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPUS = 8
NODE_MIN_W = 8 * 200.0
NODE_MAX_W = 8 * 700.0
BASE_DEMAND_W = 2300.0  # each node, outside events
SLOTS = 10
RACK = 10  # nodes per rack


def node_name(i: int) -> str:
    return f"r{i // RACK:03d}-n{i % RACK}"


def site_cap_w(nodes: int) -> float:
    return nodes * BASE_DEMAND_W / 0.88  # outside events the site draws 88 % of its cap (uncapped)


def domains_doc(site: str, nodes: int) -> dict:
    racks = (nodes + RACK - 1) // RACK
    doms: dict = {"site": {"cap_w": round(site_cap_w(nodes), 1)}}
    for k in range(racks):
        names = [node_name(i) for i in range(k * RACK, min(nodes, (k + 1) * RACK))]
        doms[f"rack-{k:03d}"] = {"parent": "site", "cap_w": len(names) * NODE_MAX_W, "nodes": names}
    return {"version": 1, "site": site, "domains": doms}


def meter_topic(site: str) -> str:
    return f"agentd/v1/{site}/meters/site"


# -- the generator (paho; light) -------------------------------------------------------------

def role_gen(host: str, port: int, site: str, nodes: int, start: float, duration: float, events: int,
             every: float, push: float, t_measure: float, t_measure_end: float) -> None:
    import paho.mqtt.client as mqtt

    cap = site_cap_w(nodes)
    names = [node_name(i) for i in range(nodes)]
    index = {n: i for i, n in enumerate(names)}
    demand = [BASE_DEMAND_W + (i % 7) * 10.0 for i in range(nodes)]
    applied = [cap / nodes] * nodes  # the failsafe share until a lease arrives
    pending: list[tuple[float, float] | None] = [None] * nodes  # (arrival, budget) of the newest lease
    seq = [0] * nodes
    lock = threading.Lock()
    leases = 0
    prefix = f"agentd/v1/{site}/nodes/"

    def on_message(client, userdata, msg) -> None:
        nonlocal leases
        if not msg.payload:
            return
        now = time.time()
        node = msg.topic[len(prefix):].split("/", 1)[0]
        i = index.get(node)
        if i is None:
            return
        budget = json.loads(msg.payload)["budget_w"]
        with lock:
            pending[i] = (now, budget)
            leases += 1

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-gen-{uuid.uuid4().hex[:6]}")
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    # QoS 0: one connection stands for 1000 nodes; at QoS 1 the broker's per-client window
    # (Mosquitto: 20 in flight, 1000 queued) would throttle and drop what 1000 clients receive
    client.subscribe(f"agentd/v1/{site}/nodes/+/budget/+", qos=0)
    print("ready", flush=True)
    # events: (t_push, t_release) in site time
    event_at = [5.0 + k * every for k in range(events)]
    overhead = 0.0
    t0_event: float | None = None
    event_k = -1
    shed: list[dict] = []  # per node per event: lease and write latency
    shed_seen: set[tuple[int, int]] = set()
    cpu0 = cpu1 = None
    sent = 0
    power = [0.0] * nodes
    end = start + duration
    tick = 0
    while True:
        for slot in range(SLOTS):
            due = start + tick + slot / SLOTS
            if due >= end:
                break
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            t = now - start
            if cpu0 is None and now >= t_measure:
                cpu0, sent0 = time.process_time(), sent
            if cpu1 is None and now >= t_measure_end:
                cpu1, sent1 = time.process_time(), sent
            for i in range(slot, nodes, SLOTS):
                with lock:
                    p = pending[i]
                    pending[i] = None
                if p is not None:
                    arrival, budget = p
                    if (t0_event is not None and arrival > t0_event and budget < power[i] - 1.0
                            and (event_k, i) not in shed_seen):
                        shed_seen.add((event_k, i))
                        shed.append({"event": event_k, "lease_s": arrival - t0_event, "write_s": now - t0_event})
                    applied[i] = budget  # the node writes its new limits at this tick
                w = demand[i] if demand[i] < applied[i] else applied[i]
                power[i] = w
                seq[i] += 1
                flex = demand[i] - NODE_MIN_W
                body = (f'{{"v":1,"kind":"node","site":"{site}","node":"{names[i]}","ts":{now:.3f},"seq":{seq[i]},'
                        f'"gpus":{GPUS},"gpu_power_w":{w:.1f},"demand_w":{demand[i]:.1f},"min_w":{NODE_MIN_W:.1f},'
                        f'"floor_w":{NODE_MIN_W:.1f},"max_w":{NODE_MAX_W:.1f},"flexible_w":{{"low":{flex:.1f}}},'
                        f'"budget_w":{applied[i]:.1f},"budget_source":"lease"}}')
                client.publish(prefix + names[i] + "/power", body, qos=0)
                sent += 1
            if slot == 0:  # the facility meter, once a second: GPU power + the non-GPU load
                k = next((k for k, at in enumerate(event_at) if at <= t < at + 10.0), None)
                new_overhead = push * cap if k is not None else 0.0
                client.publish(meter_topic(site), json.dumps({"power_w": round(sum(power) + new_overhead, 1)}), qos=0)
                if new_overhead > overhead:
                    t0_event, event_k = time.time(), k  # the report that pushes the site over its cap
                overhead = new_overhead
        else:
            tick += 1
            continue
        break
    if cpu1 is None:
        cpu1, sent1 = time.process_time(), sent
    client.loop_stop()
    client.disconnect()
    print(json.dumps({"sent": sent, "leases": leases, "shed": shed, "cpu_s": cpu1 - (cpu0 or 0.0),
                      "sent_window": sent1 - (sent0 if cpu0 is not None else 0)}), flush=True)


# -- the controller (the real one) ---------------------------------------------------------------

async def _controller(host: str, port: int, site: str, domains_file: str, key_file: str, duration: float,
                      t_measure: float, t_measure_end: float) -> dict:
    import logging

    from agentd.config import MqttConfig
    from agentd.log import setup_logging
    from agentd.site.controller_cli import build_core
    from agentd.site.controller_config import load_controller_config
    from agentd.site.controller_mqtt import ControllerService
    from agentd.site.protocol import load_site_key
    from rules.domains import load_domains

    setup_logging("error", stream=sys.stderr)
    import aiomqtt.client

    aiomqtt.client.MQTT_LOGGER.setLevel(logging.ERROR)
    domains = load_domains(domains_file)
    settings = load_controller_config({"id": "bench-ctl", "site": site, "interval": "1s",
                                       "meters": [{"domain": "site", "topic": meter_topic(site), "stale_after": "5s"}]})
    core = build_core(domains, settings, site, load_site_key(key_file))
    cycle = core.cycle
    inside = {"s": 0.0, "n": 0}

    def timed(now: float):
        t = time.process_time()
        try:
            return cycle(now)
        finally:
            inside["s"] += time.process_time() - t
            inside["n"] += 1
    core.cycle = timed
    sends = {"s": 0.0, "max": 0.0}
    mqtt = MqttConfig.model_validate({"host": host, "port": port, "queue_size": 100_000})
    service = ControllerService(core, mqtt, client_id=f"bench-ctl-{uuid.uuid4().hex[:6]}", out=lambda s: None,
                                clear_leases_on_stop=True)
    send = service._send

    async def timed_send(messages, *args):  # how long a cycle's leases take to be handed to the connection
        t = time.perf_counter()
        try:
            return await send(messages, *args)
        finally:
            d = time.perf_counter() - t
            sends["s"] += d
            sends["max"] = max(sends["max"], d)
    service._send = timed_send
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    while not service.link.connected:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.sleep(max(0.0, t_measure - time.time()))
    cpu0, rep0, in0, n0 = time.process_time(), core.stats.reports_accepted, inside["s"], inside["n"]
    await asyncio.sleep(max(0.0, t_measure_end - time.time()))
    cpu1, rep1, in1, n1 = time.process_time(), core.stats.reports_accepted, inside["s"], inside["n"]
    await asyncio.sleep(max(0.0, t_measure_end + 2.0 - time.time()))  # the generator has stopped
    stop.set()
    await task
    st = core.stats
    return {"cpu_s": cpu1 - cpu0, "reports": rep1 - rep0, "cycle_cpu_s": in1 - in0, "cycles": n1 - n0,
            "overruns": service.overruns, "publish_failures": service.publish_failures,
            "refused": st.reports_refused, "leases_sent": st.leases_sent, "cycle_s_max": st.cycle_s_max,
            "mqtt_dropped": service.link.dropped, "send_wall_s": sends["s"], "send_wall_max_s": sends["max"],
            "leases_paced": getattr(service, "leases_paced", 0)}


async def _bare(host: str, port: int, site: str, t_measure: float, t_measure_end: float) -> dict:
    import aiomqtt

    n = 0
    async with aiomqtt.Client(host, port, identifier=f"bench-bare-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(f"agentd/v1/{site}/nodes/+/power", qos=0)
        print("ready", flush=True)

        async def count() -> None:
            nonlocal n
            async for _ in client.messages:
                n += 1
        counter = asyncio.create_task(count())
        await asyncio.sleep(max(0.0, t_measure - time.time()))
        cpu0, n0 = time.process_time(), n
        await asyncio.sleep(max(0.0, t_measure_end - time.time()))
        cpu1, n1 = time.process_time(), n
        counter.cancel()
    return {"cpu_s": cpu1 - cpu0, "msgs": n1 - n0}


# -- the controller's cycle at larger sizes (in-process, no broker) -------------------------------

def cycle_cost_s(nodes: int, rounds: int = 4) -> tuple[float, float]:
    """(median CPU seconds of one ``ControllerCore.cycle``, CPU seconds per ``on_message``) with
    ``nodes`` nodes whose reports change every cycle (every budget moves: every lease is sent)."""
    from agentd.site.controller import ControllerCore
    from rules.domains import Domains

    site = "cost"
    domains = Domains.from_data(domains_doc(site, nodes))
    core = ControllerCore(domains, site=site, controller_id="cost", key=b"k" * 32, rng=random.Random(1))
    names = [node_name(i) for i in range(nodes)]
    topics = [f"agentd/v1/{site}/nodes/{n}/power" for n in names]
    now = 1_767_225_600.0
    cycles: list[float] = []
    ingest = 0.0
    for r in range(rounds + 1):
        payloads = []
        for i, name in enumerate(names):
            d = BASE_DEMAND_W * (1.3 if (i + r) % 3 == 0 else 1.0)  # over the cap: capping, budgets move
            payloads.append((f'{{"v":1,"kind":"node","site":"{site}","node":"{name}","ts":{now:.3f},"seq":{r},'
                             f'"gpus":8,"gpu_power_w":{d:.1f},"demand_w":{d:.1f},"min_w":1600.0,"floor_w":1600.0,'
                             f'"max_w":5600.0,"flexible_w":{{"low":{d - 1600:.1f}}}}}').encode())
        t = time.process_time()
        for topic, p in zip(topics, payloads):
            core.on_message(topic, p, now)
        ingest = (time.process_time() - t) / nodes
        t = time.process_time()
        core.cycle(now)
        if r:  # the first cycle sends every lease for the first time: leave it out
            cycles.append(time.process_time() - t)
        now += 1.0
    cycles.sort()
    return cycles[len(cycles) // 2], ingest


# -- orchestration --------------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _ready(proc: subprocess.Popen, what: str) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise SystemExit(f"{what} failed to start: {line}{proc.stderr.read()}")


def _result(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=None, help="HOST:PORT (default $TEST_MQTT_HOST:$TEST_MQTT_PORT)")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--events", type=int, default=6, help="meter steps over the cap")
    ap.add_argument("--event-every", type=float, default=20.0, help="seconds between them (each lasts 10 s)")
    ap.add_argument("--push", type=float, default=0.15, help="the non-GPU load step, as a fraction of the cap")
    ap.add_argument("--sizes", default="1000,2000,5000,10000,20000", help="N for the in-process cycle cost")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "gen":
            host, port, site, nodes, start, duration, events, every, push, tm0, tm1 = rest
            role_gen(host, int(port), site, int(nodes), float(start), float(duration), int(events), float(every),
                     float(push), float(tm0), float(tm1))
        elif role == "controller":
            host, port, site, dfile, kfile, duration, tm0, tm1 = rest
            print(json.dumps(asyncio.run(_controller(host, int(port), site, dfile, kfile, float(duration),
                                                     float(tm0), float(tm1)))), flush=True)
        elif role == "bare":
            host, port, site, tm0, tm1 = rest
            print(json.dumps(asyncio.run(_bare(host, int(port), site, float(tm0), float(tm1)))), flush=True)
        return
    broker = args.broker or (f"{os.environ['TEST_MQTT_HOST']}:{os.environ['TEST_MQTT_PORT']}"
                             if os.environ.get("TEST_MQTT_HOST") else None)
    if not broker:
        raise SystemExit("no broker: --broker HOST:PORT, or scripts/services start mosquitto and "
                         "eval \"$(scripts/services env)\"")
    host, _, port = broker.rpartition(":")
    site = f"bench{uuid.uuid4().hex[:6]}"
    n = args.nodes
    duration = 5.0 + args.events * args.event_every + 2.0
    print(f"site loop: {n} light nodes (1 Hz, spread over {SLOTS} slots), the real controller and a bare "
          f"subscriber through {broker}; site cap {site_cap_w(n) / 1e3:.0f} kW, {args.events} meter steps of "
          f"+{args.push:.0%} of the cap every {args.event_every:g} s; {duration:.0f} s", flush=True)
    from agentd.site.protocol import load_site_key  # noqa: F401 - fail early when the package is missing

    with tempfile.TemporaryDirectory(prefix="agentd-bench-site-") as tmp:
        import yaml

        dfile = Path(tmp) / "domains.yaml"
        dfile.write_text(yaml.safe_dump(domains_doc(site, n)))
        kfile = Path(tmp) / "site.key"
        kfile.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        start = time.time() + 4.0  # everyone connected before the first report
        tm0, tm1 = start + 3.0, start + duration - 1.0  # the measurement window (after the first leases)
        ctl = _spawn("controller", host, port, site, str(dfile), str(kfile), str(duration), str(tm0), str(tm1))
        _ready(ctl, "controller")
        bare = _spawn("bare", host, port, site, str(tm0), str(tm1))
        _ready(bare, "bare subscriber")
        gen = _spawn("gen", host, port, site, str(n), str(start), str(duration), str(args.events),
                     str(args.event_every), str(args.push), str(tm0), str(tm1))
        _ready(gen, "generator")
        g = _result(gen, "generator", duration + 120)
        b = _result(bare, "bare subscriber", 60)
        c = _result(ctl, "controller", 60)
    window = tm1 - tm0
    shed = g["shed"]
    lease = [s["lease_s"] for s in shed]
    write = [s["write_s"] for s in shed]
    per_event = {}
    for s in shed:
        per_event[s["event"]] = per_event.get(s["event"], 0) + 1
    ctl_rate = c["reports"] / c["cpu_s"] if c["cpu_s"] else float("nan")
    bare_rate = b["msgs"] / b["cpu_s"] if b["cpu_s"] else float("nan")
    ratio = ctl_rate / bare_rate
    print(f"events: {len(per_event)} of {args.events} made nodes shed ({', '.join(str(per_event[k]) for k in sorted(per_event))} "
          f"nodes); report -> lease p50 {_pct(lease, 0.5):.3f} s p99 {_pct(lease, 0.99):.3f} s; report -> limits written "
          f"p50 {_pct(write, 0.5):.3f} s p99 {_pct(write, 0.99):.3f} s max {max(write, default=float('nan')):.3f} s "
          f"(goal p99 <= 2 s)")
    print(f"generator: {g['sent']} reports sent, {g['leases']} leases taken, CPU {100 * g['cpu_s'] / window:.1f} % of a "
          f"core ({1e6 * g['cpu_s'] / max(1, g['sent_window']):.0f} us per report)")
    print(f"controller: {c['reports']} reports in {window:.0f} s, CPU {100 * c['cpu_s'] / window:.1f} % of a core "
          f"(cycles {100 * c['cycle_cpu_s'] / window:.1f} %, {c['cycles']} cycles, max {1e3 * c['cycle_s_max']:.1f} ms, "
          f"overruns {c['overruns']}); {c['leases_sent']} leases issued ({c['leases_paced']} refreshes paced; "
          f"the cycle loop spent {c['send_wall_s']:.2f} s in all handing them to the connection, at most "
          f"{c['send_wall_max_s']:.3f} s in one cycle; publish failures {c['publish_failures']}); refused {c['refused']}; inbox drops "
          f"{c['mqtt_dropped']}; ingest {ctl_rate:,.0f} reports per CPU-second")
    print(f"bare aiomqtt subscriber: {b['msgs']} messages, CPU {100 * b['cpu_s'] / window:.1f} % of a core; "
          f"{bare_rate:,.0f} messages per CPU-second; ingest_ratio {ratio:.2f} (goal >= 0.5)")
    # the largest site at 1 Hz: N x c_report + cycle(N) <= 1 CPU-second per second
    c_report = (c["cpu_s"] - c["cycle_cpu_s"]) / max(1, c["reports"])
    needs: list[tuple[int, float]] = []
    for size in [int(x) for x in args.sizes.split(",") if x.strip()]:
        cyc, decode = cycle_cost_s(size)
        need = size * c_report + cyc
        needs.append((size, need))
        print(f"  N={size:>6}: cycle {1e3 * cyc:7.1f} ms CPU (in-process, every lease re-sent), ingest "
              f"{1e6 * c_report:.0f} us/report (broker run; decode alone {1e6 * decode:.0f} us) -> "
              f"{need:.2f} CPU-s per s: {'fits' if need <= 1.0 else 'does not fit'} in one core")
        if need > 1.0:
            break
    fit = [(sz, nd) for sz, nd in needs if nd <= 1.0]
    over = [(sz, nd) for sz, nd in needs if nd > 1.0]
    best = fit[-1][0] if fit else 0
    if fit and over:  # linear between the last size that fits and the first that does not
        (lo, lo_need), (hi, hi_need) = fit[-1], over[0]
        best = int(lo + (hi - lo) * (1.0 - lo_need) / (hi_need - lo_need))
    print(f"largest site one controller process keeps up with at 1 Hz (derived: one core): ~{best} nodes")
    print(f"p50_s={_pct(write, 0.5):.3f} p99_s={_pct(write, 0.99):.3f} ingest_ratio={ratio:.2f} max_nodes_1hz={best}")


if __name__ == "__main__":
    main()
