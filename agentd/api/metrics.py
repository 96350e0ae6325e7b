"""GET /metrics: the node in the Prometheus text format (issue 11, item 4; docs/prometheus.md).

Why it is built this way:

- The tick takes a snapshot of plain values (``MetricsInput``, built by
  ``metrics_input_from_daemon`` at the end of a tick, on the loop) and a scrape renders the last
  snapshot (``render_metrics``). A scrape never touches NVML, the store's SQLite or the rule
  engine, and a tick pays only for copying a few values, not for formatting text that nobody may
  ask for.
- Rendering goes through prometheus_client (a custom collector yielding metric families into a
  private ``CollectorRegistry``, then ``generate_latest``): the escaping of label values (a GPU
  model or a coolant loop name comes from outside) and the number formatting are the library's,
  not ours. No global registry: the process's own ``REGISTRY`` (GC, platform collectors) is not
  exposed, and two daemons in one process (tests) never share state.
- Names follow the Prometheus and node_exporter rules: the ``agentd_`` namespace, base units in
  the name (``_watts``, ``_joules``, ``_celsius``, ``_seconds``, ``_bytes``, ``_hertz``,
  ``_pascals``, ``_cubic_meters_per_second``, ``_ratio`` for 0-1), ``_total`` on counters,
  ``_info`` on info metrics, lower-case label names. A value the node does not have (``None``:
  an unsupported NVML field, a coolant field nobody publishes) has no series at all, never a 0.
- No ``host`` label: Prometheus attaches ``instance`` (and ``job``) to every series it scrapes,
  as it does for node_exporter; a second host label could disagree with it after relabelling.
  The node's configured name is one series, ``agentd_node_info{node, site}``, to join on.
- ``dcgm_compat`` adds dcgm-exporter's names, units and labels (``gpu``, ``UUID``, ``device``,
  ``modelName``, ``Hostname``, ``DCGM_FI_DRIVER_VERSION``) beside ours, so dashboards and alerts
  written for dcgm-exporter keep working. Those names break the Prometheus naming rules on
  purpose (upper case, counters without ``_total``, camelCase labels): they are dcgm-exporter's.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

import agentd
from agentd.store import StoreError
from collectors.base import GpuInfo, GpuSample, nvlink_totals
from collectors.coolant_spec import LEAK_WORDS, NUMERIC_FIELDS
from collectors.nvml import NvmlBackend

if TYPE_CHECKING:
    from agentd.daemon import Daemon

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what the GET /metrics response carries

# The throttle states of GET /v1/throttle (issue 11), each a series of agentd_throttle_state so
# a state that is not current reads 0 rather than vanishing. A state outside this list (a newer
# API) is emitted too.
THROTTLE_STATES = ("ok", "degraded", "throttled", "drain", "critical")
HEALTH_LEVELS = {"ok": 0, "warn": 1, "fail": 2}  # GpuSample.health -> agentd_gpu_health
LEAK_STATES = tuple(w.lower() for w in LEAK_WORDS)  # Redfish LeakDetector states, lower-cased

# GpuSample fields that a backend reads only now and then (the energy counter at most every
# 0.5 s, the health counters as often as they can change): None on most ticks means "not read
# this tick", not "gone". The snapshot keeps the last value seen per GPU (by UUID) so a counter
# does not vanish from the scrapes that land on the ticks between two reads.
HELD_FIELDS = (
    "energy_j", "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate",
    "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending", "remap_correctable_rows",
    "remap_uncorrectable_rows", "remap_pending", "remap_failure", "pcie_replay", "nvlink",
    "recovery_action", "throttle_power_ns", "throttle_thermal_ns", "throttle_board_limit_ns",
    "throttle_reliability_ns",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class GpuLimits:
    """What the actuator holds for one GPU (agentd.actuator.GpuControl), copied at the tick."""

    set_w: float | None = None  # what agentd wrote and the GPU still holds; None: agentd holds none
    target_w: float | None = None  # what composition asks for, clamped, written or not (dry run)
    externally_limited: bool = False  # something outside agentd holds the GPU below our target


@dataclass(frozen=True, slots=True)
class RuleState:
    """One rule instance (rules.engine.Instance) as plain values; ``gpu`` None for node rules."""

    rule: str
    gpu: int | None
    state: str  # inactive | pending | firing
    severity: str


@dataclass(frozen=True, slots=True)
class CoolantLoop:
    """One coolant loop as the node's rules see it (collectors.coolant_state.LoopView).

    ``values``: canonical field (``supply_temp_c``, ``flow_lpm``...) -> the worrying end over the
    loop's good sensors; a field no good sensor reports is left out. ``leak``: the worst good leak
    state (a Redfish word: OK/Warning/Critical/Unavailable/Absent) or None.
    """

    loop: str
    values: Mapping[str, float]
    leak: str | None = None
    degraded: bool = False
    series: int = 0


@dataclass(frozen=True, slots=True)
class AgentStats:
    """The daemon's own figures. ``None`` where the part is not configured (no forwarder, no MQTT)."""

    tick_s: float = 0.0
    tick_lag_s: float = 0.0
    ticks: int = 0
    ticks_missed: int = 0
    nvml_errors: int = 0
    rule_errors: int = 0
    store_errors: int = 0
    limit_write_errors: int = 0
    store_backlog_points: int = 0
    store_bytes: int | None = None  # None when the store could not say (a failing disk)
    store_dropped_points: int = 0
    store_quarantined_points: int = 0
    forward_points: int | None = None  # points InfluxDB accepted since start
    forward_errors: int | None = None  # failed or refused write requests since start
    forward_last_success_unix_s: float | None = None  # the tick that first saw forward_points grow
    mqtt_connected: bool | None = None


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str
    python: str
    driver: str | None = None  # the NVIDIA driver, when the backend is NVML


def _build_info(driver: str | None = None) -> BuildInfo:
    return BuildInfo(agentd.__version__, platform.python_version(), driver)


@dataclass(frozen=True, slots=True)
class MetricsInput:
    """Everything GET /metrics shows, as plain values taken at the end of one tick.

    ``gpus`` are the latest samples (one per GPU, by index); ``infos`` the static envelopes;
    ``limits`` the actuator's per-GPU state; ``held`` the last value of each ``HELD_FIELDS``
    field per GPU UUID (see there). Nothing here is read again after the snapshot is built.
    """

    host: str
    site: str = ""
    ts_ns: int = 0  # wall clock when the snapshot was taken
    gpus: tuple[GpuSample, ...] = ()
    infos: Mapping[int, GpuInfo] = field(default_factory=dict)
    limits: Mapping[int, GpuLimits] = field(default_factory=dict)
    rules: tuple[RuleState, ...] = ()
    throttle_level: int | None = None
    throttle_state: str | None = None
    coolant: tuple[CoolantLoop, ...] = ()
    agent: AgentStats = field(default_factory=AgentStats)
    build: BuildInfo = field(default_factory=_build_info)
    held: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the snapshot


def _held(samples: tuple[GpuSample, ...], previous: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The last value of every HELD_FIELDS field per UUID: this tick's where read, else the
    previous snapshot's. A GPU no longer present is dropped (a swapped board starts afresh)."""
    out: dict[str, Mapping[str, Any]] = {}
    for s in samples:
        before = previous.get(s.uuid)
        now = {f: v for f in HELD_FIELDS if (v := getattr(s, f, None)) is not None}
        out[s.uuid] = now if before is None else ({**before, **now} if now else before)
    return out


def metrics_input_from_daemon(daemon: Daemon, throttle_level: int | None, throttle_state: str | None, *,
                              previous: MetricsInput | None = None) -> MetricsInput:
    """The snapshot of a running daemon, for ``render_metrics``.

    Call it on the event loop at the end of a tick (a plain read of the daemon's attributes, no
    lock: nothing else runs on the loop meanwhile) and keep the result until the next tick.
    Pass the previous snapshot as ``previous``: it carries the counters a backend reads only
    now and then (``HELD_FIELDS``) and dates the last successful forward. ``throttle_level``
    and ``throttle_state`` are the throttle API's (the caller computes them once per tick).
    """
    wall_ns = daemon.clock.wall_ns()
    samples = tuple(sorted(daemon.state.gpus.values(), key=lambda s: s.index))
    limits = {i: GpuLimits(c.set_w, c.target_w, c.externally_limited) for i, c in daemon.actuator.controls.items()}
    rules: tuple[RuleState, ...] = ()
    if daemon.controller is not None:
        rules = tuple(RuleState(i.rule, i.gpu, str(i.state), str(i.severity))
                      for i in daemon.controller.engine.states.values())
    coolant = tuple(
        CoolantLoop(name, {f: v for f in NUMERIC_FIELDS if (v := view.worst(f)) is not None},
                    view.leak, view.degraded, view.series)
        for name, view in daemon.state.coolant.loops(daemon.clock.monotonic()).items())
    store = daemon.store
    try:
        store_bytes: int | None = store.size_bytes()
    except StoreError:  # the tick logs and counts store failures; the metrics just lack the size
        store_bytes = None
    fw = daemon.forwarder
    written = fw.written if fw is not None else None
    last_ok = previous.agent.forward_last_success_unix_s if previous is not None else None
    before = previous.agent.forward_points if previous is not None else None
    if written is not None and before is not None and written > before:
        last_ok = wall_ns / 1e9
    stats = daemon.stats
    agent = AgentStats(
        tick_s=stats.tick_s, tick_lag_s=stats.tick_lag_s, ticks=stats.ticks, ticks_missed=stats.ticks_missed,
        nvml_errors=stats.nvml_errors, rule_errors=stats.rule_errors, store_errors=stats.store_errors,
        limit_write_errors=daemon.actuator.write_errors, store_backlog_points=store.backlog(),
        store_bytes=store_bytes, store_dropped_points=store.dropped, store_quarantined_points=store.quarantined_count,
        forward_points=written, forward_errors=fw.write_errors if fw is not None else None,
        forward_last_success_unix_s=last_ok,
        mqtt_connected=daemon.mqtt.connected if daemon.mqtt is not None else None)
    backend = daemon.backend
    driver = backend.driver_version if isinstance(backend, NvmlBackend) else None
    return MetricsInput(
        host=daemon.host, site=daemon.cfg.site, ts_ns=wall_ns, gpus=samples, infos=dict(daemon.state.infos),
        limits=limits, rules=rules, throttle_level=throttle_level, throttle_state=throttle_state,
        coolant=coolant, agent=agent, build=_build_info(driver),
        held=_held(samples, previous.held if previous is not None else {}))


# ------------------------------------------------------------------------------- the metrics

Convert = Callable[[Any], float]


def _num(v: Any) -> float:
    """A reading as a sample value (bools as 0/1)."""
    return float(v)


def _pct_to_ratio(v: Any) -> float:
    return v / 100.0


def _mhz_to_hz(v: Any) -> float:
    return v * 1e6


def _kpa_to_pa(v: Any) -> float:
    return round(v * 1000.0, 6)


def _lpm_to_m3s(v: Any) -> float:
    return v / 60_000.0


def _bytes_to_mib(v: Any) -> float:
    return v / 1_048_576


def _j_to_mj(v: Any) -> float:
    return round(v * 1000.0)


GPU_LABELS = ("gpu", "uuid", "model")

# Per-GPU gauges read from the sample: (name, help, GpuSample field, conversion).
_GPU_GAUGES: tuple[tuple[str, str, str, Convert], ...] = (
    ("agentd_gpu_power_watts", "Instantaneous board power draw (NVML_FI_DEV_POWER_INSTANT), in watts.",
     "power_w", _num),
    ("agentd_gpu_power_average_watts", "Board power draw averaged by the driver over ~1 s "
     "(nvmlDeviceGetPowerUsage), in watts.", "power_avg_w", _num),
    ("agentd_gpu_power_limit_watts", "Power limit the GPU enforces now, all limiters included, in watts.",
     "limit_w", _num),
    ("agentd_gpu_temperature_celsius", "GPU core temperature, in degrees Celsius.", "temp_c", _num),
    ("agentd_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature, in degrees Celsius.",
     "mem_temp_c", _num),
    ("agentd_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU (0-1).",
     "util_pct", _pct_to_ratio),
    ("agentd_gpu_memory_utilization_ratio", "Fraction of the last sample period GPU memory was read or "
     "written (0-1).", "mem_util_pct", _pct_to_ratio),
    ("agentd_gpu_memory_used_bytes", "GPU memory allocated, in bytes.", "mem_used_bytes", _num),
    ("agentd_gpu_sm_clock_hertz", "SM clock, in hertz.", "sm_clock_mhz", _mhz_to_hz),
    ("agentd_gpu_clock_event_reasons", "Clocks-event reasons bitmask (NVML nvmlClocksEventReason*).",
     "clock_reasons", _num),
)

# Per-GPU envelopes: the sample's value, else the GpuInfo read at start.
_GPU_ENVELOPES: tuple[tuple[str, str, str], ...] = (
    ("agentd_gpu_power_limit_min_watts", "Lowest power limit the GPU accepts, in watts.", "limit_min_w"),
    ("agentd_gpu_power_limit_max_watts", "Highest power limit the GPU accepts, in watts.", "limit_max_w"),
    ("agentd_gpu_power_limit_default_watts", "The GPU's default power limit, in watts.", "limit_default_w"),
    ("agentd_gpu_slowdown_temperature_celsius", "Temperature at which the hardware slows the GPU down, "
     "in degrees Celsius.", "slowdown_c"),
    ("agentd_gpu_shutdown_temperature_celsius", "Temperature at which the hardware shuts the GPU down, "
     "in degrees Celsius.", "shutdown_c"),
)

# Per-GPU counters kept in the snapshot (HELD_FIELDS): (name, help, field, extra label or None).
_GPU_COUNTERS: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...] = (
    ("agentd_gpu_energy_joules_total", "Energy the GPU consumed since the driver was loaded, in joules.",
     (("energy_j", "", ""),)),
    ("agentd_gpu_ecc_errors_total", "ECC errors since the driver was loaded (volatile), by type.",
     (("ecc_sbe_volatile", "type", "corrected"), ("ecc_dbe_volatile", "type", "uncorrected"))),
    ("agentd_gpu_ecc_aggregate_errors_total", "ECC errors over the board's life (aggregate), by type.",
     (("ecc_sbe_aggregate", "type", "corrected"), ("ecc_dbe_aggregate", "type", "uncorrected"))),
    ("agentd_gpu_retired_pages_total", "Memory pages retired (pre-Ampere), by the error type that caused it.",
     (("retired_pages_sbe", "cause", "corrected"), ("retired_pages_dbe", "cause", "uncorrected"))),
    ("agentd_gpu_remapped_rows_total", "Memory rows remapped (Ampere and later), by the error type that "
     "caused it.", (("remap_correctable_rows", "cause", "corrected"),
                    ("remap_uncorrectable_rows", "cause", "uncorrected"))),
    ("agentd_gpu_pcie_replays_total", "PCIe replays (retries) since the driver was loaded.",
     (("pcie_replay", "", ""),)),
)

# How long each limiter held the clocks below the application clocks since the driver loaded
# (NVML's perf-policy violation counters): (GpuSample field in ns, reason label).
_GPU_THROTTLE_NS: tuple[tuple[str, str], ...] = (
    ("throttle_power_ns", "power"), ("throttle_thermal_ns", "thermal"),
    ("throttle_board_limit_ns", "board_limit"), ("throttle_reliability_ns", "reliability"),
)


# Per-GPU 0/1 flags kept in the snapshot.
_GPU_HELD_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("agentd_gpu_retired_pages_pending", "1 when a page retirement waits for the next GPU reset (pre-Ampere).",
     "retired_pages_pending"),
    ("agentd_gpu_row_remap_pending", "1 when a row remap waits for the next GPU reset.", "remap_pending"),
    ("agentd_gpu_row_remap_failed", "1 when a row remap failed: the GPU has run out of spare rows.",
     "remap_failure"),
)


# Coolant: canonical field -> (name, help, conversion), per loop.
_COOLANT: tuple[tuple[str, str, str, Convert], ...] = (
    ("supply_temp_c", "agentd_coolant_supply_temperature_celsius", "Coolant supply temperature, in degrees "
     "Celsius (the hottest good sensor of the loop).", _num),
    ("return_temp_c", "agentd_coolant_return_temperature_celsius", "Coolant return temperature, in degrees "
     "Celsius (the hottest good sensor of the loop).", _num),
    ("delta_temp_c", "agentd_coolant_delta_temperature_celsius", "Return minus supply temperature, in "
     "degrees Celsius (the largest of the loop).", _num),
    ("flow_lpm", "agentd_coolant_flow_cubic_meters_per_second", "Coolant flow, in cubic meters per second "
     "(1 L/min = 1/60000 m3/s; the lowest good sensor of the loop).", _lpm_to_m3s),
    ("supply_pressure_kpa", "agentd_coolant_supply_pressure_pascals", "Coolant supply pressure, in pascals "
     "(the highest good sensor of the loop).", _kpa_to_pa),
    ("return_pressure_kpa", "agentd_coolant_return_pressure_pascals", "Coolant return pressure, in pascals "
     "(the lowest good sensor of the loop).", _kpa_to_pa),
    ("delta_pressure_kpa", "agentd_coolant_delta_pressure_pascals", "Supply minus return pressure, in "
     "pascals (the lowest good sensor of the loop).", _kpa_to_pa),
    ("pump_speed_pct", "agentd_coolant_pump_speed_ratio", "Pump speed as a fraction of full speed (0-1; the "
     "lowest good sensor of the loop).", _pct_to_ratio),
    ("valve_position_pct", "agentd_coolant_valve_position_ratio", "Valve opening as a fraction (0-1; the "
     "lowest good sensor of the loop).", _pct_to_ratio),
)

# dcgm-exporter's names (etc/default-counters.csv, DCGM field ids where the csv has none), with
# their help text, units and types: (name, help, field, conversion).
_DCGM_GAUGES: tuple[tuple[str, str, str, Convert], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz", _num),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "mem_temp_c", _num),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temp_c", _num),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_avg_w", _num),
    ("DCGM_FI_DEV_POWER_USAGE_INSTANT", "Current instantaneous power usage of the device in Watts",
     "power_w", _num),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "util_pct", _num),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "mem_util_pct", _num),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "mem_used_bytes", _bytes_to_mib),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Current Power limit for the device", "limit_current_w", _num),
    ("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "Effective power limit that the driver enforces after taking into "
     "account all limiters", "limit_w", _num),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", "xid_last", _num),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed", "remap_failure", _num),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "Whether remapping of rows is pending", "remap_pending", _num),
)
_DCGM_COUNTERS: tuple[tuple[str, str, str, Convert], ...] = (
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).", "energy_j", _j_to_mj),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries.", "pcie_replay", _num),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.", "ecc_sbe_volatile", _num),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", "ecc_dbe_volatile", _num),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors.", "ecc_sbe_aggregate",
     _num),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors.", "ecc_dbe_aggregate",
     _num),
    ("DCGM_FI_DEV_RETIRED_SBE", "Total number of retired pages due to single-bit errors.", "retired_pages_sbe",
     _num),
    ("DCGM_FI_DEV_RETIRED_DBE", "Total number of retired pages due to double-bit errors.", "retired_pages_dbe",
     _num),
    ("DCGM_FI_DEV_RETIRED_PENDING", "Total number of pages pending retirement.", "retired_pages_pending", _num),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors",
     "remap_uncorrectable_rows", _num),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors",
     "remap_correctable_rows", _num),
)
# NVLink totals over the GPU's links: (name, help, NvlinkErrors counter).
_DCGM_NVLINK: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "Total number of NVLink flow-control CRC errors.", "crc_flit"),
    ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "Total number of NVLink data CRC errors.", "crc_data"),
    ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "Total number of NVLink retries.", "replay"),
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "Total number of NVLink recovery errors.", "recovery"),
)
DCGM_COUNTER_NAMES = tuple(n for n, *_ in _DCGM_COUNTERS) + tuple(n for n, *_ in _DCGM_NVLINK)


class _Gpu:
    """One GPU's label values and where each of its values comes from."""

    __slots__ = ("held", "info", "labels", "sample")

    def __init__(self, index: int, sample: GpuSample | None, info: GpuInfo | None,
                 held: Mapping[str, Mapping[str, Any]]) -> None:
        self.sample = sample
        self.info = info
        src: GpuSample | GpuInfo | None = sample if sample is not None else info
        uuid = src.uuid if src is not None else ""
        self.labels = [str(index), uuid, src.model if src is not None else ""]
        # Counters show only with a reading: never for a GPU not read yet, nor a lost one.
        self.held: Mapping[str, Any] = held.get(uuid, {}) if sample is not None and sample.healthy else {}

    def value(self, name: str) -> Any:
        """The sample's value of ``name``, else the one held from an earlier tick."""
        v = getattr(self.sample, name, None) if self.sample is not None else None
        return self.held.get(name) if v is None else v


class MetricsCollector(Collector):
    """Yields the metric families of one snapshot (prometheus_client's custom-collector protocol)."""

    def __init__(self, inp: MetricsInput, *, dcgm_compat: bool = False) -> None:
        self.inp = inp
        self.dcgm_compat = dcgm_compat

    def collect(self) -> Iterator[Metric]:
        inp = self.inp
        by_index = {s.index: s for s in inp.gpus}
        gpus = [_Gpu(i, by_index.get(i), inp.infos.get(i), inp.held)
                for i in sorted(by_index.keys() | inp.infos.keys())]
        yield from self._node()
        yield from self._gpus(gpus)
        yield from self._rules()
        yield from self._coolant()
        yield from self._agent()
        if self.dcgm_compat:
            yield from self._dcgm(gpus)

    # -- node --------------------------------------------------------------------------------

    def _node(self) -> Iterator[Metric]:
        inp = self.inp
        b = inp.build
        yield InfoMetricFamily("agentd_build", "agentd's version, the Python it runs on and the NVIDIA driver "
                               "(empty when not NVML).",
                               value={"version": b.version, "python": b.python, "driver": b.driver or ""})
        yield InfoMetricFamily("agentd_node", "The node name agentd reports as (the host tag of its InfluxDB "
                               "points) and its site.", value={"node": inp.host, "site": inp.site})
        if inp.ts_ns:
            yield GaugeMetricFamily("agentd_last_tick_timestamp_seconds", "Wall clock at the end of the tick "
                                    "these values come from, in seconds since the epoch.", value=inp.ts_ns / 1e9)
        if inp.throttle_level is not None:
            yield GaugeMetricFamily("agentd_throttle_level", "The node's throttle level (GET /v1/throttle; "
                                    "higher is worse).", value=inp.throttle_level)
        if inp.throttle_state is not None:
            fam = GaugeMetricFamily("agentd_throttle_state", "1 for the node's throttle state (GET /v1/throttle), "
                                    "0 for the others.", labels=["state"])
            states: tuple[str, ...] = THROTTLE_STATES
            if inp.throttle_state not in states:
                states = (*states, inp.throttle_state)
            for state in states:
                fam.add_metric([state], 1.0 if state == inp.throttle_state else 0.0)
            yield fam

    # -- GPUs --------------------------------------------------------------------------------

    def _gpus(self, gpus: list[_Gpu]) -> Iterator[Metric]:
        limits = self.inp.limits
        up = GaugeMetricFamily("agentd_gpu_up", "1 when the GPU answered at its last reading, 0 when it could "
                               "not be read (lost, driver error).", labels=GPU_LABELS)
        ts = GaugeMetricFamily("agentd_gpu_last_sample_timestamp_seconds", "Wall clock of the GPU's last "
                               "reading, in seconds since the epoch.", labels=GPU_LABELS)
        for g in gpus:
            if g.sample is not None:
                up.add_metric(g.labels, 1.0 if g.sample.healthy else 0.0)
                ts.add_metric(g.labels, g.sample.ts_ns / 1e9)
        yield from _nonempty(up, ts)
        for name, doc, attr, conv in _GPU_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for g in gpus:
                v = getattr(g.sample, attr) if g.sample is not None else None
                if v is not None:
                    fam.add_metric(g.labels, conv(v))
            yield from _nonempty(fam)
        throttled = GaugeMetricFamily("agentd_gpu_throttled", "1 when a power, thermal or reliability reason "
                                      "holds the clocks down (idle and application clocks excluded).",
                                      labels=GPU_LABELS)
        for g in gpus:
            t = g.sample.throttled if g.sample is not None else None
            if t is not None:
                throttled.add_metric(g.labels, _num(t))
        yield from _nonempty(throttled)
        for name, doc, attr in _GPU_ENVELOPES:
            fam = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for g in gpus:
                v = getattr(g.sample, attr) if g.sample is not None else None
                if v is None and g.info is not None:
                    v = getattr(g.info, attr)
                if v is not None:
                    fam.add_metric(g.labels, float(v))
            yield from _nonempty(fam)
        set_w = GaugeMetricFamily("agentd_gpu_power_limit_set_watts", "The power limit agentd wrote and the GPU "
                                  "still holds, in watts (absent when agentd holds none).", labels=GPU_LABELS)
        target = GaugeMetricFamily("agentd_gpu_power_limit_target_watts", "The power limit agentd's rules, "
                                   "leases and budget ask for, clamped to the GPU's range, in watts (written or "
                                   "not: a dry run only reports it).", labels=GPU_LABELS)
        external = GaugeMetricFamily("agentd_gpu_externally_limited", "1 when something outside agentd holds the "
                                     "GPU's limit below agentd's target.", labels=GPU_LABELS)
        for g in gpus:
            lim = limits.get(int(g.labels[0]))
            if lim is None:
                continue
            if lim.set_w is not None:
                set_w.add_metric(g.labels, lim.set_w)
            if lim.target_w is not None:
                target.add_metric(g.labels, lim.target_w)
            external.add_metric(g.labels, _num(lim.externally_limited))
        yield from _nonempty(set_w, target, external)
        yield from self._health(gpus)

    def _health(self, gpus: list[_Gpu]) -> Iterator[Metric]:
        for name, doc, parts in _GPU_COUNTERS:
            extra = [p[1] for p in parts if p[1]][:1]
            fam = CounterMetricFamily(name, doc, labels=[*GPU_LABELS, *extra])
            for g in gpus:
                for attr, _, label_value in parts:
                    v = g.value(attr)
                    if v is not None:
                        fam.add_metric([*g.labels, label_value] if extra else g.labels, _num(v))
            yield from _nonempty(fam)
        # Summed over the GPU's links (18 on a Hopper board): per-link series would be 72 a GPU.
        nvlink = CounterMetricFamily("agentd_gpu_nvlink_errors_total", "NVLink errors since the driver was loaded, "
                                     "summed over the GPU's links, by type.", labels=[*GPU_LABELS, "type"])
        for g in gpus:
            for kind, total in nvlink_totals(g.value("nvlink") or ()).items():
                nvlink.add_metric([*g.labels, kind], float(total))
        throttle = CounterMetricFamily("agentd_gpu_throttle_seconds_total", "Time a limiter held the clocks below "
                                       "the application clocks since the driver was loaded, by reason, in seconds.",
                                       labels=[*GPU_LABELS, "reason"])
        for g in gpus:
            for attr, reason in _GPU_THROTTLE_NS:
                v = g.value(attr)
                if v is not None:
                    throttle.add_metric([*g.labels, reason], v / 1e9)
        action = GaugeMetricFamily("agentd_gpu_recovery_action", "The recovery action the driver recommends now "
                                   "(none, reset_gpu, reboot, drain_p2p, drain_and_reset), as a label; value 1.",
                                   labels=[*GPU_LABELS, "action"])
        for g in gpus:
            now = g.value("recovery_action")
            if now is not None:
                action.add_metric([*g.labels, str(now)], 1.0)
        yield from _nonempty(nvlink, throttle, action)
        for name, doc, attr in _GPU_HELD_FLAGS:
            flag = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for g in gpus:
                v = g.value(attr)
                if v is not None:
                    flag.add_metric(g.labels, _num(v))
            yield from _nonempty(flag)
        xid = GaugeMetricFamily("agentd_gpu_last_xid", "The last Xid the driver reported for the GPU since agentd "
                                "started (absent when none).", labels=GPU_LABELS)
        health = GaugeMetricFamily("agentd_gpu_health", "The GPU's health as agentd judges it: 0 ok, 1 warn, "
                                   "2 fail.", labels=GPU_LABELS)
        for g in gpus:
            s = g.sample
            v = getattr(s, "xid_last", None) if s is not None else None
            if v is not None:
                xid.add_metric(g.labels, _num(v))
            level = HEALTH_LEVELS.get(getattr(s, "health", None) or "") if s is not None else None
            if level is not None:
                health.add_metric(g.labels, float(level))
        yield from _nonempty(xid, health)

    # -- rules -------------------------------------------------------------------------------

    def _rules(self) -> Iterator[Metric]:
        rules = self.inp.rules
        if not rules:
            return
        labels = ["rule", "gpu", "severity"]
        firing = GaugeMetricFamily("agentd_rule_firing", "1 while the rule instance fires, else 0; one series "
                                   "per instance (gpu is empty for node and coolant rules).", labels=labels)
        state = GaugeMetricFamily("agentd_rule_state", "1 for each rule instance that is pending or firing, "
                                  "like Prometheus' ALERTS (inactive instances have no series).",
                                  labels=[*labels, "state"])
        for r in rules:
            values = [r.rule, "" if r.gpu is None else str(r.gpu), r.severity]
            firing.add_metric(values, 1.0 if r.state == "firing" else 0.0)
            if r.state != "inactive":
                state.add_metric([*values, r.state], 1.0)
        yield from _nonempty(firing, state)

    # -- coolant -----------------------------------------------------------------------------

    def _coolant(self) -> Iterator[Metric]:
        loops = self.inp.coolant
        if not loops:
            return
        for key, name, doc, conv in _COOLANT:
            fam = GaugeMetricFamily(name, doc, labels=["loop"])
            for lp in loops:
                v = lp.values.get(key)
                if v is not None:
                    fam.add_metric([lp.loop], conv(v))
            yield from _nonempty(fam)
        leak = GaugeMetricFamily("agentd_coolant_leak", "1 for the loop's worst leak detector state (Redfish "
                                 "LeakDetector, lower-cased), 0 for the others.", labels=["loop", "state"])
        degraded = GaugeMetricFamily("agentd_coolant_degraded", "1 when a sensor the node depends on in this loop "
                                     "is stale, of bad quality or unavailable.", labels=["loop"])
        series = GaugeMetricFamily("agentd_coolant_series", "Coolant series (site/loop/unit/point) seen in this "
                                   "loop.", labels=["loop"])
        for lp in loops:
            if lp.leak is not None:
                now = lp.leak.lower()
                for st in LEAK_STATES if now in LEAK_STATES else (*LEAK_STATES, now):
                    leak.add_metric([lp.loop, st], 1.0 if st == now else 0.0)
            degraded.add_metric([lp.loop], _num(lp.degraded))
            series.add_metric([lp.loop], float(lp.series))
        yield from _nonempty(leak, degraded, series)

    # -- the agent itself --------------------------------------------------------------------

    def _agent(self) -> Iterator[Metric]:
        a = self.inp.agent
        yield GaugeMetricFamily("agentd_tick_duration_seconds", "How long the last tick took, in seconds.",
                                value=a.tick_s)
        yield GaugeMetricFamily("agentd_tick_lag_seconds", "How late the last tick started against its "
                                "schedule, in seconds.", value=a.tick_lag_s)
        yield CounterMetricFamily("agentd_ticks_total", "Ticks run since start.", value=a.ticks)
        yield CounterMetricFamily("agentd_ticks_missed_total", "Tick slots skipped because a tick overran.",
                                  value=a.ticks_missed)
        yield CounterMetricFamily("agentd_nvml_errors_total", "GPU readings that failed or timed out (a GPU or "
                                  "the whole backend).", value=a.nvml_errors)
        yield CounterMetricFamily("agentd_rule_errors_total", "Rule evaluations that raised.", value=a.rule_errors)
        yield CounterMetricFamily("agentd_store_errors_total", "Local store operations that failed.",
                                  value=a.store_errors)
        yield CounterMetricFamily("agentd_limit_write_errors_total", "Power-limit writes the GPUs refused.",
                                  value=a.limit_write_errors)
        yield GaugeMetricFamily("agentd_store_backlog_points", "Points in the local store waiting to be shipped "
                                "(or, with no InfluxDB, held).", value=a.store_backlog_points)
        if a.store_bytes is not None:
            yield GaugeMetricFamily("agentd_store_bytes", "Bytes the local store holds (database pages in use and "
                                    "WAL).", value=a.store_bytes)
        yield CounterMetricFamily("agentd_store_dropped_points_total", "Points the store deleted for its size bound "
                                  "or a full disk (persisted across restarts).", value=a.store_dropped_points)
        yield GaugeMetricFamily("agentd_store_quarantined_points", "Points held in the store's quarantine (refused "
                                "by InfluxDB with a 4xx).", value=a.store_quarantined_points)
        if a.forward_points is not None:
            yield CounterMetricFamily("agentd_forward_points_total", "Points InfluxDB accepted since start.",
                                      value=a.forward_points)
        if a.forward_errors is not None:
            yield CounterMetricFamily("agentd_forward_errors_total", "InfluxDB write requests that failed or were "
                                      "refused since start.", value=a.forward_errors)
        if a.forward_last_success_unix_s is not None:
            yield GaugeMetricFamily("agentd_forward_last_success_timestamp_seconds", "Wall clock of the tick that "
                                    "first saw InfluxDB accept new points, in seconds since the epoch.",
                                    value=a.forward_last_success_unix_s)
        if a.mqtt_connected is not None:
            yield GaugeMetricFamily("agentd_mqtt_connected", "1 while the MQTT link is connected.",
                                    value=_num(a.mqtt_connected))

    # -- dcgm-exporter compatibility ---------------------------------------------------------

    def _dcgm(self, gpus: list[_Gpu]) -> Iterator[Metric]:
        host = self.inp.host
        driver = self.inp.build.driver
        labels = []
        for g in gpus:
            lab = {"gpu": g.labels[0], "UUID": g.labels[1], "device": f"nvidia{g.labels[0]}",
                   "modelName": g.labels[2], "Hostname": host}
            if driver:
                lab["DCGM_FI_DRIVER_VERSION"] = driver
            labels.append(lab)
        for name, doc, attr, conv in _DCGM_GAUGES:
            fam = Metric(name, doc, "gauge")
            for g, lab in zip(gpus, labels, strict=True):
                v = g.value(attr) if g.sample is not None else None
                if v is not None:
                    fam.add_sample(name, lab, conv(v))
            yield from _nonempty(fam)
        for name, doc, attr, conv in _DCGM_COUNTERS:
            fam = Metric(name, doc, "counter")
            for g, lab in zip(gpus, labels, strict=True):
                v = g.value(attr)
                if v is not None:
                    fam.add_sample(name, lab, conv(v))
            yield from _nonempty(fam)
        for name, doc, kind in _DCGM_NVLINK:
            fam = Metric(name, doc, "counter")
            for g, lab in zip(gpus, labels, strict=True):
                total = nvlink_totals(g.value("nvlink") or ()).get(kind)
                if total is not None:
                    fam.add_sample(name, lab, float(total))
            yield from _nonempty(fam)


def _nonempty(*families: Metric) -> Iterator[Metric]:
    """The families that have a sample: a value nobody has leaves no empty HELP/TYPE block."""
    return (f for f in families if f.samples)


# prometheus_client writes every counter family's HELP/TYPE lines as NAME_total (OpenMetrics);
# dcgm-exporter's counters carry no suffix, and their samples here are named without it. Their
# header lines are renamed back so Prometheus files the metadata (type counter) under the name
# the samples use, as it does for dcgm-exporter itself. Anchored on the newline before '#':
# a label value cannot hold a raw newline (the library escapes it), so nothing else matches.
_DCGM_HEADER_FIXES = tuple(
    (f"\n# {kind} {name}_total ".encode(), f"\n# {kind} {name} ".encode())
    for name in DCGM_COUNTER_NAMES for kind in ("HELP", "TYPE"))


def render_metrics(inp: MetricsInput, *, dcgm_compat: bool) -> bytes:
    """The Prometheus text exposition (format 0.0.4, ``CONTENT_TYPE``) of one snapshot.

    Runs per scrape, on the event loop, from the snapshot alone: no I/O, no clock.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(inp, dcgm_compat=dcgm_compat))
    body = generate_latest(registry)
    if dcgm_compat:
        for old, new in _DCGM_HEADER_FIXES:
            body = body.replace(old, new)
    return body


class MetricsRenderer:
    """``render_metrics`` at most once per snapshot, however many scrapers ask between two ticks
    (an HA pair of Prometheus servers, an operator's curl): a render of 8 GPUs costs milliseconds
    (docs/prometheus.md), a repeat costs nothing.

    Safe to call from a worker thread (``asyncio.to_thread(renderer.render, snapshot)`` keeps the
    render off the event loop): the snapshot is immutable and the cache is one tuple, replaced
    whole; two threads racing on a new snapshot at worst both render it.
    """

    __slots__ = ("_last", "dcgm_compat")

    def __init__(self, *, dcgm_compat: bool = False) -> None:
        self.dcgm_compat = dcgm_compat
        self._last: tuple[MetricsInput, bytes] | None = None

    def render(self, inp: MetricsInput) -> bytes:
        """The exposition of ``inp`` (the same bytes again while ``inp`` is the same snapshot)."""
        last = self._last
        if last is not None and last[0] is inp:
            return last[1]
        body = render_metrics(inp, dcgm_compat=self.dcgm_compat)
        self._last = (inp, body)
        return body
