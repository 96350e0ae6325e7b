#!/usr/bin/env bash
# Read-only checks on a machine with a real NVIDIA GPU (run by hand or through the device tool):
# probe, the collector's tests against the real driver, the daemon on real NVML for a while (rules
# evaluating in dry_run), NVML call latencies, and the daemon's CPU/RSS on the real driver.
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
