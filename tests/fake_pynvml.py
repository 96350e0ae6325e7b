"""A stand-in for the ``pynvml`` module, so the NVML collector is tested without a GPU.

It reproduces the shapes and failures of the real bindings, not just their names:

- constants, struct types and exception classes are the REAL ones from ``pynvml`` (which imports
  fine without a driver), so ``except pynvml.NVMLError_NotSupported`` means the same here;
- field values come back as a real ``c_nvmlFieldValue_t`` ctypes array with a per-entry
  ``nvmlReturn`` and the value in the union member that ``valueType`` names; utilization and memory
  info are the real structs; processes are the real "friendly objects";
- failures: ``FakeGpu.unsupported`` (NotSupported, or a per-entry NOT_SUPPORTED for a field name
  such as ``"NVML_FI_DEV_MEMORY_TEMP"``), ``errors`` (any NVML error code per function or field),
  ``lost`` (every call raises GPU_IS_LOST; settable mid-run), ``no_permission_on_set``,
  ``FakeNvml(hidden=...)`` (bindings that lack a function: AttributeError), ``init_error``;
- arguments go through the same ctypes conversions as in the real wrappers (``c_uint(limit)``,
  ``c_uint(index)``, the sensor/threshold/clock enums, the ``c_nvmlFieldValue_t`` members), so a
  float limit raises ``TypeError`` here as it does on a GPU, and a negative one wraps round to a
  huge unsigned value that the range check refuses;
- ``calls`` counters on the module and on each GPU (by function name; field values also count
  each field name asked for), ``attempts`` (every value passed to
  ``nvmlDeviceSetPowerManagementLimit``, as passed, recorded before any check), ``sets`` (the mW
  values the "driver" accepted), and per-call ``delay_s`` / ``on_call`` hooks for timeout tests;
  counting is locked, since the event watcher calls in from a thread of its own;
- health counters (ECC, retired pages, remapped rows, NVLink, PCIe replay, recovery action,
  perf-policy durations) as plain ``FakeGpu`` attributes a test sets, answered or refused per GPU
  model (``MODELS``: an H200 remaps rows and has 18 NVLinks but retires no pages, a V100 the
  other way round; any other name gets ``DEFAULT_MODEL``: every counter, no events);
- the event API (``nvmlEventSetCreate`` / ``nvmlDeviceRegisterEvents`` / ``nvmlEventSetWait_v2``
  / ``nvmlEventSetFree``): registration refuses types the GPU does not support (NOT_SUPPORTED),
  the wait really blocks on a ``threading.Condition`` up to its timeout and then raises
  NVML_ERROR_TIMEOUT, GPU_IS_LOST while a registered GPU is lost. Test hooks:
  :meth:`FakeNvml.inject_event` / :meth:`FakeNvml.inject_events` (queued on every set the GPU is
  registered on for that type, as the driver does), :meth:`FakeNvml.fail_wait`,
  :meth:`FakeNvml.set_lost` (wakes a waiter at once), :meth:`FakeNvml.wait_for` (a condition
  with a deadline, so tests never sleep).

Build one::

    fake = FakeNvml.with_gpus(8, power_mw=300_000)     # 8 identical GPUs, NVML units
    fake.gpus[3].lost = True                           # GPU 3 falls off the bus
    fake.gpus[0].unsupported.add("nvmlDeviceGetTotalEnergyConsumption")
    backend = NvmlBackend(fake)

or replay a probe (``agentd/probe.py``): ``FakeNvml.from_fixture("tests/fixtures/nvml/x.json")``.
For code that does ``import pynvml`` itself: ``with install(fake): ...``.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from ctypes import c_uint, c_ulonglong
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml as _real

def _nvlink_total(counter: str) -> Callable[[FakeGpu], int | None]:
    """A total over all links, from the per-link counters (None: no NVLink, NOT_SUPPORTED)."""
    code = getattr(_real, f"NVML_NVLINK_ERROR_DL_{counter}")
    return lambda g: sum(n for (_, c), n in g.nvlink_errors.items() if c == code) if g.nvlink_state else None


_FIELD_ATTRS: dict[int, tuple[Any, str]] = {  # field id -> (FakeGpu attribute or getter, field name)
    getattr(_real, name): (attr, name)
    for name, attr in (
        ("NVML_FI_DEV_POWER_INSTANT", "power_instant_mw"),
        ("NVML_FI_DEV_MEMORY_TEMP", "mem_temp_c"),
        ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "recovery_action"),
        ("NVML_FI_DEV_PERF_POLICY_POWER", "perf_policy_power_ns"),
        ("NVML_FI_DEV_PERF_POLICY_THERMAL", "perf_policy_thermal_ns"),
        ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "perf_policy_board_limit_ns"),
        ("NVML_FI_DEV_PERF_POLICY_RELIABILITY", "perf_policy_reliability_ns"),
        # derived from nvlink_errors, so a test sets the per-link counters only
        ("NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", _nvlink_total("REPLAY")),
        ("NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", _nvlink_total("RECOVERY")),
        ("NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", _nvlink_total("CRC_FLIT")),
        ("NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", _nvlink_total("CRC_DATA")),
    )
    if hasattr(_real, name)
}
# the value type a driver answers each field in (NVML_VALUE_TYPE_UNSIGNED_INT where not listed)
_FIELD_TYPES = {
    getattr(_real, name): _real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    for name in ("NVML_FI_DEV_PERF_POLICY_POWER", "NVML_FI_DEV_PERF_POLICY_THERMAL",
                 "NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "NVML_FI_DEV_PERF_POLICY_RELIABILITY",
                 "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
                 "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL")
}
_UNION_MEMBER = {
    _real.NVML_VALUE_TYPE_DOUBLE: "dVal",
    _real.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    _real.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    _real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    _real.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    _real.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    _real.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _default_thresholds() -> dict[int, int]:
    """The four thresholds the H200 capture (tests/fixtures/nvml/nvidia-h200.json) recorded."""
    return {
        _real.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 95,
        _real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 89,
        _real.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: 87,
        _real.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: 95,
    }


_XID, _SBE, _DBE = (_real.nvmlEventTypeXidCriticalError, _real.nvmlEventTypeSingleBitEccError,
                    _real.nvmlEventTypeDoubleBitEccError)
_RECOVERY = getattr(_real, "nvmlEventTypeGpuRecoveryAction", 0)
_RETIRED = frozenset({"nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus"})
_NEWER_FIELDS = frozenset({"NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"})


@dataclass(frozen=True)
class ModelSupport:
    """What one GPU model's driver answers for the health calls: the fake's support table.

    From NVIDIA's documentation of each call (page retirement up to Volta, row remapping from
    Ampere on, each product's NVLink count); the event masks and which models answer the
    recovery-action field are assumptions. None of it is from a capture of these models: a
    probe on a real one (``agentd probe --json``, replayed by :meth:`FakeNvml.from_fixture`) is
    the truth.
    """

    events: int  # nvmlDeviceGetSupportedEventTypes
    nvlinks: int  # links, all up; 0: nvmlDeviceGetNvLinkState answers NOT_SUPPORTED
    unsupported: frozenset[str] = frozenset()  # calls and fields answered NOT_SUPPORTED


MODELS: dict[str, ModelSupport] = {
    "NVIDIA H200": ModelSupport(_XID | _SBE | _DBE | _RECOVERY, 18, _RETIRED),
    "NVIDIA H100 80GB HBM3": ModelSupport(_XID | _SBE | _DBE | _RECOVERY, 18, _RETIRED),
    "NVIDIA A100-SXM4-80GB": ModelSupport(_XID | _SBE | _DBE, 12, _RETIRED | _NEWER_FIELDS),
    "Tesla V100-SXM2-16GB": ModelSupport(_XID | _SBE | _DBE, 6, frozenset({"nvmlDeviceGetRemappedRows"}) | _NEWER_FIELDS),
    "NVIDIA L40S": ModelSupport(_XID | _SBE | _DBE, 0, _RETIRED),
}
# Any other name ("Fake GPU", the bench's GPUs): every counter answers, as an H200 would for the
# cost of a tick (18 links), but no event type, so the hundreds of backends the suite opens
# without closing start no watcher thread. Tests that want events name a model that has them.
DEFAULT_MODEL = ModelSupport(0, 18)


@dataclass(eq=False)
class FakeGpu:
    """One fake GPU; values in NVML's own units (mW, mJ, C, MHz, bytes, %). Not a real GPU's data."""

    name: str = "Fake GPU"
    uuid: str = ""  # filled in by FakeNvml when empty
    power_mw: int = 350_000  # nvmlDeviceGetPowerUsage (the ~1 s average)
    power_instant_mw: int = 352_500  # NVML_FI_DEV_POWER_INSTANT
    energy_mj: int = 123_456_789
    temp_c: int = 45
    mem_temp_c: int = 52  # NVML_FI_DEV_MEMORY_TEMP
    limit_mw: int = 700_000  # management limit (what software set)
    enforced_limit_mw: int | None = None  # None: follows limit_mw
    default_limit_mw: int = 700_000
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    thresholds: dict[int, int] = field(default_factory=_default_thresholds)  # missing: NotSupported
    power_management_mode: int = _real.NVML_FEATURE_ENABLED
    util_gpu: int = 60
    util_mem: int = 35
    mem_total_bytes: int = 150_754_820_096
    mem_used_bytes: int = 42_949_672_960
    sm_clock_mhz: int = 1_980
    clock_reasons: int = 0
    pids: list[int] = field(default_factory=list)
    # health (NVML's units and types); what the model does not support is refused (MODELS)
    supported_events: int | None = None  # None: the model's
    register_refused: int = 0  # event types nvmlDeviceRegisterEvents refuses (NOT_SUPPORTED) all the same
    ecc_mode: tuple[int, int] = (_real.NVML_FEATURE_ENABLED, _real.NVML_FEATURE_ENABLED)  # current, pending
    ecc_counts: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter type) -> n
    retired_pages: dict[int, list[int]] = field(default_factory=dict)  # cause -> page addresses
    retired_pending: int = _real.NVML_FEATURE_DISABLED
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrected, uncorrected, pending, failure
    nvlink_state: dict[int, int] | None = None  # link -> NVML_FEATURE_*; None: the model's links, all up
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)  # (link, NVML_NVLINK_ERROR_*) -> n
    pcie_replay: int = 0
    recovery_action: int = getattr(_real, "NVML_GPU_RECOVERY_ACTION_NONE", 0)
    perf_policy_power_ns: int = 0
    perf_policy_thermal_ns: int = 0
    perf_policy_board_limit_ns: int = 0
    perf_policy_reliability_ns: int = 0
    field_value_types: dict[int, int] = field(default_factory=dict)  # field id -> NVML_VALUE_TYPE_*
    field_latency_us: dict[int, int] = field(default_factory=dict)  # field id -> latencyUsec (default 0)
    # failure modes
    unsupported: set[str] = field(default_factory=set)  # function or field names
    errors: dict[str, int] = field(default_factory=dict)  # function or field name -> NVML error code
    lost: bool = False
    no_permission_on_set: bool = False
    delay_s: float = 0.0
    on_call: Callable[[str], None] | None = None  # called with the function name before each call
    # what happened
    calls: Counter[str] = field(default_factory=Counter)
    # every value passed to nvmlDeviceSetPowerManagementLimit, as passed (float or int), refused or not
    attempts: list[int | float] = field(default_factory=list)
    sets: list[int] = field(default_factory=list)  # the mW values the "driver" accepted

    def __post_init__(self) -> None:
        model = MODELS.get(self.name, DEFAULT_MODEL)
        if self.supported_events is None:
            self.supported_events = model.events
        if self.nvlink_state is None:
            self.nvlink_state = {link: _real.NVML_FEATURE_ENABLED for link in range(model.nvlinks)}
        self.unsupported = set(self.unsupported) | model.unsupported


@dataclass(frozen=True)
class FakeHandle:
    """Stands for an nvmlDevice_t; refers to the GPU by position, like the driver's handle.

    Equal by value and hashable; the real handles are ctypes pointers that are neither, which is
    why the collector compares handles with ``collectors.nvml_events.handle_key``."""

    index: int


@dataclass(eq=False)
class FakeEventSet:
    """Stands for an nvmlEventSet_t: the GPUs registered on it (index -> event type mask) and
    the events raised for them that no wait has taken yet."""

    registered: dict[int, int] = field(default_factory=dict)
    pending: deque[FakeEventData] = field(default_factory=deque)
    freed: bool = False


@dataclass(frozen=True)
class FakeEventData:
    """What nvmlEventSetWait_v2 returns: c_nvmlEventData_t's fields. ``device`` is a new handle
    object per event (equal in value to the GPU's), as the driver's is a new pointer object."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF  # NVML_GPU_INSTANCE_ID_ANY: not a MIG event
    computeInstanceId: int = 0xFFFFFFFF


def _raw_arg(value: Any, position: int) -> Any:
    """What ctypes does with an argument passed without argtypes (the real wrappers pass NVLink
    link and counter numbers that way): an int goes through, a float raises ArgumentError."""
    if isinstance(value, (int, str, bytes)) or value is None:
        return value
    raise ctypes.ArgumentError(f"argument {position}: TypeError: Don't know how to convert parameter {position}")


# Call counting is locked, since the event watcher calls in from a thread of its own. One lock for
# every fake, at module level: an attribute of the fake would cost a trip through
# FakeNvml.__getattribute__ on every call, and the overhead bench measures this fake.
_COUNTING = threading.Lock()


def _error(code: int) -> Exception:
    return _real.NVMLError(code)  # the real factory returns the matching NVMLError_* subclass


class FakeNvml:
    """A module-like object with the pynvml names that the collector, probe and bench use."""

    IS_FAKE = True  # probe() and the bench label their output with this

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        driver_version: str = "0.0.0-fake",
        nvml_version: str = "0.0.0-fake",
        cuda_driver_version: int = 12080,
        init_error: int | None = None,
        hidden: Iterable[str] = (),
    ) -> None:
        self.gpus = list(gpus)
        for i, g in enumerate(self.gpus):
            if not g.uuid:
                g.uuid = f"GPU-fa4e0000-0000-0000-0000-{i:012d}"
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.cuda_driver_version = cuda_driver_version
        self.init_error = init_error
        self.hidden = set(hidden)
        self.initialized = 0
        self.calls: Counter[str] = Counter()
        self._cond = threading.Condition()  # the event sets, their queues and the waiters
        self.event_sets: list[FakeEventSet] = []  # every set created, freed or not
        self.wait_errors: deque[int] = deque()  # error codes the next waits raise, one each
        self.waiting = 0  # threads inside nvmlEventSetWait_v2 now
        self.errors: dict[str, int] = {}  # calls on no GPU (nvmlEventSetCreate) -> NVML error code

    def __getattribute__(self, name: str) -> Any:
        # ``hidden`` plays bindings too old to have a function: getattr raises AttributeError.
        if name[:4] == "nvml" and name in object.__getattribute__(self, "hidden"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    @classmethod
    def with_gpus(cls, n: int, **values: Any) -> FakeNvml:
        """``n`` GPUs with the same values (FakeGpu keyword arguments); distinct UUIDs."""
        return cls([FakeGpu(**values) for _ in range(n)])

    @classmethod
    def from_fixture(cls, path: str | Path | dict[str, Any]) -> FakeNvml:
        """Replay a probe JSON (``agentd.probe.probe`` output): its values and what was unsupported."""
        data = path if isinstance(path, dict) else json.loads(Path(path).read_text())
        fake = cls(
            [],
            driver_version=data.get("driver_version") or "unknown",
            nvml_version=data.get("nvml_version") or "unknown",
            cuda_driver_version=data.get("cuda_driver_version") or 0,
        )
        for g in data["gpus"]:
            gpu, hidden = _gpu_from_probe(g)
            fake.gpus.append(gpu)
            fake.hidden |= hidden
        return fake

    # -- plumbing ----------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with _COUNTING:
            self.calls[name] += 1
        if not self.initialized:
            raise _error(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, name: str, handle: FakeHandle, *, counted: bool = False) -> FakeGpu:
        """Count the call and apply the GPU's failure modes for function ``name``."""
        if not counted:
            self._count(name)
        g = self.gpus[handle.index]
        with _COUNTING:
            g.calls[name] += 1
        if g.on_call is not None:
            g.on_call(name)
        if g.delay_s:
            time.sleep(g.delay_s)
        if g.lost:
            raise _error(_real.NVML_ERROR_GPU_IS_LOST)
        if name in g.errors:
            raise _error(g.errors[name])
        if name in g.unsupported:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        return g

    # -- library -----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise _error(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._count("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._count("nvmlSystemGetNVMLVersion")
        return self.nvml_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._count("nvmlSystemGetCudaDriverVersion")
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._count("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        index = c_uint(index).value  # the real wrapper's conversion: TypeError on a float
        self._count("nvmlDeviceGetHandleByIndex")
        if not index < len(self.gpus):
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        self._gpu("nvmlDeviceGetHandleByIndex", FakeHandle(index), counted=True)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        self._count("nvmlDeviceGetHandleByUUID")
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for i, g in enumerate(self.gpus):
            if g.uuid == uuid:
                self._gpu("nvmlDeviceGetHandleByUUID", FakeHandle(i), counted=True)
                return FakeHandle(i)
        raise _error(_real.NVML_ERROR_NOT_FOUND)

    # -- identity and envelopes --------------------------------------------------------------

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", h).name

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetUUID", h).uuid

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: FakeHandle) -> list[int]:
        g = self._gpu("nvmlDeviceGetPowerManagementLimitConstraints", h)
        return [g.min_limit_mw, g.max_limit_mw]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementDefaultLimit", h).default_limit_mw

    def nvmlDeviceGetPowerManagementMode(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementMode", h).power_management_mode

    def nvmlDeviceGetTemperatureThreshold(self, h: FakeHandle, threshold: int) -> int:
        threshold = c_uint(threshold).value  # _nvmlTemperatureThresholds_t
        g = self._gpu("nvmlDeviceGetTemperatureThreshold", h)
        if threshold not in g.thresholds:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        return g.thresholds[threshold]

    # -- readings ----------------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, h: FakeHandle, fieldIds: list[int] | list[tuple[int, int]]) -> Any:
        # The wrapper's part, as in pynvml: each entry is a field id or a (field id, scope id)
        # pair, stored in the ctypes members (a float raises TypeError there).
        values = (_real.c_nvmlFieldValue_t * len(fieldIds))()
        for v, fid in zip(values, fieldIds):
            try:
                (v.fieldId, v.scopeId) = fid  # type: ignore[misc]
            except TypeError:
                v.fieldId = fid  # type: ignore[assignment]
        # The driver's part: timestamp (wall clock, us), latency, return code, type and value.
        g = self._gpu("nvmlDeviceGetFieldValues", h)
        now_us = time.time_ns() // 1000
        for v in values:
            fid = v.fieldId
            v.timestamp = now_us
            v.latencyUsec = g.field_latency_us.get(fid, 0)
            attr, name = _FIELD_ATTRS.get(fid, (None, str(fid)))
            with _COUNTING:
                g.calls[name] += 1  # so tests can see which fields were asked for
            value = None if attr is None else attr(g) if callable(attr) else getattr(g, attr)
            if name in g.errors:
                v.nvmlReturn = g.errors[name]
            elif value is None or name in g.unsupported:
                v.nvmlReturn = _real.NVML_ERROR_NOT_SUPPORTED
            else:
                v.nvmlReturn = _real.NVML_SUCCESS
                vtype = g.field_value_types.get(fid, _FIELD_TYPES.get(fid, _real.NVML_VALUE_TYPE_UNSIGNED_INT))
                v.valueType = vtype
                setattr(v.value, _UNION_MEMBER[vtype], value)
        return values

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", h).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetTotalEnergyConsumption", h).energy_mj

    def nvmlDeviceGetTemperatureV(self, h: FakeHandle, sensor: int, version: int = _real.nvmlTemperature_v1) -> int:
        if version != _real.nvmlTemperature_v1:  # checked by the wrapper, before any driver call
            raise _error(_real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        sensor = c_uint(sensor).value  # _nvmlTemperatureSensors_t
        g = self._gpu("nvmlDeviceGetTemperatureV", h)
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.temp_c

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        sensor = c_uint(sensor).value  # _nvmlTemperatureSensors_t
        g = self._gpu("nvmlDeviceGetTemperature", h)
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.temp_c

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        g = self._gpu("nvmlDeviceGetEnforcedPowerLimit", h)
        return g.limit_mw if g.enforced_limit_mw is None else g.enforced_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementLimit", h).limit_mw

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> Any:
        g = self._gpu("nvmlDeviceGetUtilizationRates", h)
        return _real.c_nvmlUtilization_t(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: int | None = None) -> Any:
        # as the wrapper: no version -> the v1 struct; a version -> the v2 struct, which the
        # driver refuses unless the version is nvmlMemory_v2
        g = self._gpu("nvmlDeviceGetMemoryInfo" if not version else "nvmlDeviceGetMemoryInfo_v2", h)
        free = g.mem_total_bytes - g.mem_used_bytes
        if not version:
            return _real.c_nvmlMemory_t(total=g.mem_total_bytes, free=free, used=g.mem_used_bytes)
        if c_uint(version).value != _real.nvmlMemory_v2:
            raise _error(_real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return _real.c_nvmlMemory_v2_t(version=version, total=g.mem_total_bytes, reserved=0, free=free,
                                       used=g.mem_used_bytes)

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, type: int) -> int:
        type = c_uint(type).value  # _nvmlClockType_t
        g = self._gpu("nvmlDeviceGetClockInfo", h)
        if type not in (_real.NVML_CLOCK_SM, _real.NVML_CLOCK_GRAPHICS):
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        return g.sm_clock_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", h).clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", h).clock_reasons

    def _processes(self, name: str, h: FakeHandle) -> list[Any]:
        g = self._gpu(name, h)
        return [
            _real.nvmlStructToFriendlyObject(_real.c_nvmlProcessInfo_v2_t(pid=pid, usedGpuMemory=1 << 30))
            for pid in g.pids
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeHandle) -> list[Any]:
        try:
            return self._processes("nvmlDeviceGetComputeRunningProcesses", h)
        except _real.NVMLError_FunctionNotFound:
            # what the real (unversioned, @throwOnVersionMismatch) wrapper raises instead
            raise _real.NVMLLibraryMismatchError("Unversioned function called ...") from None

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: FakeHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", h)

    # -- health counters ---------------------------------------------------------------------

    def nvmlDeviceGetEccMode(self, handle: FakeHandle) -> list[int]:
        return list(self._gpu("nvmlDeviceGetEccMode", handle).ecc_mode)

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        # _nvmlMemoryErrorType_t(errorType), _nvmlEccCounterType_t(counterType): c_uint, so a float
        # is a TypeError before the driver is called
        etype, ctype = c_uint(errorType).value, c_uint(counterType).value
        g = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        counter = _ECC_COUNTERS.get(ctype)
        if etype >= _real.NVML_MEMORY_ERROR_TYPE_COUNT or counter is None:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        if counter in g.errors:
            raise _error(g.errors[counter])
        if counter in g.unsupported or g.ecc_mode[0] != _real.NVML_FEATURE_ENABLED:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        return g.ecc_counts.get((etype, ctype), 0)

    def nvmlDeviceGetRetiredPages(self, device: FakeHandle, sourceFilter: int) -> list[int]:
        cause = c_uint(sourceFilter).value  # _nvmlPageRetirementCause_t
        g = self._gpu("nvmlDeviceGetRetiredPages", device)
        if cause >= _real.NVML_PAGE_RETIREMENT_CAUSE_COUNT:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        return list(g.retired_pages.get(cause, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: FakeHandle) -> int:
        return int(self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", device).retired_pending)

    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        corrected, uncorrected, pending, failure = self._gpu("nvmlDeviceGetRemappedRows", device).remapped_rows
        return (int(corrected), int(uncorrected), int(pending), int(failure))

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def nvmlDeviceGetNvLinkState(self, device: FakeHandle, link: int) -> int:
        link = _raw_arg(link, 2)  # passed without a ctypes conversion: a float is ArgumentError
        g = self._gpu("nvmlDeviceGetNvLinkState", device)
        if not g.nvlink_state:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        if not isinstance(link, int) or link not in g.nvlink_state:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)  # past this GPU's last link
        if f"nvmlDeviceGetNvLinkState:{link}" in g.errors:  # one link that cannot say
            raise _error(g.errors[f"nvmlDeviceGetNvLinkState:{link}"])
        return g.nvlink_state[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, device: FakeHandle, link: int, counter: int) -> int:
        link, counter = _raw_arg(link, 2), _raw_arg(counter, 3)
        g = self._gpu("nvmlDeviceGetNvLinkErrorCounter", device)
        if not g.nvlink_state:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        name = _NVLINK_COUNTERS.get(counter) if isinstance(counter, int) else None
        if not isinstance(link, int) or link not in g.nvlink_state or name is None:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        if name in g.errors:
            raise _error(g.errors[name])
        if name in g.unsupported:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)
        return g.nvlink_errors.get((link, counter), 0)

    # -- events ------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._count("nvmlEventSetCreate")
        if "nvmlEventSetCreate" in self.errors:
            raise _error(self.errors["nvmlEventSetCreate"])
        es = FakeEventSet()
        with self._cond:
            self.event_sets.append(es)
            self._cond.notify_all()
        return es

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        g = self._gpu("nvmlDeviceGetSupportedEventTypes", handle)
        return int(g.supported_events or 0)

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:
        types = c_ulonglong(eventTypes).value  # the wrapper's conversion: TypeError on a float
        g = self._gpu("nvmlDeviceRegisterEvents", handle)
        self._live(eventSet)
        if types & ~int(g.supported_events or 0) or types & g.register_refused:
            raise _error(_real.NVML_ERROR_NOT_SUPPORTED)  # "or some of the requested event types"
        with self._cond:
            eventSet.registered[handle.index] = eventSet.registered.get(handle.index, 0) | types
            self._cond.notify_all()

    def nvmlEventSetWait_v2(self, eventSet: FakeEventSet, timeoutms: int) -> FakeEventData:
        """Blocks until an event for the set, or ``timeoutms``: then NVML_ERROR_TIMEOUT."""
        return self._wait(eventSet, timeoutms, "nvmlEventSetWait_v2")

    def nvmlEventSetWait(self, eventSet: FakeEventSet, timeoutms: int) -> FakeEventData:
        return self._wait(eventSet, timeoutms, "nvmlEventSetWait")

    def _wait(self, eventSet: FakeEventSet, timeoutms: int, name: str) -> FakeEventData:
        timeout_ms = c_uint(timeoutms).value  # the wrapper's c_uint(timeoutms)
        self._count(name)
        deadline = time.monotonic() + timeout_ms / 1000
        with self._cond:
            self.waiting += 1
            self._cond.notify_all()
            try:
                while True:
                    self._live(eventSet)
                    if self.wait_errors:
                        raise _error(self.wait_errors.popleft())
                    if any(mask and self.gpus[i].lost for i, mask in eventSet.registered.items()):
                        raise _error(_real.NVML_ERROR_GPU_IS_LOST)
                    if eventSet.pending:
                        return eventSet.pending.popleft()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _error(_real.NVML_ERROR_TIMEOUT)
                    self._cond.wait(remaining)
            finally:
                self.waiting -= 1
                self._cond.notify_all()

    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        self._count("nvmlEventSetFree")
        with self._cond:
            self._live(eventSet)  # a double free is refused
            eventSet.freed = True
            eventSet.pending.clear()
            self._cond.notify_all()

    def _live(self, eventSet: Any) -> None:
        if not isinstance(eventSet, FakeEventSet) or eventSet.freed or eventSet not in self.event_sets:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)

    # -- test hooks for events (not NVML functions) ------------------------------------------

    def inject_event(self, gpu: int, event_type: int, data: int = 0, *, device: Any = None,
                     gpu_instance: int = 0xFFFFFFFF, compute_instance: int = 0xFFFFFFFF) -> int:
        """The driver raises an event on GPU ``gpu``: queued on every live set that GPU is
        registered on for ``event_type`` (an event before registration is lost, as in NVML).
        ``device`` names another device in the event (one no watcher knows): then it is queued
        on every live set. Returns how many sets got it."""
        return self.inject_events(gpu, event_type, (data,), device=device, gpu_instance=gpu_instance,
                                  compute_instance=compute_instance)

    def inject_events(self, gpu: int, event_type: int, datas: Iterable[int], *, device: Any = None,
                      gpu_instance: int = 0xFFFFFFFF, compute_instance: int = 0xFFFFFFFF) -> int:
        """Many events of one type at once (a flood), in order; one wake-up for all."""
        datas = list(datas)
        with self._cond:
            sets = [es for es in self.event_sets if not es.freed
                    and (device is not None or es.registered.get(gpu, 0) & event_type)]
            for es in sets:
                for d in datas:
                    es.pending.append(FakeEventData(device if device is not None else FakeHandle(gpu),
                                                    event_type, d, gpu_instance, compute_instance))
            self._cond.notify_all()
        return len(sets)

    def fail_wait(self, code: int, times: int = 1) -> None:
        """The next ``times`` waits raise NVMLError(code) (woken at once if one is waiting)."""
        with self._cond:
            self.wait_errors.extend([code] * times)
            self._cond.notify_all()

    def set_lost(self, gpu: int, lost: bool = True) -> None:
        """GPU ``gpu`` falls off the bus (or comes back); a wait in progress sees it at once."""
        with self._cond:
            self.gpus[gpu].lost = lost
            self._cond.notify_all()

    def pending_events(self) -> int:
        """Events raised and not yet taken by any wait, over all live sets."""
        with self._cond:
            return sum(len(es.pending) for es in self.event_sets if not es.freed)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds, up to ``timeout_s``: woken by the fake's own changes
        (a wait starting or ending, an event injected or taken), and polled every 5 ms for what
        the fake does not see (a watcher's queue). True when it held."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.005))
        return True

    # -- the one control ---------------------------------------------------------------------

    def nvmlDeviceSetPowerManagementLimit(self, h: FakeHandle, limit: int) -> None:
        """As the real wrapper: ``c_uint(limit)`` first (TypeError on a float, a negative value
        wraps round), then the driver's checks on the unsigned value it receives."""
        self.gpus[h.index].attempts.append(limit)  # every attempt, before anything can refuse it
        mw = c_uint(limit).value
        g = self._gpu("nvmlDeviceSetPowerManagementLimit", h)
        if g.no_permission_on_set:
            raise _error(_real.NVML_ERROR_NO_PERMISSION)
        if not g.min_limit_mw <= mw <= g.max_limit_mw:
            raise _error(_real.NVML_ERROR_INVALID_ARGUMENT)
        g.limit_mw = mw
        g.sets.append(mw)


# The real constants, struct types and exception classes, shared rather than copied by value.
for _name in dir(_real):
    if _name.startswith(("NVML", "c_nvml", "nvmlClocksEventReason", "nvmlClocksThrottleReason", "nvmlEventType")):
        setattr(FakeNvml, _name, getattr(_real, _name))
_ECC_COUNTERS = {_real.NVML_VOLATILE_ECC: "NVML_VOLATILE_ECC", _real.NVML_AGGREGATE_ECC: "NVML_AGGREGATE_ECC"}
_NVLINK_COUNTERS = {
    getattr(_real, n): n for n in ("NVML_NVLINK_ERROR_DL_REPLAY", "NVML_NVLINK_ERROR_DL_RECOVERY",
                                   "NVML_NVLINK_ERROR_DL_CRC_FLIT", "NVML_NVLINK_ERROR_DL_CRC_DATA",
                                   "NVML_NVLINK_ERROR_DL_ECC_DATA")
}
FakeNvml.nvmlTemperature_v1 = _real.nvmlTemperature_v1
FakeNvml.nvmlStructToFriendlyObject = staticmethod(_real.nvmlStructToFriendlyObject)


# The health calls a probe records (agentd.probe.HEALTH_CALLS). A capture older than them does not
# have them: replayed, they answer FUNCTION_NOT_FOUND, as a driver without the call would.
_HEALTH_CALLS = (
    "nvmlDeviceGetSupportedEventTypes", "nvmlDeviceGetEccMode", "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkErrorCounter", "nvmlDeviceGetPcieReplayCounter",
)  # fmt: skip


def _gpu_from_probe(p: dict[str, Any]) -> tuple[FakeGpu, set[str]]:
    """A FakeGpu that answers like the probed GPU; also the calls its bindings lacked.

    The capture is the whole truth: the model's support table (MODELS) does not apply."""
    gpu = FakeGpu(name=p.get("name") or "unknown", uuid=p.get("uuid") or "", thresholds={}, pids=[])
    gpu.unsupported, gpu.supported_events, gpu.nvlink_state = set(), 0, {}
    hidden: set[str] = set()
    if "error" in p:  # the GPU could not even be opened when probed
        gpu.lost = True
        return gpu, hidden
    calls: dict[str, dict[str, Any]] = p.get("calls", {})

    def fail(name: str, e: dict[str, Any]) -> None:
        code = e.get("code")
        if e["error"] == "not_in_bindings":
            hidden.add(name)
        elif code is None:  # library_mismatch and friends: the C symbol is missing
            gpu.errors[name] = _real.NVML_ERROR_FUNCTION_NOT_FOUND
        elif code == _real.NVML_ERROR_NOT_SUPPORTED:
            gpu.unsupported.add(name)
        else:
            gpu.errors[name] = code

    def raw(name: str) -> Any:
        e = calls.get(name)
        if e is None:
            return None
        if "error" in e:
            fail(name, e)
            return None
        return e.get("raw")

    simple = {
        "nvmlDeviceGetPowerUsage": "power_mw",
        "nvmlDeviceGetTotalEnergyConsumption": "energy_mj",
        "nvmlDeviceGetPowerManagementLimit": "limit_mw",
        "nvmlDeviceGetEnforcedPowerLimit": "enforced_limit_mw",
        "nvmlDeviceGetPowerManagementDefaultLimit": "default_limit_mw",
        "nvmlDeviceGetPowerManagementMode": "power_management_mode",
        "nvmlDeviceGetClockInfo": "sm_clock_mhz",
    }
    for name, attr in simple.items():
        v = raw(name)
        if v is not None:
            setattr(gpu, attr, v)
    # one value behind two calls: the newer call's value wins, the older one fills in
    for names, attr in (
        (("nvmlDeviceGetTemperature", "nvmlDeviceGetTemperatureV"), "temp_c"),
        (("nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetCurrentClocksEventReasons"), "clock_reasons"),
        (("nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetComputeRunningProcesses"), "pids"),
    ):
        for name in names:
            v = raw(name)
            if v is not None:
                setattr(gpu, attr, [q["pid"] for q in v] if attr == "pids" else v)
    if (v := raw("nvmlDeviceGetPowerManagementLimitConstraints")) is not None:
        gpu.min_limit_mw, gpu.max_limit_mw = v
    if (v := raw("nvmlDeviceGetUtilizationRates")) is not None:
        gpu.util_gpu, gpu.util_mem = v["gpu"], v["memory"]
    if (v := raw("nvmlDeviceGetMemoryInfo")) is not None:
        gpu.mem_total_bytes, gpu.mem_used_bytes = v["total"], v["used"]
    thresholds = calls.get("nvmlDeviceGetTemperatureThreshold", {})
    if "error" in thresholds:
        fail("nvmlDeviceGetTemperatureThreshold", thresholds)
    for tname, e in thresholds.get("thresholds", {}).items():
        if "error" not in e:
            gpu.thresholds[getattr(_real, tname)] = e["raw"]
    fields = calls.get("nvmlDeviceGetFieldValues", {})
    if "error" in fields:
        fail("nvmlDeviceGetFieldValues", fields)
    by_name = {name: (fid, attr) for fid, (attr, name) in _FIELD_ATTRS.items()}
    recorded = fields.get("fields", {})
    for fname, e in recorded.items():
        fid, attr = by_name[fname]
        if "error" in e:
            fail(fname, e)
        else:
            if not callable(attr):  # a derived field (NVLink totals) follows what it derives from
                setattr(gpu, attr, e["raw"])
            gpu.field_value_types[fid] = getattr(_real, e["value_type"])
            if "latency_us" in e:
                gpu.field_latency_us[fid] = e["latency_us"]
    if "fields" in fields:
        gpu.unsupported |= {name for name in by_name if name not in recorded}  # not asked when probed
    _health_from_probe(gpu, calls, fail)
    return gpu, hidden


def _health_from_probe(gpu: FakeGpu, calls: dict[str, dict[str, Any]],
                       fail: Callable[[str, dict[str, Any]], None]) -> None:
    """The health calls of a probe (agentd.probe._probe_health) into the FakeGpu."""
    for name in _HEALTH_CALLS:
        e = calls.get(name)
        if e is None:
            gpu.errors[name] = _real.NVML_ERROR_FUNCTION_NOT_FOUND
        elif "error" in e:
            fail(name, e)
    if "raw" in (e := calls.get("nvmlDeviceGetSupportedEventTypes", {})):
        gpu.supported_events = e["raw"]
    if "raw" in (e := calls.get("nvmlDeviceGetEccMode", {})):
        gpu.ecc_mode = (e["raw"][0], e["raw"][1])
    for key, c in calls.get("nvmlDeviceGetTotalEccErrors", {}).get("counters", {}).items():
        error_type, counter_type = key.split("/")
        etype = getattr(_real, f"NVML_MEMORY_ERROR_TYPE_{error_type}")
        ctype = getattr(_real, f"NVML_{counter_type}_ECC")
        if "error" in c:
            fail(_ECC_COUNTERS[ctype], c)  # refused per counter type (volatile / aggregate)
        else:
            gpu.ecc_counts[(etype, ctype)] = c["raw"]
    for cause, c in calls.get("nvmlDeviceGetRetiredPages", {}).get("causes", {}).items():
        if "error" in c:
            fail("nvmlDeviceGetRetiredPages", c)
        else:
            gpu.retired_pages[getattr(_real, f"NVML_PAGE_RETIREMENT_CAUSE_{cause}")] = list(c["raw"])
    if "raw" in (e := calls.get("nvmlDeviceGetRetiredPagesPendingStatus", {})):
        gpu.retired_pending = e["raw"]
    if "raw" in (e := calls.get("nvmlDeviceGetRemappedRows", {})):
        corrected, uncorrected, pending, failure = e["raw"]
        gpu.remapped_rows = (corrected, uncorrected, pending, failure)
    for link, c in calls.get("nvmlDeviceGetNvLinkState", {}).get("links", {}).items():
        if "raw" in c:
            gpu.nvlink_state[int(link)] = c["raw"]  # type: ignore[index]
        else:
            gpu.nvlink_state[int(link)] = _real.NVML_FEATURE_DISABLED  # type: ignore[index]
            gpu.errors[f"nvmlDeviceGetNvLinkState:{link}"] = c.get("code", _real.NVML_ERROR_UNKNOWN)
    for key, c in calls.get("nvmlDeviceGetNvLinkErrorCounter", {}).get("links", {}).items():
        link, counter = key.split("/")
        code = getattr(_real, f"NVML_NVLINK_ERROR_{counter}")
        if "error" in c:
            fail(f"NVML_NVLINK_ERROR_{counter}", c)  # refused per counter (on every link)
        else:
            gpu.nvlink_errors[(int(link), code)] = c["raw"]
    if "raw" in (e := calls.get("nvmlDeviceGetPcieReplayCounter", {})):
        gpu.pcie_replay = e["raw"]


class install:
    """Put ``fake`` in ``sys.modules['pynvml']`` (now), undo on ``uninstall()`` or leaving ``with``.

    For code that imports pynvml itself (``NvmlBackend()`` without a module, the bench, a
    subprocess whose entry point calls this before importing the daemon).
    """

    def __init__(self, fake: FakeNvml) -> None:
        self.fake = fake
        self._previous = sys.modules.get("pynvml")
        sys.modules["pynvml"] = fake  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self._previous is None:
            sys.modules.pop("pynvml", None)
        else:
            sys.modules["pynvml"] = self._previous

    def __enter__(self) -> FakeNvml:
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


class Clock:
    """A monotonic clock the test moves by hand (``clock.t += 5``), for NvmlBackend's retry
    backoff and read intervals and the event watcher (which reads it from its own thread)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
