"""Click parameter types shared by every ``agentd`` command (one parser for durations)."""

from __future__ import annotations

import click

from agentd.config import parse_duration_s


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
