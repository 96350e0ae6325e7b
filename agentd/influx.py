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
import concurrent.futures
import json
import random
import re
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import structlog

from agentd.backoff import full_jitter_s
from agentd.store import Batch, StoreError

if TYPE_CHECKING:
    from pathlib import Path

    from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
    from influxdb_client.service.write_service import WriteService

    from agentd.config import InfluxConfig

log = structlog.get_logger("agentd.influx")

__all__ = [
    "WriteError", "WriteRejected", "WriteFailed", "Writer", "V1Writer", "V2Writer", "make_writer",
    "BatchSource", "Forwarder", "GZIP_LEVEL", "gzip_body", "classify", "first_bad_line",
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
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _transport_failure(self.url, exc, self.timeout.total) from exc

    def preload(self) -> None:
        """Nothing to load: aiohttp is imported already (the same call as ``V2Writer.preload``)."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class V2Writer(_BodyWriter):
    """``/api/v2/write`` through influxdb-client's async API (InfluxDB 2.x/3.x, 1.8+, VictoriaMetrics).

    ``influxdb_client`` is imported only when a v2 writer is used, so a daemon without InfluxDB
    never loads it. Its import takes ~0.4 s of CPU, far longer than a tick: ``preload`` starts it
    in a worker thread (``make_forwarder`` calls it before the first tick), and the first write
    awaits that thread instead of importing on the event loop. The body is compressed here with
    ``GZIP_LEVEL`` and sent through the client's write service with ``Content-Encoding: gzip``
    (the client's own gzip uses level 9, which costs more CPU than the server spends ingesting
    the batch).
    """

    def __init__(self, url: str, bucket: str, *, org: str = "", token: str | None = None,
                 gzip: bool = True, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.org = org
        self.token = token
        self.gzip = gzip
        self.timeout_ms = int(timeout * 1000)
        self._client: InfluxDBClientAsync | None = None
        self._service: WriteService | None = None

    def preload(self) -> concurrent.futures.Future[ssl.SSLContext]:
        """Start importing influxdb-client in a worker thread (once per process); returns its future."""
        return _load_client_in_background()

    async def _open(self) -> WriteService:
        """Create the client on the loop (it insists on one), once the import has finished off it.

        The TLS context comes from the worker too: the client would otherwise load the system's
        CA bundle on the loop (~50 ms), even for an http:// URL.
        """
        # Shielded: a cancelled first write (a stop, a flush deadline) must not cancel the import
        # that every writer of the process shares.
        ssl_context = await asyncio.shield(asyncio.wrap_future(self.preload()))
        return self._build(ssl_context)

    def open(self) -> None:
        """Load influxdb-client and create the client now, blocking until done (for benchmarks and
        tools that want it out of a timed part; the daemon never blocks its loop on it). Call it
        from a coroutine: the client needs a running loop."""
        self._build(self.preload().result())

    def _build(self, ssl_context: ssl.SSLContext) -> WriteService:
        if self._service is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
            from influxdb_client.service.write_service import WriteService

            self._client = InfluxDBClientAsync(url=self.url, token=self.token or "", org=self.org,
                                               timeout=self.timeout_ms, enable_gzip=False, ssl_context=ssl_context)
            self._service = WriteService(self._client.api_client)
        return self._service

    async def send(self, payload: bytes) -> None:
        service = self._service if self._service is not None else await self._open()
        from influxdb_client.rest import ApiException

        kwargs = {"content_encoding": "gzip"} if self.gzip else {}
        try:
            await service.post_write_async(
                org=self.org, bucket=self.bucket, body=payload, precision="ns",
                content_type="text/plain; charset=utf-8", **kwargs)
        except ApiException as exc:
            headers: Mapping[str, str] = exc.headers or {}
            classify(int(exc.status or 0), _error_text(exc.body) or str(exc.reason or ""),
                     headers.get("Retry-After") if hasattr(headers, "get") else None)
            raise WriteFailed(f"{self.url}: HTTP {exc.status}: {exc.reason}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _transport_failure(f"{self.url}/api/v2/write", exc, self.timeout_ms / 1000) from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._service = None


def _transport_failure(url: str, exc: BaseException, timeout_s: float | None) -> WriteFailed:
    """A failed request as the operator needs it: which URL, what happened, for how long.

    A timeout's own text is empty (``TimeoutError: ``), and one that hit a server which took
    the connection and never answered is the case worth spelling out.
    """
    within = f"{timeout_s:g} s" if timeout_s else "the timeout"
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientConnectionError):
        return WriteFailed(f"{url}: no answer within {within} (influx.timeout): the server took the "
                           "request but did not respond; is it overloaded or hung?")
    if isinstance(exc, TimeoutError):
        return WriteFailed(f"{url}: {type(exc).__name__}: {str(exc) or 'timed out'} (influx.timeout = {within})")
    return WriteFailed(f"{url}: {type(exc).__name__}: {exc}")


_client_import: concurrent.futures.Future[ssl.SSLContext] | None = None
_client_import_lock = threading.Lock()


def _load_client_in_background() -> concurrent.futures.Future[ssl.SSLContext]:
    global _client_import
    with _client_import_lock:
        if _client_import is None:
            _client_import = concurrent.futures.Future()
            _client_import.set_running_or_notify_cancel()  # running: it can no longer be cancelled
            threading.Thread(target=_import_client, args=(_client_import,), name="influxdb-client-import",
                             daemon=True).start()
        return _client_import


def _import_client(done: concurrent.futures.Future[ssl.SSLContext]) -> None:
    """Worker thread: import influxdb-client, and build and close a throwaway client in a private
    loop, so that what its constructor imports lazily is loaded here too (whatever the version);
    the result is the TLS context the client would build (the system CAs, verification on)."""
    try:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        from influxdb_client.rest import ApiException  # noqa: F401  (send needs it)
        from influxdb_client.service.write_service import WriteService

        ssl_context = ssl.create_default_context()

        async def build() -> None:
            client = InfluxDBClientAsync(url="http://127.0.0.1:9", token="", org="", enable_gzip=False,
                                         ssl_context=ssl_context)
            WriteService(client.api_client)
            await client.close()

        asyncio.run(build())
    except BaseException as exc:  # surfaces at the first write, as an import there would
        done.set_exception(exc)
    else:
        done.set_result(ssl_context)


_OFF_LOOP_BYTES = 256 * 1024


async def _encode_off_loop(writer: _BodyWriter, body: str) -> bytes:
    """Compress large bodies in a worker thread (zlib releases the GIL) so the loop keeps ticking."""
    if writer.gzip and len(body) >= _OFF_LOOP_BYTES:
        return await asyncio.to_thread(writer.encode_body, body)
    return writer.encode_body(body)


def make_writer(cfg: InfluxConfig) -> V1Writer | V2Writer:
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


class BatchSource(Protocol):
    """What the forwarder reads batches from and reports their fate to: the daemon's store
    (``agentd.store.Store``: ``ack`` deletes, ``quarantine`` moves), or a replay of a store
    (``agentd.export``: a copy, where ``ack`` only moves a cursor and nothing is deleted)."""

    path: Path

    def oldest(self, limit: int, *, after_id: int | None = None) -> Batch | None: ...
    def ack(self, batch: Batch) -> None: ...
    def quarantine(self, batch: Batch, reason: str) -> int: ...
    def backlog(self) -> int: ...
    def size_bytes(self) -> int: ...

    @property
    def quarantined_count(self) -> int: ...


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

    Logs for an incident, on the injected ``monotonic`` clock: an outage once when it starts,
    again every ``OUTAGE_LOG_EVERY_S`` with its duration and the backlog, and once when it ends;
    a refused batch once, with what the server said and how many lines were quarantined; the
    quarantined lines once per reason every ``QUARANTINE_LOG_EVERY_S``, the next line of that
    reason counting those suppressed meanwhile.
    """

    OUTAGE_LOG_EVERY_S = 300.0
    QUARANTINE_LOG_EVERY_S = 60.0

    def __init__(self, store: BatchSource, writer: Writer, *, batch_size: int = 5000, backoff_max: float = 60.0,
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
        self._outage_since: float | None = None  # monotonic time of the first failure of an outage
        self._outage_logged = 0.0  # when the outage was last logged
        self._quarantine_logs = _PerReason(self.QUARANTINE_LOG_EVERY_S)
        self._refusal_logs = _PerReason(self.QUARANTINE_LOG_EVERY_S)

    # -- control ---------------------------------------------------------------------------

    def wake(self) -> None:
        """New lines are in the store (the daemon calls this after each append)."""
        self._wake.set()

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter delay before retry ``attempt`` (1, 2, ...): uniform(0, min(cap, base * 2**(attempt-1))).

        A server's ``Retry-After`` (429/503) raises the delay to at least that, still capped.
        """
        delay = full_jitter_s(max(attempt, 1) - 1, self.rng, self.backoff_base, self.backoff_max)
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
                        log.error("influx_store_read_failed", error=str(exc), store=str(self.store.path),
                                  hint="the forwarder retries; readings stay in the store")
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
                        log.error("influx_store_ack_failed", error=str(side.exception()), store=str(self.store.path),
                                  hint="the batch will be sent again (replays are idempotent)")
                if write.cancelled():
                    return
                error = write.exception()
                if error is not None and not isinstance(error, (WriteRejected, WriteFailed)):
                    error = _unexpected(error)
                if error is None:
                    self._on_success(batch)
                    to_ack = batch
                    nxt = prefetched
                elif isinstance(error, WriteRejected):
                    outcome = await self._refused(batch, error)
                    if isinstance(outcome, WriteFailed):  # the server failed mid-bisection
                        await self._back_off(stop, outcome)
                        continue
                    nxt = prefetched
                else:
                    self._on_failed(error)
                    await self._back_off(stop, error)
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
            except TimeoutError:
                break
            if outcome is not True:
                break
        sent = self.written - before
        left = self.store.backlog()
        if left:
            log.warning("influx_flush_incomplete", sent=sent, left=left, store=str(self.store.path),
                        hint="the rest stays in the store and is shipped after the next start")
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
        log.debug("influx_retry_scheduled", retry_in_s=round(delay, 3), attempt=self._failures)
        self.backoffs += 1
        self.backing_off.set()
        try:
            await self._wait(stop, self._sleep(delay))
        finally:
            self.backing_off.clear()

    def _on_success(self, batch: Batch) -> None:
        self.written += batch.count
        self._end_outage()
        self.connected = True

    def _end_outage(self) -> None:
        """The server answered: an outage, if one was on, is over (logged once, with its length)."""
        if self._failures:
            outage_s = self._monotonic() - self._outage_since if self._outage_since is not None else None
            log.info("influx_write_recovered", after_failures=self._failures, backlog=self.store.backlog(),
                     outage_s=round(outage_s, 1) if outage_s is not None else None)
            self._failures = 0
        self._outage_since = None

    def _on_failed(self, exc: WriteFailed) -> None:
        self.write_errors += 1
        self._failures += 1
        now = self._monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if self.connected or self._failures == 1 or self.last_error != str(exc):
            self._outage_logged = now
            log.warning("influx_write_failed", error=str(exc), backlog=self.store.backlog(),
                        failures=self._failures, hint="the readings stay in the store; retrying with backoff")
        elif now - self._outage_logged >= self.OUTAGE_LOG_EVERY_S:
            self._outage_logged = now
            log.warning("influx_still_down", error=str(exc), outage_s=round(now - self._outage_since, 1),
                        backlog=self.store.backlog(), store_bytes=self.store.size_bytes(), failures=self._failures,
                        hint="the readings stay in the store (bounded by store.max_bytes); check the server "
                             "and the network to it")
        self.connected = False
        self.last_error = str(exc)

    def _on_rejected(self, exc: WriteRejected) -> None:
        self.write_errors += 1
        self.connected = True
        self.last_error = str(exc)
        self._end_outage()

    async def _refused(self, batch: Batch, exc: WriteRejected) -> bool | WriteFailed:
        """The server refused ``batch`` as a whole: bisect it, then say once what happened to it."""
        self._on_rejected(exc)
        quarantined_before = self.quarantined
        written_before = self.written
        bisection = _Bisection(self.bisect_budget)
        outcome = await self._bisect(batch, exc, bisection)
        quarantined = self.quarantined - quarantined_before
        suppressed = self._refusal_logs.admit(_reason(exc), self._monotonic())
        if suppressed is not None:
            log.warning("influx_batch_refused", status=exc.status, server_error=exc.text[:500], points=batch.count,
                        shipped=self.written - written_before, quarantined=quarantined, requests=bisection.requests,
                        interrupted_by=None if outcome is True else str(outcome), suppressed=suppressed,
                        hint=_refusal_hint(outcome is True, quarantined))
        return outcome

    async def _ship(self, batch: Batch, bisection: _Bisection | None = None) -> bool | WriteFailed:
        """Write ``batch`` and ack it; True when it left the store (acked or quarantined).

        ``bisection`` carries the request budget (and count) shared by all halves of one refused
        batch; without it, ``batch`` is a batch of its own.
        """
        try:
            await self.writer.write(batch.body())
        except WriteRejected as exc:
            if bisection is None:
                return await self._refused(batch, exc)
            self._on_rejected(exc)
            return await self._bisect(batch, exc, bisection)
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

    async def _bisect(self, batch: Batch, exc: WriteRejected, bisection: _Bisection) -> bool | WriteFailed:
        """``batch`` was refused: ship its halves, quarantining only the refused lines."""
        if batch.count > 1 and (bisection.budget > 0 or exc.status == 413):
            bisection.budget -= 1
            for half in _split(batch):
                bisection.requests += 1
                outcome = await self._ship(half, bisection)
                if outcome is not True:
                    return outcome
            return True
        self._quarantine(batch, exc)
        return True

    def _quarantine(self, batch: Batch, exc: WriteRejected) -> None:
        bad = first_bad_line(exc.text, batch.lines)
        moved = self.store.quarantine(batch, f"HTTP {exc.status}: {exc.text}")
        self.quarantined += moved
        suppressed = self._quarantine_logs.admit(_reason(exc), self._monotonic())
        if suppressed is None:
            return
        log.error("influx_lines_quarantined", status=exc.status, server_error=exc.text[:_MAX_ERROR_TEXT],
                  first_bad_line=bad[:500], points=moved, quarantined_total=self.store.quarantined_count,
                  suppressed=suppressed, store=str(self.store.path),
                  hint="the server refused these lines; they are kept in the store's quarantine, not retried")

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


def _refusal_hint(finished: bool, quarantined: int) -> str:
    if not finished:
        return "the server stopped answering while the batch was split; what is left stays in the store"
    if quarantined:
        return "split and re-sent; only the lines the server refused were quarantined (agentd keeps them)"
    return "split and re-sent: every line was accepted in smaller batches"


def _unexpected(exc: BaseException) -> WriteFailed:
    log.error("influx_writer_bug", error=repr(exc), hint="treated as a failed write: the batch is kept and retried")
    return WriteFailed(f"unexpected {type(exc).__name__}: {exc}")


@dataclass(slots=True)
class _Bisection:
    """One refused batch's bisection: requests left in its budget, requests made."""

    budget: int
    requests: int = 0


class _PerReason:
    """A rate limit for one kind of log line: the first line of each reason at once, then at
    most one per ``every_s``, which counts the lines suppressed since (a few hundred reasons
    are remembered, the oldest forgotten first)."""

    MAX_REASONS = 256

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # reason -> (logged at, suppressed since)

    def admit(self, reason: str, now: float) -> int | None:
        """None: do not log this one (it is counted); else log it, with this many suppressed."""
        last = self._last.get(reason)
        if last is not None and now - last[0] < self.every_s:
            self._last[reason] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self.MAX_REASONS:
            del self._last[next(iter(self._last))]
        self._last[reason] = (now, 0)
        return last[1] if last is not None else 0

# The parts of a server's error that differ from line to line: the quoted line, the count.
_QUOTED_LINE = re.compile(r"'(?:[^'\\]|\\.)*'")
_DROPPED = re.compile(r"\s*\bdropped=\d+")


def _reason(exc: WriteRejected) -> str:
    """What a refusal is about, the same for every line refused for the same cause."""
    return f"{exc.status} " + _DROPPED.sub("", _QUOTED_LINE.sub("'…'", exc.text))[:200]


def _split(batch: Batch) -> tuple[Batch, Batch]:
    """Two halves of ``batch`` in order (needs per-line ids)."""
    ids = batch.ids
    mid = batch.count // 2
    left = Batch(ids[0], ids[mid - 1], batch.lines[:mid], mid, ids[:mid])
    right = Batch(ids[mid], ids[-1], batch.lines[mid:], batch.count - mid, ids[mid:])
    return left, right
