"""Click parameter types shared by every ``agentd`` command (one parser for durations)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agentd.config import AgentConfig, ConfigError, load_config, parse_duration_s

# -h works like --help on every command (set on each: a command defined in its own module does
# not take it from the group it is added to).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class Seconds(click.ParamType):
    """A duration option: seconds (``2.5``) or a duration (``30s``, ``5m``, ``250ms``); zero and
    negative values are refused, as are values outside [min_s, max_s]. Every command's durations
    and intervals use it, so ``--duration 0`` and ``--interval -1`` fail the same clear way."""

    name = "seconds"

    def __init__(self, min_s: float | None = None, max_s: float | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            text = str(value).strip()
            sign = -1.0 if text.startswith("-") else 1.0
            try:
                seconds = sign * parse_duration_s(text.lstrip("-"))
            except ValueError:
                self.fail(f"{value!r}: expected seconds or a duration such as '30s', '5m' or '250ms'", param, ctx)
        if not seconds > 0 or seconds == float("inf"):
            self.fail(f"must be more than 0 seconds (got: {value})", param, ctx)
        if self.min_s is not None and seconds < self.min_s:
            self.fail(f"must be at least {self.min_s:g} s (got: {value})", param, ctx)
        if self.max_s is not None and seconds > self.max_s:
            self.fail(f"must be at most {self.max_s:g} s (got: {value})", param, ctx)
        return seconds


def broker_address(value: str, param_hint: str = "--broker") -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 1883; ``[v6]:PORT``) of an MQTT broker, or a click error."""
    host, sep, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
    if not sep:
        host, port = value, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT, for example 127.0.0.1:1883", param_hint=param_hint)
    return host, int(port)


def config_or_exit(config_path: Path | None) -> AgentConfig:
    """The configuration, or every located error on stderr and exit 2 (the exit code of bad input)."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)
