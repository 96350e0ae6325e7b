"""The OpenAPI 3.1 document of the throttle API, generated from the route table and the models.

    python -m agentd.api.openapi > agentd/api/openapi.json     # regenerate the committed file
    python -m agentd.api.openapi --check                       # exit 1 when the file is stale

Why generated and committed: the document is what a scheduler developer reads and what a fuzzer
(Schemathesis) drives, so it must say exactly what the code does; generated from
``agentd.api.server.ROUTES`` and the pydantic bodies it cannot drift, and committed it can be
read, diffed and reviewed without running anything. A test fails when a route is added without
regenerating it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from agentd.api.models import Error
from agentd.api.server import ERROR_TEXT, JSON, ROUTES, RouteSpec

FILE = Path(__file__).with_name("openapi.json")
REF = "#/components/schemas/{model}"
STATUS_TEXT = {200: "OK", 201: "created", 204: "done (no body)", 503: "not ready yet, or the state directory "
                                                                      "could not be written"}


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    seen: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None}
    for spec in ROUTES:
        for model in spec.responses.values():
            if model is not None:
                seen[(model, "serialization")] = None
        if spec.request is not None:
            seen[(spec.request, "validation")] = None
    return list(seen)


def _content(ref: dict[str, Any], content_type: str = JSON) -> dict[str, Any]:
    return {content_type: {"schema": ref}}


def _operation(spec: RouteSpec, refs: Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]) -> dict:
    error_ref = refs[(Error, "serialization")]
    responses: dict[str, Any] = {}
    for status, model in sorted(spec.responses.items()):
        entry: dict[str, Any] = {"description": STATUS_TEXT.get(status, "OK")}
        if model is not None:
            entry["content"] = _content(refs[(model, "serialization")])
        elif status != 204:
            schema = {"type": "string"} if spec.content_type != JSON else {"type": "object"}
            entry["content"] = _content(schema, spec.content_type)
        responses[str(status)] = entry
    errors = set(spec.errors) | ({401} if spec.auth != "none" else set())
    for status in sorted(errors):
        responses[str(status)] = {"description": ERROR_TEXT[status], "content": _content(error_ref)}
    op: dict[str, Any] = {"operationId": spec.handler, "summary": spec.summary, "tags": [spec.tag]}
    if spec.description:
        op["description"] = spec.description
    if spec.params:
        op["parameters"] = [{"name": p.name, "in": p.where, "required": p.required, "description": p.description,
                             "schema": p.schema} for p in spec.params]
    if spec.request is not None:
        op["requestBody"] = {"required": True, "content": _content(refs[(spec.request, "validation")])}
    op["responses"] = dict(sorted(responses.items()))
    # A token is needed when one is configured (PUT/DELETE always; GET with api.auth_reads).
    op["security"] = [] if spec.auth == "none" else [{}, {"bearer": []}]
    return op


def document() -> dict[str, Any]:
    """The document, as a JSON-ready dict (key order fixed by the code: the file is stable)."""
    refs, defs = models_json_schema(_models(), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for spec in ROUTES:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpu-agentd throttle API",
            "version": "1",
            "description": "The node's throttle state for schedulers (Slurm, Kubernetes) and operators, cap leases "
                           "and job priority hints. Loopback by default; with a token configured, PUT/DELETE need "
                           "'Authorization: Bearer <token>'. Every error is {error, detail}. See docs/api.md.",
        },
        "servers": [{"url": "http://127.0.0.1:9410"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "api.token_file or api.token_credential on the node"}},
        },
    }


def render() -> str:
    return json.dumps(document(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args == ["--check"]:
        try:
            committed = FILE.read_text()
        except OSError as exc:
            print(f"{FILE}: cannot read ({exc.strerror}); regenerate: python -m agentd.api.openapi > {FILE}",
                  file=sys.stderr)
            return 1
        if committed != text:
            print(f"{FILE} is stale (routes or models changed); regenerate: "
                  "python -m agentd.api.openapi > agentd/api/openapi.json", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m agentd.api.openapi [--check]", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
