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

Size bound: the used size is ``(page_count - freelist_count) * page_size`` (deleted rows leave
free pages that are reused; the file itself need not shrink). When it exceeds ``max_bytes`` the
oldest rows are deleted in chunks until it is under 90 % of the bound, counted in ``dropped``
(persisted in the ``meta`` table) and logged as a warning naming the store. The database uses
incremental auto-vacuum so that, once a large backlog has drained, the free pages are handed
back to the file system a few megabytes at a time.
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

__all__ = ["Batch", "Store", "StoreError"]

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
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

_DROP_CHUNK = 50_000          # rows per DELETE when enforcing the size bound
_VACUUM_CHUNK_PAGES = 1024    # pages handed back per enforce_bounds call (16 MiB at 16 KiB pages)
_VACUUM_MIN_FREE_PAGES = 1024  # only bother when at least this many pages (16 MiB) are free


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

    def enforce_bounds(self, now_ns: int, retention_s: float | None = None) -> int:
        """Apply retention (when given) and the size bound; returns the lines deleted.

        Retention (``retention_s``; the daemon passes it when no InfluxDB is configured) deletes
        lines whose timestamp is older than ``now_ns - retention_s``: expected ageing, not
        counted as dropped. The size bound deletes the oldest lines (quarantined ones first):
        data loss, counted in ``dropped`` and logged as a warning.
        """
        with self._lock:
            return self._enforce_bounds_unlocked(now_ns, retention_s)

    def _enforce_bounds_unlocked(self, now_ns: int, retention_s: float | None) -> int:
        removed = 0
        if retention_s is not None:
            removed += self._apply_retention(now_ns - int(retention_s * 1e9))
        used = self._size_bytes_unlocked()
        if used > self.max_bytes:
            removed += self._shrink_to(int(self.max_bytes * 0.9), used)
        self._maybe_vacuum()
        return removed

    def _apply_retention(self, cutoff_ns: int) -> int:
        conn = self._conn
        removed = 0
        try:
            while True:
                cur = conn.execute(
                    "DELETE FROM points WHERE id IN (SELECT id FROM points WHERE ts_ns < ? LIMIT ?)",
                    (cutoff_ns, _DROP_CHUNK))
                n = cur.rowcount
                removed += n
                self._backlog = max(0, self._backlog - n)
                if n < _DROP_CHUNK:
                    break
            cur = conn.execute("DELETE FROM quarantine WHERE ts_ns < ?", (cutoff_ns,))
            self._quarantined = max(0, self._quarantined - cur.rowcount)
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: retention failed: {exc}") from exc
        return removed

    def _shrink_to(self, target: int, used: int) -> int:
        """Delete the oldest rows (quarantined ones first) until the used size is <= target."""
        conn = self._conn
        dropped_quarantine = dropped_points = 0
        try:
            for _ in range(10_000):
                if used <= target:
                    break
                rows = self._backlog + self._quarantined
                if rows <= 0:
                    break
                # Estimate the rows to delete from the average row size; at least one chunk's worth
                # of progress, at most _DROP_CHUNK per statement.
                want = max(1, min(_DROP_CHUNK, int(rows * (used - target) / used) + 1))
                conn.execute("BEGIN")
                if self._quarantined:
                    cur = conn.execute(
                        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?)", (want,))
                    n_q = cur.rowcount
                else:
                    n_q = 0
                n_p = 0
                if n_q < want:
                    cur = conn.execute(
                        "DELETE FROM points WHERE id IN (SELECT id FROM points ORDER BY id LIMIT ?)", (want - n_q,))
                    n_p = cur.rowcount
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (self._dropped + n_q + n_p,))
                conn.execute("COMMIT")
                self._quarantined = max(0, self._quarantined - n_q)
                self._backlog = max(0, self._backlog - n_p)
                self._dropped += n_q + n_p
                dropped_quarantine += n_q
                dropped_points += n_p
                if n_q + n_p == 0:
                    break
                used = self._size_bytes_unlocked()
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"store {self.path}: size bound failed: {exc}") from exc
        total = dropped_quarantine + dropped_points
        if total:
            log.warning("store full: dropped oldest data", store=str(self.path), dropped=total,
                        dropped_pending=dropped_points, dropped_quarantined=dropped_quarantine,
                        max_bytes=self.max_bytes, used_bytes=used, dropped_total=self._dropped,
                        hint="InfluxDB unreachable for long, or store.max_bytes too small")
        return total

    def _maybe_vacuum(self) -> None:
        cur = self._conn.cursor()
        try:
            free = cur.execute("PRAGMA freelist_count").fetchone()[0]
            if free < _VACUUM_MIN_FREE_PAGES:
                return
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            if free * 4 < pages:  # less than a quarter free: keep the pages for reuse
                return
            # executescript steps the pragma to completion (execute() frees a single page).
            self._conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_CHUNK_PAGES})")
        except sqlite3.Error as exc:
            log.warning("store incremental vacuum failed", store=str(self.path), error=str(exc))
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
