"""Line protocol encoding: unit cases, the documented escaping mapping, and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.lineproto import Point, encode, escape_key, escape_measurement, escape_string_field

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
    i = 0
    while line[i] != " ":
        i += 2 if line[i] == "\\" else 1
    head_parts = _split_unescaped(line[:i], ",")
    measurement = _unescape_name(head_parts[0])
    tags = {}
    for part in head_parts[1:]:
        kv = _split_unescaped(part, "=")
        assert len(kv) == 2, part
        tags[_unescape_name(kv[0])] = _unescape_name(kv[1])
    fields, i = _read_fields(line, i + 1)
    ts = line[i:]
    assert ts.isdigit(), line
    return measurement, tags, fields, int(ts)


# -- the documented mapping (see agentd/lineproto.py) ---------------------------------------

_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def documented_name(s: str) -> str:
    """What a server reads back for a tag key/value, field key or measurement ``s``."""
    out = []
    for i, ch in enumerate(s):
        if ch == "\\":
            nxt = s[i + 1] if i + 1 < len(s) else ""
            out.append("/" if nxt == "" or nxt in ",= \\\n\r\t" else "\\")
        else:
            out.append(_CONTROL.get(ch, ch))
    return "".join(out)


def documented_string(s: str) -> str:
    """What InfluxDB reads back for a string field ``s``."""
    return "".join(_CONTROL.get(ch, ch) for ch in s)


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
    ("x\ny", "x\\ny"),
    ("x\r\ty", "x\\r\\ty"),
    ("a\\\nb", "a/\\nb"),
    ('say "hi"', 'say\\ "hi"'),
    ("Grüße 🔥", "Grüße\\ 🔥"),
])
def test_name_escaping(raw: str, escaped: str) -> None:
    assert escape_key(raw) == escaped
    line = encode(Point("m", {"k": raw}, {"v": 1.0}, 1))
    assert line is not None and "\n" not in line
    assert parse(line)[1] == {"k": documented_name(raw)}


def test_measurement_escaping_keeps_equals() -> None:
    assert escape_measurement("a b,c=d") == "a\\ b\\,c=d"
    line = encode(Point("a b,c=d", {"t": "1"}, {"v": 1.0}, 1))
    assert parse(line)[0] == "a b,c=d"


def test_string_field_escaping() -> None:
    assert escape_string_field('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert escape_string_field("ends with \\") == '"ends with \\\\"'


# -- properties -----------------------------------------------------------------------------

names = st.text(min_size=1, max_size=30)
hostile = st.text(alphabet=st.sampled_from(list(',= \\"\n\r\tab=é🔥')), min_size=1, max_size=12)
name_values = st.one_of(names, hostile)
field_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(max_size=40),
    hostile,
)


@settings(max_examples=400, deadline=None)
@given(measurement=name_values,
       tags=st.dictionaries(name_values, name_values, max_size=5),
       fields=st.dictionaries(name_values, field_values, min_size=1, max_size=6),
       ts=st.integers(min_value=0, max_value=2**62))
def test_any_point_is_one_line_that_reads_back_as_documented(measurement, tags, fields, ts) -> None:
    line = encode(Point(measurement, tags, fields, ts))
    assert line is not None
    assert "\n" not in line and "\r" not in line
    line.encode("utf-8")
    m, got_tags, got_fields, got_ts = parse(line)
    assert m == documented_name(measurement)
    assert got_ts == ts
    # Distinct raw keys can map to one documented key (lossy mapping); compare per mapped key,
    # last writer wins for tags as in a dict.
    want_tags: dict[str, str] = {}
    for k in sorted(tags):
        if tags[k]:
            want_tags[documented_name(k)] = documented_name(tags[k])
    assert got_tags == want_tags
    want_fields: dict[str, object] = {}
    for k, v in fields.items():
        want_fields[documented_name(k)] = documented_string(v) if isinstance(v, str) else v
    assert got_fields == want_fields


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip(v: float) -> None:
    line = encode(Point("m", {}, {"v": v}, 1))
    assert float(parse(line)[2]["v"]) == v
