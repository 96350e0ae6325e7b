"""The coolant payload spec: formats, canonical fields and their physical ranges, units, tags,
the refusal reasons, and the plain values the parser and the state share.

Pure constants and small validators, no parsing: ``agentd.config`` checks a configuration
against them without importing the parser, and the parser (``collectors.coolant_parse``), the
freshness state (``collectors.coolant_state``) and the store encoding all read one table, so a
field added here is known everywhere at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Format = Literal["json", "value", "influx"]

MAX_PAYLOAD_BYTES = 64 * 1024
# MQTT allows 65,535-byte topics; no coolant feed needs more than a few hundred characters, and
# each distinct topic is remembered (the parser's match cache), so longer ones are refused.
MAX_TOPIC_CHARS = 1024
TAGS = ("site", "loop", "unit", "point")
LOOP_ALIASES = {"facility": "facility", "fws": "facility", "primary": "facility",
                "tcs": "tcs", "secondary": "tcs"}
LEAK_WORDS = ("OK", "Warning", "Critical", "Unavailable", "Absent")  # Redfish LeakDetector states
LEAK_BY_LOWER = {w.lower(): w for w in LEAK_WORDS}
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
           "ts_future", "ts_past", "no_match", "bad_tag", "too_many_sensors", "topic_too_long",
           "internal_error")


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


