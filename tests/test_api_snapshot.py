"""The throttle judgement (agentd.api.snapshot), pure: plain values of one tick in, the body out.
Each level on its own, the worst winning, what accept_new_work and the recommendations say."""

from __future__ import annotations

import pytest

from agentd.api.leases import Lease
from agentd.api.models import Throttle
from agentd.api.rule_facts import FactsCache, RuleFacts
from agentd.api.snapshot import (
    BudgetView,
    ControlView,
    Firing,
    JobView,
    TickInput,
    build_snapshot,
    build_throttle,
    public_source,
)
from agentd.control import load_rules
from collectors.base import GpuSample
from collectors.coolant_state import LoopView, SensorView, SeriesKey
from rules.actions import NodeCap
from rules.engine import Engine

T0_NS = 1_767_225_600 * 10**9
NOW = 500.0


def sample(i: int, **kw) -> GpuSample:
    base = dict(index=i, uuid=f"GPU-{i}", model="Simulated H200", ts_ns=T0_NS, power_w=600.0, temp_c=60.0,
                limit_w=700.0, limit_min_w=200.0, limit_max_w=700.0, slowdown_c=89.0, health="ok")
    return GpuSample(**(base | kw))


def control(target_w: float = 700.0, source: str = "baseline") -> ControlView:
    return ControlView(700.0, target_w, None if target_w >= 700 else target_w, source, False, False, None)


def facts(name: str, severity: str = "warning", advice: str = "none", actions: tuple[str, ...] = ("event",),
          description: str = "") -> RuleFacts:
    caps = any(a in ("cap_gpu", "cap_node") for a in actions)
    return RuleFacts(name, "node", severity, description or f"{name} holds", "x > 1", 0.0, 0.0, "ignore", actions,
                     advice, caps, "x_max=1", None, "x_max=1")


def firing(f: RuleFacts, gpu: int | None = None, since: float = NOW - 10, value: object = 2.5) -> Firing:
    return Firing(f.name, gpu, "firing", since, value, f)


def tick(*, gpus: int = 2, samples=None, controls=None, instances=(), advice=None, **kw) -> TickInput:
    samples = samples if samples is not None else {i: sample(i) for i in range(gpus)}
    controls = controls if controls is not None else {i: control() for i in samples}
    if advice is None:
        advice = {}
        for f in instances:
            if f.facts.advice != "none":
                advice.setdefault(f.facts.advice, []).append(f.rule)
    return TickInput(site="s1", node="n1", interval_s=1.0, dry_run=False, expires_after_s=33.0, wall_ns=T0_NS,
                     mono=NOW, read_ok=True, last_read_mono=NOW, ticks=10, samples=samples, controls=controls,
                     instances=tuple(instances), advice=advice, **kw)


def judge(inp: TickInput) -> Throttle:
    t = build_throttle(inp)
    Throttle.model_validate_json(t.model_dump_json())  # what is served validates against the contract
    return t


def test_a_quiet_node_is_ok_and_takes_work():
    t = judge(tick())
    assert (t.level, t.state, t.accept_new_work, t.advice, t.reasons) == (0, "ok", True, "none", [])
    assert t.recommendations.slurm.state == "RESUME" and t.recommendations.slurm.extra == {"agentd_level": 0}
    assert t.recommendations.kubernetes.taint.effect is None
    assert (t.generated_at, t.expires_at) == ("2026-01-01T00:00:00.000Z", "2026-01-01T00:00:33.000Z")
    assert t.draw_w == 1200.0 and t.node_cap_w is None


def test_a_firing_rule_that_neither_caps_nor_advises_is_degraded():
    t = judge(tick(instances=[firing(facts("note"))]))
    assert (t.level, t.state, t.accept_new_work) == (1, "degraded", True)
    (r,) = t.reasons
    assert (r.kind, r.rule, r.value, r.threshold, r.source, r.level) == ("rule", "note", "2.5", "x_max=1", "rule:note", 1)
    assert r.since == "2025-12-31T23:59:50.000Z"  # fired 10 s before the tick, in wall time


def test_a_pending_rule_is_not_a_reason():
    f = facts("slow", actions=("cap_gpu",))
    t = judge(tick(instances=[Firing("slow", None, "pending", NOW, 1.0, f)]))
    assert (t.level, t.reasons) == (0, [])


def test_stale_coolant_and_a_missing_reading_are_degraded_with_the_input_named():
    sensor = SensorView(SeriesKey("s1", "tcs", "cdu-1", ""), "supply_temp_c", 31.0, 1.0, 40.0, 6.0, "stale")
    view = LoopView("tcs", {}, None, 1, frozenset({"supply_temp_c"}), NOW, (sensor,))
    t = judge(tick(loops={"tcs": view}))
    (r,) = t.reasons
    assert (t.state, r.kind, r.source, r.value, r.threshold) == (
        "degraded", "stale", "coolant.tcs.supply_temp_c", "stale", "stale_after_s=6")
    assert "s1/tcs/cdu-1" in r.message and "40 s ago" in r.message
    inp = tick()
    no_read = TickInput(**{**{f: getattr(inp, f) for f in inp.__dataclass_fields__}, "read_ok": False,
                           "last_read_mono": NOW - 4.0})
    t = judge(no_read)
    assert t.state == "degraded" and t.reasons[0].source == "gpu" and "4.0 s old" in t.reasons[0].message


@pytest.mark.parametrize("health,severity", [("warn", "warning"), ("fail", "critical")])
def test_a_gpu_health_warning_or_failure_is_degraded_on_its_own(health, severity):
    t = judge(tick(samples={0: sample(0), 1: sample(1, health=health, xid_last=79)}))
    (r,) = t.reasons
    assert (t.level, t.accept_new_work) == (1, True)  # the health rules' advice does the draining
    assert (r.kind, r.gpu, r.value, r.severity) == ("health", 1, health, severity)
    assert r.message == f"gpu 1 health {health} (xid 79)"
    t = judge(tick(samples={0: sample(0), 1: GpuSample(1, "GPU-1", "H200", T0_NS, healthy=False, error="lost")}))
    assert t.state == "degraded" and t.reasons[0].value == "unreadable" and "lost" in t.reasons[0].message


def test_a_gpu_held_below_its_baseline_is_throttled_whatever_holds_it():
    t = judge(tick(controls={0: control(500.0, "ramp"), 1: control()}))
    assert (t.level, t.state, t.accept_new_work, t.reasons) == (2, "throttled", True, [])
    assert [g.source for g in t.gpus] == ["ramp", "baseline"] and t.gpus[0].target_w == 500.0
    f = facts("hot", actions=("cap_gpu",))
    t = judge(tick(instances=[firing(f, gpu=1)], controls={0: control(), 1: control(525.0, "hot")}))
    assert (t.level, t.reasons[0].level, t.gpus[1].source) == (2, 2, "rule:hot")


def test_no_new_work_advice_stops_new_work_without_raising_the_state():
    f = facts("blind", advice="no_new_work", actions=("advise",))
    t = judge(tick(instances=[firing(f)]))
    assert (t.level, t.state, t.accept_new_work, t.advice) == (1, "degraded", False, "no_new_work")
    assert t.recommendations.slurm.state == "DRAIN" and t.recommendations.slurm.reason == "agentd: no_new_work: blind"
    assert t.recommendations.kubernetes.taint.effect == "NoSchedule"


def test_drain_advice_is_level_3_and_no_execute():
    f = facts("leak", advice="drain", actions=("advise", "cap_gpu"))
    t = judge(tick(instances=[firing(f)], controls={0: control(200.0, "leak"), 1: control(200.0, "leak")}))
    assert (t.level, t.state, t.accept_new_work, t.advice) == (3, "drain", False, "drain")
    assert t.recommendations.slurm.reason == "agentd: drain: leak"
    assert t.recommendations.kubernetes.taint.model_dump() == {"key": "agentd.io/throttle", "value": "drain",
                                                               "effect": "NoExecute"}


def test_a_critical_rule_is_level_4_and_refuses_work_even_without_advice():
    f = facts("melting", severity="critical", actions=("cap_gpu",))
    t = judge(tick(instances=[firing(f, gpu=0)]))
    assert (t.level, t.state, t.accept_new_work, t.advice) == (4, "critical", False, "none")
    assert t.recommendations.slurm.reason == "agentd: critical: melting gpu 0"
    assert t.recommendations.kubernetes.taint.effect == "NoExecute"


def test_the_worst_wins_and_reasons_come_worst_first():
    sensor = SensorView(SeriesKey("s1", "tcs", "cdu-1", ""), "flow_lpm", 10.0, 0.0, 1.0, 6.0, "bad_quality")
    view = LoopView("tcs", {}, None, 1, frozenset({"flow_lpm"}), NOW, (sensor,))
    crit = facts("crit", severity="critical", actions=("cap_gpu",))
    drain = facts("drain_me", advice="drain", actions=("advise",))
    nnw = facts("nnw", advice="no_new_work", actions=("advise",))
    cap = facts("cap", actions=("cap_node",))
    lease = Lease("op", 400.0, 60.0, None, None, "maintenance", T0_NS, T0_NS, T0_NS + 60 * 10**9, NOW + 60)
    t = judge(tick(instances=[firing(cap), firing(nnw), firing(crit, gpu=1), firing(drain)], loops={"tcs": view},
                   samples={0: sample(0, health="warn"), 1: sample(1)}, leases=(lease,),
                   controls={0: control(400.0, "lease:op"), 1: control(350.0, "crit")}))
    assert (t.level, t.state, t.advice, t.accept_new_work) == (4, "critical", "drain", False)
    assert [(r.kind, r.source, r.level) for r in t.reasons] == [
        ("rule", "rule:crit", 4), ("rule", "rule:drain_me", 3), ("rule", "rule:cap", 2), ("lease", "lease:op", 2),
        ("rule", "rule:nnw", 1), ("health", "gpu", 1), ("stale", "coolant.tcs.flow_lpm", 1)]
    assert t.recommendations.slurm.reason == "agentd: drain: drain_me"


def test_the_slurm_reason_is_at_most_200_characters():
    many = [firing(facts(f"rule_with_a_long_name_{i:02d}", advice="drain", actions=("advise",))) for i in range(30)]
    reason = judge(tick(instances=many)).recommendations.slurm.reason
    assert len(reason) == 200 and reason.startswith("agentd: drain: rule_with_a_long_name_00") and reason.endswith("...")


def test_the_node_cap_is_the_tightest_of_the_rules_and_the_budget():
    budget = BudgetView(3000.0, "failsafe", "failsafe", 2900.0, None, "no_lease_yet")
    t = judge(tick(rule_caps=(NodeCap(3200.0, "tcs_flow_low"),), budget=budget,
                   controls={0: control(650.0, "node:budget"), 1: control(650.0, "node:budget")}))
    assert (t.node_cap_w, t.node_cap_source) == (2900.0, "budget")
    (r,) = t.reasons
    assert (r.kind, r.severity, r.level, r.source) == ("budget", "warning", 2, "budget")
    assert "failsafe budget 3000 W" in r.message and [g.source for g in t.gpus] == ["budget", "budget"]
    t = judge(tick(rule_caps=(NodeCap(3200.0, "tcs_flow_low"),)))
    assert (t.node_cap_w, t.node_cap_source) == (3200.0, "rule:tcs_flow_low")


def test_a_jobs_throttle_fraction_is_what_its_gpus_lost_of_their_baselines():
    t = judge(tick(gpus=3, controls={0: control(350.0, "x"), 1: control(), 2: control(525.0, "x")},
                   jobs=(JobView("slurm", "12", (0, 1), "high"), JobView("k8s", "pod-a", (2,), "low"))))
    assert [(j.job_id, j.gpus, j.throttle_fraction, j.class_) for j in t.jobs] == [
        ("12", [0, 1], 0.25, "high"), ("pod-a", [2], 0.25, "low")]
    assert t.model_dump(by_alias=True)["jobs"][0]["class"] == "high"


def test_thresholds_of_the_packs_are_worked_out_from_their_params():
    engine = Engine(load_rules([]), {"tcs_supply_max_c": 40})
    f = FactsCache().of(engine)
    assert f["tcs_supply_hot"].threshold() == "tcs_supply_max_c=40"
    assert f["tcs_flow_low"].threshold() == "70 (tcs_flow_rated_lpm=100, tcs_flow_low_ratio=0.7)"
    assert f["leak_critical"].threshold() == "Critical" and f["leak_critical"].advice == "drain"
    near = f["gpu_near_slowdown"]
    t = judge(tick(instances=[firing(near, gpu=0, value=86.0)]))
    assert t.reasons[0].threshold == "84 (gpu_slowdown_margin_c=5)"  # slowdown 89 C - 5
    assert t.reasons[0].message == ("gpu_near_slowdown on GPU 0: GPU within gpu_slowdown_margin_c of its HW slowdown "
                                    "temperature (value 86, threshold 84 (gpu_slowdown_margin_c=5))")


def test_source_names_as_the_api_spells_them():
    assert [public_source(s) for s in ("", "baseline", "ramp", "lease:a", "node:budget", "node:tcs_flow_low",
                                       "gpu_at_slowdown")] == [
        "baseline", "baseline", "ramp", "lease:a", "budget", "rule:tcs_flow_low", "rule:gpu_at_slowdown"]


def test_the_served_bytes_are_cached_and_only_age_s_moves():
    snap = build_snapshot(tick())
    a = snap.throttle_bytes(T0_NS + 1_500_000_000)
    b = snap.throttle_bytes(T0_NS + 2_000_000_000)
    assert a.endswith(b',"age_s":1.500}') and b.endswith(b',"age_s":2.000}') and a[:-7] == b[:-7]
    assert Throttle.model_validate_json(b).age_s == 2.0
    assert snap.body("gpus") is snap.body("gpus")  # serialised once per snapshot
