"""Coolant readings from MQTT payloads: parse, normalise, validate, and judge freshness.

The names callers import, gathered from the modules that do each job (DESIGN.md section 13):

* ``collectors.coolant_spec``: formats, canonical fields, ranges, units, tags, refusal reasons,
  ``Subscription`` / ``Reading`` / ``Rejection``;
* ``collectors.coolant_match``: which subscription a topic belongs to (memo bounded by bytes);
* ``collectors.coolant_parse``: ``CoolantParser``, the ``json`` / ``value`` / ``influx`` formats;
* ``collectors.lineproto_parse``: line protocol to the reference grammar (``parse_line``);
* ``collectors.coolant_state``: ``CoolantState``, freshness, which sensors the node depends on
  (learned: a series is *established* after 3 messages over ``stale_floor``; until then its
  silence or bad quality never degrades a loop) and expiry of silent sensors.

Everything here is pure: no I/O, no MQTT client (``agentd.mqtt`` owns the connection).
"""

from __future__ import annotations

from collectors.coolant_parse import CoolantParser
from collectors.coolant_spec import (
                                     FIELDS,
                                     LEAK_RANK,
                                     LEAK_WORDS,
                                     LOOP_ALIASES,
                                     MAX_PAYLOAD_BYTES,
                                     MAX_TOPIC_CHARS,
                                     NUMERIC_FIELDS,
                                     RANGES,
                                     REASONS,
                                     TAGS,
                                     TIMESTAMP_KEY,
                                     UNITS_BY_FIELD,
                                     Format,
                                     Reading,
                                     Rejection,
                                     Subscription,
                                     check_topic_filter,
                                     normalise_loop,
                                     unit_factor,
)
from collectors.coolant_state import WORST_IS_MAX, CoolantState, FieldAgg, LoopView, SensorStatus, SensorView, SeriesKey
from collectors.lineproto_parse import LineProtocolError, parse_line

__all__ = [
    "FIELDS", "LEAK_RANK", "LEAK_WORDS", "LOOP_ALIASES", "MAX_PAYLOAD_BYTES", "MAX_TOPIC_CHARS", "NUMERIC_FIELDS",
    "RANGES", "REASONS", "TAGS", "TIMESTAMP_KEY", "UNITS_BY_FIELD", "WORST_IS_MAX", "CoolantParser", "CoolantState",
    "FieldAgg", "Format", "LineProtocolError", "LoopView", "Reading", "Rejection", "SensorStatus", "SensorView",
    "SeriesKey", "Subscription", "check_topic_filter", "normalise_loop", "parse_line", "unit_factor",
]
