"""The NVML backend: real NVIDIA GPUs through ``pynvml`` (the ``nvidia-ml-py`` package).

Why it is shaped like this:

- What a GPU can report differs by model, driver and binding version. A reading the device does
  not support is ``None`` (never an exception, never a zero), and the reader that asked is dropped
  for that GPU after the first NotSupported, so the 1 s / 0.1 s hot path stops paying for it.
  Where NVML has a newer and an older call for the same value (``nvmlDeviceGetTemperatureV`` /
  ``nvmlDeviceGetTemperature``, ``...ClocksEventReasons`` / ``...ClocksThrottleReasons``), the
  older one takes over when the newer is missing from the driver or the bindings.
- One GPU failing (fallen off the bus: GPU_IS_LOST, or any other error) yields an unhealthy sample
  for that GPU only; the others keep reporting. The failed GPU is retried after a backoff (not on
  every tick: a lost GPU can make each call slow), with its handle re-acquired by UUID.
- The ``pynvml`` module is injected, so the tests drive this exact code over
  ``tests/fake_pynvml.py``; by default the real module is imported lazily in :meth:`open`, so a
  node without the driver gets a clear operator message rather than an import-time crash.
- NVML calls block and may hang. The daemon calls this backend from one worker thread with a
  timeout; the backend keeps no lock, so calls must be serialised by the caller. The one
  exception is the NVML event wait (Xid, ECC, ...): it blocks by design, so it runs on a thread
  of its own (:mod:`collectors.nvml_events`), started by :meth:`NvmlBackend.open` and stopped by
  :meth:`NvmlBackend.close`; its events come out of :meth:`NvmlBackend.drain_events` with the
  backend's own.
- Health counters (ECC, row remapping, NVLink, PCIe replay, ...) are table readers like the
  others, read only as often as they can change (:mod:`collectors.nvml_counters`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.base import BackendError, BackendEvent, GpuInfo, GpuSample, LimitWriteError
from collectors.nvml_counters import (
    FIELDS_MIN_INTERVAL_S,
    HEALTH_FIELDS,
    HEALTH_MIN_INTERVAL_S,
    HEALTH_READERS,
    Reader,
    fields_factory,
)
from collectors.nvml_events import QUEUE_MAX, WAIT_TIMEOUT_MS, EventWatcher

NO_DRIVER = 'no NVIDIA driver found; use backend = "sim" to run without GPUs'
# NVML events after which the slow health counters of that GPU are read at the next tick
_REFRESH_KINDS = frozenset({
    "xid", "ecc_sbe", "ecc_dbe", "ecc_sbe_storm", "dram_retirement", "dram_retirement_failure",
    "poison_nonfatal", "poison_fatal", "recovery_action",
})  # fmt: skip


class _ReadError(Exception):
    """A reader failed with an error that makes the whole GPU unreadable."""

    def __init__(self, reader: str, error: BaseException) -> None:
        super().__init__(f"{reader}: {type(error).__name__}: {error}")


# Each reader factory takes (nvml module, _Gpu) and returns a Reader. Resolving the binding
# function here, once, means a binding too old to have it raises AttributeError at build time
# (treated as unsupported) and the hot path is one C call plus one conversion.


# Instantaneous power and HBM temperature in one nvmlDeviceGetFieldValues call per tick, with the
# slow health fields (recovery action, throttle durations) in the same call when they are due;
# an entry that is NOT_SUPPORTED is not asked again (collectors.nvml_counters.fields_factory).
_field_values = fields_factory((
    ("NVML_FI_DEV_POWER_INSTANT", "power_w", lambda mw: float(mw) * 0.001, "power_instant"),  # mW -> W
    ("NVML_FI_DEV_MEMORY_TEMP", "mem_temp_c", float, "mem_temp"),
), HEALTH_FIELDS, FIELDS_MIN_INTERVAL_S)  # fmt: skip


def _power_avg(nv: Any, g: _Gpu) -> Reader:
    get = nv.nvmlDeviceGetPowerUsage

    def read(h: Any, s: GpuSample) -> None:
        s.power_avg_w = get(h) / 1000.0  # mW -> W

    return read


# nvmlDeviceGetTotalEnergyConsumption took 3.2 ms (p99 15 ms) on an H200 where every other reader
# takes microseconds (tests/fixtures/nvml/nvidia-h200-latency.txt). A cumulative counter loses
# nothing by being read less often, so at sub-second intervals it is read at most every 0.5 s;
# on the ticks in between ``energy_j`` is None and the point simply carries no energy field.
# The interval is measured on the backend's monotonic clock: a wall-clock step (NTP, ``date``)
# must neither stop the reads nor make them come early.
ENERGY_MIN_INTERVAL_S = 0.5


def _energy(nv: Any, g: _Gpu) -> Reader:
    get, monotonic = nv.nvmlDeviceGetTotalEnergyConsumption, g.monotonic
    last = [-math.inf]

    def read(h: Any, s: GpuSample) -> None:
        now = monotonic()
        if now - last[0] < ENERGY_MIN_INTERVAL_S:
            return
        s.energy_j = get(h) / 1000.0  # mJ -> J
        last[0] = now

    return read


def _temp_v(nv: Any, g: _Gpu) -> Reader:
    get, sensor = nv.nvmlDeviceGetTemperatureV, nv.NVML_TEMPERATURE_GPU

    def read(h: Any, s: GpuSample) -> None:
        s.temp_c = float(get(h, sensor))

    return read


def _temp(nv: Any, g: _Gpu) -> Reader:
    get, sensor = nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU

    def read(h: Any, s: GpuSample) -> None:
        s.temp_c = float(get(h, sensor))

    return read


def _limit_enforced(nv: Any, g: _Gpu) -> Reader:
    get = nv.nvmlDeviceGetEnforcedPowerLimit

    def read(h: Any, s: GpuSample) -> None:
        s.limit_w = get(h) / 1000.0

    return read


def _limit_current(nv: Any, g: _Gpu) -> Reader:
    get = nv.nvmlDeviceGetPowerManagementLimit

    def read(h: Any, s: GpuSample) -> None:
        s.limit_current_w = get(h) / 1000.0

    return read


def _utilization(nv: Any, g: _Gpu) -> Reader:
    get = nv.nvmlDeviceGetUtilizationRates

    def read(h: Any, s: GpuSample) -> None:
        u = get(h)
        s.util_pct = float(u.gpu)
        s.mem_util_pct = float(u.memory)

    return read


def _memory(nv: Any, g: _Gpu) -> Reader:
    get = nv.nvmlDeviceGetMemoryInfo

    def read(h: Any, s: GpuSample) -> None:
        s.mem_used_bytes = int(get(h).used)

    return read


def _sm_clock(nv: Any, g: _Gpu) -> Reader:
    get, clock = nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM

    def read(h: Any, s: GpuSample) -> None:
        s.sm_clock_mhz = float(get(h, clock))

    return read


def _clock_reasons(name: str) -> Callable[[Any, _Gpu], Reader]:
    def factory(nv: Any, g: _Gpu) -> Reader:
        get = getattr(nv, name)

        def read(h: Any, s: GpuSample) -> None:
            s.clock_reasons = int(get(h))

        return read

    return factory


def _pids(name: str) -> Callable[[Any, _Gpu], Reader]:
    def factory(nv: Any, g: _Gpu) -> Reader:
        get = getattr(nv, name)

        def read(h: Any, s: GpuSample) -> None:
            s.pids = tuple(p.pid for p in get(h))

        return read

    return factory


# name -> (factory, fallback reader name). The first group is read on every tick, in this order;
# a fallback is only built when the reader before it turns out unsupported.
_READERS: dict[str, tuple[Callable[[Any, _Gpu], Reader], str | None]] = {
    "field_values": (_field_values, None),
    "power_avg": (_power_avg, None),
    "energy": (_energy, None),
    "temp_v": (_temp_v, "temp"),
    "limit_enforced": (_limit_enforced, None),
    "limit_current": (_limit_current, None),
    "utilization": (_utilization, None),
    "memory": (_memory, None),
    "sm_clock": (_sm_clock, None),
    "clock_event_reasons": (_clock_reasons("nvmlDeviceGetCurrentClocksEventReasons"), "clock_throttle_reasons"),
    "pids": (_pids("nvmlDeviceGetComputeRunningProcesses"), "pids_v2"),
    # fallbacks only
    "temp": (_temp, None),
    "clock_throttle_reasons": (_clock_reasons("nvmlDeviceGetCurrentClocksThrottleReasons"), None),
    "pids_v2": (_pids("nvmlDeviceGetComputeRunningProcesses_v2"), None),
    # health counters, each gated to its own interval (collectors.nvml_counters)
    **{name: (factory, None) for name, factory in HEALTH_READERS.items()},
}
_PRIMARY = (
    "field_values", "power_avg", "energy", "temp_v", "limit_enforced", "limit_current",
    "utilization", "memory", "sm_clock", "clock_event_reasons", "pids",
    *HEALTH_READERS,
)  # fmt: skip


@dataclass(slots=True, eq=False)
class _Gpu:
    """Per-GPU state: handle, the readers still worth calling, health and retry schedule."""

    info: GpuInfo
    monotonic: Callable[[], float] = time.monotonic  # the backend's clock, for rate-limited readers
    handle: Any = None
    min_mw: int | None = None
    max_mw: int | None = None
    readers: tuple[tuple[str, Reader], ...] = ()  # read on every tick
    slow: tuple[tuple[str, Reader], ...] = ()  # the health readers (collectors.nvml_counters)
    slow_at: float = -math.inf  # when the health readers were last asked (monotonic s)
    slow_seen: int = 0  # the refresh generation they were last asked at
    unsupported: set[str] = field(default_factory=set)
    healthy: bool = True
    error: str | None = None
    backoff_s: float = 0.0
    retry_at: float = 0.0
    ecc_enabled: bool | None = None  # nvmlDeviceGetEccMode at attach; None: not said
    refresh: int = 0  # bumped (event thread) on an NVML event: the slow counters are due at once
    health_errors: int = 0  # health reads that failed softly (collectors.nvml_counters)
    nvlink_links: tuple[int, ...] = ()  # the NVLinks that were up at attach
    nvlink_totals: dict[str, int] = field(default_factory=dict)  # NVLink error totals (field reader)


def _swap(readers: tuple[tuple[str, Reader], ...], name: str,
          repl: tuple[str, Reader] | None) -> tuple[tuple[str, Reader], ...]:
    """``readers`` with reader ``name`` replaced by ``repl``, or left out when there is none."""
    out = []
    for r in readers:
        if r[0] != name:
            out.append(r)
        elif repl is not None:
            out.append(repl)
    return tuple(out)


def _text(value: Any) -> str:
    """Old bindings return bytes where new ones return str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """:class:`collectors.base.GpuBackend` over NVML.

    ``nvml`` is the pynvml module or a stand-in (tests); ``monotonic`` is the clock for the retry
    backoff and the energy counter's rate limit, ``wall_ns`` the one for events raised outside
    :meth:`sample` (``sample``'s own ``ts_ns`` only stamps the readings). A GPU that
    fails is retried ``retry_s`` later, doubling up to ``retry_max_s`` while it stays down.

    Health changes are appended to :attr:`events` (:class:`BackendEvent`); the daemon takes them
    with :meth:`drain_events` after each sample, together with the NVML events the event thread
    queued (``events=False`` starts no such thread; ``event_wait_ms`` bounds how long
    :meth:`close` waits for it, ``event_queue_max`` how many undrained events it keeps).
    """

    def __init__(
        self,
        nvml: Any = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        retry_s: float = 5.0,
        retry_max_s: float = 60.0,
        events: bool = True,
        event_wait_ms: int = WAIT_TIMEOUT_MS,
        event_queue_max: int = QUEUE_MAX,
        event_backoff_s: float = 0.1,
    ) -> None:
        self._nv = nvml
        self._monotonic = monotonic
        self._wall_ns = wall_ns
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._gpus: list[_Gpu] = []
        self._open = False
        self._unsupported_errors: tuple[type[BaseException], ...] = ()
        self.events: list[BackendEvent] = []
        self.driver_version: str | None = None
        self._events_on = events
        self._event_wait_ms, self._event_queue_max = event_wait_ms, event_queue_max
        self._event_backoff_s = event_backoff_s
        self._watcher: EventWatcher | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        """Initialise NVML, enumerate the GPUs, read what does not change. Idempotent."""
        if self._open:
            return self.infos
        if self._nv is None:
            try:
                import pynvml
            except ImportError as e:  # pragma: no cover - the dependency is declared
                raise BackendError(
                    f'cannot import pynvml ({e}): install the nvidia-ml-py package, or use backend = "sim"'
                ) from e
            self._nv = pynvml
        nv = self._nv
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise BackendError(init_error_message(nv, e)) from e
        self._open = True
        self._unsupported_errors = tuple(
            getattr(nv, n)
            for n in (
                "NVMLError_NotSupported",
                "NVMLError_FunctionNotFound",  # the driver's libnvidia-ml lacks the symbol
                "NVMLError_ArgumentVersionMismatch",  # the driver does not know the struct version
                "NVMLLibraryMismatchError",  # unversioned binding call against an older library
            )
            if hasattr(nv, n)
        )
        try:
            self.driver_version = _text(nv.nvmlSystemGetDriverVersion())
        except nv.NVMLError:
            self.driver_version = None
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as e:
            self.close()
            raise BackendError(f"NVML could not count the GPUs ({e}); check the driver with nvidia-smi") from e
        if count == 0:
            self.close()
            raise BackendError(
                'NVML found no GPUs on this node; check nvidia-smi, or use backend = "sim" to run without GPUs'
            )
        self._gpus = []
        for index in range(count):
            g = _Gpu(GpuInfo(index=index, uuid="", model="unknown"), monotonic=self._monotonic)
            self._gpus.append(g)
            try:
                self._attach(g)
            except Exception as e:
                self._mark_down(g, self._wall_ns(), f"open: {type(e).__name__}: {e}")
        if self._events_on:
            self._watcher = EventWatcher(
                nv, [(g.info.index, g.info.uuid, g.handle) for g in self._gpus if g.healthy],
                wall_ns=self._wall_ns, monotonic=self._monotonic, on_event=self._on_nvml_event,
                wait_timeout_ms=self._event_wait_ms, queue_max=self._event_queue_max, backoff_s=self._event_backoff_s,
            )
            self._watcher.start()
        return self.infos

    def close(self) -> None:
        """Shut NVML down. Safe to call twice, and after a failed open."""
        if not self._open:
            return
        self._open = False
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()  # before nvmlShutdown: its event set belongs to this NVML session
        self._gpus = []
        try:
            self._nv.nvmlShutdown()
        except self._nv.NVMLError:
            pass

    @property
    def infos(self) -> list[GpuInfo]:
        """The static description of each GPU, index order (refreshed when a GPU is re-attached)."""
        return [g.info for g in self._gpus]

    def unsupported(self, index: int) -> frozenset[str]:
        """Reader names this GPU turned out not to support (for probe output and diagnostics)."""
        return frozenset(self._gpu(index).unsupported)

    def drain_events(self) -> list[BackendEvent]:
        """Take the events raised since the last call, in time order: the backend's health
        changes (lost / recovered) and the NVML events (Xid, ECC, ...) the event thread queued."""
        events, self.events = self.events, []
        watcher = self._watcher
        if watcher is not None:
            events += watcher.drain()
            events.sort(key=lambda e: e.ts_ns)  # stable: same-time events keep their order
        return events

    def event_stats(self) -> dict[str, int]:
        """The event thread's counters for the daemon's ``agent`` point (see
        :meth:`collectors.nvml_events.EventWatcher.stats`; zeros when no thread runs), plus
        ``nvml_health_read_errors``: health counter reads that failed and were retried later."""
        watcher = self._watcher
        stats = watcher.stats() if watcher is not None else {
            "nvml_events": 0, "nvml_events_dropped": 0, "nvml_event_errors": 0,
            "nvml_event_unknown_device": 0, "nvml_event_gpus": 0,
        }  # fmt: skip
        stats["nvml_health_read_errors"] = sum(g.health_errors for g in self._gpus)
        return stats

    def event_watch(self) -> dict[int, list[str]]:
        """GPU index -> the NVML event kinds watched on it now (empty where none; for the probe)."""
        watcher = self._watcher
        registered = watcher.registered() if watcher is not None else {}
        return {g.info.index: registered.get(g.info.index, []) for g in self._gpus}

    def _on_nvml_event(self, index: int, kind: str) -> None:
        """On the event thread: an Xid or ECC event makes that GPU's slow counters due now."""
        if kind in _REFRESH_KINDS:
            gpus = self._gpus
            if 0 <= index < len(gpus):
                gpus[index].refresh += 1

    # -- reading ---------------------------------------------------------------------------

    def sample(self, ts_ns: int) -> list[GpuSample]:
        """Read every GPU once; a GPU that fails gives ``healthy=False`` and the rest go on."""
        out: list[GpuSample] = []
        now: float | None = None
        for g in self._gpus:
            if g.healthy:
                try:
                    out.append(self._read(g, ts_ns))
                    continue
                except _ReadError as e:
                    self._mark_down(g, ts_ns, str(e))
            else:
                if now is None:
                    now = self._monotonic()
                if now >= g.retry_at:
                    try:
                        self._reattach(g)
                        s = self._read(g, ts_ns)
                    except Exception as e:
                        self._mark_down(g, ts_ns, str(e) if isinstance(e, _ReadError) else f"{type(e).__name__}: {e}")
                    else:
                        self._mark_up(g, ts_ns)
                        out.append(s)
                        continue
            info = g.info
            out.append(GpuSample(info.index, info.uuid, info.model, ts_ns, healthy=False, error=g.error))
        return out

    def _read(self, g: _Gpu, ts_ns: int) -> GpuSample:
        """The hot path: one sample allocation, then each supported reader once."""
        i = g.info
        s = GpuSample(
            i.index, i.uuid, i.model, ts_ns,
            limit_default_w=i.limit_default_w, limit_min_w=i.limit_min_w, limit_max_w=i.limit_max_w,
            slowdown_c=i.slowdown_c, shutdown_c=i.shutdown_c, gpu_max_c=i.gpu_max_c, mem_max_c=i.mem_max_c,
        )  # fmt: skip
        h = g.handle
        self._run(g, g.readers, h, s)
        if g.slow:
            # The health readers gate themselves (10 s / 60 s); asking them only when the shortest
            # interval has passed, or an event made them due, keeps a tick in between to one
            # clock read per GPU rather than a call per reader.
            now, generation = self._monotonic(), g.refresh
            if now - g.slow_at >= HEALTH_MIN_INTERVAL_S or generation != g.slow_seen:
                g.slow_at, g.slow_seen = now, generation
                self._run(g, g.slow, h, s)
        return s

    def _run(self, g: _Gpu, readers: tuple[tuple[str, Reader], ...], h: Any, s: GpuSample) -> None:
        """Each reader once; an unsupported one is replaced for good (``_replace_reader``), any
        other error makes the whole GPU unreadable (``_ReadError``)."""
        for name, read in readers:
            try:
                read(h, s)
            except self._unsupported_errors:
                self._replace_reader(g, name, h, s)
            except Exception as e:
                raise _ReadError(name, e) from e

    def _replace_reader(self, g: _Gpu, name: str, h: Any, s: GpuSample) -> None:
        """Drop an unsupported reader for good; put its fallback (if any) in its place and run it."""
        while True:
            g.unsupported.add(name)
            repl = self._build_reader(g, _READERS[name][1])
            g.readers, g.slow = _swap(g.readers, name, repl), _swap(g.slow, name, repl)
            if repl is None:
                return
            name = repl[0]
            try:
                repl[1](h, s)
                return
            except self._unsupported_errors:
                continue
            except Exception as e:
                raise _ReadError(name, e) from e

    def _build_reader(self, g: _Gpu, name: str | None) -> tuple[str, Reader] | None:
        """The first reader in the chain starting at ``name`` that the bindings can build."""
        while name is not None:
            factory, fallback = _READERS[name]
            try:
                return name, factory(self._nv, g)
            except AttributeError:  # bindings too old for this call
                g.unsupported.add(name)
                name = fallback
        return None

    # -- health ----------------------------------------------------------------------------

    def _attach(self, g: _Gpu) -> None:
        """Acquire the handle by index and read the GPU's identity, envelopes and readers."""
        nv = self._nv
        index = g.info.index
        h = nv.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nv.nvmlDeviceGetUUID(h))
        model = _text(nv.nvmlDeviceGetName(h))
        lo_hi = self._optional(nv.nvmlDeviceGetPowerManagementLimitConstraints, h)
        g.min_mw, g.max_mw = (int(lo_hi[0]), int(lo_hi[1])) if lo_hi else (None, None)
        default_mw = self._optional(nv.nvmlDeviceGetPowerManagementDefaultLimit, h)
        threshold = nv.nvmlDeviceGetTemperatureThreshold

        def temp_limit(which: int) -> float | None:
            c = self._optional(threshold, h, which)
            return float(c) if c else None  # 0 C is "not set", never a real limit

        g.info = GpuInfo(
            index=index,
            uuid=uuid,
            model=model,
            limit_min_w=g.min_mw / 1000.0 if g.min_mw is not None else None,
            limit_max_w=g.max_mw / 1000.0 if g.max_mw is not None else None,
            limit_default_w=default_mw / 1000.0 if default_mw is not None else None,
            slowdown_c=temp_limit(nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            shutdown_c=temp_limit(nv.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
            gpu_max_c=temp_limit(nv.NVML_TEMPERATURE_THRESHOLD_GPU_MAX),
            mem_max_c=temp_limit(nv.NVML_TEMPERATURE_THRESHOLD_MEM_MAX),
        )
        g.handle = h
        g.ecc_enabled = self._ecc_enabled(h)
        built = [r for r in (self._build_reader(g, n) for n in _PRIMARY) if r is not None]
        g.readers = tuple(r for r in built if r[0] not in HEALTH_READERS)
        g.slow = tuple(r for r in built if r[0] in HEALTH_READERS)

    def _ecc_enabled(self, h: Any) -> bool | None:
        """ECC's current mode: with ECC off the error counters are absent or meaningless, so the
        ECC and page-retirement readers are not built. None when the driver does not say; an
        error other than GPU_IS_LOST must not keep the GPU from attaching."""
        nv = self._nv
        try:
            current, _pending = nv.nvmlDeviceGetEccMode(h)
        except AttributeError:
            return None
        except self._unsupported_errors:
            return None
        except nv.NVMLError as e:
            if e.value == nv.NVML_ERROR_GPU_IS_LOST:
                raise
            return None
        return bool(current == nv.NVML_FEATURE_ENABLED)

    def _reattach(self, g: _Gpu) -> None:
        """A fresh handle for a GPU that failed: by UUID when we know it, else a full attach."""
        if not g.info.uuid:
            self._attach(g)
            return
        g.handle = self._nv.nvmlDeviceGetHandleByUUID(g.info.uuid)

    def _optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._unsupported_errors:
            return None

    def _mark_down(self, g: _Gpu, ts_ns: int, error: str) -> None:
        was_healthy = g.healthy
        g.healthy = False
        g.error = error
        g.backoff_s = self._retry_s if was_healthy else min(g.backoff_s * 2, self._retry_max_s)
        g.retry_at = self._monotonic() + g.backoff_s
        if was_healthy:
            i = g.info
            self.events.append(
                BackendEvent(ts_ns, i.index, "gpu_lost",
                             f"GPU {i.index} ({i.uuid or 'uuid unknown'}) cannot be read: {error}; "
                             f"retrying every {self._retry_s:g}-{self._retry_max_s:g} s")
            )  # fmt: skip

    def _mark_up(self, g: _Gpu, ts_ns: int) -> None:
        g.healthy, g.error, g.backoff_s = True, None, 0.0
        i = g.info
        self.events.append(BackendEvent(ts_ns, i.index, "gpu_recovered", f"GPU {i.index} ({i.uuid}) reads again"))
        if self._watcher is not None:
            self._watcher.gpu_back(i.index, i.uuid, g.handle)

    # -- control ---------------------------------------------------------------------------

    def set_power_limit(self, index: int, limit_w: float) -> None:
        """Set the management power limit (W; NVML takes mW).

        A value outside the device's [min, max] is refused with ValueError before NVML is
        called (safety invariant). NO_PERMISSION raises ``LimitWriteError(permission=True)``.
        """
        g = self._gpu(index)
        if g.min_mw is None or g.max_mw is None:
            raise LimitWriteError(
                f"GPU {index}: NVML reports no power limit constraints, so a limit cannot be checked; not writing"
            )
        lo, hi = g.min_mw / 1000.0, g.max_mw / 1000.0
        if not lo <= limit_w <= hi:
            raise ValueError(f"GPU {index}: power limit {limit_w} W is outside the device's range [{lo:g}, {hi:g}] W")
        if not g.healthy:
            raise LimitWriteError(f"GPU {index} is not readable ({g.error}); not writing its power limit")
        mw = min(max(round(limit_w * 1000), g.min_mw), g.max_mw)
        nv = self._nv
        try:
            nv.nvmlDeviceSetPowerManagementLimit(g.handle, mw)
        except nv.NVMLError_NoPermission as e:
            raise LimitWriteError(
                f"GPU {index}: setting the power limit needs root or CAP_SYS_ADMIN (NVML: {e}); "
                "run agentd as root as the shipped systemd unit does, or set dry_run = true",
                permission=True,
            ) from e
        except nv.NVMLError_NotSupported as e:
            raise LimitWriteError(f"GPU {index} ({g.info.model}) does not support setting its power limit") from e
        except nv.NVMLError as e:
            raise LimitWriteError(f"GPU {index}: setting the power limit to {mw} mW failed: {e}") from e

    def _gpu(self, index: int) -> _Gpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no GPU with index {index} (this node has {len(self._gpus)})")
        return self._gpus[index]


def init_error_message(nv: Any, e: BaseException) -> str:
    """Turn an nvmlInit failure into what the operator should do about it."""

    def is_(name: str) -> bool:
        cls = getattr(nv, name, None)
        return cls is not None and isinstance(e, cls)

    if is_("NVMLError_LibraryNotFound") or is_("NVMLError_DriverNotLoaded"):
        return f"{NO_DRIVER} (NVML: {e})"
    if is_("NVMLError_NoPermission"):
        return (
            f"NVML refused to initialise ({e}): agentd cannot open /dev/nvidia*; run it as root or give "
            "its user access to the NVIDIA device files"
        )
    if is_("NVMLError_LibRmVersionMismatch"):
        return (
            f"NVML library and the loaded nvidia kernel module differ ({e}); the driver was probably "
            "upgraded without a reboot: reboot or reload the nvidia module"
        )
    return f"NVML initialisation failed: {type(e).__name__}: {e}"
