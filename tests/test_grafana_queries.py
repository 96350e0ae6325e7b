"""Every query of every board and alert rule, run against a real InfluxDB 1.x holding what the
real code wrote.

The simulated site of ``tests/grafana_scenario.py`` (two daemons on simulated GPUs and one CDU,
the budget controller, the job ledger; hot facility water, a leak, a lost GPU, an InfluxDB
outage, slow NVML, a node gone) runs for 15 simulated minutes and its stores are shipped by the
real forwarder to the InfluxDB 1.x of ``scripts/services``. Then, with the variables substituted
the way Grafana's InfluxDB datasource does (``$timeFilter``, ``$__interval``, each variable
from its own query, All and a single value):

* every measurement, field and tag a query names must exist (``SHOW MEASUREMENTS`` / ``SHOW
  FIELD KEYS`` / ``SHOW TAG KEYS``: InfluxQL answers an unknown name with an empty result, not
  an error), GROUP BY names must be tags, and every identifier must be double-quoted;
* every panel, annotation and variable query must return rows, every column a non-null value,
  and the columns, tags and names its panel reads (aliases' ``$tag_x``, table overrides,
  annotation field mappings);
* every alert rule is evaluated (its query, reduce and threshold) at chosen moments of the
  scenario and must fire for exactly the series the scenario says.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentd.influx import Forwarder, V1Writer
from agentd.store import Store
from tests.grafana_scenario import SITE, TIMELINE, run_site
from tests.services import Services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
ALERTS = ROOT / "grafana" / "provisioning" / "alerting" / "agentd-alerts.yaml"
SECONDS = 900.0
# Pass 2 narrows every multi-value variable to one value (with data for every panel).
ONE_VALUE = {"domain": "rack-a", "host": "node-a", "gpu": "1", "loop": "tcs", "unit": "cdu-1",
             "rule": "gpu_near_slowdown", "severity": "warning"}
PASSES = (("all", "10s"), ("one", "1m"))

KEYWORDS = {
    "select", "from", "where", "and", "or", "as", "group", "by", "order", "desc", "asc", "limit", "fill",
    "null", "none", "previous", "linear", "time", "show", "tag", "values", "with", "key", "true", "false",
    # functions
    "mean", "last", "first", "min", "max", "count", "sum", "spread", "integral", "top", "difference",
    "non_negative_difference", "moving_average",
}
TOKEN = re.compile(r"""
    (?P<ws>\s+) | (?P<string>'(?:[^'\\]|\\.)*') | (?P<ident>"(?:[^"\\]|\\.)*") |
    (?P<number>\d+(?:\.\d+)?(?:ns|ms|u|s|m|h|d|w)?) | (?P<word>[A-Za-z_][A-Za-z0-9_]*) |
    (?P<op>=~|!~|>=|<=|<>|!=|[=<>()+\-*/,&|^])
""", re.X)


class QueryError(AssertionError):
    """A query that names something that does not exist, or returns what its panel cannot use."""


# -- Grafana's substitutions ---------------------------------------------------------------------

def regex_escape(value: str) -> str:
    """Grafana's influxSpecialRegexEscape: the value as a literal inside ``/.../``."""
    return re.sub(r"([\\/^$.|?*+()\[\]{}])", r"\\\1", value)


def var_value(var: dict[str, Any], chosen: list[str] | None, values: list[str]) -> str:
    """What ``$name`` becomes, as Grafana's InfluxDB datasource interpolates it: All -> the
    variable's allValue, or every value as ``(a|b)``; a multi/All variable's value regex-escaped;
    a single-value variable as it is."""
    if chosen is None:  # All
        if var.get("allValue"):
            return str(var["allValue"])
        chosen = values
    if not var.get("multi") and not var.get("includeAll"):
        return chosen[0].replace("\\", "\\\\").replace("'", "\\'")
    escaped = [regex_escape(v) for v in chosen]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(query: str, scope: dict[str, str], from_ms: int, to_ms: int, interval: str) -> str:
    q = query.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    q = q.replace("$__interval_ms", str(_duration_ms(interval))).replace("$__interval", interval)
    for name in sorted(scope, key=len, reverse=True):
        q = re.sub(r"\$\{" + re.escape(name) + r"\}|\$" + re.escape(name) + r"(?![A-Za-z0-9_])",
                   lambda _m, v=scope[name]: v, q)
    if "$" in q.replace("$tag_", ""):
        left = re.findall(r"\$\{?[A-Za-z_]+", q)
        if left:
            raise QueryError(f"variables not substituted (no such variable on the board?): {left} in {q}")
    return q


def _duration_ms(text: str) -> int:
    n, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return int(n) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[unit]


# -- what a query names ----------------------------------------------------------------------------

@dataclass
class Names:
    measurements: list[str]
    refs: set[str]  # fields or tags
    group_by: set[str]  # must be tags
    field_regexes: list[str]
    with_key: list[str]


def tokens(query: str) -> list[tuple[str, str]]:
    out, pos, prev = [], 0, None
    while pos < len(query):
        if query[pos] == "/" and prev in ("=~", "!~", "(", ","):  # a regex, not a division
            end = pos + 1
            while end < len(query) and query[end] != "/":
                end += 2 if query[end] == "\\" else 1
            if end >= len(query):
                raise QueryError(f"unterminated regex at {pos} in {query}")
            out.append(("regex", query[pos + 1:end]))
            prev, pos = "regex", end + 1
            continue
        m = TOKEN.match(query, pos)
        if m is None:
            raise QueryError(f"cannot read the query at {query[pos:pos + 20]!r}: {query}")
        kind = m.lastgroup or ""
        pos = m.end()
        if kind == "ws":
            continue
        text = m.group()
        out.append((kind, text))
        prev = text if kind in ("op", "word") else kind
    return out


def names(query: str) -> Names:
    """The measurements, field/tag references, GROUP BY names, field regexes and ``WITH KEY``
    names of an InfluxQL query; raises QueryError for an unquoted identifier."""
    toks = tokens(query)
    n = Names([], set(), set(), [], [])
    section = ""
    for i, (kind, text) in enumerate(toks):
        before = toks[i - 1][1].lower() if i else ""
        if kind == "word":
            low = text.lower()
            if low not in KEYWORDS:
                raise QueryError(f"unquoted identifier or unknown keyword {text!r} (write names in double "
                                 f"quotes): {query}")
            if low in ("where", "fill", "order", "limit"):
                section = low
            elif low == "by" and before == "group":
                section = "group"
            continue
        if kind == "regex" and before in ("(", ","):
            n.field_regexes.append(text)
        if kind != "ident":
            continue
        name = json.loads(text)
        if before == "from":
            n.measurements.append(name)
        elif before == "as":
            continue
        elif before == "=" and i >= 2 and toks[i - 2][1].lower() == "key":
            n.with_key.append(name)
        elif section == "group":
            n.group_by.add(name)
        else:
            n.refs.add(name)
    if not n.measurements:
        raise QueryError(f"no FROM \"measurement\": {query}")
    return n


@dataclass
class Schema:
    fields: dict[str, set[str]]
    tags: dict[str, set[str]]

    @classmethod
    def read(cls, services: Services, db: str) -> Schema:
        def column(q: str) -> list[str]:
            doc = services.influx1_query(q, db)
            return [v[0] for s in doc["results"][0].get("series", []) for v in s["values"]]

        measurements = column("SHOW MEASUREMENTS")
        return cls({m: set(column(f'SHOW FIELD KEYS FROM "{m}"')) for m in measurements},
                   {m: set(column(f'SHOW TAG KEYS FROM "{m}"')) for m in measurements})

    def check(self, query: str) -> Names:
        """Every name the query uses exists where it is used; QueryError naming it otherwise."""
        n = names(query)
        for m in n.measurements:
            if m not in self.fields:
                raise QueryError(f"measurement {m!r} does not exist (known: {sorted(self.fields)}): {query}")
        fields = set().union(*(self.fields[m] for m in n.measurements))
        tags = set().union(*(self.tags[m] for m in n.measurements))
        for ref in sorted(n.refs - fields - tags):
            raise QueryError(f"{ref!r} is neither a field nor a tag of {n.measurements}: {query}")
        for ref in sorted(n.group_by - tags):
            raise QueryError(f"GROUP BY {ref!r}: not a tag of {n.measurements}: {query}")
        for key in n.with_key:
            if key not in tags:
                raise QueryError(f"WITH KEY {key!r}: not a tag of {n.measurements}: {query}")
        for rx in n.field_regexes:
            if not any(re.search(rx, f) for f in fields):
                raise QueryError(f"field regex /{rx}/ matches no field of {n.measurements}: {query}")
        return n


# -- running queries -------------------------------------------------------------------------------

@dataclass
class Result:
    series: list[dict[str, Any]]

    @property
    def rows(self) -> int:
        return sum(len(s.get("values", [])) for s in self.series)

    @property
    def columns(self) -> set[str]:
        return {c for s in self.series for c in s["columns"]}

    @property
    def tag_keys(self) -> set[str]:
        return {k for s in self.series for k in (s.get("tags") or {})}


def run_query(services: Services, db: str, query: str) -> Result:
    doc = services.influx1_query(query, db)
    return Result([s for r in doc["results"] for s in r.get("series", [])])


def require_rows(result: Result, query: str, what: str) -> None:
    if not result.rows:
        raise QueryError(f"{what}: no rows: {query}")
    for col in result.columns - {"time"}:
        if all(v[s["columns"].index(col)] is None for s in result.series if col in s["columns"]
               for v in s.get("values", [])):
            raise QueryError(f"{what}: column {col!r} is null in every row (a field that is never written?): {query}")


# -- the site, once per module ---------------------------------------------------------------------

@dataclass
class Site:
    services: Services
    db: str
    schema: Schema
    start_ns: int
    end_ns: int

    @property
    def range_ms(self) -> tuple[int, int]:
        return self.start_ns // 10**6, self.end_ns // 10**6


@pytest.fixture(scope="module")
def site(services: Services, tmp_path_factory: pytest.TempPathFactory):
    db = f"grafana_boards_{uuid.uuid4().hex[:8]}"
    services.influx1_drop_db(db)
    services.influx1_create_db(db)
    tmp = tmp_path_factory.mktemp("site")
    forwarders: dict[str, Forwarder] = {}

    async def ship(name: str, store: Store) -> int:
        fw = forwarders.get(name)
        if fw is None:
            fw = forwarders[name] = Forwarder(store, V1Writer(services.influxdb1_url, db), batch_size=5000)
        sent = await fw.flush(30.0)
        if store.backlog():
            raise AssertionError(f"{name}: the forwarder left {store.backlog()} points: {fw.last_error}")
        return sent

    async def main() -> Any:
        try:
            return await run_site(tmp, seconds=SECONDS, ship=ship)
        finally:
            for fw in forwarders.values():
                await fw.writer.close()

    run = asyncio.run(main())
    run.close()
    assert run.shipped["node-a"] > 10_000 and run.shipped["controller"] > 1000, run.shipped
    yield Site(services, db, Schema.read(services, db), run.start_ns, run.end_ns)
    services.influx1_drop_db(db)


# -- boards ----------------------------------------------------------------------------------------

def board_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p.get("targets")]


def resolve_variables(site: Site, board: dict[str, Any], mode: str, interval: str) -> tuple[dict[str, str], dict]:
    """Each query variable from its own query (in order, chained), as Grafana resolves them."""
    scope: dict[str, str] = {}
    found: dict[str, list[str]] = {}
    lo, hi = site.range_ms
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = interpolate(var["query"], scope, lo, hi, interval)
        site.schema.check(q)
        result = run_query(site.services, site.db, q)
        values = sorted({v[1] for s in result.series for v in s["values"]})
        if not values:
            raise QueryError(f"{board['uid']}: variable {var['name']} has no values: {q}")
        found[var["name"]] = values
        chosen: list[str] | None
        if var.get("includeAll") and mode == "all":
            chosen = None
        elif var.get("includeAll"):
            pick = ONE_VALUE.get(var["name"], values[0])
            assert pick in values, f"{var['name']}: {pick!r} not among {values}"
            chosen = [pick]
        else:
            chosen = [values[0]]
        scope[var["name"]] = var_value(var, chosen, values)
    return scope, found


def check_target(site: Site, panel: dict[str, Any], t: dict[str, Any], query: str, *, rows: bool = True) -> bool:
    """Names exist, rows come back (``rows=False``: an empty answer is allowed) with what the
    panel reads. Returns whether it had rows."""
    what = f"panel {panel['title']!r} query {t['refId']}"
    site.schema.check(query)
    result = run_query(site.services, site.db, query)
    if not rows and not result.rows:
        return False
    require_rows(result, query, what)
    for tag in re.findall(r"\$tag_([A-Za-z0-9_]+)", t.get("alias", "")):
        if tag not in result.tag_keys:
            raise QueryError(f"{what}: alias names tag {tag!r}, not grouped by: {query}")
    if t.get("resultFormat") == "table":
        readable = result.columns | result.tag_keys | {"Time"}
        for o in panel["fieldConfig"]["overrides"]:
            if o["matcher"]["id"] == "byName" and o["matcher"]["options"] not in readable:
                raise QueryError(f"{what}: override for column {o['matcher']['options']!r}, which the query "
                                 f"does not return ({sorted(readable)}): {query}")
        for s in panel.get("options", {}).get("sortBy", []):
            if s["displayName"] not in readable:
                raise QueryError(f"{what}: sorted by {s['displayName']!r}, not a column: {query}")
    return True


@pytest.mark.parametrize("mode,interval", PASSES)
@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_every_board_query_returns_rows_with_the_columns_its_panel_reads(site: Site, path: Path, mode: str,
                                                                        interval: str) -> None:
    board = json.loads(path.read_text())
    scope, found = resolve_variables(site, board, mode, interval)
    lo, hi = site.range_ms
    checked = 0
    for panel in board_panels(board):
        local = dict(scope)
        if panel.get("repeat"):  # one copy per value: check the first (All) or the chosen one
            name = panel["repeat"]
            var = next(v for v in board["templating"]["list"] if v["name"] == name)
            pick = found[name][0] if mode == "all" else ONE_VALUE.get(name, found[name][0])
            local[name] = var_value(var, [pick], found[name])
        # All: every query of the panel has rows. One value: a narrowed query may be empty (the
        # valve is on the facility loop, the pump on the TCS one), the panel as a whole may not.
        had = [check_target(site, panel, t, interpolate(t["query"], local, lo, hi, interval), rows=mode == "all")
               for t in panel["targets"]]
        assert any(had), f"panel {panel['title']!r}: no query returns rows with {local}"
        checked += len(had)
    for anno in board["annotations"]["list"]:
        if anno.get("builtIn"):
            continue
        q = interpolate(anno["query"], scope, lo, hi, interval)
        assert anno["target"]["query"] == anno["query"]
        site.schema.check(q)
        result = run_query(site.services, site.db, q)
        require_rows(result, q, f"annotation {anno['name']!r}")
        wanted = {anno["textColumn"], anno["titleColumn"], *anno["tagsColumn"].split(",")}
        missing = wanted - result.columns
        assert not missing, f"annotation {anno['name']!r} maps columns {missing} the query does not return: {q}"
        checked += 1
    assert checked >= 8


# -- the checker catches what it is for ------------------------------------------------------------

@pytest.mark.parametrize("query,error", [
    ('SELECT mean("power_w") FROM "gpus" WHERE $timeFilter', "measurement 'gpus' does not exist"),
    ('SELECT mean("power_watts") FROM "gpu" WHERE $timeFilter', "'power_watts' is neither a field nor a tag"),
    ('SELECT mean("power_w") FROM "gpu" WHERE $timeFilter AND "hostname" = \'x\'', "'hostname' is neither"),
    ('SELECT mean("power_w") FROM "gpu" WHERE $timeFilter GROUP BY "temp_c"', "GROUP BY 'temp_c': not a tag"),
    ('SELECT mean(power_w) FROM "gpu" WHERE $timeFilter', "unquoted identifier or unknown keyword 'power_w'"),
    ('SHOW TAG VALUES FROM "gpu" WITH KEY = "hosts"', "WITH KEY 'hosts': not a tag"),
    ('SELECT last(/^coolant_good_/) FROM "agent" WHERE $timeFilter', "matches no field"),
])
def test_a_query_naming_what_does_not_exist_fails(site: Site, query: str, error: str) -> None:
    lo, hi = site.range_ms
    with pytest.raises(QueryError, match=re.escape(error)):
        site.schema.check(interpolate(query, {}, lo, hi, "10s"))


def test_a_query_returning_nothing_or_a_null_column_fails(site: Site) -> None:
    lo, hi = site.range_ms
    for query, error in [
        ('SELECT mean("power_w") FROM "gpu" WHERE $timeFilter AND "host" = \'no-such-node\'', "no rows"),
        ('SELECT last("slowdown_c") AS "a", last("no_such_field") AS "b" FROM "gpu_info" WHERE $timeFilter '
         'GROUP BY time(1m)', "column 'b' is null in every row"),
    ]:
        q = interpolate(query, {}, lo, hi, "10s")
        with pytest.raises(QueryError, match=re.escape(error)):
            require_rows(run_query(site.services, site.db, q), q, "probe")


def test_the_schema_holds_what_the_readme_and_the_issue_name(site: Site) -> None:
    """The data the boards were checked against is the daemon's whole schema (and the new parts)."""
    s = site.schema
    assert {"gpu", "coolant", "throttle_event", "agent", "node_power", "domain_power", "job_gpu", "job_energy",
            "gpu_info", "coolant_loop"} <= set(s.fields)
    assert {"slowdown_c", "shutdown_c", "mem_max_c", "healthy", "error"} <= s.fields["gpu_info"]
    assert {"degraded_sensors", "stale_sensors", "degraded_fields"} <= s.fields["coolant_loop"]
    assert {"host", "site", "loop"} == s.tags["coolant_loop"]


# -- alert rules -----------------------------------------------------------------------------------

def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def evaluate(site: Site, rule: dict[str, Any], at_s: float) -> set[tuple[tuple[str, str], ...]]:
    """The alert instances ``rule`` fires at ``at_s`` seconds into the scenario: its query A
    over its relative range, reduce B, threshold C (as Grafana's server-side expressions do)."""
    data = {d["refId"]: d for d in rule["data"]}
    query_node = data["A"]
    rng = query_node["relativeTimeRange"]
    now_ms = site.start_ns // 10**6 + int(at_s * 1000)
    q = interpolate(query_node["model"]["query"], {}, now_ms - rng["from"] * 1000, now_ms - rng["to"] * 1000,
                    f"{query_node['model']['intervalMs'] // 1000}s")
    site.schema.check(q)
    result = run_query(site.services, site.db, q)
    reduce_m, threshold_m = data["B"]["model"], data["C"]["model"]
    assert reduce_m["type"] == "reduce" and reduce_m["expression"] == "A"
    assert threshold_m["type"] == "threshold" and threshold_m["expression"] == "B" and rule["condition"] == "C"
    reducer = {"last": lambda v: v[-1], "min": min, "max": max, "sum": sum, "mean": lambda v: sum(v) / len(v)}
    (cond,) = threshold_m["conditions"]
    op, (limit,) = cond["evaluator"]["type"], cond["evaluator"]["params"]
    firing = set()
    for s in result.series:
        values = [row[1] for row in s["values"] if row[1] is not None]  # mode: dropNN
        if not values:
            continue
        value = reducer[reduce_m["reducer"]](values)
        if (op == "gt" and value > limit) or (op == "lt" and value < limit):
            firing.add(tuple(sorted((s.get("tags") or {}).items())))
    if not result.series and rule["noDataState"] == "Alerting":
        firing.add((("NoData", "true"),))
    return firing


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


TCS_LEAK = labels(site=SITE, loop="tcs", unit="cdu-1", point="")
# What each rule must fire for at moments of the timeline (tests/grafana_scenario.TIMELINE).
EXPECTED: dict[float, dict[str, set]] = {
    300: {"agentd-node-offline": set(), "agentd-domain-over-cap": {labels(site=SITE, domain="rack-b")},
          "agentd-gpu-failed": set(), "agentd-coolant-leak": set(), "agentd-ticks-missed": set()},
    480: {"agentd-node-offline": set(), "agentd-ticks-missed": {labels(host="node-b")},
          "agentd-gpu-failed": set(), "agentd-coolant-leak": set()},
    720: {"agentd-node-offline": set(), "agentd-gpu-failed": {labels(host="node-a", gpu="3")},
          "agentd-coolant-leak": {TCS_LEAK}, "agentd-store-backlog-growing": {labels(host="node-a")},
          "agentd-domain-over-cap": {labels(site=SITE, domain="rack-b")}},
    SECONDS: {"agentd-node-offline": {labels(host="node-b")}, "agentd-gpu-failed": {labels(host="node-a", gpu="3")},
              "agentd-coolant-leak": {TCS_LEAK}, "agentd-store-backlog-growing": set(),
              "agentd-ticks-missed": set(), "agentd-domain-over-cap": {labels(site=SITE, domain="rack-b")}},
}


def test_the_timeline_is_the_one_the_expectations_are_written_for() -> None:
    assert TIMELINE["slow_b"][0] < 480 < TIMELINE["slow_b"][1] + 300
    assert TIMELINE["gpu_lost_a"][0] < 720 and TIMELINE["leak"][0] < 720
    assert TIMELINE["outage_a"][0] <= 720 - 600 and 720 - 60 < TIMELINE["outage_a"][1] < SECONDS - 60
    assert TIMELINE["offline_b"][0] <= SECONDS - 180


@pytest.mark.parametrize("at_s", sorted(EXPECTED))
def test_alert_rules_fire_where_the_scenario_says_and_nowhere_else(site: Site, at_s: float) -> None:
    by_uid = {r["uid"]: r for r in rules()}
    got = {uid: evaluate(site, by_uid[uid], at_s) for uid in EXPECTED[at_s]}
    assert got == EXPECTED[at_s]


def test_every_alert_query_returns_rows_at_some_moment(site: Site) -> None:
    """Each rule's query names only what exists and returns rows while its condition holds."""
    for rule in rules():
        assert any(evaluate(site, rule, t) for t in EXPECTED), f"{rule['uid']} never fired in the scenario"
