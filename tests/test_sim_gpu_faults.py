"""Simulated GPU faults: the fault syntax (both orders), what each fault makes the simulated GPU
report, that the CDU and the GPUs each get their own faults, and `agentd demo` showing them."""

from __future__ import annotations

import io

import pytest

from agentd.clock import FakeClock
from agentd.demo import check_gpu_faults, run_demo, split_faults
from agentd.store import Store
from collectors.cdu_sim import CduModel, Fault, is_gpu_kind, parse_fault
from collectors.sim import NVLINKS, SimBackend

S = 10**9


def play(faults: list[str], seconds: int, gpus: int = 4):
    """Sample once a second; ``[(samples, events)]`` per second."""
    sim = SimBackend(gpus=gpus, faults=[parse_fault(f) for f in faults])
    sim.open()
    return [(sim.sample(k * S), sim.drain_events()) for k in range(seconds + 1)]


# -- syntax ----------------------------------------------------------------------------------------

def test_the_target_goes_before_or_after_the_times():
    assert parse_fault("xid79:3@30") == parse_fault("xid79@30:3") == Fault("xid79", 30.0, None, "3")
    f = parse_fault("row_remap_pending:1@10+1m")
    assert (f.kind, f.gpu, f.start_s, f.duration_s) == ("row_remap_pending", 1, 10.0, 60.0)
    assert parse_fault("ecc_dbe:0@20").gpu == 0 and parse_fault("xid79:3@30").xid == 79
    assert parse_fault("dropout:facility@10+20") == parse_fault("dropout@10+20:facility")  # the CDU's too
    assert parse_fault("xid13:02").target == "2" and parse_fault("leak@5").gpu is None


@pytest.mark.parametrize("spec,match", [
    ("xid79@30", "needs the GPU index as its target, e.g. xid79:3@30"),
    ("ecc_dbe:tcs@20", "needs the GPU index"),
    ("xid79:3@30:4", "give the :TARGET once"),
    ("xid0:1@3", "xid<N>, ecc_dbe, ecc_sbe, row_remap_pending, row_remap_failure"),
    ("ecc_triple:1", "TARGET is the GPU index"),
    ("leak:3@10", "only dropout .* and the GPU faults"),
    ("xid79:3@soon", "start and duration are seconds"),
])
def test_bad_fault_specs_say_what_is_accepted(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_fault(spec)


def test_gpu_and_cdu_faults_are_told_apart():
    assert is_gpu_kind("xid79") and is_gpu_kind("ecc_sbe") and not is_gpu_kind("leak") and not is_gpu_kind("xid")
    cdu, gpu = split_faults([parse_fault(f) for f in ("leak@10", "xid79:3@30", "pump_failure@5", "ecc_dbe:0@2")])
    assert [f.kind for f in cdu] == ["leak", "pump_failure"] and [f.kind for f in gpu] == ["xid79", "ecc_dbe"]


def test_a_fault_on_a_gpu_the_node_lacks_or_a_cdu_fault_is_refused_by_the_simulator():
    with pytest.raises(ValueError, match=r"no GPU 9 on this node of 8 GPUs \(the target is a GPU index, 0-7\)"):
        SimBackend(gpus=8, faults=[parse_fault("xid79:9@30")])
    with pytest.raises(ValueError, match="not a GPU fault"):
        SimBackend(faults=[parse_fault("leak@10")])
    with pytest.raises(ValueError, match="there is no GPU 8 .* 0-7"):
        check_gpu_faults([parse_fault("xid79:8@30")], 8)


def test_the_cdu_ignores_gpu_faults():
    plain, mixed = CduModel(seed=3), CduModel(seed=3, faults=[parse_fault("xid79:3@0"), parse_fault("ecc_dbe:0@0")])
    for m in (plain, mixed):
        for _ in range(30):
            m.step(1.0, 80_000.0)
    assert plain.readings() == mixed.readings()


# -- what the simulated GPU reports -----------------------------------------------------------------

def test_a_healthy_sim_reports_clean_counters():
    (samples, events), = play([], 0)
    for s in samples:
        assert (s.ecc_sbe_volatile, s.ecc_dbe_volatile, s.ecc_sbe_aggregate, s.ecc_dbe_aggregate) == (0, 0, 0, 0)
        assert (s.remap_pending, s.remap_failure, s.pcie_replay) == (False, False, 0)
        assert s.retired_pages_pending is None  # Hopper remaps rows; it does not retire pages
        assert len(s.nvlink) == NVLINKS and all(link[1:] == (0, 0, 0, 0) for link in s.nvlink)
    assert events == []


def test_xid79_falls_off_the_bus_and_a_duration_brings_it_back():
    run = play(["xid79:3@5+10"], 20)
    for k in range(5):
        assert all(s.healthy for s in run[k][0]) and run[k][1] == []
    samples, events = run[5]
    assert [(e.gpu_index, e.kind, e.xid) for e in events] == [(3, "xid", 79), (3, "gpu_lost", None)]
    assert events[0].ts_ns == 5 * S
    for k in range(5, 15):  # lost: GPU 3 unhealthy, the other three keep reading
        samples = run[k][0]
        assert [s.healthy for s in samples] == [True, True, True, False]
        assert "fallen off the bus" in samples[3].error and samples[3].power_w is None
    assert [(e.gpu_index, e.kind) for e in run[15][1]] == [(3, "gpu_recovered")]
    assert all(s.healthy for s in run[15][0]) and all(e == [] for _, e in run[16:])


def test_ecc_dbe_raises_the_counts_a_pending_remap_and_the_driver_s_events():
    run = play(["ecc_dbe:0@3+4"], 9)
    samples, events = run[3]
    assert [(e.kind, e.xid) for e in events] == [("ecc_dbe", None), ("xid", 48), ("xid", 63)]
    s = samples[0]
    assert (s.ecc_dbe_volatile, s.ecc_dbe_aggregate, s.remap_uncorrectable_rows, s.remap_pending) == (1, 1, 1, True)
    assert samples[1].ecc_dbe_volatile == 0
    s = run[7][0][0]  # the end: a GPU reset; the lifetime count stays
    assert (s.ecc_dbe_volatile, s.ecc_dbe_aggregate, s.remap_pending, s.remap_uncorrectable_rows) == (0, 1, False, 1)


def test_ecc_sbe_raises_corrected_errors_every_second():
    run = play(["ecc_sbe:2@1+5"], 8)
    counts = [samples[2].ecc_sbe_volatile for samples, _ in run]
    assert counts[:6] == [0, 10, 20, 30, 40, 50] and counts[6] == 0  # reset at the end
    assert [len([e for e in events if e.kind == "ecc_sbe"]) for _, events in run][:7] == [0, 1, 1, 1, 1, 1, 0]


def test_row_remap_flags():
    run = play(["row_remap_pending:1@2", "row_remap_failure:0@4+2"], 7)
    assert [s[1].remap_pending for s, _ in run] == [False, False] + [True] * 6
    assert [(e.kind, e.xid) for e in run[2][1]] == [("xid", 63)]
    assert [s[0].remap_failure for s, _ in run] == [False] * 4 + [True] * 2 + [False] * 2


def test_faults_replay_the_same_after_a_reopen():
    sim = SimBackend(gpus=2, faults=[parse_fault("xid79:1@1")])
    first = []
    for _ in range(2):
        sim.open()
        first.append([(tuple(s.healthy for s in sim.sample(k * S)), [e.kind for e in sim.drain_events()])
                      for k in range(3)])
    assert first[0] == first[1]


# -- agentd demo ------------------------------------------------------------------------------------

def test_the_demo_shows_the_fail_the_drain_advice_and_the_event(tmp_path):
    out = io.StringIO()
    run_demo(duration_s=None, gpus=8, interval_s=1.0, profile="training", seed=1, state_dir=tmp_path,
                      out=out, faults=[parse_fault("xid79:3@30")], clock=FakeClock(), size=(80, 24))
    text = out.getvalue()
    plan = " ".join(text.split("gpu-agentd demo")[0].split())
    assert plan.startswith("running 40 s, long enough for xid79:3@30:") and "gpu_health_fail at 30 s" in plan
    last = text.split("\nsummary:")[0].split("gpu-agentd demo")[-1]
    assert "node state: CRITICAL" in last and "advice: drain (gpu_health_fail)" in last
    assert "GPU health: 7 ok; GPU 3 FAIL: Xid 79: GPU has fallen off the bus" in last
    assert "  3  FAIL  unhealthy: GPU has fallen off the bus (simulated Xid 79)" in last
    assert max(len(line) for line in text.splitlines()) <= 80
    tail = text[text.index("\nsummary:"):]
    assert "GPU health at the end: 7 ok, 1 fail" in " ".join(tail.split())
    assert "t=  30.0 s  gpu_health_fail gpu 3    inactive -> firing  value fail" in tail
    events = tail[tail.index("GPU events (stored as gpu_event points):"):].splitlines()[1:]
    assert events[0].startswith("  t=  30.0 s  GPU 3  critical (catalogue: drain_node)  Xid 79: GPU has fallen")
    assert any("gpu_lost" in e for e in events) and any("health ok -> fail" in e for e in events)
    store = Store(tmp_path / "store.sqlite")
    try:
        stored = store.query(measurement="gpu_event")
    finally:
        store.close()
    assert any(",gpu=3," in line and "kind=xid" in line and "xid=79i" in line for line in stored)
    assert f"and {len(stored)} gpu_event points" in " ".join(tail.split())


def test_the_demo_refuses_a_gpu_it_does_not_have_before_it_starts(tmp_path):
    with pytest.raises(ValueError, match="there is no GPU 8"):
        run_demo(duration_s=5.0, gpus=8, interval_s=1.0, profile="idle", seed=1, state_dir=tmp_path,
                 out=io.StringIO(), faults=[parse_fault("xid79:8@1")], clock=FakeClock())
    assert not (tmp_path / "store.sqlite").exists()
