"""``agentd status`` against the real daemon's API (simulated GPUs, a real socket, fake clock)."""

from __future__ import annotations

import asyncio
import json

from click.testing import CliRunner

from agentd.cli import main
from tests.api_harness import live_daemon, make_cfg, token_file


async def _status(*args: str) -> tuple[int, str, str]:
    """The command on a thread: it runs its own event loop while the test's serves the API."""
    result = await asyncio.to_thread(CliRunner().invoke, main, ["status", *args])
    return result.exit_code, result.stdout, result.stderr


async def test_status_shows_the_throttle_state_gpus_rules_and_the_store(tmp_path):
    async with live_daemon(make_cfg(tmp_path, gpus=2)) as live:
        await live.tick(3)
        status, _ = await live.put("/v1/caps/op-1", {"watts": 300, "ttl_s": 600, "gpus": [1],
                                                      "reason": "burn-in rack 7"})
        assert status == 201  # created
        await live.tick(40)  # the ramp takes the GPU down to the lease
        node = f"http://127.0.0.1:{live.server.port}"
        code, out, err = await _status("--node", node)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("n1 (site default): THROTTLED (level 2), accepts new work: yes")
        assert any("lease lease:op-1" in ln and "burn-in rack 7" in ln for ln in lines)
        gpu1 = next(ln for ln in lines if ln.strip().startswith("1 "))
        assert "300 W" in gpu1 and "lease:op-1" in gpu1
        backlog = live.daemon.store.backlog()
        assert any(ln.startswith(f"store backlog {backlog} points") for ln in lines), out
        assert any(ln.startswith(f"ticks {live.daemon.stats.ticks} (missed 0)") for ln in lines), out

        code, out, err = await _status("--node", node, "--json")
        assert code == 0, err
        bodies = json.loads(out)
        assert set(bodies) == {"throttle", "gpus", "rules", "agent"}
        assert bodies["throttle"]["state"] == "throttled"
        assert bodies["agent"]["store_backlog"] == backlog and bodies["agent"]["forward"] is None


async def test_status_without_a_daemon_says_where_it_looked_and_exits_1(tmp_path):
    code, out, err = await _status("--node", "http://127.0.0.1:9", "--timeout", "2")
    assert code == 1 and out == ""
    assert "cannot read http://127.0.0.1:9/v1/throttle" in err and "is agentd running" in err
    code, _, err = await _status("--node", "ftp://x")
    assert code == 2 and "expected http://HOST:PORT or unix:/path/to/api.sock" in err


async def test_status_needs_the_token_when_reads_are_protected(tmp_path):
    token = token_file(tmp_path)
    cfg = make_cfg(tmp_path, gpus=1, api={"token_file": str(token), "auth_reads": True})
    async with live_daemon(cfg) as live:
        await live.tick(2)
        node = f"http://127.0.0.1:{live.server.port}"
        code, _, err = await _status("--node", node)
        assert code == 1 and "HTTP 401" in err and "pass --token-file" in err
        assert token.read_text().strip() not in err  # the token is never echoed
        code, out, err = await _status("--node", node, "--token-file", str(token))
        assert code == 0 and out.startswith("n1 (site default): OK (level 0)"), err
