"""The node's lease tracker (agentd.site.lease): every refusal, the minimum of live leases, the
failsafe after the last lease (a controller killed, a broker restart), clamps and replays.

All on injected wall-clock times; nothing sleeps.
"""

from __future__ import annotations

import json
import math

import pytest
from structlog.testing import capture_logs

from agentd.site import topics
from agentd.site.lease import MAX_CONTROLLERS, LeaseTracker
from agentd.site.protocol import Lease, encode_lease, sign

KEY = b"k" * 32
SITE, NODE = "s1", "gpu-001"
T0 = 1_767_225_600.0


def tracker(**kw) -> LeaseTracker:
    args = {"site": SITE, "node": NODE, "key": KEY, "max_w": 5600.0, "failsafe_w": 3000.0,
            "max_skew_s": 2.0, "max_ttl_s": 60.0} | kw
    return LeaseTracker(**args)


def lease(budget_w=4000.0, *, ctrl="ctrl-a", issued=T0, ttl=10.0, seq=1, site=SITE, target=f"nodes/{NODE}",
          key=KEY) -> bytes:
    doc = Lease(site=site, target=target, controller=ctrl, budget_w=budget_w, issued_at=issued,
                expires_at=issued + ttl, seq=seq)
    return encode_lease(doc, key)


def resigned(drop: str | None = None, **over) -> bytes:
    """A good lease with hand-made fields (wrong types, extra keys), signed again: only the field
    is wrong. NaN cannot be signed (the canonical JSON refuses it): it keeps the old signature."""
    fields = {k: v for k, v in json.loads(lease()).items() if k not in ("sig", drop)} | over
    try:
        fields["sig"] = sign(fields, KEY)
    except ValueError:
        fields["sig"] = json.loads(lease())["sig"]
    return json.dumps(fields).encode()  # json writes NaN as the bare token NaN


def topic(ctrl="ctrl-a") -> str:
    return topics.node_budget(SITE, NODE, ctrl)


def test_a_valid_lease_is_the_budget_until_it_expires_then_the_failsafe():
    t = tracker()
    d = t.offer(topic(), lease(4000.0, ttl=10.0), T0)
    assert d.accepted and d.outcome == "accepted" and d.budget_w == 4000.0
    b = t.budget(T0 + 5)
    assert (b.budget_w, b.source, b.controllers, b.binding) == (4000.0, "lease", ["ctrl-a"], "ctrl-a")
    assert b.lease_age_s == pytest.approx(5.0) and b.expires_at == T0 + 10
    with capture_logs() as logs:
        b = t.budget(T0 + 10.0)
    assert (b.budget_w, b.source, b.why) == (3000.0, "failsafe", "expired")
    assert [e["event"] for e in logs] == ["budget_failsafe"] and logs[0]["why"] == "expired"
    assert logs[0]["log_level"] == "warning" and logs[0]["last_controller"] == "ctrl-a"
    with capture_logs() as logs:
        t.budget(T0 + 11)  # still on failsafe: logged once, on entering
    assert logs == []


def test_before_any_lease_the_node_is_on_failsafe_and_says_why_and_when_it_leaves():
    t = tracker()
    with capture_logs() as logs:
        b = t.budget(T0)
        t.offer(topic(), lease(4500.0), T0 + 1)
        b2 = t.budget(T0 + 1)
    assert (b.source, b.why, b.budget_w) == ("failsafe", "no_lease_yet", 3000.0)
    assert (b2.source, b2.budget_w) == ("lease", 4500.0)
    events = [e["event"] for e in logs]
    assert events == ["budget_failsafe", "lease_accepted", "budget_lease"]
    assert logs[2]["failsafe_for_s"] == pytest.approx(1.0)


def test_the_budget_is_the_minimum_of_the_live_leases_of_several_controllers():
    t = tracker()
    t.offer(topic("ctrl-a"), lease(4200.0, ctrl="ctrl-a", ttl=10), T0)
    t.offer(topic("ctrl-b"), lease(3900.0, ctrl="ctrl-b", ttl=20), T0)
    b = t.budget(T0 + 1)
    assert (b.budget_w, b.binding, b.controllers) == (3900.0, "ctrl-b", ["ctrl-a", "ctrl-b"])
    t.offer(topic("ctrl-b"), lease(4800.0, ctrl="ctrl-b", ttl=20, issued=T0 + 2, seq=2), T0 + 2)
    assert t.budget(T0 + 3).budget_w == 4200.0  # now ctrl-a's is the lower
    assert t.budget(T0 + 10.5).budget_w == 4800.0  # ctrl-a's expired: ctrl-b's alone
    assert t.budget(T0 + 22.5).source == "failsafe"


def test_a_killed_controller_leaves_the_node_on_failsafe_within_one_ttl_even_if_its_lease_says_longer():
    t = tracker(max_ttl_s=15.0)
    with capture_logs() as logs:
        t.offer(topic(), lease(4000.0, ttl=3600.0), T0)  # the controller asks for an hour
    assert any(e["event"] == "lease_ttl_shortened" for e in logs)
    for k in range(1, 15):  # it renews no more (killed); the lease holds for one TTL ...
        assert t.budget(T0 + k).source == "lease"
    assert t.budget(T0 + 15.0).source == "failsafe"  # ... and not a moment longer


def test_a_node_rides_its_last_lease_across_a_broker_restart_then_fails_safe():
    t = tracker()
    payload = lease(4100.0, ttl=30.0, seq=7)
    t.offer(topic(), payload, T0)
    # the broker restarts: the node reconnects and the retained lease comes again, unchanged
    d = t.offer(topic(), payload, T0 + 12)
    assert d.accepted and d.outcome == "duplicate" and t.refused == {}
    assert t.budget(T0 + 20).budget_w == 4100.0
    # a broker that lost its retained store redelivers nothing: ride the lease to its expiry
    assert t.budget(T0 + 29.9).source == "lease"
    b = t.budget(T0 + 30.0)
    assert (b.source, b.why, b.budget_w) == ("failsafe", "expired", 3000.0)
    # the controller's next lease after the broker is back
    assert t.offer(topic(), lease(4300.0, ttl=30.0, issued=T0 + 31, seq=8), T0 + 31).accepted
    assert t.budget(T0 + 31).budget_w == 4300.0


def test_a_budget_above_the_nodes_maximum_is_clamped_and_logged():
    t = tracker(max_w=5600.0)
    with capture_logs() as logs:
        d = t.offer(topic(), lease(9000.0), T0)
    assert d.accepted and d.clamped and d.budget_w == 5600.0
    assert t.budget(T0).budget_w == 5600.0 and t.clamped == 1
    clamp = [e for e in logs if e["event"] == "lease_clamped"]
    assert clamp and clamp[0]["budget_w"] == 9000.0 and clamp[0]["max_w"] == 5600.0


def test_an_empty_retained_payload_clears_that_controllers_lease_only():
    t = tracker()
    t.offer(topic("ctrl-a"), lease(3500.0, ctrl="ctrl-a"), T0)
    t.offer(topic("ctrl-b"), lease(4500.0, ctrl="ctrl-b"), T0)
    d = t.offer(topic("ctrl-a"), b"", T0 + 1)
    assert d.outcome == "cleared" and d.controller == "ctrl-a"
    assert t.budget(T0 + 1).budget_w == 4500.0
    t.offer(topic("ctrl-b"), b"", T0 + 2)
    b = t.budget(T0 + 2)
    assert (b.source, b.why) == ("failsafe", "cleared")
    # a cleared lease does not come back from a late duplicate of it
    assert t.offer(topic("ctrl-b"), lease(4500.0, ctrl="ctrl-b"), T0 + 3).outcome == "replay"


REFUSALS = [
    # (reason, payload factory, topic)
    ("bad_signature", lambda: lease(key=b"x" * 32), topic()),
    ("unsigned", lambda: json.dumps({k: v for k, v in json.loads(lease()).items() if k != "sig"}).encode(), topic()),
    ("bad_signature", lambda: lease().replace(b'"budget_w":4000.0', b'"budget_w":0.0'), topic()),  # edited
    ("wrong_site", lambda: lease(site="s2"), topic()),
    ("wrong_target", lambda: lease(target="nodes/gpu-002"), topic()),
    ("wrong_target", lambda: lease(target="domains/rack-1"), topic()),
    ("wrong_topic", lambda: lease(ctrl="ctrl-b"), topic("ctrl-a")),  # ctrl-b's lease on ctrl-a's topic
    ("wrong_topic", lambda: lease(), topics.node_budget(SITE, "gpu-002", "ctrl-a")),  # another node's topic
    ("wrong_topic", lambda: lease(), topics.node_power(SITE, NODE)),
    ("negative", lambda: lease(-1.0), topic()),
    ("non_finite", lambda: resigned(budget_w=float("nan")), topic()),
    ("non_finite", lambda: resigned(expires_at=float("inf")), topic()),
    ("inconsistent", lambda: lease(ttl=0.0), topic()),
    ("inconsistent", lambda: lease(ttl=-5.0), topic()),
    ("from_future", lambda: lease(issued=T0 + 2.5), topic()),
    ("expired", lambda: lease(issued=T0 - 20, ttl=10), topic()),
    ("not_json", lambda: b"\xff{not json", topic()),
    ("wrong_type", lambda: b"[1, 2]", topic()),
    ("missing_field", lambda: resigned(drop="expires_at"), topic()),
    ("wrong_type", lambda: resigned(budget_w="4000"), topic()),
    ("unknown_field", lambda: resigned(extra=1), topic()),
    ("unknown_version", lambda: resigned(v=2), topic()),
    ("too_large", lambda: b"{" + b" " * (1 << 20) + b"}", topic()),
]


@pytest.mark.parametrize(("reason", "make", "where"), REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_each_bad_lease_is_refused_with_its_reason_counted_logged_and_nothing_held_is_lost(reason, make, where):
    t = tracker()
    t.offer(topic("ctrl-z"), lease(4800.0, ctrl="ctrl-z", ttl=30), T0)  # a good lease held before
    with capture_logs() as logs:
        d = t.offer(where, make(), T0)
    assert not d.accepted and d.outcome == reason, d
    assert t.refused == {reason: 1}
    refused = [e for e in logs if e["event"] == "lease_refused"]
    assert len(refused) == 1 and refused[0]["reason"] == reason and refused[0]["topic"] == where
    assert refused[0]["log_level"] == "warning" and refused[0]["detail"]
    b = t.budget(T0 + 1)
    assert (b.budget_w, b.source, b.controllers) == (4800.0, "lease", ["ctrl-z"])  # the good one still holds


def test_a_refusal_names_the_controller_of_the_topic():
    t = tracker()
    with capture_logs() as logs:
        t.offer(topic("ctrl-q"), lease(ctrl="ctrl-q", key=b"y" * 32), T0)
    assert logs[0]["controller"] == "ctrl-q" and logs[0]["reason"] == "bad_signature"


def test_an_older_lease_from_the_same_controller_is_a_replay():
    t = tracker()
    assert t.offer(topic(), lease(4000.0, issued=T0 + 5, seq=5), T0 + 5).accepted
    d = t.offer(topic(), lease(1000.0, issued=T0 + 4, seq=4), T0 + 5)  # an old lease sent again
    assert d.outcome == "replay" and t.budget(T0 + 6).budget_w == 4000.0
    d = t.offer(topic(), lease(1000.0, issued=T0 + 5, seq=5), T0 + 5)  # same stamp, other budget
    assert d.outcome == "replay"
    assert t.offer(topic(), lease(4100.0, issued=T0 + 5, seq=6), T0 + 5).accepted  # same time, next seq
    assert t.refused == {"replay": 2}


def test_non_finite_numbers_are_refused_without_a_key_too():
    t = tracker(key=None)
    assert t.offer(topic(), resigned(budget_w=float("nan")), T0).outcome == "non_finite"
    assert t.offer(topic(), resigned(issued_at=float("-inf")), T0).outcome == "non_finite"
    assert t.refused == {"non_finite": 2} and t.budget(T0).source == "failsafe"


def test_unsigned_leases_are_taken_only_when_no_key_is_configured():
    t = tracker(key=None)
    unsigned = json.dumps({k: v for k, v in json.loads(lease()).items() if k != "sig"}).encode()
    assert t.offer(topic(), unsigned, T0).accepted
    assert tracker().offer(topic(), unsigned, T0).outcome == "unsigned"


def test_skew_within_the_allowance_is_accepted():
    t = tracker(max_skew_s=2.0)
    assert t.offer(topic(), lease(issued=T0 + 1.9), T0).accepted


def test_refusals_are_logged_once_per_reason_per_interval_with_the_count_held_back():
    t = tracker(log_every_s=60.0)
    with capture_logs() as logs:
        for k in range(100):
            t.offer(topic(), lease(key=b"x" * 32), T0 + k * 0.1)  # 100 forged leases in 10 s
        t.offer(topic(), lease(site="other"), T0 + 10)  # another reason: its own line
        t.offer(topic(), lease(key=b"x" * 32), T0 + 61)  # the next interval
    refused = [e for e in logs if e["event"] == "lease_refused"]
    assert [e["reason"] for e in refused] == ["bad_signature", "wrong_site", "bad_signature"]
    assert refused[2]["suppressed"] == 99
    assert t.refused == {"bad_signature": 101, "wrong_site": 1}


def test_a_flood_of_controller_ids_is_bounded():
    t = tracker()
    for k in range(MAX_CONTROLLERS):
        assert t.offer(topic(f"c{k}"), lease(5000.0 - k, ctrl=f"c{k}"), T0).accepted
    d = t.offer(topic("one-too-many"), lease(10.0, ctrl="one-too-many"), T0)
    assert d.outcome == "too_many_controllers" and t.budget(T0).budget_w == 5000.0 - (MAX_CONTROLLERS - 1)
    # once the old marks are past any possible lease, room is made
    later = T0 + 200
    assert t.offer(topic("fresh"), lease(4000.0, ctrl="fresh", issued=later), later).accepted


def test_a_node_with_an_unknown_maximum_does_not_clamp_until_it_knows():
    t = tracker(max_w=0.0)
    assert t.offer(topic(), lease(9000.0), T0).budget_w == 9000.0
    t.max_w = 5600.0
    assert t.budget(T0).budget_w == 5600.0


def test_a_bad_failsafe_is_refused_at_construction():
    with pytest.raises(ValueError, match="failsafe_w"):
        tracker(failsafe_w=math.nan)
    with pytest.raises(ValueError, match="node"):
        tracker(node="a/b")
