"""``agentd plot``: the local store as one picture, for a node that has no Grafana.

What an SRE looks at first on such a node, top to bottom on one time axis: the node's GPU power
against the sum of the enforced limits and the site budget (``node_power.budget_w``, when the
node takes part in the site's caps); each GPU's power against its own limit; the GPU
temperatures against the device's slowdown and shutdown thresholds (``gpu_info``); the coolant
supply temperature of every loop and unit; and every rule transition as a vertical marker (red:
firing, green: resolved), named at the top.

The store is read through ``agentd.store.StoreReader`` (read-only, short transactions: safe
while the daemon runs) and each line through the line-protocol parser the coolant input uses.
With an InfluxDB configured the store holds only what is not forwarded yet, so on such a node
this shows little; that node has Grafana.

matplotlib is an optional extra (``pip install 'gpu-agentd[plot]'``), imported only when a
picture is drawn, so the daemon never loads it; without it :func:`render` raises
``MissingExtra`` with the command that installs it. Series are averaged into at most
``MAX_POINTS`` time buckets (a week at 1 Hz stays a picture, not a plotting benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.store import PointFilter, StoreReader
from collectors.lineproto_parse import LineProtocolError, parse_line

MEASUREMENTS = ("gpu", "gpu_info", "node_power", "coolant", "throttle_event")
MAX_POINTS = 1500  # time buckets per series
EXTRA_HINT = "pip install 'gpu-agentd[plot]' (or: pip install matplotlib)"

Series = tuple[list[float], list[float]]  # (unix seconds, values)


class PlotError(Exception):
    """Nothing to draw, or the picture could not be written; the message says what to do."""


class MissingExtra(PlotError):
    """matplotlib is not installed."""


@dataclass(slots=True)
class _Acc:
    """One series as read: timestamps (s) and values, in store order."""

    ts: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, ts_s: float, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.ts.append(ts_s)
            self.values.append(float(value))


@dataclass(slots=True)
class Event:
    ts_s: float
    rule: str
    state: str
    severity: str
    gpu: str | None


@dataclass(slots=True)
class PlotData:
    """What the store held for the picture, per series (read by :func:`read_store`)."""

    power_w: dict[str, _Acc] = field(default_factory=dict)  # per GPU index
    limit_w: dict[str, _Acc] = field(default_factory=dict)
    temp_c: dict[str, _Acc] = field(default_factory=dict)
    thresholds_c: dict[str, float] = field(default_factory=dict)  # slowdown_c / shutdown_c: the lowest
    budget_w: _Acc = field(default_factory=_Acc)
    supply_c: dict[str, _Acc] = field(default_factory=dict)  # per "loop unit [point]"
    events: list[Event] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    points: int = 0
    unparsed: int = 0

    @property
    def span_s(self) -> tuple[float, float] | None:
        ts = [t for acc in self.power_w.values() for t in (acc.ts[:1] + acc.ts[-1:])]
        return (min(ts), max(ts)) if ts else None


def read_store(reader: StoreReader, since_ns: int | None, until_ns: int | None) -> PlotData:
    """The points of ``MEASUREMENTS`` stamped in ``[since_ns, until_ns)``, as series."""
    data = PlotData()
    for rows in reader.chunks(PointFilter(MEASUREMENTS, since_ns, until_ns)):
        for _, ts_ns, line in rows:
            try:
                measurement, tags, fields, ts = parse_line(line)
            except LineProtocolError:
                data.unparsed += 1
                continue
            data.points += 1
            t = (ts if ts is not None else ts_ns) / 1e9
            if "host" in tags:
                data.hosts.add(tags["host"])
            if measurement == "gpu":
                gpu = tags.get("gpu", "?")
                data.power_w.setdefault(gpu, _Acc()).add(t, fields.get("power_w"))
                data.limit_w.setdefault(gpu, _Acc()).add(t, fields.get("limit_w"))
                data.temp_c.setdefault(gpu, _Acc()).add(t, fields.get("temp_c"))
            elif measurement == "gpu_info":
                for name in ("slowdown_c", "shutdown_c"):
                    value = fields.get(name)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        data.thresholds_c[name] = min(float(value), data.thresholds_c.get(name, math.inf))
            elif measurement == "node_power":
                data.budget_w.add(t, fields.get("budget_w"))
            elif measurement == "coolant" and "supply_temp_c" in fields:
                key = " ".join(p for p in (tags.get("loop", ""), tags.get("unit", ""), tags.get("point", "")) if p)
                data.supply_c.setdefault(key, _Acc()).add(t, fields["supply_temp_c"])
            elif measurement == "throttle_event" and fields.get("state") in ("firing", "resolved"):
                data.events.append(Event(t, tags.get("rule", "?"), str(fields["state"]),
                                         tags.get("severity", ""), tags.get("gpu")))
    return data


def buckets(ts: list[float], values: list[float], lo: float, hi: float, n: int = MAX_POINTS) -> Series:
    """``values`` averaged into at most ``n`` equal time buckets over ``[lo, hi]`` (as is when
    fewer points); each bucket at its mean time."""
    if len(ts) <= n or hi <= lo:
        return ts, values
    width = (hi - lo) / n
    sums: dict[int, list[float]] = {}
    for t, v in zip(ts, values):
        acc = sums.setdefault(min(n - 1, int((t - lo) / width)), [0.0, 0.0, 0.0])
        acc[0] += t
        acc[1] += v
        acc[2] += 1
    keys = sorted(sums)
    return [sums[k][0] / sums[k][2] for k in keys], [sums[k][1] / sums[k][2] for k in keys]


def node_totals(per_gpu: dict[str, _Acc]) -> Series:
    """The sum over the GPUs read at each timestamp (a tick's reading): a GPU that stopped
    answering drops out of the sum, as it drops out of the node's power."""
    by_ts: dict[float, float] = {}
    for acc in per_gpu.values():
        for t, v in zip(acc.ts, acc.values):
            by_ts[t] = by_ts.get(t, 0.0) + v
    ts = sorted(by_ts)
    return ts, [by_ts[t] for t in ts]


def _matplotlib() -> Any:
    """The Agg canvas and Figure, imported now (never at daemon start)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra(f"agentd plot needs matplotlib, which is not installed ({exc}): {EXTRA_HINT}") from None
    return FigureCanvasAgg, Figure


def render(data: PlotData, out: Path, *, width_px: int = 1200, height_px: int = 1000, dpi: int = 100,
           title: str = "") -> Path:
    """Draw ``data`` into the PNG ``out`` (written next to it, then moved into place)."""
    span = data.span_s
    if span is None:
        raise PlotError("no gpu points in the selected range: nothing to draw")
    canvas_cls, figure_cls = _matplotlib()
    import matplotlib.dates as mdates

    lo, hi = span
    fig = figure_cls(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(4, 1, sharex=True, height_ratios=(1.0, 1.2, 1.2, 0.9))

    def x(ts: Iterable[float]) -> list[float]:
        return [t / 86400.0 for t in ts]  # matplotlib's dates: days since its epoch, 1970-01-01 UTC

    def draw(ax: Any, series: Series, **kw: Any) -> Any:
        ts, vs = buckets(series[0], series[1], lo, hi)
        return ax.plot(x(ts), vs, **kw)

    node, per_gpu, temps, coolant = axes
    draw(node, node_totals(data.power_w), color="tab:blue", lw=1.4, label="GPU power (sum)")
    draw(node, node_totals(data.limit_w), color="tab:red", lw=1.2, ls="--", label="enforced limits (sum)")
    if data.budget_w.ts:
        draw(node, (data.budget_w.ts, data.budget_w.values), color="black", lw=1.2, ls=":", label="site budget")
    node.set_ylabel("node W")
    node.set_title("GPU power against the limits and the site budget", loc="left", fontsize=10)
    for i, gpu in enumerate(sorted(data.power_w, key=_index)):
        color = f"C{i % 10}"
        acc = data.power_w[gpu]
        draw(per_gpu, (acc.ts, acc.values), color=color, lw=0.9, label=f"GPU {gpu}")
        lim = data.limit_w.get(gpu)
        if lim is not None and lim.ts:
            draw(per_gpu, (lim.ts, lim.values), color=color, lw=0.9, ls="--")
    per_gpu.set_ylabel("W per GPU")
    per_gpu.set_title("per GPU: power (solid) and enforced limit (dashed)", loc="left", fontsize=10)
    for i, gpu in enumerate(sorted(data.temp_c, key=_index)):
        acc = data.temp_c[gpu]
        draw(temps, (acc.ts, acc.values), color=f"C{i % 10}", lw=0.9, label=f"GPU {gpu}")
    for name, color in (("slowdown_c", "tab:orange"), ("shutdown_c", "tab:red")):
        if name in data.thresholds_c:
            temps.axhline(data.thresholds_c[name], color=color, lw=1.0, ls="--",
                          label=f"{name.removesuffix('_c')} {data.thresholds_c[name]:g} C")
    temps.set_ylabel("C")
    temps.set_title("GPU temperature against the device thresholds", loc="left", fontsize=10)
    for i, key in enumerate(sorted(data.supply_c)):
        acc = data.supply_c[key]
        draw(coolant, (acc.ts, acc.values), color=f"C{(i + 3) % 10}", lw=1.0, label=key)
    coolant.set_ylabel("C")
    coolant.set_title("coolant supply temperature" if data.supply_c else "coolant supply temperature (no readings)",
                      loc="left", fontsize=10)
    _events(axes, data.events, x, (hi - lo) / 60.0)
    for ax in axes:
        ax.grid(True, lw=0.3, alpha=0.6)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[:12], labels[:12], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                      frameon=False)
    coolant.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    coolant.set_xlabel("UTC")
    fig.suptitle(title or "agentd", fontsize=11, x=0.01, ha="left")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _save_png(fig, tmp, dpi)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _save_png(fig: Any, path: Path, dpi: int) -> None:
    """The figure as a palette PNG (128 colours): a third of the size of matplotlib's RGBA
    output for line plots, with no visible difference. Pillow comes with matplotlib."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=128).save(path, format="PNG", optimize=True)


def _index(gpu: str) -> tuple[int, str]:
    return (int(gpu), gpu) if gpu.isdigit() else (1 << 30, gpu)


def _events(axes: Any, events: list[Event], x: Any, gap_s: float) -> None:
    """Each rule transition as a vertical line on every panel, named at the top; a rule's same
    transition on several GPUs within ``gap_s`` of a named one is not named again."""
    named: dict[tuple[str, str], float] = {}
    top = axes[0]
    for ev in sorted(events, key=lambda e: e.ts_s):
        color = "tab:red" if ev.state == "firing" else "tab:green"
        (xv,) = x([ev.ts_s])
        for ax in axes:
            ax.axvline(xv, color=color, lw=0.7, alpha=0.5)
        last = named.get((ev.rule, ev.state))
        if last is not None and ev.ts_s - last < gap_s:
            continue
        named[(ev.rule, ev.state)] = ev.ts_s
        top.annotate(f"{ev.rule} {ev.state}", xy=(xv, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=6, color=color, va="top", ha="right")
