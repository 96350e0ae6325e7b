"""The actuator: the one place that writes GPU power limits, and the safety rules around it.

Invariants (DESIGN.md section 4), each enforced here rather than trusted to callers:

- every GPU has a **baseline**: the operator's latest intent (the limit it had when the daemon
  first saw it, then any limit set outside the daemon: ``nvidia-smi -pl``, a GPU reset that puts
  the driver default back). The daemon never writes a limit unless something it owns asks for
  one below the baseline, and a released cap returns to the baseline. A change made outside while
  a cap is held becomes the new baseline (logged); a cap still asked for is then re-applied;
- never write outside the device's [min, max] constraints (targets are clamped; the backend
  refuses out-of-range values as a second guard);
- write only when the value changes (NVML writes are not free, and a steady node makes none);
- never fight an out-of-band limiter: when the enforced limit reads below what we hold, the GPU
  is reported ``externally_limited`` and we make no write that would raise it;
- ``dry_run`` evaluates and reports everything and writes nothing;
- before the first write to a GPU, its baseline is persisted (``original_limits.json`` in the
  state directory, keyed by UUID, written atomically); the record lives exactly while a cap of
  ours is held. On stop the baseline is restored, and a crash is repaired at the next start or by
  ``agentd restore-limits``. A record is applied only to the board with its UUID, never to
  another one that took its index;
- NO_PERMISSION on a write gives one clear error, and that GPU continues observe-only; any other
  refusal is retried with a per-GPU backoff, logged once per change of state, and counted.

``observe`` and ``plan`` run on the event loop with the tick's readings; ``write`` and
``restore`` run on the NVML thread, so every write is serialised with the reads.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping

import structlog

from agentd.backoff import ceiling_s
from collectors.base import GpuBackend, GpuSample, LimitWriteError

log = structlog.get_logger("agentd.actuator")

ORIGINALS_FILE = "original_limits.json"
ORIGINALS_VERSION = 2  # 1: a bare {uuid: record} map (gpu-agentd 0.1); 2: {"version", "gpus"}
TOLERANCE_W = 1.0  # read-back vs written: drivers may round a written limit
CHANGE_W = 0.01  # smaller target changes are not worth a write
RETRY_MIN_S = 5.0  # first retry after a refused write (not NO_PERMISSION) ...
RETRY_MAX_S = 300.0  # ... doubling up to this
ORPHAN_MAX_AGE_S = 7 * 86400.0  # a record whose GPU has been absent this long is dropped
SET_LOG_EVERY_S = 10.0  # a ramp logs at most one power_limit_set line per GPU in this time


def _held_now(sample: GpuSample) -> float | None:
    """The management limit the GPU holds now (what software last set), else the enforced one."""
    return sample.limit_current_w if sample.limit_current_w is not None else sample.limit_w


@dataclass(slots=True)
class GpuControl:
    """What the actuator knows about one GPU's limit, for reports (API, points, demo)."""

    uuid: str = ""
    baseline_w: float | None = None  # the operator's latest intent: what a release returns to
    target_w: float | None = None  # what composition asked for, clamped (limit_target_w)
    source: str = ""  # the proposal that binds target_w (a rule, "node:...", "baseline")
    set_w: float | None = None  # what we wrote and the GPU still holds (limit_set_w); None: none
    externally_limited: bool = False
    observe_only: bool = False  # dry run, or the write was refused for lack of permission
    writes: int = 0
    write_errors: int = 0  # refused writes (limit_write_errors in the agent point)
    error: str | None = None  # the last refusal, until a write succeeds
    retry_at: float | None = None  # monotonic: no write is tried before this after a refusal
    failures: int = 0  # refusals in a row (the backoff's exponent); 0 after a good write
    _last_log: float = -math.inf  # monotonic time of the last power_limit_set line


@dataclass(slots=True)
class Actuator:
    backend: GpuBackend
    state_dir: Path
    dry_run: bool = False
    controls: dict[int, GpuControl] = field(default_factory=dict)
    monotonic: Callable[[], float] = time.monotonic  # the daemon passes its clock's (backoff on test time)
    wall: Callable[[], float] = time.time  # epoch seconds, for the records' ages
    _originals: dict[str, dict] = field(default_factory=dict)  # uuid -> record (see _save_originals)

    @property
    def originals_path(self) -> Path:
        return Path(self.state_dir) / ORIGINALS_FILE

    @property
    def write_errors(self) -> int:
        return sum(c.write_errors for c in self.controls.values())

    # -- readings -> baselines -----------------------------------------------------------------

    def _control(self, sample: GpuSample) -> GpuControl:
        control = self.controls.get(sample.index)
        if control is None or control.uuid != sample.uuid:
            # A new GPU at this index (first sight, or a board swapped under a running daemon):
            # what we knew of the old one says nothing about this one.
            control = self.controls[sample.index] = GpuControl(uuid=sample.uuid, observe_only=self.dry_run)
        return control

    def observe(self, samples: Mapping[int, GpuSample]) -> dict[int, float]:
        """Track each GPU's baseline from this tick's readings; returns ``{index: baseline_w}``.

        A management limit that reads differently from what we hold (or, holding nothing, from
        the baseline) was set outside the daemon: it becomes the baseline, and what we held is no
        longer ours to restore. Called every tick before the rules, so a cap is composed against
        the operator's latest value, never a stale one.
        """
        taken_over: list[str] = []
        for index, sample in samples.items():
            if not sample.healthy:
                continue
            now_w = _held_now(sample)
            if now_w is None:
                continue
            control = self._control(sample)
            record = self._originals.get(sample.uuid)
            if control.baseline_w is None:
                # First sight. A record left by an earlier run (dry run now, or not yet restored)
                # holds the operator's intent; the GPU may still hold that run's cap.
                control.baseline_w = float(record["limit_w"]) if record is not None else now_w
                if record is not None and abs(now_w - control.baseline_w) >= TOLERANCE_W:
                    control.set_w = now_w
                continue
            held = control.set_w if control.set_w is not None else control.baseline_w
            if abs(now_w - held) < TOLERANCE_W:
                continue  # ours (or the baseline) still holds
            log.info("power_limit_changed_outside", gpu=index, uuid=sample.uuid, from_w=held, to_w=now_w,
                     baseline_w=now_w, capped=control.set_w is not None,
                     hint="taken as this GPU's new baseline: a released cap returns to it; caps still "
                          "asked for are re-applied")
            control.baseline_w = now_w
            control.set_w = None
            if record is not None:  # nothing of ours is held now: nothing to restore
                taken_over.append(sample.uuid)
        self._forget(taken_over)
        return {i: c.baseline_w for i, c in self.controls.items() if c.baseline_w is not None}

    # -- targets -> writes ---------------------------------------------------------------------

    def apply(self, targets_w: Mapping[int, float], samples: Mapping[int, GpuSample],
              sources: Mapping[int, str] | None = None) -> dict[int, GpuControl]:
        """Observe, plan and write in one call (tests, tools); the daemon splits the three."""
        self.observe(samples)
        self.write(self.plan(targets_w, samples, sources))
        return self.controls

    def plan(self, targets_w: Mapping[int, float], samples: Mapping[int, GpuSample],
             sources: Mapping[int, str] | None = None) -> list[tuple[int, GpuSample, float]]:
        """Decide, without touching NVML, which GPUs need a write: ``(index, sample, watts)``.

        ``samples`` are this tick's readings (``observe`` has seen them): the enforced and
        management limits are read every tick, so a limiter outside the daemon is seen before we
        write, not after. A target at or above the baseline is no request: holding nothing, the
        GPU is left alone; holding a cap, it is released to the baseline.
        """
        writes: list[tuple[int, GpuSample, float]] = []
        now = self.monotonic()
        for index, sample in samples.items():
            control = self.controls.get(index)
            target = targets_w.get(index)
            if (control is None or control.uuid != sample.uuid or control.baseline_w is None
                    or target is None or not math.isfinite(target) or not sample.healthy
                    or sample.limit_min_w is None or sample.limit_max_w is None):
                continue  # nothing asked, nothing known, nothing safe to write: leave the GPU as it is
            baseline = control.baseline_w
            target = min(max(float(target), sample.limit_min_w), sample.limit_max_w, baseline)
            control.target_w = target
            control.source = (sources or {}).get(index, "")
            held = control.set_w if control.set_w is not None else baseline
            enforced = sample.limit_w
            control.externally_limited = enforced is not None and enforced < held - TOLERANCE_W
            if control.set_w is None and target >= baseline - CHANGE_W:
                continue  # nothing asks for a cap: the GPU keeps what its operator gave it
            if abs(held - target) < CHANGE_W:
                continue  # already there: no write
            if control.observe_only:
                continue  # dry run / no permission: reported as limit_target_w, never written
            if target > held and control.externally_limited:
                continue  # something outside holds it lower (BMC power brake): raising would fight it
            if control.retry_at is not None and now < control.retry_at:
                continue  # a refused write backs off
            writes.append((index, sample, target))
        return writes

    def write(self, writes: list[tuple[int, GpuSample, float]]) -> None:
        """Carry out a plan (on the NVML thread): persist baselines, write, handle refusals.

        The baselines of every GPU the plan caps are persisted in one file write before the
        first NVML write, and the records no longer needed are dropped in one write after: a
        crossing on eight GPUs waits for one fsync, not eight (the write is protection).
        """
        caps = [(s, self.controls[i].baseline_w) for i, s, t in writes
                if t < (self.controls[i].baseline_w or 0.0) - CHANGE_W]  # releases need no record
        try:
            added = self._remember(caps)
        except OSError as exc:
            added, unsaved = set(), {s.uuid for s, _ in caps if s.uuid not in self._originals}
            for index, sample, target in writes:
                if sample.uuid in unsaved:
                    self._refused(index, sample, self.controls[index], target,
                                  f"cannot persist the baseline limit to {self.originals_path}: {exc}",
                                  hint="the state directory must be writable (free space? permissions?); "
                                       "no limit is written that could not be restored")
            writes = [w for w in writes if w[1].uuid not in unsaved]
        done = [sample.uuid for index, sample, target in writes
                if not self._write(index, sample, target, self.controls[index], sample.uuid in added)]
        self._forget(done)

    def _write(self, index: int, sample: GpuSample, target: float, control: GpuControl, added: bool) -> bool:
        """One NVML write; False when the GPU's record can go (released, or a new one not used)."""
        baseline = control.baseline_w
        assert baseline is not None  # plan() only writes GPUs with a baseline
        releasing = target >= baseline - CHANGE_W
        try:
            self.backend.set_power_limit(index, target)
        except LimitWriteError as exc:
            if exc.permission:
                control.observe_only = True
                control.error = str(exc)
                control.write_errors += 1
                log.error("power_limit_no_permission", gpu=index, uuid=sample.uuid, error=str(exc),
                          hint="agentd needs root or CAP_SYS_ADMIN to set limits; this GPU continues "
                               "observe-only (as in dry_run)")
            else:
                self._refused(index, sample, control, target, str(exc))
            return not added  # nothing was changed on this GPU: a new record has nothing to restore
        except Exception as exc:  # a backend bug (TypeError, ...) must not stop the other GPUs
            self._refused(index, sample, control, target, f"{type(exc).__name__}: {exc}")
            return not added
        before = control.set_w if control.set_w is not None else baseline
        control.writes += 1
        if control.error is not None:
            log.info("power_limit_write_recovered", gpu=index, uuid=sample.uuid, after_errors=control.write_errors)
        control.error = None
        control.retry_at = None
        control.failures = 0
        control.set_w = None if releasing else target  # released: nothing of ours is held any more
        now = self.monotonic()
        if releasing or before > target or now - control._last_log >= SET_LOG_EVERY_S:
            # Every fall and every full release is logged; a slow release (the ramp) is
            # logged at most every SET_LOG_EVERY_S per GPU.
            control._last_log = now
            log.info("power_limit_set", gpu=index, uuid=sample.uuid, from_w=round(before, 3),
                     to_w=round(target, 3), source=control.source or None,
                     released=releasing or None)
        return not releasing

    def _refused(self, index: int, sample: GpuSample, control: GpuControl, target: float, error: str,
                 hint: str | None = None) -> None:
        """Count a refused write, back off, and log only when the error changes."""
        control.write_errors += 1
        control.failures += 1
        delay = ceiling_s(control.failures - 1, RETRY_MIN_S, RETRY_MAX_S)
        control.retry_at = self.monotonic() + delay
        if error != control.error:
            control.error = error
            log.error("power_limit_write_failed", gpu=index, uuid=sample.uuid, target_w=target, error=error,
                      retry_in_s=delay, hint=hint or "retried with backoff; logged again only if the error changes")

    # -- baselines persisted while a cap is held; restore on stop ------------------------------------

    @property
    def holds_originals(self) -> bool:
        """True while some GPU has a persisted baseline not yet restored."""
        return bool(self._originals)

    def load_originals(self) -> dict[str, dict]:
        """The persisted records (empty when none): what a crashed run left to restore."""
        path = self.originals_path
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {"version": ORIGINALS_VERSION, "gpus": {}}
        except (OSError, ValueError) as exc:
            raise OSError(f"{path}: unreadable ({exc}); the original limits cannot be "
                          "restored from it: check the GPUs' limits with nvidia-smi and remove the file") from exc
        if isinstance(data, dict) and "version" not in data:
            data = {"version": 1, "gpus": data}  # written by gpu-agentd 0.1: same records, no header
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > ORIGINALS_VERSION:
            raise OSError(f"{path}: format version {version} is newer than this agentd understands "
                          f"({ORIGINALS_VERSION}); it was written by a newer gpu-agentd: run that version's "
                          "`agentd restore-limits`, or upgrade this one; the file is left as it is")
        records = data.get("gpus") if isinstance(data, dict) else None
        if not isinstance(records, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("limit_w"), (int, float)) for r in records.values()):
            raise OSError(f"{path}: not a map of GPU UUID -> {{\"limit_w\": W, ...}}; check "
                          "the GPUs' limits with nvidia-smi and remove the file")
        self._originals = records
        return self._originals

    def _remember(self, caps: list[tuple[GpuSample, float | None]]) -> set[str]:
        """Persist the baselines of GPUs about to be capped (one write); returns the UUIDs added.

        A GPU already recorded keeps its record: its baseline is the one a restore must write.
        """
        added = {s.uuid for s, _ in caps if s.uuid not in self._originals}
        if not added:
            return added
        for sample, baseline in caps:
            if sample.uuid in added:
                self._originals[sample.uuid] = {"index": sample.index, "limit_w": baseline, "saved_at": self.wall()}
        try:
            self._save_originals()
        except OSError:
            for uuid in added:
                del self._originals[uuid]
            raise
        return added

    def _forget(self, uuids: list[str]) -> None:
        """Drop records (their GPUs hold their baselines again), in one write; failures are logged."""
        if not [self._originals.pop(uuid) for uuid in uuids if uuid in self._originals]:
            return
        try:
            self._save_originals()
        except OSError as exc:
            log.error("originals_not_saved", file=str(self.originals_path), error=str(exc),
                      hint="a stale record may be restored at the next start; check the state directory")

    def _save_originals(self) -> None:
        """Write the records atomically (tmp + fsync + rename); no file when none are held.

        The file: ``{"version": 2, "gpus": {uuid: record}}``; a record: ``{"index": last index
        seen, "limit_w": baseline, "saved_at": wall s, "missing_since": wall s}`` (the last only
        while its GPU is absent). Version 1 files (a bare map of records) are read as well.
        """
        path = self.originals_path
        if not self._originals:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump({"version": ORIGINALS_VERSION, "gpus": self._originals}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def forget(self, uuid: str) -> bool:
        """Drop the record of ``uuid`` for good (``agentd restore-limits --forget``)."""
        if uuid not in self._originals:
            return False
        self._originals.pop(uuid)
        self._save_originals()
        return True

    def restore(self, uuids_to_index: Mapping[str, int]) -> dict[str, str]:
        """Write every persisted baseline back to the GPU with its UUID; forget those restored.

        ``uuids_to_index`` maps the UUIDs present now to their indexes (indexes change across
        reboots). A record whose GPU is absent (a swapped board) is never applied to another
        one: it is kept and reported, and dropped after ``ORPHAN_MAX_AGE_S`` absent or by
        ``forget``. In dry run nothing was written, so nothing is. Returns uuid -> outcome.
        """
        outcome: dict[str, str] = {}
        if self.dry_run:
            return outcome
        changed = False
        now_wall = self.wall()
        for uuid, entry in list(self._originals.items()):
            index = uuids_to_index.get(uuid)
            if index is None:
                since = entry.setdefault("missing_since", now_wall)
                changed = changed or since == now_wall
                if now_wall - since > ORPHAN_MAX_AGE_S:
                    del self._originals[uuid]
                    changed = True
                    outcome[uuid] = f"dropped: GPU absent for more than {ORPHAN_MAX_AGE_S / 86400:g} days"
                    log.warning("power_limit_record_dropped", uuid=uuid, limit_w=entry["limit_w"],
                                missing_since=since)
                    continue
                outcome[uuid] = (f"kept: GPU not present (was index {entry.get('index')}, "
                                 f"{entry['limit_w']:g} W); never applied to another board")
                log.warning("power_limit_record_orphaned", uuid=uuid, limit_w=entry["limit_w"],
                            last_index=entry.get("index"),
                            hint=f"dropped after {ORPHAN_MAX_AGE_S / 86400:g} days absent, or now with "
                                 f"`agentd restore-limits --forget {uuid}`")
                continue
            if entry.pop("missing_since", None) is not None:
                changed = True
            try:
                self.backend.set_power_limit(index, float(entry["limit_w"]))
            except Exception as exc:  # NVML refusal or a bug: the next GPU is still restored
                outcome[uuid] = f"failed: {exc}"
                log.error("power_limit_restore_failed", gpu=index, uuid=uuid, error=str(exc),
                          hint="the record is kept; run `agentd restore-limits` once the cause is fixed")
                continue
            outcome[uuid] = f"restored {entry['limit_w']:g} W"
            del self._originals[uuid]
            changed = True
            log.info("power_limit_restored", gpu=index, uuid=uuid, limit_w=entry["limit_w"])
            control = self.controls.get(index)
            if control is not None and control.uuid == uuid:
                control.set_w = None
                control.baseline_w = float(entry["limit_w"])
        if changed:
            self._save_originals()
        return outcome
