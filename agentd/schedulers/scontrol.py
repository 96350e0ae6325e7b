"""Slurm's node states in, node updates out: a small wrapper over Slurm's command-line clients.

Reading: ``sinfo --json`` (Slurm 21.08+), one call for every node's state, flags, reason and
``Extra``. Slurm 22.05's ``scontrol show node`` has no ``--json`` (23.02 adds it), and its
``-o`` one-line form cannot be split reliably: ``OS=``, ``Reason=`` and ``Extra=`` values hold
spaces and ``=``. The JSON shapes of 22.05 (``"state": "idle"`` + ``"state_flags": ["DRAIN"]``)
and of 23.02+ (``"state": ["IDLE", "DRAIN"]``) are both read.

Writing: ``scontrol update NodeName=N State=DRAIN Reason=...``, ``State=RESUME``,
``Extra=...``; each value is one argv element (no shell), so a reason with spaces, quotes or
``=`` arrives as written. Every call has a timeout; every failure is a ``SlurmError`` that names
the command line and carries Slurm's own message (stderr), which says what to fix (no operator
rights: "Invalid user id"; a controller that is down: "Unable to contact slurm controller").

The runner is injectable: the unit tests pass recorded output, the integration tests run the
real clients against the test cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agentd.schedulers.config import SlurmCommands
from collectors import job_classes

# Base states a node can be in while it is not in service: slurm-sync leaves such a node alone.
UNAVAILABLE = frozenset({"DOWN", "FUTURE", "UNKNOWN"})


class SlurmError(Exception):
    """A Slurm command failed; the message names the command and carries Slurm's stderr."""


Runner = Callable[[Sequence[str], float], bytes]


def run_command(argv: Sequence[str], timeout_s: float) -> bytes:
    """Run ``argv``; its stdout, or SlurmError naming the command and what to check."""
    return job_classes.run_command(argv, timeout_s, path_key="slurm.sinfo / slurm.scontrol",
                                   timeout_key="slurm.timeout", error=SlurmError)


@dataclass(slots=True, frozen=True)
class SlurmNode:
    """One node as Slurm shows it. ``state``: its state words in upper case, base state and
    flags together ({"IDLE", "DRAIN"}, {"MIXED"}, {"DOWN", "NOT_RESPONDING"})."""

    name: str
    state: frozenset[str]
    reason: str = ""
    extra: str = ""

    @property
    def drained(self) -> bool:
        """DRAIN is set (draining: jobs still run; drained: none left): no new jobs start."""
        return "DRAIN" in self.state

    @property
    def unavailable(self) -> bool:
        """Down, future or unknown: out of service for reasons that are not ours."""
        return bool(UNAVAILABLE & self.state)

    @property
    def state_text(self) -> str:
        """``IDLE+DRAIN``, as scontrol writes it (base state first)."""
        flags = sorted(self.state)
        base = [w for w in flags if w in _BASE_STATES]
        return "+".join(base + [w for w in flags if w not in _BASE_STATES]) or "UNKNOWN"


_BASE_STATES = frozenset({"IDLE", "ALLOCATED", "MIXED", "DOWN", "ERROR", "FUTURE", "UNKNOWN"})


def _words(entry: dict[str, object]) -> frozenset[str]:
    state = entry.get("state")
    words: list[object] = list(state) if isinstance(state, list) else [state]
    flags = entry.get("state_flags")
    if isinstance(flags, list):
        words.extend(flags)
    return frozenset(str(w).upper() for w in words if isinstance(w, str) and w)


def parse_sinfo_json(raw: bytes | str) -> dict[str, SlurmNode]:
    """Every node of one ``sinfo --json`` answer by name; SlurmError when it is not sinfo's JSON."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlurmError(f"sinfo's output is not JSON ({exc}); slurm.sinfo must be sinfo of Slurm 21.08 or "
                         "later (sinfo --json)") from None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise SlurmError("sinfo --json gave no \"nodes\" list" + (f": {json.dumps(errors)[:300]}" if errors else ""))
    if errors and not doc["nodes"]:
        # 22.05 with slurmctld down: exit status 0, "nodes": [], "errors": [{"error": "Unspecified error"}]
        raise SlurmError(f"sinfo --json listed no node and reported errors: {json.dumps(errors)[:300]}; is "
                         "slurmctld up (scontrol ping)?")
    nodes: dict[str, SlurmNode] = {}
    for entry in doc["nodes"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        reason = entry.get("reason")
        extra = entry.get("extra")
        nodes[entry["name"]] = SlurmNode(entry["name"], _words(entry),
                                         reason if isinstance(reason, str) else "",
                                         extra if isinstance(extra, str) else "")
    return nodes


class Slurm:
    """The Slurm commands slurm-sync runs. Blocking: call from a worker thread."""

    def __init__(self, cfg: SlurmCommands, runner: Runner = run_command) -> None:
        self.cfg = cfg
        self._run = runner
        self.calls = 0  # commands run (reads and updates)
        self.failures = 0

    def _call(self, argv: Sequence[str]) -> bytes:
        self.calls += 1
        try:
            return self._run(argv, self.cfg.timeout_s)
        except SlurmError:
            self.failures += 1
            raise

    def nodes(self) -> dict[str, SlurmNode]:
        """Every node's state, reason and Extra (``sinfo --json``)."""
        raw = self._call([self.cfg.sinfo, "--json"])
        if len(raw) > self.cfg.max_output_bytes:
            raise SlurmError(f"sinfo --json answered {len(raw)} bytes, above slurm.max_output_bytes "
                             f"({self.cfg.max_output_bytes}); raise it")
        return parse_sinfo_json(raw)

    def _update(self, node: str, *settings: str) -> None:
        self._call([self.cfg.scontrol, "update", f"NodeName={node}", *settings])

    def drain(self, node: str, reason: str) -> None:
        """No new jobs on ``node`` (running ones continue), with ``reason`` (also to change it)."""
        self._update(node, "State=DRAIN", f"Reason={reason}")

    def resume(self, node: str) -> None:
        """Back in service: Slurm clears the DRAIN flag and the reason."""
        self._update(node, "State=RESUME")

    def set_extra(self, node: str, extra: str) -> None:
        """Replace the node's ``Extra`` string (slurm-sync writes a JSON object)."""
        self._update(node, f"Extra={extra}")
