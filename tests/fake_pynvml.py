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
  values the "driver" accepted), and per-call ``delay_s`` / ``on_call`` hooks for timeout tests.

Build one::

    fake = FakeNvml.with_gpus(8, power_mw=300_000)     # 8 identical GPUs, NVML units
    fake.gpus[3].lost = True                           # GPU 3 falls off the bus
    fake.gpus[0].unsupported.add("nvmlDeviceGetTotalEnergyConsumption")
    backend = NvmlBackend(fake)

or replay a probe (``agentd/probe.py``): ``FakeNvml.from_fixture("tests/fixtures/nvml/x.json")``.
For code that does ``import pynvml`` itself: ``with install(fake): ...``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from ctypes import c_uint
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml as _real

_FIELD_ATTRS = {  # field id -> (FakeGpu attribute, field name)
    _real.NVML_FI_DEV_POWER_INSTANT: ("power_instant_mw", "NVML_FI_DEV_POWER_INSTANT"),
    _real.NVML_FI_DEV_MEMORY_TEMP: ("mem_temp_c", "NVML_FI_DEV_MEMORY_TEMP"),
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


@dataclass(frozen=True)
class FakeHandle:
    """Stands for an nvmlDevice_t; refers to the GPU by position, like the driver's handle."""

    index: int


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
        self.calls[name] += 1
        if not self.initialized:
            raise _error(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, name: str, handle: FakeHandle, *, counted: bool = False) -> FakeGpu:
        """Count the call and apply the GPU's failure modes for function ``name``."""
        if not counted:
            self._count(name)
        g = self.gpus[handle.index]
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
            g.calls[name] += 1  # so tests can see which fields were asked for
            if name in g.errors:
                v.nvmlReturn = g.errors[name]
            elif attr is None or name in g.unsupported:
                v.nvmlReturn = _real.NVML_ERROR_NOT_SUPPORTED
            else:
                v.nvmlReturn = _real.NVML_SUCCESS
                vtype = g.field_value_types.get(fid, _real.NVML_VALUE_TYPE_UNSIGNED_INT)
                v.valueType = vtype
                setattr(v.value, _UNION_MEMBER[vtype], getattr(g, attr))
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
    if _name.startswith(("NVML", "c_nvml", "nvmlClocksEventReason", "nvmlClocksThrottleReason")):
        setattr(FakeNvml, _name, getattr(_real, _name))
FakeNvml.nvmlTemperature_v1 = _real.nvmlTemperature_v1
FakeNvml.nvmlStructToFriendlyObject = staticmethod(_real.nvmlStructToFriendlyObject)


def _gpu_from_probe(p: dict[str, Any]) -> tuple[FakeGpu, set[str]]:
    """A FakeGpu that answers like the probed GPU; also the calls its bindings lacked."""
    gpu = FakeGpu(name=p.get("name") or "unknown", uuid=p.get("uuid") or "", thresholds={}, pids=[])
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
    for fname, e in fields.get("fields", {}).items():
        fid, attr = by_name[fname]
        if "error" in e:
            fail(fname, e)
        else:
            setattr(gpu, attr, e["raw"])
            gpu.field_value_types[fid] = getattr(_real, e["value_type"])
            if "latency_us" in e:
                gpu.field_latency_us[fid] = e["latency_us"]
    return gpu, hidden


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
