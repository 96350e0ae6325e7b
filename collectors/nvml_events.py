"""The NVML event watcher: Xid and other critical GPU events, on a thread of their own.

Why a thread: ``nvmlEventSetWait_v2`` blocks until an event arrives or its timeout passes, and
the tick must never wait on it. NVML is documented as thread-safe; the readers stay serialised on
the backend's one NVML worker, and only this wait (plus the registration it needs, and one field
read per Xid for the driver's recommended action) runs here. The wait has a short timeout so
:meth:`EventWatcher.stop` returns promptly; the thread is a daemon thread, so a driver call that
never returns cannot keep the process alive at exit.

What it does with trouble, since a failing GPU is exactly when this code runs:

- Events go into a bounded queue. A broken GPU can raise thousands per second; past
  ``queue_max`` undrained events the newest are dropped and counted per kind (the first ones,
  which usually name the cause, are kept), and memory stays bounded.
- An NVML error from the wait is logged at most once a minute per distinct error, the thread
  backs off a little (doubling, capped) and goes on. GPU_IS_LOST from the wait rebuilds the event
  set without the GPU(s) that no longer answer, so one GPU off the bus does not blind the watch
  on the others; the lost ones are registered again when the backend sees them back
  (:meth:`gpu_back`) or every ``reregister_s``.
- An event whose device is none of the handles the backend gave (a GPU this watcher does not
  know) is counted and dropped.

Handles are compared by value: the real bindings' handles are ctypes pointers, and the
``device`` of each event is a new pointer object to the same address (see :func:`handle_key`).
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from collectors.base import BackendEvent
from collectors.log_limit import RateLimitedLog
from collectors.nvml_counters import read_recovery_action, unsupported_codes

log = structlog.get_logger("agentd.nvml_events")

# binding constant -> BackendEvent kind. The wanted mask is what the bindings define of these,
# and each GPU is registered for the part of it that nvmlDeviceGetSupportedEventTypes reports.
EVENT_TYPES: tuple[tuple[str, str], ...] = (
    ("nvmlEventTypeXidCriticalError", "xid"),
    ("nvmlEventTypeSingleBitEccError", "ecc_sbe"),
    ("nvmlEventTypeDoubleBitEccError", "ecc_dbe"),
    ("nvmlEventTypePState", "pstate"),
    ("nvmlEventTypeClock", "clock"),
    ("nvmlEventTypePowerSourceChange", "power_source"),
    ("nvmlEventTypeGpuRecoveryAction", "recovery_action"),
    ("nvmlEventTypeSingleBitEccErrorStorm", "ecc_sbe_storm"),
    ("nvmlEventTypeDramRetirementEvent", "dram_retirement"),
    ("nvmlEventTypeDramRetirementFailure", "dram_retirement_failure"),
    ("nvmlEventTypeNonFatalPoisonError", "poison_nonfatal"),
    ("nvmlEventTypeFatalPoisonError", "poison_fatal"),
    ("nvmlEventTypeGpuUnavailableError", "gpu_unavailable"),
)
ACTION_KINDS = frozenset({"xid", "recovery_action"})  # events after which the driver's action is read
WAIT_TIMEOUT_MS = 500  # the longest stop() waits for the thread to notice
QUEUE_MAX = 256  # undrained events kept; the daemon drains every tick
LOG_EVERY_S = 60.0  # one line per distinct trouble per minute at most
REREGISTER_S = 30.0  # how often a lost GPU is tried again when the backend has not said it is back
_MAX_LOG_KEYS = 256  # the rate limiter forgets what it saw past this many distinct keys
_INSTANCE_ANY = 0xFFFFFFFF  # NVML_GPU_INSTANCE_ID_ANY / NVML_COMPUTE_INSTANCE_ID_ANY


def event_kinds(nv: Any) -> dict[int, str]:
    """Event type bit -> kind, for the event types these bindings define."""
    return {getattr(nv, const): kind for const, kind in EVENT_TYPES if hasattr(nv, const)}


def kinds_in(mask: int, kinds: dict[int, str]) -> list[str]:
    """The kinds whose bits are set in ``mask``, in EVENT_TYPES order."""
    return [kind for bit, kind in kinds.items() if mask & bit]


def handle_key(handle: Any) -> Hashable:
    """A value that is equal for two handles of the same device.

    The real bindings' handles are ``POINTER(struct_c_nvmlDevice_t)`` objects: two of them for the
    same device are distinct objects that compare unequal, so they are keyed by the address they
    hold. Anything else (the fake's handles) is keyed by itself, or by identity if unhashable.
    """
    if isinstance(handle, ctypes._Pointer):
        return ("ptr", ctypes.cast(handle, ctypes.c_void_p).value)
    try:
        hash(handle)
    except TypeError:
        return ("id", id(handle))
    return handle


@dataclass(slots=True, eq=False)
class _Watched:
    """One GPU as the watcher knows it."""

    index: int
    uuid: str
    handle: Any
    mask: int = 0  # event types registered on the current set
    supported: int | None = None  # nvmlDeviceGetSupportedEventTypes; None: not asked yet / lost
    lost: bool = False  # registration failed with GPU_IS_LOST: tried again later
    action_supported: bool = True  # the recovery-action field answered (or was not asked yet)


class EventWatcher:
    """Owns one NVML event set and the thread that waits on it (see the module doc).

    ``gpus`` are (index, uuid, handle) of the GPUs to watch; ``wall_ns`` stamps events,
    ``monotonic`` paces the log and the re-registration of lost GPUs; ``on_event(index, kind)``
    is called on this thread for each event of a known GPU (the backend makes that GPU's slow
    counters due). Call :meth:`start` once, :meth:`stop` once (both safe to repeat).
    """

    def __init__(
        self,
        nv: Any,
        gpus: Iterable[tuple[int, str, Any]],
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        on_event: Callable[[int, str], None] | None = None,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        queue_max: int = QUEUE_MAX,
        backoff_s: float = 0.1,
        backoff_max_s: float = 5.0,
        reregister_s: float = REREGISTER_S,
    ) -> None:
        if not isinstance(wait_timeout_ms, int) or wait_timeout_ms < 1:
            raise ValueError(f"wait_timeout_ms must be a positive int (NVML takes a c_uint), got {wait_timeout_ms!r}")
        if queue_max < 1:
            raise ValueError(f"queue_max must be at least 1, got {queue_max!r}")
        self._nv = nv
        self._wall_ns = wall_ns
        self._monotonic = monotonic
        self._on_event = on_event
        self._timeout_ms = wait_timeout_ms
        self._queue_max = queue_max
        self._backoff_s, self._backoff_max_s = backoff_s, backoff_max_s
        self._reregister_s = reregister_s
        self._kinds = event_kinds(nv)
        self._wanted = 0
        for bit in self._kinds:
            self._wanted |= bit
        self._gpus = {index: _Watched(index, uuid, handle) for index, uuid, handle in gpus}
        self._by_key: dict[Hashable, _Watched] = {}
        self._lock = threading.Lock()  # guards the queue, the counters, the handle map
        self._queue: deque[BackendEvent] = deque()
        self._received: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._errors = 0
        self._unknown_device = 0
        self._refused: dict[int, dict[str, str]] = {}  # GPU -> kind -> why registering it failed
        self._limiter = RateLimitedLog(LOG_EVERY_S, _MAX_LOG_KEYS)
        self._stop = threading.Event()
        self._set: Any = None
        self._thread: threading.Thread | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self._started = False
        self._wait: Callable[[Any, int], Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> bool:
        """Create the event set, register every GPU, start the thread. False when there is
        nothing to watch (no event API in the driver or bindings, or no GPU supports a wanted
        type): then no thread runs and :meth:`drain` stays empty."""
        if self._started:
            return self._thread is not None
        self._started = True
        if not self._wanted or not self._gpus:
            return False
        # nvmlEventSetWait_v2 has the MIG instance ids; bindings older than it have only the first
        self._wait = getattr(self._nv, "nvmlEventSetWait_v2", None) or getattr(self._nv, "nvmlEventSetWait", None)
        try:
            if self._wait is None:
                raise AttributeError("nvmlEventSetWait")
            self._set = self._nv.nvmlEventSetCreate()
        except AttributeError as e:  # bindings without the event API
            missing = e.args[0] if e.args else "event API"
            log.info("nvml_events_unavailable", reason=f"the pynvml bindings have no {missing}")
            return False
        except self._nv.NVMLError as e:
            log.warning("nvml_events_unavailable", reason=f"nvmlEventSetCreate: {e}",
                        hint="Xid and ECC events are not watched; the counters are still read")
            return False
        with self._lock:
            for g in self._gpus.values():
                self._by_key[handle_key(g.handle)] = g
        for g in self._gpus.values():
            self._register(g)
        self._retry_at = self._monotonic() + self._reregister_s
        if not any(g.mask or g.lost for g in self._gpus.values()):
            self._free()
            log.info("nvml_events_unsupported", gpus=len(self._gpus),
                     hint="no GPU supports the Xid/ECC event types; the counters are still read")
            return False
        watched = {g.index: kinds_in(g.mask, self._kinds) for g in self._gpus.values() if g.mask}
        log.info("nvml_events_watching", gpus=sorted(watched), kinds=sorted({k for ks in watched.values() for k in ks}))
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout_s: float | None = None) -> bool:
        """Ask the thread to stop and join it for at most ``timeout_s`` (default: the wait timeout
        plus 1 s). True when it has stopped (it frees the event set on its way out); False when a
        driver call still holds it, which is logged (the daemon thread cannot block the exit)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            self._free()
            return True
        thread.join(self._timeout_ms / 1000 + 1.0 if timeout_s is None else timeout_s)
        if thread.is_alive():
            log.warning("nvml_events_stop_timeout", timeout_ms=self._timeout_ms,
                        hint="an NVML event wait has not returned; the thread is left to the exit")
            return False
        self._thread = None
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- what the backend reads --------------------------------------------------------------

    def drain(self) -> list[BackendEvent]:
        """Take the events queued since the last call, oldest first."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return events

    def pending(self) -> int:
        """Events queued and not drained yet (never more than ``queue_max``)."""
        with self._lock:
            return len(self._queue)

    def stats(self) -> dict[str, int]:
        """Counters since start, for the daemon's ``agent`` point (names are field names).

        ``nvml_events``: events received; ``nvml_events_dropped``: dropped because the queue was
        full, with ``nvml_events_dropped_<kind>`` per kind (only kinds that dropped any);
        ``nvml_event_errors``: failed waits (GPU lost included); ``nvml_event_unknown_device``:
        events for a device that is no watched GPU; ``nvml_event_gpus``: GPUs registered now.
        """
        with self._lock:
            out = {
                "nvml_events": sum(self._received.values()),
                "nvml_events_dropped": sum(self._dropped.values()),
                "nvml_event_errors": self._errors,
                "nvml_event_unknown_device": self._unknown_device,
                "nvml_event_gpus": sum(1 for g in self._gpus.values() if g.mask),
            }
            for kind, n in sorted(self._dropped.items()):
                out[f"nvml_events_dropped_{kind}"] = n
        return out

    def registered(self) -> dict[int, list[str]]:
        """GPU index -> the event kinds registered for it now (lost or unsupported GPUs: [])."""
        with self._lock:
            return {i: kinds_in(g.mask, self._kinds) for i, g in sorted(self._gpus.items())}

    def refused(self) -> dict[int, dict[str, str]]:
        """GPU index -> kind -> the error that refused registering it (for the probe)."""
        with self._lock:
            return {i: dict(r) for i, r in self._refused.items()}

    def gpu_back(self, index: int, uuid: str, handle: Any) -> None:
        """The backend reads GPU ``index`` again, or for the first time (it was down at open),
        with this handle: the thread registers it at its next turn."""
        with self._lock:
            g = self._gpus.get(index)
            if g is None:
                g = self._gpus[index] = _Watched(index, uuid, handle, lost=True)
            self._by_key.pop(handle_key(g.handle), None)
            g.uuid, g.handle = uuid, handle
            self._by_key[handle_key(handle)] = g
            if not g.mask:
                g.lost, g.supported = True, None
                self._retry_at = -math.inf
            idle = self._thread is None and self._started and not self._stop.is_set()
        if idle:  # nothing was watched at start (every GPU down, or none with events): try again
            self._started = False
            self.start()

    # -- registration ------------------------------------------------------------------------

    def _register(self, g: _Watched) -> None:
        """Register one GPU on the current set for the wanted types it supports. NOT_SUPPORTED on
        the whole mask falls back to one type at a time; what is refused is recorded."""
        nv = self._nv
        unsupported = unsupported_codes(nv)
        g.mask = 0
        try:
            if g.supported is None:
                g.supported = int(nv.nvmlDeviceGetSupportedEventTypes(g.handle))
            wanted = g.supported & self._wanted
            if not wanted:
                g.lost = False
                return
            try:
                nv.nvmlDeviceRegisterEvents(g.handle, wanted, self._set)
                g.mask = wanted
            except nv.NVMLError as e:
                if e.value not in unsupported:
                    raise
                for bit, kind in self._kinds.items():
                    if wanted & bit:
                        try:
                            nv.nvmlDeviceRegisterEvents(g.handle, bit, self._set)
                            g.mask |= bit
                        except nv.NVMLError as e1:
                            if e1.value == nv.NVML_ERROR_GPU_IS_LOST:
                                raise
                            with self._lock:
                                self._refused.setdefault(g.index, {})[kind] = str(e1)
            g.lost = False
        except nv.NVMLError as e:
            if e.value == nv.NVML_ERROR_GPU_IS_LOST:
                g.lost, g.mask, g.supported = True, 0, None
                self._log_limited(f"lost:{g.index}", "nvml_events_gpu_lost", gpu=g.index, uuid=g.uuid,
                                  hint="not watched for events until it answers again")
                return
            if e.value in unsupported:
                g.supported = 0
                with self._lock:
                    self._refused.setdefault(g.index, {})["all"] = str(e)
                return
            g.lost, g.mask = True, 0  # any other error: try again later, like a lost GPU
            self._log_limited(f"register:{g.index}:{e}", "nvml_events_register_failed", gpu=g.index,
                              error=str(e), hint="retried later")

    def _rebuild(self) -> None:
        """A fresh event set with every GPU that still answers (after GPU_IS_LOST from the wait:
        which GPU it was is not said, so all are registered again and the lost ones refuse)."""
        self._free()
        gpus = self._snapshot()
        for g in gpus:
            g.mask = 0  # registered on no set until registered on the new one
        try:
            self._set = self._nv.nvmlEventSetCreate()
        except self._nv.NVMLError as e:
            self._set = None
            self._trouble(f"create:{e}", "nvml_events_set_create_failed", error=str(e))
            return
        for g in gpus:
            self._register(g)
        self._retry_at = self._monotonic() + self._reregister_s  # the lost ones: not before then

    def _reregister_due(self) -> None:
        """Try the GPUs that were lost again, every ``reregister_s`` or at once after gpu_back."""
        if self._monotonic() < self._retry_at:
            return
        self._retry_at = self._monotonic() + self._reregister_s
        if self._set is None:
            self._rebuild()
            return
        for g in self._snapshot():
            if g.lost:
                self._register(g)
                if g.mask:
                    log.info("nvml_events_gpu_watched_again", gpu=g.index, kinds=kinds_in(g.mask, self._kinds))

    def _snapshot(self) -> list[_Watched]:
        with self._lock:
            return list(self._gpus.values())

    def _free(self) -> None:
        s, self._set = self._set, None
        if s is None:
            return
        try:
            self._nv.nvmlEventSetFree(s)
        except self._nv.NVMLError:
            pass  # after a driver reset or nvmlShutdown: nothing left to free

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._turn()
                except Exception as e:  # a bug or a binding surprise must not end the watch
                    with self._lock:
                        self._errors += 1
                    self._trouble(f"bug:{type(e).__name__}", "nvml_events_wait_failed",
                                  error=f"{type(e).__name__}: {e}")
                    self._pause()
        finally:
            self._free()

    def _turn(self) -> None:
        """One wait on the event set, and what follows from its answer."""
        nv, wait = self._nv, self._wait
        assert wait is not None  # start() resolved it
        if self._set is None or any(g.lost for g in self._snapshot()):
            self._reregister_due()
        if self._set is None:
            self._pause()
            return
        try:
            data = wait(self._set, self._timeout_ms)
        except nv.NVMLError as e:
            if e.value == nv.NVML_ERROR_TIMEOUT:
                self._attempt = 0
                return
            with self._lock:
                self._errors += 1
            if e.value == nv.NVML_ERROR_GPU_IS_LOST:
                self._log_limited("wait_lost", "nvml_events_wait_gpu_lost", error=str(e),
                                  hint="re-registering the GPUs that still answer")
                self._rebuild()
            else:
                self._trouble(f"wait:{e}", "nvml_events_wait_failed", error=str(e))
            self._pause()
            return
        self._attempt = 0
        try:
            self._take(data)
        except Exception as e:  # noqa: BLE001 - one odd event must not end the watch
            self._trouble(f"take:{type(e).__name__}", "nvml_event_unreadable", error=f"{type(e).__name__}: {e}")

    def _pause(self) -> None:
        """Back off after a failed wait: doubling from ``backoff_s`` to ``backoff_max_s``; stop()
        cuts it short."""
        delay = min(self._backoff_max_s, self._backoff_s * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        self._stop.wait(delay)

    def _take(self, data: Any) -> None:
        """One event from the wait -> a BackendEvent in the queue (or a count of a drop)."""
        with self._lock:
            g = self._by_key.get(handle_key(data.device))
        etype = int(data.eventType)
        kind = self._kinds.get(etype, "other")
        if g is None:
            with self._lock:
                self._unknown_device += 1
            self._log_limited("unknown_device", "nvml_event_unknown_device", kind=kind,
                              hint="an event for a device that is none of the watched GPUs; dropped")
            return
        if self._on_event is not None:
            self._on_event(g.index, kind)
        with self._lock:
            self._received[kind] += 1
            full = len(self._queue) >= self._queue_max
            if full:
                self._dropped[kind] += 1
        if full:
            self._log_limited(f"dropped:{kind}", "nvml_events_dropped", kind=kind, gpu=g.index,
                              queue_max=self._queue_max,
                              hint="events arrive faster than the daemon drains them; counted in nvml_events_dropped")
            return
        xid = int(data.eventData) if kind == "xid" else None
        action = None
        if kind in ACTION_KINDS and g.action_supported:
            try:
                action = read_recovery_action(self._nv, g.handle)
            except self._nv.NVMLError:
                action = None
            g.action_supported = action is not None
        event = BackendEvent(self._wall_ns(), g.index, kind, self._message(g, kind, data, xid, action), xid, action)
        with self._lock:
            self._queue.append(event)

    def _message(self, g: _Watched, kind: str, data: Any, xid: int | None, action: str | None) -> str:
        what = f"Xid {xid}" if kind == "xid" else f"NVML event {kind}"
        if kind != "xid" and int(data.eventData):
            what += f" (data {int(data.eventData)})"
        if kind == "other":
            what += f" (type {int(data.eventType):#x})"
        where = f"GPU {g.index} ({g.uuid})"
        gi = int(getattr(data, "gpuInstanceId", _INSTANCE_ANY))
        ci = int(getattr(data, "computeInstanceId", _INSTANCE_ANY))
        if gi != _INSTANCE_ANY:
            where += f" MIG GPU instance {gi}" + (f" compute instance {ci}" if ci != _INSTANCE_ANY else "")
        return f"{what} on {where}" + (f"; the driver recommends: {action}" if action else "")

    # -- rate-limited logging ----------------------------------------------------------------

    def _trouble(self, key: str, event: str, **kv: Any) -> None:
        self._log_limited(key, event, level="error", **kv)

    def _log_limited(self, key: str, event: str, *, level: str = "warning", **kv: Any) -> None:
        """Log ``event`` at most once per LOG_EVERY_S per ``key``; the next line says how many
        were suppressed in between (``collectors.log_limit``)."""
        self._limiter.emit(key, self._monotonic(), getattr(log, level), event, **kv)
