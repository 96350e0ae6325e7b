#!/usr/bin/env bash
# Read-only checks on a machine with a real NVIDIA GPU (run by hand or through the device tool):
# probe (with the health calls), the collector's tests against the real driver, the health
# counters and the NVML event thread on the real driver, the daemon on real NVML for a while
# (rules evaluating in dry_run), NVML call latencies (the health calls included), and the
# daemon's CPU/RSS on the real driver.
# Never writes a GPU setting: dry_run = true, no limit writes, no clocks, no MIG.
#   bench/device_check.sh [OUTDIR]      (wheels in .whl/ are installed to /tmp/site when present)
set -u
out=${1:-${OUT:-/tmp/agentd-device}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; grep -i nvidia /proc/devices; ls -l /dev/nvidia*; } > "$out/devices.txt" 2>&1
python3 -m agentd probe --json > "$out/probe.json" 2> "$out/probe.err"
python3 -m pytest -q -p no:cacheprovider tests/test_nvml_real.py tests/test_nvml.py > "$out/pytest.txt" 2>&1
# GPU health (issue 14) on the real driver: which event types each GPU registers, what the event
# thread sees in a few seconds of an idle GPU (no fault is injected: nothing is written), every
# health counter the collector reads and what it dropped, and how long close() takes to stop the
# event thread. The probe above records each health call's raw answer and time.
timeout -s TERM 60 python3 - > "$out/health.txt" 2>&1 <<'PY'
import json, time
from collectors.nvml import NvmlBackend
b = NvmlBackend()
infos = b.open()
t0 = time.perf_counter()
first = b.sample(time.time_ns())
print(f"first sample (every health counter due): {(time.perf_counter() - t0) * 1000:.2f} ms")
t0 = time.perf_counter()
b.sample(time.time_ns())
print(f"next sample (none due): {(time.perf_counter() - t0) * 1000:.2f} ms")
time.sleep(3)  # the event thread waits (500 ms at a time) on the real event set
print("events watched:", json.dumps(b.event_watch()))
print("event stats:", json.dumps(b.event_stats()))
print("events in 3 s:", [e._asdict() for e in b.drain_events()])
fields = ("ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate", "retired_pages_sbe",
          "retired_pages_dbe", "retired_pages_pending", "remap_correctable_rows", "remap_uncorrectable_rows",
          "remap_pending", "remap_failure", "pcie_replay", "recovery_action", "throttle_power_ns",
          "throttle_thermal_ns", "throttle_board_limit_ns", "throttle_reliability_ns")
for s in first:
    print(f"GPU {s.index} {s.model}:", json.dumps({f: getattr(s, f) for f in fields}))
    print(f"GPU {s.index} nvlink:", json.dumps([link._asdict() for link in s.nvlink] if s.nvlink else s.nvlink))
    print(f"GPU {s.index} unsupported:", sorted(b.unsupported(s.index)))
t0 = time.perf_counter()
b.close()
print(f"close (stops the event thread): {(time.perf_counter() - t0) * 1000:.1f} ms")
PY
state=$(mktemp -d)
cat > "$state/agentd.toml" <<TOML
interval = 0.5
backend = "nvml"
state_dir = "$state"
node = "device-check"
dry_run = true
TOML
timeout -s TERM 20 python3 -m agentd run --config "$state/agentd.toml" > "$out/run.log" 2>&1
echo "agentd run exit: $?" >> "$out/run.log"
python3 - "$state/store.sqlite" > "$out/store.txt" 2>&1 <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = [r[0] for r in db.execute("select line from points order by id")]
gpu = [r for r in rows if r.startswith("gpu,")]
agent = [r for r in rows if r.startswith("agent,")]
print(f"points={len(rows)} gpu={len(gpu)} agent={len(agent)}")
print("first gpu:", gpu[0] if gpu else None)
print("last gpu:", gpu[-1] if gpu else None)
ticks = sorted(float(f.split("=")[1]) for a in agent for f in a.split(" ")[1].split(",") if f.startswith("tick_s="))
if ticks:
    print(f"tick_s p50={ticks[len(ticks)//2]*1000:.2f} ms max={ticks[-1]*1000:.2f} ms over {len(ticks)} ticks")
PY
python3 bench/nvml_latency.py > "$out/latency.txt" 2>&1
python3 bench/overhead.py --real-nvml --seconds "${OVERHEAD_S:-30}" > "$out/overhead.txt" 2>&1
echo done
