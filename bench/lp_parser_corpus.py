"""Line-protocol parser conformance: the share of valid cases parsed right and invalid ones refused.

Runs ``collectors.lineproto_parse`` over a decode corpus, the way the coolant ``influx`` format
reads a payload (``decode_payload`` then ``parse_lines``; one refused entry refuses the case),
and compares every entry: measurement, tags, fields with their kinds (float / int / uint /
bool / string) and values, timestamp.

Corpora:

* ours (the default): ``tests/fixtures/lineproto/cases.json``, written from the grammar; each
  case names the rule it exercises (``tests/test_lp_parser_corpus.py`` runs it in CI);
* the reference decode corpus of influxdata/line-protocol (``lineprotocol/testdata/corpus.json``):
  not shipped with this project (CI has no network and the project carries no copied test
  data); download it yourself to /tmp and pass its path. Its cases carry a precision and a
  default time, applied here as its own harness does.

``--old PATH`` measures a copy of the previous ``collectors/coolant.py`` (its ``parse_line``
over ``str.splitlines``, comments and blank lines skipped, as its ``influx`` reader did).

Usage: ``python bench/lp_parser_corpus.py [CORPUS ...] [--old PATH] [-v]``; one line per corpus:
``corpus=NAME valid=N valid_ok_pct=.. invalid=M invalid_refused_pct=..``; with ``-v`` the cases
that went wrong. ``--speed`` also prints lines per second on a realistic 10-line coolant
payload: the bare decoder, and the coolant ``influx`` format end to end (old beside new).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ROOT / "tests" / "fixtures" / "lineproto" / "cases.json"
PRECISION_NS = {"1ns": 1, "1us": 1_000, "1µs": 1_000, "1ms": 1_000_000, "1s": 1_000_000_000}

# A canonical entry: (measurement, sorted [(tag, value)], [(field, kind, value)], ts or None).
Entry = tuple[str, list[tuple[str, str]], list[tuple[str, str, Any]], Any]
Decoder = Callable[[bytes], list[Entry]]  # raises ValueError when the payload is refused


def _kind(v: object) -> str:
    from collectors.lineproto_parse import Uint

    if type(v) is bool:
        return "bool"
    if type(v) is Uint:
        return "uint"
    if type(v) is int:
        return "int"
    if type(v) is float:
        return "float"
    return "string"


def new_decoder(payload: bytes) -> list[Entry]:
    """collectors.lineproto_parse, as the coolant influx format reads a payload."""
    from collectors.lineproto_parse import LineProtocolError, decode_payload, parse_lines

    out: list[Entry] = []
    for item in parse_lines(decode_payload(payload)):
        if isinstance(item, LineProtocolError):
            raise item
        out.append((item.measurement, sorted(item.tags.items()),
                    [(k, _kind(v), v) for k, v in item.fields.items()], item.ts))
    return out


def old_decoder(path: str) -> Decoder:
    """The previous parser: ``parse_line`` per ``splitlines()`` line (comments, blanks skipped)."""
    spec = importlib.util.spec_from_file_location("old_coolant", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["old_coolant"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]

    def decode(payload: bytes) -> list[Entry]:
        text = payload.decode("utf-8")
        out: list[Entry] = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                meas, tags, fields, ts = mod.parse_line(line)
            except mod._Bad as bad:
                raise ValueError(bad.detail) from None
            # it has one integer kind: count an int as right for either integer kind
            out.append((meas, sorted(tags.items()),
                        [(k, "int?" if type(v) is int else _kind(v), v) for k, v in fields.items()], ts))
        return out

    return decode


def _same(got: list[Entry], want: list[Entry]) -> bool:
    if len(got) != len(want):
        return False
    for (gm, gt, gf, gts), (wm, wt, wf, wts) in zip(got, want):
        if gm != wm or gt != wt or gts != wts or len(gf) != len(wf):
            return False
        for (gk, gkind, gv), (wk, wkind, wv) in zip(gf, wf):
            # kinds first (True == 1 in Python); a float written 1 in the JSON reads back as int
            if gk != wk or not (gkind == wkind or (gkind == "int?" and wkind in ("int", "uint"))):
                return False
            if gv != wv:
                return False
    return True


class Case:
    """One case in canonical form: the payload, and the entries expected (None: refused)."""

    def __init__(self, key: str, payload: bytes, want: list[Entry] | None, rule: str,
                 precision_ns: int = 1, default_ts: int | None = None) -> None:
        self.key, self.payload, self.want, self.rule = key, payload, want, rule
        self.precision_ns, self.default_ts = precision_ns, default_ts


def load_ours(path: Path) -> list[Case]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    cases = []
    for c in doc["cases"]:
        payload = c["text"].encode("utf-8", "surrogateescape") if "text" in c else bytes.fromhex(c["hex"])
        want = None
        if "entries" in c:
            want = [(m, sorted(tags.items()), [tuple(f) for f in fields], ts) for m, tags, fields, ts in c["entries"]]
        cases.append(Case(c["id"], payload, want, c["rule"]))
    return cases


def load_reference(path: Path) -> list[Case]:
    """influxdata/line-protocol's decode corpus (its JSON layout), into canonical cases."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    cases = []
    for key, entry in sorted(doc["decode"].items()):
        inp, out = entry["input"], entry["output"]
        text = inp["text"]
        payload = base64.b64decode(text["binary"]) if isinstance(text, dict) else text.encode("utf-8")
        want = None
        if "result" in out:
            want = []
            for p in out["result"]:
                fields = []
                for f in p["fields"]:
                    (kind, value), = f["value"].items()
                    fields.append((f["key"], kind, value))
                want.append((p["name"], sorted((t["key"], t["value"]) for t in p["tags"]), fields, p["time"]))
        cases.append(Case(key, payload, want, inp.get("implementation", ""),
                          PRECISION_NS[inp["precision"]], inp["defaultTime"]))
    return cases


def _apply_time(entries: list[Entry], case: Case) -> list[Entry]:
    """The reference harness's timestamps: ts x precision (int64, else refused), or the default."""
    if case.default_ts is None:
        return entries
    out = []
    for m, t, f, ts in entries:
        if ts is None:
            ns = case.default_ts // case.precision_ns * case.precision_ns
        else:
            ns = ts * case.precision_ns
            if not -(1 << 63) <= ns < (1 << 63):
                raise ValueError("timestamp out of range at this precision")
        out.append((m, t, f, ns))
    return out


def run(cases: list[Case], decode: Decoder) -> tuple[list[Case], list[Case], list[tuple[Case, str]]]:
    """(valid cases, invalid cases, failures with what went wrong)."""
    valid = [c for c in cases if c.want is not None]
    invalid = [c for c in cases if c.want is None]
    failures: list[tuple[Case, str]] = []
    for c in cases:
        try:
            got = _apply_time(decode(c.payload), c)
        except ValueError as exc:
            if c.want is not None:
                failures.append((c, f"refused: {exc}"))
            continue
        except Exception as exc:
            failures.append((c, f"crashed: {exc!r}"))
            continue
        if c.want is None:
            failures.append((c, f"accepted: {got!r}"[:300]))
        elif not _same(got, c.want):
            failures.append((c, f"wrong: got {got!r} want {c.want!r}"[:400]))
    return valid, invalid, failures


def figures(cases: list[Case], decode: Decoder) -> tuple[float, float, list[tuple[Case, str]]]:
    """(share of valid cases parsed right, share of invalid cases refused, failures)."""
    valid, invalid, failures = run(cases, decode)
    bad = {id(c) for c, _ in failures}
    ok_valid = sum(1 for c in valid if id(c) not in bad)
    ok_invalid = sum(1 for c in invalid if id(c) not in bad)
    return (100.0 * ok_valid / max(1, len(valid)), 100.0 * ok_invalid / max(1, len(invalid)), failures)


SPEED_PAYLOAD = "\n".join(
    f"coolant,site=hall-a,unit=cdu-{u:02d},loop=tcs supply_temp_c=31.{u},return_temp_c=40.2,flow_lpm=152.5,"
    f'leak="OK",pump_speed_pct=80i 1767225600{u:03d}000000' for u in range(10)).encode()
SPEED_NOW_NS = 1_767_225_600_005_000_000


def _rate(fn: Callable[[], object], lines: int, seconds: float = 1.0) -> float:
    """Lines per second through ``fn`` (one call = ``lines`` lines), best of three runs."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for _ in range(50):
                fn()
            n += 50
        best = max(best, n * lines / (time.perf_counter() - start))
    return best


def speed(old_path: str | None) -> list[str]:
    """Lines per second: the bare decoder, and the coolant ``influx`` format end to end
    (``CoolantParser.parse``: decode, map, validate, tags); old beside new when given."""
    from collectors.coolant_parse import CoolantParser
    from collectors.coolant_spec import Subscription
    from collectors.lineproto_parse import decode_payload, parse_lines

    lines = SPEED_PAYLOAD.count(b"\n") + 1
    sub = Subscription("lp/+", "influx", topic_tags={"unit": 1})
    new_parser = CoolantParser([sub])
    assert len(new_parser.parse("lp/x", SPEED_PAYLOAD, SPEED_NOW_NS)[0]) == lines
    decode_s = _rate(lambda: list(parse_lines(decode_payload(SPEED_PAYLOAD))), lines)
    ingest_s = _rate(lambda: new_parser.parse("lp/x", SPEED_PAYLOAD, SPEED_NOW_NS), lines)
    out = [f"parser=new decode_lines_s={decode_s:,.0f} influx_ingest_lines_s={ingest_s:,.0f}"]
    if old_path:
        mod = sys.modules["old_coolant"]

        def old_decode() -> None:
            for line in SPEED_PAYLOAD.decode("utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    mod.parse_line(line)

        old_parser = mod.CoolantParser([mod.Subscription("lp/+", "influx", topic_tags={"unit": 1})])
        assert len(old_parser.parse("lp/x", SPEED_PAYLOAD, SPEED_NOW_NS)[0]) == lines
        decode_s = _rate(old_decode, lines)
        ingest_s = _rate(lambda: old_parser.parse("lp/x", SPEED_PAYLOAD, SPEED_NOW_NS), lines)
        out.append(f"parser=old decode_lines_s={decode_s:,.0f} influx_ingest_lines_s={ingest_s:,.0f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus", nargs="*", type=Path, default=[OURS])
    ap.add_argument("--no-corpus", action="store_true", help="only --speed")
    ap.add_argument("--old", help="path to a copy of the previous collectors/coolant.py")
    ap.add_argument("--speed", action="store_true", help="also print lines parsed per second")
    ap.add_argument("-v", action="store_true", help="list the cases that went wrong")
    args = ap.parse_args()
    decoders: list[tuple[str, Decoder]] = [("new", new_decoder)]
    if args.old:
        decoders.append(("old", old_decoder(args.old)))
    for path in [] if args.no_corpus else args.corpus:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cases = load_reference(path) if "decode" in doc else load_ours(path)
        for name, decode in decoders:
            valid_pct, invalid_pct, failures = figures(cases, decode)
            n_valid = sum(1 for c in cases if c.want is not None)
            print(f"corpus={path.name} parser={name} valid={n_valid} valid_ok_pct={valid_pct:.1f} "
                  f"invalid={len(cases) - n_valid} invalid_refused_pct={invalid_pct:.1f}")
            if args.v:
                for c, why in failures:
                    print(f"  {c.key} [{c.rule}] {c.payload[:120]!r}: {why}")
    if args.speed:
        for line in speed(args.old):
            print(line)


if __name__ == "__main__":
    main()
