"""NVML latency: what each call of the GPU collector costs, and what one full sample costs.

Why: the tick runs every 1 s (0.1 s supported); the NVML reads are its largest fixed cost, and
they scale with the GPU count. This prints per-call p50/p99 (microseconds) over ``-n`` calls,
round-robin over the GPUs, then ``NvmlBackend.sample()`` for all GPUs, and a final line::

    nvml_sample_ms_p50=.. nvml_sample_ms_p99=.. gpus=.. driver=.. source=nvml|fake

With a driver and GPUs it measures the real NVML; without, it measures the fake module from
``tests/fake_pynvml.py`` and says so (``source=fake``): those numbers are Python overhead only.
The health reads (issue 14: ECC, retired pages, row remapping, NVLink, PCIe replay, the
recovery-action and perf-policy fields, one poll of an event set) are listed too, and the sample
is measured twice: on a tick between the slow reads and on one with every counter due.
Read-only: only ``*Get*`` calls and an event set (created, registered, polled, freed); no limit
or setting is ever written.

    python bench/nvml_latency.py [-n 200] [--fake] [--gpus 8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectors.nvml import NvmlBackend  # noqa: E402


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    """The real pynvml when it initialises, else the fake (labelled)."""
    if not args.fake:
        import pynvml

        try:
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            return pynvml, "nvml"
        except pynvml.NVMLError as e:
            print(f"# no usable NVIDIA driver ({e}): measuring the FAKE NVML module instead", file=sys.stderr)
    from tests.fake_pynvml import FakeNvml

    return FakeNvml.with_gpus(args.gpus, name="Fake GPU (bench)", pids=[1234]), "fake"


def _health_calls(nv: Any, event_set: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """Each health read (issue 14): the slow counters (every 10 s / 60 s), the once-per-attach
    link state, and one poll of the event set (timeout 0 ms: what an empty wait costs)."""
    corrected, uncorrected = nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    volatile, aggregate = nv.NVML_VOLATILE_ECC, nv.NVML_AGGREGATE_ECC
    fields = [getattr(nv, n) for n in ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "NVML_FI_DEV_PERF_POLICY_POWER",
                                       "NVML_FI_DEV_PERF_POLICY_THERMAL", "NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT",
                                       "NVML_FI_DEV_PERF_POLICY_RELIABILITY") if hasattr(nv, n)]
    dbe = nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    replay = nv.NVML_NVLINK_ERROR_DL_REPLAY
    timeout = nv.NVML_ERROR_TIMEOUT

    def poll(h: Any) -> None:
        try:
            nv.nvmlEventSetWait_v2(event_set, 0)
        except nv.NVMLError as e:
            if e.value != timeout:
                raise

    table: list[tuple[str, Callable[[Any], Any]]] = [
        ("nvmlDeviceGetSupportedEventTypes", lambda h: nv.nvmlDeviceGetSupportedEventTypes(h)),
        ("nvmlDeviceGetEccMode", lambda h: nv.nvmlDeviceGetEccMode(h)),
        ("nvmlDeviceGetTotalEccErrors(CORRECTED,VOLATILE)",
         lambda h: nv.nvmlDeviceGetTotalEccErrors(h, corrected, volatile)),
        ("nvmlDeviceGetTotalEccErrors(UNCORRECTED,AGGREGATE)",
         lambda h: nv.nvmlDeviceGetTotalEccErrors(h, uncorrected, aggregate)),
        ("nvmlDeviceGetRetiredPages(DOUBLE_BIT)", lambda h: nv.nvmlDeviceGetRetiredPages(h, dbe)),
        ("nvmlDeviceGetRetiredPagesPendingStatus", lambda h: nv.nvmlDeviceGetRetiredPagesPendingStatus(h)),
        ("nvmlDeviceGetRemappedRows", lambda h: nv.nvmlDeviceGetRemappedRows(h)),
        ("nvmlDeviceGetNvLinkState(link 0)", lambda h: nv.nvmlDeviceGetNvLinkState(h, 0)),
        ("nvmlDeviceGetNvLinkErrorCounter(link 0,DL_REPLAY)", lambda h: nv.nvmlDeviceGetNvLinkErrorCounter(h, 0, replay)),
        ("nvmlDeviceGetPcieReplayCounter", lambda h: nv.nvmlDeviceGetPcieReplayCounter(h)),
        (f"nvmlDeviceGetFieldValues[recovery action, perf policy x{len(fields) - 1}]",
         lambda h: nv.nvmlDeviceGetFieldValues(h, fields)),
    ]
    if event_set is not None:
        table.append(("nvmlEventSetWait_v2(0 ms, nothing pending)", poll))
    return table


def _event_set(nv: Any, handles: list[Any]) -> Any:
    """An event set with every GPU registered for the types it supports of the collector's, or
    None where the driver or bindings have no event API (the poll row is then left out)."""
    from collectors.nvml_events import event_kinds

    wanted = 0
    for bit in event_kinds(nv):
        wanted |= bit
    try:
        event_set = nv.nvmlEventSetCreate()
    except (AttributeError, nv.NVMLError):
        return None
    for h in handles:
        try:
            mask = nv.nvmlDeviceGetSupportedEventTypes(h) & wanted
            if mask:
                nv.nvmlDeviceRegisterEvents(h, mask, event_set)
        except nv.NVMLError:
            pass
    return event_set


def _calls(nv: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """Each NVML read the collector makes per GPU per tick (and the fallbacks it may use)."""
    ids = [nv.NVML_FI_DEV_POWER_INSTANT, nv.NVML_FI_DEV_MEMORY_TEMP]
    gpu_sensor, sm = nv.NVML_TEMPERATURE_GPU, nv.NVML_CLOCK_SM
    table: list[tuple[str, Callable[[Any], Any]]] = [
        ("nvmlDeviceGetFieldValues[POWER_INSTANT,MEMORY_TEMP]", lambda h: nv.nvmlDeviceGetFieldValues(h, ids)),
        ("nvmlDeviceGetPowerUsage", lambda h: nv.nvmlDeviceGetPowerUsage(h)),
        ("nvmlDeviceGetTotalEnergyConsumption", lambda h: nv.nvmlDeviceGetTotalEnergyConsumption(h)),
        ("nvmlDeviceGetTemperatureV(GPU)", lambda h: nv.nvmlDeviceGetTemperatureV(h, gpu_sensor)),
        ("nvmlDeviceGetTemperature(GPU)", lambda h: nv.nvmlDeviceGetTemperature(h, gpu_sensor)),
        ("nvmlDeviceGetEnforcedPowerLimit", lambda h: nv.nvmlDeviceGetEnforcedPowerLimit(h)),
        ("nvmlDeviceGetPowerManagementLimit", lambda h: nv.nvmlDeviceGetPowerManagementLimit(h)),
        ("nvmlDeviceGetUtilizationRates", lambda h: nv.nvmlDeviceGetUtilizationRates(h)),
        ("nvmlDeviceGetMemoryInfo", lambda h: nv.nvmlDeviceGetMemoryInfo(h)),
        ("nvmlDeviceGetClockInfo(SM)", lambda h: nv.nvmlDeviceGetClockInfo(h, sm)),
        ("nvmlDeviceGetCurrentClocksEventReasons", lambda h: nv.nvmlDeviceGetCurrentClocksEventReasons(h)),
        ("nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)),
        ("nvmlDeviceGetComputeRunningProcesses", lambda h: nv.nvmlDeviceGetComputeRunningProcesses(h)),
    ]
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200, help="calls per measurement (default 200)")
    ap.add_argument("--fake", action="store_true", help="measure the fake module even when a GPU exists")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the fake (default 8)")
    args = ap.parse_args(argv)
    nv, source = _load(args)
    tolerated = tuple(
        getattr(nv, n) for n in ("NVMLError", "NVMLLibraryMismatchError") if hasattr(nv, n)
    ) + (AttributeError,)

    nv.nvmlInit()
    try:
        driver = nv.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        count = nv.nvmlDeviceGetCount()
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        name = nv.nvmlDeviceGetName(handles[0]) if handles else "-"
        name = name.decode() if isinstance(name, bytes) else name
        label = "FAKE NVML (no GPU: Python overhead only)" if source == "fake" else "real NVML"
        print(f"# {label}: {count} x {name}, driver {driver}, {args.n} calls each, round-robin over GPUs")
        print(f"{'call':<56} {'p50 us':>9} {'p99 us':>9}  note")
        event_set = _event_set(nv, handles)
        for label, fn in [*_calls(nv), *_health_calls(nv, event_set)]:
            times: list[float] = []
            note = ""
            try:
                fn(handles[0])  # warm-up (and support check)
                for k in range(args.n):
                    h = handles[k % count]
                    t0 = time.perf_counter_ns()
                    fn(h)
                    times.append((time.perf_counter_ns() - t0) / 1000)
            except tolerated as e:
                note = f"{type(e).__name__}: {e}"
            if times:
                print(f"{label:<56} {_percentile(times, 0.5):>9.1f} {_percentile(times, 0.99):>9.1f}  {note}")
            else:
                print(f"{label:<56} {'-':>9} {'-':>9}  {note}")

        if event_set is not None:
            nv.nvmlEventSetFree(event_set)

        def samples(backend: NvmlBackend) -> tuple[list[float], list[str]]:
            backend.open()
            try:
                backend.sample(time.time_ns())  # warm-up: drops unsupported readers once
                out: list[float] = []
                for _ in range(args.n):
                    t0 = time.perf_counter_ns()
                    backend.sample(time.time_ns())
                    out.append((time.perf_counter_ns() - t0) / 1e6)
                return out, sorted(backend.unsupported(0)) if count else []
            finally:
                backend.close()

        # a tick between the slow reads (the real clock: the n samples take far less than 10 s)
        sample_ms, dropped = samples(NvmlBackend(nv, events=False))
        # a tick with every health counter due: a clock that moves 61 s per look
        steps = itertools.count(0.0, 61.0)
        due_ms, _ = samples(NvmlBackend(nv, events=False, monotonic=lambda: next(steps)))
    finally:
        nv.nvmlShutdown()

    p50, p99 = _percentile(sample_ms, 0.5), _percentile(sample_ms, 0.99)
    d50, d99 = _percentile(due_ms, 0.5), _percentile(due_ms, 0.99)
    # at 1 Hz the 10 s readers are due on one tick in 10 (the 60 s ones within that): an upper bound
    at_1hz = p50 + (d50 - p50) / 10
    print(f"{'NvmlBackend.sample() all GPUs (ms)':<56} {p50:>9.3f} {p99:>9.3f}  unsupported on GPU 0: "
          f"{', '.join(dropped) or 'none'}")  # fmt: skip
    print(f"{'NvmlBackend.sample() all GPUs, every counter due (ms)':<56} {d50:>9.3f} {d99:>9.3f}  "
          f"amortised at 1 Hz (computed, an upper bound): {at_1hz:.3f} ms")  # fmt: skip
    print(f"nvml_sample_ms_p50={p50:.3f} nvml_sample_ms_p99={p99:.3f} nvml_sample_all_due_ms_p50={d50:.3f} "
          f"gpus={count} driver={driver} source={source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
