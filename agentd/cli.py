"""The ``agentd`` command line: run, demo, probe, check-config."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from agentd import __version__
from agentd.config import AgentConfig, ConfigError, effective_config_text, load_config

_CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="agentd.toml to read (default /etc/agentd/agentd.toml when present, else built-in defaults; "
         "or $AGENTD_CONFIG).")


def _load_or_exit(config_path: Path | None) -> AgentConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="agentd")
def main() -> None:
    """gpu-agentd: GPU + coolant telemetry and power/thermal protection for one node."""


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path | None) -> None:
    """Validate PATH (or the default config); print every error, or the effective config.

    Exits 2 when invalid, 0 when valid (secrets are masked in the output).
    """
    cfg = _load_or_exit(path)
    click.echo(effective_config_text(cfg), nl=False)


@main.command()
@_CONFIG_OPTION
def run(config_path: Path | None) -> None:
    """Run the daemon: tick, store, forward to InfluxDB, until SIGTERM/SIGINT."""
    from agentd.log import setup_logging
    from agentd.service import serve
    from agentd.store import StoreError
    from collectors.base import BackendError

    cfg = _load_or_exit(config_path)
    setup_logging(cfg.log_level)
    try:
        asyncio.run(serve(cfg))
    except BackendError as exc:
        click.echo(f"agentd: {exc}", err=True)
        sys.exit(1)
    except (OSError, StoreError) as exc:  # state directory not writable, and the like
        click.echo(f"agentd: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--duration", type=float, default=30.0, show_default=True, help="seconds to run")
@click.option("--gpus", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--interval", type=click.FloatRange(0.05, 10), default=1.0, show_default=True)
@click.option("--profile", type=click.Choice(["training", "inference", "idle"]), default="training",
              show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo's store lives (default: a temporary folder, removed afterwards)")
def demo(duration: float, gpus: int, interval: float, profile: str, seed: int, state_dir: Path | None) -> None:
    """Run a simulated GPU node with the local store (no servers, no GPU) and show it live."""
    from agentd.demo import run_demo

    run_demo(duration_s=duration, gpus=gpus, interval_s=interval, profile=profile, seed=seed,
             state_dir=state_dir)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (the test-fixture format)")
def probe(as_json: bool) -> None:
    """Read every GPU once and list which fields and controls the driver supports. Read only."""
    from agentd.probe import probe as run_probe, probe_text
    from collectors.base import BackendError

    try:
        result = run_probe()
    except BackendError as exc:
        click.echo(f"agentd probe: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else probe_text(result))

