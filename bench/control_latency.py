"""Control latency: a reading over threshold -> the limit write returned, through the real tick.

8 GPUs (fake NVML) at a 10 Hz interval, one site rule ``gpu.temp_c > 80`` with ``for: 0s`` that
caps to 400 W. The GPUs' temperatures cross the threshold up and down on alternate ticks (the
ramp is opened up so each release completes in one tick, ready for the next crossing). For each
GPU whose crossing was sampled, latency = the return of its ``nvmlDeviceSetPowerManagementLimit``
minus the return of the tick's ``sample()`` that carried the crossing: the whole decision path
(state, coolant signals, rules, composition, ramp, actuator, the hop to the NVML thread).

The tick runs on the injected clock (no sleeping between ticks); latencies are real time
(perf_counter). Also printed: the engine's cost per tick for 50 rules x 8 GPUs
(bench/rules_engine.py).

    python bench/control_latency.py [--events 2000]

Last line: ``p50_ms=.. p99_ms=.. engine_ms_per_tick=..``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agentd.clock import FakeClock  # noqa: E402
from agentd.config import AgentConfig  # noqa: E402
from agentd.daemon import Daemon, open_store  # noqa: E402
from agentd.log import setup_logging  # noqa: E402
from collectors.nvml import NvmlBackend  # noqa: E402
from rules_engine import measure_engine  # noqa: E402
from tests.fake_pynvml import FakeNvml  # noqa: E402

RULE = """rules:
  - name: bench_hot
    scope: gpu
    when: gpu.temp_c > 80
    for: 0s
    clear_for: 0s
    severity: warning
    actions: [{type: cap_gpu, watts: 400}]
"""


class TimedBackend(NvmlBackend):
    """The real collector over the fake driver, noting when each sample and write returned."""

    sampled_at = 0.0
    writes: list[float]

    def sample(self, ts_ns):
        out = super().sample(ts_ns)
        self.sampled_at = time.perf_counter()
        return out

    def set_power_limit(self, index, limit_w):
        super().set_power_limit(index, limit_w)
        if limit_w < 700:
            self.writes.append(time.perf_counter() - self.sampled_at)


async def measure(events: int) -> list[float]:
    with tempfile.TemporaryDirectory() as state:
        (Path(state) / "rules.d").mkdir()
        (Path(state) / "rules.d" / "bench.yaml").write_text(RULE)
        cfg = AgentConfig.model_validate({
            "backend": "nvml", "interval": 0.1, "state_dir": state, "node": "bench",
            "rules": {"builtin_packs": False, "dirs": [f"{state}/rules.d"], "ramp_w_per_s": 10_000, "hold_s": 0},
        })
        fake = FakeNvml.with_gpus(8, temp_c=50)
        backend = TimedBackend(fake)
        backend.writes = []
        clock = FakeClock()
        daemon = Daemon(cfg, backend, open_store(cfg), clock=clock)
        await daemon.start()
        hot = False
        while len(backend.writes) < events:
            hot = not hot
            for gpu in fake.gpus:
                gpu.temp_c = 90 if hot else 50
            await daemon.tick()
            clock.advance(cfg.interval)
        await daemon.shutdown()
        return backend.writes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2000, help="threshold crossings to measure (>= 1000)")
    args = ap.parse_args()
    setup_logging("error")
    lat_ms = sorted(x * 1000 for x in asyncio.run(measure(args.events)))
    p50 = statistics.median(lat_ms)
    p99 = lat_ms[int(0.99 * (len(lat_ms) - 1))]
    engine_ms, info = measure_engine()
    print(f"control latency over {len(lat_ms)} crossings (8 GPUs, 10 Hz, for: 0s): "
          f"p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {lat_ms[-1]:.3f} ms (goal p99 <= 5 ms)")
    print(f"engine: {info}: {engine_ms:.3f} ms per tick (goal <= 1 ms)")
    print(f"p50_ms={p50:.3f} p99_ms={p99:.3f} engine_ms_per_tick={engine_ms:.3f}")


if __name__ == "__main__":
    main()
