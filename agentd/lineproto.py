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
* one escaping policy that the servers we ship to actually read back the same way (below).

Escaping (what a reader sees after the round trip through a real server)
------------------------------------------------------------------------

Measurement: ``,`` and space are escaped with a backslash. Tag keys, tag values and field keys:
``,``, ``=`` and space are escaped with a backslash. All of them read back exactly on InfluxDB
1.x and VictoriaMetrics (``tests/test_forwarder.py`` writes hostile values to both and reads
them back).

Newline, carriage return and tab (anywhere: names, tag values, string field values) never
appear raw: they become the two-character sequences ``\\n``, ``\\r`` and ``\\t``, and every
server reads them back as exactly those two characters (a backslash and a letter). So a tag
value ``"a<LF>b"`` is stored as ``a\\nb``. (A raw newline would end the line on
VictoriaMetrics and on every streaming parser.)

Backslashes in names and tag values: servers disagree. InfluxDB 1.x keeps every backslash
literally (``\\\\`` reads back as two backslashes) and rejects a tag value ending in a
backslash; VictoriaMetrics turns ``\\\\`` into one backslash. The only
backslash that means the same everywhere is a single one followed by an ordinary character.
So a backslash is written as is when the next character is ordinary, and a backslash that
would be ambiguous -- the last character of the name or value, or followed by another
backslash, by ``,``, ``=``, space, or by a newline/CR/tab -- is replaced by ``/``. It can
therefore never escape the separator that follows, no line is ever rejected for it, and every
server reads back the same string: ``C:\\temp\\`` -> ``C:\\temp/``, ``\\\\srv\\x`` ->
``/\\srv\\x``, ``a\\,b`` -> ``a/,b``. Such values do not occur in real telemetry; this is about
staying correct (one line, no split tag, no rejected batch) when they do.

String field values are double-quoted; ``"`` and ``\\`` are escaped with a backslash (both
servers unescape these), newline/CR/tab become ``\\n``/``\\r``/``\\t`` as above. (VictoriaMetrics
does not store string fields as text; it reads them as 0.)

Other rules: tags are sorted by key (one canonical series key), empty tag keys/values are
omitted, ``None`` fields and non-finite floats are skipped, a point without any remaining
field encodes to ``None``. Integers get the ``i`` suffix (outside int64 they are written as
floats), booleans ``true``/``false``, floats ``repr`` (shortest text that round-trips).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Point", "encode", "escape_measurement", "escape_key", "escape_tag_value", "escape_string_field"]


@dataclass(slots=True)
class Point:
    """One reading: ``measurement,tags fields ts_ns``."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, float | int | bool | str | None]
    ts_ns: int


# Characters that make a name take the slow path.
_NAME_SPECIAL = re.compile(r"[,= \\\n\r\t]")
# A backslash followed by one of these (or by nothing) is ambiguous between servers.
_AMBIGUOUS_AFTER = frozenset(",= \\\n\r\t")
_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NAME_TABLE = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", **_CONTROL})
# Measurement: '=' is not special there (InfluxDB 1.x would keep a "\=" literally).
_MEAS_TABLE = str.maketrans({",": "\\,", " ": "\\ ", **_CONTROL})
_STR_SPECIAL = re.compile(r'["\\\n\r\t]')
_STR_TABLE = str.maketrans({'"': '\\"', "\\": "\\\\", **_CONTROL})
_BACKSLASH_RUN = re.compile(r"\\(?=[,= \\\n\r\t]|\Z)")

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

# Memo of escaped names and tag values (low-cardinality in practice); cleared when it grows.
_CACHE_MAX = 8192
_name_cache: dict[str, str] = {}
_meas_cache: dict[str, str] = {}


def _escape_name(s: str, table: dict[int, str]) -> str:
    if not _NAME_SPECIAL.search(s):
        return s
    if "\\" in s:
        # A backslash that is last or precedes a special character (incl. another backslash)
        # becomes '/', so it can neither escape what follows nor be unescaped differently.
        s = _BACKSLASH_RUN.sub("/", s)
    return s.translate(table)


def _memo_escape(cache: dict[str, str], table: dict[int, str], s: str) -> str:
    """``_escape_name`` through a bounded cache: tag values repeat every tick."""
    out = cache.get(s)
    if out is None:
        out = _escape_name(s, table)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[s] = out
    return out


def escape_key(s: str) -> str:
    """Escape a tag key, tag value or field key."""
    return _memo_escape(_name_cache, _NAME_TABLE, s)


escape_tag_value = escape_key


def escape_measurement(s: str) -> str:
    """Escape a measurement name."""
    return _memo_escape(_meas_cache, _MEAS_TABLE, s)


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
    fields = []
    append = fields.append
    for key, value in point.fields.items():
        t = type(value)
        if t is float:
            text = f"{value!r}"
            if text[-1] in "nf":  # 'nan', 'inf', '-inf': not representable
                continue
        elif value is None:
            continue
        elif t is int and _INT64_MIN <= value <= _INT64_MAX:
            text = f"{value}i"
        elif t is bool:
            text = "true" if value else "false"
        else:
            text = _field_value(value)
            if text is None:
                continue
        ekey = key_cache.get(key)
        if ekey is None:
            if not key:
                continue
            ekey = _field_key_prefix(key)
        append(ekey + text)
    if not fields:
        return None
    meas = _meas_cache.get(point.measurement)
    if meas is None:
        if not point.measurement:
            raise ValueError("line protocol: empty measurement name")
        meas = escape_measurement(point.measurement)
    tags = point.tags
    if tags:
        name_cache = _name_cache
        parts = [meas]
        for key in sorted(tags):
            value = tags[key]
            if not key or value is None or value == "":
                continue
            if type(value) is not str:
                value = str(value)
            ekey = name_cache.get(key)
            if ekey is None:
                ekey = escape_key(key)
            evalue = name_cache.get(value)
            if evalue is None:
                evalue = escape_key(value)
            parts.append(ekey + "=" + evalue)
        meas = ",".join(parts)
    return f"{meas} {','.join(fields)} {point.ts_ns}"


_field_key_cache: dict[str, str] = {}


def _field_key_prefix(key: str) -> str:
    """``escape_key(key) + '='``, memoised."""
    if len(_field_key_cache) >= _CACHE_MAX:
        _field_key_cache.clear()
    out = _field_key_cache[key] = escape_key(key) + "="
    return out
