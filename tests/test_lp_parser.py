"""Line protocol decoding (collectors.lineproto_parse) and the coolant ``influx`` format built on it.

Each input the old reader got wrong is sent here through the daemon's ingest path between good
messages: the bad entry is refused with its counted reason and a detail naming line, column and
grammar rule, and nothing else is lost.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.coolant_ingest import CoolantIngest
from collectors.coolant import parse_line
from collectors.lineproto_parse import LineProtocolError, ParsedLine, Uint, decode_payload, parse_lines

NOW_NS = 1_767_225_600 * 10**9
GOOD_LINE = "coolant,loop=tcs supply_temp_c=30.5"


def ingest() -> CoolantIngest:
    cfg = AgentConfig.model_validate({"node": "n1", "site": "s0", "coolant": {"subscriptions": [
        {"topic": "lp/+/+", "format": "influx", "topic_tags": {"site": 1, "unit": 2}, "tags": {"loop": "tcs"},
         "ignore_fields": ["note"]},
        {"topic": "cooling/+/+/+", "topic_tags": {"site": 1, "unit": 2, "loop": 3}},
    ]}})
    return CoolantIngest(cfg, FakeClock(start_wall_ns=NOW_NS))


# -- what the old reader got wrong, through the ingest path -------------------------------------------

BAD_LINES = [
    # (what, the entry, the rule named in the detail)
    ("vertical tab is no line break", "coolant,loop=tcs supply_temp_c=31\vflow_lpm=1", "float_field"),
    ("form feed is no line break", "coolant,loop=tcs supply_temp_c=31\fflow_lpm=1", "float_field"),
    ("\\x1c-\\x1e are no line breaks", "coolant,loop=tcs supply_temp_c=31\x1dflow_lpm=1", "float_field"),
    ("NEL is no line break", "coolant,loop=tcs supply_temp_c=31\x85flow_lpm=1", "float_field"),
    ("U+2028 is no line break", "coolant,loop=tcs supply_temp_c=31\u2028flow_lpm=1", "float_field"),
    ("a lone CR is no line break", "coolant,loop=tcs supply_temp_c=31\rflow_lpm=1", "line_end"),
    ('a " in a tag value protects no space', 'coolant,loop=tcs,unit="cdu 1" supply_temp_c=31', "field_key"),
    ("nan is not a number", "coolant,loop=tcs supply_temp_c=nan", "field_value"),
    ("inf is not a number", "coolant,loop=tcs supply_temp_c=-inf", "float_field"),
    ("float64 overflow", "coolant,loop=tcs supply_temp_c=1e400", "float_field"),
    ("int64 overflow", "coolant,loop=tcs pump_speed_pct=9223372036854775808i", "int_field"),
    ("uint64 overflow", "coolant,loop=tcs pump_speed_pct=18446744073709551616u", "uint_field"),
    ("an unsigned integer has no sign", "coolant,loop=tcs pump_speed_pct=-3u", "uint_field"),
    ("no plus sign", "coolant,loop=tcs supply_temp_c=+20", "field_value"),
    ("no digit separators", "coolant,loop=tcs supply_temp_c=2_0", "float_field"),
    ("ASCII digits only", "coolant,loop=tcs supply_temp_c=\u0663\u0661", "field_value"),
    ("ASCII digits only, after the first", "coolant,loop=tcs supply_temp_c=3\u0661", "float_field"),
    ("no hex", "coolant,loop=tcs supply_temp_c=0x1p4", "float_field"),
    ("a tag key once", "coolant,loop=tcs,unit=a,unit=b supply_temp_c=31", "duplicate_tag"),
    ("a field key once", "coolant,loop=tcs supply_temp_c=31,supply_temp_c=45", "duplicate_field"),
    ("no control characters in a tag", "coolant,loop=tcs,unit=a\x01b supply_temp_c=31", "tag_value"),
    ("no control characters in a measurement", "cool\x00ant,loop=tcs supply_temp_c=31", "measurement"),
    ("no tab as a separator", "coolant,loop=tcs\tsupply_temp_c=31", "tag_value"),
    ("no control characters in a field key", "coolant,loop=tcs supply\x1b_temp_c=31", "field_key"),
    ("a string needs its closing quote", 'coolant,loop=tcs leak="OK', "string_field"),
    ("a boolean is one of ten words", "coolant,loop=tcs supply_temp_c=yes", "field_value"),
    ("the timestamp is an integer", "coolant,loop=tcs supply_temp_c=31 1.7e18", "timestamp"),
    ("the timestamp fits int64", "coolant,loop=tcs supply_temp_c=31 9223372036854775808", "timestamp"),
]


@pytest.mark.parametrize("what, line, rule", BAD_LINES, ids=[w for w, _, _ in BAD_LINES])
def test_each_bad_entry_is_refused_with_its_rule_and_nothing_else_is_lost(what, line, rule):
    from structlog.testing import capture_logs

    ing = ingest()
    body = f"{GOOD_LINE}\n{line}\ncoolant,loop=facility flow_lpm=200\n"
    with capture_logs() as logs:
        ing.handle_batch([("cooling/s/u/tcs", b'{"flow_lpm": 100}'), ("lp/s/u", body.encode()),
                          ("cooling/s/u/facility", b'{"flow_lpm": 300}')])
    assert ing.bad == {"bad_line_protocol": 1}, what
    assert ing.msgs == 3 and ing.readings == 4  # both json messages and the two good lines
    lines = [text for _, text in ing.take_lines()]
    assert any("supply_temp_c=30.5" in text for text in lines) and any("flow_lpm=200.0" in text for text in lines)
    (log,) = logs
    assert log["reason"] == "bad_line_protocol" and log["topic"] == "lp/s/u"
    assert log["detail"].startswith("line 2, column ") and log["detail"].endswith(f"(rule {rule})")


def test_a_string_field_may_hold_a_raw_newline_and_the_entry_stays_whole():
    ing = ingest()
    ing.handle_batch([("lp/s/u", b'coolant,loop=tcs note="first\nsecond",flow_lpm=120\ncoolant flow_lpm=121\n')])
    assert ing.bad == {} and ing.readings == 2
    assert [r.split(" ")[1] for _, r in ing.take_lines()] == ["flow_lpm=120.0", "flow_lpm=121.0"]


def test_a_backslash_pair_in_a_tag_is_two_backslashes_and_a_quote_in_a_tag_is_a_character():
    ing = ingest()
    ing.handle_batch([("lp/s/u", b'coolant,loop=tcs,unit=cdu\\\\1,point=a"b flow_lpm=1\n')])
    assert ing.bad == {}
    state = ing.state.sensors(ing.clock.monotonic())
    assert [(v.key.unit, v.key.point) for v in state] == [("cdu\\\\1", 'a"b')]


def test_bytes_that_are_not_utf8_cost_only_their_entry():
    ing = ingest()
    ing.handle_batch([("lp/s/u", GOOD_LINE.encode() + b"\ncoolant,loop=tcs,unit=\xff flow_lpm=1\n"
                      + b"# a comment \xfe is never read\ncoolant flow_lpm=2\n")])
    assert ing.readings == 2 and ing.bad == {"bad_line_protocol": 1}


def test_crlf_line_ends_and_comments_and_blank_lines():
    ing = ingest()
    body = b"# from telegraf\r\n\r\n  coolant supply_temp_c=31 1767225600000000000\r\ncoolant flow_lpm=150   \r\n"
    ing.handle_batch([("lp/s/u", body)])
    assert ing.bad == {} and ing.readings == 2


def test_a_payload_of_only_comments_is_refused_as_empty():
    ing = ingest()
    ing.handle_batch([("lp/s/u", b"# nothing\n\n")])
    assert ing.bad == {"bad_line_protocol": 1}


def test_a_uint_field_is_read_as_a_number_and_a_bool_as_the_wrong_type():
    ing = ingest()
    ing.handle_batch([("lp/s/u", b"coolant pump_speed_pct=80u\ncoolant pump_speed_pct=t\n")])
    assert ing.readings == 1 and ing.bad == {"wrong_type": 1}
    assert ing.take_lines()[0][1].split(" ")[1] == "pump_speed_pct=80.0"


# -- the decoder itself ---------------------------------------------------------------------------------

def test_entries_carry_their_kinds_and_errors_their_position():
    items = list(parse_lines('m,t=a b=t,i=-3i,u=3u,f=.5,s="x\\"y" -5\n\nm f=1,f=2\nm f="a\nb" 7\nbad'))
    first, dup, multi, bad = items
    assert first == ParsedLine("m", {"t": "a"}, {"b": True, "i": -3, "u": 3, "f": 0.5, "s": 'x"y'}, -5, 1)
    assert type(first.fields["u"]) is Uint and type(first.fields["i"]) is int
    assert isinstance(dup, LineProtocolError) and (dup.rule, dup.line, dup.column) == ("duplicate_field", 3, 7)
    assert multi == ParsedLine("m", {}, {"f": "a\nb"}, 7, 4)
    assert isinstance(bad, LineProtocolError) and (bad.rule, bad.line) == ("field", 6)


def test_parse_line_takes_exactly_one_entry():
    assert parse_line("m f=1i 5\n") == ("m", {}, {"f": 1}, 5)
    with pytest.raises(LineProtocolError, match="expected one entry, found 2"):
        parse_line("m f=1\nm f=2")
    with pytest.raises(LineProtocolError, match=r"rule uint_field"):
        parse_line("m f=-1u")


def test_decode_payload_keeps_bytes_that_are_not_utf8_for_the_entry_to_refuse():
    assert decode_payload("ü".encode()) == "ü"
    (err,) = parse_lines(decode_payload(b"m f=\"\xff\""))
    assert isinstance(err, LineProtocolError) and err.rule == "utf8" and err.column == 6


# -- both paths of the decoder agree ----------------------------------------------------------------------

def _outcome(text: str, fast: bool) -> list:
    return [(i.rule, i.line, i.column) if isinstance(i, LineProtocolError) else i
            for i in parse_lines(text, fast=fast)]


PIECES = ["m", "cpu", ",", "=", " ", "  ", '"', "\\", "\n", "\r", "\t", "#", "a", "t", "f", "T", "true", "1", "0",
          "-", ".", "e", "E", "+", "i", "u", "5", "9223372036854775808", "\x00", "\x7f", "\u2028", "\udcff", "é",
          "f=1", "t=v", ",t=v", " f=1", ",g=2i", ' s="x"', " 123", "\\ ", "\\,", "\\=", '\\"', "\\\\", "nan"]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=24).map("".join))
@example("\\ f=1")
@example("m,a=1,a=2 f=1\nm f=1")
@example('m f=1e400,s="a\nb"\nm f=2')
def test_the_fast_expression_and_the_scanner_give_the_same_answer(text):
    assert _outcome(text, fast=True) == _outcome(text, fast=False)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_no_text_makes_the_decoder_raise(text):
    for item in parse_lines(text):
        assert isinstance(item, (ParsedLine, LineProtocolError))
