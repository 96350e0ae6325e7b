"""NVML latency: what each call of the GPU collector costs, and what one full sample costs.

Why: the tick runs every 1 s (0.1 s supported); the NVML reads are its largest fixed cost, and
they scale with the GPU count. This prints per-call p50/p99 (microseconds) over ``-n`` calls,
round-robin over the GPUs, then ``NvmlBackend.sample()`` for all GPUs, and a final line::

    nvml_sample_ms_p50=.. nvml_sample_ms_p99=.. gpus=.. driver=.. source=nvml|fake

With a driver and GPUs it measures the real NVML; without, it measures the fake module from
``tests/fake_pynvml.py`` and says so (``source=fake``): those numbers are Python overhead only.
Read-only: only ``*Get*`` calls; no limit or setting is ever written.

    python bench/nvml_latency.py [-n 200] [--fake] [--gpus 8]
"""

from __future__ import annotations

import argparse
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
        for label, fn in _calls(nv):
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

        backend = NvmlBackend(nv)
        backend.open()
        try:
            backend.sample(time.time_ns())  # warm-up: drops unsupported readers once
            sample_ms: list[float] = []
            for _ in range(args.n):
                t0 = time.perf_counter_ns()
                backend.sample(time.time_ns())
                sample_ms.append((time.perf_counter_ns() - t0) / 1e6)
            dropped = sorted(backend.unsupported(0)) if count else []
        finally:
            backend.close()
    finally:
        nv.nvmlShutdown()

    p50, p99 = _percentile(sample_ms, 0.5), _percentile(sample_ms, 0.99)
    print(f"{'NvmlBackend.sample() all GPUs (ms)':<56} {p50:>9.3f} {p99:>9.3f}  unsupported on GPU 0: "
          f"{', '.join(dropped) or 'none'}")  # fmt: skip
    print(f"nvml_sample_ms_p50={p50:.3f} nvml_sample_ms_p99={p99:.3f} gpus={count} driver={driver} source={source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
