"""A job's priority class: API hints, the site's rules, Slurm's partition / QOS / account.

The class of a job is, in this order:

1. a hint set through ``set_hint`` (the future ``PUT /v1/jobs/{id}``): the scheduler's live word;
2. the first rule of ``jobs.classes`` that matches (every key it gives must match; partition,
   QOS and account are known only from Slurm);
3. ``jobs.default_class``.

Slurm's view comes from ``squeue --json``. Running squeue blocks (it asks slurmctld), so
``refresh`` is meant for a worker thread: the tick only reads the last answer (``class_of``),
and a refresh that is still running is never started twice. An answer is used for ``ttl``; a
failing squeue keeps the last good answer (a job's class does not flap because slurmctld is
busy) and says, through ``RefreshOutcome.log_now``, when the failure is worth logging again
(once per ``error_log_interval``). The command runner is injectable so tests pass recorded
squeue output.

Note on cost: Slurm 22.05's ``squeue --json`` ignores filters such as ``-w`` or ``--jobs``
(measured): every answer is the whole queue, so keep ``ttl`` long on a large cluster.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from collectors.jobs import ClassRule, JobRef, JobsConfig, check_job_class

MAX_HINTS = 10_000  # hints held at once; beyond, the oldest goes (a job that never came)
_MAX_HINT_ID_CHARS = 128


class SqueueError(Exception):
    """squeue could not give an answer; the message says what to check."""


@dataclass(slots=True, frozen=True)
class SlurmJobInfo:
    """What the class rules need from Slurm about one job."""

    job_id: str
    partition: str = ""
    qos: str = ""
    account: str = ""
    user: str = ""
    state: str = ""


class _SqueueJob(BaseModel):
    # squeue's job objects carry ~100 keys that differ between releases: read the few we use.
    model_config = ConfigDict(extra="ignore")

    job_id: int
    partition: str = ""
    qos: str = ""
    account: str = ""
    user_name: str = ""
    job_state: str = ""

    @field_validator("job_state", mode="before")
    @classmethod
    def _state(cls, v: Any) -> Any:
        # Slurm <= 23.02: "RUNNING"; 23.11+: ["RUNNING"] (a list of flags)
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        return v


def parse_squeue_json(raw: bytes | str) -> tuple[dict[str, SlurmJobInfo], int]:
    """The jobs of one ``squeue --json`` answer (pending ones left out: they run on no GPU) and
    how many job entries were malformed (skipped, the others kept). SqueueError when the
    answer as a whole is not squeue's JSON."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SqueueError(f"squeue's output is not JSON ({exc}); is jobs.slurm.args missing --json?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SqueueError("squeue's JSON has no \"jobs\" list; check that jobs.slurm.squeue is squeue "
                          "(Slurm 21.08 or later) and jobs.slurm.args holds --json")
    errors = doc.get("errors")
    if isinstance(errors, list) and errors and not doc["jobs"]:
        raise SqueueError(f"squeue reported errors: {json.dumps(errors)[:300]}")
    jobs: dict[str, SlurmJobInfo] = {}
    bad = 0
    for entry in doc["jobs"]:
        try:
            job = _SqueueJob.model_validate(entry)
        except ValidationError:
            bad += 1
            continue
        if job.job_state.startswith("PENDING"):
            continue
        jobs[str(job.job_id)] = SlurmJobInfo(str(job.job_id), job.partition, job.qos, job.account,
                                             job.user_name, job.job_state)
    return jobs, bad


Runner = Callable[[Sequence[str], float], bytes]


def run_command(argv: Sequence[str], timeout_s: float, *, path_key: str = "jobs.slurm.squeue",
                timeout_key: str = "jobs.slurm.timeout", error: type[Exception] = SqueueError) -> bytes:
    """Run a Slurm client (``argv``) and return its stdout; ``error`` (with what to do, naming the
    settings ``path_key`` and ``timeout_key``) on any failure. The one runner for squeue here and
    sinfo/scontrol in ``agentd slurm-sync``."""
    line = " ".join(argv)
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise error(f"{argv[0]!r} not found: install the Slurm clients on this host or set {path_key} "
                    "to the path") from None
    except PermissionError:
        raise error(f"{argv[0]!r} is not executable by this user (set {path_key})") from None
    except subprocess.TimeoutExpired:
        raise error(f"{line}: no answer within {timeout_s:g}s ({timeout_key}); is slurmctld reachable "
                    "from this host (SLURM_CONF, scontrol ping)?") from None
    except OSError as exc:
        raise error(f"{line}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise error(f"{line} exited with {done.returncode}: {tail or '(no message)'}")
    return done.stdout


class RefreshOutcome(NamedTuple):
    """What one ``refresh`` did. ``ran`` is False when none was due or one was already running;
    ``log_now`` says the caller should log ``error`` (the first failure, then once per
    ``error_log_interval``) or a recovery (``error`` None, ``failures`` > 0)."""

    ran: bool
    ok: bool = True
    jobs: int = 0
    bad_entries: int = 0
    error: str | None = None
    failures: int = 0  # consecutive failures, this one included (on a recovery: before it)
    log_now: bool = False


class ClassProvider:
    """Answers ``class_of(job)`` from the hints, the rules and the last squeue answer.

    ``class_of`` and ``set_hint`` are cheap and thread-safe (the API and the tick may call them
    while ``refresh`` runs on a worker thread). ``monotonic`` is the injected clock.
    """

    def __init__(self, cfg: JobsConfig, *, monotonic: Callable[[], float], runner: Runner = run_command) -> None:
        self._monotonic = monotonic
        self._runner = runner
        self._lock = threading.Lock()  # hints and the snapshot swap
        self._refreshing = threading.Lock()  # one refresh at a time
        self._hints: OrderedDict[str, str] = OrderedDict()
        self._slurm: Mapping[str, SlurmJobInfo] = {}
        self._last_attempt: float | None = None
        self._last_ok: float | None = None
        self._last_logged: float | None = None
        self._failures = 0
        self.errors = 0  # failed squeue runs since start
        self.bad_entries = 0  # malformed job entries skipped since start
        self.last_error: str | None = None
        self.reconfigure(cfg)

    def reconfigure(self, cfg: JobsConfig) -> None:
        """Take new rules and Slurm settings (a reload); hints and the last answer are kept."""
        with self._lock:
            self._default = cfg.default_class
            self._rules: tuple[ClassRule, ...] = tuple(cfg.classes)
            self._slurm_cfg = cfg.slurm
            self._argv = (cfg.slurm.squeue, *cfg.slurm.args)
            self._ttl_s = cfg.slurm.seconds("ttl")
            self._timeout_s = cfg.slurm.seconds("timeout")
            self._log_every_s = cfg.slurm.seconds("error_log_interval")
            if not cfg.slurm.enabled:
                self._slurm = {}

    # -- the tick's side -------------------------------------------------------------------

    def class_of(self, job: JobRef) -> str:
        """The job's class now (never blocks, never raises)."""
        with self._lock:
            hint = self._hints.get(job.id)
            if hint is not None:
                return hint
            info = self._slurm.get(job.id) if job.kind == "slurm" else None
            for rule in self._rules:
                if _matches(rule, job, info):
                    return rule.cls
            return self._default

    def slurm_info(self, job_id: str) -> SlurmJobInfo | None:
        """Slurm's last word on ``job_id`` (None: not in the last answer, or Slurm off)."""
        with self._lock:
            return self._slurm.get(job_id)

    # -- the API's side --------------------------------------------------------------------

    def set_hint(self, job_id: str, cls: str | None) -> None:
        """Set (or with None clear) the class of ``job_id``, above every rule. ValueError, saying
        what is wrong, for an id or a class that cannot be one; nothing is changed then."""
        if not isinstance(job_id, str) or not job_id or len(job_id) > _MAX_HINT_ID_CHARS \
                or not job_id.isprintable() or job_id.strip() != job_id:
            raise ValueError(f"job id {job_id!r}: must be 1..{_MAX_HINT_ID_CHARS} printable characters "
                             "(a Slurm job id or a pod UID)")
        if cls is not None:
            check_job_class(cls)
        with self._lock:
            if cls is None:
                self._hints.pop(job_id, None)
                return
            self._hints[job_id] = cls
            self._hints.move_to_end(job_id)
            while len(self._hints) > MAX_HINTS:
                self._hints.popitem(last=False)

    def hints(self) -> dict[str, str]:
        with self._lock:
            return dict(self._hints)

    def forget(self, job_id: str) -> None:
        """The job ended on this node: its hint goes."""
        with self._lock:
            self._hints.pop(job_id, None)

    # -- the worker thread's side ------------------------------------------------------------

    def refresh_due(self) -> bool:
        """True when Slurm is on, no refresh is running and the last attempt is ``ttl`` old."""
        return self._slurm_cfg.enabled and not self._refreshing.locked() and self._due()

    def refresh(self, *, force: bool = False) -> RefreshOutcome:
        """Ask squeue now when due (or ``force``); blocking, never raises."""
        if not self._slurm_cfg.enabled:
            return RefreshOutcome(False)
        if not self._refreshing.acquire(blocking=False):
            return RefreshOutcome(False)
        try:
            if not force and not self._due():
                return RefreshOutcome(False)
            now = self._monotonic()
            self._last_attempt = now
            try:
                raw = self._runner(self._argv, self._timeout_s)
                if len(raw) > self._slurm_cfg.max_output_bytes:
                    raise SqueueError(f"squeue's answer is {len(raw)} bytes, above jobs.slurm.max_output_bytes "
                                      f"({self._slurm_cfg.max_output_bytes}); raise it or narrow jobs.slurm.args")
                jobs, bad = parse_squeue_json(raw)
            except SqueueError as exc:
                return self._failed(now, str(exc))
            except Exception as exc:  # an injected runner's bug must not kill the worker
                return self._failed(now, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._slurm = jobs
            self.bad_entries += bad
            recovered = self._failures
            self._failures = 0
            self._last_ok = now
            self._last_logged = None
            self.last_error = None
            return RefreshOutcome(True, True, len(jobs), bad, None, recovered, log_now=recovered > 0)
        finally:
            self._refreshing.release()

    def _due(self) -> bool:
        return self._last_attempt is None or self._monotonic() - self._last_attempt >= self._ttl_s

    def _failed(self, now: float, error: str) -> RefreshOutcome:
        self.errors += 1
        self._failures += 1
        self.last_error = error
        log_now = self._last_logged is None or now - self._last_logged >= self._log_every_s
        if log_now:
            self._last_logged = now
        return RefreshOutcome(True, False, len(self._slurm), 0, error, self._failures, log_now)

    @property
    def answer_age_s(self) -> float | None:
        """Seconds since the last good squeue answer (None: none yet)."""
        return None if self._last_ok is None else self._monotonic() - self._last_ok


def _matches(rule: ClassRule, job: JobRef, info: SlurmJobInfo | None) -> bool:
    if rule.job is not None and rule.job != job.id:
        return False
    if rule.kind is not None and rule.kind != job.kind:
        return False
    for key in ("partition", "qos", "account"):
        want = getattr(rule, key)
        if want is None:
            continue
        if info is None:
            return False
        have = getattr(info, key)
        # a pending job may list several partitions ("a,b"); a running one has one
        if want != have and want not in have.split(","):
            return False
    return True
