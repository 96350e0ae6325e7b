"""Coolant readings from MQTT payloads: parse, normalise, validate, and judge freshness.

Everything here is pure: a payload (bytes), its topic and the current time go in; readings (or
the reason they were refused) come out. No I/O and no MQTT client (``agentd.mqtt`` owns the
connection), so every path runs in unit and property tests without a broker.

Why the parser never raises: one CDU bridge publishing garbage must not stop the readings of the
others, so every refusal is a :class:`Rejection` with a short ``reason`` (the counter name in the
``agent`` measurement) and a ``detail`` for the log that names the topic, the key and what to do.

Formats (DESIGN.md section 6):

* ``json``: a flat object of canonical field names (or sender names mapped by ``field_map``),
  optional ``ts`` and optional tag keys ``site``/``loop``/``unit``/``point``;
* ``value``: one value per topic, ``{"value": 31.4, "timestamp": <epoch ms>, "quality": 1}``
  (NVIDIA DSX / BMS event bus); the field is named by a topic segment through ``field_map``
  (``RackLiquidSupplyTemperature -> supply_temp_c``); a bare JSON scalar is taken as the value;
* ``influx``: InfluxDB line protocol, one reading per line (tags may carry the four tags).

Timestamps may be epoch seconds, ms, us or ns (told apart by magnitude: any date after 1973 is
unambiguous) or an ISO 8601 string; all numeric fields are stored as floats so a sender that
writes ``31`` then ``31.5`` never causes an InfluxDB field-type conflict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, NamedTuple

Format = Literal["json", "value", "influx"]

MAX_PAYLOAD_BYTES = 64 * 1024
TAGS = ("site", "loop", "unit", "point")
LOOP_ALIASES = {"facility": "facility", "fws": "facility", "primary": "facility",
                "tcs": "tcs", "secondary": "tcs"}
LEAK_WORDS = ("OK", "Warning", "Critical", "Unavailable", "Absent")  # Redfish LeakDetector states
_LEAK_BY_LOWER = {w.lower(): w for w in LEAK_WORDS}
LEAK_RANK = {"OK": 0, "Absent": 1, "Unavailable": 1, "Warning": 2, "Critical": 3}

# Canonical numeric fields and the physical range a real sensor can report (after conversion).
# A value outside is a broken sensor or a unit mix-up, never a reading to act on.
RANGES: dict[str, tuple[float, float]] = {
    "supply_temp_c": (-40.0, 150.0),
    "return_temp_c": (-40.0, 150.0),
    "delta_temp_c": (-100.0, 150.0),
    "flow_lpm": (0.0, 100_000.0),
    "supply_pressure_kpa": (-101.325, 5000.0),
    "return_pressure_kpa": (-101.325, 5000.0),
    "delta_pressure_kpa": (-5000.0, 5000.0),
    "pump_speed_pct": (0.0, 100.0),
    "valve_position_pct": (0.0, 100.0),
    "quality": (0.0, 255.0),
}
NUMERIC_FIELDS = tuple(RANGES)
FIELDS = (*NUMERIC_FIELDS, "leak")
TIMESTAMP_KEY = "ts"

# Source units per dimension: name -> (scale, offset) so that canonical = raw * scale + offset.
# Differences (delta_temp_c) take the scale only: a 9 degF rise is 5 degC, not -12.8 degC.
_TEMP_UNITS = {"degc": (1.0, 0.0), "c": (1.0, 0.0), "°c": (1.0, 0.0), "celsius": (1.0, 0.0),
               "degf": (5.0 / 9.0, -32.0 * 5.0 / 9.0), "f": (5.0 / 9.0, -32.0 * 5.0 / 9.0),
               "°f": (5.0 / 9.0, -32.0 * 5.0 / 9.0), "fahrenheit": (5.0 / 9.0, -32.0 * 5.0 / 9.0),
               "k": (1.0, -273.15), "kelvin": (1.0, -273.15)}
_FLOW_UNITS = {"l/min": (1.0, 0.0), "lpm": (1.0, 0.0), "gal/min": (3.785411784, 0.0),
               "gpm": (3.785411784, 0.0), "m3/h": (1000.0 / 60.0, 0.0), "l/s": (60.0, 0.0)}
_PRESSURE_UNITS = {"kpa": (1.0, 0.0), "pa": (0.001, 0.0), "psi": (6.894757293168361, 0.0),
                   "bar": (100.0, 0.0), "mbar": (0.1, 0.0)}
_PCT_UNITS = {"%": (1.0, 0.0), "pct": (1.0, 0.0), "percent": (1.0, 0.0), "fraction": (100.0, 0.0)}
UNITS_BY_FIELD: dict[str, dict[str, tuple[float, float]]] = {
    "supply_temp_c": _TEMP_UNITS, "return_temp_c": _TEMP_UNITS, "delta_temp_c": _TEMP_UNITS,
    "flow_lpm": _FLOW_UNITS,
    "supply_pressure_kpa": _PRESSURE_UNITS, "return_pressure_kpa": _PRESSURE_UNITS,
    "delta_pressure_kpa": _PRESSURE_UNITS,
    "pump_speed_pct": _PCT_UNITS, "valve_position_pct": _PCT_UNITS,
}
_DIFFERENCE_FIELDS = frozenset({"delta_temp_c"})

# Every reason a message (or an influx line) is refused; each is a counter in the agent point.
REASONS = ("too_large", "not_json", "bad_line_protocol", "bad_shape", "wrong_type", "not_finite",
           "out_of_range", "bad_leak_state", "unknown_field", "no_fields", "bad_timestamp",
           "ts_future", "ts_past", "no_match", "bad_tag", "too_many_sensors", "internal_error")


def unit_factor(field_name: str, unit: str) -> tuple[float, float]:
    """(scale, offset) converting ``unit`` into the canonical unit of ``field_name``.

    Raises ValueError naming the accepted units, for config validation.
    """
    table = UNITS_BY_FIELD.get(field_name)
    if table is None:
        raise ValueError(f"{field_name} has no unit to convert (fields with units: {', '.join(UNITS_BY_FIELD)})")
    conv = table.get(unit.strip().lower())
    if conv is None:
        raise ValueError(f"unknown unit {unit!r} for {field_name} (accepted: {', '.join(sorted(table))})")
    scale, offset = conv
    return (scale, 0.0) if field_name in _DIFFERENCE_FIELDS else (scale, offset)


def check_topic_filter(topic: str) -> str:
    """Validate an MQTT topic filter (``+`` a whole level, ``#`` only last); returns it."""
    if not topic or len(topic.encode()) > 65535 or "\x00" in topic:
        raise ValueError("must be a non-empty MQTT topic filter such as 'cooling/+/+/tcs'")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' must be a whole level and the last one (for example 'cooling/#')")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level (for example 'cooling/+/tcs')")
    return topic


def normalise_loop(name: str) -> str | None:
    """The canonical loop name (``facility``/``tcs``) for a sender's spelling, or None."""
    return LOOP_ALIASES.get(name.strip().lower())


@dataclass(slots=True, frozen=True)
class Subscription:
    """One configured input: topic filter, payload format and how to map it (plain values).

    ``topic_tags`` maps a tag to a topic level index (negative counts from the end); ``tags``
    gives fixed tag values; topic segments win over fixed values, payload tags over both.
    ``field_map`` maps sender names (json keys, influx field keys, ``value`` topic segments) to
    canonical fields or ``ts``. ``units`` maps a canonical field to the sender's unit.
    """

    topic: str
    format: Format = "json"
    field_map: Mapping[str, str] = field(default_factory=dict)
    topic_tags: Mapping[str, int] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    field_segment: int = -1
    units: Mapping[str, str] = field(default_factory=dict)
    ignore_fields: frozenset[str] = frozenset()
    stale_after_s: float | None = None

    def __post_init__(self) -> None:
        check_topic_filter(self.topic)
        for name, target in self.field_map.items():
            if target not in FIELDS and target != TIMESTAMP_KEY:
                raise ValueError(f"field_map.{name}: {target!r} is not a coolant field "
                                 f"(one of {', '.join(FIELDS)}, or ts)")
        for tag in (*self.topic_tags, *self.tags):
            if tag not in TAGS:
                raise ValueError(f"unknown tag {tag!r} (tags: {', '.join(TAGS)})")
        for name, unit in self.units.items():
            unit_factor(name, unit)


class Reading(NamedTuple):
    """One normalised reading of one measuring point (canonical names and units)."""

    site: str
    loop: str
    unit: str
    point: str
    fields: dict[str, float | str]
    ts_ns: int | None  # the sender's timestamp, when it sent one
    stale_after_s: float | None = None  # the subscription's fixed stale_after, if any


class Rejection(NamedTuple):
    """A refused message or line: ``reason`` is the counter, ``detail`` the log text."""

    reason: str
    topic: str
    detail: str


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Compiled:
    """A subscription with its filter split and unit conversions resolved once."""

    __slots__ = ("sub", "levels", "multi", "units", "accept")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        levels = sub.topic.split("/")
        self.multi = levels[-1] == "#"
        self.levels = levels[:-1] if self.multi else levels
        self.units = {name: unit_factor(name, unit) for name, unit in sub.units.items()}
        # Names a json object may carry: canonical fields, ts, tags, mapped and ignored names.
        self.accept = frozenset((*FIELDS, TIMESTAMP_KEY, *TAGS, *sub.field_map))

    def matches(self, parts: list[str]) -> bool:
        pattern = self.levels
        if len(parts) < len(pattern) or (not self.multi and len(parts) != len(pattern)):
            return False
        if parts[0].startswith("$") and (not pattern or pattern[0] == "+"):
            return False  # MQTT: wildcards at the first level never match $SYS and the like
        for want, got in zip(pattern, parts):
            if want != "+" and want != got:
                return False
        return True


_MATCH_CACHE_MAX = 4096


class CoolantParser:
    """Turns ``(topic, payload)`` into readings, never raising. Built once from the config."""

    def __init__(self, subscriptions: Sequence[Subscription], *, default_site: str = "default",
                 max_future_s: float = 60.0, max_age_s: float = 3600.0) -> None:
        self._subs = [_Compiled(s) for s in subscriptions]
        self.default_site = default_site
        self.max_future_ns = int(max_future_s * 1e9)
        self.max_age_ns = int(max_age_s * 1e9)
        self._match_cache: dict[str, tuple[_Compiled, list[str]] | None] = {}

    @property
    def subscriptions(self) -> list[Subscription]:
        return [c.sub for c in self._subs]

    def match(self, topic: str) -> tuple[_Compiled, list[str]] | None:
        """The first subscription whose filter matches ``topic`` (memoised), with its levels."""
        hit = self._match_cache.get(topic, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        parts = topic.split("/")
        found = None
        for comp in self._subs:
            if comp.matches(parts):
                found = (comp, parts)
                break
        if len(self._match_cache) >= _MATCH_CACHE_MAX:  # garbage topics must not grow memory
            self._match_cache.clear()
        self._match_cache[topic] = found
        return found

    def parse(self, topic: str, payload: bytes, now_wall_ns: int) -> tuple[list[Reading], list[Rejection]]:
        """Readings in ``payload`` and the rejections (one per refused message or influx line)."""
        try:
            if len(payload) > MAX_PAYLOAD_BYTES:
                return [], [Rejection("too_large", topic, f"payload of {len(payload)} bytes is over the "
                                      f"{MAX_PAYLOAD_BYTES} byte limit; split it per unit or loop")]
            hit = self.match(topic)
            if hit is None:
                return [], [Rejection("no_match", topic, "no coolant.subscriptions entry maps this topic; "
                                      "add one or narrow the subscription filter")]
            comp, parts = hit
            fmt = comp.sub.format
            if fmt == "json":
                return [self._parse_json(comp, parts, payload, now_wall_ns)], []
            if fmt == "value":
                return [self._parse_value(comp, parts, payload, now_wall_ns)], []
            return self._parse_influx(comp, parts, topic, payload, now_wall_ns)
        except _Bad as bad:
            return [], [Rejection(bad.reason, topic, bad.detail)]
        except Exception as exc:  # a parser bug must cost one message, never the subscriber
            return [], [Rejection("internal_error", topic, f"parser error {exc!r}; please report it")]

    # -- formats -----------------------------------------------------------------------------

    def _parse_json(self, comp: _Compiled, parts: list[str], payload: bytes, now_ns: int) -> Reading:
        obj = _load_json(payload)
        if type(obj) is not dict:
            raise _Bad("bad_shape", f"expected a flat JSON object of coolant fields, got {type(obj).__name__}")
        sub = comp.sub
        fmap = sub.field_map
        accept = comp.accept
        fields: dict[str, float | str] = {}
        ts_ns = None
        payload_tags: dict[str, str] | None = None
        for key, raw in obj.items():
            if key not in accept:
                if key in sub.ignore_fields:
                    continue
                raise _Bad("unknown_field", f"unknown field {key!r}; map it with field_map, list it in "
                                            "ignore_fields, or fix the sender")
            name = fmap.get(key, key)
            if raw is None:
                continue
            if name in RANGES or name == "leak":
                _put(fields, comp, name, raw, key)
            elif name == TIMESTAMP_KEY:
                ts_ns = _timestamp_ns(raw, key)
            else:  # a tag in the payload
                if type(raw) is not str:
                    raise _Bad("wrong_type", f"tag {key!r} must be a string, got {type(raw).__name__}")
                if payload_tags is None:
                    payload_tags = {}
                payload_tags[name] = raw
        return self._finish(comp, parts, fields, ts_ns, payload_tags, now_ns)

    def _parse_value(self, comp: _Compiled, parts: list[str], payload: bytes, now_ns: int) -> Reading:
        sub = comp.sub
        try:
            segment = parts[sub.field_segment]
        except IndexError:
            raise _Bad("bad_tag", f"topic has no level {sub.field_segment} to name the field") from None
        name = sub.field_map.get(segment, segment)
        if name not in RANGES and name != "leak":
            raise _Bad("unknown_field", f"topic level {segment!r} names no coolant field; add it to "
                                        "field_map (for example RackLiquidSupplyTemperature = 'supply_temp_c')")
        obj = _load_json(payload)
        ts_ns = None
        fields: dict[str, float | str] = {}
        if type(obj) is dict:
            if "value" not in obj:
                raise _Bad("bad_shape", 'expected {"value": .., "timestamp": <epoch ms>, "quality": 1}')
            for key, raw in obj.items():
                if key == "value":
                    if raw is None:
                        raise _Bad("wrong_type", "value is null")
                    _put(fields, comp, name, raw, "value")
                elif key == "timestamp" or key == TIMESTAMP_KEY:
                    if raw is not None:
                        ts_ns = _timestamp_ns(raw, key)
                elif key == "quality":
                    if raw is not None:
                        _put(fields, comp, "quality", raw, key)
                elif key not in sub.ignore_fields:
                    raise _Bad("unknown_field", f"unknown field {key!r} next to value; list it in ignore_fields "
                                                "or fix the sender")
        elif type(obj) in (int, float, str, bool):
            _put(fields, comp, name, obj, "value")
        else:
            raise _Bad("bad_shape", f'expected {{"value": ..}} or a JSON scalar, got {type(obj).__name__}')
        return self._finish(comp, parts, fields, ts_ns, None, now_ns)

    def _parse_influx(self, comp: _Compiled, parts: list[str], topic: str, payload: bytes,
                      now_ns: int) -> tuple[list[Reading], list[Rejection]]:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("bad_line_protocol", "payload is not UTF-8 text") from None
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise _Bad("bad_line_protocol", "no line protocol lines in the payload")
        for number, line in enumerate(lines, 1):
            try:
                _meas, tags, raw_fields, ts = parse_line(line)
                fields: dict[str, float | str] = {}
                for key, raw in raw_fields.items():
                    name = comp.sub.field_map.get(key, key)
                    if name in RANGES or name == "leak":
                        _put(fields, comp, name, raw, key)
                    elif name == TIMESTAMP_KEY:
                        ts = _timestamp_ns(raw, key)
                    elif key not in comp.sub.ignore_fields:
                        raise _Bad("unknown_field", f"line {number}: unknown field {key!r}; map it with "
                                                    "field_map or list it in ignore_fields")
                ts_ns = _timestamp_ns(ts, "timestamp") if ts is not None else None
                ptags = {k: v for k, v in tags.items() if k in TAGS}
                readings.append(self._finish(comp, parts, fields, ts_ns, ptags, now_ns))
            except _Bad as bad:
                detail = bad.detail if bad.detail.startswith("line ") else f"line {number}: {bad.detail}"
                rejections.append(Rejection(bad.reason, topic, detail))
        return readings, rejections

    # -- common ------------------------------------------------------------------------------

    def _finish(self, comp: _Compiled, parts: list[str], fields: dict[str, float | str],
                ts_ns: int | None, payload_tags: dict[str, str] | None, now_ns: int) -> Reading:
        if not fields or (len(fields) == 1 and "quality" in fields):
            raise _Bad("no_fields", "no coolant reading in the message (nothing but tags, ts or quality)")
        sub = comp.sub
        tags = {"site": sub.tags.get("site", self.default_site), "loop": sub.tags.get("loop", ""),
                "unit": sub.tags.get("unit", ""), "point": sub.tags.get("point", "")}
        for tag, index in sub.topic_tags.items():
            try:
                tags[tag] = parts[index]
            except IndexError:
                raise _Bad("bad_tag", f"topic has no level {index} for tag {tag!r}") from None
        if payload_tags:
            tags.update(payload_tags)
        for tag in ("site", "unit", "point"):
            value = tags[tag]
            if len(value) > 128 or (not value and tag != "point"):
                raise _Bad("bad_tag", f"tag {tag}={value[:40]!r} is empty or longer than 128 characters; "
                                      "set it with tags, topic_tags or the payload")
        loop = normalise_loop(tags["loop"])
        if loop is None:
            raise _Bad("bad_tag", f"loop {tags['loop'][:40]!r} is not facility or tcs; set it with tags, "
                                  "topic_tags or the payload")
        if ts_ns is not None:
            if ts_ns - now_ns > self.max_future_ns:
                raise _Bad("ts_future", f"timestamp {(ts_ns - now_ns) / 1e9:.0f} s ahead of this node's clock "
                                        "(check NTP on the sender and here)")
            if now_ns - ts_ns > self.max_age_ns:
                raise _Bad("ts_past", f"timestamp {(now_ns - ts_ns) / 1e9:.0f} s old (over coolant.max_age); "
                                      "a stale retained message or a sender clock problem")
        if "delta_temp_c" not in fields:
            supply = fields.get("supply_temp_c")
            ret = fields.get("return_temp_c")
            if supply is not None and ret is not None:
                fields["delta_temp_c"] = round(ret - supply, 6)  # type: ignore[operator]
        return Reading(tags["site"], loop, tags["unit"], tags["point"], fields, ts_ns, sub.stale_after_s)


def _load_json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError, oversized ints
        raise _Bad("not_json", f"payload is not JSON ({str(exc)[:80]})") from None


def _put(fields: dict[str, float | str], comp: _Compiled, name: str, raw: object, key: str) -> None:
    """Validate one value of canonical field ``name`` (sender key ``key``) and store it converted."""
    if name == "leak":
        if type(raw) is not str:
            raise _Bad("wrong_type", f"{key}: leak state must be one of {'/'.join(LEAK_WORDS)}, "
                                     f"got {type(raw).__name__}")
        word = _LEAK_BY_LOWER.get(raw.strip().lower())
        if word is None:
            raise _Bad("bad_leak_state", f"{key}: leak state {raw[:40]!r} is not one of {'/'.join(LEAK_WORDS)}")
        fields["leak"] = word
        return
    t = type(raw)
    if t is float:
        value = raw
    elif t is int:
        try:
            value = float(raw)  # type: ignore[arg-type]
        except OverflowError:
            raise _Bad("out_of_range", f"{key}: {str(raw)[:30]}... is not a plausible {name}") from None
    else:
        raise _Bad("wrong_type", f"{key}: expected a number for {name}, got {t.__name__}")
    if value != value or value in (math.inf, -math.inf):  # type: ignore[operator]
        raise _Bad("not_finite", f"{key}: {value} is not a finite number")
    conv = comp.units.get(name)
    if conv is not None:
        value = value * conv[0] + conv[1]  # type: ignore[operator]
    low, high = RANGES[name]
    if not low <= value <= high:  # type: ignore[operator]
        raise _Bad("out_of_range", f"{key}: {value:g} is outside the physical range [{low:g}, {high:g}] of "
                                   f"{name} (broken sensor, or set units for this subscription)")
    fields[name] = value  # type: ignore[assignment]


def _timestamp_ns(raw: object, key: str) -> int:
    """Epoch s/ms/us/ns (by magnitude) or ISO 8601 text -> integer ns."""
    t = type(raw)
    if t is int or t is float:
        if raw != raw or raw in (math.inf, -math.inf):  # type: ignore[operator]
            raise _Bad("bad_timestamp", f"{key}: {raw} is not a timestamp")
        mag = abs(raw)  # type: ignore[arg-type]
        if mag < 1e11:
            scale = 10**9
        elif mag < 1e14:
            scale = 10**6
        elif mag < 1e17:
            scale = 10**3
        elif mag < 1e20:
            scale = 1
        else:
            raise _Bad("bad_timestamp", f"{key}: {str(raw)[:30]} is not an epoch timestamp")
        return int(raw * scale) if t is float else raw * scale  # type: ignore[operator]
    if t is str:
        try:
            dt = datetime.fromisoformat(raw)  # type: ignore[arg-type]
        except ValueError:
            raise _Bad("bad_timestamp", f"{key}: {raw[:40]!r} is not epoch seconds/ms/ns "  # type: ignore[index]
                                        "or ISO 8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        try:
            return int(dt.timestamp() * 1e6) * 1000
        except (OverflowError, OSError, ValueError):
            raise _Bad("bad_timestamp", f"{key}: {raw[:40]!r} is out of range") from None  # type: ignore[index]
    raise _Bad("bad_timestamp", f"{key}: expected epoch ms/ns or ISO 8601, got {t.__name__}")


# -- line protocol ---------------------------------------------------------------------------

def _split_unescaped(text: str, sep: str, *, quotes: bool = False) -> list[str]:
    """Split on ``sep`` not preceded by a backslash (and, with ``quotes``, not inside "...")."""
    out, start, i, n, in_q = [], 0, 0, len(text), False
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quotes and c == '"':
            in_q = not in_q
        elif c == sep and not in_q:
            out.append(text[start:i])
            start = i + 1
        i += 1
    if in_q:
        raise _Bad("bad_line_protocol", "unterminated string field")
    out.append(text[start:])
    return out


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ',= "\\':
            out.append(text[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _lp_value(text: str, key: str) -> float | int | bool | str:
    if not text:
        raise _Bad("bad_line_protocol", f"field {key!r} has no value")
    if text[0] == '"':
        if len(text) < 2 or text[-1] != '"':
            raise _Bad("bad_line_protocol", f"field {key!r}: unterminated string")
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if text in ("t", "T", "true", "True", "TRUE"):
        return True
    if text in ("f", "F", "false", "False", "FALSE"):
        return False
    try:
        if text[-1] in "iu":
            return int(text[:-1])
        return float(text)
    except ValueError:
        raise _Bad("bad_line_protocol", f"field {key!r}: {text[:30]!r} is not a number") from None


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, float | int | bool | str], int | None]:
    """One line of InfluxDB line protocol -> (measurement, tags, fields, ts or None).

    Raises ``_Bad("bad_line_protocol", ...)``; handles escapes and quoted string fields.
    """
    sections = _split_unescaped(line.strip(), " ", quotes=True)
    sections = [s for s in sections if s != ""]
    if len(sections) not in (2, 3):
        raise _Bad("bad_line_protocol", "expected 'measurement[,tags] fields [timestamp]'")
    head = _split_unescaped(sections[0], ",")
    measurement = _unescape(head[0])
    if not measurement:
        raise _Bad("bad_line_protocol", "empty measurement name")
    tags: dict[str, str] = {}
    for pair in head[1:]:
        kv = _split_unescaped(pair, "=")
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise _Bad("bad_line_protocol", f"bad tag {pair[:40]!r}")
        tags[_unescape(kv[0])] = _unescape(kv[1])
    fields: dict[str, float | int | bool | str] = {}
    for pair in _split_unescaped(sections[1], ",", quotes=True):
        kv = _split_unescaped(pair, "=", quotes=True)
        if len(kv) != 2 or not kv[0]:
            raise _Bad("bad_line_protocol", f"bad field {pair[:40]!r}")
        key = _unescape(kv[0])
        fields[key] = _lp_value(kv[1], key)
    ts = None
    if len(sections) == 3:
        try:
            ts = int(sections[2])
        except ValueError:
            raise _Bad("bad_line_protocol", f"timestamp {sections[2][:30]!r} is not an integer") from None
    return measurement, tags, fields, ts


# -- freshness ---------------------------------------------------------------------------------

class SeriesKey(NamedTuple):
    """One measuring point: the four tags of the ``coolant`` measurement."""

    site: str
    loop: str
    unit: str
    point: str

    def __str__(self) -> str:
        return "/".join(p for p in self if p)


SensorStatus = Literal["ok", "stale", "bad_quality", "unavailable"]


@dataclass(slots=True)
class _Sensor:
    value: float | str
    quality: float
    seen_mono: float  # when it was measured, on our monotonic clock (sender age subtracted)
    period_s: float | None = None
    fixed_stale_after_s: float | None = None


@dataclass(slots=True, frozen=True)
class SensorView:
    """One sensor (series + field) as the rules see it: a good value only when ``status == 'ok'``."""

    key: SeriesKey
    field: str
    value: float | str
    quality: float
    age_s: float
    stale_after_s: float
    status: SensorStatus

    @property
    def good(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True, frozen=True)
class FieldAgg:
    """A field across the good sensors of a loop, and how many of its sensors are degraded."""

    min: float | None
    max: float | None
    good: int
    degraded: int


# Which end of a field is the worrying one, for LoopView's headline values.
WORST_IS_MAX = frozenset({"supply_temp_c", "return_temp_c", "delta_temp_c", "supply_pressure_kpa"})


@dataclass(slots=True, frozen=True)
class LoopView:
    """A coolant loop (``facility``/``tcs``) at one instant, worst case over its good sensors.

    ``degraded`` is True when any sensor of the loop is stale, reports quality != 1 or a leak
    detector reports Unavailable; degraded sensors never contribute a value.
    """

    loop: str
    fields: dict[str, FieldAgg]
    leak: str | None  # worst good leak state (Critical > Warning > Unavailable/Absent > OK)
    degraded_sensors: tuple[SensorView, ...]
    series: int

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_sensors)

    def worst(self, name: str) -> float | None:
        """The worrying end of ``name``: max for temperatures and supply pressure, else min."""
        agg = self.fields.get(name)
        if agg is None:
            return None
        return agg.max if name in WORST_IS_MAX else agg.min

    def is_degraded(self, name: str) -> bool:
        """True when a sensor of ``name`` in this loop is degraded (the rule's ``stale`` case)."""
        if name == "leak":
            return any(s.field == "leak" for s in self.degraded_sensors)
        agg = self.fields.get(name)
        return agg is not None and agg.degraded > 0

    @property
    def supply_temp_c(self) -> float | None:
        return self.worst("supply_temp_c")

    @property
    def return_temp_c(self) -> float | None:
        return self.worst("return_temp_c")

    @property
    def delta_temp_c(self) -> float | None:
        return self.worst("delta_temp_c")

    @property
    def flow_lpm(self) -> float | None:
        return self.worst("flow_lpm")


class CoolantState:
    """Latest value of every coolant sensor with its freshness, on an injected monotonic clock.

    A sensor is one field of one series. Its ``stale_after`` is the subscription's fixed value
    when set, else ``max(floor, 3 x observed period)``; until a period has been seen it is
    ``max(floor, initial)``. The period is a smoothed inter-arrival time, so a sensor that
    publishes every 2 s turns stale after 6 s of silence, one that publishes every minute after
    3 minutes. Every method takes ``now_mono`` (seconds, the daemon's monotonic clock).
    """

    def __init__(self, *, stale_floor_s: float = 5.0, stale_initial_s: float = 30.0,
                 max_sensors: int = 10_000) -> None:
        self.stale_floor_s = stale_floor_s
        self.stale_initial_s = stale_initial_s
        self.max_sensors = max_sensors
        self._series: dict[SeriesKey, dict[str, _Sensor]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def update(self, reading: Reading, arrival_mono: float, arrival_wall_ns: int) -> dict[str, float] | None:
        """Take one reading; returns extra fields derived from earlier readings (delta_temp_c
        when the two temperatures arrived in separate messages), or None when the sensor table
        is full (the reading is refused, counted as ``too_many_sensors``)."""
        key = SeriesKey(reading.site, reading.loop, reading.unit, reading.point)
        sensors = self._series.get(key)
        fields = reading.fields
        if sensors is None:
            if self._count + len(fields) > self.max_sensors:
                return None
            sensors = self._series[key] = {}
        seen = arrival_mono
        if reading.ts_ns is not None:
            age_s = (arrival_wall_ns - reading.ts_ns) / 1e9
            if age_s > 0:
                seen = arrival_mono - age_s
        quality = fields.get("quality", 1.0)
        fixed = reading.stale_after_s
        for name, value in fields.items():
            if name == "quality":
                continue
            s = sensors.get(name)
            if s is None:
                if self._count >= self.max_sensors:
                    return None
                sensors[name] = _Sensor(value, quality, seen, None, fixed)  # type: ignore[arg-type]
                self._count += 1
                continue
            dt = seen - s.seen_mono
            if dt <= 0:
                continue  # older than what we hold (replay, reordering): stored, not state
            if dt > 0.001:
                p = s.period_s
                s.period_s = dt if p is None else p + 0.2 * (min(dt, 4.0 * p) - p)
            s.value = value  # type: ignore[assignment]
            s.quality = quality  # type: ignore[assignment]
            s.seen_mono = seen
            s.fixed_stale_after_s = fixed
        if "delta_temp_c" in fields or ("supply_temp_c" not in fields and "return_temp_c" not in fields):
            return {}
        sup, ret = sensors.get("supply_temp_c"), sensors.get("return_temp_c")
        if sup is None or ret is None:
            return {}
        now = arrival_mono
        if self._status(sup, now)[0] != "ok" or self._status(ret, now)[0] != "ok":
            return {}
        delta = round(ret.value - sup.value, 6)  # type: ignore[operator]
        d = sensors.get("delta_temp_c")
        if d is None:
            sensors["delta_temp_c"] = _Sensor(delta, 1.0, seen, None, fixed)
            self._count += 1
        else:
            d.value, d.quality, d.seen_mono, d.fixed_stale_after_s = delta, 1.0, max(seen, d.seen_mono), fixed
        return {"delta_temp_c": delta}

    def stale_after_s(self, s: _Sensor) -> float:
        if s.fixed_stale_after_s is not None:
            return s.fixed_stale_after_s
        if s.period_s is None:
            return max(self.stale_floor_s, self.stale_initial_s)
        return max(self.stale_floor_s, 3.0 * s.period_s)

    def _status(self, s: _Sensor, now_mono: float) -> tuple[SensorStatus, float, float]:
        age = now_mono - s.seen_mono
        limit = self.stale_after_s(s)
        if age > limit:
            return "stale", age, limit
        if s.quality != 1:
            return "bad_quality", age, limit
        if s.value == "Unavailable":
            return "unavailable", age, limit
        return "ok", age, limit

    def sensor(self, key: SeriesKey, name: str, now_mono: float) -> SensorView | None:
        """One sensor's view, or None when it was never seen."""
        s = self._series.get(key, {}).get(name)
        if s is None:
            return None
        status, age, limit = self._status(s, now_mono)
        return SensorView(key, name, s.value, s.quality, age, limit, status)

    def sensors(self, now_mono: float) -> list[SensorView]:
        """Every sensor, sorted by series and field (for the API and the demo view)."""
        out = []
        for key in sorted(self._series):
            for name in sorted(self._series[key]):
                out.append(self.sensor(key, name, now_mono))  # type: ignore[arg-type]
        return out

    def loop(self, loop: str, now_mono: float, *, site: str | None = None, unit: str | None = None) -> LoopView:
        """The worst case over one loop's sensors (optionally one site / unit)."""
        mins: dict[str, float] = {}
        maxs: dict[str, float] = {}
        good: dict[str, int] = {}
        bad: dict[str, int] = {}
        degraded: list[SensorView] = []
        leak: str | None = None
        series = 0
        for key, sensors in self._series.items():
            if key.loop != loop or (site is not None and key.site != site) or (unit is not None and key.unit != unit):
                continue
            series += 1
            for name, s in sensors.items():
                status, age, limit = self._status(s, now_mono)
                if status != "ok":
                    bad[name] = bad.get(name, 0) + 1
                    degraded.append(SensorView(key, name, s.value, s.quality, age, limit, status))
                    continue
                if name == "leak":
                    if leak is None or LEAK_RANK[s.value] > LEAK_RANK[leak]:  # type: ignore[index]
                        leak = s.value  # type: ignore[assignment]
                    continue
                good[name] = good.get(name, 0) + 1
                v = s.value
                if name not in mins or v < mins[name]:  # type: ignore[operator]
                    mins[name] = v  # type: ignore[assignment]
                if name not in maxs or v > maxs[name]:  # type: ignore[operator]
                    maxs[name] = v  # type: ignore[assignment]
        aggs = {name: FieldAgg(mins.get(name), maxs.get(name), good.get(name, 0), bad.get(name, 0))
                for name in (set(good) | set(bad)) if name != "leak"}
        return LoopView(loop, aggs, leak, tuple(degraded), series)

    def loops(self, now_mono: float, *, site: str | None = None) -> dict[str, LoopView]:
        """Every loop seen so far (``facility``, ``tcs``) -> its LoopView."""
        names = sorted({k.loop for k in self._series if site is None or k.site == site})
        return {name: self.loop(name, now_mono, site=site) for name in names}
