"""``agentd rules``: check rule files and run their tests (registered in agentd/cli.py).

``agentd rules check [FILES|DIRS...] [--with-packs] [--config FILE]`` loads the files together
(names unique across them, params merged; a directory stands for its ``*.yaml`` and ``*.yml``),
prints every error located as ``file: rules[i] (name): key: message``, exits 2 on any. With
``--config`` the site's ``rules.params`` are bound too (their errors name the config file), and
with no FILES the rules that config loads are checked.
``agentd rules test TESTFILE...`` runs promtool-style rule tests (rules/testing.py), prints
PASS/FAIL with a diff of what differs, exits 1 on any failure (2 when a test file is invalid).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from agentd.rule_files import rule_counts, rule_file_paths, rules_dirs_explicit, site_params_errors
from rules.engine import Engine
from rules.model import RuleLoadError, RuleSet, default_pack_paths, load_rule_files
from rules.testing import TestFileError, format_results, run_test_file


@click.group("rules", context_settings={"help_option_names": ["-h", "--help"]})
def rules() -> None:
    """Check rule files and run rule tests."""


@rules.command("check")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--with-packs", is_flag=True,
              help="Load the shipped packs too (a site file may use their params and must not reuse their names).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="agentd.toml whose rules.params to bind (and, with no FILES, whose rules to check).")
def check(files: tuple[Path, ...], with_packs: bool, config_path: Path | None) -> None:
    """Load FILES and DIRS (default: the shipped packs, or with --config the rules that config
    loads) and report every error; exit 2 on any."""
    errors: list[str] = []
    notes: list[str] = []
    params: dict[str, Any] = {}
    source = "site params"
    packs = default_pack_paths()
    if config_path is not None:
        from agentd.config import ConfigError, load_config_report

        try:
            loaded = load_config_report(config_path)
        except ConfigError as exc:
            _fail(list(exc.errors), "the config")
        cfg, source = loaded.cfg, loaded.source
        params = dict(cfg.rules.params)
        if not cfg.rules.enabled:
            notes.append(f"{source}: rules.enabled: note: false; agentd run loads none of these rules")
    if files:
        found = rule_file_paths(files, explicit=True, key="")
        paths = ([*packs, *(p for p in found.paths if p not in packs)] if with_packs else found.paths)
    elif config_path is not None:
        found = rule_file_paths(cfg.rules.dirs, explicit=rules_dirs_explicit(cfg))
        found.warnings = [f"{source}: {line}" for line in found.warnings]
        found.infos = [f"{source}: {line}" for line in found.infos]
        paths = (packs if cfg.rules.builtin_packs or with_packs else []) + found.paths
    else:
        found = rule_file_paths([], explicit=True)
        paths = packs
    errors += found.warnings
    notes += found.infos
    rs: RuleSet | None = None
    try:
        rs = load_rule_files(paths)
    except RuleLoadError as exc:
        errors += exc.errors
    if rs is not None:
        param_errors = site_params_errors(rs, params, source)
        errors += param_errors
        if not param_errors:
            try:
                Engine(rs, params)  # binds params and actions: catches what only shows with the values
            except RuleLoadError as exc:
                errors += exc.errors
    for line in notes:
        click.echo(line, err=True)
    if errors or rs is None:
        _fail(errors, f"{len(paths)} file(s)")
    by_scope: dict[str, int] = {}
    for r in rs.rules:
        by_scope[r.scope] = by_scope.get(r.scope, 0) + 1
    scopes = ", ".join(f"{n} {s}" for s, n in sorted(by_scope.items()))
    click.echo(f"OK: {len(rs.rules)} rules ({scopes or 'none'}), {len(rs.params)} params, "
               f"{len(paths)} file(s)" + (f", site params from {source}" if config_path is not None else ""))
    for path, count in rule_counts(rs).items():
        click.echo(f"  {path}: {count} rule{'' if count == 1 else 's'}")


def _fail(errors: list[str], where: str) -> NoReturn:
    for line in errors:
        click.echo(line, err=True)
    click.echo(f"{len(errors)} error(s) in {where}", err=True)
    sys.exit(2)


@rules.command("test")
@click.argument("testfiles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def test(testfiles: tuple[Path, ...]) -> None:
    """Run rule tests (promtool style); print what differs; exit 1 on any failure."""
    failed = passed = 0
    invalid = False
    for path in testfiles:
        try:
            results = run_test_file(path)
        except TestFileError as exc:
            invalid = True
            click.echo(f"ERROR {path}:", err=True)
            for line in exc.errors:
                click.echo(f"    {line}", err=True)
            continue
        click.echo(format_results(results))
        for r in results:
            passed += r.ok
            failed += not r.ok
    click.echo(f"{passed} passed, {failed} failed" + (", test file errors" if invalid else ""))
    if invalid:
        sys.exit(2)
    if failed:
        sys.exit(1)
