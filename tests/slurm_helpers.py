"""Throttle bodies for the slurm-sync tests, shaped as the throttle contract writes them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any


def iso(ns: int) -> str:
    """``2026-12-02T03:04:05.123Z`` from ns since the epoch (the contract's timestamps)."""
    t = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def body(node: str = "gpu-node-01", *, advice: str = "none", rule: str = "leak_detected", level: int | None = None,
         now_ns: int | None = None, ttl_s: float = 30.0, site: str = "default", recommend: bool = True,
         **changes: Any) -> dict[str, Any]:
    """A body for ``node``: ``advice`` "none" (takes work), "no_new_work" or "drain"; issued at
    ``now_ns`` (default: now) and expiring ``ttl_s`` later."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    blocked = advice != "none"
    level = (3 if advice == "drain" else 2 if blocked else 0) if level is None else level
    state = {0: "ok", 1: "degraded", 2: "throttled", 3: "drain", 4: "critical"}[level]
    reasons = [{"kind": "rule", "rule": rule, "severity": "critical", "gpu": None, "value": "1",
                "threshold": "leak=1", "since": iso(now_ns), "advice": advice, "action": "advise",
                "message": f"{rule} firing", "source": f"rule:{rule}", "level": level}] if blocked else []
    doc: dict[str, Any] = {
        "version": 1, "site": site, "node": node, "level": level, "state": state,
        "accept_new_work": not blocked, "advice": advice, "reasons": reasons,
        "node_cap_w": None, "draw_w": 3120.5, "gpus": [], "jobs": [],
        "generated_at": iso(now_ns), "age_s": 0.1, "expires_at": iso(now_ns + round(ttl_s * 1e9)),
    }
    if recommend:
        doc["recommendations"] = {
            "slurm": {"state": "DRAIN" if blocked else "RESUME",
                      "reason": f"agentd: {advice}: {rule}" if blocked else "",
                      "extra": {"agentd_level": level}},
            "kubernetes": {"taint": {"key": "agentd.io/throttle", "value": state,
                                     "effect": "NoExecute" if advice == "drain" else
                                     "NoSchedule" if blocked else None}},
        }
    doc.update(changes)
    return doc


def raw(node: str = "gpu-node-01", **kw: Any) -> bytes:
    return json.dumps(body(node, **kw)).encode()


class NodeApi:
    """A stand-in for the node API that slurm-sync talks to (until the daemon's own serves these
    tests): ``GET /v1/throttle`` answers ``bodies[node]`` (bytes, or an int status), and every
    ``PUT /v1/jobs/{job_id}`` is recorded and answered ``put_status``. One app serves every
    node: the node is the first path level, ``/{node}/v1/...``."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes | int] = {}
        self.puts: list[tuple[str, str, dict[str, Any], str | None]] = []  # node, job, body, Authorization
        self.put_status = 200
        self.gets = 0
        self.runner: Any = None
        self.url = ""

    def node_url(self, node: str) -> str:
        return f"{self.url}/{node}"

    async def start(self) -> NodeApi:
        from aiohttp import web

        async def throttle(request: web.Request) -> web.Response:
            self.gets += 1
            answer = self.bodies.get(request.match_info["node"], 404)
            if isinstance(answer, int):
                return web.json_response({"error": "not_found", "detail": "test"}, status=answer)
            return web.Response(body=answer, content_type="application/json")

        async def put_job(request: web.Request) -> web.Response:
            doc = await request.json()
            self.puts.append((request.match_info["node"], request.match_info["job"], doc,
                              request.headers.get("Authorization")))
            if self.put_status >= 300:
                return web.json_response({"error": "bad_request", "detail": "refused by the test"},
                                         status=self.put_status)
            return web.json_response({"job_id": request.match_info["job"], "class": doc.get("class"), "gpus": []})

        app = web.Application()
        app.router.add_get("/{node}/v1/throttle", throttle)
        app.router.add_put("/{node}/v1/jobs/{job}", put_job)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
