"""The ``agentd`` command line: run, demo, probe, check-config."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from agentd import __version__
from agentd.config import AgentConfig, ConfigError, effective_config_text, load_config
from agentd.rules_cli import rules

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

    Also checks what `agentd run` reads only when it starts (the token file, the MQTT TLS files,
    the state directory), so a config that passes here does not stop `run`; a file in systemd's
    credentials directory is only visible to the unit and is noted, not failed.

    Exits 2 when invalid, 0 when valid (secrets are masked in the output).
    """
    from agentd.config import config_source, preflight

    cfg = _load_or_exit(path)
    errors, notes = preflight(cfg, config_source(path))
    if cfg.rules.enabled:  # the rule files and rules.params are part of the configuration
        from agentd.control import load_rules
        from rules.engine import Engine
        from rules.model import RuleLoadError

        try:
            Engine(load_rules(cfg.rules.dirs, cfg.rules.builtin_packs), cfg.rules.params)
        except RuleLoadError as exc:
            errors += exc.errors
    for line in notes + errors:
        click.echo(line, err=True)
    if errors:
        sys.exit(2)
    click.echo(effective_config_text(cfg), nl=False)


@main.command()
@_CONFIG_OPTION
def run(config_path: Path | None) -> None:
    """Run the daemon: tick, store, forward to InfluxDB, until SIGTERM/SIGINT."""
    from agentd.log import setup_logging
    from agentd.service import serve
    from agentd.store import StoreError
    from collectors.base import BackendError
    from rules.model import RuleLoadError

    cfg = _load_or_exit(config_path)
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
@click.option("--duration", type=float, default=30.0, show_default=True, help="seconds to run")
@click.option("--gpus", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--interval", type=click.FloatRange(0.05, 10), default=1.0, show_default=True)
@click.option("--profile", type=click.Choice(["training", "inference", "idle"]), default="training",
              show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo's store lives (default: a temporary folder, removed afterwards)")
@click.option("--fault", "faults", multiple=True, metavar="KIND[@START][+DUR][:TARGET]",
              help="a fault of the simulated CDU, as for 'agentd sim cdu' (e.g. --fault pump_failure@20)")
def demo(duration: float, gpus: int, interval: float, profile: str, seed: int, state_dir: Path | None,
         faults: tuple[str, ...]) -> None:
    """Run a simulated GPU node and CDU with the local store (no servers, no GPU) and show it live."""
    from agentd.demo import run_demo
    from collectors.cdu_sim import parse_fault

    try:
        parsed = [parse_fault(f) for f in faults]
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


@main.group()
def sim() -> None:
    """Simulators that feed a daemon through a real broker (no hardware needed)."""


def _broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
    if not sep:
        host, port = value, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT, for example 127.0.0.1:1883")
    return host, int(port)


@sim.command("cdu")
@click.option("--broker", required=True, help="MQTT broker as HOST:PORT")
@click.option("--site", default="default", show_default=True)
@click.option("--unit", default="cdu-1", show_default=True, help="the CDU's id (the unit tag)")
@click.option("--fault", "faults", multiple=True, metavar="KIND[@START][+DUR][:TARGET]",
              help="scripted fault, repeatable: pump_failure, hot_facility, leak, dropout, bad_quality, "
                   "garbage (e.g. --fault pump_failure@30 --fault leak@60+120 --fault dropout@10+20:facility)")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--interval", type=click.FloatRange(0.01, 3600), default=1.0, show_default=True,
              help="seconds between publications")
@click.option("--duration", type=click.FloatRange(0, None, min_open=True), default=None,
              help="seconds to run (default: until Ctrl-C)")
@click.option("--format", "fmt", type=click.Choice(["json", "value", "influx"]), default="json", show_default=True)
@click.option("--prefix", default="cooling", show_default=True, help="first topic level")
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True)
@click.option("--nodes", type=click.IntRange(1, 10_000), default=14, show_default=True,
              help="simulated GPU nodes the CDU cools (their power is the heat load)")
@click.option("--profile", type=click.Choice(["training", "inference", "idle"]), default="training",
              show_default=True)
@click.option("--username", default=None)
@click.option("--password", default=None, envvar="AGENTD_SIM_MQTT_PASSWORD")
@click.option("--tls/--no-tls", default=False)
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--print-subscription", is_flag=True, help="print the agentd.toml subscription for these topics and exit")
def sim_cdu(broker: str, site: str, unit: str, faults: tuple[str, ...], seed: int, interval: float,
            duration: float | None, fmt: str, prefix: str, qos: int, nodes: int, profile: str,
            username: str | None, password: str | None, tls: bool, ca_file: Path | None,
            print_subscription: bool) -> None:
    """Publish a simulated CDU (facility + TCS loops) to BROKER, with scriptable faults.

    The heat load is the power of NODES simulated 8-GPU nodes, whose GPUs in turn run on the
    CDU's TCS supply temperature (a closed loop).
    """
    from collectors.cdu_sim import CduModel, parse_fault, subscription_for

    host, port = _broker(broker)
    try:
        parsed = [parse_fault(f) for f in faults]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    if print_subscription:
        sub = subscription_for(fmt, prefix)
        click.echo("[[coolant.subscriptions]]")
        for key, value in sub.items():
            if isinstance(value, dict):
                inner = ", ".join(f'{k} = {v}' if isinstance(v, int) else f'{k} = "{v}"' for k, v in value.items())
                click.echo(f"{key} = {{ {inner} }}")
            else:
                click.echo(f'{key} = "{value}"')
        return
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
