"""The GPU backend contract shared by the NVML collector and the simulator.

Both backends are *blocking* (NVML calls are C calls that can hang); the daemon calls them from
a worker thread with a timeout, so nothing here is async. Values are already converted to the
units in their names (NVML's mW and mJ become W and J at this edge). A field the device does not
support is ``None``: never an exception, never a made-up zero.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import pynvml  # only for its constants: importing it needs no driver


@dataclass(slots=True, frozen=True)
class GpuInfo:
    """What does not change while the daemon runs: identity and the device's own envelopes."""

    index: int
    uuid: str
    model: str
    limit_min_w: float | None = None
    limit_max_w: float | None = None
    limit_default_w: float | None = None
    slowdown_c: float | None = None
    shutdown_c: float | None = None
    gpu_max_c: float | None = None
    mem_max_c: float | None = None


@dataclass(slots=True)
class GpuSample:
    """One reading of one GPU at ``ts_ns`` (wall clock, integer ns since the epoch).

    ``healthy`` is False when the GPU could not be read at all (lost, driver error); then
    ``error`` says why and every value field is None.
    """

    index: int
    uuid: str
    model: str
    ts_ns: int
    healthy: bool = True
    error: str | None = None
    power_w: float | None = None  # instantaneous (NVML_FI_DEV_POWER_INSTANT)
    power_avg_w: float | None = None  # driver's ~1 s average (nvmlDeviceGetPowerUsage)
    energy_j: float | None = None  # since driver load; NVML reads it at most every 0.5 s
    temp_c: float | None = None
    mem_temp_c: float | None = None  # HBM
    limit_w: float | None = None  # enforced limit (what the hardware holds to now)
    limit_current_w: float | None = None  # management limit (what software last set)
    limit_default_w: float | None = None
    limit_min_w: float | None = None
    limit_max_w: float | None = None
    slowdown_c: float | None = None
    shutdown_c: float | None = None
    gpu_max_c: float | None = None
    mem_max_c: float | None = None
    util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_bytes: int | None = None
    sm_clock_mhz: float | None = None
    clock_reasons: int | None = None  # clocks-event-reasons bitmask
    pids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def throttled(self) -> bool | None:
        """True when a reason other than idle / application clocks holds the clocks down."""
        if self.clock_reasons is None:
            return None
        return bool(self.clock_reasons & THROTTLE_REASONS_MASK)


def _reason_bit(name: str) -> int:
    """A clocks-event reason bit from the bindings. nvidia-ml-py names them
    ``nvmlClocksEventReason*`` now and ``nvmlClocksThrottleReason*`` before (BoardLimit and
    Reliability only under the older name), so the newer name wins where both exist."""
    for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
        bit = getattr(pynvml, prefix + name, None)
        if bit is not None:
            return int(bit)
    raise ImportError(f"pynvml has no nvmlClocksEventReason{name}; nvidia-ml-py is too old or too new")


# The reasons that mean "held down": SW power cap, HW slowdown, SW/HW thermal, power brake, the
# board's own limit and reliability. GpuIdle, ApplicationsClocksSetting (= UserDefinedClocks),
# SyncBoost and DisplayClockSetting are not throttling. Bits from the bindings, not literals.
THROTTLE_REASONS_MASK = functools.reduce(operator.or_, map(_reason_bit, (
    "SwPowerCap", "HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown",
    "BoardLimit", "Reliability",
)))  # fmt: skip


class BackendEvent(NamedTuple):
    """A change of a GPU's health, for the daemon to log and store as an event.

    ``kind`` is ``"gpu_lost"`` (the GPU stopped answering; ``message`` says why) or
    ``"gpu_recovered"`` (it answers again).
    """

    ts_ns: int
    gpu_index: int
    kind: str
    message: str


class BackendError(Exception):
    """The backend as a whole cannot run (no driver, init failed). Per-GPU trouble is not this."""


class LimitWriteError(Exception):
    """A power-limit write was refused; ``permission`` tells NO_PERMISSION apart."""

    def __init__(self, message: str, *, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


class GpuBackend(Protocol):
    """A source of GPU readings and the one control we use on GPUs: the power limit."""

    def open(self) -> list[GpuInfo]:
        """Initialise and enumerate the GPUs. Raises BackendError when nothing can work."""
        ...

    def sample(self, ts_ns: int) -> list[GpuSample]:
        """Read every GPU once. One bad GPU yields an unhealthy sample, never an exception."""
        ...

    def set_power_limit(self, index: int, limit_w: float) -> None:
        """Set the management power limit of one GPU. Raises LimitWriteError when refused."""
        ...

    def drain_events(self) -> list[BackendEvent]:
        """Take the GPU health changes (lost / recovered) seen since the last call."""
        ...

    def close(self) -> None:
        """Release the driver. Safe to call twice."""
        ...
