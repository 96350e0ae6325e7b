"""InfluxDB line protocol: the one wire format of the store and the forwarder.

Why hand-written instead of ``influxdb_client.Point``:

* speed: ``encode`` runs for every sample of every tick (8 GPUs x 10 Hz plus coolant, events and
  self-telemetry). ``Point.to_line_protocol`` re-escapes every key and value on every call and
  builds intermediate objects; here escaped names are memoised (tag values such as host, uuid
  and model are low-cardinality), identifiers without special characters take a fast path, and
  a GPU point with 4 tags and 14 fields encodes in ~8 us on a slow VM core (about 5x faster
  than ``Point``);
* imports: the daemon must not import ``influxdb_client`` (and its dependency tree) when no
  InfluxDB is configured; the local store keeps line protocol either way;
* one naming policy that the servers we ship to actually store the same way (below).

What is guaranteed
------------------

Every line ``encode`` returns is one line (no raw newline), valid UTF-8, free of control
characters outside string values, and is stored by InfluxDB 1.x and by VictoriaMetrics -- never
refused, never skipped as a comment -- under the measurement, tag keys, tag values and field
keys that the mapping below gives, with the exact values. ``tests/test_encoder_servers.py``
writes thousands of points with random hostile names to both servers and reads every one back
(InfluxQL ``/query`` on InfluxDB 1.x, ``/api/v1/export`` on VictoriaMetrics). A name is stored
exactly as given unless it holds a backslash, a control character or a lone surrogate, or is a
measurement starting with ``#``, a field key with ``"``, or the key ``time``; every name of the
DESIGN.md schema is stored as given.

The mapping of names (what a reader sees after the round trip)
--------------------------------------------------------------

Applied to measurements, tag keys, tag values and field keys alike, on the raw name:

1. A lone surrogate (``"\\ud800"``, which ``json.loads`` can produce) is not UTF-8: it becomes
   U+FFFD.
2. A backslash is kept when the next character is ordinary. A backslash that the servers would
   read differently -- the last character of the name, or followed by another backslash, by
   ``,``, ``=``, space, ``"`` or a control character -- is replaced by ``/``. (InfluxDB 1.x keeps
   ``\\\\`` as two backslashes and VictoriaMetrics as one; InfluxDB 1.x drops the backslash of
   ``\\"`` in measurements and field keys and VictoriaMetrics keeps it.) So ``C:\\temp\\`` is
   stored as ``C:\\temp/``, ``\\\\srv\\x`` as ``/\\srv\\x``, ``a\\,b`` as ``a/,b``.
3. LF, CR and TAB become the two characters ``\\n``, ``\\r`` and ``\\t``; the other C0 control
   characters and DEL become ``\\xHH`` (NUL is ``\\x00``). A raw newline would end the line;
   InfluxDB 1.x skips a NUL at the start of the measurement or of the first field key as if it
   were a space; and InfluxDB 1.x echoes names in its error header, which aiohttp cannot read
   when it holds a control character. Every other character (``#``, ``/``, quotes, any Unicode
   letter, symbol or separator) is stored as it is.
4. ``,`` and space (and ``=``, except in a measurement, where InfluxDB 1.x would keep ``\\=``
   literally) are escaped on the wire; both servers unescape them, so they read back as given.

And per kind of name:

* measurement: one that starts with ``#`` is written ``\\#...`` (a line starting with ``#`` is
  a comment to both servers and would be skipped without an error), so ``#x`` is stored as
  ``\\#x``;
* field key: ``"`` becomes ``'`` (VictoriaMetrics reads a ``"`` in a field key as the start of
  a string value and misparses the rest of the line, escaped or not);
* tag key or field key ``time`` becomes ``time_`` (InfluxDB 1.x refuses the point otherwise).

The mapping is not injective: ``a<LF>`` and ``a\\n``, ``a\\`` and ``a/``, ``time`` and ``time_``,
``#x`` and ``\\#x`` are each stored as one name. Across points that only merges series. Within
one point, tag keys (or field keys) that map to one stored name would make InfluxDB 1.x refuse
the line (duplicate tags) or keep one of the values arbitrarily (duplicate fields), so the
encoder writes the first of them -- tags in sorted order of the raw keys, fields in the order
given, after skipping ``None`` and non-finite values -- and drops the others. No real reading
has such names; this is about staying correct (one line, stored, nothing refused) when they
occur.

Values
------

String field values are double-quoted; ``"`` and ``\\`` are escaped with a backslash (both
servers unescape these), LF/CR/TAB become ``\\n``/``\\r``/``\\t`` and lone surrogates U+FFFD;
every other character, other control characters included, is kept. So InfluxDB 1.x stores
``a<LF>b`` as ``a\\nb`` (the same text as the four characters ``a\\nb``). VictoriaMetrics stores
no text: it stores a string field as the number the text spells, else 0.

Other rules: tags are sorted by key (one canonical series key), empty tag keys/values are
omitted, ``None`` fields and non-finite floats are skipped, a point without any remaining
field encodes to ``None``. Integers get the ``i`` suffix (outside int64 they are written as
floats), booleans ``true``/``false``, floats ``repr`` (shortest text that round-trips).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Point", "encode", "escape_measurement", "escape_tag_key", "escape_tag_value", "escape_field_key",
           "escape_key", "escape_string_field"]


@dataclass(slots=True)
class Point:
    """One reading: ``measurement,tags fields ts_ns``."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, float | int | bool | str | None]
    ts_ns: int


# Characters that make a name take the slow path (a leading '#' and the key 'time' are
# checked apart): the separators, quote, backslash, C0 controls and DEL, lone surrogates.
_NAME_SPECIAL = re.compile(r'[,= "\\\x00-\x1f\x7f\ud800-\udfff]')
# A backslash followed by one of these (or by nothing) is read differently by the servers.
_AMBIGUOUS_BACKSLASH = re.compile(r'\\(?=[,= "\\\x00-\x1f\x7f]|\Z)')
# Control characters in names: LF/CR/TAB as \n \r \t, the others as \xHH (never raw: see rule 3).
_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NAME_CONTROL = {**{chr(c): f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}, **_CONTROL}
_SURROGATES = {c: "\ufffd" for c in range(0xD800, 0xE000)}
_NAME_TABLE = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", **_NAME_CONTROL}) | _SURROGATES
# Measurement: '=' is not special there (InfluxDB 1.x would keep a "\=" literally).
_MEAS_TABLE = str.maketrans({",": "\\,", " ": "\\ ", **_NAME_CONTROL}) | _SURROGATES
# Field key: a '"' misleads VictoriaMetrics' field parser, whatever the escaping.
_FIELD_TABLE = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", '"': "'", **_NAME_CONTROL}) | _SURROGATES
_STR_SPECIAL = re.compile(r'["\\\n\r\t\ud800-\udfff]')
_STR_TABLE = str.maketrans({'"': '\\"', "\\": "\\\\", **_CONTROL}) | _SURROGATES
# InfluxDB 1.x refuses a tag key or field key named 'time' (it is the timestamp column).
_RESERVED_KEYS = {"time": "time_"}

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

# Memos of escaped names (low-cardinality in practice), each cleared when it grows past the
# bound. Tag keys and field keys that the mapping changes live apart from those it keeps, so
# the hot path tells "may collide" (needs the duplicate check) from a plain hit at no cost.
_CACHE_MAX = 8192
_meas_cache: dict[str, str] = {}
_value_cache: dict[str, str] = {}
_tag_key_cache: dict[str, str] = {}       # tag keys stored as given
_tag_key_changed: dict[str, str] = {}     # tag keys the mapping changes
_field_key_cache: dict[str, str] = {}     # field key -> key + "=", for keys stored as given
_field_key_changed: dict[str, str] = {}   # field key -> escaped key + "=", for the others


def _escape_name(s: str, table: dict[int, str]) -> str:
    """Rules 1-4 of the module docstring."""
    if not _NAME_SPECIAL.search(s):
        return s
    if "\\" in s:
        s = _AMBIGUOUS_BACKSLASH.sub("/", s)
    return s.translate(table)


def _remember(cache: dict[str, str], key: str, value: str) -> str:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


def escape_tag_value(s: str) -> str:
    """A tag value as written on the wire."""
    out = _value_cache.get(s)
    if out is None:
        out = _remember(_value_cache, s, _escape_name(s, _NAME_TABLE))
    return out


escape_key = escape_tag_value  # the shared base of the three (kept for callers of the old name)


def escape_measurement(s: str) -> str:
    """A measurement as written on the wire (a leading ``#`` is escaped: see the docstring)."""
    out = _meas_cache.get(s)
    if out is None:
        out = _escape_name(s, _MEAS_TABLE)
        if out.startswith("#"):
            out = "\\" + out
        _remember(_meas_cache, s, out)
    return out


def escape_tag_key(s: str) -> str:
    """A tag key as written on the wire (``time`` becomes ``time_``)."""
    out = _tag_key_cache.get(s) or _tag_key_changed.get(s)
    if out is None:
        out = _RESERVED_KEYS.get(s) or _escape_name(s, _NAME_TABLE)
        _remember(_tag_key_cache if out == s else _tag_key_changed, s, out)
    return out


def _field_key_prefix(key: str) -> str:
    """``escape_field_key(key) + '='``, memoised."""
    out = _field_key_cache.get(key) or _field_key_changed.get(key)
    if out is None:
        escaped = _RESERVED_KEYS.get(key) or _escape_name(key, _FIELD_TABLE)
        out = _remember(_field_key_cache if escaped == key else _field_key_changed, key, escaped + "=")
    return out


def escape_field_key(s: str) -> str:
    """A field key as written on the wire (``"`` becomes ``'``, ``time`` becomes ``time_``)."""
    return _field_key_prefix(s)[:-1]


def escape_string_field(s: str) -> str:
    """Quote a string field value."""
    if _STR_SPECIAL.search(s):
        s = s.translate(_STR_TABLE)
    return '"' + s + '"'


def _field_value(v: object) -> str | None:
    t = type(v)
    if t is float:
        if v != v or v in (math.inf, -math.inf):  # NaN / inf: not representable
            return None
        return repr(v)
    if t is int:
        if _INT64_MIN <= v <= _INT64_MAX:  # type: ignore[operator]
            return f"{v}i"
        return repr(float(v))  # type: ignore[arg-type]
    if t is bool:
        return "true" if v else "false"
    if t is str:
        return escape_string_field(v)  # type: ignore[arg-type]
    if v is None:
        return None
    # Subclasses and numpy-like scalars.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return _field_value(int(v))
    if isinstance(v, float):
        return _field_value(float(v))
    if isinstance(v, str):
        return escape_string_field(str(v))
    if hasattr(v, "__index__"):  # numpy integers and the like stay integers
        return _field_value(v.__index__())
    try:
        return _field_value(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"field value {v!r} of type {t.__name__} cannot be written as line protocol") from None


def encode(point: Point) -> str | None:
    """Encode one point as one line of line protocol (no trailing newline).

    Returns ``None`` when no field remains after skipping ``None`` and non-finite values.
    Raises ``ValueError`` for an empty measurement name.
    """
    key_cache = _field_key_cache
    renamed = False  # a key the mapping changed: two keys may now be one (checked below)
    fields: list[str] = []
    append = fields.append
    for key, value in point.fields.items():
        t = type(value)
        if t is float:
            text = f"{value!r}"
            if text[-1] in "nf":  # 'nan', 'inf', '-inf': not representable
                continue
        elif value is None:
            continue
        elif t is int and _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]  # t is int
            text = f"{value}i"
        elif t is bool:
            text = "true" if value else "false"
        else:
            field_text = _field_value(value)
            if field_text is None:
                continue
            text = field_text
        ekey = key_cache.get(key)
        if ekey is None:
            if not key:
                continue
            ekey = _field_key_prefix(key)
            renamed = renamed or key not in key_cache
        append(ekey + text)
    if renamed:
        fields = _unique_fields(point.fields)
    if not fields:
        return None
    meas = _meas_cache.get(point.measurement)
    if meas is None:
        if not point.measurement:
            raise ValueError("line protocol: empty measurement name")
        meas = escape_measurement(point.measurement)
    tags = point.tags
    if tags:
        value_cache = _value_cache
        tag_keys = _tag_key_cache
        renamed = False
        parts = [meas]
        for key in sorted(tags):
            value = tags[key]
            if not key or value is None or value == "":
                continue
            if type(value) is not str:
                value = str(value)
            ekey = tag_keys.get(key)
            if ekey is None:
                ekey = escape_tag_key(key)
                renamed = renamed or key not in tag_keys
            evalue = value_cache.get(value)
            if evalue is None:
                evalue = escape_tag_value(value)
            parts.append(ekey + "=" + evalue)
        if renamed:
            parts = [meas, *_unique_tags(parts[1:])]
        meas = ",".join(parts)
    return f"{meas} {','.join(fields)} {point.ts_ns}"


def _unique_fields(fields: Mapping[str, object]) -> list[str]:
    """The fields of a point whose keys the mapping changed: the first of each stored key only."""
    seen: set[str] = set()
    out = []
    for key, value in fields.items():
        if not key:
            continue
        text = _field_value(value)
        if text is None:
            continue
        prefix = _field_key_prefix(key)
        if prefix not in seen:
            seen.add(prefix)
            out.append(prefix + text)
    return out


def _unique_tags(pairs: list[str]) -> list[str]:
    """``key=value`` pairs (escaped, in sorted order of the raw keys): the first of each key only."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        key = _KEY_OF_PAIR.match(pair).group(0)  # type: ignore[union-attr]
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


# The escaped key of an escaped ``key=value`` pair: up to the first '=' not escaped by a backslash
# (an escaped key never ends in a backslash, rule 2).
_KEY_OF_PAIR = re.compile(r"(?:[^=\\]|\\.)*")
