"""Workloads of a simulated site, and the throughput model that scores a capping policy.

Pure and seeded: :func:`build_workload` lays out jobs on the GPUs of N nodes from a
:class:`WorkloadConfig` and a seed, and :meth:`Workload.demand_w` says, for any GPU and any
time, what that GPU would draw uncapped. Nothing here reads a clock or draws a random number
after the layout: demand is a function of (gpu, t), so the same trace can be evaluated twice
(once to size the site cap before a run, once during it) and a uniform-cap baseline can be
scored on the very demand the controller faced.

The mix (defaults, all configurable; printed by ``agentd sim site`` at start):

* **training** (60 % of GPUs, whole nodes, 1-8 nodes per job): every GPU of a job swings in
  phase, across nodes (POLCA's synchronized swings): near its compute power for most of each
  period, then a communication dip (all-reduce) to 40-60 % of it for 15-30 % of the period;
* **inference** (30 %, jobs of 1-4 GPUs on a node): a low base with random bursts (Poisson
  arrivals, random length and level), independent per GPU;
* **idle** (10 %): no job, near idle power; idle GPUs are their own, lowest class.

Priority classes are assigned per job (every GPU of a job has its class), so that the shares
of GPUs per class come as close to ``class_mix`` as whole jobs allow (default 20 % high,
50 % normal, 30 % low of the GPUs that run a job).

The demand step: some jobs start late (at ``step_s``); before it their GPUs idle. Which jobs
is chosen (seeded) so that the site's mean demand before the step is ``warmup_load`` of its
mean demand after it.

Throughput model (compute bound; clock ~ cube root of dynamic power): a GPU capped to ``P``
whose uncapped draw would be ``P_demand`` runs at

    speed = ((P - P_static) / (P_demand - P_static)) ** (1/3), clipped to [0, 1]

of its uncapped speed, and at 1 when ``P >= P_demand`` (see :func:`speed_fraction`).
``P_static`` (``static_w``, 100 W by default) is what the board burns doing nothing useful.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence

CLASSES = ("idle", "low", "normal", "high")  # lowest first; the same order as rules.budget.CLASSES
JOB_CLASSES = ("low", "normal", "high")
KINDS = ("training", "inference", "idle")
_NOISE_SCALE = 1.0 / 2**32


def speed_fraction(power_w: float, demand_w: float, static_w: float) -> float:
    """The share of its uncapped speed a GPU keeps when it may draw ``power_w`` but would draw
    ``demand_w`` (module doc): 1 when the cap does not bind, else the cube root of the share of
    dynamic power it keeps, clipped to [0, 1]."""
    if power_w >= demand_w:
        return 1.0
    dyn = demand_w - static_w
    if dyn <= 0.0:
        return 1.0  # a GPU that draws no more than its static power does no work a cap can slow
    share = (power_w - static_w) / dyn
    return share ** (1.0 / 3.0) if share > 0.0 else 0.0


def _range(value: Sequence[float], name: str, lo: float = 0.0, hi: float = math.inf) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name}: expected (min, max), got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name}: expected {lo:g} <= min <= max <= {hi:g}, got ({a:g}, {b:g})")
    return a, b


def _positive(value: float, name: str) -> float:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be > 0 (got {value!r})")
    return float(value)


def _shares(mix: Mapping[str, float], names: Sequence[str], what: str) -> dict[str, float]:
    unknown = sorted(set(mix) - set(names))
    if unknown:
        raise ValueError(f"{what}: unknown names {unknown} (known: {', '.join(names)})")
    if any(not math.isfinite(v) or v < 0 for v in mix.values()):
        raise ValueError(f"{what}: every share must be a finite number >= 0 (got {dict(mix)})")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"{what}: the shares sum to 0; give at least one a positive share")
    return {n: float(mix.get(n, 0.0)) / total for n in names}


def parse_mix(text: str, names: Sequence[str], what: str) -> dict[str, float]:
    """``"high=0.2,normal=0.5,low=0.3"`` -> shares normalised to sum 1; ValueError naming ``what``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{what}: {part!r} is not NAME=SHARE (e.g. {names[0]}=0.2)")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: {value.strip()!r} (for {name.strip()}) is not a number") from None
    return _shares(out, names, what)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """What the simulated site runs. Ranges are (min, max), drawn uniformly per job or per GPU."""

    kind_mix: Mapping[str, float] = field(
        default_factory=lambda: {"training": 0.6, "inference": 0.3, "idle": 0.1})
    class_mix: Mapping[str, float] = field(default_factory=lambda: {"high": 0.2, "normal": 0.5, "low": 0.3})
    training_job_nodes: tuple[int, int] = (1, 8)
    training_period_s: tuple[float, float] = (6.0, 20.0)
    training_comm_frac: tuple[float, float] = (0.15, 0.3)  # share of each period in the dip
    training_dip_frac: tuple[float, float] = (0.4, 0.6)  # dip power / compute power
    training_compute_w: tuple[float, float] = (620.0, 690.0)
    inference_job_gpus: tuple[int, int] = (1, 4)
    inference_base_w: tuple[float, float] = (90.0, 130.0)
    inference_burst_w: tuple[float, float] = (300.0, 650.0)
    inference_burst_s: tuple[float, float] = (0.5, 4.0)
    inference_burst_rate_per_s: float = 0.15
    idle_w: float = 70.0
    noise_w: float = 8.0  # uniform +/- per GPU per sample
    chip_spread: float = 0.03  # per GPU: its draw is scaled by 1 +/- this (silicon varies)
    static_w: float = 100.0  # P_static of the throughput model
    max_w: float = 700.0  # the board's limit: no demand above it
    step_s: float = 0.0  # when the late jobs start (0: every job runs from t = 0)
    warmup_load: float = 0.64  # site mean demand before the step / after it

    def __post_init__(self) -> None:
        _shares(self.kind_mix, KINDS, "kind mix")
        _shares(self.class_mix, JOB_CLASSES, "class mix")
        lo, hi = _range(self.training_job_nodes, "training_job_nodes", 1)
        if lo != int(lo) or hi != int(hi):
            raise ValueError("training_job_nodes: expected whole numbers of nodes")
        lo, hi = _range(self.inference_job_gpus, "inference_job_gpus", 1)
        if lo != int(lo) or hi != int(hi):
            raise ValueError("inference_job_gpus: expected whole numbers of GPUs")
        _range(self.training_period_s, "training_period_s", 1e-3)
        _range(self.training_comm_frac, "training_comm_frac", 0.0, 1.0)
        _range(self.training_dip_frac, "training_dip_frac", 0.0, 1.0)
        _range(self.training_compute_w, "training_compute_w", 0.0, self.max_w)
        _range(self.inference_base_w, "inference_base_w", 0.0, self.max_w)
        _range(self.inference_burst_w, "inference_burst_w", 0.0, self.max_w)
        _range(self.inference_burst_s, "inference_burst_s", 1e-3)
        _positive(self.inference_burst_rate_per_s, "inference_burst_rate_per_s")
        _positive(self.max_w, "max_w")
        if not 0 <= self.idle_w <= self.max_w:
            raise ValueError(f"idle_w must be in [0, max_w] (got {self.idle_w})")
        if not 0 <= self.noise_w < self.max_w:
            raise ValueError(f"noise_w must be >= 0 (got {self.noise_w})")
        if not 0 <= self.chip_spread < 1:
            raise ValueError(f"chip_spread must be in [0, 1) (got {self.chip_spread})")
        if not 0 <= self.static_w < self.max_w:
            raise ValueError(f"static_w must be in [0, max_w) (got {self.static_w})")
        if self.step_s < 0 or not math.isfinite(self.step_s):
            raise ValueError(f"step_s cannot be negative (got {self.step_s})")
        if not 0 < self.warmup_load <= 1:
            raise ValueError(f"warmup_load must be in (0, 1] (got {self.warmup_load})")

    def describe(self) -> list[str]:
        """The configuration in a few lines, for the start of a run."""
        kinds = _shares(self.kind_mix, KINDS, "kind mix")
        classes = _shares(self.class_mix, JOB_CLASSES, "class mix")
        r = self._fmt_range
        return [
            "workload: " + ", ".join(f"{k} {kinds[k]:.0%}" for k in KINDS)
            + "; classes per job: " + ", ".join(f"{c} {classes[c]:.0%}" for c in reversed(JOB_CLASSES)),
            f"  training: {r(self.training_job_nodes, 'g')} nodes/job, period {r(self.training_period_s)} s, "
            f"dip {r(self.training_comm_frac, '.0%')} of it to {r(self.training_dip_frac, '.0%')} of "
            f"{r(self.training_compute_w)} W, in phase across the job",
            f"  inference: {r(self.inference_job_gpus, 'g')} GPUs/job, base {r(self.inference_base_w)} W, "
            f"bursts {self.inference_burst_rate_per_s:g}/s of {r(self.inference_burst_s)} s at "
            f"{r(self.inference_burst_w)} W; idle {self.idle_w:g} W; noise +/-{self.noise_w:g} W, "
            f"chips +/-{self.chip_spread:.0%}",
            f"  throughput: ((P - {self.static_w:g}) / (P_demand - {self.static_w:g})) ** (1/3), "
            f"clipped to [0, 1]",
        ]

    @staticmethod
    def _fmt_range(v: Sequence[float], spec: str = "g") -> str:
        a, b = format(v[0], spec), format(v[1], spec)
        return a if a == b else f"{a}-{b}"


@dataclass(slots=True)
class Job:
    """One job: its GPUs (global indexes), class, kind, start time and swing parameters."""

    id: str
    kind: str  # training | inference
    gpus: list[int]
    cls: str = "normal"
    start_s: float = 0.0
    period_s: float = 0.0
    comm_frac: float = 0.0
    phase_s: float = 0.0
    compute_w: float = 0.0
    dip_w: float = 0.0


@dataclass(slots=True)
class _Gpu:
    kind: str
    job: Job | None
    scale: float
    base_w: float = 0.0
    burst_starts: list[float] = field(default_factory=list)
    burst_ends: list[float] = field(default_factory=list)
    burst_w: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Workload:
    """The laid-out site: per GPU (global index ``node * gpus_per_node + local``) its job and
    demand curve. Build it with :func:`build_workload`."""

    cfg: WorkloadConfig
    nodes: int
    gpus_per_node: int
    seed: int
    jobs: list[Job]
    _gpus: list[_Gpu]
    horizon_s: float

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    def gpu_index(self, node: int, local: int) -> int:
        return node * self.gpus_per_node + local

    def kind_of(self, gpu: int) -> str:
        return self._gpus[gpu].kind

    def job_of(self, gpu: int) -> Job | None:
        return self._gpus[gpu].job

    def class_of(self, gpu: int, t_s: float) -> str:
        """The GPU's priority class at ``t_s``: its job's, or ``idle`` with no job running."""
        job = self._gpus[gpu].job
        return job.cls if job is not None and t_s >= job.start_s else "idle"

    def classes_by_gpu(self, node: int, t_s: float) -> dict[int, str]:
        """``{local index: class}`` of one node at ``t_s`` (what a job tracker would say)."""
        base = node * self.gpus_per_node
        return {i: self.class_of(base + i, t_s) for i in range(self.gpus_per_node)}

    def _noise(self, gpu: int, t_s: float) -> float:
        # A cheap integer hash of (seed, gpu, millisecond): uniform in [-1, 1), the same
        # value whenever the same GPU is asked at the same time.
        h = (gpu * 0x9E3779B1 + int(t_s * 1000.0) * 0x85EBCA77 + self.seed * 0xC2B2AE3D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
        h ^= h >> 12
        return (h * _NOISE_SCALE) * 2.0 - 1.0

    def demand_w(self, gpu: int, t_s: float) -> float:
        """What GPU ``gpu`` would draw uncapped at site time ``t_s`` (seconds), in W."""
        g = self._gpus[gpu]
        cfg = self.cfg
        job = g.job
        if job is None or t_s < job.start_s:
            w = cfg.idle_w
        elif job.kind == "training":
            in_dip = (t_s + job.phase_s) % job.period_s >= job.period_s * (1.0 - job.comm_frac)
            w = job.dip_w if in_dip else job.compute_w
        else:
            k = bisect.bisect_right(g.burst_starts, t_s) - 1
            w = g.burst_w[k] if k >= 0 and t_s < g.burst_ends[k] else g.base_w
        w = w * g.scale + cfg.noise_w * self._noise(gpu, t_s)
        return min(cfg.max_w, max(0.0, w))

    def site_demand_w(self, t_s: float) -> float:
        return sum(self.demand_w(g, t_s) for g in range(len(self._gpus)))

    def mean_site_demand_w(self, t0_s: float, t1_s: float, samples: int = 120) -> float:
        """The site's mean uncapped demand over [t0, t1), from ``samples`` evenly spaced times."""
        if t1_s <= t0_s:
            raise ValueError("mean_site_demand_w: the window is empty")
        n = max(1, samples)
        return sum(self.site_demand_w(t0_s + (t1_s - t0_s) * (k + 0.5) / n) for k in range(n)) / n

    def summary(self) -> list[str]:
        """What was laid out: GPUs per kind and class, jobs, the late starters."""
        n = len(self._gpus)
        kinds = {k: sum(1 for g in self._gpus if g.kind == k) for k in KINDS}
        cls = {c: sum(len(j.gpus) for j in self.jobs if j.cls == c) for c in JOB_CLASSES}
        late = [j for j in self.jobs if j.start_s > 0]
        running = sum(kinds[k] for k in ("training", "inference")) or 1
        return [
            f"laid out: {self.nodes} nodes x {self.gpus_per_node} GPUs = {n}; "
            + ", ".join(f"{k} {kinds[k]} ({kinds[k] / n:.0%})" for k in KINDS),
            f"  {len(self.jobs)} jobs ({sum(1 for j in self.jobs if j.kind == 'training')} training); GPUs per "
            "class: " + ", ".join(f"{c} {cls[c]} ({cls[c] / running:.0%})" for c in reversed(JOB_CLASSES))
            + ", idle " + str(kinds["idle"]),
            f"  {len(late)} jobs ({sum(len(j.gpus) for j in late)} GPUs) start at the step "
            f"(t = {self.cfg.step_s:g} s)" if late else "  every job runs from the start (no step)",
        ]


def _assign_classes(jobs: list[Job], shares: Mapping[str, float], rng: random.Random) -> None:
    """Whole jobs to classes so that GPUs per class track ``shares``: the largest jobs first,
    each to the class furthest below its share (ties broken by the seeded shuffle)."""
    order = jobs[:]
    rng.shuffle(order)
    order.sort(key=lambda j: -len(j.gpus))
    total = sum(len(j.gpus) for j in jobs)
    got = dict.fromkeys(JOB_CLASSES, 0)
    for job in order:
        # The class whose share would be least exceeded after taking this job.
        best = min(JOB_CLASSES, key=lambda c: (got[c] + len(job.gpus)) / total - shares[c]
                   if shares[c] > 0 else math.inf)
        job.cls = best
        got[best] += len(job.gpus)


def _pick_late(jobs: list[Job], demand_of: Mapping[str, float], idle_w: float, fraction_late: float,
               rng: random.Random) -> list[Job]:
    """Jobs (in seeded random order) whose start adds ``fraction_late`` of the jobs' demand, as
    near as whole jobs allow: a job is taken unless it overshoots by more than half its own size."""
    total = sum(demand_of.values())
    target = fraction_late * total
    order = jobs[:]
    rng.shuffle(order)
    late: list[Job] = []
    got = 0.0
    for job in order:
        extra = demand_of[job.id] - idle_w * len(job.gpus)
        if got + extra <= target + 0.5 * extra:
            late.append(job)
            got += extra
        if got >= target:
            break
    return late


def build_workload(cfg: WorkloadConfig, nodes: int, gpus_per_node: int = 8, seed: int = 1,
                   horizon_s: float = 3600.0) -> Workload:
    """Lay out jobs on ``nodes`` x ``gpus_per_node`` GPUs (module doc). Deterministic for ``seed``;
    inference bursts are drawn up to ``horizon_s`` (demand after it has no bursts)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("a site needs at least one node with at least one GPU")
    if not horizon_s > 0:
        raise ValueError("horizon_s must be > 0")
    rng = random.Random(f"workload-{seed}")
    kinds = _shares(cfg.kind_mix, KINDS, "kind mix")
    n = nodes * gpus_per_node
    order = list(range(nodes))
    rng.shuffle(order)
    train_nodes = min(nodes, round(kinds["training"] * n / gpus_per_node))
    jobs: list[Job] = []
    gpus: list[_Gpu | None] = [None] * n
    # training: whole nodes, jobs of a random size, in phase across their nodes
    k = 0
    lo, hi = int(cfg.training_job_nodes[0]), int(cfg.training_job_nodes[1])
    while k < train_nodes:
        size = min(rng.randint(lo, hi), train_nodes - k)
        members = [node * gpus_per_node + i for node in order[k:k + size] for i in range(gpus_per_node)]
        k += size
        period = rng.uniform(*cfg.training_period_s)
        compute = rng.uniform(*cfg.training_compute_w)
        job = Job(id=f"train-{len(jobs):04d}", kind="training", gpus=members, period_s=period,
                  comm_frac=rng.uniform(*cfg.training_comm_frac), phase_s=rng.uniform(0.0, period),
                  compute_w=compute, dip_w=compute * rng.uniform(*cfg.training_dip_frac))
        jobs.append(job)
        for g in members:
            gpus[g] = _Gpu("training", job, 1.0 + rng.uniform(-cfg.chip_spread, cfg.chip_spread))
    # the other nodes: inference jobs of a few GPUs, and idle GPUs, in the shares asked
    rest = [node * gpus_per_node + i for node in order[train_nodes:] for i in range(gpus_per_node)]
    infer_share = kinds["inference"] / ((kinds["inference"] + kinds["idle"]) or 1.0)
    n_infer = round(infer_share * len(rest))
    flags = [True] * n_infer + [False] * (len(rest) - n_infer)
    rng.shuffle(flags)
    run: list[int] = []
    glo, ghi = int(cfg.inference_job_gpus[0]), int(cfg.inference_job_gpus[1])
    want = rng.randint(glo, ghi)

    def close_run() -> None:
        nonlocal run, want
        if run:
            job = Job(id=f"infer-{len(jobs):04d}", kind="inference", gpus=run)
            jobs.append(job)
            for g in run:
                gpus[g] = _make_inference_gpu(cfg, job, rng, random.Random(f"bursts-{seed}-{g}"), horizon_s)
        run, want = [], rng.randint(glo, ghi)

    for g, is_infer in zip(rest, flags):
        if run and (g // gpus_per_node != run[-1] // gpus_per_node or len(run) >= want):
            close_run()
        if is_infer:
            run.append(g)
        else:
            close_run()
            gpus[g] = _Gpu("idle", None, 1.0 + rng.uniform(-cfg.chip_spread, cfg.chip_spread))
    close_run()
    _assign_classes(jobs, _shares(cfg.class_mix, JOB_CLASSES, "class mix"), rng)
    laid = [g for g in gpus if g is not None]
    assert len(laid) == n
    work = Workload(cfg, nodes, gpus_per_node, seed, jobs, laid, horizon_s)
    if cfg.step_s > 0 and cfg.warmup_load < 1 and jobs:
        # Each job's mean demand over a long window decides which start late.
        window = (0.0, min(horizon_s, 600.0))
        demand_of = {j.id: sum(_mean_gpu_w(work, g, *window) for g in j.gpus) for j in jobs}
        jobs_w = sum(demand_of.values()) or 1.0
        idle_w = sum(_mean_gpu_w(work, g, *window) for g, x in enumerate(laid) if x.kind == "idle")
        # pre-step = warmup_load x post-step: the late jobs add (1 - warmup_load) of the site's demand
        late_share = (1.0 - cfg.warmup_load) * (jobs_w + idle_w) / jobs_w
        for job in _pick_late(jobs, demand_of, cfg.idle_w, min(1.0, late_share), rng):
            job.start_s = cfg.step_s
    return work


def _mean_gpu_w(work: Workload, gpu: int, t0: float, t1: float) -> float:
    """A GPU's exact mean demand over [t0, t1) with its job running (noise averages out; the
    clip at ``max_w`` is ignored: the draws are configured below it)."""
    g = work._gpus[gpu]
    job = g.job
    if job is None:
        return work.cfg.idle_w * g.scale
    if job.kind == "training":
        return g.scale * (job.compute_w * (1.0 - job.comm_frac) + job.dip_w * job.comm_frac)
    extra = 0.0
    for start, end, w in zip(g.burst_starts, g.burst_ends, g.burst_w):
        overlap = min(end, t1) - max(start, t0)
        if overlap > 0:
            extra += overlap * (w - g.base_w)
    return g.scale * (g.base_w + extra / (t1 - t0))


def _make_inference_gpu(cfg: WorkloadConfig, job: Job, rng: random.Random, bursts: random.Random,
                        horizon_s: float) -> _Gpu:
    """An inference GPU; its bursts come from their own RNG, so the horizon (how many are drawn)
    changes nothing else of the layout."""
    gpu = _Gpu("inference", job, 1.0 + rng.uniform(-cfg.chip_spread, cfg.chip_spread),
               base_w=rng.uniform(*cfg.inference_base_w))
    t = bursts.expovariate(cfg.inference_burst_rate_per_s)
    while t < horizon_s:
        length = bursts.uniform(*cfg.inference_burst_s)
        gpu.burst_starts.append(t)
        gpu.burst_ends.append(t + length)
        gpu.burst_w.append(bursts.uniform(*cfg.inference_burst_w))
        t += length + bursts.expovariate(cfg.inference_burst_rate_per_s)
    return gpu
