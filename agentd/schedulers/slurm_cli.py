"""``agentd slurm-sync``: carry the nodes' throttle state into Slurm (registered in ``agentd.cli``).

Exit codes: 0 a clean stop (SIGTERM / SIGINT), or ``--once`` whose pass read Slurm and made
every update it decided; 1 ``--once`` could not read Slurm or an update failed, or a runtime
failure; 2 the settings file is wrong (every located error printed) or the token file cannot be
read. A broker or a node API that cannot be reached is not a failure: slurm-sync retries, and
the nodes it has no fresh body from are left as they are.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from agentd.cli_types import HELP_OPTIONS
from agentd.schedulers.config import DEFAULT_PATH, SlurmSyncConfig, SyncConfigError, load_sync_config

if TYPE_CHECKING:  # the service pulls in aiohttp and aiomqtt: imported when the command runs
    from agentd.schedulers.service import SlurmSyncService


def _fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(line, err=True)
    sys.exit(code)


@click.command("slurm-sync", context_settings=HELP_OPTIONS)
@click.option("--config", "config_path", default=DEFAULT_PATH, show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="the slurm-sync settings (TOML)")
@click.option("--once", is_flag=True, help="one pass (after a first view of the nodes), then exit")
@click.option("--dry-run", is_flag=True, default=None,
              help="decide and log what would change; run no scontrol update, send no job hint")
def slurm_sync(config_path: Path, once: bool, dry_run: bool | None) -> None:
    """Drain and resume Slurm nodes from the agentd throttle state of each node.

    Follows every node's throttle body (the retained MQTT topic agentd/v1/{site}/nodes/+/throttle,
    or GET /v1/throttle of listed nodes) and keeps Slurm in step: State=DRAIN Reason="agentd:
    <why>" while a node should take no new work (running jobs continue), State=RESUME when it
    recovers, but only for nodes drained with its own reason: a node drained by a person stays
    as they left it. Optionally keeps {"agentd_level": N} in the node's Extra and pushes each
    running job's class and priority to its nodes (PUT /v1/jobs/{job_id}). Needs Slurm operator
    rights (docs/slurm-sync.md).
    """
    try:
        cfg = load_sync_config(config_path)
    except SyncConfigError as exc:
        _fail(exc.errors)
    if dry_run:
        cfg = cfg.model_copy(update={"dry_run": True})
    try:
        token = cfg.api_token()
    except SyncConfigError as exc:
        _fail([f"{config_path}: {line}" for line in exc.errors])

    from agentd.log import setup_logging

    setup_logging(cfg.log_level)
    from agentd.config import ConfigError

    try:
        service = build_service(cfg, token)
    except ConfigError as exc:  # a TLS file the [mqtt] section names cannot be loaded
        _fail([f"{config_path}: {line}" for line in exc.errors])
    if once:
        result = asyncio.run(service.once())
        sys.exit(0 if result.slurm_ok and not result.failed else 1)
    try:
        asyncio.run(_serve(service))
    except (OSError, RuntimeError) as exc:
        _fail(f"agentd slurm-sync: {exc}", 1)


def build_service(cfg: SlurmSyncConfig, token: str | None) -> SlurmSyncService:
    """The service ``cfg`` describes, on the real clock and the real Slurm clients."""
    from agentd.clock import SystemClock
    from agentd.schedulers.priorities import PriorityPusher
    from agentd.schedulers.scontrol import Slurm
    from agentd.schedulers.service import SlurmSyncService
    from agentd.schedulers.slurm_sync import SyncCore
    from agentd.schedulers.sources import MqttSource, PollSource, ThrottleSource

    clock = SystemClock()
    reverse = {slurm: node for node, slurm in cfg.node_names.items()}
    source: ThrottleSource
    if cfg.source.kind == "mqtt":
        source = MqttSource(cfg.mqtt, cfg.source.site, expected=list(cfg.node_names), monotonic=clock.monotonic)
    else:
        source = PollSource(cfg.source.nodes, interval_s=cfg.source.poll_interval_s, timeout_s=cfg.source.timeout_s,
                            max_in_flight=cfg.source.max_in_flight, token=token, monotonic=clock.monotonic)
    core = SyncCore(prefix=cfg.reason_prefix, set_extra=cfg.set_extra, max_per_minute=cfg.max_updates_per_minute,
                    slurm_name=cfg.slurm_name, grace_s=cfg.expiry_grace_s, ignore=cfg.ignore_nodes)
    pusher = None
    if cfg.push_priorities:
        pusher = PriorityPusher(cfg.jobs, url_of=cfg.api_url, agentd_name=lambda n: reverse.get(n, n),
                                interval_s=cfg.priorities.interval_s, timeout_s=cfg.priorities.timeout_s,
                                repush_s=cfg.priorities.repush_s, max_in_flight=cfg.priorities.max_in_flight,
                                token=token, monotonic=clock.monotonic, dry_run=cfg.dry_run)
    return SlurmSyncService(core, Slurm(cfg.slurm), source, clock=clock, interval_s=cfg.interval_s,
                            dry_run=cfg.dry_run, pusher=pusher)


async def _serve(service: SlurmSyncService) -> None:
    from agentd.service import install_stop_handlers

    stop = asyncio.Event()
    install_stop_handlers(stop)
    await service.run(stop)


def main() -> None:  # ``python -m agentd.schedulers.slurm_cli``
    slurm_sync()


if __name__ == "__main__":
    main()
