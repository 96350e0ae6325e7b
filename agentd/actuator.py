"""The actuator: the one place that writes GPU power limits, and the safety rules around it.

Invariants (DESIGN.md section 4), each enforced here rather than trusted to callers:

- never write outside the device's [min, max] constraints (targets are clamped; the backend
  refuses out-of-range values as a second guard);
- write only when the value changes (NVML writes are not free, and a steady node makes none);
- never fight an out-of-band limiter: when the enforced limit reads below what we set, the GPU is
  reported ``externally_limited`` and we make no write that would raise it;
- ``dry_run`` evaluates and reports everything and writes nothing;
- before the first write to a GPU, the limit it had is persisted (``original_limits.json`` in the
  state directory, keyed by UUID, written atomically); on stop it is restored, and a crash is
  repaired at the next start or by ``agentd restore-limits``;
- NO_PERMISSION on a write gives one clear error, and that GPU continues observe-only.

It is synchronous on purpose: the daemon runs it on the NVML worker thread, with the samples of
the same tick, so every write is serialised with the reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import structlog

from collectors.base import GpuBackend, GpuSample, LimitWriteError

log = structlog.get_logger("agentd.actuator")

ORIGINALS_FILE = "original_limits.json"
TOLERANCE_W = 1.0  # read-back vs written: drivers may round a written limit
CHANGE_W = 0.01  # smaller target changes are not worth a write


@dataclass(slots=True)
class GpuControl:
    """What the actuator knows about one GPU's limit, for reports (API, points, demo)."""

    target_w: float | None = None  # what composition asked for, clamped
    set_w: float | None = None  # what we last wrote (or would have, in dry run)
    externally_limited: bool = False
    observe_only: bool = False  # dry run, or the write was refused
    writes: int = 0
    error: str | None = None


@dataclass(slots=True)
class Actuator:
    backend: GpuBackend
    state_dir: Path
    dry_run: bool = False
    controls: dict[int, GpuControl] = field(default_factory=dict)
    _originals: dict[str, dict] = field(default_factory=dict)  # uuid -> {"index", "limit_w"}

    @property
    def originals_path(self) -> Path:
        return Path(self.state_dir) / ORIGINALS_FILE

    # -- targets -> writes ---------------------------------------------------------------------

    def apply(self, targets_w: Mapping[int, float], samples: Mapping[int, GpuSample]) -> dict[int, GpuControl]:
        """Bring each GPU's limit to its target (``None``/absent: leave it alone)."""
        self.write(self.plan(targets_w, samples))
        return self.controls

    def plan(self, targets_w: Mapping[int, float],
             samples: Mapping[int, GpuSample]) -> list[tuple[int, GpuSample, float]]:
        """Decide, without touching NVML, which GPUs need a write: ``(index, sample, watts)``.

        ``samples`` are this tick's readings: the enforced and management limits are read every
        tick, so a limiter outside the daemon is seen before we write, not after. The daemon
        plans on the event loop and goes to the NVML thread only when there is something to write.
        """
        writes: list[tuple[int, GpuSample, float]] = []
        for index, sample in samples.items():
            control = self.controls.setdefault(index, GpuControl(observe_only=self.dry_run))
            target = targets_w.get(index)
            if (target is None or not math.isfinite(target) or not sample.healthy
                    or sample.limit_min_w is None or sample.limit_max_w is None):
                continue  # nothing asked, nothing safe to write: leave the GPU as it is
            target = min(max(float(target), sample.limit_min_w), sample.limit_max_w)
            control.target_w = target
            enforced = sample.limit_w
            current = sample.limit_current_w if sample.limit_current_w is not None else enforced
            # Our last write still holds when the GPU reads it back (within the driver's rounding).
            ours_holds = (control.set_w is not None and current is not None
                          and abs(current - control.set_w) < TOLERANCE_W)
            held = control.set_w if ours_holds else current
            control.externally_limited = enforced is not None and held is not None and enforced < held - TOLERANCE_W
            if held is not None and abs(held - target) < CHANGE_W:
                continue  # already there: no write
            if control.observe_only:
                control.set_w = target  # what we would have written: reported, not written
                continue
            if current is not None and target > current and (control.externally_limited or not ours_holds):
                # Something else set or enforces a lower limit (an operator's nvidia-smi -pl, a
                # BMC power brake): raising it would fight them. Lowering is always allowed.
                control.externally_limited = True
                continue
            writes.append((index, sample, target))
        return writes

    def write(self, writes: list[tuple[int, GpuSample, float]]) -> None:
        """Carry out a plan (on the NVML thread): persist originals, write, handle refusals."""
        for index, sample, target in writes:
            self._write(index, sample, target, self.controls[index])

    def _write(self, index: int, sample: GpuSample, target: float, control: GpuControl) -> None:
        try:
            added = self._remember_original(sample)
        except OSError as exc:
            control.error = f"cannot persist the original limit: {exc}"
            log.error("power_limit_not_written", gpu=index, uuid=sample.uuid, file=str(self.originals_path),
                      error=str(exc), hint="the state directory must be writable (free space? permissions?); "
                                           "no limit is written that could not be restored")
            return
        try:
            self.backend.set_power_limit(index, target)
        except (LimitWriteError, ValueError) as exc:
            control.error = str(exc)
            if added:  # nothing was changed on this GPU: there is nothing to restore
                del self._originals[sample.uuid]
                self._save_originals()
            if isinstance(exc, LimitWriteError) and exc.permission:
                control.observe_only = True
                log.error("power_limit_no_permission", gpu=index, uuid=sample.uuid, error=str(exc),
                          hint="agentd needs root or CAP_SYS_ADMIN to set limits; this GPU continues "
                               "observe-only (as in dry_run)")
            else:
                log.error("power_limit_write_failed", gpu=index, uuid=sample.uuid, target_w=target, error=str(exc))
            return
        control.set_w = target
        control.writes += 1
        control.error = None
        log.debug("power_limit_set", gpu=index, uuid=sample.uuid, limit_w=target)

    # -- originals: persist before the first write, restore on stop ---------------------------------

    @property
    def holds_originals(self) -> bool:
        """True while some GPU has a persisted original limit not yet restored."""
        return bool(self._originals)

    def load_originals(self) -> dict[str, dict]:
        """The persisted originals (empty when none): what a crashed run left to restore."""
        try:
            self._originals = json.loads(self.originals_path.read_text())
        except FileNotFoundError:
            self._originals = {}
        except (OSError, ValueError) as exc:
            raise OSError(f"{self.originals_path}: unreadable ({exc}); the original limits cannot be "
                          "restored from it: check the GPUs' limits with nvidia-smi and remove the file") from exc
        return self._originals

    def _remember_original(self, sample: GpuSample) -> bool:
        """Persist the GPU's limit before our first write to it; True when newly recorded."""
        if sample.uuid in self._originals:
            return False  # the first value seen stays the original, across restarts too
        original = sample.limit_current_w if sample.limit_current_w is not None else sample.limit_w
        if original is None:
            return False
        self._originals[sample.uuid] = {"index": sample.index, "limit_w": original}
        try:
            self._save_originals()
        except OSError:
            del self._originals[sample.uuid]
            raise
        return True

    def _save_originals(self) -> None:
        """Write the originals atomically (tmp + fsync + rename); no file when none are held."""
        path = self.originals_path
        if not self._originals:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(self._originals, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def restore(self, uuids_to_index: Mapping[str, int] | None = None) -> dict[str, str]:
        """Write every persisted original back; forget those restored. Returns uuid -> outcome.

        ``uuids_to_index`` maps UUIDs to current indexes (indexes can change across reboots);
        by default the persisted index is used. In dry run nothing was written, so nothing is.
        """
        outcome: dict[str, str] = {}
        if self.dry_run:
            return outcome
        for uuid, entry in list(self._originals.items()):
            index = (uuids_to_index or {}).get(uuid, entry["index"])
            try:
                self.backend.set_power_limit(index, float(entry["limit_w"]))
            except (LimitWriteError, ValueError, IndexError) as exc:
                outcome[uuid] = f"failed: {exc}"
                log.error("power_limit_restore_failed", gpu=index, uuid=uuid, error=str(exc))
                continue
            outcome[uuid] = f"restored {entry['limit_w']:g} W"
            del self._originals[uuid]
            log.info("power_limit_restored", gpu=index, uuid=uuid, limit_w=entry["limit_w"])
        self._save_originals()
        for control in self.controls.values():
            control.set_w = None
        return outcome
