"""The NVML collector and the probe, over the fake pynvml module (no GPU needed)."""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import json
import math
import time
import types
from pathlib import Path

import pynvml
import pytest

import agentd.probe
from agentd.probe import probe, probe_text
from collectors.base import BackendError, GpuInfo, LimitWriteError
from collectors.nvml import NO_DRIVER, NvmlBackend
from tests.fake_pynvml import Clock, FakeGpu, FakeHandle, FakeNvml, install

SET = "nvmlDeviceSetPowerManagementLimit"
H200 = Path(__file__).parent / "fixtures" / "nvml" / "nvidia-h200.json"




@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(fake: FakeNvml, clock: Clock | None = None) -> NvmlBackend:
    b = NvmlBackend(fake, monotonic=clock or Clock(), wall_ns=lambda: 42)
    b.open()
    return b


# -- open and units ---------------------------------------------------------------------------


def test_open_reads_identity_and_envelopes() -> None:
    fake = FakeNvml.with_gpus(2, name="NVIDIA Test", min_limit_mw=150_500, max_limit_mw=600_000,
                              default_limit_mw=550_000)  # fmt: skip
    infos = make(fake).infos
    assert [i.index for i in infos] == [0, 1]
    assert infos[0].uuid == fake.gpus[0].uuid != infos[1].uuid
    i = infos[0]
    assert (i.model, i.limit_min_w, i.limit_max_w, i.limit_default_w) == ("NVIDIA Test", 150.5, 600.0, 550.0)
    assert (i.slowdown_c, i.shutdown_c, i.gpu_max_c, i.mem_max_c) == (89.0, 95.0, 87.0, 95.0)


def test_sample_converts_units() -> None:
    fake = FakeNvml.with_gpus(
        1, power_mw=123_456, power_instant_mw=250_001, energy_mj=5_000_500, temp_c=61, mem_temp_c=70,
        limit_mw=650_000, enforced_limit_mw=600_000, util_gpu=97, util_mem=40, mem_used_bytes=12_345,
        sm_clock_mhz=1755, clock_reasons=0x4 | 0x1, pids=[11, 22],
    )  # fmt: skip
    (s,) = make(fake).sample(7)
    assert s.healthy and s.error is None and s.ts_ns == 7
    assert s.power_avg_w == pytest.approx(123.456)
    assert s.power_w == pytest.approx(250.001)
    assert s.energy_j == pytest.approx(5000.5)
    assert (s.temp_c, s.mem_temp_c) == (61.0, 70.0)
    assert (s.limit_w, s.limit_current_w, s.limit_default_w, s.limit_min_w, s.limit_max_w) == (
        600.0, 650.0, 700.0, 200.0, 700.0,
    )  # fmt: skip
    assert (s.util_pct, s.mem_util_pct, s.sm_clock_mhz) == (97.0, 40.0, 1755.0)
    assert s.mem_used_bytes == 12_345 and isinstance(s.mem_used_bytes, int)
    assert s.clock_reasons == 0x5 and s.throttled is True
    assert s.pids == (11, 22)
    assert s.slowdown_c == 89.0
    for name in ("power_w", "power_avg_w", "energy_j", "temp_c", "limit_w", "util_pct", "sm_clock_mhz"):
        assert isinstance(getattr(s, name), float), name


# Every clocks-event / throttle reason bit nvidia-ml-py defines, by its name's suffix, and
# whether it means "held down". A bit a newer nvidia-ml-py adds fails the completeness check
# below until it is classified here.
THROTTLING = {
    "SwPowerCap": True, "HwSlowdown": True, "SwThermalSlowdown": True, "HwThermalSlowdown": True,
    "HwPowerBrakeSlowdown": True, "BoardLimit": True, "Reliability": True,
    "GpuIdle": False, "ApplicationsClocksSetting": False, "UserDefinedClocks": False, "SyncBoost": False,
    "DisplayClockSetting": False,
}  # fmt: skip
_REASON_PREFIXES = ("nvmlClocksThrottleReason", "nvmlClocksEventReason")


def _reason_bits() -> list[tuple[str, int]]:
    return [(n, getattr(pynvml, n)) for n in dir(pynvml)
            if n.startswith(_REASON_PREFIXES) and not n.endswith(("None", "All"))]  # fmt: skip


def test_every_reason_bit_of_the_bindings_is_classified() -> None:
    suffixes = {n.removeprefix(p) for n, _ in _reason_bits() for p in _REASON_PREFIXES if n.startswith(p)}
    assert suffixes == set(THROTTLING)


@pytest.mark.parametrize(("name", "bit"), _reason_bits())
def test_throttled_for_each_reason_bit(name: str, bit: int, clock: Clock) -> None:
    suffix = name.removeprefix("nvmlClocksThrottleReason").removeprefix("nvmlClocksEventReason")
    (s,) = make(FakeNvml.with_gpus(1, clock_reasons=bit), clock).sample(1)
    assert s.clock_reasons == bit
    assert s.throttled is THROTTLING[suffix]
    # idle alongside does not hide a real reason, and adds none
    (s,) = make(FakeNvml.with_gpus(1, clock_reasons=bit | pynvml.nvmlClocksThrottleReasonGpuIdle), clock).sample(1)
    assert s.throttled is THROTTLING[suffix]


@pytest.mark.parametrize(
    ("vtype", "member_value", "expected_w"),
    [
        (pynvml.NVML_VALUE_TYPE_DOUBLE, 250_000.5, 250.0005),
        (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, 1_000_000, 1000.0),
        (pynvml.NVML_VALUE_TYPE_SIGNED_INT, 300_000, 300.0),
    ],
)
def test_field_value_union_is_read_by_value_type(vtype: int, member_value: float, expected_w: float) -> None:
    fake = FakeNvml.with_gpus(1, power_instant_mw=member_value)
    fake.gpus[0].field_value_types[pynvml.NVML_FI_DEV_POWER_INSTANT] = vtype
    (s,) = make(fake).sample(1)
    assert s.power_w == pytest.approx(expected_w)


# -- unsupported --------------------------------------------------------------------------------

UNSUPPORTED_CASES = [
    # (names made unsupported, sample fields that become None)
    ({"nvmlDeviceGetPowerUsage"}, ["power_avg_w"]),
    ({"nvmlDeviceGetTotalEnergyConsumption"}, ["energy_j"]),
    ({"nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"}, ["temp_c"]),
    ({"nvmlDeviceGetEnforcedPowerLimit"}, ["limit_w"]),
    ({"nvmlDeviceGetPowerManagementLimit"}, ["limit_current_w"]),
    ({"nvmlDeviceGetUtilizationRates"}, ["util_pct", "mem_util_pct"]),
    ({"nvmlDeviceGetMemoryInfo"}, ["mem_used_bytes"]),
    ({"nvmlDeviceGetClockInfo"}, ["sm_clock_mhz"]),
    ({"nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"}, ["clock_reasons"]),
    ({"nvmlDeviceGetFieldValues"}, ["power_w", "mem_temp_c"]),
    ({"NVML_FI_DEV_POWER_INSTANT"}, ["power_w"]),
    ({"NVML_FI_DEV_MEMORY_TEMP"}, ["mem_temp_c"]),
    ({"NVML_FI_DEV_POWER_INSTANT", "NVML_FI_DEV_MEMORY_TEMP"}, ["power_w", "mem_temp_c"]),
]


# Calls a healthy GPU never makes: the older call of a pair, asked only when the newer one fails.
FALLBACK_ONLY = {"nvmlDeviceGetTemperature", "nvmlDeviceGetCurrentClocksThrottleReasons"}


@pytest.mark.parametrize(("names", "fields"), UNSUPPORTED_CASES)
def test_unsupported_is_none_and_not_called_again(names: set[str], fields: list[str], clock: Clock) -> None:
    fake = FakeNvml.with_gpus(2)
    fake.gpus[0].unsupported |= names
    b = make(fake, clock)
    for k in range(3):
        clock.t += 1.0  # a second apart: every reader is due
        s0, s1 = b.sample((k + 1) * 10**9)
        assert s0.healthy and s1.healthy
        for f in fields:
            assert getattr(s0, f) is None, f
            assert getattr(s1, f) is not None, f  # the other GPU is unaffected
        # everything else on GPU 0 still reads
        others = {"power_avg_w", "energy_j", "temp_c", "limit_w", "util_pct", "sm_clock_mhz", "power_w"} - set(fields)
        assert all(getattr(s0, f) is not None for f in others)
    for name in names:
        assert fake.gpus[0].calls[name] == 1, name  # asked once, then never again
        assert fake.gpus[1].calls[name] == (0 if name in FALLBACK_ONLY else 3), name


def test_unsupported_pids_give_empty_tuple() -> None:
    fake = FakeNvml.with_gpus(1, pids=[5])
    fake.gpus[0].unsupported |= {"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"}
    b = make(fake)
    assert b.sample(1)[0].pids == ()
    b.sample(2)
    assert fake.gpus[0].calls["nvmlDeviceGetComputeRunningProcesses"] == 1


@pytest.mark.parametrize("how", ["unsupported", "function_not_found", "version_mismatch", "not_in_bindings"])
def test_newer_call_falls_back_to_older_one_in_the_same_tick(how: str) -> None:
    fake = FakeNvml.with_gpus(1, temp_c=55, clock_reasons=0x20)
    g = fake.gpus[0]
    newer = ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetCurrentClocksEventReasons")
    for name in newer:
        if how == "unsupported":
            g.unsupported.add(name)
        elif how == "function_not_found":
            g.errors[name] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
        elif how == "version_mismatch":
            g.errors[name] = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        else:
            fake.hidden.add(name)
    b = make(fake)
    for _ in range(3):
        (s,) = b.sample(1)
        assert s.healthy and s.temp_c == 55.0 and s.clock_reasons == 0x20
    assert g.calls["nvmlDeviceGetTemperatureV"] == (0 if how == "not_in_bindings" else 1)
    assert g.calls["nvmlDeviceGetTemperature"] == 3
    assert g.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3
    assert {"temp_v", "clock_event_reasons"} <= b.unsupported(0)


def test_processes_fall_back_to_v2_on_library_mismatch() -> None:
    fake = FakeNvml.with_gpus(1, pids=[7, 8])
    fake.gpus[0].errors["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    b = make(fake)
    assert b.sample(1)[0].pids == (7, 8)
    assert b.sample(2)[0].pids == (7, 8)
    assert fake.gpus[0].calls["nvmlDeviceGetComputeRunningProcesses"] == 1


def test_field_entry_with_its_own_error_is_none_but_asked_again() -> None:
    fake = FakeNvml.with_gpus(1)
    g = fake.gpus[0]
    g.errors["NVML_FI_DEV_POWER_INSTANT"] = pynvml.NVML_ERROR_UNKNOWN
    b = make(fake)
    (s,) = b.sample(1)
    assert s.healthy and s.power_w is None and s.mem_temp_c == 52.0
    del g.errors["NVML_FI_DEV_POWER_INSTANT"]
    (s,) = b.sample(2)
    assert s.power_w == 352.5
    assert g.calls["NVML_FI_DEV_POWER_INSTANT"] == 2


# What one tick asks a healthy GPU, written out by hand (not taken from the collector's tables).
TICK_CALLS = {
    "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetTemperatureV", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetComputeRunningProcesses",
}  # fmt: skip


def test_hot_path_makes_only_the_reading_calls(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(4)
    b = make(fake, clock)
    b.sample(10**9)
    before = fake.calls.copy()
    clock.t += 1.0  # the energy counter is due again
    b.sample(2 * 10**9)
    # each reading call once per GPU; no handle look-ups, no re-enumeration, nothing else
    assert fake.calls - before == {name: 4 for name in TICK_CALLS}


def test_the_slow_energy_counter_is_read_at_most_every_half_second(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(1)
    b = make(fake, clock)
    energies = []
    for k in range(1, 17):  # 8 Hz for 2 s (0.125 s: exact in binary, so no rounding at the edge)
        energies.append(b.sample(k * 125_000_000)[0].energy_j)
        clock.t += 0.125
    assert fake.gpus[0].calls["nvmlDeviceGetTotalEnergyConsumption"] == 4
    assert [e is not None for e in energies[:5]] == [True, False, False, False, True]
    for k in range(3):  # at 1 Hz: every tick
        clock.t += 1.0
        assert b.sample((30 + k) * 10**9)[0].energy_j == 123456.789


def test_the_energy_rate_limit_runs_on_the_monotonic_clock_not_wall_time(clock: Clock) -> None:
    """Wall time steps (NTP, an operator's ``date``) must neither starve nor speed up the read."""
    fake = FakeNvml.with_gpus(1)
    b = make(fake, clock)
    t0 = 1_800_000_000 * 10**9
    read = []
    for k in range(20):  # 8 Hz on the monotonic clock
        wall = t0 + k * 125_000_000
        if 7 <= k < 13:
            wall -= 3600 * 10**9  # stepped back an hour
        elif k >= 13:
            wall += 86400 * 10**9  # then forward a day
        read.append(b.sample(wall)[0].energy_j is not None)
        clock.t += 0.125
    assert [k for k, r in enumerate(read) if r] == [0, 4, 8, 12, 16]
    # and a wall clock that stands still (a frozen VM clock) does not stop the reads
    stuck = []
    for _ in range(8):
        stuck.append(b.sample(t0)[0].energy_j is not None)
        clock.t += 0.125
    assert stuck == [True, False, False, False, True, False, False, False]


# -- GPU lost ------------------------------------------------------------------------------------


def test_gpu_lost_mid_run_others_keep_reporting_then_recovers(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(3)
    b = make(fake, clock)
    assert all(s.healthy for s in b.sample(1))
    assert b.drain_events() == []

    fake.gpus[1].lost = True
    s0, s1, s2 = b.sample(2)
    assert s0.healthy and s2.healthy and s0.power_w == s2.power_w == 352.5
    assert not s1.healthy and "GPU is lost" in s1.error and s1.uuid == fake.gpus[1].uuid
    assert all(getattr(s1, f.name) is None for f in dataclasses.fields(s1)
               if f.name not in ("index", "uuid", "model", "ts_ns", "healthy", "error", "pids"))  # fmt: skip
    (ev,) = b.drain_events()
    assert (ev.ts_ns, ev.gpu_index, ev.kind) == (2, 1, "gpu_lost") and "GPU is lost" in ev.message

    calls = sum(fake.gpus[1].calls.values())
    clock.t += 1.0
    for ts in (3, 4, 5):
        assert not b.sample(ts)[1].healthy
    assert sum(fake.gpus[1].calls.values()) == calls  # no retry before the backoff
    assert b.drain_events() == []

    fake.gpus[1].lost = False
    assert not b.sample(6)[1].healthy  # still inside the backoff
    clock.t += 4.0
    s1 = b.sample(7)[1]
    assert s1.healthy and s1.power_w == 352.5 and s1.limit_max_w == 700.0
    assert fake.gpus[1].calls["nvmlDeviceGetHandleByUUID"] == 1
    (ev,) = b.drain_events()
    assert (ev.ts_ns, ev.gpu_index, ev.kind) == (7, 1, "gpu_recovered")
    assert b.sample(8)[1].healthy and b.drain_events() == []


def test_backoff_grows_while_the_gpu_stays_lost(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(1)
    b = NvmlBackend(fake, monotonic=clock, retry_s=5, retry_max_s=20)
    b.open()
    fake.gpus[0].lost = True
    b.sample(1)
    tries = []
    for _ in range(60):
        clock.t += 1.0
        before = fake.gpus[0].calls["nvmlDeviceGetHandleByUUID"]
        b.sample(2)
        if fake.gpus[0].calls["nvmlDeviceGetHandleByUUID"] > before:
            tries.append(clock.t - 1000.0)
    assert tries[:4] == [5.0, 15.0, 35.0, 55.0]  # 5, then 10, 20, 20 (capped)
    assert [e.kind for e in b.drain_events()] == ["gpu_lost"]  # one event, not one per retry


def test_any_other_error_marks_only_that_gpu_unhealthy(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(2)
    fake.gpus[0].errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN
    b = make(fake, clock)
    s0, s1 = b.sample(1)
    assert not s0.healthy and "power_avg" in s0.error and "Unknown Error" in s0.error
    assert s1.healthy
    del fake.gpus[0].errors["nvmlDeviceGetPowerUsage"]
    clock.t += 5
    assert b.sample(2)[0].healthy


def test_gpu_lost_at_open_is_listed_and_attached_later(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(2)
    fake.gpus[1].lost = True
    b = make(fake, clock)
    assert b.infos[1].uuid == "" and b.infos[0].uuid
    assert [e.kind for e in b.drain_events()] == ["gpu_lost"]
    assert not b.sample(1)[1].healthy
    fake.gpus[1].lost = False
    clock.t += 5
    s1 = b.sample(2)[1]
    assert s1.healthy and s1.uuid == fake.gpus[1].uuid and b.infos[1].uuid == fake.gpus[1].uuid
    assert s1.slowdown_c == 89.0


# -- the power limit ---------------------------------------------------------------------------


def test_set_power_limit_converts_to_mw() -> None:
    fake = FakeNvml.with_gpus(2)
    b = make(fake)
    b.set_power_limit(1, 450.5)
    assert fake.gpus[1].sets == [450_500] and fake.gpus[0].sets == []
    assert b.sample(2)[1].limit_current_w == 450.5
    b.set_power_limit(1, 200)  # the bounds themselves are allowed
    b.set_power_limit(1, 700.0)
    assert fake.gpus[1].sets[-2:] == [200_000, 700_000]


def test_no_permission_is_a_permission_error() -> None:
    fake = FakeNvml.with_gpus(1, no_permission_on_set=True)
    b = make(fake)
    with pytest.raises(LimitWriteError) as e:
        b.set_power_limit(0, 400)
    assert e.value.permission is True
    assert "root" in str(e.value) and "CAP_SYS_ADMIN" in str(e.value)


def test_other_set_errors_are_limit_write_errors() -> None:
    fake = FakeNvml.with_gpus(1)
    fake.gpus[0].unsupported.add(SET)
    with pytest.raises(LimitWriteError) as e:
        make(fake).set_power_limit(0, 400)
    assert e.value.permission is False and "does not support" in str(e.value)


@pytest.mark.parametrize("watts", [199.99, 700.01, 0, -5, math.nan, math.inf, 1e9])
def test_out_of_range_refused_without_calling_nvml(watts: float) -> None:
    fake = FakeNvml.with_gpus(1)
    b = make(fake)
    with pytest.raises(ValueError, match="outside"):
        b.set_power_limit(0, watts)
    assert fake.calls[SET] == 0


def test_unknown_index_and_unreadable_gpu_are_refused(clock: Clock) -> None:
    fake = FakeNvml.with_gpus(2)
    b = make(fake, clock)
    with pytest.raises(ValueError, match="no GPU with index 2"):
        b.set_power_limit(2, 400)
    fake.gpus[1].lost = True
    b.sample(1)
    with pytest.raises(LimitWriteError, match="not readable"):
        b.set_power_limit(1, 400)
    assert fake.calls[SET] == 0 and fake.gpus[1].attempts == []
    no_constraints = FakeNvml([FakeGpu(unsupported={"nvmlDeviceGetPowerManagementLimitConstraints"})])
    b2 = make(no_constraints)
    with pytest.raises(LimitWriteError, match="constraints"):
        b2.set_power_limit(0, 400)
    assert no_constraints.calls[SET] == 0 and no_constraints.gpus[0].attempts == []


# -- lifecycle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_driver_is_a_backend_error_with_advice(code: int) -> None:
    with install(FakeNvml(init_error=code)):  # the default path: NvmlBackend imports pynvml itself
        with pytest.raises(BackendError) as e:
            NvmlBackend().open()
    assert NO_DRIVER in str(e.value)
    assert 'no NVIDIA driver found; use backend = "sim" to run without GPUs' in str(e.value)


def test_other_init_failures_speak_to_the_operator() -> None:
    with pytest.raises(BackendError, match="root"):
        NvmlBackend(FakeNvml(init_error=pynvml.NVML_ERROR_NO_PERMISSION)).open()
    with pytest.raises(BackendError, match="reboot"):
        NvmlBackend(FakeNvml(init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)).open()
    fake = FakeNvml([])
    with pytest.raises(BackendError, match="no GPUs"):
        NvmlBackend(fake).open()
    assert fake.initialized == 0  # shut down again


def test_close_is_idempotent() -> None:
    fake = FakeNvml.with_gpus(1)
    b = make(fake)
    b.close()
    b.close()
    assert fake.initialized == 0 and fake.calls["nvmlShutdown"] == 1
    NvmlBackend(fake).close()  # never opened


def test_call_hooks_see_every_call() -> None:
    seen: list[str] = []
    fake = FakeNvml.with_gpus(1, on_call=seen.append)
    make(fake).sample(1)
    assert "nvmlDeviceGetPowerUsage" in seen and SET not in seen


# -- probe and fixture replay --------------------------------------------------------------------


def _varied_fake() -> FakeNvml:
    a = FakeGpu(name="Fake A", power_mw=111_111, power_instant_mw=222_222, energy_mj=9_876_543_210, temp_c=33,
                clock_reasons=0x41, pids=[100, 200], util_gpu=12, mem_used_bytes=1 << 33, limit_mw=500_000)
    b = FakeGpu(name="Fake A", temp_c=71, unsupported={"NVML_FI_DEV_MEMORY_TEMP", "nvmlDeviceGetTemperatureV",
                "nvmlDeviceGetUtilizationRates"}, thresholds={pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 85})
    b.field_value_types[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    return FakeNvml([a, b], driver_version="1.2.3-fake")  # fmt: skip


def test_probe_is_serialisable_and_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _varied_fake()
    # A perf counter that moves only while GPU 0's PowerUsage runs: the probe must time that
    # call, and only that call, at exactly what it took.
    ticks = [0]
    monkeypatch.setattr(agentd.probe, "time", types.SimpleNamespace(perf_counter_ns=lambda: ticks[0],
                                                                    time_ns=time.time_ns))
    slow = fake.gpus[0]

    def on_call(name: str) -> None:
        if name == "nvmlDeviceGetPowerUsage" and slow.calls[name] == 1:  # the probe's call, not the collector's
            ticks[0] += 2_345_600

    slow.on_call = on_call
    result = probe(fake)
    text = json.dumps(result)
    assert fake.calls[SET] == 0 and all(g.sets == [] for g in fake.gpus)
    assert not any("Serial" in k or "BoardPartNumber" in k for k in fake.calls)
    assert fake.initialized == 0
    assert result["fake"] is True and result["device_count"] == 2 and result["driver_version"] == "1.2.3-fake"
    g0, g1 = result["gpus"]
    assert g0["uuid"] == fake.gpus[0].uuid and "serial" not in text.lower()
    pu = g0["calls"]["nvmlDeviceGetPowerUsage"]
    assert (pu["raw"], pu["unit"], pu["value"], pu["value_unit"]) == (111_111, "mW", 111.111, "W")
    assert pu["us"] == 2345.6
    assert result["gpus"][1]["calls"]["nvmlDeviceGetPowerUsage"]["us"] == 0
    assert g0["calls"]["nvmlDeviceGetTotalEnergyConsumption"]["us"] == 0
    assert g1["calls"]["nvmlDeviceGetFieldValues"]["fields"]["NVML_FI_DEV_MEMORY_TEMP"]["error"] == "not_supported"
    assert g1["calls"]["nvmlDeviceGetTemperatureV"]["error"] == "not_supported"
    assert g0["controls"]["limit_max_w"] == 700.0 and g0["controls"]["power_management"] == "enabled"
    assert g0["collector"]["sample"]["power_w"] == 222.222
    assert g1["collector"]["unsupported"] == ["mem_temp", "temp_v", "utilization"]
    assert "FAKE" in probe_text(result) and "not_supported" in probe_text(result)


def test_probe_without_driver_raises_the_operator_message() -> None:
    with pytest.raises(BackendError, match="no NVIDIA driver found"):
        probe(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))


def test_probe_survives_a_lost_gpu() -> None:
    fake = FakeNvml.with_gpus(2)
    fake.gpus[1].lost = True
    result = probe(fake)
    json.dumps(result)
    g1 = result["gpus"][1]
    assert (g1["index"], g1["error"]) == (1, "gpu_is_lost") and "calls" not in g1
    assert g1["collector"]["sample"]["healthy"] is False
    assert result["gpus"][0]["collector"]["sample"]["healthy"] is True
    assert "cannot open" in probe_text(result)


def test_fixture_replay_roundtrip(tmp_path) -> None:
    original = _varied_fake()
    path = tmp_path / "fake-a.json"
    path.write_text(json.dumps(probe(original), indent=2))
    replay = FakeNvml.from_fixture(path)
    assert replay.driver_version == "1.2.3-fake"

    def readings(fake: FakeNvml) -> tuple[list, list, list]:
        b = NvmlBackend(fake)
        infos = b.open()
        samples = [dataclasses.asdict(s) for s in b.sample(99)]
        samples += [dataclasses.asdict(s) for s in b.sample(100)]  # after unsupported readers dropped
        return infos, samples, [b.unsupported(i.index) for i in infos]

    assert readings(replay) == readings(original)
    # and a replayed probe is the same probe, timings and capture time aside
    strip = lambda r: json.loads(json.dumps(r).replace('"us"', '"_us"'))  # noqa: E731
    a, b = probe(original), probe(replay)
    for r in (a, b):
        r.pop("captured_at"), r.pop("timing_us")
        for g in r["gpus"]:
            for e in g["calls"].values():
                e.pop("us", None)
                for sub in (e.get("thresholds") or {}).values():
                    sub.pop("us", None)
            g["collector"]["sample"].pop("ts_ns")
    assert strip(a) == strip(b)


# -- the fake is as strict as the real bindings ----------------------------------------------------


def _c_uint_accepts(value: object) -> bool:
    """What the real wrappers' ``c_uint(x)`` does with a value: True when it converts."""
    try:
        ctypes.c_uint(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


@pytest.mark.parametrize(
    ("limit", "outcome"),
    [
        (450_000, "set"),
        (450_000.0, TypeError),
        (450_000.5, TypeError),
        ("450000", TypeError),
        (None, TypeError),
        (True, pynvml.NVMLError_InvalidArgument),  # a bool is an int: 1 mW, refused by the range check
    ],
)
def test_set_converts_the_limit_like_the_real_wrapper(limit: object, outcome: object) -> None:
    """The real ``nvmlDeviceSetPowerManagementLimit`` does ``c_uint(limit)``: a float is a TypeError."""
    assert _c_uint_accepts(limit) is (outcome is not TypeError)  # the table is what ctypes does
    fake = FakeNvml.with_gpus(1)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    if outcome == "set":
        fake.nvmlDeviceSetPowerManagementLimit(h, limit)  # type: ignore[arg-type]
    else:
        with pytest.raises(outcome):  # type: ignore[call-overload]
            fake.nvmlDeviceSetPowerManagementLimit(h, limit)  # type: ignore[arg-type]
    g = fake.gpus[0]
    assert g.attempts == [limit] and type(g.attempts[0]) is type(limit)  # recorded as passed
    assert g.sets == ([450_000] if outcome == "set" else [])
    # refused in the wrapper: the driver was never called
    assert fake.calls[SET] == (0 if outcome is TypeError else 1)


def test_set_sees_the_unsigned_value_the_driver_gets() -> None:
    fake = FakeNvml.with_gpus(1)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, -300_000)  # wraps round to 4_294_667_296
    fake.nvmlDeviceSetPowerManagementLimit(h, 2**32 + 300_000)  # wraps round to 300_000: accepted
    assert fake.gpus[0].attempts == [-300_000, 2**32 + 300_000]
    assert fake.gpus[0].sets == [300_000] and fake.gpus[0].limit_mw == 300_000


def test_every_attempted_write_is_recorded_refused_or_not() -> None:
    fake = FakeNvml.with_gpus(4)
    fake.gpus[1].no_permission_on_set = True
    fake.gpus[2].lost = True
    fake.gpus[3].unsupported.add(SET)
    fake.nvmlInit()
    for i, limit in enumerate([500_000, 400_000, 300_000, 250_000]):
        h = FakeHandle(i)
        try:
            fake.nvmlDeviceSetPowerManagementLimit(h, limit)
        except pynvml.NVMLError:
            pass
    h0 = FakeHandle(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h0, 900_000)
    with pytest.raises(TypeError):
        fake.nvmlDeviceSetPowerManagementLimit(h0, 420_000.0)  # type: ignore[arg-type]
    assert [g.attempts for g in fake.gpus] == [[500_000, 900_000, 420_000.0], [400_000], [300_000], [250_000]]
    assert [g.sets for g in fake.gpus] == [[500_000], [], [], []]


H0 = FakeHandle(0)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("nvmlDeviceGetHandleByIndex", (0.0,)),
        ("nvmlDeviceGetTemperatureThreshold", (H0, float(pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))),
        ("nvmlDeviceGetTemperature", (H0, float(pynvml.NVML_TEMPERATURE_GPU))),
        ("nvmlDeviceGetTemperatureV", (H0, float(pynvml.NVML_TEMPERATURE_GPU))),
        ("nvmlDeviceGetClockInfo", (H0, float(pynvml.NVML_CLOCK_SM))),
        ("nvmlDeviceGetFieldValues", (H0, [float(pynvml.NVML_FI_DEV_POWER_INSTANT)])),
        ("nvmlDeviceGetFieldValues", (H0, [(pynvml.NVML_FI_DEV_POWER_INSTANT, 0.5)])),
        ("nvmlDeviceGetMemoryInfo", (H0, float(pynvml.nvmlMemory_v2))),
    ],
)
def test_numeric_arguments_refuse_floats_like_the_real_wrappers(name: str, args: tuple) -> None:
    """Each of these goes through a ``c_uint`` (argument or struct member) in the real wrapper."""
    fake = FakeNvml.with_gpus(1)
    fake.nvmlInit()
    with pytest.raises(TypeError):
        getattr(fake, name)(*args)


def test_fake_signatures_match_the_real_bindings() -> None:
    fake = FakeNvml.with_gpus(1)
    names = [n for n in dir(FakeNvml) if n.startswith("nvml") and callable(getattr(FakeNvml, n))]
    assert SET in names and "nvmlDeviceGetFieldValues" in names
    def shape(sig: inspect.Signature) -> list[tuple[object, object]]:
        return [(p.kind, p.default) for p in sig.parameters.values()]  # names may differ (h / handle)

    for name in names:
        real, ours = inspect.signature(getattr(pynvml, name)), inspect.signature(getattr(fake, name))
        assert shape(ours) == shape(real), (name, str(ours), str(real))


def test_field_values_take_scoped_ids_and_fill_the_entry_like_the_driver() -> None:
    fake = FakeNvml.with_gpus(1, power_instant_mw=301_000, mem_temp_c=48)
    g = fake.gpus[0]
    g.field_latency_us[pynvml.NVML_FI_DEV_POWER_INSTANT] = 2
    g.field_value_types[pynvml.NVML_FI_DEV_MEMORY_TEMP] = pynvml.NVML_VALUE_TYPE_SIGNED_INT
    fake.nvmlInit()
    before_us = time.time_ns() // 1000
    power, mem, other = fake.nvmlDeviceGetFieldValues(
        FakeHandle(0), [(pynvml.NVML_FI_DEV_POWER_INSTANT, 3), pynvml.NVML_FI_DEV_MEMORY_TEMP, (9999, 1)]
    )
    after_us = time.time_ns() // 1000
    assert (power.fieldId, power.scopeId, power.latencyUsec) == (pynvml.NVML_FI_DEV_POWER_INSTANT, 3, 2)
    assert (power.nvmlReturn, power.valueType, power.value.uiVal) == (
        pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 301_000)
    assert (mem.fieldId, mem.scopeId, mem.latencyUsec) == (pynvml.NVML_FI_DEV_MEMORY_TEMP, 0, 0)
    assert (mem.valueType, mem.value.siVal) == (pynvml.NVML_VALUE_TYPE_SIGNED_INT, 48)
    assert (other.fieldId, other.scopeId, other.nvmlReturn) == (9999, 1, pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert all(before_us <= v.timestamp <= after_us for v in (power, mem, other))  # wall clock, us


def test_temperature_v_checks_the_struct_version_like_the_real_wrapper() -> None:
    fake = FakeNvml.with_gpus(1, temp_c=44)
    fake.nvmlInit()
    h = FakeHandle(0)
    assert fake.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU) == 44
    assert fake.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU, pynvml.nvmlTemperature_v1) == 44
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        fake.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU, pynvml.nvmlTemperature_v1 + 1)
    assert fake.gpus[0].calls["nvmlDeviceGetTemperatureV"] == 2  # the refused one never reached the driver


def test_memory_info_v2_like_the_real_wrapper() -> None:
    fake = FakeNvml.with_gpus(1, mem_total_bytes=1000, mem_used_bytes=300)
    fake.nvmlInit()
    m = fake.nvmlDeviceGetMemoryInfo(FakeHandle(0), pynvml.nvmlMemory_v2)
    assert isinstance(m, pynvml.c_nvmlMemory_v2_t) and (m.version, m.total, m.free, m.used) == (
        pynvml.nvmlMemory_v2, 1000, 700, 300)
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        fake.nvmlDeviceGetMemoryInfo(FakeHandle(0), 1)
    assert isinstance(fake.nvmlDeviceGetMemoryInfo(FakeHandle(0)), pynvml.c_nvmlMemory_t)


def _h200() -> dict:
    return json.loads(H200.read_text())


def test_default_thresholds_are_the_h200_captures() -> None:
    (gpu,) = _h200()["gpus"]
    recorded = gpu["calls"]["nvmlDeviceGetTemperatureThreshold"]["thresholds"]
    assert len(recorded) == 4 and all("raw" in e for e in recorded.values())
    assert FakeGpu().thresholds == {getattr(pynvml, name): e["raw"] for name, e in recorded.items()}


# -- the committed H200 capture, replayed through the collector ------------------------------------


# Written out by hand: the GpuSample fields and the reader names the H200 capture predates.
NOT_IN_H200_CAPTURE = {
    "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate",
    "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending",
    "remap_correctable_rows", "remap_uncorrectable_rows", "remap_pending", "remap_failure",
    "nvlink", "pcie_replay", "recovery_action",
    "throttle_power_ns", "throttle_thermal_ns", "throttle_board_limit_ns", "throttle_reliability_ns",
    "health", "xid_last",
}  # fmt: skip
HEALTH_READERS_DROPPED = {
    "ecc_volatile", "ecc_aggregate", "retired_pages", "remapped_rows", "nvlink", "pcie_replay",
    "recovery_action", "throttle_power", "throttle_thermal", "throttle_board_limit", "throttle_reliability",
    "nvlink_total_replay", "nvlink_total_recovery", "nvlink_total_crc_flit", "nvlink_total_crc_data",
}  # fmt: skip


def test_h200_capture_replays_to_what_the_collector_read_on_the_real_driver(clock: Clock) -> None:
    capture = _h200()
    (gpu,) = capture["gpus"]
    calls, recorded = gpu["calls"], gpu["collector"]["sample"]
    b = NvmlBackend(FakeNvml.from_fixture(capture), monotonic=clock, wall_ns=lambda: recorded["ts_ns"])
    (info,) = b.open()
    (s,) = b.sample(recorded["ts_ns"])
    assert b.drain_events() == []
    assert b.event_watch() == {0: gpu["collector"].get("events_watched", [])}  # none in a capture without them

    # 1. field for field, what NvmlBackend made of this GPU when the capture was taken. A capture
    #    that predates the health calls (issue 14) replays them as FUNCTION_NOT_FOUND, so the fields
    #    it did not record are exactly the health ones, all absent, and their readers dropped.
    got = dataclasses.asdict(s) | {"pids": list(s.pids)}
    got["nvlink"] = [link._asdict() for link in s.nvlink] if s.nvlink is not None else None  # as probe writes it
    missing = set(got) - set(recorded)
    assert missing in (set(), NOT_IN_H200_CAPTURE)
    assert {k: got[k] for k in missing} == dict.fromkeys(missing)
    assert {k: got[k] for k in recorded} == recorded
    dropped = HEALTH_READERS_DROPPED if missing else set()
    assert sorted(b.unsupported(0)) == sorted({*gpu["collector"]["unsupported"], *dropped})

    # 2. the same values again from the raw NVML answers (units converted by hand, not by the
    #    collector), so a capture re-recorded by a broken collector cannot pass unnoticed
    th = {k.removeprefix("NVML_TEMPERATURE_THRESHOLD_"): float(e["raw"])
          for k, e in calls["nvmlDeviceGetTemperatureThreshold"]["thresholds"].items()}  # fmt: skip
    lo_mw, hi_mw = calls["nvmlDeviceGetPowerManagementLimitConstraints"]["raw"]
    assert info == GpuInfo(
        index=0, uuid=calls["nvmlDeviceGetUUID"]["raw"], model=calls["nvmlDeviceGetName"]["raw"],
        limit_min_w=lo_mw / 1000, limit_max_w=hi_mw / 1000,
        limit_default_w=calls["nvmlDeviceGetPowerManagementDefaultLimit"]["raw"] / 1000,
        slowdown_c=th["SLOWDOWN"], shutdown_c=th["SHUTDOWN"], gpu_max_c=th["GPU_MAX"], mem_max_c=th["MEM_MAX"],
    )  # fmt: skip
    fields = calls["nvmlDeviceGetFieldValues"]["fields"]
    util = calls["nvmlDeviceGetUtilizationRates"]["raw"]
    expected = {
        "index": 0, "uuid": info.uuid, "model": info.model, "ts_ns": recorded["ts_ns"], "healthy": True,
        "error": None,
        "power_w": fields["NVML_FI_DEV_POWER_INSTANT"]["raw"] / 1000,
        "power_avg_w": calls["nvmlDeviceGetPowerUsage"]["raw"] / 1000,
        "energy_j": calls["nvmlDeviceGetTotalEnergyConsumption"]["raw"] / 1000,
        "temp_c": float(calls["nvmlDeviceGetTemperatureV"]["raw"]),
        "mem_temp_c": float(fields["NVML_FI_DEV_MEMORY_TEMP"]["raw"]),
        "limit_w": calls["nvmlDeviceGetEnforcedPowerLimit"]["raw"] / 1000,
        "limit_current_w": calls["nvmlDeviceGetPowerManagementLimit"]["raw"] / 1000,
        "limit_default_w": info.limit_default_w, "limit_min_w": info.limit_min_w, "limit_max_w": info.limit_max_w,
        "slowdown_c": info.slowdown_c, "shutdown_c": info.shutdown_c, "gpu_max_c": info.gpu_max_c,
        "mem_max_c": info.mem_max_c,
        "util_pct": float(util["gpu"]), "mem_util_pct": float(util["memory"]),
        "mem_used_bytes": calls["nvmlDeviceGetMemoryInfo"]["raw"]["used"],
        "sm_clock_mhz": float(calls["nvmlDeviceGetClockInfo"]["raw"]),
        "clock_reasons": calls["nvmlDeviceGetCurrentClocksEventReasons"]["raw"],
        "pids": [q["pid"] for q in calls["nvmlDeviceGetComputeRunningProcesses"]["raw"]],
    }  # fmt: skip
    assert {k: v for k, v in got.items() if k not in NOT_IN_H200_CAPTURE} == expected  # health: test_nvml_counters
    assert s.throttled is False  # the capture's only reason is gpu_idle
    # the numbers themselves, so an edit to the fixture is seen too
    assert (s.power_w, s.power_avg_w, s.energy_j, s.temp_c, s.shutdown_c) == (78.824, 78.946, 2413.511, 36.0, 95.0)
    b.close()
