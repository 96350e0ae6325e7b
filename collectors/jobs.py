"""GPU process -> job (Slurm, Kubernetes), and the ``[jobs]`` section of agentd.toml.

NVML tells which processes run on a GPU (``GpuSample.pids``); the budget split needs to know
which *job* each GPU serves and how important it is. The job comes from the process's cgroup,
which the scheduler set and the process cannot change:

* Slurm, cgroup v1: ``4:memory:/slurm/uid_1000/job_1234/step_0/task_0`` (any controller line;
  ``/slurm_<node>/`` with several slurmd per host);
* Slurm, cgroup v2: ``0::/system.slice/slurmstepd.scope/job_1234/step_0/user/task_0``;
* Kubernetes, cgroupfs driver: ``/kubepods/burstable/pod<uid>/<container>`` (guaranteed pods
  have no QoS level: ``/kubepods/pod<uid>/...``);
* Kubernetes, systemd driver: ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope`` (normalised to
  the API's dashed UID).

When the cgroup names no job (Slurm without a cgroup plugin: ``proctrack/linuxproc``), the
fallback is ``SLURM_JOB_ID`` in ``/proc/<pid>/environ``. That file is readable only by the
process's owner or with extra capabilities (docs/jobs.md says which the unit would need), and
its content is the process's own: a user can claim any job id there, a cgroup cannot be forged.
So cgroup first, environ only when the cgroup says nothing, and ``environ_fallback = false``
where a claimed job id must not raise a process's priority class.

Reads never raise: a pid that vanished between NVML's list and the read is no owner; a
``PermissionError`` is "unknown", counted. A pid's job does not change, so each pid is read
once while it stays on a GPU and forgotten when it leaves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collectors.classes import CLASSES, JOB_CLASSES  # noqa: F401  (re-exported: collectors.jobs.CLASSES)
from collectors.durations import parse_duration_s

# Priority classes, lowest first. rules.budget defines the same tuple (collectors may not
# import rules); "idle" is the class of a GPU with no process, never of a job.
JobKind = Literal["slurm", "k8s"]



def check_job_class(value: str) -> str:
    """``value`` if it is a job's class; ValueError naming the choices otherwise."""
    if value == "idle":
        raise ValueError("'idle' is the class of a GPU with no process, not of a job; "
                         f"use one of {', '.join(JOB_CLASSES)}")
    if value not in JOB_CLASSES:
        raise ValueError(f"unknown class {value!r}; use one of {', '.join(JOB_CLASSES)} (lowest first)")
    return value


# -- configuration ------------------------------------------------------------------------------

class _Section(BaseModel):
    # Unknown keys are errors: a typo in agentd.toml must not pass silently.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _positive_duration(v: str | float) -> str | float:
    if parse_duration_s(v) <= 0:
        raise ValueError("must be a positive duration such as '30s'")
    return v


class ClassRule(_Section):
    """One line of ``jobs.classes``: the jobs it matches get ``class``.

    Every key given must match (``{partition = "prod", qos = "high"}`` is both); a rule with no
    key to match is an error. ``partition``, ``qos`` and ``account`` are known only from Slurm
    (``jobs.slurm.enabled``); without it such rules match nothing.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    job: str | None = Field(None, description="a Slurm job id or a Kubernetes pod UID")
    kind: JobKind | None = Field(None, description="\"slurm\" or \"k8s\": every job of that scheduler")
    partition: str | None = Field(None, description="Slurm partition (from squeue)")
    qos: str | None = Field(None, description="Slurm QOS (from squeue)")
    account: str | None = Field(None, description="Slurm account (from squeue)")
    cls: str = Field(alias="class", description="the class these jobs get: low, normal or high")

    @field_validator("job", mode="before")
    @classmethod
    def _job_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # `job = 1234` in TOML is meant as the id "1234"
        return v

    @field_validator("cls")
    @classmethod
    def _check_class(cls, v: str) -> str:
        return check_job_class(v)

    @model_validator(mode="after")
    def _needs_a_key(self) -> ClassRule:
        if all(getattr(self, k) is None for k in ("job", "kind", "partition", "qos", "account")):
            raise ValueError("a class rule needs at least one of job, kind, partition, qos, account "
                             "(the default for every other job is jobs.default_class)")
        return self


class SlurmConfig(_Section):
    """Where Slurm's view of a job (partition, QOS, account) comes from: ``squeue --json``."""

    enabled: bool = Field(False, description="ask squeue for partition/QOS/account of the jobs on this node")
    squeue: str = Field("squeue", description="the squeue command: a name on PATH or an absolute path")
    args: list[str] = Field(default_factory=lambda: ["--json"],
                            description="arguments to squeue (its output must be squeue's JSON)")
    ttl: str | float = Field("30s", description="how long one squeue answer is used before asking again")
    timeout: str | float = Field("10s", description="squeue is killed and counted as failed after this long")
    error_log_interval: str | float = Field("5m", description="a failing squeue is logged at most once per this")
    max_output_bytes: int = Field(256 * 1024 * 1024, ge=1024,
                                  description="an answer larger than this is refused (squeue lists the whole queue)")

    @field_validator("ttl", "timeout", "error_log_interval")
    @classmethod
    def _check_durations(cls, v: str | float) -> str | float:
        return _positive_duration(v)

    @field_validator("squeue")
    @classmethod
    def _check_command(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name the squeue command, for example 'squeue' or '/usr/bin/squeue'")
        return v

    def seconds(self, name: str) -> float:
        """A duration key in seconds (``seconds("ttl")``)."""
        return parse_duration_s(getattr(self, name))


class JobsConfig(_Section):
    """The ``[jobs]`` section of agentd.toml: which job each GPU serves and its priority class."""

    default_class: str = Field("normal", description="priority class of a job no rule names (low, normal, high)")
    classes: list[ClassRule] = Field(
        default_factory=list,
        description="class rules, first match wins, e.g. [{partition = \"prod\", class = \"high\"}, "
                    "{qos = \"scavenger\", class = \"low\"}, {job = \"1234\", class = \"high\"}]")
    proc_root: Path = Field(Path("/proc"), description="where the processes' cgroup and environ files are "
                                                        "(/host/proc when agentd runs in a container)")
    environ_fallback: bool = Field(True, description="read SLURM_JOB_ID from /proc/<pid>/environ when the cgroup "
                                                     "names no job (a process can claim any id there)")
    ignore_commands: list[str] = Field(
        default_factory=lambda: ["nvidia-cuda-mps-server"],
        description="processes (by /proc/<pid>/comm) that are no job's: their clients are")
    energy_interval: str | float = Field("5m", description="a running job's job_energy point is written this often "
                                                           "(and once more when it ends)")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig,
                               description="Slurm's partition / QOS / account of each job, from squeue --json")

    @field_validator("default_class")
    @classmethod
    def _check_default(cls, v: str) -> str:
        return check_job_class(v)

    @field_validator("energy_interval")
    @classmethod
    def _check_interval(cls, v: str | float) -> str | float:
        return _positive_duration(v)

    @property
    def energy_interval_s(self) -> float:
        return parse_duration_s(self.energy_interval)


# -- attribution --------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True, order=True)
class JobRef:
    """A job as the node sees it: ``kind`` "slurm" (``id`` the job id, ``step`` the step when
    the cgroup or environment names one) or "k8s" (``id`` the pod UID, dashed, lower case)."""

    kind: JobKind
    id: str
    step: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The job's identity: the steps of one job are one job."""
        return (self.kind, self.id)


_SLURM_V1 = re.compile(r"/slurm(?:_[^/]*)?/uid_\d+/job_(\d+)(?:/step_([^/]+))?")
_SLURM_V2 = re.compile(r"slurmstepd\.scope/job_(\d+)(?:/step_([^/]+))?")
_K8S_CGROUPFS = re.compile(r"/kubepods(?:/(?:burstable|besteffort|guaranteed))?/pod([0-9A-Fa-f][0-9A-Fa-f-]*)(?:/|$)")
_K8S_SYSTEMD = re.compile(r"kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod([0-9A-Fa-f][0-9A-Fa-f_]*)\.slice")
_JOB_ID = re.compile(rb"^\d{1,20}$")
_STEP = re.compile(rb"^[A-Za-z0-9_.-]{1,64}$")


def parse_cgroup(text: str) -> JobRef | None:
    """The job named by the lines of a ``/proc/<pid>/cgroup`` file, or None.

    Slurm is looked for first on every line (a Slurm inside a pod runs the job), then
    Kubernetes.
    """
    paths = [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]
    for path in paths:
        match = _SLURM_V1.search(path) or _SLURM_V2.search(path)
        if match:
            return JobRef("slurm", match.group(1), match.group(2))
    for path in paths:
        match = _K8S_SYSTEMD.search(path)
        if match:
            return JobRef("k8s", match.group(1).replace("_", "-").lower())
        match = _K8S_CGROUPFS.search(path)
        if match:
            return JobRef("k8s", match.group(1).lower())
    return None


def parse_environ(data: bytes) -> JobRef | None:
    """The Slurm job named by a NUL-separated ``/proc/<pid>/environ``, or None.

    ``SLURM_JOB_ID`` (``SLURM_JOBID``, the older name, when it is absent) must be a number;
    ``SLURM_STEP_ID`` is the step (absent in a batch script).
    """
    env: dict[bytes, bytes] = {}
    for item in data.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name in (b"SLURM_JOB_ID", b"SLURM_JOBID", b"SLURM_STEP_ID"):
            env[name] = value
    job = env.get(b"SLURM_JOB_ID", env.get(b"SLURM_JOBID"))
    if job is None or not _JOB_ID.match(job):
        return None
    step = env.get(b"SLURM_STEP_ID")
    return JobRef("slurm", job.decode(), step.decode() if step is not None and _STEP.match(step) else None)


Via = Literal["cgroup", "environ"]


@dataclass(slots=True, frozen=True)
class PidJob:
    """What one pid was found to be: its job (None: no job found) and where that came from."""

    job: JobRef | None
    via: Via | None = None


@dataclass(slots=True, frozen=True)
class GpuJobs:
    """The owners of one GPU this tick: the jobs of its processes (sorted, one JobRef per
    process's job and step) and how many live processes belong to no job found."""

    jobs: tuple[JobRef, ...] = ()
    via: Mapping[JobRef, Via] = field(default_factory=dict)
    unattributed: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.jobs) or self.unattributed > 0


@dataclass(slots=True)
class AttributionStats:
    """Cumulative counts since start (the ``agent`` point carries them): per pid, not per read."""

    pids_read: int = 0  # pids looked up (each once while it stays on a GPU)
    unattributed: int = 0  # live pids whose cgroup and environ named no job
    environ_denied: int = 0  # environ not readable (PermissionError): job unknown
    vanished: int = 0  # gone between NVML's list and the read
    read_errors: int = 0  # other OSErrors reading /proc
    ignored: int = 0  # ignore_commands (the MPS server)


class _Vanished(Exception):
    pass


Reader = Callable[[Path, int], bytes]
_CGROUP_MAX_BYTES = 64 * 1024
_ENVIRON_MAX_BYTES = 4 * 1024 * 1024  # environ is at most ARG_MAX-ish; beyond is not a real one
_COMM_MAX_BYTES = 64


def read_limited(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path`` (a /proc file: its size is 0 until read)."""
    with open(path, "rb") as f:
        return f.read(limit)


class JobAttributor:
    """Maps the pids on each GPU to jobs through ``proc_root`` (``/proc``, or a tree a test built).

    ``attribute`` is called once per tick; ``read`` is injectable so a test can make a file
    raise what the kernel would (``PermissionError`` for another user's environ).
    """

    def __init__(self, proc_root: Path = Path("/proc"), *, environ_fallback: bool = True,
                 ignore_commands: Sequence[str] = ("nvidia-cuda-mps-server",),
                 read: Reader = read_limited) -> None:
        self.proc_root = Path(proc_root)
        self.environ_fallback = environ_fallback
        self.ignore_commands = frozenset(ignore_commands)
        self._read = read
        self._cache: dict[int, PidJob | None] = {}  # None: ignored command (no owner)
        self.stats = AttributionStats()

    @classmethod
    def from_config(cls, cfg: JobsConfig, *, read: Reader = read_limited) -> JobAttributor:
        return cls(cfg.proc_root, environ_fallback=cfg.environ_fallback,
                   ignore_commands=cfg.ignore_commands, read=read)

    @property
    def cached_pids(self) -> int:
        return len(self._cache)

    def attribute(self, pids_by_gpu: Mapping[int, Sequence[int]]) -> dict[int, GpuJobs]:
        """The owners of every GPU in ``pids_by_gpu``; pids absent from it are forgotten."""
        seen: set[int] = set()
        out: dict[int, GpuJobs] = {}
        for gpu, pids in pids_by_gpu.items():
            jobs: set[JobRef] = set()
            via: dict[JobRef, Via] = {}
            unattributed = 0
            for pid in pids:
                seen.add(pid)
                found = self._lookup(pid)
                if found is None:
                    continue  # vanished or an ignored command: no owner
                if found.job is None:
                    unattributed += 1
                else:
                    jobs.add(found.job)
                    if found.via is not None:
                        via[found.job] = found.via
            out[gpu] = GpuJobs(tuple(sorted(jobs, key=job_sort_key)), via, unattributed)
        for pid in [p for p in self._cache if p not in seen]:
            del self._cache[pid]
        return out

    def _lookup(self, pid: int) -> PidJob | None:
        if pid in self._cache:
            return self._cache[pid]
        try:
            found = self._resolve(pid)
        except _Vanished:
            self.stats.vanished += 1
            return None  # not cached: the next tick's list will not hold it either
        self.stats.pids_read += 1
        self._cache[pid] = found
        return found

    def _resolve(self, pid: int) -> PidJob | None:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            self.stats.read_errors += 1
            return PidJob(None)
        base = self.proc_root / str(pid)
        text = self._read_or_none(base / "cgroup", _CGROUP_MAX_BYTES)
        if text is not None:
            job = parse_cgroup(text.decode("utf-8", "replace"))
            if job is not None:
                return PidJob(job, "cgroup")
        if self.environ_fallback:
            data = self._read_or_none(base / "environ", _ENVIRON_MAX_BYTES, denied_counts=True)
            if data is not None:
                job = parse_environ(data)
                if job is not None:
                    return PidJob(job, "environ")
        if self.ignore_commands:
            comm = self._read_or_none(base / "comm", _COMM_MAX_BYTES)
            if comm is not None and comm.decode("utf-8", "replace").strip() in self.ignore_commands:
                self.stats.ignored += 1
                return None
        self.stats.unattributed += 1
        return PidJob(None)

    def _read_or_none(self, path: Path, limit: int, *, denied_counts: bool = False) -> bytes | None:
        try:
            return self._read(path, limit)
        except (FileNotFoundError, ProcessLookupError):
            if not path.parent.exists():
                raise _Vanished from None
            return None  # the process is there but has no such file (a kernel without it)
        except PermissionError:
            if denied_counts:
                self.stats.environ_denied += 1
            else:
                self.stats.read_errors += 1
            return None
        except OSError:
            self.stats.read_errors += 1
            return None


def job_sort_key(ref: JobRef) -> tuple[str, int, str, str]:
    """Jobs in a stable order: numeric ids in numeric order (9 before 10), steps after their job."""
    return (ref.kind, len(ref.id), ref.id, ref.step or "")
