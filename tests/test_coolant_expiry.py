"""Which coolant sensors a node depends on, and when silent ones are forgotten (fake clock, no sleeps).

The fault this guards against: 2,500 units that each sent one message filled the sensor table,
the node's real CDU was refused (``too_many_sensors``), and 30 s later the one-offs' staleness
fired ``tcs_supply_hot`` and ``coolant_sensor_stale``, capping every GPU while the real sensor
read a fresh 30 C; each tick scanned every dead entry.
"""

from __future__ import annotations

import json
import time

import pytest

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.control import coolant_signals
from agentd.daemon import Daemon, open_store
from collectors.coolant import CoolantState, Reading, SeriesKey
from collectors.sim import SimBackend

WALL = 1_767_225_600 * 10**9
UNCAPPED_W = 700.0  # the simulator's GPUs' limit before any cap


def reading(unit: str, loop: str = "tcs", ts_ns: int | None = None, **fields) -> Reading:
    return Reading("s", loop, unit, "", {k: v if isinstance(v, str) else float(v) for k, v in fields.items()},
                   ts_ns, None)


def feed(state: CoolantState, clock: FakeClock, r: Reading):
    return state.update(r, clock.monotonic(), clock.wall_ns())


def make_daemon(tmp_path, clock: FakeClock) -> Daemon:
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": "n1", "interval": 1.0, "sim": {"gpus": 2},
        "coolant": {"subscriptions": [{"topic": "cooling/+/+/+", "topic_tags": {"site": 1, "unit": 2, "loop": 3}}]},
        "rules": {"dirs": []},
    })
    return Daemon(cfg, SimBackend(gpus=2), open_store(cfg), clock=clock)


def cdu_message(unit: str, clock: FakeClock, supply_c: float = 30.0) -> tuple[str, bytes]:
    body = {"supply_temp_c": supply_c, "return_temp_c": supply_c + 8, "flow_lpm": 150.0,
            "ts": clock.wall_ns() // 10**6}
    return f"cooling/s1/{unit}/tcs", json.dumps(body).encode()


async def test_one_off_units_neither_lock_out_the_real_cdu_nor_cap_the_node(tmp_path):
    clock = FakeClock(start_wall_ns=WALL)
    daemon = make_daemon(tmp_path, clock)
    await daemon.start()
    # 2,500 units x 4 sensors (3 fields + the derived delta) fill the 10,000-sensor table
    daemon.coolant.handle_batch([cdu_message(f"ghost-{i}", clock) for i in range(2_500)])
    assert len(daemon.state.coolant) == 10_000
    firing_seen: set[str] = set()
    for _ in range(120):  # two minutes of the real CDU publishing every second
        daemon.coolant.handle(*cdu_message("cdu-1", clock))
        await daemon.tick()
        firing_seen |= {i.rule for i in daemon.last_step.evaluation.firing()}
        clock.advance(1.0)
    assert daemon.coolant.bad == {}  # the real unit was never refused (ghosts made room)
    assert daemon.state.coolant.is_established(SeriesKey("s1", "tcs", "cdu-1", ""))
    node, stale = coolant_signals(daemon.state.coolant, clock.monotonic())
    assert stale == frozenset() and node["coolant.stale"] is False
    assert node["coolant.tcs.supply_temp_c"] == 30.0
    assert firing_seen == set()  # neither tcs_supply_hot nor coolant_sensor_stale, ever
    assert daemon.backend.limits_w() == {0: UNCAPPED_W, 1: UNCAPPED_W}
    agent = daemon.store.query(measurement="agent")[-1]
    assert "coolant_sensors_evicted=4i" in agent  # one ghost made room for cdu-1's four sensors
    await daemon.shutdown()


async def test_a_silent_established_cdu_still_caps_the_node_fail_safe_and_after_it_is_forgotten(tmp_path):
    clock = FakeClock(start_wall_ns=WALL)
    daemon = make_daemon(tmp_path, clock)
    await daemon.start()
    for _ in range(20):
        daemon.coolant.handle(*cdu_message("cdu-1", clock))
        await daemon.tick()
        clock.advance(1.0)
    assert daemon.backend.limits_w() == {0: UNCAPPED_W, 1: UNCAPPED_W}
    firing: set[str] = set()
    silent_since = clock.monotonic()
    for _ in range(4_000 // 5):  # the CDU goes silent for over an hour (coolant.max_age)
        await daemon.tick()
        firing = {i.rule for i in daemon.last_step.evaluation.firing()}
        if clock.monotonic() - silent_since > 60:  # stale after 5 s, then `for: 30s`
            assert "tcs_supply_hot" in firing, clock.monotonic() - silent_since  # blind: the mild cap
        clock.advance(5.0)
    assert len(daemon.state.coolant) == 0 and daemon.state.coolant.expired == 4  # forgotten...
    assert "tcs_supply_hot" in firing  # ...and an absent supply reading is still not read as OK
    assert all(w < UNCAPPED_W for w in daemon.backend.limits_w().values())
    await daemon.shutdown()


def test_a_unit_seen_once_never_degrades_a_loop_but_its_fresh_readings_count():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0, stale_initial_s=30.0)
    for _ in range(10):
        feed(state, clock, reading("real", supply_temp_c=30.0))
        clock.advance(1.0)
    feed(state, clock, reading("once", supply_temp_c=44.0, quality=0))
    feed(state, clock, reading("once-hot", supply_temp_c=47.0))
    feed(state, clock, reading("once-blind", leak="Unavailable"))
    tcs = state.loop("tcs", clock.monotonic())
    assert tcs.supply_temp_c == 47.0  # a hot reading is evidence, whoever sends it
    assert not tcs.degraded and tcs.degraded_sensors == ()  # bad quality / Unavailable of a one-off: not
    clock.advance(31.0)  # every one-off is stale now; the real unit went silent too
    tcs = state.loop("tcs", clock.monotonic())
    assert {(s.key.unit, s.field) for s in tcs.degraded_sensors} == {("real", "supply_temp_c")}
    assert tcs.fields["supply_temp_c"].degraded == 1 and tcs.supply_temp_c is None


def test_a_burst_does_not_establish_a_unit_and_a_slow_sender_still_gets_established():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0, stale_initial_s=30.0)
    for _ in range(5):  # five messages within a second
        feed(state, clock, reading("burst", flow_lpm=100))
        clock.advance(0.2)
    assert not state.is_established(SeriesKey("s", "tcs", "burst", ""))
    for _ in range(3):  # once a minute: silent (dormant) between messages at first
        feed(state, clock, reading("slow", flow_lpm=100))
        clock.advance(60.0)
    key = SeriesKey("s", "tcs", "slow", "")
    assert state.is_established(key)
    assert state.sensor(key, "flow_lpm", clock.monotonic()).stale_after_s == pytest.approx(180.0)
    assert not state.loop("tcs", clock.monotonic()).degraded  # 60 s of silence is its normal pace


def test_sensors_silent_past_expire_after_are_forgotten_and_the_table_frees_up():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(max_sensors=100, expire_after_s=600.0)
    for _ in range(3):
        for u in range(20):
            feed(state, clock, reading(f"u{u}", supply_temp_c=30.0, flow_lpm=100.0))
        clock.advance(3.0)
    assert len(state) == 40  # last heard from 3 s ago
    clock.advance(590.0)  # stale and degraded, not yet forgotten
    tcs = state.loop("tcs", clock.monotonic())
    assert tcs.fields["flow_lpm"].degraded == 20 and len(tcs.degraded_sensors) == 40
    clock.advance(10.0)
    tcs = state.loop("tcs", clock.monotonic())
    assert len(state) == 0 and state.expired == 40 and not tcs.degraded and tcs.series == 0
    assert state.loops(clock.monotonic()) == {}
    assert state.sensor(SeriesKey("s", "tcs", "u0", ""), "flow_lpm", clock.monotonic()) is None


def test_a_silent_sensor_that_speaks_again_is_live_again():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState()
    for _ in range(5):
        feed(state, clock, reading("a", supply_temp_c=30.0))
        clock.advance(2.0)
    clock.advance(120.0)
    assert state.loop("tcs", clock.monotonic()).is_degraded("supply_temp_c")
    feed(state, clock, reading("a", supply_temp_c=31.0))
    tcs = state.loop("tcs", clock.monotonic())
    assert not tcs.degraded and tcs.supply_temp_c == 31.0


def test_loop_cost_does_not_grow_with_thousands_of_silent_sensors():
    def per_call_s(state: CoolantState, now: float) -> float:
        best = float("inf")
        for _ in range(30):
            t0 = time.perf_counter()
            state.loops(now)
            best = min(best, time.perf_counter() - t0)
        return best

    def build(dead_units: int) -> tuple[CoolantState, FakeClock]:
        clock = FakeClock(start_wall_ns=WALL)
        state = CoolantState(max_sensors=20_000)
        for _ in range(3):
            for u in range(dead_units):
                feed(state, clock, reading(f"dead-{u}", supply_temp_c=30.0, return_temp_c=38.0, flow_lpm=99.0))
            feed(state, clock, reading("live", supply_temp_c=30.0, flow_lpm=100.0))
            clock.advance(3.0)
        clock.advance(40.0)  # the 3,000 are silent past their deadline; "live" speaks again
        feed(state, clock, reading("live", supply_temp_c=30.0, flow_lpm=100.0))
        return state, clock

    loaded, clock = build(3_000)
    tcs = loaded.loop("tcs", clock.monotonic())
    assert tcs.fields["flow_lpm"].degraded == 3_000 and tcs.flow_lpm == 100.0 and len(loaded) == 12_002
    assert len(tcs.degraded_sensors) == 12_000
    empty, clock2 = build(0)
    loaded_s, empty_s = per_call_s(loaded, clock.monotonic()), per_call_s(empty, clock2.monotonic())
    assert loaded_s < 10 * empty_s + 50e-6, (loaded_s, empty_s)  # scanning them would be ~1000x


def count_reviews(state: CoolantState) -> list[int]:
    """Wrap the state's review step (moving sensors out of the scan) with a counter."""
    calls = [0]
    review = state._review

    def counted(series, now):
        calls[0] += 1
        review(series, now)

    state._review = counted  # type: ignore[method-assign]
    return calls


def run_units(state: CoolantState, clock: FakeClock, *, units: int, period_s: float, seconds: float,
              lag_s: float = 0.0) -> None:
    for i in range(int(seconds / period_s)):
        for u in range(units):
            feed(state, clock, reading(f"u{u}", ts_ns=clock.wall_ns() - int(lag_s * 1e9),
                                       supply_temp_c=30.0 + i % 3, flow_lpm=100.0))
        state.loops(clock.monotonic())  # the tick
        clock.advance(period_s)


def test_a_sender_whose_clock_is_behind_stays_degraded_at_no_cost_per_message():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0)
    reviews = count_reviews(state)
    run_units(state, clock, units=50, period_s=1.0, seconds=100, lag_s=10.0)  # every reading 10 s old
    tcs = state.loop("tcs", clock.monotonic())
    assert tcs.degraded and tcs.supply_temp_c is None and tcs.fields["flow_lpm"].degraded == 50
    assert reviews[0] <= 50  # once per unit, not once per message (5,000 messages)
    newest = {v.value for v in tcs.degraded_sensors if v.field == "supply_temp_c"}
    assert newest == {30.0 + 99 % 3}  # what it last said shows, though stale


def test_steady_senders_are_reviewed_about_once_per_stale_after_not_per_message():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0)
    reviews = count_reviews(state)
    run_units(state, clock, units=50, period_s=1.0, seconds=100)
    assert not state.loop("tcs", clock.monotonic()).degraded
    assert reviews[0] <= 50 * (100 // 5 + 1)  # stale_after 5 s: one look every 5 s per unit
