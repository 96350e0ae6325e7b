"""``agentd sim site`` (a simulated site through a real broker, or on a simulated clock) and the
site view of ``agentd demo --site``.

The lead registers the command under the ``agentd sim`` group (``sim.add_command(site)``) and
calls :func:`run_site_demo` for ``agentd demo --site``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import click

from agentd.cli_types import HELP_OPTIONS, Seconds, broker_address

_CLEAR = "\x1b[H\x1b[2J"


def _seconds(min_s: float | None = None, max_s: float | None = None) -> Any:
    """A click callback that parses a duration with ``agentd.cli.Seconds`` (refuses <= 0)."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
        if value is None:
            return None
        return Seconds(min_s, max_s).convert(value, param, ctx)

    return convert


def _fraction(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not value > 0:  # also NaN; the scenario checks the upper bounds
        raise click.BadParameter(f"must be more than 0 (got: {value:g})", ctx, param)
    return value


def _pairs(values: tuple[str, ...], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE (e.g. release_w_per_s=400)", param_hint=option)
        text = value.strip()
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text  # durations such as 5s stay strings; ControllerConfig parses them
    return out


def build_scenario(*, nodes: int, duration_s: float, warmup_s: float, cap_fraction: float | None,
                   step: float | None, warmup_load: float, seed: int, tick_s: float, mix: str | None,
                   kinds: str | None, static_w: float, nodes_per_rack: int, racks_per_row: int,
                   rack_cap_fraction: float, controller: dict[str, Any], ramp_w_per_s: float, hold_s: float,
                   class_floors: str | None, rule_packs: bool) -> Any:
    """The SiteScenario the options describe; click.UsageError naming the options when they
    contradict each other or a value is refused."""
    from agentd.site.sim import SiteScenario
    from agentd.site.workload import CLASSES, JOB_CLASSES, KINDS, WorkloadConfig, parse_mix

    if step is not None and cap_fraction is not None and abs(step * cap_fraction - 1.0) > 1e-6:
        raise click.UsageError(f"--step {step:g} and --cap-fraction {cap_fraction:g} say the same thing twice and "
                               "disagree: the step goes to 1 / cap-fraction of the cap; give one of them")
    if step is not None and step < 1.0:
        raise click.UsageError(f"--step {step:g}: the demand after the step must be at least the cap (>= 1)")
    fraction = 1.0 / step if step is not None else (cap_fraction if cap_fraction is not None else 0.8)
    if duration_s <= warmup_s:
        raise click.UsageError(f"--duration {duration_s:g} s must be longer than --warmup {warmup_s:g} s "
                               "(the step comes at the end of the warm-up)")
    try:
        wkw: dict[str, Any] = {"static_w": static_w}
        if mix:
            wkw["class_mix"] = parse_mix(mix, JOB_CLASSES, "--mix")
        if kinds:
            wkw["kind_mix"] = parse_mix(kinds, KINDS, "--kinds")
        # not shares: each is a fraction of a GPU's maximum (the nodes' BudgetConfig checks them)
        floors = (_pairs(tuple(p for p in class_floors.split(",") if p.strip()), "--class-floors")
                  if class_floors else {})
        unknown = sorted(set(floors) - set(CLASSES))
        if unknown:
            raise ValueError(f"--class-floors: unknown classes {unknown} (known: {', '.join(CLASSES)})")
        return SiteScenario(nodes=nodes, cap_fraction=fraction, warmup_load=warmup_load, warmup_s=warmup_s,
                            after_s=duration_s - warmup_s, seed=seed, tick_s=tick_s,
                            workload=WorkloadConfig(**wkw), nodes_per_rack=nodes_per_rack,
                            racks_per_row=racks_per_row, rack_cap_fraction=rack_cap_fraction,
                            controller=controller, ramp_w_per_s=ramp_w_per_s, hold_s=hold_s,
                            class_floor_fraction=floors, rule_packs=rule_packs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _default_broker() -> str | None:
    host, port = os.environ.get("TEST_MQTT_HOST"), os.environ.get("TEST_MQTT_PORT")
    return f"{host}:{port}" if host and port else None


@click.command("site", context_settings=HELP_OPTIONS)
@click.option("--nodes", type=click.IntRange(1, 20_000), default=200, show_default=True,
              help="simulated nodes (8 GPUs each)")
@click.option("--broker", default=None, metavar="HOST:PORT",
              help="the MQTT broker (default: the Mosquitto of scripts/services, from $TEST_MQTT_HOST/PORT)")
@click.option("--sim-time", is_flag=True,
              help="no broker: the in-process bus on a simulated clock (as fast as the CPU allows)")
@click.option("--duration", default="180s", show_default=True, callback=_seconds(),
              help="the whole run, warm-up included")
@click.option("--warmup", default="60s", show_default=True, callback=_seconds(),
              help="time before the demand step (the nodes take their first leases, the ramps settle)")
@click.option("--cap-fraction", type=float, default=None, callback=_fraction,
              help="site cap / the site's mean uncapped demand after the step  [default: 0.8]")
@click.option("--step", type=float, default=None, help="demand after the step / the cap (= 1 / cap-fraction)")
@click.option("--warmup-load", type=float, default=0.8, show_default=True, callback=_fraction,
              help="mean demand before the step / the cap")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--tick", default="1s", show_default=True, callback=_seconds(0.05, 60), help="the nodes' interval")
@click.option("--mix", default=None, metavar="high=0.2,normal=0.5,low=0.3",
              help="priority classes, as shares of the GPUs that run a job (assigned per job)")
@click.option("--kinds", default=None, metavar="training=0.6,inference=0.3,idle=0.1",
              help="workload kinds, as shares of the GPUs")
@click.option("--static-w", type=click.FloatRange(0, 699), default=100.0, show_default=True,
              help="P_static of the throughput model")
@click.option("--nodes-per-rack", type=click.IntRange(1, 1000), default=4, show_default=True)
@click.option("--racks-per-row", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--rack-cap-fraction", type=float, default=0.9, show_default=True, callback=_fraction,
              help="a rack's cap / its maximum (its GPUs at 700 W)")
@click.option("--controller", "controller_opts", multiple=True, metavar="KEY=VALUE",
              help="a controller setting (agentd controller's: interval, lease_ttl, release_w_per_s, "
                   "release_hold, band_hold, stale_after, ...), repeatable")
@click.option("--ramp", "ramp_w_per_s", type=click.FloatRange(0, 10_000, min_open=True), default=25.0,
              show_default=True, help="the nodes' rules.ramp_w_per_s (W/s per GPU)")
@click.option("--hold", "hold_s", default="30s", show_default=True, callback=_seconds(),
              help="the nodes' rules.hold_s")
@click.option("--class-floors", default=None, metavar="high=0.6,...",
              help="the nodes' budget.class_floor_fraction (of a GPU's maximum)")
@click.option("--no-rule-packs", is_flag=True, help="run the nodes without the shipped thermal rule packs")
@click.option("--summary-every", default="5s", show_default=True, callback=_seconds(),
              help="how often the live summary line is printed")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the nodes' state directories (default: a temporary folder, removed afterwards)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the result (every figure) to this JSON file")
@click.option("--connect-timeout", default="10s", show_default=True, callback=_seconds(),
              help="give up when the broker does not answer within this")
@click.option("--username", default=None, help="broker username (nodes and controller)")
@click.option("--password", default=None, envvar="SITE_SIM_MQTT_PASSWORD", show_envvar=True,
              help="broker password")
def site(nodes: int, broker: str | None, sim_time: bool, duration: float, warmup: float, cap_fraction: float | None,
         step: float | None, warmup_load: float, seed: int, tick: float, mix: str | None, kinds: str | None,
         static_w: float, nodes_per_rack: int, racks_per_row: int, rack_cap_fraction: float,
         controller_opts: tuple[str, ...], ramp_w_per_s: float, hold_s: float, class_floors: str | None,
         no_rule_packs: bool, summary_every: float, state_dir: Path | None, json_path: Path | None,
         connect_timeout: float, username: str | None, password: str | None) -> None:
    """N simulated nodes and the real controller: the site's power against its caps.

    Each node runs the real node control path (lease tracking, budget split, composition, ramp,
    actuator) on simulated GPUs; the controller is the real one. The site cap is CAP_FRACTION of
    the uncapped demand; after the warm-up, demand steps to 1/CAP_FRACTION of the cap. Prints the
    configuration, a live summary, and ends with one line:
    over_cap_s=.. overshoot_pct=.. hp_kept_pct=.. vs_uniform_pp=.. reversals_per_30s=..

    Exit 0 when the run completed (whether or not the goals were met: the last lines say), 1 when
    the broker could not be reached, 2 for bad options.
    """
    from agentd.config import MqttConfig
    from agentd.log import setup_logging
    from agentd.site.sim import SiteSim, live_line, sim_state_dir
    from rules.budget import Level

    if sim_time and broker:
        raise click.UsageError("--sim-time runs without a broker; give --broker or --sim-time, not both")
    target = None
    if not sim_time:

        chosen = broker or _default_broker()
        if chosen is None:
            raise click.UsageError("no broker: give --broker HOST:PORT (or start Mosquitto with scripts/services start "
                                   "mosquitto and eval \"$(scripts/services env)\"), or --sim-time")
        target = broker_address(chosen)
        try:
            MqttConfig.model_validate({"host": target[0], "port": target[1]})
        except Exception as exc:
            raise click.UsageError(f"--broker: {exc}") from None
    sc = build_scenario(nodes=nodes, duration_s=duration, warmup_s=warmup, cap_fraction=cap_fraction, step=step,
                        warmup_load=warmup_load, seed=seed, tick_s=tick, mix=mix, kinds=kinds, static_w=static_w,
                        nodes_per_rack=nodes_per_rack, racks_per_row=racks_per_row,
                        rack_cap_fraction=rack_cap_fraction, controller=_pairs(controller_opts, "--controller"),
                        ramp_w_per_s=ramp_w_per_s, hold_s=hold_s, class_floors=class_floors,
                        rule_packs=not no_rule_packs)
    setup_logging("warning", stream=sys.stderr)
    # aiomqtt warns when more than 10 QoS 1 publishes are in flight on one client; the controller
    # sends a cycle's leases at once on purpose (controller_mqtt.MAX_INFLIGHT), so here it is noise
    import aiomqtt.client  # it sets its logger's level when imported: set ours after

    aiomqtt.client.MQTT_LOGGER.setLevel(logging.ERROR)
    out = click.echo
    with ExitStack() as stack:
        try:
            sim = SiteSim(sc, sim_state_dir(stack, state_dir))
        except ValueError as exc:  # ControllerConfigError (a --controller setting) and the like
            raise click.UsageError(str(exc)) from None
        for line in sim.describe():
            out(line)
        where = "in-process bus, simulated clock" if target is None else f"MQTT {target[0]}:{target[1]}, real time"
        out(f"transport: {where}")
        last = {"t": -1e9}
        started = time.monotonic()

        def on_sample(s: Any, core: Any) -> None:
            if s.t_s - last["t"] >= summary_every - 1e-9 or abs(s.t_s - sc.step_s) < sc.tick_s * 3:
                last["t"] = s.t_s
                capping = sum(1 for b in core.bands.bands.values() if b.state.level is Level.CAPPING)
                out(live_line(s, sim.cap_w, sc.step_s, capping))

        try:
            if target is None:
                result = sim.run_sim_time(on_sample)
            else:
                result = asyncio.run(sim.run_broker(target[0], target[1], on_sample=on_sample, username=username,
                                                    password=password, connect_timeout_s=connect_timeout))
        except ConnectionError as exc:
            click.echo(f"agentd sim site: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("agentd sim site: interrupted; no result", err=True)
            sys.exit(130)
        for line in result.report_lines():
            out(line)
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.extra.items()}
        out("run: " + " ".join(f"{k}={v}" for k, v in extra.items()) + f" wall_s={time.monotonic() - started:.1f}")
        if json_path is not None:
            json_path.write_text(json.dumps({"scenario": _scenario_dict(sc), "result": asdict(result)}, indent=1,
                                            default=str))
        out(result.final_line())


def _scenario_dict(sc: Any) -> dict[str, Any]:
    return asdict(sc)


# --- agentd demo --site ------------------------------------------------------------------------

def _bar(frac: float, width: int) -> str:
    full = max(0, min(width, round(frac * width)))
    return "#" * full + "." * (width - full)


def site_view(sim: Any, s: Any, core: Any, elapsed_s: float, speed: float) -> str:
    """The demo's screen (fits 80x24): site and domains against their caps, capped GPUs per
    class, and what happened since the step."""
    from rules.budget import Level
    from agentd.site.workload import CLASSES

    sc = sim.sc
    rec = sim.recorder
    lines = [f"agentd demo --site: {sc.nodes} simulated nodes x {sc.gpus_per_node} GPUs, controller {sc.controller_id}",
             f"t={s.t_s:5.0f}/{sc.duration_s:.0f} s (simulated, {speed:g}x)   demand step at {sc.step_s:g} s "
             f"to {sc.step_load:.0%} of the cap", ""]
    bands = core.bands.bands
    dom_w: dict[str, float] = {}
    for d in sim.domains:
        dom_w[d] = 0.0
    for node, path in zip(sim.nodes, rec.node_paths):
        lim = node.backend.limits_w()
        w = sum(min(lim[i], sim.work.demand_w(node.base + i, s.t_s)) for i in range(sc.gpus_per_node))
        for i in path:
            dom_w[rec.dom_names[i]] += w
    shown = [d for d in sim.domains][:12]
    lines.append("domain          power / cap                   use  state")
    for d in shown:
        cap = sim.domains.cap_w(d)
        frac = dom_w[d] / cap
        state = "CAPPING" if bands[d].state.level is Level.CAPPING else "uncapped"
        flag = "  OVER" if dom_w[d] > cap else ""
        depth = sim.domains[d].depth
        lines.append(f"{('  ' * depth + d)[:14]:<14} {_bar(frac, 16)} {dom_w[d] / 1e3:6.1f}/{cap / 1e3:6.1f} kW "
                     f"{100 * frac:4.0f}%  {state}{flag}")
    lines.append("")
    total = {c: 0 for c in CLASSES}
    for node in sim.nodes:
        for c in sim.work.classes_by_gpu(node.index, s.t_s).values():
            total[c] += 1
    lines.append("capped GPUs: " + "  ".join(f"{c} {s.capped[c]}/{total[c]}" for c in reversed(CLASSES)))
    lines.append(f"nodes on failsafe {s.failsafe_nodes}/{sc.nodes}; demand {100 * s.demand_w / sim.cap_w:.0f} % of "
                 f"the cap")
    post = [x for x in rec.samples if x.t_s >= sc.step_s]
    if post:
        over = [x for x in post if x.site_w > sim.cap_w]
        back = next((x.t_s - sc.step_s for x in post if x.site_w <= sim.cap_w), None)
        hp = rec.speed_sum["high"] / rec.speed_n["high"] if rec.speed_n["high"] else 1.0
        lines.append(f"since the step: over the cap {len(over) * sc.tick_s:g} s, back under "
                     f"{'not yet' if back is None else f'+{back:g} s'}; high-priority speed {100 * hp:.1f} %")
    else:
        lines.append("before the step: the site runs below its cap")
    return "\n".join(lines[:23])


def run_site_demo(*, nodes: int = 16, duration_s: float = 90.0, warmup_s: float = 30.0, speed: float = 10.0,
                  seed: int = 1, out: IO[str] | None = None) -> Any:
    """``agentd demo --site``: a small site on the in-process bus, simulated time paced at
    ``speed`` x real time, with a live view; returns the SiteResult (and prints its lines)."""
    from agentd.log import setup_logging
    from agentd.site.sim import SiteScenario, SiteSim, sim_state_dir

    if not speed > 0 or not duration_s > warmup_s > 0:
        raise ValueError("run_site_demo: speed > 0 and duration_s > warmup_s > 0 are required")
    stream = out or sys.stdout
    setup_logging("warning", stream=sys.stderr)
    sc = SiteScenario(nodes=nodes, warmup_s=warmup_s, after_s=duration_s - warmup_s, seed=seed)
    live = stream.isatty()
    with ExitStack() as stack:
        sim = SiteSim(sc, sim_state_dir(stack, None))
        if not live:
            stream.write("\n".join(sim.describe()) + "\n")
        wall0 = time.monotonic()
        shown = {"t": -1e9}

        def on_sample(s: Any, core: Any) -> None:
            view = site_view(sim, s, core, time.monotonic() - wall0, speed)
            if live:
                stream.write(_CLEAR + view + "\n")
                stream.flush()
            elif s.t_s - shown["t"] >= 10 or abs(s.t_s - sc.step_s) < sc.tick_s:
                shown["t"] = s.t_s
                stream.write(view + "\n\n")
                stream.flush()
            delay = wall0 + (s.t_s + sc.tick_s) / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        result = sim.run_sim_time(on_sample)
        stream.write("\n".join(result.report_lines()) + "\n" + result.final_line() + "\n")
        return result
