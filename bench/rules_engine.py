"""Engine cost per tick: 50 rules x 8 GPUs (40 per-GPU rules, 10 coolant/node rules), CPython.

Inputs vary every tick (noisy temperatures around the thresholds, so instances move between
states and some fire); the figure is the mean wall time of ``Engine.evaluate`` per tick.

    python bench/rules_engine.py [--ticks 5000]

Last line: ``engine_ms_per_tick=..``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rules.engine import Engine  # noqa: E402
from rules.model import load_rules_text  # noqa: E402

GPU_TEMPLATES = [
    "gpu.temp_c > gpu.slowdown_c - {k}",
    "gpu.mem_temp_c > gpu.mem_max_c - {k}",
    "gpu.power_w > gpu.limit_w * 0.9{k} and gpu.temp_c > 70",
    "avg_over(gpu.power_w, 10s) > 600 + {k}",
    "gpu.throttled and gpu.util_pct > 50 + {k}",
    "max(gpu.temp_c, gpu.mem_temp_c - 5) > 80 + {k}",
    "gpu.temp_c > 75 + {k} or coolant.tcs.supply_temp_c > 44",
    "max_over(gpu.temp_c, 30s) > 85 + {k}",
]
NODE_TEMPLATES = [
    "coolant.tcs.supply_temp_c > 40 + {k}",
    "coolant.tcs.flow_lpm < 70 - {k}",
    "coolant.tcs.return_temp_c - coolant.tcs.supply_temp_c > 10 + {k}",
    "coolant.leak == \"Warning\" or coolant.leak == \"Critical\"",
    "node.gpu_power_w > 5000 - 10 * {k}",
]


def rules_yaml() -> str:
    lines = ["rules:"]
    for i in range(40):
        t = GPU_TEMPLATES[i % len(GPU_TEMPLATES)].format(k=i % 5 + 1)
        lines += [f"  - name: g{i}", "    scope: gpu", f"    when: '{t}'", "    for: 5s",
                  "    clear_for: 30s", "    actions: [{type: cap_gpu, fraction: 0.8}]"]
    for i in range(10):
        t = NODE_TEMPLATES[i % len(NODE_TEMPLATES)].format(k=i % 3)
        lines += [f"  - name: n{i}", "    scope: coolant", f"    when: '{t}'", "    for: 10s",
                  "    clear_for: 1m", "    actions: [{type: cap_node, watts: 4000}]"]
    return "\n".join(lines) + "\n"


def measure_engine(ticks: int = 5000, interval: float = 0.1) -> tuple[float, str]:
    """Mean ms of ``Engine.evaluate`` per tick, and a line describing the run."""
    engine = Engine(load_rules_text(rules_yaml(), "bench"))
    rng = random.Random(1)
    # Pre-build the input dicts (the daemon builds them anyway); the timed part is evaluate().
    gpus = {i: {"temp_c": 80.0, "mem_temp_c": 85.0, "slowdown_c": 89.0, "mem_max_c": 95.0,
                "power_w": 600.0, "limit_w": 700.0, "limit_max_w": 700.0, "util_pct": 90.0,
                "throttled": False} for i in range(8)}
    node = {"coolant.tcs.supply_temp_c": 40.0, "coolant.tcs.return_temp_c": 50.0,
            "coolant.tcs.flow_lpm": 70.0, "coolant.leak": "OK", "node.gpu_power_w": 4800.0,
            "node.gpus": 8, "coolant.stale": False}
    total = 0.0
    firing_max = 0
    events = 0
    for tick in range(ticks):
        now = tick * interval
        for g in gpus.values():
            g["temp_c"] = 82.0 + rng.gauss(0, 1.0)
            g["mem_temp_c"] = 88.0 + rng.gauss(0, 1.0)
            g["power_w"] = 620.0 + rng.gauss(0, 20)
            g["throttled"] = rng.random() < 0.05
        node["coolant.tcs.supply_temp_c"] = 41.0 + rng.gauss(0, 0.5)
        node["coolant.tcs.flow_lpm"] = 70.0 + rng.gauss(0, 1)
        t0 = time.perf_counter()
        ev = engine.evaluate(now, node, gpus)
        total += time.perf_counter() - t0
        firing_max = max(firing_max, len(ev.ceilings))
        events += len(ev.events)
    info = (f"rules=50 (40 gpu x 8 + 10 node) instances={len(engine.states)} ticks={ticks} "
            f"max_ceilings_per_tick={firing_max} events_per_tick={events / ticks:.2f} python={sys.version.split()[0]}")
    return total / ticks * 1000, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticks", type=int, default=5000)
    ap.add_argument("--interval", type=float, default=0.1)
    args = ap.parse_args()
    ms, info = measure_engine(args.ticks, args.interval)
    print(info)
    print(f"engine_ms_per_tick={ms:.3f}")


if __name__ == "__main__":
    main()
