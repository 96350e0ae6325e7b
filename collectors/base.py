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
from collections.abc import Iterable
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
    # Health counters (issue 14). Each is read only as often as it can change, so on most ticks
    # they are None ("not read this tick"); a device that does not support one never has it.
    # The health tracker (collectors/gpu_health.py) keeps the last value seen.
    ecc_sbe_volatile: int | None = None  # corrected (single-bit) errors since the last driver load
    ecc_dbe_volatile: int | None = None  # uncorrected (double-bit) errors since the last driver load
    ecc_sbe_aggregate: int | None = None  # corrected errors over the board's life
    ecc_dbe_aggregate: int | None = None  # uncorrected errors over the board's life
    retired_pages_sbe: int | None = None  # pages retired for corrected errors (pre-Ampere)
    retired_pages_dbe: int | None = None  # pages retired for uncorrected errors (pre-Ampere)
    retired_pages_pending: bool | None = None  # a retirement waits for the next reset (pre-Ampere)
    remap_correctable_rows: int | None = None  # rows remapped for corrected errors (Ampere+)
    remap_uncorrectable_rows: int | None = None  # rows remapped for uncorrected errors (Ampere+)
    remap_pending: bool | None = None  # a remap waits for the next GPU reset (Ampere+)
    remap_failure: bool | None = None  # a remap failed: the GPU has run out of spare rows
    nvlink: tuple[NvlinkErrors, ...] | None = None  # per active link, when read this tick
    pcie_replay: int | None = None  # PCIe replay counter
    # The driver's recommended action now (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; BackendEvent.action
    # names) and how long each limiter has held the clocks below the application clocks since the
    # driver loaded (NVML's perf-policy violation counters, ns). Read every 10 s like ECC.
    recovery_action: str | None = None
    throttle_power_ns: int | None = None
    throttle_thermal_ns: int | None = None
    throttle_board_limit_ns: int | None = None
    throttle_reliability_ns: int | None = None
    # Set by the daemon's health tracker before the rules run (never by a backend).
    health: str | None = None  # "ok" / "warn" / "fail"
    xid_last: int | None = None  # the last Xid seen on this GPU since the daemon started

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


class NvlinkErrors(NamedTuple):
    """One NVLink's error counters (NVML's per-link counters; None where unsupported)."""

    link: int
    crc_flit: int | None = None
    crc_data: int | None = None
    replay: int | None = None
    recovery: int | None = None


NVLINK_ERRORS: tuple[str, ...] = NvlinkErrors._fields[1:]  # crc_flit, crc_data, replay, recovery


def nvlink_totals(links: Iterable[NvlinkErrors]) -> dict[str, int]:
    """Each NVLink counter summed over the links that report it; a counter no link reports is
    absent (never a made-up 0). For the points and metrics that show a GPU's links as one."""
    totals: dict[str, int] = {}
    for link in links:
        for name in NVLINK_ERRORS:
            v = getattr(link, name)
            if v is not None:
                totals[name] = totals.get(name, 0) + v
    return totals


class BackendEvent(NamedTuple):
    """Something that happened to a GPU, for the daemon to log, store and judge health by.

    ``kind`` is ``"gpu_lost"`` (the GPU stopped answering; ``message`` says why),
    ``"gpu_recovered"`` (it answers again), or an NVML event: ``"xid"`` (``xid`` holds the
    Xid number), ``"ecc_sbe"``, ``"ecc_dbe"``, ``"pstate"``, ``"clock"``, ``"power_source"``,
    ``"recovery_action"`` (``action`` holds the driver's recommended action), and where the
    driver has them ``"ecc_sbe_storm"``, ``"dram_retirement"``, ``"dram_retirement_failure"``,
    ``"poison_nonfatal"``, ``"poison_fatal"``, ``"gpu_unavailable"``; ``"other"`` for a type
    these bindings do not name. ``action`` is the driver's recommendation where it offers one
    (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``, read just after an Xid): ``"none"``,
    ``"reset_gpu"``, ``"reboot"``, ``"drain_p2p"``, ``"drain_and_reset"``, and on newer drivers
    ``"recover_imex_domain"``, ``"bus_reset"``, ``"system_reboot"`` (``"unknown_<n>"`` for a
    value newer than the bindings).
    """

    ts_ns: int
    gpu_index: int
    kind: str
    message: str
    xid: int | None = None
    action: str | None = None


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
        """Take the GPU events seen since the last call, oldest first: health changes (lost /
        recovered) and, where the backend watches them, NVML events (Xid, ECC, ...)."""
        ...

    def event_stats(self) -> dict[str, int]:
        """Counters of the event watching (seen, dropped by the bound, errors) for the daemon's
        ``agent`` point; empty for a backend that watches no events."""
        ...

    def close(self) -> None:
        """Release the driver. Safe to call twice."""
        ...
