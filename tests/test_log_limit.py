"""collectors.log_limit: the one rate limit for repeated log lines."""

from __future__ import annotations

from collectors.log_limit import RateLimitedLog


def test_the_first_line_at_once_then_one_per_period_saying_how_many_were_held_back():
    lines: list[tuple[str, dict]] = []
    limit = RateLimitedLog(every_s=10.0)
    emit = lambda now: limit.emit("k", now, lambda ev, **kw: lines.append((ev, kw)), "bad", n=now)  # noqa: E731
    assert emit(0.0) and not emit(1.0) and not emit(9.9)
    assert emit(10.0)
    assert lines == [("bad", {"n": 0.0}), ("bad", {"n": 10.0, "suppressed": 2})]
    assert limit.emit("other", 10.5, lambda ev, **kw: lines.append((ev, kw)), "bad")  # keys are apart


def test_a_stream_of_distinct_keys_cannot_grow_its_memory():
    limit = RateLimitedLog(every_s=60.0, max_keys=8)
    for i in range(10_000):
        assert limit.emit(f"k{i}", 0.0, lambda ev, **kw: None, "bad")  # each new key: its first line
        assert len(limit._next) <= 8
