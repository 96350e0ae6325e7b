"""Reading what is still readable in a damaged SQLite store file (the store's salvage).

Pure read-only helpers, apart from the store so that agentd/store.py stays the store: open the
moved-aside copy read-only, bound the ids it may hold, and walk its rows in id order, stepping
over the pages SQLite cannot read (see ``readable_rows``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

MAX_ID = 2**63 - 1  # SQLite's largest rowid


def open_damaged(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to a damaged copy (its -wal included), or None when SQLite refuses."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.Error:
        return None


def readable_top(path: Path) -> tuple[int, int]:
    """The highest id the damaged copy may hold (an upper bound) and its drop count.

    Each source is tried on its own; one that cannot be read counts as 2**40, which keeps new
    rows above any salvaged one at no cost (ids are 64-bit).
    """
    conn = open_damaged(path)
    if conn is None:
        return 0, 0  # nothing in it can be read, so nothing will be salvaged
    tops, dropped = [], 0
    for sql in ("SELECT seq FROM sqlite_sequence WHERE name = 'points'", "SELECT max(id) FROM points",
                "SELECT max(id) FROM quarantine"):
        try:
            row = conn.execute(sql).fetchone()
            if row and row[0] is not None:
                tops.append(int(row[0]))
        except sqlite3.Error:
            tops.append(1 << 40)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        dropped = int(row[0]) if row else 0
    except (sqlite3.Error, TypeError, ValueError):
        pass
    conn.close()
    return max(tops, default=0), dropped


def _seek_ok(conn: sqlite3.Connection, table: str, at: int) -> bool:
    """Whether the b-tree can be entered at id ``at`` (the pages on that path are readable)."""
    try:
        conn.execute(f"SELECT id FROM {table} WHERE id >= ? ORDER BY id LIMIT 1", (at,)).fetchone()
        return True
    except sqlite3.DatabaseError:
        return False


def readable_rows(conn: sqlite3.Connection, table: str, cols: str, start: int,
                   chunk: int) -> Iterator[tuple[list[tuple], int]]:
    """``(rows, ids_skipped)`` in id order from ``start``, stepping over the unreadable pages.

    Reading in id order walks the table's leaves; a damaged leaf (or interior page) raises. Up
    to the damage the rows are then read one query each (a cursor reads a row ahead, so the
    last good row would go with the error), and the next readable id is found by seeking:
    doubling steps until a seek succeeds, then bisecting back to the first id whose path is
    readable -- in an intkey b-tree that is the first id past the damaged leaf, so only that
    leaf's rows are lost.
    """
    lo = max(0, start)
    sql = f"SELECT id, {cols} FROM {table} WHERE id >= ? ORDER BY id LIMIT ?"
    while lo <= MAX_ID:
        rows: list[tuple] = []
        try:
            for row in conn.execute(sql, (lo, chunk)):
                rows.append(row)
        except sqlite3.DatabaseError:
            pass
        else:
            if rows:
                yield rows, 0
            if len(rows) < chunk:
                return
            lo = rows[-1][0] + 1
            continue
        if rows:  # the last good row read ahead of the error may be missing: go row by row
            lo = rows[-1][0] + 1
        while True:
            try:
                row = conn.execute(sql, (lo, 1)).fetchone()
            except sqlite3.DatabaseError:
                break
            if row is None:
                if rows:
                    yield rows, 0
                return
            rows.append(row)
            lo = row[0] + 1
        if rows:
            yield rows, 0
        bad, step = lo, 1
        while lo + step <= MAX_ID and not _seek_ok(conn, table, lo + step):
            bad = lo + step
            step *= 2
        if lo + step > MAX_ID:
            return  # nothing readable past the damage
        good = lo + step
        while good - bad > 1:  # first readable entry point in (bad, good]
            mid = (bad + good) // 2
            if _seek_ok(conn, table, mid):
                good = mid
            else:
                bad = mid
        yield [], good - lo
        lo = good
