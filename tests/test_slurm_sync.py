"""agentd slurm-sync's decision: throttle bodies + Slurm's node states -> scontrol updates.

The rules under test (agentd/schedulers/slurm_sync.py): drain with our reason, resume only what
we drained, never touch a node someone else drained, change nothing on missing, broken or
expired data, no update when Slurm already shows the wanted state, at most N updates a minute
(drains first). Plus the body parser (untrusted input) and the rate limit on its own.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.schedulers.config import MAX_REASON_CHARS
from agentd.schedulers.scontrol import SlurmNode
from agentd.schedulers.slurm_sync import (
    Action,
    SyncCore,
    UpdateBudget,
    decide,
    extra_text,
    make_reason,
    merged_extra,
)
from agentd.schedulers.throttle import MAX_BODY_BYTES, BodyError, NodeThrottle, parse_body
from tests.slurm_helpers import body, raw

NOW_NS = 1_796_000_000 * 10**9
PREFIX = "agentd:"


def throttle(node: str = "gpu-node-01", **kw) -> NodeThrottle:
    kw.setdefault("now_ns", NOW_NS)
    return parse_body(raw(node, **kw), expect_node=node)


def snode(name: str = "gpu-node-01", *state: str, reason: str = "", extra: str = "") -> SlurmNode:
    return SlurmNode(name, frozenset(state or ("IDLE",)), reason, extra)


def run(bodies, nodes, *, set_extra=False, names=None, expected=(), ignore=(), prefix=PREFIX, now_ns=NOW_NS,
        grace_s=0.0):
    by_name = {n.name: n for n in nodes}
    names = names or {}
    return decide(bodies, by_name, now_ns=now_ns, prefix=prefix, set_extra=set_extra,
                  slurm_name=lambda n: names.get(n, n), grace_s=grace_s, expected=expected, ignore=ignore)


def kinds(decision) -> list[tuple[str, str]]:
    return [(a.kind, a.slurm_node) for a in decision.actions]


def events(decision) -> list[tuple[str, str]]:
    return [(n.event, n.node) for n in decision.notices]


# -- the body -----------------------------------------------------------------------------------

def test_a_drain_body_reads_as_drain_with_the_nodes_reason_without_its_prefix():
    t = throttle(advice="drain", rule="leak_detected")
    assert t.drain and t.why == "drain: leak_detected"
    assert t.level == 3 and t.extra == {"agentd_level": 3}
    assert t.expires_at_ns == NOW_NS + 30 * 10**9 and t.generated_at_ns == NOW_NS
    assert not t.expired(NOW_NS + 30 * 10**9) and t.expired(NOW_NS + 30 * 10**9 + 1)


def test_no_new_work_advice_drains_too_and_says_which():
    t = throttle(advice="no_new_work", rule="gpu_health")
    assert t.drain and t.why == "no_new_work: gpu_health"


def test_a_body_without_recommendations_is_read_from_accept_new_work_and_its_worst_reason():
    t = throttle(advice="drain", rule="tcs_supply_hot", recommend=False)
    assert t.drain and t.why == "drain: tcs_supply_hot" and t.extra == {"agentd_level": 3}
    assert not throttle(recommend=False).drain


def test_accept_new_work_false_drains_even_when_the_recommendation_says_resume():
    doc = body(advice="drain", now_ns=NOW_NS)
    doc["recommendations"]["slurm"]["state"] = "RESUME"  # inconsistent: the safe reading wins
    assert parse_body(json.dumps(doc)).drain


def test_a_reason_with_control_characters_is_one_printable_line():
    doc = body(advice="drain", now_ns=NOW_NS)
    doc["recommendations"]["slurm"]["reason"] = "agentd: drain:\nleak\tdetected\x00 now"
    assert parse_body(json.dumps(doc)).why == "drain: leak detected now"


@pytest.mark.parametrize(("payload", "message"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({**body(now_ns=NOW_NS), "version": 2}).encode(), "version 2 is newer"),
    (json.dumps({**body(now_ns=NOW_NS), "version": 0}).encode(), "version 0 is not 1"),
    (json.dumps({k: v for k, v in body(now_ns=NOW_NS).items() if k != "accept_new_work"}).encode(),
     "accept_new_work: Field required"),
    (json.dumps({**body(now_ns=NOW_NS), "accept_new_work": "maybe"}).encode(), "accept_new_work"),
    (json.dumps({**body(now_ns=NOW_NS), "level": 9}).encode(), "level"),
    (json.dumps({**body(now_ns=NOW_NS), "expires_at": "soon"}).encode(), "expires_at"),
    (json.dumps({**body(now_ns=NOW_NS), "expires_at": "2026-12-02T03:04:09"}).encode(), "time zone"),
    (json.dumps({**body(now_ns=NOW_NS), "advice": "panic"}).encode(), "advice"),
    (json.dumps({**body(now_ns=NOW_NS), "recommendations": {"slurm": {"state": "DOWN"}}}).encode(),
     "recommendations.slurm.state"),
    (b" " * (MAX_BODY_BYTES + 1), "larger than"),
])
def test_a_body_that_cannot_be_acted_on_is_refused_with_what_is_wrong(payload, message):
    with pytest.raises(BodyError, match=message):
        parse_body(payload)


def test_a_body_naming_another_node_is_refused():
    with pytest.raises(BodyError, match="names node 'gpu-node-02', but came from node 'gpu-node-01'"):
        parse_body(raw("gpu-node-02", now_ns=NOW_NS), expect_node="gpu-node-01")


@pytest.mark.parametrize("advice", ["none", "no_new_work", "drain"])
def test_the_nodes_own_model_writes_what_the_adapter_reads(advice):
    """The contract both sides keep: a body the node's model (agentd.api.models.Throttle) accepts
    and writes reads here the same as the test's own."""
    models = pytest.importorskip("agentd.api.models")
    written = models.Throttle.model_validate(body(advice=advice, now_ns=NOW_NS)).model_dump_json(by_alias=True)
    ours = parse_body(raw(advice=advice, now_ns=NOW_NS))
    assert parse_body(written, expect_node="gpu-node-01") == ours
    assert ours.drain == (advice != "none")


def test_keys_the_adapter_does_not_read_may_change_freely():
    doc = body(now_ns=NOW_NS, gpus="not a list", jobs={"x": 1}, future_key=[1, 2])
    assert not parse_body(json.dumps(doc)).drain


# -- the decision -------------------------------------------------------------------------------

def test_a_node_that_should_take_no_work_is_drained_with_our_reason():
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode()])
    [action] = d.actions
    assert action == Action("drain", "gpu-node-01", "gpu-node-01", "IDLE", "DRAIN",
                            reason="agentd: drain: leak_detected")
    assert d.notices == []


def test_no_update_when_slurm_already_shows_our_drain():
    d = run({"gpu-node-01": throttle(advice="drain")},
            [snode("gpu-node-01", "MIXED", "DRAIN", reason="agentd: drain: leak_detected")])
    assert d.actions == [] and d.notices == []


def test_a_changed_why_rewrites_our_own_reason():
    d = run({"gpu-node-01": throttle(advice="drain", rule="pump_loss")},
            [snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: no_new_work: gpu_health")])
    [action] = d.actions
    assert (action.kind, action.before, action.after) == ("reason", "agentd: no_new_work: gpu_health",
                                                          "agentd: drain: pump_loss")


def test_recovery_resumes_a_node_we_drained():
    d = run({"gpu-node-01": throttle()}, [snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")])
    assert kinds(d) == [("resume", "gpu-node-01")]
    assert d.actions[0].before == "IDLE+DRAIN" and d.actions[0].after == "RESUME"


def test_recovery_leaves_an_undrained_node_alone():
    assert run({"gpu-node-01": throttle()}, [snode("gpu-node-01", "ALLOCATED")]).actions == []


@pytest.mark.parametrize("body_advice", ["none", "drain", "no_new_work"])
def test_a_node_drained_by_a_person_is_never_touched(body_advice):
    nodes = [snode("gpu-node-01", "IDLE", "DRAIN", reason="maint: new DIMMs (ticket 42)", extra="rack=7")]
    d = run({"gpu-node-01": throttle(advice=body_advice)}, nodes, set_extra=True)
    assert d.actions == []  # not resumed, not re-drained, reason and Extra not rewritten
    assert events(d) == [("slurm_node_not_ours", "gpu-node-01")]
    assert d.notices[0].fields["reason"] == "maint: new DIMMs (ticket 42)"


def test_a_node_marked_by_someone_else_without_drain_is_not_drained_over():
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode("gpu-node-01", "IDLE", reason="reboot requested")])
    assert d.actions == [] and events(d) == [("slurm_node_not_ours", "gpu-node-01")]


def test_a_drain_without_any_reason_is_not_ours():
    d = run({"gpu-node-01": throttle()}, [snode("gpu-node-01", "IDLE", "DRAIN")])
    assert d.actions == [] and events(d) == [("slurm_node_not_ours", "gpu-node-01")]


def test_another_prefix_does_not_own_our_default_one():
    node = snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")
    d = run({"gpu-node-01": throttle()}, [node], prefix="site-a:")
    assert d.actions == [] and events(d) == [("slurm_node_not_ours", "gpu-node-01")]
    assert kinds(run({"gpu-node-01": throttle()}, [node], prefix="agentd:")) == [("resume", "gpu-node-01")]


def test_an_expired_body_never_resumes_and_never_drains():
    ours = snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")
    old = throttle(now_ns=NOW_NS - 60 * 10**9, ttl_s=30)  # expired 30 s ago
    d = run({"gpu-node-01": old}, [ours])
    assert d.actions == [] and events(d) == [("throttle_expired", "gpu-node-01")]
    assert d.notices[0].fields["expired_s"] == 30.0
    d = run({"gpu-node-01": throttle(advice="drain", now_ns=NOW_NS - 60 * 10**9)}, [snode()])
    assert d.actions == [] and events(d) == [("throttle_expired", "gpu-node-01")]


def test_the_expiry_grace_covers_clock_skew_and_no_more():
    t = throttle(now_ns=NOW_NS - 31 * 10**9, ttl_s=30)  # 1 s past expires_at
    ours = [snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")]
    assert kinds(run({"gpu-node-01": t}, ours, grace_s=2.0)) == [("resume", "gpu-node-01")]
    assert run({"gpu-node-01": t}, ours, grace_s=0.5).actions == []


def test_an_unreadable_body_changes_nothing_and_says_why():
    ours = [snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")]
    d = run({"gpu-node-01": "agentd/v1/default/nodes/gpu-node-01/throttle: not JSON"}, ours)
    assert d.actions == [] and events(d) == [("throttle_unusable", "gpu-node-01")]
    assert "not JSON" in d.notices[0].fields["error"]


def test_an_expected_node_without_a_body_is_reported_and_left_alone():
    d = run({}, [snode("gpu-node-01", "IDLE", "DRAIN", reason="agentd: drain: leak")], expected=["gpu-node-01"])
    assert d.actions == [] and events(d) == [("throttle_missing", "gpu-node-01")]


def test_a_node_slurm_does_not_list_is_reported():
    d = run({"gpu-node-09": throttle("gpu-node-09", advice="drain")}, [snode()])
    assert d.actions == [] and events(d) == [("slurm_node_unknown", "gpu-node-09")]


@pytest.mark.parametrize("state", [("DOWN",), ("DOWN", "NOT_RESPONDING"), ("FUTURE",), ("UNKNOWN", "DRAIN")])
def test_a_node_out_of_service_is_left_to_slurm(state):
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode("gpu-node-01", *state, reason="")])
    assert d.actions == [] and events(d) == [("slurm_node_unavailable", "gpu-node-01")]


def test_a_node_not_responding_but_up_is_still_drained():
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode("gpu-node-01", "IDLE", "NOT_RESPONDING")])
    assert kinds(d) == [("drain", "gpu-node-01")]


def test_node_names_map_agentd_names_to_slurm_nodes():
    d = run({"gpu-node-01.dc1": throttle("gpu-node-01.dc1", advice="drain")}, [snode("gpu01")],
            names={"gpu-node-01.dc1": "gpu01"})
    [action] = d.actions
    assert (action.slurm_node, action.node) == ("gpu01", "gpu-node-01.dc1")


def test_ignored_nodes_are_never_touched():
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode()], ignore=["gpu-node-01"])
    assert d.actions == [] and d.notices == []


def test_updates_come_drains_first_then_reasons_then_resumes_then_extra():
    bodies = {"a": throttle("a"), "b": throttle("b", advice="drain", rule="x"),
              "c": throttle("c", advice="drain", rule="y"), "d": throttle("d", advice="drain")}
    nodes = [snode("a", "IDLE", "DRAIN", reason="agentd: old"), snode("b"),
             snode("c", "IDLE", "DRAIN", reason="agentd: drain: z"), snode("d")]
    d = run(bodies, nodes, set_extra=True)
    assert kinds(d) == [("drain", "b"), ("drain", "d"), ("reason", "c"), ("resume", "a"),
                        ("extra", "a"), ("extra", "b"), ("extra", "c"), ("extra", "d")]


def test_a_long_reason_is_cut_to_the_contracts_bound():
    reason = make_reason(PREFIX, "drain: " + "x" * 500)
    assert len(reason) == MAX_REASON_CHARS and reason.startswith("agentd: drain: x")


# -- Extra ---------------------------------------------------------------------------------------

def test_extra_is_set_only_when_configured():
    assert run({"gpu-node-01": throttle(advice="drain")}, [snode()], set_extra=False).actions[-1].kind == "drain"
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode()], set_extra=True)
    assert kinds(d) == [("drain", "gpu-node-01"), ("extra", "gpu-node-01")]
    assert d.actions[1].extra == '{"agentd_level":3}' and d.actions[1].before == ""


def test_extra_keeps_other_keys_and_is_not_rewritten_when_equal():
    node = snode("gpu-node-01", "IDLE", extra='{"rack": "r7", "agentd_level": 0}')
    d = run({"gpu-node-01": throttle(advice="drain")}, [node], set_extra=True)
    assert json.loads(d.actions[-1].extra) == {"rack": "r7", "agentd_level": 3}
    same = snode("gpu-node-01", "IDLE", extra='{ "agentd_level" : 0, "rack":"r7"}')  # other spacing
    assert run({"gpu-node-01": throttle()}, [same], set_extra=True).actions == []


@pytest.mark.parametrize("foreign", ["rack=7", "[1,2]", '"text"'])
def test_extra_that_is_not_a_json_object_is_not_ours_to_rewrite(foreign):
    d = run({"gpu-node-01": throttle(advice="drain")}, [snode(extra=foreign)], set_extra=True)
    assert kinds(d) == [("drain", "gpu-node-01")]  # the drain still happens
    assert events(d) == [("slurm_extra_foreign", "gpu-node-01")]


def test_merged_extra_and_its_text():
    assert merged_extra("", {"agentd_level": 1}) == {"agentd_level": 1}
    assert merged_extra("nope", {"agentd_level": 1}) is None
    assert extra_text({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


# -- what holds for every input (hypothesis) ----------------------------------------------------

REASONS = st.sampled_from(["", "agentd: drain: leak", "agentd: no_new_work: x", "maint", "agentd"])
STATES = st.sampled_from([("IDLE",), ("MIXED",), ("IDLE", "DRAIN"), ("ALLOCATED", "DRAIN"), ("DOWN",),
                          ("IDLE", "NOT_RESPONDING"), ("UNKNOWN",)])
OBSERVED = st.one_of(st.none(), st.just("broken"),
                     st.tuples(st.sampled_from(["none", "drain", "no_new_work"]), st.booleans()))


def _simulate(node: SlurmNode, action: Action) -> SlurmNode:
    """What Slurm does with one update."""
    if action.kind in ("drain", "reason"):
        return SlurmNode(node.name, node.state | {"DRAIN"}, action.reason, node.extra)
    if action.kind == "resume":
        return SlurmNode(node.name, node.state - {"DRAIN"}, "", node.extra)
    return SlurmNode(node.name, node.state, node.reason, action.extra)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(STATES, REASONS, OBSERVED, st.sampled_from(["", '{"rack":1}', "x=1"])),
                min_size=1, max_size=6), st.booleans())
def test_invariants_over_many_nodes(cases, set_extra):
    nodes, bodies = [], {}
    for i, (state, reason, seen, extra) in enumerate(cases):
        name = f"n{i}"
        nodes.append(SlurmNode(name, frozenset(state), reason, extra))
        if seen == "broken":
            bodies[name] = "broken"
        elif seen is not None:
            advice, fresh = seen
            bodies[name] = throttle(name, advice=advice, now_ns=NOW_NS if fresh else NOW_NS - 100 * 10**9)
    by_name = {n.name: n for n in nodes}
    d = run(bodies, nodes, set_extra=set_extra)
    assert len({(a.kind, a.slurm_node) for a in d.actions}) == len(d.actions)  # one update of a kind per node
    for action in d.actions:
        before = by_name[action.slurm_node]
        seen = bodies[action.node]
        # only fresh, readable bodies act, and never on a node out of service
        assert isinstance(seen, NodeThrottle) and not seen.expired(NOW_NS) and not before.unavailable
        # a node with a reason that is not ours is never touched
        assert not before.reason or before.reason.startswith(PREFIX)
        if action.kind == "resume":
            assert before.drained and before.reason.startswith(PREFIX) and not seen.drain
        if action.kind in ("drain", "reason"):
            assert seen.drain and action.reason.startswith(PREFIX + " ")
    # idempotent: once Slurm shows the updates, the next pass has nothing to do
    after = dict(by_name)
    for action in d.actions:
        after[action.slurm_node] = _simulate(after[action.slurm_node], action)
    again = decide(bodies, after, now_ns=NOW_NS, prefix=PREFIX, set_extra=set_extra, slurm_name=lambda n: n)
    assert again.actions == []


# -- rate limit and notices -----------------------------------------------------------------------

def test_the_budget_allows_n_updates_in_any_minute():
    budget = UpdateBudget(3)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 3.0, 59.9)] == [True, True, True, False, False]
    assert budget.take(60.0)  # the first one left the window
    assert not budget.take(60.5) and budget.used(60.5) == 3
    assert budget.take(61.0) and budget.take(62.0)
    with pytest.raises(ValueError, match="at least 1"):
        UpdateBudget(0)


def core(**kw) -> SyncCore:
    kw.setdefault("max_per_minute", 2)
    return SyncCore(prefix=PREFIX, set_extra=kw.pop("set_extra", False), slurm_name=lambda n: n, **kw)


def test_the_rate_limit_defers_the_rest_drains_first_and_nothing_is_lost():
    c = core(max_per_minute=2)
    bodies = {n: throttle(n, advice="drain") for n in ("a", "b", "c")}
    bodies["r"] = throttle("r")
    nodes = {n: snode(n) for n in ("a", "b", "c")} | {"r": snode("r", "IDLE", "DRAIN", reason="agentd: x")}
    step = c.step(bodies, nodes, now_ns=NOW_NS, monotonic=0.0)
    assert [a.slurm_node for a in step.run] == ["a", "b"]
    assert [(a.kind, a.slurm_node) for a in step.deferred] == [("drain", "c"), ("resume", "r")]
    for a in step.run:
        nodes[a.slurm_node] = _simulate(nodes[a.slurm_node], a)
    step = c.step(bodies, nodes, now_ns=NOW_NS, monotonic=30.0)
    assert step.run == [] and len(step.deferred) == 2  # the window is still full
    step = c.step(bodies, nodes, now_ns=NOW_NS, monotonic=60.0)
    assert [(a.kind, a.slurm_node) for a in step.run] == [("drain", "c"), ("resume", "r")]
    assert c.deferred_total == 4


def test_a_dry_run_spends_no_budget():
    c = core(max_per_minute=1)
    bodies = {n: throttle(n, advice="drain") for n in ("a", "b")}
    nodes = {n: snode(n) for n in ("a", "b")}
    assert len(c.step(bodies, nodes, now_ns=NOW_NS, monotonic=0.0, spend=False).run) == 2
    assert len(c.step(bodies, nodes, now_ns=NOW_NS, monotonic=0.0).run) == 1


def test_a_notice_is_reported_once_while_it_lasts_and_its_end_is_reported():
    c = core()
    stale = {"a": throttle("a", now_ns=NOW_NS - 100 * 10**9)}
    nodes = {"a": snode("a")}
    first = c.step(stale, nodes, now_ns=NOW_NS, monotonic=0.0)
    assert [(n.event, n.node) for n in first.notices] == [("throttle_expired", "a")]
    assert c.step(stale, nodes, now_ns=NOW_NS, monotonic=1.0).notices == []
    fresh = c.step({"a": throttle("a")}, nodes, now_ns=NOW_NS, monotonic=2.0)
    assert fresh.notices == [] and fresh.cleared == [("a", "throttle_expired")]


def test_a_notice_whose_detail_changes_is_reported_again():
    c = core()
    nodes = {"a": snode("a")}
    assert len(c.step({"a": "error one"}, nodes, now_ns=NOW_NS, monotonic=0.0).notices) == 1
    assert c.step({"a": "error one"}, nodes, now_ns=NOW_NS, monotonic=1.0).notices == []
    assert len(c.step({"a": "error two"}, nodes, now_ns=NOW_NS, monotonic=2.0).notices) == 1
