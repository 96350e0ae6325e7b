"""The gpu_info measurement: thresholds at start and every minute, health at once when it changes."""

from __future__ import annotations

import pynvml
import pytest

from agentd.gpu_info import CLOCK_REASONS, EVERY_S, GpuInfoWriter, decode_clock_reasons, gpu_info_point
from agentd.lineproto import encode
from collectors.base import GpuInfo, GpuSample
from collectors.lineproto_parse import parse_line

INFOS = {i: GpuInfo(index=i, uuid=f"GPU-{i}", model="H200", limit_min_w=200.0, limit_max_w=700.0,
                    limit_default_w=700.0, slowdown_c=87.0, shutdown_c=92.0, gpu_max_c=85.0, mem_max_c=95.0)
         for i in range(2)}


def sample(i: int, ts: int = 0, healthy: bool = True) -> GpuSample:
    return GpuSample(index=i, uuid=f"GPU-{i}", model="H200", ts_ns=ts, healthy=healthy,
                     error=None if healthy else "NVMLError_GpuIsLost: GPU is lost")


def parsed(lines: list[tuple[int, str]]) -> list[tuple[dict, dict]]:
    return [parse_line(line)[1:3] for _, line in lines]


def test_the_first_call_writes_every_gpu_with_its_thresholds_and_limit_range() -> None:
    w = GpuInfoWriter("n1")
    out = parsed(w.lines(INFOS, [sample(0), sample(1)], 100.0, 5))
    assert [tags for tags, _ in out] == [{"host": "n1", "gpu": "0", "uuid": "GPU-0", "model": "H200"},
                                         {"host": "n1", "gpu": "1", "uuid": "GPU-1", "model": "H200"}]
    assert out[0][1] == {"slowdown_c": 87.0, "shutdown_c": 92.0, "gpu_max_c": 85.0, "mem_max_c": 95.0,
                         "limit_min_w": 200.0, "limit_max_w": 700.0, "limit_default_w": 700.0, "healthy": True}


def test_then_every_minute_and_not_between() -> None:
    w = GpuInfoWriter("n1")
    assert len(w.lines(INFOS, [sample(0), sample(1)], 100.0, 1)) == 2
    assert w.lines(INFOS, [sample(0), sample(1)], 100.0 + EVERY_S - 0.1, 2) == []
    assert len(w.lines(INFOS, [sample(0), sample(1)], 100.0 + EVERY_S, 3)) == 2


def test_a_gpu_that_fails_or_recovers_is_written_at_once_with_the_error() -> None:
    w = GpuInfoWriter("n1")
    w.lines(INFOS, [sample(0), sample(1)], 100.0, 1)
    lost = parsed(w.lines(INFOS, [sample(0), sample(1, healthy=False)], 101.0, 2))
    assert lost[1][1]["healthy"] is False and lost[1][1]["error"] == "NVMLError_GpuIsLost: GPU is lost"
    assert lost[0][1]["healthy"] is True and "error" not in lost[0][1]
    assert w.lines(INFOS, [sample(0), sample(1, healthy=False)], 102.0, 3) == []  # no change: the cadence
    back = parsed(w.lines(INFOS, [sample(0), sample(1)], 103.0, 4))
    assert back[1][1]["healthy"] is True and "error" not in back[1][1]


def test_a_tick_without_a_reading_changes_no_health_and_unknown_health_is_left_out() -> None:
    w = GpuInfoWriter("n1")
    first = parsed(w.lines(INFOS, None, 100.0, 1))  # the backend hung on the very first tick
    assert all("healthy" not in fields for _, fields in first)
    assert w.lines(INFOS, None, 101.0, 2) == []
    assert len(w.lines(INFOS, [sample(0), sample(1)], 102.0, 3)) == 2  # health now known: a change


def test_thresholds_a_device_does_not_report_are_absent_not_zero() -> None:
    info = GpuInfo(index=0, uuid="GPU-0", model="old")
    line = encode(gpu_info_point("n1", info, 7, healthy=True))
    assert line is not None
    _, tags, fields, ts = parse_line(line)
    assert fields == {"healthy": True} and ts == 7 and tags["model"] == "old"


@pytest.mark.parametrize("mask,names", [
    (0, []),
    (int(pynvml.nvmlClocksEventReasonSwPowerCap), ["sw_power_cap"]),
    (int(pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonHwSlowdown), ["gpu_idle", "hw_slowdown"]),
    (0x1000, ["bit_0x1000"]),
    (None, []),
])
def test_clock_reasons_decode_to_nvml_names(mask: int | None, names: list[str]) -> None:
    assert decode_clock_reasons(mask) == names


def test_the_reason_table_has_one_bit_each_in_order() -> None:
    bits = [bit for _, bit in CLOCK_REASONS]
    assert bits == sorted(bits) and len(set(bits)) == len(bits) == 11
    assert all(bit & (bit - 1) == 0 for bit in bits)  # single bits
