"""The throttle state through closed-loop scenarios (simulated GPUs + CDU, the shipped packs, the
fake clock), as a scheduler polling GET /v1/throttle sees it: hot coolant -> throttled and back
to ok; a leak -> no new work, then drain; recovery -> ok."""

from __future__ import annotations

from tests.api_harness import live_daemon, make_cfg

# A W32-class site (TCS supply limit 35 C) and this CDU's rated flow, as tests/test_scenarios.py.
SITE = {"params": {"tcs_supply_max_c": 35, "tcs_flow_rated_lpm": 140}}


def runs(states: list[str]) -> list[str]:
    """The states in order, repeats collapsed."""
    return [s for k, s in enumerate(states) if k == 0 or states[k - 1] != s]


async def walk(live, seconds: int, check_every: int = 0) -> list[dict]:
    """Tick for ``seconds`` and return the throttle body of every tick (from the snapshot; every
    ``check_every`` ticks also over HTTP, which must serve the same body)."""
    out = []
    for k in range(seconds):
        await live.tick()
        body = live.daemon.api.snapshot.throttle.model_dump(by_alias=True)
        if check_every and k % check_every == 0:
            _, served = await live.get("/v1/throttle")
            served.pop("age_s")
            body_no_age = dict(body)
            body_no_age.pop("age_s")
            assert served == body_no_age
        out.append(body)
    return out


async def test_hot_coolant_throttles_the_node_and_it_comes_back_to_ok(tmp_path):
    # tcs_supply_critical kept out of reach: this walk is about the warning cap alone
    rules = {"params": SITE["params"] | {"tcs_supply_critical_over_c": 30}}
    cfg = make_cfg(tmp_path, gpus=2, coolant=True, rules=rules)
    async with live_daemon(cfg, faults=["hot_facility@60+300"]) as live:
        bodies = await walk(live, 900, check_every=50)
    assert runs([b["state"] for b in bodies]) == ["ok", "throttled", "ok"]
    hot = [b for b in bodies if b["state"] == "throttled" and b["reasons"]]
    assert hot and all(b["accept_new_work"] and b["level"] == 2 for b in bodies if b["state"] == "throttled")
    reason = hot[0]["reasons"][0]
    assert (reason["kind"], reason["rule"], reason["action"], reason["threshold"]) == (
        "rule", "tcs_supply_hot", "cap_gpu", "tcs_supply_max_c=35")
    assert float(reason["value"]) > 35
    assert {g["source"] for g in hot[0]["gpus"]} == {"rule:tcs_supply_hot"}
    assert all(g["target_w"] == 560.0 for g in hot[0]["gpus"])  # 0.8 x 700 W
    # after the fault and the hysteresis the ramp brings the GPUs back: throttled with no reason
    rising = [b for b in bodies if b["state"] == "throttled" and not b["reasons"]]
    assert rising and {g["source"] for g in rising[0]["gpus"]} == {"ramp"}
    assert bodies[-1]["recommendations"]["slurm"]["state"] == "RESUME"


async def test_a_leak_stops_new_work_then_drains_and_recovery_resumes(tmp_path):
    # eight GPUs as in tests/test_scenarios.py: with fewer, the CDU's pump slows with the light load
    # and tcs_flow_low joins in, which is another walk
    cfg = make_cfg(tmp_path, gpus=8, coolant=True, rules=SITE)
    async with live_daemon(cfg, faults=["leak@30+60"]) as live:  # Warning for 30 s, then Critical for 30 s
        bodies = await walk(live, 730, check_every=40)
    advice = runs([b["advice"] for b in bodies])
    assert advice == ["none", "no_new_work", "drain", "none"]
    warning = next(b for b in bodies if b["advice"] == "no_new_work")
    assert warning["state"] == "throttled" and not warning["accept_new_work"]  # leak_warning caps and advises
    assert warning["recommendations"]["slurm"] == {"state": "DRAIN", "reason": "agentd: no_new_work: leak_warning",
                                                   "extra": {"agentd_level": 2}}
    assert warning["recommendations"]["kubernetes"]["taint"]["effect"] == "NoSchedule"
    drained = next(b for b in bodies if b["advice"] == "drain")
    # leak_critical is critical-severity: the worst (critical, 4) wins over drain (3)
    assert (drained["state"], drained["level"], drained["accept_new_work"]) == ("critical", 4, False)
    assert drained["reasons"][0]["rule"] == "leak_critical" and drained["reasons"][0]["advice"] == "drain"
    assert drained["recommendations"]["slurm"]["reason"].startswith("agentd: drain: leak_critical")
    assert drained["recommendations"]["kubernetes"]["taint"] == {"key": "agentd.io/throttle", "value": "critical",
                                                                 "effect": "NoExecute"}
    assert all(g["target_w"] == 200.0 for g in drained["gpus"])
    # leak_critical clears after 10 min of OK, then the ramp brings the GPUs back
    assert runs([b["state"] for b in bodies])[-1] == "ok"
    assert bodies[-1]["accept_new_work"] and bodies[-1]["recommendations"]["slurm"]["state"] == "RESUME"


async def test_a_drain_rule_of_warning_severity_puts_the_node_in_drain(tmp_path):
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "site.yaml").write_text("""rules:
  - name: site_leak_drain
    scope: coolant
    description: the site drains on any leak report
    when: coolant.leak == "Critical" or coolant.leak == "Warning"
    for: 0s
    clear_for: 30s
    severity: warning
    stale: ignore
    actions: [{type: advise, advice: drain}]
""")
    cfg = make_cfg(tmp_path, gpus=2, coolant=True, rules={"builtin_packs": False, "dirs": [str(rules_d)]})
    async with live_daemon(cfg, faults=["leak@10+20"]) as live:
        bodies = await walk(live, 120)
    assert runs([b["state"] for b in bodies]) == ["ok", "drain", "ok"]
    drained = next(b for b in bodies if b["state"] == "drain")
    assert (drained["level"], drained["advice"], drained["accept_new_work"]) == (3, "drain", False)
    assert drained["recommendations"]["slurm"]["reason"] == "agentd: drain: site_leak_drain"
    assert drained["reasons"][0]["threshold"] == "Critical"
