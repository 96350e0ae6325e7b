"""The forwarder and the writers: policy on fakes, then delivery to the real servers."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.config import InfluxConfig
from agentd.influx import (
    Forwarder, V1Writer, V2Writer, WriteFailed, WriteRejected, classify, first_bad_line, make_writer,
)
from agentd.lineproto import Point, encode
from agentd.store import Store
from tests.test_lineproto import documented_field_key, documented_string, documented_tag_value

REPO = Path(__file__).resolve().parents[1]


def now_ms_ns() -> int:
    """A recent timestamp on a whole millisecond (VictoriaMetrics keeps milliseconds)."""
    return (time.time_ns() // 1_000_000) * 1_000_000 - 600 * 10**9


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store.sqlite")
    yield s
    s.close()


def put(store: Store, ls: list[str]) -> None:
    store.append([(i, line) for i, line in enumerate(ls)])


class FakeWriter:
    """Records bodies; rejects bodies containing a marker; can fail or hang on demand."""

    def __init__(self, *, reject: str | None = None, status: int = 400, fail: WriteFailed | None = None) -> None:
        self.reject = reject
        self.status = status
        self.fail = fail
        self.bodies: list[str] = []
        self.hang: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def write(self, body: str) -> None:
        self.entered.set()
        if self.hang is not None:
            await self.hang.wait()
        if self.fail is not None:
            raise self.fail
        if self.reject is not None and self.reject in body:
            raise WriteRejected(self.status, f"partial write: unable to parse '{self.reject}': bad")
        self.bodies.append(body)

    async def close(self) -> None:
        pass

    def lines(self) -> list[str]:
        return [line for body in self.bodies for line in body.split("\n")]


async def drain(fwd: Forwarder, store: Store, timeout: float = 30.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    end = time.monotonic() + timeout
    try:
        while store.backlog() and time.monotonic() < end and not task.done():
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert store.backlog() == 0, f"not drained: {store.backlog()} left, last error {fwd.last_error}"


# -- policy, on fakes -------------------------------------------------------------------------

async def test_ships_everything_in_order_and_acks(store: Store) -> None:
    put(store, [f"m v={i}i {i}" for i in range(1234)])
    writer = FakeWriter()
    fwd = Forwarder(store, writer, batch_size=100)
    await drain(fwd, store)
    assert writer.lines() == [f"m v={i}i {i}" for i in range(1234)]
    assert [len(b.split("\n")) for b in writer.bodies][:2] == [100, 100]
    assert fwd.written == 1234 and fwd.write_errors == 0 and fwd.connected


class EdgeRng:
    """Stands in for random.Random: answers ``uniform(a, b)`` with one end of the range, and
    records every range asked for, so the backoff's ceilings can be read off exactly."""

    def __init__(self, end: str) -> None:
        self.end = end
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b if self.end == "high" else a


# base 0.5 s doubling per failure, capped at 4 s: what the docstring promises, written out
LADDER = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]


async def _delays(store: Store, rng: object, n: int = 12) -> tuple[Forwarder, list[float], list]:
    """Run a forwarder against a dead server until it has scheduled ``n`` retries."""
    delays: list[float] = []
    stop = asyncio.Event()

    async def fake_sleep(s: float) -> None:
        delays.append(s)
        if len(delays) == n:
            stop.set()

    fwd = Forwarder(store, FakeWriter(fail=WriteFailed("connection refused")), batch_size=10,
                    backoff_base=0.5, backoff_max=4.0, rng=rng, sleep=fake_sleep)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await asyncio.wait_for(fwd.run(stop), 5)
    return fwd, delays, logs


async def test_backoff_is_capped_exponential_with_full_jitter(store: Store) -> None:
    put(store, ["m v=1i 1", "m v=2i 2"])
    high = EdgeRng("high")
    fwd, delays, logs = await _delays(store, high)
    assert delays == LADDER  # the top of each range: doubling, then the cap
    assert high.ranges == [(0.0, c) for c in LADDER]  # full jitter: every range starts at 0
    assert fwd.backoffs == 12
    assert store.backlog() == 2 and fwd.written == 0  # nothing acked
    assert fwd.write_errors == 12 and not fwd.connected and "connection refused" in fwd.last_error
    # One warning for the outage, not one per retry.
    assert sum(1 for e in logs if e["log_level"] == "warning") == 1

    _, delays, _ = await _delays(store, EdgeRng("low"))
    assert delays == [0.0] * 12  # the bottom of each range

    _, delays, _ = await _delays(store, random.Random(7))
    assert all(0.0 <= d <= c for d, c in zip(delays, LADDER, strict=True))
    assert len(set(delays)) == 12  # jittered, not a fixed ladder


def test_backoff_delay_honours_retry_after(store: Store) -> None:
    fwd = Forwarder(store, FakeWriter(), backoff_base=0.1, backoff_max=10.0, rng=EdgeRng("low"))  # type: ignore[arg-type]
    assert fwd.backoff_delay(1, retry_after=3.0) == 3.0  # the server's wish beats a shorter draw
    assert fwd.backoff_delay(1, retry_after=300.0) == 10.0  # but not the cap
    fwd.rng = EdgeRng("high")  # type: ignore[assignment]
    assert fwd.backoff_delay(1, retry_after=0.01) == 0.1  # nor a longer draw
    assert fwd.backoff_delay(50) == fwd.backoff_delay(10_000) == 10.0  # capped, no overflow


async def test_recovers_after_failures(store: Store) -> None:
    put(store, [f"m v={i}i {i}" for i in range(10)])
    writer = FakeWriter(fail=WriteFailed("down"))

    async def fake_sleep(s: float) -> None:
        writer.fail = None  # the server comes back
        await asyncio.sleep(0)

    fwd = Forwarder(store, writer, sleep=fake_sleep)
    await drain(fwd, store, timeout=5)
    assert fwd.written == 10 and fwd.connected and fwd.write_errors == 1 and fwd.backoffs == 1


async def test_unexpected_writer_error_is_a_failed_write(store: Store) -> None:
    put(store, ["m v=1i 1"])
    delays: list[float] = []
    stop = asyncio.Event()

    class Buggy(FakeWriter):
        async def write(self, body: str) -> None:
            raise RuntimeError("bug")

    async def fake_sleep(s: float) -> None:
        delays.append(s)
        stop.set()

    fwd = Forwarder(store, Buggy(), sleep=fake_sleep)
    with capture_logs() as logs:
        await asyncio.wait_for(fwd.run(stop), 5)
    assert store.backlog() == 1 and len(delays) == 1 and "RuntimeError" in fwd.last_error
    assert any(e["log_level"] == "error" for e in logs)


def count_reads(store: Store) -> list[int]:
    """Count ``store.oldest`` calls (the forwarder's reads); the list's one item is the count."""
    calls = [0]
    real_oldest = store.oldest

    def counting_oldest(*a, **k):
        calls[0] += 1
        return real_oldest(*a, **k)

    store.oldest = counting_oldest  # type: ignore[method-assign]
    return calls


async def test_idle_store_is_read_once_per_poll_not_in_a_loop(store: Store) -> None:
    reads = count_reads(store)
    polls: list[float] = []
    stop = asyncio.Event()

    async def fake_sleep(s: float) -> None:  # each idle poll "lasts" its 5 s at once
        polls.append(s)
        if len(polls) == 3:
            stop.set()
        await asyncio.sleep(0)

    fwd = Forwarder(store, FakeWriter(), idle_poll_s=5.0, sleep=fake_sleep)
    await asyncio.wait_for(fwd.run(stop), 5)
    assert polls == [5.0, 5.0, 5.0] and reads[0] == 3  # one read per 5 s poll, nothing between
    assert fwd.backoffs == 0


async def test_wake_ships_promptly_without_waiting_for_the_poll(store: Store) -> None:
    reads = count_reads(store)
    idle = asyncio.Event()

    async def endless_poll(s: float) -> None:  # a poll that never comes: only wake() can help
        idle.set()
        await asyncio.Event().wait()

    writer = FakeWriter()
    fwd = Forwarder(store, writer, idle_poll_s=5.0, sleep=endless_poll)
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    await asyncio.wait_for(idle.wait(), 2)
    assert reads[0] == 1
    put(store, ["m v=1i 1"])
    fwd.wake()
    t = time.monotonic()
    while store.backlog():
        await asyncio.sleep(0.005)
        assert time.monotonic() - t < 1.0
    stop.set()
    await asyncio.wait_for(task, 2)
    assert writer.lines() == ["m v=1i 1"]


async def test_stop_is_prompt_even_mid_write(store: Store) -> None:
    put(store, ["m v=1i 1"])
    writer = FakeWriter()
    writer.hang = asyncio.Event()  # a server that never answers
    fwd = Forwarder(store, writer)
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    await asyncio.wait_for(writer.entered.wait(), 2)
    stop.set()
    await asyncio.wait_for(task, 1)  # prompt: a hung write does not hold up the stop
    assert store.backlog() == 1  # not acked: replayed at the next start


async def test_stop_is_prompt_during_backoff(store: Store) -> None:
    put(store, ["m v=1i 1"])
    fwd = Forwarder(store, FakeWriter(fail=WriteFailed("down")), backoff_base=1000, backoff_max=1000,
                    rng=EdgeRng("high"))  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    with capture_logs():
        await asyncio.wait_for(fwd.backing_off.wait(), 2)  # in a 1000 s backoff now
        stop.set()
        await asyncio.wait_for(task, 1)
    assert fwd.backoffs == 1 and not fwd.backing_off.is_set() and store.backlog() == 1


async def test_rejected_lines_are_quarantined_and_the_rest_flows(store: Store) -> None:
    ls = [f"m v={i}i {i}" for i in range(100)]
    for i in (17, 18, 60):
        ls[i] = f"BAD line {i}"
    put(store, ls)
    writer = FakeWriter(reject="BAD")
    fwd = Forwarder(store, writer, batch_size=50)
    with capture_logs() as logs:
        await drain(fwd, store)
    good = [line for line in ls if not line.startswith("BAD")]
    assert sorted(writer.lines(), key=ls.index) == good
    assert len(set(writer.lines())) == 97
    assert [line for line, _ in store.quarantined()] == ["BAD line 17", "BAD line 18", "BAD line 60"]
    assert fwd.quarantined == 3 and store.quarantined_count == 3
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and errors[0]["first_bad_line"] == "BAD" and "unable to parse" in errors[0]["server_error"]
    # Later batches still flow.
    put(store, ["m v=1000i 1000"])
    await drain(fwd, store)
    assert writer.lines()[-1] == "m v=1000i 1000"


async def test_bisection_is_bounded_when_everything_is_bad(store: Store) -> None:
    put(store, [f"BAD {i}" for i in range(1000)])
    attempts = 0
    writer = FakeWriter(reject="BAD")
    real_write = writer.write

    async def counting(body: str) -> None:
        nonlocal attempts
        attempts += 1
        await real_write(body)

    writer.write = counting  # type: ignore[method-assign]
    fwd = Forwarder(store, writer, batch_size=1000, bisect_budget=8)
    with capture_logs():
        await drain(fwd, store)
    assert store.quarantined_count == 1000
    assert attempts <= 1 + 2 * 8


async def test_too_large_is_split_not_quarantined(store: Store) -> None:
    put(store, [f"m v={i}i {i}" for i in range(64)])

    class SmallServer(FakeWriter):
        async def write(self, body: str) -> None:
            if body.count("\n") >= 8:
                raise WriteRejected(413, "Request Entity Too Large")
            await super().write(body)

    writer = SmallServer()
    fwd = Forwarder(store, writer, batch_size=64, bisect_budget=0)
    await drain(fwd, store)
    assert len(writer.lines()) == 64 and store.quarantined_count == 0


async def test_flush_drains_within_deadline_and_stops_on_failure(store: Store) -> None:
    put(store, [f"m v={i}i {i}" for i in range(250)])
    writer = FakeWriter()
    fwd = Forwarder(store, writer, batch_size=100)
    assert await fwd.flush(5.0) == 250
    assert store.backlog() == 0
    put(store, ["m v=1i 1"])
    failing = Forwarder(store, FakeWriter(fail=WriteFailed("down")))
    with capture_logs():
        assert await failing.flush(5.0) == 0
    assert store.backlog() == 1


async def test_flush_respects_the_deadline(store: Store) -> None:
    put(store, ["m v=1i 1"])
    writer = FakeWriter()
    writer.hang = asyncio.Event()
    fwd = Forwarder(store, writer)
    t = time.monotonic()
    with capture_logs():
        assert await fwd.flush(0.2) == 0
    assert time.monotonic() - t < 1.0 and store.backlog() == 1


# -- logs for an incident (injected clock, no sleeps) ----------------------------------------

class Clock:
    """The forwarder's ``monotonic``, moved by hand (or by a fake sleep)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


async def test_a_refused_batch_that_halving_clears_is_logged_once(store: Store) -> None:
    put(store, [f"m v={i}i {i}" for i in range(64)])

    class PickyServer(FakeWriter):  # refuses big bodies with a 400, takes the halves
        async def write(self, body: str) -> None:
            if body.count("\n") >= 16:
                raise WriteRejected(400, "body too large for this proxy")
            await super().write(body)

    writer = PickyServer()
    fwd = Forwarder(store, writer, batch_size=64, monotonic=Clock())
    with capture_logs() as logs:
        await drain(fwd, store)
    assert len(writer.lines()) == 64 and store.quarantined_count == 0
    (refused,) = events(logs, "influx_batch_refused")
    assert refused["log_level"] == "warning" and refused["status"] == 400
    assert refused["server_error"] == "body too large for this proxy"
    assert (refused["points"], refused["shipped"], refused["quarantined"]) == (64, 64, 0)
    assert refused["requests"] == 6 and refused["interrupted_by"] is None  # 64 -> 2x32 -> 4x16
    assert not events(logs, "influx_lines_quarantined")


async def test_a_refused_batch_says_how_many_lines_were_quarantined(store: Store) -> None:
    ls = [f"m v={i}i {i}" for i in range(40)]
    ls[5] = ls[30] = "BAD"
    put(store, ls)
    fwd = Forwarder(store, FakeWriter(reject="BAD"), batch_size=40, monotonic=Clock())
    with capture_logs() as logs:
        await drain(fwd, store)
    (refused,) = events(logs, "influx_batch_refused")
    assert (refused["points"], refused["shipped"], refused["quarantined"]) == (40, 38, 2)
    assert "unable to parse 'BAD'" in refused["server_error"]


async def test_quarantine_logs_are_rate_limited_per_reason(store: Store) -> None:
    """276 ERROR lines in 20 s for one cause helped nobody: one line per reason per minute,
    the next one counting those left out."""
    clock = Clock()

    class Conflicts(FakeWriter):  # each line refused with its own text, two causes
        async def write(self, body: str) -> None:
            if "conflict" in body:
                raise WriteRejected(400, f"partial write: field type conflict: input field \"v\" on measurement "
                                         f"\"conflict\" is type integer, already exists as type float dropped={body.count(chr(10)) + 1}")
            raise WriteRejected(400, f"partial write: unable to parse '{body}': invalid field format dropped=1")

    fwd = Forwarder(store, Conflicts(), batch_size=1, monotonic=clock)
    put(store, [f"junk {i}" for i in range(150)] + [f"conflict v={i}i {i}" for i in range(126)])
    with capture_logs() as logs:
        await drain(fwd, store)
    assert store.quarantined_count == 276
    quarantined = events(logs, "influx_lines_quarantined")
    assert [(e["first_bad_line"], e["suppressed"]) for e in quarantined] == [("junk 0", 0), ("conflict v=0i 0", 0)]
    assert len(events(logs, "influx_batch_refused")) == 2  # the per-batch line is limited the same way

    clock.now += Forwarder.QUARANTINE_LOG_EVERY_S  # a minute later, the same cause again
    put(store, ["junk again"])
    with capture_logs() as logs:
        await drain(fwd, store)
    (again,) = events(logs, "influx_lines_quarantined")
    assert again["first_bad_line"] == "junk again" and again["suppressed"] == 149
    assert events(logs, "influx_batch_refused")[0]["suppressed"] == 149


async def test_a_long_outage_is_logged_again_at_a_slow_cadence(store: Store) -> None:
    """An outage was logged once, then nothing for hours: now every 5 minutes, with how long
    it has lasted and the backlog, and its end with its length."""
    clock = Clock()
    writer = FakeWriter(fail=WriteFailed("http://db:8086/write: ClientConnectorError: connection refused"))
    stop = asyncio.Event()
    retries = 0

    async def fake_sleep(s: float) -> None:  # every retry wait lasts a minute of the fake clock
        nonlocal retries
        retries += 1
        clock.now += 60.0
        if retries == 21:  # 20 minutes down: the server is back
            writer.fail = None
        await asyncio.sleep(0)

    put(store, ["m v=1i 1", "m v=2i 2"])
    fwd = Forwarder(store, writer, sleep=fake_sleep, monotonic=clock, rng=EdgeRng("high"))  # type: ignore[arg-type]
    with capture_logs() as logs:
        task = asyncio.create_task(fwd.run(stop))
        while store.backlog():
            await asyncio.sleep(0)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "info")] == [
        "influx_write_failed", "influx_still_down", "influx_still_down", "influx_still_down", "influx_still_down",
        "influx_write_recovered"]
    down = events(logs, "influx_still_down")
    assert [e["outage_s"] for e in down] == [300.0, 600.0, 900.0, 1200.0]
    assert all(e["backlog"] == 2 and "connection refused" in e["error"] for e in down)
    assert events(logs, "influx_write_recovered")[0]["outage_s"] == 1260.0


async def test_a_server_that_never_answers_is_named_with_its_timeout(tmp_path: Path) -> None:
    """Accepts the connection, reads the request, never answers: the error used to be an empty
    ``TimeoutError: ``."""
    done = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for writer, url in [(V1Writer(f"http://127.0.0.1:{port}", "db", timeout=0.2), f"http://127.0.0.1:{port}/write"),
                            (V2Writer(f"http://127.0.0.1:{port}", "b", org="o", token="t", timeout=0.2),
                             f"http://127.0.0.1:{port}/api/v2/write")]:
            with pytest.raises(WriteFailed) as err:
                await writer.write("m v=1 1")
            await writer.close()
            assert str(err.value).startswith(f"{url}: no answer within 0.2 s (influx.timeout)"), str(err.value)
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("status, kind", [
    (400, WriteRejected), (413, WriteRejected), (422, WriteRejected),
    (401, WriteFailed), (403, WriteFailed), (404, WriteFailed),
    (408, WriteFailed), (429, WriteFailed), (500, WriteFailed), (503, WriteFailed),
])
def test_classify(status: int, kind: type) -> None:
    with pytest.raises(kind):
        classify(status, "x")
    classify(204, "")


def test_first_bad_line() -> None:
    ls = ["m,t=a v=1.5 1", "conf,host=h v=2i 2", "m v=3.0 3"]
    assert first_bad_line("partial write: unable to parse 'xx y': invalid field format", ls) == "xx y"
    text = ('partial write: field type conflict: input field "v" on measurement "conf" is type integer, '
            'already exists as type float dropped=1')
    assert first_bad_line(text, ls) == "conf,host=h v=2i 2"
    assert first_bad_line("failure at line 3: bad", ls) == "m v=3.0 3"
    assert first_bad_line("???", ls) == ls[0]


def test_make_writer_and_lazy_client_import() -> None:
    assert isinstance(make_writer(InfluxConfig(url="http://db:8086", api="v1", bucket="tele")), V1Writer)
    assert isinstance(make_writer(InfluxConfig(url="http://db:8086", token="t")), V2Writer)
    with pytest.raises(ValueError):
        make_writer(InfluxConfig())
    code = ("import sys; from agentd.config import InfluxConfig; from agentd.influx import make_writer; "
            "import agentd.store, agentd.lineproto; make_writer(InfluxConfig(url='http://x:1', token='t')); "
            "assert 'influxdb_client' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# What runs on the event loop's thread while the loop runs, in a fresh interpreter: every module
# import (the audit hook's "import" event) and every TLS context built (loading the system's CA
# bundle takes ~50 ms). Then make_forwarder and the first write, as `agentd run` does them.
_LOOP_WORK_PROBE = """
import asyncio, json, ssl, sys, tempfile, threading
from pathlib import Path

on_loop = {"imports": [], "ssl_contexts": 0}
loop_running = False

def hook(event, args):
    if event == "import" and loop_running and threading.current_thread() is threading.main_thread():
        on_loop["imports"].append(args[0])

sys.addaudithook(hook)
real_context = ssl.create_default_context

def counting_context(*a, **k):
    if loop_running and threading.current_thread() is threading.main_thread():
        on_loop["ssl_contexts"] += 1
    return real_context(*a, **k)

ssl.create_default_context = counting_context

from agentd.config import AgentConfig
from agentd.influx import WriteFailed
from agentd.service import make_forwarder
from agentd.store import Store

async def main():
    global loop_running
    loop_running = True
    store = Store(Path(tempfile.mkdtemp()) / "store.sqlite")
    fwd = make_forwarder(AgentConfig.model_validate({"influx": {"url": sys.argv[1], "token": "t"}}), store)
    try:
        await fwd.writer.write("probe v=1 1")
        outcome = "written"
    except WriteFailed as exc:
        outcome = str(exc)
    await fwd.writer.close()
    store.close()
    loop_running = False
    print(json.dumps({**on_loop, "outcome": outcome, "loaded": "influxdb_client" in sys.modules}))

asyncio.run(main())
"""


def loop_work(url: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOOP_WORK_PROBE, url], check=True, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_influxdb_client_is_loaded_off_the_event_loop() -> None:
    """The first ticks after a start were 0.13-0.41 s late: the first write imported
    influxdb-client (~0.4 s) on the loop. Now make_forwarder starts the import in a worker."""
    work = loop_work("http://127.0.0.1:1")  # nothing listens: the write fails, after the import
    assert work["loaded"] and "Cannot connect" in work["outcome"], work
    assert [m for m in work["imports"] if m.split(".")[0] == "influxdb_client"] == [], work["imports"]
    assert work["ssl_contexts"] == 0


_CANCEL_PROBE = """
import asyncio, sys
from agentd.influx import V2Writer, WriteFailed

async def main():
    first = V2Writer("http://127.0.0.1:1", "b", token="t")
    task = asyncio.ensure_future(first.write("m v=1 1"))  # waits for the import, which is under way
    await asyncio.sleep(0)
    task.cancel()  # a stop or a flush deadline
    await asyncio.gather(task, return_exceptions=True)
    try:
        await V2Writer("http://127.0.0.1:1", "b", token="t").write("m v=1 1")
    except WriteFailed as exc:
        print("later write:", exc)

asyncio.run(main())
"""


def test_a_cancelled_first_write_does_not_cancel_the_shared_import() -> None:
    out = subprocess.run([sys.executable, "-c", _CANCEL_PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "later write: http://127.0.0.1:1/api/v2/write: " in out.stdout, out.stderr


@pytest.mark.integration
def test_first_write_to_a_real_server_does_no_loading_on_the_loop(services) -> None:
    work = loop_work(services.vm_url)
    assert work["outcome"] == "written" and work["loaded"], work
    assert work["imports"] == [] and work["ssl_contexts"] == 0, work


# -- real servers ----------------------------------------------------------------------------

pytest_integration = pytest.mark.integration


def gpu_points(n: int, host: str, t0: int) -> list[Point]:
    """``n`` gpu points over 4 GPUs, 100 ms apart per GPU, with awkward but exact values."""
    out = []
    for i in range(n):
        gpu, step = i % 4, i // 4
        out.append(Point("gpu", {"host": host, "gpu": str(gpu), "uuid": f"GPU-{gpu:04d}-{host}",
                                 "model": "NVIDIA H100 80GB HBM3"},
                         {"power_w": 300.0 + i * 0.1, "energy_j": 1.0e9 + i * 40.125, "temp_c": 55.0 + (i % 37) / 4,
                          "mem_used_bytes": 40_000_000_000 + i, "sm_clock_mhz": 1980 - i % 300,
                          "throttled": i % 7 == 0, "limit_set_w": None if i % 2 else 650.0},
                         t0 + step * 100_000_000))
    return out


def fill(store: Store, points: list[Point]) -> list[str]:
    lines = [encode(p) for p in points]
    store.append([(p.ts_ns, line) for p, line in zip(points, lines)])
    return lines  # type: ignore[return-value]


def v1_writer(services, db: str) -> V1Writer:
    return V1Writer(services.influxdb1_url, db, gzip=True, timeout=5)


def v2_writer(services) -> V2Writer:
    return V2Writer(services.vm_url, "telemetry", org="site", token="unused", gzip=True, timeout=5)


def vm_samples(services, name: str, host: str) -> dict[tuple[str, int], float]:
    services.vm_flush()
    out = {}
    for series in services.vm_export(f'{{__name__="{name}",host="{host}"}}'):
        for ts, v in zip(series["timestamps"], series["values"]):
            out[(series["metric"]["gpu"], ts)] = v
    return out


@pytest_integration
async def test_v1_round_trip_exact(services, influx1_db, store: Store) -> None:
    points = gpu_points(400, "rt-v1", now_ms_ns())
    fill(store, points)
    writer = v1_writer(services, influx1_db)
    fwd = Forwarder(store, writer, batch_size=150)
    await drain(fwd, store)
    await writer.close()
    rows = services.influx1_rows("gpu", influx1_db)
    assert len(rows) == 400 == fwd.written
    by_key = {(r["gpu"], r["time"]): r for r in rows}
    for p in points:
        r = by_key[(p.tags["gpu"], p.ts_ns)]
        assert (r["host"], r["uuid"], r["model"]) == (p.tags["host"], p.tags["uuid"], p.tags["model"])
        for k, v in p.fields.items():
            got = r[k]
            if v is None:
                assert got is None, k
            elif isinstance(v, float):  # JSON renders 300.0 as 300
                assert type(got) in (int, float) and float(got) == v, (k, v, got)
            else:
                assert type(got) is type(v) and got == v, (k, v, got)


@pytest_integration
async def test_v2_round_trip_exact_on_victoriametrics(services, store: Store) -> None:
    host = f"rt-v2-{uuid.uuid4().hex[:8]}"
    points = gpu_points(400, host, now_ms_ns())
    fill(store, points)
    writer = v2_writer(services)
    fwd = Forwarder(store, writer, batch_size=150)
    await drain(fwd, store)
    await writer.close()
    for field, conv in [("power_w", float), ("energy_j", float), ("temp_c", float),
                        ("mem_used_bytes", float), ("sm_clock_mhz", float), ("throttled", float)]:
        got = vm_samples(services, f"gpu_{field}", host)
        want = {(p.tags["gpu"], p.ts_ns // 1_000_000): conv(p.fields[field]) for p in points}
        assert got == want, field
    got = vm_samples(services, "gpu_limit_set_w", host)
    assert len(got) == 200  # None fields are not written


HOSTILE = [
    "comma,here", "space here", "equals=here", 'quote"here', 'x"y"z', "back\\slash", "trailing\\",
    "\\\\double", "a\\,b", "a\\ b", "new\nline", "tab\there", "cr\rhere", "ünïcödé ✓ 🔥 中文",
    "  leading", "trailing  ", "=", ",", " ", "\\", "#hash", "a\\\\\\z",
]


def hostile_points(host: str, t0: int) -> list[Point]:
    return [Point("hostile", {"host": host, "i": f"{i:02d}", "k": v}, {"v": float(i), "s": v}, t0 + i * 1_000_000)
            for i, v in enumerate(HOSTILE)]


@pytest_integration
async def test_hostile_values_read_back_as_documented_on_influxdb1(services, influx1_db, store: Store) -> None:
    fill(store, hostile_points("h1", now_ms_ns()))
    fields = {"f,k": 1.0, "f k": 2.0, "f=k": 3.0, 'f"k': 4.0, "f\\": 5.0, "f\nk": 6.0}
    fill(store, [Point("hostile_keys", {"t": "x"}, fields, now_ms_ns())])
    writer = v1_writer(services, influx1_db)
    fwd = Forwarder(store, writer)
    await drain(fwd, store)
    await writer.close()
    assert fwd.quarantined == 0
    rows = {r["i"]: r for r in services.influx1_rows("hostile", influx1_db)}
    assert len(rows) == len(HOSTILE)
    for i, v in enumerate(HOSTILE):
        r = rows[f"{i:02d}"]
        assert r["k"] == documented_tag_value(v), (v, r["k"])
        assert r["s"] == documented_string(v), (v, r["s"])
    (row,) = services.influx1_rows("hostile_keys", influx1_db)
    for k, v in fields.items():
        assert row[documented_field_key(k)] == v, k


@pytest_integration
async def test_hostile_values_read_back_as_documented_on_victoriametrics(services, store: Store) -> None:
    host = f"hostile-{uuid.uuid4().hex[:8]}"
    fill(store, hostile_points(host, now_ms_ns()))
    writer = v2_writer(services)
    fwd = Forwarder(store, writer)
    await drain(fwd, store)
    await writer.close()
    services.vm_flush()
    series = services.vm_export(f'{{__name__="hostile_v",host="{host}"}}')
    got = {s["metric"]["i"]: s["metric"]["k"] for s in series}
    assert got == {f"{i:02d}": documented_tag_value(v) for i, v in enumerate(HOSTILE)}


async def _wait_backlog_zero(store: Store, timeout: float) -> None:
    await wait_until(lambda: store.backlog() == 0, timeout, "an empty store")


async def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll real I/O (a server answering or refusing) until ``predicate()``; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


@pytest_integration
@pytest.mark.parametrize("server", ["influxdb1", "vm"])
async def test_outage_backs_off_keeps_everything_and_delivers_exactly_once(services, influx1_db, store: Store,
                                                                            server: str) -> None:
    host = f"outage-{server}-{uuid.uuid4().hex[:6]}"
    writer = v1_writer(services, influx1_db) if server == "influxdb1" else v2_writer(services)
    fwd = Forwarder(store, writer, batch_size=100, backoff_base=0.05, backoff_max=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    t0 = now_ms_ns()
    points = gpu_points(600, host, t0)
    fill(store, points[:100])
    fwd.wake()
    await _wait_backlog_zero(store, 10)
    assert fwd.written == 100
    await asyncio.to_thread(services.stop, server)
    try:
        with capture_logs() as logs:
            for k in range(1, 6):  # five ticks' worth while the server is down
                fill(store, points[k * 100:(k + 1) * 100])
                fwd.wake()
                before = fwd.backoffs
                await wait_until(lambda b=before: fwd.backoffs > b, 10, "a failed write and a backoff")
        assert fwd.written == 100 and store.backlog() == 500  # nothing acked while down
        assert fwd.backoffs >= 5 and fwd.write_errors >= 5 and not fwd.connected and fwd.last_error
        assert any(e["log_level"] == "warning" for e in logs)
    finally:
        await asyncio.to_thread(services.start, server)
    await _wait_backlog_zero(store, 30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert store.backlog() == 0 and fwd.connected and fwd.quarantined == 0
    if server == "influxdb1":
        assert services.influx1_count("gpu", influx1_db, f"host = '{host}'") == 600
    else:
        assert len(vm_samples(services, "gpu_power_w", host)) == 600
    # Idempotent replay: the same batch again changes nothing.
    body = "\n".join(encode(p) for p in points[:300])  # type: ignore[misc]
    await writer.write(body)
    await writer.write(body)
    if server == "influxdb1":
        assert services.influx1_count("gpu", influx1_db, f"host = '{host}'") == 600
    else:
        assert len(vm_samples(services, "gpu_power_w", host)) == 600
        assert sum(len(s["values"]) for s in services.vm_export(f'{{__name__="gpu_power_w",host="{host}"}}')) == 600
    await writer.close()


@pytest_integration
async def test_influxdb1_4xx_lines_are_quarantined_and_later_batches_flow(services, influx1_db, store: Store) -> None:
    t0 = now_ms_ns()
    services.influx1_write(influx1_db, f"conf,host=h v=1.5 {t0}")  # v is a float from now on
    good = [f"conf,host=h v={i}.25 {t0 + (i + 1) * 1_000_000}" for i in range(20)]
    conflict = f"conf,host=h v=7i {t0 + 999 * 1_000_000}"
    malformed = "this is not line protocol"
    store.append([(t0, line) for line in good[:10] + [conflict] + good[10:15] + [malformed] + good[15:]])
    writer = v1_writer(services, influx1_db)
    fwd = Forwarder(store, writer, batch_size=500)
    with capture_logs() as logs:
        await drain(fwd, store)
    q = store.quarantined()
    assert [line for line, _ in q] == [conflict, malformed]
    assert "field type conflict" in q[0][1] and "unable to parse" in q[1][1]
    assert fwd.quarantined == 2 and store.quarantined_count == 2
    assert services.influx1_count("conf", influx1_db) == 21
    errors = [e for e in logs if e["log_level"] == "error"]
    assert {e["first_bad_line"] for e in errors} == {conflict, malformed}
    # Later batches still flow.
    store.append([(t0, f"conf,host=h v=99.5 {t0 + 5000 * 1_000_000}")])
    await drain(fwd, store)
    await writer.close()
    assert services.influx1_count("conf", influx1_db) == 22


@pytest_integration
async def test_v1_auth_and_missing_database_are_retried_not_quarantined(services, store: Store) -> None:
    writer = V1Writer(services.influxdb1_url, f"missing_{uuid.uuid4().hex[:8]}", timeout=5)
    with pytest.raises(WriteFailed) as exc:
        await writer.write("m v=1 1")
    await writer.close()
    assert exc.value.status == 404 and "database" in str(exc.value)
