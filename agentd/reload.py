"""SIGHUP reload: read the new configuration and rules off the event loop, judge them, and say
what can change live (Prometheus' semantics: an invalid set is refused whole and the old one
keeps running).

``prepare`` is blocking (file reads, rule compilation) and runs on a worker thread; the daemon
swaps the result in at a tick boundary (``Daemon.reload``), so a tick never sees half of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from agentd.config import AgentConfig, ConfigError, load_config
from agentd.control import Controller
from rules.model import RuleLoadError

# Settings a running daemon cannot take over without a restart: its identity and where its data
# and GPUs are (backend, state_dir, node, site, store, influx), whether it acts at all (dry_run,
# rules.enabled: switching either with caps held must restore limits first, which a stop does),
# and what its coolant ingest was built from (coolant). A reload keeps their running values and
# reports them as needing a restart; it never half-applies them.
RESTART_ONLY: tuple[str, ...] = (
    "backend", "state_dir", "node", "site", "dry_run", "sim", "store", "influx", "coolant", "rules.enabled",
    "budget",  # the node's lease tracking and report were built from it (domains file, site key)
    "api",  # the listeners are bound and the token read at start
)


class ReloadError(Exception):
    """The new configuration or rules are invalid; ``errors`` are the located messages."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(slots=True)
class Candidate:
    """A validated configuration and what it changes, ready to be swapped in."""

    cfg: AgentConfig  # the new config, with the restart-only settings kept at their running values
    controller: Controller | None  # built from the new rules (None: rules disabled)
    changed: list[str] = field(default_factory=list)  # top-level sections that change live
    needs_restart: list[str] = field(default_factory=list)  # settings that differ but are kept


def _get(cfg: AgentConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _keep(new: AgentConfig, running: AgentConfig, dotted: str) -> AgentConfig:
    """``new`` with the setting at ``dotted`` put back to its running value."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return new.model_copy(update={head: getattr(running, head)})
    section = _keep(getattr(new, head), getattr(running, head), rest)
    return new.model_copy(update={head: section})


def prepare(path: Path | None, running: AgentConfig,
            build_controller: Callable[[AgentConfig], Controller | None]) -> Candidate:
    """Load and check the configuration at ``path`` and its rules; raises ReloadError.

    Every error is collected the way ``agentd check-config`` reports it (file, key, message).
    """
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise ReloadError(list(exc.errors)) from exc
    needs_restart = [key for key in RESTART_ONLY if _get(cfg, key) != _get(running, key)]
    for key in needs_restart:
        cfg = _keep(cfg, running, key)
    try:
        controller = build_controller(cfg)
    except RuleLoadError as exc:
        raise ReloadError(list(exc.errors)) from exc
    except OSError as exc:  # an unreadable rule file or directory
        raise ReloadError([str(exc)]) from exc
    changed = [name for name in type(cfg).model_fields if getattr(cfg, name) != getattr(running, name)]
    return Candidate(cfg, controller, changed, needs_restart)
