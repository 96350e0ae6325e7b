"""Which rule files a node loads, said out loud.

A rule directory the operator named and that is missing must not pass in silence (the node would
run without its site rules), while the default ``/etc/agentd/rules.d`` may simply not exist yet
on a fresh node. ``*.yml`` is loaded like ``*.yaml``, and a file in a rule directory that is not
loaded is named, never skipped quietly. ``agentd check-config`` and ``agentd rules check`` take
the files from here, and the daemon's start does too, so the three cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd import config
from agentd.config import AgentConfig
from rules.model import RuleLoadError, RuleSet

RULE_SUFFIXES = (".yaml", ".yml")


@dataclass(slots=True)
class RuleFiles:
    """The rule files to load, and what the operator should hear about the places named."""

    paths: list[Path] = field(default_factory=list)  # in load order, each file once
    warnings: list[str] = field(default_factory=list)  # a named place missing or unreadable: check-config errors
    infos: list[str] = field(default_factory=list)  # the default directory absent, files not loaded, empty dirs


def rules_dirs_explicit(cfg: AgentConfig) -> bool:
    """Whether the configuration (file or ``AGENTD_RULES__DIRS``) names ``rules.dirs`` itself."""
    return "dirs" in cfg.rules.model_fields_set


def rule_file_paths(dirs: Iterable[Path | str], *, explicit: bool, key: str = "rules.dirs",
                    default_dir: Path | None = None) -> RuleFiles:
    """The rule files in ``dirs``: each directory's ``*.yaml`` and ``*.yml`` (sorted), and any
    entry that is a file itself.

    ``explicit``: the entries were named by the operator (a config key, a command argument); then
    one that does not exist is a warning. The ``default_dir`` entry is never more than an info
    line when absent, named or not (the shipped agentd.toml names it, and a fresh node may not
    have it). Messages read ``key[i]: message (got: 'path')``, or ``path: message`` with an empty
    ``key`` (command arguments). ``default_dir`` defaults to ``agentd.config.DEFAULT_RULES_DIR``.
    """
    default_dir = config.DEFAULT_RULES_DIR if default_dir is None else default_dir
    out = RuleFiles()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            out.paths.append(path)

    for i, entry in enumerate(dirs):
        path = Path(entry)
        say = functools.partial(_located, key, i, path)

        if path.is_dir():
            try:
                children = sorted(path.iterdir())
            except OSError as exc:
                out.warnings.append(say(f"cannot list the directory: {exc.strerror}; let agentd read it"))
                continue
            loaded = [c for c in children if _is_rule_file(c)]
            skipped = [c.name + ("/" if c.is_dir() else "") for c in children if not _is_rule_file(c)]
            for child in loaded:
                add(child)
            if not loaded:
                out.infos.append(say("note: holds no *.yaml or *.yml rule files"))
            if skipped:
                out.infos.append(say(f"note: not loaded (not *.yaml or *.yml, or hidden): {', '.join(skipped)}"))
        elif path.exists() or path.is_symlink():
            add(path)  # a file named on its own is loaded whatever its name; read errors name it
        elif path == default_dir:
            out.infos.append(say("note: the default rule directory does not exist; create it to add site rules"))
        elif explicit:
            undo = f"remove it from {key}" if key else "check the path"
            out.warnings.append(say(f"no such file or directory; create it, or {undo}"))
        else:
            out.infos.append(say("note: does not exist"))
    return out


def _located(key: str, index: int, path: Path, message: str) -> str:
    return f"{key}[{index}]: {message} (got: {str(path)!r})" if key else f"{path}: {message}"


def _is_rule_file(path: Path) -> bool:
    return (not path.name.startswith(".") and path.suffix.lower() in RULE_SUFFIXES
            and (path.is_file() or not path.exists()))  # a dangling link is loaded: its read error is named


def rule_counts(rule_set: RuleSet) -> dict[str, int]:
    """Rules per loaded file (files in load order; a file of params only counts 0), for the
    start log."""
    counts = dict.fromkeys(rule_set.files, 0)
    for where in rule_set.sources.values():
        source = where.rsplit(": rules[", 1)[0]
        counts[source] = counts.get(source, 0) + 1
    return counts


_MARK = "\x00site-params"


def site_params_errors(rule_set: RuleSet, params: Mapping[str, Any], source: str) -> list[str]:
    """Errors of ``rules.params`` against the loaded packs, named by the config file: lines
    ``source: rules.params.NAME: message``, or ``source: rules.params: <rule location>: ...``
    for an action number the site's values put out of range. Empty when they are good."""
    try:
        rule_set.resolve_params(dict(params), source=_MARK)
    except RuleLoadError as exc:
        lines = []
        for line in exc.errors:
            if line.startswith(f"{_MARK}: params."):
                lines.append(f"{source}: rules.{line[len(_MARK) + 2:]}")
            elif line.startswith(f"{_MARK}: "):
                lines.append(f"{source}: rules.params: {line[len(_MARK) + 2:]}")
            else:
                lines.append(line)
        return lines
    return []


@dataclass(slots=True)
class RuleCheck:
    """What ``check_rules`` found: the files, the rule set (None when invalid) and its errors."""

    files: RuleFiles
    rule_set: RuleSet | None
    errors: list[str] = field(default_factory=list)  # located: the rule file, or the config file for params


def check_rules(cfg: AgentConfig, source: str, *, with_packs: bool | None = None) -> RuleCheck:
    """Load the rules ``cfg`` names (the packs unless ``rules.builtin_packs`` is false, or as
    ``with_packs`` says, then every file of ``rules.dirs``) and bind ``rules.params`` (errors named
    by ``source``, the config file), as ``agentd run`` does at start."""
    from rules.engine import Engine
    from rules.model import default_pack_paths, load_rule_files

    files = rule_file_paths(cfg.rules.dirs, explicit=rules_dirs_explicit(cfg))
    packs = cfg.rules.builtin_packs if with_packs is None else with_packs
    paths = (default_pack_paths() if packs else []) + files.paths
    try:
        rule_set = load_rule_files(paths)
    except RuleLoadError as exc:
        return RuleCheck(files, None, list(exc.errors))
    errors = site_params_errors(rule_set, cfg.rules.params, source)
    if not errors:
        try:
            Engine(rule_set, cfg.rules.params)  # binds params into expressions and actions
        except RuleLoadError as exc:
            errors = list(exc.errors)
    return RuleCheck(files, None if errors else rule_set, errors)
