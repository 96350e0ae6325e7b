#!/usr/bin/env python3
"""Writes grafana/dashboards/*.json: the agentd boards, from one description.

Why generated: five boards share a datasource variable, links, the throttle-event annotations,
the query conventions (every identifier double-quoted, every query scoped by ``$timeFilter``)
and the unit of every panel; written once here they cannot drift apart. The JSON files are
committed (Grafana's file provider reads them as they are); ``tests/test_grafana_boards.py``
fails when they differ from what this script writes, and ``tests/test_grafana_queries.py``
runs every query they hold against a real InfluxDB 1.x filled by the simulated site.

Run from the repository root: ``.venv/bin/python grafana/build.py`` (``--check``: exit 1 when
a committed file is stale, without writing).

Conventions the tests hold the boards to:

* InfluxQL only, raw queries, every measurement, field and tag in double quotes, string
  values in single quotes, multi-value variables matched as ``=~ /^$var$/``;
* the datasource is the ``${datasource}`` variable (file provisioning does not resolve
  ``__inputs``), whose default is the provisioned ``agentd-influxdb``;
* a panel's overrides match by query (``byFrameRefID``) or, in tables, by column name;
* every panel has a unit; no Angular panel (``graph``, ``singlestat``, ``table-old``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.gpu_info import CLOCK_REASONS  # noqa: E402  (the decoded reason names, one table)

OUT = ROOT / "grafana" / "dashboards"
DS_UID = "agentd-influxdb"  # grafana/provisioning/datasources/agentd-influxdb.yaml
DS = {"type": "influxdb", "uid": "${datasource}"}
TAG = "agentd"
SCHEMA_VERSION = 39
TF = "$timeFilter"
IV = "$__interval"

UIDS = {
    "site": "agentd-site-power",
    "node": "agentd-node-gpus",
    "coolant": "agentd-coolant",
    "events": "agentd-throttle-events",
    "health": "agentd-agent-health",
}

# -- value mappings ------------------------------------------------------------------------------

NODE_LEVELS = {"uncapped": "green", "capped": "orange", "failsafe": "red"}
DOMAIN_LEVELS = {0: ("uncapped", "green"), 1: ("capping", "orange")}
LEAK_STATES = {"OK": "green", "Warning": "orange", "Critical": "red", "Unavailable": "purple", "Absent": "text"}
RULE_STATES = {"pending": "yellow", "firing": "red", "resolved": "green", "inactive": "text"}
BOOL_CONNECTED = {"true": ("connected", "green"), "false": ("disconnected", "red")}
HEALTHY = {"true": ("healthy", "green"), "false": ("FAILED", "red")}


def mapping(values: dict[Any, Any]) -> list[dict[str, Any]]:
    """A Grafana value mapping: value -> (text, colour), or value -> colour (text = value)."""
    options = {}
    for i, (value, spec) in enumerate(values.items()):
        text, color = spec if isinstance(spec, tuple) else (str(value), spec)
        options[str(value)] = {"text": text, "color": color, "index": i}
    return [{"type": "value", "options": options}]


def state_colors(mappings: list[dict[str, Any]]) -> dict[str, Any]:
    """Field defaults for a panel of named states: each value's colour comes from its mapping."""
    return {"mappings": mappings, "color": {"mode": "thresholds"}, "thresholds": thresholds((None, "text"))}


def reason_mapping() -> list[dict[str, Any]]:
    """0 -> nothing shown (transparent), each reason's bit -> its name, in red for the ones that
    hold clocks down and blue for the benign ones (idle, application clocks, sync boost)."""
    benign = {"gpu_idle", "app_clocks", "sync_boost", "display_clock"}
    options: dict[str, Any] = {"0": {"text": "-", "color": "transparent", "index": 0}}
    for i, (name, bit) in enumerate(CLOCK_REASONS, start=1):
        options[str(bit)] = {"text": name, "color": "blue" if name in benign else "red", "index": i}
    return [{"type": "value", "options": options}]


# -- building blocks -------------------------------------------------------------------------------

def target(ref: str, query: str, *, alias: str | None = None, fmt: str = "time_series") -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "query": query, "rawQuery": True, "resultFormat": fmt}
    if alias:
        t["alias"] = alias
    return t


def dashed(ref: str, color: str = "red") -> dict[str, Any]:
    """Override: query ``ref`` drawn as a dashed threshold-style line in a fixed colour."""
    return {"matcher": {"id": "byFrameRefID", "options": ref}, "properties": [
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 6]}},
        {"id": "custom.lineWidth", "value": 2},
        {"id": "custom.fillOpacity", "value": 0},
        {"id": "color", "value": {"mode": "fixed", "fixedColor": color}},
    ]}


def column(name: str, **props: Any) -> dict[str, Any]:
    """Override for a table column (by name)."""
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": k.replace("__", "."), "value": v} for k, v in props.items()]}


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


class Board:
    """One dashboard being laid out: panels flow left to right in rows of 24 columns."""

    def __init__(self, key: str, title: str, description: str, variables: list[dict[str, Any]],
                 annotation_filter: str) -> None:
        self.key = key
        self.title = title
        self.description = description
        self.variables = variables
        self.annotation_filter = annotation_filter
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0
        self._id = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._next_id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x = 0
            self._row_h = 0

    def add(self, kind: str, title: str, description: str, targets: list[dict[str, Any]], unit: str, *,
            w: int = 12, h: int = 8, overrides: list[dict[str, Any]] | None = None,
            options: dict[str, Any] | None = None, custom: dict[str, Any] | None = None,
            defaults: dict[str, Any] | None = None, repeat: str | None = None,
            links: list[dict[str, Any]] | None = None, transformations: list[dict[str, Any]] | None = None) -> None:
        if self._x + w > 24:
            self._newline()
        field_defaults: dict[str, Any] = {"unit": unit, **(defaults or {})}
        if kind == "timeseries":
            field_defaults.setdefault("color", {"mode": "palette-classic"})
            field_defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                                        "spanNulls": False, "axisSoftMin": None, **(custom or {})}
            field_defaults["custom"] = {k: v for k, v in field_defaults["custom"].items() if v is not None}
        elif custom:
            field_defaults["custom"] = custom
        panel: dict[str, Any] = {
            "type": kind, "title": title, "description": description, "id": self._next_id(),
            "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y}, "datasource": DS,
            "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
            "options": {**DEFAULT_OPTIONS.get(kind, {}), **(options or {})},
            "targets": targets,
        }
        if repeat:
            panel["repeat"] = repeat
            panel["repeatDirection"] = "h"
            panel["maxPerRow"] = 4
        if links:  # data links: per field, so that ${__field.labels.host} resolves
            field_defaults["links"] = links
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)

    def json(self) -> dict[str, Any]:
        return {
            "uid": UIDS[self.key],
            "title": self.title,
            "description": self.description,
            "tags": [TAG],
            "editable": True,
            "graphTooltip": 1,
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "links": [
                {"type": "dashboards", "tags": [TAG], "asDropdown": False, "includeVars": True, "keepTime": True,
                 "title": "agentd boards", "icon": "external link", "targetBlank": False, "tooltip": "",
                 "url": ""},
            ],
            "annotations": {"list": [
                {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                 "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                 "type": "dashboard"},
                *throttle_annotations(self.annotation_filter),
            ]},
            "templating": {"list": [DATASOURCE_VAR, *self.variables]},
            "panels": self.panels,
        }


DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "timeseries": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
                   "tooltip": {"mode": "multi", "sort": "desc"}},
    "stat": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background",
             "graphMode": "none", "justifyMode": "auto", "orientation": "auto", "textMode": "auto"},
    "gauge": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
              "showThresholdLabels": False, "showThresholdMarkers": True, "orientation": "auto"},
    "bargauge": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True},
    "table": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
    "state-timeline": {"mergeValues": True, "showValue": "auto", "alignValue": "left", "rowHeight": 0.9,
                       "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                       "tooltip": {"mode": "single", "sort": "none"}},
}

DATASOURCE_VAR = {
    "name": "datasource", "label": "InfluxDB", "type": "datasource", "query": "influxdb",
    "current": {"selected": True, "text": "agentd InfluxDB", "value": DS_UID},
    "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False, "options": [],
    "description": "the InfluxDB agentd writes to (InfluxQL: 1.x, 2.x through a DBRP mapping, 3.x)",
}


def var(name: str, label: str, query: str, *, multi: bool = True, include_all: bool = True,
        all_value: str | None = None, description: str = "") -> dict[str, Any]:
    """A query variable (``SHOW TAG VALUES``), refreshed when the time range changes."""
    v: dict[str, Any] = {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": query, "refresh": 2, "sort": 1, "regex": "",
        "multi": multi, "includeAll": include_all, "hide": 0, "options": [],
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
        "description": description,
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def throttle_annotations(where: str) -> list[dict[str, Any]]:
    """Rule transitions from ``throttle_event`` on every board: firing in red, resolved in green."""
    out = []
    for state, color, enabled in (("firing", "red", True), ("resolved", "green", True), ("pending", "yellow", False)):
        query = (f'SELECT "message", "rule", "host", "severity", "action" FROM "throttle_event" '
                 f'WHERE {TF} AND "state" = \'{state}\'{where}')
        columns = {"textColumn": "message", "titleColumn": "rule", "tagsColumn": "host,severity,action"}
        out.append({
            "name": f"Rules {state}", "datasource": DS, "enable": enabled, "hide": False, "iconColor": color,
            "query": query, **columns,
            "target": {"refId": "Anno", "query": query, "rawQuery": True, "resultFormat": "table", **columns},
        })
    return out


def link_to(key: str, title: str) -> list[dict[str, Any]]:
    return [{"title": title, "url": f"/d/{UIDS[key]}?${{__url_time_range}}&var-host=${{__field.labels.host}}",
             "targetBlank": False}]


HOST_RE = '"host" =~ /^$host$/'

# -- Site power ------------------------------------------------------------------------------------


def site_power() -> Board:
    b = Board("site", "agentd / Site power", "Power per domain against its cap, the throttle level of every node, "
              "energy, top consumers and per-job energy. Written by the budget controller (domain_power) and "
              "every node with [budget] enabled (node_power).", [
                  var("site", "Site", 'SHOW TAG VALUES FROM "domain_power" WITH KEY = "site"', multi=False,
                      include_all=False, description="the site (domains file's site)"),
                  var("domain", "Domain", 'SHOW TAG VALUES FROM "domain_power" WITH KEY = "domain" '
                      'WHERE "site" =~ /^$site$/', description="power domains of the site"),
                  var("host", "Node", 'SHOW TAG VALUES FROM "node_power" WITH KEY = "host" WHERE "site" =~ /^$site$/',
                      description="nodes of the site (those with [budget] enabled)"),
              ], "")
    dom = '"site" =~ /^$site$/ AND "domain" =~ /^$domain$/'
    node = f'"site" =~ /^$site$/ AND {HOST_RE}'
    b.row("Domains")
    b.add("timeseries", "Power per domain vs cap",
          "Summed node reports (or the facility meter when it reads higher) per domain; the dashed line is the "
          "domain's cap. Above it for long: see the headroom and the nodes' levels below.",
          [target("A", f'SELECT mean("power_w") AS "power_w" FROM "domain_power" WHERE {TF} AND {dom} '
                       f'GROUP BY time({IV}), "domain" fill(null)', alias="$tag_domain"),
           target("B", f'SELECT last("cap_w") AS "cap_w" FROM "domain_power" WHERE {TF} AND {dom} '
                       f'GROUP BY time({IV}), "domain" fill(previous)', alias="$tag_domain cap")],
          "watt", w=16, h=9, overrides=[dashed("B")])
    b.add("stat", "Headroom now (% of cap)",
          "cap - power, as a share of the cap, per domain; red: over the cap.",
          [target("A", f'SELECT last("headroom_w") / last("cap_w") * 100 AS "headroom_pct" FROM "domain_power" '
                       f'WHERE {TF} AND {dom} GROUP BY "domain"', alias="$tag_domain")],
          "percent", w=8, h=9, defaults={"thresholds": thresholds((None, "red"), (0, "orange"), (5, "green")),
                                         "color": {"mode": "thresholds"}},
          options={"textMode": "value_and_name"})
    b.add("timeseries", "Headroom per domain",
          "cap - max(power, meter): below the red line the domain is over its cap.",
          [target("A", f'SELECT min("headroom_w") AS "headroom_w" FROM "domain_power" WHERE {TF} AND {dom} '
                       f'GROUP BY time({IV}), "domain" fill(null)', alias="$tag_domain")],
          "watt", w=12, defaults={"thresholds": thresholds((None, "red"), (0, "transparent"))},
          custom={"thresholdsStyle": {"mode": "line"}})
    b.add("state-timeline", "Domain capping band",
          "The controller's band state per domain: capping above cap_threshold x cap until the demand falls under "
          "uncap_threshold x cap.",
          [target("A", f'SELECT last("level") AS "level" FROM "domain_power" WHERE {TF} AND {dom} '
                       f'GROUP BY time({IV}), "domain" fill(previous)', alias="$tag_domain")],
          "none", w=12, defaults=state_colors(mapping(DOMAIN_LEVELS)))
    b.row("Nodes")
    b.add("state-timeline", "Throttle level per node",
          "uncapped: the budget covers what the node wants; capped: it does not; failsafe: no live lease (the "
          "controller or the broker is gone), the node holds its static share.",
          [target("A", f'SELECT last("level") AS "level" FROM "node_power" WHERE {TF} AND {node} '
                       f'GROUP BY time({IV}), "host" fill(previous)', alias="$tag_host")],
          "string", w=24, h=8, defaults=state_colors(mapping(NODE_LEVELS)),
          links=link_to("node", "Node GPUs of ${__field.labels.host}"))
    b.add("timeseries", "Node GPU power vs budget",
          "Each node's GPU power and, dashed, the budget it enforces (lease or failsafe).",
          [target("A", f'SELECT mean("gpu_power_w") AS "gpu_power_w" FROM "node_power" WHERE {TF} AND {node} '
                       f'GROUP BY time({IV}), "host" fill(null)', alias="$tag_host"),
           target("B", f'SELECT last("budget_w") AS "budget_w" FROM "node_power" WHERE {TF} AND {node} '
                       f'GROUP BY time({IV}), "host" fill(previous)', alias="$tag_host budget")],
          "watt", w=12, overrides=[dashed("B", "orange")])
    b.add("timeseries", "Energy per hour",
          "GPU energy per node per hour (integral of node_power.gpu_power_w), stacked: the site's total.",
          [target("A", f'SELECT integral("gpu_power_w", 1h) / 1000 AS "energy_kwh" FROM "node_power" '
                       f'WHERE {TF} AND {node} GROUP BY time(1h), "host" fill(none)', alias="$tag_host")],
          "kwatth", w=12, custom={"drawStyle": "bars", "fillOpacity": 80, "stacking": {"mode": "normal", "group": "A"}})
    b.add("table", "Top GPU consumers",
          "The 10 GPUs that drew the most in the range (their highest instant power).",
          [target("A", f'SELECT top("power_w", "host", "gpu", 10) AS "power_w" FROM "gpu" WHERE {TF} AND {HOST_RE}',
                  fmt="table")],
          "watt", w=10, h=9, overrides=[column("host", unit="string"), column("gpu", unit="string")],
          options={"sortBy": [{"displayName": "power_w", "desc": True}]})
    b.add("table", "Recent per-job energy",
          "job_energy rows, newest first: a running job every jobs.energy_interval and once at its end "
          "(final = true). A multi-node job has one row per node: its energy is the sum of the nodes' final rows.",
          [target("A", f'SELECT "job", "host", "class", "kind", "energy_j" / 3600000 AS "energy_kwh", "gpus", '
                       f'"start_ns" / 1000000 AS "start", "end_ns" / 1000000 AS "end", "final" FROM "job_energy" '
                       f'WHERE {TF} AND {HOST_RE} ORDER BY time DESC LIMIT 200', fmt="table")],
          "string", w=14, h=9, overrides=[column("energy_kwh", unit="kwatth", decimals=3),
                                          column("start", unit="dateTimeAsIso"), column("end", unit="dateTimeAsIso"),
                                          column("gpus", unit="none")])
    return b


# -- Node GPUs -------------------------------------------------------------------------------------


def node_gpus() -> Board:
    b = Board("node", "agentd / Node GPUs", "One node's GPUs: power and limits, temperatures against the device "
              "thresholds, clocks and why they are held down, utilization, energy, and the job on each GPU.", [
                  var("host", "Node", 'SHOW TAG VALUES FROM "gpu" WITH KEY = "host"', multi=False, include_all=False),
                  var("gpu", "GPU", 'SHOW TAG VALUES FROM "gpu" WITH KEY = "gpu" WHERE "host" =~ /^$host$/'),
              ], f" AND {HOST_RE}")
    g = f'{HOST_RE} AND "gpu" =~ /^$gpu$/'
    h = HOST_RE
    b.add("gauge", "Power now, % of the enforced limit",
          "Instant power per GPU as a share of the limit it enforces: near 100 % the GPU is held by its limit "
          "(a cap of agentd's, the site budget, or its own maximum).",
          [target("A", f'SELECT last("power_w") / last("limit_w") * 100 AS "power_pct_of_limit" FROM "gpu" '
                       f'WHERE {TF} AND {g} GROUP BY "gpu"', alias="GPU $tag_gpu")],
          "percent", w=16, h=6,
          defaults={"min": 0, "max": 100, "thresholds": thresholds((None, "green"), (95, "orange"))})
    b.add("stat", "GPU health", "From gpu_info: FAILED when the driver cannot read the GPU (lost, Xid); its "
          "gpu series then stops, so this says it outright.",
          [target("A", f'SELECT last("healthy") AS "healthy" FROM "gpu_info" WHERE {TF} AND {g} GROUP BY "gpu"',
                  alias="GPU $tag_gpu")],
          "string", w=8, h=6, defaults=state_colors(mapping(HEALTHY)),
          options={"textMode": "value_and_name"})
    b.add("timeseries", "Power: instant and average",
          "power_w (instant) per GPU; dashed: the driver's ~1 s average (power_avg_w).",
          [target("A", f'SELECT mean("power_w") AS "power_w" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu"),
           target("B", f'SELECT mean("power_avg_w") AS "power_avg_w" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu avg")],
          "watt", overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [4, 4]}}]}])
    b.add("timeseries", "Limits: enforced, applied, intended",
          "limit_w: what the GPU enforces now; limit_set_w: the limit agentd wrote and the GPU still holds "
          "(absent: nothing asked, dry run); limit_target_w: what agentd intends (written or not); dashed: the "
          "default limit.",
          [target("A", f'SELECT last("limit_w") AS "limit_w" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu enforced"),
           target("B", f'SELECT last("limit_set_w") AS "limit_set_w" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu applied"),
           target("C", f'SELECT last("limit_target_w") AS "limit_target_w" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu intended"),
           target("D", f'SELECT max("limit_default_w") AS "limit_default_w" FROM "gpu" WHERE {TF} AND {h} '
                       f'GROUP BY time({IV}) fill(previous)', alias="default")],
          "watt", overrides=[dashed("D", "text")])
    b.add("timeseries", "GPU temperature vs thresholds",
          "temp_c per GPU; dashed: the lowest slowdown (orange) and shutdown (red) threshold of the node's GPUs "
          "(gpu_info, written every minute). The gpu_thermal pack caps at slowdown - 5 C.",
          [target("A", f'SELECT mean("temp_c") AS "temp_c" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu"),
           target("B", f'SELECT min("slowdown_c") AS "slowdown_c" FROM "gpu_info" WHERE {TF} AND {h} '
                       f'GROUP BY time({IV}) fill(previous)', alias="slowdown"),
           target("C", f'SELECT min("shutdown_c") AS "shutdown_c" FROM "gpu_info" WHERE {TF} AND {h} '
                       f'GROUP BY time({IV}) fill(previous)', alias="shutdown")],
          "celsius", overrides=[dashed("B", "orange"), dashed("C", "red")])
    b.add("timeseries", "HBM temperature vs max",
          "mem_temp_c per GPU; dashed: the lowest memory maximum (gpu_info.mem_max_c). hbm_near_max caps at "
          "max - 5 C.",
          [target("A", f'SELECT mean("mem_temp_c") AS "mem_temp_c" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu"),
           target("B", f'SELECT min("mem_max_c") AS "mem_max_c" FROM "gpu_info" WHERE {TF} AND {h} '
                       f'GROUP BY time({IV}) fill(previous)', alias="memory max")],
          "celsius", overrides=[dashed("B", "red")])
    b.add("timeseries", "SM clock", "sm_clock_mhz per GPU.",
          [target("A", f'SELECT mean("sm_clock_mhz") * 1000000 AS "sm_clock_hz" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu")],
          "hertz")
    b.add("timeseries", "Utilization", "util_pct (SM busy) per GPU; dashed: mem_util_pct.",
          [target("A", f'SELECT mean("util_pct") AS "util_pct" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu"),
           target("B", f'SELECT mean("mem_util_pct") AS "mem_util_pct" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu mem")],
          "percent", defaults={"min": 0, "max": 100},
          overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [4, 4]}}]}])
    reasons = ", ".join(f'last("clock_reasons") & {bit} AS "{name}"' for name, bit in CLOCK_REASONS)
    b.add("state-timeline", "Clock-event reasons, GPU $gpu",
          "gpu.clock_reasons decoded, one row per reason: red ones hold the clocks down (power cap, thermal, "
          "power brake, board limit), blue ones are benign (idle, application clocks, sync boost).",
          [target("A", f'SELECT {reasons} FROM "gpu" WHERE {TF} AND {h} AND "gpu" =~ /^$gpu$/ '
                       f'GROUP BY time({IV}) fill(previous)', alias="$col")],
          "none", w=12, h=8, repeat="gpu", defaults=state_colors(reason_mapping()))
    b.add("bargauge", "Energy in the range", "Energy per GPU over the time range (spread of the energy counter).",
          [target("A", f'SELECT spread("energy_j") / 3600000 AS "energy_kwh" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY "gpu"', alias="GPU $tag_gpu")],
          "kwatth", w=8, h=8, defaults={"min": 0, "decimals": 3})
    b.add("timeseries", "Memory used", "mem_used_bytes per GPU.",
          [target("A", f'SELECT mean("mem_used_bytes") AS "mem_used_bytes" FROM "gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu")],
          "bytes", w=8, h=8)
    b.add("state-timeline", "Job on each GPU",
          "job_gpu: the Slurm job id or pod UID on each GPU (a GPU with no process shows nothing).",
          [target("A", f'SELECT last("job") AS "job" FROM "job_gpu" WHERE {TF} AND {g} '
                       f'GROUP BY time({IV}), "gpu" fill(null)', alias="GPU $tag_gpu")],
          "string", w=8, h=8, defaults={"color": {"mode": "palette-classic"}})
    b.add("table", "Jobs on the node now",
          "The last job_gpu row of each GPU in the range: job, class, the owner's share of the GPU and its power.",
          [target("A", f'SELECT last("job") AS "job", last("power_w") AS "power_w", last("share") AS "share", '
                       f'last("priority") AS "priority" FROM "job_gpu" WHERE {TF} AND {g} '
                       f'GROUP BY "gpu", "class", "kind"', fmt="table")],
          "string", w=24, h=6, overrides=[column("power_w", unit="watt"), column("share", unit="percentunit"),
                                          column("priority", unit="none")])
    return b


# -- Coolant ---------------------------------------------------------------------------------------


def coolant() -> Board:
    b = Board("coolant", "agentd / Coolant", "CDU and rack-manifold readings (facility and TCS loops) as the "
              "nodes received them over MQTT, the leak detectors, and how many sensors each node finds degraded.", [
                  var("site", "Site", 'SHOW TAG VALUES FROM "coolant" WITH KEY = "site"', multi=False,
                      include_all=False),
                  var("loop", "Loop", 'SHOW TAG VALUES FROM "coolant" WITH KEY = "loop" WHERE "site" =~ /^$site$/'),
                  var("unit", "Unit", 'SHOW TAG VALUES FROM "coolant" WITH KEY = "unit" WHERE "site" =~ /^$site$/ '
                      'AND "loop" =~ /^$loop$/', description="CDU / rack id"),
                  var("host", "Node", 'SHOW TAG VALUES FROM "coolant_loop" WITH KEY = "host" WHERE "site" =~ '
                      '/^$site$/', all_value=".*", description="nodes, for their view of the loops"),
              ], f" AND {HOST_RE}")
    c = '"site" =~ /^$site$/ AND "loop" =~ /^$loop$/ AND "unit" =~ /^$unit$/'
    by = f'GROUP BY time({IV}), "loop", "unit", "point" fill(null)'
    alias = "$tag_loop $tag_unit $tag_point"
    b.add("timeseries", "Supply and return temperature",
          "supply_temp_c per loop and unit; dashed: return_temp_c.",
          [target("A", f'SELECT mean("supply_temp_c") AS "supply_temp_c" FROM "coolant" WHERE {TF} AND {c} {by}',
                  alias=f"{alias} supply"),
           target("B", f'SELECT mean("return_temp_c") AS "return_temp_c" FROM "coolant" WHERE {TF} AND {c} {by}',
                  alias=f"{alias} return")],
          "celsius", overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}}]}])
    b.add("timeseries", "Delta-T (return - supply)",
          "delta_temp_c: as sent, or derived from the two temperatures. tcs_delta_t_high fires above 15 C.",
          [target("A", f'SELECT mean("delta_temp_c") AS "delta_temp_c" FROM "coolant" WHERE {TF} AND {c} {by}',
                  alias=alias)],
          "celsius")
    b.add("timeseries", "Flow", "flow_lpm per loop and unit. tcs_flow_low fires under 70 % of the rated flow.",
          [target("A", f'SELECT mean("flow_lpm") AS "flow_lpm" FROM "coolant" WHERE {TF} AND {c} {by}', alias=alias)],
          "flowlpm", w=8)
    b.add("timeseries", "Pressures", "supply, return and differential pressure.",
          [target("A", f'SELECT mean("supply_pressure_kpa") AS "supply_pressure_kpa" FROM "coolant" '
                       f'WHERE {TF} AND {c} {by}', alias=f"{alias} supply"),
           target("B", f'SELECT mean("return_pressure_kpa") AS "return_pressure_kpa" FROM "coolant" '
                       f'WHERE {TF} AND {c} {by}', alias=f"{alias} return"),
           target("C", f'SELECT mean("delta_pressure_kpa") AS "delta_pressure_kpa" FROM "coolant" '
                       f'WHERE {TF} AND {c} {by}', alias=f"{alias} dP")],
          "pressurekpa", w=8)
    b.add("timeseries", "Pump speed and valve", "pump_speed_pct; dashed: valve_position_pct.",
          [target("A", f'SELECT mean("pump_speed_pct") AS "pump_speed_pct" FROM "coolant" WHERE {TF} AND {c} {by}',
                  alias=f"{alias} pump"),
           target("B", f'SELECT mean("valve_position_pct") AS "valve_position_pct" FROM "coolant" '
                       f'WHERE {TF} AND {c} {by}', alias=f"{alias} valve")],
          "percent", w=8, defaults={"min": 0, "max": 100},
          overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}}]}])
    b.add("state-timeline", "Leak detectors",
          "The leak state each detector reported (Redfish words): Warning stops new work and caps, Critical drains "
          "the node and caps to the GPUs' minimum.",
          [target("A", f'SELECT last("leak") AS "leak" FROM "coolant" WHERE {TF} AND {c} '
                       f'GROUP BY time({IV}), "loop", "unit", "point" fill(previous)', alias=alias)],
          "string", w=24, h=6, defaults=state_colors(mapping(LEAK_STATES)))
    b.add("timeseries", "Degraded sensors per node",
          "coolant_loop.degraded_sensors: sensors a node depends on that are stale, report quality != 1 or an "
          "Unavailable leak detector. Above 0 for 30 s: coolant_sensor_stale fires (no new work) and the "
          "fail-safe rules count the loop as hot.",
          [target("A", f'SELECT max("degraded_sensors") AS "degraded_sensors" FROM "coolant_loop" '
                       f'WHERE {TF} AND "site" =~ /^$site$/ AND "loop" =~ /^$loop$/ AND {HOST_RE} '
                       f'GROUP BY time({IV}), "host", "loop" fill(null)', alias="$tag_host $tag_loop")],
          "none", w=12, defaults={"min": 0, "decimals": 0},
          custom={"drawStyle": "line", "lineInterpolation": "stepAfter"})
    b.add("timeseries", "Readings received per minute",
          "supply temperature readings stored per minute per loop and unit: a unit going silent shows here "
          "first, before the nodes call it stale.",
          [target("A", f'SELECT count("supply_temp_c") AS "readings" FROM "coolant" WHERE {TF} AND {c} '
                       f'GROUP BY time(1m), "loop", "unit" fill(0)', alias="$tag_loop $tag_unit")],
          "none", w=12, custom={"drawStyle": "bars", "fillOpacity": 60})
    b.add("table", "What each node finds degraded now",
          "The last coolant_loop point of each node and loop: counts by cause, and which fields.",
          [target("A", f'SELECT last("degraded_sensors") AS "degraded", last("stale_sensors") AS "stale", '
                       f'last("bad_quality_sensors") AS "bad_quality", last("unavailable_sensors") AS "unavailable", '
                       f'last("degraded_fields") AS "fields", last("series") AS "series" FROM "coolant_loop" '
                       f'WHERE {TF} AND "site" =~ /^$site$/ AND "loop" =~ /^$loop$/ AND {HOST_RE} '
                       f'GROUP BY "host", "loop"', fmt="table")],
          "none", w=24, h=6, overrides=[column("fields", unit="string")])
    return b


# -- Throttle events -------------------------------------------------------------------------------


def throttle_events() -> Board:
    b = Board("events", "agentd / Throttle events", "Every rule transition (throttle_event): which rule, on which "
              "node and GPU, why (value, message) and what it did (actions, the limit written and intended).", [
                  var("host", "Node", 'SHOW TAG VALUES FROM "agent" WITH KEY = "host"', all_value=".*"),
                  var("rule", "Rule", 'SHOW TAG VALUES FROM "throttle_event" WITH KEY = "rule"', all_value=".*"),
                  var("severity", "Severity", 'SHOW TAG VALUES FROM "throttle_event" WITH KEY = "severity"',
                      all_value=".*"),
              ], f' AND {HOST_RE} AND "rule" =~ /^$rule$/')
    ev = f'{HOST_RE} AND "rule" =~ /^$rule$/ AND "severity" =~ /^$severity$/'
    b.add("state-timeline", "Rule state per node",
          "The last state of each rule on each node (any GPU): pending, firing, resolved, inactive.",
          [target("A", f'SELECT last("state") AS "state" FROM "throttle_event" WHERE {TF} AND {ev} '
                       f'GROUP BY time({IV}), "host", "rule" fill(previous)', alias="$tag_host $tag_rule")],
          "string", w=24, h=9, defaults=state_colors(mapping(RULE_STATES)),
          links=link_to("node", "Node GPUs of ${__field.labels.host}"))
    b.add("timeseries", "Rules firing per interval, by severity",
          "Transitions to firing per interval.",
          [target("A", f'SELECT count("message") AS "firing" FROM "throttle_event" WHERE {TF} AND {ev} '
                       f'AND "state" = \'firing\' GROUP BY time({IV}), "severity" fill(0)', alias="$tag_severity")],
          "none", w=12, custom={"drawStyle": "bars", "fillOpacity": 70, "stacking": {"mode": "normal", "group": "A"}})
    b.add("timeseries", "Limits written by rules",
          "The limit each transition left on its GPU (limit_w, absent in dry run); dashed: the limit intended.",
          [target("A", f'SELECT last("limit_w") AS "limit_w" FROM "throttle_event" WHERE {TF} AND {ev} '
                       f'GROUP BY time({IV}), "host", "gpu" fill(none)', alias="$tag_host GPU $tag_gpu"),
           target("B", f'SELECT last("limit_target_w") AS "limit_target_w" FROM "throttle_event" WHERE {TF} AND {ev} '
                       f'GROUP BY time({IV}), "host", "gpu" fill(none)', alias="$tag_host GPU $tag_gpu intended")],
          "watt", w=12, custom={"drawStyle": "points", "pointSize": 6},
          overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.pointSize", "value": 3}]}])
    b.add("table", "Recent rule transitions",
          "Newest first: state, the rule and its severity, node and GPU, the value that crossed, the actions, the "
          "limit written and intended, and the rule's message.",
          [target("A", f'SELECT "state", "rule", "severity", "host", "gpu", "value", "action", "limit_w", '
                       f'"limit_target_w", "message" FROM "throttle_event" WHERE {TF} AND {ev} '
                       f'ORDER BY time DESC LIMIT 500', fmt="table")],
          "string", w=24, h=14, overrides=[
              column("state", **{"mappings": mapping(RULE_STATES), "custom__cellOptions": {"type": "color-text"}}),
              column("value", unit="none", decimals=2), column("limit_w", unit="watt"),
              column("limit_target_w", unit="watt")])
    return b


# -- Agent health ----------------------------------------------------------------------------------


def agent_health() -> Board:
    b = Board("health", "agentd / Agent health", "The daemon itself (agent measurement): is every node reporting, "
              "ticking on time, shipping its store, reading its GPUs and its coolant feed.", [
                  var("host", "Node", 'SHOW TAG VALUES FROM "agent" WITH KEY = "host"', all_value=".*"),
              ], f" AND {HOST_RE}")
    a = f'FROM "agent" WHERE {TF} AND {HOST_RE}'
    per = f'GROUP BY time({IV}), "host" fill(null)'
    b.add("table", "Last report per node",
          "When each node's agent point last arrived (oldest first): a node at the top, minutes old, is offline "
          "or cannot ship.",
          [target("A", f'SELECT last("tick_s") AS "tick_s", last("store_backlog") AS "store_backlog" {a} '
                       'GROUP BY "host"', fmt="table")],
          "s", w=8, h=8, overrides=[column("Time", unit="dateTimeFromNow"), column("store_backlog", unit="none")],
          options={"sortBy": [{"displayName": "Time", "desc": False}]})
    b.add("timeseries", "Tick duration (max)", "tick_s: one tick's work (sample, rules, store). Near the interval: "
          "ticks are missed.",
          [target("A", f'SELECT max("tick_s") AS "tick_s" {a} {per}', alias="$tag_host")], "s", w=8, h=8)
    b.add("timeseries", "Tick lag (max)", "tick_lag_s: how late a tick started against its schedule.",
          [target("A", f'SELECT max("tick_lag_s") AS "tick_lag_s" {a} {per}', alias="$tag_host")], "s", w=8, h=8)
    b.add("timeseries", "Store backlog", "Points waiting in the local store for InfluxDB (growing: the forwarder "
          "cannot ship; see write errors).",
          [target("A", f'SELECT last("store_backlog") AS "store_backlog" {a} {per}', alias="$tag_host")],
          "none", w=8)
    b.add("timeseries", "Store size", "store_bytes (database + WAL); dashed: the WAL alone.",
          [target("A", f'SELECT last("store_bytes") AS "store_bytes" {a} {per}', alias="$tag_host"),
           target("B", f'SELECT last("store_wal_bytes") AS "store_wal_bytes" {a} {per}', alias="$tag_host WAL")],
          "bytes", w=8, overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}}]}])
    b.add("state-timeline", "MQTT connection", "agent.mqtt_connected (only nodes with [mqtt]).",
          [target("A", f'SELECT last("mqtt_connected") AS "mqtt_connected" {a} '
                       f'GROUP BY time({IV}), "host" fill(previous)', alias="$tag_host")],
          "string", w=8, defaults=state_colors(mapping(BOOL_CONNECTED)))
    counters = [("dropped", "points dropped (store size bound)"), ("quarantined", "lines quarantined after a 4xx"),
                ("write_errors", "failed InfluxDB writes"), ("nvml_errors", "NVML errors"),
                ("store_errors", "store errors"), ("limit_write_errors", "refused power-limit writes"),
                ("rule_errors", "rule evaluations that raised")]
    b.add("timeseries", "Errors and losses per interval",
          "Increase per interval of the cumulative counters: " + "; ".join(f"{n}: {d}" for n, d in counters) + ".",
          [target(chr(ord("A") + i), f'SELECT non_negative_difference(last("{n}")) AS "{n}" {a} {per}',
                  alias=f"$tag_host {n}") for i, (n, _) in enumerate(counters)],
          "none", w=12, custom={"drawStyle": "bars", "fillOpacity": 70, "stacking": {"mode": "normal", "group": "A"}})
    b.add("timeseries", "Coolant messages refused, by reason",
          "Increase per interval of agent.coolant_bad_<reason> (too_large, not_json, bad_shape, out_of_range, ...: "
          "the README lists them); the node's log says which topic.",
          [target("A", f'SELECT non_negative_difference(last(/^coolant_bad_/)) {a} {per}', alias="$tag_host $col")],
          "none", w=12, custom={"drawStyle": "bars", "fillOpacity": 70, "stacking": {"mode": "normal", "group": "A"}})
    b.add("timeseries", "Coolant messages and readings per interval",
          "coolant_msgs received and coolant_readings accepted per interval.",
          [target("A", f'SELECT non_negative_difference(last("coolant_msgs")) AS "coolant_msgs" {a} {per}',
                  alias="$tag_host msgs"),
           target("B", f'SELECT non_negative_difference(last("coolant_readings")) AS "coolant_readings" {a} {per}',
                  alias="$tag_host readings")],
          "none", w=12)
    b.add("timeseries", "Ticks missed per interval",
          "agent.ticks_missed: schedule slots skipped because a tick overran (a hung NVML call, a slow disk).",
          [target("A", f'SELECT non_negative_difference(last("ticks_missed")) AS "ticks_missed" {a} {per}',
                  alias="$tag_host")],
          "none", w=12, custom={"drawStyle": "bars", "fillOpacity": 70})
    return b


BOARDS = {"site-power": site_power, "node-gpus": node_gpus, "coolant": coolant, "throttle-events": throttle_events,
          "agent-health": agent_health}


def render() -> dict[str, str]:
    """File name -> JSON text of every board."""
    return {f"{name}.json": json.dumps(build().json(), indent=2) + "\n" for name, build in BOARDS.items()}


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        for n in stale:
            print(f"grafana/dashboards/{n} is stale: run .venv/bin/python grafana/build.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} boards to {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
