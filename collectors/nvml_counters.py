"""GPU health counters for the NVML backend: ECC, retired pages, row remapping, NVLink, PCIe
replay, the driver's recovery action and the throttle-reason durations.

Why a module of its own: these readers share a shape the per-tick readers in
:mod:`collectors.nvml` do not have. Each counter changes only when something goes wrong (an ECC
error, a link retraining, a page retired), so each is read only as often as it can matter
(:func:`health_reader` gates it on the backend's monotonic clock; the first tick reads them
all, and an NVML event on that GPU makes them all due at once). And a health counter that fails
must not blank the GPU's power telemetry, on which capping depends: an error other than
"unsupported" or "GPU lost" leaves that value None this time, is counted, and is asked again
at the next interval, where a failing per-tick reader marks the whole GPU unreadable.

The readers keep the table shape of :mod:`collectors.nvml`: a factory ``(nvml module, GPU
state) -> Reader`` resolves the binding functions once (AttributeError: the bindings are too old,
so the reader is unsupported), and a reader whose call the device does not support raises
NotSupported, after which the backend never asks it again. Values are raw NVML counts; a
counter that goes backwards (driver reload, GPU reset) is the health tracker's to handle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pynvml  # only for its constants (recovery-action names): importing it needs no driver

from collectors.base import GpuSample, NvlinkErrors

Reader = Callable[[Any, GpuSample], None]
"""Reads one NVML call for one device handle and stores the converted values in the sample."""


class GpuState(Protocol):
    """What a reader factory may use of the backend's per-GPU state (``collectors.nvml._Gpu``)."""

    @property
    def monotonic(self) -> Callable[[], float]: ...  # the backend's clock, for the intervals

    handle: Any
    unsupported: set[str]
    ecc_enabled: bool | None  # None: the driver did not say (nvmlDeviceGetEccMode unsupported)
    refresh: int  # bumped when an NVML event arrives for this GPU: the slow readers are due at once
    health_errors: int  # health reads that failed with an error other than unsupported / lost
    nvlink_links: tuple[int, ...]  # the links that were up at attach
    nvlink_totals: dict[str, int]  # NVLink error totals over all links, kept by the field reader


Factory = Callable[[Any, GpuState], Reader]

# How often each counter is read. The first tick reads every one of them, and an NVML event on a
# GPU (Xid, ECC, ...) makes all of that GPU's due on the next tick; after that:
# - ECC error counts, PCIe replays and the field values (recovery action, throttle durations)
#   every 10 s: they move within seconds of a fault, and 10 s keeps a slope (errors per minute)
#   readable for a few calls per GPU.
# - NVLink: the error totals over all links every 10 s (four entries in the per-tick
#   field-values call); the per-link counters, 4 calls a link (72 on an 18-link H200, 576 on an
#   8-GPU node), only when a total moved, after an NVML event (an NVLink fault is Xid 74), and
#   at least every 10 min; every 60 s where the driver has no totals. Read every 10 s, the
#   per-link counters alone would cost more CPU than the rest of a 1 Hz tick's reads
#   (bench/overhead.py, bench/nvml_latency.py on the fake).
# - Retired pages and row remapping every 60 s: they change only after an uncorrectable error
#   (which is an event too) and what follows from them, a reset at the next idle moment, is not
#   a matter of seconds.
ECC_MIN_INTERVAL_S = 10.0
PCIE_MIN_INTERVAL_S = 10.0
NVLINK_MIN_INTERVAL_S = 10.0  # how often the nvlink reader looks at the totals
NVLINK_LINKS_MAX_AGE_S = 600.0  # the per-link counters at least this often, totals standing still
NVLINK_LINKS_INTERVAL_S = 60.0  # the per-link counters this often where the driver has no totals
FIELDS_MIN_INTERVAL_S = 10.0
REMAP_MIN_INTERVAL_S = 60.0
RETIRED_MIN_INTERVAL_S = 60.0

# nvmlDeviceGpuRecoveryAction_t -> the BackendEvent / GpuSample name (only those the bindings have)
RECOVERY_ACTIONS: dict[int, str] = {
    getattr(pynvml, const): name
    for const, name in (
        ("NVML_GPU_RECOVERY_ACTION_NONE", "none"),
        ("NVML_GPU_RECOVERY_ACTION_GPU_RESET", "reset_gpu"),
        ("NVML_GPU_RECOVERY_ACTION_NODE_REBOOT", "reboot"),
        ("NVML_GPU_RECOVERY_ACTION_DRAIN_P2P", "drain_p2p"),
        ("NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET", "drain_and_reset"),
        ("NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN", "recover_imex_domain"),
        ("NVML_GPU_RECOVERY_ACTION_BUS_RESET", "bus_reset"),
        ("NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT", "system_reboot"),
    )
    if hasattr(pynvml, const)
}


def recovery_action_name(value: int) -> str:
    """The driver's recommended action as a name; a value newer than the bindings stays visible."""
    return RECOVERY_ACTIONS.get(int(value), f"unknown_{int(value)}")


def union_members(nv: Any) -> dict[int, str]:
    """``NVML_VALUE_TYPE_*`` -> the member of ``c_nvmlValue_t`` that holds a value of that type."""
    return {
        nv.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        nv.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }


def unsupported_codes(nv: Any) -> frozenset[int]:
    """NVML return codes that mean "this device or driver cannot answer that call"."""
    names = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_ARGUMENT_VERSION_MISMATCH")
    return frozenset(getattr(nv, n) for n in names if hasattr(nv, n))


# -- field values -------------------------------------------------------------------------------

FieldTarget = tuple[str, str, Callable[[Any], Any], str]
"""(binding constant of the field id, GpuSample attribute, conversion of the raw value, name in
the GPU's unsupported set). An attribute ``@key`` keeps the value on the GPU's state instead
(``g.nvlink_totals[key]``): read for another reader, not reported."""


def fields_factory(
    targets: Sequence[FieldTarget], slow: Sequence[FieldTarget] = (), slow_interval_s: float = math.inf
) -> Factory:
    """A reader of several field ids in one nvmlDeviceGetFieldValues call per tick.

    ``targets`` are asked on every tick; ``slow`` ride along in the same call at most every
    ``slow_interval_s`` on the monotonic clock (and at once after an NVML event for the GPU),
    so a tick makes one field-values call whatever is due. Each entry carries its own
    nvmlReturn: an entry that is NOT_SUPPORTED is not asked again (the reader as a whole is
    dropped when none is left), GPU_IS_LOST raises, any other per-entry error leaves that value
    None this time. A field id the bindings lack is unsupported.
    """

    def factory(nv: Any, g: GpuState) -> Reader:
        get = nv.nvmlDeviceGetFieldValues
        success, not_supported, lost = nv.NVML_SUCCESS, nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_GPU_IS_LOST
        members = union_members(nv)
        by_id: dict[int, tuple[str, Callable[[Any], Any], str]] = {}

        def resolve(group: Sequence[FieldTarget]) -> list[int]:
            ids = []
            for const, attr, convert, name in group:
                fid = getattr(nv, const, None)
                if fid is None:
                    g.unsupported.add(name)
                elif name not in g.unsupported:
                    by_id[fid] = (attr, convert, name)
                    ids.append(fid)
            return ids

        fast, slow_ids = resolve(targets), resolve(slow)
        if not fast and not slow_ids:
            raise AttributeError("no supported field ids")  # treated like a binding without the call
        monotonic = g.monotonic
        slow_state = [-math.inf, g.refresh]  # last slow read (monotonic s), refresh generation seen

        def read(handle: Any, s: GpuSample) -> None:
            ask = fast
            if slow_ids:
                now, generation = monotonic(), g.refresh
                if now - slow_state[0] >= slow_interval_s or generation != slow_state[1]:
                    ask = fast + slow_ids
                    slow_state[0], slow_state[1] = now, generation
            if not ask:
                return
            dropped = False
            for v in get(handle, ask):
                ret = v.nvmlReturn
                if ret == success:
                    member = members.get(v.valueType)
                    if member is not None:
                        attr, convert, _ = by_id[v.fieldId]
                        if attr[0] == "@":
                            g.nvlink_totals[attr[1:]] = convert(getattr(v.value, member))
                        else:
                            setattr(s, attr, convert(getattr(v.value, member)))
                elif ret == not_supported:
                    g.unsupported.add(by_id[v.fieldId][2])
                    (fast if v.fieldId in fast else slow_ids).remove(v.fieldId)
                    dropped = True
                elif ret == lost:
                    raise nv.NVMLError(ret)
                # any other per-entry error: that value is None this time, asked again next time
            if dropped and not fast and not slow_ids:
                raise nv.NVMLError(not_supported)

        return read

    return factory


def read_recovery_action(nv: Any, handle: Any) -> str | None:
    """The driver's recommended action for a GPU right now, or None where it offers none.

    One nvmlDeviceGetFieldValues call; used by the event watcher just after an Xid, when the
    action the driver recommends for that Xid is what the operator needs.
    """
    fid = getattr(nv, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
    if fid is None:
        return None
    (v,) = nv.nvmlDeviceGetFieldValues(handle, [fid])
    if v.nvmlReturn != nv.NVML_SUCCESS:
        return None
    member = union_members(nv).get(v.valueType)
    return recovery_action_name(getattr(v.value, member)) if member is not None else None


# -- gating and error policy --------------------------------------------------------------------


def health_reader(interval_s: float, factory: Factory) -> Factory:
    """``factory``'s reader, asked at most every ``interval_s`` (monotonic), and soft on errors.

    Due on the first tick, then every ``interval_s``, and at once when ``g.refresh`` has moved
    (an NVML event for this GPU). Unsupported and GPU_IS_LOST pass through to the backend (drop
    the reader; mark the GPU down); any other NVML error is counted in ``g.health_errors`` and the
    values it would have set stay None until the next interval.
    """

    def build(nv: Any, g: GpuState) -> Reader:
        read = factory(nv, g)
        monotonic, error = g.monotonic, nv.NVMLError
        passes = unsupported_codes(nv) | {nv.NVML_ERROR_GPU_IS_LOST}
        state = [-math.inf, g.refresh]  # last read (monotonic s), refresh generation seen

        def gated(h: Any, s: GpuSample) -> None:
            now, generation = monotonic(), g.refresh
            if now - state[0] < interval_s and generation == state[1]:
                return
            try:
                read(h, s)
            except error as e:
                if e.value in passes:
                    raise
                g.health_errors += 1
            state[0], state[1] = now, generation

        return gated

    return build


# -- the readers --------------------------------------------------------------------------------


def _ecc(counter_type: str, corrected_attr: str, uncorrected_attr: str) -> Factory:
    """Corrected and uncorrected ECC totals of one counter type (volatile or aggregate)."""

    def factory(nv: Any, g: GpuState) -> Reader:
        if g.ecc_enabled is False:
            raise AttributeError("ECC is disabled on this GPU: its counters mean nothing")
        get = nv.nvmlDeviceGetTotalEccErrors
        corrected, uncorrected = nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        counter = getattr(nv, counter_type)

        def read(h: Any, s: GpuSample) -> None:
            setattr(s, corrected_attr, int(get(h, corrected, counter)))
            setattr(s, uncorrected_attr, int(get(h, uncorrected, counter)))

        return read

    return factory


ecc_volatile = _ecc("NVML_VOLATILE_ECC", "ecc_sbe_volatile", "ecc_dbe_volatile")
ecc_aggregate = _ecc("NVML_AGGREGATE_ECC", "ecc_sbe_aggregate", "ecc_dbe_aggregate")


def retired_pages(nv: Any, g: GpuState) -> Reader:
    """Pages retired for each cause and whether a retirement waits for a reset (pre-Ampere GPUs;
    Ampere and later answer NOT_SUPPORTED and remap rows instead)."""
    if g.ecc_enabled is False:
        raise AttributeError("ECC is disabled on this GPU: no page retirement")
    get, pending = nv.nvmlDeviceGetRetiredPages, nv.nvmlDeviceGetRetiredPagesPendingStatus
    sbe = nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    dbe = nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    enabled = nv.NVML_FEATURE_ENABLED

    def read(h: Any, s: GpuSample) -> None:
        s.retired_pages_sbe = len(get(h, sbe))
        s.retired_pages_dbe = len(get(h, dbe))
        s.retired_pages_pending = pending(h) == enabled

    return read


def remapped_rows(nv: Any, g: GpuState) -> Reader:
    """Row remapping (Ampere and later): rows remapped per cause, a remap pending, a failure."""
    get = nv.nvmlDeviceGetRemappedRows

    def read(h: Any, s: GpuSample) -> None:
        corrected, uncorrected, pending, failure = get(h)
        s.remap_correctable_rows = int(corrected)
        s.remap_uncorrectable_rows = int(uncorrected)
        s.remap_pending = bool(pending)
        s.remap_failure = bool(failure)

    return read


def pcie_replay(nv: Any, g: GpuState) -> Reader:
    """The PCIe replay counter: link-level retransmissions, a sign of a marginal slot or riser."""
    get = nv.nvmlDeviceGetPcieReplayCounter

    def read(h: Any, s: GpuSample) -> None:
        s.pcie_replay = int(get(h))

    return read


NVLINK_COUNTERS = (  # NvlinkErrors attribute -> binding constant of the counter
    ("replay", "NVML_NVLINK_ERROR_DL_REPLAY"),
    ("recovery", "NVML_NVLINK_ERROR_DL_RECOVERY"),
    ("crc_flit", "NVML_NVLINK_ERROR_DL_CRC_FLIT"),
    ("crc_data", "NVML_NVLINK_ERROR_DL_CRC_DATA"),
)


def active_nvlinks(nv: Any, handle: Any) -> tuple[int, ...]:
    """The NVLinks that are up, asked once per link up to ``NVML_NVLINK_MAX_LINKS``.

    INVALID_ARGUMENT means "past this GPU's last link"; NOT_SUPPORTED on link 0 means no NVLink
    at all (raised as AttributeError: the reader is unsupported). GPU_IS_LOST raises. Any other
    error on one link leaves that link out.
    """
    state, err = nv.nvmlDeviceGetNvLinkState, nv.NVMLError
    unsupported, enabled = unsupported_codes(nv), nv.NVML_FEATURE_ENABLED
    active: list[int] = []
    for link in range(nv.NVML_NVLINK_MAX_LINKS):
        try:
            up = state(handle, link)
        except err as e:
            if e.value == nv.NVML_ERROR_INVALID_ARGUMENT:
                break
            if e.value in unsupported:
                if link == 0:
                    raise AttributeError("no NVLink on this GPU") from e
                break
            if e.value == nv.NVML_ERROR_GPU_IS_LOST:
                raise
            continue
        if up == enabled:
            active.append(link)
    return tuple(active)


def nvlink(nv: Any, g: GpuState) -> Reader:
    """NVLink error counters per link that was up at attach (``nvmlDeviceGetNvLinkState`` is
    asked here, once; a link that comes up later is seen at the next attach).

    The per-link counters are 4 calls a link (72 on an H200). Where the driver has the totals
    over all links (``NVML_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL``, read every 10 s in the per-tick
    field-values call, see NVLINK_TOTALS), the links are read only when a total moved, after an
    NVML event on this GPU, and at least every NVLINK_LINKS_MAX_AGE_S; without the totals, every
    NVLINK_LINKS_INTERVAL_S. On the first tick always. ``s.nvlink`` is None on the ticks they
    are not read.

    A (link, counter) pair the device does not support is not asked again; the reader is dropped
    when none is left. GPU_IS_LOST raises; any other error leaves that counter None this time.
    """
    get, err = nv.nvmlDeviceGetNvLinkErrorCounter, nv.NVMLError
    counters = [(attr, getattr(nv, const)) for attr, const in NVLINK_COUNTERS]
    links = active_nvlinks(nv, g.handle)
    if not links:
        raise AttributeError("no NVLink is up on this GPU")
    g.nvlink_links = links
    pairs = [(link, attr, code) for link in links for attr, code in counters]
    unsupported, lost = unsupported_codes(nv), nv.NVML_ERROR_GPU_IS_LOST
    monotonic = g.monotonic
    last: list[Any] = [None, -math.inf, g.refresh]  # totals acted on, when (monotonic s), refresh generation

    def read(h: Any, s: GpuSample) -> None:
        now, generation = monotonic(), g.refresh
        totals = tuple(sorted(g.nvlink_totals.items())) or None
        if generation == last[2]:
            age = now - last[1]
            if totals is not None and totals == last[0] and age < NVLINK_LINKS_MAX_AGE_S:
                return  # no total moved: no link has a new error to find
            if totals is None and age < NVLINK_LINKS_INTERVAL_S:
                return
        values: dict[int, dict[str, int]] = {link: {} for link in links}
        for pair in tuple(pairs):
            link, attr, code = pair
            try:
                values[link][attr] = int(get(h, link, code))
            except err as e:
                if e.value in unsupported:
                    pairs.remove(pair)
                elif e.value == lost:
                    raise
                else:
                    g.health_errors += 1
        if not pairs:
            raise nv.NVMLError(nv.NVML_ERROR_NOT_SUPPORTED)
        s.nvlink = tuple(NvlinkErrors(link, **values[link]) for link in links)
        last[0], last[1], last[2] = totals, now, generation

    return read


# The field values that ride along in the per-tick field-values call every FIELDS_MIN_INTERVAL_S
# (collectors.nvml uses them): the driver's recommended recovery action (newer drivers) and how
# long each limiter held the clocks below the application clocks since the driver loaded (ns).
# The perf-policy ids (74-79) are used rather than the newer
# NVML_FI_DEV_CLOCKS_EVENT_REASON_*_SLOWDOWN ids: those were renumbered between nvidia-ml-py
# releases (251-253, then 269-271), so the id a binding sends may mean another field to the
# driver it meets.
# The NVLink error totals over all links: kept on the GPU's state (not reported) for the nvlink
# reader, which reads the 72 per-link counters only when one of these moved.
NVLINK_TOTALS: tuple[FieldTarget, ...] = (
    ("NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "@replay", int, "nvlink_total_replay"),
    ("NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "@recovery", int, "nvlink_total_recovery"),
    ("NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "@crc_flit", int, "nvlink_total_crc_flit"),
    ("NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "@crc_data", int, "nvlink_total_crc_data"),
)
HEALTH_FIELDS: tuple[FieldTarget, ...] = (
    *NVLINK_TOTALS,
    ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "recovery_action", recovery_action_name, "recovery_action"),
    ("NVML_FI_DEV_PERF_POLICY_POWER", "throttle_power_ns", int, "throttle_power"),
    ("NVML_FI_DEV_PERF_POLICY_THERMAL", "throttle_thermal_ns", int, "throttle_thermal"),
    ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "throttle_board_limit_ns", int, "throttle_board_limit"),
    ("NVML_FI_DEV_PERF_POLICY_RELIABILITY", "throttle_reliability_ns", int, "throttle_reliability"),
)

# The shortest of the health readers' intervals: the backend asks them no more often than this.
HEALTH_MIN_INTERVAL_S = min(ECC_MIN_INTERVAL_S, PCIE_MIN_INTERVAL_S, NVLINK_MIN_INTERVAL_S, REMAP_MIN_INTERVAL_S,
                            RETIRED_MIN_INTERVAL_S)

# name -> factory, in the order the backend runs them (after the per-tick readers)
HEALTH_READERS: dict[str, Factory] = {
    "ecc_volatile": health_reader(ECC_MIN_INTERVAL_S, ecc_volatile),
    "ecc_aggregate": health_reader(ECC_MIN_INTERVAL_S, ecc_aggregate),
    "retired_pages": health_reader(RETIRED_MIN_INTERVAL_S, retired_pages),
    "remapped_rows": health_reader(REMAP_MIN_INTERVAL_S, remapped_rows),
    "nvlink": health_reader(NVLINK_MIN_INTERVAL_S, nvlink),
    "pcie_replay": health_reader(PCIE_MIN_INTERVAL_S, pcie_replay),
}
