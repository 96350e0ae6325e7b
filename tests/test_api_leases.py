"""Cap leases (PUT/DELETE /v1/caps/{id}) on the running daemon and in the lease table: they
compose with the rules (the lowest wins), clamp to the GPU's limits, follow a job's GPUs,
expire on the injected clock and survive a restart through the state directory."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from agentd.api.leases import CAPS_FILE, LeaseTable
from agentd.api.models import CapLease, CapLeaseRequest
from agentd.clock import FakeClock
from collectors.sim import SimBackend
from tests.api_harness import SITE_CAP, live_daemon, make_cfg
from tests.proc_tree import ProcTree, v2_slurm



def rule_cfg(tmp_path, **over):
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir(exist_ok=True)
    (rules_d / "site.yaml").write_text(SITE_CAP)
    return make_cfg(tmp_path, rules={"builtin_packs": False, "dirs": [str(rules_d)]}, **over)


async def test_a_lease_caps_its_gpus_from_the_next_tick_and_the_reply_says_so(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        status, body = await live.put("/v1/caps/sched-1", {"watts": 400, "ttl_s": 300, "gpus": [0, 1],
                                                           "reason": "job 12 over its share"})
        assert status == 201
        reply = CapLease.model_validate(body)
        assert (reply.watts, reply.scope, reply.gpus, reply.in_scope) == (400.0, "gpus", [0, 1], [0, 1])
        assert reply.expires_at == "2026-01-01T00:05:01.000Z"  # put at t=1 s, for 300 s
        assert [(g.index, g.clamped_w, g.clamped, g.target_w, g.enforced_w, g.binding) for g in reply.per_gpu] == [
            (0, 400.0, False, 700.0, 700.0, False), (1, 400.0, False, 700.0, 700.0, False)]  # the last tick's
        await live.tick(2)
        assert live.targets() == {0: 400.0, 1: 400.0, 2: 700.0, 3: 700.0}
        assert live.backend.limits_w() == {0: 400.0, 1: 400.0, 2: 700.0, 3: 700.0}
        _, body = await live.get("/v1/caps/sched-1")
        assert [(g["target_w"], g["enforced_w"], g["binding"]) for g in body["per_gpu"]] == [(400.0, 400.0, True)] * 2
        _, throttle = await live.get("/v1/throttle")
        assert (throttle["state"], throttle["level"], throttle["accept_new_work"]) == ("throttled", 2, True)
        (reason,) = throttle["reasons"]
        assert (reason["kind"], reason["source"], reason["level"]) == ("lease", "lease:sched-1", 2)
        assert "job 12 over its share" in reason["message"]
        assert [g["source"] for g in throttle["gpus"]] == ["lease:sched-1"] * 2 + ["baseline"] * 2
        status, again = await live.put("/v1/caps/sched-1", {"watts": 500, "ttl_s": 60, "gpus": [0, 1]})
        assert status == 200 and again["created_at"] == reply.created_at != again["renewed_at"]


async def test_leases_compose_with_a_rule_cap_and_the_lowest_wins(tmp_path):
    async with live_daemon(rule_cfg(tmp_path)) as live:
        await live.tick()
        assert live.targets() == dict.fromkeys(range(4), 450.0)
        assert (await live.put("/v1/caps/high", {"watts": 600, "ttl_s": 300}))[0] == 201  # above the rule's
        assert (await live.put("/v1/caps/low", {"watts": 300, "ttl_s": 300, "gpus": [2]}))[0] == 201
        await live.tick()
        assert live.targets() == {0: 450.0, 1: 450.0, 2: 300.0, 3: 450.0}
        _, throttle = await live.get("/v1/throttle")
        assert [g["source"] for g in throttle["gpus"]] == ["rule:site_cap"] * 2 + ["lease:low", "rule:site_cap"]
        levels = {r["source"]: r["level"] for r in throttle["reasons"]}
        assert levels == {"rule:site_cap": 2, "lease:low": 2, "lease:high": 0}  # high binds no GPU
        _, caps = await live.get("/v1/caps")
        assert [(c["id"], [g["binding"] for g in c["per_gpu"]]) for c in caps["leases"]] == [
            ("high", [False] * 4), ("low", [True])]


async def test_a_lease_below_a_gpus_minimum_is_accepted_and_clamped(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        status, body = await live.put("/v1/caps/floor", {"watts": 50, "ttl_s": 60})
        assert status == 201 and body["watts"] == 50.0
        assert all(g["clamped"] and g["clamped_w"] == 200.0 and g["min_w"] == 200.0 for g in body["per_gpu"])
        assert "clamped" in body["note"]
        await live.tick()
        assert live.targets() == dict.fromkeys(range(4), 200.0)  # the simulated H200's minimum


async def test_a_lease_expires_on_the_clock_and_the_gpus_rise_back_at_the_ramp(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        assert (await live.put("/v1/caps/short", {"watts": 400, "ttl_s": 10}))[0] == 201
        await live.tick(9)  # the lease was put at t=1 s; ticks at 1..9 s
        assert live.targets() == dict.fromkeys(range(4), 400.0)
        with capture_logs() as logs:
            await live.tick()  # t=10 s: still live (expires at 11 s)
            await live.tick()  # t=11 s: expired
        assert [e["lease"] for e in logs if e["event"] == "cap_lease_expired"] == ["short"]
        assert live.targets() == dict.fromkeys(range(4), 400.0)  # released: the ramp holds 30 s first
        assert (await live.get("/v1/caps/short"))[0] == 404
        await live.tick(25)  # t=36 s: the hold (30 s since the cap fell at 1 s) is over, rising
        assert all(400.0 < t < 700.0 for t in live.targets().values())  # jittered ~25 W/s
        _, throttle = await live.get("/v1/throttle")
        assert throttle["state"] == "throttled" and not throttle["reasons"]  # the ramp: no reason, source ramp
        assert {g["source"] for g in throttle["gpus"]} == {"ramp"}
        await live.tick(20)
        assert live.targets() == dict.fromkeys(range(4), 700.0)
        assert (await live.get("/v1/throttle"))[1]["state"] == "ok"


async def test_delete_removes_a_lease_and_a_second_delete_is_404(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        await live.put("/v1/caps/x", {"watts": 300, "ttl_s": 60})
        await live.tick()
        assert (await live.delete("/v1/caps/x"))[0] == 204
        assert json.loads((tmp_path / CAPS_FILE).read_text())["leases"] == []
        status, body = await live.delete("/v1/caps/x")
        assert status == 404 and body["error"] == "not_found" and "'x'" in body["detail"]
        await live.tick(40)
        assert all(t > 300.0 for t in live.targets().values())


async def test_leases_survive_a_restart_with_their_wall_clock_expiry(tmp_path):
    clock = FakeClock()
    cfg = make_cfg(tmp_path)
    async with live_daemon(cfg, clock=clock) as live:
        await live.tick()
        _, kept = await live.put("/v1/caps/kept", {"watts": 350, "ttl_s": 120, "gpus": [3], "reason": "r"})
        await live.put("/v1/caps/brief", {"watts": 300, "ttl_s": 5})
        await live.tick()
        assert live.targets()[3] == 300.0
    clock.advance(20.0)  # down for 20 s: "brief" lapsed meanwhile, "kept" has 100 s left
    async with live_daemon(cfg, clock=clock, backend=SimBackend(gpus=4)) as live:
        assert sorted(live.daemon.api.leases.leases) == ["kept"]
        await live.tick()
        assert live.targets() == {0: 700.0, 1: 700.0, 2: 700.0, 3: 350.0}
        _, again = await live.get("/v1/caps/kept")
        assert (again["expires_at"], again["created_at"], again["reason"]) == (
            kept["expires_at"], kept["created_at"], "r")
        await live.tick(98)  # ticks at 23..120 s: put at 1 s for 120 s on the wall clock, whatever the restart
        assert live.targets()[3] == 350.0
        await live.tick()  # 121 s: expired
        assert (await live.get("/v1/caps/kept"))[0] == 404


async def test_a_job_lease_follows_the_jobs_gpus(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(4242, v2_slurm("777"))

    class WithPids(SimBackend):
        pids: dict[int, tuple[int, ...]] = {2: (4242,), 3: (4242,)}

        def sample(self, ts_ns):
            out = super().sample(ts_ns)
            for s in out:
                s.pids = self.pids.get(s.index, ())
            return out

    backend = WithPids(gpus=4)
    cfg = make_cfg(tmp_path, jobs={"proc_root": str(tmp_path / "proc")})
    async with live_daemon(cfg, backend=backend) as live:
        await live.tick()
        status, body = await live.put("/v1/caps/job", {"watts": 250, "ttl_s": 300, "job": "777"})
        assert status == 201 and body["scope"] == "job" and body["in_scope"] == [2, 3]
        await live.tick()
        assert live.targets() == {0: 700.0, 1: 700.0, 2: 250.0, 3: 250.0}
        _, throttle = await live.get("/v1/throttle")
        (job,) = throttle["jobs"]
        assert (job["job_id"], job["gpus"], job["kind"]) == ("777", [2, 3], "slurm")
        assert job["throttle_fraction"] == pytest.approx(1 - 250 / 700, abs=1e-3)
        backend.pids = {0: (4242,)}  # the job moved to GPU 0
        await live.tick()
        await live.tick()
        assert live.targets()[0] == 250.0
        assert (await live.put("/v1/jobs/777", {"class": "high"}))[1]["gpus"] == [0]


async def test_a_node_without_the_controller_refuses_leases_with_the_reason(tmp_path):
    async with live_daemon(make_cfg(tmp_path, rules={"enabled": False})) as live:
        await live.tick()
        status, body = await live.put("/v1/caps/x", {"watts": 300, "ttl_s": 60})
        assert status == 409 and body["error"] == "caps_not_enforced" and "rules.enabled" in body["detail"]
        assert not live.daemon.api.leases.leases and not (tmp_path / CAPS_FILE).exists()


async def test_a_lease_that_cannot_be_saved_is_503_and_changes_nothing(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        (tmp_path / (CAPS_FILE + ".tmp")).mkdir()  # the temporary file cannot be created
        with capture_logs() as logs:
            status, body = await live.put("/v1/caps/x", {"watts": 300, "ttl_s": 60})
        assert status == 503 and body["error"] == "storage_failed" and "nothing was changed" in body["detail"]
        assert [e for e in logs if e["event"] == "cap_leases_not_saved"]
        await live.tick()
        assert not live.daemon.api.leases.leases and live.targets() == dict.fromkeys(range(4), 700.0)


# -- the table alone ----------------------------------------------------------------------


def req(**kw):
    return CapLeaseRequest.model_validate({"watts": 300.0, "ttl_s": 60.0} | kw)


def test_the_table_is_bounded_and_expired_leases_make_room(tmp_path):
    table = LeaseTable(tmp_path / CAPS_FILE, max_leases=2)
    for i in range(2):
        new, _, _ = table.prepare_put(f"l{i}", req(ttl_s=10.0 + i), 0.0, 0)
        table.commit(new)
    with pytest.raises(Exception) as err:
        table.prepare_put("l2", req(), 0.0, 0)
    assert err.value.status == 409 and "the most it takes" in err.value.detail
    new, lease, created = table.prepare_put("l2", req(), 10.5, 0)  # l0 has expired: its slot is free
    assert created and sorted(new) == ["l1", "l2"]


def test_a_damaged_caps_file_is_set_aside_and_logged(tmp_path):
    path = tmp_path / CAPS_FILE
    path.write_text("{not json")
    table = LeaseTable(path)
    with capture_logs() as logs:
        table.load(0.0, 0)
    assert not table.leases and (tmp_path / (CAPS_FILE + ".corrupt")).read_text() == "{not json"
    assert [e for e in logs if e["event"] == "cap_leases_damaged" and e["log_level"] == "error"]


def test_a_bad_entry_in_the_file_is_skipped_and_the_others_load(tmp_path):
    path = tmp_path / CAPS_FILE
    good = {"id": "ok", "watts": 300.0, "ttl_s": 60.0, "gpus": None, "job": None, "reason": "",
            "created_at_ns": 0, "renewed_at_ns": 0, "expires_at_ns": 60 * 10**9}
    path.write_text(json.dumps({"version": 1, "leases": [good, dict(good, id="bad", watts=-1)]}))
    table = LeaseTable(path)
    table.load(100.0, 10 * 10**9)
    assert list(table.leases) == ["ok"] and table.leases["ok"].expires_mono == pytest.approx(150.0)
