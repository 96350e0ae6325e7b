"""The real daemon on simulated GPUs with its API on a real socket (127.0.0.1, a free port), on a
fake clock: a test ticks it by hand and talks HTTP to it with aiohttp's client.

``Live.cdu`` (when ``coolant=True``) is the simulated CDU of tests/scenario.py: every tick takes
the node's heat, and its readings go through the coolant parser as MQTT messages would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agentd.api.auth import load_token
from agentd.api.server import ApiServer, start_api
from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.cdu_sim import CduModel, parse_fault, subscription_for
from collectors.sim import SimBackend
from tests.scenario import NODES_PER_CDU, OTHER_NODE_W

TOKEN = "t0ken-for-the-api-tests-0123456789"
# One site rule that always fires: a 450 W cap on every GPU (with the packs off nothing else moves).
SITE_CAP = """rules:
  - name: site_cap
    scope: node
    when: node.gpus > 0
    for: 0s
    severity: warning
    actions: [{type: cap_gpu, watts: 450}]
"""


def make_cfg(state_dir: Path, *, gpus: int = 4, coolant: bool = False, api: dict | None = None,
             rules: dict | None = None, **over: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "backend": "sim", "state_dir": str(state_dir), "node": "n1", "interval": 1.0, "sim": {"gpus": gpus},
        "rules": {"dirs": []} | (rules or {}), "api": {"listen": "127.0.0.1:0"} | (api or {}),
    }
    if coolant:
        data["coolant"] = {"subscriptions": [subscription_for("json")]}
    return AgentConfig.model_validate(data | over)


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-token"
    path.write_text(TOKEN + "\n")
    return path


@dataclass
class Live:
    daemon: Daemon
    backend: SimBackend
    clock: FakeClock
    server: ApiServer
    http: aiohttp.ClientSession
    cdu: CduModel | None = None

    async def tick(self, n: int = 1) -> None:
        """``n`` ticks, one interval of fake time apart (the CDU, when there is one, steps first)."""
        interval = self.daemon.cfg.interval
        for _ in range(n):
            if self.cdu is not None:
                gpu_w = sum((s.power_w or 0.0) for s in self.daemon.state.gpus.values() if s.healthy)
                self.cdu.step(interval, NODES_PER_CDU * (gpu_w + OTHER_NODE_W))
                self.daemon.coolant.handle_batch(self.cdu.messages(self.clock.wall_ns()))
                self.backend.coolant_supply_c = self.cdu.tcs_supply_c
            await self.daemon.tick()
            self.clock.advance(interval)

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.get(path, **kw) as r:
            body = await r.read()
            return r.status, json.loads(body) if body and r.content_type == "application/json" else body

    async def put(self, path: str, body: Any = None, *, raw: bytes | None = None, **kw: Any) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.put(path, data=data, headers=kw.pop("headers", {"Content-Type": "application/json"}),
                                 **kw) as r:
            out = await r.read()
            return r.status, json.loads(out) if out else None

    async def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.delete(path, **kw) as r:
            out = await r.read()
            return r.status, json.loads(out) if out else None

    def targets(self) -> dict[int, float | None]:
        return {i: c.target_w for i, c in self.daemon.actuator.controls.items()}


@asynccontextmanager
async def live_daemon(cfg: AgentConfig, *, clock: FakeClock | None = None, backend: SimBackend | None = None,
                      faults: list[str] | None = None, start: bool = True) -> AsyncIterator[Live]:
    """The daemon started (unless ``start`` is false: before its first tick even began), its API
    listening; everything stopped afterwards in reverse order."""
    clock = clock or FakeClock()
    backend = backend or SimBackend(gpus=cfg.sim.gpus, seed=cfg.sim.seed, coolant_supply_c=cfg.sim.coolant_supply_c)
    daemon = Daemon(cfg, backend, open_store(cfg), clock=clock)
    if start:
        await daemon.start()
    server = await start_api(daemon.api, cfg.api, load_token(cfg.api))
    assert server is not None
    cdu = None
    if cfg.coolant.subscriptions:
        cdu = CduModel(seed=cfg.sim.seed, faults=[parse_fault(f) for f in faults or []])
    http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}")
    try:
        yield Live(daemon, backend, clock, server, http, cdu)
    finally:
        await http.close()
        await server.stop()
        await daemon.shutdown()
