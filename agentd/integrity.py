"""Are ``agentd``, ``collectors`` and ``rules`` really gpu-agentd's files? A start-up check.

gpu-agentd installs three top-level import packages (DESIGN.md section 1). ``collectors`` and
``rules`` are common words: the PyPI distribution ``rules`` (a Django authorization library)
installs a top-level ``rules`` too, and pip lets the second of two such installs write over the
first's files without a word. The daemon would then run on a mix of two packages, or the other
application would break. Supported installs are isolated environments (``/opt/agentd``, as
``systemd/agentd.service`` expects), and this module makes a shared environment impossible to
miss (docs/packaging.md says why the names stay):

* another installed distribution declares one of our top-level names
  (``importlib.metadata.packages_distributions``);
* a file gpu-agentd installed under ``agentd/``, ``collectors/`` or ``rules/`` no longer has the
  hash its ``RECORD`` gives, is gone, or the package folder holds files gpu-agentd did not
  install;
* ``import collectors`` / ``import rules`` would load a folder other than the one beside the
  running ``agentd`` (another entry earlier on ``sys.path``).

A source checkout (no installed gpu-agentd owns the running files, e.g. tests run from the
repository) gets only the last check: there is no RECORD to compare with, and a checkout's
packages shadowing a site-packages copy is what running from a checkout means.

``import_conflicts()`` returns one line per problem (``agentd check-config`` and ``--version`` can
show them); ``check_imports()`` raises :class:`ImportConflictError` for ``agentd run``. The check
reads metadata and hashes about a hundred small files: a few milliseconds at start, never per tick.
It never imports ``collectors`` or ``rules`` itself (a foreign ``rules/__init__.py`` may not import).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import agentd

DISTRIBUTION = "gpu-agentd"
PACKAGES = ("agentd", "collectors", "rules")
FIX = ("install gpu-agentd in a virtual environment of its own, e.g. `python3 -m venv /opt/agentd && "
       "/opt/agentd/bin/pip install gpu-agentd` (the path systemd/agentd.service runs), and keep the other "
       "distribution out of it")


class ImportConflictError(OSError):
    """The import packages on disk are not (only) gpu-agentd's. An ``OSError``: like an
    unwritable state directory, it is the environment's files that are wrong, and ``agentd run``
    reports it the same way (one message on stderr, exit 1)."""

    def __init__(self, conflicts: list[str]) -> None:
        self.conflicts = conflicts
        super().__init__(conflict_report(conflicts))


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares them (``GPU_agentd`` is ``gpu-agentd``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_hash(path: Path) -> str:
    """The sha256 of a file in RECORD's notation (urlsafe base64, no padding)."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _label(dist: metadata.Distribution) -> str:
    return f"'{dist.metadata['Name']}' {dist.version}"


def _running_root() -> Path:
    """The folder that holds the running ``agentd`` package (site-packages, or a checkout)."""
    return Path(agentd.__file__).resolve().parent.parent


def _own_distribution(root: Path) -> tuple[metadata.Distribution | None, str]:
    """gpu-agentd's installed distribution and how it owns the running files:
    ``installed`` (its RECORD lists the running ``agentd/__init__.py``), ``editable``
    (``pip install -e`` of the folder that holds the running code) or ``checkout`` (none)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None, "checkout"
    running = (root / "agentd" / "__init__.py").resolve()
    # Only a RECORD is an install's list of files (a checkout's gpu_agentd.egg-info/SOURCES.txt is not).
    for f in (dist.files or ()) if dist.read_text("RECORD") is not None else ():
        if f.as_posix() == "agentd/__init__.py":
            if Path(str(dist.locate_file(f))).resolve() == running:
                return dist, "installed"
            break
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url = urlparse(str(direct.get("url", "")))
    if direct.get("dir_info", {}).get("editable") and url.scheme == "file" and \
            Path(url2pathname(url.path)).resolve() == root:
        return dist, "editable"
    return None, "checkout"  # an installed copy exists, but the running code is a checkout's


def _origin_conflicts(root: Path) -> list[str]:
    """``collectors`` and ``rules`` must load from beside the running ``agentd``."""
    found: list[str] = []
    for name in PACKAGES[1:]:
        expected = root / name
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        if spec is None:
            found.append(f"import package '{name}' is missing (gpu-agentd expects {expected}/)")
            continue
        places = [Path(p).resolve() for p in (spec.submodule_search_locations or ())]
        if places != [expected]:  # a plain module of that name (rules.py) has no locations at all
            where = ", ".join(str(p) for p in places) or str(spec.origin)
            found.append(f"import package '{name}' loads from {where}, not from gpu-agentd's {expected}/ "
                         "(another package of that name comes first on sys.path)")
        elif spec.origin is None or not Path(spec.origin).name.startswith("__init__."):
            found.append(f"{expected}/__init__.py is missing (uninstalling another distribution that also "
                         f"installs '{name}' removes it); reinstall gpu-agentd")
    return found


def _sharing() -> dict[str, list[metadata.Distribution]]:
    """Per top-level name of ours, the other installed distributions that declare it."""
    claimed = metadata.packages_distributions()
    others: dict[str, list[metadata.Distribution]] = {}
    for name in PACKAGES:
        for dist_name in sorted({_norm(d) for d in claimed.get(name, ())} - {_norm(DISTRIBUTION)}):
            try:
                others.setdefault(name, []).append(metadata.distribution(dist_name))
            except metadata.PackageNotFoundError:  # listed by name but without readable metadata
                continue
    return others


def _overwritten(dist: metadata.Distribution, names: tuple[str, ...]) -> list[str]:
    """The files of ``dist`` under ``names`` whose content is not the one its RECORD gives."""
    bad: list[str] = []
    for f in dist.files or ():
        if f.parts[0] not in names or "__pycache__" in f.parts or f.hash is None or f.hash.mode != "sha256":
            continue
        path = Path(str(dist.locate_file(f)))
        if not path.is_file() or _record_hash(path) != f.hash.value:
            bad.append(f.as_posix())
    return bad


def _record_conflicts(own: metadata.Distribution, root: Path,
                      others: dict[str, list[metadata.Distribution]]) -> list[str]:
    """gpu-agentd's installed files against its RECORD, and files it did not install."""
    found: list[str] = []
    theirs: dict[str, str] = {}  # path -> the other distribution that lists it
    for dists in others.values():
        for dist in dists:
            for f in dist.files or ():
                theirs.setdefault(f.as_posix(), _label(dist))
    listed: set[str] = set()
    for f in own.files or ():
        if f.parts[0] not in PACKAGES:
            continue
        rel = f.as_posix()
        listed.add(rel)
        if "__pycache__" in f.parts or f.hash is None or f.hash.mode != "sha256":
            continue  # bytecode is derived (Python may rewrite it); the sources are what count
        path = Path(str(own.locate_file(f)))
        by = f"; distribution {theirs[rel]} also installs it" if rel in theirs else ""
        if not path.is_file():
            found.append(f"{path} is missing: gpu-agentd {own.version} installed it{by}; reinstall gpu-agentd")
        elif _record_hash(path) != f.hash.value:
            found.append(f"{path} is not the file gpu-agentd {own.version} installed (its RECORD hash differs): "
                         f"another install wrote over it{by}")
    for name in PACKAGES:
        extra: dict[str, list[str]] = {}  # installer (or "") -> files in our folder we did not install
        for path in sorted((root / name).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and rel not in listed:
                extra.setdefault(theirs.get(rel, ""), []).append(rel)
        for by, files in sorted(extra.items()):
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            found.append(f"{root / name}/ holds {len(files)} file(s) gpu-agentd did not install"
                         + (f" (distribution {by} did)" if by else "") + f": {shown}")
    return found


def import_conflicts() -> list[str]:
    """One line per way the running ``agentd``/``collectors``/``rules`` are not gpu-agentd's own
    files, naming the other distribution and the file; ``[]`` when the environment is clean (and
    in a source checkout whose packages load from the checkout)."""
    root = _running_root()
    found = _origin_conflicts(root)
    own, how = _own_distribution(root)
    if own is None:
        return found
    others = _sharing()
    for name, dists in others.items():
        for dist in dists:
            line = (f"import package '{name}' is installed by distribution {_label(dist)} as well as by "
                    f"gpu-agentd {own.version}: pip lets each write over the other's files")
            broken = _overwritten(dist, (name,))
            if broken:
                shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
                line += f"; {_label(dist)} is broken here: its {shown} no longer match its RECORD"
            found.append(line)
    if how == "installed":
        found += _record_conflicts(own, root, others)
    return found


def conflict_report(conflicts: list[str]) -> str:
    """The operator's message for ``conflicts``: what is shared, where, and what to do."""
    lines = [f"refusing to start: gpu-agentd's import packages ({', '.join(PACKAGES)}) in {_running_root()} "
             "are shared with another distribution:"]
    lines += [f"  - {c}" for c in conflicts]
    lines.append(f"  fix: {FIX}")
    return "\n".join(lines)


def check_imports() -> None:
    """Raise :class:`ImportConflictError` when :func:`import_conflicts` finds anything."""
    conflicts = import_conflicts()
    if conflicts:
        raise ImportConflictError(conflicts)


def main() -> None:
    """The ``agentd`` console script: the command line, unless it cannot even be imported.

    ``agentd.cli`` imports ``rules`` and ``collectors`` as it loads, before ``agentd run`` can
    check them; another distribution's ``rules/__init__.py`` that fails to import (one that needs
    Django) would end in a bare traceback. This says what is wrong instead (exit 1).
    """
    try:
        from agentd.cli import main as cli_main
    except ImportError:
        conflicts = import_conflicts()
        if not conflicts:
            raise
        print(f"agentd: {conflict_report(conflicts)}", file=sys.stderr)
        sys.exit(1)
    cli_main()
