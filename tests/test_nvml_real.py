"""The NVML collector and probe against the REAL driver; skipped where NVML cannot start.

Read-only: nothing here sets anything on a GPU (no power limit write, not even a refused one).
Run on a GPU node with ``pytest tests/test_nvml_real.py -q -rw`` to also see, as warnings, the
readers each GPU does not support.
"""

from __future__ import annotations

import json
import time
import warnings

import pynvml
import pytest

from agentd.probe import probe, probe_text
from collectors.nvml import NvmlBackend


@pytest.fixture(scope="module", autouse=True)
def _real_nvml():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"real NVML not available here ({type(e).__name__}: {e})")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("NVML runs but reports no GPUs")
        yield
    finally:
        pynvml.nvmlShutdown()


def _between(lo: float | None, v: float | None, hi: float | None) -> bool:
    return v is None or lo is None or hi is None or lo <= v <= hi


def test_collector_reads_sane_values() -> None:
    b = NvmlBackend()  # the default path: imports the real pynvml itself
    infos = b.open()
    try:
        assert infos and len(infos) == pynvml.nvmlDeviceGetCount()
        for i in infos:
            assert i.uuid.startswith(("GPU-", "MIG-")) and i.model
            assert _between(i.limit_min_w, i.limit_default_w, i.limit_max_w), i
            for t in (i.slowdown_c, i.shutdown_c, i.gpu_max_c, i.mem_max_c):
                assert t is None or 30 <= t <= 150, i
        first = b.sample(time.time_ns())
        time.sleep(0.5)
        second = b.sample(time.time_ns())
        for s1, s in zip(first, second):
            assert s.healthy, s.error
            assert s.power_avg_w is not None and 0 < s.power_avg_w < 5000, s
            assert s.power_w is None or 0 < s.power_w < 5000, s
            assert s.temp_c is not None and 0 <= s.temp_c <= 120, s
            assert s.mem_temp_c is None or 0 <= s.mem_temp_c <= 120, s
            assert s.limit_w is not None and s.limit_min_w is not None and s.limit_max_w is not None, s
            assert s.limit_min_w <= s.limit_w <= s.limit_max_w, s
            assert _between(s.limit_min_w, s.limit_current_w, s.limit_max_w), s
            assert s.util_pct is None or 0 <= s.util_pct <= 100, s
            assert s.mem_util_pct is None or 0 <= s.mem_util_pct <= 100, s
            assert s.mem_used_bytes is None or s.mem_used_bytes >= 0, s
            assert s.sm_clock_mhz is None or 0 <= s.sm_clock_mhz <= 5000, s
            assert s.clock_reasons is None or isinstance(s.clock_reasons, int), s
            assert all(isinstance(p, int) and p > 0 for p in s.pids), s
            if s1.energy_j is not None and s.energy_j is not None:
                assert s.energy_j >= s1.energy_j, (s1.energy_j, s.energy_j)
            missing = sorted(b.unsupported(s.index))
            if missing:
                warnings.warn(f"GPU {s.index} ({s.model}): unsupported readers: {', '.join(missing)}", stacklevel=1)
        # no GPU lost or recovered (a real GPU may have a genuine NVML event of its own: not ours to fail on)
        assert [e for e in b.drain_events() if e.kind in ("gpu_lost", "gpu_recovered")] == []
        # one full sample of all GPUs stays well inside a 0.1 s tick
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            b.sample(time.time_ns())
            times.append(time.perf_counter() - t0)
        assert sorted(times)[10] < 0.1, times
    finally:
        b.close()
        b.close()


def test_probe_on_real_gpus() -> None:
    result = probe()
    text = json.dumps(result)
    assert result["fake"] is False and result["driver_version"]
    assert len(result["gpus"]) == result["device_count"] > 0
    assert "serial" not in text.lower()
    for g in result["gpus"]:
        assert "error" not in g, g
        c = g["controls"]
        assert c["limit_min_w"] <= c["limit_enforced_w"] <= c["limit_max_w"], c
        assert g["calls"]["nvmlDeviceGetPowerUsage"]["us"] >= 0
        assert g["collector"]["sample"]["healthy"] is True
    assert "NVML probe" in probe_text(result)
