"""Durations in config and rule files (``"30s"``, ``"5m"``, ``"250ms"``, ``"7d"``): one parser.

It lives in ``collectors``, the bottom layer, because all three packages read durations and the
dependencies point one way (``agentd`` -> ``collectors``/``rules``, ``rules`` -> ``collectors``
at most): ``agentd.config``, ``rules.model`` and ``collectors.jobs`` all call this one.
"""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_EXPECTED = "expected a duration such as '30s', '5m' or '500ms'"


def parse_duration_s(value: str | int | float) -> float:
    """Seconds from ``"90s"``, ``"250ms"``, ``"5m"``, ``"7d"`` or a bare number of seconds.

    Raises ValueError (never returns a negative duration); callers that need "more than zero"
    say so in their own message.
    """
    if isinstance(value, bool):
        raise ValueError(_EXPECTED)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(_EXPECTED)
        seconds = float(match.group(1)) * _DURATION_UNITS_S[match.group(2) or "s"]
    else:
        raise ValueError(_EXPECTED)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """``90.0`` -> ``"1m30s"``; for messages."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    m, s = divmod(seconds, 60)
    if m == 0:
        return f"{s:g}s"
    h, m = divmod(int(m), 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s:g}s" if s else "")
