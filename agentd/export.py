"""Reading the local store out: line protocol, CSV or JSON, and a replay into an InfluxDB.

``agentd export`` (``agentd.export_cli``) is the embedded database's query tool for people who
have no InfluxDB: what the store holds, as it holds it (line protocol), or in a form a
spreadsheet, pandas or jq reads (CSV, JSON Lines). ``agentd export --to URL`` ships the same
selection to a server later, through the forwarder of the daemon (``agentd.influx``: the same
writers, batch size, gzip, pipelining, bisection of a refused batch), but as a copy: the
source's ``ack`` only moves a cursor, so nothing is deleted from the store, and a replay can be
run again (writes are idempotent: same series + timestamp overwrite).

Everything here reads through ``agentd.store.StoreReader`` (read-only, short transactions), so
it is safe beside a running daemon. An export stops at the newest row that existed when it
began, so it ends while the daemon keeps appending; rows the daemon deletes meanwhile (shipped
by its forwarder, aged out by retention) are not met.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from agentd.config import parse_duration_s
from agentd.influx import Forwarder, Writer
from agentd.store import Batch, PointFilter, StoredRow, StoreError, StoreReader
from collectors.lineproto_parse import FieldValue, LineProtocolError, parse_line

__all__ = ["FORMATS", "ExportStats", "ReplayResult", "ReplaySource", "TimeBoundError", "export_points",
           "parse_time_bound", "point_object", "replay", "rfc3339_ns"]

FORMATS = ("lp", "csv", "json")
_CSV_FIXED = ("time", "timestamp_ns", "measurement")

BadLine = Callable[[int, str, str], None]  # (row id, line, error): told about a line that does not parse


class TimeBoundError(ValueError):
    """A --since / --until value that is neither a positive duration nor a timestamp with a zone."""


def parse_time_bound(value: str, now_ns: int, option: str) -> int:
    """``value`` as epoch ns: a duration back from ``now_ns`` (``1h``, ``30m``, ``90``: seconds,
    as agentd.config.parse_duration_s reads them) or an RFC 3339 timestamp with its zone
    (``2026-12-01T10:00:00Z``, ``...+01:00``).

    Zero and negative durations are refused: ``--since 0s`` selects nothing, and a negative one
    is a typo for a positive one more often than a request for the future. A timestamp without a
    zone is refused rather than guessed (UTC and local time differ by hours).
    """
    text = value.strip()
    if text.startswith("-"):
        raise TimeBoundError(f"{option} {value!r}: a duration must be positive (e.g. {option} 1h: "
                             "the last hour)")
    try:
        seconds = parse_duration_s(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if seconds <= 0:
            raise TimeBoundError(f"{option} {value!r}: a duration must be positive (e.g. {option} 1h: "
                                 "the last hour)")
        return now_ns - int(seconds * 1e9)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise TimeBoundError(f"{option} {value!r}: expected a duration back from now (30m, 1h, 7d) or an "
                             "RFC 3339 time with its zone (2026-12-01T10:00:00Z)") from None
    if stamp.tzinfo is None:
        raise TimeBoundError(f"{option} {value!r}: give the time zone (append Z for UTC, or +01:00): a "
                             "time without one is ambiguous")
    whole = math.floor(stamp.timestamp())
    return whole * 1_000_000_000 + stamp.microsecond * 1000


def rfc3339_ns(ts_ns: int) -> str:
    """``2026-12-01T10:00:00.123456789Z`` (UTC, nanoseconds kept: a CSV column people read)."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns:09d}Z"


def point_object(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue],
                 ts_ns: int) -> dict[str, object]:
    """One point as JSON: ``{"name", "tags", "fields", "timestamp_ns"}`` (Telegraf's json
    serializer's shape, with the unit in the timestamp's name). Integers stay integers."""
    return {"name": measurement, "tags": tags, "fields": fields, "timestamp_ns": ts_ns}


@dataclass(slots=True)
class ExportStats:
    """What an export wrote."""

    points: int = 0      # rows written
    unparsed: int = 0    # rows left out of a csv/json export because they do not parse (told to on_bad)
    measurements: dict[str, int] = field(default_factory=dict)  # csv/json: points per measurement


def _parsed(rows: list[StoredRow], stats: ExportStats,
            on_bad: BadLine) -> Iterator[tuple[str, dict[str, str], dict[str, FieldValue], int]]:
    """Each row parsed (measurement, tags, fields, ts_ns); a row that does not parse is counted
    and told to ``on_bad``, never dropped in silence."""
    for row_id, ts_ns, line in rows:
        try:
            measurement, tags, fields, ts = parse_line(line)
        except LineProtocolError as exc:
            stats.unparsed += 1
            on_bad(row_id, line, str(exc))
            continue
        yield measurement, tags, fields, ts if ts is not None else ts_ns


def _csv_value(value: FieldValue | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if not isinstance(value, float) else repr(value)


def export_points(reader: StoreReader, flt: PointFilter, fmt: str, out: TextIO, *,
           on_bad: BadLine | None = None, max_id: int | None = None) -> ExportStats:
    """Write the points ``flt`` selects to ``out`` in ``fmt`` (``lp``, ``csv`` or ``json``).

    ``lp``: the lines as stored, one a line. ``json``: JSON Lines, one ``point_object`` a line
    (a stream that jq and pandas read without holding it all). ``csv``: one header, then a row a
    point: ``time`` (RFC 3339 UTC), ``timestamp_ns``, ``measurement``, every tag key, every field
    key (each sorted; empty where a point has none); that takes two passes over the rows (the
    first collects the columns), each in short read transactions. A name used as a tag somewhere
    and as a field elsewhere (or equal to a fixed column) gets ``tag:`` / ``field:`` in front.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    stats = ExportStats()
    bad: BadLine = on_bad or (lambda _id, _line, _err: None)
    top = reader.top_id() if max_id is None else max_id
    if fmt == "lp":
        for rows in reader.chunks(flt, top):
            out.write("".join(line + "\n" for _, _, line in rows))
            stats.points += len(rows)
        return stats
    if fmt == "json":
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for rows in reader.chunks(flt, top):
            text = []
            for point in _parsed(rows, stats, bad):
                text.append(dumps(point_object(*point)) + "\n")
                _counted(stats, point[0])
            out.write("".join(text))
        return stats
    return _export_csv(reader, flt, out, stats, bad, top)


def _counted(stats: ExportStats, measurement: str) -> None:
    stats.points += 1
    stats.measurements[measurement] = stats.measurements.get(measurement, 0) + 1


def _export_csv(reader: StoreReader, flt: PointFilter, out: TextIO, stats: ExportStats, bad: BadLine,
                top: int) -> ExportStats:
    tag_keys: set[str] = set()
    field_keys: set[str] = set()
    first = ExportStats()  # the first pass's errors are the second's: told once, from the second
    for rows in reader.chunks(flt, top):
        for _m, tags, fields, _ts in _parsed(rows, first, lambda _id, _line, _err: None):
            tag_keys.update(tags)
            field_keys.update(fields)
    fixed = set(_CSV_FIXED)
    tag_cols = {k: (f"tag:{k}" if k in fixed or k in field_keys else k) for k in sorted(tag_keys)}
    field_cols = {k: (f"field:{k}" if k in fixed or k in tag_keys else k) for k in sorted(field_keys)}
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_CSV_FIXED, *tag_cols.values(), *field_cols.values()])
    for rows in reader.chunks(flt, top):
        for measurement, tags, fields, ts in _parsed(rows, stats, bad):
            unknown = (tags.keys() - tag_cols.keys()) | (fields.keys() - field_cols.keys())
            if unknown:  # a row the first pass did not see (salvaged into the store meanwhile)
                raise StoreError(f"store {reader.path} changed during the export (keys {sorted(unknown)} "
                                 "appeared between the two passes); run the export again")
            writer.writerow([rfc3339_ns(ts), ts, measurement,
                             *(tags.get(k, "") for k in tag_cols), *(_csv_value(fields.get(k)) for k in field_cols)])
            _counted(stats, measurement)
    return stats


# -- replay into an InfluxDB ----------------------------------------------------------------

class ReplaySource:
    """The forwarder's ``BatchSource`` over a store reader: a copy, never a move.

    ``ack`` moves a cursor past the batch (nothing is deleted); ``quarantine`` (the server
    refused those lines) counts them and keeps the server's first reason (the store is not
    written either). ``exhausted`` turns true when the forwarder asks for the oldest batch with
    nothing in flight and none is left: the replay is complete.
    """

    def __init__(self, reader: StoreReader, flt: PointFilter, max_id: int, total: int) -> None:
        self.path: Path = reader.path
        self._reader = reader
        self._flt = flt
        self._max_id = max_id
        self._total = total
        self._cursor = reader.first_id(flt)
        self._lock = threading.Lock()
        self.shipped = 0
        self.refused = 0
        self.first_refusal: str | None = None
        self.read_error: str | None = None
        self.exhausted = False

    def oldest(self, limit: int, *, after_id: int | None = None) -> Batch | None:
        with self._lock:
            start = self._cursor if after_id is None else after_id
        try:
            rows = self._reader.read(self._flt, start, limit, self._max_id)
        except StoreError as exc:
            self.read_error = str(exc)
            raise
        if not rows:
            if after_id is None:  # nothing in flight, nothing left
                self.exhausted = True
            return None
        return Batch(rows[0][0], rows[-1][0], [r[2] for r in rows], len(rows), [r[0] for r in rows])

    def ack(self, batch: Batch) -> None:
        with self._lock:
            self._cursor = max(self._cursor, batch.last_id)
            self.shipped += batch.count

    def quarantine(self, batch: Batch, reason: str) -> int:
        with self._lock:
            self._cursor = max(self._cursor, batch.last_id)
            self.refused += batch.count
            if self.first_refusal is None:
                self.first_refusal = reason
        return batch.count

    def backlog(self) -> int:
        """Points of the selection not yet shipped or refused (for the forwarder's log lines)."""
        return max(0, self._total - self.shipped - self.refused)

    def size_bytes(self) -> int:
        return 0  # nothing is held: the store is the reader's, untouched

    @property
    def quarantined_count(self) -> int:
        return self.refused


@dataclass(slots=True)
class ReplayResult:
    """How a replay ended: ``complete`` when every selected point was shipped or refused."""

    selected: int
    shipped: int
    refused: int
    complete: bool
    seconds: float
    error: str | None = None          # why it stopped early (the last write error, a read error)
    first_refusal: str | None = None  # the server's reason for the first refused lines

    @property
    def ok(self) -> bool:
        return self.complete and not self.refused


async def replay(reader: StoreReader, flt: PointFilter, writer: Writer, *, batch_size: int,
                 backoff_max: float = 60.0, retries: int = 3,
                 monotonic: Callable[[], float] = time.monotonic) -> ReplayResult:
    """Ship the points ``flt`` selects through a ``Forwarder`` (pipelined, gzip, bisection of
    refused batches) and return when all are shipped, or when a write failed ``retries`` + 1
    times in a row (with the forwarder's own backoff between tries).

    The forwarder runs until its ``stop`` is set; it waits only in its ``sleep``, which is handed
    one that ends the run when the source is exhausted (an idle wait) or the retries are spent.
    The writer is not closed here (its owner does).
    """
    top = reader.top_id()
    total = reader.count(flt, top)
    source = ReplaySource(reader, flt, top, total)
    stop = asyncio.Event()
    tries_left = max(0, int(retries))
    forwarder: Forwarder | None = None

    async def sleep(delay_s: float) -> None:
        nonlocal tries_left
        backing_off = forwarder is not None and forwarder.backing_off.is_set()
        if not source.exhausted and backing_off and tries_left > 0:
            tries_left -= 1
            await asyncio.sleep(delay_s)
            return
        stop.set()  # done (an idle wait), out of retries, or the store could not be read

    started = monotonic()
    forwarder = Forwarder(source, writer, batch_size=batch_size, backoff_max=backoff_max, sleep=sleep,
                          monotonic=monotonic)
    await forwarder.run(stop)
    error = None
    if not source.exhausted:
        error = source.read_error or forwarder.last_error or "stopped before the end"
    return ReplayResult(selected=total, shipped=source.shipped, refused=source.refused,
                        complete=source.exhausted, seconds=monotonic() - started, error=error,
                        first_refusal=source.first_refusal)
