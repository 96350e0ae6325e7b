"""coolant_loop: each loop's degraded sensors as this node sees them, at most once a second."""

from __future__ import annotations

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.coolant_ingest import LOOP_STATUS_EVERY_S, CoolantIngest
from collectors.lineproto_parse import parse_line

NOW_NS = 1_767_225_600 * 10**9


def ingest() -> CoolantIngest:
    cfg = AgentConfig.model_validate({"node": "n1", "site": "s0", "coolant": {"stale_floor": "2s", "subscriptions": [
        {"topic": "cooling/+/+/+", "topic_tags": {"site": 1, "unit": 2, "loop": 3}}]}})
    return CoolantIngest(cfg, FakeClock(start_wall_ns=NOW_NS))


def loops(ing: CoolantIngest) -> dict[str, tuple[dict, dict]]:
    out = {}
    for _, line in ing.loop_lines(ing.clock.wall_ns()):
        m, tags, fields, _ = parse_line(line)
        assert m == "coolant_loop"
        out[tags["loop"]] = (tags, fields)
    return out


def publish(ing: CoolantIngest, n: int, **payloads: bytes) -> None:
    for _ in range(n):
        ing.handle_batch([(f"cooling/s0/cdu-1/{loop}", p) for loop, p in payloads.items()])
        ing.clock.advance(1.0)


def test_healthy_loops_report_zero_degraded_sensors() -> None:
    ing = ingest()
    publish(ing, 5, tcs=b'{"supply_temp_c": 31, "flow_lpm": 150, "leak": "OK"}', facility=b'{"supply_temp_c": 25}')
    out = loops(ing)
    assert set(out) == {"tcs", "facility"}
    tags, fields = out["tcs"]
    assert tags == {"host": "n1", "site": "s0", "loop": "tcs"}
    assert fields == {"degraded_sensors": 0, "stale_sensors": 0, "bad_quality_sensors": 0, "unavailable_sensors": 0,
                      "series": 1, "degraded_fields": ""}
    assert ing.take_lines()  # the readings themselves are still what take_lines gives


def test_silent_bad_quality_and_unavailable_sensors_are_counted_by_cause() -> None:
    ing = ingest()
    publish(ing, 5, tcs=b'{"supply_temp_c": 31, "flow_lpm": 150, "leak": "OK"}', facility=b'{"supply_temp_c": 25}')
    publish(ing, 1, tcs=b'{"supply_temp_c": 31, "leak": "Unavailable", "quality": 1}')
    ing.clock.advance(LOOP_STATUS_EVERY_S)
    out = loops(ing)
    assert out["tcs"][1]["unavailable_sensors"] == 1 and out["tcs"][1]["degraded_fields"] == "leak"
    ing.clock.advance(10.0)  # everything silent now: stale
    out = loops(ing)
    assert out["tcs"][1]["stale_sensors"] == 3 and out["tcs"][1]["degraded_sensors"] == 3
    assert out["tcs"][1]["degraded_fields"] == "flow_lpm,leak,supply_temp_c"
    assert out["facility"][1]["stale_sensors"] == 1
    publish(ing, 1, tcs=b'{"supply_temp_c": 31, "flow_lpm": 150, "leak": "OK", "quality": 0}')
    ing.clock.advance(LOOP_STATUS_EVERY_S)
    assert loops(ing)["tcs"][1]["bad_quality_sensors"] == 3


def test_at_most_once_per_interval_and_nothing_without_loops() -> None:
    ing = ingest()
    assert ing.loop_lines(NOW_NS) == []  # no loop seen yet
    publish(ing, 1, tcs=b'{"supply_temp_c": 31}')
    assert len(ing.loop_lines(NOW_NS)) == 1
    ing.clock.advance(LOOP_STATUS_EVERY_S / 2)
    assert ing.loop_lines(NOW_NS) == []
    ing.clock.advance(LOOP_STATUS_EVERY_S / 2)
    assert len(ing.loop_lines(NOW_NS)) == 1
