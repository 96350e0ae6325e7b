"""``agentd demo``: the real daemon on simulated GPUs, with a live terminal view.

Nothing here is a mock-up: the demo runs the same Daemon, tick and SQLite store as ``agentd run``
with ``backend = "sim"``; only the view is extra. It needs no server and no GPU.
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
    rows += [
        "",
        f"node GPU power {total_w:8.1f} W   ticks {daemon.stats.ticks}   "
        f"tick cost {daemon.stats.tick_s * 1000:.2f} ms",
        f"store {daemon.store.backlog()} points, {daemon.store.size_bytes() / 1024:.0f} KiB "
        f"(local store; no InfluxDB configured)",
    ]
    return "\n".join(rows)


async def _demo(cfg: AgentConfig, duration_s: float, out) -> Daemon:
    store = open_store(cfg)
    daemon = Daemon(cfg, make_backend(cfg), store)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    live = out.isatty()

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
    return daemon


def run_demo(*, duration_s: float, gpus: int, interval_s: float, profile: str, seed: int,
             state_dir: Path | None, out=None) -> None:
    """Run the demo for ``duration_s`` and print a short summary."""
    out = out or sys.stdout
    setup_logging("warning", json=False, stream=sys.stderr)
    with ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentd-demo-")))
        cfg = AgentConfig.model_validate({
            "backend": "sim", "interval": interval_s, "state_dir": str(state_dir), "node": "demo",
            "sim": {"gpus": gpus, "seed": seed, "profile": profile},
        })
        daemon = asyncio.run(_demo(cfg, duration_s, out))
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
    finally:
        store.close()
    return (
        f"summary: {daemon.stats.ticks} ticks, {len(samples)} GPUs, {energy_kj:.1f} kJ drawn, "
        f"hottest GPU {peak_c:.1f} C\n"
        f"         store holds {gpu_points} gpu points and {agent_points} agent points "
        f"({daemon.stats.ticks_missed} ticks missed)"
    )
