"""The local store: line protocol in SQLite (WAL), the embedded default and the outage buffer.

Every tick appends its encoded lines in one transaction. With InfluxDB configured the forwarder
reads the oldest batch, ships it, and deletes it only after a 2xx (``ack``); a batch the server
refuses (4xx) is moved to the ``quarantine`` table (kept for inspection, counted, never retried
forever). Without InfluxDB the store is where readings live, bounded by retention and size.

Why SQLite in WAL mode: a committed append survives a crash of the process (kill -9, OOM) and
WAL recovery at the next open is automatic; ``synchronous=NORMAL`` skips the fsync per commit
(a power cut may lose the last few ticks, never corrupt the file), so an append costs tens of
microseconds. Rows are keyed by an ``AUTOINCREMENT`` id, so ids are never reused even when the
table empties: a batch taken before a size-cap purge can never ack rows appended after it.

Bounds (``enforce_bounds``, called every tick): retention and the size bound are one bounded
maintenance step per call, not a purge, so they never stall the tick. Each call deletes at most
``max_rows`` rows (oldest first, by index: ~2 us a row, so the default 1000 costs ~2-3 ms on a
2-core VM) and hands back at most ``_VACUUM_STEP_PAGES`` free pages; a store within its bounds
costs a few index lookups and two header pragmas (tens of microseconds), never a table scan.
The budget must exceed what a tick appends (64 GPUs at 20 Hz append ~66 rows a tick; the daemon
passes at least twice the tick's lines), so an over-full store converges: a 1 GiB store 10 %
over its bound (~300k rows) is back within it in ~300 ticks. Not bounded here yet: SQLite's
automatic WAL checkpoint, which runs inside whichever commit takes the WAL past 1000 pages
(16 MiB; ~80 ms on a 1 GiB store on a small VM, every ~25 ticks while converging), and the WAL's
size is not counted in the size bound; both belong in this step next.

Size bound: the used size is ``(page_count - freelist_count) * page_size`` (deleted rows leave
free pages that are reused; the file itself need not shrink). Above ``max_bytes`` the oldest rows
are deleted (quarantined ones first) towards 90 % of the bound, at most ``max_rows`` per call:
data loss, counted in ``dropped`` (persisted in the ``meta`` table) and logged as a warning
naming the store, at most once a minute. Retention is expected ageing and is not counted. The
database uses incremental auto-vacuum so that, once a large backlog has drained, the free pages
are handed back to the file system a megabyte per call.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import structlog

from agentd.lineproto import escape_measurement

log = structlog.get_logger("agentd.store")

__all__ = ["BOUNDS_MAX_ROWS", "Batch", "BoundsStep", "Store", "StoreError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ns INTEGER NOT NULL,
    line  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS points_ts ON points (ts_ns);
CREATE TABLE IF NOT EXISTS quarantine (
    id             INTEGER PRIMARY KEY,
    ts_ns          INTEGER NOT NULL,
    line           TEXT NOT NULL,
    reason         TEXT NOT NULL,
    quarantined_ns INTEGER NOT NULL
);
-- Retention runs every tick: without this index each call would scan the quarantine. Files
-- made before it existed get it here, at the next open (the schema runs on every open).
CREATE INDEX IF NOT EXISTS quarantine_ts ON quarantine (ts_ns);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

BOUNDS_MAX_ROWS = 1000         # rows one enforce_bounds call may delete, by default (~2-3 ms)
_SIZE_TARGET = 0.9             # above max_bytes, delete towards this fraction of it (hysteresis)
_VACUUM_STEP_PAGES = 64        # free pages handed back per call (1 MiB at 16 KiB pages, ~3 ms)
_VACUUM_MIN_FREE_PAGES = 256   # only bother when at least this many pages (4 MiB) are free
_DROP_WARN_EVERY_NS = 60 * 10**9  # one "store full" warning a minute, with the count since the last


class StoreError(Exception):
    """The store cannot be opened or written; the message names the file and what to do."""


@dataclass(slots=True)
class Batch:
    """The oldest pending lines, ``first_id``..``last_id`` inclusive, in insertion order."""

    first_id: int
    last_id: int
    lines: list[str]
    count: int = field(default=0)
    ids: list[int] = field(default_factory=list)  # per-line ids (lets the forwarder split a batch)

    def __post_init__(self) -> None:
        if not self.count:
            self.count = len(self.lines)

    def body(self) -> str:
        """The batch as one line protocol request body."""
        return "\n".join(self.lines)


@dataclass(slots=True)
class BoundsStep:
    """What one ``enforce_bounds`` call did, and whether the store is now within its bounds."""

    aged: int = 0                 # lines deleted by retention (expected; not counted as dropped)
    dropped: int = 0              # lines deleted by the size bound (data loss; in ``Store.dropped``)
    dropped_quarantined: int = 0  # of ``dropped``, those taken from the quarantine
    vacuumed_pages: int = 0       # free pages handed back to the file system
    used_bytes: int = 0           # the used size after the step
    within_bounds: bool = True    # False: more work is left for the next calls

    @property
    def deleted(self) -> int:
        """All lines this call deleted."""
        return self.aged + self.dropped


class Store:
    """Line protocol lines with their timestamps, oldest first (see the module docstring)."""

    def __init__(self, path: Path | str, *, max_bytes: int = 1_073_741_824) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        # One connection, used from the event loop and from the forwarder's worker thread; the
        # lock keeps each public operation (and its transaction) whole.
        self._lock = threading.RLock()
        self._conn = self._open()
        cur = self._conn.cursor()
        self._page_size = cur.execute("PRAGMA page_size").fetchone()[0]
        self._backlog = cur.execute("SELECT count(*) FROM points").fetchone()[0]
        self._quarantined = cur.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        row = cur.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0
        cur.close()
        self._unwarned = self._unwarned_q = 0  # size-bound drops (of which quarantined) not yet warned
        self._warned_ns: int | None = None  # when the last "store full" warning was logged

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store {self.path}: cannot create directory {directory}: {exc.strerror} "
                             "(create it and make it writable by the agentd user, or set state_dir)") from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.path}: directory {directory} is not writable by this user "
                             "(SQLite needs to create its -wal and -shm files there; fix the ownership or "
                             "set state_dir)")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Page size and auto_vacuum take effect only on a new file (no-ops on an existing one).
            # 16 KiB pages make the bulk delete after a 2xx markedly cheaper than 4 KiB ones.
            conn.execute("PRAGMA page_size = 16384")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"store {self.path}: cannot switch to WAL mode (got {mode!r}); "
                                 "is the file system a network mount?")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL to 64 MiB
            conn.execute("PRAGMA cache_size = -16384")            # 16 MiB page cache
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {self.path}: cannot open: {exc} (if the file is damaged, move it "
                             "aside; the daemon creates a new one)") from exc
        return conn

    # -- the tick --------------------------------------------------------------------------

    def append(self, lines: Sequence[tuple[int, str]]) -> None:
        """Append ``(ts_ns, line)`` pairs in one transaction (called once per tick)."""
        if not lines:
            return
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO points (ts_ns, line) VALUES (?, ?)", lines)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"store {self.path}: append failed: {exc}") from exc
            self._backlog += len(lines)

    # -- the forwarder ---------------------------------------------------------------------

    def oldest(self, limit: int, *, after_id: int | None = None) -> Batch | None:
        """The oldest ``limit`` pending lines (after ``after_id`` when given), or None when none are."""
        with self._lock:
            if after_id is None:
                rows = self._conn.execute("SELECT id, line FROM points ORDER BY id LIMIT ?",
                                          (int(limit),)).fetchall()
            else:
                rows = self._conn.execute("SELECT id, line FROM points WHERE id > ? ORDER BY id LIMIT ?",
                                          (int(after_id), int(limit))).fetchall()
        if not rows:
            return None
        return Batch(rows[0][0], rows[-1][0], [r[1] for r in rows], len(rows), [r[0] for r in rows])

    def ack(self, batch: Batch) -> None:
        """Delete everything through ``batch.last_id`` (the server answered 2xx)."""
        with self._lock:
            try:
                cur = self._conn.execute("DELETE FROM points WHERE id <= ?", (batch.last_id,))
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: ack failed: {exc}") from exc
            self._backlog = max(0, self._backlog - cur.rowcount)

    def quarantine(self, batch: Batch, reason: str) -> int:
        """Move the batch into the ``quarantine`` table with ``reason``; returns the rows moved."""
        with self._lock:
            return self._quarantine_unlocked(batch, reason)

    def _quarantine_unlocked(self, batch: Batch, reason: str) -> int:
        conn = self._conn
        now = time.time_ns()
        try:
            conn.execute("BEGIN")
            cur = conn.execute(
                "INSERT OR REPLACE INTO quarantine (id, ts_ns, line, reason, quarantined_ns) "
                "SELECT id, ts_ns, line, ?, ? FROM points WHERE id <= ?", (reason, now, batch.last_id))
            moved = cur.rowcount
            cur = conn.execute("DELETE FROM points WHERE id <= ?", (batch.last_id,))
            deleted = cur.rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"store {self.path}: quarantine failed: {exc}") from exc
        self._backlog = max(0, self._backlog - deleted)
        self._quarantined += moved
        return moved

    # -- figures ---------------------------------------------------------------------------

    def backlog(self) -> int:
        """Lines waiting to be shipped (or, with no InfluxDB, held)."""
        return self._backlog

    @property
    def dropped(self) -> int:
        """Lines deleted by the size bound since the store was created (persisted)."""
        return self._dropped

    @property
    def quarantined_count(self) -> int:
        """Lines held in the quarantine table."""
        return self._quarantined

    def size_bytes(self) -> int:
        """Bytes in use by the database (pages in use; free pages are reused and not counted)."""
        with self._lock:
            return self._size_bytes_unlocked()

    def _size_bytes_unlocked(self) -> int:
        cur = self._conn.cursor()
        pages = cur.execute("PRAGMA page_count").fetchone()[0]
        free = cur.execute("PRAGMA freelist_count").fetchone()[0]
        cur.close()
        return (pages - free) * self._page_size

    def enforce_bounds(self, now_ns: int, retention_s: float | None = None, *,
                       max_rows: int = BOUNDS_MAX_ROWS) -> BoundsStep:
        """One bounded maintenance step: retention, then the size bound, then a little vacuum.

        Called every tick, so a bound holds within a tick or two instead of a minute, and the
        cost of any one call is bounded: at most ``max_rows`` lines are deleted (retention's
        first, from the budget), and only a call that had rows to spare hands back free pages,
        at most ``_VACUUM_STEP_PAGES``. A store far over a bound converges over successive calls
        as long as ``max_rows`` exceeds what is appended between them. Within bounds, a call
        does no writes and no table scans.

        Retention (``retention_s``; the daemon passes it when no InfluxDB is configured) deletes
        the lines (quarantined ones too) stamped before ``now_ns - retention_s``, oldest first:
        expected ageing, not counted as dropped. The size bound deletes the oldest lines,
        quarantined ones first: data loss, counted in ``dropped`` and warned about (rate
        limited on ``now_ns``). Raises StoreError when the database cannot be written.
        """
        with self._lock:
            step = BoundsStep()
            cutoff = None if retention_s is None else now_ns - int(retention_s * 1e9)
            try:
                self._delete_step(step, cutoff, max(0, int(max_rows)))
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"store {self.path}: enforcing retention / size bound failed: {exc} "
                                 "(check free space and permissions in the state directory)") from exc
            if step.dropped:
                self._warn_dropped(now_ns, step)
            if step.deleted < max_rows:  # one costly stage per call: rows first, then pages
                step.vacuumed_pages = self._vacuum_step()
            step.used_bytes = self._size_bytes_unlocked()
            step.within_bounds = step.used_bytes <= self.max_bytes and not self._has_aged(cutoff)
            return step

    def _delete_step(self, step: BoundsStep, cutoff: int | None, budget: int) -> None:
        """Up to ``budget`` deletes in one transaction; nothing is written when there is no work."""
        conn = self._conn
        aged = self._has_aged(cutoff)
        if not budget or (not aged and self._size_bytes_unlocked() <= self.max_bytes):
            return
        aged_q = aged_p = drop_q = drop_p = 0
        conn.execute("BEGIN")
        if aged:  # the ts index gives the oldest; quarantined lines first, both from one budget
            aged_q = self._delete_where("quarantine", "WHERE ts_ns < ? ORDER BY ts_ns", (cutoff,), budget)
            aged_p = self._delete_where("points", "WHERE ts_ns < ? ORDER BY ts_ns", (cutoff,), budget - aged_q)
        budget -= aged_q + aged_p
        used = self._size_bytes_unlocked()
        if budget and used > self.max_bytes:
            rows = self._backlog + self._quarantined - aged_q - aged_p
            # Rows to reach the target, from the average row size; the next call corrects it.
            want = min(budget, max(1, -(-rows * (used - int(self.max_bytes * _SIZE_TARGET)) // used)))
            drop_q = self._delete_where("quarantine", "ORDER BY id", (), want)
            drop_p = self._delete_where("points", "ORDER BY id", (), want - drop_q)
            conn.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (self._dropped + drop_q + drop_p,))
        conn.execute("COMMIT")
        self._quarantined = max(0, self._quarantined - aged_q - drop_q)
        self._backlog = max(0, self._backlog - aged_p - drop_p)
        self._dropped += drop_q + drop_p
        step.aged, step.dropped, step.dropped_quarantined = aged_q + aged_p, drop_q + drop_p, drop_q

    def _has_aged(self, cutoff: int | None) -> bool:
        """Whether any line is stamped before ``cutoff`` (two index lookups)."""
        if cutoff is None:
            return False
        conn = self._conn
        return any(conn.execute(f"SELECT 1 FROM {table} WHERE ts_ns < ? LIMIT 1", (cutoff,)).fetchone()
                   for table in ("quarantine", "points"))

    def _delete_where(self, table: str, where_order: str, params: tuple, n: int) -> int:
        """Delete the first ``n`` rows of ``table`` in ``where_order`` (an indexed order); returns them.

        By id is the order of appending (the id is the rowid); by ts_ns uses the ts index.
        """
        if n <= 0:
            return 0
        cur = self._conn.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} {where_order} LIMIT ?)", (*params, n))
        return cur.rowcount

    def _warn_dropped(self, now_ns: int, step: BoundsStep) -> None:
        """Say so loudly, but once a minute: the daemon calls every tick while the store is full.

        The first drop is logged at once; later ones are summed into the next warning.
        """
        self._unwarned += step.dropped
        self._unwarned_q += step.dropped_quarantined
        if self._warned_ns is not None and now_ns - self._warned_ns < _DROP_WARN_EVERY_NS:
            return
        log.warning("store_full_dropped_oldest", store=str(self.path), dropped=self._unwarned,
                    dropped_quarantined=self._unwarned_q, dropped_total=self._dropped,
                    max_bytes=self.max_bytes, used_bytes=self._size_bytes_unlocked(),
                    hint="InfluxDB unreachable for long, or store.max_bytes too small")
        self._unwarned = self._unwarned_q = 0
        self._warned_ns = now_ns

    def _vacuum_step(self) -> int:
        """Hand back at most ``_VACUUM_STEP_PAGES`` free pages when many are free; returns them."""
        cur = self._conn.cursor()
        try:
            free = cur.execute("PRAGMA freelist_count").fetchone()[0]
            if free < _VACUUM_MIN_FREE_PAGES:
                return 0
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            if free * 4 < pages:  # less than a quarter free: keep the pages for reuse
                return 0
            # executescript steps the pragma to completion (execute() frees a single page).
            self._conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES})")
            return pages - cur.execute("PRAGMA page_count").fetchone()[0]
        except sqlite3.Error as exc:
            log.warning("store_vacuum_failed", store=str(self.path), error=str(exc))
            return 0
        finally:
            cur.close()

    # -- reading (demo, tests) -------------------------------------------------------------

    def query(self, measurement: str | None = None, since_ns: int | None = None,
              limit: int | None = None) -> list[str]:
        """Pending lines, in insertion order; with ``limit``, the newest ``limit`` of them."""
        with self._lock:
            return self._query_unlocked(measurement, since_ns, limit)

    def _query_unlocked(self, measurement: str | None = None, since_ns: int | None = None,
              limit: int | None = None) -> list[str]:
        where, params = [], []
        if measurement is not None:
            prefix = escape_measurement(measurement)
            where.append("substr(line, 1, ?) IN (?, ?)")
            params += [len(prefix) + 1, prefix + ",", prefix + " "]
        if since_ns is not None:
            where.append("ts_ns >= ?")
            params.append(int(since_ns))
        sql = "SELECT id, line FROM points"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if limit is not None:
            sql = f"SELECT line FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params.append(int(limit))
        else:
            sql = f"SELECT line FROM ({sql}) ORDER BY id"
        return [r[0] for r in self._conn.execute(sql, params)]

    def quarantined(self, limit: int | None = None) -> list[tuple[str, str]]:
        """Quarantined ``(line, reason)`` pairs, oldest first."""
        with self._lock:
            return self._quarantined_unlocked(limit)

    def _quarantined_unlocked(self, limit: int | None = None) -> list[tuple[str, str]]:
        sql = "SELECT line, reason FROM quarantine ORDER BY id"
        params: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (int(limit),)
        return [(r[0], r[1]) for r in self._conn.execute(sql, params)]

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the WAL and close (safe to call twice)."""
        with self._lock:
            return self._close_unlocked()

    def _close_unlocked(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        conn.close()
        self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
