"""Coolant payloads: the three formats, mapping, units, and every bad input counted, never raised."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.coolant_ingest import CoolantIngest
from collectors.coolant import (MAX_PAYLOAD_BYTES, REASONS, CoolantParser, Subscription, parse_line,
                                unit_factor)

NOW_NS = 1_767_225_600 * 10**9
NOW_MS = NOW_NS // 10**6

JSON_SUB = Subscription("cooling/+/+/+", "json", topic_tags={"site": 1, "unit": 2, "loop": 3})
VALUE_SUB = Subscription("bms/+/+/+/+", "value", topic_tags={"site": 1, "unit": 2, "loop": 3},
                         field_map={"RackLiquidSupplyTemperature": "supply_temp_c",
                                    "RackLiquidReturnTemperature": "return_temp_c",
                                    "LeakDetectorState": "leak"})
INFLUX_SUB = Subscription("lp/+/+", "influx", topic_tags={"site": 1, "unit": 2})


def parser(*subs: Subscription) -> CoolantParser:
    return CoolantParser(list(subs) or [JSON_SUB, VALUE_SUB, INFLUX_SUB], default_site="s0")


def one(topic: str, payload: bytes | str, p: CoolantParser | None = None):
    readings, rejections = (p or parser()).parse(topic, payload if isinstance(payload, bytes) else payload.encode(),
                                                 NOW_NS)
    return readings, rejections


# -- formats ---------------------------------------------------------------------------------

def test_json_canonical_fields_topic_tags_sender_time_and_derived_delta():
    payload = {"supply_temp_c": 31.5, "return_temp_c": 40, "flow_lpm": 150, "leak": "ok", "quality": 1,
               "ts": NOW_MS - 500}
    readings, rej = one("cooling/hall-a/cdu-3/tcs", json.dumps(payload))
    assert rej == []
    (r,) = readings
    assert (r.site, r.loop, r.unit, r.point) == ("hall-a", "tcs", "cdu-3", "")
    assert r.fields == {"supply_temp_c": 31.5, "return_temp_c": 40.0, "flow_lpm": 150.0, "leak": "OK",
                        "quality": 1.0, "delta_temp_c": 8.5}
    assert all(type(v) is float for k, v in r.fields.items() if k != "leak")  # no int/float type conflicts
    assert r.ts_ns == NOW_NS - 500 * 10**6


def test_json_field_map_fixed_tags_payload_tags_and_units():
    sub = Subscription("bridge/cdu", "json", tags={"loop": "facility", "unit": "cdu-9", "point": "inlet"},
                       field_map={"SupplyT": "supply_temp_c", "ReturnT": "return_temp_c", "Flow": "flow_lpm",
                                  "dP": "delta_pressure_kpa", "time": "ts"},
                       units={"supply_temp_c": "degF", "return_temp_c": "degF", "flow_lpm": "gal/min",
                              "delta_pressure_kpa": "psi"})
    body = {"SupplyT": 86.0, "ReturnT": 104.0, "Flow": 10.0, "dP": 10.0, "time": "2026-01-01T00:00:00Z",
            "unit": "cdu-7"}
    (r,), rej = one("bridge/cdu", json.dumps(body), parser(sub))
    assert rej == []
    assert (r.site, r.loop, r.unit, r.point) == ("s0", "facility", "cdu-7", "inlet")  # payload tag wins
    assert r.fields["supply_temp_c"] == pytest.approx(30.0)
    assert r.fields["return_temp_c"] == pytest.approx(40.0)
    assert r.fields["delta_temp_c"] == pytest.approx(10.0)
    assert r.fields["flow_lpm"] == pytest.approx(37.85411784)
    assert r.fields["delta_pressure_kpa"] == pytest.approx(68.94757293)
    assert r.ts_ns == NOW_NS


def test_a_temperature_difference_in_degf_is_scaled_not_offset():
    assert unit_factor("delta_temp_c", "degF") == pytest.approx((5 / 9, 0.0))
    assert unit_factor("supply_temp_c", "degF") == pytest.approx((5 / 9, -160 / 9))
    sub = Subscription("x", "json", tags={"loop": "tcs", "unit": "u"}, units={"delta_temp_c": "degF"})
    (r,), _ = one("x", '{"delta_temp_c": 9}', parser(sub))
    assert r.fields["delta_temp_c"] == pytest.approx(5.0)


def test_value_format_dsx_style_field_from_topic():
    (r,), rej = one("bms/s1/cdu-1/tcs/RackLiquidSupplyTemperature",
                    json.dumps({"value": 31.4, "timestamp": NOW_MS, "quality": 1}))
    assert rej == [] and r.fields == {"supply_temp_c": 31.4, "quality": 1.0} and r.ts_ns == NOW_NS
    assert (r.site, r.unit, r.loop) == ("s1", "cdu-1", "tcs")
    (r,), _ = one("bms/s1/cdu-1/tcs/LeakDetectorState", f'{{"value": "Warning", "timestamp": {NOW_MS}}}')
    assert r.fields == {"leak": "Warning"}
    (r,), _ = one("bms/s1/cdu-1/FWS/flow_lpm", "212.5")  # bare scalar; canonical segment; loop alias
    assert r.fields == {"flow_lpm": 212.5} and r.loop == "facility" and r.ts_ns is None


def test_influx_format_lines_with_tags_string_leak_and_timestamp():
    body = ('coolant,loop=tcs,point=manifold\\ A supply_temp_c=31.2,return_temp_c=39.9,leak="Critical",'
            f'pump_speed_pct=80i {NOW_NS}\n'
            '# a comment\n'
            'coolant,loop=facility flow_lpm=400,quality=1\n')
    readings, rej = one("lp/s2/cdu-4", body)
    assert rej == []
    a, b = readings
    assert (a.loop, a.point, a.unit, a.site) == ("tcs", "manifold A", "cdu-4", "s2")
    assert a.fields == {"supply_temp_c": 31.2, "return_temp_c": 39.9, "leak": "Critical", "pump_speed_pct": 80.0,
                        "delta_temp_c": 8.7}
    assert a.ts_ns == NOW_NS and b.ts_ns is None and b.fields == {"flow_lpm": 400.0, "quality": 1.0}


def test_influx_bad_line_is_dropped_and_counted_good_lines_kept():
    body = ('coolant,loop=tcs supply_temp_c=31\ncoolant,loop=tcs supply_temp_c=\ncoolant,loop=tcs flow_lpm=nan\n'
            'coolant,loop=tcs flow_lpm=-1\n')
    readings, rej = one("lp/s/u", body)
    assert len(readings) == 1 and [r.reason for r in rej] == ["bad_line_protocol", "bad_line_protocol", "out_of_range"]
    assert rej[0].detail.startswith("line 2, column 32:") and "(rule field_value)" in rej[0].detail
    assert rej[1].detail.startswith("line 3, column 27:")  # nan is no line protocol number
    assert rej[2].detail.startswith("line 4:")


def test_parse_line_escapes_and_quotes():
    m, tags, fields, ts = parse_line('m\\ x,a\\,b=c\\=d s="q \\"x\\", y",n=1.5 7')
    assert (m, tags, fields, ts) == ("m x", {"a,b": "c=d"}, {"s": 'q "x", y', "n": 1.5}, 7)


def test_first_matching_subscription_wins_and_unmatched_topics_are_named():
    p = parser()
    readings, rej = one("nobody/listens/here", "{}", p)
    assert readings == [] and rej[0].reason == "no_match" and rej[0].topic == "nobody/listens/here"
    assert p.match("cooling/a/b/tcs") is not None and p.match("cooling/a/b") is None
    everything = CoolantParser([Subscription("#", "json"), Subscription("a/#", "json")])
    assert everything.match("$SYS/broker") is None and everything.match("x/y") is not None
    assert everything.match("a")[0].sub.topic == "#"
    assert CoolantParser([Subscription("a/#", "json")]).match("a") is not None  # '#' matches the parent too


# -- bad input: each reason, counted, with good data kept --------------------------------------

GOOD = json.dumps({"supply_temp_c": 30.0, "return_temp_c": 38.0, "ts": NOW_MS}).encode()

BAD_INPUTS = [
    ("not_json", "cooling/s/u/tcs", b"\x00\xffnot json{"),
    ("not_json", "cooling/s/u/tcs", b'{"supply_temp_c": 31.0'),
    ("bad_shape", "cooling/s/u/tcs", b"[31.0, 40.0]"),
    ("wrong_type", "cooling/s/u/tcs", b'{"supply_temp_c": "31.0"}'),
    ("wrong_type", "cooling/s/u/tcs", b'{"supply_temp_c": true}'),
    ("wrong_type", "cooling/s/u/tcs", b'{"leak": 1}'),
    ("not_finite", "cooling/s/u/tcs", b'{"supply_temp_c": NaN}'),
    ("not_finite", "cooling/s/u/tcs", b'{"flow_lpm": Infinity}'),
    ("not_finite", "cooling/s/u/tcs", b'{"flow_lpm": 1e400}'),  # overflows to inf
    ("out_of_range", "cooling/s/u/tcs", b'{"flow_lpm": 1e300}'),
    ("out_of_range", "cooling/s/u/tcs", b'{"supply_temp_c": 420}'),
    ("out_of_range", "cooling/s/u/tcs", b'{"flow_lpm": -3}'),
    ("out_of_range", "cooling/s/u/tcs", b'{"pump_speed_pct": 130}'),
    ("bad_leak_state", "cooling/s/u/tcs", b'{"leak": "wet"}'),
    ("too_large", "cooling/s/u/tcs", b'{"supply_temp_c": 31, "x": "' + b"a" * MAX_PAYLOAD_BYTES + b'"}'),
    ("unknown_field", "cooling/s/u/tcs", b'{"supply_temp_c": 31, "colour": "blue"}'),
    ("unknown_field", "bms/s/u/tcs/Humidity", b'{"value": 31}'),
    ("no_fields", "cooling/s/u/tcs", b'{"ts": %d}' % NOW_MS),
    ("bad_timestamp", "cooling/s/u/tcs", b'{"supply_temp_c": 31, "ts": "yesterday"}'),
    ("ts_future", "cooling/s/u/tcs", b'{"supply_temp_c": 31, "ts": %d}' % (NOW_MS + 3_600_000)),
    ("ts_past", "cooling/s/u/tcs", b'{"supply_temp_c": 31, "ts": %d}' % (NOW_MS - 2 * 86_400_000)),
    ("ts_past", "bms/s/u/tcs/RackLiquidSupplyTemperature", b'{"value": 31, "timestamp": 1000}'),
    ("bad_tag", "cooling/s/u/lake", b'{"supply_temp_c": 31}'),
    ("no_match", "elsewhere/s/u/tcs", GOOD),
    ("bad_line_protocol", "lp/s/u", b"coolant,loop=tcs"),
    ("bad_line_protocol", "lp/s/u", b"\xff\xfe"),
]


def ingest(**coolant) -> CoolantIngest:
    cfg = AgentConfig.model_validate({"node": "n1", "site": "s0", "coolant": {"subscriptions": [
        {"topic": "cooling/+/+/+", "topic_tags": {"site": 1, "unit": 2, "loop": 3}},
        {"topic": "bms/+/+/+/+", "format": "value", "topic_tags": {"site": 1, "unit": 2, "loop": 3},
         "field_map": {"RackLiquidSupplyTemperature": "supply_temp_c"}},
        {"topic": "lp/+/+", "format": "influx", "topic_tags": {"site": 1, "unit": 2}, "tags": {"loop": "tcs"}},
    ], **coolant}})
    return CoolantIngest(cfg, FakeClock(start_wall_ns=NOW_NS))


@pytest.mark.parametrize("reason, topic, payload", BAD_INPUTS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_INPUTS)])
def test_each_bad_input_is_counted_by_reason_logged_with_topic_and_good_data_kept(reason, topic, payload):
    from structlog.testing import capture_logs

    ing = ingest()
    with capture_logs() as logs:
        ing.handle_batch([("cooling/s/u/tcs", GOOD), (topic, payload), ("cooling/s/u/facility", GOOD)])
    assert ing.bad == {reason: 1}
    assert ing.msgs == 3 and ing.readings == 2
    lines = [line for _, line in ing.take_lines()]
    assert len(lines) == 2 and lines[0].startswith("coolant,loop=tcs,site=s,unit=u ")
    assert lines[1].startswith("coolant,loop=facility,site=s,unit=u ")
    assert {log["reason"] for log in logs} == {reason} and logs[0]["topic"] == topic
    fields = ing.agent_fields()
    assert fields["coolant_bad_msgs"] == 1 and fields[f"coolant_bad_{reason}"] == 1
    assert reason in REASONS


def test_bad_message_logs_are_rate_limited_per_reason():
    from structlog.testing import capture_logs

    ing = ingest()
    with capture_logs() as logs:
        ing.handle_batch([("cooling/s/u/tcs", b"junk")] * 500)
        ing.clock.advance(11)
        ing.handle_batch([("cooling/s/u/tcs", b"junk")])
    assert ing.bad == {"not_json": 501}
    assert len(logs) == 2 and logs[1]["suppressed_since_last"] == 499


def test_store_lines_carry_sender_time_else_arrival_time():
    ing = ingest()
    ing.handle_batch([("cooling/s/u/tcs", b'{"flow_lpm": 100, "ts": %d}' % (NOW_MS - 1000)),
                      ("cooling/s/u/tcs", b'{"flow_lpm": 101}')])
    (ts1, l1), (ts2, l2) = ing.take_lines()
    assert ts1 == NOW_NS - 10**9 and l1.endswith(f" {NOW_NS - 10**9}")
    assert ts2 == NOW_NS and l2 == f"coolant,loop=tcs,site=s,unit=u flow_lpm=101.0 {NOW_NS}"


def test_pending_lines_are_bounded():
    ing = ingest(max_pending=100)
    ing.handle_batch([("cooling/s/u/tcs", b'{"flow_lpm": %d}' % i) for i in range(150)])
    assert len(ing.take_lines()) == 100 and ing.pending_dropped == 50
    assert ing.agent_fields()["coolant_pending_dropped"] == 50


def test_sensor_table_is_bounded_against_garbage_topics():
    ing = ingest(max_sensors=10)
    ing.handle_batch([(f"cooling/s/u{i}/tcs", b'{"flow_lpm": 1}') for i in range(20)])
    # one-off units make room for each other (the least recently heard from goes first)
    assert ing.readings == 20 and ing.bad == {} and len(ing.state) == 10
    assert ing.agent_fields()["coolant_sensors_evicted"] == 10 and ing.agent_fields()["coolant_sensors"] == 10
    for _ in range(3):  # ten units the node comes to depend on fill the table...
        ing.handle_batch([(f"cooling/s/e{i}/tcs", b'{"flow_lpm": 1}') for i in range(10)])
        ing.clock.advance(5)
    ing.handle_batch([("cooling/s/late/tcs", b'{"flow_lpm": 1}')])  # ...and are never evicted
    assert ing.bad == {"too_many_sensors": 1} and len(ing.state) == 10


# -- property tests: no exception ever escapes ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["supply_temp_c", "flow_lpm", "leak", "ts", "quality", "value", "timestamp", "loop",
                         "unit", "site", "point"]) | st.text(max_size=8), children, max_size=6),
    max_leaves=20)


def _dump(v) -> bytes:
    return json.dumps(v, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(_dump),
    st.dictionaries(st.sampled_from(["supply_temp_c", "return_temp_c", "flow_lpm", "leak", "ts", "quality",
                                     "delta_temp_c", "pump_speed_pct"]),
                    st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=5),
                    max_size=8).map(_dump),
    st.text(max_size=200).map(str.encode),
    st.integers(min_value=0, max_value=3).map(lambda k: [b"[" * 70000, b'{"a":' * 20000,
                                                         b"9" * 60000, b"x" * (MAX_PAYLOAD_BYTES + 1)][k]),
)
topics = st.one_of(
    st.sampled_from(["cooling/s/u/tcs", "cooling/s/u/facility", "cooling//u/tcs", "bms/s/u/tcs/flow_lpm",
                     "bms/s/u/tcs/RackLiquidSupplyTemperature", "lp/s/u", "lp/s/u/x", "$SYS/x", ""]),
    st.text(max_size=30))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=topics, payload=payloads, now_s=st.integers(min_value=0, max_value=4_000_000_000))
def test_no_payload_makes_any_parser_raise(topic, payload, now_s):
    p = parser()
    readings, rejections = p.parse(topic, payload, now_s * 10**9)
    for r in readings:
        for v in r.fields.values():
            assert v == "OK" or isinstance(v, str) or math.isfinite(v)
    assert all(rej.reason in REASONS and rej.reason != "internal_error" for rej in rejections)


line_text = st.text(alphabet=st.sampled_from(list('coolant,=" \\tsupply_temp_c1.5eEiu-nNaf#\n')), max_size=120)


@settings(max_examples=400, deadline=None)
@given(body=line_text)
def test_no_line_protocol_text_makes_the_influx_parser_raise(body):
    readings, rejections = parser().parse("lp/s/u", body.encode(), NOW_NS)
    assert all(rej.reason != "internal_error" for rej in rejections)


@settings(max_examples=200, deadline=None)
@given(payload=payloads)
def test_the_ingest_path_never_raises_and_counts_every_message(payload):
    ing = ingest()
    ing.handle_batch([("cooling/s/u/tcs", payload), ("bms/s/u/tcs/flow_lpm", payload), ("lp/s/u", payload)])
    assert ing.msgs == 3 and ing.bad.get("internal_error", 0) == 0
    assert ing.readings + ing.bad_msgs >= 3
