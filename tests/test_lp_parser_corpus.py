"""The line-protocol parser over our own decode corpus (tests/fixtures/lineproto/cases.json).

The corpus is written from influxdata/line-protocol's grammar, with values by hand; every case
names the grammar rule it exercises, and every invalid case the rule the error must name. The
share of valid cases parsed right and of invalid ones refused is printed (``pytest -s``) and
must be 100 % here; ``bench/lp_parser_corpus.py`` measures the same against the reference
project's corpus when one is at hand.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from collectors.lineproto_parse import LineProtocolError, Uint, decode_payload, parse_lines

CASES = json.loads((Path(__file__).parent / "fixtures" / "lineproto" / "cases.json").read_text(encoding="utf-8"))
KINDS = {bool: "bool", Uint: "uint", int: "int", float: "float", str: "string"}


def payload(case: dict) -> bytes:
    return bytes.fromhex(case["hex"]) if "hex" in case else case["text"].encode("utf-8")


def canonical(item) -> list:
    """An entry in the corpus' own form: [measurement, tags, [[field, kind, value]...], ts]."""
    return [item.measurement, item.tags, [[k, KINDS[type(v)], v] for k, v in item.fields.items()], item.ts]


def same_value(got, want) -> bool:
    if isinstance(want, float):
        return type(got) is float and (got == want) and str(got).startswith("-") == str(want).startswith("-")
    return got == want


def same_entries(got: list, want: list) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g[0] != w[0] or g[1] != w[1] or g[3] != w[3] or len(g[2]) != len(w[2]):
            return False
        if any(gk != wk or gkind != wkind or not same_value(gv, wv)
               for (gk, gkind, gv), (wk, wkind, wv) in zip(g[2], w[2])):
            return False
    return True


def run_case(case: dict) -> str | None:
    """None when the parser answers as the case says, else what went wrong."""
    items = list(parse_lines(decode_payload(payload(case))))
    errors = [i for i in items if isinstance(i, LineProtocolError)]
    if "entries" in case:
        if errors:
            return f"refused: {errors[0]}"
        got = [canonical(i) for i in items]
        return None if same_entries(got, case["entries"]) else f"got {got!r}"
    if not errors:
        return f"accepted: {[canonical(i) for i in items]!r}"
    if errors[0].rule != case["error"]:
        return f"refused, but as {errors[0].rule} ({errors[0]}), not {case['error']}"
    return None


def test_the_corpus_is_ours_and_covers_every_rule():
    cases = CASES["cases"]
    assert len(cases) >= 300 and len({c["id"] for c in cases}) == len(cases)
    valid = Counter(c["rule"] for c in cases if "entries" in c)
    invalid = Counter(c["rule"] for c in cases if "error" in c)
    assert sum(valid.values()) >= 150 and sum(invalid.values()) >= 150
    rules = {"lines", "whitespace", "comment", "measurement", "measurement_escape", "tag_key", "tag_value",
             "key_escape", "duplicate_tag", "field_key", "duplicate_field", "field_value", "bool_field",
             "int_field", "uint_field", "float_field", "string_field", "timestamp", "utf8", "point"}
    assert set(valid) | set(invalid) == rules
    assert all(invalid[r] > 0 for r in rules - {"point"})


def test_every_valid_case_parses_right_and_every_invalid_one_is_refused_naming_its_rule():
    failures = {c["id"]: why for c in CASES["cases"] if (why := run_case(c)) is not None}
    valid = [c for c in CASES["cases"] if "entries" in c]
    invalid = [c for c in CASES["cases"] if "error" in c]
    valid_ok = 100.0 * sum(c["id"] not in failures for c in valid) / len(valid)
    refused = 100.0 * sum(c["id"] not in failures for c in invalid) / len(invalid)
    print(f"\nlineproto corpus: {len(valid)} valid, {valid_ok:.1f} % parsed right; "
          f"{len(invalid)} invalid, {refused:.1f} % refused with the right rule")
    assert failures == {}
