"""The daemon's health glue (agentd.health): gpu_event and gpu_health points, when they are
written, rate-limited logs under a flood, and a failure that must not stop the tick."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from agentd.health import Cadence, HealthMonitor
from agentd.lineproto import Point, encode
from collectors.base import BackendEvent, GpuInfo, GpuSample, NvlinkErrors
from collectors.lineproto_parse import ParsedLine, parse_lines
from tests.test_gpu_health import ZERO

HOST = "node-1"


def infos(n: int = 2) -> dict[int, GpuInfo]:
    return {i: GpuInfo(i, f"GPU-{i}", "H200") for i in range(n)}


def sample(index: int, t: float, **counters) -> GpuSample:
    return GpuSample(index, f"GPU-{index}", "H200", int(t * 1e9), power_w=400.0, **counters)


def lost(index: int, t: float) -> GpuSample:
    return GpuSample(index, f"GPU-{index}", "H200", int(t * 1e9), healthy=False, error="GPU is lost")


def ev(kind: str, index: int, t: float, **kw) -> BackendEvent:
    return BackendEvent(int(t * 1e9), index, kind, kw.pop("message", f"{kind} test"), **kw)


def points(lines: list[tuple[int, str]], measurement: str) -> list:
    """The points of ``measurement`` among the tick's lines, read back by the project's parser
    (each line one valid entry, stamped with the time its tuple carries)."""
    parsed = []
    for ts, line in lines:
        (p,) = parse_lines(line)
        assert isinstance(p, ParsedLine) and p.ts == ts, p
        if p.measurement == measurement:
            parsed.append(p)
    return parsed


def step(m: HealthMonitor, samples, events=(), t: float = 0.0):
    return m.step(samples, events, infos(), t, int(t * 1e9))


def test_an_xid_becomes_one_gpu_event_point_with_the_gpu_s_tags():
    m = HealthMonitor(HOST)
    lines = step(m, [sample(0, 0, **ZERO), sample(1, 0, **ZERO)], [ev("xid", 1, 0, xid=79)])
    (xid, health) = points(lines, "gpu_event")
    assert xid.tags == {"host": HOST, "gpu": "1", "uuid": "GPU-1", "model": "H200", "kind": "xid"}
    assert xid.fields["xid"] == 79 and xid.fields["action"] == "drain_node" and xid.fields["count"] == 1
    assert xid.fields["severity"] == "critical" and xid.fields["action_source"] == "catalogue"
    assert xid.fields["message"].startswith("Xid 79: GPU has fallen off the bus")
    assert health.tags["kind"] == "health" and "ok -> fail" in health.fields["message"]


def test_an_event_for_a_gpu_without_a_sample_takes_its_tags_from_the_infos():
    m = HealthMonitor(HOST)
    lines = step(m, [sample(0, 0, **ZERO)], [ev("gpu_lost", 1, 0)])
    (p, _) = points(lines, "gpu_event")
    assert p.tags["uuid"] == "GPU-1" and p.tags["kind"] == "gpu_lost"


def test_a_flood_is_a_point_per_kind_and_a_few_log_lines_with_the_count_held_back():
    m = HealthMonitor(HOST)
    with capture_logs() as logs:
        for k in range(20):  # 20 ticks of 1 s, 5,000 Xid 13 a tick, one Xid 31 and one 79 in the middle
            events = [ev("xid", 0, k, xid=13) for _ in range(5000)]
            if k == 10:
                events += [ev("xid", 0, k, xid=31), ev("xid", 0, k, xid=79)]
            lines = step(m, [sample(0, k, **ZERO)], events, t=float(k))
            xids = [p for p in points(lines, "gpu_event") if p.tags["kind"] == "xid"]
            assert [p.fields["count"] for p in xids if p.fields["xid"] == 13] == [5000]
    xid13 = [e for e in logs if e["event"] == "gpu_xid" and e["xid"] == 13]
    assert len(xid13) == 2  # t=0 and t=10 (10 s apart), not 100,000 lines
    assert [e["count"] for e in xid13] == [5000, 5000]  # the events each line stands for
    assert "suppressed" not in xid13[0] and xid13[1]["suppressed"] == 9  # the lines held back (t=1..9)
    xid79 = [e for e in logs if e["event"] == "gpu_xid" and e["xid"] == 79]
    assert len(xid79) == 1 and xid79[0]["log_level"] == "error"  # the flood did not hide it
    assert len([e for e in logs if e["event"] == "gpu_xid" and e["xid"] == 31]) == 1  # same severity as 13
    assert xid13[0]["log_level"] == "warning"
    fields = m.agent_fields()
    assert fields["gpu_events"] == 100_002 and fields["gpu_events_log_suppressed"] == 18 * 5000
    assert fields["gpus_failed"] == 1 and len(m.recent) == m.recent.maxlen


def test_events_of_one_series_in_one_tick_never_share_a_timestamp():
    m = HealthMonitor(HOST)
    lines = step(m, [sample(0, 0, **ZERO)], [ev("xid", 0, 0, xid=48), ev("xid", 0, 0, xid=63), ev("xid", 0, 0, xid=48)])
    xids = [p for p in points(lines, "gpu_event") if p.tags["kind"] == "xid"]
    assert sorted((p.fields["xid"], p.fields["count"]) for p in xids) == [(48, 2), (63, 1)]
    assert len({p.ts for p in xids}) == 2


def test_gpu_health_is_written_at_start_on_changes_and_at_the_slow_cadence():
    m = HealthMonitor(HOST, every_s=60.0)
    first = points(step(m, [sample(0, 0, **ZERO), sample(1, 0, **ZERO)]), "gpu_health")
    assert [p.tags["gpu"] for p in first] == ["0", "1"]
    assert first[0].fields["state"] == "ok" and first[0].fields["level"] == 0 and first[0].fields["reasons"] == ""
    assert points(step(m, [sample(0, 1, **ZERO), sample(1, 1, **ZERO)], t=1), "gpu_health") == []  # unchanged
    assert points(step(m, [sample(0, 2), sample(1, 2)], t=2), "gpu_health") == []  # nothing read
    changed = points(step(m, [sample(0, 3, **{**ZERO, "pcie_replay": 4}), sample(1, 3, **ZERO)], t=3), "gpu_health")
    assert [(p.tags["gpu"], p.fields["pcie_replay"]) for p in changed] == [("0", 4)]
    warned = points(step(m, [sample(0, 4), sample(1, 4, **{**ZERO, "remap_pending": True})], t=4), "gpu_health")
    assert [(p.tags["gpu"], p.fields["state"], p.fields["level"]) for p in warned] == [("1", "warn", 1)]
    assert warned[0].fields["reasons"] == "row remap pending: reset the GPU at the next idle"
    assert warned[0].fields["remap_pending"] is True
    assert len(points(step(m, [sample(0, 59), sample(1, 59)], t=59.9), "gpu_health")) == 0
    due = points(step(m, [sample(0, 60), sample(1, 60)], t=60.0), "gpu_health")
    assert [p.tags["gpu"] for p in due] == ["0", "1"] and due[0].fields["pcie_replay"] == 4  # the last known


def test_a_lost_gpu_s_point_says_fail_and_carries_no_counters():
    m = HealthMonitor(HOST)
    step(m, [sample(0, 0, **ZERO)])
    (p,) = points(step(m, [lost(0, 1)], [ev("xid", 0, 1, xid=79), ev("gpu_lost", 0, 1)], t=1), "gpu_health")
    assert p.fields["state"] == "fail" and p.fields["level"] == 2 and p.fields["xid_last"] == 79
    assert p.fields["reasons"].startswith("Xid 79: GPU has fallen off the bus") and "GPU lost: GPU is lost" in p.fields["reasons"]
    assert "ecc_dbe_volatile" not in p.fields


def test_nvlink_counters_are_summed_and_a_link_with_errors_is_named():
    m = HealthMonitor(HOST)
    links = (NvlinkErrors(0, 0, 0, 0, 0), NvlinkErrors(1, 3, 2, 7, 1), NvlinkErrors(2, None, None, None, None))
    (p,) = points(step(m, [sample(0, 0, **ZERO, nvlink=links)]), "gpu_health")
    f = p.fields
    assert (f["nvlink_crc_errors"], f["nvlink_replay_errors"], f["nvlink_recovery_errors"]) == (5, 7, 1)
    assert (f["nvlink1_crc_errors"], f["nvlink1_replay_errors"], f["nvlink1_recovery_errors"]) == (5, 7, 1)
    assert not any(k.startswith(("nvlink0_", "nvlink2_")) for k in f)
    (p,) = points(step(m, [sample(1, 0, **ZERO)]), "gpu_health")
    assert "nvlink_crc_errors" not in p.fields  # no NVLink reported: absent, not zero


def test_each_event_logs_its_fixed_name_at_its_level_with_a_hint():
    m = HealthMonitor(HOST)
    with capture_logs() as logs:
        step(m, [lost(0, 0)], [ev("xid", 0, 0, xid=79), ev("gpu_lost", 0, 0), ev("ecc_sbe", 0, 0)])
        step(m, [sample(0, 1, **ZERO)], [ev("gpu_recovered", 0, 1)], t=1)
    got = [(e["event"], e["log_level"]) for e in logs]
    assert got == [("gpu_xid", "error"), ("gpu_lost", "error"), ("gpu_ecc_sbe", "warning"),
                   ("gpu_health_changed", "error"), ("gpu_recovered", "warning"), ("gpu_health_changed", "warning")]
    assert logs[0]["hint"] == "drain the node and reboot it; have the board checked if it recurs"
    assert logs[0]["uuid"] == "GPU-0" and logs[0]["action"] == "drain_node"


def test_a_bug_in_the_tracker_is_logged_once_counted_and_the_tick_goes_on():
    class Broken:
        gpus: dict = {}

        def update(self, *a):
            raise RuntimeError("boom")

    m = HealthMonitor(HOST, tracker=Broken())  # type: ignore[arg-type]
    with capture_logs() as logs:
        lines = step(m, [sample(0, 0)], [ev("xid", 0, 0, xid=79)])
        assert step(m, [sample(0, 1)], t=1) == []
    (p,) = points(lines, "gpu_event")  # the event is not lost: stored, unjudged
    assert (p.tags["kind"], p.fields["xid"], p.fields["severity"]) == ("xid", 79, "unknown")
    assert [e["event"] for e in logs] == ["gpu_health_failed", "gpu_xid"]
    assert logs[0]["events"] == 1 and "boom" in logs[0]["error"] and logs[1]["severity"] == "unknown"
    assert m.agent_fields()["gpu_health_errors"] == 2 and m.agent_fields()["gpu_events"] == 1


@pytest.mark.parametrize("fields", [{"state": "ok", "level": 0, "reasons": ""}])
def test_an_ok_point_writes_empty_reasons_so_the_last_value_is_not_a_stale_reason(fields):
    line = encode(Point("gpu_health", {"host": HOST}, fields, 1))
    assert line is not None and 'reasons=""' in line


def test_the_cadence_is_due_first_then_every_period_and_at_once_on_a_change():
    c = Cadence(60.0)
    assert [c.due(t) for t in (0.0, 59.9, 60.0, 61.0)] == [True, False, True, False]
    assert c.due(70.0, changed=True) and not c.due(129.0) and c.due(130.0)  # the change restarted it
