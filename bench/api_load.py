"""Throttle API under load: does serving schedulers slow the tick?

One ``agentd run`` (the real CLI, ``backend = "sim"``, 8 simulated GPUs, a 10 Hz tick, the shipped
rule packs, its local store) is measured in three phases of ``--seconds`` each, in this order:

1. unloaded: nobody calls the API (the baseline, measured in the same run on the same daemon);
2. paced: ``--clients`` (50) concurrent clients each GET ``/v1/throttle`` at ``--rate`` (10 Hz),
   a fixed-rate schedule per client (500 requests/s in all);
3. flat out: the same clients, each sending its next request as soon as the last answered.

The clients run in a process of their own (``--client`` mode of this file), on keep-alive
connections, so the daemon's event loop serves them and nothing else runs in its process.

Tick lag is the daemon's own figure: how late each tick started against its fixed-rate schedule
(``agent.tick_lag_s``, stored every tick). After the run the bench reads those points back from
the daemon's store (``agentd.store.StoreReader``, read only) and takes each phase's p99 over the
ticks inside that phase's window. The goal at 500 requests/s: tick lag p99 <= 10 ms.

    python bench/api_load.py [--seconds 30] [--clients 50] [--rate 10]

Last line: ``rps=.. p99_ms=.. tick_lag_p99_ms=.. tick_lag_unloaded_p99_ms=..`` (rps and p99_ms
of the paced phase; the flat-out figures are printed above it as ``max_rps`` / ``max_p99_ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_TICK_LAG_P99_MS = 10.0
READY_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1, in hundredths) by the standard library; NaN for fewer than two values."""
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


# -- the client process ----------------------------------------------------------------------


async def _client(session, url: str, period_s: float | None, until: float, latencies: list[float],
                  errors: list[str]) -> None:
    next_at = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            return
        if period_s is not None:
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += period_s
        started = time.monotonic()
        try:
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}")
        except Exception as exc:  # counted, reported: the bench goes on
            errors.append(type(exc).__name__)
        latencies.append(time.monotonic() - started)


async def run_clients(url: str, clients: int, rate_hz: float | None, seconds: float) -> dict[str, object]:
    """``clients`` concurrent pollers for ``seconds``; rate None = as fast as each one can."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        started = time.time()
        until = time.monotonic() + seconds
        period = 1.0 / rate_hz if rate_hz else None
        await asyncio.gather(*(_client(session, url, period, until, latencies, errors) for _ in range(clients)))
        ended = time.time()
    return {"started": started, "ended": ended, "requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3, "rps": len(latencies) / (ended - started)}


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--seconds", type=float, required=True)
    a = p.parse_args(argv)
    out = asyncio.run(run_clients(a.client, a.clients, a.rate or None, a.seconds))
    print(json.dumps(out))


# -- the daemon and the phases ---------------------------------------------------------------


def _wait_ready(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"agentd exited with {proc.returncode} before it was ready:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # a start-up poll of a separate process, not a wait for logic
    sys.exit(f"agentd was not ready within {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-3000:]}")


def _clients(url: str, clients: int, rate: float, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--clients", str(clients), "--rate", str(rate),
           "--seconds", str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tick_lags_ms(store_path: Path, start_s: float, end_s: float) -> list[float]:
    """The daemon's ``agent.tick_lag_s`` of the ticks between two wall times, in ms."""
    from agentd.store import PointFilter, StoreReader
    from collectors.lineproto_parse import parse_line

    lags: list[float] = []
    reader = StoreReader(store_path)
    try:
        flt = PointFilter(measurements=("agent",), since_ns=int(start_s * 1e9), until_ns=int(end_s * 1e9))
        for chunk in reader.chunks(flt):
            for _id, _ts_ns, line in chunk:
                lag = parse_line(line)[2].get("tick_lag_s")
                if isinstance(lag, (int, float)):
                    lags.append(float(lag) * 1e3)
    finally:
        reader.close()
    return lags


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rate", type=float, default=10.0, help="requests per second per client, paced phase")
    a = p.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="agentd-api-load-") as state:
        cfg = Path(state) / "agentd.toml"
        cfg.write_text(f'backend = "sim"\ninterval = 0.1\nstate_dir = "{state}"\nnode = "bench"\n'
                       f'log_level = "warning"\n[sim]\ngpus = 8\n[api]\nlisten = "127.0.0.1:{port}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
        log_path = Path(state) / "agentd.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--config", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(base, proc, log_path)
            url = base + "/v1/throttle"
            t0 = time.time()
            time.sleep(a.seconds)  # phase 1: the daemon alone (a measured window, not a wait for logic)
            unloaded = (t0, time.time())
            paced = _clients(url, a.clients, a.rate, a.seconds)
            flat = _clients(url, a.clients, 0.0, a.seconds)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        store = Path(state) / "store.sqlite"
        lag_unloaded = tick_lags_ms(store, *unloaded)
        lag_paced = tick_lags_ms(store, paced["started"], paced["ended"])
        lag_flat = tick_lags_ms(store, flat["started"], flat["ended"])
    p99 = {k: percentile(v, 0.99) for k, v in
           (("unloaded", lag_unloaded), ("paced", lag_paced), ("flat", lag_flat))}
    print(f"daemon: sim backend, 8 GPUs, 10 Hz tick; {a.clients} clients; {a.seconds:g} s per phase")
    print(f"unloaded: {len(lag_unloaded)} ticks, tick lag p50 {statistics.median(lag_unloaded):.2f} ms "
          f"p99 {p99['unloaded']:.2f} ms")
    for name, ph, lags in (("paced", paced, lag_paced), ("flat out", flat, lag_flat)):
        print(f"{name}: {ph['requests']} requests, {ph['rps']:.0f} requests/s, errors {ph['errors']} "
              f"{ph['error_kinds']}, latency p50 {ph['p50_ms']:.2f} ms p99 {ph['p99_ms']:.2f} ms; "
              f"{len(lags)} ticks, tick lag p99 {percentile(lags, 0.99):.2f} ms "
              f"(x{percentile(lags, 0.99) / max(p99['unloaded'], 1e-9):.2f} of unloaded)")
    met = "met" if p99["paced"] <= GOAL_TICK_LAG_P99_MS else "NOT met"
    print(f"goal at {a.clients * a.rate:.0f} requests/s: tick lag p99 <= {GOAL_TICK_LAG_P99_MS:g} ms: {met}")
    print(f"max_rps={flat['rps']:.0f} max_p99_ms={flat['p99_ms']:.2f} max_tick_lag_p99_ms={p99['flat']:.2f}")
    print(f"rps={paced['rps']:.0f} p99_ms={paced['p99_ms']:.2f} tick_lag_p99_ms={p99['paced']:.2f} "
          f"tick_lag_unloaded_p99_ms={p99['unloaded']:.2f}")


if __name__ == "__main__":
    main()
