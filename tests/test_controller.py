"""The controller core (agentd.site.controller), its settings and its command, on a fake clock.

The core is clock-free (``now`` is an argument) and transport-agnostic (topic + payload in, what
to publish out), so every test here feeds it bytes and reads the leases it signs, with no
broker and no sleeping. What the leases say is checked against what the core was asked to do:
every domain's cap (or the parent's lease) over the per-node minimum of every replica's leases.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from agentd.lineproto import encode
from agentd.site import topics
from agentd.site.controller import (REFUSALS, ControllerCore, SlackReclaim, CycleResult, controlled_tree, decode_report_fast,
                                    delegate_key, parse_meter)
from agentd.site.controller_cli import controller as controller_command
from agentd.site.controller_config import ControllerConfigError, load_controller_config
from agentd.site.protocol import Lease, PowerReport, ProtocolError, decode_lease, decode_report, encode_lease
from rules.domains import load_domains_text

KEY = b"s" * 32
T0 = 1_767_225_600.0
SITE = "s1"

SITE_TREE = """
site: s1
domains:
  site: {cap_w: 20000}
  rack-a: {parent: site, cap_w: 12000, nodes: [a1, a2, a3]}
  rack-b: {parent: site, cap_w: 12000, nodes: ["b*"]}
"""

ONE_DOMAIN = """
site: s1
domains:
  site: {cap_w: 10000, nodes: [n1, n2]}
"""

HALLS = """
site: s1
domains:
  site: {cap_w: 10000}
  hall-a: {parent: site, cap_w: 8000}
  rack-a1: {parent: hall-a, cap_w: 5000, nodes: [a1, a2]}
  rack-a2: {parent: hall-a, cap_w: 5000, nodes: [a3]}
  rack-b: {parent: site, cap_w: 8000, nodes: [b1, b2]}
"""


def doc(node: str, demand_w: float, *, cls: str = "normal", max_w: float = 5000.0, floor_w: float = 1000.0,
        min_w: float = 800.0, power_w: float | None = None, site: str = SITE, kind: str = "node",
        seq: int = 1, ts: float = T0) -> dict:
    """A consistent report document: floor + flexible == demand <= max."""
    return {"v": 1, "kind": kind, "site": site, "node": node, "ts": ts, "seq": seq, "gpus": 8,
            "gpu_power_w": demand_w if power_w is None else power_w, "demand_w": demand_w, "min_w": min_w,
            "floor_w": floor_w, "max_w": max_w, "flexible_w": {cls: demand_w - floor_w}}


def payload(d: dict) -> bytes:
    return json.dumps(d).encode()


def report(node: str, demand_w: float, **kw) -> tuple[str, bytes]:
    return topics.node_power(SITE, node), payload(doc(node, demand_w, **kw))


def core_for(text: str, cid: str = "c1", **kw) -> ControllerCore:
    kw.setdefault("release_hold_s", 0.0)
    kw.setdefault("band_hold_s", 0.0)
    return ControllerCore(load_domains_text(text), site=SITE, controller_id=cid, key=KEY,
                          rng=random.Random(7), **kw)


def feed(core: ControllerCore, msgs: Iterable[tuple[str, bytes]], now: float) -> list[bool]:
    return [core.on_message(t, p, now) for t, p in msgs]


def leases(result: CycleResult, key: bytes = KEY) -> dict[str, Lease]:
    """Every lease of a cycle, verified with the site key, by target name."""
    out = {}
    for m in result.publish:
        if "/budget/" in m.topic:
            lease = decode_lease(m.payload, key)
            assert m.qos == 1 and m.retain
            out[lease.target.split("/", 1)[1]] = lease
    return out


def budgets(result: CycleResult) -> dict[str, float]:
    return {k: v.budget_w for k, v in leases(result).items()}


def point(result: CycleResult, domain: str) -> dict:
    (p,) = [p for p in result.points if p.measurement == "domain_power" and p.tags["domain"] == domain]
    return p.fields


# --- leases: what is signed and where it goes -------------------------------------------------

def test_each_node_gets_a_signed_expiring_lease_on_its_topic_for_this_controller():
    core = core_for(SITE_TREE, lease_ttl_s=10.0)
    feed(core, [report(n, 3000) for n in ("a1", "a2", "b1")], T0)
    r = core.cycle(T0)
    got = {m.topic: decode_lease(m.payload, KEY) for m in r.publish}
    assert set(got) == {topics.node_budget(SITE, n, "c1") for n in ("a1", "a2", "b1")}
    for topic, lease in got.items():
        assert lease.target == f"nodes/{topics.node_of(topic)}" and lease.site == SITE and lease.controller == "c1"
        assert lease.issued_at == T0 and lease.expires_at == T0 + 10.0
    seqs = sorted(lease.seq for lease in got.values())
    assert len(set(seqs)) == 3 and seqs[0] > T0 * 1000  # increasing across restarts
    with pytest.raises(ProtocolError) as exc:
        decode_lease(r.publish[0].payload, b"another-site-key-32-bytes-long!!")
    assert exc.value.reason == "bad_signature"


def test_an_unchanged_lease_is_resent_only_when_due_and_again_after_a_reconnect():
    core = core_for(SITE_TREE, lease_ttl_s=9.0)  # refresh every 3 s
    msgs = [report(n, 3000) for n in ("a1", "b1")]
    feed(core, msgs, T0)
    assert len(core.cycle(T0).publish) == 2
    for k in (1, 2):
        feed(core, msgs, T0 + k)
        assert core.cycle(T0 + k).publish == []
    feed(core, msgs, T0 + 3.5)
    assert len(core.cycle(T0 + 3.5).publish) == 2  # refreshed before it could lapse
    core.unsent(topics.node_budget(SITE, "a1", "c1"))  # the transport could not send one
    assert [m.topic for m in core.cycle(T0 + 4).publish] == [topics.node_budget(SITE, "a1", "c1")]
    core.resend_all()  # a reconnect: the broker may have lost every retained lease
    assert len(core.cycle(T0 + 4.5).publish) == 2
    cleared = core.clear_leases()
    assert {m.topic for m in cleared} == {topics.node_budget(SITE, n, "c1") for n in ("a1", "b1")}
    assert all(m.payload == b"" and m.retain for m in cleared)


# --- bad reports ------------------------------------------------------------------------------

def _bad(name: str) -> tuple[str, bytes, str]:
    good = doc("a1", 3000)
    t = topics.node_power(SITE, "a1")
    if name == "wrong_type":
        return t, payload(good | {"gpu_power_w": "high"}), "wrong_type"
    if name == "missing_field":
        return t, payload({k: v for k, v in good.items() if k != "max_w"}), "missing_field"
    if name == "nan":
        return t, payload(good).replace(b'"gpu_power_w": 3000', b'"gpu_power_w": NaN'), "non_finite"
    if name == "infinity":
        return t, payload(good).replace(b'"max_w": 5000.0', b'"max_w": Infinity'), "non_finite"
    if name == "negative":
        return t, payload(good | {"gpu_power_w": -5.0}), "negative"
    if name == "unknown_node":
        return topics.node_power(SITE, "zz9"), payload(doc("zz9", 3000)), "unknown_node"
    if name == "one_megabyte":
        return t, b'{"pad": "' + b"x" * (1 << 20) + b'"}', "too_large"
    if name == "not_json":
        return t, b"\x00\xffnot json", "not_json"
    if name == "not_an_object":
        return t, b"[1, 2, 3]", "wrong_type"
    if name == "topic_mismatch":
        return t, payload(doc("a2", 3000)), "topic_mismatch"
    if name == "other_site":
        return t, payload(doc("a1", 3000, site="s2")), "topic_mismatch"
    if name == "domain_kind_on_a_node_topic":
        return t, payload(doc("a1", 3000, kind="domain")), "topic_mismatch"
    if name == "want_far_above_max":
        return t, payload(good | {"flexible_w": {"normal": 9000.0}}), "inconsistent"
    if name == "unknown_class":
        return t, payload(good | {"flexible_w": {"urgent": 2000.0}}), "unknown_class"
    if name == "unknown_version":
        return t, payload(good | {"v": 2}), "unknown_version"
    if name == "unknown_field":
        return t, payload(good | {"extra": 1}), "unknown_field"
    if name == "deeply_nested":
        return t, b"[" * 60000, "not_json"
    if name == "not_a_report_topic":
        return f"agentd/v1/{SITE}/nodes/a1/status", b"online", "not_a_topic"
    raise AssertionError(name)


BAD = ("wrong_type", "missing_field", "nan", "infinity", "negative", "unknown_node", "one_megabyte", "not_json",
       "not_an_object", "topic_mismatch", "other_site", "domain_kind_on_a_node_topic",
       "want_far_above_max", "deeply_nested", "unknown_class", "unknown_version",
       "unknown_field", "not_a_report_topic")


@pytest.mark.parametrize("name", BAD)
def test_a_bad_report_is_refused_counted_logged_and_the_last_good_one_still_allocates(name):
    core = core_for(SITE_TREE)
    feed(core, [report("a1", 3000), report("a2", 3000), report("b1", 3000)], T0)
    before = budgets(core.cycle(T0))
    topic, body, reason = _bad(name)
    with capture_logs() as logs:
        assert core.on_message(topic, body, T0 + 0.5) is False
    assert core.stats.refused == {reason: 1} and core.stats.reports_refused == 1
    assert core.stats.reports_accepted == 3
    (line,) = [e for e in logs if e["event"] == "report_refused"]
    assert line["reason"] == reason and line["topic"] == topic[:200] and line["log_level"] == "warning"
    # nothing lost: a1 is still budgeted from its last good report, and the cycle goes on
    core.resend_all()
    after = budgets(core.cycle(T0 + 1))
    assert after == before and set(after) == {"a1", "a2", "b1"}
    assert {f"refused_{reason}"} <= set(
        next(p for p in core.cycle(T0 + 2).points if p.measurement == "controller").fields)


def _outcome(decode, body: bytes):
    try:
        return decode(body)
    except ProtocolError as exc:
        return exc.reason


# (protocol.decode_report raises RecursionError on "deeply_nested"; the fast decoder refuses it)
@pytest.mark.parametrize("name", [*(b for b in BAD if b != "deeply_nested"), "good", "good_idle", "no_version",
                                  "int_watts", "duplicate_key"])
def test_the_fast_decoder_accepts_and_refuses_exactly_as_the_protocols(name):
    good = payload(doc("a1", 3000))
    body = {"good": good, "good_idle": payload(doc("a1", 200, cls="idle", floor_w=300)),
            "no_version": payload({k: v for k, v in doc("a1", 3000).items() if k != "v"}),
            "int_watts": payload(doc("a1", 3000) | {"max_w": 5000, "min_w": 800}),
            "duplicate_key": good[:-1] + b', "gpus": 9}'}.get(name) or _bad(name)[1]
    assert _outcome(decode_report_fast, body) == _outcome(decode_report, body)


def test_every_reason_label_is_stable():
    assert set(REFUSALS) == {"unknown_node", "ambiguous_node", "topic_mismatch", "not_a_topic"}


def test_refusals_are_logged_once_per_reason_per_interval_with_the_number_held_back():
    core = core_for(SITE_TREE, interval_s=1.0)
    t, body, _ = _bad("not_json")
    t2, body2, _ = _bad("unknown_node")
    with capture_logs() as logs:
        for i in range(100):
            core.on_message(t, body, T0 + i * 0.005)
            core.on_message(t2, body2, T0 + i * 0.005)
        core.on_message(t, body, T0 + 1.2)
    lines = [(e["reason"], e.get("suppressed")) for e in logs if e["event"] == "report_refused"]
    assert lines == [("not_json", None), ("unknown_node", None), ("not_json", 99)]
    assert core.stats.refused == {"not_json": 101, "unknown_node": 100}


def test_garbage_interleaved_with_good_reports_costs_only_itself():
    core = core_for(SITE_TREE)
    rng = random.Random(3)
    good = 0
    for _ in range(1000):
        if rng.random() < 0.5:
            assert core.on_message(*report(rng.choice(["a1", "a2", "b7"]), rng.uniform(1000, 5000)), T0)
            good += 1
        else:
            t, body, _ = _bad(rng.choice(BAD))
            assert core.on_message(t, body, T0) is False
    assert core.stats.reports_accepted == good and core.stats.reports_accepted + core.stats.reports_refused == 1000
    r = core.cycle(T0)
    assert set(budgets(r)) == {"a1", "a2", "b7"}


def test_an_ambiguous_node_is_refused_and_reports_outside_the_subtree_are_ignored_not_refused():
    text = """
site: s1
domains:
  site: {cap_w: 20000}
  hall-a: {parent: site, cap_w: 12000, nodes: ["gpu-*"]}
  hall-b: {parent: site, cap_w: 12000, nodes: ["gpu-1*", "b1"]}
"""
    core = core_for(text, subtree="hall-b", failsafe_w=5000)
    assert core.on_message(*report("gpu-17", 3000), T0) is False
    assert core.stats.refused == {"ambiguous_node": 1}
    assert core.on_message(*report("gpu-2", 3000), T0) is False  # hall-a's: not ours, not wrong
    assert core.stats.ignored == 1 and core.stats.reports_refused == 1
    assert core.on_message(*report("b1", 3000), T0)


# --- allocation: stale nodes, shortfall, bands, release ---------------------------------------

def test_a_node_that_stops_reporting_is_counted_at_its_maximum_and_never_cut():
    core = core_for(ONE_DOMAIN, stale_after_s=3.0)
    feed(core, [report("n1", 4000, max_w=6000), report("n2", 4000, max_w=6000)], T0)
    first = budgets(core.cycle(T0))
    assert sum(first.values()) <= 10000
    issued = []
    with capture_logs() as logs:
        for k in range(1, 6):  # n1 goes silent; n2 keeps reporting
            feed(core, [report("n2", 4000, max_w=6000)], T0 + k)
            core.resend_all()
            issued.append(budgets(core.cycle(T0 + k)))
    core.resend_all()
    r = core.cycle(T0 + 5.5)
    b = budgets(r)
    # n1 is reserved its last known maximum and never cut (its lease only rises, at the paced rate)
    assert all(later["n1"] >= first["n1"] for later in issued) and b["n1"] >= issued[-1]["n1"]
    assert r.allocation.budgets_w["n1"] == 6000.0
    assert b["n2"] <= 10000 * 0.95 - 6000 + 1e-6  # the others make the room (the band is capping)
    assert point(r, "site")["stale_nodes"] == 1 and point(r, "site")["power_w"] == 6000 + 4000
    assert r.stale_nodes == 1
    assert [e["nodes"] for e in logs if e["event"] == "nodes_stale"] == [["n1"]]
    feed(core, [report("n1", 4000, max_w=6000)], T0 + 6)  # back: allocated from its report again
    assert core.cycle(T0 + 6).stale_nodes == 0


def test_floors_above_the_cap_give_a_shortfall_that_is_published_and_logged():
    core = core_for(ONE_DOMAIN)
    feed(core, [report("n1", 6000, max_w=6000, floor_w=5500, min_w=5400),
                report("n2", 6000, max_w=6000, floor_w=5500, min_w=5400)], T0)
    with capture_logs() as logs:
        r = core.cycle(T0)
    p = point(r, "site")
    # the band caps at 0.95 x 10 kW; even both nodes at min_w (10.8 kW) exceed it by 1300 W
    assert p["shortfall_w"] == pytest.approx(2 * 5400 - 9500)
    assert p["limit_w"] == 9500 and p["level"] == 1
    (line,) = [e for e in logs if e["event"] == "domain_shortfall"]
    assert line["domain"] == "site" and line["shortfall_w"] == pytest.approx(1300) and line["log_level"] == "error"
    assert all(b >= 5400 - 1e-6 for b in budgets(r).values())  # never below the minimum limits


def test_the_three_bands_hysteresis_is_visible_in_the_leases():
    core = core_for(ONE_DOMAIN, release_w_per_s=1e6)  # release at once: this test is about the bands

    def at(k: float, each_w: float) -> CycleResult:
        feed(core, [report("n1", each_w, max_w=6000), report("n2", each_w, max_w=6000)], T0 + k)
        core.resend_all()
        return core.cycle(T0 + k)

    low = at(0, 4700)  # 9.4 kW: under cap_threshold (9.8 kW) coming from below: uncapped
    assert point(low, "site")["level"] == 0 and sum(budgets(low).values()) == pytest.approx(10000, abs=1)
    high = at(1, 5500)  # 11 kW > 9.8 kW: capping, allocate within target (9.5 kW)
    assert point(high, "site")["level"] == 1 and sum(budgets(high).values()) == pytest.approx(9500, abs=1)
    same = at(2, 4700)  # 9.4 kW again, now from above: demand >= uncap (9 kW), still capping
    assert point(same, "site")["level"] == 1 and sum(budgets(same).values()) == pytest.approx(9500, abs=1)
    under = at(3, 4400)  # 8.8 kW < 9 kW: released
    assert point(under, "site")["level"] == 0 and sum(budgets(under).values()) == pytest.approx(10000, abs=1)


def test_a_release_is_rate_limited_and_randomized_per_node_and_a_cut_is_immediate():
    text = "site: s1\ndomains:\n  site: {cap_w: 40000, nodes: [n1, n2, n3, n4, n5, n6, n7, n8]}\n"
    core = core_for(text, release_w_per_s=200.0, release_jitter=0.2)
    nodes = [f"n{i}" for i in range(1, 9)]

    def at(k: float, each_w: float) -> dict[str, float]:
        feed(core, [report(n, each_w, max_w=6000) for n in nodes], T0 + k)
        core.resend_all()
        return budgets(core.cycle(T0 + k))

    at(0, 4000)
    capped = at(1, 5800)  # 46.4 kW: capping at 38 kW
    assert sum(capped.values()) == pytest.approx(38000, abs=1)
    prev = capped
    steps: dict[str, list[float]] = {n: [] for n in nodes}
    for k in range(2, 12):  # demand falls under the uncap threshold: the allocation jumps, leases rise
        cur = at(k, 4000)
        for n in nodes:
            steps[n].append(cur[n] - prev[n])
        prev = cur
    rates = {n: max(s) for n, s in steps.items()}
    assert all(160 - 0.2 <= r <= 240 + 0.1 for r in rates.values()), rates  # 200 W/s +/- 20 %, per 1 s cycle
    assert len({round(r, 1) for r in rates.values()}) > 1  # randomized per node
    assert all(s >= 0 for ss in steps.values() for s in ss)  # only rising
    fell = at(12, 5900)  # over the cap again: every lease falls in one cycle
    assert sum(fell.values()) <= 38000 + 1e-6 and all(fell[n] < prev[n] for n in nodes)


def test_lower_classes_are_cut_before_higher_ones():
    core = core_for(ONE_DOMAIN)
    feed(core, [report("n1", 5500, cls="high", max_w=6000), report("n2", 5500, cls="low", max_w=6000)], T0)
    b = budgets(core.cycle(T0))
    assert b["n1"] == pytest.approx(5500, abs=0.2) and b["n2"] == pytest.approx(9500 - 5500, abs=0.2)


def test_unseen_named_nodes_are_counted_when_a_figure_is_given():
    core = core_for(SITE_TREE, unseen_node_w=3000.0)
    feed(core, [report("a1", 5000)], T0)
    r = core.cycle(T0)
    assert point(r, "rack-a")["stale_nodes"] == 2  # a2 and a3 never reported: counted, listed
    assert set(budgets(r)) == {"a1"}  # no lease for a node never heard from
    assert point(r, "rack-a")["power_w"] == 5000 + 2 * 3000



def test_a_shortfall_from_nodes_not_heard_from_yet_is_info_at_start_then_error():
    """Just started: nodes named in the file have not reported yet and are counted at their
    figure; the shortfall that makes is published at once but logged at error only once the
    nodes had stale_after to report."""
    core = core_for(ONE_DOMAIN, unseen_node_w=6000.0, stale_after_s=5.0)  # 2 x 6 kW > 9.5 kW
    with capture_logs() as logs:
        first = core.cycle(T0)
        later = core.cycle(T0 + 6.0)  # still silent after stale_after: say it loudly
    assert point(first, "site")["shortfall_w"] > 0 and point(later, "site")["shortfall_w"] > 0
    lines = [e for e in logs if e["event"] == "domain_shortfall"]
    assert [(e["log_level"], e["warming_up"]) for e in lines] == [("info", True), ("error", False)]

# --- replicas ---------------------------------------------------------------------------------

def test_two_controllers_with_different_views_keep_every_domain_under_cap_at_the_nodes_minimum():
    text = SITE_TREE
    d = load_domains_text(text)
    c1, c2 = core_for(text, "c1", stale_after_s=2.0), core_for(text, "c2", stale_after_s=2.0)
    nodes = ["a1", "a2", "a3", "b1", "b2", "b3", "b4"]
    rng = random.Random(11)
    held: dict[str, dict[str, float]] = {n: {} for n in nodes}  # what each node holds per controller
    for k in range(40):
        now = T0 + k
        for n in nodes:
            msg = report(n, rng.uniform(800, 5000), cls=rng.choice(["low", "normal", "high"]))
            c1.on_message(*msg, now)
            if rng.random() < 0.7:  # c2 misses reports (its broker link is lossy): some go stale
                c2.on_message(*msg, now)
        for c in (c1, c2):
            for n, lease in leases(c.cycle(now)).items():
                held[n][c.controller_id] = lease.budget_w
        enforced = {n: min(v.values()) for n, v in held.items() if v}
        for dom in d:
            members = [n for n in enforced if d.leaf_of(n) in d.subtree(dom)]
            assert sum(enforced[n] for n in members) <= d.cap_w(dom) + 1e-6, (k, dom)


# --- subtree mode -----------------------------------------------------------------------------

def _domain_lease(parent_id: str, domain: str, budget_w: float, now: float, key: bytes = KEY,
                  ttl: float = 10.0, seq: int = 1) -> tuple[str, bytes]:
    lease = Lease(site=SITE, target=f"domains/{domain}", controller=parent_id, budget_w=budget_w,
                  issued_at=now, expires_at=now + ttl, seq=seq)
    return topics.domain_budget(SITE, domain, parent_id), encode_lease(lease, key)


def test_subtree_mode_allocates_within_the_parents_lease_reports_upward_and_fails_safe():
    child = core_for(HALLS, "ctl-hall-a", subtree="hall-a", failsafe_w=3000.0, lease_ttl_s=10.0)
    assert topics.domain_budget_filter(SITE, "hall-a") in [t for t, _ in child.subscriptions()]
    assert {t for t, _ in child.subscriptions() if t.endswith("/power")} == {
        topics.node_power(SITE, n) for n in ("a1", "a2", "a3")}  # only its own nodes
    nodes = [report(n, 3500, max_w=4000) for n in ("a1", "a2", "a3")]
    feed(child, nodes, T0)
    r = child.cycle(T0)
    assert r.budget_source == "failsafe" and sum(budgets(r).values()) <= 3000 + 1e-6
    (up,) = [m for m in r.publish if m.topic == topics.domain_power(SITE, "hall-a")]
    assert up.qos == 0 and not up.retain
    agg = decode_report(up.payload)
    assert agg.kind == "domain" and agg.node == "hall-a" and agg.budget_source == "failsafe"
    assert agg.max_w == 3 * 4000 and agg.floor_w == 3 * 1000 and agg.gpus == 24
    # the parent's lease arrives: the subtree is allocated within it
    assert child.on_message(*_domain_lease("ctl-site", "hall-a", 6000.0, T0 + 1), T0 + 1)
    feed(child, nodes, T0 + 1)
    r = child.cycle(T0 + 1)
    assert r.budget_source == "lease" and r.root_limit_w == 6000.0
    assert 3000 < sum(budgets(r).values()) <= 6000 + 1e-6
    # a lease that does not verify is refused (counted by the tracker), the good one holds
    assert not child.on_message(*_domain_lease("rogue", "hall-a", 0.0, T0 + 2, key=b"x" * 32), T0 + 2)
    assert child.parent_leases is not None and child.parent_leases.refused == {"bad_signature": 1}
    assert child.cycle(T0 + 2).root_limit_w == 6000.0
    # a node's lease replayed on the subtree's topic names the wrong target: refused
    node_lease = Lease(site=SITE, target="nodes/a1", controller="ctl-site", budget_w=1.0, issued_at=T0 + 2,
                       expires_at=T0 + 12, seq=5)
    assert not child.on_message(topics.domain_budget(SITE, "hall-a", "ctl-site"), encode_lease(node_lease, KEY),
                                T0 + 2)
    assert child.parent_leases.refused == {"bad_signature": 1, "wrong_target": 1}
    # two parents (replicas): the minimum of the live ones
    child.on_message(*_domain_lease("ctl-site-2", "hall-a", 5000.0, T0 + 3), T0 + 3)
    assert child.cycle(T0 + 3).root_limit_w == 5000.0
    # the parents go away: back on the failsafe within one TTL
    feed(child, nodes, T0 + 13.5)
    r = child.cycle(T0 + 13.5)
    assert r.budget_source == "failsafe" and sum(budgets(r).values()) <= 3000 + 1e-6


def test_parent_and_subtree_controllers_together_keep_the_site_under_its_cap():
    parent = core_for(HALLS, "ctl-site", delegates=["hall-a"])
    child = core_for(HALLS, "ctl-hall-a", subtree="hall-a", failsafe_w=3000.0)
    d = load_domains_text(HALLS)
    a_nodes = [report(n, 3500, max_w=4000, cls="low") for n in ("a1", "a2", "a3")]
    b_nodes = [report(n, 3500, max_w=4000, cls="high") for n in ("b1", "b2")]
    # one broker: the parent (subscribed to every node) keeps only its own; the child
    # subscribes to its own nodes' topics only
    feed(parent, a_nodes + b_nodes, T0)
    feed(child, a_nodes, T0)
    assert parent.stats.ignored == 3 and parent.stats.reports_accepted == 2
    pr = parent.cycle(T0)
    # the child has not reported yet: hall-a is counted at its cap (8 kW), never cut
    assert budgets(pr)["hall-a"] == 8000.0 and pr.allocation.shortfall_w > 0  # b1, b2 at their minimum
    enforced: dict[str, float] = {}
    up_topic = topics.domain_power(SITE, "hall-a")
    for k in range(1, 25):
        now = T0 + k
        feed(parent, a_nodes + b_nodes, now)
        feed(child, a_nodes, now)
        cr = child.cycle(now)
        for m in cr.publish:  # the upward report reaches the parent (the leases go to the nodes)
            if m.topic == up_topic:
                assert parent.on_message(m.topic, m.payload, now)
        enforced.update(budgets(cr))
        pr = parent.cycle(now)
        for m in pr.publish:  # the subtree's lease reaches the child
            if m.topic.startswith(topics.domain_budget(SITE, "hall-a", "")):
                assert child.on_message(m.topic, m.payload, now)
        enforced.update({n: b for n, b in budgets(pr).items() if n != "hall-a"})
        hall = parent._sent[delegate_key("hall-a")].budget_w
        assert sum(enforced[n] for n in ("a1", "a2", "a3")) <= max(hall, 3000) + 1e-6, k
        assert hall + sum(enforced[n] for n in ("b1", "b2")) <= d.cap_w("site") + 1e-6, k
    # steady state: the site caps at target (9.5 kW); hall-a's low class is cut to its floors
    # (3 kW) before rack-b's high class loses a watt beyond what the floors force
    assert child.cycle(T0 + 25).budget_source == "lease"
    assert hall == pytest.approx(3000, abs=0.2)
    assert all(enforced[n] == pytest.approx(1000, abs=0.2) for n in ("a1", "a2", "a3"))
    assert enforced["b1"] == pytest.approx((9500 - 3000) / 2, abs=0.2)
    assert sum(enforced.values()) <= 9500 + 1e-6
    assert child.stats.reports_refused == parent.stats.reports_refused == 0


def test_a_delegated_childs_bad_aggregate_is_refused_like_a_nodes():
    parent = core_for(HALLS, "ctl-site", delegates=["hall-a"])
    t = topics.domain_power(SITE, "hall-a")
    assert not parent.on_message(t, payload(doc("hall-b", 3000, kind="domain")), T0)
    assert not parent.on_message(t, payload(doc("hall-a", 3000, kind="node")), T0)
    assert not parent.on_message(t, b"nope", T0)
    assert parent.stats.refused == {"topic_mismatch": 2, "not_json": 1}
    assert parent.on_message(t, payload(doc("hall-a", 3000, kind="domain")), T0)


@pytest.mark.parametrize(("root", "delegates", "message"), [
    ("site", ["nope"], "not a domain"),
    ("hall-a", ["rack-b"], "not under 'hall-a'"),
    ("site", ["site"], "cannot delegate its own root"),
    ("site", ["hall-a", "rack-a1"], "under delegate 'hall-a'"),
    ("nowhere", [], "not in"),
])
def test_bad_delegations_are_refused_naming_the_domain(root, delegates, message):
    with pytest.raises(ValueError, match=message):
        controlled_tree(load_domains_text(HALLS), root, delegates)


def test_the_controlled_tree_cuts_a_delegate_down_to_one_reporter():
    tree = controlled_tree(load_domains_text(HALLS), "site", ["hall-a"])
    assert list(tree) == ["site", "hall-a", "rack-b"] and tree.leaf_of(delegate_key("hall-a")) == "hall-a"
    assert tree.leaf_of("a1") is None and tree.cap_w("hall-a") == 8000


# --- facility meters --------------------------------------------------------------------------

def test_a_facility_meter_reading_above_the_reports_takes_its_overhead_off_the_limit():
    meter_topic = "facility/s1/main/power"
    core = core_for(ONE_DOMAIN, meters={meter_topic: ("site", 10.0)})
    assert (meter_topic, 0) in core.subscriptions()
    msgs = [report("n1", 3000, max_w=6000), report("n2", 3000, max_w=6000)]
    feed(core, msgs, T0)
    assert sum(budgets(core.cycle(T0)).values()) == pytest.approx(10000, abs=1)  # no meter yet
    assert core.on_message(meter_topic, b'{"power_w": 9900}', T0 + 1)  # 3.9 kW beyond the GPUs
    feed(core, msgs, T0 + 1)
    core.resend_all()
    r = core.cycle(T0 + 1)
    p = point(r, "site")
    assert p["meter_w"] == 9900 and p["level"] == 1 and p["headroom_w"] == 100
    assert sum(budgets(r).values()) == pytest.approx(9500 - 3900, abs=1)  # room left for the rest of the load
    assert core.on_message(meter_topic, b"6100.5", T0 + 2)  # a bare number works too
    assert not core.on_message(meter_topic, b'{"power_w": -1}', T0 + 2)
    assert not core.on_message(meter_topic, b"garbage", T0 + 2)
    assert core.stats.meter_refused == 2 and core.stats.meter_readings == 2
    assert point(core.cycle(T0 + 20), "site")["meter_w"] is None  # stale: ignored


@pytest.mark.parametrize(("body", "value"), [
    (b"1200", 1200.0), (b'{"power_w": 5.5}', 5.5), (b'{"value": 7}', 7.0), (b"NaN", None), (b"true", None),
    (b'{"power_w": "high"}', None), (b"[]", None), (b"x" * 70000, None), (b"[" * 60000, None)])
def test_meter_payloads(body, value):
    got, problem = parse_meter(body)
    assert got == value and (problem is None) == (value is not None)


def test_a_meter_for_a_domain_outside_the_controller_is_refused_at_start():
    with pytest.raises(ValueError, match="not allocated by this controller"):
        core_for(HALLS, subtree="hall-a", failsafe_w=100.0, meters={"m": ("rack-b", 10.0)})


# --- points -----------------------------------------------------------------------------------

def test_domain_power_and_controller_points_carry_the_schema_and_encode():
    core = core_for(SITE_TREE)
    feed(core, [report("a1", 3000), report("b1", 4000)], T0)
    core.on_message(*_bad("not_json")[:2], T0)
    r = core.cycle(T0)
    p = point(r, "rack-b")
    assert set(p) == {"power_w", "demand_w", "cap_w", "limit_w", "allocated_w", "headroom_w", "shortfall_w",
                      "meter_w", "level", "nodes", "stale_nodes", "reclaimed_w"}
    assert p["power_w"] == 4000 and p["cap_w"] == 12000 and p["headroom_w"] == 8000 and p["nodes"] == 1
    lines = [encode(x) for x in r.points]
    assert all(line is not None for line in lines)
    assert any(line.startswith("domain_power,controller=c1,domain=rack-b,site=s1 ") for line in lines)
    ctl = next(x for x in r.points if x.measurement == "controller")
    assert ctl.fields["refused_not_json"] == 1 and ctl.fields["leases_sent"] == 2
    assert ctl.fields["cycle_s"] >= 0 and r.summary_line().startswith("site: 7.0 kW of cap 20.0 kW")


def test_a_cycle_for_1000_nodes_is_cheap(benchmark_budget_s: float = 0.5):
    text = "site: s1\ndomains:\n  site: {cap_w: 3.0e6}\n" + "".join(
        f"  r{i}: {{parent: site, cap_w: 80000, nodes: [\"n{i}-*\"]}}\n" for i in range(50))
    core = core_for(text)
    msgs = [report(f"n{i % 50}-{i}", 3000 + (i % 7) * 300) for i in range(1000)]
    feed(core, msgs, T0)
    r = core.cycle(T0)
    assert len(r.publish) == 1000 and r.cycle_s < benchmark_budget_s  # generous: 2 shared cores under load
    assert sum(budgets(r).values()) <= 3.0e6 * 0.95 + 1e-6


# --- settings and the command -----------------------------------------------------------------

@pytest.mark.parametrize(("data", "message"), [
    ({"interval": "soon"}, "controller.interval: expected a duration"),
    ({"interval": "1s", "lease_ttl": "1s"}, "must be at least twice the interval"),
    ({"domain": "hall-a"}, "failsafe_w is required with domain"),
    ({"failsafe_w": 100}, "only for a subtree controller"),
    ({"failsafe_w": -5, "domain": "hall-a"}, "controller.failsafe_w: Input should be greater than 0"),
    ({"id": "a/b"}, "holds '/'"),
    ({"meters": [{"domain": "x", "topic": "a/+/b"}]}, "must be exact"),
    ({"meters": [{"domain": "x", "topic": "a"}, {"domain": "x", "topic": "b"}]}, "more than one meter for x"),
    ({"lease_refresh": "20s"}, "lease_refresh must be shorter"),
    ({"bogus": 1}, "controller.bogus: unknown setting"),
])
def test_bad_settings_say_which_and_what_to_do(data, message):
    with pytest.raises(ControllerConfigError) as exc:
        load_controller_config(data)
    assert any(message in line for line in exc.value.errors), exc.value.errors


def test_settings_defaults():
    s = load_controller_config({"id": "c9"})
    assert (s.interval_s, s.lease_ttl_s, s.lease_refresh_s, s.stale_after_s) == (1.0, 10.0, 10.0 / 3, 5.0)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "domains.yaml").write_text(HALLS)
    (tmp_path / "site.key").write_text("k" * 32)
    return tmp_path


def _run(args: list[str]):
    return CliRunner().invoke(controller_command, args, catch_exceptions=False)


def test_the_command_checks_and_prints_what_it_would_run(files):
    res = _run(["--domains", str(files / "domains.yaml"), "--broker", "127.0.0.1:1883", "--site-key-file",
                str(files / "site.key"), "--id", "ctl-a", "--delegate", "hall-a", "--check"])
    assert res.exit_code == 0, res.output
    assert "site s1, controller ctl-a, allocating site, delegating hall-a" in res.output
    assert f"subscribe {topics.domain_power(SITE, 'hall-a')} (qos 0)" in res.output


def test_a_bad_domains_file_exits_2_with_the_located_errors(files):
    (files / "domains.yaml").write_text("site: s1\ndomains:\n  site: {cap_w: -3}\n  r: {parent: nope, cap_w: 1}\n")
    res = _run(["--domains", str(files / "domains.yaml"), "--broker", "h:1", "--site-key-file", str(files / "site.key")])
    assert res.exit_code == 2
    assert "domains.yaml: domains.site.cap_w: a cap must be a positive" in res.output
    assert "domains.r.parent: unknown domain 'nope'" in res.output


@pytest.mark.parametrize(("extra", "message"), [
    ([], "no site key"),
    (["--site-key-file", "/nonexistent/key"], "cannot read the site key"),
    (["--site-key-file", "SHORT"], "use at least 16"),
    (["--site-key-file", "KEY", "--domain", "nope", "--failsafe", "10"], "'nope' is not a domain"),
    (["--site-key-file", "KEY", "--delegate", "rack-a1", "--delegate", "hall-a"], "under delegate 'hall-a'"),
    (["--site-key-file", "KEY", "--meter", "hall-a"], "expected DOMAIN=TOPIC"),
    (["--site-key-file", "KEY", "--interval", "0"], "Invalid value for '--interval': must be more than 0 seconds"),
])
def test_bad_options_exit_2_and_say_why(files, extra, message):
    (files / "short.key").write_text("abc")
    extra = [str(files / "short.key") if a == "SHORT" else str(files / "site.key") if a == "KEY" else a
             for a in extra]
    res = _run(["--domains", str(files / "domains.yaml"), "--broker", "127.0.0.1:1883", *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_no_broker_exits_2(files):
    res = _run(["--domains", str(files / "domains.yaml"), "--site-key-file", str(files / "site.key")])
    assert res.exit_code == 2 and "no broker" in res.output


def test_the_lease_ttl_bounds_how_long_a_dead_controller_binds(files):
    """Controller killed: its last leases expire ``lease_ttl`` after they were issued, so every
    node is on its failsafe within one TTL (the node's LeaseTracker, agentd.site.lease)."""
    from agentd.site.lease import LeaseTracker

    core = core_for(ONE_DOMAIN, lease_ttl_s=10.0)
    feed(core, [report("n1", 5000, max_w=6000), report("n2", 5000, max_w=6000)], T0)
    r = core.cycle(T0)
    tracker = LeaseTracker(SITE, "n1", KEY, max_w=6000, failsafe_w=2500)
    (m,) = [m for m in r.publish if m.topic == topics.node_budget(SITE, "n1", "c1")]
    assert tracker.offer(m.topic, m.payload, T0 + 0.1).accepted
    assert tracker.budget(T0 + 9.9).source == "lease"
    held = tracker.budget(T0 + 10.0)  # the controller died right after T0
    assert held.source == "failsafe" and held.budget_w == 2500
    assert math.isclose(leases(r)["n1"].expires_at - leases(r)["n1"].issued_at, 10.0)


def test_reports_from_the_protocol_builder_round_trip():
    r = PowerReport(site=SITE, node="a1", ts=T0, seq=3, gpus=8, gpu_power_w=1000, demand_w=1500, min_w=800,
                    floor_w=1000, max_w=5000, flexible_w={"low": 500})
    core = core_for(SITE_TREE)
    from agentd.site.protocol import encode_report

    assert core.on_message(topics.node_power(SITE, "a1"), encode_report(r), T0)


async def test_the_service_without_a_broker_keeps_cycling_and_sends_every_lease_once_connected():
    from agentd.config import MqttConfig
    from agentd.site.controller_mqtt import ControllerService

    core = core_for(SITE_TREE)
    service = ControllerService(core, MqttConfig(host="127.0.0.1", port=1), out=lambda line: None)
    feed(core, [report("a1", 3000), report("b1", 3000)], T0)
    r = await service.cycle_once()  # never connected: nothing can be sent
    assert r.leases == 2 and service.publish_failures == 2 and core.stats.leases_unsent == 2
    r = await service.cycle_once()
    assert r.leases == 2  # tried again, not forgotten
    sent: list[tuple[str, bool]] = []

    async def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        sent.append((topic, retain))
        return True

    service.link.connected = True
    service.link.publish = publish  # type: ignore[method-assign]
    await service.cycle_once()
    assert sorted(sent) == sorted((topics.node_budget(SITE, n, "c1"), True) for n in ("a1", "b1"))
    assert service.cycles == 3


def test_a_message_that_breaks_ingest_costs_only_itself_not_its_batch():
    from agentd.config import MqttConfig
    from agentd.site.controller_mqtt import ControllerService

    core = core_for(SITE_TREE)
    service = ControllerService(core, MqttConfig(host="127.0.0.1", port=1), out=lambda line: None)
    real = core.on_message

    def flaky(topic: str, payload: bytes, now: float) -> bool:
        if topic.endswith("/a2/power"):
            raise RuntimeError("a bug")
        return real(topic, payload, now)

    core.on_message = flaky  # type: ignore[method-assign]
    with capture_logs() as logs:
        service._ingest([report("a1", 3000), report("a2", 3000), report("b1", 3000)])
    assert core.stats.reports_accepted == 2 and service.ingest_errors == 1
    assert [e["event"] for e in logs] == ["controller_ingest_failed"]


# --- measured-slack feedback (SlackReclaim) ---------------------------------------------------

def _slack_step(sr: SlackReclaim, k: float, power_w: float, *, binding: bool = True, capping: bool = True,
                limit_w: float = 9500.0) -> float:
    out = sr.step(T0 + k, ["d"] if capping else [], {"d": limit_w}, {"d": power_w}, {"d": 14500.0},
                  ["d"] if binding else [], {"d": 9800.0})
    return out["d"]


def test_slack_grows_while_the_domain_draws_under_its_target_and_is_bounded_by_the_ceiling():
    sr = SlackReclaim(gain_per_s=0.5, peak_window_s=0.0)
    assert _slack_step(sr, 0, 6000) == 9500  # first step: no time has passed
    assert _slack_step(sr, 1, 6000) == pytest.approx(9500 + 0.5 * 3500)
    assert _slack_step(sr, 2, 6000) == pytest.approx(9500 + 2 * 0.5 * 3500)
    for k in range(3, 30):
        eff = _slack_step(sr, k, 6000)
    assert eff == 14500  # the ceiling (target + slack_max_fraction of the cap)


def test_slack_does_not_wind_up_when_nobody_is_cut_and_is_dropped_when_the_domain_uncaps():
    sr = SlackReclaim(gain_per_s=0.5, peak_window_s=0.0)
    _slack_step(sr, 0, 6000)
    assert _slack_step(sr, 1, 6000, binding=False) == 9500  # every node got its want: nothing to grant
    assert _slack_step(sr, 2, 6000) == pytest.approx(9500 + 1750)
    assert _slack_step(sr, 3, 6000) == pytest.approx(9500 + 3500)
    assert sr.step(T0 + 4, [], {"d": 10000.0}, {"d": 6000.0}, {"d": 14500.0}, ["d"]) == {"d": 10000.0}
    assert sr.extra_w == {}  # uncapped: the correction is gone, not kept for the next time
    assert _slack_step(sr, 5, 6000) == pytest.approx(9500 + 1750)  # capping again starts from zero


def test_slack_shrinks_by_the_excess_when_draws_rise_and_faster_above_the_cap_threshold():
    sr = SlackReclaim(gain_per_s=0.5, peak_window_s=0.0, over_gain=2.0)
    _slack_step(sr, 0, 6000)
    for k in range(1, 3):
        eff = _slack_step(sr, k, 6000)
    extra = eff - 9500
    assert extra == pytest.approx(2 * 1750)
    assert _slack_step(sr, 3, 9700) == pytest.approx(9500 + extra - 200)  # over target: give 200 W back
    assert _slack_step(sr, 4, 9900) == pytest.approx(9500 + extra - 200 - 2 * 400)  # over threshold: 2x
    assert _slack_step(sr, 5, 20000) == 9500  # never below the band's limit


def test_slack_grows_only_after_the_window_holds_no_power_above_the_target():
    sr = SlackReclaim(gain_per_s=0.5, peak_window_s=10.0)
    _slack_step(sr, 0, 9600)  # a swing over the target
    assert all(_slack_step(sr, k, 6000) == 9500 for k in range(1, 11))  # it is still in the window
    assert _slack_step(sr, 11, 6000) > 9500


@pytest.mark.parametrize("kw, message", [
    ({"gain_per_s": -1.0}, "gain_per_s"), ({"gain_per_s": math.nan}, "gain_per_s"),
    ({"over_gain": 0.5}, "over_gain"), ({"peak_window_s": -1.0}, "peak_window_s"),
    ({"max_step_s": 0.0}, "max_step_s")])
def test_bad_slack_settings_say_which(kw, message):
    with pytest.raises(ValueError, match=message):
        SlackReclaim(**kw)
    with pytest.raises(ValueError, match="slack_max_fraction"):
        core_for(ONE_DOMAIN, slack_max_fraction=-0.1)


def _closed_loop(core: ControllerCore, real_w: dict[str, float], cycles: int, demand_w: dict[str, float],
                 max_w: float = 9000.0, start: int = 0, held: dict[str, float] | None = None,
                 ) -> list[tuple[float, float]]:
    """Nodes that report ``demand_w`` but draw min(budget, real_w): (measured W, sum of budgets W)
    per cycle. The report of cycle k carries what the budgets of cycle k-1 let each node draw;
    ``held`` (updated in place) is what they hold, uncapped at first by default."""
    if held is None:
        held = dict(real_w)  # the first report (11.5 kW > 9.8 kW) starts the capping
    out = []
    for k in range(start, start + cycles):
        drawn = {n: min(held[n], real_w[n]) for n in real_w}
        feed(core, [report(n, demand_w[n], max_w=max_w, power_w=drawn[n], seq=k + 1) for n in real_w], T0 + k)
        r = core.cycle(T0 + k)
        held.update(r.budgets_w)
        out.append((sum(drawn.values()), sum(held.values())))
    return out


# n1 draws what it reports (9 kW wanted); n2 reports 5 kW (a peak-held estimate) but draws 2.5 kW
LOOP_REAL = {"n1": 9000.0, "n2": 2500.0}
LOOP_DEMAND = {"n1": 9000.0, "n2": 5000.0}


def test_watts_granted_but_not_drawn_are_granted_again_and_the_measured_power_settles_at_the_target():
    core = core_for(ONE_DOMAIN, release_w_per_s=1e6)
    run = _closed_loop(core, LOOP_REAL, 60, LOOP_DEMAND)
    measured = [m for m, _ in run[1:]]
    assert all(m <= 9800 for m in measured)  # never above the cap threshold (0.98 x 10 kW)
    assert measured[-1] == pytest.approx(9500, abs=50)  # target x cap, measured
    assert run[-1][1] == pytest.approx(9500 + 2500, abs=50)  # above the band's limit: n2's unused watts went to n1
    last = core.cycle(T0 + 60)
    assert point(last, "site")["reclaimed_w"] == pytest.approx(last.root_limit_w - 9500)


def test_without_the_correction_the_allocated_watts_are_not_drawn():
    core = core_for(ONE_DOMAIN, release_w_per_s=1e6, slack_gain_per_s=0.0)
    run = _closed_loop(core, LOOP_REAL, 60, LOOP_DEMAND)
    assert run[-1][1] == pytest.approx(9500, abs=1)  # budgets sum to target x cap ...
    assert run[-1][0] == pytest.approx(4750 + 2500, abs=1)  # ... and the site draws 7.25 kW of them


def test_when_draws_rise_to_the_budgets_the_effective_limit_shrinks_back():
    core = core_for(ONE_DOMAIN, release_w_per_s=1e6)
    held: dict[str, float] = {}
    held.update(LOOP_REAL)
    run = _closed_loop(core, LOOP_REAL, 40, LOOP_DEMAND, held=held)
    reclaimed = run[-1][1] - 9500
    assert reclaimed > 2000
    # n2's job starts: it draws all it reported (a demand step onto the reclaimed watts)
    run2 = _closed_loop(core, {"n1": 9000.0, "n2": 5000.0}, 20, LOOP_DEMAND, start=40, held=held)
    measured = [m for m, _ in run2]
    # the excursion is bounded by the reclaimed watts and lasts one cycle (the report, then the cut)
    assert measured[0] <= 9500 + reclaimed + 1 and all(m <= 9800 for m in measured[1:])
    assert measured[-1] <= 9500 + 1 and run2[-1][1] == pytest.approx(9500, abs=1)  # back to target x cap
    assert core.slack.extra_w == {}
