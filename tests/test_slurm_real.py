"""agentd slurm-sync against the real one-node Slurm (slurmctld + slurmd + munge, scripts/services)
and the real Mosquitto: throttle bodies published retained as a node publishes them, Slurm read
back with its own clients (sinfo --json), never through the code under test.

The node API is a small aiohttp app (tests/slurm_helpers.NodeApi) serving GET /v1/throttle and
recording PUT /v1/jobs/{job_id}, until the daemon's own API serves these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from agentd.schedulers.config import parse_sync_config
from agentd.schedulers.slurm_cli import build_service
from agentd.clock import FakeClock
from collectors.cdu_sim import parse_fault
from collectors.sim import SimBackend
from tests.api_harness import live_daemon, make_cfg, token_file
from tests.services import Services, SlurmCluster
from tests.slurm_helpers import NodeApi, raw

pytestmark = pytest.mark.integration

REASON = "agentd: drain: leak_detected"


@pytest.fixture(autouse=True)
def _slurm_env(slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code under test runs sinfo / scontrol / squeue: they find the test cluster by SLURM_CONF."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))


@pytest.fixture
def site() -> str:
    """A site of this test's own: retained bodies of other tests are under other topics."""
    return f"t{uuid.uuid4().hex[:10]}"


class Broker:
    """Publishes retained throttle bodies as a node does; deletes them after the test."""

    def __init__(self, services: Services, site: str) -> None:
        self.services = services
        self.site = site
        self.topics: set[str] = set()

    async def publish(self, node: str, payload: bytes) -> None:
        topic = f"agentd/v1/{self.site}/nodes/{node}/throttle"
        self.topics.add(topic)
        async with aiomqtt.Client(self.services.mqtt_host, self.services.mqtt_port) as client:
            await client.publish(topic, payload, qos=1, retain=True)

    async def clear(self) -> None:
        async with aiomqtt.Client(self.services.mqtt_host, self.services.mqtt_port) as client:
            for topic in self.topics:
                await client.publish(topic, b"", qos=1, retain=True)


@pytest.fixture
async def broker(services: Services, site: str) -> AsyncIterator[Broker]:
    b = Broker(services, site)
    yield b
    await b.clear()


@pytest.fixture
async def node_api() -> AsyncIterator[NodeApi]:
    api = await NodeApi().start()
    yield api
    await api.stop()


def mqtt_settings(services: Services, site: str, **extra: Any) -> dict[str, Any]:
    return {"interval": "1s", "source": {"kind": "mqtt", "site": site},
            "mqtt": {"host": services.mqtt_host, "port": services.mqtt_port}, **extra}


async def once(settings: dict[str, Any]):  # type: ignore[no-untyped-def]
    cfg = parse_sync_config(settings)
    service = build_service(cfg, cfg.api_token())
    service.settle_s = 5.0
    return await service.once()


def extra_of(slurm: SlurmCluster) -> dict[str, Any] | str:
    text = slurm.node_info()["extra"]
    return json.loads(text) if text.startswith("{") else text


async def test_mqtt_bodies_drain_the_node_with_our_reason_and_recovery_resumes_it(
        services: Services, slurm: SlurmCluster, broker: Broker, site: str, tmp_path: Path) -> None:
    await broker.publish(slurm.node, raw(slurm.node, advice="drain", site=site))
    # the drain through the command itself, as systemd runs it
    config = tmp_path / "slurm-sync.toml"
    config.write_text(f'set_extra = true\n[source]\nkind = "mqtt"\nsite = "{site}"\n'
                      f'[mqtt]\nhost = "{services.mqtt_host}"\nport = {services.mqtt_port}\n')
    done = subprocess.run([sys.executable, "-c", "from agentd.cli import main; main()", "slurm-sync",
                           "--config", str(config), "--once"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SLURM_CONF=str(slurm.conf)))
    assert done.returncode == 0, done.stdout + done.stderr
    updated = [json.loads(line) for line in done.stdout.splitlines() if '"slurm_node_updated"' in line]
    assert [(u["action"], u["from"], u["to"], u["reason"]) for u in updated] == [
        ("drain", "IDLE", "DRAIN", REASON), ("extra", "", '{"agentd_level":3}', None)]
    info = slurm.node_info()
    assert "DRAIN" in slurm.node_flags() and info["reason"] == REASON  # what scontrol / sinfo -R show
    assert extra_of(slurm) == {"agentd_level": 3}
    assert REASON in slurm.run("scontrol", "show", "node", slurm.node)

    result = await once(mqtt_settings(services, site, set_extra=True))  # nothing changed: nothing to do
    assert result.slurm_ok and result.applied == []

    await broker.publish(slurm.node, raw(slurm.node, site=site))
    result = await once(mqtt_settings(services, site, set_extra=True))
    assert [a.kind for a in result.applied] == ["resume", "extra"]
    assert "DRAIN" not in slurm.node_flags() and slurm.node_info()["reason"] == ""
    assert extra_of(slurm) == {"agentd_level": 0}


async def test_a_failed_gpu_on_the_real_daemon_drains_the_slurm_node_and_its_reset_resumes_it(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    """The whole path: a simulated Xid 79 on GPU 1 -> health fail -> the gpu_health pack's drain
    advice -> the daemon's GET /v1/throttle -> slurm-sync (polling) -> DRAIN with our reason; the
    GPU's reset (the fault ends) -> health ok for the pack's 1 min -> RESUME."""
    cfg = make_cfg(tmp_path / "node", gpus=2, node=slurm.node)
    backend = SimBackend(gpus=2, faults=[parse_fault("xid79:1@3+10")])
    # the daemon's fake clock starts at the real wall time: slurm-sync judges expiry by its own
    async with live_daemon(cfg, backend=backend, clock=FakeClock(start_wall_ns=time.time_ns())) as live:
        settings = {"source": {"kind": "poll", "nodes": [{"name": slurm.node,
                                                           "url": f"http://127.0.0.1:{live.server.port}"}]}}
        await live.tick(2)
        assert (await once(settings)).applied == []  # healthy: nothing to do
        await live.tick(4)
        _, body = await live.get("/v1/throttle")
        assert body["accept_new_work"] is False and body["advice"] == "drain", body
        result = await once(settings)
        assert [a.kind for a in result.applied] == ["drain"]
        reason = slurm.node_info()["reason"]
        assert "DRAIN" in slurm.node_flags() and reason.startswith("agentd: drain") and "gpu_health_fail" in reason
        await live.tick(80)  # the fault ends at 13 s (a reset), then health stays ok for the pack's 1 min
        _, body = await live.get("/v1/throttle")
        assert body["accept_new_work"] is True, body
        assert [a.kind for a in (await once(settings)).applied] == ["resume"]
        assert "DRAIN" not in slurm.node_flags() and slurm.node_info()["reason"] == ""


async def test_a_node_drained_by_hand_stays_drained_after_recovery(
        services: Services, slurm: SlurmCluster, broker: Broker, site: str) -> None:
    hand = "maint: DIMM swap (by hand)"
    slurm.run("scontrol", "update", f"NodeName={slurm.node}", "State=DRAIN", f"Reason={hand}")
    await broker.publish(slurm.node, raw(slurm.node, advice="drain", site=site))
    result = await once(mqtt_settings(services, site, set_extra=True))
    assert result.applied == [] and slurm.node_info()["reason"] == hand  # not even the reason rewritten

    await broker.publish(slurm.node, raw(slurm.node, site=site))  # the node recovers
    result = await once(mqtt_settings(services, site, set_extra=True))
    assert result.applied == []
    assert "DRAIN" in slurm.node_flags() and slurm.node_info()["reason"] == hand
    assert slurm.node_info()["extra"] == ""  # nor its Extra


async def test_an_expired_body_never_resumes(services: Services, slurm: SlurmCluster, broker: Broker,
                                             site: str) -> None:
    await broker.publish(slurm.node, raw(slurm.node, advice="drain", site=site))
    assert [a.kind for a in (await once(mqtt_settings(services, site))).applied] == ["drain"]
    import time

    old = time.time_ns() - 120 * 10**9  # the last word of a node that died two minutes ago
    await broker.publish(slurm.node, raw(slurm.node, site=site, now_ns=old, ttl_s=30))
    result = await once(mqtt_settings(services, site))
    assert result.applied == [] and "DRAIN" in slurm.node_flags() and slurm.node_info()["reason"] == REASON


async def test_polled_node_apis_drain_and_resume(slurm: SlurmCluster, node_api: NodeApi) -> None:
    settings = {"source": {"kind": "poll", "nodes": [{"name": slurm.node, "url": node_api.node_url(slurm.node)}]}}
    node_api.bodies[slurm.node] = raw(slurm.node, advice="no_new_work", rule="gpu_health")
    result = await once(settings)
    assert [a.kind for a in result.applied] == ["drain"]
    assert slurm.node_info()["reason"] == "agentd: no_new_work: gpu_health"

    node_api.bodies[slurm.node] = 503  # the node API is down: nothing changes
    assert (await once(settings)).applied == [] and "DRAIN" in slurm.node_flags()

    node_api.bodies[slurm.node] = raw(slurm.node)
    assert [a.kind for a in (await once(settings)).applied] == ["resume"]
    assert "DRAIN" not in slurm.node_flags()


async def test_the_class_and_priority_of_a_running_job_reach_the_daemon(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Real sbatch jobs -> squeue --json -> slurm-sync -> PUT /v1/jobs on the real daemon's API
    (simulated GPUs) -> its job tracker; the throttle body it polls is the daemon's own."""
    high = slurm.sbatch("--partition", slurm.partitions[1], "--wrap", "sleep 60")
    low = slurm.sbatch("--partition", slurm.partitions[0], "--nice=100", "--wrap", "sleep 60")
    slurm.wait_running(high)
    slurm.wait_running(low)
    priority = {str(j["job_id"]): j["priority"] for j in slurm.jobs()}
    assert priority[low] < priority[high]  # --nice lowers Slurm's number

    token = token_file(tmp_path)
    cfg = make_cfg(tmp_path / "node", gpus=2, node=slurm.node, api={"token_file": str(token)})
    async with live_daemon(cfg) as live:
        await live.tick(2)
        settings = {"push_priorities": True, "api_token_file": str(token),
                    "source": {"kind": "poll", "nodes": [{"name": slurm.node,
                                                           "url": f"http://127.0.0.1:{live.server.port}"}]},
                    "jobs": {"default_class": "low", "classes": [{"partition": slurm.partitions[1], "class": "high"}]}}
        with capture_logs() as logs:
            result = await once(settings)
        assert result.slurm_ok and result.applied == []  # the daemon's body says ok: nothing to drain
        assert live.daemon.jobs.classes.hints() == {high: "high", low: "low"}
    pushed = {e["job"]: e for e in logs if e["event"] == "job_hint_set"}
    assert pushed[high]["priority"] == priority[high] and pushed[low]["priority"] == priority[low]


async def test_a_pass_while_slurmctld_is_down_changes_nothing_and_says_why(
        services: Services, slurm: SlurmCluster, broker: Broker, site: str) -> None:
    await broker.publish(slurm.node, raw(slurm.node, advice="drain", site=site))
    services.stop("slurmctld")
    try:
        result = await once(mqtt_settings(services, site))
    finally:
        services.start("slurmctld")
    assert not result.slurm_ok and result.applied == []
    assert result.error is not None and "sinfo --json" in result.error and "scontrol ping" in result.error
    slurm.reset()  # waits until slurmd has registered again
    assert "DRAIN" not in slurm.node_flags()
    assert [a.kind for a in (await once(mqtt_settings(services, site))).applied] == ["drain"]  # once it is back
