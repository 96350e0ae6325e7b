"""The parts of agentd slurm-sync around the decision: settings, Slurm's JSON and commands, the
sources of bodies, the job hints, the pass loop and the command line. No real Slurm here
(tests/test_slurm_real.py has it): recorded answers and a local aiohttp node API."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from agentd.clock import FakeClock
from agentd.schedulers.config import (
    PolledNode,
    SlurmCommands,
    SyncConfigError,
    load_sync_config,
    parse_sync_config,
)
from agentd.schedulers.priorities import (
    PriorityPusher,
    RunningJob,
    _Sent,
    expand_hostlist,
    plan_pushes,
    running_jobs,
)
from agentd.schedulers.scontrol import Slurm, SlurmError, SlurmNode, parse_sinfo_json, run_command
from agentd.schedulers.service import SlurmSyncService
from agentd.schedulers.slurm_cli import slurm_sync
from agentd.schedulers.slurm_sync import SyncCore
from agentd.schedulers.sources import MqttSource, PollSource
from agentd.schedulers.throttle import NodeThrottle
from collectors.jobs import JobsConfig
from tests.slurm_helpers import NodeApi, raw
from tests.test_units import needs_systemd_analyze, unit_for

FIXTURES = Path(__file__).parent / "fixtures"
SINFO = (FIXTURES / "slurm" / "sinfo-22.05.json").read_bytes()  # real 22.05.8: node "vm", drained by us, Extra set
SQUEUE = (FIXTURES / "jobs" / "squeue-22.05.json").read_bytes()  # real 22.05.8: jobs 1 (prod), 2 running on vm


def sinfo_with(*nodes: dict) -> bytes:
    """The recorded answer with its one node replaced by copies changed as given."""
    doc = json.loads(SINFO)
    [template] = doc["nodes"]
    doc["nodes"] = [{**template, **n} for n in nodes]
    return json.dumps(doc).encode()


class Runner:
    """Slurm's clients stand-in: answers sinfo with ``sinfo`` (bytes or an exception), records
    every command, fails updates named in ``fail``."""

    def __init__(self, sinfo: bytes | Exception = SINFO, fail: dict[str, str] | None = None) -> None:
        self.sinfo = sinfo
        self.fail = fail or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv, timeout_s):
        self.calls.append(list(argv))
        if argv[1] == "--json":
            if isinstance(self.sinfo, Exception):
                raise self.sinfo
            return self.sinfo
        for word, message in self.fail.items():
            if any(word in a for a in argv):
                raise SlurmError(f"{' '.join(argv)} exited with 1: {message}")
        return b""

    @property
    def updates(self) -> list[list[str]]:
        return [c[2:] for c in self.calls if c[1] == "update"]


# -- settings -----------------------------------------------------------------------------------

def test_the_defaults_need_only_a_broker():
    cfg = parse_sync_config({"mqtt": {"host": "mqtt"}})
    assert cfg.source.kind == "mqtt" and cfg.reason_prefix == "agentd:" and cfg.interval_s == 10.0
    assert not cfg.set_extra and not cfg.push_priorities and cfg.max_updates_per_minute == 30
    assert cfg.slurm_name("gpu-01") == "gpu-01" and cfg.api_url("gpu-01") == "http://gpu-01:9410"


def test_names_and_urls_map_as_configured():
    cfg = parse_sync_config({"node_names": {"gpu-01.dc": "gpu01"}, "priorities": {"api_url": "https://{node}.x:9"},
                             "source": {"kind": "poll", "nodes": [{"name": "gpu-02", "url": "http://10.0.0.2:9410/"}]}})
    assert cfg.slurm_name("gpu-01.dc") == "gpu01" and cfg.slurm_name("gpu-02") == "gpu-02"
    assert cfg.api_url("gpu-02") == "http://10.0.0.2:9410" and cfg.api_url("gpu-01.dc") == "https://gpu-01.dc.x:9"


@pytest.mark.parametrize(("data", "message"), [
    ({}, r"source.kind = \"mqtt\" needs \[mqtt\] host"),
    ({"source": {"kind": "poll"}}, "needs nodes"),
    ({"source": {"kind": "poll", "nodes": [{"name": "a", "url": "a:9410"}]}}, "source.nodes.0.url: must be an http"),
    ({"source": {"kind": "poll", "nodes": [{"name": "a", "url": "http://a"}, {"name": "a", "url": "http://b"}]}},
     "lists a more than once"),
    ({"mqtt": {"host": "m"}, "source": {"nodes": [{"name": "a", "url": "http://a"}]}}, "nodes is for kind"),
    ({"mqtt": {"host": "m"}, "source": {"site": "a/b"}}, "source.site: .*cannot"),
    ({"mqtt": {"host": "m"}, "interval": "0s"}, "interval: must be more than 0"),
    ({"mqtt": {"host": "m"}, "interval": "2h"}, "interval: must be between"),
    ({"mqtt": {"host": "m"}, "reason_prefix": " agentd:"}, "reason_prefix: must be"),
    ({"mqtt": {"host": "m"}, "max_updates_per_minute": 0}, "max_updates_per_minute"),
    ({"mqtt": {"host": "m"}, "node_names": {"a": "gpu[01-02]"}}, "not a Slurm NodeName"),
    ({"mqtt": {"host": "m"}, "node_names": {"a": "g1", "b": "g1"}}, "several agentd nodes map to the Slurm node g1"),
    ({"mqtt": {"host": "m"}, "priorities": {"api_url": "http://{host}:9410"}}, "only {node}"),
    ({"mqtt": {"host": "m"}, "slurm": {"timeout": "soon"}}, "slurm.timeout"),
    ({"mqtt": {"host": "m"}, "jobs": {"classes": [{"partition": "p", "class": "urgent"}]}}, "unknown class"),
    ({"mqtt": {"host": "m"}, "set_extras": True}, "set_extras: unknown key"),
])
def test_a_bad_setting_is_refused_naming_the_file_and_key(data, message):
    with pytest.raises(SyncConfigError) as info:
        parse_sync_config(data, "/etc/agentd/slurm-sync.toml")
    assert any(line.startswith("/etc/agentd/slurm-sync.toml: ") for line in info.value.errors)
    assert any(re.search(message, line) for line in info.value.errors), info.value.errors


def test_the_file_itself_must_be_there_and_be_toml(tmp_path):
    with pytest.raises(SyncConfigError, match="no such file"):
        load_sync_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("interval = [")
    with pytest.raises(SyncConfigError, match="not valid TOML"):
        load_sync_config(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(SyncConfigError, match="not a text file"):
        load_sync_config(bad)


def test_the_token_file_is_read_and_its_problems_named(tmp_path):
    token = tmp_path / "token"
    cfg = parse_sync_config({"mqtt": {"host": "m"}, "api_token_file": str(token)})
    with pytest.raises(SyncConfigError, match="api_token_file: cannot read"):
        cfg.api_token()
    token.write_text("\n")
    with pytest.raises(SyncConfigError, match="is empty"):
        cfg.api_token()
    token.write_text("s3cret\n")
    assert cfg.api_token() == "s3cret"
    assert parse_sync_config({"mqtt": {"host": "m"}}).api_token() is None


# -- Slurm's JSON and commands ------------------------------------------------------------------

def test_the_recorded_sinfo_answer_reads():
    [node] = parse_sinfo_json(SINFO).values()
    assert node == SlurmNode("vm", frozenset({"IDLE", "DRAIN"}), "agentd: drain: leak_detected",
                             '{"agentd_level":3,"site_rack":"r1"}')
    assert node.drained and not node.unavailable and node.state_text == "IDLE+DRAIN"


def test_an_empty_cluster_is_no_error():
    assert parse_sinfo_json(b'{"errors": [], "nodes": []}') == {}


def test_the_23_02_shape_reads_the_same():
    raw_23 = json.dumps({"nodes": [{"name": "g1", "state": ["MIXED", "DRAIN"], "reason": "x", "extra": ""},
                                   {"name": "g2", "state": ["DOWN", "NOT_RESPONDING"]}]})
    nodes = parse_sinfo_json(raw_23)
    assert nodes["g1"].state == {"MIXED", "DRAIN"} and nodes["g1"].state_text == "MIXED+DRAIN"
    assert nodes["g2"].unavailable and nodes["g2"].reason == ""


@pytest.mark.parametrize(("answer", "message"), [
    (b"sinfo: error", "not JSON"), (b'{"errors": [{"error": "boom"}]}', "no \"nodes\" list.*boom"),
    # what 22.05 prints, with exit status 0, while slurmctld is down (recorded)
    (b'{"meta": {}, "errors": [{"error": "Unspecified error", "errno": -1}], "nodes": []}',
     "listed no node and reported errors: .*Unspecified error.*scontrol ping"),
])
def test_an_answer_that_is_not_sinfos_json_is_an_error(answer, message):
    with pytest.raises(SlurmError, match=message):
        parse_sinfo_json(answer)


def test_updates_are_one_argv_element_per_setting():
    runner = Runner()
    slurm = Slurm(SlurmCommands(scontrol="/usr/bin/scontrol"), runner)
    slurm.drain("gpu01", 'agentd: drain: leak "x" = y')
    slurm.resume("gpu01")
    slurm.set_extra("gpu01", '{"agentd_level":2}')
    assert runner.calls == [
        ["/usr/bin/scontrol", "update", "NodeName=gpu01", "State=DRAIN", 'Reason=agentd: drain: leak "x" = y'],
        ["/usr/bin/scontrol", "update", "NodeName=gpu01", "State=RESUME"],
        ["/usr/bin/scontrol", "update", "NodeName=gpu01", 'Extra={"agentd_level":2}'],
    ]
    assert slurm.calls == 3 and slurm.failures == 0


def test_an_oversized_sinfo_answer_is_refused():
    slurm = Slurm(SlurmCommands(max_output_bytes=1024), Runner(sinfo_with(*[{"name": f"n{i}"} for i in 5 * [0]])))
    with pytest.raises(SlurmError, match="above slurm.max_output_bytes"):
        slurm.nodes()


def test_a_failing_command_is_named_with_its_stderr(tmp_path):
    script = tmp_path / "scontrol"
    script.write_text("#!/bin/sh\necho 'slurm_update error: Invalid user id' >&2\nexit 1\n")
    script.chmod(0o755)
    with pytest.raises(SlurmError, match=r"scontrol update NodeName=x State=RESUME exited with 1: "
                                         r"slurm_update error: Invalid user id"):
        run_command([str(script), "update", "NodeName=x", "State=RESUME"], 5)
    with pytest.raises(SlurmError, match="'/no/such/scontrol' not found"):
        run_command(["/no/such/scontrol"], 5)
    with pytest.raises(SlurmError, match=r"no answer within 0.2s \(slurm.timeout\)"):
        run_command([sys.executable, "-c", "import time; time.sleep(5)"], 0.2)


# -- job hints -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "names"), [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[9-11],login1", ["gpu9", "gpu10", "gpu11", "login1"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a,b[1]", ["a", "b1"]),
])
def test_slurm_host_lists_expand(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "gpu[[1]]", "n[0-9999999]"])
def test_a_bad_host_list_is_an_error(text):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(text)


def classes(*rules, default="normal"):
    from collectors.job_classes import ClassProvider

    cfg = JobsConfig.model_validate({"default_class": default, "classes": list(rules), "slurm": {"enabled": True}})
    provider = ClassProvider(cfg, monotonic=FakeClock().monotonic, runner=lambda argv, t: SQUEUE)
    provider.refresh(force=True)
    return provider


def test_running_jobs_carry_their_nodes_priority_and_class_from_the_jobs_rules():
    jobs, bad = running_jobs(SQUEUE, classes({"partition": "prod", "class": "high"}))
    assert bad == 0
    assert jobs == [RunningJob("1", ("vm",), "high", 4294901759), RunningJob("2", ("vm",), "normal", 4294901758)]


def test_the_23_11_queue_shape_reads_too():
    doc = {"jobs": [{"job_id": 7, "job_state": ["RUNNING"], "priority": {"set": True, "infinite": False, "number": 9},
                     "job_resources": {"nodes": {"count": 2, "list": "g[1-2]"}}, "partition": "p"},
                    {"job_id": 8, "job_state": ["COMPLETED"], "nodes": "g1"}, {"job_id": "x"}]}
    jobs, bad = running_jobs(json.dumps(doc).encode(), classes())
    assert jobs == [RunningJob("7", ("g1", "g2"), "normal", 9)] and bad == 1


def test_hints_go_to_known_nodes_when_new_changed_or_due_again():
    jobs = [RunningJob("1", ("g1", "g2", "cpu9"), "high", 5)]
    plan = plan_pushes(jobs, agentd_name=lambda n: n, nodes={"g1", "g2"}, sent={}, now=0.0, repush_s=600)
    assert [(p.node, p.job_id, p.body) for p in plan] == [("g1", "1", {"class": "high", "priority": 5}),
                                                          ("g2", "1", {"class": "high", "priority": 5})]
    sent = {("g1", "1"): _Sent("high", 5, 0.0), ("g2", "1"): _Sent("normal", 5, 0.0)}
    plan = plan_pushes(jobs, agentd_name=lambda n: n, nodes={"g1", "g2"}, sent=sent, now=10.0, repush_s=600)
    assert [p.node for p in plan] == ["g2"]  # g1 has it; g2's class changed
    plan = plan_pushes(jobs, agentd_name=lambda n: n, nodes={"g1", "g2"}, sent=sent, now=600.0, repush_s=600)
    assert [p.node for p in plan] == ["g1", "g2"]


def pusher(api: NodeApi, clock: FakeClock, **kw) -> PriorityPusher:
    jobs = JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "high"}]})
    return PriorityPusher(jobs, url_of=api.node_url, agentd_name=lambda n: n, interval_s=30, timeout_s=5,
                          repush_s=600, monotonic=clock.monotonic, runner=lambda argv, t: SQUEUE, **kw)


async def test_hints_are_put_to_the_node_api_with_the_token_and_not_repeated():
    api = await NodeApi().start()
    clock = FakeClock()
    try:
        p = pusher(api, clock, token="s3cret")
        import aiohttp

        async with aiohttp.ClientSession() as session:
            jobs = p.read_queue()
            assert jobs is not None
            with capture_logs() as logs:
                assert await p.push(session, jobs, {"vm"}) == 2
            assert sorted((n, j, b["class"], b["priority"], auth) for n, j, b, auth in api.puts) == [
                ("vm", "1", "high", 4294901759, "Bearer s3cret"), ("vm", "2", "normal", 4294901758, "Bearer s3cret")]
            assert {e["event"] for e in logs} == {"job_hint_pushed"}
            assert await p.push(session, jobs, {"vm"}) == 0 and len(api.puts) == 2  # unchanged: not sent again
            assert await p.push(session, jobs, {"other"}) == 0  # a node without agentd is not asked
    finally:
        await api.stop()


async def test_a_refused_hint_waits_for_repush_and_a_failed_one_is_retried():
    api = await NodeApi().start()
    clock = FakeClock()
    try:
        p = pusher(api, clock)
        import aiohttp

        async with aiohttp.ClientSession() as session:
            jobs = [RunningJob("1", ("vm",), "high", 1)]
            api.put_status = 400
            with capture_logs() as logs:
                assert await p.push(session, jobs, {"vm"}) == 0
            [refused] = [e for e in logs if e["event"] == "job_hint_refused"]
            assert refused["status"] == 400 and "refused by the test" in refused["answer"]
            assert await p.push(session, jobs, {"vm"}) == 0 and len(api.puts) == 1  # not asked again at once
            clock.advance(600)
            api.put_status = 503
            assert await p.push(session, jobs, {"vm"}) == 0 and len(api.puts) == 2
            api.put_status = 200
            assert await p.push(session, jobs, {"vm"}) == 1 and len(api.puts) == 3  # a 5xx is retried
            assert (p.refused, p.failed, p.pushed) == (1, 1, 1)
    finally:
        await api.stop()


def test_a_failing_squeue_pushes_nothing_and_says_so():
    clock = FakeClock()

    def broken(argv, t):
        from collectors.job_classes import SqueueError

        raise SqueueError("squeue exited with 1: slurm_load_jobs error: Unable to contact slurm controller")

    p = PriorityPusher(JobsConfig(), url_of=lambda n: "http://x", agentd_name=lambda n: n, interval_s=30,
                       timeout_s=5, repush_s=600, monotonic=clock.monotonic, runner=broken)
    with capture_logs() as logs:
        assert p.read_queue() is None
    assert [e["event"] for e in logs] == ["squeue_failed"] and "Unable to contact" in logs[0]["error"]


# -- sources -------------------------------------------------------------------------------------

class _Link:
    def __init__(self, cfg, **kw) -> None:
        self.kw = kw
        self.connects = 1


def mqtt_source(**kw) -> MqttSource:
    from agentd.config import MqttConfig

    return MqttSource(MqttConfig(host="127.0.0.1"), "default", monotonic=FakeClock().monotonic,
                      link_factory=_Link, **kw)


def test_the_mqtt_source_subscribes_to_every_nodes_retained_body():
    src = mqtt_source()
    assert src.link.kw["subscriptions"] == [("agentd/v1/default/nodes/+/throttle", 1)]
    assert src.link.kw["client_id"].startswith("agentd-slurm-sync-")


def test_the_mqtt_source_keeps_the_last_good_body_over_a_broken_one():
    src = mqtt_source()
    topic = "agentd/v1/default/nodes/g1/throttle"
    src.on_messages([(topic, raw("g1", advice="drain"))])
    assert isinstance(src.latest()["g1"], NodeThrottle) and src.latest()["g1"].drain
    with capture_logs() as logs:
        src.on_messages([(topic, b"{broken"), (topic, raw("g2"))])  # unreadable; another node's body
    assert src.latest()["g1"].drain and src.refused == 2  # still the last good one
    assert [e["event"] for e in logs] == ["throttle_refused", "throttle_refused"]
    assert "names node 'g2'" in logs[1]["error"]
    src.on_messages([("agentd/v1/other/nodes/g3/throttle", raw("g3")), ("x/nodes/g4/throttle", raw("g4"))])
    assert set(src.latest()) == {"g1"}  # other sites and stray topics are not ours
    src.on_messages([(topic, b"")])  # the retained body deleted
    assert "deleted" in src.latest()["g1"]


async def test_the_poll_source_reads_each_node_and_names_what_failed():
    api = await NodeApi().start()
    try:
        api.bodies = {"g1": raw("g1", advice="drain"), "g2": 503, "g3": b"not json"}
        nodes = [PolledNode(name=n, url=api.node_url(n)) for n in ("g1", "g2", "g3")]
        src = PollSource(nodes, interval_s=1, timeout_s=2, token="t")
        import aiohttp

        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                await src.poll_once(session)
        seen = src.latest()
        assert isinstance(seen["g1"], NodeThrottle) and seen["g1"].drain
        assert seen["g2"].startswith(f"GET {api.node_url('g2')}/v1/throttle: HTTP 503")
        assert "not JSON" in seen["g3"] and list(src.expected) == ["g1", "g2", "g3"]
        assert {e["event"] for e in logs} == {"throttle_fetch_failed", "throttle_refused"}
        assert await src.settle(0.1)
    finally:
        await api.stop()


# -- a pass ---------------------------------------------------------------------------------------

class _Source:
    def __init__(self, bodies, expected=()) -> None:
        self.bodies = bodies
        self.expected = expected

    def latest(self):
        return dict(self.bodies)

    async def run(self, stop):
        await stop.wait()

    async def settle(self, timeout_s):
        return True


def service(runner: Runner, bodies, *, dry_run=False, max_per_minute=30, set_extra=False) -> SlurmSyncService:
    core = SyncCore(prefix="agentd:", set_extra=set_extra, max_per_minute=max_per_minute, slurm_name=lambda n: n)
    return SlurmSyncService(core, Slurm(SlurmCommands(), runner), _Source(bodies), clock=FakeClock(),
                            interval_s=1, dry_run=dry_run)


def ours_drained() -> bytes:
    return sinfo_with({"name": "vm", "state": "idle", "state_flags": ["DRAIN"], "reason": "agentd: drain: leak",
                       "extra": ""})


async def test_a_pass_runs_the_updates_and_logs_each_with_node_from_to_reason():
    from agentd.schedulers.throttle import parse_body

    runner = Runner(sinfo_with({"name": "vm", "state": "idle", "state_flags": [], "reason": "", "extra": ""}))
    svc = service(runner, {"vm": parse_body(raw("vm", advice="drain"))})
    with capture_logs() as logs:
        result = await svc.run_pass()
    assert runner.updates == [["NodeName=vm", "State=DRAIN", "Reason=agentd: drain: leak_detected"]]
    assert [a.kind for a in result.applied] == ["drain"] and result.slurm_ok
    [line] = [e for e in logs if e["event"] == "slurm_node_updated"]
    assert line["log_level"] == "info" and line["node"] == "vm" and line["from"] == "IDLE" and line["to"] == "DRAIN"
    assert line["reason"] == "agentd: drain: leak_detected"


async def test_a_pass_that_cannot_read_slurm_changes_nothing():
    from agentd.schedulers.throttle import parse_body

    runner = Runner(SlurmError("sinfo --json exited with 1: Unable to contact slurm controller"))
    svc = service(runner, {"vm": parse_body(raw("vm"))})
    with capture_logs() as logs:
        result = await svc.run_pass()
        await svc.run_pass()
    assert not result.slurm_ok and runner.updates == [] and svc.stats.slurm_errors == 2
    assert [e["event"] for e in logs] == ["slurm_read_failed"]  # once a minute, not once a pass


async def test_a_failed_update_is_logged_and_tried_again_next_pass():
    from agentd.schedulers.throttle import parse_body

    runner = Runner(ours_drained(), fail={"RESUME": "slurm_update error: Invalid user id"})
    svc = service(runner, {"vm": parse_body(raw("vm"))})
    with capture_logs() as logs:
        result = await svc.run_pass()
        await svc.run_pass()
    assert [a.kind for a, _ in result.failed] == ["resume"] and "Invalid user id" in result.failed[0][1]
    assert [e["event"] for e in logs] == ["slurm_update_failed", "slurm_update_failed"]
    assert len(runner.updates) == 2 and svc.stats.update_errors == 2


async def test_a_dry_run_runs_no_update_and_logs_each_plan_once():
    from agentd.schedulers.throttle import parse_body

    runner = Runner(ours_drained())
    svc = service(runner, {"vm": parse_body(raw("vm"))}, dry_run=True)
    with capture_logs() as logs:
        first = await svc.run_pass()
        await svc.run_pass()
    assert runner.updates == [] and [a.kind for a in first.planned] == ["resume"]
    assert [(e["event"], e["dry_run"]) for e in logs] == [("slurm_node_update_planned", True)]


async def test_rate_limited_updates_are_reported():
    from agentd.schedulers.throttle import parse_body

    nodes = [{"name": f"n{i}", "state": "idle", "state_flags": [], "reason": "", "extra": ""} for i in range(3)]
    runner = Runner(sinfo_with(*nodes))
    svc = service(runner, {f"n{i}": parse_body(raw(f"n{i}", advice="drain")) for i in range(3)}, max_per_minute=2)
    with capture_logs() as logs:
        result = await svc.run_pass()
    assert len(runner.updates) == 2 and [a.slurm_node for a in result.deferred] == ["n2"]
    [warning] = [e for e in logs if e["event"] == "slurm_updates_rate_limited"]
    assert warning["deferred"] == 1 and warning["nodes"] == ["n2"] and warning["limit_per_minute"] == 2


async def test_run_passes_until_stopped_and_tells_systemd(tmp_path, monkeypatch):
    import socket

    from agentd.schedulers.throttle import parse_body

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    runner = Runner(SlurmError("sinfo --json exited with 1: Unable to contact slurm controller"))
    svc = service(runner, {"vm": parse_body(raw("vm"))})
    stop = asyncio.Event()

    async def stop_after_three() -> None:
        while svc.stats.slurm_errors < 3:
            await asyncio.sleep(0)
        runner.sinfo = ours_drained()  # slurmctld answers from the fourth pass on
        while svc.stats.passes < 5:
            await asyncio.sleep(0)
        stop.set()

    await asyncio.wait_for(asyncio.gather(svc.run(stop), stop_after_three()), timeout=10)
    assert svc.stats.slurm_errors == 3 and len(runner.updates) == svc.stats.passes - 3  # the fake never resumes
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    sock.close()
    kinds = [m.split("\n")[0] for m in messages]
    assert kinds[0] == "READY=1" and kinds[-1] == "STOPPING=1"  # ready although Slurm did not answer yet
    assert kinds.count("WATCHDOG=1") == svc.stats.passes and "3 slurm errors" in messages[-2]


# -- the command ----------------------------------------------------------------------------------

def test_the_command_answers_h_and_refuses_a_bad_file(tmp_path):
    cli = CliRunner()
    assert cli.invoke(slurm_sync, ["-h"]).exit_code == 0
    bad = tmp_path / "s.toml"
    bad.write_text('interval = "fast"\n')
    result = cli.invoke(slurm_sync, ["--config", str(bad), "--once"])
    assert result.exit_code == 2 and f"{bad}: interval: expected a duration" in result.output
    bad.write_text(f'api_token_file = "{tmp_path / "none"}"\n[mqtt]\nhost = "127.0.0.1"\n')
    result = cli.invoke(slurm_sync, ["--config", str(bad), "--once"])
    assert result.exit_code == 2 and "api_token_file: cannot read" in result.output


def test_the_command_is_registered_in_agentd():
    from agentd.cli import main

    result = CliRunner().invoke(main, ["slurm-sync", "-h"])
    assert result.exit_code == 0 and "Drain and resume Slurm nodes" in result.output


# -- the systemd unit --------------------------------------------------------------------------

@needs_systemd_analyze
def test_the_unit_verifies_and_keeps_its_exposure_goal(tmp_path):
    """As tests/test_units.py checks the daemon's and the controller's units."""
    name = "agentd-slurm-sync.service"
    venv = Path(sys.executable).parent.parent
    unit = unit_for(venv, name, tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                if name in line and "Failed to" not in line]
    assert verify.returncode == 0 and not problems, verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout + security.stderr)
    assert found and float(found.group(1)) <= 2.0, security.stdout
    text = unit.read_text()
    assert "slurm-sync --config %d/slurm-sync.toml" in text and "Type=notify" in text
    assert re.search(r"^User=agentd$", text, re.M) and "DynamicUser" not in text  # Slurm knows it by name
