"""The ``gpu_info`` measurement: each GPU's envelopes and health, at a slow cadence.

Why a measurement of its own rather than more fields on ``gpu``: the thresholds (``slowdown_c``,
``shutdown_c``, ``gpu_max_c``, ``mem_max_c``) and the limit range do not change while the daemon
runs, so repeating them in every ``gpu`` point (8 GPUs x every tick) would store the same numbers
hundreds of times a minute. Grafana still needs them inside whatever window it shows (a
temperature panel draws them as threshold lines), so they are written at start and then every
``every_s`` (60 s): a 5-minute window always holds several.

Health: an unhealthy GPU (lost, driver error) writes no ``gpu`` point, since it has no values,
and a board or an alert cannot tell a missing series from a quiet one. ``gpu_info`` says it
outright: ``healthy`` (bool) and ``error`` (why, only while unhealthy), written at once when a
GPU's health changes, not only at the cadence. A tick whose reading failed as a whole (a hung
backend) changes nothing here: the ``agent`` point counts that (``nvml_errors``).

``CLOCK_REASONS`` names the bits of ``gpu.clock_reasons``, in bit order, for the boards and
``agentd plot`` (bits from the NVML bindings, never literals).

Pure: values and an injected monotonic time in, encoded lines out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agentd.lineproto import Point, encode
from collectors.base import GpuInfo, GpuSample, _reason_bit

MEASUREMENT = "gpu_info"
EVERY_S = 60.0  # the slow cadence: several points inside any window a board shows

#: ``gpu.clock_reasons`` decoded: (name as the boards show it, bit). NVML's names, snake_case.
CLOCK_REASONS: tuple[tuple[str, int], ...] = tuple(sorted(
    ((name, _reason_bit(nvml)) for name, nvml in (
        ("gpu_idle", "GpuIdle"), ("app_clocks", "ApplicationsClocksSetting"), ("sw_power_cap", "SwPowerCap"),
        ("hw_slowdown", "HwSlowdown"), ("sync_boost", "SyncBoost"), ("sw_thermal", "SwThermalSlowdown"),
        ("hw_thermal", "HwThermalSlowdown"), ("power_brake", "HwPowerBrakeSlowdown"),
        ("display_clock", "DisplayClockSetting"), ("board_limit", "BoardLimit"), ("reliability", "Reliability"),
    )), key=lambda nb: nb[1]))


def decode_clock_reasons(mask: int | None) -> list[str]:
    """The names of the bits set in a ``clock_reasons`` value (unknown bits as ``bit_0x...``)."""
    if mask is None:
        return []
    names = [name for name, bit in CLOCK_REASONS if mask & bit]
    rest = mask & ~sum(bit for _, bit in CLOCK_REASONS)
    names += [f"bit_{1 << k:#x}" for k in range(rest.bit_length()) if rest >> k & 1]
    return names


def gpu_info_point(host: str, info: GpuInfo, ts_ns: int, *, healthy: bool | None = None,
                   error: str | None = None) -> Point:
    """One GPU's ``gpu_info`` point: tags as ``gpu`` (host, gpu index, uuid, model); fields the
    device's thresholds and limit range (each absent when the device does not report it),
    ``healthy`` when this tick read the GPU, ``error`` while it is unhealthy."""
    return Point(MEASUREMENT, {"host": host, "gpu": str(info.index), "uuid": info.uuid, "model": info.model}, {
        "slowdown_c": info.slowdown_c,
        "shutdown_c": info.shutdown_c,
        "gpu_max_c": info.gpu_max_c,
        "mem_max_c": info.mem_max_c,
        "limit_min_w": info.limit_min_w,
        "limit_max_w": info.limit_max_w,
        "limit_default_w": info.limit_default_w,
        "healthy": healthy,
        "error": error if healthy is False else None,
    }, ts_ns)


@dataclass(slots=True)
class Cadence:
    """When a slow-cadence point is due: at the first call, then every ``every_s``, and at once
    when the caller says something changed (which restarts the period). ``GpuInfoWriter``
    and ``agentd.health.HealthMonitor`` both keep time with it."""

    every_s: float = EVERY_S
    _next_at: float | None = None

    def due(self, now: float, changed: bool = False) -> bool:
        if not changed and self._next_at is not None and now < self._next_at:
            return False
        self._next_at = now + self.every_s
        return True


@dataclass(slots=True)
class GpuInfoWriter:
    """When to write ``gpu_info``: at the first call, every ``every_s`` after it, and at once when
    a GPU's health changes. ``lines`` is what the daemon's tick calls (one line of wiring)."""

    host: str
    every_s: float = EVERY_S
    _cadence: Cadence = field(init=False)
    _health: dict[int, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._cadence = Cadence(self.every_s)

    def lines(self, infos: Mapping[int, GpuInfo], samples: Iterable[GpuSample] | None, now_mono: float,
              ts_ns: int) -> list[tuple[int, str]]:
        """The encoded points due now (often none). ``samples`` is this tick's reading, None when
        the reading failed as a whole (health is then left as it was)."""
        health = {s.index: s.healthy for s in samples or ()}
        errors = {s.index: s.error for s in samples or ()}
        changed = any(self._health.get(i) != ok for i, ok in health.items())
        if not self._cadence.due(now_mono, changed):
            return []
        self._health.update(health)
        out: list[tuple[int, str]] = []
        for index in sorted(infos):
            line = encode(gpu_info_point(self.host, infos[index], ts_ns, healthy=health.get(index),
                                         error=errors.get(index)))
            if line is not None:
                out.append((ts_ns, line))
        return out
