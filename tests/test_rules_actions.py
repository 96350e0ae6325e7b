"""rules/actions.py: composition (min of proposals, clamp, node split) and the release ramp."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.actions import Ceiling, GpuLimits, NodeCap, Ramp, compose, compose_with_sources

G = {0: GpuLimits(200, 700, 700), 1: GpuLimits(200, 700, 650), 2: GpuLimits(100, 400, 400)}


def test_min_of_proposals_clamped_default_when_none():
    out = compose([Ceiling(0, 500, "a"), Ceiling(0, 450, "b"), Ceiling(2, 50, "leak")], G,
                  extra=[Ceiling(None, 600, "lease")])
    assert out == {0: 450, 1: 600, 2: 100}
    src = compose_with_sources([Ceiling(0, 500, "a")], G)
    assert src[0] == (500, "a") and src[1] == (650, "baseline")
    assert compose([Ceiling(0, 5000, "big"), Ceiling(7, 10, "no such gpu")], G) == {0: 700, 1: 650, 2: 400}


def test_node_cap_split_is_max_min_fair():
    gpus = {i: GpuLimits(200, 700, 700) for i in range(4)}
    # equal split when nothing else binds
    assert compose([], gpus, [NodeCap(2000, "pump")]) == {i: 500 for i in range(4)}
    # what a GPU already held lower leaves unused is shared by the others
    out = compose_with_sources([Ceiling(0, 300, "hot")], gpus, [NodeCap(2000, "pump"), NodeCap(2600, "site")])
    assert out[0] == (300, "hot")
    assert all(abs(out[i].watts - 1700 / 3) < 1e-9 and out[i].source == "node:pump" for i in (1, 2, 3))
    # under the sum of minimums every GPU sits at its minimum
    assert compose([], gpus, [NodeCap(400, "x")]) == {i: 200 for i in range(4)}
    assert compose([], {0: G[0], 1: G[0]}, [NodeCap(5000, "x")]) == {0: 700, 1: 700}  # a cap that does not bind


def test_ramp_falls_at_once_rises_slowly_after_hold():
    r = Ramp(rise_w_per_s=20, hold_s=30, jitter=0)
    assert r.step(0, {0: 700}, {0: 700}) == {0: 700}
    assert r.step(1, {0: 400}, {0: 700}) == {0: 400}  # fall: at once
    applied = {0: 400}
    for t in range(2, 31):
        applied = r.step(t, {0: 700}, applied)
        assert applied == {0: 400}  # held: within 30 s of the fall
    out = []
    for t in range(31, 50):
        applied = r.step(t, {0: 700}, applied)
        out.append(applied[0])
    assert out[:3] == [420, 440, 460] and out[-1] == 700
    assert r.step(50, {0: 300}, applied) == {0: 300}  # a fall interrupts a rise


def test_ramp_jitter_is_deterministic_and_spreads_rates():
    def run(seed):
        r = Ramp(rise_w_per_s=20, hold_s=0, jitter=0.3, rng=random.Random(seed))
        applied = {i: 200.0 for i in range(100)}
        r.step(0, applied, applied)
        return r.step(1, {i: 700.0 for i in range(100)}, applied)
    a, b = run(1), run(1)
    assert a == b
    rates = sorted(v - 200 for v in a.values())
    assert 14 <= rates[0] < rates[-1] <= 26 and rates[-1] - rates[0] > 5


def test_ramp_rejects_nonsense():
    for kw in ({"rise_w_per_s": 0}, {"jitter": 1.0}, {"hold_s": -1}):
        with pytest.raises(ValueError):
            Ramp(**kw)


gpu_limits = st.tuples(st.floats(50, 500), st.floats(0, 600), st.floats(0, 1)).map(
    lambda t: GpuLimits(t[0], t[0] + t[1], t[0] + t[1] * t[2]))
watts = st.floats(-1e4, 1e5, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.dictionaries(st.integers(0, 7), gpu_limits, min_size=1, max_size=8),
    steps=st.lists(st.tuples(
        st.floats(0, 120),  # dt
        st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 9)), watts), max_size=6),
        st.lists(st.floats(1, 1e5), max_size=2),
    ), min_size=1, max_size=40),
    rise=st.floats(0.1, 1000), jitter=st.floats(0, 0.9), hold=st.floats(0, 60), seed=st.integers(0, 9),
)
def test_compose_and_ramp_never_leave_min_max(limits, steps, rise, jitter, hold, seed):
    ramp = Ramp(rise_w_per_s=rise, hold_s=hold, jitter=jitter, rng=random.Random(seed))
    applied = {i: lim.baseline_w for i, lim in limits.items()}
    now = 0.0
    for dt, props, node_caps in steps:
        now += dt
        targets = compose([Ceiling(g, w, "p") for g, w in props], limits,
                          [NodeCap(w, "n") for w in node_caps])
        for i, t in targets.items():
            assert limits[i].min_w <= t <= limits[i].max_w
        new = ramp.step(now, targets, applied)
        for i, a in new.items():
            assert limits[i].min_w - 1e-9 <= a <= limits[i].max_w + 1e-9, (i, a, limits[i])
            assert a <= targets[i] + 1e-9  # never above the target: falls are immediate
            if targets[i] < applied[i]:
                assert a == targets[i]
        applied = new


def test_a_long_gap_between_steps_does_not_jump_the_ramp():
    from rules.actions import Ramp

    ramp = Ramp(rise_w_per_s=25.0, hold_s=0.0, jitter=0.0, max_step_s=2.0)
    ramp.step(0.0, {0: 300.0}, {0: 300.0})
    out = ramp.step(60.0, {0: 700.0}, {0: 300.0})  # a minute with no step (NVML hung)
    assert out[0] == 300.0 + 25.0 * 2.0


def test_node_cap_split_by_job_class_lowest_first():
    gpus = {i: GpuLimits(200, 700, 700) for i in range(4)}
    classes = {0: "high", 1: "normal", 2: "low", 3: "idle"}
    # 2000 W over four GPUs of 700: idle and low go to their minimum before normal loses a watt
    out = compose_with_sources([], gpus, [NodeCap(2000, "site")], classes=classes)
    assert {i: t.watts for i, t in out.items()} == {0: 700, 1: 700, 2: 400, 3: 200}
    assert out[0] == (700, "baseline") and out[2] == (400, "node:site")
    # a job's floor is honoured; a rule's ceiling below that floor still wins (protection first)
    out = compose_with_sources([Ceiling(0, 350, "hot")], gpus, [NodeCap(1300, "site")],
                               classes=classes, floors_w={0: 500, 1: 400})
    assert {i: t.watts for i, t in out.items()} == {0: 350, 1: 550, 2: 200, 3: 200}
    assert out[0].source == "hot"
    # floors above the cap give way lowest class first: normal's 400 W floor goes, high's is kept
    out = compose_with_sources([], gpus, [NodeCap(1150, "site")], classes=classes, floors_w={0: 500, 1: 400})
    assert {i: t.watts for i, t in out.items()} == {0: 500, 1: 250, 2: 200, 3: 200}
    # with demands: a GPU that draws little leaves its share to the others of its class
    out = compose_with_sources([], gpus, [NodeCap(2000, "site")], demands_w={0: 300})
    assert out[0].watts == 300 and all(abs(out[i].watts - 1700 / 3) < 1e-9 for i in (1, 2, 3))
    # no classes given: every GPU "normal", the max-min fair equal split of before
    out = compose_with_sources([], gpus, [NodeCap(2000, "x")], classes={})
    assert {i: t.watts for i, t in out.items()} == {i: 500 for i in range(4)}
