"""Capped exponential backoff: the one implementation the daemon's retry loops share (the
InfluxDB forwarder, the MQTT reconnect, refused power-limit writes).

Pure functions of the attempt number (and an injected RNG for the jittered forms), so each
caller's schedule is testable without sleeping.
"""

from __future__ import annotations

import random


def ceiling_s(attempt: int, base_s: float, max_s: float) -> float:
    """``base_s * 2**attempt`` for the 0-based ``attempt``, capped at ``max_s``."""
    return min(max_s, base_s * (2.0 ** min(max(attempt, 0), 60)))


def equal_jitter_s(attempt: int, rng: random.Random, base_s: float, max_s: float) -> float:
    """Uniform over the upper half of the ceiling: never much shorter than planned, yet spread."""
    cap = ceiling_s(attempt, base_s, max_s)
    return rng.uniform(cap / 2.0, cap)


def full_jitter_s(attempt: int, rng: random.Random, base_s: float, max_s: float) -> float:
    """Uniform over [0, ceiling] ("full jitter"): the widest spread for many clients at once."""
    return rng.uniform(0.0, ceiling_s(attempt, base_s, max_s))
