"""The ``agentd slurm-sync`` loop: read Slurm, decide, update; and the job hints beside it.

One pass every ``interval``: ``sinfo --json`` (a worker thread), ``SyncCore.step`` over the
source's latest bodies, then each update the rate limit allows (a worker thread, one
``scontrol update`` each), each logged at info with node, from, to and reason. A pass that
cannot read Slurm changes nothing and is logged (at most once a minute); the next pass tries
again. The job hints (push_priorities) run on their own cadence in the same loop, so a slow
squeue never delays a drain.

systemd: READY=1 after the first pass (a Slurm that does not answer yet is retried, like a
broker that is down, not a failed start), WATCHDOG=1 after each completed pass,
STOPPING=1 at stop (``Type=notify`` in systemd/agentd-slurm-sync.service).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Collection
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from agentd import sdnotify
from agentd.clock import Clock
from agentd.schedulers.priorities import PriorityPusher
from agentd.schedulers.scontrol import Slurm, SlurmError, SlurmNode
from agentd.schedulers.slurm_sync import Action, Step, SyncCore
from agentd.schedulers.sources import ThrottleSource
from agentd.schedulers.throttle import NodeThrottle
from collectors.log_limit import RateLimitedLog

log = structlog.get_logger("agentd.slurm_sync")


@dataclass(slots=True)
class PassResult:
    """What one pass did (``--once`` exits on it; tests read it)."""

    slurm_ok: bool
    error: str | None = None
    applied: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    deferred: list[Action] = field(default_factory=list)
    planned: list[Action] = field(default_factory=list)  # dry run: what would have been run


@dataclass(slots=True)
class SyncStats:
    passes: int = 0
    slurm_errors: int = 0
    updates: int = 0
    update_errors: int = 0
    deferred: int = 0


class SlurmSyncService:
    """Wires a source of bodies, the decision core and Slurm; ``run`` is the process."""

    def __init__(self, core: SyncCore, slurm: Slurm, source: ThrottleSource, *, clock: Clock, interval_s: float,
                 dry_run: bool = False, pusher: PriorityPusher | None = None, settle_s: float = 10.0) -> None:
        self.core = core
        self.slurm = slurm
        self.source = source
        self.clock = clock
        self.interval_s = interval_s
        self.dry_run = dry_run
        self.pusher = pusher
        self.settle_s = settle_s
        self.stats = SyncStats()
        self._errors = RateLimitedLog()
        self._planned: dict[tuple[str, str], str] = {}  # dry run: (node, kind) -> after, logged once
        self._next_push = float("-inf")

    # -- one pass -------------------------------------------------------------------------

    async def run_pass(self) -> PassResult:
        """Read Slurm, decide, run the updates the rate limit allows."""
        self.stats.passes += 1
        try:
            nodes: dict[str, SlurmNode] = await asyncio.to_thread(self.slurm.nodes)
        except SlurmError as exc:
            self.stats.slurm_errors += 1
            self._errors.emit("read", self.clock.monotonic(), log.error, "slurm_read_failed", error=str(exc),
                              hint="nothing is changed until Slurm answers; check SLURM_CONF and scontrol ping")
            return PassResult(False, str(exc))
        step = self.core.step(self.source.latest(), nodes, now_ns=self.clock.wall_ns(),
                              monotonic=self.clock.monotonic(), expected=self.source.expected,
                              spend=not self.dry_run)
        self._report(step)
        result = PassResult(True, deferred=list(step.deferred))
        for action in step.run:
            if self.dry_run:
                self._plan(action, result)
                continue
            try:
                await asyncio.to_thread(self._apply, action)
            except SlurmError as exc:
                self.stats.update_errors += 1
                result.failed.append((action, str(exc)))
                log.error("slurm_update_failed", node=action.slurm_node, agentd_node=action.node,
                          action=action.kind, error=str(exc),
                          hint="tried again at the next pass; slurm-sync needs operator rights (docs/slurm-sync.md)")
                continue
            self.stats.updates += 1
            result.applied.append(action)
            log.info("slurm_node_updated", node=action.slurm_node, agentd_node=action.node, action=action.kind,
                     **{"from": action.before, "to": action.after}, reason=action.reason or None)
        if step.deferred:
            self.stats.deferred += len(step.deferred)
            self._errors.emit("deferred", self.clock.monotonic(), log.warning, "slurm_updates_rate_limited",
                              deferred=len(step.deferred), nodes=sorted({a.slurm_node for a in step.deferred})[:20],
                              limit_per_minute=self.core.budget.per_minute,
                              hint="the rest follow at the next passes (max_updates_per_minute)")
        return result

    def _apply(self, action: Action) -> None:
        if action.kind in ("drain", "reason"):
            self.slurm.drain(action.slurm_node, action.reason)
        elif action.kind == "resume":
            self.slurm.resume(action.slurm_node)
        else:
            self.slurm.set_extra(action.slurm_node, action.extra)

    def _plan(self, action: Action, result: PassResult) -> None:
        result.planned.append(action)
        key = (action.slurm_node, action.kind)
        if self._planned.get(key) == action.after:
            return
        self._planned[key] = action.after
        log.info("slurm_node_update_planned", node=action.slurm_node, agentd_node=action.node, action=action.kind,
                 **{"from": action.before, "to": action.after}, reason=action.reason or None, dry_run=True)

    def _report(self, step: Step) -> None:
        for notice in step.notices:
            emit = log.warning if notice.level == "warning" else log.info
            emit(notice.event, node=notice.node, **dict(notice.fields))
        for node, event in step.cleared:
            log.info("notice_cleared", node=node, notice=event)

    # -- job hints ------------------------------------------------------------------------

    async def push_pass(self, session: aiohttp.ClientSession, nodes: Collection[str]) -> int | None:
        """Read the queue and send the hints; None when squeue failed (logged)."""
        if self.pusher is None:
            return None
        jobs = await asyncio.to_thread(self.pusher.read_queue)
        if jobs is None:
            return None
        return await self.pusher.push(session, jobs, nodes)

    # -- the process ----------------------------------------------------------------------

    async def once(self) -> PassResult:
        """Start the source, wait for a first view of the nodes, one pass (and one push), stop."""
        stop = asyncio.Event()
        source_task = asyncio.ensure_future(self.source.run(stop))
        try:
            if not await self.source.settle(self.settle_s):
                log.warning("source_not_settled", waited_s=self.settle_s,
                            hint="deciding on what arrived; nodes not heard from are left as they are")
            result = await self.run_pass()
            if self.pusher is not None:
                async with aiohttp.ClientSession() as session:
                    await self.push_pass(session, self._publishing())
            return result
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(source_task, timeout=10)

    async def run(self, stop: asyncio.Event) -> None:
        """Passes every ``interval_s`` until ``stop``."""
        source_task = asyncio.ensure_future(self.source.run(stop))
        ready = False
        try:
            await self._wait(stop, self.source.settle(self.settle_s))
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    started = self.clock.monotonic()
                    result = await self.run_pass()
                    if not ready:  # up and deciding; a Slurm that does not answer yet is retried, not fatal
                        ready = True
                        sdnotify.ready(self._status())
                        log.info("slurm_sync_ready", nodes=len(self.source.latest()), slurm_ok=result.slurm_ok,
                                 dry_run=self.dry_run)
                    if self.pusher is not None and self.clock.monotonic() >= self._next_push:
                        self._next_push = self.clock.monotonic() + self.pusher.interval_s
                        await self.push_pass(session, self._publishing())
                    sdnotify.watchdog(self._status())
                    remaining = self.interval_s - (self.clock.monotonic() - started)
                    if remaining > 0:
                        await self._wait(stop, self.clock.sleep(remaining))
        finally:
            sdnotify.stopping()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(source_task, timeout=10)
            log.info("slurm_sync_stopped", passes=self.stats.passes, updates=self.stats.updates)

    async def _wait(self, stop: asyncio.Event, awaitable: Awaitable[Any]) -> None:
        """``awaitable`` or ``stop``, whichever comes first."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stopper):
            t.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)

    def _publishing(self) -> set[str]:
        """The agentd nodes with a readable body: those that run agentd and get job hints."""
        return {node for node, seen in self.source.latest().items() if isinstance(seen, NodeThrottle)}

    def _status(self) -> str:
        s = self.stats
        return (f"{len(self.source.latest())} nodes, {s.passes} passes, {s.updates} updates, "
                f"{s.update_errors} failed, {s.slurm_errors} slurm errors")
