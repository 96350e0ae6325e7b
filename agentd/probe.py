"""``agentd probe``: one full, read-only NVML reading of every GPU on this node.

Why: before trusting the daemon on a new model or driver, an operator (or a developer without
that GPU) wants to see exactly what NVML answers: which calls work, their raw values and units,
what the collector makes of them, and how long each call takes. The JSON form is also the NVML
test fixture format (``tests/fixtures/nvml/<model>.json``, replayed by
``tests.fake_pynvml.FakeNvml.from_fixture``).

Read-only by construction: only ``nvmlInit``, ``nvmlShutdown`` and ``*Get*`` calls; no set call
is ever made. The serial number and board part number are never read. Each call is timed once
with ``time.perf_counter_ns``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

from collectors.base import BackendError
from collectors.nvml import NvmlBackend, init_error_message

PROBE_VERSION = 1

_THRESHOLDS = (
    "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN",
    "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN",
    "NVML_TEMPERATURE_THRESHOLD_GPU_MAX",
    "NVML_TEMPERATURE_THRESHOLD_MEM_MAX",
)
_FIELDS = (  # (field constant, raw unit, converted unit, scale)
    ("NVML_FI_DEV_POWER_INSTANT", "mW", "W", 0.001),
    ("NVML_FI_DEV_MEMORY_TEMP", "C", "C", 1.0),
)
_VALUE_TYPES = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}
_REASONS = (  # clocks-event-reason bits, for humans
    (0x1, "gpu_idle"), (0x2, "applications_clocks"), (0x4, "sw_power_cap"), (0x8, "hw_slowdown"),
    (0x10, "sync_boost"), (0x20, "sw_thermal"), (0x40, "hw_thermal"), (0x80, "hw_power_brake"),
    (0x100, "display_clock"),
)  # fmt: skip


class _Prober:
    """Calls and times one NVML function at a time, recording value or error, never raising."""

    def __init__(self, nv: Any) -> None:
        self.nv = nv
        self.codes = {getattr(nv, n): n[len("NVML_ERROR_") :].lower() for n in dir(nv) if n.startswith("NVML_ERROR_")}
        self.mismatch = getattr(nv, "NVMLLibraryMismatchError", ())

    def error_name(self, code: int) -> str:
        return self.codes.get(code, f"error_{code}")

    def call(self, name: str, *args: Any) -> tuple[dict[str, Any], Any]:
        """``(entry, raw)``: entry has ``us`` and either nothing else yet or ``error`` (+ ``code``)."""
        fn = getattr(self.nv, name, None)
        if fn is None:
            return {"error": "not_in_bindings"}, None
        t0 = time.perf_counter_ns()
        try:
            raw = fn(*args)
        except self.nv.NVMLError as e:
            us = (time.perf_counter_ns() - t0) / 1000
            return {"error": self.error_name(e.value), "code": e.value, "us": round(us, 1)}, None
        except self.mismatch:
            us = (time.perf_counter_ns() - t0) / 1000
            return {"error": "library_mismatch", "us": round(us, 1)}, None
        return {"us": round((time.perf_counter_ns() - t0) / 1000, 1)}, raw


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def probe(nvml: Any = None) -> dict[str, Any]:
    """Read everything the collector reads, on every GPU, once. JSON-serialisable.

    Raises :class:`BackendError` (with the operator message) when NVML cannot start.
    """
    nv = nvml
    if nv is None:
        try:
            import pynvml

            nv = pynvml
        except ImportError as e:  # pragma: no cover - the dependency is declared
            raise BackendError(f"cannot import pynvml ({e}): install the nvidia-ml-py package") from e
    p = _Prober(nv)
    timing: dict[str, float | None] = {}
    t0 = time.perf_counter_ns()
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        raise BackendError(init_error_message(nv, e)) from e
    timing["nvmlInit"] = round((time.perf_counter_ns() - t0) / 1000, 1)
    try:
        result: dict[str, Any] = {
            "probe_version": PROBE_VERSION,
            "fake": bool(getattr(nv, "IS_FAKE", False)),
            "bindings": _bindings_version(nv),
            "captured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        for key, name in (
            ("driver_version", "nvmlSystemGetDriverVersion"),
            ("nvml_version", "nvmlSystemGetNVMLVersion"),
            ("cuda_driver_version", "nvmlSystemGetCudaDriverVersion"),
            ("device_count", "nvmlDeviceGetCount"),
        ):
            entry, raw = p.call(name)
            timing[name] = entry.get("us")
            result[key] = _text(raw) if "error" not in entry else None
        cuda = result["cuda_driver_version"]
        result["cuda_driver_version_text"] = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        result["timing_us"] = timing
        result["gpus"] = [_probe_gpu(p, i) for i in range(result["device_count"] or 0)]
        _add_collector_view(nv, result)
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
    return result


def _bindings_version(nv: Any) -> str:
    if getattr(nv, "IS_FAKE", False):
        return "fake"
    try:
        from importlib.metadata import version

        return f"nvidia-ml-py {version('nvidia-ml-py')}"
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _probe_gpu(p: _Prober, index: int) -> dict[str, Any]:
    nv = p.nv
    entry, h = p.call("nvmlDeviceGetHandleByIndex", index)
    gpu: dict[str, Any] = {"index": index}
    if "error" in entry:
        gpu["error"] = entry["error"]
        return gpu
    calls: dict[str, dict[str, Any]] = {"nvmlDeviceGetHandleByIndex": entry}

    def rec(name: str, *args: Any, unit: str | None = None, to: str | None = None, scale: float = 1.0) -> Any:
        entry, raw = p.call(name, h, *args)
        calls[name] = entry
        if "error" in entry:
            return None
        raw = _text(raw)
        entry["raw"] = raw
        if unit is not None:
            entry["unit"] = unit
        if to is not None:
            entry["value"] = raw * scale
            entry["value_unit"] = to
        return raw

    gpu["name"] = rec("nvmlDeviceGetName")
    gpu["uuid"] = rec("nvmlDeviceGetUUID")
    # envelopes and controls (read only)
    mode = rec("nvmlDeviceGetPowerManagementMode")
    if mode is not None:
        enabled = mode == nv.NVML_FEATURE_ENABLED
        calls["nvmlDeviceGetPowerManagementMode"]["value"] = "enabled" if enabled else "disabled"
    lo_hi = rec("nvmlDeviceGetPowerManagementLimitConstraints", unit="mW")
    if lo_hi is not None:
        lo_hi = [int(x) for x in lo_hi]
        calls["nvmlDeviceGetPowerManagementLimitConstraints"].update(
            raw=lo_hi, value=[x / 1000 for x in lo_hi], value_unit="W"
        )
    default = rec("nvmlDeviceGetPowerManagementDefaultLimit", unit="mW", to="W", scale=0.001)
    current = rec("nvmlDeviceGetPowerManagementLimit", unit="mW", to="W", scale=0.001)
    enforced = rec("nvmlDeviceGetEnforcedPowerLimit", unit="mW", to="W", scale=0.001)
    thresholds: dict[str, Any] = {}
    for tname in _THRESHOLDS:
        entry, raw = p.call("nvmlDeviceGetTemperatureThreshold", h, getattr(nv, tname))
        if "error" not in entry:
            entry.update(raw=raw, unit="C")
        thresholds[tname] = entry
    calls["nvmlDeviceGetTemperatureThreshold"] = {"thresholds": thresholds}
    # readings, in the collector's order
    fields_entry, values = p.call("nvmlDeviceGetFieldValues", h, [getattr(nv, f[0]) for f in _FIELDS])
    if values is not None:
        type_names = {getattr(nv, n): n for n in _VALUE_TYPES}
        fields: dict[str, Any] = {}
        for (fname, unit, to, scale), v in zip(_FIELDS, values):
            if v.nvmlReturn != nv.NVML_SUCCESS:
                fields[fname] = {"error": p.error_name(v.nvmlReturn), "code": v.nvmlReturn}
                continue
            tname = type_names.get(v.valueType, f"unknown_{v.valueType}")
            raw = getattr(v.value, _VALUE_TYPES[tname]) if tname in _VALUE_TYPES else None
            fields[fname] = {
                "raw": raw, "value_type": tname, "unit": unit,
                "value": raw * scale if raw is not None else None, "value_unit": to,
                "latency_us": v.latencyUsec,
            }  # fmt: skip
        fields_entry["fields"] = fields
    calls["nvmlDeviceGetFieldValues"] = fields_entry
    rec("nvmlDeviceGetPowerUsage", unit="mW", to="W", scale=0.001)
    rec("nvmlDeviceGetTotalEnergyConsumption", unit="mJ", to="J", scale=0.001)
    rec("nvmlDeviceGetTemperatureV", nv.NVML_TEMPERATURE_GPU, unit="C")
    rec("nvmlDeviceGetTemperature", nv.NVML_TEMPERATURE_GPU, unit="C")
    util = rec("nvmlDeviceGetUtilizationRates")
    if util is not None:
        calls["nvmlDeviceGetUtilizationRates"].update(raw={"gpu": util.gpu, "memory": util.memory}, unit="%")
    mem = rec("nvmlDeviceGetMemoryInfo")
    if mem is not None:
        calls["nvmlDeviceGetMemoryInfo"].update(
            raw={"total": mem.total, "free": mem.free, "used": mem.used}, unit="bytes"
        )
    rec("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_SM, unit="MHz")
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        bits = rec(name)
        if bits is not None:
            calls[name].update(value=hex(bits), reasons=[n for b, n in _REASONS if bits & b])
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"):
        procs = rec(name)
        if procs is not None:
            calls[name]["raw"] = [{"pid": q.pid, "used_gpu_memory_bytes": q.usedGpuMemory} for q in procs]
    gpu["calls"] = calls
    gpu["controls"] = {
        "power_management": calls["nvmlDeviceGetPowerManagementMode"].get("value")
        or calls["nvmlDeviceGetPowerManagementMode"].get("error"),
        "limit_min_w": lo_hi[0] / 1000 if lo_hi else None,
        "limit_max_w": lo_hi[1] / 1000 if lo_hi else None,
        "limit_default_w": default / 1000 if default is not None else None,
        "limit_current_w": current / 1000 if current is not None else None,
        "limit_enforced_w": enforced / 1000 if enforced is not None else None,
        "writes": "none: the probe never calls a set function",
    }
    return gpu


def _add_collector_view(nv: Any, result: dict[str, Any]) -> None:
    """What NvmlBackend makes of the same GPUs: one sample each and the readers it dropped."""
    backend = NvmlBackend(nv)
    try:
        backend.open()
        t0 = time.perf_counter_ns()
        samples = backend.sample(time.time_ns())
        result["timing_us"]["collector_sample_all_gpus"] = round((time.perf_counter_ns() - t0) / 1000, 1)
        for s in samples:
            if s.index < len(result["gpus"]):
                sample = dataclasses.asdict(s)
                sample["pids"] = list(s.pids)
                result["gpus"][s.index]["collector"] = {
                    "sample": sample,
                    "unsupported": sorted(backend.unsupported(s.index)),
                }
    except BackendError as e:
        result["collector_error"] = str(e)
    finally:
        backend.close()


def probe_text(result: dict[str, Any]) -> str:
    """The probe as a human reads it: one line per call, raw and converted, with its time."""
    lines = [
        f"NVML probe{'  [FAKE NVML: not a real GPU]' if result.get('fake') else ''}",
        f"driver {result.get('driver_version')}  NVML {result.get('nvml_version')}  "
        f"CUDA {result.get('cuda_driver_version_text')}  GPUs {result.get('device_count')}  "
        f"bindings {result.get('bindings')}  nvmlInit {result.get('timing_us', {}).get('nvmlInit')} us",
    ]
    for g in result.get("gpus", []):
        lines.append("")
        if "error" in g:
            lines.append(f"GPU {g['index']}: cannot open: {g['error']}")
            continue
        lines.append(f"GPU {g['index']}  {g.get('name')}  {g.get('uuid')}")
        for name, e in g["calls"].items():
            if "thresholds" in e:
                for tname, te in e["thresholds"].items():
                    lines.append(_row(f"{name}({tname.removeprefix('NVML_TEMPERATURE_THRESHOLD_')})", te))
            elif "fields" in e:
                lines.append(_row(name, {k: v for k, v in e.items() if k != "fields"}))
                for fname, fe in e["fields"].items():
                    lines.append(_row(f"  [{fname}]", fe))
            else:
                lines.append(_row(name, e))
        c = g["controls"]
        lines.append(
            f"  controls: power management {c['power_management']}; limit {c['limit_current_w']} W "
            f"(enforced {c['limit_enforced_w']}, default {c['limit_default_w']}, "
            f"range {c['limit_min_w']}..{c['limit_max_w']} W); {c['writes']}"
        )
        col = g.get("collector")
        if col:
            lines.append(f"  collector: unsupported {', '.join(col['unsupported']) or 'none'}")
    if "collector_error" in result:
        lines.append(f"collector: {result['collector_error']}")
    return "\n".join(lines)


def _row(name: str, e: dict[str, Any]) -> str:
    us = e.get("us")
    timing = f"{us:>9.1f} us" if isinstance(us, (int, float)) else " " * 12
    if "error" in e:
        shown = f"<{e['error']}>"
    elif "raw" not in e:
        shown = ""
    else:
        raw = e["raw"]
        if isinstance(raw, list) and all(isinstance(q, dict) and "pid" in q for q in raw):
            raw = f"{len(raw)} processes" + (f", pids {' '.join(str(q['pid']) for q in raw)}" if raw else "")
        shown = f"{raw} {e.get('unit', '')}".strip()
        if "value" in e and e.get("value_unit") and e.get("value_unit") != e.get("unit"):
            shown += f"  = {e['value']} {e['value_unit']}"
        elif "value" in e and isinstance(e["value"], str):
            shown += f"  ({e['value']}{' ' + ','.join(e['reasons']) if e.get('reasons') else ''})"
    return f"  {name:<58} {timing}  {shown}"
