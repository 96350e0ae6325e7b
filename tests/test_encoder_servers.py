"""The encoder against the real servers: random hostile names, every point read back.

``agentd/lineproto.py`` promises that every line it emits is stored by InfluxDB 1.x and by
VictoriaMetrics with the names its mapping documents and the exact values. Here 5,000
points with random names made of the characters and words the mapping treats specially go
through the real path (store -> forwarder -> writer -> server) and are read back: on InfluxDB
1.x with InfluxQL ``/query`` (measurement, tags and fields of every series), on VictoriaMetrics
with ``/api/v1/export``. A point that a server refused, skipped (a ``#`` comment), split or
stored under another name fails the test, with the line that caused it.
"""

from __future__ import annotations

import json
import random
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest

from agentd.influx import Forwarder, V1Writer, V2Writer
from agentd.lineproto import Point, encode
from agentd.store import Store
from tests.test_forwarder import drain
from tests.test_lineproto import documented_fields, documented_measurement, documented_tags

pytestmark = pytest.mark.integration

POINTS = 5000
MEASUREMENTS = 400
# Characters and words that the mapping treats specially, and ordinary ones. No 'z', 'i', 'd',
# 'r', 'u', 'n', 'm', 'e' alone: the fixed keys zz_run / zz_id and VictoriaMetrics' __name__
# cannot be produced by accident (whole words such as "time" carry those letters together).
TOKENS = [*',= \\"\n\r\t#/\'_', "a", "b", "é", "🔥", "中", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff",
          "\ud800", "time", "time_", "#"]
WORDS = ["time", "time_", "#x", "\\#x", "a\\", "a/", "a\n", "a\\n", '"', "\\"]


def hostile_name(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(WORDS)
    return "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 6)))


def field_value(rng: random.Random, stored_key: str, *, vm: bool) -> object:
    """A value whose type follows the stored key (one type per field key: InfluxDB 1.x refuses
    a second type for a field). VictoriaMetrics stores no text, and its storage rounds floats
    with many significant digits (its decimal format, not the encoder's doing: 0.0825055496712
    reads back as 0.08250554967119), so its floats are telemetry-like decimals; InfluxDB 1.x
    gets any float64."""
    kind = zlib.crc32(stored_key.encode()) % (3 if vm else 4)
    if kind == 0:
        if vm:
            return rng.randint(-10**9, 10**9) / rng.choice([1, 8, 1000])
        return rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300), -0.5, 0.1])
    if kind == 1:
        return rng.randint(-(2**53), 2**53)
    if kind == 2:
        return rng.random() < 0.5
    return "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 8)))


def hostile_points(seed: int, run: str, t0_ns: int, *, vm: bool) -> list[Point]:
    rng = random.Random(seed)
    # Points share measurements (a few hundred), as series do: one query per measurement reads back.
    measurements = [hostile_name(rng) for _ in range(MEASUREMENTS)]
    points = []
    for i in range(POINTS):
        tags = {hostile_name(rng): hostile_name(rng) for _ in range(rng.randint(0, 3))}
        tags.update({"zz_run": run, "zz_id": str(i)})
        fields: dict[str, object] = {}
        for _ in range(rng.randint(1, 3)):
            key = hostile_name(rng)
            stored = next(iter(documented_fields({key: 0.0})))
            fields[key] = field_value(rng, stored, vm=vm)
        points.append(Point(rng.choice(measurements), tags, fields, t0_ns + i * 1_000_000))
    return points


def want_of(p: Point) -> tuple[str, dict[str, str], dict[str, object]]:
    return documented_measurement(p.measurement), documented_tags(p.tags), documented_fields(p.fields)


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (its scanner unescapes ``\\\\`` and ``\\"``)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def same_value(want: object, got: object) -> bool:
    """InfluxDB 1.x answers JSON, where a float 300.0 reads back as the integer 300."""
    if isinstance(want, (bool, int, str)):
        return type(got) is type(want) and got == want
    return type(got) in (int, float) and float(got) == want


async def test_random_hostile_names_land_as_documented_on_influxdb1(services, influx1_db, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    t0 = (time.time_ns() // 1_000_000) * 1_000_000 - 3600 * 10**9
    points = hostile_points(1, run, t0, vm=False)
    store = Store(tmp_path / "store.sqlite")
    lines = {p.tags["zz_id"]: encode(p) for p in points}
    store.append([(p.ts_ns, lines[p.tags["zz_id"]]) for p in points])  # type: ignore[misc]
    writer = V1Writer(services.influxdb1_url, influx1_db, timeout=30)
    fwd = Forwarder(store, writer, batch_size=500)
    try:
        await drain(fwd, store)
    finally:
        await writer.close()
        store.close()
    assert fwd.quarantined == 0, f"InfluxDB 1.x refused lines: {fwd.last_error}"

    # Per measurement (SHOW MEASUREMENTS gives the stored names), many statements a request:
    # one regex query over all measurements would return the union of every field as columns.
    shown = services.influx1_query("SHOW MEASUREMENTS", influx1_db)["results"][0]["series"][0]["values"]
    statements = [f"SELECT * FROM {quote_ident(name)} WHERE \"zz_run\" = '{run}' GROUP BY *" for (name,) in shown]
    results = []
    for k in range(0, len(statements), 50):
        results += services.influx1_query(";".join(statements[k:k + 50]), influx1_db)["results"]
    got: dict[str, tuple[str, dict[str, str], dict[str, object], int]] = {}
    for result in results:
        for series in result.get("series", []):
            tags = {k: v for k, v in series.get("tags", {}).items() if v != ""}  # other series' keys
            for row in series["values"]:
                values = dict(zip(series["columns"], row, strict=True))
                ts = values.pop("time")
                fields = {k: v for k, v in values.items() if v is not None}
                got[tags["zz_id"]] = (series["name"], tags, fields, ts)
    problems = []
    for p in points:
        ident = p.tags["zz_id"]
        meas, tags, fields = want_of(p)
        if ident not in got:
            problems.append(f"lost: {lines[ident]!r}")
            continue
        g_meas, g_tags, g_fields, g_ts = got[ident]
        if (g_meas, g_tags, g_ts) != (meas, tags, p.ts_ns) or g_fields.keys() != fields.keys() or \
                not all(same_value(v, g_fields[k]) for k, v in fields.items()):
            problems.append(f"{lines[ident]!r}: stored {(g_meas, g_tags, g_fields)!r}, documented {(meas, tags, fields)!r}")
    assert not problems, f"{len(problems)} of {len(points)} points differ:\n" + "\n".join(problems[:20])


def vm_export(vm_url: str, match: str) -> list[dict]:
    """``/api/v1/export``, split on LF only (names may hold U+2028 and friends, which
    ``str.splitlines`` would split on)."""
    urllib.request.urlopen(f"{vm_url}/internal/force_flush", timeout=30).read()
    params = urllib.parse.urlencode([("match[]", match), ("start", "0"), ("end", str(int(time.time()) + 2 * 86400))])
    with urllib.request.urlopen(f"{vm_url}/api/v1/export?{params}", timeout=60) as resp:
        raw = resp.read().decode("utf-8")
    return [json.loads(line) for line in raw.split("\n") if line.strip()]


async def test_random_hostile_names_land_as_documented_on_victoriametrics(services, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    t0 = (time.time_ns() // 1_000_000) * 1_000_000 - 3600 * 10**9
    points = hostile_points(2, run, t0, vm=True)
    store = Store(tmp_path / "store.sqlite")
    lines = {p.tags["zz_id"]: encode(p) for p in points}
    store.append([(p.ts_ns, lines[p.tags["zz_id"]]) for p in points])  # type: ignore[misc]
    writer = V2Writer(services.vm_url, "telemetry", org="site", token="unused", timeout=30)
    fwd = Forwarder(store, writer, batch_size=500)
    try:
        await drain(fwd, store)
    finally:
        await writer.close()
        store.close()
    assert fwd.quarantined == 0, f"VictoriaMetrics refused lines: {fwd.last_error}"

    # Series name = measurement + "_" + field key; tags are labels; one sample per series here.
    want: dict[tuple[str, str], tuple[dict[str, str], float, int]] = {}
    for p in points:
        meas, tags, fields = want_of(p)
        for key, value in fields.items():
            want[(p.tags["zz_id"], f"{meas}_{key}")] = (tags, float(value), p.ts_ns // 1_000_000)  # type: ignore[arg-type]
    got: dict[tuple[str, str], tuple[dict[str, str], list, list]] = {}
    for series in vm_export(services.vm_url, f'{{zz_run="{run}"}}'):
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        labels.pop("db", None)  # the bucket, which VictoriaMetrics may add as a label
        got[(labels.get("zz_id", "?"), name)] = (labels, series["values"], series["timestamps"])
    problems = []
    for (ident, name), (tags, value, ts_ms) in want.items():
        if (ident, name) not in got:
            problems.append(f"lost {name!r}: {lines[ident]!r}")
            continue
        labels, values, stamps = got.pop((ident, name))
        values = [float(v) for v in values]  # VictoriaMetrics writes 7.5e+65 as an integer literal
        if labels != tags or values != [value] or stamps != [ts_ms]:
            problems.append(f"{lines[ident]!r}: stored {(name, labels, values, stamps)!r}, "
                            f"documented {(name, tags, [value], [ts_ms])!r}")
    problems += [f"unexpected series {name!r} {labels!r} {values!r}" for (_, name), (labels, values, _) in got.items()]
    assert not problems, f"{len(problems)} series differ:\n" + "\n".join(problems[:20])
