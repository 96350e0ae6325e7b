"""Which coolant subscription a topic belongs to: filter matching, memoised within a byte budget.

Every message pays a lookup, so the answer for a topic is remembered. What is remembered is
bounded by bytes, not by entries: a count bound (4,096 topics) lets 60 KB garbage topics with
their split levels hold hundreds of megabytes that the allocator never hands back. Topics over
``MAX_TOPIC_CHARS`` never reach this module (the parser refuses them as ``topic_too_long``),
and the memo is dropped whole when it would pass either bound: re-matching a topic costs a few
microseconds, so a flood of distinct topics only costs those microseconds, never memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from collectors.coolant_spec import FIELDS, TAGS, TIMESTAMP_KEY, Subscription, unit_factor

CACHE_MAX_BYTES = 1 << 20
CACHE_MAX_ENTRIES = 4096
_ENTRY_OVERHEAD = 104  # a dict slot, the value tuple and its refs (CPython 3.11, 64-bit)


class CompiledSubscription:
    """A subscription with its filter split and unit conversions resolved once."""

    __slots__ = ("accept", "levels", "multi", "sub", "units")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        levels = sub.topic.split("/")
        self.multi = levels[-1] == "#"
        self.levels = levels[:-1] if self.multi else levels
        self.units = {name: unit_factor(name, unit) for name, unit in sub.units.items()}
        # Names a json object may carry: canonical fields, ts, tags, mapped and ignored names.
        self.accept = frozenset((*FIELDS, TIMESTAMP_KEY, *TAGS, *sub.field_map))

    def matches(self, parts: list[str]) -> bool:
        pattern = self.levels
        if len(parts) < len(pattern) or (not self.multi and len(parts) != len(pattern)):
            return False
        if parts[0].startswith("$") and (not pattern or pattern[0] == "+"):
            return False  # MQTT: wildcards at the first level never match $SYS and the like
        for want, got in zip(pattern, parts):
            if want != "+" and want != got:
                return False
        return True


Match = tuple[CompiledSubscription, list[str]]


class TopicMatcher:
    """The first subscription whose filter matches a topic, with the topic's levels."""

    def __init__(self, subscriptions: Sequence[Subscription], *, max_bytes: int = CACHE_MAX_BYTES,
                 max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.compiled = [CompiledSubscription(s) for s in subscriptions]
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._memo: dict[str, Match | None] = {}
        self._bytes = 0

    @property
    def cache_bytes(self) -> int:
        """What the memo holds now, by the accounting that bounds it."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._memo)

    def match(self, topic: str) -> Match | None:
        hit = self._memo.get(topic, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        parts = topic.split("/")
        found = None
        for comp in self.compiled:
            if comp.matches(parts):
                found = (comp, parts)
                break
        cost = sys.getsizeof(topic) + _ENTRY_OVERHEAD
        if found is not None:  # an unmatched topic keeps no levels
            cost += sys.getsizeof(parts) + sum(map(sys.getsizeof, parts))
        if self._bytes + cost > self.max_bytes or len(self._memo) >= self.max_entries:
            self._memo.clear()
            self._bytes = 0
        if cost <= self.max_bytes:
            self._memo[topic] = found
            self._bytes += cost
        return found
