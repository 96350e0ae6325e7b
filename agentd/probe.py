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
from collectors.nvml_counters import NVLINK_COUNTERS, recovery_action_name
from collectors.nvml_events import event_kinds, kinds_in

PROBE_VERSION = 1

_THRESHOLDS = (
    "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN",
    "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN",
    "NVML_TEMPERATURE_THRESHOLD_GPU_MAX",
    "NVML_TEMPERATURE_THRESHOLD_MEM_MAX",
)
_FIELDS = (  # (field constant, raw unit, converted unit, scale); only those the bindings have
    ("NVML_FI_DEV_POWER_INSTANT", "mW", "W", 0.001),
    ("NVML_FI_DEV_MEMORY_TEMP", "C", "C", 1.0),
    # health (issue 14): the driver's recommended action, and the perf-policy durations (ns)
    ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "enum", "action", 1.0),
    ("NVML_FI_DEV_PERF_POLICY_POWER", "ns", "ns", 1.0),
    ("NVML_FI_DEV_PERF_POLICY_THERMAL", "ns", "ns", 1.0),
    ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "ns", "ns", 1.0),
    ("NVML_FI_DEV_PERF_POLICY_RELIABILITY", "ns", "ns", 1.0),
    ("NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "count", "count", 1.0),
    ("NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "count", "count", 1.0),
    ("NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "count", "count", 1.0),
    ("NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "count", "count", 1.0),
)
_RECOVERY_FIELD = "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"
# The health calls (issue 14), in the order probed; each is one entry of a GPU's "calls", and the
# "health" section repeats their answers without the timings.
HEALTH_CALLS = (
    "nvmlDeviceGetSupportedEventTypes", "nvmlDeviceGetEccMode", "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkErrorCounter", "nvmlDeviceGetPcieReplayCounter",
)  # fmt: skip
_ECC_COUNTERS = ("CORRECTED/VOLATILE", "UNCORRECTED/VOLATILE", "CORRECTED/AGGREGATE", "UNCORRECTED/AGGREGATE")
_RETIREMENT_CAUSES = ("MULTIPLE_SINGLE_BIT_ECC_ERRORS", "DOUBLE_BIT_ECC_ERROR")
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
    known = [f for f in _FIELDS if hasattr(nv, f[0])]
    fields_entry, values = p.call("nvmlDeviceGetFieldValues", h, [getattr(nv, f[0]) for f in known])
    if values is not None:
        type_names = {getattr(nv, n): n for n in _VALUE_TYPES}
        fields: dict[str, Any] = {}
        for (fname, unit, to, scale), v in zip(known, values):
            if v.nvmlReturn != nv.NVML_SUCCESS:
                fields[fname] = {"error": p.error_name(v.nvmlReturn), "code": v.nvmlReturn}
                continue
            tname = type_names.get(v.valueType, f"unknown_{v.valueType}")
            raw = getattr(v.value, _VALUE_TYPES[tname]) if tname in _VALUE_TYPES else None
            if raw is None:
                value: Any = None
            elif fname == _RECOVERY_FIELD:
                value = recovery_action_name(raw)
            else:
                value = raw * scale
            fields[fname] = {
                "raw": raw, "value_type": tname, "unit": unit, "value": value, "value_unit": to,
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
    _probe_health(p, h, calls)
    gpu["calls"] = calls
    gpu["health"] = _health_section(calls)
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


def _probe_health(p: _Prober, h: Any, calls: dict[str, dict[str, Any]]) -> None:
    """The health calls (issue 14), read only: event types, ECC, retired pages, row remapping,
    NVLink (every link up to NVML_NVLINK_MAX_LINKS, counters for the links that are up), PCIe.

    A call asked several times (one per counter, cause or link) is one entry: ``us`` is the sum,
    and each answer sits under ``counters`` / ``causes`` / ``links``."""
    nv = p.nv

    def one(name: str, *args: Any) -> Any:
        entry, raw = p.call(name, h, *args)
        calls[name] = entry
        if "error" not in entry:
            entry["raw"] = raw
        return None if "error" in entry else raw

    def many(name: str, key: str, asks: list[tuple[str, tuple[Any, ...]]]) -> dict[str, Any]:
        """Each (sub-key, args) asked once; the answers under ``key``."""
        if getattr(nv, name, None) is None:
            calls[name] = {"error": "not_in_bindings"}
            return {}
        total_us, answers = 0.0, {}
        for sub, args in asks:
            entry, raw = p.call(name, h, *args)
            total_us += entry.pop("us", 0.0)
            if "error" not in entry:
                entry["raw"] = raw
            answers[sub] = entry
        calls[name] = {"us": round(total_us, 1), key: answers}
        return answers

    mask = one("nvmlDeviceGetSupportedEventTypes")
    if mask is not None:
        calls["nvmlDeviceGetSupportedEventTypes"]["value"] = kinds_in(int(mask), event_kinds(nv))
    mode = one("nvmlDeviceGetEccMode")
    if mode is not None:
        state = {nv.NVML_FEATURE_ENABLED: "enabled", nv.NVML_FEATURE_DISABLED: "disabled"}
        calls["nvmlDeviceGetEccMode"].update(raw=[int(x) for x in mode],
                                            value={"current": state.get(mode[0], str(mode[0])),
                                                   "pending": state.get(mode[1], str(mode[1]))})
    ecc_asks = []
    for key in _ECC_COUNTERS:
        error_type, counter_type = key.split("/")
        args = (getattr(nv, f"NVML_MEMORY_ERROR_TYPE_{error_type}"), getattr(nv, f"NVML_{counter_type}_ECC"))
        ecc_asks.append((key, args))
    many("nvmlDeviceGetTotalEccErrors", "counters", ecc_asks)
    causes = many("nvmlDeviceGetRetiredPages", "causes",
                  [(c, (getattr(nv, f"NVML_PAGE_RETIREMENT_CAUSE_{c}"),)) for c in _RETIREMENT_CAUSES])
    for answer in causes.values():
        if "raw" in answer:
            answer["raw"] = [int(a) for a in answer["raw"]]
            answer["count"] = len(answer["raw"])
    one("nvmlDeviceGetRetiredPagesPendingStatus")
    rows = one("nvmlDeviceGetRemappedRows")
    if rows is not None:
        calls["nvmlDeviceGetRemappedRows"]["raw"] = [int(x) for x in rows]
        calls["nvmlDeviceGetRemappedRows"]["order"] = ["corrected", "uncorrected", "pending", "failure"]
    links = _probe_nvlink_state(p, h, calls)
    if links:
        many("nvmlDeviceGetNvLinkErrorCounter", "links", [
            (f"{link}/{const.removeprefix('NVML_NVLINK_ERROR_')}", (link, getattr(nv, const)))
            for link in links for _, const in NVLINK_COUNTERS
        ])
    one("nvmlDeviceGetPcieReplayCounter")


def _probe_nvlink_state(p: _Prober, h: Any, calls: dict[str, dict[str, Any]]) -> list[int]:
    """Each link's state up to the first INVALID_ARGUMENT (past the GPU's last link); the links
    that are up. NOT_SUPPORTED (or any error) on link 0 is the entry's own error: no NVLink."""
    nv = p.nv
    name = "nvmlDeviceGetNvLinkState"
    if getattr(nv, name, None) is None:
        calls[name] = {"error": "not_in_bindings"}
        return []
    total_us, answers, up = 0.0, {}, []
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 0)):
        entry, raw = p.call(name, h, link)
        total_us += entry.get("us", 0.0)
        if "error" in entry:
            if link == 0:
                calls[name] = entry
                return []
            if entry.get("code") == nv.NVML_ERROR_INVALID_ARGUMENT:
                break
            entry.pop("us", None)
            answers[str(link)] = entry
            continue
        answers[str(link)] = {"raw": raw}
        if raw == nv.NVML_FEATURE_ENABLED:
            up.append(link)
    calls[name] = {"us": round(total_us, 1), "links": answers, "up": up}
    return up


def _health_section(calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per health call (and health field): its answer without the timing, or ``{"error": ..}``."""

    def bare(e: Any) -> Any:
        if isinstance(e, dict):
            if "error" in e:
                return {"error": e["error"]}
            if set(e) <= {"us", "raw", "count"}:
                return e.get("count", e.get("raw"))
            return {k: bare(v) for k, v in e.items() if k not in ("us", "unit", "code")}
        return e

    out: dict[str, Any] = {name: bare(calls[name]) for name in HEALTH_CALLS if name in calls}
    fields = calls.get("nvmlDeviceGetFieldValues", {}).get("fields", {})
    for fname, *_ in _FIELDS[2:]:
        if fname in fields:
            e = fields[fname]
            out[fname] = {"error": e["error"]} if "error" in e else e["value"]
    return out


def _add_collector_view(nv: Any, result: dict[str, Any]) -> None:
    """What NvmlBackend makes of the same GPUs: one sample each, the readers it dropped, and the
    NVML event kinds its event thread registered on each GPU."""
    backend = NvmlBackend(nv, event_wait_ms=50)  # a short wait: close() waits for the event thread
    try:
        backend.open()
        t0 = time.perf_counter_ns()
        samples = backend.sample(time.time_ns())
        result["timing_us"]["collector_sample_all_gpus"] = round((time.perf_counter_ns() - t0) / 1000, 1)
        for s in samples:
            if s.index < len(result["gpus"]):
                sample = dataclasses.asdict(s)
                sample["pids"] = list(s.pids)
                sample["nvlink"] = [link._asdict() for link in s.nvlink] if s.nvlink is not None else None
                result["gpus"][s.index]["collector"] = {
                    "sample": sample,
                    "unsupported": sorted(backend.unsupported(s.index)),
                    "events_watched": backend.event_watch().get(s.index, []),
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
            elif any(k in e for k in _MANY):
                lines.extend(_many_rows(name, e))
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
            lines.append(f"  collector: unsupported {', '.join(col['unsupported']) or 'none'}; "
                         f"events watched {', '.join(col.get('events_watched') or []) or 'none'}")
    if "collector_error" in result:
        lines.append(f"collector: {result['collector_error']}")
    return "\n".join(lines)


_MANY = ("counters", "causes", "links")  # entries of a call asked once per counter / cause / link


def _many_rows(name: str, e: dict[str, Any]) -> list[str]:
    """A call asked several times: its total time, then the answers (one line per NVLink)."""
    key = next(k for k in _MANY if k in e)
    rows = [_row(name, {k: v for k, v in e.items() if k not in (key, "up")})]

    def shown(v: dict[str, Any]) -> str:
        return f"<{v['error']}>" if "error" in v else str(v.get("count", v.get("raw")))

    groups: dict[str, list[str]] = {}
    for sub, v in e[key].items():
        link, sep, what = sub.partition("/")
        if key == "links":
            label = f"link {link}"
            groups.setdefault(label, []).append(f"{what}={shown(v)}" if sep else shown(v))
        else:
            groups.setdefault("", []).append(f"{sub}={shown(v)}")
    for label, parts in groups.items():
        rows.append(f"    {label + ': ' if label else ''}{' '.join(parts)}")
    if "up" in e:
        rows.append(f"    up: {' '.join(map(str, e['up'])) or 'none'}")
    return rows


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
        elif isinstance(e.get("value"), list):  # the event kinds of a type mask
            shown += f"  ({', '.join(map(str, e['value'])) or 'none'})"
        elif isinstance(e.get("value"), dict):  # ECC mode: current / pending
            shown += f"  ({', '.join(f'{k} {v}' for k, v in e['value'].items())})"
    return f"  {name:<58} {timing}  {shown}"
