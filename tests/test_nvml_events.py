"""The NVML event watcher (collectors/nvml_events.py) on the fake NVML: each event type, the flood,
a GPU lost mid-wait, errors from the wait, stopping, and the backend's wiring (open / close /
drain_events / event_stats). No test sleeps: each waits for a condition with a deadline
(``FakeNvml.wait_for``); the fake's wait really blocks on a condition up to its timeout.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import operator
import threading
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest
import structlog

from collectors.base import BackendEvent
from collectors.nvml import NvmlBackend
from collectors.nvml_events import EVENT_TYPES, EventWatcher, handle_key
from tests.fake_pynvml import Clock, FakeGpu, FakeHandle, FakeNvml

XID = pynvml.nvmlEventTypeXidCriticalError
SBE = pynvml.nvmlEventTypeSingleBitEccError
DBE = pynvml.nvmlEventTypeDoubleBitEccError
RECOVERY = pynvml.nvmlEventTypeGpuRecoveryAction
KNOWN = [(getattr(pynvml, const), kind) for const, kind in EVENT_TYPES if hasattr(pynvml, const)]
ALL_TYPES = functools.reduce(operator.or_, (bit for bit, _ in KNOWN))




@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wall() -> Callable[[], int]:
    ticks = itertools.count(1_000_000)  # thread-safe enough: next() on a count is atomic in CPython
    return lambda: next(ticks)


@pytest.fixture
def make(clock: Clock, wall: Callable[[], int]) -> Iterator[Callable[..., NvmlBackend]]:
    """Open backends with a short event wait; every one is closed at the end of the test."""
    made: list[NvmlBackend] = []

    def _make(fake: FakeNvml, **kw: object) -> NvmlBackend:
        options: dict = {"event_wait_ms": 50, "event_backoff_s": 0.01, **kw}
        b = NvmlBackend(fake, monotonic=clock, wall_ns=wall, **options)
        b.open()
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()


def h200s(n: int = 2, **values: object) -> FakeNvml:
    return FakeNvml([FakeGpu(name="NVIDIA H200", **values) for _ in range(n)])  # type: ignore[arg-type]


def take(b: NvmlBackend, fake: FakeNvml, n: int, timeout_s: float = 5.0) -> list[BackendEvent]:
    """Drain until ``n`` events came (or fail at the deadline)."""
    got: list[BackendEvent] = []

    def enough() -> bool:
        got.extend(b.drain_events())
        return len(got) >= n

    assert fake.wait_for(enough, timeout_s), got
    return got


def rebuilt(fake: FakeNvml, b: NvmlBackend) -> bool:
    """The watcher has rebuilt its set after a lost GPU and waits on the new one."""
    return len(fake.event_sets) == 2 and fake.event_sets[0].freed and fake.waiting == 1


def watcher_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "nvml-events")


# -- each event type ------------------------------------------------------------------------------


@pytest.mark.parametrize(("bit", "kind"), KNOWN, ids=[k for _, k in KNOWN])
def test_each_event_type_becomes_a_backend_event(bit: int, kind: str, make, wall) -> None:
    fake = h200s(2, supported_events=ALL_TYPES, recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET)
    b = make(fake)
    assert kind in b.event_watch()[1]
    data = 79 if kind == "xid" else 0
    assert fake.inject_event(1, bit, data) == 1
    (ev,) = take(b, fake, 1)
    assert (ev.gpu_index, ev.kind) == (1, kind)
    assert ev.ts_ns >= 1_000_000  # stamped with the injected wall clock
    assert fake.gpus[1].uuid in ev.message
    if kind == "xid":
        assert ev.xid == 79 and "Xid 79" in ev.message
    else:
        assert ev.xid is None
    # the driver's recommended action is read just after an Xid or a recovery-action event
    assert ev.action == ("drain_and_reset" if kind in ("xid", "recovery_action") else None)
    assert b.event_stats()["nvml_events"] == 1


def test_xid_without_the_recovery_field_has_no_action_and_the_field_is_asked_once(make) -> None:
    fake = FakeNvml([FakeGpu(name="NVIDIA A100-SXM4-80GB")])  # the model has no recovery-action field
    b = make(fake)
    before = fake.gpus[0].calls["NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"]
    fake.inject_events(0, XID, [13, 31, 43])
    events = take(b, fake, 3)
    assert [(e.kind, e.xid, e.action) for e in events] == [("xid", 13, None), ("xid", 31, None), ("xid", 43, None)]
    assert fake.gpus[0].calls["NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"] - before == 1


def test_mig_instance_ids_are_named_in_the_message(make) -> None:
    fake = h200s(1)
    b = make(fake)
    fake.inject_event(0, XID, 43, gpu_instance=2, compute_instance=0)
    fake.inject_event(0, XID, 31)  # no MIG instance: NVML_GPU_INSTANCE_ID_ANY
    mig, plain = take(b, fake, 2)
    assert "MIG GPU instance 2 compute instance 0" in mig.message
    assert "MIG" not in plain.message


def test_a_gpu_is_registered_only_for_the_types_it_supports(make) -> None:
    fake = FakeNvml([FakeGpu(name="NVIDIA H200"), FakeGpu(name="Tesla V100-SXM2-16GB"), FakeGpu(name="Fake GPU")])
    b = make(fake)
    assert b.event_watch() == {0: ["xid", "ecc_sbe", "ecc_dbe", "recovery_action"],
                               1: ["xid", "ecc_sbe", "ecc_dbe"], 2: []}  # fmt: skip
    # an event type the GPU was not registered for never reaches the set
    assert fake.inject_event(1, RECOVERY) == 0
    assert fake.inject_event(2, XID, 79) == 0
    assert fake.inject_event(1, DBE) == 1
    (ev,) = take(b, fake, 1)
    assert (ev.gpu_index, ev.kind) == (1, "ecc_dbe")


def test_a_refused_type_is_left_out_and_recorded_the_others_registered(clock: Clock) -> None:
    fake = h200s(1, register_refused=SBE)  # claimed by GetSupportedEventTypes, refused on register
    fake.nvmlInit()
    w = EventWatcher(fake, [(0, fake.gpus[0].uuid, FakeHandle(0))], monotonic=clock, wait_timeout_ms=50)
    try:
        assert w.start()
        assert w.registered() == {0: ["xid", "ecc_dbe", "recovery_action"]}
        assert w.refused() == {0: {"ecc_sbe": "Not Supported"}}
    finally:
        assert w.stop()


def test_no_supported_event_type_starts_no_thread(make) -> None:
    before = watcher_threads()
    fake = FakeNvml.with_gpus(2)  # the default model: no event types
    b = make(fake)
    assert watcher_threads() == before
    assert b.event_watch() == {0: [], 1: []}
    assert all(es.freed for es in fake.event_sets)  # created to try, freed at once
    assert b.event_stats() == {"nvml_events": 0, "nvml_events_dropped": 0, "nvml_event_errors": 0,
                               "nvml_event_unknown_device": 0, "nvml_event_gpus": 0,
                               "nvml_health_read_errors": 0}  # fmt: skip


@pytest.mark.parametrize("how", ["not_in_bindings", "create_fails", "events_off"])
def test_without_the_event_api_the_backend_still_reads(how: str, make) -> None:
    before = watcher_threads()
    fake = h200s(2)
    if how == "not_in_bindings":
        fake.hidden.add("nvmlEventSetCreate")
    elif how == "create_fails":
        fake.errors["nvmlEventSetCreate"] = pynvml.NVML_ERROR_UNKNOWN
    with structlog.testing.capture_logs() as logs:
        b = make(fake, events=(how != "events_off"))
    assert watcher_threads() == before
    assert b.event_watch() == {0: [], 1: []}
    assert all(s.healthy and s.power_w == 352.5 for s in b.sample(1))
    assert fake.event_sets == []
    if how == "create_fails":
        (line,) = [e for e in logs if e["event"] == "nvml_events_unavailable"]
        assert "nvmlEventSetCreate" in line["reason"] and line["log_level"] == "warning"


def test_bindings_without_the_v2_wait_use_the_first_one(make) -> None:
    fake = h200s(1)
    fake.hidden.add("nvmlEventSetWait_v2")
    b = make(fake)
    fake.inject_event(0, XID, 63)
    (ev,) = take(b, fake, 1)
    assert ev.xid == 63 and fake.calls["nvmlEventSetWait"] >= 1 and fake.calls["nvmlEventSetWait_v2"] == 0


def test_a_gpu_down_at_open_is_watched_once_the_backend_reads_it(make, clock: Clock, wall) -> None:
    fake = h200s(1)
    fake.gpus[0].lost = True  # down when the daemon starts: nothing to watch yet, no thread
    before = watcher_threads()
    b = make(fake)
    assert watcher_threads() == before and b.event_watch() == {0: []}
    fake.gpus[0].lost = False
    clock.t += 5.0
    assert b.sample(wall())[0].healthy
    assert fake.wait_for(lambda: b.event_watch()[0] == ["xid", "ecc_sbe", "ecc_dbe", "recovery_action"])
    fake.inject_event(0, XID, 45)
    assert [e.kind for e in take(b, fake, 3)] == ["gpu_lost", "gpu_recovered", "xid"]


def test_an_event_for_an_unknown_device_is_counted_and_dropped(make) -> None:
    fake = h200s(1)
    b = make(fake)
    fake.inject_event(0, XID, 79, device=FakeHandle(99))
    assert fake.wait_for(lambda: b.event_stats()["nvml_event_unknown_device"] == 1)
    assert b.drain_events() == []
    fake.inject_event(0, XID, 48)  # and the watch goes on
    (ev,) = take(b, fake, 1)
    assert ev.xid == 48


# -- the flood ------------------------------------------------------------------------------------


def test_a_flood_is_bounded_counted_logged_once_and_stop_still_answers(clock: Clock) -> None:
    fake = h200s(2)
    fake.nvmlInit()
    queue_max = 100
    w = EventWatcher(fake, [(i, g.uuid, FakeHandle(i)) for i, g in enumerate(fake.gpus)], monotonic=clock,
                     wait_timeout_ms=50, queue_max=queue_max)
    highest = [0]
    with structlog.testing.capture_logs() as logs:
        assert w.start()
        fake.inject_events(0, XID, range(50_000))  # a broken GPU: 50,000 Xids at once

        def consumed() -> bool:
            highest[0] = max(highest[0], w.pending())
            return fake.pending_events() == 0 and w.stats()["nvml_events"] == 50_000

        assert fake.wait_for(consumed, timeout_s=60)
    assert highest[0] <= queue_max  # never more than queue_max held
    stats = w.stats()
    assert stats["nvml_events_dropped"] == stats["nvml_events_dropped_xid"] == 50_000 - queue_max
    kept = w.drain()
    assert [e.xid for e in kept] == list(range(queue_max))  # the first ones (the cause) are kept
    # the log: one line for the drops (per kind, per minute), not one per event
    dropped_lines = [e for e in logs if e["event"] == "nvml_events_dropped"]
    assert len(dropped_lines) == 1 and dropped_lines[0]["kind"] == "xid"
    assert len(logs) <= 3, logs
    # a second flood, and stop() answers within the wait timeout plus a margin
    fake.inject_events(1, DBE, range(50_000))
    assert fake.wait_for(lambda: w.stats()["nvml_events"] > 50_000)
    t0 = time.monotonic()
    assert w.stop()
    assert time.monotonic() - t0 < 1.0
    assert not w.running and all(es.freed for es in fake.event_sets)


def test_drops_are_counted_per_kind_and_draining_makes_room(make) -> None:
    fake = h200s(1)
    b = make(fake, event_queue_max=3)
    fake.inject_events(0, XID, [1, 2, 3, 4])
    fake.inject_events(0, DBE, [0, 0])
    assert fake.wait_for(lambda: b.event_stats()["nvml_events"] == 6)
    stats = b.event_stats()
    assert (stats["nvml_events_dropped"], stats["nvml_events_dropped_xid"], stats["nvml_events_dropped_ecc_dbe"]) == (
        3, 1, 2)
    assert [e.xid for e in b.drain_events()] == [1, 2, 3]
    fake.inject_event(0, XID, 5)
    (ev,) = take(b, fake, 1)
    assert ev.xid == 5


# -- trouble on the wait --------------------------------------------------------------------------


def test_nvml_errors_from_the_wait_are_survived_and_logged_once_a_minute(make, clock: Clock) -> None:
    fake = h200s(1)
    with structlog.testing.capture_logs() as logs:
        b = make(fake)
        fake.fail_wait(pynvml.NVML_ERROR_UNKNOWN, times=3)
        assert fake.wait_for(lambda: b.event_stats()["nvml_event_errors"] == 3)
        fake.inject_event(0, XID, 94)
        (ev,) = take(b, fake, 1)
        assert ev.xid == 94
        failed = [e for e in logs if e["event"] == "nvml_events_wait_failed"]
        assert len(failed) == 1 and "Unknown Error" in failed[0]["error"] and failed[0]["log_level"] == "error"
        # a minute later the same error is logged again, with how many were not
        clock.t += 61
        fake.fail_wait(pynvml.NVML_ERROR_UNKNOWN)
        assert fake.wait_for(lambda: b.event_stats()["nvml_event_errors"] == 4)
        assert fake.wait_for(lambda: len([e for e in logs if e["event"] == "nvml_events_wait_failed"]) == 2)
    second = [e for e in logs if e["event"] == "nvml_events_wait_failed"][1]
    assert second["suppressed"] == 2


def test_a_non_nvml_exception_from_the_wait_is_survived_too(make) -> None:
    fake = h200s(1)
    real_wait = fake.nvmlEventSetWait_v2
    calls = [0]

    def flaky(es: object, timeout_ms: int) -> object:
        calls[0] += 1
        if calls[0] <= 2:
            raise RuntimeError("a binding surprise")
        return real_wait(es, timeout_ms)  # type: ignore[arg-type]

    fake.nvmlEventSetWait_v2 = flaky  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        b = make(fake)
        fake.inject_event(0, XID, 92)
        (ev,) = take(b, fake, 1)
    assert ev.xid == 92 and b.event_stats()["nvml_event_errors"] == 2
    assert [e["error"] for e in logs if e["event"] == "nvml_events_wait_failed"] == ["RuntimeError: a binding surprise"]


def test_an_event_type_the_bindings_do_not_name_is_kept_as_other(make) -> None:
    fake = h200s(1, supported_events=XID | (1 << 40))
    b = make(fake)
    # registered for the types the collector wants only: the unknown bit is not asked for
    assert b.event_watch() == {0: ["xid"]}
    fake.event_sets[-1].registered[0] |= 1 << 40  # a driver that sends it anyway
    fake.inject_event(0, 1 << 40, 5)
    (ev,) = take(b, fake, 1)
    assert ev.kind == "other" and "type 0x10000000000" in ev.message and "data 5" in ev.message


def test_a_distinct_error_is_logged_even_within_the_minute(make) -> None:
    fake = h200s(1)
    with structlog.testing.capture_logs() as logs:
        b = make(fake)
        fake.fail_wait(pynvml.NVML_ERROR_UNKNOWN)
        fake.fail_wait(pynvml.NVML_ERROR_IRQ_ISSUE)
        assert fake.wait_for(lambda: b.event_stats()["nvml_event_errors"] == 2)
        assert fake.wait_for(lambda: len([e for e in logs if e["event"] == "nvml_events_wait_failed"]) == 2)


def test_a_gpu_lost_mid_wait_does_not_blind_the_others_and_is_watched_again_when_back(make, clock: Clock) -> None:
    fake = h200s(3)
    b = make(fake)
    assert fake.wait_for(lambda: fake.waiting == 1)
    fake.set_lost(1)  # falls off the bus while the watcher waits: the wait answers GPU_IS_LOST
    assert fake.wait_for(lambda: b.event_watch()[1] == [] and b.event_stats()["nvml_event_gpus"] == 2)
    live = [es for es in fake.event_sets if not es.freed]
    assert len(live) == 1 and sorted(live[0].registered) == [0, 2]  # rebuilt without GPU 1
    assert b.event_stats()["nvml_event_errors"] >= 1
    fake.inject_event(0, XID, 79)
    fake.inject_event(2, DBE)
    assert [(e.gpu_index, e.kind) for e in take(b, fake, 2)] == [(0, "xid"), (2, "ecc_dbe")]
    # the backend sees GPU 1 lost, then back after its retry: the watcher registers it again
    assert not b.sample(1)[1].healthy
    fake.set_lost(1, False)
    clock.t += 5.0
    assert b.sample(2)[1].healthy
    assert fake.wait_for(lambda: b.event_watch()[1] == ["xid", "ecc_sbe", "ecc_dbe", "recovery_action"])
    fake.inject_event(1, XID, 48)
    events = take(b, fake, 3)
    assert [(e.gpu_index, e.kind) for e in events] == [(1, "gpu_lost"), (1, "gpu_recovered"), (1, "xid")]


def test_a_lost_gpu_is_tried_again_on_the_monotonic_clock(make, clock: Clock) -> None:
    fake = h200s(2)
    b = make(fake)
    fake.set_lost(1)
    assert fake.wait_for(lambda: rebuilt(fake, b))
    assert b.event_watch()[1] == []
    fake.set_lost(1, False)  # back, and the backend has not noticed (no sample)
    tries = fake.gpus[1].calls["nvmlDeviceGetSupportedEventTypes"]
    assert not fake.wait_for(lambda: b.event_watch()[1] != [], timeout_s=0.2)  # not before REREGISTER_S
    assert fake.gpus[1].calls["nvmlDeviceGetSupportedEventTypes"] == tries
    clock.t += 31.0
    assert fake.wait_for(lambda: b.event_watch()[1] != [])


def test_the_set_is_lost_with_every_gpu_and_rebuilt_when_they_answer(make, clock: Clock) -> None:
    fake = h200s(1)
    b = make(fake)
    fake.set_lost(0)
    assert fake.wait_for(lambda: rebuilt(fake, b))
    assert b.event_watch()[0] == [] and b.event_stats()["nvml_event_gpus"] == 0
    fake.set_lost(0, False)
    clock.t += 31.0
    assert fake.wait_for(lambda: b.event_watch()[0] != [])
    fake.inject_event(0, XID, 119)
    (ev,) = take(b, fake, 1)
    assert ev.xid == 119


# -- stopping and the backend's wiring ------------------------------------------------------------


def test_stop_returns_within_the_wait_timeout_and_frees_the_set(clock: Clock) -> None:
    fake = h200s(1)
    fake.nvmlInit()
    w = EventWatcher(fake, [(0, fake.gpus[0].uuid, FakeHandle(0))], monotonic=clock)  # the default 500 ms wait
    assert w.start()
    assert fake.wait_for(lambda: fake.waiting == 1)
    t0 = time.monotonic()
    assert w.stop()
    assert time.monotonic() - t0 < 0.5 + 0.3
    assert not w.running and fake.event_sets[0].freed and fake.calls["nvmlEventSetFree"] == 1
    assert w.stop()  # twice is fine
    assert fake.calls["nvmlEventSetFree"] == 1


def test_the_wait_blocks_for_its_timeout_and_does_not_spin(make) -> None:
    fake = h200s(1)
    es = None
    fake.nvmlInit()
    es = fake.nvmlEventSetCreate()
    t0 = time.monotonic()
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(es, 60)
    assert time.monotonic() - t0 >= 0.06
    with pytest.raises(TypeError):
        fake.nvmlEventSetWait_v2(es, 60.0)  # c_uint(timeoutms), as the real wrapper
    with pytest.raises(TypeError):
        fake.nvmlDeviceRegisterEvents(FakeHandle(0), float(XID), es)  # c_ulonglong(eventTypes)
    fake.nvmlEventSetFree(es)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlEventSetFree(es)  # a double free is refused
    # the watcher on a 50 ms wait: a handful of waits in a quarter second, not thousands
    b = make(fake)
    t0 = time.monotonic()
    fake.wait_for(lambda: time.monotonic() - t0 > 0.25, timeout_s=1)
    assert fake.calls["nvmlEventSetWait_v2"] <= 0.25 / 0.05 + 3
    assert b.event_stats()["nvml_event_errors"] == 0  # timeouts are not errors


def test_close_stops_the_watcher_before_nvml_shuts_down(make) -> None:
    fake = h200s(1)
    b = make(fake)
    order: list[str] = []
    free, shutdown = fake.nvmlEventSetFree, fake.nvmlShutdown
    fake.nvmlEventSetFree = lambda es: (order.append("free"), free(es))[1]  # type: ignore[method-assign]
    fake.nvmlShutdown = lambda: (order.append("shutdown"), shutdown())[1]  # type: ignore[method-assign]
    before = watcher_threads()
    b.close()
    assert order == ["free", "shutdown"]
    assert watcher_threads() == before - 1
    assert b.drain_events() == []  # nothing left to drain from, no error


def test_drain_events_merges_backend_and_nvml_events_in_time_order(clock: Clock) -> None:
    fake = h200s(2)
    ticks = iter(range(100, 10_000, 100))
    b = NvmlBackend(fake, monotonic=clock, wall_ns=lambda: next(ticks), event_wait_ms=50)
    b.open()
    try:
        fake.gpus[1].errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN  # unreadable, not lost
        b.sample(50)  # the backend's gpu_lost is stamped with the sample's time
        fake.inject_event(0, XID, 13)  # stamped 100 or later by the wall clock
        assert fake.wait_for(lambda: b.event_stats()["nvml_events"] == 1)
        fake.inject_event(0, XID, 31)
        assert fake.wait_for(lambda: b.event_stats()["nvml_events"] == 2)
        del fake.gpus[1].errors["nvmlDeviceGetPowerUsage"]
        clock.t += 5.0
        b.sample(150)  # between the two Xids
        events = b.drain_events()
        assert [(e.kind, e.gpu_index) for e in events] == [("gpu_lost", 1), ("xid", 0), ("gpu_recovered", 1),
                                                           ("xid", 0)]  # fmt: skip
        assert [e.ts_ns for e in events] == [50, 100, 150, 200]
    finally:
        b.close()


def test_an_xid_makes_that_gpus_slow_counters_due_at_once(make, clock: Clock) -> None:
    fake = h200s(2)
    b = make(fake)
    b.sample(1)  # the first tick reads every counter
    clock.t += 1.0
    s0, s1 = b.sample(2)
    assert s0.ecc_dbe_volatile is None and s0.remap_pending is None  # not due again for a while
    fake.gpus[0].ecc_counts[(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)] = 1
    fake.gpus[0].remapped_rows = (0, 1, 1, 0)
    fake.inject_event(0, DBE)
    (ev,) = take(b, fake, 1)
    assert ev.kind == "ecc_dbe"
    clock.t += 1.0
    s0, s1 = b.sample(3)
    assert (s0.ecc_dbe_volatile, s0.remap_uncorrectable_rows, s0.remap_pending) == (1, 1, True)
    assert s1.ecc_dbe_volatile is None  # only the GPU the event named
    clock.t += 1.0
    assert b.sample(4)[0].ecc_dbe_volatile is None  # and only once


def test_watcher_refuses_a_bad_wait_timeout_and_queue() -> None:
    fake = h200s(1)
    with pytest.raises(ValueError, match="wait_timeout_ms must be a positive int"):
        EventWatcher(fake, [], wait_timeout_ms=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_max"):
        EventWatcher(fake, [], queue_max=0)


# -- handles --------------------------------------------------------------------------------------


def test_handles_are_compared_by_the_address_they_hold() -> None:
    """The real handles are POINTER(struct_c_nvmlDevice_t); each event's ``device`` is a new
    pointer object to the same address, which compares unequal to the one the look-up gave."""
    address = ctypes.c_void_p(0x7F00_1234_5000)
    looked_up = ctypes.cast(address, pynvml.c_nvmlDevice_t)
    in_event = pynvml.c_nvmlEventData_t(device=ctypes.cast(address, pynvml.c_nvmlDevice_t)).device
    other = ctypes.cast(ctypes.c_void_p(0x7F00_1234_6000), pynvml.c_nvmlDevice_t)
    assert looked_up is not in_event and looked_up != in_event  # why keys are needed
    assert handle_key(looked_up) == handle_key(in_event) != handle_key(other)
    assert handle_key(pynvml.c_nvmlDevice_t()) == ("ptr", None)  # a NULL handle does not crash
    assert handle_key(FakeHandle(3)) == handle_key(FakeHandle(3)) != handle_key(FakeHandle(4))
    unhashable = [1]
    assert handle_key(unhashable) == handle_key(unhashable)
