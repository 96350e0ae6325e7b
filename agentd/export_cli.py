"""``agentd export`` and ``agentd store info``: the local store without SQL (see docs/export.md).

Exit codes: 0 done; 1 a runtime failure (the store missing or unreadable, the server down or
refusing lines, lines that did not convert); 2 a usage or configuration error (a bad option, a
zero or negative duration, an invalid config file).

``agentd.cli`` registers ``export`` (a command) and ``store`` (a group holding ``info``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, TextIO

import click

from agentd.cli_types import HELP_OPTIONS, config_or_exit
from agentd.store import STORE_FILE
from pydantic import SecretStr, ValidationError

from agentd.config import AgentConfig, ConfigError, InfluxConfig, config_source
from agentd.export import FORMATS, ReplayResult, TimeBoundError, export_points, parse_time_bound, replay, rfc3339_ns
from agentd.store import SCHEMA_VERSION, PointFilter, StoreError, StoreInfo, StoreNotFound, StoreReader

__all__ = ["export_command", "store_group"]


_CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="agentd.toml whose state_dir holds the store (default /etc/agentd/agentd.toml when present, "
         "else built-in defaults; or $AGENTD_CONFIG).")


def _fail(prog: str, text: str, code: int) -> NoReturn:
    click.echo(f"{prog}: {text}", err=True)
    sys.exit(code)


def _open(prog: str, cfg: AgentConfig, config_path: Path | None) -> StoreReader:
    path = Path(cfg.state_dir) / STORE_FILE
    try:
        return StoreReader(path)
    except StoreNotFound:
        _fail(prog, f"store {path}: no such file (state_dir = {cfg.state_dir}, from "
                    f"{config_source(config_path)}); has agentd run on this node with this configuration? "
                    "Pass --config to read another one", 1)
    except StoreError as exc:
        _fail(prog, str(exc), 1)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- agentd export --------------------------------------------------------------------------

def time_window(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    """``--since`` / ``--until`` (a duration back from now, or an RFC 3339 time) as ns bounds,
    or the click error that names the option (exit 2)."""
    now_ns = time.time_ns()
    bounds: dict[str, int | None] = {}
    for name, text in (("--since", since), ("--until", until)):
        try:
            bounds[name] = parse_time_bound(text, now_ns, name) if text is not None else None
        except TimeBoundError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'{name}'") from None
    since_ns, until_ns = bounds["--since"], bounds["--until"]
    if since_ns is not None and until_ns is not None and since_ns >= until_ns:
        raise click.UsageError(f"--since {since} is not before --until {until}: nothing would be selected")
    return since_ns, until_ns


@click.command("export", context_settings=HELP_OPTIONS)
@_CONFIG_OPTION
@click.option("--since", metavar="DURATION|TIME", default=None,
              help="points stamped at or after this: a duration back from now (30m, 1h, 7d) or an RFC 3339 "
                   "time with its zone (2026-12-01T10:00:00Z); default: the oldest")
@click.option("--until", metavar="DURATION|TIME", default=None,
              help="points stamped before this (same forms as --since); default: the newest")
@click.option("--measurement", "measurements", multiple=True, metavar="NAME",
              help="only this measurement (gpu, coolant, throttle_event, agent); repeatable")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="lp: line protocol as stored (default); csv: one header and a row a point; json: JSON Lines")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write to this file (replaced when complete) instead of stdout")
@click.option("--to", "to_url", metavar="URL", default=None,
              help="replay into the InfluxDB (or VictoriaMetrics) at URL instead of printing; the store is not changed")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--to: a file holding the v2 API token")
@click.option("--org", default=None, help="--to: v2 organisation (default: influx.org)")
@click.option("--bucket", default=None, help="--to: v2 bucket (default: influx.bucket)")
@click.option("--db", default=None, help="--to: write with the v1 API (/write) into this database")
@click.option("--retries", type=click.IntRange(0, 100), default=3, show_default=True,
              help="--to: failed writes in a row tried again (with backoff) before giving up")
def export_command(config_path: Path | None, since: str | None, until: str | None, measurements: tuple[str, ...],
                   fmt: str | None, output: Path | None, to_url: str | None, token_file: Path | None,
                   org: str | None, bucket: str | None, db: str | None, retries: int) -> None:
    """Write the points of the local store to stdout or a file, or replay them into an InfluxDB.

    Reads the store read-only, in short transactions, so it is safe while agentd runs (the
    daemon is never blocked and nothing is written). With an InfluxDB configured the store holds
    only what is not forwarded yet. Exit 0 done, 1 runtime failure, 2 usage or config error.
    """
    prog = "agentd export"
    if to_url is None:
        given = [name for name, value in (("--token-file", token_file), ("--org", org), ("--bucket", bucket),
                                          ("--db", db)) if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --to URL")
    elif fmt is not None or output is not None:
        raise click.UsageError("--to replays into a server: --format and --output do not apply to it")
    if db is not None and (org is not None or bucket is not None):
        raise click.UsageError("--db writes with the v1 API; --org and --bucket are for v2: give one or the other")
    cfg = config_or_exit(config_path)
    since_ns, until_ns = time_window(since, until)
    flt = PointFilter(tuple(measurements), since_ns, until_ns)
    if to_url is not None:
        influx = _target(cfg, to_url, token_file, org, bucket, db)
        reader = _open(prog, cfg, config_path)
        try:
            _replay(prog, reader, flt, influx, retries, cfg)
        finally:
            reader.close()
        return
    reader = _open(prog, cfg, config_path)
    try:
        _export(prog, reader, flt, fmt or "lp", output)
    finally:
        reader.close()


def _export(prog: str, reader: StoreReader, flt: PointFilter, fmt: str, output: Path | None) -> None:
    unparsed: list[str] = []

    def on_bad(row_id: int, line: str, error: str) -> None:
        if len(unparsed) < 10:
            click.echo(f"{prog}: stored line {row_id} does not parse ({error}), left out: {line[:200]}", err=True)
        unparsed.append(line)

    tmp = None
    try:
        if output is None:
            out: TextIO = sys.stdout
            stats = export_points(reader, flt, fmt, out, on_bad=on_bad)
            out.flush()
        else:
            tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                stats = export_points(reader, flt, fmt, fh, on_bad=on_bad)
            os.replace(tmp, output)
            tmp = None
    except BrokenPipeError:  # `agentd export | head`: the reader has what it wanted
        # (the documented way: no second BrokenPipeError when Python flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except StoreError as exc:
        _fail(prog, str(exc), 1)
    except OSError as exc:
        _fail(prog, f"cannot write {output}: {exc.strerror or exc}", 1)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    where = f" to {output}" if output is not None else ""
    click.echo(f"{prog}: {stats.points} points{where} from {reader.path}", err=True)
    if unparsed:
        _fail(prog, f"{len(unparsed)} stored lines do not parse and are not in the {fmt} output; "
                    "--format lp exports them as stored", 1)


def _target(cfg: AgentConfig, url: str, token_file: Path | None, org: str | None, bucket: str | None,
            db: str | None) -> InfluxConfig:
    """The writer settings for ``--to``: the configured [influx] section's batching, gzip and
    timeouts, with the target from the options. Credentials: ``--token-file``, else the
    configured ones only when URL is the configured ``influx.url`` (never sent elsewhere)."""
    own = cfg.influx
    same = own.url is not None and url.rstrip("/") == own.url
    data: dict[str, object] = {
        "url": url, "api": "v1" if db is not None else ("v2" if (org or bucket or not same) else own.api),
        "org": org if org is not None else own.org, "bucket": db or bucket or own.bucket,
        "retention_policy": own.retention_policy if same else "", "batch_size": own.batch_size,
        "timeout": own.timeout, "gzip": own.gzip, "backoff_max": own.backoff_max,
    }
    if same:
        data.update(token=own.token, token_file=own.token_file, username=own.username, password=own.password)
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise click.BadParameter(f"{token_file}: cannot read: {exc.strerror or exc}",
                                     param_hint="--token-file") from None
        except UnicodeDecodeError:
            raise click.BadParameter(f"{token_file}: not a text file", param_hint="--token-file") from None
        data.update(token=SecretStr(token), token_file=None)
    try:
        influx = InfluxConfig.model_validate(data)
        if same and token_file is None:
            influx.resolved_token()  # an unreadable configured token_file is a config error, said now
    except ValidationError as exc:  # only the URL comes from the options unchecked
        raise click.BadParameter(f"{url!r}: {exc.errors()[0]['msg']}", param_hint="--to") from None
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)
    return influx


def _replay(prog: str, reader: StoreReader, flt: PointFilter, influx: InfluxConfig, retries: int,
            cfg: AgentConfig) -> None:
    from agentd.influx import make_writer
    from agentd.log import setup_logging

    setup_logging(cfg.log_level, stream=sys.stderr)  # the forwarder's log lines; stdout stays empty
    target = (f"{influx.url} (v1, database {influx.bucket})" if influx.api == "v1"
              else f"{influx.url} (v2, bucket {influx.bucket})")

    async def run() -> ReplayResult:
        writer = make_writer(influx)
        try:
            return await replay(reader, flt, writer, batch_size=influx.batch_size, backoff_max=influx.backoff_max,
                                retries=retries)
        finally:
            await writer.close()

    try:
        result = asyncio.run(run())
    except StoreError as exc:
        _fail(prog, f"{exc}; nothing more was sent", 1)
    unchanged = "the store is unchanged (a replay copies)"
    if not result.complete:
        _fail(prog, f"replay to {target} stopped after {result.shipped} of {result.selected} points: {result.error}; "
                    f"{unchanged}; run the same command again once the server answers (points already written are "
                    "overwritten, not doubled)", 1)
    if result.refused:
        _fail(prog, f"{result.refused} of {result.selected} points were in batches that {target} refused "
                    f"({result.first_refusal}) and are not confirmed written (the forwarder splits a refused batch "
                    "to find its bad lines, within a request budget; InfluxDB 1.x keeps the good points of a "
                    f"'partial write'); {result.shipped} were accepted; {unchanged}: `agentd export --format lp` "
                    "shows the lines", 1)
    rate = result.shipped / result.seconds if result.seconds > 0 else 0.0
    click.echo(f"{prog}: replayed {result.shipped} points to {target} in {result.seconds:.1f} s "
               f"({rate:.0f} points/s); {unchanged}", err=True)


# -- agentd store info ----------------------------------------------------------------------

@click.group("store", context_settings=HELP_OPTIONS)
def store_group() -> None:
    """The local store (state_dir/store.sqlite), read-only."""


@store_group.command("info")
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def store_info(config_path: Path | None, as_json: bool) -> None:
    """Size, backlog, points and their time span, quarantined lines and schema of the store.

    Read-only and safe while agentd runs. Exit 0, 1 when the store is missing or unreadable,
    2 on a config error.
    """
    prog = "agentd store info"
    cfg = config_or_exit(config_path)
    reader = _open(prog, cfg, config_path)
    try:
        info = reader.info()
    except StoreError as exc:
        _fail(prog, str(exc), 1)
    finally:
        reader.close()
    source = config_source(config_path)
    if as_json:
        click.echo(json.dumps(_info_json(info, cfg, source), indent=1))
    else:
        click.echo(_info_text(info, cfg, source), nl=False)


def _stamp(ts_ns: int | None) -> str | None:
    return rfc3339_ns(ts_ns) if ts_ns is not None else None


def _info_json(info: StoreInfo, cfg: AgentConfig, source: str) -> dict[str, object]:
    url = cfg.influx.url
    return {
        "path": info.path, "config": source, "size_bytes": info.size_bytes, "db_bytes": info.db_bytes,
        "wal_bytes": info.wal_bytes, "used_bytes": info.used_bytes, "max_bytes": cfg.store.max_bytes,
        "points": info.points, "oldest_ns": info.oldest_ns, "newest_ns": info.newest_ns,
        "oldest": _stamp(info.oldest_ns), "newest": _stamp(info.newest_ns),
        "forwarding_to": url, "backlog": info.points if url else None,
        "quarantined": info.quarantined, "quarantine_newest_reason": info.quarantine_newest_reason,
        "quarantine_newest_ns": info.quarantine_newest_ns, "dropped": info.dropped,
        "schema_version": info.schema_version, "schema_version_supported": SCHEMA_VERSION,
        "damaged_copies": list(info.damaged_copies),
    }


def _info_text(info: StoreInfo, cfg: AgentConfig, source: str) -> str:
    url = cfg.influx.url
    rows = [
        ("store", f"{info.path} (state_dir from {source})"),
        ("size", f"{_bytes(info.size_bytes)} on disk: database {_bytes(info.db_bytes)} + WAL "
                 f"{_bytes(info.wal_bytes)} (in use {_bytes(info.used_bytes)} of store.max_bytes "
                 f"{_bytes(cfg.store.max_bytes)})"),
        ("points", f"{info.points} (what agentd export returns)"),
        ("oldest", _stamp(info.oldest_ns) or "-"),
        ("newest", _stamp(info.newest_ns) or "-"),
        ("backlog", f"{info.points} not yet forwarded to {url}" if url else
                    f"none: no influx.url, nothing is forwarded (points are kept for store.retention = "
                    f"{cfg.store.retention})"),
        ("quarantined", f"{info.quarantined}" + (
            f" (newest {_stamp(info.quarantine_newest_ns)}: {info.quarantine_newest_reason})"
            if info.quarantine_newest_reason is not None else "")),
        ("dropped", f"{info.dropped} (oldest lines deleted at the size bound or on a full disk, ever)"),
        ("schema", f"version {info.schema_version} (this agentd: {SCHEMA_VERSION})"),
    ]
    if info.damaged_copies:
        rows.append(("damaged", f"{len(info.damaged_copies)} copies kept: {', '.join(info.damaged_copies)}"))
    return "".join(f"{key:<12} {value}\n" for key, value in rows)
