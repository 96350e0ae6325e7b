"""``agentd controller``: the site power controller as a command (registered in ``agentd.cli``).

Exit codes: 0 a clean stop (SIGTERM / SIGINT) or ``--check``; 1 a runtime failure (the state
directory cannot be opened, ...); 2 what it was given is wrong: the domains file (every located
error printed), the config, the site key, the settings. A broker that cannot be reached is not
a failure: the controller retries with backoff (the nodes ride their leases, then their
failsafes) and says so in its log.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from agentd.cli_types import HELP_OPTIONS, Seconds, broker_address

ENV_HELP = "(the [mqtt] section of --config gives credentials and TLS)"


def _fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(line, err=True)
    sys.exit(code)


def _meter(value: str) -> dict[str, str]:
    domain, sep, topic = value.partition("=")
    if not sep or not domain or not topic:
        raise click.BadParameter(f"{value!r}: expected DOMAIN=TOPIC, for example hall-a=facility/hall-a/power",
                                 param_hint="--meter")
    return {"domain": domain, "topic": topic}


@click.command("controller", context_settings=HELP_OPTIONS)
@click.option("--domains", "domains_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the site's power-domain tree (YAML, the same file the nodes read)")
@click.option("--broker", default=None, metavar="HOST:PORT", help=f"MQTT broker (default: [mqtt] host/port) {ENV_HELP}")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="agentd.toml for [mqtt] credentials/TLS, [influx], [store], log_level, budget.site_key_file")
@click.option("--site", default=None, help="site name (default: the domains file's site)")
@click.option("--id", "controller_id", default=None, help="this controller's id (default: the short hostname); "
              "its lease topics and its MQTT username. Replicas need distinct ids")
@click.option("--domain", default=None, help="allocate only within this subtree, under its parent's lease")
@click.option("--delegate", "delegates", multiple=True, metavar="DOMAIN",
              help="a child domain with a controller of its own: one reporter, one lease (repeatable)")
@click.option("--failsafe", "failsafe_w", type=float, default=None,
              help="with --domain: the subtree's budget in W while no parent lease is live")
@click.option("--interval", type=Seconds(), default=None, help="time between cycles (default 1s)")
@click.option("--lease-ttl", type=Seconds(), default=None, help="how long a lease holds (default 10s)")
@click.option("--stale-after", type=Seconds(), default=None,
              help="a node silent this long is counted at its maximum (default 5s)")
@click.option("--site-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the HMAC key that signs leases (default: budget.site_key_file of --config); a relative "
                   "name is looked up in $CREDENTIALS_DIRECTORY first")
@click.option("--meter", "meters", multiple=True, metavar="DOMAIN=TOPIC",
              help="a facility meter's topic for a domain (JSON {\"power_w\": ..} or a number; repeatable)")
@click.option("--unseen-node-w", type=float, default=None,
              help="count a node the domains file names that never reported at this many W")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep domain_power points in a local store here (forwarded to [influx] url when set)")
@click.option("--clear-leases-on-stop", is_flag=True, default=None,
              help="on a clean stop delete this controller's retained leases instead of letting them expire")
@click.option("--print-summary", is_flag=True, default=None, help="print a one-line summary per cycle on stdout")
@click.option("--check", is_flag=True, help="validate everything, print what would run, and exit")
@click.option("--seed", type=int, default=None, help="seed of the release jitter (default: random)")
def controller(domains_path: Path, broker: str | None, config_path: Path | None, site: str | None,
               controller_id: str | None, domain: str | None, delegates: tuple[str, ...], failsafe_w: float | None,
               interval: float | None, lease_ttl: float | None, stale_after: float | None, site_key_file: Path | None,
               meters: tuple[str, ...], unseen_node_w: float | None, state_dir: Path | None,
               clear_leases_on_stop: bool | None, print_summary: bool | None, check: bool, seed: int | None) -> None:
    """The site power controller: budgets every node under the caps of the domains file.

    Subscribes to the nodes' power reports, keeps every domain under its cap with three bands
    (cap threshold / target / uncap threshold), lowest priority class cut first, and publishes
    each node a signed, expiring lease (retained, one topic per controller id). Run two or more
    replicas with distinct --id: nodes enforce the minimum of the live leases.
    """
    from agentd.config import ConfigError, load_config
    from agentd.site.controller_config import ControllerConfigError, load_controller_config
    from agentd.site.protocol import load_site_key
    from rules.domains import DomainsError, load_domains

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(exc.errors)
    try:
        domains = load_domains(domains_path)
    except DomainsError as exc:
        _fail(exc.errors)

    file_section = getattr(cfg, "controller", None)  # a [controller] table, once AgentConfig has one
    data: dict[str, Any] = file_section.model_dump(exclude_unset=True) if file_section is not None else {}
    flags: dict[str, Any] = {"site": site, "id": controller_id, "domain": domain, "failsafe_w": failsafe_w,
                             "interval": interval, "lease_ttl": lease_ttl, "stale_after": stale_after,
                             "unseen_node_w": unseen_node_w, "state_dir": state_dir,
                             "clear_leases_on_stop": clear_leases_on_stop, "print_summary": print_summary}
    data.update({k: v for k, v in flags.items() if v is not None})
    if delegates:
        data["delegate"] = list(delegates)
    if meters:
        data["meters"] = [_meter(m) for m in meters]
    try:
        settings = load_controller_config(data)
    except ControllerConfigError as exc:
        _fail(exc.errors)

    key_path = site_key_file or cfg.budget.site_key_file
    if key_path is None:
        _fail("agentd controller: no site key: give --site-key-file FILE (or budget.site_key_file in --config); "
              "leases are signed with it and the nodes refuse unsigned ones. Make one with "
              "`head -c 32 /dev/urandom | base64 > site.key`")
    try:
        key = load_site_key(key_path)
    except ValueError as exc:
        _fail(f"agentd controller: {exc}")

    mqtt = cfg.mqtt
    if broker is not None:
        host, port = broker_address(broker)
        mqtt = mqtt.model_copy(update={"host": host, "port": port})
    if not mqtt.host:
        _fail("agentd controller: no broker: give --broker HOST:PORT (or [mqtt] host in --config)")

    site_name = settings.site or domains.site
    try:
        core = build_core(domains, settings, site_name, key, random.Random(seed))
    except ValueError as exc:
        _fail(f"agentd controller: {domains.source}: {exc}")

    if check:
        click.echo(f"site {site_name}, controller {core.controller_id}, allocating {core.root}"
                   + (f" (subtree, failsafe {settings.failsafe_w:g} W)" if settings.domain else "")
                   + (f", delegating {', '.join(core.delegates)}" if core.delegates else ""))
        click.echo(f"broker {mqtt.host}:{mqtt.port}, interval {settings.interval_s:g} s, lease ttl "
                   f"{settings.lease_ttl_s:g} s, stale after {settings.stale_after_s:g} s")
        for line in core.tree.summary():
            click.echo("  " + line)
        for t, qos in core.subscriptions()[:50]:
            click.echo(f"  subscribe {t} (qos {qos})")
        return

    from agentd.log import setup_logging

    setup_logging(cfg.log_level, stream=sys.stderr if settings.print_summary else None)
    import structlog

    if site_name != domains.site:
        structlog.get_logger("agentd.controller").warning(
            "site_differs_from_domains_file", site=site_name, domains_site=domains.site,
            hint="the nodes publish under their own agentd.toml site; make them agree")
    try:
        asyncio.run(_serve(core, settings, cfg, mqtt))
    except (OSError, RuntimeError) as exc:
        _fail(f"agentd controller: {exc}", 1)


def build_core(domains: Any, settings: Any, site: str, key: bytes, rng: random.Random | None = None) -> Any:
    """The ``ControllerCore`` that ``settings`` (a ControllerConfig) describe; ValueError naming
    what is wrong (an unknown delegate, a meter outside the subtree, ...)."""
    from agentd.site.controller import ControllerCore

    if settings.domain is not None and settings.domain not in domains:
        raise ValueError(f"--domain {settings.domain!r} is not a domain of the file "
                         f"(known: {', '.join(list(domains)[:10])})")
    return ControllerCore(
        domains, site=site, controller_id=settings.controller_id, key=key, interval_s=settings.interval_s,
        lease_ttl_s=settings.lease_ttl_s, lease_refresh_s=settings.lease_refresh_s,
        stale_after_s=settings.stale_after_s, subtree=settings.domain, delegates=settings.delegate,
        failsafe_w=settings.failsafe_w, unseen_node_w=settings.unseen_node_w,
        meters={m.topic: (m.domain, m.stale_after_s) for m in settings.meters},
        release_w_per_s=settings.release_w_per_s, release_jitter=settings.release_jitter,
        slack_gain_per_s=settings.slack_gain_per_s, slack_max_fraction=settings.slack_max_fraction,
        release_hold_s=settings.release_hold_s, band_hold_s=settings.band_hold_s,
        max_clock_skew_s=settings.max_clock_skew_s, max_lease_ttl_s=settings.max_lease_ttl_s, rng=rng)


async def _serve(core: Any, settings: Any, cfg: Any, mqtt: Any) -> None:
    from agentd.service import install_stop_handlers
    from agentd.site.controller_mqtt import ControllerService

    store = forwarder = None
    retention_s = None
    if settings.state_dir is not None:
        from agentd.service import make_forwarder
        from agentd.store import Store, StoreError

        try:
            store = Store(Path(settings.state_dir) / "controller.sqlite", max_bytes=cfg.store.max_bytes)
        except StoreError as exc:
            raise RuntimeError(f"cannot open the store in {settings.state_dir}: {exc}") from exc
        forwarder = make_forwarder(cfg, store)
        retention_s = None if cfg.influx.url else cfg.store.retention_s
    service = ControllerService(core, mqtt, store=store, forwarder=forwarder, retention_s=retention_s,
                                print_summary=settings.print_summary,
                                clear_leases_on_stop=settings.clear_leases_on_stop)
    stop = asyncio.Event()
    install_stop_handlers(stop)
    await service.run(stop)


def main() -> None:  # ``python -m agentd.site.controller_cli``
    controller()


if __name__ == "__main__":
    main()
