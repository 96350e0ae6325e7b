"""``agentd status``: a running daemon on one screen, from its throttle API (docs/api.md).

Why from the API and not from the store or the process: the API's snapshot is what the daemon
decided at its last tick (the same body schedulers act on), so what an operator reads here is what
Slurm and Kubernetes see. It reads only (GET), never waits on the daemon's tick, and works from
another machine (``--node http://gpu-node-01:9410``, with ``--token-file`` when reads are
protected) or over the Unix socket (``--node unix:/run/agentd/api.sock``).

Exit status: 0 when the daemon answered, 1 when it could not be reached or refused the request
(the message names the URL and what to do), 2 on bad options.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from agentd.cli_types import HELP_OPTIONS, Seconds

# What the screen is built from: (key in the result, path). /v1/agent is optional (older daemons).
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("throttle", "/v1/throttle"), ("gpus", "/v1/gpus"), ("rules", "/v1/rules"), ("agent", "/v1/agent"))
OPTIONAL = frozenset({"agent"})


class StatusError(Exception):
    """The daemon could not be asked (unreachable, refused, not ready): the message says why."""


def default_node(config_path: Path | None) -> str:
    """Where the local daemon listens: its config's ``api.unix_socket`` or ``api.listen``.

    A configuration that does not load falls back to the default address: ``status`` must still
    answer on a node whose config was broken after the daemon started.
    """
    from agentd.api.config import DEFAULT_LISTEN, parse_listen
    from agentd.config import ConfigError, load_config

    try:
        api = load_config(config_path).api
    except ConfigError:
        return f"http://{DEFAULT_LISTEN}"
    if api.unix_socket is not None:
        return f"unix:{api.unix_socket}"
    listen = parse_listen(api.listen)
    if listen is None or listen.port == 0:
        return f"http://{DEFAULT_LISTEN}"
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else ("::1" if listen.host == "::" else listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


async def fetch(node: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    """Every body of ``ENDPOINTS`` from the daemon at ``node``, concurrently."""
    import aiohttp

    if node.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=node[len("unix:"):])
        base = "http://localhost"
    else:
        connector = aiohttp.TCPConnector()
        base = node.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def get(key: str, path: str) -> tuple[str, Any]:
            try:
                async with session.get(base + path) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 404 and key in OPTIONAL:
                        return key, None
                    if resp.status != 200:
                        detail = body.get("detail") if isinstance(body, dict) else None
                        hint = " (pass --token-file: this daemon protects reads)" if resp.status == 401 else ""
                        raise StatusError(f"{base}{path} answered HTTP {resp.status}: {detail or body}{hint}")
                    return key, body
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                raise StatusError(f"cannot read {node}{path}: {type(exc).__name__}: {exc or 'timed out'}; is agentd "
                                  "running (systemctl status agentd), and is --node its api.listen?") from exc

        return dict(await asyncio.gather(*(get(k, p) for k, p in ENDPOINTS)))


def _w(v: Any) -> str:
    return "-" if v is None else f"{v:.0f} W"


def _c(v: Any) -> str:
    return "-" if v is None else f"{v:.0f} C"


def _ago(v: Any) -> str:
    return "never" if v is None else f"{v:.1f} s ago"


def render(bodies: Mapping[str, Any]) -> str:
    """The one-screen summary of the bodies ``fetch`` returned."""
    t = bodies["throttle"]
    out = [f"{t['node']} (site {t['site']}): {t['state'].upper()} (level {t['level']}), "
           f"accepts new work: {'yes' if t['accept_new_work'] else 'no'}"
           + (f", advice {t['advice']}" if t.get("advice", "none") != "none" else "")
           + (" [dry run: nothing is written]" if t.get("dry_run") else "")]
    cap = _w(t.get("node_cap_w")) + (f" ({t['node_cap_source']})" if t.get("node_cap_source") else "")
    out.append(f"draw {_w(t.get('draw_w'))}, node cap {cap if t.get('node_cap_w') is not None else 'none'}; "
               f"as of {t.get('generated_at')} ({t.get('age_s', 0):.1f} s old)")
    reasons = t.get("reasons") or []
    if reasons:
        out.append("why:")
        for r in reasons:
            what = r.get("rule") or r.get("source") or r["kind"]
            gpu = f" gpu {r['gpu']}" if r.get("gpu") is not None else ""
            value = f": {r['value']}" if r.get("value") is not None else ""
            limit = f" vs {r['threshold']}" if r.get("threshold") else ""
            since = f" since {r['since']}" if r.get("since") else ""
            advice = f", advice {r['advice']}" if r.get("advice", "none") != "none" else ""
            note = f": {r['message']}" if r.get("message") and r["kind"] != "rule" else ""
            out.append(f"  {r['kind']} {what}{gpu} ({r['severity']}){value}{limit}{since}{advice}{note}")
    health = {g["index"]: g for g in (bodies.get("gpus") or {}).get("gpus", [])}
    out.append(f"{'GPU':>3}  {'power':>7}  {'limit':>7}  {'target':>7}  {'baseline':>8}  {'temp':>5}  "
               f"{'health':<6}  source")
    for g in t.get("gpus", []):
        detail = health.get(g["index"], {})
        state = g.get("health") or ("lost" if detail.get("healthy") is False else "-")
        row = (f"{g['index']:>3}  {_w(g.get('power_w')):>7}  {_w(g.get('limit_w')):>7}  "
               f"{_w(g.get('target_w')):>7}  {_w(g.get('baseline_w')):>8}  {_c(g.get('temp_c')):>5}  "
               f"{state:<6}  {g.get('source', '-')}")
        out.append(row + (f"  ({detail['error']})" if detail.get("error") else ""))
    firing = [(r["name"], i) for r in (bodies.get("rules") or {}).get("rules", [])
              for i in r.get("instances", []) if i.get("state") == "firing"]
    unhealthy = [r["name"] for r in (bodies.get("rules") or {}).get("rules", []) if not r.get("healthy", True)]
    out.append(f"rules firing: {len(firing)}" + (": " + ", ".join(
        name + (f"[gpu {i['gpu']}]" if i.get("gpu") is not None else "") for name, i in firing) if firing else ""))
    if unhealthy:
        out.append(f"rules failing to evaluate: {', '.join(unhealthy)} (see the daemon's log)")
    jobs = t.get("jobs") or []
    if jobs:
        out.append("jobs: " + ", ".join(f"{j['job_id']} ({j.get('class', '?')}, gpus {j['gpus']}, "
                                        f"throttled {j['throttle_fraction'] * 100:.0f} %)" for j in jobs))
    agent = bodies.get("agent")
    if agent:
        store = f"store backlog {agent['store_backlog']} points"
        if agent.get("store_bytes") is not None:
            store += f" ({agent['store_bytes'] / 1e6:.1f} MB)"
        forward = agent.get("forward")
        if forward:
            store += (f", last forward {_ago(forward.get('last_success_age_s'))} to {forward['url']} "
                      f"({forward.get('errors') or 0} write errors)")
        else:
            store += ", not forwarded (influx.url unset: the store is the database)"
        out.append(store)
        mqtt = agent.get("mqtt_connected")
        out.append(f"ticks {agent['ticks']} (missed {agent['ticks_missed']}), last tick {agent['tick_s'] * 1e3:.1f} "
                   f"ms, lag {agent['tick_lag_s'] * 1e3:.1f} ms; NVML errors {agent['nvml_errors']}"
                   + ("" if mqtt is None else f"; MQTT {'connected' if mqtt else 'DISCONNECTED'}"))
    return "\n".join(out)


@click.command("status", context_settings=HELP_OPTIONS)
@click.option("--node", default=None, metavar="URL",
              help="the daemon's API: http://HOST:PORT or unix:/path/api.sock (default: this node's api.unix_socket "
                   "or api.listen from its config, else http://127.0.0.1:9410)")
@click.option("--json", "as_json", is_flag=True, help="the bodies as one JSON object, for scripts")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="file with the bearer token, when the daemon protects reads (api.auth_reads)")
@click.option("--timeout", "timeout_s", type=Seconds(max_s=300), default=5.0, show_default=True,
              help="seconds to wait for the daemon")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="agentd.toml to find the local API in (default: $AGENTD_CONFIG, else /etc/agentd/agentd.toml)")
def status_command(node: str | None, as_json: bool, token_file: Path | None, timeout_s: float,
                   config_path: Path | None) -> None:
    """A running daemon on one screen: GPUs (power, limit, temperature, health), rules firing,
    throttle state and why, store backlog and the last forward. Reads its API; changes nothing."""
    url = node or default_node(config_path)
    if not url.startswith(("http://", "https://", "unix:")):
        raise click.BadParameter(f"{url!r}: expected http://HOST:PORT or unix:/path/to/api.sock", param_hint="--node")
    token = token_file.read_text().strip() if token_file is not None else None
    try:
        bodies = asyncio.run(fetch(url, token, timeout_s))
    except StatusError as exc:
        click.echo(f"agentd status: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(bodies, indent=2, sort_keys=True) if as_json else render(bodies))
