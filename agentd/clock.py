"""The injected clock: one object gives the daemon its monotonic time, wall time and sleep.

Tests pass a FakeClock whose ``sleep`` advances time at once, so minutes of ticks run in
milliseconds and no test waits on the machine's clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall_ns(self) -> int: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that only moves when told to (or when slept on)."""

    def __init__(self, start_wall_ns: int = 1_767_225_600 * 10**9, start_monotonic: float = 1000.0) -> None:
        self._wall_ns = start_wall_ns
        self._mono = start_monotonic

    def monotonic(self) -> float:
        return self._mono

    def wall_ns(self) -> int:
        return self._wall_ns

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall_ns += round(seconds * 1e9)

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would
