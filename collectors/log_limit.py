"""One rate limit for repeated log lines: the first at once, then at most one per key per period.

A broken GPU can raise thousands of NVML events a second, a hostile publisher a bad lease every
millisecond: journald gets the first line at once (the most useful one), then at most one line
per key per ``every_s`` carrying ``suppressed=N`` (how many were held back). The number of keys
remembered is bounded, so a stream of distinct keys cannot grow memory either.

A dependency-free leaf: the collectors (the NVML event thread) and the daemon (leases, GPU
health, slurm-sync) use the same one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

LOG_EVERY_S = 60.0
MAX_KEYS = 1024  # past this many distinct keys the limiter forgets what it saw (and may repeat a line)


class RateLimitedLog:
    """Log a repeated complaint once per key per ``every_s``, with how many were held back."""

    __slots__ = ("every_s", "max_keys", "_next", "_held")

    def __init__(self, every_s: float = LOG_EVERY_S, max_keys: int = MAX_KEYS) -> None:
        self.every_s = every_s
        self.max_keys = max_keys
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def emit(self, key: str, now: float, log_fn: Callable[..., Any], event: str, **kw: Any) -> bool:
        """Write the line unless ``key`` was written less than ``every_s`` ago; True when written."""
        if now < self._next.get(key, -math.inf):
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if key not in self._next and len(self._next) >= self.max_keys:
            self._next.clear()
            self._held.clear()
        self._next[key] = now + self.every_s
        held = self._held.pop(key, 0)
        if held:
            kw["suppressed"] = held
        log_fn(event, **kw)
        return True
