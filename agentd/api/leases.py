"""Cap leases: a scheduler's or an operator's per-GPU ceiling with a TTL (``PUT /v1/caps/{id}``).

A lease proposes ``watts`` as the ceiling of every GPU in its scope: the GPUs it names
(``gpus``), the GPUs a job's processes use (``job``, looked up every tick from the job
tracker, so a lease placed before the job lands follows it), or every GPU of the node. Each tick
the live leases become ``rules.actions.Ceiling(gpu, watts, "lease:<id>")`` and compose with the
rules, the site budget and the ramp like any other proposal: the lowest wins, the device's
[min, max] clamps it (a lease below a GPU's minimum holds that GPU at its minimum), and a
released lease rises back at the ramp's pace.

Time: a lease expires on the daemon's monotonic clock (a wall-clock step does not shorten or
stretch it) and carries its wall-clock ``expires_ns`` for clients and for the file. The table is
persisted in ``state_dir/caps.json`` (written whole: tmp file, fsync, rename, fsync of the
directory), so leases survive a restart with their wall-clock expiry; an expired one is dropped
at load. The tick only reads the table (no I/O on the tick): a change is prepared as a new table,
written off the event loop by the server, and swapped in once it is on disk, so an answer of 200
means the lease survives a crash, and a failed write changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentd.api.models import CapLeaseRequest, LEASE_ID_PATTERN, MAX_LEASE_TTL_S, MAX_LEASE_W, MAX_REASON_CHARS
from rules.actions import Ceiling

log = structlog.get_logger("agentd.api")

CAPS_FILE = "caps.json"
CAPS_VERSION = 1
MAX_LEASES = 256
SOURCE_PREFIX = "lease:"


class LeaseError(Exception):
    """A lease change refused; ``status`` is the HTTP status, ``code`` the error code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Lease:
    """One cap lease as the node holds it."""

    id: str
    watts: float
    ttl_s: float
    gpus: tuple[int, ...] | None
    job: str | None
    reason: str
    created_ns: int  # wall: when this id was first put
    renewed_ns: int  # wall: the last put
    expires_ns: int  # wall
    expires_mono: float  # this run's monotonic clock

    @property
    def scope(self) -> Literal["node", "gpus", "job"]:
        return "job" if self.job is not None else "gpus" if self.gpus is not None else "node"

    @property
    def source(self) -> str:
        return SOURCE_PREFIX + self.id


class _Stored(BaseModel):
    """One lease in caps.json (an untrusted file: checked like a request)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(pattern=LEASE_ID_PATTERN)
    watts: float = Field(gt=0, le=MAX_LEASE_W)
    ttl_s: float = Field(gt=0, le=MAX_LEASE_TTL_S)
    gpus: list[int] | None = None
    job: str | None = None
    reason: str = Field("", max_length=MAX_REASON_CHARS)
    created_at_ns: int
    renewed_at_ns: int
    expires_at_ns: int


class _StoredFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    leases: list[dict]


def _stored(lease: Lease) -> dict:
    return {"id": lease.id, "watts": lease.watts, "ttl_s": lease.ttl_s,
            "gpus": list(lease.gpus) if lease.gpus is not None else None, "job": lease.job, "reason": lease.reason,
            "created_at_ns": lease.created_ns, "renewed_at_ns": lease.renewed_ns, "expires_at_ns": lease.expires_ns}


def encode_table(leases: Mapping[str, Lease]) -> bytes:
    """The file's bytes for ``leases`` (sorted by id: the same table gives the same file)."""
    doc = {"version": CAPS_VERSION, "leases": [_stored(leases[k]) for k in sorted(leases)]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LeaseTable:
    """The node's cap leases. ``leases`` is replaced whole on every change (never mutated), so
    the tick and a request in flight each see one consistent table."""

    def __init__(self, path: Path, *, max_leases: int = MAX_LEASES) -> None:
        self.path = path
        self.max_leases = max_leases
        self.leases: Mapping[str, Lease] = {}
        self._expired_logged: set[str] = set()

    # -- start -----------------------------------------------------------------------------------

    def load(self, now_mono: float, now_wall_ns: int) -> None:
        """Take the leases of the last run that have not expired (by their wall-clock expiry).

        An unreadable or damaged file is moved aside (``caps.json.corrupt``) and logged: its
        leases are lost, which uncaps their GPUs, so the error says so.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cap_leases_unreadable", file=str(self.path), error=exc.strerror or str(exc),
                      hint="starting with no cap leases; schedulers must put theirs again")
            return
        try:
            doc = _StoredFile.model_validate_json(raw)
        except ValidationError as exc:
            self._set_aside(f"not a caps file: {exc.errors()[0]['msg']}")
            return
        if doc.version > CAPS_VERSION:
            log.error("cap_leases_newer_format", file=str(self.path), version=doc.version,
                      hint="written by a newer agentd; starting with no cap leases (the file is left as it is)")
            return
        kept: dict[str, Lease] = {}
        dropped = 0
        for entry in doc.leases:
            try:
                s = _Stored.model_validate(entry)
            except ValidationError as exc:
                log.error("cap_lease_invalid_in_file", file=str(self.path), error=str(exc.errors()[0]["msg"]),
                          lease=str(entry.get("id"))[:64])
                continue
            if s.expires_at_ns <= now_wall_ns:
                dropped += 1
                continue
            kept[s.id] = Lease(s.id, s.watts, s.ttl_s, tuple(s.gpus) if s.gpus is not None else None, s.job,
                               s.reason, s.created_at_ns, s.renewed_at_ns, s.expires_at_ns,
                               now_mono + (s.expires_at_ns - now_wall_ns) / 1e9)
        self.leases = kept
        if kept or dropped:
            log.info("cap_leases_loaded", file=str(self.path), live=sorted(kept), expired_while_down=dropped)

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
        except OSError:
            aside = self.path
        log.error("cap_leases_damaged", file=str(self.path), moved_to=str(aside), error=why,
                  hint="starting with no cap leases (their GPUs are uncapped); schedulers must put theirs again")

    # -- the tick's side (no I/O) ----------------------------------------------------------------

    def live(self, now_mono: float) -> list[Lease]:
        """The unexpired leases, by id."""
        return [lease for _, lease in sorted(self.leases.items()) if lease.expires_mono > now_mono]

    def ceilings(self, now_mono: float, present: Iterable[int],
                 gpus_of_job: Callable[[str], Iterable[int]]) -> list[Ceiling]:
        """This tick's proposals: one Ceiling per GPU in each live lease's scope."""
        out: list[Ceiling] = []
        table = self.leases
        if not table:
            return out
        present_set = set(present)
        live = self.live(now_mono)
        for lease in live:
            if lease.job is not None:
                out += [Ceiling(g, lease.watts, lease.source) for g in sorted(set(gpus_of_job(lease.job)))
                        if g in present_set]
            elif lease.gpus is not None:
                out += [Ceiling(g, lease.watts, lease.source) for g in lease.gpus if g in present_set]
            else:
                out.append(Ceiling(None, lease.watts, lease.source))
        if len(live) < len(table):  # some expired: say so once (they go at the next change)
            for lease in table.values():
                if lease.expires_mono <= now_mono and lease.id not in self._expired_logged:
                    self._expired_logged.add(lease.id)
                    log.info("cap_lease_expired", lease=lease.id, watts=lease.watts, scope=lease.scope)
        return out

    # -- changes (prepared, written by the caller off the loop, then committed) --------------------

    def _pruned(self, now_mono: float) -> dict[str, Lease]:
        return {k: v for k, v in self.leases.items() if v.expires_mono > now_mono}

    def prepare_put(self, lease_id: str, req: CapLeaseRequest, now_mono: float,
                    now_wall_ns: int) -> tuple[dict[str, Lease], Lease, bool]:
        """The table with ``lease_id`` put (created, or replaced and renewed); returns it, the
        lease, and whether it is new. LeaseError when the table is full."""
        table = self._pruned(now_mono)
        old = table.get(lease_id)
        if old is None and len(table) >= self.max_leases:
            raise LeaseError(409, "too_many_leases",
                             f"this node holds {len(table)} cap leases, the most it takes; delete some "
                             "(DELETE /v1/caps/{lease_id}) or let them expire")
        ttl_ns = round(req.ttl_s * 1e9)
        lease = Lease(lease_id, float(req.watts), float(req.ttl_s),
                      tuple(req.gpus) if req.gpus is not None else None, req.job, req.reason,
                      old.created_ns if old is not None else now_wall_ns, now_wall_ns, now_wall_ns + ttl_ns,
                      now_mono + req.ttl_s)
        table[lease_id] = lease
        return table, lease, old is None

    def prepare_delete(self, lease_id: str, now_mono: float) -> tuple[dict[str, Lease], Lease]:
        """The table without ``lease_id``; LeaseError (404) when it holds no live lease of that id."""
        table = self._pruned(now_mono)
        lease = table.pop(lease_id, None)
        if lease is None:
            raise LeaseError(404, "not_found", f"no cap lease {lease_id!r} on this node (expired, deleted, or "
                                               "never put); GET /v1/caps lists the live ones")
        return table, lease

    def commit(self, table: Mapping[str, Lease]) -> None:
        """Swap in a prepared table once it is on disk."""
        self.leases = dict(table)
        self._expired_logged &= set(table)

    def get(self, lease_id: str, now_mono: float) -> Lease | None:
        lease = self.leases.get(lease_id)
        return lease if lease is not None and lease.expires_mono > now_mono else None
