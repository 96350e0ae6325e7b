"""The decision of ``agentd slurm-sync``: the nodes' throttle bodies and Slurm's node states in,
the ``scontrol update`` calls to make out. Pure: values and an injected clock, no I/O.

The rules (docs/slurm-sync.md says why each is there):

* a node whose body says no new work (``accept_new_work`` false: ``no_new_work`` and ``drain``
  advice alike) is drained with ``<prefix> <why>`` (``agentd: drain: leak_detected``); running
  jobs continue, as a Slurm DRAIN does; a changed why rewrites our own reason;
* only a node drained with a reason that starts with our prefix is ever resumed, when its body
  says it takes work again;
* a node someone else drained or marked (any other reason) is never touched: not resumed, not
  drained again, its reason and Extra never rewritten;
* a body that is missing, unreadable or expired (``expires_at`` passed) changes nothing, and
  says so once (never resume, nor drain, on missing data); so does a node Slurm does not list,
  or lists as down / future / unknown;
* idempotent: no update when Slurm already shows what we want (the next pass sees the result);
* rate-limited: at most ``max_updates_per_minute`` updates in any 60 s, drains first, then our
  reason changes, then resumes, then Extra; the rest waits for the next pass (nothing is lost:
  each pass decides again from what Slurm shows).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agentd.schedulers.config import MAX_REASON_CHARS
from agentd.schedulers.scontrol import SlurmNode
from agentd.schedulers.throttle import NodeThrottle

ActionKind = Literal["drain", "reason", "resume", "extra"]
ORDER: dict[str, int] = {"drain": 0, "reason": 1, "resume": 2, "extra": 3}
WINDOW_S = 60.0


@dataclass(slots=True, frozen=True)
class Action:
    """One ``scontrol update``: ``kind`` on Slurm node ``slurm_node`` (agentd node ``node``);
    ``before`` / ``after`` for the log: the state (``IDLE`` -> ``DRAIN``), the reason, the Extra."""

    kind: ActionKind
    slurm_node: str
    node: str
    before: str
    after: str
    reason: str = ""  # drain / reason: the whole reason written
    extra: str = ""  # extra: the whole Extra written


@dataclass(slots=True, frozen=True)
class Notice:
    """Something worth one log line while it lasts (not an update): a stale body, a node left
    alone. ``event`` is the log event; ``detail`` a value whose change is worth a new line."""

    node: str
    event: str
    level: Literal["info", "warning"]
    detail: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.node, self.event)


@dataclass(slots=True, frozen=True)
class Decision:
    actions: list[Action]
    notices: list[Notice]


# What the source holds for one agentd node: its latest body, or why there is none usable.
Observed = NodeThrottle | str


def make_reason(prefix: str, why: str) -> str:
    """``<prefix> <why>`` on one line, at most MAX_REASON_CHARS."""
    text = " ".join(f"{prefix} {why}".split())
    return text[:MAX_REASON_CHARS].rstrip()


def merged_extra(current: str, ours: Mapping[str, Any]) -> dict[str, Any] | None:
    """The node's Extra with our keys set, the others kept; None when Extra holds something that
    is not a JSON object (another tool's text: not ours to rewrite)."""
    if not current.strip():
        return dict(ours)
    try:
        doc = json.loads(current)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return {**doc, **ours}


def extra_text(doc: Mapping[str, Any]) -> str:
    """Extra as slurm-sync writes it: compact, keys sorted (the same dict is the same text)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def decide(bodies: Mapping[str, Observed], slurm_nodes: Mapping[str, SlurmNode], *, now_ns: int,
           prefix: str, set_extra: bool, slurm_name: Callable[[str], str], grace_s: float = 0.0,
           expected: Collection[str] = (), ignore: Collection[str] = ()) -> Decision:
    """The updates that bring Slurm to what the bodies say, and what to report meanwhile.

    ``bodies``: per agentd node, its latest body or the reason it has none usable;
    ``expected``: agentd nodes that should have one (a missing body is reported);
    ``ignore``: Slurm node names never touched.
    """
    actions: list[Action] = []
    notices: list[Notice] = []
    for node in sorted(set(expected) - set(bodies)):
        notices.append(Notice(node, "throttle_missing", "warning",
                              fields={"hint": "no throttle body from this node yet: is agentd running there and "
                                              "publishing (api / mqtt)? Its Slurm node is left as it is"}))
    for node in sorted(bodies):
        seen = bodies[node]
        name = slurm_name(node)
        if name in ignore:
            continue
        if isinstance(seen, str):
            notices.append(Notice(node, "throttle_unusable", "warning", detail=seen,
                                  fields={"error": seen, "slurm_node": name,
                                          "hint": "its Slurm node is left as it is until a good body arrives"}))
            continue
        if seen.expired(now_ns, grace_s):
            expired_s = round((now_ns - seen.expires_at_ns) / 1e9, 1)
            notices.append(Notice(node, "throttle_expired", "warning",
                                  fields={"slurm_node": name, "expired_s": expired_s,
                                          "hint": "the node's agentd stopped publishing (or clocks differ): its "
                                                  "Slurm node is left as it is, never resumed on old data"}))
            continue
        slurm = slurm_nodes.get(name)
        if slurm is None:
            notices.append(Notice(node, "slurm_node_unknown", "warning",
                                  fields={"slurm_node": name, "hint": "Slurm lists no such node: map agentd names "
                                                                      "to NodeNames with node_names"}))
            continue
        if slurm.unavailable:
            notices.append(Notice(node, "slurm_node_unavailable", "info", detail=slurm.state_text,
                                  fields={"slurm_node": name, "state": slurm.state_text, "reason": slurm.reason}))
            continue
        ours = slurm.reason.startswith(prefix)
        if (slurm.drained and not ours) or (slurm.reason and not ours):
            notices.append(Notice(node, "slurm_node_not_ours", "info", detail=slurm.reason,
                                  fields={"slurm_node": name, "state": slurm.state_text, "reason": slurm.reason,
                                          "hint": "drained or marked by someone else: slurm-sync leaves it alone"}))
            continue
        if seen.drain:
            reason = make_reason(prefix, seen.why)
            if not slurm.drained:
                actions.append(Action("drain", name, node, slurm.state_text, "DRAIN", reason=reason))
            elif slurm.reason != reason:
                actions.append(Action("reason", name, node, slurm.reason, reason, reason=reason))
        elif slurm.drained:
            actions.append(Action("resume", name, node, slurm.state_text, "RESUME"))
        if set_extra:
            merged = merged_extra(slurm.extra, seen.extra)
            if merged is None:
                notices.append(Notice(node, "slurm_extra_foreign", "warning", detail=slurm.extra,
                                      fields={"slurm_node": name, "extra": slurm.extra[:200],
                                              "hint": "Extra holds something other than a JSON object; slurm-sync "
                                                      "does not rewrite it (set_extra needs Extra to itself or JSON)"}))
            elif merged_extra(slurm.extra, {}) != merged:
                text = extra_text(merged)
                actions.append(Action("extra", name, node, slurm.extra, text, extra=text))
    actions.sort(key=lambda a: (ORDER[a.kind], a.slurm_node))
    return Decision(actions, notices)


class UpdateBudget:
    """At most ``per_minute`` updates in any 60 s window (a sliding window of attempt times)."""

    __slots__ = ("per_minute", "_times")

    def __init__(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Spend one update at monotonic ``now``; False (nothing spent) when the window is full."""
        while self._times and now - self._times[0] >= WINDOW_S:
            self._times.popleft()
        if len(self._times) >= self.per_minute:
            return False
        self._times.append(now)
        return True

    def used(self, now: float) -> int:
        return sum(1 for t in self._times if now - t < WINDOW_S)


@dataclass(slots=True, frozen=True)
class Step:
    """One pass: the updates to run now, those the rate limit holds back, the notices that start
    (or change) now and the notice keys that ended."""

    run: list[Action]
    deferred: list[Action]
    notices: list[Notice]
    cleared: list[tuple[str, str]]


class SyncCore:
    """``decide`` plus what lasts between passes: the rate limit and which notices are on."""

    def __init__(self, *, prefix: str, set_extra: bool, max_per_minute: int, slurm_name: Callable[[str], str],
                 grace_s: float = 0.0, ignore: Collection[str] = ()) -> None:
        self.prefix = prefix
        self.set_extra = set_extra
        self.slurm_name = slurm_name
        self.grace_s = grace_s
        self.ignore = frozenset(ignore)
        self.budget = UpdateBudget(max_per_minute)
        self._on: dict[tuple[str, str], str] = {}
        self.deferred_total = 0

    def step(self, bodies: Mapping[str, Observed], slurm_nodes: Mapping[str, SlurmNode], *, now_ns: int,
             monotonic: float, expected: Collection[str] = (), spend: bool = True) -> Step:
        """Decide one pass. ``spend`` False (a dry run): nothing is run, so nothing is counted
        against the rate limit and every decided update is returned in ``run``."""
        decision = decide(bodies, slurm_nodes, now_ns=now_ns, prefix=self.prefix, set_extra=self.set_extra,
                          slurm_name=self.slurm_name, grace_s=self.grace_s, expected=expected, ignore=self.ignore)
        run: list[Action] = []
        deferred: list[Action] = []
        for action in decision.actions:
            if not spend or self.budget.take(monotonic):
                run.append(action)
            else:
                deferred.append(action)
        self.deferred_total += len(deferred)
        fresh: list[Notice] = []
        now_on: dict[tuple[str, str], str] = {}
        for notice in decision.notices:
            now_on[notice.key] = notice.detail
            if self._on.get(notice.key) != notice.detail or notice.key not in self._on:
                fresh.append(notice)
        cleared = sorted(k for k in self._on if k not in now_on)
        self._on = now_on
        return Step(run, deferred, fresh, cleared)
