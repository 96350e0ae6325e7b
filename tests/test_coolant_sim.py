"""The simulated CDU: deterministic, physically sensible faults, parseable output, demo wiring."""

from __future__ import annotations

import io

import pytest

from collectors.cdu_sim import GARBAGE_REASONS, CduModel, garbage_message, parse_fault, subscription_for
from collectors.coolant import CoolantParser, Subscription

NOW_NS = 1_767_225_600 * 10**9


def run(model: CduModel, seconds: int, load_w: float = 85_000.0) -> dict:
    for _ in range(seconds):
        model.step(1.0, load_w)
    return model.readings()


def parser_for(fmt: str) -> CoolantParser:
    sub = subscription_for(fmt)
    return CoolantParser([Subscription(sub["topic"], sub["format"], field_map=sub.get("field_map", {}),
                                       topic_tags=sub["topic_tags"])])


def test_same_seed_same_messages():
    a, b = CduModel(seed=4), CduModel(seed=4)
    for _ in range(30):
        a.step(1.0, 80_000)
        b.step(1.0, 80_000)
        assert a.messages(NOW_NS) == b.messages(NOW_NS)
    assert CduModel(seed=5).readings() != CduModel(seed=4).readings()


def test_return_follows_heat_load_and_supply_holds_set_point():
    low = run(CduModel(), 300, 30_000)["tcs"]
    high = run(CduModel(), 300, 100_000)["tcs"]
    assert abs(low["supply_temp_c"] - 32) < 0.5 and abs(high["supply_temp_c"] - 32) < 0.5
    assert high["return_temp_c"] - high["supply_temp_c"] > low["return_temp_c"] - low["supply_temp_c"] + 3


def test_pump_failure_flow_falls_supply_climbs():
    before = run(m := CduModel(faults=[parse_fault("pump_failure@60")]), 59)["tcs"]
    after = run(m, 120)["tcs"]
    assert after["flow_lpm"] < 0.1 * before["flow_lpm"] and after["pump_speed_pct"] < 1
    assert after["supply_temp_c"] > before["supply_temp_c"] + 3
    assert after["return_temp_c"] > before["return_temp_c"] + 20


def test_hot_facility_water_drags_the_tcs_supply_up():
    r = run(CduModel(faults=[parse_fault("hot_facility@0")]), 400)
    assert r["facility"]["supply_temp_c"] > 38 and r["tcs"]["supply_temp_c"] > 38


def test_leak_warning_then_critical_and_a_bounded_fault_ends():
    m = CduModel(faults=[parse_fault("leak@10+60")], leak_critical_after_s=30)
    assert run(m, 5)["tcs"]["leak"] == "OK"
    assert run(m, 10)["tcs"]["leak"] == "Warning"
    assert run(m, 30)["tcs"]["leak"] == "Critical"
    assert run(m, 30)["tcs"]["leak"] == "OK"


@pytest.mark.parametrize("fmt", ["json", "value", "influx"])
def test_every_format_parses_cleanly_and_dropout_silences_a_loop(fmt):
    p = parser_for(fmt)
    m = CduModel(fmt=fmt, faults=[parse_fault("dropout@5:facility"), parse_fault("dropout@5:flow_lpm")])
    run(m, 3)
    loops = set()
    for topic, payload in m.messages(NOW_NS):
        readings, rejections = p.parse(topic, payload, NOW_NS)
        assert rejections == [], rejections
        loops |= {r.loop for r in readings}
    assert loops == {"facility", "tcs"}
    run(m, 3)
    fields = set()
    for topic, payload in m.messages(NOW_NS):
        for r in p.parse(topic, payload, NOW_NS)[0]:
            assert r.loop == "tcs"
            fields |= set(r.fields)
    assert "flow_lpm" not in fields and "supply_temp_c" in fields


@pytest.mark.parametrize("kind", list(GARBAGE_REASONS))
def test_each_garbage_kind_is_refused_for_its_reason(kind):
    import random

    topic, payload = garbage_message(kind, random.Random(1), "cooling/s/u", NOW_NS)
    readings, rejections = parser_for("json").parse(topic, payload, NOW_NS)
    assert readings == [] and [r.reason for r in rejections] == [GARBAGE_REASONS[kind]]


def test_fault_specs():
    assert parse_fault("pump_failure@30") == parse_fault("pump_failure@30s")
    f = parse_fault("dropout@1m+30:facility")
    assert (f.kind, f.start_s, f.duration_s, f.target) == ("dropout", 60.0, 30.0, "facility")
    assert parse_fault("garbage").active(0) and not parse_fault("leak@5+1").active(6)
    for bad in ("flood", "leak@soon", "leak:tcs", "pump_failure@-1"):
        with pytest.raises(ValueError, match="fault"):
            parse_fault(bad)


def test_demo_shows_the_cdu_and_stores_coolant_points(tmp_path):
    from agentd.demo import run_demo

    out = io.StringIO()
    run_demo(duration_s=1.0, gpus=2, interval_s=0.1, profile="training", seed=1, state_dir=tmp_path, out=out,
             faults=[parse_fault("leak@0")])
    text = out.getvalue()
    assert "tcs " in text and "facility" in text and "Warning" in text
    assert "coolant points" in text and " 0 coolant points" not in text
