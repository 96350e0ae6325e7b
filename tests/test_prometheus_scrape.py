"""A real Prometheus scrapes GET /metrics of a running daemon (8 simulated GPUs) and answers
PromQL about it: one agentd_gpu_power_watts series per GPU, dcgm-exporter's names beside ours,
counters filed as counters, and an energy counter that rate() can read.

The endpoint is the daemon's own API (agentd/api/server.py, GET /metrics); the Prometheus server
is the shared one of scripts/services (the ``prometheus`` fixture of tests/services.py: file_sd
targets, 1 s scrapes), which this test points at its daemon alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentd.api.server import start_api
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.sim import SimBackend
from tests.services import Prometheus

pytestmark = pytest.mark.integration

GPUS = 8
DEADLINE_S = 60.0  # Prometheus' start plus a few 1 s scrapes, on 2 shared cores
POLL_S = 0.2


async def until(what: str, probe: Callable[[], Any], deadline_s: float = DEADLINE_S) -> Any:
    """Poll the coroutine ``probe`` until it returns something truthy; fail naming ``what``."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(POLL_S)
    pytest.fail(f"{what}: not within {deadline_s:.0f} s (last answer: {last!r})")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """The real daemon on the simulator, ticking on the real clock until the test ends, with its
    API (dcgm_compat on) on a free loopback port."""
    cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path / "state"), "node": "scrape-node",
                                      "interval": 0.25, "sim": {"gpus": GPUS},
                                      "api": {"listen": "127.0.0.1:0", "metrics_dcgm_compat": True}})
    d = Daemon(cfg, SimBackend(gpus=GPUS), open_store(cfg))
    await d.start()
    server = await start_api(d.api, cfg.api, None)
    assert server is not None
    d.api_port = server.port  # type: ignore[attr-defined]  (for the endpoint fixture)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop), name="daemon")
    yield d
    stop.set()
    await asyncio.wait_for(task, 30)
    await server.stop()


@pytest.fixture
def endpoint(daemon: Daemon, prometheus: Prometheus) -> Iterator[str]:
    """``host:port`` of the daemon's API, a target of the shared Prometheus (scripts/services
    prometheus: file_sd, 1 s scrapes) for this test only."""
    target = f"127.0.0.1:{daemon.api_port}"  # type: ignore[attr-defined]
    prometheus.set_targets([target])
    yield target
    prometheus.clear_targets()



async def api(session: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    """Prometheus' /api/v1/<path> ``data`` (None while it is not answering yet)."""
    try:
        async with session.get(f"{url}/api/v1/{path}", params=params) as resp:
            doc = await resp.json()
    except (aiohttp.ClientError, ValueError):
        return None
    assert doc.get("status") == "success", f"Prometheus {path} {params}: {doc}"
    return doc["data"]


async def query(session: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    data = await api(session, url, "query", query=promql)
    return [] if data is None else list(data["result"])


async def test_a_real_prometheus_scrapes_one_power_series_per_gpu(daemon: Daemon, endpoint: str,
                                                                  prometheus: Prometheus):
    url = prometheus.url
    target = f'job="agentd",instance="{endpoint}"'  # this test's series only, on any Prometheus
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def power():
            found = await query(session, url, f"agentd_gpu_power_watts{{{target}}}")
            return found if len(found) == GPUS else None

        series = await until(f"{GPUS} agentd_gpu_power_watts series in Prometheus", power)
        assert sorted(int(s["metric"]["gpu"]) for s in series) == list(range(GPUS))
        assert {s["metric"]["uuid"] for s in series} == {i.uuid for i in daemon.state.infos.values()}
        for s in series:
            assert s["metric"]["instance"] == endpoint and s["metric"]["model"] == "Simulated H200"
            assert 0 < float(s["value"][1]) <= 1000
        assert [float(s["value"][1]) for s in await query(session, url, f"up{{{target}}}")] == [1.0]

        dcgm = await query(session, url, f"DCGM_FI_DEV_POWER_USAGE{{{target}}}")
        assert sorted(s["metric"]["device"] for s in dcgm) == sorted(f"nvidia{i}" for i in range(GPUS))
        assert {s["metric"]["Hostname"] for s in dcgm} == {"scrape-node"}

        # Prometheus files each counter under the name its samples carry, as a counter
        for name in ("agentd_gpu_energy_joules_total", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "agentd_ticks_total"):
            meta = await until(f"metadata for {name}", lambda n=name: api(session, url, "metadata", metric=n))
            assert [m["type"] for m in meta[name]] == ["counter"], name

        # the energy counter grows between scrapes (held between the simulator's reads): rate() sees it
        async def rate():
            found = await query(session, url, f"rate(agentd_gpu_energy_joules_total{{{target}}}[4s])")
            return found if len(found) == GPUS and all(float(s["value"][1]) > 0 for s in found) else None

        rates = await until("a positive energy rate for every GPU", rate)
        assert all(float(s["value"][1]) <= 1000 for s in rates)  # joules per second: watts, within a GPU's range
