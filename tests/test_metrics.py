"""GET /metrics' renderer (agentd/api/metrics.py): names, labels, units, types, absent values,
dcgm-exporter compatibility, label escaping, and promtool's verdict on the output.

The exposition is read back by a small parser of the text format written here (not the
library that wrote it), so a test checks what a scraper sees.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from agentd.api.metrics import (
    DCGM_COUNTER_NAMES,
    LEAK_STATES,
    THROTTLE_STATES,
    AgentStats,
    BuildInfo,
    CoolantLoop,
    GpuLimits,
    MetricsInput,
    MetricsRenderer,
    RuleState,
    metrics_input_from_daemon,
    render_metrics,
)
from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from agentd.influx import Forwarder
from collectors.base import GpuInfo, GpuSample, NvlinkErrors
from collectors.coolant_spec import Reading
from collectors.sim import SimBackend

GPU_LABELS = {"gpu", "uuid", "model"}
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname"}


# ------------------------------------------------------------------------- a text-format reader

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse(body: bytes) -> tuple[dict[str, str], dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(TYPE by name, HELP by name, samples as (name, labels, value)) of a 0.0.4 exposition."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in body.decode().split("\n"):
        if not line:
            continue
        if line.startswith("# TYPE "):
            name, typ = line[7:].split(" ")
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = typ
        elif line.startswith("# HELP "):
            name, _, text = line[7:].partition(" ")
            helps[name] = text
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels: dict[str, str] = {}
            rest = m.group(2) or ""
            pos = 0
            while pos < len(rest):
                lm = _LABEL.match(rest, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lm.group(2))
                pos = lm.end()
            samples.append((m.group(1), labels, float(m.group(3))))
    return types, helps, samples


def series(body: bytes, name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for n, labels, v in parse(body)[2] if n == name]


def by_gpu(body: bytes, name: str) -> dict[str, float]:
    return {labels["gpu"]: v for labels, v in series(body, name)}


def names(body: bytes) -> set[str]:
    return {n for n, _, _ in parse(body)[2]}


# ------------------------------------------------------------------------------- inputs

def info(i: int, model: str = "NVIDIA H200") -> GpuInfo:
    return GpuInfo(index=i, uuid=f"GPU-{i:04d}", model=model, limit_min_w=200.0, limit_max_w=700.0,
                   limit_default_w=700.0, slowdown_c=87.0, shutdown_c=92.0)


def sample(i: int, **over) -> GpuSample:
    values = dict(index=i, uuid=f"GPU-{i:04d}", model="NVIDIA H200", ts_ns=1_767_225_600 * 10**9,
                  power_w=650.5, power_avg_w=640.25, energy_j=123456.789, temp_c=71.0, mem_temp_c=80.0,
                  limit_w=700.0, limit_current_w=700.0, limit_default_w=700.0, limit_min_w=200.0,
                  limit_max_w=700.0, slowdown_c=87.0, shutdown_c=92.0, util_pct=57.0, mem_util_pct=33.0,
                  mem_used_bytes=80 * 2**30, sm_clock_mhz=1980.0, clock_reasons=0,
                  ecc_sbe_volatile=3, ecc_dbe_volatile=0, ecc_sbe_aggregate=12, ecc_dbe_aggregate=1,
                  retired_pages_sbe=0, retired_pages_dbe=0, retired_pages_pending=False,
                  remap_correctable_rows=2, remap_uncorrectable_rows=0, remap_pending=False, remap_failure=False,
                  nvlink=(NvlinkErrors(0, 1, 2, 3, 4), NvlinkErrors(1, 10, 20, None, 40)), pcie_replay=5,
                  recovery_action="none", throttle_power_ns=2_500_000_000, throttle_thermal_ns=0,
                  throttle_board_limit_ns=None, throttle_reliability_ns=0, health="ok", xid_last=79)
    return GpuSample(**(values | over))


def full_input(n: int = 2, **over) -> MetricsInput:
    values = dict(
        host="node-1", site="hall-a", ts_ns=1_767_225_601 * 10**9,
        gpus=tuple(sample(i) for i in range(n)), infos={i: info(i) for i in range(n)},
        limits={0: GpuLimits(set_w=500.0, target_w=450.0, externally_limited=True), 1: GpuLimits(target_w=700.0)},
        rules=(RuleState("gpu_hot", 0, "firing", "warning"), RuleState("gpu_hot", 1, "pending", "warning"),
               RuleState("leak", None, "inactive", "critical")),
        throttle_level=2, throttle_state="throttled",
        coolant=(CoolantLoop("tcs", {"supply_temp_c": 32.5, "return_temp_c": 41.0, "delta_temp_c": 8.5,
                                     "flow_lpm": 120.0, "supply_pressure_kpa": 250.0, "return_pressure_kpa": 180.0,
                                     "delta_pressure_kpa": 70.0, "pump_speed_pct": 80.0, "valve_position_pct": 50.0},
                             leak="Warning", degraded=True, series=3),
                 CoolantLoop("facility", {"supply_temp_c": 25.0}, leak=None, degraded=False, series=1)),
        agent=AgentStats(tick_s=0.0021, tick_lag_s=0.0004, ticks=42, ticks_missed=1, nvml_errors=2, rule_errors=0,
                         store_errors=0, limit_write_errors=1, store_backlog_points=17, store_bytes=65536,
                         store_dropped_points=3, store_quarantined_points=4, forward_points=1000, forward_errors=5,
                         forward_last_success_unix_s=1_767_225_590.0, mqtt_connected=True),
        build=BuildInfo("0.1.0", "3.11.7", "580.159.04"))
    return MetricsInput(**(values | over))


# ------------------------------------------------------------------------------- our namespace

def test_every_gpu_metric_is_there_with_gpu_uuid_model_labels_and_base_units():
    body = render_metrics(full_input(), dcgm_compat=False)
    expected = {
        "agentd_gpu_up": 1.0, "agentd_gpu_power_watts": 650.5, "agentd_gpu_power_average_watts": 640.25,
        "agentd_gpu_power_limit_watts": 700.0, "agentd_gpu_power_limit_min_watts": 200.0,
        "agentd_gpu_power_limit_max_watts": 700.0, "agentd_gpu_power_limit_default_watts": 700.0,
        "agentd_gpu_temperature_celsius": 71.0, "agentd_gpu_memory_temperature_celsius": 80.0,
        "agentd_gpu_slowdown_temperature_celsius": 87.0, "agentd_gpu_shutdown_temperature_celsius": 92.0,
        "agentd_gpu_energy_joules_total": 123456.789, "agentd_gpu_utilization_ratio": 0.57,
        "agentd_gpu_memory_utilization_ratio": 0.33, "agentd_gpu_memory_used_bytes": 80 * 2**30,
        "agentd_gpu_sm_clock_hertz": 1.98e9, "agentd_gpu_clock_event_reasons": 0.0, "agentd_gpu_throttled": 0.0,
        "agentd_gpu_last_sample_timestamp_seconds": 1_767_225_600.0, "agentd_gpu_health": 0.0,
        "agentd_gpu_last_xid": 79.0, "agentd_gpu_pcie_replays_total": 5.0, "agentd_gpu_row_remap_pending": 0.0,
        "agentd_gpu_row_remap_failed": 0.0, "agentd_gpu_retired_pages_pending": 0.0,
    }
    for name, value in expected.items():
        got = series(body, name)
        assert [labels["gpu"] for labels, _ in got] == ["0", "1"], name
        for labels, v in got:
            assert set(labels) == GPU_LABELS, name
            assert labels["uuid"] == f"GPU-{int(labels['gpu']):04d}" and labels["model"] == "NVIDIA H200"
            assert v == pytest.approx(value), name
    assert by_gpu(body, "agentd_gpu_power_limit_set_watts") == {"0": 500.0}  # GPU 1: agentd holds no limit
    assert by_gpu(body, "agentd_gpu_power_limit_target_watts") == {"0": 450.0, "1": 700.0}
    assert by_gpu(body, "agentd_gpu_externally_limited") == {"0": 1.0, "1": 0.0}


def test_health_counters_carry_their_kind_in_a_label():
    body = render_metrics(full_input(n=1), dcgm_compat=False)
    ecc = {labels["type"]: v for labels, v in series(body, "agentd_gpu_ecc_errors_total")}
    assert ecc == {"corrected": 3.0, "uncorrected": 0.0}
    agg = {labels["type"]: v for labels, v in series(body, "agentd_gpu_ecc_aggregate_errors_total")}
    assert agg == {"corrected": 12.0, "uncorrected": 1.0}
    rows = {labels["cause"]: v for labels, v in series(body, "agentd_gpu_remapped_rows_total")}
    assert rows == {"corrected": 2.0, "uncorrected": 0.0}
    # summed over the links (link 1 has no replay counter: it adds nothing, it is not a 0)
    links = {labels["type"]: v for labels, v in series(body, "agentd_gpu_nvlink_errors_total")}
    assert links == {"crc_flit": 11.0, "crc_data": 22.0, "replay": 3.0, "recovery": 44.0}
    throttle = {labels["reason"]: v for labels, v in series(body, "agentd_gpu_throttle_seconds_total")}
    assert throttle == {"power": 2.5, "thermal": 0.0, "reliability": 0.0}  # board_limit unsupported: absent
    assert series(body, "agentd_gpu_recovery_action") == [
        ({"gpu": "0", "uuid": "GPU-0000", "model": "NVIDIA H200", "action": "none"}, 1.0)]


def test_node_rule_coolant_and_agent_metrics():
    body = render_metrics(full_input(), dcgm_compat=False)
    assert series(body, "agentd_build_info") == [({"version": "0.1.0", "python": "3.11.7",
                                                   "driver": "580.159.04"}, 1.0)]
    assert series(body, "agentd_node_info") == [({"node": "node-1", "site": "hall-a"}, 1.0)]
    assert series(body, "agentd_last_tick_timestamp_seconds") == [({}, 1_767_225_601.0)]
    assert series(body, "agentd_throttle_level") == [({}, 2.0)]
    assert {labels["state"]: v for labels, v in series(body, "agentd_throttle_state")} == {
        s: (1.0 if s == "throttled" else 0.0) for s in THROTTLE_STATES}
    firing = {(labels["rule"], labels["gpu"], labels["severity"]): v for labels, v in series(body, "agentd_rule_firing")}
    assert firing == {("gpu_hot", "0", "warning"): 1.0, ("gpu_hot", "1", "warning"): 0.0, ("leak", "", "critical"): 0.0}
    state = [(labels["rule"], labels["gpu"], labels["state"], v) for labels, v in series(body, "agentd_rule_state")]
    assert state == [("gpu_hot", "0", "firing", 1.0), ("gpu_hot", "1", "pending", 1.0)]  # like ALERTS: no inactive
    coolant = {
        "agentd_coolant_supply_temperature_celsius": {"tcs": 32.5, "facility": 25.0},
        "agentd_coolant_return_temperature_celsius": {"tcs": 41.0},
        "agentd_coolant_delta_temperature_celsius": {"tcs": 8.5},
        "agentd_coolant_flow_cubic_meters_per_second": {"tcs": 0.002},  # 120 L/min
        "agentd_coolant_supply_pressure_pascals": {"tcs": 250_000.0},
        "agentd_coolant_return_pressure_pascals": {"tcs": 180_000.0},
        "agentd_coolant_delta_pressure_pascals": {"tcs": 70_000.0},
        "agentd_coolant_pump_speed_ratio": {"tcs": 0.8},
        "agentd_coolant_valve_position_ratio": {"tcs": 0.5},
        "agentd_coolant_degraded": {"tcs": 1.0, "facility": 0.0},
        "agentd_coolant_series": {"tcs": 3.0, "facility": 1.0},
    }
    for name, want in coolant.items():
        got = {labels["loop"]: v for labels, v in series(body, name)}
        assert got == pytest.approx(want), name
    leak = {(labels["loop"], labels["state"]): v for labels, v in series(body, "agentd_coolant_leak")}
    assert leak == {("tcs", s): (1.0 if s == "warning" else 0.0) for s in LEAK_STATES}  # facility: no leak reading
    agent = {"agentd_tick_duration_seconds": 0.0021, "agentd_tick_lag_seconds": 0.0004, "agentd_ticks_total": 42,
             "agentd_ticks_missed_total": 1, "agentd_nvml_errors_total": 2, "agentd_rule_errors_total": 0,
             "agentd_store_errors_total": 0, "agentd_limit_write_errors_total": 1,
             "agentd_store_backlog_points": 17, "agentd_store_bytes": 65536,
             "agentd_store_dropped_points_total": 3, "agentd_store_quarantined_points": 4,
             "agentd_forward_points_total": 1000, "agentd_forward_errors_total": 5,
             "agentd_forward_last_success_timestamp_seconds": 1_767_225_590.0, "agentd_mqtt_connected": 1.0}
    for name, want in agent.items():
        assert series(body, name) == [({}, pytest.approx(want))], name


def test_counters_are_typed_counter_and_named_total_and_everything_else_is_a_gauge():
    types, helps, samples = parse(render_metrics(full_input(), dcgm_compat=False))
    for name in {n for n, _, _ in samples}:
        assert name in types and helps.get(name), f"{name}: no TYPE or HELP"
        assert types[name] == ("counter" if name.endswith("_total") else "gauge"), name
        assert name.startswith("agentd_") and name == name.lower(), name
    assert types["agentd_gpu_energy_joules_total"] == "counter"
    assert types["agentd_build_info"] == "gauge"
    assert not any(labels for n, labels, _ in samples for k in labels if k != k.lower())


# ------------------------------------------------------------------------------- absent, not zero

def test_a_value_the_node_does_not_have_is_absent_never_zero():
    # GPU 1 supports nothing optional; no limits, no rules, no coolant, no forwarder, no MQTT.
    bare = GpuSample(index=1, uuid="GPU-0001", model="NVIDIA H200", ts_ns=1_767_225_600 * 10**9)
    inp = MetricsInput(host="n", gpus=(sample(0), bare), infos={0: info(0)})
    body = render_metrics(inp, dcgm_compat=True)
    for name in ("agentd_gpu_power_watts", "agentd_gpu_temperature_celsius", "agentd_gpu_energy_joules_total",
                 "agentd_gpu_utilization_ratio", "agentd_gpu_throttled", "agentd_gpu_power_limit_min_watts",
                 "agentd_gpu_health", "agentd_gpu_last_xid", "agentd_gpu_throttle_seconds_total",
                 "agentd_gpu_recovery_action", "agentd_gpu_nvlink_errors_total", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP",
                 "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_XID_ERRORS"):
        assert list(by_gpu(body, name)) == ["0"], name
    assert by_gpu(body, "agentd_gpu_up") == {"0": 1.0, "1": 1.0}
    present = names(body)
    for name in ("agentd_gpu_power_limit_set_watts", "agentd_gpu_power_limit_target_watts", "agentd_rule_firing",
                 "agentd_rule_state", "agentd_throttle_level", "agentd_throttle_state",
                 "agentd_coolant_supply_temperature_celsius", "agentd_coolant_leak", "agentd_forward_errors_total",
                 "agentd_forward_points_total", "agentd_forward_last_success_timestamp_seconds",
                 "agentd_mqtt_connected", "agentd_last_tick_timestamp_seconds"):
        assert name not in present, name
    assert b"# TYPE agentd_rule_firing" not in body  # no empty HELP/TYPE block either
    assert series(body, "agentd_build_info")[0][0]["driver"] == ""  # not NVML: Prometheus drops the empty label


def test_an_unread_or_lost_gpu_shows_up_zero_and_no_values():
    lost = GpuSample(index=1, uuid="GPU-0001", model="NVIDIA H200", ts_ns=1, healthy=False, error="GPU_IS_LOST")
    held = {"GPU-0001": {"energy_j": 5.0, "pcie_replay": 1}}
    inp = MetricsInput(host="n", gpus=(sample(0), lost), infos={0: info(0), 1: info(1), 2: info(2)}, held=held)
    body = render_metrics(inp, dcgm_compat=True)
    assert by_gpu(body, "agentd_gpu_up") == {"0": 1.0, "1": 0.0}  # GPU 2 not read yet: no up series
    assert list(by_gpu(body, "agentd_gpu_energy_joules_total")) == ["0"]  # the lost GPU's held counter hides
    assert list(by_gpu(body, "DCGM_FI_DEV_PCIE_REPLAY_COUNTER")) == ["0"]
    # the envelopes read at start still describe GPUs 1 and 2
    assert by_gpu(body, "agentd_gpu_power_limit_max_watts") == {"0": 700.0, "1": 700.0, "2": 700.0}


# ------------------------------------------------------------------------------- dcgm-exporter

def test_dcgm_names_appear_only_with_dcgm_compat():
    assert b"DCGM_" not in render_metrics(full_input(), dcgm_compat=False)
    assert b"DCGM_FI_DEV_POWER_USAGE{" in render_metrics(full_input(), dcgm_compat=True)


def test_dcgm_compat_uses_dcgm_exporters_names_units_types_and_labels():
    body = render_metrics(full_input(), dcgm_compat=True)
    types, helps, _ = parse(body)
    expected = {  # name: (type, value for GPU 0 from sample())
        "DCGM_FI_DEV_SM_CLOCK": ("gauge", 1980.0), "DCGM_FI_DEV_MEMORY_TEMP": ("gauge", 80.0),
        "DCGM_FI_DEV_GPU_TEMP": ("gauge", 71.0), "DCGM_FI_DEV_POWER_USAGE": ("gauge", 640.25),
        "DCGM_FI_DEV_POWER_USAGE_INSTANT": ("gauge", 650.5), "DCGM_FI_DEV_GPU_UTIL": ("gauge", 57.0),
        "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", 33.0), "DCGM_FI_DEV_FB_USED": ("gauge", 80 * 1024),
        "DCGM_FI_DEV_POWER_MGMT_LIMIT": ("gauge", 700.0), "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": ("gauge", 700.0),
        "DCGM_FI_DEV_XID_ERRORS": ("gauge", 79.0), "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("gauge", 0.0),
        "DCGM_FI_DEV_ROW_REMAP_PENDING": ("gauge", 0.0),
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", 123456789.0),  # mJ
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("counter", 5.0), "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("counter", 3.0),
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("counter", 0.0), "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("counter", 12.0),
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("counter", 1.0), "DCGM_FI_DEV_RETIRED_SBE": ("counter", 0.0),
        "DCGM_FI_DEV_RETIRED_DBE": ("counter", 0.0), "DCGM_FI_DEV_RETIRED_PENDING": ("counter", 0.0),
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("counter", 0.0),
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("counter", 2.0),
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": ("counter", 11.0),  # summed over the links
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": ("counter", 22.0),
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": ("counter", 3.0),  # link 1 has none
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": ("counter", 44.0),
    }
    assert {n for n in types if n.startswith("DCGM_")} == set(expected)
    assert set(DCGM_COUNTER_NAMES) == {n for n, (t, _) in expected.items() if t == "counter"}
    for name, (typ, value) in expected.items():
        assert types[name] == typ, name  # a counter keeps dcgm-exporter's name: no _total on TYPE or sample
        got = series(body, name)
        assert [labels["gpu"] for labels, _ in got] == ["0", "1"], name
        for labels, _ in got:
            assert labels == {"gpu": labels["gpu"], "UUID": f"GPU-{int(labels['gpu']):04d}",
                              "device": f"nvidia{labels['gpu']}", "modelName": "NVIDIA H200",
                              "Hostname": "node-1", "DCGM_FI_DRIVER_VERSION": "580.159.04"}, name
        assert got[0][1] == pytest.approx(value), name
    assert helps["DCGM_FI_DEV_POWER_USAGE"] == "Power draw (in W)."  # etc/default-counters.csv's text
    assert helps["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "Total energy consumption since boot (in mJ)."
    # the agentd names are all still there beside them
    assert names(render_metrics(full_input(), dcgm_compat=False)) <= names(body)


def test_dcgm_labels_leave_the_driver_out_when_it_is_unknown():
    body = render_metrics(full_input(build=BuildInfo("0.1.0", "3.11.7", None)), dcgm_compat=True)
    for labels, _ in series(body, "DCGM_FI_DEV_GPU_TEMP"):
        assert set(labels) == DCGM_LABELS


# ------------------------------------------------------------------------------- odd inputs

ODD_MODEL = 'NVIDIA "H200" \\ 141GB\nrev{1},x=y'


def test_odd_label_values_are_escaped_and_read_back_intact():
    g0 = sample(0, model=ODD_MODEL)
    loop = CoolantLoop('tcs"\\\n', {"supply_temp_c": 30.0}, leak="OK")
    inp = full_input(n=1, gpus=(g0,), infos={0: info(0, ODD_MODEL)}, coolant=(loop,),
                     rules=(RuleState('r"\\\n', 0, "firing", "warning"),), host='h"\\\n')
    for dcgm in (False, True):
        body = render_metrics(inp, dcgm_compat=dcgm)
        assert body.count(b"\n") == len([ln for ln in body.split(b"\n") if ln]), "a raw newline in a value"
        assert series(body, "agentd_gpu_power_watts")[0][0]["model"] == ODD_MODEL
        assert series(body, "agentd_coolant_supply_temperature_celsius")[0][0]["loop"] == 'tcs"\\\n'
        assert series(body, "agentd_rule_firing")[0][0]["rule"] == 'r"\\\n'
        assert series(body, "agentd_node_info")[0][0]["node"] == 'h"\\\n'
    body = render_metrics(inp, dcgm_compat=True)
    assert series(body, "DCGM_FI_DEV_GPU_TEMP")[0][0]["modelName"] == ODD_MODEL
    assert series(body, "DCGM_FI_DEV_GPU_TEMP")[0][0]["Hostname"] == 'h"\\\n'


def test_a_model_name_that_mimics_a_header_does_not_change_the_headers():
    forged = "x\n# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total counter\n# HELP DCGM_FI_DEV_PCIE_REPLAY_COUNTER_total "
    inp = full_input(n=1, gpus=(sample(0, model=forged),), infos={0: info(0, forged)})
    body = render_metrics(inp, dcgm_compat=True)
    assert series(body, "DCGM_FI_DEV_GPU_TEMP")[0][0]["modelName"] == forged
    assert series(body, "agentd_gpu_temperature_celsius")[0][0]["model"] == forged


def test_unknown_health_throttle_state_and_leak_words_never_drop_other_metrics():
    odd = sample(1, health="degraded-ish")  # not ok/warn/fail
    inp = full_input(gpus=(sample(0), odd), throttle_state="maintenance",
                     coolant=(CoolantLoop("tcs", {"supply_temp_c": 30.0}, leak="Flooded"),))
    body = render_metrics(inp, dcgm_compat=True)
    assert by_gpu(body, "agentd_gpu_health") == {"0": 0.0}  # the odd value leaves no series, the rest stays
    assert by_gpu(body, "agentd_gpu_power_watts") == {"0": 650.5, "1": 650.5}
    states = {labels["state"]: v for labels, v in series(body, "agentd_throttle_state")}
    assert states == {**dict.fromkeys(THROTTLE_STATES, 0.0), "maintenance": 1.0}
    leak = {labels["state"]: v for labels, v in series(body, "agentd_coolant_leak")}
    assert leak == {**dict.fromkeys(LEAK_STATES, 0.0), "flooded": 1.0}


def test_not_a_number_and_infinities_render_in_the_go_spelling():
    inp = full_input(n=1, gpus=(sample(0, power_w=math.nan, temp_c=math.inf, mem_temp_c=-math.inf),))
    body = render_metrics(inp, dcgm_compat=False)
    assert b'agentd_gpu_power_watts{gpu="0",model="NVIDIA H200",uuid="GPU-0000"} NaN\n' in body
    assert b"} +Inf\n" in body and b"} -Inf\n" in body
    assert by_gpu(body, "agentd_gpu_power_average_watts") == {"0": 640.25}


# ------------------------------------------------------------------------------- promtool

def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("TEST_REQUIRE_SERVICES=1 but promtool is not installed; apt-get install prometheus "
                        "(scripts/test installs it)")
        pytest.skip("promtool not installed (apt-get install prometheus); the exposition is not linted")
    return found


def promtool_check(body: bytes) -> tuple[int, list[str]]:
    proc = subprocess.run([_promtool(), "check", "metrics"], input=body, capture_output=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).decode().splitlines()


def test_promtool_finds_nothing_to_lint_in_the_agentd_names():
    inp = full_input(n=8, gpus=tuple(sample(i, model=ODD_MODEL) for i in range(8)))
    rc, lines = promtool_check(render_metrics(inp, dcgm_compat=False))
    assert (rc, lines) == (0, [])


def test_promtool_parses_dcgm_compat_and_lints_only_dcgm_exporters_own_naming():
    rc, lines = promtool_check(render_metrics(full_input(n=8), dcgm_compat=True))
    assert lines, "dcgm-exporter's names break the naming rules: promtool should say so"
    allowed = re.compile(r'^DCGM_FI_\w+ (label names should be written in \'snake_case\' not \'camelCase\''
                         r'|counter metrics should have "_total" suffix'
                         r"|metric name should not include type 'counter')$")  # DCGM_FI_DEV_PCIE_REPLAY_COUNTER
    assert [ln for ln in lines if not allowed.match(ln)] == []  # nothing unparsable, nothing of ours
    assert rc == 3  # promtool's exit status for lint findings (1 would be a parse error)
    suffix = {ln.split()[0] for ln in lines if "_total" in ln}
    assert suffix == set(DCGM_COUNTER_NAMES)  # promtool read them as counters: the TYPE lines match


# ------------------------------------------------------------------------------- the renderer cache

def test_the_renderer_renders_each_snapshot_once():
    renderer = MetricsRenderer(dcgm_compat=True)
    first = full_input()
    body = renderer.render(first)
    assert body == render_metrics(first, dcgm_compat=True)
    assert renderer.render(first) is body
    second = replace(first, throttle_level=4)
    assert series(renderer.render(second), "agentd_throttle_level") == [({}, 4.0)]


# ------------------------------------------------------------------------------- from the daemon

@pytest.fixture
async def ticked(tmp_path):
    """``ticked(gpus, ticks)``: a daemon on the simulator after that many ticks (store still open)."""
    made: list[Daemon] = []

    async def make(gpus: int = 4, ticks: int = 1) -> tuple[Daemon, FakeClock]:
        cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": str(tmp_path), "node": "n1",
                                          "site": "s1", "interval": 1.0, "sim": {"gpus": gpus}})
        clock = FakeClock()
        daemon = Daemon(cfg, SimBackend(gpus=gpus), open_store(cfg), clock=clock)
        made.append(daemon)
        await daemon.start()
        for _ in range(ticks):
            await daemon.tick()
            clock.advance(1.0)
        return daemon, clock

    yield make
    for daemon in made:
        await daemon.shutdown()


async def test_a_daemon_snapshot_shows_what_the_daemon_holds(ticked):
    daemon, clock = await ticked(gpus=4, ticks=5)
    reading = Reading("s1", "tcs", "cdu1", "", {"supply_temp_c": 33.0, "flow_lpm": 90.0, "leak": "OK"}, None)
    daemon.state.coolant.update(reading, clock.monotonic(), clock.wall_ns())
    inp = metrics_input_from_daemon(daemon, 0, "ok")
    body = render_metrics(inp, dcgm_compat=False)
    want = {str(i): s.power_w for i, s in daemon.state.gpus.items()}
    assert by_gpu(body, "agentd_gpu_power_watts") == want and len(want) == 4
    assert {labels["uuid"] for labels, _ in series(body, "agentd_gpu_up")} == {i.uuid for i in daemon.state.infos.values()}
    assert series(body, "agentd_ticks_total") == [({}, 5.0)]
    assert series(body, "agentd_store_backlog_points") == [({}, float(daemon.store.backlog()))]
    assert series(body, "agentd_store_bytes") == [({}, float(daemon.store.size_bytes()))]
    assert series(body, "agentd_node_info") == [({"node": "n1", "site": "s1"}, 1.0)]
    assert series(body, "agentd_last_tick_timestamp_seconds") == [({}, clock.wall_ns() / 1e9)]
    instances = daemon.controller.engine.states
    assert len(series(body, "agentd_rule_firing")) == len(instances) > 0
    assert series(body, "agentd_coolant_supply_temperature_celsius") == [({"loop": "tcs"}, 33.0)]
    assert series(body, "agentd_coolant_flow_cubic_meters_per_second") == [({"loop": "tcs"}, 0.0015)]
    # the simulator is not NVML (no driver); no forwarder and no MQTT configured: no such series
    assert inp.build.driver is None
    assert not names(body) & {"agentd_forward_errors_total", "agentd_mqtt_connected"}


async def test_counters_read_only_now_and_then_are_held_between_reads(ticked):
    daemon, _ = await ticked(gpus=2)
    daemon.state.gpus[0].pcie_replay = 7
    first = metrics_input_from_daemon(daemon, 0, "ok")
    energy = daemon.state.gpus[0].energy_j
    # the next tick read neither counter (energy at most every 0.5 s, health counters rarely)
    daemon.state.gpus[0] = replace(daemon.state.gpus[0], energy_j=None, pcie_replay=None)
    second = metrics_input_from_daemon(daemon, 0, "ok", previous=first)
    body = render_metrics(second, dcgm_compat=True)
    assert by_gpu(body, "agentd_gpu_energy_joules_total")["0"] == energy
    assert by_gpu(body, "agentd_gpu_pcie_replays_total")["0"] == 7.0
    assert by_gpu(body, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")["0"] == round(energy * 1000)
    # without the previous snapshot there is nothing to hold: absent, not 0
    alone = render_metrics(metrics_input_from_daemon(daemon, 0, "ok"), dcgm_compat=False)
    assert "0" not in by_gpu(alone, "agentd_gpu_energy_joules_total")
    # a new board in the slot (another UUID) does not inherit the old one's counters
    daemon.state.gpus[0] = replace(daemon.state.gpus[0], uuid="GPU-new")
    swapped = render_metrics(metrics_input_from_daemon(daemon, 0, "ok", previous=second), dcgm_compat=False)
    assert "0" not in by_gpu(swapped, "agentd_gpu_energy_joules_total")


async def test_the_last_forward_is_dated_by_the_tick_that_saw_points_accepted(ticked):
    daemon, clock = await ticked(gpus=1)
    fw = Forwarder(daemon.store, writer=None)  # type: ignore[arg-type]  # its counters only: never run
    daemon.forwarder = fw
    first = metrics_input_from_daemon(daemon, 0, "ok")
    assert first.agent.forward_points == 0 and first.agent.forward_last_success_unix_s is None
    clock.advance(3.0)
    fw.written, fw.write_errors = 500, 2
    second = metrics_input_from_daemon(daemon, 0, "ok", previous=first)
    assert second.agent.forward_last_success_unix_s == clock.wall_ns() / 1e9
    clock.advance(3.0)  # an outage: nothing more accepted, the date stays
    third = metrics_input_from_daemon(daemon, 0, "ok", previous=second)
    daemon.forwarder = None  # nothing to flush at the fixture's shutdown
    assert third.agent.forward_last_success_unix_s == second.agent.forward_last_success_unix_s
    body = render_metrics(third, dcgm_compat=False)
    assert series(body, "agentd_forward_points_total") == [({}, 500.0)]
    assert series(body, "agentd_forward_errors_total") == [({}, 2.0)]


async def test_render_time_for_8_gpus_stays_well_under_a_tick(ticked):
    daemon, _ = await ticked(gpus=8, ticks=3)
    inp = metrics_input_from_daemon(daemon, 0, "ok")
    started = time.perf_counter()
    for _ in range(10):
        render_metrics(inp, dcgm_compat=True)
    per_render_s = (time.perf_counter() - started) / 10
    assert per_render_s < 0.1, f"{per_render_s * 1e3:.1f} ms per render of 8 GPUs"  # a loose bound: 2 shared cores
