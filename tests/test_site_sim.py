"""The site simulation: the measurement (pure), a small site on the simulated clock (what CI runs),
faults, the CLI and the demo view, a short run through the real broker, and (opt-in) 200 nodes.

The small site is issue 10's scenario at 20 nodes: cap at 80 % of uncapped demand, a step to
125 % of the cap after the warm-up, a 1 Hz tick. A goal that today's controller and node do not
meet is a strict xfail that says why (it turns into a failure the day it is met, so the mark is
removed then).
"""

import asyncio
import io
import json
import math
import os
import re

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from agentd.site.bus import InProcessBus
from agentd.site.sim import (
    SiteRecorder, SiteScenario, SiteSim, domains_data, failsafe_w, live_line, uniform_level_w,
)
from agentd.site.sim_cli import run_site_demo, site
from agentd.site.workload import WorkloadConfig, build_workload, speed_fraction
from rules.domains import Domains

FINAL = re.compile(r"^over_cap_s=(\S+) overshoot_pct=(\S+) hp_kept_pct=(\S+) vs_uniform_pp=(\S+) "
                   r"reversals_per_30s=(\S+)$")


# -- the measurement, on made-up traces -----------------------------------------------------

def flat_site(nodes=2, gpus=2, demand_w=500.0):
    cfg = WorkloadConfig(kind_mix={"training": 1.0}, class_mix={"high": 1.0}, training_compute_w=(demand_w, demand_w),
                         training_dip_frac=(1.0, 1.0), noise_w=0.0, chip_spread=0.0, training_job_nodes=(1, 1))
    work = build_workload(cfg, nodes, gpus, seed=1)
    sc = SiteScenario(nodes=nodes, gpus_per_node=gpus, nodes_per_rack=nodes, warmup_s=2, after_s=10, tick_s=1.0)
    doms = Domains.from_data(domains_data(sc, 1000.0))
    names = [f"r000-n{i}" for i in range(nodes)]
    return work, doms, names


def test_over_cap_seconds_overshoot_beyond_1s_and_recovery():
    work, doms, names = flat_site()  # 4 GPUs at 500 W: 2000 W of demand, cap 1000 W
    rec = SiteRecorder(work, doms, names, cap_w=1000.0, step_s=2.0, tick_s=1.0)
    # per tick, every GPU's limit: the site draws 4 x min(500, limit)
    for t, lim in [(0, 200), (1, 200), (2, 300), (3, 280), (4, 260), (5, 250), (6, 240), (7, 255), (8, 240)]:
        rec.record(float(t), [float(lim)] * 4, 0)
    r = rec.result(2)
    # after the step: 1200, 1120, 1040 W over the cap (3 s), then 1000, 960, 1020 (1 s), 960
    assert r.over_cap_s == 4.0
    assert r.recovery_s == 3.0
    assert r.max_overshoot_pct == pytest.approx(20.0)
    # beyond the first second of an excursion: 1120 W (the 2nd second of the first one) is the most;
    # the one-second excursion to 1020 W does not count
    assert r.overshoot_pct == pytest.approx(12.0)
    assert r.pre_step_over_cap_s == 0.0
    assert r.domains_over_cap_s["site"] == 4.0


def test_reversals_count_direction_changes_of_each_gpu_limit():
    work, doms, names = flat_site(nodes=1, gpus=2)
    rec = SiteRecorder(work, doms, names, cap_w=1e6, step_s=0.0, tick_s=1.0)
    gpu0 = [700, 600, 500, 500, 550, 600, 400, 400.3, 450]  # fall, hold, rise (1), fall (2), tiny, rise (3)
    gpu1 = [700, 650, 600, 550, 500, 450, 400, 350, 300]  # only falls: none
    for t, (a, b) in enumerate(zip(gpu0, gpu1)):
        rec.record(float(t), [float(a), float(b)], 0)
    assert rec.reversals == [3, 0]
    r = rec.result(1)
    assert r.reversals_max == 3
    assert r.reversals_per_30s == pytest.approx(3 / 2 / (9 / 30))


def test_uniform_level_meets_the_cap_and_the_baseline_is_scored_on_the_same_traces():
    assert uniform_level_w([100.0, 300.0, 600.0], 1000.0, 200.0, 700.0) == 700.0  # fits: no cap
    assert uniform_level_w([100.0, 300.0, 600.0], 800.0, 200.0, 700.0) == pytest.approx(400.0)  # 100 + 300 + 400
    assert uniform_level_w([100.0, 300.0, 600.0], 600.0, 200.0, 700.0) == pytest.approx(250.0)  # 100 + 2 x 250
    assert uniform_level_w([600.0, 600.0], 300.0, 200.0, 700.0) == 200.0  # even the minimum does not fit
    work, doms, names = flat_site()
    rec = SiteRecorder(work, doms, names, cap_w=1000.0, step_s=0.0, tick_s=1.0)
    # ours: one node held at 200 W per GPU, the other at 300 W (1000 W in all)
    for t in range(5):
        rec.record(float(t), [200.0, 200.0, 300.0, 300.0], 0)
    r = rec.result(2)
    assert r.uniform_cap_w == pytest.approx(250.0)  # 4 x 250 = the cap
    assert r.uniform_pct == pytest.approx(100 * speed_fraction(250.0, 500.0, 100.0))
    ours = (speed_fraction(200.0, 500.0, 100.0) + speed_fraction(300.0, 500.0, 100.0)) / 2
    assert r.aggregate_pct == pytest.approx(100 * ours)
    assert r.vs_uniform_pp == pytest.approx(r.aggregate_pct - r.uniform_pct)
    assert r.vs_uniform_pp < 0  # the same watts spread unevenly buy less (the model is concave)
    assert r.kept_pct["high"] == r.hp_kept_pct


def test_the_uniform_cap_must_hold_at_the_peak_tick_of_the_window():
    cfg = WorkloadConfig(kind_mix={"training": 1.0}, class_mix={"low": 1.0}, training_compute_w=(500.0, 500.0),
                         training_dip_frac=(0.5, 0.5), training_comm_frac=(0.5, 0.5), training_period_s=(2.0, 2.0),
                         noise_w=0.0, chip_spread=0.0, training_job_nodes=(2, 2))
    work = build_workload(cfg, 2, 2, seed=1)  # one job: 4 GPUs in phase, 500 W and 250 W on alternate ticks
    sc = SiteScenario(nodes=2, gpus_per_node=2, nodes_per_rack=2, warmup_s=2, after_s=10)
    rec = SiteRecorder(work, Domains.from_data(domains_data(sc, 1000.0)), ["r000-n0", "r000-n1"], cap_w=1000.0,
                       step_s=0.0, tick_s=1.0)
    levels = set()
    for t in range(6):
        rec.record(float(t), [700.0] * 4, 0)
        levels.add(round(work.demand_w(0, float(t))))
    assert levels == {500, 250}
    r = rec.result(2)
    assert r.uniform_cap_w == pytest.approx(250.0)  # what the 500 W ticks need, not the 250 W ones
    # the uniform cap slows the 500 W ticks only: half the time at speed(250, 500)
    assert r.uniform_pct == pytest.approx(100 * (1 + speed_fraction(250.0, 500.0, 100.0)) / 2)


def test_domains_and_failsafes_of_the_scenario():
    sc = SiteScenario(nodes=10, nodes_per_rack=4, racks_per_row=2)
    doms = Domains.from_data(domains_data(sc, 40_000.0))
    assert [d for d in doms if doms.is_leaf(d)] == ["rack-000", "rack-001", "rack-002"]
    assert doms.cap_w("rack-002") == pytest.approx(0.9 * 2 * 8 * 700)  # its 2 nodes at 90 % of their max
    assert doms.cap_w("row-00") == pytest.approx(1.1 * 40_000.0 * 8 / 10)
    under = {"site": 10, "row-00": 8, "row-01": 2, "rack-000": 4, "rack-001": 4, "rack-002": 2}
    assert failsafe_w(doms, "r002-n1", under) == pytest.approx(4000.0)  # the site's share binds
    # every node's failsafe together stays under every cap
    for d in doms:
        members = doms.nodes_in(d, [f"r{k // 4:03d}-n{k % 4}" for k in range(10)])
        assert sum(failsafe_w(doms, n, under) for n in members) <= doms.cap_w(d) + 1e-6


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "nodes must be a whole number >= 1"),
    ({"tick_s": 0.0}, "tick_s must be > 0"),
    ({"tick_s": -1.0}, "tick_s must be > 0"),
    ({"warmup_s": math.nan}, "warmup_s must be > 0"),
    ({"after_s": 0.0}, "after_s must be > 0"),
    ({"cap_fraction": 1.2}, "cap_fraction must be at most 1"),
    ({"warmup_load": 1.5}, "warmup_load x cap_fraction must be at most 1"),
    ({"warmup_s": 1.0}, "warmup_s and after_s must each hold at least two ticks"),
    ({"site": "a/b"}, "site 'a/b' holds '/'"),
])
def test_bad_scenarios_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SiteScenario(**kwargs)


# -- a small site on the simulated clock (the CI variant) -------------------------------------

SMALL = SiteScenario(nodes=20, warmup_s=40.0, after_s=60.0)


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    with capture_logs() as logs:
        sim = SiteSim(SMALL, tmp_path_factory.mktemp("small-site"))
        result = sim.run_sim_time()
    return sim, result, logs


def test_small_site_stays_under_its_caps_after_the_step(small_site):
    sim, r, logs = small_site
    assert r.nodes == 20 and r.gpus == 160
    assert r.window_s == SMALL.after_s
    # the step really pushed demand over the cap (otherwise there is nothing to show)
    post = [s for s in sim.recorder.samples if s.t_s >= SMALL.step_s]
    assert sum(s.demand_w for s in post) / len(post) > 1.15 * r.cap_w
    assert r.pre_step_over_cap_s == 0
    assert r.over_cap_s <= 2.0  # goal: back under the cap within 2 s at a 1 Hz tick
    assert r.overshoot_pct <= 2.0
    late = [s for s in post if s.t_s >= SMALL.step_s + 2.0]
    assert all(s.site_w <= r.cap_w for s in late)
    assert all(not s.over for s in late)  # every domain, not only the site


def test_small_site_nodes_run_on_signed_leases_not_failsafe(small_site):
    sim, r, logs = small_site
    assert r.extra["refused_leases"] == 0
    assert r.failsafe_node_s == 0  # after the step, every node holds a live lease
    assert all(n.site.tracker.accepted > 0 for n in sim.nodes)
    assert all(n.last_source == "lease" for n in sim.nodes)
    assert r.extra["reports_sent"] == 20 * int((SMALL.warmup_s + SMALL.after_s) / SMALL.tick_s)
    assert sim.core.stats.reports_refused == 0
    assert not [e for e in logs if e["log_level"] == "error" and e["event"] not in ("domain_shortfall",)]


def test_small_site_gpus_follow_the_measured_site_clock(small_site):
    sim, _, _ = small_site
    assert all(n.last_t_s == SMALL.duration_s - SMALL.tick_s + (n.index % SMALL.slots) * SMALL.tick_s / SMALL.slots
               for n in sim.nodes)


def test_small_site_reversals_stay_under_the_bound(small_site):
    _, r, _ = small_site
    assert r.reversals_per_30s <= 1.0


def test_small_site_keeps_high_priority_throughput(small_site):
    _, r, _ = small_site
    assert r.hp_kept_pct >= 98.0


@pytest.mark.xfail(strict=True, reason="issue 10 goal not met by today's controller + node: budgets of GPUs that "
                   "idle or swing are reserved at their peaks and floors while the site draws well under its cap "
                   "(mean power ~65-75 % of it; see docs/site-sim.md, Findings)")
def test_small_site_beats_a_uniform_static_cap(small_site):
    _, r, _ = small_site
    assert r.vs_uniform_pp >= 5.0


def test_same_seed_same_run(tmp_path):
    sc = SiteScenario(nodes=4, warmup_s=6.0, after_s=6.0)
    with capture_logs():
        a = SiteSim(sc, tmp_path / "a").run_sim_time()
        b = SiteSim(sc, tmp_path / "b").run_sim_time()
    assert a.final_line() == b.final_line()
    assert a.kept_pct == b.kept_pct


# -- faults on the simulated clock ------------------------------------------------------------

def test_controller_killed_every_node_on_failsafe_within_one_ttl_and_under_cap(tmp_path):
    sc = SiteScenario(nodes=8, warmup_s=10.0, after_s=30.0, controller={"lease_ttl": "6s"})
    kill_at = 20.0

    def kill(t, bus, core):
        if t >= kill_at:
            sim.controller_running = False

    with capture_logs() as logs:
        sim = SiteSim(sc, tmp_path)
        r = sim.run_sim_time(between_ticks=kill)
    samples = sim.recorder.samples
    assert all(s.failsafe_nodes == 0 for s in samples if sc.step_s <= s.t_s < kill_at)
    # the last lease was issued at kill_at - 0.5 s; nodes hold it for its TTL, then fall back
    assert all(s.failsafe_nodes == 8 for s in samples if s.t_s >= kill_at + 6.0)
    assert all(s.site_w <= r.cap_w for s in samples if s.t_s >= kill_at)
    assert [e for e in logs if e["event"] == "budget_failsafe" and e.get("why") == "expired"]


def test_broker_outage_nodes_ride_their_leases_then_failsafe_then_resume(tmp_path):
    sc = SiteScenario(nodes=6, warmup_s=10.0, after_s=40.0, controller={"lease_ttl": "5s"})
    bus = InProcessBus()

    def outage(t, b, core):
        if t == 20.0:
            b.set_online(False)  # a broker restart that lost everything
        if t == 32.0:
            b.set_online(True, keep_retained=False)

    with capture_logs():
        sim = SiteSim(sc, tmp_path)
        r = sim.run_sim_time(bus=bus, between_ticks=outage)
    by_t = {round(s.t_s): s for s in sim.recorder.samples}
    assert by_t[22].failsafe_nodes == 0  # riding the last lease
    assert all(by_t[t].failsafe_nodes == 6 for t in range(26, 32))  # expired: failsafe
    assert all(by_t[t].failsafe_nodes == 0 for t in range(36, 50))  # leases resumed
    assert all(s.site_w <= r.cap_w for s in sim.recorder.samples if s.t_s >= sc.step_s + 2)
    assert bus.stats.dropped_offline > 0


# -- the CLI and the demo -----------------------------------------------------------------------

def test_cli_sim_time_prints_the_configuration_and_ends_with_the_figures(tmp_path):
    out = tmp_path / "result.json"
    res = CliRunner().invoke(site, ["--sim-time", "--nodes", "4", "--duration", "16s", "--warmup", "8",
                                    "--mix", "high=1,normal=1,low=0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert FINAL.match(lines[-1]), lines[-1]
    text = res.output
    for piece in ("workload: training 60%", "classes per job: high 50%, normal 50%, low 0%", "site cap",
                  "transport: in-process bus", "result: 4 nodes, 32 GPUs", "goals:"):
        assert piece in text, piece
    assert any(line.startswith("t=") and "site" in line for line in lines)  # the live summary
    doc = json.loads(out.read_text())
    assert doc["scenario"]["nodes"] == 4
    assert f"over_cap_s={doc['result']['over_cap_s']:g}" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--sim-time", "--duration", "0"], "must be more than 0 seconds"),
    (["--sim-time", "--tick", "-1"], "must be more than 0 seconds"),
    (["--sim-time", "--warmup", "0s"], "must be more than 0 seconds"),
    (["--sim-time", "--summary-every", "0"], "must be more than 0 seconds"),
    (["--sim-time", "--hold", "-5s"], "must be more than 0 seconds"),
    (["--sim-time", "--duration", "30", "--warmup", "30"], "must be longer than --warmup"),
    (["--sim-time", "--step", "1.25", "--cap-fraction", "0.7"], "disagree"),
    (["--sim-time", "--cap-fraction", "0"], "must be more than 0"),
    (["--sim-time", "--mix", "urgent=1"], "--mix: unknown names ['urgent']"),
    (["--sim-time", "--class-floors", "vip=0.5"], "--class-floors: unknown classes ['vip']"),
    (["--sim-time", "--controller", "lease_ttl"], "expected KEY=VALUE"),
    (["--sim-time", "--controller", "no_such_setting=1"], "controller.no_such_setting: unknown setting"),
    (["--sim-time", "--broker", "127.0.0.1:1883"], "not both"),
    (["--broker", "nohost:99999"], "expected HOST:PORT"),
])
def test_cli_refuses_bad_options(args, message):
    res = CliRunner().invoke(site, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_cli_without_a_broker_or_sim_time_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TEST_MQTT_HOST", raising=False)
    monkeypatch.delenv("TEST_MQTT_PORT", raising=False)
    res = CliRunner().invoke(site, ["--nodes", "2"])
    assert res.exit_code == 2
    assert "no broker: give --broker HOST:PORT" in res.output and "--sim-time" in res.output


def test_cli_unreachable_broker_exits_1_naming_it():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(site, ["--nodes", "2", "--broker", f"127.0.0.1:{port}", "--duration", "10",
                                    "--warmup", "4", "--connect-timeout", "1s"])
    assert res.exit_code == 1, res.output
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port} within 1 s" in res.output


def test_demo_view_fits_80x24_and_shows_the_recovery():
    out = io.StringIO()  # not a TTY: a frame every 10 s, and around the step
    with capture_logs():
        r = run_site_demo(nodes=4, duration_s=24.0, warmup_s=10.0, speed=1e9, out=out)
    text = out.getvalue()
    starts = [m.start() for m in re.finditer(r"^agentd demo --site", text, re.M)]
    frames = [text[a:b].rstrip("\n") for a, b in zip(starts, starts[1:] + [text.index("result: ")])]
    assert len(frames) >= 3
    for frame in frames:
        rows = frame.splitlines()
        assert len(rows) <= 23 and max(len(x) for x in rows) <= 80, frame
    assert "site" in frames[0] and "capped GPUs: high" in frames[0]
    assert "since the step: over the cap" in frames[-1]
    assert FINAL.match(out.getvalue().strip().splitlines()[-1])
    assert r.nodes == 4


def test_live_line_is_one_line():
    sc = SiteScenario(nodes=2, warmup_s=4, after_s=4)
    from agentd.site.sim import Sample

    line = live_line(Sample(5.0, 9000.0, 12000.0, {"idle": 0, "low": 3, "normal": 1, "high": 0}, ["site"], 0),
                     10_000.0, sc.step_s, 1)
    assert "\n" not in line and "step+1s" in line and "over cap: site" in line and "1 capping" in line


# -- through the real broker ----------------------------------------------------------------------

@pytest.mark.integration
async def test_a_few_nodes_through_the_real_broker(services, tmp_path):
    import aiomqtt

    site_name = f"t{os.getpid()}x{id(tmp_path) % 100000}"
    sc = SiteScenario(nodes=4, warmup_s=4.0, after_s=4.0, tick_s=0.5, site=site_name,
                      controller={"lease_ttl": "3s"})
    with capture_logs():
        sim = SiteSim(sc, tmp_path)
        r = await sim.run_broker(services.mqtt_host, services.mqtt_port)
    assert r.extra["transport"].startswith("MQTT broker")
    assert r.extra["reports_sent"] == 4 * 16
    assert r.extra["leases_received"] >= 4  # every node got a lease through the broker ...
    assert r.extra["refused_leases"] == 0  # ... signed with the site key
    assert all(n.site.tracker.accepted > 0 for n in sim.nodes)
    assert sim.core.stats.reports_accepted >= 4 * 10
    assert r.over_cap_s <= 2 * sc.tick_s * 2  # two cycles of the controller at most
    # the simulated GPUs ran on the same site clock as the measurement (their demand curves)
    assert all(sc.duration_s - 1.0 <= n.last_t_s <= sc.duration_s for n in sim.nodes)
    # the run left no retained lease behind (clear_leases_on_stop)
    retained: list[str] = []
    async with aiomqtt.Client(services.mqtt_host, services.mqtt_port, identifier=f"chk-{site_name}") as client:
        await client.subscribe(f"agentd/v1/{site_name}/#")
        try:
            async with asyncio.timeout(0.5):
                async for m in client.messages:
                    if m.retain and m.payload:
                        retained.append(m.topic.value)
        except TimeoutError:
            pass
    assert retained == []


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("SITE_SIM_SLOW") != "1", reason="the 200-node run takes ~3 min: SITE_SIM_SLOW=1")
async def test_200_nodes_through_the_real_broker(services, tmp_path):
    sc = SiteScenario(nodes=200, warmup_s=60.0, after_s=120.0, site=f"slow{os.getpid()}")
    with capture_logs():
        sim = SiteSim(sc, tmp_path)
        r = await sim.run_broker(services.mqtt_host, services.mqtt_port)
    print("\n".join(r.report_lines()), "\n", r.final_line())
    assert r.over_cap_s <= 2.0
    assert r.overshoot_pct <= 2.0
    assert r.reversals_per_30s <= 1.0
    assert r.extra["refused_leases"] == 0
