"""The throttle API on the running daemon (simulator backend, fake clock, a real socket): each
endpoint's shape, every kind of bad input and what it must not change, tokens, readiness."""

from __future__ import annotations

import json

import aiohttp
import pytest
from structlog.testing import capture_logs

from agentd.api import models
from tests.api_harness import TOKEN, live_daemon, make_cfg, token_file

SHAPES = {"/v1/throttle": models.Throttle, "/v1/gpus": models.Gpus, "/v1/coolant": models.Coolant,
          "/v1/rules": models.Rules, "/v1/events": models.Events, "/v1/caps": models.CapLeases,
          "/v1/agent": models.Agent, "/healthz": models.Health, "/readyz": models.Ready}


async def test_every_read_endpoint_answers_its_documented_shape(tmp_path):
    async with live_daemon(make_cfg(tmp_path, coolant=True)) as live:
        await live.tick(5)
        for path, model in SHAPES.items():
            status, body = await live.get(path)
            assert status == 200, (path, body)
            model.model_validate(body)  # strict: extra="forbid" on every body
        _, throttle = await live.get("/v1/throttle")
        assert throttle["version"] == 1 and throttle["node"] == "n1" and throttle["site"] == "default"
        assert (throttle["level"], throttle["state"], throttle["accept_new_work"]) == (0, "ok", True)
        assert [g["index"] for g in throttle["gpus"]] == [0, 1, 2, 3]
        assert throttle["gpus"][0]["baseline_w"] == 700.0 and throttle["gpus"][0]["source"] == "baseline"
        assert throttle["draw_w"] == pytest.approx(sum(g["power_w"] for g in throttle["gpus"]), abs=0.5)
        assert throttle["recommendations"]["slurm"] == {"state": "RESUME", "reason": "agentd: ok",
                                                        "extra": {"agentd_level": 0}}
        assert throttle["recommendations"]["kubernetes"]["taint"] == {"key": "agentd.io/throttle", "value": "ok",
                                                                      "effect": None}
        _, coolant = await live.get("/v1/coolant")
        assert coolant["fed"] and {lp["loop"] for lp in coolant["loops"]} == {"facility", "tcs"}
        assert coolant["sensors_total"] == len(coolant["sensors"]) > 0
        _, rules = await live.get("/v1/rules")
        assert {"tcs_supply_hot", "leak_critical", "gpu_near_slowdown"} <= {r["name"] for r in rules["rules"]}
        status, text = await live.get("/v1/openapi.json")
        assert status == 200 and text["openapi"] == "3.1.0"
        async with live.http.get("/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            exposition = await r.text()
        assert exposition.count('agentd_gpu_power_watts{') == 4 and "agentd_throttle_level 0.0" in exposition


async def test_age_s_grows_with_the_clock_and_expires_at_is_after_the_republish_period(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        live.clock.advance(1.5)  # between ticks: the snapshot ages, nothing is rebuilt
        _, body = await live.get("/v1/throttle")
        assert body["age_s"] == pytest.approx(2.5)  # tick() advanced one interval after the tick
        assert body["generated_at"] == "2026-01-01T00:00:00.000Z"
        assert body["expires_at"] == "2026-01-01T00:00:33.000Z"  # publish_every_s 30 + 3 ticks


async def test_reads_before_the_first_tick_are_503_and_readyz_says_why(tmp_path):
    async with live_daemon(make_cfg(tmp_path), start=False) as live:
        for path in ("/v1/throttle", "/v1/gpus", "/v1/events", "/metrics"):
            status, body = await live.get(path)
            assert status == 503 and body["error"] == "not_ready", path
        status, body = await live.get("/readyz")
        assert status == 503 and body == {"ready": False, "detail": "no tick has completed yet", "first_tick": False,
                                          "telemetry_age_s": None, "stale_after_s": 3.0}
        status, body = await live.get("/healthz")
        assert status == 200 and body["ticks"] == 0 and body["last_tick_age_s"] is None


async def test_readyz_turns_false_when_gpu_telemetry_goes_stale(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        assert (await live.get("/readyz"))[0] == 200
        live.clock.advance(2.0)  # 3 s since the reading: at the bound, still fresh
        assert (await live.get("/readyz"))[0] == 200
        live.clock.advance(0.5)
        status, body = await live.get("/readyz")
        assert status == 503 and not body["ready"] and "3.5 s old" in body["detail"]
        live.backend.sample = lambda ts_ns: (_ for _ in ()).throw(RuntimeError("driver bug"))  # ticks, no readings
        await live.tick()
        status, body = await live.get("/readyz")
        assert status == 503 and body["telemetry_age_s"] == 4.5  # 3.5 s + the interval tick() moved on
        _, throttle = await live.get("/v1/throttle")
        assert throttle["state"] == "degraded"
        assert [r["source"] for r in throttle["reasons"] if r["kind"] == "stale"] == ["gpu"]


# -- errors ----------------------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_json_404_and_405(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        status, body = await live.get("/v2/throttle")
        assert status == 404 and body["error"] == "not_found" and "/v2/throttle" in body["detail"]
        async with live.http.post("/v1/caps/x", json={"watts": 1, "ttl_s": 1}) as r:
            assert r.status == 405 and r.headers["Allow"] == "DELETE, GET, PUT"
            body = await r.json()
        assert body["error"] == "method_not_allowed" and "POST" in body["detail"]
        async with live.http.head("/v1/throttle") as r:
            assert r.status == 405


def _state(live):
    """What a refused request must leave as it was: the lease table, the file, the GPUs' targets."""
    path = live.daemon.api.leases.path
    return dict(live.daemon.api.leases.leases), path.read_bytes() if path.exists() else None, live.targets()


BAD_BODIES = [
    # (raw body, status, error code, words the detail must hold)
    (b'{"watts": 300, "ttl_s": 60', 400, "malformed_json", ["not valid JSON", "EOF"]),
    (b"", 400, "malformed_json", ["empty"]),
    (b"[300, 60]", 422, "invalid_body", ["must be a JSON object"]),
    (b'{"watts": "300", "ttl_s": 60}', 422, "invalid_body", ["watts:", "valid number", "'300'"]),
    (b'{"watts": true, "ttl_s": 60}', 422, "invalid_body", ["watts:"]),
    (b'{"watts": -5, "ttl_s": 60}', 422, "invalid_body", ["watts:", "greater than 0"]),
    (b'{"watts": NaN, "ttl_s": 60}', 422, "invalid_body", ["watts:", "finite"]),
    (b'{"watts": 300, "ttl_s": 1e9}', 422, "invalid_body", ["ttl_s:", "less than or equal to 604800"]),
    (b'{"watts": 300}', 422, "invalid_body", ["ttl_s: required"]),
    (b'{"watts": 300, "ttl_s": 60, "wats": 1}', 422, "invalid_body", ["wats: unknown field"]),
    (b'{"watts": 300, "ttl_s": 60, "gpus": [0], "job": "1"}', 422, "invalid_body", ["gpus and job"]),
    (b'{"watts": 300, "ttl_s": 60, "gpus": [1, 1]}', 422, "invalid_body", ["gpus:", "more than once"]),
    (b'{"watts": 300, "ttl_s": 60, "gpus": ["0"]}', 422, "invalid_body", ["gpus.0:"]),
    (b'{"watts": 300, "ttl_s": 60, "gpus": [9]}', 409, "unknown_gpu", ["gpus: GPU 9 is not on this node (its GPUs: "
                                                                      "0, 1, 2, 3)"]),
    (b'{"watts": 300, "ttl_s": 60, "job": "12 34"}', 422, "invalid_body", ["job: must be a job id"]),
    (b'{"watts": 300, "ttl_s": 60, "gpus": []}', 422, "invalid_body", ["gpus:", "at least 1"]),
    (b'{"watts": 300, "ttl_s": 60, "reason": "a\\nb"}', 422, "invalid_body", ["reason: must be one line"]),
    (b'{"watts": 300, "ttl_s": 60, "reason": "' + b"x" * 201 + b'"}', 422, "invalid_body", ["reason:", "200"]),
    (b"\xff\xfe", 400, "malformed_json", ["not valid JSON"]),
]


@pytest.mark.parametrize("raw,status,code,words", BAD_BODIES, ids=[b[0][:30].decode("latin-1") for b in BAD_BODIES])
async def test_a_bad_lease_body_is_a_4xx_naming_the_field_and_changes_nothing(tmp_path, raw, status, code, words):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        assert (await live.put("/v1/caps/keep", {"watts": 500, "ttl_s": 600}))[0] == 201
        await live.tick()
        before = _state(live)
        got, body = await live.put("/v1/caps/new", raw=raw)
        assert (got, body["error"]) == (status, code), body
        for word in words:
            assert word in body["detail"], (word, body["detail"])
        await live.tick()
        assert _state(live) == before


async def test_an_oversized_body_is_413_and_changes_nothing(tmp_path):
    cfg = make_cfg(tmp_path, api={"max_body_bytes": 2048})
    async with live_daemon(cfg) as live:
        await live.tick()
        before = _state(live)
        body = {"watts": 300, "ttl_s": 60, "reason": "x" * 4000}
        status, answer = await live.put("/v1/caps/big", body)
        assert status == 413 and answer["error"] == "body_too_large" and "2048" in answer["detail"]

        async def chunks():  # no Content-Length: caught while reading
            yield b'{"watts": 300, "ttl_s": 60, "reason": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        async with live.http.put("/v1/caps/big", data=chunks()) as r:
            assert r.status == 413 and (await r.json())["error"] == "body_too_large"
        await live.tick()
        assert _state(live) == before


BAD_PARAMS = [
    ("/v1/caps/" + "a" * 65, "lease_id:"), ("/v1/caps/-x", "lease_id:"), ("/v1/caps/a%20b", "lease_id:"),
    ("/v1/events?since=yesterday", "since:"), ("/v1/events?limit=0", "limit:"), ("/v1/events?limit=x", "limit:"),
    ("/v1/events?after_seq=-1", "after_seq:"), ("/v1/events?since=1e400", "since:"),
]


@pytest.mark.parametrize("path,word", BAD_PARAMS)
async def test_a_bad_parameter_is_400_naming_it(tmp_path, path, word):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        status, body = await live.get(path)
        assert status == 400 and body["error"] == "bad_parameter" and body["detail"].startswith(word), body


async def test_a_handler_bug_is_a_logged_json_500_and_the_daemon_goes_on(tmp_path, monkeypatch):
    from agentd.api.snapshot import Snapshot

    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        good = Snapshot.body

        def broken(self, name):
            raise RuntimeError("a bug")

        monkeypatch.setattr(Snapshot, "body", broken)
        with capture_logs() as logs:
            status, body = await live.get("/v1/gpus")
        assert status == 500 and body["error"] == "internal_error"
        assert [e for e in logs if e["event"] == "api_handler_failed" and e["path"] == "/v1/gpus"]
        await live.tick()
        assert live.daemon.stats.ticks == 2
        monkeypatch.setattr(Snapshot, "body", good)
        assert (await live.get("/v1/gpus"))[0] == 200


# -- tokens ----------------------------------------------------------------------------------


async def test_with_a_token_writes_need_it_and_a_wrong_one_is_401_never_echoed(tmp_path):
    cfg = make_cfg(tmp_path, api={"token_file": str(token_file(tmp_path))})
    async with live_daemon(cfg) as live:
        await live.tick()
        lease = {"watts": 400, "ttl_s": 60}
        wrong = "Bearer not-the-token-but-long-enough"
        for headers in ({}, {"Authorization": wrong}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            with capture_logs() as logs:
                status, body = await live.put("/v1/caps/a", lease, headers=headers)
            assert status == 401 and body["error"] == "unauthorized"
            assert "not-the-token" not in json.dumps(body) and TOKEN not in json.dumps(body)
            assert TOKEN not in repr(logs) and "not-the-token" not in repr(logs)
        assert not live.daemon.api.leases.leases
        status, _ = await live.delete("/v1/caps/a")
        assert status == 401
        status, _ = await live.put("/v1/jobs/1234", {"class": "high"})
        assert status == 401
        assert (await live.get("/v1/throttle"))[0] == 200  # reads stay open without auth_reads
        with capture_logs() as logs:
            status, body = await live.put("/v1/caps/a", lease, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 201 and TOKEN not in repr(logs)
        async with live.http.put("/v1/caps/b", json=lease) as r:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_auth_reads_protects_reads_but_not_the_probes(tmp_path):
    cfg = make_cfg(tmp_path, api={"token_file": str(token_file(tmp_path)), "auth_reads": True})
    async with live_daemon(cfg) as live:
        await live.tick()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/v1/throttle", "/v1/gpus", "/v1/caps", "/metrics"):
            assert (await live.get(path))[0] == 401, path
        assert (await live.get("/v1/throttle", headers=auth))[0] == 200
        assert (await live.get("/healthz"))[0] == 200 and (await live.get("/readyz"))[0] == 200


async def test_the_unix_socket_serves_the_same_api(tmp_path):
    sock = tmp_path / "api.sock"
    async with live_daemon(make_cfg(tmp_path, api={"unix_socket": str(sock)})) as live:
        await live.tick()
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get("http://agentd/v1/throttle") as r:
                assert r.status == 200 and (await r.json())["node"] == "n1"
    assert not sock.exists()  # removed at stop


async def test_an_address_in_use_stops_the_start_with_the_key_named(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        from agentd.api.server import start_api

        taken = make_cfg(tmp_path / "b", api={"listen": f"127.0.0.1:{live.server.port}"})
        with pytest.raises(OSError, match=r"api.listen: cannot listen on 127.0.0.1:\d+: .*set api.listen"):
            await start_api(live.daemon.api, taken.api, None)


# -- jobs ------------------------------------------------------------------------------------


async def test_a_job_hint_reaches_the_job_tracker_and_bad_ones_are_refused(tmp_path):
    async with live_daemon(make_cfg(tmp_path)) as live:
        await live.tick()
        status, body = await live.put("/v1/jobs/1234", {"class": "high"})
        assert status == 200 and body == {"job_id": "1234", "class": "high", "gpus": [], "priority": None}
        assert live.daemon.jobs.classes.hints() == {"1234": "high"}
        # slurm-sync's body: the class decides, Slurm's priority number is echoed
        status, body = await live.put("/v1/jobs/1234", {"class": "high", "priority": 4294901659})
        assert status == 200 and body["priority"] == 4294901659
        for raw, code, word in ((b'{"class": "low", "priority": -1}', 422, "priority:"),
                                (b'{"class": "low", "priority": "9"}', 422, "priority:"),
                                (b'{"class": "urgent"}', 422, "class:"), (b'{"class": "idle"}', 422, "class:"),
                                (b"{}", 422, "class: required"), (b'{"class": 1}', 422, "class:"),
                                (b'{"klass": "low"}', 422, "klass: unknown field")):
            status, body = await live.put("/v1/jobs/1234", raw=raw)
            assert status == code and word in body["detail"], body
        status, body = await live.put("/v1/jobs/%20x", {"class": "low"})
        assert status == 400 and body["detail"].startswith("job_id:")
        assert live.daemon.jobs.classes.hints() == {"1234": "high"}  # the refused ones changed nothing
        assert (await live.delete("/v1/jobs/1234"))[0] == 204
        assert live.daemon.jobs.classes.hints() == {}
        status, body = await live.delete("/v1/jobs/1234")
        assert status == 404 and body["error"] == "not_found"


# -- events ----------------------------------------------------------------------------------


async def test_events_carry_wall_time_and_since_and_after_seq_select_them(tmp_path):
    cfg = make_cfg(tmp_path, sim={"gpus": 2, "coolant_supply_c": 60.0})  # hot water: thermal rules move
    async with live_daemon(cfg) as live:
        await live.tick(40)
        _, body = await live.get("/v1/events")
        events = body["events"]
        assert events and [e["seq"] for e in events] == list(range(1, len(events) + 1))
        recorded = list(live.daemon.recent_events)
        assert [(e["rule"], e["gpu"], e["to_state"], e["ts_ns"]) for e in events] == [
            (e.rule, e.gpu, e.to_state, e.ts_ns) for e in recorded]
        offset_ns = live.clock.wall_ns() - round(live.clock.monotonic() * 1e9)  # the fake clock's wall - mono
        assert all(e["ts_ns"] == round(r.at * 1e9) + offset_ns for e, r in zip(events, recorded))  # the tick's time
        assert events[0]["ts"].startswith("2026-01-01T00:00:") and events[0]["ts"].endswith(".000Z")
        cut = events[len(events) // 2]
        _, later = await live.get(f"/v1/events?since={cut['ts']}")
        assert later["events"] and all(e["ts_ns"] > cut["ts_ns"] for e in later["events"])
        assert [e["seq"] for e in later["events"]] == [e["seq"] for e in events if e["ts_ns"] > cut["ts_ns"]]
        _, unix = await live.get(f"/v1/events?since={cut['ts_ns'] / 1e9}")
        assert unix["events"] == later["events"]
        _, page = await live.get(f"/v1/events?after_seq={cut['seq']}&limit=1")
        assert [e["seq"] for e in page["events"]] == [cut["seq"] + 1]
