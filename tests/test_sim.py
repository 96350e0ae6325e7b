"""The simulator: deterministic for a seed, power under the limit, physics that responds."""

import pytest

from collectors.sim import MAX_W, MIN_W, SimBackend

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
    # in the compute phase of a training step the cap binds
    compute = sim.sample(200 * S // 2 + S)
    assert all(s.throttled for s in compute if s.power_w == 400.0)


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


@pytest.mark.parametrize("profile", ["idle", "training", "inference"])
def test_profiles_stay_physical(profile):
    sim = SimBackend(gpus=8, profile=profile, seed=3)
    sim.open()
    for k in range(120):
        for s in sim.sample(k * S):
            assert 0 < s.power_w <= s.limit_w and 20 < s.temp_c < 90 and 0 <= s.util_pct <= 100
