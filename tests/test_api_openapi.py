"""The committed agentd/api/openapi.json says what the server does: every route it serves is in
the document and nothing else, every schema it names exists, and the file is what the generator
prints today (a route or a model changed without regenerating it fails here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentd.api import openapi
from agentd.api.server import ROUTES, make_app
from agentd.config import AgentConfig

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "regenerate: .venv/bin/python -m agentd.api.openapi > agentd/api/openapi.json"


def committed() -> dict:
    return json.loads((REPO / "agentd" / "api" / "openapi.json").read_text())


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the aiohttp app answers."""
    app = make_app(None, AgentConfig().api, None, openapi=b"{}")  # type: ignore[arg-type]
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


def test_the_committed_document_is_what_the_generator_prints():
    assert openapi.main(["--check"]) == 0, REGENERATE
    assert (REPO / "agentd" / "api" / "openapi.json").read_text() == openapi.render(), REGENERATE


def test_every_served_route_is_documented_and_every_documented_one_is_served():
    doc = committed()
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = served_routes()
    assert served - documented == set(), f"served but not in openapi.json: {served - documented}; {REGENERATE}"
    assert documented - served == set(), f"documented but not served: {documented - served}; {REGENERATE}"
    assert len(served) == len(ROUTES)


def test_every_schema_the_document_names_is_in_it():
    doc = committed()
    schemas = doc["components"]["schemas"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and refs <= set(schemas), refs - set(schemas)
    throttle = schemas["Throttle"]["properties"]
    for key in ("level", "state", "accept_new_work", "advice", "reasons", "node_cap_w", "draw_w", "gpus", "jobs",
                "recommendations", "generated_at", "age_s", "expires_at"):  # the shared contract
        assert key in throttle, key


def test_check_exits_1_naming_the_command_when_the_file_is_stale(tmp_path, monkeypatch):
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(openapi, "FILE", stale)
    assert openapi.main(["--check"]) == 1
    out = subprocess.run([sys.executable, "-m", "agentd.api.openapi"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["paths"].keys() == committed()["paths"].keys()
