"""Coolant freshness on an injected clock: stale after stale_after, bad quality, worst case per loop."""

from __future__ import annotations

import pytest

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.coolant import CoolantState, Reading, SeriesKey
from collectors.sim import SimBackend

WALL = 1_767_225_600 * 10**9


def reading(loop="tcs", unit="cdu-1", point="", ts_ns=None, stale_after_s=None, **fields) -> Reading:
    return Reading("s", loop, unit, point, {k: float(v) if not isinstance(v, str) else v for k, v in fields.items()},
                   ts_ns, stale_after_s)


def feed(state: CoolantState, clock: FakeClock, r: Reading):
    return state.update(r, clock.monotonic(), clock.wall_ns())


def test_a_sensor_that_stops_publishing_turns_degraded_after_three_periods():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0, stale_initial_s=30.0)
    for _ in range(10):  # publishes every 2 s
        feed(state, clock, reading(supply_temp_c=31.0, flow_lpm=150))
        clock.advance(2.0)
    key = SeriesKey("s", "tcs", "cdu-1", "")
    view = state.sensor(key, "supply_temp_c", clock.monotonic())
    assert view.stale_after_s == pytest.approx(6.0) and view.good and view.age_s == pytest.approx(2.0)
    clock.advance(3.9)  # 5.9 s since the last message: still fresh
    assert state.loop("tcs", clock.monotonic()).supply_temp_c == 31.0
    clock.advance(0.2)  # 6.1 s: stale, and never read as a good value
    tcs = state.loop("tcs", clock.monotonic())
    assert tcs.degraded and tcs.supply_temp_c is None and tcs.flow_lpm is None
    assert tcs.is_degraded("supply_temp_c") and {s.status for s in tcs.degraded_sensors} == {"stale"}
    assert state.sensor(key, "supply_temp_c", clock.monotonic()).status == "stale"
    feed(state, clock, reading(supply_temp_c=33.0, flow_lpm=150))  # it comes back
    assert not state.loop("tcs", clock.monotonic()).degraded
    assert state.loop("tcs", clock.monotonic()).supply_temp_c == 33.0


def test_stale_after_has_a_floor_an_initial_value_and_a_fixed_override():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0, stale_initial_s=30.0)
    key = SeriesKey("s", "tcs", "fast", "")
    feed(state, clock, reading(unit="fast", flow_lpm=1))
    assert state.sensor(key, "flow_lpm", clock.monotonic()).stale_after_s == 30.0  # period not known yet
    for _ in range(20):
        clock.advance(0.1)
        feed(state, clock, reading(unit="fast", flow_lpm=1))
    assert state.sensor(key, "flow_lpm", clock.monotonic()).stale_after_s == 5.0  # 3 x 0.1 s < floor
    feed(state, clock, reading(unit="fixed", flow_lpm=1, stale_after_s=2.0))
    clock.advance(2.5)
    assert state.sensor(SeriesKey("s", "tcs", "fixed", ""), "flow_lpm", clock.monotonic()).status == "stale"
    assert state.sensor(key, "flow_lpm", clock.monotonic()).status == "ok"


def establish(state: CoolantState, clock: FakeClock, *units: str) -> None:
    """Three messages over 5 s (the stale floor): the node now depends on these units."""
    for i in range(3):
        for u in units:
            feed(state, clock, reading(unit=u, supply_temp_c=30.0))
        if i < 2:
            clock.advance(2.5)
    assert all(state.is_established(SeriesKey("s", "tcs", u, "")) for u in units)


def test_quality_not_one_and_an_unavailable_leak_detector_are_degraded():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState()
    establish(state, clock, "a", "b")
    clock.advance(1.0)
    feed(state, clock, reading(unit="a", supply_temp_c=40.0, quality=0))
    feed(state, clock, reading(unit="b", supply_temp_c=31.0, leak="Unavailable"))
    tcs = state.loop("tcs", clock.monotonic())
    assert tcs.supply_temp_c == 31.0  # the bad-quality 40 C is not read as a value
    assert {(s.key.unit, s.field, s.status) for s in tcs.degraded_sensors} == {
        ("a", "supply_temp_c", "bad_quality"), ("b", "leak", "unavailable")}
    assert tcs.leak is None and tcs.is_degraded("leak")


def test_worst_case_per_loop_hottest_supply_lowest_flow_worst_leak():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState()
    feed(state, clock, reading(unit="a", supply_temp_c=31.0, return_temp_c=40.0, flow_lpm=150, leak="OK"))
    feed(state, clock, reading(unit="b", supply_temp_c=33.0, return_temp_c=41.0, flow_lpm=90, leak="Warning"))
    feed(state, clock, reading(loop="facility", unit="a", supply_temp_c=25.0, flow_lpm=300))
    loops = state.loops(clock.monotonic())
    tcs = loops["tcs"]
    assert (tcs.supply_temp_c, tcs.return_temp_c, tcs.flow_lpm, tcs.leak) == (33.0, 41.0, 90.0, "Warning")
    assert tcs.fields["supply_temp_c"].min == 31.0 and tcs.fields["supply_temp_c"].good == 2
    assert tcs.series == 2 and not tcs.degraded
    assert loops["facility"].supply_temp_c == 25.0
    assert state.loop("tcs", clock.monotonic(), unit="a").flow_lpm == 150.0


def test_delta_is_derived_across_value_messages_when_both_temperatures_are_fresh():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState()
    assert feed(state, clock, reading(supply_temp_c=30.0)) == {}
    assert feed(state, clock, reading(return_temp_c=39.5)) == {"delta_temp_c": 9.5}
    assert state.loop("tcs", clock.monotonic()).delta_temp_c == 9.5


def test_a_sender_timestamp_ages_the_reading_so_old_retained_values_are_stale_at_once():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState(stale_floor_s=5.0, stale_initial_s=30.0)
    feed(state, clock, reading(flow_lpm=100, ts_ns=WALL - 40 * 10**9))
    view = state.sensor(SeriesKey("s", "tcs", "cdu-1", ""), "flow_lpm", clock.monotonic())
    assert view.age_s == pytest.approx(40.0) and view.status == "stale"


def test_an_older_reading_does_not_replace_a_newer_one():
    clock = FakeClock(start_wall_ns=WALL)
    state = CoolantState()
    feed(state, clock, reading(flow_lpm=100, ts_ns=WALL))
    feed(state, clock, reading(flow_lpm=50, ts_ns=WALL - 10**9))
    assert state.loop("tcs", clock.monotonic()).flow_lpm == 100.0


async def test_the_daemon_state_reports_a_silent_sensor_degraded_after_stale_after(tmp_path):
    cfg = AgentConfig.model_validate({
        "backend": "sim", "state_dir": str(tmp_path), "node": "n1", "sim": {"gpus": 1},
        "coolant": {"stale_floor": "2s", "subscriptions": [
            {"topic": "cooling/+/+/+", "topic_tags": {"site": 1, "unit": 2, "loop": 3}}]}})
    clock = FakeClock(start_wall_ns=WALL)
    daemon = Daemon(cfg, SimBackend(gpus=1), open_store(cfg), clock=clock)
    await daemon.start()
    for _ in range(5):
        daemon.coolant.handle("cooling/s/cdu-1/tcs", b'{"supply_temp_c": 31.0}')
        await daemon.tick()
        clock.advance(1.0)
    assert not daemon.state.coolant.loop("tcs", clock.monotonic()).degraded
    clock.advance(2.1)  # 3 x 1 s period since the last message (plus the 1 s already passed)
    tcs = daemon.state.coolant.loop("tcs", clock.monotonic())
    assert tcs.degraded and tcs.supply_temp_c is None
    await daemon.tick()
    lines = daemon.store.query(measurement="coolant")
    assert len(lines) == 5
    agent = daemon.store.query(measurement="agent")[-1]
    assert "coolant_msgs=5i" in agent and "coolant_bad_msgs=0i" in agent and "mqtt_connected" not in agent
    await daemon.shutdown()
