"""The health counters (collectors/nvml_counters.py) through NvmlBackend over the fake NVML: each
counter, the GPU models' support table, "unsupported: absent, never asked again", the read
intervals on an injected monotonic clock, soft errors, ECC off, and the probe's health section
with its replay. Raw values only: a counter that goes backwards is reported as read.
"""

from __future__ import annotations

import ctypes
import json

import pynvml
import pytest

from agentd.probe import HEALTH_CALLS, probe, probe_text
from collectors.base import NvlinkErrors
from collectors.nvml import NvmlBackend
from collectors.nvml_counters import (
    ECC_MIN_INTERVAL_S,
    NVLINK_LINKS_INTERVAL_S,
    NVLINK_LINKS_MAX_AGE_S,
    NVLINK_MIN_INTERVAL_S,
    REMAP_MIN_INTERVAL_S,
    RETIRED_MIN_INTERVAL_S,
    recovery_action_name,
)
from tests.fake_pynvml import Clock, FakeGpu, FakeHandle, FakeNvml

CORR, UNC = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
VOL, AGG = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
SBE_CAUSE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
DBE_CAUSE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
REPLAY, RECOVERY = pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY
CRC_FLIT, CRC_DATA = pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA
H200, V100, L40S, A100 = "NVIDIA H200", "Tesla V100-SXM2-16GB", "NVIDIA L40S", "NVIDIA A100-SXM4-80GB"

# Every health field of GpuSample, written out by hand.
HEALTH_FIELDS = (
    "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate",
    "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending",
    "remap_correctable_rows", "remap_uncorrectable_rows", "remap_pending", "remap_failure",
    "nvlink", "pcie_replay", "recovery_action",
    "throttle_power_ns", "throttle_thermal_ns", "throttle_board_limit_ns", "throttle_reliability_ns",
)  # fmt: skip




@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(fake: FakeNvml, clock: Clock) -> NvmlBackend:
    b = NvmlBackend(fake, monotonic=clock, wall_ns=lambda: 42, events=False)
    b.open()
    return b


# -- each counter ---------------------------------------------------------------------------------


def test_h200_counters_read_raw_and_typed(clock: Clock) -> None:
    g = FakeGpu(name=H200, pcie_replay=7, remapped_rows=(5, 2, 1, 0),
                recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET,
                perf_policy_power_ns=123_000_000_000, perf_policy_thermal_ns=5, perf_policy_board_limit_ns=6,
                perf_policy_reliability_ns=7)  # fmt: skip
    g.ecc_counts.update({(CORR, VOL): 11, (UNC, VOL): 1, (CORR, AGG): 1_000, (UNC, AGG): 3})
    g.nvlink_errors.update({(0, REPLAY): 4, (3, CRC_FLIT): 9, (17, RECOVERY): 2, (17, CRC_DATA): 1})
    (s,) = make(FakeNvml([g]), clock).sample(1)
    assert s.healthy
    assert (s.ecc_sbe_volatile, s.ecc_dbe_volatile, s.ecc_sbe_aggregate, s.ecc_dbe_aggregate) == (11, 1, 1000, 3)
    assert (s.remap_correctable_rows, s.remap_uncorrectable_rows, s.remap_pending, s.remap_failure) == (5, 2, True, False)
    assert (s.retired_pages_sbe, s.retired_pages_dbe, s.retired_pages_pending) == (None, None, None)  # Hopper remaps
    assert s.pcie_replay == 7 and s.recovery_action == "reset_gpu"
    assert (s.throttle_power_ns, s.throttle_thermal_ns, s.throttle_board_limit_ns, s.throttle_reliability_ns) == (
        123_000_000_000, 5, 6, 7)
    assert s.nvlink is not None and [link.link for link in s.nvlink] == list(range(18))
    assert s.nvlink[0] == NvlinkErrors(0, crc_flit=0, crc_data=0, replay=4, recovery=0)
    assert s.nvlink[3].crc_flit == 9 and s.nvlink[17] == NvlinkErrors(17, 0, 1, 0, 2)
    for name in HEALTH_FIELDS:
        v = getattr(s, name)
        assert v is None or isinstance(v, (int, bool, str, tuple)) and not isinstance(v, float), name
    assert isinstance(s.remap_pending, bool) and isinstance(s.ecc_sbe_volatile, int)


def test_v100_retires_pages_and_has_no_row_remapping(clock: Clock) -> None:
    g = FakeGpu(name=V100, retired_pages={SBE_CAUSE: [0x1000, 0x2000], DBE_CAUSE: [0x3000]},
                retired_pending=pynvml.NVML_FEATURE_ENABLED)
    fake = FakeNvml([g])
    b = make(fake, clock)
    (s,) = b.sample(1)
    assert (s.retired_pages_sbe, s.retired_pages_dbe, s.retired_pages_pending) == (2, 1, True)
    assert s.remap_pending is None and s.recovery_action is None
    assert s.nvlink is not None and len(s.nvlink) == 6
    assert {"remapped_rows", "recovery_action"} <= b.unsupported(0)


def test_a_gpu_without_nvlink_asks_the_link_state_once_and_never_the_counters(clock: Clock) -> None:
    fake = FakeNvml([FakeGpu(name=L40S)])
    b = make(fake, clock)
    for k in range(3):
        clock.t += NVLINK_MIN_INTERVAL_S
        assert b.sample(k)[0].nvlink is None
    g = fake.gpus[0]
    assert g.calls["nvmlDeviceGetNvLinkState"] == 1 and g.calls["nvmlDeviceGetNvLinkErrorCounter"] == 0
    assert "nvlink" in b.unsupported(0)


def test_only_the_links_that_were_up_at_attach_are_read(clock: Clock) -> None:
    g = FakeGpu(name=H200)
    assert g.nvlink_state is not None
    g.nvlink_state.update({2: pynvml.NVML_FEATURE_DISABLED, 5: pynvml.NVML_FEATURE_DISABLED})
    g.nvlink_errors[(2, REPLAY)] = 99  # a down link's counter is not read
    fake = FakeNvml([g])
    (s,) = make(fake, clock).sample(1)
    assert s.nvlink is not None and [link.link for link in s.nvlink] == [i for i in range(18) if i not in (2, 5)]
    assert g.calls["nvmlDeviceGetNvLinkState"] == 19  # 18 links, then INVALID_ARGUMENT past the last
    assert g.calls["nvmlDeviceGetNvLinkErrorCounter"] == 16 * 4


def test_an_unsupported_nvlink_counter_is_none_on_every_link_and_not_asked_again(clock: Clock) -> None:
    g = FakeGpu(name=H200, unsupported={"NVML_NVLINK_ERROR_DL_CRC_DATA"})
    fake = FakeNvml([g])
    b = make(fake, clock)
    for k in range(3):
        (s,) = b.sample(k)
        assert s.nvlink is not None and all(link.crc_data is None and link.crc_flit == 0 for link in s.nvlink)
        clock.t += NVLINK_LINKS_MAX_AGE_S  # the per-link counters are due again
    assert g.calls["nvmlDeviceGetNvLinkErrorCounter"] == 18 * 4 + 2 * 18 * 3  # CRC_DATA: once per link


def test_ecc_off_builds_no_ecc_reader(clock: Clock) -> None:
    g = FakeGpu(name=V100, ecc_mode=(pynvml.NVML_FEATURE_DISABLED, pynvml.NVML_FEATURE_ENABLED))
    g.ecc_counts[(UNC, VOL)] = 5  # meaningless with ECC off: never read
    fake = FakeNvml([g])
    b = make(fake, clock)
    (s,) = b.sample(1)
    assert s.healthy and s.ecc_dbe_volatile is None and s.retired_pages_sbe is None
    assert g.calls["nvmlDeviceGetTotalEccErrors"] == 0 and g.calls["nvmlDeviceGetRetiredPages"] == 0
    assert {"ecc_volatile", "ecc_aggregate", "retired_pages"} <= b.unsupported(0)
    assert s.pcie_replay == 0  # the rest still reads


@pytest.mark.parametrize("how", ["unsupported", "error"])
def test_no_ecc_mode_answer_still_attaches_and_tries_the_counters(how: str, clock: Clock) -> None:
    g = FakeGpu(name=H200)
    if how == "unsupported":
        g.unsupported.add("nvmlDeviceGetEccMode")
    else:
        g.errors["nvmlDeviceGetEccMode"] = pynvml.NVML_ERROR_UNKNOWN
    g.ecc_counts[(CORR, VOL)] = 2
    (s,) = make(FakeNvml([g]), clock).sample(1)
    assert s.healthy and s.ecc_sbe_volatile == 2


def test_aggregate_ecc_unsupported_alone(clock: Clock) -> None:
    g = FakeGpu(name=H200, unsupported={"NVML_AGGREGATE_ECC"})
    g.ecc_counts[(UNC, VOL)] = 1
    b = make(FakeNvml([g]), clock)
    (s,) = b.sample(1)
    assert (s.ecc_dbe_volatile, s.ecc_dbe_aggregate) == (1, None)
    assert "ecc_aggregate" in b.unsupported(0) and "ecc_volatile" not in b.unsupported(0)


def test_a_counter_that_goes_backwards_is_reported_as_read(clock: Clock) -> None:
    """Resets (driver reload, GPU reset) are the health tracker's to judge; the backend reports raw."""
    g = FakeGpu(name=H200, pcie_replay=100)
    g.ecc_counts[(CORR, VOL)] = 50
    b = make(FakeNvml([g]), clock)
    assert b.sample(1)[0].ecc_sbe_volatile == 50
    g.ecc_counts[(CORR, VOL)], g.pcie_replay = 0, 3
    clock.t += ECC_MIN_INTERVAL_S
    (s,) = b.sample(2)
    assert (s.ecc_sbe_volatile, s.pcie_replay) == (0, 3)


@pytest.mark.parametrize(("value", "name"), [
    (pynvml.NVML_GPU_RECOVERY_ACTION_NONE, "none"),
    (pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, "reset_gpu"),
    (pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT, "reboot"),
    (pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P, "drain_p2p"),
    (pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET, "drain_and_reset"),
    (999, "unknown_999"),
])  # fmt: skip
def test_recovery_action_names(value: int, name: str, clock: Clock) -> None:
    assert recovery_action_name(value) == name
    (s,) = make(FakeNvml([FakeGpu(name=H200, recovery_action=value)]), clock).sample(1)
    assert s.recovery_action == name


# -- unsupported: absent, never asked again ----------------------------------------------------------

UNSUPPORTED = [
    # (what the GPU refuses, {call or field: times it is asked in all}, the fields that stay None)
    ({"nvmlDeviceGetTotalEccErrors"}, {"nvmlDeviceGetTotalEccErrors": 2},  # volatile, then aggregate
     ["ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate"]),
    ({"nvmlDeviceGetRemappedRows"}, {"nvmlDeviceGetRemappedRows": 1}, ["remap_pending", "remap_failure"]),
    ({"nvmlDeviceGetPcieReplayCounter"}, {"nvmlDeviceGetPcieReplayCounter": 1}, ["pcie_replay"]),
    ({"nvmlDeviceGetNvLinkErrorCounter"}, {"nvmlDeviceGetNvLinkErrorCounter": 18 * 4}, ["nvlink"]),  # each pair once
    ({"NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"}, {"NVML_FI_DEV_GET_GPU_RECOVERY_ACTION": 1}, ["recovery_action"]),
    ({"NVML_FI_DEV_PERF_POLICY_POWER", "NVML_FI_DEV_PERF_POLICY_THERMAL"},
     {"NVML_FI_DEV_PERF_POLICY_POWER": 1, "NVML_FI_DEV_PERF_POLICY_THERMAL": 1},
     ["throttle_power_ns", "throttle_thermal_ns"]),
]  # fmt: skip


@pytest.mark.parametrize(("refused", "asked", "fields"), UNSUPPORTED)
def test_unsupported_health_reads_are_absent_and_never_asked_again(refused, asked, fields, clock: Clock) -> None:
    fake = FakeNvml([FakeGpu(name=H200, unsupported=set(refused)), FakeGpu(name=H200)])
    b = make(fake, clock)
    for k in range(4):
        s0, s1 = b.sample(k)
        assert s0.healthy and s1.healthy
        for f in fields:
            assert getattr(s0, f) is None, f
            assert getattr(s1, f) is not None, f  # the other GPU reads it
        clock.t += NVLINK_LINKS_MAX_AGE_S  # every slow reader is due on each of these ticks
    for name, times in asked.items():
        assert fake.gpus[0].calls[name] == times, name
        assert fake.gpus[1].calls[name] >= 4, name  # the other GPU is asked on every due tick


def test_a_capture_without_the_health_calls_answers_function_not_found(clock: Clock, tmp_path) -> None:
    """What tests/test_nvml.py's H200 replay relies on: absent calls are FUNCTION_NOT_FOUND."""
    result = probe(FakeNvml([FakeGpu(name=H200)]))
    for g in result["gpus"]:
        for name in HEALTH_CALLS:
            del g["calls"][name]
        for fname in list(g["calls"]["nvmlDeviceGetFieldValues"]["fields"])[2:]:
            del g["calls"]["nvmlDeviceGetFieldValues"]["fields"][fname]
    replay = FakeNvml.from_fixture(result)
    b = NvmlBackend(replay, monotonic=clock)
    b.open()
    (s,) = b.sample(1)
    assert s.healthy and all(getattr(s, f) is None for f in HEALTH_FIELDS)
    assert b.event_watch() == {0: []}
    replay.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        replay.nvmlDeviceGetRemappedRows(FakeHandle(0))
    b.close()


# -- intervals --------------------------------------------------------------------------------------

# The calls each slow reader makes on a tick it is due, per H200 (18 links), written out by hand.
TEN_S_CALLS = {"nvmlDeviceGetTotalEccErrors": 4, "nvmlDeviceGetPcieReplayCounter": 1,
               "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION": 1, "NVML_FI_DEV_PERF_POLICY_POWER": 1,
               "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": 1}
SIXTY_S_CALLS = {"nvmlDeviceGetRemappedRows": 1}
LINKS_CALLS = {"nvmlDeviceGetNvLinkErrorCounter": 72}  # the first tick, then only when a total moves


def test_slow_readers_are_read_at_their_interval_on_the_monotonic_clock(clock: Clock) -> None:
    assert ECC_MIN_INTERVAL_S == NVLINK_MIN_INTERVAL_S == 10.0 and REMAP_MIN_INTERVAL_S == RETIRED_MIN_INTERVAL_S == 60.0
    fake = FakeNvml([FakeGpu(name=H200)])
    g = fake.gpus[0]
    b = make(fake, clock)
    watched = {**TEN_S_CALLS, **SIXTY_S_CALLS, **LINKS_CALLS}
    reads: list[tuple[int, dict[str, int]]] = []
    wall = 1_800_000_000 * 10**9
    for second in range(0, 121):  # two minutes at 1 Hz on the monotonic clock
        before = {n: g.calls[n] for n in watched}
        # the wall clock jumps about (NTP): it must not matter
        s = b.sample(wall + (-3600 if 30 <= second < 50 else 0) * 10**9 + second * 10**9)[0]
        delta = {n: g.calls[n] - before[n] for n in watched if g.calls[n] - before[n]}
        if delta:
            reads.append((second, delta))
        assert (s.ecc_sbe_volatile is not None) == (second % 10 == 0), second
        assert (s.remap_pending is not None) == (second % 60 == 0), second
        assert (s.nvlink is not None) == (second == 0), second
        clock.t += 1.0
    assert [sec for sec, _ in reads] == list(range(0, 121, 10))
    for sec, delta in reads:
        assert delta == {**TEN_S_CALLS, **(SIXTY_S_CALLS if sec % 60 == 0 else {}), **(LINKS_CALLS if sec == 0 else {})}, sec


def test_the_nvlink_links_are_read_when_a_total_moves_after_an_event_and_at_their_max_age(clock: Clock) -> None:
    assert NVLINK_MIN_INTERVAL_S == 10.0 and NVLINK_LINKS_MAX_AGE_S == 600.0
    fake = FakeNvml([FakeGpu(name=H200)])
    g = fake.gpus[0]
    b = make(fake, clock)
    assert b.sample(1)[0].nvlink is not None  # the first tick
    clock.t += NVLINK_MIN_INTERVAL_S
    assert b.sample(2)[0].nvlink is None  # the totals stood still
    g.nvlink_errors[(7, CRC_FLIT)] = 3  # link 7 takes CRC errors: the flit total moves
    clock.t += 1.0
    assert b.sample(3)[0].nvlink is None  # the totals are read every 10 s, not every tick
    clock.t += NVLINK_MIN_INTERVAL_S
    (s,) = b.sample(4)
    assert s.nvlink is not None and s.nvlink[7].crc_flit == 3
    assert g.calls["nvmlDeviceGetNvLinkErrorCounter"] == 2 * 72
    clock.t += NVLINK_MIN_INTERVAL_S
    assert b.sample(5)[0].nvlink is None
    b._on_nvml_event(0, "xid")  # what the event thread does on an Xid (74: NVLink error)
    clock.t += 1.0
    assert b.sample(6)[0].nvlink is not None
    clock.t += NVLINK_LINKS_MAX_AGE_S - 1.0
    assert b.sample(7)[0].nvlink is None
    clock.t += NVLINK_MIN_INTERVAL_S
    assert b.sample(8)[0].nvlink is not None  # 10 min since the last read: read whatever the totals say


def test_without_the_totals_the_nvlink_links_are_read_every_minute(clock: Clock) -> None:
    refused = {"NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
               "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"}
    fake = FakeNvml([FakeGpu(name=H200, unsupported=refused)])
    b = make(fake, clock)
    read = []
    for second in range(0, 130, 10):
        read.append(b.sample(second)[0].nvlink is not None)
        clock.t += 10.0
    assert [k * 10 for k, r in enumerate(read) if r] == [0, 60, 120] and NVLINK_LINKS_INTERVAL_S == 60.0
    assert {"nvlink_total_replay", "nvlink_total_crc_data"} <= b.unsupported(0)


def test_at_ten_hz_a_tick_between_the_slow_reads_makes_only_the_per_tick_calls(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(8)
    b = make(fake, clock)
    b.sample(1)
    before = fake.calls.copy()
    clock.t += 0.1
    b.sample(2)
    assert set(fake.calls - before) == {
        "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses",
    }  # fmt: skip


# -- errors -----------------------------------------------------------------------------------------


def test_a_failing_health_read_leaves_the_gpu_readable_and_is_retried_at_its_interval(clock: Clock) -> None:
    fake = FakeNvml([FakeGpu(name=H200)])
    g = fake.gpus[0]
    g.errors["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_CORRUPTED_INFOROM
    b = make(fake, clock)
    (s,) = b.sample(1)
    assert s.healthy and s.power_w == 352.5 and s.ecc_sbe_volatile is None and s.pcie_replay == 0
    assert b.event_stats()["nvml_health_read_errors"] == 2  # volatile and aggregate
    clock.t += 1.0
    b.sample(2)
    assert g.calls["nvmlDeviceGetTotalEccErrors"] == 2  # not asked again on the next tick
    del g.errors["nvmlDeviceGetTotalEccErrors"]
    clock.t += ECC_MIN_INTERVAL_S
    assert b.sample(3)[0].ecc_sbe_volatile == 0  # asked again at the interval: not dropped
    assert b.drain_events() == []


def test_gpu_lost_in_a_health_read_marks_the_gpu_down(clock: Clock) -> None:
    fake = FakeNvml([FakeGpu(name=H200), FakeGpu(name=H200)])
    fake.gpus[0].errors["nvmlDeviceGetRemappedRows"] = pynvml.NVML_ERROR_GPU_IS_LOST
    b = make(fake, clock)
    s0, s1 = b.sample(1)
    assert not s0.healthy and "remapped_rows" in (s0.error or "") and s1.healthy
    assert [e.kind for e in b.drain_events()] == ["gpu_lost"]


def test_one_nvlink_counter_error_is_none_on_that_link_only(clock: Clock) -> None:
    g = FakeGpu(name=H200)
    g.errors["NVML_NVLINK_ERROR_DL_REPLAY"] = pynvml.NVML_ERROR_UNKNOWN
    b = make(FakeNvml([g]), clock)
    (s,) = b.sample(1)
    assert s.healthy and s.nvlink is not None and all(link.replay is None and link.recovery == 0 for link in s.nvlink)
    assert b.event_stats()["nvml_health_read_errors"] == 18
    assert "nvlink" not in b.unsupported(0)


# -- the fake is as strict as the real bindings ------------------------------------------------------

H0 = FakeHandle(0)


@pytest.mark.parametrize(("name", "args", "error"), [
    ("nvmlDeviceGetTotalEccErrors", (H0, float(CORR), VOL), TypeError),
    ("nvmlDeviceGetTotalEccErrors", (H0, CORR, float(VOL)), TypeError),
    ("nvmlDeviceGetRetiredPages", (H0, float(SBE_CAUSE)), TypeError),
    ("nvmlDeviceGetNvLinkState", (H0, 1.0), ctypes.ArgumentError),
    ("nvmlDeviceGetNvLinkErrorCounter", (H0, 1.0, REPLAY), ctypes.ArgumentError),
    ("nvmlDeviceGetNvLinkErrorCounter", (H0, 1, float(REPLAY)), ctypes.ArgumentError),
    ("nvmlDeviceGetTotalEccErrors", (H0, 7, VOL), pynvml.NVMLError_InvalidArgument),
    ("nvmlDeviceGetNvLinkState", (H0, 18), pynvml.NVMLError_InvalidArgument),
    ("nvmlDeviceGetNvLinkErrorCounter", (H0, 0, 17), pynvml.NVMLError_InvalidArgument),
    ("nvmlDeviceGetRetiredPages", (H0, SBE_CAUSE), pynvml.NVMLError_NotSupported),  # an H200 remaps rows
])  # fmt: skip
def test_health_calls_convert_their_arguments_like_the_real_wrappers(name: str, args: tuple, error: type) -> None:
    fake = FakeNvml([FakeGpu(name=H200)])
    fake.nvmlInit()
    with pytest.raises(error):
        getattr(fake, name)(*args)


def test_the_model_table_answers_like_each_generation() -> None:
    fake = FakeNvml([FakeGpu(name=H200), FakeGpu(name=V100), FakeGpu(name=A100), FakeGpu(name="Fake GPU")])
    fake.nvmlInit()
    h200, v100, a100, default = (FakeHandle(i) for i in range(4))
    assert fake.nvmlDeviceGetRemappedRows(h200) == (0, 0, 0, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetRemappedRows(v100)
    assert fake.nvmlDeviceGetRetiredPages(v100, SBE_CAUSE) == []
    assert fake.nvmlDeviceGetNvLinkState(a100, 11) == pynvml.NVML_FEATURE_ENABLED
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetNvLinkState(a100, 12)  # an A100 has 12 links
    assert fake.nvmlDeviceGetSupportedEventTypes(default) == 0  # the default model: no events


# -- probe: the health section and its replay -----------------------------------------------------


def _varied() -> FakeNvml:
    a = FakeGpu(name=H200, pcie_replay=3, remapped_rows=(1, 0, 1, 0), perf_policy_power_ns=77,
                recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P, unsupported={"NVML_AGGREGATE_ECC"})
    a.ecc_counts.update({(CORR, VOL): 4, (UNC, VOL): 1})
    a.nvlink_errors.update({(1, CRC_FLIT): 8})
    assert a.nvlink_state is not None
    a.nvlink_state[4] = pynvml.NVML_FEATURE_DISABLED
    b = FakeGpu(name=V100, retired_pages={DBE_CAUSE: [0xAB000]}, retired_pending=1,
                ecc_mode=(pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_DISABLED),
                unsupported={"NVML_NVLINK_ERROR_DL_CRC_DATA"})
    c = FakeGpu(name=L40S, ecc_mode=(pynvml.NVML_FEATURE_DISABLED, pynvml.NVML_FEATURE_DISABLED))
    return FakeNvml([a, b, c])


def test_probe_records_the_health_calls_and_event_types() -> None:
    result = probe(_varied())
    json.dumps(result)
    a, b, c = result["gpus"]
    assert a["health"]["nvmlDeviceGetSupportedEventTypes"]["value"] == ["xid", "ecc_sbe", "ecc_dbe", "recovery_action"]
    assert a["health"]["nvmlDeviceGetTotalEccErrors"]["counters"] == {
        "CORRECTED/VOLATILE": 4, "UNCORRECTED/VOLATILE": 1,
        "CORRECTED/AGGREGATE": {"error": "not_supported"}, "UNCORRECTED/AGGREGATE": {"error": "not_supported"}}
    assert a["health"]["nvmlDeviceGetRemappedRows"]["raw"] == [1, 0, 1, 0]
    assert a["health"]["nvmlDeviceGetRetiredPages"]["causes"]["DOUBLE_BIT_ECC_ERROR"] == {"error": "not_supported"}
    assert a["calls"]["nvmlDeviceGetNvLinkState"]["up"] == [i for i in range(18) if i != 4]
    assert a["health"]["nvmlDeviceGetNvLinkErrorCounter"]["links"]["1/DL_CRC_FLIT"] == 8
    assert "4/DL_REPLAY" not in a["health"]["nvmlDeviceGetNvLinkErrorCounter"]["links"]  # a link that is down
    assert a["health"]["nvmlDeviceGetPcieReplayCounter"] == 3
    assert a["health"]["NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"] == "drain_p2p"
    assert a["health"]["NVML_FI_DEV_PERF_POLICY_POWER"] == 77
    assert a["collector"]["events_watched"] == ["xid", "ecc_sbe", "ecc_dbe", "recovery_action"]
    assert a["collector"]["sample"]["nvlink"][1] == {"link": 1, "crc_flit": 8, "crc_data": 0, "replay": 0,
                                                     "recovery": 0}  # fmt: skip
    assert b["health"]["nvmlDeviceGetRetiredPages"]["causes"] == {"MULTIPLE_SINGLE_BIT_ECC_ERRORS": 0,
                                                                  "DOUBLE_BIT_ECC_ERROR": 1}  # fmt: skip
    assert b["health"]["nvmlDeviceGetEccMode"]["value"] == {"current": "enabled", "pending": "disabled"}
    assert b["health"]["nvmlDeviceGetRemappedRows"] == {"error": "not_supported"}
    assert c["health"]["nvmlDeviceGetNvLinkState"] == {"error": "not_supported"}
    assert "nvmlDeviceGetNvLinkErrorCounter" not in c["calls"]  # no link is up: nothing to ask
    assert c["collector"]["sample"]["ecc_sbe_volatile"] is None  # ECC off: not read
    text = probe_text(result)
    assert "link 1: DL_REPLAY=0 DL_RECOVERY=0 DL_CRC_FLIT=8" in text
    assert "events watched xid, ecc_sbe, ecc_dbe, recovery_action" in text
    assert "(xid, ecc_sbe, ecc_dbe)" in text  # V100's event types


def test_the_fake_replays_every_health_call_the_probe_records() -> None:
    from tests import fake_pynvml

    assert fake_pynvml._HEALTH_CALLS == HEALTH_CALLS


def test_a_capture_overrides_the_model_table() -> None:
    """Replayed, a GPU answers what its capture recorded, whatever MODELS says of its model."""
    g = FakeGpu(name=H200, retired_pages={DBE_CAUSE: [0x1000]}, supported_events=pynvml.nvmlEventTypeXidCriticalError)
    g.unsupported.clear()  # this "H200" retires pages, against the table
    assert g.nvlink_state is not None
    del g.nvlink_state[17]
    replay = FakeNvml.from_fixture(probe(FakeNvml([g])))
    replay.nvmlInit()
    h = FakeHandle(0)
    assert replay.nvmlDeviceGetRetiredPages(h, DBE_CAUSE) == [0x1000]
    assert replay.nvmlDeviceGetSupportedEventTypes(h) == pynvml.nvmlEventTypeXidCriticalError
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        replay.nvmlDeviceGetNvLinkState(h, 17)  # 17 links, as captured


def test_a_probe_with_health_replays_to_the_same_readings(tmp_path, clock: Clock) -> None:
    original = _varied()
    path = tmp_path / "varied.json"
    path.write_text(json.dumps(probe(original)))
    replay = FakeNvml.from_fixture(path)

    def readings(fake: FakeNvml) -> tuple:
        b = NvmlBackend(fake, monotonic=Clock(), events=True, event_wait_ms=50)
        b.open()
        try:
            samples = [b.sample(1), b.sample(2)]
            return samples, [sorted(b.unsupported(i)) for i in range(3)], b.event_watch()
        finally:
            b.close()

    got, want = readings(replay), readings(original)
    assert got == want
    assert got[0][0][0].ecc_sbe_volatile == 4 and got[0][0][1].retired_pages_dbe == 1
