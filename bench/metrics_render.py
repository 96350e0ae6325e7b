"""GET /metrics: what one scrape costs, against what one tick costs, on the same daemon.

The real daemon (8 simulated GPUs, the shipped rule packs, its local store, fake clock) ticks;
then its snapshot for /metrics is built (``metrics_input_from_daemon``, once per tick) and
rendered (``render_metrics``, once per scraped snapshot, on a worker thread in the API), with
and without ``dcgm_compat``. CPU time of this thread, medians over ``--calls``.

Baseline: the daemon's own tick (``Daemon.tick``: read the GPUs, rules, store), measured in the
same run; ``render_tick_ratio`` says how many ticks' worth of CPU one scrape costs.

    python bench/metrics_render.py [--calls 300]

Last line: ``tick_cpu_ms=.. snapshot_cpu_ms=.. render_cpu_ms=.. render_dcgm_cpu_ms=.. render_tick_ratio=..``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable

from agentd.api.metrics import metrics_input_from_daemon, render_metrics
from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.daemon import Daemon, open_store
from collectors.sim import SimBackend


def cpu_ms(fn: Callable[[], object], calls: int) -> float:
    """Median CPU milliseconds of this thread per call of ``fn``."""
    samples = []
    for _ in range(calls):
        t = time.thread_time()
        fn()
        samples.append(time.thread_time() - t)
    return statistics.median(samples) * 1e3


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as state:
        cfg = AgentConfig.model_validate({"backend": "sim", "state_dir": state, "node": "bench", "sim": {"gpus": 8},
                                          "api": {"listen": ""}})
        clock = FakeClock()
        daemon = Daemon(cfg, SimBackend(gpus=8), open_store(cfg), clock=clock)
        await daemon.start()
        ticks = []
        for _ in range(calls):
            t = time.thread_time()
            await daemon.tick()
            ticks.append(time.thread_time() - t)
            clock.advance(1.0)
        tick = statistics.median(ticks) * 1e3
        inp = metrics_input_from_daemon(daemon, 0, "ok")
        snap = cpu_ms(lambda: metrics_input_from_daemon(daemon, 0, "ok", previous=inp), calls)
        plain = cpu_ms(lambda: render_metrics(inp, dcgm_compat=False), calls)
        dcgm = cpu_ms(lambda: render_metrics(inp, dcgm_compat=True), calls)
        series = [sum(1 for ln in render_metrics(inp, dcgm_compat=d).split(b"\n") if ln and not ln.startswith(b"#"))
                  for d in (False, True)]
        await daemon.shutdown()
    print(f"8 simulated GPUs, {len(inp.rules)} rule instances; medians of {calls} calls, CPU of this thread")
    print(f"tick (baseline): {tick:.3f} ms")
    print(f"snapshot for /metrics (every tick): {snap:.3f} ms")
    print(f"render, agentd names ({series[0]} samples): {plain:.2f} ms = {plain / tick:.2f} ticks")
    print(f"render with dcgm_compat ({series[1]} samples): {dcgm:.2f} ms = {dcgm / tick:.2f} ticks")
    print(f"tick_cpu_ms={tick:.3f} snapshot_cpu_ms={snap:.3f} render_cpu_ms={plain:.2f} "
          f"render_dcgm_cpu_ms={dcgm:.2f} render_tick_ratio={plain / tick:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    asyncio.run(main(p.parse_args().calls))
