"""The Grafana provisioning and boards, checked for what Grafana needs without a Grafana server:
the committed JSON is what grafana/build.py writes; uids are fixed and unique; every panel reads
the provisioned datasource (through the ``datasource`` variable) and has a unit; no Angular
panel; overrides, repeats, links and alert annotations point at things that exist; the YAML
files parse and agree with each other. The queries themselves are run against real data in
tests/test_grafana_queries.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
BOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DS_UID = "agentd-influxdb"
DS_VAR = {"type": "influxdb", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "state-timeline", "bargauge", "row"}
DEPRECATED = {"graph", "singlestat", "table-old", "grafana-piechart-panel", "grafana-worldmap-panel"}
UIDS = {"agentd-site-power", "agentd-node-gpus", "agentd-coolant", "agentd-throttle-events", "agentd-agent-health"}
BUILTIN_VARS = {"timeFilter", "__interval", "__interval_ms", "__url_time_range", "__field", "__all"}


def boards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in BOARD_FILES}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_the_committed_boards_are_what_the_generator_writes() -> None:
    proc = subprocess.run([sys.executable, str(GRAFANA / "build.py"), "--check"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_five_boards_with_fixed_unique_uids_and_titles() -> None:
    b = boards()
    assert len(b) == 5
    assert {d["uid"] for d in b.values()} == UIDS
    assert len({d["title"] for d in b.values()}) == 5
    for name, d in b.items():
        assert "__inputs" not in d and "__requires" not in d, name  # file provisioning does not resolve them
        assert d["tags"] == ["agentd"], name
        assert d["schemaVersion"] >= 36, name


def test_every_board_has_the_datasource_variable_defaulting_to_the_provisioned_uid() -> None:
    for name, d in boards().items():
        (ds,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
        assert ds["name"] == "datasource" and ds["query"] == "influxdb", name
        assert ds["current"]["value"] == DS_UID, name


def test_every_panel_and_query_reads_the_datasource_variable_and_every_panel_has_a_unit() -> None:
    for name, d in boards().items():
        ids = [p["id"] for p in panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels(d):
            where = f"{name}: panel {p['id']} {p['title']!r}"
            assert p["type"] in PANEL_TYPES and p["type"] not in DEPRECATED, where
            if p["type"] == "row":
                continue
            assert p["datasource"] in (DS_VAR, {"type": "influxdb", "uid": DS_UID}), where
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert p.get("description"), f"{where}: no description"
            assert p["targets"], where
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), where
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], where
                assert t["rawQuery"] is True and "$timeFilter" in t["query"], where
                assert t["resultFormat"] in ("time_series", "table"), where


def test_panels_fit_the_grid_and_do_not_overlap() -> None:
    for name, d in boards().items():
        cells: dict[tuple[int, int], int] = {}
        for p in panels(d):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{name}: panel {p['id']}"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: panels {cells[(x, y)]} and {p['id']} overlap"
                    cells[(x, y)] = p["id"]


def test_overrides_repeats_and_links_point_at_what_exists() -> None:
    b = boards()
    for name, d in b.items():
        var_names = {v["name"] for v in d["templating"]["list"]}
        for p in panels(d):
            if p["type"] == "row":
                continue
            refs = {t["refId"] for t in p["targets"]}
            table = any(t["resultFormat"] == "table" for t in p["targets"])
            for o in p["fieldConfig"]["overrides"]:
                kind, option = o["matcher"]["id"], o["matcher"]["options"]
                if kind == "byFrameRefID":
                    assert option in refs, f"{name}: {p['title']!r} override for query {option} it does not have"
                else:  # columns of a table; run against real data in test_grafana_queries
                    assert kind == "byName" and table, f"{name}: {p['title']!r}: match series by query, not name"
            if "repeat" in p:
                var = next(v for v in d["templating"]["list"] if v["name"] == p["repeat"])
                assert var["multi"] and var["includeAll"], f"{name}: {p['title']!r} repeats a single-value variable"
            for link in p["fieldConfig"]["defaults"].get("links", []):
                uid = re.match(r"/d/([^?]+)", link["url"]).group(1)  # type: ignore[union-attr]
                assert uid in UIDS, f"{name}: {p['title']!r} links to unknown board {uid}"
            used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", json.dumps(p["targets"]) + p["title"]))
            used = {u for u in used if not u.startswith("tag_") and u != "col"}
            assert used <= var_names | BUILTIN_VARS, f"{name}: {p['title']!r} uses undefined {used - var_names}"
        links = d["links"]
        assert any(lk["type"] == "dashboards" and lk["tags"] == ["agentd"] and lk["keepTime"] for lk in links), name


def test_every_board_shows_rule_transitions_as_annotations() -> None:
    for name, d in boards().items():
        annos = [a for a in d["annotations"]["list"] if not a.get("builtIn")]
        assert any(a["enable"] and '"state" = \'firing\'' in a["query"] for a in annos), name
        for a in annos:
            assert 'FROM "throttle_event"' in a["query"] and "$timeFilter" in a["query"], name
            assert a["datasource"] == DS_VAR and a["target"]["query"] == a["query"], name
            assert a["textColumn"] and a["titleColumn"] and a["tagsColumn"], name


def test_variable_queries_are_tag_value_lookups_on_the_datasource() -> None:
    for name, d in boards().items():
        for v in d["templating"]["list"]:
            if v["type"] != "query":
                continue
            assert v["datasource"] == DS_VAR, name
            assert v["query"].startswith("SHOW TAG VALUES FROM"), name
            assert v["query"] == v["definition"], name


# -- provisioning YAML -----------------------------------------------------------------------------

def load(rel: str) -> dict[str, Any]:
    return yaml.safe_load((GRAFANA / "provisioning" / rel).read_text())


def test_the_datasource_is_influxql_with_the_fixed_uid_and_its_settings_from_the_environment() -> None:
    doc = load("datasources/agentd-influxdb.yaml")
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["uid"] == DS_UID and ds["type"] == "influxdb" and ds["access"] == "proxy"
    assert ds["url"] == "${INFLUXDB_URL}" and ds["jsonData"]["dbName"] == "${INFLUXDB_DB}"
    assert ds["jsonData"]["version"] == "InfluxQL"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUXDB_TOKEN}"
    text = (GRAFANA / "provisioning" / "datasources" / "agentd-influxdb.yaml").read_text()
    assert "user: ${INFLUXDB_USER}" in text and "password: ${INFLUXDB_PASSWORD}" in text  # the 1.x variant


def test_the_dashboard_provider_is_a_file_provider() -> None:
    doc = load("dashboards/agentd.yaml")
    (p,) = doc["providers"]
    assert p["type"] == "file" and p["folderUid"] == "agentd" and p["options"]["path"].startswith("/")
    assert p["allowUiUpdates"] is False


def test_alert_rules_are_complete_and_point_at_what_exists() -> None:
    doc = load("alerting/agentd-alerts.yaml")
    b = {d["uid"]: d for d in boards().values()}
    (group,) = doc["groups"]
    rules = group["rules"]
    uids = [r["uid"] for r in rules]
    assert len(uids) == len(set(uids))
    assert {"agentd-node-offline", "agentd-domain-over-cap", "agentd-gpu-failed", "agentd-coolant-leak",
            "agentd-store-backlog-growing", "agentd-ticks-missed"} == set(uids)
    for r in rules:
        data = {d["refId"]: d for d in r["data"]}
        assert r["condition"] in data, r["uid"]
        assert data["A"]["datasourceUid"] == DS_UID and "$timeFilter" in data["A"]["model"]["query"], r["uid"]
        assert all(d["datasourceUid"] == "__expr__" for k, d in data.items() if k != "A"), r["uid"]
        assert r["noDataState"] in ("OK", "Alerting", "NoData") and r["execErrState"] in ("Error", "Alerting")
        assert r["labels"]["severity"] in ("critical", "warning"), r["uid"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["uid"]
        board = b[r["annotations"]["__dashboardUid__"]]
        assert int(r["annotations"]["__panelId__"]) in {p["id"] for p in panels(board)}, r["uid"]


@pytest.mark.parametrize("rel", ["datasources/agentd-influxdb.yaml", "dashboards/agentd.yaml",
                                 "alerting/agentd-alerts.yaml"])
def test_provisioning_files_declare_api_version_1(rel: str) -> None:
    assert load(rel)["apiVersion"] == 1
