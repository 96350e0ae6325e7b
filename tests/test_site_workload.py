"""The site workload: layout, mixes, in-phase training swings, bursts, the step, the throughput model."""

import math
import re

import pytest
from hypothesis import given, settings, strategies as st

from agentd.site.workload import (
    CLASSES, WorkloadConfig, build_workload, parse_mix, speed_fraction,
)


def test_same_seed_same_site_other_seed_differs():
    cfg = WorkloadConfig(step_s=30.0)
    a, b, c = (build_workload(cfg, 20, seed=s, horizon_s=300) for s in (3, 3, 4))
    trace = [(g, t) for g in range(0, 160, 7) for t in (0.0, 12.5, 31.0, 99.9)]
    assert [a.demand_w(g, t) for g, t in trace] == [b.demand_w(g, t) for g, t in trace]
    assert [a.demand_w(g, t) for g, t in trace] != [c.demand_w(g, t) for g, t in trace]
    # demand is a function of (gpu, t): asking twice, or in another order, gives the same watts
    assert [a.demand_w(g, t) for g, t in reversed(trace)] == [a.demand_w(g, t) for g, t in trace][::-1]


def test_kind_and_class_shares_follow_the_mix():
    w = build_workload(WorkloadConfig(), 50, seed=1)
    n = w.gpu_count
    kinds = {k: sum(1 for g in range(n) if w.kind_of(g) == k) for k in ("training", "inference", "idle")}
    assert kinds["training"] == 240  # 30 whole nodes = 60 %
    assert abs(kinds["inference"] - 0.3 * n) <= 1 and abs(kinds["idle"] - 0.1 * n) <= 1
    running = kinds["training"] + kinds["inference"]
    per_class = {c: sum(len(j.gpus) for j in w.jobs if j.cls == c) for c in ("high", "normal", "low")}
    assert sum(per_class.values()) == running
    for cls, share in (("high", 0.2), ("normal", 0.5), ("low", 0.3)):
        assert abs(per_class[cls] / running - share) < 0.05, per_class
    # a class per job, not per GPU: every GPU of a job has the job's class
    for job in w.jobs:
        assert {w.class_of(g, 1e9) for g in job.gpus} == {job.cls}
    assert {w.class_of(g, 0.0) for g in range(n) if w.kind_of(g) == "idle"} == {"idle"}


def test_other_mix_is_honoured():
    cfg = WorkloadConfig(kind_mix={"training": 0.0, "inference": 1.0, "idle": 0.0},
                         class_mix={"high": 1.0})
    w = build_workload(cfg, 4, seed=2)
    assert {w.kind_of(g) for g in range(w.gpu_count)} == {"inference"}
    assert {j.cls for j in w.jobs} == {"high"}


def test_training_gpus_swing_in_phase_across_nodes():
    w = build_workload(WorkloadConfig(noise_w=0.0, chip_spread=0.0), 40, seed=5)
    job = next(j for j in w.jobs if j.kind == "training" and len(j.gpus) >= 16)
    assert len({g // 8 for g in job.gpus}) >= 2  # spans nodes
    highs = lows = 0
    for k in range(400):
        t = k * job.period_s / 97.0
        ws = {round(w.demand_w(g, t), 6) for g in job.gpus}
        assert len(ws) == 1, f"the job's GPUs are out of phase at t={t}"
        (value,) = ws
        if value == pytest.approx(job.compute_w):
            highs += 1
        else:
            assert value == pytest.approx(job.dip_w)
            assert 0.4 * job.compute_w <= value <= 0.6 * job.compute_w
            lows += 1
    assert lows / (highs + lows) == pytest.approx(job.comm_frac, abs=0.03)


def test_inference_bursts_and_idle_stay_near_idle():
    w = build_workload(WorkloadConfig(), 30, seed=9, horizon_s=600)
    infer = [g for g in range(w.gpu_count) if w.kind_of(g) == "inference"]
    idle = [g for g in range(w.gpu_count) if w.kind_of(g) == "idle"]
    assert infer and idle
    samples = [w.demand_w(g, t * 0.5) for g in infer for t in range(1200)]
    bursting = sum(1 for x in samples if x > 250) / len(samples)
    assert 0.1 < bursting < 0.6  # bursts happen, and the base is most of the time
    assert max(samples) <= 700.0
    assert all(abs(w.demand_w(g, t) - 70.0) <= 70.0 * 0.03 + 8.0 for g in idle for t in range(0, 600, 13))


def test_the_step_starts_late_jobs_at_the_asked_load():
    cfg = WorkloadConfig(step_s=60.0, warmup_load=0.64)
    w = build_workload(cfg, 100, seed=1, horizon_s=400)
    late = [j for j in w.jobs if j.start_s > 0]
    assert late and all(j.start_s == 60.0 for j in late)
    for j in late:  # before the step a late job's GPUs idle, and are of the idle class
        assert {w.class_of(g, 59.0) for g in j.gpus} == {"idle"}
        assert {w.class_of(g, 60.0) for g in j.gpus} == {j.cls}
    pre = w.mean_site_demand_w(0.0, 60.0, 120)
    post = w.mean_site_demand_w(60.0, 400.0, 200)
    assert pre / post == pytest.approx(0.64, abs=0.03)


def test_no_step_means_every_job_from_the_start():
    w = build_workload(WorkloadConfig(), 10, seed=1)
    assert all(j.start_s == 0 for j in w.jobs)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind_mix": {"training": 0.5, "gaming": 0.5}}, "kind mix: unknown names ['gaming']"),
    ({"class_mix": {"high": -1.0}}, "class mix: every share must be a finite number >= 0"),
    ({"class_mix": {"high": 0.0, "low": 0.0}}, "class mix: the shares sum to 0"),
    ({"class_mix": {"high": math.nan}}, "class mix: every share must be a finite number >= 0"),
    ({"training_period_s": (10.0, 5.0)}, "training_period_s: expected"),
    ({"training_period_s": (0.0, 5.0)}, "training_period_s: expected"),
    ({"training_dip_frac": (0.4, 1.5)}, "training_dip_frac: expected"),
    ({"training_job_nodes": (1.5, 3)}, "training_job_nodes: expected whole numbers"),
    ({"inference_burst_rate_per_s": 0.0}, "inference_burst_rate_per_s must be > 0"),
    ({"static_w": 800.0}, "static_w must be in [0, max_w)"),
    ({"warmup_load": 0.0}, "warmup_load must be in (0, 1]"),
    ({"step_s": -1.0}, "step_s cannot be negative"),
])
def test_bad_config_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        WorkloadConfig(**kwargs)


def test_bad_site_size_is_refused():
    with pytest.raises(ValueError, match="at least one node"):
        build_workload(WorkloadConfig(), 0)
    with pytest.raises(ValueError, match="horizon_s must be > 0"):
        build_workload(WorkloadConfig(), 1, horizon_s=0)


def test_parse_mix():
    assert parse_mix("high=0.2,normal=0.5,low=0.3", ("low", "normal", "high"), "--mix") == pytest.approx(
        {"low": 0.3, "normal": 0.5, "high": 0.2})
    assert parse_mix("high=1, low=1", ("low", "normal", "high"), "--mix") == {"low": 0.5, "normal": 0.0, "high": 0.5}
    for text, message in [("high", "--mix: 'high' is not NAME=SHARE"), ("high=x", "--mix: 'x' (for high) is not a number"),
                          ("urgent=1", "--mix: unknown names ['urgent']"), ("", "--mix: the shares sum to 0")]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            parse_mix(text, ("low", "normal", "high"), "--mix")


def test_describe_prints_the_configuration():
    text = "\n".join(WorkloadConfig().describe())
    for piece in ("training 60%", "inference 30%", "idle 10%", "high 20%", "normal 50%", "low 30%",
                  "** (1/3)", "period 6-20 s"):
        assert piece in text
    assert CLASSES[0] == "idle"


# -- the throughput model ----------------------------------------------------------------------

def test_speed_fraction_formula():
    assert speed_fraction(700.0, 690.0, 100.0) == 1.0  # cap above demand: full speed
    assert speed_fraction(690.0, 690.0, 100.0) == 1.0
    assert speed_fraction(395.0, 690.0, 100.0) == pytest.approx(0.5 ** (1 / 3))
    assert speed_fraction(100.0, 690.0, 100.0) == 0.0  # only static power left
    assert speed_fraction(50.0, 690.0, 100.0) == 0.0  # clipped at 0
    assert speed_fraction(80.0, 90.0, 100.0) == 1.0  # a GPU at static power does no work to slow


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 700), st.floats(0, 700), st.floats(0, 700), st.floats(0, 300))
def test_speed_is_in_0_1_and_monotonic_in_power(p1, p2, demand, static):
    lo, hi = sorted((p1, p2))
    a, b = speed_fraction(lo, demand, static), speed_fraction(hi, demand, static)
    assert 0.0 <= a <= b <= 1.0


def test_the_horizon_changes_only_how_far_bursts_are_drawn():
    a = build_workload(WorkloadConfig(step_s=30.0), 20, seed=3, horizon_s=200)
    b = build_workload(WorkloadConfig(step_s=30.0), 20, seed=3, horizon_s=900)
    assert [(j.id, j.cls, j.gpus, j.start_s) for j in a.jobs] == [(j.id, j.cls, j.gpus, j.start_s) for j in b.jobs]
    assert [a.demand_w(g, t) for g in range(160) for t in (5.0, 150.0)] == [
        b.demand_w(g, t) for g in range(160) for t in (5.0, 150.0)]
