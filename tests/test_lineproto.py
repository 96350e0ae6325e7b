"""Line protocol encoding: unit cases, the documented escaping mapping, and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.lineproto import (
    Point, encode, escape_field_key, escape_measurement, escape_string_field, escape_tag_key, escape_tag_value,
)

TS = 1_795_889_070_153_729_717


# -- a small reader -------------------------------------------------------------------------
#
# It reads a line the way both real servers do for what the encoder emits: a backslash
# followed by ',', '=' or ' ' is that character; any other backslash is literal (the encoder
# never emits two backslashes in a row in a name, so InfluxDB 1.x and VictoriaMetrics agree).
# String fields: '\"' and '\\' are unescaped, anything else is literal.

def _split_unescaped(s: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape_name(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in ",= ":
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _read_fields(s: str, i: int) -> tuple[dict[str, object], int]:
    """Parse ``k=v,k=v`` from ``s[i:]`` up to the unescaped space before the timestamp."""
    fields: dict[str, object] = {}
    while True:
        key = []
        while s[i] != "=":
            if s[i] == "\\" and i + 1 < len(s):
                key.append(s[i:i + 2])
                i += 2
            else:
                assert s[i] not in ", ", s
                key.append(s[i])
                i += 1
        i += 1
        name = _unescape_name("".join(key))
        assert name not in fields, f"duplicate field {name!r}"
        assert '"' not in name, f"VictoriaMetrics misreads a quote in a field key: {name!r}"
        if s[i] == '"':
            i += 1
            out = []
            while s[i] != '"':
                if s[i] == "\\" and s[i + 1] in '"\\':
                    out.append(s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            i += 1
            fields[name] = "".join(out)
        else:
            j = i
            while s[j] not in ", ":
                j += 1
            raw, i = s[i:j], j
            if raw in ("true", "false"):
                fields[name] = raw == "true"
            elif raw.endswith("i"):
                fields[name] = int(raw[:-1])
            else:
                fields[name] = float(raw)
        if s[i] == " ":
            return fields, i + 1
        assert s[i] == ","
        i += 1


def parse(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """Read one line as the servers do; fail where one of them would refuse or skip it."""
    assert not line.startswith("#"), f"a comment to every server: {line!r}"
    assert "\n" not in line and "\r" not in line, line
    line.encode("utf-8")  # no lone surrogate
    i = 0
    while line[i] != " ":
        i += 2 if line[i] == "\\" else 1
    head_parts = _split_unescaped(line[:i], ",")
    measurement = _unescape_name(head_parts[0])
    tags = {}
    for part in head_parts[1:]:
        kv = _split_unescaped(part, "=")
        assert len(kv) == 2, part
        key = _unescape_name(kv[0])
        assert key not in tags, f"duplicate tag {key!r}: InfluxDB 1.x refuses the line: {line!r}"
        tags[key] = _unescape_name(kv[1])
    fields, i = _read_fields(line, i + 1)
    assert "time" not in tags and "time" not in fields, f"InfluxDB 1.x refuses a 'time' key: {line!r}"
    names = [measurement, *tags, *tags.values(), *fields]
    assert not any(ch in _C0_DEL for name in names for ch in name), f"a raw control character in a name: {line!r}"
    ts = line[i:]
    assert ts.isdigit(), line
    return measurement, tags, fields, int(ts)


# -- the documented mapping (see agentd/lineproto.py) ---------------------------------------

_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_C0_DEL = frozenset(chr(c) for c in (*range(0x20), 0x7F))
_AMBIGUOUS_AFTER = frozenset(',= "\\') | _C0_DEL


def _documented(s: str, *, field_key: bool = False) -> str:
    """Rules 1-3 of the mapping (rule 4, the wire escapes, is invisible after the round trip)."""
    out = []
    for i, ch in enumerate(s):
        if ch == "\\":
            nxt = s[i + 1] if i + 1 < len(s) else ""
            out.append("/" if nxt == "" or nxt in _AMBIGUOUS_AFTER else "\\")
        elif "\ud800" <= ch <= "\udfff":
            out.append("\ufffd")
        elif ch == '"' and field_key:
            out.append("'")
        elif ch in _C0_DEL:
            out.append(_CONTROL.get(ch) or f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def documented_tag_value(s: str) -> str:
    """What a server reads back for the tag value ``s``."""
    return _documented(s)


def documented_measurement(s: str) -> str:
    out = _documented(s)
    return "\\" + out if out.startswith("#") else out


def documented_tag_key(s: str) -> str:
    return "time_" if s == "time" else _documented(s)


def documented_field_key(s: str) -> str:
    return "time_" if s == "time" else _documented(s, field_key=True)


def documented_string(s: str) -> str:
    """What InfluxDB reads back for a string field ``s``."""
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else _CONTROL.get(ch, ch) for ch in s)


def documented_tags(tags: dict[str, str]) -> dict[str, str]:
    """The stored tags: sorted raw keys, empty keys/values left out, the first of equal stored keys."""
    out: dict[str, str] = {}
    for k in sorted(tags):
        if k and tags[k]:
            out.setdefault(documented_tag_key(k), documented_tag_value(tags[k]))
    return out


def documented_fields(fields: dict[str, object]) -> dict[str, object]:
    """The stored fields: in order, None and non-finite skipped, the first of equal stored keys."""
    out: dict[str, object] = {}
    for k, v in fields.items():
        if not k or v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        out.setdefault(documented_field_key(k), documented_string(v) if isinstance(v, str) else v)
    return out


# -- unit -----------------------------------------------------------------------------------

def test_gpu_point_encodes_canonically() -> None:
    p = Point("gpu", {"uuid": "GPU-1", "host": "node-01", "gpu": "3", "model": "NVIDIA H100 80GB HBM3"},
              {"power_w": 412.5, "energy_j": 123456789.125, "mem_used_bytes": 81234567890,
               "throttled": False, "limit_set_w": None, "clock_reasons": 0}, TS)
    assert encode(p) == (
        "gpu,gpu=3,host=node-01,model=NVIDIA\\ H100\\ 80GB\\ HBM3,uuid=GPU-1 "
        "power_w=412.5,energy_j=123456789.125,mem_used_bytes=81234567890i,throttled=false,clock_reasons=0i "
        f"{TS}")


def test_tags_sorted_and_empty_values_omitted() -> None:
    p = Point("m", {"b": "2", "a": "1", "c": "", "": "x"}, {"v": 1.0}, 5)
    assert encode(p) == "m,a=1,b=2 v=1.0 5"


def test_no_tags() -> None:
    assert encode(Point("m", {}, {"v": True}, 1)) == "m v=true 1"


def test_none_nan_inf_skipped_and_no_field_gives_none() -> None:
    p = Point("m", {"t": "x"}, {"a": None, "b": math.nan, "c": math.inf, "d": -math.inf, "e": 2.5}, 7)
    assert encode(p) == "m,t=x e=2.5 7"
    assert encode(Point("m", {"t": "x"}, {"a": None, "b": math.nan}, 7)) is None
    assert encode(Point("m", {}, {}, 7)) is None


def test_value_types() -> None:
    p = Point("m", {}, {"f": 0.1, "big": 1e300, "tiny": 5e-324, "neg": -3.0, "i": -42, "b": True,
                        "s": 'say "hi" \\ there', "huge": 2**70}, 1)
    line = encode(p)
    assert line is not None
    _, _, fields, _ = parse(line)
    assert fields == {"f": 0.1, "big": 1e300, "tiny": 5e-324, "neg": -3.0, "i": -42, "b": True,
                      "s": 'say "hi" \\ there', "huge": float(2**70)}
    assert "i=-42i" in line and "b=true" in line and 'huge=1.1805916207174113e+21' in line


def test_int64_bounds_stay_integers() -> None:
    line = encode(Point("m", {}, {"lo": -(2**63), "hi": 2**63 - 1}, 1))
    assert line == f"m lo={-(2**63)}i,hi={2**63 - 1}i 1"


def test_empty_measurement_is_an_error() -> None:
    with pytest.raises(ValueError):
        encode(Point("", {}, {"v": 1}, 1))


@pytest.mark.parametrize("raw, escaped", [
    ("plain", "plain"),
    ("a b", "a\\ b"),
    ("a,b", "a\\,b"),
    ("a=b", "a\\=b"),
    ("C:\\temp", "C:\\temp"),          # a backslash before an ordinary character stays
    ("a\\", "a/"),                       # trailing backslash cannot escape the separator
    ("a\\\\", "a//"),                   # each ambiguous backslash
    ("\\\\srv\\x", "/\\srv\\x"),
    ("a\\,b", "a/\\,b"),                 # backslash before an escaped comma
    ("a\\ b", "a/\\ b"),
    ('a\\"b', 'a/"b'),                   # InfluxDB 1.x drops this backslash in measurements/field keys
    ("x\ny", "x\\ny"),
    ("x\r\ty", "x\\r\\ty"),
    ("a\\\nb", "a/\\nb"),
    ('say "hi"', 'say\\ "hi"'),
    ("Grüße 🔥", "Grüße\\ 🔥"),
    ("bad \ud800 half", "bad\\ \ufffd\\ half"),  # a lone surrogate (json.loads makes them) is not UTF-8
    ("\x00lead", "\\x00lead"),           # InfluxDB 1.x skips a NUL at the start of a line like a space
    ("esc\x1b[31m", "esc\\x1b[31m"),       # no raw control character reaches a server (or its error text)
    ("del\x7f", "del\\x7f"),
    ("a\\\x00", "a/\\x00"),
    ("time", "time"),                    # only as a key is 'time' reserved
    ("#x", "#x"),                        # only at the start of a line is '#' a comment
])
def test_tag_value_escaping(raw: str, escaped: str) -> None:
    assert escape_tag_value(raw) == escaped
    line = encode(Point("m", {"k": raw}, {"v": 1.0}, 1))
    assert line is not None
    assert parse(line)[1] == {"k": documented_tag_value(raw)}


def test_measurement_escaping_keeps_equals() -> None:
    assert escape_measurement("a b,c=d") == "a\\ b\\,c=d"
    line = encode(Point("a b,c=d", {"t": "1"}, {"v": 1.0}, 1))
    assert parse(line)[0] == "a b,c=d"


@pytest.mark.parametrize("raw, stored", [
    ("#cpu", "\\#cpu"),        # a line starting with '#' is a comment: silently lost
    ("#", "\\#"),
    ("##", "\\##"),
    ("a#", "a#"),
    ("#\\", "\\#/"),
    ('a\\"b', 'a/"b'),
    ("time", "time"),          # a measurement may be called time
    ("\x00", "\\x00"),          # InfluxDB 1.x: "missing measurement" for a raw NUL
])
def test_measurement_mapping(raw: str, stored: str) -> None:
    line = encode(Point(raw, {"t": "1"}, {"v": 1.0}, 1))
    assert line is not None and not line.startswith("#")
    assert parse(line)[0] == stored == documented_measurement(raw)


@pytest.mark.parametrize("raw, stored", [
    ('f"k', "f'k"),            # VictoriaMetrics would read the quote as the start of a string
    ('"', "'"),
    ('f\\"k', "f/'k"),
    ("time", "time_"),         # InfluxDB 1.x refuses a field called time
    ("time_", "time_"),
    ("Time", "Time"),
    ("f\\k", "f\\k"),
    ("\x00f", "\\x00f"),         # InfluxDB 1.x skips a NUL before the first field like a space
])
def test_field_key_mapping(raw: str, stored: str) -> None:
    assert escape_field_key(raw) == stored.replace(",", "\\,").replace(" ", "\\ ")
    line = encode(Point("m", {}, {raw: 1.5}, 1))
    assert parse(line)[2] == {stored: 1.5} == {documented_field_key(raw): 1.5}


def test_tag_key_time_is_renamed() -> None:
    assert escape_tag_key("time") == "time_"
    line = encode(Point("m", {"time": "x", "host": "h"}, {"v": 1.0}, 1))
    assert line == "m,host=h,time_=x v=1.0 1"


@pytest.mark.parametrize("tags, stored", [
    ({"a/": "1", "a\\": "2"}, {"a/": "1"}),                  # sorted raw keys: "a/" < "a\\"
    ({"a\\": "2", "a/": "1"}, {"a/": "1"}),
    ({"a\n": "1", "a\\n": "2"}, {"a\\n": "1"}),               # LF sorts before the backslash
    ({"time": "1", "time_": "2"}, {"time_": "1"}),
    ({"time_": "2", "time": "1", "z": "3"}, {"time_": "1", "z": "3"}),
    ({"a/": "", "a\\": "2"}, {"a/": "2"}),                   # an empty value is no tag, so no clash
])
def test_tag_keys_that_map_to_one_name_keep_the_first(tags: dict[str, str], stored: dict[str, str]) -> None:
    line = encode(Point("m", tags, {"v": 1.0}, 1))
    assert parse(line)[1] == stored == documented_tags(tags)  # parse refuses duplicate tags


@pytest.mark.parametrize("fields, stored", [
    ({"a\n": 1.0, "a\\n": 2.0}, {"a\\n": 1.0}),
    ({"a\\n": 2.0, "a\n": 1.0}, {"a\\n": 2.0}),
    ({"time": 1, "time_": 2}, {"time_": 1}),
    ({'f"': True, "f'": False, "g": 3.5}, {"f'": True, "g": 3.5}),
    ({"a\\": None, "a/": 7}, {"a/": 7}),                       # a skipped value takes no name
    ({"a\\": math.nan, "a/": "s"}, {"a/": "s"}),
])
def test_field_keys_that_map_to_one_name_keep_the_first(fields: dict[str, object], stored: dict[str, object]) -> None:
    line = encode(Point("m", {}, fields, 1))
    assert parse(line)[2] == stored == documented_fields(fields)  # parse refuses duplicate fields


def test_string_field_escaping() -> None:
    assert escape_string_field('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert escape_string_field("ends with \\") == '"ends with \\\\"'
    assert escape_string_field("half \udc80") == '"half \ufffd"'


# -- properties -----------------------------------------------------------------------------

names = st.text(min_size=1, max_size=30)
# The characters and words the mapping treats specially, and a few ordinary ones.
hostile = st.lists(st.sampled_from([*',= \\"\n\r\t#/\'', "a", "b", "é", "🔥", "\x00", "\x1b", "\ud800", "\udfff",
                                    "time", "_"]), min_size=1, max_size=10).map("".join)
name_values = st.one_of(names, hostile, st.sampled_from(["time", "time_", "#x", "\\#x", "a\\", "a/", "a\n", "a\\n"]))
field_values = st.one_of(
    st.none(),
    st.floats(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(max_size=40),
    hostile,
)


@settings(max_examples=1000, deadline=None)
@given(measurement=name_values,
       tags=st.dictionaries(name_values, name_values, max_size=6),
       fields=st.dictionaries(name_values, field_values, min_size=1, max_size=8),
       ts=st.integers(min_value=0, max_value=2**62))
def test_any_point_is_one_line_that_reads_back_as_documented(measurement, tags, fields, ts) -> None:
    line = encode(Point(measurement, tags, fields, ts))
    want_fields = documented_fields(fields)
    if not want_fields:
        assert line is None
        return
    assert line is not None
    m, got_tags, got_fields, got_ts = parse(line)  # one line, UTF-8, no comment/duplicate/'time'
    assert m == documented_measurement(measurement)
    assert got_ts == ts
    assert got_tags == documented_tags(tags)
    assert got_fields == want_fields


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip(v: float) -> None:
    line = encode(Point("m", {}, {"v": v}, 1))
    assert float(parse(line)[2]["v"]) == v
