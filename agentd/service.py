"""Wiring for ``agentd run``: config -> backend, store, forwarder -> the tick, with signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from agentd.api.auth import load_token
from agentd.api.server import start_api
from agentd.config import AgentConfig
from agentd.daemon import Daemon, make_backend, open_store
from agentd.integrity import check_imports

log = structlog.get_logger("agentd")


def install_stop_handlers(stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``: the daemon finishes its tick, restores, flushes and exits.

    A second one sets ``hurry``: the bounded flush is cut short (what is unsent stays in the
    store, committed, for the next start); restoring the GPUs is never skipped.
    """
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and hurry is not None and not hurry.is_set():
            log.warning("stop_hurried", signal=sig.name, hint="unsent readings stay in the store")
            hurry.set()
        elif not stop.is_set():
            log.info("stopping", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def make_forwarder(cfg: AgentConfig, store):
    """The InfluxDB forwarder, or None when no ``influx.url`` is configured (local store only)."""
    if not cfg.influx.url:
        return None
    from agentd.influx import Forwarder, make_writer

    writer = make_writer(cfg.influx)
    # influxdb-client's import (~0.4 s) starts now in a worker thread, not at the first write on
    # the event loop, where it would make the first ticks late.
    writer.preload()
    return Forwarder(store, writer, batch_size=cfg.influx.batch_size, backoff_max=cfg.influx.backoff_max)


async def serve(cfg: AgentConfig, config_path: Path | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP reloads ``config_path`` and the rules.

    Refuses to start (:class:`agentd.integrity.ImportConflictError`) when ``collectors`` or
    ``rules`` are not gpu-agentd's own files: a daemon that caps GPUs must not run on another
    distribution's code of the same name.
    """
    check_imports()
    token = load_token(cfg.api)  # ConfigError (api.token_file: ...) before anything starts
    stop = asyncio.Event()
    store = open_store(cfg)
    daemon = Daemon(cfg, make_backend(cfg), store, forwarder=make_forwarder(cfg, store), config_path=config_path)
    install_stop_handlers(stop, daemon.hurry)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.request_reload)
    # The API binds before the GPUs are touched (an address in use stops the start cleanly) and
    # stops after the shutdown has restored the limits: schedulers see the node to the end.
    api = await start_api(daemon.api, cfg.api, token)
    try:
        await daemon.start()
        log.info("started", interval_s=cfg.interval, state_dir=str(cfg.state_dir),
                 influx=cfg.influx.url or "none (local store only)", api=api.addresses if api else None)
        await daemon.run(stop)
    finally:
        if api is not None:
            await api.stop()
    if daemon.nvml_busy:
        # A thread stuck in the driver would keep the process from exiting (Python joins its
        # worker threads); everything else is closed, so leave now and let ExecStopPost's
        # restore-limits run once the driver answers.
        log.error("exiting_with_nvml_hung")
        sys.stdout.flush()
        os._exit(1)
