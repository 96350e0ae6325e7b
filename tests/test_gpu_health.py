"""The health tracker (collectors.gpu_health): every state transition, how each fail clears,
counters that go backwards, sparse counter reads, a flood, and the inputs it must survive."""

from __future__ import annotations

import pytest

from collectors.base import BackendEvent, GpuSample, NvlinkErrors
from collectors.gpu_health import FAIL, OK, SBE_WINDOW_MAX, STATES, WARN, HealthTracker

UUID = "GPU-0000-test"
ZERO = dict(ecc_sbe_volatile=0, ecc_dbe_volatile=0, ecc_sbe_aggregate=0, ecc_dbe_aggregate=0,
            remap_correctable_rows=0, remap_uncorrectable_rows=0, remap_pending=False, remap_failure=False,
            pcie_replay=0)


def sample(index: int = 0, *, t: float = 0.0, healthy: bool = True, error: str | None = None, uuid: str = UUID,
           **counters) -> GpuSample:
    """A reading at ``t`` seconds; counters only where given (None: not read this tick)."""
    if not healthy:
        return GpuSample(index, uuid, "H200", int(t * 1e9), healthy=False, error=error)
    return GpuSample(index, uuid, "H200", int(t * 1e9), power_w=500.0, **counters)


def ev(kind: str, index: int = 0, t: float = 0.0, **kw) -> BackendEvent:
    return BackendEvent(int(t * 1e9), index, kind, kw.pop("message", f"{kind} (test)"), **kw)


class Run:
    """A tracker driven tick by tick; ``tick`` returns the step and keeps the samples."""

    def __init__(self, **kw) -> None:
        self.tracker = HealthTracker(**kw)
        self.samples: list[GpuSample] = []

    def tick(self, *samples: GpuSample, events=(), t: float | None = None):
        now = t if t is not None else (samples[0].ts_ns / 1e9 if samples else 0.0)
        self.samples = list(samples)
        return self.tracker.update(self.samples, events, now, int(now * 1e9))

    def state(self, index: int = 0):
        g = self.tracker.gpus[index]
        return g.state, g.reasons


def kinds(step) -> list[str]:
    return [e.kind for e in step.events]


# -- ok and warn ---------------------------------------------------------------------------------

def test_a_healthy_board_is_ok_with_no_event_and_the_sample_says_so():
    r = Run()
    step = r.tick(sample(**ZERO))
    assert r.state() == (OK, ()) and step.events == [] and step.changed == set() and step.counters_read == {0}
    s = r.samples[0]
    assert (s.health, s.xid_last) == (OK, None)


def test_a_pending_row_remap_warns_until_the_flag_clears():
    r = Run()
    r.tick(sample(**ZERO))
    step = r.tick(sample(t=1, **{**ZERO, "remap_pending": True}))
    state, reasons = r.state()
    assert state == WARN and reasons == ("row remap pending: reset the GPU at the next idle",)
    assert step.changed == {0} and kinds(step) == ["health"] and step.events[0].severity == "warning"
    assert "ok -> warn" in step.events[0].message and r.samples[0].health == WARN
    step = r.tick(sample(t=2, **ZERO))
    assert r.state() == (OK, ()) and "warn -> ok" in step.events[0].message


def test_a_pending_page_retirement_warns():
    r = Run()
    r.tick(sample(retired_pages_sbe=2, retired_pages_dbe=0, retired_pages_pending=True))
    assert r.state() == (WARN, ("page retirement pending: reset the GPU at the next idle",))


def test_corrected_errors_warn_at_the_threshold_within_the_window_and_clear_as_it_slides():
    r = Run()  # 100 within 1 h
    r.tick(sample(t=0, ecc_sbe_volatile=0))
    r.tick(sample(t=60, ecc_sbe_volatile=50))
    r.tick(sample(t=1800, ecc_sbe_volatile=99))
    assert r.state()[0] == OK  # 99 in 30 min: under the threshold
    r.tick(sample(t=1860, ecc_sbe_volatile=100))
    assert r.state()[0] == WARN and "corrected ECC errors rising fast" in r.state()[1][0]
    for t in range(1920, 3600, 60):  # no new errors; the 0 at t=0 is still inside the window
        r.tick(sample(t=t, ecc_sbe_volatile=100))
        assert r.state()[0] == WARN, t
    r.tick(sample(t=3661, ecc_sbe_volatile=100))  # the window now starts after t=60: 100 - 50
    assert r.state() == (OK, ())


def test_a_slow_trickle_of_corrected_errors_never_warns():
    r = Run()
    for k in range(300):  # one error every 40 s: 90 an hour
        r.tick(sample(t=40 * k, ecc_sbe_volatile=k))
        assert r.state()[0] == OK, k


def test_the_corrected_error_window_stays_bounded_and_still_counts():
    r = Run()
    for k in range(5 * SBE_WINDOW_MAX):  # a new value every tick, 10 Hz, for minutes
        r.tick(sample(t=k / 10, ecc_sbe_volatile=k))
    g = r.tracker.gpus[0]
    assert len(g.sbe_window) <= SBE_WINDOW_MAX and g.state == WARN
    for k in range(1000):  # an hour without change: two entries per value at most
        r.tick(sample(t=1000 + k * 10, ecc_sbe_volatile=5 * SBE_WINDOW_MAX - 1))
    assert len(g.sbe_window) <= 3 and g.state == OK


# -- fail, and how it clears -----------------------------------------------------------------------

def test_a_row_remap_failure_fails_while_the_flag_is_set():
    r = Run()
    r.tick(sample(**{**ZERO, "remap_failure": True}))
    state, reasons = r.state()
    assert state == FAIL and "row remapping failed" in reasons[0]
    r.tick(sample(t=1))  # counters not read: the last known flag holds
    assert r.state()[0] == FAIL and r.samples[0].remap_failure is True


def test_xid_79_fails_the_gpu_until_it_reads_again_after_a_reset():
    r = Run()
    r.tick(sample(**ZERO))
    step = r.tick(sample(t=1, healthy=False, error="GPU is lost"),
                  events=[ev("xid", t=1, xid=79, message="Xid 79"), ev("gpu_lost", t=1, message="lost")])
    state, reasons = r.state()
    assert state == FAIL
    assert reasons[0] == "Xid 79: GPU has fallen off the bus: it no longer answers on PCIe (catalogue action: drain_node)"
    assert reasons[1] == "GPU lost: GPU is lost"  # the cause first, its effect after
    xid = step.events[0]
    assert (xid.kind, xid.xid, xid.severity, xid.action, xid.action_source) == ("xid", 79, "critical", "drain_node",
                                                                                "catalogue")
    assert kinds(step) == ["xid", "gpu_lost", "health"] and step.events[1].severity == "critical"
    assert (r.samples[0].health, r.samples[0].xid_last) == (FAIL, 79)
    assert r.samples[0].ecc_sbe_volatile is None  # an unreadable GPU carries no values
    r.tick(sample(t=2, healthy=False, error="GPU is lost"))
    assert r.state()[0] == FAIL
    step = r.tick(sample(t=3, **ZERO), events=[ev("gpu_recovered", t=3)])
    assert r.state() == (OK, ()) and kinds(step) == ["gpu_recovered", "health"]
    assert r.samples[0].xid_last == 79  # remembered since the daemon started


def test_a_gpu_that_reads_again_without_gpu_recovered_keeps_its_xid_fail():
    r = Run()
    r.tick(sample(healthy=False, error="GPU is lost"), events=[ev("xid", xid=79)])
    r.tick(sample(t=1, **ZERO))  # readable, but nothing said it was reset
    state, reasons = r.state()
    assert state == FAIL and len(reasons) == 1 and reasons[0].startswith("Xid 79")


def test_an_unreadable_gpu_without_an_event_fails_only_while_unreadable():
    r = Run()
    r.tick(sample(healthy=False, error="Unknown Error"))
    assert r.state() == (FAIL, ("GPU lost: Unknown Error",))
    r.tick(sample(t=1, **ZERO))
    assert r.state() == (OK, ())


def test_an_application_xid_leaves_the_gpu_ok_and_is_remembered():
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev("xid", xid=13)])
    assert r.state() == (OK, ()) and r.samples[0].xid_last == 13
    (e,) = step.events
    assert (e.severity, e.action, e.action_source) == ("info", "none", "catalogue")
    assert e.message.startswith("Xid 13: graphics engine exception")


def test_the_driver_s_recovery_action_decides_over_the_catalogue():
    r = Run()
    r.tick(sample(**ZERO), events=[ev("xid", xid=13, action="reset_gpu")])
    assert r.state()[0] == FAIL and r.state()[1] == (
        "Xid 13: graphics engine exception: an application fault (bad instruction or out-of-range access) "
        "(driver action: reset_gpu)", "driver recovery action: reset_gpu")
    r2 = Run()
    step = r2.tick(sample(**ZERO), events=[ev("xid", xid=95, action="none")])
    assert r2.state() == (OK, ())
    assert (step.events[0].severity, step.events[0].action_source) == ("warning", "driver")


def test_a_driver_recovery_action_fails_and_its_none_clears_every_latch():
    r = Run()
    r.tick(sample(**ZERO), events=[ev("recovery_action", action="drain_and_reset"), ev("xid", xid=48)])
    state, reasons = r.state()
    assert state == FAIL and "driver recovery action: drain_and_reset" in reasons and len(reasons) == 2
    step = r.tick(sample(t=1, **ZERO), events=[ev("recovery_action", t=1, action="none")])
    assert r.state() == (OK, ()) and step.events[0].severity == "info"


def test_the_driver_s_action_on_the_sample_is_a_condition_kept_between_reads():
    r = Run()
    r.tick(sample(**ZERO, recovery_action="none"))
    assert r.state() == (OK, ())
    r.tick(sample(t=1, recovery_action="drain_p2p"))
    assert r.state() == (FAIL, ("driver recovery action: drain_p2p",))
    r.tick(sample(t=2))  # not read this tick: the last verdict holds, and is on the sample
    assert r.state()[0] == FAIL and r.samples[0].recovery_action == "drain_p2p"
    r.tick(sample(t=3, recovery_action="none"))
    assert r.state() == (OK, ())


def test_an_xid_carrying_the_driver_s_none_after_a_reset_verdict_clears():
    r = Run()
    r.tick(sample(**ZERO), events=[ev("xid", xid=48, action="reset_gpu")])
    assert r.state()[0] == FAIL and len(r.state()[1]) == 2  # the Xid, and the driver's verdict now
    r.tick(sample(t=1, **ZERO), events=[ev("xid", t=1, xid=13, action="none")])
    assert r.state() == (OK, ())


@pytest.mark.parametrize("kind,reason", [
    ("poison_fatal", "uncorrectable memory error reached a consumer (poison_fatal event)"),
    ("dram_retirement_failure", "row remap / page retirement failed (driver event)"),
    ("gpu_unavailable", "the driver reported the GPU unavailable"),
])
def test_the_newer_fatal_event_kinds_fail_until_a_reset(kind, reason):
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev(kind, message="")])
    assert r.state() == (FAIL, (reason,)) and step.events[0].severity == "critical"
    r.tick(sample(t=1, **{**ZERO, "ecc_sbe_volatile": 0}), events=[ev("gpu_recovered", t=1)])
    assert r.state() == (OK, ())


def test_the_newer_warning_event_kinds_leave_the_state_to_the_counters():
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev("ecc_sbe_storm"), ev("dram_retirement"), ev("poison_nonfatal")])
    assert [e.severity for e in step.events] == ["warning"] * 3 and r.state() == (OK, ())


def test_an_unknown_driver_action_fails_and_is_named():
    r = Run()
    r.tick(sample(**ZERO), events=[ev("recovery_action", action="recover_imex_domain")])
    assert r.state() == (FAIL, ("driver recovery action: recover_imex_domain",))


def test_uncorrectable_errors_fail_until_the_volatile_count_resets():
    r = Run()
    r.tick(sample(**ZERO))
    r.tick(sample(t=1, **{**ZERO, "ecc_dbe_volatile": 1, "ecc_dbe_aggregate": 1}))
    assert r.state() == (FAIL, ("uncorrectable ECC errors rose to 1 (volatile count)",))
    for t in (2, 3):  # same count read again, or not read at all: still failed
        r.tick(sample(t=t, **({**ZERO, "ecc_dbe_volatile": 1, "ecc_dbe_aggregate": 1} if t == 2 else {})))
        assert r.state()[0] == FAIL and r.samples[0].ecc_dbe_volatile == 1
    step = r.tick(sample(t=4, **{**ZERO, "ecc_dbe_aggregate": 1}))  # the GPU was reset: volatile back to 0
    assert r.state() == (OK, ())
    assert kinds(step) == ["counter_reset", "health"]
    assert "ecc_dbe_volatile 1 -> 0" in step.events[0].message and step.events[0].severity == "warning"
    assert r.tracker.gpus[0].counters["ecc_dbe_volatile"] == 0  # the new baseline, never a negative rate


def test_an_ecc_dbe_event_fails_at_once():
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev("ecc_dbe")])
    assert r.state() == (FAIL, ("uncorrectable ECC error (ecc_dbe event)",)) and step.events[0].severity == "critical"


def test_after_a_restart_volatile_errors_re_trigger_and_a_false_recovery_re_fails():
    r = Run()  # a fresh tracker: the daemon restarted
    r.tick(sample(**{**ZERO, "ecc_dbe_volatile": 2}))
    assert r.state()[0] == FAIL and "since the driver loaded" in r.state()[1][0]
    r.tick(sample(t=1, healthy=False, error="GPU is lost"), events=[ev("gpu_lost", t=1)])
    r.tick(sample(t=2, **{**ZERO, "ecc_dbe_volatile": 2}), events=[ev("gpu_recovered", t=2)])
    assert r.state()[0] == FAIL  # read again, never reset: its volatile errors are still there
    r.tick(sample(t=3, **{**ZERO, "ecc_dbe_volatile": 2}), events=[ev("recovery_action", t=3, action="none")])
    assert r.state()[0] == FAIL  # a first "none" proves nothing: the driver may not have judged it
    r.tick(sample(t=4, **{**ZERO, "ecc_dbe_volatile": 2}, recovery_action="reset_gpu"))
    assert r.state()[1][-1] == "driver recovery action: reset_gpu"
    r.tick(sample(t=5, **{**ZERO, "ecc_dbe_volatile": 2}, recovery_action="none"))
    assert r.state() == (OK, ())  # the driver changed its verdict to "none": it decides
    r.tick(sample(t=6, **{**ZERO, "ecc_dbe_volatile": 2}))
    assert r.state() == (OK, ())  # the same count read again is not a new error


def test_aggregate_dbe_rising_fails_a_board_without_volatile_counts():
    r = Run()
    r.tick(sample(ecc_dbe_aggregate=5))  # lifetime errors, handled long ago
    assert r.state() == (OK, ())
    r.tick(sample(t=1, ecc_dbe_aggregate=6))
    assert r.state() == (FAIL, ("uncorrectable ECC errors rose to 6 (aggregate count)",))


# -- counters ------------------------------------------------------------------------------------

def test_counters_going_backwards_are_a_reset_with_a_new_baseline():
    r = Run()
    links = (NvlinkErrors(0, 5, 1, 7, 0), NvlinkErrors(1, 0, 0, 0, 0))
    r.tick(sample(**{**ZERO, "pcie_replay": 40, "ecc_sbe_aggregate": 9}, nvlink=links))
    step = r.tick(sample(t=1, **{**ZERO, "pcie_replay": 3, "ecc_sbe_aggregate": 9},
                         nvlink=(NvlinkErrors(0, 0, 0, 0, 0), NvlinkErrors(1, 0, 0, 0, 0))))
    assert kinds(step) == ["counter_reset"]
    msg = step.events[0].message
    assert "pcie_replay 40 -> 3" in msg and "nvlink 0 crc_flit 5 -> 0" in msg and "nvlink 0 replay 7 -> 0" in msg
    assert r.state() == (OK, ())  # not a volatile ECC count: no reset of the GPU implied, nothing to clear
    g = r.tracker.gpus[0]
    assert g.counters["pcie_replay"] == 3 and g.nvlink[0].crc_flit == 0


def test_the_last_known_values_fill_ticks_that_did_not_read_them():
    r = Run()
    links = (NvlinkErrors(0, 1, 2, 3, 4),)
    r.tick(sample(**{**ZERO, "remap_pending": True, "pcie_replay": 12}, nvlink=links))
    step = r.tick(sample(t=1))  # power only this tick
    s = r.samples[0]
    assert step.counters_read == set()
    assert (s.pcie_replay, s.remap_pending, s.ecc_dbe_volatile, s.nvlink) == (12, True, 0, links)
    assert s.retired_pages_pending is None  # never reported: stays unknown
    step = r.tick(sample(t=2, pcie_replay=13))
    assert step.counters_read == {0} and r.samples[0].pcie_replay == 13 and r.samples[0].remap_pending is True


def test_another_board_at_the_same_index_starts_clean():
    r = Run()
    r.tick(sample(**ZERO), events=[ev("xid", xid=79)])
    assert r.state()[0] == FAIL
    r.tick(sample(t=1, uuid="GPU-other", **ZERO))
    assert r.state() == (OK, ()) and r.tracker.gpus[0].uuid == "GPU-other" and r.samples[0].xid_last is None


def test_only_the_gpu_concerned_changes():
    r = Run()
    r.tick(*(sample(i, **ZERO) for i in range(8)))
    step = r.tick(*(sample(i, t=1, **ZERO) for i in range(8)), events=[ev("xid", index=3, t=1, xid=95)])
    assert step.changed == {3}
    assert [s.health for s in r.samples] == [OK, OK, OK, FAIL, OK, OK, OK, OK]


# -- floods and bad input ----------------------------------------------------------------------------

def test_a_flood_is_judged_in_its_tick_and_nothing_is_kept():
    r = Run()
    flood = [ev("xid", t=1, xid=13) for _ in range(10_000)] + [ev("xid", t=1, xid=79)]
    step = r.tick(sample(t=1, **ZERO), events=flood)
    assert len(step.events) == 10_001 + 1  # every event judged, plus the one health change
    assert r.state()[0] == FAIL and r.samples[0].xid_last == 79
    g = r.tracker.gpus[0]
    assert len(g.latched) == 1 and len(g.sbe_window) == 1  # nothing grew with the flood
    step = r.tick(sample(t=2, **ZERO))
    assert step.events == []


def test_events_for_a_gpu_without_a_sample_are_kept_and_judged():
    r = Run()
    step = r.tick(sample(0, **ZERO), events=[ev("xid", index=5, xid=79)])
    assert step.events[0].gpu == 5 and r.tracker.gpus[5].state == FAIL and step.changed == {5}


def test_malformed_and_unknown_events_are_kept_as_information():
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev("xid", xid=None), ev("pstate"), ev("weird_kind", message="")])
    assert [(e.kind, e.severity) for e in step.events] == [("xid", "info"), ("pstate", "info"), ("weird_kind", "info")]
    assert r.state() == (OK, ())


def test_an_unknown_xid_is_recorded_without_failing_the_gpu():
    r = Run()
    step = r.tick(sample(**ZERO), events=[ev("xid", xid=777, message="")])
    assert r.state() == (OK, ()) and r.samples[0].xid_last == 777
    assert step.events[0].severity == "warning" and "Xid catalogue" in step.events[0].message


@pytest.mark.parametrize("kw,match", [({"sbe_warn_count": 0}, "sbe_warn_count"),
                                      ({"sbe_warn_count": SBE_WINDOW_MAX}, "sbe_warn_count"),
                                      ({"sbe_window_s": 0}, "sbe_window_s")])
def test_bad_thresholds_are_refused_with_their_name(kw, match):
    with pytest.raises(ValueError, match=match):
        HealthTracker(**kw)


def test_the_rules_know_the_same_states_and_refuse_a_misspelt_one():
    from rules.expr import HEALTH_STATES, ExprError, parse_expr
    from rules.model import default_pack_paths

    assert HEALTH_STATES == STATES
    with pytest.raises(ExprError, match="'failed' is never a value of gpu.health"):
        parse_expr('gpu.health == "failed"')
    assert "gpu_health" in {p.stem for p in default_pack_paths()}  # shipped and loaded by default
