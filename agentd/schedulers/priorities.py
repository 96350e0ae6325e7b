"""push_priorities: every running Slurm job's class and priority, sent to the nodes it runs on.

Why here and not on the node: ``squeue`` needs to reach slurmctld, which a GPU node often may
not (or should not, thousands of times a minute). slurm-sync reads the queue once per
``priorities.interval`` and sends each job's hint with ``PUT {node api}/v1/jobs/{job_id}``,
body ``{"class": "high", "priority": 4294901659}``, to each node that runs it and that
publishes a throttle body (a node without agentd is not asked).

One class mapping: ``collectors.job_classes.ClassProvider`` with the ``[jobs]`` table (the same
``classes`` rules and ``default_class`` the node daemon uses), fed with the one ``squeue --json``
answer of the pass; this module reads only what the provider does not keep (the job's nodes and
Slurm's priority number). A hint is sent again only when it changes or every
``priorities.repush`` (a restarted node has forgotten it); an answer 4xx is not retried before
``repush`` (the node refused it and says why), a failure to connect or a 5xx is retried at the
next pass.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from collectors.job_classes import ClassProvider, SqueueError, run_command
from collectors.jobs import JobRef, JobsConfig
from collectors.log_limit import RateLimitedLog

log = structlog.get_logger("agentd.slurm_sync")
MAX_HOSTS = 100_000  # a host list that expands beyond this is not one of a real job
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compact host list (``gpu[01-03,07],login1``, ``r[1-2]n[1-2]``) as names, in order.

    ValueError for a list that is not one (unbalanced brackets, a backwards range, too many).
    """
    names: list[str] = []
    depth = 0
    start = 0
    for i, c in enumerate(text + ","):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {text!r}: unbalanced ']'")
        elif c == "," and depth == 0:
            part = text[start:i].strip()
            start = i + 1
            if part:
                names.extend(_expand_one(part, text))
                if len(names) > MAX_HOSTS:
                    raise ValueError(f"host list {text[:80]!r}...: more than {MAX_HOSTS} hosts")
    if depth != 0:
        raise ValueError(f"host list {text!r}: unbalanced '['")
    return names


def _expand_one(part: str, whole: str) -> list[str]:
    pieces = _BRACKETS.split(part)  # text, ranges, text, ranges, ..., text
    if "[" in "".join(pieces[0::2]) or "]" in "".join(pieces[0::2]):
        raise ValueError(f"host list {whole!r}: nested or unbalanced brackets")
    choices: list[list[str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            choices.append([piece])
            continue
        values: list[str] = []
        for item in piece.split(","):
            lo, sep, hi = item.strip().partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"host list {whole!r}: {item!r} is not a number or a range")
            if not sep:
                values.append(lo)
                continue
            if int(hi) < int(lo) or int(hi) - int(lo) > MAX_HOSTS:
                raise ValueError(f"host list {whole!r}: bad range {item!r}")
            width = len(lo) if lo.startswith("0") else 0
            values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        choices.append(values)
    total = 1
    for c in choices:
        total *= len(c)
    if total > MAX_HOSTS:
        raise ValueError(f"host list {whole[:80]!r}: more than {MAX_HOSTS} hosts")
    return ["".join(combo) for combo in itertools.product(*choices)]


@dataclass(slots=True, frozen=True)
class RunningJob:
    """A running job as the push needs it: its Slurm nodes, its class and Slurm's priority."""

    job_id: str
    nodes: tuple[str, ...]
    cls: str
    priority: int | None


def _priority(v: Any) -> int | None:
    if isinstance(v, dict):  # 23.02+: {"set": true, "infinite": false, "number": 123}
        v = v.get("number") if v.get("set", True) and not v.get("infinite") else None
    if isinstance(v, bool) or not isinstance(v, int):
        return None
    return v


def _job_nodes(job: Mapping[str, Any]) -> tuple[str, ...]:
    resources = job.get("job_resources")
    if isinstance(resources, dict):
        allocated = resources.get("allocated_nodes")  # 22.05: [{"nodename": "gpu01", ...}]
        if isinstance(allocated, list):
            names = [a.get("nodename") for a in allocated if isinstance(a, dict)]
            if names and all(isinstance(n, str) and n for n in names):
                return tuple(str(n) for n in names)
        nodes_obj = resources.get("nodes")  # 23.11+: {"count": .., "list": "gpu[01-02]", ...}
        if isinstance(nodes_obj, dict) and isinstance(nodes_obj.get("list"), str):
            return tuple(expand_hostlist(nodes_obj["list"]))
    nodes = job.get("nodes")
    return tuple(expand_hostlist(nodes)) if isinstance(nodes, str) and nodes else ()


def _state(job: Mapping[str, Any]) -> str:
    state = job.get("job_state")
    return ",".join(str(s) for s in state) if isinstance(state, list) else str(state)


def running_jobs(raw: bytes, classes: ClassProvider) -> tuple[list[RunningJob], int]:
    """The RUNNING jobs of one ``squeue --json`` answer with their classes (from ``classes``,
    which has read the same answer) and how many entries could not be read."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SqueueError(f"squeue's output is not JSON ({exc})") from None
    jobs: list[RunningJob] = []
    bad = 0
    for job in doc.get("jobs", []) if isinstance(doc, dict) else []:
        if not isinstance(job, dict) or not isinstance(job.get("job_id"), int):
            bad += 1
            continue
        if _state(job).split(",")[0] != "RUNNING":
            continue
        job_id = str(job["job_id"])
        try:
            nodes = _job_nodes(job)
        except ValueError:
            bad += 1
            continue
        cls = classes.class_of(JobRef("slurm", job_id))
        jobs.append(RunningJob(job_id, nodes, cls, _priority(job.get("priority"))))
    return jobs, bad


@dataclass(slots=True, frozen=True)
class Push:
    """One hint to send: ``PUT {url}/v1/jobs/{job_id}`` on agentd node ``node``."""

    node: str
    job_id: str
    cls: str
    priority: int | None

    @property
    def body(self) -> dict[str, Any]:
        return {"class": self.cls, "priority": self.priority}


@dataclass(slots=True, frozen=True)
class _Sent:
    cls: str
    priority: int | None
    at: float


def plan_pushes(jobs: Iterable[RunningJob], *, agentd_name: Callable[[str], str], nodes: Collection[str],
                sent: Mapping[tuple[str, str], _Sent], now: float, repush_s: float) -> list[Push]:
    """The hints to send now: new or changed ones, and those last sent ``repush_s`` ago, for the
    agentd ``nodes`` that run each job. Pure."""
    pushes: list[Push] = []
    for job in jobs:
        for slurm_node in job.nodes:
            node = agentd_name(slurm_node)
            if node not in nodes:
                continue
            last = sent.get((node, job.job_id))
            if last is not None and (last.cls, last.priority) == (job.cls, job.priority) \
                    and now - last.at < repush_s:
                continue
            pushes.append(Push(node, job.job_id, job.cls, job.priority))
    return pushes


class PriorityPusher:
    """Reads the queue (a worker thread) and sends the hints (aiohttp)."""

    def __init__(self, jobs_cfg: JobsConfig, *, url_of: Callable[[str], str], agentd_name: Callable[[str], str],
                 interval_s: float, timeout_s: float, repush_s: float, max_in_flight: int = 16,
                 token: str | None = None, monotonic: Callable[[], float],
                 runner: Callable[[Sequence[str], float], bytes] = run_command, dry_run: bool = False) -> None:
        # The provider asks squeue itself (jobs.slurm.squeue / args / timeout); enabled here
        # whatever the node-side [jobs] table says, since this is what push_priorities is.
        cfg = jobs_cfg.model_copy(update={"slurm": jobs_cfg.slurm.model_copy(update={"enabled": True})})
        self._raw: bytes | None = None
        self._runner = runner
        self.classes = ClassProvider(cfg, monotonic=monotonic, runner=self._capture)
        self.url_of = url_of
        self.agentd_name = agentd_name
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.repush_s = repush_s
        self.max_in_flight = max_in_flight
        self.dry_run = dry_run
        self._monotonic = monotonic
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sent: dict[tuple[str, str], _Sent] = {}
        self._log = RateLimitedLog()
        self.pushed = 0
        self.refused = 0
        self.failed = 0
        self.last_error: str | None = None

    def _capture(self, argv: Sequence[str], timeout_s: float) -> bytes:
        self._raw = self._runner(argv, timeout_s)
        return self._raw

    def read_queue(self) -> list[RunningJob] | None:
        """Ask squeue (blocking: a worker thread); the running jobs, or None when it failed (logged)."""
        self._raw = None
        outcome = self.classes.refresh(force=True)
        if not outcome.ok or self._raw is None:
            self.last_error = outcome.error
            self._log.emit("squeue", self._monotonic(), log.error, "squeue_failed", error=outcome.error,
                           hint="job hints are not pushed until squeue answers (jobs.slurm.squeue / timeout)")
            return None
        try:
            jobs, bad = running_jobs(self._raw, self.classes)
        except SqueueError as exc:
            self.last_error = str(exc)
            self._log.emit("squeue", self._monotonic(), log.error, "squeue_failed", error=str(exc))
            return None
        if bad:
            self._log.emit("squeue_bad", self._monotonic(), log.warning, "squeue_entries_skipped", entries=bad)
        self.last_error = None
        return jobs

    async def push(self, session: aiohttp.ClientSession, jobs: Iterable[RunningJob], nodes: Collection[str]) -> int:
        """Send what ``plan_pushes`` says, ``max_in_flight`` at once; how many were taken."""
        running = list(jobs)
        now = self._monotonic()
        live = {(self.agentd_name(n), j.job_id) for j in running for n in j.nodes}
        for key in [k for k in self._sent if k not in live]:
            del self._sent[key]  # the job ended (or left the node): its hint went with it
        pushes = plan_pushes(running, agentd_name=self.agentd_name, nodes=nodes, sent=self._sent, now=now,
                             repush_s=self.repush_s)
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(p: Push) -> bool:
            async with gate:
                return await self._put(session, p, now)

        results = await asyncio.gather(*(one(p) for p in pushes))
        return sum(results)

    async def _put(self, session: aiohttp.ClientSession, p: Push, now: float) -> bool:
        url = f"{self.url_of(p.node)}/v1/jobs/{quote(p.job_id, safe='')}"
        if self.dry_run:
            log.info("job_hint_planned", node=p.node, job=p.job_id, cls=p.cls, priority=p.priority, dry_run=True)
            self._sent[(p.node, p.job_id)] = _Sent(p.cls, p.priority, now)
            return True
        try:
            async with session.put(url, json=p.body, headers=self._headers,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                text = (await resp.content.read(2000)).decode("utf-8", "replace").strip()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.failed += 1
            self._log.emit(f"put:{p.node}", now, log.warning, "job_hint_failed", node=p.node, job=p.job_id, url=url,
                           error=f"{type(exc).__name__}: {exc}", hint="retried at the next pass")
            return False
        if 200 <= status < 300:
            self.pushed += 1
            self._sent[(p.node, p.job_id)] = _Sent(p.cls, p.priority, now)
            log.info("job_hint_pushed", node=p.node, job=p.job_id, cls=p.cls, priority=p.priority)
            return True
        if 400 <= status < 500:
            self.refused += 1  # the node said no and why; asking again at once would get the same answer
            self._sent[(p.node, p.job_id)] = _Sent(p.cls, p.priority, now)
            hint = "set api_token_file to the nodes' API token" if status in (401, 403) else \
                "the node refused the hint; asked again after priorities.repush"
            self._log.emit(f"refused:{p.node}:{status}", now, log.error, "job_hint_refused", node=p.node,
                           job=p.job_id, url=url, status=status, answer=text[:300], hint=hint)
            return False
        self.failed += 1
        self._log.emit(f"put:{p.node}", now, log.warning, "job_hint_failed", node=p.node, job=p.job_id, url=url,
                       error=f"HTTP {status}: {text[:300]}", hint="retried at the next pass")
        return False
