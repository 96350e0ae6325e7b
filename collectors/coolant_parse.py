"""Coolant MQTT payloads -> readings: the three formats, tags, units and validation, never raising.

Pure: a payload (bytes), its topic and the current time go in; readings (or the reason they
were refused) come out. No I/O and no MQTT client (``agentd.mqtt`` owns the connection), so
every path runs in unit and property tests without a broker.

Why the parser never raises: one CDU bridge publishing garbage must not stop the readings of the
others, so every refusal is a :class:`Rejection` with a short ``reason`` (the counter name in the
``agent`` measurement) and a ``detail`` for the log that names the topic, the key and what to do.

Formats (DESIGN.md section 6; the spec is ``collectors.coolant_spec``):

* ``json``: a flat object of canonical field names (or sender names mapped by ``field_map``),
  optional ``ts`` and optional tag keys ``site``/``loop``/``unit``/``point``;
* ``value``: one value per topic, ``{"value": 31.4, "timestamp": <epoch ms>, "quality": 1}``
  (NVIDIA DSX / BMS event bus); the field is named by a topic segment through ``field_map``
  (``RackLiquidSupplyTemperature -> supply_temp_c``); a bare JSON scalar is taken as the value;
* ``influx``: InfluxDB line protocol, one reading per entry (tags may carry the four tags),
  decoded by ``collectors.lineproto_parse`` to the reference grammar; a refused entry costs
  only itself (``bad_line_protocol``, with its line, column and the grammar rule it broke).

Timestamps may be epoch seconds, ms, us or ns (told apart by magnitude: any date after 1973 is
unambiguous) or an ISO 8601 string; all numeric fields are stored as floats so a sender that
writes ``31`` then ``31.5`` never causes an InfluxDB field-type conflict.

Topics longer than ``MAX_TOPIC_CHARS`` are refused (``topic_too_long``) before anything else:
MQTT allows 65,535 bytes, and no topic is worth remembering at that size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from collectors.coolant_match import CompiledSubscription, Match, TopicMatcher
from collectors.coolant_spec import (
    LEAK_BY_LOWER,
    LEAK_WORDS,
    MAX_PAYLOAD_BYTES,
    MAX_TOPIC_CHARS,
    RANGES,
    TAGS,
    TIMESTAMP_KEY,
    Reading,
    Rejection,
    Subscription,
    normalise_loop,
)
from collectors.lineproto_parse import LineProtocolError, Uint, decode_payload, parse_lines


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class CoolantParser:
    """Turns ``(topic, payload)`` into readings, never raising. Built once from the config."""

    def __init__(self, subscriptions: Sequence[Subscription], *, default_site: str = "default",
                 max_future_s: float = 60.0, max_age_s: float = 3600.0) -> None:
        self.matcher = TopicMatcher(subscriptions)
        self.default_site = default_site
        self.max_future_ns = int(max_future_s * 1e9)
        self.max_age_ns = int(max_age_s * 1e9)

    @property
    def subscriptions(self) -> list[Subscription]:
        return [c.sub for c in self.matcher.compiled]

    def match(self, topic: str) -> Match | None:
        """The first subscription whose filter matches ``topic`` (memoised), with its levels."""
        return self.matcher.match(topic)

    def parse(self, topic: str, payload: bytes, now_wall_ns: int) -> tuple[list[Reading], list[Rejection]]:
        """Readings in ``payload`` and the rejections (one per refused message or influx line)."""
        try:
            if len(payload) > MAX_PAYLOAD_BYTES:
                return [], [Rejection("too_large", topic, f"payload of {len(payload)} bytes is over the "
                                      f"{MAX_PAYLOAD_BYTES} byte limit; split it per unit or loop")]
            if len(topic) > MAX_TOPIC_CHARS:
                return [], [Rejection("topic_too_long", topic, f"topic of {len(topic)} characters is over the "
                                      f"{MAX_TOPIC_CHARS} character limit; shorten the sender's topic layout")]
            hit = self.matcher.match(topic)
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

    def _parse_json(self, comp: CompiledSubscription, parts: list[str], payload: bytes, now_ns: int) -> Reading:
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

    def _parse_value(self, comp: CompiledSubscription, parts: list[str], payload: bytes, now_ns: int) -> Reading:
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

    def _parse_influx(self, comp: CompiledSubscription, parts: list[str], topic: str, payload: bytes,
                      now_ns: int) -> tuple[list[Reading], list[Rejection]]:
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        fmap, ignore = comp.sub.field_map, comp.sub.ignore_fields
        entries = 0
        for entry in parse_lines(decode_payload(payload)):
            entries += 1
            if type(entry) is LineProtocolError:
                rejections.append(Rejection("bad_line_protocol", topic, entry.detail))
                continue
            try:
                ts = entry.ts  # type: ignore[union-attr]
                fields: dict[str, float | str] = {}
                for key, raw in entry.fields.items():  # type: ignore[union-attr]
                    name = fmap.get(key, key)
                    if type(raw) is Uint:
                        raw = int(raw)
                    if name in RANGES or name == "leak":
                        _put(fields, comp, name, raw, key)
                    elif name == TIMESTAMP_KEY:
                        ts = _timestamp_ns(raw, key)
                    elif key not in ignore:
                        raise _Bad("unknown_field", f"unknown field {key!r}; map it with field_map or list it "
                                                    "in ignore_fields")
                ts_ns = _timestamp_ns(ts, "timestamp") if ts is not None else None
                ptags = {k: v for k, v in entry.tags.items() if k in TAGS}  # type: ignore[union-attr]
                readings.append(self._finish(comp, parts, fields, ts_ns, ptags, now_ns))
            except _Bad as bad:
                rejections.append(Rejection(bad.reason, topic, f"line {entry.line}: {bad.detail}"))
        if not entries:
            raise _Bad("bad_line_protocol", "no line protocol entries in the payload (only blank or comment lines)")
        return readings, rejections

    # -- common ------------------------------------------------------------------------------

    def _finish(self, comp: CompiledSubscription, parts: list[str], fields: dict[str, float | str],
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


def _put(fields: dict[str, float | str], comp: CompiledSubscription, name: str, raw: object, key: str) -> None:
    """Validate one value of canonical field ``name`` (sender key ``key``) and store it converted."""
    if name == "leak":
        if type(raw) is not str:
            raise _Bad("wrong_type", f"{key}: leak state must be one of {'/'.join(LEAK_WORDS)}, "
                                     f"got {type(raw).__name__}")
        word = LEAK_BY_LOWER.get(raw.strip().lower())
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
    if value != value or value in (math.inf, -math.inf):
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
        if raw != raw or raw in (math.inf, -math.inf):
            raise _Bad("bad_timestamp", f"{key}: {raw} is not a timestamp")
        mag: float = abs(raw)  # type: ignore[arg-type]
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
            dt = dt.replace(tzinfo=UTC)
        try:
            return int(dt.timestamp() * 1e6) * 1000
        except (OverflowError, OSError, ValueError):
            raise _Bad("bad_timestamp", f"{key}: {raw[:40]!r} is out of range") from None  # type: ignore[index]
    raise _Bad("bad_timestamp", f"{key}: expected epoch ms/ns or ISO 8601, got {t.__name__}")


