"""Per-job power and energy: job_gpu / job_energy points, classes per GPU, energy from the GPU
counters (resets, gaps, lost GPUs), and the daemon's facade (JobTracker)."""

from __future__ import annotations

import math

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.clock import FakeClock
from agentd.job_ledger import UNHEALTHY_GRACE_S, JobLedger, JobTracker
from collectors.base import GpuSample
from collectors.job_classes import SqueueError
from collectors.jobs import GpuJobs, JobRef, JobsConfig
from collectors.lineproto_parse import parse_line
from tests.proc_tree import V1_PLAIN, ProcTree, k8s_systemd, v1_slurm, v2_slurm

T0 = 1_767_225_600 * 10**9
S = 10**9
A, B, C = JobRef("slurm", "100", "0"), JobRef("slurm", "200", "0"), JobRef("k8s", "3f2a9c1e-7b4d-4e2a-9f00-12ab34cd56ef")


def gpu(index: int, ts: int, *, power: float | None = 500.0, energy: float | None = None,
        healthy: bool = True) -> GpuSample:
    if not healthy:
        return GpuSample(index=index, uuid=f"GPU-{index}", model="H200", ts_ns=ts, healthy=False, error="lost")
    return GpuSample(index=index, uuid=f"GPU-{index}", model="H200", ts_ns=ts, power_w=power, energy_j=energy)


def owned(*jobs: JobRef, unattributed: int = 0) -> GpuJobs:
    return GpuJobs(tuple(jobs), {j: "cgroup" for j in jobs}, unattributed)


CLASSES = {"100": "high", "200": "low"}


def class_of(ref: JobRef) -> str:
    return CLASSES.get(ref.id, "normal")


def energy_points(points):
    return [p for p in points if p.measurement == "job_energy"]


def gpu_points(points):
    return [p for p in points if p.measurement == "job_gpu"]


class Run:
    """Drives a ledger tick by tick: ``tick(seconds, {gpu: (energy_j, GpuJobs)})``."""

    def __init__(self, interval_s: float = 300.0, default_class: str = "normal") -> None:
        self.ledger = JobLedger("gpu-01", default_class=default_class, energy_interval_s=interval_s)
        self.ts = T0
        self.points: list = []

    def tick(self, dt_s: float, gpus: dict, *, power: float = 500.0):
        self.ts += round(dt_s * S)
        samples, owners = [], {}
        for index, spec in gpus.items():
            if spec == "lost":
                samples.append(gpu(index, self.ts, healthy=False))
                continue
            energy, who = spec
            samples.append(gpu(index, self.ts, energy=energy, power=power))
            owners[index] = who
        step, points = self.ledger.step(samples, owners, class_of, self.ts)
        self.points.extend(points)
        return step, points


# -- classes and jobs per GPU -------------------------------------------------------------------

def test_classes_by_gpu_idle_highest_and_default_for_unknown_processes():
    run = Run()
    step, _ = run.tick(1, {0: (0.0, owned()), 1: (0.0, owned(A, B)), 2: (0.0, owned(B)),
                           3: (0.0, owned(unattributed=1)), 4: (0.0, owned(B, unattributed=2))})
    assert step.classes_by_gpu == {0: "idle", 1: "high", 2: "low", 3: "normal", 4: "normal"}
    assert step.jobs_by_gpu == {0: (), 1: (A, B), 2: (B,), 3: (), 4: (B,)}


def test_the_steps_of_one_job_on_one_gpu_are_one_owner():
    run = Run()
    step, points = run.tick(1, {0: (0.0, owned(A, JobRef("slurm", "100", "1")))})
    assert step.jobs_by_gpu[0] == (JobRef("slurm", "100", None),)
    (p,) = gpu_points(points)
    assert p.fields["share"] == 1.0 and p.fields["shared"] is False and p.fields["step"] is None


# -- job_gpu ------------------------------------------------------------------------------------

def test_job_gpu_power_and_tags_for_one_job():
    run = Run()
    _, points = run.tick(1, {0: (0.0, owned(A))}, power=612.5)
    (p,) = gpu_points(points)
    assert p.tags == {"host": "gpu-01", "gpu": "0", "class": "high", "kind": "slurm"}
    assert p.fields == {"job": "100", "step": "0", "power_w": 612.5, "share": 1.0, "shared": False,
                        "priority": 3, "via": "cgroup"}


def test_mps_two_jobs_on_one_gpu_split_the_power_and_never_overwrite():
    run = Run()
    other_high = JobRef("slurm", "101", "0")
    CLASSES["101"] = "high"
    try:
        _, points = run.tick(1, {0: (0.0, owned(A, other_high, B, unattributed=1))}, power=800.0)
    finally:
        del CLASSES["101"]
    gp = gpu_points(points)
    assert [(p.fields.get("job"), p.tags["class"], p.tags["kind"]) for p in gp] == [
        ("100", "high", "slurm"), ("101", "high", "slurm"), ("200", "low", "slurm"), (None, "normal", "unattributed")]
    assert all(p.fields["share"] == 0.25 and p.fields["shared"] is True for p in gp)
    assert math.isclose(sum(p.fields["power_w"] for p in gp), 800.0)
    # two high Slurm jobs on GPU 0: a slot tag keeps their points apart
    keys = {(p.measurement, tuple(sorted(p.tags.items())), p.ts_ns) for p in gp}
    assert len(keys) == len(gp)
    assert [p.tags.get("slot") for p in gp] == [None, "1", None, None]


def test_no_job_gpu_point_for_an_idle_or_lost_gpu():
    run = Run()
    run.tick(1, {0: (0.0, owned(A)), 1: (0.0, owned())})
    _, points = run.tick(1, {0: "lost", 1: (0.0, owned())})
    assert gpu_points(points) == []


# -- job_energy ---------------------------------------------------------------------------------

def test_job_energy_from_the_counters_every_interval_and_final_at_the_end():
    run = Run(interval_s=60)
    run.tick(0, {0: (1000.0, owned(A)), 1: (5000.0, owned(A))})  # first seen at T0
    start = run.ts
    for k in range(1, 61):  # 60 s at 1 Hz: GPU 0 +400 J/s, GPU 1 +600 J/s
        _, points = run.tick(1, {0: (1000.0 + 400 * k, owned(A)), 1: (5000.0 + 600 * k, owned(A))})
        if k < 60:
            assert energy_points(points) == []
    (p,) = energy_points(points)
    assert p.tags == {"host": "gpu-01", "class": "high", "kind": "slurm"}
    assert p.fields == {"job": "100", "energy_j": 60_000.0, "gpus": 2, "start_ns": start, "end_ns": run.ts,
                        "final": False}
    run.tick(1, {0: (1000.0 + 400 * 61, owned(A)), 1: (5000.0 + 600 * 61, owned())})  # leaves GPU 1
    step, points = run.tick(1, {0: (1000.0 + 400 * 62, owned()), 1: (5000.0 + 600 * 62, owned())})
    (final,) = energy_points(points)
    assert step.ended == (JobRef("slurm", "100"),)
    # 61 s on GPU 0 (+ the interval to the first reading without it) and 61 s on GPU 1
    assert final.fields == {"job": "100", "energy_j": 62 * 400.0 + 61 * 600.0, "gpus": 2, "start_ns": start,
                            "end_ns": run.ts, "final": True}
    assert run.ledger.active_jobs == 0 and run.ledger.stats.idle_j == 600.0


def test_job_energy_across_a_counter_reset_is_never_negative():
    run = Run(interval_s=3600)
    run.tick(0, {0: (90_000.0, owned(A))})
    run.tick(1, {0: (90_500.0, owned(A))})  # +500
    run.tick(1, {0: (120.0, owned(A))})  # driver reload: the counter restarted; 120 J since
    run.tick(1, {0: (620.0, owned(A))})  # +500
    _, points = run.tick(1, {0: (1120.0, owned())})  # +500, then the job is gone
    (final,) = energy_points(points)
    assert final.fields["energy_j"] == 500 + 120 + 500 + 500 and final.fields["final"] is True
    assert run.ledger.stats.counter_resets == 1


def test_missing_counter_readings_are_covered_by_the_next_value_spread_over_the_gap():
    run = Run(interval_s=3600)
    run.tick(0, {0: (0.0, owned(A))})
    run.tick(1, {0: (None, owned(A))})  # no counter value: the energy is not lost
    run.tick(1, {0: (None, owned(B))})  # the owner changed during the gap
    run.tick(2, {0: (4000.0, owned(B))})  # 4 s, 4000 J: 2 s of A, 2 s of B
    _, points = run.tick(0.5, {0: (4500.0, owned())})  # both gone now; B gets the 0.5 s too
    by_job = {p.fields["job"]: p.fields["energy_j"] for p in energy_points(run.points)}
    assert by_job == {"100": 2000.0, "200": 2500.0}


def test_a_lost_gpu_keeps_its_jobs_for_the_grace_then_ends_them():
    run = Run(interval_s=3600)
    run.tick(0, {0: (0.0, owned(A))})
    step, points = run.tick(1, {0: "lost"})
    assert step.jobs_by_gpu[0] == (A,) and step.classes_by_gpu[0] == "high" and energy_points(points) == []
    run.tick(UNHEALTHY_GRACE_S - 1, {0: "lost"})
    step, points = run.tick(2, {0: "lost"})  # past the grace: the job is over
    (final,) = energy_points(points)
    assert step.classes_by_gpu[0] == "idle" and final.fields["final"] is True and final.fields["energy_j"] == 0


def test_a_gpu_that_recovers_within_the_grace_bills_the_gap_by_its_counter():
    run = Run(interval_s=3600)
    run.tick(0, {0: (0.0, owned(A))})
    run.tick(1, {0: "lost"})
    run.tick(1, {0: (2000.0, owned(A))})
    _, points = run.tick(1, {0: (2000.0, owned())})
    assert energy_points(points)[0].fields["energy_j"] == 2000.0


def test_a_gpu_without_an_energy_counter_is_metered_by_its_power():
    run = Run(interval_s=3600)
    run.tick(0, {0: (None, owned(A))}, power=300.0)
    run.tick(2, {0: (None, owned(A))}, power=500.0)  # trapezoid: 2 s x 400 W
    _, points = run.tick(1, {0: (None, owned())}, power=500.0)  # + 1 s x 500 W
    assert energy_points(points)[0].fields["energy_j"] == 1300.0
    assert run.ledger.stats.power_metered_j == 1300.0


def test_jobs_ending_in_one_tick_with_one_class_get_slots():
    run = Run()
    j1, j2 = JobRef("slurm", "7", "0"), JobRef("slurm", "8", "0")
    run.tick(0, {0: (0.0, owned(j1)), 1: (0.0, owned(j2)), 2: (0.0, owned(C))})
    _, points = run.tick(1, {0: (10.0, owned()), 1: (10.0, owned()), 2: (10.0, owned())})
    ep = energy_points(points)
    assert [(p.fields["job"], p.tags.get("slot"), p.tags["kind"]) for p in ep] == [
        (C.id, None, "k8s"), ("7", None, "slurm"), ("8", "1", "slurm")]
    assert len({(tuple(sorted(p.tags.items())), p.ts_ns) for p in ep}) == 3


def test_a_running_jobs_interval_restarts_when_the_wall_clock_steps_back():
    run = Run(interval_s=10)
    run.tick(0, {0: (0.0, owned(A))})
    run.tick(-100, {0: (10.0, owned(A))})  # NTP stepped the clock back
    _, points = run.tick(9, {0: (20.0, owned(A))})
    assert energy_points(points) == []
    _, points = run.tick(1, {0: (30.0, owned(A))})
    assert energy_points(points)[0].fields["energy_j"] == 30.0


# -- conservation -------------------------------------------------------------------------------

owner_sets = st.sampled_from([(), (A,), (B,), (A, B), (A, C), (C,)])
ticks = st.lists(st.tuples(
    st.integers(1, 3),  # seconds
    st.lists(st.tuples(owner_sets, st.booleans(),  # the GPU's owners, unattributed processes too
                       st.one_of(st.none(), st.floats(0, 2000), st.just(-1.0))),  # joules added / missing / reset
             min_size=2, max_size=2),
), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(ticks)
def test_every_joule_counted_goes_to_exactly_one_place_and_none_is_negative(script):
    """What the ledger gave out (jobs + unattributed + idle + after an end) equals what the
    counters said, where they said something it could attribute."""
    ledger = JobLedger("h", energy_interval_s=5)
    counters = [0.0, 0.0]
    expected = 0.0
    ts = T0
    samples = [gpu(i, ts, energy=0.0) for i in range(2)]
    ledger.step(samples, {0: owned(), 1: owned()}, class_of, ts)
    last_value: list[float | None] = [0.0, 0.0]
    points = []
    for dt, per_gpu in script:
        ts += dt * S
        samples, owners = [], {}
        for i, (who, extra, joules) in enumerate(per_gpu):
            value: float | None
            if joules is None:
                value = None
            elif joules < 0:  # a reset: the counter starts again from a small value
                counters[i] = value = 7.0
            else:
                counters[i] += joules
                value = counters[i]
            if value is not None:
                before = last_value[i]
                assert before is not None
                expected += value - before if value >= before else value  # since the reset
                last_value[i] = value
            samples.append(gpu(i, ts, energy=value))
            owners[i] = owned(*who, unattributed=int(extra))
        _, pts = ledger.step(samples, owners, class_of, ts)
        points.extend(pts)
    # end every job so its final point carries all it got
    ts += S
    _, pts = ledger.step([gpu(i, ts, energy=last_value[i]) for i in range(2)], {0: owned(), 1: owned()},
                         class_of, ts)
    points.extend(pts)
    finals = [p for p in energy_points(points) if p.fields["final"]]
    assert all(p.fields["energy_j"] >= 0 for p in energy_points(points))
    s = ledger.stats
    given_out = sum(p.fields["energy_j"] for p in finals) + s.unattributed_j + s.idle_j + s.after_end_j
    assert math.isclose(given_out, expected, rel_tol=1e-6, abs_tol=0.01 * (len(finals) + 1))


# -- the daemon's facade ------------------------------------------------------------------------

class SqueueStub:
    def __init__(self, answer: bytes | Exception) -> None:
        self.answer = answer

    def __call__(self, argv, timeout_s):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


SQUEUE = (b'{"jobs": [{"job_id": 100, "partition": "prod", "qos": "", "job_state": "RUNNING"},'
          b' {"job_id": 200, "partition": "debug", "qos": "scavenger", "job_state": "RUNNING"}]}')


def tracker(tmp_path, runner=None, clock=None, **jobs):
    cfg = JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "high"},
                                                 {"qos": "scavenger", "class": "low"}],
                                     "slurm": {"enabled": True}, "proc_root": str(tmp_path / "proc"), **jobs})
    clock = clock or FakeClock()
    return JobTracker(cfg, host="gpu-01", monotonic=clock.monotonic, runner=runner or SqueueStub(SQUEUE)), clock


def sample(index, ts, pids, energy, power=500.0):
    s = gpu(index, ts, energy=energy, power=power)
    s.pids = tuple(pids)
    return s


def test_the_tracker_end_to_end_through_a_proc_tree(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(1000, v1_slurm("100"))
    proc.add(1001, v2_slurm("200"))
    proc.add(1002, V1_PLAIN, env={"SLURM_JOB_ID": "200"})
    proc.add(1003, k8s_systemd(C.id))
    tr, _ = tracker(tmp_path)
    assert tr.refresh_due() and tr.refresh_classes().ok
    step = tr.step([sample(0, T0, [1000], 0.0), sample(1, T0, [1001, 1002], 0.0), sample(2, T0, [1003], 0.0),
                    sample(3, T0, [], 0.0)], T0)
    assert step.classes_by_gpu == {0: "high", 1: "low", 2: "normal", 3: "idle"}
    assert step.jobs_by_gpu[1] == (JobRef("slurm", "200", None),)  # step 0 and the batch step: one owner
    parsed = [parse_line(line) for _, line in step.lines]
    assert [(m, t["gpu"], f.get("job"), f.get("via")) for m, t, f, _ in parsed] == [
        ("job_gpu", "0", "100", "cgroup"), ("job_gpu", "1", "200", "cgroup+environ"), ("job_gpu", "2", C.id, "cgroup")]
    proc.remove(1000)
    step = tr.step([sample(0, T0 + S, [], 700.0), sample(1, T0 + S, [1001, 1002], 0.0),
                    sample(2, T0 + S, [1003], 0.0), sample(3, T0 + S, [], 0.0)], T0 + S)
    energy = [parse_line(line) for _, line in step.lines if line.startswith("job_energy")]
    assert [(t["class"], f["job"], f["energy_j"], f["final"]) for _, t, f, _ in energy] == [("high", "100", 700.0, True)]
    fields = tr.agent_fields()
    assert fields["jobs_active"] == 2 and fields["jobs_squeue_errors"] == 0 and fields["jobs_pids_unattributed"] == 0


def test_a_hint_through_the_tracker_changes_the_gpus_class_and_goes_at_job_end(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(1000, v1_slurm("300"))
    tr, _ = tracker(tmp_path)
    tr.set_hint("300", "high")
    with pytest.raises(ValueError):
        tr.set_hint("300", "idle")
    assert tr.step([sample(0, T0, [1000], 0.0)], T0).classes_by_gpu == {0: "high"}
    tr.step([sample(0, T0 + S, [], 0.0)], T0 + S)
    assert tr.classes.hints() == {}


def test_a_failing_squeue_is_logged_once_per_interval_and_classes_hold(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(1000, v1_slurm("100"))
    stub = SqueueStub(SQUEUE)
    tr, clock = tracker(tmp_path, runner=stub)
    tr.refresh_classes()
    stub.answer = SqueueError("squeue took longer than 10s (jobs.slurm.timeout)")
    with structlog.testing.capture_logs() as logs:
        for _ in range(20):  # 10 minutes, one try every 30 s
            clock.advance(30)
            assert tr.refresh_due()
            tr.refresh_classes()
            assert tr.step([sample(0, T0, [1000], 0.0)], T0).classes_by_gpu == {0: "high"}
        stub.answer = SQUEUE
        clock.advance(30)
        tr.refresh_classes()
    events = [(e["event"], e.get("failures")) for e in logs]
    assert events == [("squeue_failed", 1), ("squeue_failed", 11), ("squeue_recovered", 20)]
    assert "jobs.slurm.timeout" in logs[0]["error"] and logs[0]["log_level"] == "warning"
    assert tr.agent_fields()["jobs_squeue_errors"] == 20


def test_reconfigure_keeps_running_jobs_and_takes_the_new_rules(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(1000, v1_slurm("100"))
    tr, _ = tracker(tmp_path)
    tr.refresh_classes()
    tr.step([sample(0, T0, [1000], 0.0)], T0)
    new = JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "low"}], "slurm": {"enabled": True},
                                     "proc_root": str(tmp_path / "proc"), "energy_interval": "1s"})
    tr.reconfigure(new)
    step = tr.step([sample(0, T0 + S, [1000], 50.0)], T0 + S)
    assert step.classes_by_gpu == {0: "low"}
    energy = [parse_line(line) for _, line in step.lines if line.startswith("job_energy")]
    assert [(f["energy_j"], f["final"]) for _, _, f, _ in energy] == [(50.0, False)]  # same job, 1 s interval


def test_a_gpu_gone_from_the_readings_keeps_its_jobs_for_the_grace_then_is_dropped():
    run = Run(interval_s=3600)
    run.tick(0, {0: (0.0, owned(A)), 1: (0.0, owned(B))})
    step, _ = run.tick(1, {0: (10.0, owned(A))})  # GPU 1 missing from this tick's readings
    assert step.classes_by_gpu == {0: "high", 1: "low"} and step.jobs_by_gpu[1] == (B,)
    step, points = run.tick(UNHEALTHY_GRACE_S + 1, {0: (20.0, owned(A))})
    assert step.classes_by_gpu == {0: "high"} and set(step.jobs_by_gpu) == {0}
    assert [p.fields["job"] for p in energy_points(points) if p.fields["final"]] == ["200"]
