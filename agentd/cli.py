"""The ``agentd`` command line: run, demo, probe, check-config, config, restore-limits, rules, sim.

Exit codes, every command: 0 success; 1 the command ran and failed (a GPU write, the driver,
the broker, a rule test); 2 what it was given is wrong (options, the config, rule files).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import click

from agentd import __version__
from agentd.cli_types import Seconds, broker_address
from agentd.config import AgentConfig, ConfigError, LoadedConfig, load_config_report
from agentd.export_cli import export_command, store_group
from agentd.plot_cli import plot_command
from agentd.rules_cli import rules
from agentd.site.domains_cli import domains
from agentd.site.sim_cli import site as sim_site
from agentd.site.controller_cli import controller
from agentd.status_cli import status_command
from agentd.schedulers.slurm_cli import slurm_sync

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

_CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="agentd.toml to read (default: $AGENTD_CONFIG, else /etc/agentd/agentd.toml when present, else "
         "built-in defaults).")


def _load_report_or_exit(config_path: Path | None, named_by: str = "--config") -> LoadedConfig:
    try:
        return load_config_report(config_path, named_by=named_by)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)


def _load_or_exit(config_path: Path | None) -> AgentConfig:
    return _load_report_or_exit(config_path).cfg


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="agentd")
def main() -> None:
    """gpu-agentd: GPU + coolant telemetry and power/thermal protection for one node.

    Exit codes: 0 success, 1 the command failed at its work (driver, GPU write, broker, a rule
    test), 2 bad input (options, the config, rule files). Shell completion:
    eval "$(_AGENTD_COMPLETE=bash_source agentd)" (zsh_source, fish_source too).
    """


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_CONFIG_OPTION
def check_config(path: Path | None, config_path: Path | None) -> None:
    """Validate the config (--config, or PATH, or $AGENTD_CONFIG, or the default); print every
    error, or the effective config.

    Also checks what `agentd run` reads only when it starts (the token file, the MQTT TLS files,
    the state directory, the rule files and rules.params), so a config that passes here does not
    stop `run`; a file in systemd's credentials directory is only visible to the unit and is
    noted, not failed.

    The effective config is itself a valid config (`agentd check-config > x.toml && agentd
    check-config x.toml` passes): each value says where it came from (file, $AGENTD_NAME or
    default) and, for node and mqtt.client_id, the value in use; unset keys and masked secrets
    are commented out.

    Exits 2 when invalid, 0 when valid.
    """
    from agentd.config import preflight
    from agentd.rule_files import check_rules
    from agentd.sample_config import effective_config_text

    if path is not None and config_path is not None and path != config_path:
        raise click.UsageError(f"two configs given ({path} and --config {config_path}); PATH is the same as "
                               "--config: give one")
    loaded = _load_report_or_exit(config_path or path, "--config" if config_path is not None else "PATH")
    cfg = loaded.cfg
    errors, notes = preflight(cfg, loaded.source)
    if cfg.rules.enabled:  # the rule files and rules.params are part of the configuration
        checked = check_rules(cfg, loaded.source)
        errors += [f"{loaded.source}: {line}" for line in checked.files.warnings] + checked.errors
        notes += [f"{loaded.source}: {line}" for line in checked.files.infos]
    from agentd.integrity import import_conflicts

    errors += [f"install: {line}" for line in import_conflicts()]  # what `agentd run` would refuse
    for line in notes + errors:
        click.echo(line, err=True)
    if errors:
        sys.exit(2)
    click.echo(effective_config_text(loaded), nl=False)


@main.command("config")
def sample_config() -> None:
    """Print a commented sample agentd.toml: every key, its default and what it does.

    Like `telegraf config`: generated from the configuration model, so it lists every key of
    this version. Lines '# key = value' hold the defaults; uncomment one to change it. The
    output passes `agentd check-config`.
    """
    from agentd.sample_config import sample_config_text

    click.echo(sample_config_text(), nl=False)


@main.command()
@_CONFIG_OPTION
@click.option("--once", is_flag=True,
              help="one tick, printed (points as line protocol, the limits it would set as comments); "
                   "writes nothing: no limit, no store, no MQTT (like telegraf --test)")
@click.option("--format", "fmt", type=click.Choice(["lp", "json"]), default=None,
              help="with --once: lp (default) or one JSON document")
def run(config_path: Path | None, once: bool, fmt: str | None) -> None:
    """Run the daemon: tick, store, forward to InfluxDB, until SIGTERM/SIGINT."""
    from agentd.log import setup_logging
    from agentd.service import serve
    from agentd.store import StoreError
    from collectors.base import BackendError
    from rules.model import RuleLoadError

    if fmt is not None and not once:
        raise click.UsageError("--format goes with --once (the daemon writes to its store, not stdout)")
    cfg = _load_or_exit(config_path)
    if once:  # before setup_logging: logs must not mix into the data on stdout
        from agentd.oneshot import run_once

        sys.exit(run_once(cfg, fmt or "lp", sys.stdout))
    setup_logging(cfg.log_level)
    try:
        asyncio.run(serve(cfg, config_path))
    except RuleLoadError as exc:  # a site rule file is wrong: say where, like check-config
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)
    except BackendError as exc:
        click.echo(f"agentd: {exc}", err=True)
        sys.exit(1)
    except (OSError, StoreError) as exc:  # state directory not writable, and the like
        click.echo(f"agentd: {exc}", err=True)
        sys.exit(1)
    except ConfigError as exc:  # found only when used (an unreadable mqtt.ca_file, ...)
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)


@main.command()
@click.option("--duration", type=Seconds(), default=None,
              help="how long to run (seconds, or 2m; default 30 s, or with --fault until the faults' rules have "
                   "fired + 10 s, found by a fast preview and printed)")
@click.option("--gpus", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--interval", type=Seconds(0.05, 10), default=1.0, show_default=True, help="seconds between ticks")
@click.option("--profile", type=click.Choice(["training", "inference", "idle"]), default="training",
              show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo's store lives (default: a temporary folder, removed afterwards)")
@click.option("--fault", "faults", multiple=True, metavar="KIND[@START][+DUR][:TARGET]",
              help="a fault of the simulated CDU, as for 'agentd sim cdu' (e.g. --fault pump_failure@20)")
@click.option("--site", "site", is_flag=True,
              help="a 16-node site under a power cap instead (in-process bus, simulated time at 10x): watch "
                   "it hit its cap at the demand step and recover (default 90 s of site time)")
def demo(duration: float | None, gpus: int, interval: float, profile: str, seed: int, state_dir: Path | None,
         faults: tuple[str, ...], site: bool) -> None:
    """Run a simulated GPU node and CDU with the local store (no servers, no GPU) and show it live;
    with --site, a small simulated site and its power controller."""
    if site:
        from agentd.site.sim_cli import run_site_demo

        if faults:
            raise click.UsageError("--fault is for the one-node demo; --site runs its own scenario")
        site_s = duration or 90.0
        if site_s <= 30.0:
            raise click.BadParameter("the site demo warms up for 30 s; give more than that", param_hint="--duration")
        run_site_demo(nodes=16, duration_s=site_s, warmup_s=30.0, speed=10.0, seed=seed)
        return
    from agentd.demo import check_gpu_faults, run_demo
    from collectors.cdu_sim import parse_fault

    try:
        parsed = [parse_fault(f) for f in faults]
        check_gpu_faults(parsed, gpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    run_demo(duration_s=duration, gpus=gpus, interval_s=interval, profile=profile, seed=seed,
             state_dir=state_dir, faults=parsed)


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



@main.command("restore-limits")
@_CONFIG_OPTION
@click.option("--forget", "forget", multiple=True, metavar="UUID",
              help="drop the record of a GPU that is no longer in this node (a swapped board) and write "
                   "nothing; repeatable")
def restore_limits(config_path: Path | None, forget: tuple[str, ...]) -> None:
    """Put every GPU back to its baseline: the power limit its operator gave it.

    For ExecStopPost and after a crash: reads original_limits.json in the state directory and
    writes each baseline back to the GPU with the same UUID (never to another board that took its
    index), then forgets it. A record whose GPU is absent is kept and reported (dropped after 7 days
    absent, or with --forget). Exits 1 when a write failed.
    """
    from agentd.actuator import Actuator
    from agentd.daemon import make_backend
    from collectors.base import BackendError

    cfg = _load_or_exit(config_path)
    backend = make_backend(cfg)
    actuator = Actuator(backend, cfg.state_dir, dry_run=False)
    try:
        records = actuator.load_originals()
    except OSError as exc:
        click.echo(f"agentd restore-limits: {exc}", err=True)
        sys.exit(1)
    if forget:
        unknown = [u for u in forget if u not in records]
        if unknown:
            click.echo(f"agentd restore-limits: no record for {', '.join(unknown)} in {actuator.originals_path} "
                       f"(records: {', '.join(sorted(records)) or 'none'})", err=True)
            sys.exit(2)
        for uuid in forget:
            actuator.forget(uuid)
            click.echo(f"forgot {uuid} (its {records.get(uuid, {}).get('limit_w', '?')} W baseline is not written)")
        return
    if not records:
        click.echo(f"agentd restore-limits: nothing to restore ({actuator.originals_path} absent)")
        return
    try:
        infos = backend.open()
        outcome = actuator.restore({i.uuid: i.index for i in infos if i.uuid})
    except (BackendError, OSError) as exc:
        click.echo(f"agentd restore-limits: {exc}", err=True)
        sys.exit(1)
    finally:
        backend.close()
    for uuid, result in sorted(outcome.items()):
        click.echo(f"{uuid}: {result}")
        if result.startswith("kept"):
            click.echo(f"  (if that board left this node: agentd restore-limits --forget {uuid})")
    if any(result.startswith("failed") for result in outcome.values()):
        sys.exit(1)


# The simulator's own variables stay out of the daemon's AGENTD_ override prefix (a daemon started
# from the same shell would take them as config keys).
SIM_PASSWORD_ENV = "CDU_SIM_MQTT_PASSWORD"
OLD_SIM_PASSWORD_ENV = "AGENTD_SIM_MQTT_PASSWORD"  # read as a fallback; reserved in agentd.config


@main.group()
def sim() -> None:
    """Simulators that feed a daemon through a real broker (no hardware needed)."""


@sim.command("cdu")
@click.option("--broker", default=None, help="MQTT broker as HOST:PORT (not needed with --print-subscription)")
@click.option("--site", default="default", show_default=True)
@click.option("--unit", default="cdu-1", show_default=True, help="the CDU's id (the unit tag)")
@click.option("--fault", "faults", multiple=True, metavar="KIND[@START][+DUR][:TARGET]",
              help="scripted fault, repeatable: pump_failure, hot_facility, leak, dropout, bad_quality, "
                   "garbage (e.g. --fault pump_failure@30 --fault leak@60+120 --fault dropout@10+20:facility)")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--interval", type=Seconds(0.01, 3600), default=1.0, show_default=True,
              help="seconds between publications")
@click.option("--duration", type=Seconds(), default=None, help="how long to run (default: until Ctrl-C)")
@click.option("--format", "fmt", type=click.Choice(["json", "value", "influx"]), default="json", show_default=True)
@click.option("--prefix", default="cooling", show_default=True, help="first topic level")
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True)
@click.option("--nodes", type=click.IntRange(1, 10_000), default=14, show_default=True,
              help="simulated GPU nodes the CDU cools (their power is the heat load)")
@click.option("--profile", type=click.Choice(["training", "inference", "idle"]), default="training",
              show_default=True)
@click.option("--username", default=None)
@click.option("--password", default=None, envvar=SIM_PASSWORD_ENV, show_envvar=True,
              help="broker password (better from the environment than on the command line)")
@click.option("--tls/--no-tls", default=False)
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--print-subscription", is_flag=True, help="print the agentd.toml subscription for these topics and exit")
def sim_cdu(broker: str | None, site: str, unit: str, faults: tuple[str, ...], seed: int, interval: float,
            duration: float | None, fmt: str, prefix: str, qos: int, nodes: int, profile: str,
            username: str | None, password: str | None, tls: bool, ca_file: Path | None,
            print_subscription: bool) -> None:
    """Publish a simulated CDU (facility + TCS loops) to BROKER, with scriptable faults.

    The heat load is the power of NODES simulated 8-GPU nodes, whose GPUs in turn run on the
    CDU's TCS supply temperature (a closed loop).
    """
    from collectors.cdu_sim import CduModel, is_gpu_kind, parse_fault, subscription_for

    try:
        parsed = [parse_fault(f) for f in faults]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    gpu_faults = [spec for spec, f in zip(faults, parsed) if is_gpu_kind(f.kind)]
    if gpu_faults:
        raise click.BadParameter(f"{', '.join(gpu_faults)}: GPU faults are for agentd demo (agentd demo --fault "
                                 "xid79:3@30); sim cdu plays the CDU's faults only", param_hint="--fault")
    if print_subscription:  # what a daemon's agentd.toml needs: no broker involved
        from agentd.sample_config import table_text

        click.echo(table_text("[[coolant.subscriptions]]", subscription_for(fmt, prefix)), nl=False)
        return
    if broker is None:
        raise click.UsageError("Missing option '--broker' (HOST:PORT of the MQTT broker to publish to)")
    host, port = broker_address(broker)
    if password is None and os.environ.get(OLD_SIM_PASSWORD_ENV):
        password = os.environ[OLD_SIM_PASSWORD_ENV]
        click.echo(f"agentd sim cdu: {OLD_SIM_PASSWORD_ENV} is deprecated (it looked like a daemon setting); "
                   f"set {SIM_PASSWORD_ENV} instead", err=True)
    from agentd.config import MqttConfig
    from agentd.log import setup_logging

    setup_logging("warning", stream=sys.stderr)
    try:
        mqtt_cfg = MqttConfig.model_validate({"host": host, "port": port, "username": username,
                                              "password": password, "tls": tls, "ca_file": ca_file})
    except Exception as exc:  # pydantic ValidationError: say it in one line
        raise click.UsageError(str(exc)) from None
    model = CduModel(site=site, unit=unit, seed=seed, faults=parsed, fmt=fmt, topic_prefix=prefix)
    try:
        sent, steps = asyncio.run(_run_sim_cdu(model, mqtt_cfg, interval, duration, qos, nodes, profile, seed))
    except ConnectionError as exc:
        click.echo(f"agentd sim cdu: {exc}", err=True)
        sys.exit(1)
    click.echo(f"sim cdu: {steps} steps, {sent} messages published ({model.garbage} garbage), "
               f"TCS supply {model.tcs_supply_c:.1f} C, return {model.tcs_return_c:.1f} C, leak {model.leak}",
               err=True)


async def _run_sim_cdu(model, mqtt_cfg, interval: float, duration: float | None, qos: int, nodes: int,
                       profile: str, seed: int) -> tuple[int, int]:
    import os
    import time

    from agentd.mqtt import MqttLink
    from agentd.service import install_stop_handlers
    from collectors.cdu_sim import run_publisher
    from collectors.sim import SimBackend

    stop = asyncio.Event()
    install_stop_handlers(stop)
    link = MqttLink(mqtt_cfg, client_id=f"cdu-sim-{model.unit}-{os.getpid()}")
    link_task = asyncio.create_task(link.run(stop))
    deadline = time.monotonic() + 10.0
    while not link.connected:
        if time.monotonic() > deadline or link_task.done():
            stop.set()
            await asyncio.gather(link_task, return_exceptions=True)
            raise ConnectionError(f"cannot reach the broker at {mqtt_cfg.host}:{mqtt_cfg.port} within 10 s "
                                  "(is it running? check --broker, --tls, --username)")
        await asyncio.sleep(0.05)
    gpus = SimBackend(gpus=8, seed=seed, profile=profile)  # type: ignore[arg-type]  # click.Choice checked it
    gpus.open()
    t0_ns = time.time_ns()
    steps = 0

    def heat_load(t_s: float) -> float:
        gpus.coolant_supply_c = model.tcs_supply_c
        samples = gpus.sample(t0_ns + int(t_s * 1e9))
        return nodes * sum(s.power_w or 0.0 for s in samples) + 2_000.0 * nodes  # + CPUs, NICs, pumps

    def on_step(m) -> None:
        nonlocal steps
        steps += 1
        if steps % max(1, int(10 / interval)) == 1:
            r = m.readings()["tcs"]
            click.echo(f"t={m.t_s:7.1f} s  load {m.heat_load_w / 1000:6.1f} kW  TCS supply {r['supply_temp_c']:5.1f} C "
                       f"return {r['return_temp_c']:5.1f} C  flow {r['flow_lpm']:6.1f} L/min  leak {r['leak']}  "
                       f"published {m.published}", err=True)

    async def publish(topic: str, payload: bytes) -> bool:
        return await link.publish(topic, payload, qos=qos)

    try:
        sent = await run_publisher(model, publish, interval_s=interval, duration_s=duration, heat_load_w=heat_load,
                                   stop=stop, on_step=on_step)
    finally:
        stop.set()
        await asyncio.gather(link_task, return_exceptions=True)
    return sent, steps


main.add_command(rules)
sim.add_command(sim_site)
main.add_command(export_command)
main.add_command(store_group)
main.add_command(controller)
main.add_command(slurm_sync)
main.add_command(plot_command)
main.add_command(domains)
main.add_command(status_command)
