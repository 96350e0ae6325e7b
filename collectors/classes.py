"""Priority classes of GPU work, lowest first: the one list every package shares.

A GPU with no process is ``idle``, its own lowest class; a job is ``low``, ``normal`` or
``high``. Budget cuts land on the lowest class first (``rules.budget``), the node reports its
flexible watts per class (``agentd.site``), and the job adapter maps jobs to classes
(``collectors.jobs``). Dependency-free, so ``rules`` may import it (see ``collectors.durations``).
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("idle", "low", "normal", "high")
JOB_CLASSES: tuple[str, ...] = CLASSES[1:]  # what a job may be; "idle" means "no job"
