"""``agentd demo`` tells the truth: run for real (the CLI, a second on the wall clock) and at
full speed on a FakeClock (the same daemon, CDU and rules; minutes of simulated time in a
second), then read what it printed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.clock import FakeClock
from agentd.demo import (DEFAULT_DURATION_S, MARGIN_S, DemoDaemon, demo_config, node_state, plan_duration, render,
                         run_demo, timeline)
from collectors.cdu_sim import parse_fault
from rules.engine import Event

REPO = Path(__file__).resolve().parent.parent
FRAME_START = "gpu-agentd demo  node="


class Terminal(io.StringIO):
    """An output that says it is a terminal: the demo redraws a frame after every tick."""

    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    """The live frames a Terminal received (each starts with the clear-screen sequence)."""
    body = text.split("\nsummary:")[0]
    return [f for f in body.split("\x1b[H\x1b[2J") if f.startswith(FRAME_START)]


def fast_demo(faults: list[str], *, duration_s: float | None = None, gpus: int = 8, size=(80, 24), out=None,
              tmp_path: Path, **kw) -> tuple[str, DemoDaemon]:
    out = out if out is not None else Terminal()
    daemon = run_demo(duration_s=duration_s, gpus=gpus, interval_s=1.0, profile=kw.pop("profile", "training"),
                      seed=1, state_dir=tmp_path, out=out, faults=[parse_fault(f) for f in faults],
                      clock=FakeClock(), size=size, **kw)
    return out.getvalue(), daemon


def test_the_cli_demo_runs_for_real_without_the_mqtt_warning(tmp_path):
    """The command a newcomer types, on the wall clock: the CDU is in-process, so no
    coolant_without_mqtt warning; the leak reaches the view and the timeline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    proc = subprocess.run([sys.executable, "-m", "agentd", "demo", "--duration", "1.5", "--interval", "0.1",
                           "--gpus", "2", "--fault", "leak@0.5", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "coolant_without_mqtt" not in proc.stderr + proc.stdout
    assert "mqtt" not in proc.stderr.lower(), proc.stderr
    out = proc.stdout
    assert "LEAK WARNING" in out and "node state: THROTTLED" in out
    tail = out[out.index("timeline (rule transitions"):]
    assert "leak_warning" in tail and "inactive -> firing" in tail and "value Warning" in tail
    assert max(len(line) for line in out.splitlines()) <= 80


def test_a_leak_critical_is_never_shown_next_to_state_ok(tmp_path):
    """Every frame (one per tick) where the TCS loop reports a leak shows the node state the
    worst firing rule gives: CRITICAL with the Critical, THROTTLED (capped) with the Warning."""
    text, daemon = fast_demo(["leak@5"], duration_s=45, tmp_path=tmp_path)
    shown = frames(text)
    assert len(shown) == daemon.stats.ticks == 46
    critical = [f for f in shown if "LEAK CRITICAL" in f]
    warning = [f for f in shown if "LEAK WARNING" in f]
    assert critical and warning
    for f in critical:
        assert "node state: CRITICAL" in f and "leak_critical [critical]" in f and "drain (leak_critical)" in f
    for f in warning:
        assert "node state: THROTTLED" in f and "capped GPUs: 8/8" in f
    for f in shown:
        if "node state: OK" in f:
            assert "LEAK" not in f and "firing: none" in f


def test_node_state_follows_the_worst_thing_going_on():
    assert node_state([], {}, 0, False, False) == "ok"
    assert node_state([], {}, 0, False, True) == "degraded"  # a stale coolant sensor
    assert node_state([("coolant_sensor_stale", "warning")], {"no_new_work": ["coolant_sensor_stale"]}, 0, False,
                      True) == "degraded"
    assert node_state([("leak_warning", "warning")], {"no_new_work": ["leak_warning"]}, 8, False, False) == "throttled"
    assert node_state([("tcs_flow_low", "critical")], {}, 0, True, False) == "critical"
    assert node_state([("x", "warning")], {"drain": ["x"]}, 8, False, False) == "drain"
    assert node_state([("leak_critical", "critical"), ("leak_warning", "warning")],
                      {"drain": ["leak_critical"], "no_new_work": ["leak_warning"]}, 8, False, False) == "critical"
    assert node_state([], {}, 0, True, False) == "throttled"  # a node cap alone


@pytest.mark.parametrize("gpus,size", [(1, (80, 24)), (8, (80, 24)), (64, (80, 24)), (8, (60, 18)), (8, (120, 40))])
def test_every_frame_fits_the_terminal(tmp_path, gpus, size):
    """Long rule lists, a degraded loop, bad messages and 64 GPUs: still within the width and
    height given (80x24 the smallest supported; narrower terminals get clipped lines)."""
    width, height = size
    faults = ["pump_failure@2", "dropout@8:facility", "garbage@1", "leak@4"]
    text, daemon = fast_demo(faults, duration_s=40, gpus=gpus, size=size, tmp_path=tmp_path)
    shown = frames(text)
    assert len(shown) == daemon.stats.ticks
    for f in shown:
        lines = f.split("\n")
        assert len(lines) <= height, f
        assert max(len(line) for line in lines) <= width, f
    assert max(len(line) for line in text.replace("\x1b[H\x1b[2J", "\n").splitlines()) <= width
    last = shown[-1]
    assert "node state: CRITICAL" in last
    if width >= 80:
        rows = {line.split()[0]: line for line in last.split("\n") if line.startswith(("facility ", "tcs "))}
        assert rows["facility"].endswith("  degraded") and rows["tcs"].endswith("  LEAK CRITICAL")
        assert "facility degraded: " in last
    if gpus == 64 and height == 24:
        assert "+ GPUs" in last  # the rows that do not fit are folded into one line


def test_a_loop_silent_before_it_was_established_is_no_data_not_ok(tmp_path):
    """Silent after 2 messages: too new to degrade the node (collectors.coolant_state), but the
    view must not call a loop with no readings "ok"."""
    text, _ = fast_demo(["dropout@2:facility"], duration_s=12, tmp_path=tmp_path)
    rows = [line for line in frames(text)[-1].split("\n") if line.startswith("facility ")]
    assert rows and rows[0].endswith("  no data") and " n/a " in rows[0]


def test_the_terminal_size_is_read_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    text, _ = fast_demo(["pump_failure@1", "garbage@1"], duration_s=20, gpus=16, size=None, tmp_path=tmp_path)
    for f in frames(text):
        assert len(f.split("\n")) <= 24 and max(len(line) for line in f.split("\n")) <= 80


def test_piped_output_is_a_frame_every_5_s_and_ends_with_summary_and_timeline(tmp_path):
    out = io.StringIO()
    text, daemon = fast_demo(["leak@10"], duration_s=None, out=out, tmp_path=tmp_path)
    assert "\x1b[" not in text  # no terminal control codes in a log
    assert text.count(FRAME_START) == 11  # t = 0, 5, ..., 50
    head, tail = text.split("\nsummary:")
    assert "node state at the end: critical" in " ".join(tail.split())
    timeline_lines = tail[tail.index("timeline (rule transitions"):].splitlines()[1:]
    assert [line.split()[:4] for line in timeline_lines] == [
        ["t=", "10.0", "s", "leak_warning"], ["t=", "40.0", "s", "leak_critical"]]
    assert all("inactive -> firing" in line for line in timeline_lines)
    assert timeline_lines[1].endswith("value Critical")


def test_without_faults_nothing_fires_and_the_node_stays_ok(tmp_path):
    """No false alarm at start (a first tick without coolant readings, a pump spinning up)."""
    for profile in ("training", "idle"):
        text, daemon = fast_demo([], duration_s=None, tmp_path=tmp_path / profile, profile=profile)
        assert daemon.stats.ticks == DEFAULT_DURATION_S + 1
        assert not daemon.recent_events
        assert all("node state: OK" in f for f in frames(text)[1:])
        assert text.rstrip().endswith("timeline: no rule changed state")


@pytest.mark.parametrize("fault,rules", [
    ("leak@10", {"leak_warning": 10, "leak_critical": 40}),  # the README's example: Critical 30 s after Warning
    ("pump_failure@20", {"tcs_flow_low": 36}),
])
def test_the_default_duration_lets_the_readme_examples_show_what_they_promise(tmp_path, fault, rules):
    """Without --duration the demo runs until the fault's rules have fired (found by a preview
    on a fake clock), and says so; the run itself then shows them fire at those times."""
    text, daemon = fast_demo([fault], duration_s=None, out=io.StringIO(), tmp_path=tmp_path)
    plan = " ".join(text.split(FRAME_START)[0].split())
    fired = {e.rule: e.at - daemon.started_at for e in daemon.recent_events if e.to_state == "firing"}
    for rule, at_s in rules.items():
        assert fired[rule] == pytest.approx(at_s, abs=1.0)
        assert f"{rule} at " in plan
    last = max(fired.values())
    assert daemon.stats.ticks - 1 == pytest.approx(last + MARGIN_S, abs=1.0)
    assert plan.startswith(f"running {daemon.stats.ticks - 1} s, long enough for {fault}:")
    assert "--duration S to choose" in plan


def test_plan_without_faults_or_with_faults_that_fire_nothing(tmp_path):
    cfg = demo_config(gpus=2, interval_s=1.0, profile="training", seed=1, state_dir=tmp_path)
    assert plan_duration(cfg, []).duration_s == DEFAULT_DURATION_S
    plan = plan_duration(cfg, [parse_fault("garbage@5")])
    assert plan.duration_s == DEFAULT_DURATION_S and plan.fired_s == ()
    assert "garbage@5 made no rule fire" in plan.reason


def test_a_short_leak_uses_the_model_option_and_reaches_critical(tmp_path):
    """CduModel options reach the run and its preview (leak Critical after 3 s, not 30)."""
    text, daemon = fast_demo(["leak@2"], duration_s=None, out=io.StringIO(), tmp_path=tmp_path,
                             model_kwargs={"leak_critical_after_s": 3.0})
    fired = {e.rule: e.at - daemon.started_at for e in daemon.recent_events if e.to_state == "firing"}
    assert fired == {"leak_warning": 2.0, "leak_critical": 5.0}
    assert daemon.stats.ticks - 1 == DEFAULT_DURATION_S  # 5 s + margin is under the default


def test_timeline_merges_gpus_of_one_tick_and_keeps_both_ends():
    def ev(at, rule, gpu, to="firing", value=80.0):
        return Event(rule, gpu, "pending", to, "warning", at, value, "")

    events = [ev(100.0 + 3, "gpu_near_slowdown", g, value=83.0 + g) for g in (0, 1, 2, 3, 5)]
    events.append(ev(110.0, "leak_warning", None, value="Warning"))
    lines = timeline(events, 100.0)
    assert lines[1].split() == ["t=", "3.0", "s", "gpu_near_slowdown", "gpu", "0-3,5", "pending", "->", "firing",
                                "value", "83"]
    assert lines[2].endswith("value Warning")
    many = [ev(100.0 + i, f"rule_{i}", None) for i in range(40)]
    lines = timeline(many, 100.0, limit=10)
    assert len(lines) == 1 + 10 + 1 and "30 more" in lines[6]
    assert "rule_0 " in lines[1] and "rule_39 " in lines[-1]
    assert timeline([], 0.0) == ["timeline: no rule changed state"]


def test_render_before_the_first_tick_and_clipping(tmp_path):
    cfg = demo_config(gpus=2, interval_s=1.0, profile="training", seed=1, state_dir=tmp_path)
    from agentd.daemon import open_store
    from collectors.cdu_sim import CduModel
    from collectors.sim import SimBackend

    daemon = DemoDaemon(cfg, SimBackend(gpus=2), open_store(cfg), CduModel(), clock=FakeClock())
    try:
        frame = render(daemon, 30.0, width=40, height=10)
    finally:
        daemon.store.close()
    lines = frame.split("\n")
    assert "node state: starting" in frame and len(lines) <= 10 and max(map(len, lines)) <= 40
    assert lines[0].endswith("...")


def test_a_zero_or_negative_duration_is_refused(tmp_path):
    for bad in (0.0, -5.0):
        with pytest.raises(ValueError, match="duration_s must be > 0"):
            run_demo(duration_s=bad, gpus=1, interval_s=1.0, profile="idle", seed=1, state_dir=tmp_path,
                     out=io.StringIO(), clock=FakeClock())
    assert not (tmp_path / "store.sqlite").exists()  # refused before anything was written
