"""The node's budget leases: which controller said what, what holds now, and the failsafe.

Pure (values and an injected wall clock in ``now``, unix seconds; no I/O), so the daemon, the
site simulation's hundreds of nodes and the tests all run the same code.

A controller publishes one retained lease per node on ``.../nodes/{node}/budget/{controller}``
(``agentd.site.topics``). ``LeaseTracker.offer`` judges each message and keeps at most one lease
per controller; ``budget`` is the minimum of the unexpired ones (replicas are safe together
because the node takes the lowest), or ``failsafe_w`` when none is live. A lease is refused, with
a reason that is counted and logged (once per reason per ``LOG_EVERY_S``, naming the controller
and the topic), when it

* does not verify with the site key, or has no signature while a key is configured
  (``bad_signature``, ``unsigned``), or is not a valid lease document (``protocol`` reasons:
  ``not_json``, ``missing_field``, ``non_finite``, ``too_large`` ...);
* is for another site or another node (``wrong_site``, ``wrong_target``), or names a controller
  other than the one its topic names (``wrong_topic``);
* has a negative budget (``negative``), or ``expires_at <= issued_at`` (``inconsistent``);
* was issued further in the future than ``max_skew_s`` (``from_future``) or has already expired
  (``expired``: a retained lease of a controller that died);
* was issued before the last lease accepted from that controller (``replay``). The same lease
  delivered again (a retained message after a reconnect) is a ``duplicate`` and changes nothing;
* comes from a controller beyond the ``MAX_CONTROLLERS`` this node tracks (``too_many_controllers``).

A lease is held at most ``max_ttl_s`` after its ``issued_at`` whatever its ``expires_at`` says,
so a controller that dies leaves the node on its failsafe within one TTL. A budget above the
node's maximum is clamped to it (logged). An empty payload (a deleted retained message) clears
that controller's lease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from agentd.site import topics
from agentd.site.protocol import Lease, ProtocolError, decode_lease
from collectors.log_limit import RateLimitedLog

log = structlog.get_logger("agentd.site")

LOG_EVERY_S = 60.0
MAX_CONTROLLERS = 64
# The tracker's own refusal reasons (decode_lease adds the protocol ones).
REFUSALS = ("wrong_topic", "wrong_site", "wrong_target", "negative", "inconsistent", "from_future",
            "expired", "replay", "too_many_controllers")


@dataclass(slots=True)
class _Held:
    """The live lease of one controller."""

    controller: str
    budget_w: float  # as the controller sent it (clamped to max_w when read: max_w can change)
    issued_at: float
    expires_at: float  # effective: min(the lease's expires_at, issued_at + max_ttl_s)
    seq: int


@dataclass(slots=True)
class Decision:
    """What ``offer`` made of one message. ``outcome`` is ``accepted``, ``duplicate``, ``cleared``
    or the refusal reason; ``budget_w`` is the budget held (after a clamp) when accepted."""

    accepted: bool
    outcome: str
    controller: str | None = None
    budget_w: float | None = None
    clamped: bool = False
    detail: str = ""


@dataclass(slots=True)
class NodeBudget:
    """The budget the node enforces now.

    ``source`` is ``lease`` (the minimum of the live leases; ``binding`` is the controller whose
    lease it is, ``lease_age_s`` and ``expires_at`` are that lease's) or ``failsafe`` (none live;
    ``why`` is ``no_lease_yet``, ``expired`` or ``cleared``). ``controllers`` are the controllers
    with a live lease, sorted.
    """

    budget_w: float
    source: Literal["lease", "failsafe"]
    controllers: list[str] = field(default_factory=list)
    lease_age_s: float | None = None
    expires_at: float | None = None
    binding: str | None = None
    why: str | None = None


class LeaseTracker:
    """The leases of one node; see the module docstring."""

    def __init__(self, site: str, node: str, key: bytes | None, max_w: float, failsafe_w: float,
                 max_skew_s: float = 2.0, max_ttl_s: float = 60.0, log_every_s: float = LOG_EVERY_S) -> None:
        if not failsafe_w >= 0 or not math.isfinite(failsafe_w):
            raise ValueError(f"failsafe_w must be a finite number >= 0 (got {failsafe_w!r})")
        self.site = topics.check_level(site, "site")
        self.node = topics.check_level(node, "node")
        self.key = key
        self.max_w = max_w  # the node's maximum (sum of its GPUs' uncapped limits); 0: not known yet
        self.failsafe_w = failsafe_w
        self.max_skew_s = max_skew_s
        self.max_ttl_s = max_ttl_s
        self.refused: dict[str, int] = {}  # refusals by reason (the node_power point's counters)
        self.accepted = 0
        self.duplicates = 0
        self.cleared = 0
        self.clamped = 0
        self._prefix = topics.node_budget(site, node, "")
        self._target = f"nodes/{node}"
        self._held: dict[str, _Held] = {}
        self._last: dict[str, tuple[float, int]] = {}  # controller -> (issued_at, seq) last accepted
        self._ever = False  # a lease was accepted since start
        self._why_none = "no_lease_yet"
        self._on_failsafe: bool | None = None  # None: budget() not asked yet
        self._failsafe_since: float | None = None
        self._last_binding: _Held | None = None
        self._log = RateLimitedLog(log_every_s)

    # -- messages ------------------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes, now: float) -> Decision:
        """Judge one message from the node's budget topics (see the module docstring)."""
        controller = topic[len(self._prefix):] if topic.startswith(self._prefix) else ""
        if not controller or "/" in controller:
            return self._refuse("wrong_topic", now, topic, None,
                                f"not a lease topic of this node (expected {self._prefix}<controller>)")
        if not payload:
            return self._clear(controller, topic, now)
        try:
            lease = decode_lease(payload, self.key)
        except ProtocolError as exc:
            return self._refuse(exc.reason, now, topic, controller, exc.detail)
        except ValueError as exc:  # NaN / Infinity tokens: the signature's canonical JSON refuses them
            return self._refuse("non_finite", now, topic, controller, f"the lease holds NaN or Infinity ({exc})")
        problem = self._judge(lease, controller, now)
        if problem is not None:
            return self._refuse(problem[0], now, topic, controller, problem[1])
        return self._accept(lease, controller, topic, now)

    def _judge(self, lease: Lease, controller: str, now: float) -> tuple[str, str] | None:
        """The refusal reason and detail for a well-formed lease, or None when it may be held."""
        if lease.site != self.site:
            return "wrong_site", f"the lease is for site {lease.site!r}; this node is in {self.site!r}"
        if lease.target != self._target:
            return "wrong_target", f"the lease is for {lease.target!r}; this node is {self._target!r}"
        if lease.controller != controller:
            return "wrong_topic", (f"the lease names controller {lease.controller!r} but came on the topic of "
                                   f"{controller!r}")
        if lease.budget_w < 0:
            return "negative", f"budget_w = {lease.budget_w}"
        if lease.expires_at <= lease.issued_at:
            return "inconsistent", f"expires_at {lease.expires_at} is not after issued_at {lease.issued_at}"
        if lease.issued_at > now + self.max_skew_s:
            return "from_future", (f"issued {lease.issued_at - now:.1f} s ahead of this node's clock (allowed: "
                                   f"{self.max_skew_s:g} s); check NTP on the controller and this node")
        if self._expiry(lease) <= now:
            return "expired", (f"expired {now - self._expiry(lease):.1f} s ago (a retained lease of a stopped "
                               "controller?)")
        last = self._last.get(controller)
        stamp = (lease.issued_at, lease.seq)
        if last is not None and stamp <= last:
            held = self._held.get(controller)
            if stamp == last and held is not None and held.budget_w == lease.budget_w:
                return None  # the same lease again: a retained message after a reconnect
            return "replay", (f"issued_at {lease.issued_at} seq {lease.seq} is not after the last lease accepted "
                              f"from this controller (issued_at {last[0]} seq {last[1]})")
        if controller not in self._last and len(self._last) >= MAX_CONTROLLERS:
            self._forget_old(now)
            if len(self._last) >= MAX_CONTROLLERS:
                return "too_many_controllers", f"this node already tracks {MAX_CONTROLLERS} controllers"
        return None

    def _expiry(self, lease: Lease) -> float:
        return min(lease.expires_at, lease.issued_at + self.max_ttl_s)

    def _clamp(self, budget_w: float) -> float:
        return min(budget_w, self.max_w) if self.max_w > 0 else budget_w

    def _accept(self, lease: Lease, controller: str, topic: str, now: float) -> Decision:
        stamp = (lease.issued_at, lease.seq)
        budget_w = self._clamp(lease.budget_w)
        held = self._held.get(controller)
        if self._last.get(controller) == stamp and held is not None:
            self.duplicates += 1
            return Decision(True, "duplicate", controller, budget_w)
        clamped = budget_w < lease.budget_w
        if clamped:
            self.clamped += 1
            self._log.emit("clamped", now, log.warning, "lease_clamped", controller=controller, topic=topic,
                           budget_w=lease.budget_w, max_w=self.max_w,
                           hint="the budget is above this node's maximum (the sum of its GPUs' uncapped "
                                "limits); holding the maximum instead")
        if lease.expires_at > lease.issued_at + self.max_ttl_s:
            self._log.emit("ttl", now, log.warning, "lease_ttl_shortened", controller=controller, topic=topic,
                           ttl_s=round(lease.expires_at - lease.issued_at, 3), max_ttl_s=self.max_ttl_s,
                           hint="held until issued_at + budget.max_lease_ttl; renew leases more often or raise "
                                "max_lease_ttl on the nodes")
        if controller not in self._last:
            log.info("lease_accepted", controller=controller, topic=topic, budget_w=budget_w,
                     expires_in_s=round(self._expiry(lease) - now, 3))
        self._held[controller] = _Held(controller, lease.budget_w, lease.issued_at, self._expiry(lease), lease.seq)
        self._last[controller] = stamp
        self._ever = True
        self.accepted += 1
        return Decision(True, "accepted", controller, budget_w, clamped)

    def _clear(self, controller: str, topic: str, now: float) -> Decision:
        self.cleared += 1
        if self._held.pop(controller, None) is not None:
            log.info("lease_cleared", controller=controller, topic=topic)
            if not self._held:
                self._why_none = "cleared"
        return Decision(True, "cleared", controller)

    def _refuse(self, reason: str, now: float, topic: str, controller: str | None, detail: str) -> Decision:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log.emit(reason, now, log.warning, "lease_refused", reason=reason, controller=controller,
                       topic=topic, detail=detail, node=self.node)
        return Decision(False, reason, controller, detail=detail)

    def _forget_old(self, now: float) -> None:
        """Drop the replay marks that cannot matter any more: a lease issued before them would be
        refused as expired anyway."""
        self._purge(now)
        horizon = now - self.max_ttl_s - self.max_skew_s
        for name in [c for c, (issued, _) in self._last.items() if issued < horizon and c not in self._held]:
            del self._last[name]

    def _purge(self, now: float) -> None:
        """Drop the leases that have expired."""
        expired = [c for c, h in self._held.items() if h.expires_at <= now]
        for name in expired:
            del self._held[name]
        if expired and not self._held:
            self._why_none = "expired"

    # -- the budget ----------------------------------------------------------------------------

    def budget(self, now: float) -> NodeBudget:
        """The minimum of the live leases (clamped to ``max_w``), or the failsafe when none is live.
        Entering the failsafe logs ``budget_failsafe`` (with why), leaving it ``budget_lease``."""
        self._purge(now)
        if self._held:
            binding = min(self._held.values(), key=lambda h: (h.budget_w, h.controller))
            result = NodeBudget(self._clamp(binding.budget_w), "lease", sorted(self._held),
                                max(0.0, now - binding.issued_at), binding.expires_at, binding.controller)
            if self._on_failsafe is not False:
                if self._on_failsafe:
                    log.info("budget_lease", controllers=result.controllers, budget_w=result.budget_w,
                             binding=binding.controller,
                             failsafe_for_s=round(now - (self._failsafe_since or now), 3))
                self._on_failsafe = False
            self._last_binding = binding
            return result
        last = self._last_binding
        result = NodeBudget(self.failsafe_w, "failsafe", [],
                            max(0.0, now - last.issued_at) if last is not None else None, None, None,
                            self._why_none)
        if not self._on_failsafe:
            self._on_failsafe = True
            self._failsafe_since = now
            fields: dict[str, Any] = {"why": self._why_none, "failsafe_w": self.failsafe_w, "node": self.node}
            if last is not None:
                fields |= {"last_controller": last.controller, "last_budget_w": self._clamp(last.budget_w),
                           "last_expired_s_ago": round(now - last.expires_at, 3)}
            if self._why_none == "no_lease_yet":
                log.info("budget_failsafe", **fields, hint="no lease received yet; enforcing failsafe_w until "
                                                          "a controller's lease arrives")
            else:
                log.warning("budget_failsafe", **fields,
                            hint="no live lease from any controller (controller stopped, broker lost?); "
                                 "enforcing budget.failsafe_w until one arrives")
        return result

    @property
    def live(self) -> int:
        """Leases held (some may have expired since the last ``budget`` call)."""
        return len(self._held)
