"""The local store: line protocol in SQLite (WAL), the embedded default and the outage buffer.

Every tick appends its encoded lines in one transaction. With InfluxDB configured the forwarder
reads the oldest batch, ships it, and deletes it only after a 2xx (``ack``); a batch the server
refuses (4xx) is moved to the ``quarantine`` table (kept for inspection, counted, never retried
forever). Without InfluxDB the store is where readings live, bounded by retention and size.

Why SQLite in WAL mode: a committed append survives a crash of the process (kill -9, OOM) and
WAL recovery at the next open is automatic; ``synchronous=NORMAL`` skips the fsync per commit
(a power cut may lose the last few ticks, never corrupt the file), so an append costs tens of
microseconds. Rows are keyed by an ``AUTOINCREMENT`` id, so ids are never reused even when the
table empties: a batch taken before a size-cap purge can never ack rows appended after it (and
``ack`` deletes exactly the batch's rows).

Checkpoints are off the event loop. SQLite's automatic checkpoint runs inside whichever commit
takes the WAL past its threshold: the tick's append, on the loop (~80 ms on a 1 GiB store on a
small VM). So the writer connection has ``wal_autocheckpoint = 0`` and the store's own
checkpointer thread, on its own connection, runs a PASSIVE checkpoint (which never blocks the
writer in WAL mode) whenever the WAL passes ``checkpoint_bytes`` (1/256 of the bound or of the
file system, whichever is smaller, between 64 KiB and 16 MiB); the bounds step wakes it at the
end of each tick's writes, so a pass has the whole interval before the next commit. The WAL's
allowance is four thresholds; ``journal_size_limit`` cuts its file back to that when the WAL
starts over. Should the thread fall behind (or be off), the bounds step checkpoints inline once
the WAL is over its allowance: slower ticks rather than a full disk.

Bounds (``enforce_bounds``, called every tick): retention and the size bound are one bounded
maintenance step per call, not a purge, so they never stall the tick. Each call deletes at most
``max_rows`` rows (oldest first, by index: ~2 us a row, so the default 1000 costs ~2-3 ms on a
2-core VM) and hands back at most ``_VACUUM_STEP_PAGES`` free pages; a store within its bounds
costs a few index lookups, two header pragmas, three stats and a statvfs (tens of microseconds),
never a table scan. The budget must exceed what a tick appends (64 GPUs at 20 Hz append ~66
rows a tick; the daemon passes at least twice the tick's lines), so an over-full store
converges: a 1 GiB store 10 % over its bound (~300k rows) is back within it in ~300 ticks.

Size bound: ``size_bytes()`` is what the store holds: the database pages in use
(``(page_count - freelist_count) * page_size``; deleted rows leave free pages that are reused)
plus the WAL file. The rows get ``max_bytes`` less the WAL's allowance and the free-space
reserve (below), so the files stay within ``max_bytes``; above that the oldest rows are deleted
(quarantined ones first) towards 90 % of it, at most ``max_rows`` per call: data loss, counted
in ``dropped`` (persisted in the ``meta`` table) and logged as a warning naming the store, at
most once a minute. Retention is expected ageing and is not counted. The database uses incremental
auto-vacuum so that, once a large backlog has drained, the free pages are handed back to the
file system a megabyte per call.

A full disk: the rows may also not outgrow the free space of the file system, less what the
WAL may still need and ``_DISK_HEADROOM`` for the next commits, so on a small state directory
the oldest are dropped before the disk fills, a few pages' worth a call, as for ``max_bytes``
(warned with ``reason="disk"``). When the disk fills anyway (another process took the space),
an append (or a bounds step) that gets SQLITE_FULL frees space in the same call -- releases
the reserve file (``store.sqlite-reserve``, kept so that a checkpoint can still complete on a
full disk), checkpoints, deletes the oldest rows -- and retries, a bounded number of times: the
newest readings are kept, the oldest dropped, counted (``dropped``, ``disk_full_events``) and
logged as an error. The reserve is made again once there is room.

Damage: a store that SQLite reports malformed (SQLITE_CORRUPT / SQLITE_NOTADB) at the open --
where a quick check runs for at most ``check_s`` -- or in any later call is moved aside with its
-wal and -shm (``store.sqlite.damaged-<UTC time>``, logged as an error naming it), a fresh store
takes its place at once (so the tick and the forwarder carry on), and a thread salvages what is
readable of the damaged copy into it: the rows in id order, skipping the damaged pages by
seeking past them, with their ids (below every new one), so the oldest stay first. A batch in
flight when the damage was met may be shipped again (replays are idempotent). A daemon stopped
while salvaging resumes at the next open (``<copy>.salvage`` records the progress). The two
newest damaged copies are kept for inspection.

Versions: the schema carries ``PRAGMA user_version`` (``SCHEMA_VERSION``). An older store is
migrated in place at the open (its data kept); a newer one is refused, untouched, with a
message naming both versions and what to do.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agentd.lineproto import escape_measurement
from agentd.store_salvage import MAX_ID, open_damaged, readable_rows, readable_top

log = structlog.get_logger("agentd.store")

__all__ = ["BOUNDS_MAX_ROWS", "SCHEMA_VERSION", "Batch", "BoundsStep", "CheckpointStats", "PointFilter", "Store",
           "StoreError", "StoreInfo", "StoreNotFound", "StoreReader"]

SCHEMA_VERSION = 1  # PRAGMA user_version of the files this code writes

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
-- Retention runs every tick: without this index each call would scan the quarantine.
CREATE INDEX IF NOT EXISTS quarantine_ts ON quarantine (ts_ns);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Migrations: _MIGRATIONS[v] takes a store from version v to v + 1, in one transaction with the
# version bump. Version 0 is every file made before the version existed (agentd 0.1: the same
# tables, without quarantine_ts in the earliest); creating what is missing is its migration.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA}

BOUNDS_MAX_ROWS = 1000         # rows one enforce_bounds call may delete, by default (~2-3 ms)
_SIZE_TARGET = 0.9             # above the bound, delete towards this fraction of it (hysteresis)
_VACUUM_STEP_PAGES = 64        # free pages handed back per call (1 MiB at 16 KiB pages, ~3 ms)
_VACUUM_MIN_FREE_PAGES = 256   # only bother when at least this many pages (4 MiB) are free
_DROP_WARN_EVERY_NS = 60 * 10**9  # one "store full" warning a minute, with the count since the last

_CHECKPOINT_MIN = 64 * 1024        # WAL bytes that wake the checkpointer: at least this ...
_CHECKPOINT_MAX = 16 * 1024 * 1024  # ... at most this (SQLite's default, 1000 pages of 16 KiB) ...
_CHECKPOINT_SHARE = 256            # ... else 1/256 of min(max_bytes, file system size)
_WAL_ALLOWANCE = 4                 # the WAL may reach this many thresholds before the tick checkpoints
_CHECKPOINT_PASSES = 5             # passes checkpoint() makes to catch up with commits meanwhile
_CHECKPOINT_POLL_S = 1.0           # the checkpointer also looks this often without a wake-up
_INLINE_CHECKPOINT_WAIT_S = 0.1    # inline fallback: how long to wait for the thread's checkpoint
_DISK_HEADROOM = 512 * 1024        # free disk a disk-bound store keeps for the WAL's next commits
                                   # (a commit writes 5-25 pages of 16 KiB to the WAL)
_RESERVE_MIN = 256 * 1024          # the reserve file is at least this
_DISK_DROP_PAGES = 4               # a disk-bound delete takes this many pages' worth of rows a call
_FULL_RETRIES = 3                  # SQLITE_FULL on append: free space and retry this many times
_FULL_DROP_MIN = 200               # ... dropping at least this many rows (x4 each further try)

_OPEN_CHECK_S = 0.5      # quick_check budget at open: all of a cached 1 GiB store takes ~1.1 s
_SALVAGE_CHUNK = 1000    # rows per salvage transaction (a few ms under the store's lock)
_KEEP_DAMAGED = 2        # damaged copies kept for inspection (older ones are removed)

_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26

T = TypeVar("T")


STORE_FILE = "store.sqlite"  # the store's file name in state_dir (with -wal, -shm, -reserve beside it)

class StoreError(Exception):
    """The store cannot be opened or written; the message names the file and what to do."""


class _Damaged(Exception):
    """Internal: SQLite reported the file malformed while opening it."""


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_damage(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file itself is bad; retrying cannot help."""
    code = _code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _is_full(exc: BaseException) -> bool:
    code = _code(exc)
    return code == _SQLITE_FULL if code is not None else "disk is full" in str(exc)


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
    used_bytes: int = 0           # the used size after the step (``Store.size_bytes()``)
    within_bounds: bool = True    # False: more work is left for the next calls
    checkpointed: bool = False    # the WAL was over its allowance: checkpointed inline
    disk_limited: bool = False    # the free disk space, not max_bytes, set the bound

    @property
    def deleted(self) -> int:
        """All lines this call deleted."""
        return self.aged + self.dropped


@dataclass(slots=True)
class CheckpointStats:
    """The background checkpointer's work (for the bench and the agent's own telemetry)."""

    runs: int = 0             # checkpoints run by the thread
    inline: int = 0           # checkpoints the tick had to run itself (thread behind or off)
    failures: int = 0
    max_s: float = 0.0        # the longest one
    total_s: float = 0.0


@dataclass(slots=True, frozen=True)
class _Usage:
    """The store's bytes on disk and the room around it, read in a few microseconds."""

    db_used: int    # pages in use
    db_file: int    # all pages (the file's extent; free pages are reused before it grows)
    wal: int        # the WAL file
    free_disk: int  # available on the file system

    @property
    def total(self) -> int:
        """``size_bytes()``: the rows' pages and the WAL (the reserve is budgeted, not counted)."""
        return self.db_used + self.wal


class Store:
    """Line protocol lines with their timestamps, oldest first (see the module docstring).

    ``check_s`` bounds the quick check at open (0: none); ``checkpoint_thread=False`` leaves the
    checkpoints to whoever calls ``checkpoint()`` (tests), with the inline fallback still on.
    """

    def __init__(self, path: Path | str, *, max_bytes: int = 1_073_741_824, check_s: float = _OPEN_CHECK_S,
                 checkpoint_thread: bool = True) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._wal_path = Path(f"{self.path}-wal")
        self._shm_path = Path(f"{self.path}-shm")
        self._reserve_path = Path(f"{self.path}-reserve")
        # One connection, used from the event loop and from the forwarder's worker thread; the
        # lock keeps each public operation (and its transaction) whole. The checkpointer has its
        # own connection under its own lock (taken after the store lock, never before it).
        self._lock = threading.RLock()
        self._ckpt_lock = threading.Lock()
        self._ckpt_conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._ckpt_wake = threading.Event()
        self._ckpt_thread: threading.Thread | None = None
        self._salvage_thread: threading.Thread | None = None
        self._salvage_queue: list[Path] = []  # damaged copies to salvage, oldest first
        self._salvage_lock = threading.Lock()
        self._salvage_running = False
        self._unwarned = self._unwarned_q = 0  # size-bound drops (of which quarantined) not yet warned
        self._warned_ns: int | None = None  # when the last "store full" warning was logged
        self._full_warned_ns: int | None = None
        self._full_unwarned = 0  # rows dropped for a full disk, not yet in a log line
        self._ckpt_warned_ns: int | None = None
        self.checkpoint_stats = CheckpointStats()
        self.disk_full_events = 0   # appends and bounds steps that met a full disk (SQLITE_FULL)
        self.recoveries = 0         # damaged stores moved aside since this process opened it
        self.salvaged = 0           # rows copied from damaged copies into this store
        self.salvage_lost_ids = 0   # ids skipped over damaged pages (an upper bound on rows lost)
        self._backlog = self._quarantined = self._dropped = 0
        self._page_size = 16384
        self._check_directory()
        self._size_limits()
        aside = None
        try:
            self._conn = self._open_checked(check_s)
        except _Damaged as exc:
            aside = self._move_aside(f"at open: {exc}")
            self._conn = self._open_checked(0)
        self._load_counters()
        if aside is not None:
            self._carry_over(aside)
        self._ensure_reserve()
        self._salvage_queue.extend(self._pending_salvages())
        if self._salvage_queue:
            self._start_salvage()
        if checkpoint_thread:
            self._ckpt_thread = threading.Thread(target=self._checkpointer, name="store-checkpoint",
                                                 daemon=True)
            self._ckpt_thread.start()

    # -- opening ---------------------------------------------------------------------------

    def _check_directory(self) -> None:
        directory = self.path.parent
        read_only_hint = ("; under systemd's ProtectSystem=strict only StateDirectory= (/var/lib/agentd) and "
                          "ReadWritePaths= are writable: set state_dir under /var/lib/agentd or add "
                          f"ReadWritePaths={directory}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise StoreError(f"store {self.path}: cannot create directory {directory}: it is on a "
                                 f"read-only file system{read_only_hint}") from exc
            raise StoreError(f"store {self.path}: cannot create directory {directory}: {exc.strerror} "
                             "(create it and make it writable by the agentd user, or set state_dir)") from exc
        try:
            read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            raise StoreError(f"store {self.path}: directory {directory} is on a read-only file system"
                             f"{read_only_hint}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.path}: directory {directory} is not writable by this user "
                             "(SQLite needs to create its -wal and -shm files there; fix the ownership or "
                             "set state_dir)")

    def _size_limits(self) -> None:
        """The WAL threshold, its allowance and the reserve, from the bound and the file system.

        On a file system smaller than ``max_bytes`` the file system sets them: a 16 MiB WAL on a
        3 MB state directory would fill it before the first checkpoint.
        """
        try:
            st = os.statvfs(self.path.parent)
            fs_bytes = st.f_blocks * st.f_frsize
        except OSError:
            fs_bytes = self.max_bytes
        cap = min(self.max_bytes, fs_bytes) if fs_bytes > 0 else self.max_bytes
        self.checkpoint_bytes = max(_CHECKPOINT_MIN, min(_CHECKPOINT_MAX, cap // _CHECKPOINT_SHARE))
        # What the WAL may reach before the tick checkpoints itself: room for the thread to lose
        # a few races with the commits (a pass some commit lands in cannot start the WAL over).
        self.wal_allowance = _WAL_ALLOWANCE * self.checkpoint_bytes
        # Room for a checkpoint and a delete to complete on a full disk: the new pages a WAL
        # holds and a delete's frames (a commit writes 5-25 pages of 16 KiB to the WAL).
        self.reserve_bytes = max(self.checkpoint_bytes, _RESERVE_MIN)

    def _connect(self) -> sqlite3.Connection:
        """Connect and set the pragmas; a store from a newer agentd is refused before anything
        is written to it (``auto_vacuum`` rewrites the header, so it is set on new files only)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {version}, newer than this agentd's "
                    f"{SCHEMA_VERSION} (it was written by a newer agentd): run that version again, or "
                    f"move {self.path.name} and its -wal file aside to start an empty store here; "
                    "the file has been left untouched")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                # A new file. 16 KiB pages make the bulk delete after a 2xx markedly cheaper than
                # 4 KiB ones; incremental auto-vacuum hands a drained backlog's pages back.
                conn.execute("PRAGMA page_size = 16384")
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"store {self.path}: cannot switch to WAL mode (got {mode!r}); "
                                 "is the file system a network mount?")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer thread does it
            # When the WAL starts over its file is cut back to its allowance, not below: frames are
            # then rewritten in place, without allocating (a file that grows waits for the file
            # system's journal, which the checkpoint's fsync holds).
            conn.execute(f"PRAGMA journal_size_limit = {self.wal_allowance}")
            conn.execute("PRAGMA cache_size = -16384")     # 16 MiB page cache
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA busy_timeout = 5000")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_checked(self, check_s: float) -> sqlite3.Connection:
        """Connect, check for damage (bounded), migrate an older schema in place."""
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            if _is_damage(exc):
                raise _Damaged(str(exc)) from exc
            raise StoreError(f"store {self.path}: cannot open: {exc} (check the file's permissions and "
                             "the free space in the state directory)") from exc
        try:
            if check_s > 0:
                self._quick_check(conn, check_s)
            self._migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            if _is_damage(exc):
                raise _Damaged(str(exc)) from exc
            raise StoreError(f"store {self.path}: cannot open: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _quick_check(self, conn: sqlite3.Connection, budget_s: float) -> None:
        """Raise _Damaged when SQLite finds the file malformed, looking for at most ``budget_s``.

        First the pages every tick touches (the schema, both ends of each table, the counters),
        then ``PRAGMA quick_check`` (every b-tree page; ~1.1 s for a cached 1 GiB store),
        interrupted at the budget: what it did not reach is caught by the first call that reads it.
        """
        for sql in ("SELECT count(*) FROM sqlite_master",
                    "SELECT id FROM points ORDER BY id LIMIT 1", "SELECT max(id) FROM points",
                    "SELECT id FROM quarantine ORDER BY id LIMIT 1", "SELECT max(id) FROM quarantine",
                    "SELECT count(*) FROM meta"):
            try:
                conn.execute(sql).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):  # a new or old file: _migrate creates it
                    raise
        timer = threading.Timer(budget_s, conn.interrupt)
        timer.start()
        try:
            rows = conn.execute("PRAGMA quick_check(10)").fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupt" not in str(exc):
                raise
            return  # the budget ran out before a fault was found
        finally:
            timer.cancel()
        if rows != [("ok",)]:
            raise _Damaged("; ".join(str(r[0]) for r in rows))

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring an older (or new, empty) file to SCHEMA_VERSION in place, keeping its rows."""
        if version == SCHEMA_VERSION:
            return
        fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version, SCHEMA_VERSION):
                self._run_script(conn, _MIGRATIONS[v])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if not fresh:
            log.info("store_migrated", store=str(self.path), from_version=version, to_version=SCHEMA_VERSION)

    @staticmethod
    def _run_script(conn: sqlite3.Connection, script: str) -> None:
        """Each statement of ``script`` inside the open transaction (executescript would commit it)."""
        for stmt in script.split(";"):
            body = "\n".join(line for line in stmt.splitlines() if not line.strip().startswith("--"))
            if body.strip():
                conn.execute(body)

    def _load_counters(self) -> None:
        try:
            cur = self._conn.cursor()
            self._page_size = cur.execute("PRAGMA page_size").fetchone()[0]
            self._backlog = cur.execute("SELECT count(*) FROM points").fetchone()[0]
            self._quarantined = cur.execute("SELECT count(*) FROM quarantine").fetchone()[0]
            row = cur.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            self._dropped = int(row[0]) if row else 0
            cur.close()
        except sqlite3.Error as exc:
            if not _is_damage(exc):
                raise StoreError(f"store {self.path}: cannot read its counters: {exc}") from exc
            self._recover_unlocked("open", exc)

    # -- the tick --------------------------------------------------------------------------

    def append(self, lines: Sequence[tuple[int, str]]) -> None:
        """Append ``(ts_ns, line)`` pairs in one transaction (called once per tick).

        A full disk frees space (see the module docstring) and retries, at most ``_FULL_RETRIES``
        times; a damaged store is moved aside and the lines go into the fresh one.
        """
        if not lines:
            return
        with self._lock:
            recovered = full = False
            attempt = 0
            while True:
                try:
                    self._insert(lines)
                    break
                except sqlite3.Error as exc:
                    self._rollback()
                    if _is_damage(exc) and not recovered:
                        recovered = True
                        self._recover_unlocked("append", exc)
                        continue
                    if _is_full(exc) and attempt < _FULL_RETRIES:
                        if not full:
                            full = True
                            self.disk_full_events += 1
                        self._make_room(max(_FULL_DROP_MIN, 2 * len(lines)) * 4**attempt)
                        attempt += 1
                        continue
                    hint = (" (the disk stayed full after dropping the oldest rows: free space in the state "
                            "directory)" if _is_full(exc) else "")
                    raise StoreError(f"store {self.path}: append failed: {exc}{hint}") from exc
            self._backlog += len(lines)
        if self._wal_content() > self.wal_allowance:  # no bounds step woke the thread in time
            self._ckpt_wake.set()

    def _insert(self, lines: Sequence[tuple[int, str]]) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO points (ts_ns, line) VALUES (?, ?)", lines)
        conn.execute("COMMIT")

    def _make_room(self, drop: int) -> None:
        """The disk is full: give the reserve back, checkpoint, drop the ``drop`` oldest rows;
        say so loudly.

        The checkpoint first, so that the delete's pages go to the start of a restarted WAL
        rather than needing more disk; the rows it frees are reused by the retried write,
        which a second checkpoint lets start the WAL over too. Logged as an error at once, then
        at most once a minute with the drops summed (a disk that stays full meets every tick).
        """
        released = self._release_reserve()
        self._checkpoint_inline(truncate=False)
        error = None
        dropped = 0
        if drop:
            try:
                dropped = sum(self._drop_oldest(drop))
            except sqlite3.Error as exc:
                self._rollback()
                error = str(exc)
            self._checkpoint_inline(truncate=False)
        self._full_unwarned += dropped
        now = time.monotonic_ns()
        if self._full_warned_ns is not None and now - self._full_warned_ns < _DROP_WARN_EVERY_NS:
            return
        log.error("store_disk_full_dropped_oldest", store=str(self.path), dropped=self._full_unwarned,
                  dropped_total=self._dropped, disk_full_events=self.disk_full_events,
                  reserve_released=released, free_bytes=self._free_disk(), drop_error=error,
                  hint=f"the file system of {self.path.parent} is full: free space there (or move "
                       "state_dir); the newest readings are kept, the oldest dropped")
        self._full_unwarned = 0
        self._full_warned_ns = now

    def _drop_oldest(self, n: int) -> tuple[int, int]:
        """Delete the ``n`` oldest rows, quarantined first, counted as dropped; in one transaction."""
        conn = self._conn
        conn.execute("BEGIN")
        drop_q = self._delete_where("quarantine", "ORDER BY id", (), n)
        drop_p = self._delete_where("points", "ORDER BY id", (), n - drop_q)
        self._write_dropped(self._dropped + drop_q + drop_p)
        conn.execute("COMMIT")
        self._quarantined = max(0, self._quarantined - drop_q)
        self._backlog = max(0, self._backlog - drop_p)
        self._dropped += drop_q + drop_p
        return drop_q, drop_p

    def _write_dropped(self, value: int) -> None:
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (value,))

    # -- the forwarder ---------------------------------------------------------------------

    def oldest(self, limit: int, *, after_id: int | None = None) -> Batch | None:
        """The oldest ``limit`` pending lines (after ``after_id`` when given), or None when none are."""
        def read() -> list[tuple[int, str]]:
            if after_id is None:
                return self._conn.execute("SELECT id, line FROM points ORDER BY id LIMIT ?",
                                          (int(limit),)).fetchall()
            return self._conn.execute("SELECT id, line FROM points WHERE id > ? ORDER BY id LIMIT ?",
                                      (int(after_id), int(limit))).fetchall()

        rows = self._guarded("read", read)
        if not rows:
            return None
        return Batch(rows[0][0], rows[-1][0], [r[1] for r in rows], len(rows), [r[0] for r in rows])

    def ack(self, batch: Batch) -> None:
        """Delete the batch's rows, and only those (the server answered 2xx).

        Not "everything through ``last_id``": rows salvaged from a damaged copy may arrive with
        ids inside the batch's span after it was read, and have not been shipped.
        """
        def delete() -> None:
            where, params = _batch_rows(batch)
            cur = self._conn.execute(f"DELETE FROM points WHERE {where}", params)
            self._backlog = max(0, self._backlog - cur.rowcount)

        self._guarded("ack", delete)

    def quarantine(self, batch: Batch, reason: str) -> int:
        """Move the batch into the ``quarantine`` table with ``reason``; returns the rows moved."""
        return self._guarded("quarantine", lambda: self._quarantine_unlocked(batch, reason))

    def _quarantine_unlocked(self, batch: Batch, reason: str) -> int:
        conn = self._conn
        now = time.time_ns()
        where, params = _batch_rows(batch)
        conn.execute("BEGIN")
        cur = conn.execute(
            "INSERT OR REPLACE INTO quarantine (id, ts_ns, line, reason, quarantined_ns) "
            f"SELECT id, ts_ns, line, ?, ? FROM points WHERE {where}", (reason, now, *params))
        moved = cur.rowcount
        cur = conn.execute(f"DELETE FROM points WHERE {where}", params)
        deleted = cur.rowcount
        conn.execute("COMMIT")
        self._backlog = max(0, self._backlog - deleted)
        self._quarantined += moved
        return moved

    def _guarded(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the lock; a damaged store is recovered and ``fn`` run once more on the
        fresh one; any other SQLite error is a StoreError naming the file."""
        with self._lock:
            try:
                return fn()
            except sqlite3.Error as exc:
                self._rollback()
                if not _is_damage(exc):
                    raise StoreError(f"store {self.path}: {what} failed: {exc}") from exc
                self._recover_unlocked(what, exc)
            try:
                return fn()
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"store {self.path}: {what} failed on the fresh store: {exc}") from exc

    # -- figures ---------------------------------------------------------------------------

    def backlog(self) -> int:
        """Lines waiting to be shipped (or, with no InfluxDB, held)."""
        return self._backlog

    @property
    def dropped(self) -> int:
        """Lines deleted by the size bound or a full disk since the store was created (persisted)."""
        return self._dropped

    @property
    def quarantined_count(self) -> int:
        """Lines held in the quarantine table."""
        return self._quarantined

    @property
    def salvaging(self) -> bool:
        """True while rows are being copied from a damaged copy into this store."""
        return self._salvage_running

    def wait_salvaged(self, timeout_s: float | None = None) -> bool:
        """Wait for a running salvage to finish; False on timeout (tests, the CLI)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.salvaging:
            thread = self._salvage_thread
            left = None if deadline is None else deadline - time.monotonic()
            if thread is None or (left is not None and left <= 0):
                break
            thread.join(left if left is None else min(left, 0.05))
        return not self.salvaging

    def size_bytes(self) -> int:
        """Bytes the store holds: pages in use (free pages are reused and not counted) and the
        WAL file. Within its bounds this is at most ``max_bytes`` less the reserve."""
        def size() -> int:
            cur = self._conn.cursor()
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            free = cur.execute("PRAGMA freelist_count").fetchone()[0]
            cur.close()
            return (pages - free) * self._page_size + self._wal_bytes()

        return self._guarded("size", size)

    def wal_bytes(self) -> int:
        """The WAL file's size: within ``wal_allowance`` while the checkpointer keeps up."""
        return self._wal_bytes()

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return 0

    def _wal_content(self) -> int:
        """Bytes of the frames written since the WAL last started over (what a checkpoint has
        to copy, at most), from the WAL-index header in the -shm file: ``mxFrame``, a
        native-endian u32 at offset 16 (https://www.sqlite.org/walformat.html, section 2.1).

        The WAL file's size says less: it is kept at its allowance when the WAL starts over.
        Falls back to the file's size when the header cannot be read. ~5 us.
        """
        try:
            with open(self._shm_path, "rb") as f:
                hdr = f.read(20)
        except OSError:
            return self._wal_bytes()
        if len(hdr) < 20 or int.from_bytes(hdr[0:4], sys.byteorder) != 3007000 or not hdr[12]:
            return self._wal_bytes()  # not the WAL-index format this reads, or not initialised
        return int.from_bytes(hdr[16:20], sys.byteorder) * (self._page_size + 24)

    def _free_disk(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
            return st.f_bavail * st.f_frsize
        except OSError:
            return 1 << 62

    def _usage(self) -> _Usage:
        """Two header pragmas, a stat and a statvfs (~15 us)."""
        cur = self._conn.cursor()
        pages = cur.execute("PRAGMA page_count").fetchone()[0]
        free = cur.execute("PRAGMA freelist_count").fetchone()[0]
        cur.close()
        return _Usage((pages - free) * self._page_size, pages * self._page_size, self._wal_bytes(),
                      self._free_disk())

    def _row_bound(self, u: _Usage) -> tuple[int, bool]:
        """The bytes the rows may use, and whether the disk (not max_bytes) set it.

        ``max_bytes`` less the WAL's allowance and the reserve; and no more than the database
        file plus the free disk space, less what the WAL may still need and room for the next
        commits before a checkpoint (free pages are reused before the file grows, so a store at
        this bound stops growing while the WAL can still take the deletes, instead of filling
        the disk).
        """
        by_config = self.max_bytes - self.wal_allowance - self.reserve_bytes
        by_disk = u.db_file + u.free_disk - self._disk_room(u.wal)
        if not self._reserve_path.exists():  # leave room to make it again
            by_disk -= self.reserve_bytes
        return (by_disk, True) if by_disk < by_config else (by_config, False)

    def _disk_room(self, wal: int) -> int:
        """Free disk a store at its disk bound keeps: what the WAL may still grow by, and room
        for the next commits before a checkpoint."""
        return max(0, self.wal_allowance - wal) + max(self.wal_allowance, _DISK_HEADROOM)

    def enforce_bounds(self, now_ns: int, retention_s: float | None = None, *,
                       max_rows: int = BOUNDS_MAX_ROWS) -> BoundsStep:
        """One bounded maintenance step: retention, then the size bound, then a little vacuum.

        Called every tick, so a bound holds within a tick or two instead of a minute, and the
        cost of any one call is bounded: at most ``max_rows`` lines are deleted (retention's
        first, from the budget), and only a call that had rows to spare hands back free pages,
        at most ``_VACUUM_STEP_PAGES``. A store far over a bound converges over successive calls
        as long as ``max_rows`` exceeds what is appended between them. Within bounds, a call
        does no writes and no table scans. A WAL over its allowance (the checkpointer behind or
        off) is checkpointed here, inline.

        Retention (``retention_s``; the daemon passes it when no InfluxDB is configured) deletes
        the lines (quarantined ones too) stamped before ``now_ns - retention_s``, oldest first:
        expected ageing, not counted as dropped. The size bound deletes the oldest lines,
        quarantined ones first: data loss, counted in ``dropped`` and warned about (rate
        limited on ``now_ns``). Raises StoreError when the database cannot be written.
        """
        with self._lock:
            step = BoundsStep()
            cutoff = None if retention_s is None else now_ns - int(retention_s * 1e9)
            budget = max(0, int(max_rows))
            u: _Usage | None = None
            aged = False
            for attempt in range(2):
                try:
                    u, aged = self._delete_step(step, cutoff, budget)
                    break
                except sqlite3.Error as exc:
                    self._rollback()
                    if _is_damage(exc):
                        self._recover_unlocked("enforce_bounds", exc)
                        return BoundsStep(used_bytes=self._usage().total)
                    if _is_full(exc) and attempt == 0:  # the deletes need WAL space: make some
                        self.disk_full_events += 1
                        self._make_room(0)  # the retried step drops what the disk bound wants
                        continue
                    raise StoreError(f"store {self.path}: enforcing retention / size bound failed: {exc} "
                                     "(check free space and permissions in the state directory)") from exc
            if step.dropped:
                self._warn_dropped(now_ns, step)
            if step.deleted < max_rows:  # one costly stage per call: rows first, then pages
                step.vacuumed_pages = self._vacuum_step(None if step.deleted else u)
            wrote = bool(step.deleted or step.vacuumed_pages)
            content = self._wal_content()
            if content > self.wal_allowance:  # the thread is behind (or off)
                over = self._usage().total > self.max_bytes - self.reserve_bytes
                # Over the bound itself: wait for the thread's pass to end rather than stay over.
                step.checkpointed = self._checkpoint_inline(truncate=True, wait_s=1.0 if over else None)
            self._ensure_reserve()
            if u is None or wrote or step.checkpointed:
                u = self._usage()  # else the one read at the start still holds
                aged = aged and self._has_aged(cutoff)
            bound, step.disk_limited = self._row_bound(u)
            step.used_bytes = u.total
            step.within_bounds = u.db_used <= bound and u.wal <= self.wal_allowance and not aged
            if content > self.checkpoint_bytes and not step.checkpointed:
                # The tick's writes are done: the thread's pass has until the next tick's append,
                # and a pass no commit lands in lets the WAL start over.
                self._ckpt_wake.set()
            return step

    def _delete_step(self, step: BoundsStep, cutoff: int | None, budget: int) -> tuple[_Usage, bool]:
        """Up to ``budget`` deletes in one transaction; nothing is written when there is no work.

        Returns the usage and whether anything had aged, as read before the deletes.
        """
        conn = self._conn
        aged = self._has_aged(cutoff)
        u = before = self._usage()
        bound, disk_limited = self._row_bound(u)
        if not budget or (not aged and u.db_used <= bound):
            return before, aged
        if disk_limited and u.db_used > bound and u.free_disk < _DISK_HEADROOM:
            self._checkpoint_inline(truncate=False)  # nearly no disk: the deletes start the WAL over
        aged_q = aged_p = drop_q = drop_p = 0
        conn.execute("BEGIN")
        if aged:  # the ts index gives the oldest; quarantined lines first, both from one budget
            aged_q = self._delete_where("quarantine", "WHERE ts_ns < ? ORDER BY ts_ns", (cutoff,), budget)
            aged_p = self._delete_where("points", "WHERE ts_ns < ? ORDER BY ts_ns", (cutoff,), budget - aged_q)
        budget -= aged_q + aged_p
        if aged_q or aged_p:
            u = self._usage()
            bound, disk_limited = self._row_bound(u)
        if budget and u.db_used > bound:
            rows = self._backlog + self._quarantined - aged_q - aged_p
            # Rows to reach the target, from the average row size; the next call corrects it.
            want = min(budget, max(1, -(-rows * (u.db_used - int(bound * _SIZE_TARGET)) // u.db_used)))
            if disk_limited:  # the delete's own WAL must fit on the disk: a few pages of rows a call
                want = min(want, max(1, rows * _DISK_DROP_PAGES * self._page_size // u.db_used))
            drop_q = self._delete_where("quarantine", "ORDER BY id", (), want)
            drop_p = self._delete_where("points", "ORDER BY id", (), want - drop_q)
            self._write_dropped(self._dropped + drop_q + drop_p)
            step.disk_limited = disk_limited
        conn.execute("COMMIT")
        self._quarantined = max(0, self._quarantined - aged_q - drop_q)
        self._backlog = max(0, self._backlog - aged_p - drop_p)
        self._dropped += drop_q + drop_p
        step.aged, step.dropped, step.dropped_quarantined = aged_q + aged_p, drop_q + drop_p, drop_q
        return before, aged

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
        u = self._usage()
        if step.disk_limited:
            reason, hint = "disk", (f"the file system of {self.path.parent} is nearly full ({u.free_disk} bytes "
                                    "free): free space there, or lower store.max_bytes below what it can hold")
        else:
            reason, hint = "max_bytes", "InfluxDB unreachable for long, or store.max_bytes too small"
        log.warning("store_full_dropped_oldest", store=str(self.path), reason=reason, dropped=self._unwarned,
                    dropped_quarantined=self._unwarned_q, dropped_total=self._dropped,
                    max_bytes=self.max_bytes, used_bytes=u.total, free_disk_bytes=u.free_disk, hint=hint)
        self._unwarned = self._unwarned_q = 0
        self._warned_ns = now_ns

    def _vacuum_step(self, u: _Usage | None) -> int:
        """Hand back at most ``_VACUUM_STEP_PAGES`` free pages when many are free; returns them.

        ``u``: the usage read this call, when nothing was deleted since (saves two pragmas).
        """
        cur = self._conn.cursor()
        try:
            if u is not None:
                pages, free = u.db_file // self._page_size, (u.db_file - u.db_used) // self._page_size
            else:
                free = cur.execute("PRAGMA freelist_count").fetchone()[0]
                pages = cur.execute("PRAGMA page_count").fetchone()[0]
            if free < _VACUUM_MIN_FREE_PAGES:
                return 0
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

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, passes: int = _CHECKPOINT_PASSES) -> tuple[int, int]:
        """A PASSIVE checkpoint on the checkpointer's own connection; returns (WAL frames, copied).

        Thread-safe and never blocks the writer (WAL mode). Should the writer commit while it
        runs, it runs again for the frames it missed (each pass shorter than the last, at most
        ``passes``): the WAL starts over from its beginning only at a commit that finds every
        frame copied. The store's thread makes one pass per wake-up instead, woken at the end
        of each tick's writes, so each pass has a whole interval before the next commit.
        """
        with self._ckpt_lock:
            started = time.perf_counter()
            try:
                if self._ckpt_conn is None:
                    self._ckpt_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                    self._ckpt_conn.execute("PRAGMA wal_autocheckpoint = 0")
                frames = done = 0
                for _ in range(max(1, passes)):
                    _busy, frames, done = self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if done >= frames:
                        break
            except sqlite3.Error as exc:
                self.checkpoint_stats.failures += 1
                self._warn_checkpoint(exc)
                return (0, 0)
            took = time.perf_counter() - started
            stats = self.checkpoint_stats
            stats.runs += 1
            stats.total_s += took
            stats.max_s = max(stats.max_s, took)
            return (frames, done)

    def _checkpointer(self) -> None:
        """The thread: a checkpoint pass whenever the WAL is over its threshold (woken by the
        bounds step at the end of each tick, else every ``_CHECKPOINT_POLL_S``)."""
        while not self._stop.is_set():
            self._ckpt_wake.wait(_CHECKPOINT_POLL_S)
            self._ckpt_wake.clear()
            if self._stop.is_set():
                break
            try:
                if self._wal_content() > self.checkpoint_bytes:
                    self.checkpoint(passes=1)
            except Exception as exc:  # never let the thread die: the inline fallback is slower
                self._warn_checkpoint(exc)

    def _checkpoint_inline(self, *, truncate: bool, wait_s: float | None = None) -> bool:
        """A checkpoint on the writer's connection (the thread is behind, or the disk is full).

        Waits for a checkpoint the thread is running (``wait_s``, by default briefly), never for
        readers (busy timeout 0); TRUNCATE hands the WAL's space back. Returns True when it ran.
        """
        if not self._ckpt_lock.acquire(timeout=_INLINE_CHECKPOINT_WAIT_S if wait_s is None else wait_s):
            return False
        conn = self._conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})").fetchone()
            self.checkpoint_stats.inline += 1
            return True
        except sqlite3.Error as exc:
            self.checkpoint_stats.failures += 1
            self._warn_checkpoint(exc)
            return False
        finally:
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
            except sqlite3.Error:
                pass
            self._ckpt_lock.release()

    def _warn_checkpoint(self, exc: BaseException) -> None:
        now = time.monotonic_ns()
        if self._ckpt_warned_ns is None or now - self._ckpt_warned_ns >= _DROP_WARN_EVERY_NS:
            self._ckpt_warned_ns = now
            log.warning("store_checkpoint_failed", store=str(self.path), error=str(exc),
                        wal_bytes=self._wal_bytes(), free_disk_bytes=self._free_disk(),
                        hint="the WAL grows until a checkpoint succeeds; check free space in the state directory")

    # -- the reserve -----------------------------------------------------------------------

    def _ensure_reserve(self) -> None:
        """Make the reserve file when it is missing and the disk has room for it and the WAL's
        allowance (a store at its disk bound leaves room for it: the bound counts a missing one).

        A stat when there is nothing to do (every tick).
        """
        if self._reserve_path.exists():
            return
        wal = self._wal_bytes()
        if self._free_disk() < self.reserve_bytes + max(0, self.wal_allowance - wal) + self.wal_allowance:
            return
        tmp = self._reserve_path.with_name(self._reserve_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # real blocks, not a sparse file
            finally:
                os.close(fd)
            os.replace(tmp, self._reserve_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.debug("store_reserve_not_made", store=str(self.path), error=str(exc))

    def _release_reserve(self) -> bool:
        try:
            self._reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("store_reserve_not_released", file=str(self._reserve_path), error=str(exc))
            return False
        return True

    # -- damage ----------------------------------------------------------------------------

    def recover(self, reason: str = "requested") -> Path:
        """Move the store aside as damaged, continue on a fresh one, salvage in the background.

        The store's calls do this themselves when SQLite reports the file malformed; this is
        for a caller that learns of damage another way. Returns where the damaged copy went.
        """
        with self._lock:
            return self._recover_unlocked("recover", RuntimeError(reason))

    def _recover_unlocked(self, what: str, exc: BaseException) -> Path:
        with self._ckpt_lock:  # the checkpointer's connection points at the old file
            if self._ckpt_conn is not None:
                try:
                    self._ckpt_conn.close()
                except sqlite3.Error:
                    pass
                self._ckpt_conn = None
        try:
            self._conn.close()
        except (sqlite3.Error, AttributeError):
            pass
        aside = self._move_aside(f"during {what}: {exc}")
        self._conn = self._open_checked(0)
        self._backlog = self._quarantined = self._dropped = 0
        self._page_size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        self._carry_over(aside)
        self._start_salvage()
        return aside

    def _move_aside(self, reason: str) -> Path:
        """Rename the damaged file and its -wal/-shm to ``<name>.damaged-<UTC time>[-n]``."""
        self.recoveries += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
            n += 1
        try:
            for suffix in ("-wal", "-shm", ""):  # the database last: its presence marks a full set
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, f"{aside}{suffix}")
        except OSError as exc:
            raise StoreError(f"store {self.path} is damaged ({reason}) and could not be moved aside: "
                             f"{exc}; stop agentd and move {self.path} and its -wal/-shm files away by "
                             "hand (a new store is created at the next start)") from exc
        Path(f"{aside}.salvage").write_text("0 0\n")  # progress: the next points id, quarantine id
        with self._salvage_lock:
            self._salvage_queue.append(aside)
        log.error("store_damaged_moved_aside", store=str(self.path), moved_to=str(aside), reason=reason,
                  hint=f"a new store continues at {self.path} and the readable rows of the damaged copy are "
                       "copied into it; the copy is kept for inspection (remove it when done)")
        self._prune_damaged()
        return aside

    def _prune_damaged(self) -> None:
        """Keep the ``_KEEP_DAMAGED`` newest damaged copies whose salvage is done."""
        copies = sorted(p for p in self.path.parent.glob(f"{self.path.name}.damaged-*")
                        if not p.name.endswith(("-wal", "-shm", ".salvage", ".tmp")))  # by time, in the name
        for old in copies[:-_KEEP_DAMAGED]:
            if Path(f"{old}.salvage").exists():
                continue
            for suffix in ("", "-wal", "-shm"):
                Path(f"{old}{suffix}").unlink(missing_ok=True)
            log.warning("store_damaged_copy_removed", file=str(old), kept=_KEEP_DAMAGED)

    def _carry_over(self, aside: Path) -> None:
        """Start the fresh store's ids above the damaged copy's and keep its drop count.

        Salvaged rows keep their ids, below every new one, so they stay oldest first.
        """
        top, dropped = readable_top(aside)
        conn = self._conn
        conn.execute("BEGIN")
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'points'")
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('points', ?)", (top,))
        if dropped:
            self._write_dropped(self._dropped + dropped)
        conn.execute("COMMIT")
        self._dropped += dropped

    def _pending_salvages(self) -> list[Path]:
        """Damaged copies whose salvage a stopped daemon left unfinished (oldest first)."""
        found = []
        for marker in sorted(self.path.parent.glob(f"{self.path.name}.damaged-*.salvage")):
            aside = marker.with_suffix("")
            if aside in self._salvage_queue:
                continue
            if aside.exists():
                found.append(aside)
            else:
                marker.unlink(missing_ok=True)
        return found

    def _start_salvage(self) -> None:
        """A salvage thread for the queue, unless one is running (it takes what is queued)."""
        with self._salvage_lock:
            if self._salvage_running or self._stop.is_set():
                return
            self._salvage_running = True
            self._salvage_thread = threading.Thread(target=self._salvage_all, name="store-salvage", daemon=True)
            self._salvage_thread.start()

    def _salvage_all(self) -> None:
        while not self._stop.is_set():
            with self._salvage_lock:
                if not self._salvage_queue:
                    self._salvage_running = False
                    return
                aside = self._salvage_queue[0]
            try:
                self._salvage(aside)
            except Exception as exc:  # a failed salvage must not take the store down
                log.error("store_salvage_failed", store=str(self.path), damaged_copy=str(aside), error=repr(exc),
                          hint="the copy is kept; its unread rows stay there")
                Path(f"{aside}.salvage").unlink(missing_ok=True)
            if self._stop.is_set():
                break  # the marker stays: the next open resumes
            with self._salvage_lock:
                self._salvage_queue.pop(0)
        with self._salvage_lock:
            self._salvage_running = False

    def _salvage(self, aside: Path) -> None:
        """Copy the readable rows of ``aside`` into this store, recording progress in its marker."""
        marker = Path(f"{aside}.salvage")
        try:
            next_p, next_q = (int(x) for x in marker.read_text().split()[:2])
        except (OSError, ValueError):
            next_p = next_q = 0
        started = time.monotonic()
        copied = lost = 0
        src = open_damaged(aside)
        if src is None:
            log.error("store_salvage_failed", store=str(self.path), damaged_copy=str(aside),
                      error="SQLite cannot read the copy at all", hint="nothing could be salvaged; the copy is kept")
            marker.unlink(missing_ok=True)
            return
        try:
            tables = (("points", "ts_ns, line", next_p), ("quarantine", "ts_ns, line, reason, quarantined_ns", next_q))
            for t, (table, cols, start) in enumerate(tables):
                for rows, skipped in readable_rows(src, table, cols, start, _SALVAGE_CHUNK):
                    if self._stop.is_set():
                        return
                    lost += skipped
                    if rows:
                        self._insert_salvaged(table, cols, rows)
                        copied += len(rows)
                        if t == 0:
                            next_p = rows[-1][0] + 1
                        else:
                            next_q = rows[-1][0] + 1
                        tmp = marker.with_name(marker.name + ".tmp")
                        tmp.write_text(f"{next_p} {next_q}\n")
                        os.replace(tmp, marker)
                if t == 0:
                    next_p = MAX_ID
        finally:
            src.close()
        self.salvaged += copied
        self.salvage_lost_ids += lost
        marker.unlink(missing_ok=True)
        (log.error if lost else log.info)(
            "store_salvaged", store=str(self.path), damaged_copy=str(aside), rows=copied, lost_ids=lost,
            seconds=round(time.monotonic() - started, 3),
            hint="rows on damaged pages are lost" if lost else "every row of the damaged copy was read")
        self._prune_damaged()

    def _insert_salvaged(self, table: str, cols: str, rows: list[tuple]) -> None:
        marks = ", ".join("?" * (1 + cols.count(",") + 1))
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                cur = conn.executemany(f"INSERT OR IGNORE INTO {table} (id, {cols}) VALUES ({marks})", rows)
                n = cur.rowcount
                conn.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            if table == "points":
                self._backlog += n
            else:
                self._quarantined += n
        time.sleep(0)  # let the loop at the lock between chunks

    # -- reading (demo, tests) -------------------------------------------------------------

    def query(self, measurement: str | None = None, since_ns: int | None = None,
              limit: int | None = None) -> list[str]:
        """Pending lines, in insertion order; with ``limit``, the newest ``limit`` of them."""
        return self._guarded("query", lambda: self._query_unlocked(measurement, since_ns, limit))

    def _query_unlocked(self, measurement: str | None = None, since_ns: int | None = None,
                        limit: int | None = None) -> list[str]:
        where: list[str] = []
        params: list[object] = []
        if measurement is not None:
            clause, args = _measurement_clause((measurement,))
            where.append(clause)
            params += args
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
        return self._guarded("quarantined", lambda: self._quarantined_unlocked(limit))

    def _quarantined_unlocked(self, limit: int | None = None) -> list[tuple[str, str]]:
        sql = "SELECT line, reason FROM quarantine ORDER BY id"
        params: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (int(limit),)
        return [(r[0], r[1]) for r in self._conn.execute(sql, params)]

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads, checkpoint the WAL and close (safe to call twice).

        A salvage still running stops after its current chunk; the next open resumes it.
        """
        self._stop.set()
        self._ckpt_wake.set()
        for thread in (self._ckpt_thread, self._salvage_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(10.0)
        with self._lock:
            with self._ckpt_lock:
                if self._ckpt_conn is not None:
                    self._ckpt_conn.close()
                    self._ckpt_conn = None
            conn = self._conn
            if conn is None:
                return
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            conn.close()
            self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _batch_rows(batch: Batch) -> tuple[str, tuple]:
    """A WHERE clause for exactly the batch's rows: its id range when the ids fill it (the usual
    case, one range delete), else its ids (a salvage left gaps another row may fill later)."""
    ids = batch.ids
    if not ids or ids[-1] - ids[0] + 1 == len(ids):
        return "id BETWEEN ? AND ?", (batch.first_id, batch.last_id)
    return "id IN (SELECT value FROM json_each(?))", ("[" + ",".join(map(str, ids)) + "]",)


# -- reading a store from another process (agentd export, agentd store info) ----------------

READ_BUSY_TIMEOUT_S = 1.0  # a reader waits at most this long for a lock (WAL readers rarely meet one)
READ_CHUNK_ROWS = 5000     # rows per read transaction; each ends before the next begins

StoredRow = tuple[int, int, str]  # (id, ts_ns, line) as a reader returns them


def _measurement_clause(measurements: Sequence[str]) -> tuple[str, list[object]]:
    """A WHERE term for lines of any of ``measurements``: the line starts with the escaped name
    and then ``,`` or `` `` (no parse, no index)."""
    terms: list[str] = []
    params: list[object] = []
    for name in measurements:
        prefix = escape_measurement(name)
        terms.append("substr(line, 1, ?) IN (?, ?)")
        params += [len(prefix) + 1, prefix + ",", prefix + " "]
    return "(" + " OR ".join(terms) + ")", params


class StoreNotFound(StoreError):
    """The store file does not exist (the message names the path)."""


@dataclass(slots=True, frozen=True)
class PointFilter:
    """Which stored points a reader returns: any of ``measurements`` (empty: all) stamped in the
    half-open range ``since_ns <= ts < until_ns`` (None: unbounded), so that adjacent windows
    never return a point twice."""

    measurements: tuple[str, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None

    def terms(self, *, by_id: bool) -> tuple[list[str], list[object]]:
        """WHERE terms and their parameters. ``by_id``: the caller walks rows in id order, so the
        time terms must not pick the ts index (a ``+`` keeps SQLite on the rowid range; with the
        index it would sort each chunk's whole candidate set again)."""
        ts = "+ts_ns" if by_id else "ts_ns"
        terms: list[str] = []
        params: list[object] = []
        if self.since_ns is not None:
            terms.append(f"{ts} >= ?")
            params.append(int(self.since_ns))
        if self.until_ns is not None:
            terms.append(f"{ts} < ?")
            params.append(int(self.until_ns))
        if self.measurements:
            clause, args = _measurement_clause(self.measurements)
            terms.append(clause)
            params += args
        return terms, params


@dataclass(slots=True, frozen=True)
class StoreInfo:
    """What ``agentd store info`` reports; read in one short read transaction, nothing written."""

    path: str
    db_bytes: int          # the database file
    wal_bytes: int         # its -wal file
    used_bytes: int        # pages in use + the WAL: what store.max_bytes bounds (Store.size_bytes)
    points: int            # rows in ``points``: what export returns; with InfluxDB, the backlog
    oldest_ns: int | None  # the points' timestamps
    newest_ns: int | None
    quarantined: int       # lines the server refused, kept in the ``quarantine`` table
    quarantine_newest_reason: str | None
    quarantine_newest_ns: int | None  # when the newest was quarantined
    dropped: int           # lines deleted by the size bound or a full disk since the store was made
    schema_version: int    # PRAGMA user_version
    damaged_copies: tuple[str, ...] = ()  # store.sqlite.damaged-* kept beside it

    @property
    def size_bytes(self) -> int:
        """The files on disk: database + WAL."""
        return self.db_bytes + self.wal_bytes


class StoreReader:
    """A read-only view of a store that a running daemon may be writing (``agentd export``,
    ``agentd store info``).

    Why it cannot get in the daemon's way: the connection is opened with ``mode=ro``, so SQLite
    refuses every write through it (it can never checkpoint, vacuum or move the WAL into the
    database file, even when it closes last); WAL readers never block the writer; rows are read
    in chunks of ``chunk_rows``, each its own short read transaction, so the daemon's
    checkpointer can start the WAL over between them instead of watching it grow for as long as
    an export runs; a lock is waited on for ``busy_timeout_s`` at most.

    A store that no process has open (no ``-wal`` or ``-shm`` beside it: a daemon's writer
    always has both) is opened ``immutable``: read as the file is, without locks and without
    creating the ``-wal`` and ``-shm`` files that a WAL reader otherwise makes (so nothing in
    ``state_dir`` changes, and a user who may read the file but not write the directory can
    export it). Should a daemon open the store meanwhile (its ``-wal`` appears), the next read
    reconnects as a WAL reader: the daemon's writes go to its WAL, and its first checkpoint
    into the file comes only after many ticks.

    Thread-safe (the replay reads from the forwarder's worker threads). Errors are StoreError
    naming the file; a missing file is StoreNotFound.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = READ_BUSY_TIMEOUT_S,
                 chunk_rows: int = READ_CHUNK_ROWS) -> None:
        self.path = Path(path)
        self.chunk_rows = max(1, int(chunk_rows))
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        if not self.path.exists():
            raise StoreNotFound(f"store {self.path}: no such file")
        if not self.path.is_file():
            raise StoreError(f"store {self.path}: not a file")
        self._wal_path = Path(f"{self.path}-wal")
        self._shm_path = Path(f"{self.path}-shm")
        self.immutable = False
        self._conn = self._connect()
        try:
            self.schema_version = self._one("open", "PRAGMA user_version")
            if self.schema_version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {self.schema_version}, newer than this agentd's "
                    f"{SCHEMA_VERSION} (written by a newer agentd): read it with that version")
            tables = {r[0] for r in self._rows("open", "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "points" not in tables:
                raise StoreError(f"store {self.path}: not an agentd store (no points table)")
            self._has_quarantine = "quarantine" in tables
            self._has_meta = "meta" in tables
        except BaseException:
            self._conn.close()
            raise

    def _live(self) -> bool:
        """Whether some process may have the store open (its WAL files are there)."""
        return self._wal_path.exists() or self._shm_path.exists()

    def _connect(self) -> sqlite3.Connection:
        self.immutable = not self._live()
        uri = self.path.resolve().as_uri() + ("?mode=ro&immutable=1" if self.immutable else "?mode=ro")
        try:
            return sqlite3.connect(uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(self._explain("open", exc)) from exc

    def _explain(self, what: str, exc: sqlite3.Error) -> str:
        code = _code(exc)
        if _is_damage(exc):
            return (f"store {self.path}: {what} failed, the file is damaged ({exc}); a running agentd moves a "
                    f"damaged store aside ({self.path.name}.damaged-<time>) and salvages what is readable")
        if code == 5 or "locked" in str(exc):  # SQLITE_BUSY
            return (f"store {self.path}: {what} failed: the store stayed locked for {self._busy_timeout_s:g} s "
                    f"({exc}); try again")
        if "unable to open" in str(exc):
            return (f"store {self.path}: {what} failed: {exc} (a reader needs read access to the file and "
                    "to its -wal and -shm files, and to create them when no daemon has the store open)")
        return f"store {self.path}: {what} failed: {exc}"

    def _rows(self, what: str, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            self._reconnect_if_live()
            try:
                return self._conn.execute(sql, params).fetchall()  # fetchall: the read transaction ends here
            except sqlite3.Error as exc:
                raise StoreError(self._explain(what, exc)) from exc

    def _one(self, what: str, sql: str, params: Sequence[object] = ()) -> Any:
        rows = self._rows(what, sql, params)
        return rows[0][0] if rows else None

    def _reconnect_if_live(self) -> None:
        """A daemon opened the store since: read through the WAL from now on (two stats a call)."""
        if self.immutable and self._live():
            self._conn.close()
            self._conn = self._connect()

    def top_id(self) -> int:
        """The newest row's id (0 when empty): reading up to it makes an export finish while the
        daemon keeps appending."""
        return int(self._one("read", "SELECT max(id) FROM points") or 0)

    def count(self, flt: PointFilter = PointFilter(), max_id: int | None = None) -> int:
        """Points ``flt`` selects (up to ``max_id``)."""
        terms, params = flt.terms(by_id=False)
        if max_id is not None:
            terms.append("id <= ?")
            params.append(int(max_id))
        sql = "SELECT count(*) FROM points" + (" WHERE " + " AND ".join(terms) if terms else "")
        return int(self._one("count", sql, params))

    def first_id(self, flt: PointFilter) -> int:
        """An id below every row ``flt`` selects (a since-bound export starts there, not at the
        beginning of a week of rows; ids and timestamps are not in the same order: coolant
        senders stamp their own readings)."""
        if flt.since_ns is None:
            return 0
        lowest = self._one("read", "SELECT min(id) FROM points WHERE ts_ns >= ?", (int(flt.since_ns),))
        return 0 if lowest is None else int(lowest) - 1

    def read(self, flt: PointFilter, after_id: int, limit: int, max_id: int | None = None) -> list[StoredRow]:
        """Up to ``limit`` rows ``(id, ts_ns, line)`` after ``after_id`` (and up to ``max_id``), in
        id order (the order they were stored), in one short read transaction."""
        terms, params = flt.terms(by_id=True)
        terms = ["id > ?"] + (["id <= ?"] if max_id is not None else []) + terms
        params = [int(after_id)] + ([int(max_id)] if max_id is not None else []) + params
        sql = f"SELECT id, ts_ns, line FROM points WHERE {' AND '.join(terms)} ORDER BY id LIMIT ?"
        return self._rows("read", sql, [*params, int(limit)])

    def chunks(self, flt: PointFilter = PointFilter(), max_id: int | None = None) -> Iterator[list[StoredRow]]:
        """Every row ``flt`` selects up to ``max_id`` (default: the newest at the first call), in
        chunks of ``chunk_rows``; rows deleted meanwhile (shipped, aged) are simply not met."""
        top = self.top_id() if max_id is None else max_id
        after = self.first_id(flt)
        while after < top:
            rows = self.read(flt, after, self.chunk_rows, top)
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    def info(self) -> StoreInfo:
        """Sizes, counts, time span, quarantine, drops and version, in one read transaction."""
        with self._lock:
            self._reconnect_if_live()
            conn = self._conn
            try:
                conn.execute("BEGIN")
                try:
                    def one(sql: str) -> Any:
                        return conn.execute(sql).fetchone()

                    page_size = one("PRAGMA page_size")[0]
                    used = (one("PRAGMA page_count")[0] - one("PRAGMA freelist_count")[0]) * page_size
                    points = one("SELECT count(*) FROM points")[0]
                    oldest = one("SELECT min(ts_ns) FROM points")[0]
                    newest = one("SELECT max(ts_ns) FROM points")[0]
                    quarantined, reason, reason_ns = 0, None, None
                    if self._has_quarantine:
                        quarantined = one("SELECT count(*) FROM quarantine")[0]
                        row = one("SELECT reason, quarantined_ns FROM quarantine "
                                  "ORDER BY quarantined_ns DESC, id DESC LIMIT 1")
                        if row is not None:
                            reason, reason_ns = row
                    dropped = 0
                    if self._has_meta:
                        row = one("SELECT value FROM meta WHERE key = 'dropped'")
                        dropped = int(row[0]) if row else 0
                finally:
                    conn.execute("COMMIT")  # a read transaction: ends the snapshot, writes nothing
            except sqlite3.Error as exc:
                raise StoreError(self._explain("info", exc)) from exc
        wal = _file_size(Path(f"{self.path}-wal"))
        damaged = tuple(sorted(str(p) for p in self.path.parent.glob(f"{self.path.name}.damaged-*")
                               if not p.name.endswith(("-wal", "-shm", ".salvage", ".tmp"))))
        return StoreInfo(path=str(self.path), db_bytes=_file_size(self.path), wal_bytes=wal, used_bytes=used + wal,
                         points=points, oldest_ns=oldest, newest_ns=newest, quarantined=quarantined,
                         quarantine_newest_reason=reason, quarantine_newest_ns=reason_ns, dropped=dropped,
                         schema_version=self.schema_version, damaged_copies=damaged)

    def close(self) -> None:
        """Close the connection (read-only: nothing is checkpointed); safe to call twice."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
