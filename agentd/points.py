"""Readings -> InfluxDB points, in the schema of DESIGN.md section 3 (one place owns it)."""

from __future__ import annotations

from collectors.base import GpuSample

from agentd.lineproto import Point


def gpu_point(sample: GpuSample, host: str, limit_set_w: float | None = None) -> Point:
    """The ``gpu`` measurement for one healthy sample. ``limit_set_w`` is the limit we wrote."""
    return Point(
        "gpu",
        {"host": host, "gpu": str(sample.index), "uuid": sample.uuid, "model": sample.model},
        {
            "power_w": sample.power_w,
            "power_avg_w": sample.power_avg_w,
            "energy_j": sample.energy_j,
            "temp_c": sample.temp_c,
            "mem_temp_c": sample.mem_temp_c,
            "limit_w": sample.limit_w,
            "limit_set_w": limit_set_w,
            "limit_default_w": sample.limit_default_w,
            "util_pct": sample.util_pct,
            "mem_util_pct": sample.mem_util_pct,
            "mem_used_bytes": sample.mem_used_bytes,
            "sm_clock_mhz": sample.sm_clock_mhz,
            "clock_reasons": sample.clock_reasons,
            "throttled": sample.throttled,
        },
        sample.ts_ns,
    )


def agent_point(host: str, ts_ns: int, fields: dict[str, float | int | bool | None]) -> Point:
    """The ``agent`` self-telemetry measurement (tick cost, backlog, errors)."""
    return Point("agent", {"host": host}, fields, ts_ns)
