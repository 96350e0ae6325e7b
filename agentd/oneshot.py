"""One tick, printed and not kept: ``agentd run --once`` (``telegraf --test`` for this daemon).

It reads every GPU once with the configured backend (``sim`` included), evaluates the rules on
that reading exactly as the daemon's tick does (``make_controller``, ``Controller.step``, the
actuator's ``observe`` and ``plan``), and prints what the tick would store -- the ``gpu`` and
``throttle_event`` points, built by ``agentd.points`` and encoded by ``agentd.lineproto.encode``
-- and which limits it would set. Then it exits. The ``agent`` point is left out (it describes a
running daemon: tick lag, backlog, forwarder) and so are coolant points (below).

Why it is safe beside a running daemon: it writes nothing. No limit (the actuator's ``write`` is
never called, and the backend it holds refuses ``set_power_limit`` as a second guard), no
``original_limits.json`` (the originals file is only read, so a capped GPU's baseline is the
one the running daemon recorded), no store (none is opened), nothing else in ``state_dir``,
no MQTT connection (it would share the daemon's client id, and the broker would drop the
daemon's session and its retained status). So coolant inputs are not read, and the
coolant-scope rules are left out, rather than evaluated on no readings (a fail-safe rule would
then report caps that a node with a live feed would not make); stderr says so when
``coolant.subscriptions`` are configured. For the same reason a site budget (``budget.enabled``:
leases over MQTT) is not applied, and stderr says that too.

Output, ``lp``: the points as line protocol, then the plan as comment lines, which InfluxDB and
VictoriaMetrics skip (so the whole output can be posted to a server as it is)::

    gpu,gpu=0,host=n1,... power_w=612.5,... 1767225600000000000
    # would set gpu=0 uuid=GPU-... from_w=700 to_w=525 source=gpu_near_slowdown
    # would advise no_new_work rules=leak_warning

``json``: one document, ``{"points": [{"name", "tags", "fields", "timestamp_ns"}, ...],
"limits": [{"gpu", "uuid", "from_w", "to_w", "source"}, ...], "advice": {...}, "dry_run": ...,
"notes": [...]}``. Either way the plan is what ``agentd run`` would write on this reading with
``dry_run = false``; with ``dry_run = true`` it writes none of it, and the output says so.

A rule with a ``for`` duration cannot fire on one tick (it goes pending at most), and
``avg_over`` windows hold one reading: stderr names such rules.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from agentd.actuator import Actuator
from agentd.clock import Clock, SystemClock
from agentd.config import AgentConfig
from agentd.control import Controller, coolant_signals
from agentd.daemon import make_backend, make_controller
from agentd.export import point_object
from agentd.lineproto import encode
from agentd.log import setup_logging
from agentd.points import gpu_point, throttle_event_point
from agentd.worker import SerialWorker
from collectors.base import BackendError, BackendEvent, GpuBackend, GpuInfo, GpuSample
from collectors.coolant import CoolantState
from collectors.lineproto_parse import parse_line
from rules.model import RuleLoadError

__all__ = ["FORMATS", "LimitChange", "run_once"]

FORMATS = ("lp", "json")
PROG = "agentd run --once"


class ReadOnlyBackend:
    """The configured backend with its one write refused: what the actuator holds here.

    ``run_once`` never calls the actuator's ``write``; this makes a mistake there an error
    rather than a changed limit on a node whose daemon is running.
    """

    def __init__(self, backend: GpuBackend) -> None:
        self._backend = backend
        self.refused: list[tuple[int, float]] = []  # (index, watts) asked for: a bug, reported as one

    def open(self) -> list[GpuInfo]:
        return self._backend.open()

    def sample(self, ts_ns: int) -> list[GpuSample]:
        return self._backend.sample(ts_ns)

    def set_power_limit(self, index: int, limit_w: float) -> None:
        self.refused.append((index, limit_w))
        raise RuntimeError(f"{PROG} writes no power limit (asked: GPU {index}, {limit_w} W)")

    def drain_events(self) -> list[BackendEvent]:
        return self._backend.drain_events()

    def event_stats(self) -> dict[str, int]:
        return self._backend.event_stats()

    def close(self) -> None:
        self._backend.close()


@dataclass(slots=True, frozen=True)
class LimitChange:
    """A limit the daemon would write on this reading (``power_limit_set``'s fields)."""

    gpu: int
    uuid: str
    from_w: float
    to_w: float
    source: str


def _w(value: float) -> str:
    """Watts for a comment line: ``700``, ``412.5`` (three decimals at most)."""
    return f"{round(value, 3):.3f}".rstrip("0").rstrip(".")


class _Run:
    """One one-shot: the pieces ``run_once`` wires, and the notes it tells stderr."""

    def __init__(self, cfg: AgentConfig, err: TextIO, clock: Clock) -> None:
        self.cfg = cfg
        self.err = err
        self.clock = clock
        self.notes: list[str] = []
        self.worker = SerialWorker("nvml-once")
        self.inflight: Future[Any] | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"{PROG}: note: {text}", file=self.err)

    def fail(self, text: str, code: int) -> int:
        print(f"{PROG}: {text}", file=self.err)
        return code

    def call(self, timeout_s: float, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the NVML thread, as the daemon calls the backend (a hung driver
        costs ``timeout_s``, never the command)."""
        future: Future[Any] = self.worker.submit(fn, *args)
        self.inflight = future
        return future.result(timeout=timeout_s)

    @property
    def hung(self) -> bool:
        """A backend call has not returned (it keeps its daemon thread; the process still exits)."""
        return self.inflight is not None and not self.inflight.done()

    def controller(self) -> Controller | None:
        cfg = self.cfg
        if cfg.coolant.subscriptions:
            self.note(f"the {len(cfg.coolant.subscriptions)} coolant input(s) are not read (a one-shot opens no "
                      "MQTT connection: it would take over the daemon's client id); coolant rules are left out")
        if cfg.budget.enabled:
            self.note("budget.enabled: the site budget is not applied (its leases arrive over MQTT); the plan "
                      "shows the rules' limits only")
        controller = make_controller(cfg, coolant_fed=False)
        if controller is None:
            return None
        rules = controller.engine.rule_set.rules
        waiting = [f"{r.name} ({r.for_:g} s)" for r in rules if r.for_ > 0]
        if waiting:
            self.note(f"{len(waiting)} of {len(rules)} rules have a `for` duration and cannot fire on one tick "
                      f"(pending at most): {', '.join(waiting)}")
        windowed = [r.name for r in rules if "avg_over(" in r.when or "avg_over(" in (r.clear_when or "")]
        if windowed:
            self.note(f"avg_over windows hold this one reading: {', '.join(windowed)}")
        return controller


def run_once(cfg: AgentConfig, fmt: str, out: TextIO, *, err: TextIO | None = None,
             backend: GpuBackend | None = None, clock: Clock | None = None) -> int:
    """One tick with ``cfg``'s backend and rules, printed to ``out`` in ``fmt`` (``lp`` or
    ``json``); returns the exit code: 0 done, 1 the GPUs could not be read or a rule failed to
    evaluate, 2 a usage or rule-file error. Notes and errors go to ``err`` (stderr), and so do
    the logs, so ``out`` holds only the result. Writes nothing anywhere (see the module doc).

    ``backend`` and ``clock`` replace the configured backend and the system clock (tests).
    """
    err = err if err is not None else sys.stderr
    if fmt not in FORMATS:
        print(f"{PROG}: --format {fmt!r}: expected one of {', '.join(FORMATS)}", file=err)
        return 2
    setup_logging(cfg.log_level, stream=err)
    run = _Run(cfg, err, clock or SystemClock())
    try:
        return _tick(run, fmt, out, backend)
    finally:
        run.worker.shutdown(wait=False, cancel_futures=True)


def _tick(run: _Run, fmt: str, out: TextIO, backend: GpuBackend | None) -> int:
    cfg = run.cfg
    try:
        controller = run.controller() if cfg.rules.enabled else None
    except RuleLoadError as exc:
        for line in exc.errors:
            print(line, file=run.err)
        return 2
    guarded = ReadOnlyBackend(backend if backend is not None else make_backend(cfg))
    try:
        infos = run.call(cfg.nvml_timeout * 5, guarded.open)
    except TimeoutError:
        return run.fail(f"GPU backend {cfg.backend!r} did not initialise within {cfg.nvml_timeout * 5:g} s "
                        "(driver hung? check nvidia-smi)", 1)
    except BackendError as exc:
        return run.fail(str(exc), 1)
    try:
        code = _sample_and_print(run, fmt, out, guarded, controller, len(infos))
        if guarded.refused:  # never expected: say so loudly rather than pass
            return run.fail(f"internal error: a power-limit write was attempted and refused ({guarded.refused}); "
                            "nothing was written, but please report this", 1)
        return code
    finally:
        if run.hung:  # as the daemon at stop: no nvmlShutdown while a call is stuck in the driver
            print(f"{PROG}: not closing the GPU backend: a call into it has not returned", file=run.err)
        else:
            _close(run, guarded)


def _close(run: _Run, backend: ReadOnlyBackend) -> None:
    try:
        run.call(run.cfg.nvml_timeout * 5, backend.close)
    except Exception as exc:  # closing must not hide the result
        print(f"{PROG}: closing the GPU backend failed: {exc!r}", file=run.err)


def _sample_and_print(run: _Run, fmt: str, out: TextIO, backend: ReadOnlyBackend,
                      controller: Controller | None, gpus: int) -> int:
    cfg, clock = run.cfg, run.clock
    actuator = Actuator(backend, Path(cfg.state_dir), dry_run=False, monotonic=clock.monotonic,
                        wall=lambda: clock.wall_ns() / 1e9)
    try:
        if actuator.load_originals():  # read only: a running daemon's caps keep their baselines
            run.note(f"{actuator.originals_path} holds baselines of capped GPUs (a running or crashed agentd's); "
                     "they are used as this reading's baselines")
    except OSError as exc:
        run.note(f"{exc}; baselines are taken from the limits the GPUs hold now")
    now = clock.monotonic()
    ts_ns = clock.wall_ns()
    try:
        samples: list[GpuSample] = run.call(cfg.nvml_timeout, backend.sample, ts_ns)
    except TimeoutError:
        return run.fail(f"reading the GPUs did not return within nvml_timeout = {cfg.nvml_timeout:g} s "
                        "(check nvidia-smi and the kernel log for Xid errors)", 1)
    except Exception as exc:
        return run.fail(f"reading the GPUs failed: {exc!r}", 1)
    for event in backend.drain_events():
        run.note(f"{event.kind} gpu={event.gpu_index}: {event.message}")
    for s in samples:
        if not s.healthy:
            run.note(f"GPU {s.index} ({s.uuid}) could not be read: {s.error or 'unhealthy'}; it has no point")
    by_index = {s.index: s for s in samples}
    lines: list[str] = []
    changes: list[LimitChange] = []
    advice: dict[str, list[str]] = {}
    code = 0
    host = cfg.node_name
    if controller is not None and samples:
        node, stale = coolant_signals(CoolantState(), now)
        baselines = actuator.observe(by_index)
        step = controller.step(now, by_index, node, stale, baselines)
        for rule, error in step.evaluation.errors:
            code = 1
            print(f"{PROG}: rule {rule} failed to evaluate: {error}", file=run.err)
        writes = actuator.plan(step.limits_w, by_index, step.sources)
        for index, sample, target in writes:
            planned = actuator.controls[index]
            held = planned.set_w if planned.set_w is not None else planned.baseline_w
            changes.append(LimitChange(index, sample.uuid, float(held if held is not None else target),
                                       float(target), planned.source or "baseline"))
        advice = {kind: sorted(rules) for kind, rules in step.evaluation.advice.items() if rules}
        engine = controller.engine
        for ev in step.evaluation.events:
            held_by = actuator.controls.get(ev.gpu) if ev.gpu is not None else None
            line = encode(throttle_event_point(
                host, ts_ns, rule=ev.rule, severity=ev.severity, state=ev.to_state,
                action=",".join(a.type for a in engine.rule(ev.rule).actions), gpu=ev.gpu, value=ev.value,
                limit_w=held_by.set_w if held_by else None, limit_target_w=held_by.target_w if held_by else None,
                message=ev.message))
            if line is not None:
                lines.append(line)
    for s in samples:
        if s.healthy:
            gpu_control = actuator.controls.get(s.index)
            line = encode(gpu_point(s, host, gpu_control.set_w if gpu_control else None,
                                    gpu_control.target_w if gpu_control else None))
            if line is not None:
                lines.append(line)
    if fmt == "json":
        _print_json(out, lines, changes, advice, run, controller is not None)
    else:
        _print_lp(out, lines, changes, advice, cfg, controller is not None, gpus)
    return code


def _print_lp(out: TextIO, lines: list[str], changes: list[LimitChange], advice: dict[str, list[str]],
              cfg: AgentConfig, rules_on: bool, gpus: int) -> None:
    text = [line + "\n" for line in lines]
    for c in changes:
        text.append(f"# would set gpu={c.gpu} uuid={c.uuid} from_w={_w(c.from_w)} to_w={_w(c.to_w)} "
                    f"source={c.source}\n")
    if not changes:
        why = "nothing asks for a cap" if rules_on else "rules.enabled = false"
        text.append(f"# would set no limit ({gpus} GPUs: {why})\n")
    for kind, rules in advice.items():
        text.append(f"# would advise {kind} rules={','.join(rules)}\n")
    if cfg.dry_run and changes:
        text.append("# dry_run = true: agentd run with this configuration evaluates the same and writes none "
                    "of these limits\n")
    out.write("".join(text))
    out.flush()


def _print_json(out: TextIO, lines: list[str], changes: list[LimitChange], advice: dict[str, list[str]],
                run: _Run, rules_on: bool) -> None:
    points = []
    for line in lines:
        measurement, tags, fields, ts = parse_line(line)  # what the store would hold, read back
        points.append(point_object(measurement, tags, fields, ts if ts is not None else 0))
    doc = {"points": points, "limits": [asdict(c) for c in changes], "advice": advice,
           "dry_run": run.cfg.dry_run, "rules_enabled": rules_on, "notes": run.notes}
    out.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    out.flush()
