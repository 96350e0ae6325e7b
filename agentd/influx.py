"""Shipping the store to InfluxDB: the v1/v2 writers and the forwarder.

Delivery is at-least-once: the forwarder deletes a batch from the store only after the server
answered 2xx. A crash between the write and the ack replays the batch at the next start, which
is harmless because a point is identified by measurement + tag set + timestamp: writing it again
overwrites it with the same values (InfluxDB; VictoriaMetrics with ``-dedup.minScrapeInterval``).

Errors are split by whose fault they are:

* ``WriteFailed``: the server or the path to it is not working (connection refused, timeout,
  5xx, 408, 429) or the daemon is not allowed in (401, 403) or the database/bucket is missing
  (404). The data is fine; the forwarder keeps it and retries with capped exponential backoff
  and full jitter (so a site's agents do not hammer a recovering server in step).
* ``WriteRejected``: the server refused the content (400, 413, 422, other 4xx). Retrying the
  same bytes would fail forever, so the forwarder bisects the batch to find the offending
  lines, ships the rest, and moves only the refused lines to the store's quarantine (kept,
  counted, logged with the server's message and the first bad line). The bisection has a
  request budget, so a batch that is bad throughout is quarantined in a bounded number of
  requests.

InfluxDB 1.x answers a batch that is partly bad (for example a field type conflict: a field
written as float before and as integer now) with ``400 partial write: ...``: the good points
*are* stored and the bad ones dropped. Such a 400 is a ``WriteRejected`` like any other; the
bisection re-sends the good points (idempotent overwrites) and quarantines the conflicting
lines, so the quarantine holds exactly what the server did not take.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import zlib
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import aiohttp
import structlog

from agentd.store import Batch, Store, StoreError

if TYPE_CHECKING:
    from agentd.config import InfluxConfig

log = structlog.get_logger("agentd.influx")

__all__ = [
    "WriteError", "WriteRejected", "WriteFailed", "Writer", "V1Writer", "V2Writer", "make_writer",
    "Forwarder", "GZIP_LEVEL", "gzip_body", "classify", "first_bad_line",
]

# zlib level 1 makes GPU line protocol ~20x smaller for ~0.8 us per point; level 9 (the default
# of gzip.compress, which influxdb-client's own gzip uses) costs ~8x more CPU for ~17 % fewer
# bytes -- more CPU than VictoriaMetrics spends ingesting the batch.
GZIP_LEVEL = 1
_MAX_ERROR_TEXT = 2000


class WriteError(Exception):
    """Base of the writer errors."""


class WriteRejected(WriteError):
    """The server refused the batch's content (4xx): retrying the same bytes cannot succeed."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


class WriteFailed(WriteError):
    """The write did not happen for a reason that may go away (network, 5xx, 408/429, auth)."""

    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class Writer(Protocol):
    """What the forwarder needs. The two writers here also offer ``encode_body(body) -> bytes``
    (thread-safe CPU work: UTF-8 + gzip) and ``async send(payload)``, which the forwarder uses
    to compress the next batch in a worker thread while the current one is in flight."""

    async def write(self, body: str) -> None: ...
    async def close(self) -> None: ...


def gzip_body(data: bytes) -> bytes:
    """gzip (not zlib) framing, as ``Content-Encoding: gzip`` needs."""
    return zlib.compress(data, GZIP_LEVEL, wbits=31)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = text.strip()
    # InfluxDB answers {"error": "..."} (1.x) or {"code": .., "message": ".."} (2.x).
    match = re.match(r'^\{.*"(?:error|message)"\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.S)
    if match:
        try:
            text = json.loads(f'"{match.group(1)}"')
        except ValueError:
            text = match.group(1)
    return text[:_MAX_ERROR_TEXT]


def classify(status: int, text: str, retry_after: str | None = None) -> None:
    """Raise the error a non-2xx status means (see the module docstring)."""
    if 200 <= status < 300:
        return
    if status in (408, 429) or status >= 500:
        raise WriteFailed(f"HTTP {status}: {text}", status=status, retry_after=_retry_after(retry_after))
    if status in (401, 403):
        raise WriteFailed(f"HTTP {status}: {text} (check influx.token / influx.username and password)",
                          status=status)
    if status == 404:
        raise WriteFailed(f"HTTP {status}: {text} (does the database/bucket exist? check influx.bucket, "
                          "influx.org and influx.url)", status=status)
    if 400 <= status < 500:
        raise WriteRejected(status, text)
    raise WriteFailed(f"unexpected HTTP {status}: {text}", status=status)


class _BodyWriter:
    """What both writers share: the body is UTF-8 and (optionally) gzip, then ``send``."""

    gzip: bool

    def encode_body(self, body: str) -> bytes:
        data = body.encode("utf-8")
        return gzip_body(data) if self.gzip else data

    async def write(self, body: str) -> None:
        await self.send(await _encode_off_loop(self, body))

    async def send(self, payload: bytes) -> None:
        raise NotImplementedError


class V1Writer(_BodyWriter):
    """InfluxDB 1.x ``/write`` (database + retention policy, optional basic auth)."""

    def __init__(self, url: str, database: str, *, retention_policy: str = "", username: str = "",
                 password: str | None = None, gzip: bool = True, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/") + "/write"
        self.params = {"db": database, "precision": "ns"}
        if retention_policy:
            self.params["rp"] = retention_policy
        self.auth = aiohttp.BasicAuth(username, password or "") if username else None
        self.gzip = gzip
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, payload: bytes) -> None:
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.gzip:
            headers["Content-Encoding"] = "gzip"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(self.url, params=self.params, data=payload, headers=headers,
                                          auth=self.auth) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()
                    return
                text = _error_text(await resp.read())
                classify(resp.status, text, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WriteFailed(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class V2Writer(_BodyWriter):
    """``/api/v2/write`` through influxdb-client's async API (InfluxDB 2.x/3.x, 1.8+, VictoriaMetrics).

    ``influxdb_client`` is imported on first use, so a daemon without InfluxDB never loads it.
    The body is compressed here with ``GZIP_LEVEL`` and sent through the client's write
    service with ``Content-Encoding: gzip`` (the client's own gzip uses level 9, which costs
    more CPU than the server spends ingesting the batch).
    """

    def __init__(self, url: str, bucket: str, *, org: str = "", token: str | None = None,
                 gzip: bool = True, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.org = org
        self.token = token
        self.gzip = gzip
        self.timeout_ms = int(timeout * 1000)
        self._client = None
        self._service = None

    def open(self) -> None:
        """Import influxdb-client and create the client (done by the first write otherwise)."""
        if self._service is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
            from influxdb_client.service.write_service import WriteService

            self._client = InfluxDBClientAsync(url=self.url, token=self.token or "", org=self.org,
                                               timeout=self.timeout_ms, enable_gzip=False)
            self._service = WriteService(self._client.api_client)

    async def send(self, payload: bytes) -> None:
        self.open()
        from influxdb_client.rest import ApiException

        kwargs = {"content_encoding": "gzip"} if self.gzip else {}
        try:
            await self._service.post_write_async(  # type: ignore[union-attr]
                org=self.org, bucket=self.bucket, body=payload, precision="ns",
                content_type="text/plain; charset=utf-8", **kwargs)
        except ApiException as exc:
            headers = exc.headers or {}
            classify(int(exc.status or 0), _error_text(exc.body) or str(exc.reason or ""),
                     headers.get("Retry-After") if hasattr(headers, "get") else None)
            raise WriteFailed(f"{self.url}: HTTP {exc.status}: {exc.reason}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WriteFailed(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._service = None


_OFF_LOOP_BYTES = 256 * 1024


async def _encode_off_loop(writer: _BodyWriter, body: str) -> bytes:
    """Compress large bodies in a worker thread (zlib releases the GIL) so the loop keeps ticking."""
    if writer.gzip and len(body) >= _OFF_LOOP_BYTES:
        return await asyncio.to_thread(writer.encode_body, body)
    return writer.encode_body(body)


def make_writer(cfg: "InfluxConfig") -> V1Writer | V2Writer:
    """The writer ``cfg`` asks for (``cfg.url`` must be set)."""
    if not cfg.url:
        raise ValueError("influx.url is not set: no writer (the store keeps the readings)")
    if cfg.api == "v1":
        password = cfg.password.get_secret_value() if cfg.password is not None else None
        return V1Writer(cfg.url, cfg.bucket, retention_policy=cfg.retention_policy, username=cfg.username,
                        password=password, gzip=cfg.gzip, timeout=cfg.timeout)
    return V2Writer(cfg.url, cfg.bucket, org=cfg.org, token=cfg.resolved_token(), gzip=cfg.gzip,
                    timeout=cfg.timeout)


# -- the forwarder --------------------------------------------------------------------------

_UNABLE_TO_PARSE = re.compile(r"unable to parse '(.*?)': ", re.S)
_LINE_NO = re.compile(r"\bline[: ]+(\d+)\b", re.I)
_TYPE_CONFLICT = re.compile(r'field "(.+?)" on measurement "(.+?)"')


def first_bad_line(text: str, lines: list[str]) -> str:
    """Best guess at the line the server complained about (for the log)."""
    match = _UNABLE_TO_PARSE.search(text)
    if match:
        return match.group(1)
    match = _TYPE_CONFLICT.search(text)
    if match:
        field, meas = match.group(1), match.group(2)
        for line in lines:
            if line.startswith((meas + ",", meas + " ")) and (f" {field}=" in line or f",{field}=" in line):
                return line
    match = _LINE_NO.search(text)
    if match and 1 <= int(match.group(1)) <= len(lines):
        return lines[int(match.group(1)) - 1]
    return lines[0] if lines else ""


class Forwarder:
    """Ships the store's oldest batches to a writer; see the module docstring for the policy.

    Pipelined: while batch *k* is in flight, a worker thread acks batch *k-1* (which the server
    already accepted) and reads and compresses batch *k+1*, so a replay after an outage runs
    at close to the server's own ingest rate. Only the HTTP request is on the critical path.

    ``rng``, ``sleep`` and ``monotonic`` are injectable so tests run the backoff and the idle
    poll without sleeping (every wait in ``run`` goes through ``sleep``). Stats for
    self-telemetry: ``written`` (points accepted by the server), ``write_errors`` (failed or
    rejected requests), ``quarantined`` (points), ``last_error``, ``connected`` (the last request
    got an HTTP answer), ``backoffs`` (retry waits entered). ``backing_off`` is set while a
    retry wait is in progress (a test waits on it rather than guessing with a sleep).
    """

    def __init__(self, store: Store, writer: Writer, *, batch_size: int = 5000, backoff_max: float = 60.0,
                 backoff_base: float = 0.5, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 monotonic: Callable[[], float] = time.monotonic, idle_poll_s: float = 5.0,
                 bisect_budget: int = 64) -> None:
        self.store = store
        self.writer = writer
        self.batch_size = int(batch_size)
        self.backoff_max = float(backoff_max)
        self.backoff_base = float(backoff_base)
        self.rng = rng or random.Random()
        self._sleep = sleep
        self._monotonic = monotonic
        self.idle_poll_s = idle_poll_s
        self.bisect_budget = bisect_budget
        self._wake = asyncio.Event()
        self._failures = 0  # consecutive WriteFailed
        self._split_writes = hasattr(writer, "encode_body") and hasattr(writer, "send")
        self.written = 0
        self.write_errors = 0
        self.quarantined = 0
        self.last_error: str | None = None
        self.connected = False
        self.backoffs = 0
        self.backing_off = asyncio.Event()

    # -- control ---------------------------------------------------------------------------

    def wake(self) -> None:
        """New lines are in the store (the daemon calls this after each append)."""
        self._wake.set()

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter delay before retry ``attempt`` (1, 2, ...): uniform(0, min(cap, base * 2**(attempt-1))).

        A server's ``Retry-After`` (429/503) raises the delay to at least that, still capped.
        """
        ceiling = min(self.backoff_max, self.backoff_base * (2.0 ** min(max(attempt, 1) - 1, 60)))
        delay = self.rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    async def run(self, stop: asyncio.Event) -> None:
        """Ship until ``stop`` is set; never busy-loops on an empty store or a dead server.

        On ``stop`` an in-flight request is abandoned (its batch stays in the store and is
        replayed later; replays are idempotent), so the caller can ``flush`` promptly.
        """
        to_ack: Batch | None = None      # accepted by the server, not yet deleted
        nxt: tuple[Batch, object] | None = None  # prefetched (batch, payload)
        try:
            while not stop.is_set():
                if nxt is None:
                    self._wake.clear()
                    pending_ack, to_ack = to_ack, None
                    try:
                        nxt = await self._in_thread(self._ack_and_fetch, pending_ack, None)
                    except StoreError as exc:
                        log.error("store read failed; forwarder retrying", error=str(exc))
                        await self._wait(stop, self._sleep(self.idle_poll_s))
                        continue
                    if nxt is None:  # idle: until new lines are appended, or the next poll
                        await self._wait(stop, self._wake.wait(), self._sleep(self.idle_poll_s))
                        continue
                batch, payload = nxt
                nxt = None
                write = asyncio.ensure_future(self._send(payload))
                side = asyncio.ensure_future(asyncio.to_thread(self._ack_and_fetch, to_ack, batch.last_id))
                to_ack = None
                stopper = asyncio.ensure_future(stop.wait())
                prefetched = None
                try:
                    await asyncio.wait({write, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
                    if not write.done():
                        write.cancel()
                    await asyncio.wait({write, side})  # a thread cannot be cancelled; it is short
                    if side.exception() is None:
                        prefetched = side.result()
                    else:
                        log.error("store ack/read failed; the batch will be sent again",
                                  error=str(side.exception()))
                if write.cancelled():
                    return
                exc = write.exception()
                if exc is not None and not isinstance(exc, (WriteRejected, WriteFailed)):
                    exc = _unexpected(exc)
                if exc is None:
                    self._on_success(batch)
                    to_ack = batch
                    nxt = prefetched
                elif isinstance(exc, WriteRejected):
                    self._on_rejected(exc)
                    outcome = await self._bisect(batch, exc)
                    if outcome is not True:
                        await self._back_off(stop, outcome)
                        continue
                    nxt = prefetched
                else:
                    self._on_failed(exc)
                    await self._back_off(stop, exc)
        finally:
            if to_ack is not None:
                self.store.ack(to_ack)

    @staticmethod
    async def _in_thread(fn: Callable, *args: object):
        """``fn(*args)`` in a worker thread; if we are cancelled meanwhile, let it finish first."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise

    async def flush(self, deadline_s: float) -> int:
        """Drain what can be shipped within ``deadline_s`` seconds (at shutdown); returns points sent.

        Stops at the first failed write: what is left stays in the store for the next start.
        """
        end = self._monotonic() + deadline_s
        before = self.written
        while True:
            remaining = end - self._monotonic()
            if remaining <= 0:
                break
            batch = self.store.oldest(self.batch_size)
            if batch is None:
                break
            try:
                outcome = await asyncio.wait_for(self._ship(batch), remaining)
            except asyncio.TimeoutError:
                break
            if outcome is not True:
                break
        sent = self.written - before
        left = self.store.backlog()
        if left:
            log.warning("influx flush incomplete; the rest stays in the store for the next start",
                        sent=sent, left=left, store=str(self.store.path))
        return sent

    # -- internals -------------------------------------------------------------------------

    def _ack_and_fetch(self, to_ack: Batch | None, after_id: int | None) -> tuple[Batch, object] | None:
        """Worker thread: delete what the server accepted, read and encode the next batch."""
        if to_ack is not None:
            self.store.ack(to_ack)
        batch = self.store.oldest(self.batch_size, after_id=after_id)
        if batch is None:
            return None
        body = batch.body()
        return batch, (self.writer.encode_body(body) if self._split_writes else body)  # type: ignore[attr-defined]

    async def _send(self, payload: object) -> None:
        if self._split_writes:
            await self.writer.send(payload)  # type: ignore[attr-defined]
        else:
            await self.writer.write(payload)  # type: ignore[arg-type]

    async def _back_off(self, stop: asyncio.Event, exc: WriteFailed) -> None:
        delay = self.backoff_delay(self._failures, exc.retry_after)
        log.debug("influx retry scheduled", retry_in_s=round(delay, 3), attempt=self._failures)
        self.backoffs += 1
        self.backing_off.set()
        try:
            await self._wait(stop, self._sleep(delay))
        finally:
            self.backing_off.clear()

    def _on_success(self, batch: Batch) -> None:
        self.written += batch.count
        if self._failures:
            log.info("influx write recovered", after_failures=self._failures, backlog=self.store.backlog())
            self._failures = 0
        self.connected = True

    def _on_failed(self, exc: WriteFailed) -> None:
        self.write_errors += 1
        self._failures += 1
        if self.connected or self._failures == 1 or self.last_error != str(exc):
            log.warning("influx write failed; keeping the data and retrying", error=str(exc),
                        backlog=self.store.backlog(), failures=self._failures)
        self.connected = False
        self.last_error = str(exc)

    def _on_rejected(self, exc: WriteRejected) -> None:
        self.write_errors += 1
        self.connected = True
        self.last_error = str(exc)
        if self._failures:
            self._failures = 0

    async def _ship(self, batch: Batch, budget: list[int] | None = None) -> "bool | WriteFailed":
        """Write ``batch`` and ack it; True when it left the store (acked or quarantined).

        ``budget`` is the bisection's remaining request count, shared by all halves of one batch.
        """
        try:
            await self.writer.write(batch.body())
        except WriteRejected as exc:
            self._on_rejected(exc)
            return await self._bisect(batch, exc, budget)
        except WriteFailed as exc:
            self._on_failed(exc)
            return exc
        except Exception as exc:  # a writer bug must not stop the shipping
            failed = _unexpected(exc)
            self._on_failed(failed)
            return failed
        self.store.ack(batch)
        self._on_success(batch)
        return True

    async def _bisect(self, batch: Batch, exc: WriteRejected,
                      budget: list[int] | None = None) -> "bool | WriteFailed":
        """``batch`` was refused: ship its halves, quarantining only the refused lines."""
        if budget is None:
            budget = [self.bisect_budget]
        if batch.count > 1 and (budget[0] > 0 or exc.status == 413):
            budget[0] -= 1
            for half in _split(batch):
                outcome = await self._ship(half, budget)
                if outcome is not True:
                    return outcome
            return True
        self._quarantine(batch, exc)
        return True

    def _quarantine(self, batch: Batch, exc: WriteRejected) -> None:
        bad = first_bad_line(exc.text, batch.lines)
        moved = self.store.quarantine(batch, f"HTTP {exc.status}: {exc.text}")
        self.quarantined += moved
        log.error("influx rejected lines; moved to quarantine", status=exc.status, server_error=exc.text,
                  first_bad_line=bad[:500], points=moved, quarantined_total=self.store.quarantined_count,
                  store=str(self.store.path))

    @staticmethod
    async def _wait(stop: asyncio.Event, *waits: Awaitable) -> None:
        """Until the first of ``waits`` finishes or ``stop`` is set; the others are cancelled."""
        tasks = [asyncio.ensure_future(w) for w in waits]
        tasks.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()


def _unexpected(exc: BaseException) -> WriteFailed:
    log.error("influx writer raised an unexpected error; treating it as a failed write", error=repr(exc))
    return WriteFailed(f"unexpected {type(exc).__name__}: {exc}")


def _split(batch: Batch) -> tuple[Batch, Batch]:
    """Two halves of ``batch`` in order (needs per-line ids)."""
    ids = batch.ids
    mid = batch.count // 2
    left = Batch(ids[0], ids[mid - 1], batch.lines[:mid], mid, ids[:mid])
    right = Batch(ids[mid], ids[-1], batch.lines[mid:], batch.count - mid, ids[mid:])
    return left, right
