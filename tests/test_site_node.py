"""The node side of site power caps: demand estimates, NodeSite's report / budget / point, and
a daemon on simulated GPUs that holds the lease's budget (agentd.site.demand, agentd.site.node,
the wiring in agentd.daemon and agentd.control). Injected clocks; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agentd.clock import FakeClock
from agentd.config import AgentConfig, ConfigError
from agentd.daemon import Daemon, open_store
from agentd.mqtt import MqttLink, Route
from agentd.site import topics
from agentd.site.demand import DemandEstimator, DemandWindow
from agentd.site.node import NodeSite, make_node_site
from agentd.site.protocol import Lease, decode_report, encode_lease
from collectors.base import GpuSample
from collectors.sim import MAX_W, MIN_W, SimBackend
from rules.budget import CLASSES, GpuDemand, node_report
from rules.domains import load_domains_text

KEY = b"site-key-for-tests-0123456789"
T0 = 1_767_225_600.0
SW_POWER_CAP = 0x4


def gpu(index=0, *, power=300.0, limit=700.0, util=50.0, clock=1980.0, reasons=0, healthy=True,
        uuid=None, lo=200.0, hi=700.0) -> GpuSample:
    if not healthy:
        return GpuSample(index=index, uuid=uuid or f"GPU-{index}", model="m", ts_ns=0, healthy=False, error="lost")
    return GpuSample(index=index, uuid=uuid or f"GPU-{index}", model="m", ts_ns=0, power_w=power, power_avg_w=power,
                     limit_w=limit, limit_current_w=limit, limit_min_w=lo, limit_max_w=hi, util_pct=util,
                     sm_clock_mhz=clock, clock_reasons=reasons)


# -- demand ------------------------------------------------------------------------------------

def test_an_uncapped_gpu_demands_what_it_draws():
    est = DemandEstimator()
    assert est.estimate(gpu(power=450.0, limit=700.0), 700.0) == (450.0, False)


def test_a_gpu_at_its_own_ceiling_is_not_estimated():
    # the operator set 500 W: releasing our caps frees nothing, so demand is its draw
    est = DemandEstimator()
    assert est.estimate(gpu(power=499.0, limit=500.0, reasons=SW_POWER_CAP), 500.0) == (499.0, False)


def test_a_capped_gpu_is_estimated_from_its_clock_against_its_uncapped_speed():
    est = DemandEstimator()
    est.estimate(gpu(power=500.0, util=90.0, clock=1980.0), 700.0)  # the reference: uncapped
    demand, estimated = est.estimate(gpu(power=400.0, limit=400.0, util=90.0, clock=1800.0,
                                         reasons=SW_POWER_CAP), 700.0)
    assert estimated and demand == pytest.approx(400.0 * (1980.0 / 1800.0) ** 3)  # 532 W


def test_a_capped_gpu_doing_more_work_than_at_its_reference_is_scaled_by_utilisation():
    est = DemandEstimator()
    est.estimate(gpu(power=300.0, util=40.0, clock=1980.0), 700.0)
    demand, _ = est.estimate(gpu(power=350.0, limit=350.0, util=80.0, clock=1980.0), 700.0)
    assert demand == pytest.approx(600.0)  # 300 W x 80 / 40: clocks say nothing here, utilisation does


def test_an_estimate_is_never_below_the_draw_nor_above_the_ceiling():
    est = DemandEstimator()
    est.estimate(gpu(power=100.0, util=10.0, clock=1000.0), 700.0)  # a light reference
    low, _ = est.estimate(gpu(power=400.0, limit=400.0, util=5.0, clock=1000.0), 700.0)
    assert low == 400.0  # the terms say less than it draws: its draw
    high, _ = est.estimate(gpu(power=400.0, limit=400.0, util=100.0, clock=500.0), 700.0)
    assert high == 700.0  # the terms say ~6 kW: its ceiling


def test_a_gpu_capped_with_no_reference_yet_demands_its_ceiling():
    est = DemandEstimator()
    assert est.estimate(gpu(power=300.0, limit=300.0, clock=1500.0), 650.0) == (650.0, True)


def test_a_gpu_with_no_power_or_no_limit_reading_demands_its_ceiling():
    est = DemandEstimator()
    s = gpu()
    s.power_w = s.power_avg_w = None
    assert est.estimate(s, 700.0) == (700.0, True)
    s = gpu(power=300.0)
    s.limit_w = s.limit_current_w = None
    assert est.estimate(s, 700.0) == (700.0, True)


def test_a_capped_gpu_whose_work_goes_away_demands_its_draw_again():
    est = DemandEstimator()
    est.estimate(gpu(power=600.0, util=95.0), 700.0)
    assert est.estimate(gpu(power=400.0, limit=400.0, util=95.0, clock=1700.0), 700.0)[1]
    assert est.estimate(gpu(power=120.0, limit=400.0, util=10.0, clock=1980.0), 700.0) == (120.0, False)


def test_a_new_board_at_the_same_index_starts_without_a_reference():
    est = DemandEstimator()
    est.estimate(gpu(power=300.0, util=50.0, uuid="GPU-old"), 700.0)
    assert est.estimate(gpu(power=300.0, limit=300.0, util=50.0, clock=1500.0, uuid="GPU-new"), 700.0) == (700.0, True)


@pytest.mark.parametrize("static_w", [0.0, 100.0, 200.0])
def test_on_simulated_gpus_a_capped_estimate_errs_high_never_low(static_w):
    """Known demand curves (bursts and steps), clocks under a cap from the issue's throughput model
    (speed = ((P - P_static) / (P_demand - P_static)) ** (1/3)): every estimate of a capped GPU
    is at least its true demand (up to its ceiling), and none runs away above the ceiling."""
    import random

    rng = random.Random(7)
    demand = {i: [rng.choice([150.0, 300.0, 450.0, 600.0, 690.0]) for _ in range(60)] for i in range(8)}

    def demand_fn(i: int, ts_ns: int) -> float:
        return demand[i][int((ts_ns / 1e9 - T0) // 10) % 60]

    def speed_fn(limit_w: float, demand_w: float) -> float:
        return max(0.0, min(1.0, (limit_w - static_w) / (demand_w - static_w))) ** (1 / 3)

    backend = SimBackend(gpus=8, seed=5, demand_fn=demand_fn, speed_fn=speed_fn)
    backend.open()
    est = DemandEstimator()
    checked = 0
    for k in range(600):
        ts = int((T0 + k) * 1e9)
        if k % 100 == 50:
            for i in range(8):
                backend.set_power_limit(i, rng.choice([250.0, 350.0, 500.0]))
        for s in backend.sample(ts):
            got, estimated = est.estimate(s, MAX_W)
            assert got <= MAX_W
            if estimated:
                checked += 1
                assert got >= min(demand_fn(s.index, ts), MAX_W) - 1.0, (k, s.index)
    assert checked > 500


def test_the_demand_window_holds_a_peak_through_dips_and_lets_go_after_the_window():
    w = DemandWindow(30.0)
    assert w.update(0, 0.0, 690.0) == 690.0
    assert w.update(0, 8.0, 260.0) == 690.0  # an all-reduce dip: still wants its peak
    assert w.update(0, 10.0, 600.0) == 690.0
    assert w.update(0, 30.0, 100.0) == 600.0  # the 690 W reading left the window, 600 W is next
    assert w.update(0, 41.0, 100.0) == 100.0  # the job stopped: 30 s later it wants what it draws
    assert w.update(1, 41.0, 50.0) == 50.0  # each GPU its own window
    assert DemandWindow(0.0).update(0, 0.0, 10.0) == 10.0
    with pytest.raises(ValueError):
        DemandWindow(-1.0)


def test_a_node_reports_its_demand_over_the_window_not_the_ticks_dip():
    site = NodeSite(cfg(demand_window="20s"), None, None)
    assert site.step(T0, four_gpus(power=(690.0,) * 4)).report.demand_w == 2760.0
    assert site.step(T0 + 8, four_gpus(power=(260.0,) * 4)).report.demand_w == 2760.0
    assert site.step(T0 + 25, four_gpus(power=(260.0,) * 4)).report.demand_w == 1040.0
    # a new board at an index does not inherit the old one's window
    samples = four_gpus(power=(690.0,) * 4)
    site.step(T0 + 26, samples)
    samples[0] = gpu(0, power=250.0, uuid="GPU-swapped")
    assert site.step(T0 + 27, samples).demands_w[0] == 250.0


# -- NodeSite ----------------------------------------------------------------------------------

def cfg(tmp_path=None, **budget) -> AgentConfig:
    data = {"node": "gpu-001", "site": "s1", "backend": "sim", "sim": {"gpus": 4},
            "mqtt": {"host": "127.0.0.1", "port": 1},
            "budget": {"enabled": True, "failsafe_w": 2000.0, "allow_unsigned": True} | budget}
    if tmp_path is not None:
        data["state_dir"] = str(tmp_path)
    return AgentConfig.model_validate(data)


def lease(budget_w, *, ctrl="ctrl-a", issued=T0, ttl=10.0, seq=1, node="gpu-001", key=KEY) -> bytes:
    return encode_lease(Lease(site="s1", target=f"nodes/{node}", controller=ctrl, budget_w=budget_w,
                              issued_at=issued, expires_at=issued + ttl, seq=seq), key)


def four_gpus(power=(690.0, 690.0, 690.0, 690.0), limit=700.0) -> dict[int, GpuSample]:
    return {i: gpu(i, power=p, limit=limit, util=98.0) for i, p in enumerate(power)}


def test_the_report_holds_what_the_node_draws_can_shed_and_enforces_and_decodes():
    site = NodeSite(cfg(class_floor_fraction={"high": 0.8}), None, KEY)
    site.on_lease(topics.node_budget("s1", "gpu-001", "ctrl-a"), lease(1800.0), T0)
    samples = four_gpus(power=(690.0, 600.0, 80.0, 500.0))
    classes = {0: "high", 1: "normal", 2: "idle", 3: "low"}
    st = site.step(T0 + 2, samples, {i: 700.0 for i in samples}, classes)
    topic, payload = st.publish
    assert topic == "agentd/v1/s1/nodes/gpu-001/power"
    r = decode_report(payload)
    assert r == st.report
    assert (r.site, r.node, r.seq, r.gpus, r.ts) == ("s1", "gpu-001", 0, 4, T0 + 2)
    assert r.gpu_power_w == 1870.0 and r.min_w == 800.0 and r.max_w == 2800.0
    assert r.floor_w == 560.0 + 200.0 + 200.0 + 200.0  # high keeps 0.8 x 700; the rest their minimum
    assert r.flexible_w == {"idle": 0.0, "low": 300.0, "normal": 400.0, "high": 130.0}
    assert r.demand_w == r.floor_w + sum(r.flexible_w.values())  # the protocol's invariant
    assert (r.budget_w, r.budget_source, r.lease_age_s) == (1800.0, "lease", 2.0)
    assert st.demand_w == 1870.0  # physical: the idle GPU's 80 W, not its 200 W minimum
    assert st.node_cap.watts == 1800.0 and st.node_cap.source == "budget"
    assert st.classes_by_gpu == classes and st.level == "capped"  # it wants 1990 W
    assert site.step(T0 + 3, samples, None, classes).report.seq == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 800), st.floats(150, 700), st.sampled_from(["idle", "low", "normal", "high"]),
                          st.floats(300, 700)), min_size=1, max_size=8),
       st.floats(0, 1))
def test_the_report_sums_are_rules_budget_node_report_of_the_same_gpus(rows, high_floor):
    """The node's inlined sums equal rules.budget.node_report over the GpuDemand it hands the split."""
    site = NodeSite(cfg(class_floor_fraction={"high": high_floor, "normal": 0.3}), None, None)
    samples = {i: gpu(i, power=p, limit=lim, util=50.0) for i, (p, lim, _, _) in enumerate(rows)}
    baselines = {i: b for i, (_, _, _, b) in enumerate(rows)}
    step = site.step(T0, samples, baselines, {i: c for i, (_, _, c, _) in enumerate(rows)})
    gpus = [GpuDemand(i, step.classes_by_gpu[i], step.demands_w[i], step.floors_w[i], 200.0,
                      min(max(baselines[i], 200.0), 700.0)) for i in samples]
    want = node_report("n", gpus, 0.0)
    r = step.report
    assert r.min_w == pytest.approx(want.min_w, abs=0.06) and r.max_w == pytest.approx(want.max_w, abs=0.06)
    assert r.floor_w == pytest.approx(want.floor_w, abs=0.06)
    for c in CLASSES:
        assert r.flexible_w[c] == pytest.approx(want.flexible_w[c], abs=0.06)
    decode_report(step.publish[1])  # and the protocol takes it


def test_the_level_is_failsafe_without_a_lease_capped_under_the_want_else_uncapped():
    site = NodeSite(cfg(), None, None)
    samples = four_gpus(power=(300.0,) * 4)
    assert site.step(T0, samples).level == "failsafe"
    site.on_lease(topics.node_budget("s1", "gpu-001", "c"), lease(2000.0, ctrl="c"), T0)
    assert site.step(T0, samples).level == "uncapped"  # wants 1200 W, has 2000 W
    site.on_lease(topics.node_budget("s1", "gpu-001", "c"), lease(1000.0, ctrl="c", seq=2), T0)
    st = site.step(T0, samples)
    assert st.level == "capped" and st.point.fields["level"] == "capped"


def test_the_node_power_point_carries_the_budget_state_and_refusal_counters():
    domains = load_domains_text("site: s1\ndomains:\n  site: {cap_w: 1e6}\n"
                                "  rack-7: {parent: site, cap_w: 40000, nodes: ['gpu-0*']}\n")
    site = NodeSite(cfg(), domains, KEY)
    site.on_lease(topics.node_budget("s1", "gpu-001", "ctrl-a"), lease(1800.0), T0)
    site.on_lease(topics.node_budget("s1", "gpu-001", "evil"), lease(10.0, ctrl="evil", key=b"z" * 32), T0)
    st = site.step(T0 + 1, four_gpus(), ts_ns=123)
    p = st.point
    assert p.measurement == "node_power" and p.ts_ns == 123
    assert p.tags == {"host": "gpu-001", "site": "s1", "domain": "rack-7"}
    f = p.fields
    assert f["budget_w"] == 1800.0 and f["budget_source"] == "lease" and f["level"] == "capped"
    assert f["gpu_power_w"] == 2760.0 and f["demand_w"] == 2760.0 and f["lease_age_s"] == 1.0
    assert f["flexible_w"] == 1960.0 and f["flexible_normal_w"] == 1960.0 and f["leases_live"] == 1
    assert f["lease_refused_bad_signature"] == 1


def test_a_gpu_the_node_cannot_control_counts_at_its_last_limit_and_comes_off_the_node_cap():
    site = NodeSite(cfg(), None, None)
    site.on_lease(topics.node_budget("s1", "gpu-001", "c"), lease(2000.0, ctrl="c"), T0)
    site.step(T0, four_gpus(limit=450.0))
    samples = four_gpus(limit=450.0)
    samples[3] = gpu(3, healthy=False)
    st = site.step(T0 + 1, samples)
    assert st.uncontrolled_w == 450.0 and st.node_cap.watts == 1550.0
    r = st.report
    assert r.gpus == 4 and r.min_w == 3 * 200.0 + 450.0 and r.max_w == 3 * 700.0 + 450.0
    decode_report(st.publish[1])
    # a GPU without a baseline (its limit unreadable: the composition skips it) counts the same way
    st = site.step(T0 + 2, four_gpus(limit=450.0), {0: 700.0, 1: 700.0, 2: 700.0})
    assert st.uncontrolled_w == 450.0 and st.node_cap.watts == 1550.0 and 3 not in st.demands_w


def test_an_unknown_class_takes_the_default_and_is_logged_once():
    site = NodeSite(cfg(), None, None)
    with capture_logs() as logs:
        for k in range(3):
            st = site.step(T0 + k, four_gpus(), None, {0: "vip"})
    assert st.classes_by_gpu[0] == "normal"
    assert [e["event"] for e in logs].count("unknown_job_class") == 1


def test_a_failsafe_under_the_nodes_minimum_is_warned_about():
    site = NodeSite(cfg(failsafe_w=500.0), None, None)
    with capture_logs() as logs:
        site.step(T0, four_gpus())
        site.step(T0 + 1, four_gpus())
    assert [e["event"] for e in logs].count("failsafe_below_minimum") == 1


def test_publishing_can_be_turned_off():
    assert NodeSite(cfg(publish_reports=False), None, None).step(T0, four_gpus()).publish is None


def test_the_domains_file_must_be_this_sites_and_name_this_node_once():
    other = load_domains_text("site: s2\ndomains:\n  site: {cap_w: 1e6, nodes: ['gpu-*']}\n")
    with pytest.raises(ValueError, match="budget.domains_file: the file is for site 's2'"):
        NodeSite(cfg(), other, None)
    absent = load_domains_text("site: s1\ndomains:\n  site: {cap_w: 1e6, nodes: ['cpu-*']}\n")
    with capture_logs() as logs:
        assert NodeSite(cfg(), absent, None).domain is None
    assert logs[0]["event"] == "node_not_in_domains"


# -- configuration and start -------------------------------------------------------------------

def test_budget_config_errors_are_located_and_say_what_the_failsafe_is_for():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        AgentConfig.model_validate({"budget": {"enabled": True}})
    text = str(e.value)
    assert "budget.failsafe_w" in text and "sum under every domain's cap" in text
    assert "budget.site_key_file" in text and "allow_unsigned" in text
    bad = [{"max_lease_ttl": "2h"}, {"max_clock_skew": "soon"}, {"class_floor_fraction": {"vip": 0.5}},
           {"class_floor_fraction": {"high": 1.5}}, {"class_floor_fraction": {"high": True}}, {"failsafe_w": -1}]
    for over in bad:
        with pytest.raises(ValidationError):
            AgentConfig.model_validate({"budget": {"enabled": True, "failsafe_w": 1000, "allow_unsigned": True}
                                        | over})
    ok = AgentConfig.model_validate({"budget": {"enabled": True, "failsafe_w": 1000, "allow_unsigned": True,
                                                "max_clock_skew": "500ms", "class_floor_fraction": {"high": 0.8}}})
    assert ok.budget.max_clock_skew_s == 0.5 and ok.budget.max_lease_ttl_s == 60.0
    assert ok.budget.class_floor_fraction == {"idle": 0.0, "low": 0.0, "normal": 0.0, "high": 0.8}
    assert AgentConfig.model_validate({}).budget.enabled is False  # off by default, nothing required


def test_budget_without_mqtt_host_is_a_start_error_naming_both_keys(tmp_path):
    c = AgentConfig.model_validate({"budget": {"enabled": True, "failsafe_w": 1000, "allow_unsigned": True}})
    with pytest.raises(ConfigError) as e:
        make_node_site(c)
    assert "budget.enabled" in e.value.errors[0] and "mqtt.host" in e.value.errors[0]


def test_unreadable_key_and_bad_domains_file_are_start_errors(tmp_path):
    short = tmp_path / "site.key"
    short.write_bytes(b"short")
    domains = tmp_path / "domains.yaml"
    domains.write_text("site: s1\ndomains:\n  site: {cap_w: -5}\n")
    with pytest.raises(ConfigError) as e:
        make_node_site(cfg(site_key_file=str(short), domains_file=str(domains)))
    text = "\n".join(e.value.errors)
    assert "budget.site_key_file" in text and "use at least 16" in text
    assert "budget.domains_file" in text and "domains.site.cap_w" in text
    assert make_node_site(AgentConfig.model_validate({})) is None


# -- the daemon ---------------------------------------------------------------------------------

def daemon_for(tmp_path, clock, **over) -> tuple[Daemon, SimBackend]:
    key = tmp_path / "site.key"
    key.write_bytes(KEY)
    data = {"backend": "sim", "state_dir": str(tmp_path), "node": "gpu-001", "site": "s1", "interval": 1.0,
            "sim": {"gpus": 4}, "mqtt": {"host": "127.0.0.1", "port": 1},
            "rules": {"ramp_w_per_s": 100.0, "hold_s": 5.0},
            "budget": {"enabled": True, "failsafe_w": 2000.0, "site_key_file": str(key), "max_lease_ttl": "30s"}}
    c = AgentConfig.model_validate(data | over)
    backend = SimBackend(gpus=4, seed=2, profile="training")
    return Daemon(c, backend, open_store(c), clock=clock), backend


def last_attempts(backend: SimBackend) -> dict[int, float]:
    out: dict[int, float] = {}
    for i, w in backend.attempts:
        out[i] = w
    return out


async def test_a_daemon_on_simulated_gpus_holds_its_lease_then_its_failsafe(tmp_path):
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock)
    await daemon.start()
    now = clock.wall_ns() / 1e9
    d = daemon.site.on_lease(topics.node_budget("s1", "gpu-001", "ctrl-a"), lease(1600.0, issued=now, ttl=30), now)
    assert d.accepted
    with capture_logs() as logs:
        for _ in range(5):
            await daemon.tick()
            clock.advance(1.0)
    written = last_attempts(backend)
    assert len(written) == 4 and sum(written.values()) <= 1600.0 + 1e-6  # the sim's demand is ~2760 W
    assert sum(backend.limits_w().values()) <= 1600.0 + 1e-6
    assert all(c.source == "node:budget" for c in daemon.actuator.controls.values())
    sets = [e for e in logs if e["event"] == "power_limit_set"]
    assert sets and all(e["source"] == "node:budget" for e in sets)
    assert daemon.last_site.level == "capped"
    # the controller is killed: no renewal. Within one TTL the node is on its failsafe (2000 W),
    # reached through the ramp (a budget rise is a release: paced, after hold_s)
    failsafe_at = None
    with capture_logs() as logs:
        for _ in range(60):
            await daemon.tick()
            if failsafe_at is None and daemon.last_site.budget.source == "failsafe":
                failsafe_at = clock.wall_ns() / 1e9
            clock.advance(1.0)
    assert failsafe_at is not None and now + 30.0 <= failsafe_at <= now + 30.0 + 1.0  # one TTL, one tick
    assert daemon.last_site.budget.source == "failsafe" and daemon.last_site.level == "failsafe"
    assert any(e["event"] == "budget_failsafe" and e["why"] == "expired" for e in logs)
    assert sum(backend.limits_w().values()) == pytest.approx(2000.0, abs=1e-6)
    fields = daemon._agent_fields()
    assert fields["budget_leases_accepted"] == 1 and fields["budget_reports_dropped"] > 0  # no broker here
    await daemon.shutdown()
    store = open_store(daemon.cfg)
    points = store.query(measurement="node_power")
    store.close()
    assert len(points) == 65
    assert points[0].startswith("node_power,host=gpu-001,site=s1 ") and 'level="capped"' in points[0]
    assert 'level="failsafe"' in points[-1] and 'budget_source="failsafe"' in points[-1]


async def test_the_budget_lands_on_the_lowest_job_classes_first(tmp_path):
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock, budget={
        "enabled": True, "failsafe_w": 2000.0, "allow_unsigned": True, "class_floor_fraction": {"normal": 0.5}})
    classes = {0: "high", 1: "normal", 2: "low", 3: "idle"}  # as the job tracker would find them

    def track_jobs(samples, ts_ns, lines):
        daemon.job_classes = classes

    daemon._track_jobs = track_jobs
    await daemon.start()
    now = clock.wall_ns() / 1e9
    daemon.site.on_lease(topics.node_budget("s1", "gpu-001", "c"), lease(1700.0, ctrl="c", issued=now, key=b"k" * 16),
                         now)
    for _ in range(10):  # the first split follows the draws seen; what the high GPU wants more comes
        await daemon.tick()  # through the ramp, after hold_s
        clock.advance(1.0)
    limits = backend.limits_w()
    assert limits[3] == MIN_W and limits[2] == MIN_W  # idle and low give way first, to their minimum
    assert limits[1] == pytest.approx(600.0)  # normal keeps more than its 350 W floor ...
    assert limits[0] == 700.0  # ... and high keeps all it wants
    assert sum(limits.values()) == pytest.approx(1700.0)
    await daemon.shutdown()


async def test_the_budget_composes_with_a_rule_cap_the_lowest_wins(tmp_path):
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "site.yaml").write_text(
        "rules:\n  - name: always\n    scope: gpu\n    when: gpu.power_w > 0\n"
        "    actions: [{type: cap_gpu, watts: 300}]\n")
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock, rules={"dirs": [str(rules_d)], "builtin_packs": False})
    await daemon.start()
    now = clock.wall_ns() / 1e9
    daemon.site.on_lease(topics.node_budget("s1", "gpu-001", "c"), lease(2400.0, ctrl="c", issued=now), now)
    for _ in range(3):
        await daemon.tick()
        clock.advance(1.0)
    assert set(backend.limits_w().values()) == {300.0}  # the rule is lower than the budget's 600 W each
    assert {c.source for c in daemon.actuator.controls.values()} == {"always"}
    await daemon.shutdown()


async def test_dry_run_reports_the_budget_and_writes_no_limit(tmp_path):
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock, dry_run=True)
    await daemon.start()
    now = clock.wall_ns() / 1e9
    daemon.site.on_lease(topics.node_budget("s1", "gpu-001", "ctrl-a"), lease(1000.0, issued=now), now)
    for _ in range(3):
        await daemon.tick()
        clock.advance(1.0)
    assert backend.attempts == [] and daemon.last_site.level == "capped"
    assert daemon.last_site.report.budget_w == 1000.0
    await daemon.shutdown()


async def test_budget_works_with_rules_disabled(tmp_path):
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock, rules={"enabled": False})
    await daemon.start()
    now = clock.wall_ns() / 1e9
    daemon.site.on_lease(topics.node_budget("s1", "gpu-001", "ctrl-a"), lease(1200.0, issued=now), now)
    await daemon.tick()
    assert sum(backend.limits_w().values()) == pytest.approx(1200.0)
    await daemon.shutdown()


async def test_a_site_step_that_fails_holds_the_failsafe(tmp_path):
    clock = FakeClock()
    daemon, backend = daemon_for(tmp_path, clock)
    await daemon.start()

    def broken(*a, **kw):
        raise RuntimeError("bug")

    daemon.site.step = broken
    with capture_logs() as logs:
        await daemon.tick()
        await daemon.tick()
    assert sum(backend.limits_w().values()) == pytest.approx(2000.0)
    assert [e["event"] for e in logs].count("site_step_failed") == 1
    await daemon.shutdown()


async def test_the_reload_keeps_the_running_budget_section(tmp_path):
    clock = FakeClock()
    daemon, _ = daemon_for(tmp_path, clock)
    key = tmp_path / "site.key"
    path = tmp_path / "agentd.toml"
    path.write_text(f'backend = "sim"\nstate_dir = "{tmp_path}"\nnode = "gpu-001"\nsite = "s1"\n'
                    f'[sim]\ngpus = 4\n[mqtt]\nhost = "127.0.0.1"\nport = 1\n'
                    f'[budget]\nenabled = true\nfailsafe_w = 900.0\nsite_key_file = "{key}"\n')
    daemon.config_path = path
    await daemon.start()
    with capture_logs() as logs:
        assert await daemon.reload()
    assert daemon.cfg.budget.failsafe_w == 2000.0
    assert any(e["event"] == "reload_needs_restart" and "budget" in e["settings"] for e in logs)
    await daemon.shutdown()


# -- the MQTT link's routes --------------------------------------------------------------------

def test_a_route_takes_its_topics_and_the_rest_go_to_the_default_handler():
    import aiomqtt

    from agentd.config import MqttConfig

    default: list = []
    leases: list = []

    def bad(batch):
        raise RuntimeError("handler bug")

    link = MqttLink(MqttConfig(host="127.0.0.1"), client_id="t", subscriptions=[("cooling/#", 0)],
                    handler=default.extend,
                    routes=[Route("agentd/v1/s1/nodes/n1/budget/+", 1, leases.extend), Route("x/#", 0, bad)])
    assert link.subscriptions == [("cooling/#", 0), ("agentd/v1/s1/nodes/n1/budget/+", 1), ("x/#", 0)]
    msgs = [aiomqtt.Message(t, p, 0, False, 1, None) for t, p in [
        ("cooling/a/b", b"1"), ("agentd/v1/s1/nodes/n1/budget/c1", b"L1"), ("x/y", b"boom"),
        ("agentd/v1/s1/nodes/n1/budget/c2", b"L2"), ("cooling/c", b"2")]]
    link._deliver(msgs)
    assert leases == [("agentd/v1/s1/nodes/n1/budget/c1", b"L1"), ("agentd/v1/s1/nodes/n1/budget/c2", b"L2")]
    assert default == [("cooling/a/b", b"1"), ("cooling/c", b"2")]  # a failing route costs only its batch
    assert link.handler_errors == 1 and link.received == 5


async def test_publish_nowait_without_a_connection_is_dropped_and_counted():
    from agentd.config import MqttConfig

    link = MqttLink(MqttConfig(host="127.0.0.1"), client_id="t")
    assert link.publish_nowait("a/b", b"x") is False
    assert link.publish_dropped == 1 and link.published == 0
    await asyncio.sleep(0)


def test_report_payload_is_small_json():
    site = NodeSite(cfg(), None, None)
    payload = site.step(T0, four_gpus()).publish[1]
    assert len(payload) < 512 and json.loads(payload)["v"] == 1


def test_agentd_run_with_budget_but_no_broker_exits_with_both_keys_named(tmp_path):
    from click.testing import CliRunner

    from agentd.cli import main

    config = tmp_path / "agentd.toml"
    config.write_text(f'backend = "sim"\nstate_dir = "{tmp_path}"\n'
                      "[budget]\nenabled = true\nfailsafe_w = 3000\nallow_unsigned = true\n")
    result = CliRunner().invoke(main, ["run", "--config", str(config)], env={})
    assert result.exit_code == 2
    assert "budget.enabled" in result.output and "mqtt.host" in result.output
