"""``agentd demo``: the real daemon on simulated GPUs and a simulated CDU, with a live view.

Nothing here is a mock-up: the demo runs the same Daemon, tick and SQLite store as ``agentd run``
with ``backend = "sim"``; only the view is extra. It needs no server and no GPU. The CDU model
(``collectors.cdu_sim``) runs in-process: its messages go through the same coolant parser and
state as MQTT messages would (no broker needed), its heat load is the simulated GPUs' power
(times the nodes it cools), and its TCS supply temperature feeds the GPUs' thermal model.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from agentd.config import AgentConfig
from agentd.daemon import Daemon, make_backend, open_store
from agentd.log import setup_logging
from agentd.service import install_stop_handlers
from collectors.cdu_sim import CduModel, Fault, subscription_for

CDU_NODES = 14  # nodes the simulated CDU cools: this one and 13 like it (~100 kW)
_COOLANT_FIELDS = (("supply_temp_c", "6.1f"), ("return_temp_c", "6.1f"), ("delta_temp_c", "5.1f"),
                   ("flow_lpm", "7.1f"), ("delta_pressure_kpa", "6.1f"), ("pump_speed_pct", "5.1f"),
                   ("valve_position_pct", "5.1f"))

_CLEAR = "\x1b[H\x1b[2J"


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "n/a".rjust(len(format(0.0, spec)))


def render(daemon: Daemon, elapsed_s: float, duration_s: float) -> str:
    """The live view: one row per GPU, node totals and the store backlog."""
    cfg = daemon.cfg
    rows = [
        f"gpu-agentd demo  node={daemon.host}  {len(daemon.state.gpus)} simulated GPUs  "
        f"profile={cfg.sim.profile}  t={elapsed_s:5.1f}/{duration_s:.0f} s",
        "",
        "GPU  power W  limit W  temp C  HBM C  energy kJ  util %  SM MHz  throttled",
    ]
    total_w = 0.0
    for index in sorted(daemon.state.gpus):
        s = daemon.state.gpus[index]
        if not s.healthy:
            rows.append(f"{index:>3}  unhealthy: {s.error}")
            continue
        total_w += s.power_w or 0.0
        rows.append(
            f"{index:>3}  {_fmt(s.power_w, '7.1f')}  {_fmt(s.limit_w, '7.1f')}  {_fmt(s.temp_c, '6.1f')}"
            f"  {_fmt(s.mem_temp_c, '5.1f')}  {_fmt((s.energy_j or 0) / 1000, '9.2f')}  "
            f"{_fmt(s.util_pct, '6.1f')}  {_fmt(s.sm_clock_mhz, '6.0f')}  {'yes' if s.throttled else 'no'}"
        )
    rows += ["", *coolant_rows(daemon), "", *rule_rows(daemon)]
    rows += [
        "",
        f"node GPU power {total_w:8.1f} W   ticks {daemon.stats.ticks}   "
        f"tick cost {daemon.stats.tick_s * 1000:.2f} ms",
        f"store {daemon.store.backlog()} points, {daemon.store.size_bytes() / 1024:.0f} KiB "
        f"(local store; no InfluxDB configured)",
    ]
    return "\n".join(rows)


def rule_rows(daemon: Daemon) -> list[str]:
    """What the rules are doing: firing rules and the advice to the scheduler."""
    step = daemon.last_step
    if step is None:
        return ["rules: not evaluated yet"]
    firing = sorted({(i.rule, i.severity) for i in step.evaluation.firing()})
    advice = ", ".join(f"{k} ({', '.join(v)})" for k, v in sorted(step.evaluation.advice.items())) or "none"
    rules = ", ".join(f"{name} [{sev}]" for name, sev in firing) or "none firing"
    mode = "dry run: nothing written" if daemon.cfg.dry_run else "limits applied"
    return [f"rules: {rules}", f"advice: {advice}   ({mode})"]


def coolant_rows(daemon: Daemon) -> list[str]:
    """One row per coolant loop: worst case over its good sensors, and what is degraded."""
    now = daemon.clock.monotonic()
    loops = daemon.state.coolant.loops(now)
    if not loops:
        return ["coolant: no readings yet"]
    rows = ["loop      supply C  return C  dT C  flow L/min  dP kPa  pump %  valve %  leak      state"]
    for name, view in loops.items():
        cells = []
        for fname, spec in _COOLANT_FIELDS:
            agg = view.fields.get(fname)
            value = view.worst(fname) if agg is not None else None
            cells.append(_fmt(value, spec))
        state = "ok" if not view.degraded else "DEGRADED: " + ", ".join(
            sorted({f"{s.field} {s.status}" for s in view.degraded_sensors}))
        rows.append(f"{name:<9} {cells[0]:>8}  {cells[1]:>8}  {cells[2]:>4}  {cells[3]:>10}  {cells[4]:>6}  "
                    f"{cells[5]:>6}  {cells[6]:>7}  {(view.leak or '-'):<8}  {state}")
    c = daemon.coolant
    rows.append(f"coolant messages {c.msgs}, readings {c.readings}, bad {c.bad_msgs}"
                + (f" ({', '.join(f'{k} {v}' for k, v in sorted(c.bad.items()))})" if c.bad else ""))
    return rows


async def _cdu(daemon: Daemon, model: CduModel, stop: asyncio.Event) -> None:
    """Step the CDU every tick interval: GPU power in, TCS supply temperature out."""
    backend = daemon.backend
    interval = daemon.cfg.interval
    while not stop.is_set():
        gpu_w = sum((s.power_w or 0.0) for s in daemon.state.gpus.values() if s.healthy)
        model.step(interval, CDU_NODES * (gpu_w + 2_000.0))
        daemon.coolant.handle_batch(model.messages(daemon.clock.wall_ns()))
        if hasattr(backend, "coolant_supply_c"):
            backend.coolant_supply_c = model.tcs_supply_c
        await asyncio.sleep(interval)


async def _demo(cfg: AgentConfig, duration_s: float, out, faults: list[Fault] | None = None) -> Daemon:
    store = open_store(cfg)
    daemon = Daemon(cfg, make_backend(cfg), store)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    live = out.isatty()
    model = CduModel(site=cfg.site, unit="cdu-1", seed=cfg.sim.seed, faults=faults or [])
    cdu = asyncio.create_task(_cdu(daemon, model, stop))

    async def view() -> None:
        shown = 0
        while not stop.is_set():
            await asyncio.sleep(cfg.interval)
            elapsed = loop.time() - started
            if live:
                out.write(_CLEAR + render(daemon, elapsed, duration_s) + "\n")
                out.flush()
            elif elapsed - shown >= 5 or elapsed >= duration_s:  # a log-friendly view when piped
                shown = int(elapsed)
                out.write(render(daemon, elapsed, duration_s) + "\n\n")
                out.flush()
            if elapsed >= duration_s:
                stop.set()

    viewer = asyncio.create_task(view())
    install_stop_handlers(stop)
    await daemon.run(stop)
    viewer.cancel()
    cdu.cancel()
    return daemon


def run_demo(*, duration_s: float, gpus: int, interval_s: float, profile: str, seed: int,
             state_dir: Path | None, out=None, faults: list[Fault] | None = None) -> None:
    """Run the demo for ``duration_s`` and print a short summary."""
    out = out or sys.stdout
    setup_logging("warning", json=False, stream=sys.stderr)
    with ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentd-demo-")))
        cfg = AgentConfig.model_validate({
            "backend": "sim", "interval": interval_s, "state_dir": str(state_dir), "node": "demo",
            "sim": {"gpus": gpus, "seed": seed, "profile": profile},
            "coolant": {"subscriptions": [subscription_for("json")]},
        })
        daemon = asyncio.run(_demo(cfg, duration_s, out, faults))
        out.write("\n" + summary(daemon, state_dir) + "\n")


def summary(daemon: Daemon, state_dir: Path) -> str:
    """What the run produced, read back from the store the daemon wrote."""
    from agentd.store import Store

    samples = [s for s in daemon.state.gpus.values() if s.healthy]
    energy_kj = sum((s.energy_j or 0.0) for s in samples) / 1000
    peak_c = max((s.temp_c or 0.0) for s in samples) if samples else float("nan")
    store = Store(Path(state_dir) / "store.sqlite", max_bytes=daemon.cfg.store.max_bytes)
    try:
        gpu_points = len(store.query(measurement="gpu"))
        agent_points = len(store.query(measurement="agent"))
        coolant_points = len(store.query(measurement="coolant"))
    finally:
        store.close()
    return (
        f"summary: {daemon.stats.ticks} ticks, {len(samples)} GPUs, {energy_kj:.1f} kJ drawn, "
        f"hottest GPU {peak_c:.1f} C\n"
        f"         store holds {gpu_points} gpu points, {coolant_points} coolant points and "
        f"{agent_points} agent points "
        f"({daemon.stats.ticks_missed} ticks missed)"
    )
