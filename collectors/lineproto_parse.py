"""InfluxDB line protocol decoding, to the reference grammar: text in, entries or located errors out.

Pure (no I/O, no clock). ``collectors.coolant_parse`` uses it for the ``influx`` payload format;
it knows nothing of coolant fields.

The grammar is influxdata/line-protocol's ``line-protocol.ebnf``, with its decoder's meaning
where the grammar says nothing. What that means in practice, and why each point matters:

* an entry ends only at LF (optionally CR LF; a lone CR is allowed at the very end). Other
  Unicode line breaks (``\\v``, ``\\f``, ``\\x1c``-``\\x1e``, ``\\x85``, U+2028/9) are ordinary
  characters or control characters, and a quoted string field may hold a raw LF: splitting on
  ``str.splitlines`` would cut entries in two and read half of one as the next;
* measurement, tag keys, tag values and field keys: a backslash escapes only `` `` and ``,``
  (measurement) or `` ``, ``,`` and ``=`` (keys and tag values); any other backslash is itself,
  so ``a\\\\b`` is the four characters ``a\\\\b``, never ``a\\b``. ``"`` is an ordinary character
  there (only a field *value* is quoted). Control characters (U+0000-U+001F, U+007F) are
  refused, TAB included: the only separators are spaces;
* string field values: ``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t`` are unescaped (as the
  reference decoder does), any other backslash is kept; raw control characters and LF are
  allowed inside the quotes;
* numbers: ``-?digits i`` (int64), ``digits u`` (uint64, no sign), floats
  ``-?(digits[.digits*]|.digits)[e[+-]digits]`` (finite float64). Python's ``int``/``float``
  would also take ``+1``, ``1_0``, non-ASCII digits, ``nan``, ``inf``, ``0x..``: each is refused
  here before conversion, and a value outside its type's range is an error, not a clamp;
* booleans ``t T true True TRUE f F false False FALSE``; the timestamp ``-?digits`` in int64;
* a tag key given twice is an error (the reference reads a series key as a set); a field key
  given twice is an error too (a reading cannot hold two values of one field; the reference
  decoder passes both on and leaves the choice to its caller);
* comments (``#`` first after leading spaces) may hold TAB, as the grammar says (the reference
  decoder refuses it; nothing in a comment is read, so nothing is lost by accepting it).

Two paths, one answer. The fast path is one compiled expression per entry whose possessive
quantifiers never backtrack into a token, so it accepts exactly the grammar's entries; values
are converted and range-checked after the match. Only when it refuses an entry does the slow
path run: a character scanner written from the same grammar, which finds the first violation
and names its rule, line and column (an operator fixing a Telegraf template needs "line 3,
column 17: tag 'loop' has no value", not "bad line"). The scanner is a complete parser itself,
and the tests check that both agree on random input. After an error the rest of its physical
line is skipped and decoding goes on, so one bad line never costs the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

__all__ = ["FieldValue", "LineProtocolError", "ParsedLine", "Uint", "decode_payload", "parse_line",
           "parse_lines"]


class Uint(int):
    """An unsigned (``u``) field value. An ``int`` in every arithmetic way; its own type so a
    caller that cares (a round trip, the conformance corpus) can tell ``3u`` from ``3i``."""

    __slots__ = ()


FieldValue = float | int | bool | str  # int: ``i`` fields; Uint: ``u`` fields


class ParsedLine(NamedTuple):
    """One entry: ``measurement[,tags] fields [timestamp]``, names unescaped."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    ts: int | None  # as written (the caller knows the precision)
    line: int  # 1-based physical line where the entry starts


class LineProtocolError(ValueError):
    """A refused entry: which grammar ``rule`` it broke, where, and what to do about it."""

    def __init__(self, rule: str, line: int, column: int, message: str) -> None:
        super().__init__(f"line {line}, column {column}: {message} (rule {rule})")
        self.rule = rule
        self.line = line
        self.column = column
        self.message = message

    @property
    def detail(self) -> str:
        """The log text: position, message and rule (``str(err)``)."""
        return str(self)


class _Syntax(Exception):
    """Internal: a violation at ``offset`` of the text (turned into a LineProtocolError)."""

    def __init__(self, rule: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.offset = offset
        self.message = message


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
BOOLS = {"t": True, "T": True, "true": True, "True": True, "TRUE": True,
         "f": False, "F": False, "false": False, "False": False, "FALSE": False}

# -- the fast path: the grammar as one expression per entry -----------------------------------

_NP = r"\x00-\x1f\x7f"  # nonprintable_char
# A backslash followed by an escapable character is that character; any other backslash is
# itself (and the character after it is read on its own). The alternation order does this, and
# every name is atomic (possessive or (?>...)): a later failure must never re-read "\ " as a
# lone backslash followed by a separator.
_MEAS_FIRST = rf"(?:[^{_NP} ,\\#]|\\[ ,]|\\)"
_MEAS_REST = rf"(?:[^{_NP} ,\\]++|\\[ ,]|\\)*+"  # runs of plain characters at C speed
_KEY = rf"(?:[^{_NP} ,=\\]++|\\[ ,=]|\\)++"  # tag key, tag value, field key
_STR_BODY = r'(?:[^"\\]++|\\[\s\S])*+'
_FLOAT = r"-?+(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][+-]?+[0-9]++)?+"
_BOOL = r"(?:true|True|TRUE|false|False|FALSE|t|T|f|F)"
_AFTER_VALUE = r"(?=[ ,\r\n]|\Z)"
_VALUE = rf'(?:"{_STR_BODY}"|-?[0-9]++i|[0-9]++u|{_FLOAT}|{_BOOL}){_AFTER_VALUE}'
_FIELD = rf"{_KEY}={_VALUE}"
_EOL = r"(?:\r?\n|\r?\Z)"

_LINE = re.compile(
    rf" *+((?>{_MEAS_FIRST}{_MEAS_REST}))((?:,{_KEY}={_KEY})*+) ++({_FIELD}(?:,{_FIELD})*+)"
    rf"(?: ++(-?[0-9]++))? *+{_EOL}")
# One field of a matched field section, with its value's kind as the group that took part.
_FIELD_G = re.compile(
    rf'({_KEY})=(?:"({_STR_BODY})"|(-?[0-9]++)i|([0-9]++)u|({_FLOAT})|({_BOOL})){_AFTER_VALUE}')
_TAG_G = re.compile(rf",({_KEY})=({_KEY})")
_SKIP = re.compile(rf" *+(?:#(?:[^{_NP}]|\t)*+)?{_EOL}")  # a blank or comment line
_STRING_FIELD, _INT_FIELD, _UINT_FIELD, _FLOAT_FIELD, _BOOL_FIELD = 2, 3, 4, 5, 6

_MEAS_ESC = re.compile(r"\\([ ,])")
_KEY_ESC = re.compile(r"\\([ ,=])")
_STR_ESC = re.compile(r'\\([\\"nrt])')
_STR_UNESC = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)


def _unescape_string(s: str) -> str:
    return _STR_ESC.sub(lambda m: _STR_UNESC[m.group(1)], s) if "\\" in s else s


def _int(text: str, offset: int, key: str) -> int:
    v = int(text)
    if not INT64_MIN <= v <= INT64_MAX:
        raise _Syntax("int_field", offset, f"field {key[:40]!r}: {text[:30]}i is outside the int64 range")
    return v


def _uint(text: str, offset: int, key: str) -> Uint:
    v = int(text)
    if v > UINT64_MAX:
        raise _Syntax("uint_field", offset, f"field {key[:40]!r}: {text[:30]}u is outside the uint64 range")
    return Uint(v)


def _float(text: str, offset: int, key: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise _Syntax("float_field", offset, f"field {key[:40]!r}: {text[:30]} is outside the float64 range")
    return v


def _timestamp(text: str, offset: int) -> int:
    v = int(text)
    if not INT64_MIN <= v <= INT64_MAX:
        raise _Syntax("timestamp", offset, f"timestamp {text[:30]} is outside the int64 range")
    return v


def _from_match(m: re.Match[str], line: int) -> ParsedLine:
    """The entry the fast expression matched, unescaped and range-checked (raises _Syntax).

    The expression has already checked every token's syntax, so a section without a backslash
    or a quote is split on ``,`` and ``=`` directly (the common case, several times faster than
    a second pass of expressions); otherwise the per-token expressions take it apart.
    """
    text = m.string
    meas = m.group(1)
    if "\\" in meas:
        meas = _MEAS_ESC.sub(r"\1", meas)
    tags: dict[str, str] = {}
    t0, t1 = m.span(2)
    if t1 > t0:
        section = text[t0 + 1:t1]
        if "\\" not in section:
            pairs = [pair.partition("=")[::2] for pair in section.split(",")]
            tags = dict(pairs)
            if len(tags) != len(pairs):
                _duplicate_tag(text, t0, t1)
        else:
            _tags_escaped(text, t0, t1, tags)
    fields: dict[str, FieldValue] = {}
    f0, f1 = m.span(3)
    section = text[f0:f1]
    if '"' not in section and "\\" not in section:
        offset = f0
        for item in section.split(","):
            key, _, raw = item.partition("=")
            last = raw[-1]
            if last == "i":
                value: FieldValue = _int(raw[:-1], offset + len(key) + 1, key)
            elif last == "u":
                value = _uint(raw[:-1], offset + len(key) + 1, key)
            else:
                b = BOOLS.get(raw)
                value = _float(raw, offset + len(key) + 1, key) if b is None else b
            if key in fields:
                raise _Syntax("duplicate_field", offset, f"field key {key[:40]!r} is given twice")
            fields[key] = value
            offset += len(item) + 1
    else:
        _fields_general(text, f0, f1, fields)
    ts_text = m.group(4)
    ts = None if ts_text is None else _timestamp(ts_text, m.start(4))
    return ParsedLine(meas, tags, fields, ts, line)


def _duplicate_tag(text: str, t0: int, t1: int) -> None:
    seen: set[str] = set()
    for tm in _TAG_G.finditer(text, t0, t1):
        key = _KEY_ESC.sub(r"\1", tm.group(1))
        if key in seen:
            raise _Syntax("duplicate_tag", tm.start() + 1, f"tag key {key[:40]!r} is given twice")
        seen.add(key)


def _tags_escaped(text: str, t0: int, t1: int, tags: dict[str, str]) -> None:
    for tm in _TAG_G.finditer(text, t0, t1):
        key, value = tm.group(1), tm.group(2)
        if "\\" in key:
            key = _KEY_ESC.sub(r"\1", key)
        if "\\" in value:
            value = _KEY_ESC.sub(r"\1", value)
        if key in tags:
            raise _Syntax("duplicate_tag", tm.start() + 1, f"tag key {key[:40]!r} is given twice")
        tags[key] = value


def _fields_general(text: str, f0: int, f1: int, fields: dict[str, FieldValue]) -> None:
    """Fields with quoted strings or escapes, one expression match per field."""
    for fm in _FIELD_G.finditer(text, f0, f1):
        key = fm.group(1)
        if "\\" in key:
            key = _KEY_ESC.sub(r"\1", key)
        kind = fm.lastindex
        raw = fm.group(kind)  # type: ignore[arg-type]
        if kind == _FLOAT_FIELD:
            value: FieldValue = _float(raw, fm.start(kind), key)
        elif kind == _STRING_FIELD:
            value = _unescape_string(raw)
        elif kind == _INT_FIELD:
            value = _int(raw, fm.start(kind), key)
        elif kind == _BOOL_FIELD:
            value = BOOLS[raw]
        else:
            value = _uint(raw, fm.start(kind), key)  # type: ignore[arg-type]
        if key in fields:
            raise _Syntax("duplicate_field", fm.start(), f"field key {key[:40]!r} is given twice")
        fields[key] = value


# -- the slow path: a scanner that names the rule -----------------------------------------------

_FLOAT_TOKEN = re.compile(_FLOAT)
_INT_TOKEN = re.compile(r"-?[0-9]+")
_UINT_TOKEN = re.compile(r"[0-9]+")
_STR_BODY_RE = re.compile(_STR_BODY)


def _is_control(c: str) -> bool:
    return c < " " or c == "\x7f"


def _take_name(text: str, i: int, stop: str, escapable: str) -> int:
    """End of the name starting at ``i`` (a measurement, key or tag value)."""
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2 if i + 1 < n and text[i + 1] in escapable else 1
            continue
        if c in stop or _is_control(c):
            break
        i += 1
    return i


def _found(text: str, i: int) -> str:
    return "the end of the line" if i >= len(text) or text[i] == "\n" else repr(text[i])


def _token_value(tok: str, offset: int, key: str) -> FieldValue:
    """A non-string field value (``tok`` runs to the next ``,``, space or line end)."""
    if not tok:
        raise _Syntax("field_value", offset, f"field {key!r} has no value")
    c = tok[0]
    if c in "tTfF":
        if tok in BOOLS:
            return BOOLS[tok]
        raise _Syntax("bool_field", offset, f"field {key!r}: {tok[:30]!r} is not a boolean "
                                            "(t, T, true, True, TRUE, f, F, false, False, FALSE)")
    if c in "-0123456789.":
        last = tok[-1]
        if last == "i":
            if _INT_TOKEN.fullmatch(tok, 0, len(tok) - 1) is None:
                raise _Syntax("int_field", offset, f"field {key!r}: {tok[:30]!r} is not an integer "
                                                   "(-?digits then i, for example -3i)")
            return _int(tok[:-1], offset, key)
        if last == "u":
            if _UINT_TOKEN.fullmatch(tok, 0, len(tok) - 1) is None:
                raise _Syntax("uint_field", offset, f"field {key!r}: {tok[:30]!r} is not an unsigned "
                                                    "integer (digits then u, no sign, for example 3u)")
            return _uint(tok[:-1], offset, key)
        if _FLOAT_TOKEN.fullmatch(tok) is None:
            raise _Syntax("float_field", offset, f"field {key!r}: {tok[:30]!r} is not a number "
                                                 "(for example 31.5, -2, 1e-3, .5)")
        return _float(tok, offset, key)
    raise _Syntax("field_value", offset, f"field {key!r}: {tok[:30]!r} is not a value (numbers 1.5 / 3i / "
                                         '3u, booleans t / f, or a "quoted string"; nan, inf, +1 are not)')


def _scan(text: str, pos: int, line: int) -> tuple[ParsedLine, int]:
    """One entry from ``pos`` (not a blank line), character by character.

    Returns the entry and the offset after its line end; raises _Syntax at the first violation.
    """
    n = len(text)
    i = pos
    while i < n and text[i] == " ":
        i += 1
    if i < n and text[i] == "#":
        j = i + 1
        while j < n and (not _is_control(text[j]) or text[j] == "\t"):
            j += 1
        found = repr(text[j]) if j < n else "the end"
        raise _Syntax("comment", j, f"control character {found} in a comment line")
    start = i
    i = _take_name(text, i, " ,", " ,")
    if i == start:
        raise _Syntax("measurement", i, f"expected a measurement name, found {_found(text, i)}")
    meas = _MEAS_ESC.sub(r"\1", text[start:i])
    tags: dict[str, str] = {}
    while i < n and text[i] == ",":
        i += 1
        k0 = i
        i = _take_name(text, i, " ,=", " ,=")
        if i == k0:
            raise _Syntax("tag_key", i, f"expected a tag key after ',', found {_found(text, i)}")
        key = _KEY_ESC.sub(r"\1", text[k0:i])
        if i >= n or text[i] != "=":
            raise _Syntax("tag_key", i, f"expected '=' after tag key {key[:40]!r}, found {_found(text, i)}")
        i += 1
        v0 = i
        i = _take_name(text, i, " ,=", " ,=")
        if i == v0:
            raise _Syntax("tag_value", i, f"tag {key[:40]!r} has no value (found {_found(text, i)})")
        if key in tags:
            raise _Syntax("duplicate_tag", k0, f"tag key {key[:40]!r} is given twice")
        tags[key] = _KEY_ESC.sub(r"\1", text[v0:i])
    if i >= n or text[i] in "\r\n":
        raise _Syntax("field", i, "no fields: an entry is 'measurement[,tag=value...] field=value[,...] "
                                  "[timestamp]'")
    if text[i] != " ":
        c, where = text[i], ("tag_value", "tag value") if tags else ("measurement", "measurement")
        if c == "=":
            raise _Syntax("tag_value", i, "'=' in a tag value must be escaped as \\=")
        raise _Syntax(where[0], i, f"control character {c!r} in the {where[1]} (only a space separates "
                                   "the fields; remove it at the sender)")
    while i < n and text[i] == " ":
        i += 1
    fields: dict[str, FieldValue] = {}
    while True:
        k0 = i
        i = _take_name(text, i, " ,=", " ,=")
        if i == k0:
            raise _Syntax("field_key", i, f"expected a field key, found {_found(text, i)}")
        key = _KEY_ESC.sub(r"\1", text[k0:i])
        if i >= n or text[i] != "=":
            raise _Syntax("field_key", i, f"expected '=' after field key {key[:40]!r}, found {_found(text, i)}")
        i += 1
        if i < n and text[i] == '"':
            body = _STR_BODY_RE.match(text, i + 1)
            end = body.end()  # type: ignore[union-attr]
            if end >= n or text[end] != '"':
                raise _Syntax("string_field", i, f"field {key[:40]!r}: the string has no closing quote")
            value: FieldValue = _unescape_string(text[i + 1:end])
            i = end + 1
        else:
            t0 = i
            while i < n and text[i] not in ", \r\n":
                i += 1
            value = _token_value(text[t0:i], t0, key[:40])
        if key in fields:
            raise _Syntax("duplicate_field", k0, f"field key {key[:40]!r} is given twice")
        fields[key] = value
        if i >= n:
            break
        c = text[i]
        if c == ",":
            i += 1
            continue
        if c in " \r\n":
            break
        raise _Syntax("field_value", i, f"unexpected {c!r} after the value of field {key[:40]!r} "
                                        "(expected ',', a space or the line end)")
    while i < n and text[i] == " ":
        i += 1
    ts = None
    if i < n and text[i] not in "\r\n":
        t0 = i
        while i < n and text[i] not in " \r\n":
            i += 1
        tok = text[t0:i]
        if _INT_TOKEN.fullmatch(tok) is None:
            raise _Syntax("timestamp", t0, f"timestamp {tok[:30]!r} is not an integer (-?digits)")
        ts = _timestamp(tok, t0)
        while i < n and text[i] == " ":
            i += 1
    if i >= n:
        return ParsedLine(meas, tags, fields, ts, line), n
    if text[i] == "\n":
        return ParsedLine(meas, tags, fields, ts, line), i + 1
    if text[i] == "\r" and (i + 1 == n or text[i + 1] == "\n"):
        return ParsedLine(meas, tags, fields, ts, line), min(n, i + 2)
    raise _Syntax("line_end", i, f"unexpected {text[i]!r} after the {'timestamp' if ts is not None else 'fields'}")


# -- entry points ---------------------------------------------------------------------------------

def parse_lines(text: str, *, fast: bool = True) -> Iterator[ParsedLine | LineProtocolError]:
    """Every entry of ``text`` in order, each a ParsedLine or the LineProtocolError that refused
    it; blank and comment lines yield nothing. Never raises for any text.

    ``fast=False`` reads every entry with the scanner alone (the tests compare both paths).

    Characters U+DC80-U+DCFF (bytes that were not UTF-8, decoded with ``surrogateescape`` by
    :func:`decode_payload`) make their entry an error (rule ``utf8``); in a comment they are
    ignored, as the reference decoder ignores a comment's bytes.
    """
    pos, n = 0, len(text)
    line = 1
    count = text.count
    line_match: Callable[[str, int], re.Match[str] | None] = _LINE.match if fast else _no_match
    skip_match = _SKIP.match
    suspect = not text.isascii() and _SURROGATE.search(text) is not None
    while pos < n:
        m = line_match(text, pos)
        try:
            if m is not None:
                end = m.end()
                entry = _from_match(m, line)
            elif (m := skip_match(text, pos)) is not None:
                line += 1
                pos = m.end()
                continue
            else:
                entry, end = _scan(text, pos, line)
                # reached only with fast=False, or if the two paths disagree (the scanner is the
                # more careful reader; the tests check they never do)
            if suspect and (bad := _SURROGATE.search(text, pos, end)) is not None:
                raise _Syntax("utf8", bad.start(), "bytes that are not UTF-8")
            yield entry
        except _Syntax as err:
            yield _error(text, err, pos, line)
            # as the reference decoder: skip to the end of the line the error is on
            nl = text.find("\n", max(err.offset, pos))
            end = n if nl < 0 else nl + 1
        line += count("\n", pos, end)
        pos = end


def _no_match(text: str, pos: int) -> None:
    return None


def _error(text: str, err: _Syntax, entry_pos: int, entry_line: int) -> LineProtocolError:
    """Locate ``err`` (the entry started at ``entry_pos`` on ``entry_line``)."""
    offset = min(err.offset, len(text))
    line = entry_line + text.count("\n", entry_pos, offset)
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return LineProtocolError(err.rule, line, column, err.message)


def decode_payload(payload: bytes) -> str:
    """Payload bytes as text for :func:`parse_lines`: UTF-8, with any byte that is not UTF-8 kept
    as a surrogate so only the entry holding it is refused (not the whole message)."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("utf-8", "surrogateescape")


def parse_line(text: str) -> tuple[str, dict[str, str], dict[str, FieldValue], int | None]:
    """Exactly one entry (a trailing line end allowed) -> ``(measurement, tags, fields, ts)``.

    Raises LineProtocolError when the text is not one valid entry.
    """
    items = list(parse_lines(text))
    if len(items) != 1:
        raise LineProtocolError("lines", 1, 1, f"expected one entry, found {len(items)}")
    item = items[0]
    if isinstance(item, LineProtocolError):
        raise item
    return item.measurement, item.tags, item.fields, item.ts
