"""Spool replay rate vs the server's raw ingest rate (DESIGN.md section 12).

Fills a fresh store (temporary directory) with N realistic ``gpu`` points (tags host/gpu/uuid/
model, 14 fields, 10 Hz timestamps), drains it into a real VictoriaMetrics through the
Forwarder with the v2 writer, then posts the same line protocol straight to the same server
(``/api/v2/write``, same batch size, same gzip setting, aiohttp) as the raw baseline. Each phase
writes its own series (the host tag carries a per-run, per-phase prefix), so neither phase
benefits from series the other created and both counts can be verified by reading back.

Usage: ``python bench/replay.py [--vm-url URL] [--points N] [--batch-size B] [--no-gzip]``
(URL defaults to ``$TEST_VM_URL``). The last line is
``replay_pts_s=.. raw_pts_s=.. ratio=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from agentd.influx import Forwarder, V2Writer, gzip_body  # noqa: E402
from agentd.lineproto import Point, encode  # noqa: E402
from agentd.store import Store  # noqa: E402

GPUS_PER_HOST = 8
SERIES = 1000  # 125 hosts x 8 GPUs
MODEL = "NVIDIA H100 80GB HBM3"


def make_lines(prefix: str, n: int, t0_ns: int) -> list[tuple[int, str]]:
    """``n`` gpu points over SERIES series, 100 ms apart per series (all distinct at 1 ms)."""
    out: list[tuple[int, str]] = []
    hosts = SERIES // GPUS_PER_HOST
    for i in range(n):
        s = i % SERIES
        step = i // SERIES
        host, gpu = divmod(s, GPUS_PER_HOST)
        ts = t0_ns + step * 100_000_000
        power = 300.0 + (i * 7919 % 4000) / 10.0
        p = Point("gpu", {"host": f"{prefix}-n{host:03d}", "gpu": str(gpu),
                          "uuid": f"GPU-{host:04x}{gpu:04x}-5a1e-4c3b-9d2f-{s:012x}", "model": MODEL},
                  {"power_w": power, "power_avg_w": power - 3.25, "energy_j": 1.0e9 + step * 40.0 + s,
                   "temp_c": 55.0 + (i % 200) / 10.0, "mem_temp_c": 65.0 + (i % 150) / 10.0,
                   "limit_w": 700.0, "limit_set_w": 650.0, "limit_default_w": 700.0,
                   "util_pct": float(i % 101), "mem_util_pct": float(i % 67),
                   "mem_used_bytes": 40_000_000_000 + i, "sm_clock_mhz": 1980 - (i % 300),
                   "clock_reasons": 0, "throttled": (i % 97) == 0},
                  ts)
        out.append((ts, encode(p)))  # type: ignore[arg-type]
    assert hosts * GPUS_PER_HOST == SERIES
    return out


def vm_count(vm_url: str, prefix: str) -> int:
    """Samples of ``gpu_power_w`` for hosts with ``prefix`` (exact, via /api/v1/export)."""
    urllib.request.urlopen(f"{vm_url}/internal/force_flush").read()
    q = urllib.parse.urlencode({"match[]": f'gpu_power_w{{host=~"{prefix}-.*"}}'})
    total = 0
    with urllib.request.urlopen(f"{vm_url}/api/v1/export?{q}") as resp:
        for line in resp:
            if line.strip():
                total += len(json.loads(line)["values"])
    return total


def settle(vm_url: str, seconds: float = 3.0) -> None:
    """Let the server finish background work from the previous phase (it shares our 2 CPUs)."""
    urllib.request.urlopen(f"{vm_url}/internal/force_flush").read()
    time.sleep(seconds)


async def replay(store: Store, vm_url: str, batch_size: int, gzip: bool) -> float:
    writer = V2Writer(vm_url, "bench", org="bench", gzip=gzip, timeout=60)
    writer.open()  # import influxdb-client and build the client outside the timed part, as raw() does
    fwd = Forwarder(store, writer, batch_size=batch_size, backoff_max=1.0)
    stop = asyncio.Event()
    n = store.backlog()
    t = time.perf_counter()
    task = asyncio.create_task(fwd.run(stop))
    while store.backlog() and not task.done():
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t
    stop.set()
    await task
    await writer.close()
    if fwd.write_errors or fwd.quarantined:
        raise SystemExit(f"replay had errors: {fwd.write_errors} failed writes, {fwd.quarantined} quarantined, "
                         f"last: {fwd.last_error}")
    assert fwd.written == n, (fwd.written, n)
    return dt


async def raw(lines: list[str], vm_url: str, batch_size: int, gzip: bool) -> float:
    url = f"{vm_url}/api/v2/write"
    params = {"org": "bench", "bucket": "bench", "precision": "ns"}
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if gzip:
        headers["Content-Encoding"] = "gzip"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        t = time.perf_counter()
        for k in range(0, len(lines), batch_size):
            data = "\n".join(lines[k:k + batch_size]).encode()
            if gzip:
                data = gzip_body(data)
            async with session.post(url, params=params, data=data, headers=headers) as resp:
                await resp.read()
                if resp.status // 100 != 2:
                    raise SystemExit(f"raw write failed: HTTP {resp.status}")
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vm-url", default=os.environ.get("TEST_VM_URL"))
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--no-gzip", action="store_true")
    args = ap.parse_args()
    if not args.vm_url:
        ap.error("no VictoriaMetrics URL: pass --vm-url or set TEST_VM_URL")
    vm_url = args.vm_url.rstrip("/")
    gzip = not args.no_gzip
    run = f"b{int(time.time()) % 100000:05d}"
    # Recent timestamps (inside VictoriaMetrics' default retention), whole milliseconds.
    t0 = (time.time_ns() // 1_000_000) * 1_000_000 - 2 * 3600 * 10**9

    t = time.perf_counter()
    spool = make_lines(f"{run}s", args.points, t0)
    direct = [line for _, line in make_lines(f"{run}r", args.points, t0)]
    print(f"generated 2 x {args.points} points in {time.perf_counter() - t:.1f}s "
          f"({len(spool[0][1])} bytes per line)", flush=True)

    with tempfile.TemporaryDirectory(prefix="agentd-replay-") as tmp:
        store = Store(Path(tmp) / "store.sqlite", max_bytes=8 * 2**30)
        t = time.perf_counter()
        for k in range(0, len(spool), 10_000):
            store.append(spool[k:k + 10_000])
        print(f"filled store: {store.backlog()} lines, {store.size_bytes() / 2**20:.0f} MiB "
              f"in {time.perf_counter() - t:.1f}s", flush=True)
        del spool
        settle(vm_url)
        replay_s = asyncio.run(replay(store, vm_url, args.batch_size, gzip))
        store.close()
    replay_pts = args.points / replay_s
    print(f"replay: {args.points} points in {replay_s:.2f}s = {replay_pts:,.0f} points/s", flush=True)

    settle(vm_url)
    raw_s = asyncio.run(raw(direct, vm_url, args.batch_size, gzip))
    raw_pts = args.points / raw_s
    print(f"raw:    {args.points} points in {raw_s:.2f}s = {raw_pts:,.0f} points/s", flush=True)

    got_replay = vm_count(vm_url, f"{run}s")
    got_raw = vm_count(vm_url, f"{run}r")
    print(f"read back gpu_power_w samples: replay {got_replay}, raw {got_raw} (expected {args.points} each)")
    if got_replay != args.points or got_raw != args.points:
        raise SystemExit("count mismatch")
    print(f"replay_pts_s={replay_pts:.0f} raw_pts_s={raw_pts:.0f} ratio={replay_pts / raw_pts:.3f}")


if __name__ == "__main__":
    main()
