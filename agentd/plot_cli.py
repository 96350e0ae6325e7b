"""``agentd plot``: the local store as a PNG (``agentd.plot``), for a node without Grafana.

Exit codes: 0 the picture was written; 1 a runtime failure (matplotlib missing, the store
missing or unreadable, nothing to draw in the range, the file cannot be written); 2 a usage or
configuration error (a bad option, a zero or negative duration, an invalid config file).

``agentd.cli`` registers ``plot_command`` (``main.add_command(plot_command)``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from agentd.cli_types import HELP_OPTIONS, config_or_exit
from agentd.config import config_source
from agentd.export import rfc3339_ns
from agentd.export_cli import time_window
from agentd.store import STORE_FILE, StoreError, StoreNotFound, StoreReader

__all__ = ["plot_command"]

PROG = "agentd plot"


def _fail(text: str, code: int = 1) -> NoReturn:
    click.echo(f"{PROG}: {text}", err=True)
    sys.exit(code)


@click.command("plot", context_settings=HELP_OPTIONS)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="agentd.toml whose state_dir holds the store (default /etc/agentd/agentd.toml when present, "
                   "else built-in defaults; or $AGENTD_CONFIG).")
@click.option("--since", metavar="DURATION|TIME", default="1h", show_default=True,
              help="from this: a duration back from now (30m, 1h, 7d) or an RFC 3339 time with its zone")
@click.option("--until", metavar="DURATION|TIME", default=None,
              help="up to this (same forms as --since); default: now")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("agentd-plot.png"),
              show_default=True, help="the PNG to write (replaced when complete)")
@click.option("--width", type=click.IntRange(400, 8000), default=1200, show_default=True, help="pixels")
@click.option("--height", type=click.IntRange(400, 8000), default=1000, show_default=True, help="pixels")
def plot_command(config_path: Path | None, since: str, until: str | None, out: Path, width: int,
                 height: int) -> None:
    """Draw the local store as one PNG: GPU power against the limits and the site budget, GPU
    temperatures against their thresholds, the coolant supply temperature, and every rule
    transition as a marker.

    For a node without Grafana: the store is then the embedded database. With an InfluxDB
    configured it holds only what is not forwarded yet. Needs matplotlib
    (pip install 'gpu-agentd[plot]'). Exit 0 written, 1 runtime failure, 2 usage or config error.
    """
    from agentd import plot

    cfg = config_or_exit(config_path)
    since_ns, until_ns = time_window(since, until)
    if not out.parent.is_dir():
        _fail(f"--out {out}: the folder {out.parent} does not exist", 1)
    try:
        plot._matplotlib()  # before reading a week of points, say what is missing
    except plot.MissingExtra as exc:
        _fail(str(exc))
    path = Path(cfg.state_dir) / STORE_FILE
    try:
        with StoreReader(path) as reader:
            data = plot.read_store(reader, since_ns, until_ns)
    except StoreNotFound:
        _fail(f"store {path}: no such file (state_dir = {cfg.state_dir}, from {config_source(config_path)}); "
              "has agentd run on this node with this configuration? Pass --config to read another one")
    except StoreError as exc:
        _fail(str(exc))
    span = f"{rfc3339_ns(since_ns) if since_ns is not None else 'the oldest'} .. " \
           f"{rfc3339_ns(until_ns) if until_ns is not None else 'now'}"
    if data.span_s is None:
        hint = (" (influx.url is set: the store holds only what is not forwarded yet; look in Grafana)"
                if cfg.influx.url else "; widen --since, or check the node's clock and the daemon's state_dir")
        _fail(f"no gpu points in {path} from {span}{hint}")
    hosts = ", ".join(sorted(data.hosts)) or cfg.node_name
    first, last = data.span_s
    shown = f"{rfc3339_ns(int(first * 1e9))[:19]}Z .. {rfc3339_ns(int(last * 1e9))[11:19]}Z"
    try:
        plot.render(data, out, width_px=width, height_px=height, title=f"agentd on {hosts}: {shown}")
    except plot.PlotError as exc:
        _fail(str(exc))
    note = f", {data.unparsed} stored lines did not parse and were left out" if data.unparsed else ""
    click.echo(f"{PROG}: {out} ({width}x{height}) from {data.points} points of {path}{note}", err=True)
