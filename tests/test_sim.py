"""The simulator: deterministic for a seed, power under the limit, physics that responds."""

import math

import pytest

from collectors.base import GpuBackend
from collectors.nvml import NvmlBackend
from collectors.sim import MAX_W, MIN_W, SimBackend
from tests.fake_pynvml import FakeNvml

S = 10**9


def run(backend: SimBackend, seconds: int, step_s: float = 1.0, start_ns: int = 0):
    samples = []
    steps = int(seconds / step_s)
    for k in range(steps + 1):
        samples = backend.sample(start_ns + round(k * step_s * S))
    return samples


def test_same_seed_same_readings_other_seed_differs():
    a, b, c = SimBackend(seed=7), SimBackend(seed=7), SimBackend(seed=8)
    infos = [x.open() for x in (a, b, c)]
    assert infos[0] == infos[1] and infos[0] != infos[2]
    ra, rb, rc = run(a, 60), run(b, 60), run(c, 60)
    assert ra == rb
    assert [s.power_w for s in ra] != [s.power_w for s in rc]


def test_power_never_exceeds_the_limit_and_the_limit_shows_as_throttling():
    sim = SimBackend(gpus=4, profile="training")
    sim.open()
    for i in range(4):
        sim.set_power_limit(i, 400.0)
    for k in range(200):
        for s in sim.sample(k * S // 2):
            assert s.power_w <= 400.0 and s.limit_w == 400.0
    # in the compute phase of a training step (demand ~690 W) the cap binds on every GPU
    compute = sim.sample(200 * S // 2 + S)
    assert [s.power_w for s in compute] == [400.0] * 4
    assert [s.throttled for s in compute] == [True] * 4
    # at the full limit only the GPUs whose demand (690 W + noise) reaches 700 W are held down
    for i in range(4):
        sim.set_power_limit(i, MAX_W)
    uncapped = sim.sample(200 * S // 2 + 2 * S)
    assert [s.throttled for s in uncapped] == [s.power_w == MAX_W for s in uncapped]
    assert {s.throttled for s in uncapped} == {True, False}  # this seed has both kinds


def test_energy_integrates_power():
    sim = SimBackend(gpus=1, profile="idle")
    sim.open()
    samples = [sim.sample(k * S)[0] for k in range(101)]
    approx_j = sum((a.power_w + b.power_w) / 2 for a, b in zip(samples, samples[1:]))
    assert samples[-1].energy_j == pytest.approx(approx_j, rel=1e-3)


def test_temperature_follows_coolant_supply_with_a_lag():
    sim = SimBackend(gpus=1, profile="training", coolant_supply_c=30.0)
    sim.open()
    settled = run(sim, 300)[0].temp_c
    sim.coolant_supply_c = 45.0
    after_5s = run(sim, 5, start_ns=301 * S)[0].temp_c
    after_300s = run(sim, 300, start_ns=310 * S)[0].temp_c
    assert settled < after_5s < after_300s
    assert after_300s - settled == pytest.approx(15.0, abs=6.0)


def test_limits_outside_the_constraints_are_refused():
    sim = SimBackend(gpus=1)
    (info,) = sim.open()
    assert (info.limit_min_w, info.limit_max_w) == (MIN_W, MAX_W)
    for bad in (MIN_W - 1, MAX_W + 1, float("nan")):
        with pytest.raises(ValueError):
            sim.set_power_limit(0, bad)
    assert sim.writes == []
    sim.set_power_limit(0, 450)
    assert sim.writes == [(0, 450.0)] and sim.limits_w() == {0: 450.0}


def test_every_attempted_write_is_recorded_as_passed():
    sim = SimBackend(gpus=2)
    sim.open()
    tries = [(0, 450), (1, math.nan), (1, 300.5), (5, 400.0), (-1, 400.0), (0, MAX_W + 1)]
    for index, watts in tries:
        try:
            sim.set_power_limit(index, watts)
        except ValueError:
            pass
    assert repr(sim.attempts) == repr(tries)  # as text, since NaN != NaN; 450 stays an int
    assert type(sim.attempts[0][1]) is int  # as passed, not converted
    assert sim.writes == [(0, 450.0), (1, 300.5)]


def _backend(kind: str) -> GpuBackend:
    """The simulator and the NVML collector (over the fake) with the same 200..700 W envelope."""
    backend: GpuBackend = SimBackend(gpus=2) if kind == "sim" else NvmlBackend(FakeNvml.with_gpus(2))
    backend.open()
    return backend


@pytest.mark.parametrize("kind", ["sim", "nvml"])
@pytest.mark.parametrize("watts", [199.99, 700.01, 0, -5, math.nan, math.inf, -math.inf, 1e9])
def test_both_backends_refuse_the_same_limits(kind: str, watts: float):
    """What the daemon learns about a bad limit must not depend on which backend it runs."""
    backend = _backend(kind)
    with pytest.raises(ValueError, match="outside the device's range"):
        backend.set_power_limit(0, watts)


@pytest.mark.parametrize("kind", ["sim", "nvml"])
@pytest.mark.parametrize("index", [2, -1, 100])
def test_both_backends_refuse_an_unknown_gpu(kind: str, index: int):
    backend = _backend(kind)
    with pytest.raises(ValueError, match=f"no GPU with index {index}"):
        backend.set_power_limit(index, 400.0)
    backend.set_power_limit(1, MIN_W)  # the bounds themselves are fine on both
    backend.set_power_limit(1, MAX_W)


@pytest.mark.parametrize("profile", ["idle", "training", "inference"])
def test_profiles_stay_physical(profile):
    sim = SimBackend(gpus=8, profile=profile, seed=3)
    sim.open()
    for k in range(120):
        for s in sim.sample(k * S):
            assert 0 < s.power_w <= s.limit_w and 20 < s.temp_c < 90 and 0 <= s.util_pct <= 100
