"""Per-job power and energy: the ``job_gpu`` and ``job_energy`` points, and each GPU's class.

Every tick the tracker maps each GPU's processes to jobs (``collectors.jobs``), gives each job
its class (``collectors.job_classes``), and the ledger turns that and the GPU readings into:

* ``classes_by_gpu``: the highest class among a GPU's jobs, ``"idle"`` with no process, the
  default class when its processes belong to no job found: what the node's budget split needs;
* ``job_gpu`` points: one per owner of each busy GPU. NVML gives no per-process power, so a
  GPU's power is split evenly between its owners (``share`` = 1/n, ``shared`` true when n > 1,
  as with MPS or time-slicing); processes of no job found are one owner (kind
  ``unattributed``), so the owners' ``power_w`` add up to the GPU's;
* ``job_energy`` points: per job, every ``jobs.energy_interval`` while it runs and once when it
  ends (its processes left every GPU), ``final`` true on that last one. ``energy_j`` is the
  job's energy on this node since it was first seen (cumulative: read the last point), from the
  GPUs' energy counters. A multi-node job writes one series per node: sum over ``host``.

Energy accounting. The energy between two readings of a GPU goes to the owners seen at the
earlier reading, split evenly (a job is billed from its first reading to the first reading
without it). A reading without a counter value (a hung tick, a lost GPU) does not lose energy:
the next counter value covers the gap, spread over the gap's ticks by duration and given to the
owners of each tick; a job that ended during such a gap has its final point wait for that value
(at most ``UNHEALTHY_GRACE_S``; ``end_ns`` is still its first reading without it). A counter
that went backwards was reset (driver reload, GPU reset): the energy since the reset is counted
and the part before it is lost, so the figure is a lower bound and never negative. A GPU that
never gives a counter value is metered by its power readings (trapezoid rule). A GPU that stops
answering keeps its owners for ``UNHEALTHY_GRACE_S`` (one bad reading does not end a job), then
it has none.

The ledger is pure: readings, owners and classes in, points out, wall-clock ``ts_ns`` passed in.
The tracker (``JobTracker``) is the daemon's facade; its only I/O is the attribution's reads of
/proc and, on a worker thread, squeue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agentd.lineproto import Point, encode
from collectors.base import GpuSample
from collectors.job_classes import ClassProvider, RefreshOutcome, Runner, run_command
from collectors.classes import CLASSES
from collectors.jobs import GpuJobs, JobAttributor, JobRef, JobsConfig, Via, job_sort_key

log = structlog.get_logger("agentd.jobs")

UNHEALTHY_GRACE_S = 60.0  # a GPU that stops answering keeps its owners this long
MAX_PENDING_SEGMENTS = 3600  # ticks without a counter value kept per GPU; older ones are lost
UNATTRIBUTED_KIND = "unattributed"

Owner = tuple[str, str]  # JobRef.key, or (UNATTRIBUTED_KIND, "") for processes of no job found
_UNATTRIBUTED: Owner = (UNATTRIBUTED_KIND, "")


# -- points -------------------------------------------------------------------------------------

def job_gpu_point(host: str, gpu: int, ts_ns: int, *, kind: str, cls: str, job: str | None,
                  power_w: float | None, share: float, slot: int = 0, step: str | None = None,
                  via: str | None = None) -> Point:
    """The ``job_gpu`` measurement: one owner of one GPU at one tick.

    ``job`` is a field, not a tag: a tag would make one series per job per GPU, for ever.
    ``slot`` (a tag, absent when 0) tells apart owners of one GPU with the same class and kind,
    whose points would otherwise share series and timestamp and overwrite each other.
    ``power_w`` is the owner's part of the GPU's power (``share`` of it: an even split).
    """
    tags = {"host": host, "gpu": str(gpu), "class": cls, "kind": kind}
    if slot:
        tags["slot"] = str(slot)
    return Point("job_gpu", tags, {
        "job": job, "step": step, "power_w": power_w, "share": share, "shared": share < 1.0,
        "priority": CLASSES.index(cls), "via": via,
    }, ts_ns)


def job_energy_point(host: str, ts_ns: int, *, kind: str, cls: str, job: str, energy_j: float, gpus: int,
                     start_ns: int, end_ns: int, final: bool, slot: int = 0) -> Point:
    """The ``job_energy`` measurement: a job's energy on this node from ``start_ns`` to
    ``end_ns`` (cumulative), written every ``energy_interval`` and with ``final`` at its end.

    The job id is a field so the series count stays bounded; ``slot`` (a tag, absent when 0)
    tells apart jobs of one class and kind written in the same tick.
    """
    tags = {"host": host, "class": cls, "kind": kind}
    if slot:
        tags["slot"] = str(slot)
    return Point("job_energy", tags, {
        "job": job, "energy_j": energy_j, "gpus": gpus, "start_ns": start_ns, "end_ns": end_ns, "final": final,
    }, ts_ns)


# -- the ledger ---------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class JobStep:
    """What one tick gives the daemon: each GPU's class and jobs (for the budget split) and the
    lines to store. ``ended`` are the jobs that left this node in this tick."""

    classes_by_gpu: dict[int, str]
    jobs_by_gpu: dict[int, tuple[JobRef, ...]]
    lines: list[tuple[int, str]] = field(default_factory=list)
    ended: tuple[JobRef, ...] = ()


@dataclass(slots=True)
class LedgerStats:
    """Cumulative since start (the ``agent`` point carries them)."""

    jobs_started: int = 0
    jobs_ended: int = 0
    counter_resets: int = 0  # an energy counter went backwards: energy before the reset lost
    unattributed_j: float = 0.0  # energy of processes of no job found
    idle_j: float = 0.0  # energy of GPUs with no process
    after_end_j: float = 0.0  # energy of a gap that closed after its job had ended
    lost_s: float = 0.0  # GPU time with neither a counter value nor a power reading
    power_metered_j: float = 0.0  # energy from power readings (GPUs without a counter)


@dataclass(slots=True)
class _Job:
    ref: JobRef  # step-less
    cls: str
    start_ns: int
    last_emit_ns: int
    energy_j: float = 0.0
    gpus: set[int] = field(default_factory=set)
    ended_ns: int | None = None  # first reading without it (its final point may wait for a counter)


@dataclass(slots=True)
class _Meter:
    """One GPU's energy bookkeeping and its owners at the last reading."""

    prev_ts_ns: int | None = None
    owners: tuple[Owner, ...] = ()
    refs: tuple[JobRef, ...] = ()
    via: Mapping[JobRef, Via] = field(default_factory=dict)
    last_healthy_ns: int | None = None
    counter_j: float | None = None  # the last counter value
    counter_seen: bool = False
    power_w: float | None = None
    pending: list[tuple[int, tuple[Owner, ...]]] = field(default_factory=list)  # (dt_ns, owners)
    pending_lost_ns: int = 0


class JobLedger:
    """Owners and readings in, classes and points out; pure (``ts_ns`` is passed in)."""

    def __init__(self, host: str, *, default_class: str = "normal", energy_interval_s: float = 300.0) -> None:
        self.host = host
        self.default_class = default_class
        self.energy_interval_ns = round(energy_interval_s * 1e9)
        self._meters: dict[int, _Meter] = {}
        self._jobs: dict[Owner, _Job] = {}
        self.stats = LedgerStats()

    @property
    def active_jobs(self) -> int:
        """Jobs on a GPU of this node now (not those whose final point waits for a counter)."""
        return sum(1 for j in self._jobs.values() if j.ended_ns is None)

    def _owed(self, ts_ns: int) -> set[Owner]:
        """Owners of energy that a counter gap has not yet delivered, on GPUs that answered
        within the grace (a GPU lost for longer is not waited for)."""
        grace_ns = UNHEALTHY_GRACE_S * 1e9
        return {o for m in self._meters.values()
                if m.pending and m.last_healthy_ns is not None and ts_ns - m.last_healthy_ns <= grace_ns
                for _, owners in m.pending for o in owners}

    def step(self, samples: Sequence[GpuSample], owners: Mapping[int, GpuJobs],
             class_of: Callable[[JobRef], str], ts_ns: int) -> tuple[JobStep, list[Point]]:
        """One tick: ``owners`` from the attribution (healthy GPUs), ``class_of`` the provider's."""
        points: list[Point] = []
        by_index = {s.index: s for s in samples}
        for index in by_index.keys() - self._meters.keys():
            self._meters[index] = _Meter()
        now_refs: dict[int, tuple[JobRef, ...]] = {}
        now_via: dict[int, Mapping[JobRef, Via]] = {}
        now_owners: dict[int, tuple[Owner, ...]] = {}
        for index, meter in self._meters.items():
            sample = by_index.get(index)
            if sample is not None and sample.healthy:
                gpu_jobs = owners.get(index, GpuJobs())
                refs = _one_per_job(gpu_jobs.jobs)
                keys = tuple(r.key for r in refs) + ((_UNATTRIBUTED,) if gpu_jobs.unattributed else ())
                now_refs[index], now_via[index], now_owners[index] = refs, gpu_jobs.via, keys
            elif meter.last_healthy_ns is not None and ts_ns - meter.last_healthy_ns <= UNHEALTHY_GRACE_S * 1e9:
                now_refs[index], now_via[index], now_owners[index] = meter.refs, meter.via, meter.owners
            else:
                now_refs[index], now_via[index], now_owners[index] = (), {}, ()
            self._meter(meter, sample, ts_ns)

        # jobs present now: new ones start, classes follow the provider
        present: dict[Owner, JobRef] = {}
        for index, refs in now_refs.items():
            for ref in refs:
                present.setdefault(ref.key, JobRef(ref.kind, ref.id))
                job = self._jobs.get(ref.key)
                if job is None:
                    job = self._jobs[ref.key] = _Job(JobRef(ref.kind, ref.id), self.default_class, ts_ns, ts_ns)
                    self.stats.jobs_started += 1
                job.gpus.add(index)
        for key, ref in present.items():
            self._jobs[key].cls = class_of(ref)

        energy_due: list[tuple[_Job, bool]] = []
        ended: list[JobRef] = []
        owed = self._owed(ts_ns)
        for key in list(self._jobs):
            job = self._jobs[key]
            if key in present:
                job.ended_ns = None  # (back) on a GPU
                if ts_ns < job.last_emit_ns:
                    job.last_emit_ns = ts_ns  # the wall clock stepped back: start the interval again
                elif ts_ns - job.last_emit_ns >= self.energy_interval_ns:
                    energy_due.append((job, False))
                continue
            if job.ended_ns is None:
                job.ended_ns = ts_ns
            # the final point waits while a counter gap still owes the job energy (bounded)
            if key not in owed or ts_ns - job.ended_ns > UNHEALTHY_GRACE_S * 1e9:
                del self._jobs[key]
                ended.append(job.ref)
                energy_due.append((job, True))
                self.stats.jobs_ended += 1
        points.extend(self._energy_points(energy_due, ts_ns))

        classes_by_gpu: dict[int, str] = {}
        for index, keys in now_owners.items():
            if index not in by_index and not keys:
                continue  # a GPU gone from the readings, its grace over
            classes = [self._jobs[k].cls if k in present else self.default_class for k in keys]
            classes_by_gpu[index] = max(classes, key=CLASSES.index) if classes else "idle"
            sample = by_index.get(index)
            if sample is not None and sample.healthy and keys:
                points.extend(self._gpu_points(sample, now_refs[index], now_via[index], keys, ts_ns))
        for index, meter in self._meters.items():
            meter.refs, meter.via, meter.owners = now_refs[index], now_via[index], now_owners[index]
        step = JobStep(classes_by_gpu, {i: now_refs[i] for i in classes_by_gpu}, [], tuple(ended))
        return step, points

    def _meter(self, meter: _Meter, sample: GpuSample | None, ts_ns: int) -> None:
        """Energy of the interval that ends at this reading, given to the last reading's owners."""
        segment = None
        if meter.prev_ts_ns is not None:
            segment = (ts_ns - meter.prev_ts_ns, meter.owners)
        healthy = sample is not None and sample.healthy
        energy = sample.energy_j if healthy and sample is not None else None
        power = None
        if healthy and sample is not None:
            power = sample.power_w if sample.power_w is not None else sample.power_avg_w
        if energy is not None:
            if meter.counter_j is not None:
                delta = energy - meter.counter_j
                if delta < 0:
                    self.stats.counter_resets += 1
                    delta = energy  # since the reset; what came before it is lost
                segments = meter.pending + ([segment] if segment is not None else [])
                self._spread(delta, segments, meter.pending_lost_ns)
            meter.pending, meter.pending_lost_ns = [], 0
            meter.counter_j = energy
            meter.counter_seen = True
        elif segment is not None:
            if not meter.counter_seen and power is not None and segment[0] > 0:
                before = meter.power_w if meter.power_w is not None else power
                joules = (before + power) / 2 * segment[0] / 1e9
                self.stats.power_metered_j += joules
                self._spread(joules, [segment], 0)
            elif not meter.counter_seen:
                self.stats.lost_s += max(segment[0], 0) / 1e9
            else:
                meter.pending.append(segment)
                if len(meter.pending) > MAX_PENDING_SEGMENTS:
                    meter.pending_lost_ns += max(meter.pending.pop(0)[0], 0)
        meter.prev_ts_ns = ts_ns
        meter.power_w = power
        if healthy:
            meter.last_healthy_ns = ts_ns

    def _spread(self, joules: float, segments: list[tuple[int, tuple[Owner, ...]]], lost_ns: int) -> None:
        if joules <= 0 or not segments:
            return
        weights = [max(dt, 0) for dt, _ in segments]
        total = sum(weights) + max(lost_ns, 0)
        if total <= 0:
            weights, total = [1] * len(segments), len(segments)
        elif lost_ns > 0:
            self.stats.lost_s += lost_ns / 1e9
        for weight, (_, owners) in zip(weights, segments):
            if not weight:
                continue
            if not owners:
                self.stats.idle_j += joules * weight / total  # an idle GPU's energy is no job's
                continue
            part = joules * weight / total / len(owners)
            for owner in owners:
                job = self._jobs.get(owner)
                if job is not None:
                    job.energy_j += part
                elif owner == _UNATTRIBUTED:
                    self.stats.unattributed_j += part
                else:
                    self.stats.after_end_j += part

    def _energy_points(self, due: list[tuple[_Job, bool]], ts_ns: int) -> list[Point]:
        points = []
        slots: dict[tuple[str, str], int] = {}
        for job, final in sorted(due, key=lambda d: job_sort_key(d[0].ref)):
            slot = slots.get((job.cls, job.ref.kind), 0)
            slots[(job.cls, job.ref.kind)] = slot + 1
            points.append(job_energy_point(
                self.host, ts_ns, kind=job.ref.kind, cls=job.cls, job=job.ref.id, energy_j=round(job.energy_j, 3),
                gpus=len(job.gpus), start_ns=job.start_ns, end_ns=job.ended_ns if final and job.ended_ns else ts_ns,
                final=final, slot=slot))
            job.last_emit_ns = ts_ns
        return points

    def _gpu_points(self, sample: GpuSample, refs: tuple[JobRef, ...], via: Mapping[JobRef, Via],
                    keys: tuple[Owner, ...], ts_ns: int) -> list[Point]:
        power = sample.power_w if sample.power_w is not None else sample.power_avg_w
        share = 1.0 / len(keys)
        part = None if power is None else power * share
        points = []
        slots: dict[tuple[str, str], int] = {}
        for ref in refs:
            cls = self._jobs[ref.key].cls
            slot = slots.get((cls, ref.kind), 0)
            slots[(cls, ref.kind)] = slot + 1
            points.append(job_gpu_point(self.host, sample.index, ts_ns, kind=ref.kind, cls=cls, job=ref.id,
                                        power_w=part, share=share, slot=slot, step=ref.step,
                                        via=_via_of(ref, via)))
        if _UNATTRIBUTED in keys:  # one owner per GPU at most: no slot needed
            points.append(job_gpu_point(self.host, sample.index, ts_ns, kind=UNATTRIBUTED_KIND,
                                        cls=self.default_class, job=None, power_w=part, share=share))
        return points


def _one_per_job(refs: tuple[JobRef, ...]) -> tuple[JobRef, ...]:
    """One JobRef per job: the steps of one job on one GPU are one owner (the step is kept when
    they agree)."""
    by_key: dict[Owner, list[JobRef]] = {}
    for ref in refs:
        by_key.setdefault(ref.key, []).append(ref)
    out = []
    for group in by_key.values():
        steps = {r.step for r in group}
        out.append(group[0] if len(steps) == 1 else JobRef(group[0].kind, group[0].id))
    return tuple(sorted(out, key=job_sort_key))


def _via_of(ref: JobRef, via: Mapping[JobRef, Via]) -> str | None:
    found = {v for r, v in via.items() if r.key == ref.key}
    return found.pop() if len(found) == 1 else ("cgroup+environ" if found else None)


# -- the daemon's facade ------------------------------------------------------------------------

class JobTracker:
    """Attribution + classes + ledger, for the tick: ``step(samples, ts_ns)``.

    ``refresh_classes`` (blocking: squeue) is for a worker thread when ``refresh_due()``;
    ``set_hint`` is the API's entry point.
    """

    def __init__(self, cfg: JobsConfig, *, host: str, proc_root: Path | None = None,
                 monotonic: Callable[[], float] = time.monotonic, runner: Runner = run_command,
                 attributor: JobAttributor | None = None, classes: ClassProvider | None = None) -> None:
        self.cfg = cfg
        if attributor is None:
            attributor = JobAttributor.from_config(cfg)
            if proc_root is not None:
                attributor.proc_root = Path(proc_root)
        self.attributor = attributor
        self.classes = classes or ClassProvider(cfg, monotonic=monotonic, runner=runner)
        self.ledger = JobLedger(host, default_class=cfg.default_class, energy_interval_s=cfg.energy_interval_s)

    def step(self, samples: Sequence[GpuSample], ts_ns: int) -> JobStep:
        """Attribute, classify, meter; the lines are line protocol ready for the store."""
        owners = self.attributor.attribute({s.index: s.pids for s in samples if s.healthy})
        step, points = self.ledger.step(samples, owners, self.classes.class_of, ts_ns)
        for ref in step.ended:
            self.classes.forget(ref.id)
        lines = [(p.ts_ns, line) for p in points if (line := encode(p)) is not None]
        return JobStep(step.classes_by_gpu, step.jobs_by_gpu, lines, step.ended)

    def refresh_due(self) -> bool:
        return self.classes.refresh_due()

    def refresh_classes(self) -> RefreshOutcome:
        """Ask squeue (blocking; on a worker thread) and log a failure once per interval."""
        outcome = self.classes.refresh()
        if outcome.log_now and not outcome.ok:
            log.warning("squeue_failed", error=outcome.error, failures=outcome.failures,
                        kept_jobs=outcome.jobs, command=self.cfg.slurm.squeue,
                        hint="classes keep the last good answer; check slurmctld and jobs.slurm")
        elif outcome.log_now:
            log.info("squeue_recovered", failures=outcome.failures, jobs=outcome.jobs)
        if outcome.ran and outcome.bad_entries:
            log.warning("squeue_bad_entries", skipped=outcome.bad_entries,
                        hint="job entries without a numeric job_id were skipped")
        return outcome

    def set_hint(self, job_id: str, cls: str | None) -> None:
        """The class of ``job_id`` from the API (None clears it); ValueError when refused."""
        self.classes.set_hint(job_id, cls)

    def reconfigure(self, cfg: JobsConfig) -> None:
        """A reload: new rules, Slurm settings and interval; jobs, meters and caches are kept.
        ``proc_root`` and ``environ_fallback`` change the attribution, whose cache then starts
        again."""
        if (cfg.proc_root, cfg.environ_fallback, cfg.ignore_commands) != (
                self.cfg.proc_root, self.cfg.environ_fallback, self.cfg.ignore_commands):
            self.attributor = JobAttributor.from_config(cfg)
        self.classes.reconfigure(cfg)
        self.ledger.default_class = cfg.default_class
        self.ledger.energy_interval_ns = round(cfg.energy_interval_s * 1e9)
        self.cfg = cfg

    def agent_fields(self) -> dict[str, int | float]:
        """Counters for the ``agent`` point (cumulative since start)."""
        a, s = self.attributor.stats, self.ledger.stats
        fields: dict[str, int | float] = {
            "jobs_active": self.ledger.active_jobs,
            "jobs_pids_unattributed": a.unattributed,
            "jobs_environ_denied": a.environ_denied,
            "jobs_pids_vanished": a.vanished,
            "jobs_proc_errors": a.read_errors,
            "jobs_counter_resets": s.counter_resets,
            "jobs_unattributed_j": round(s.unattributed_j, 3),
        }
        if self.cfg.slurm.enabled:
            fields["jobs_squeue_errors"] = self.classes.errors
        return fields
