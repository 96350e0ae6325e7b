"""``agentd rules``: check rule files and run their tests (registered in agentd/cli.py).

``agentd rules check FILES...`` loads the files together (names unique across them, params
merged), prints every error located as ``file: rules[i] (name): key: message``, exits 2 on any.
``agentd rules test TESTFILE...`` runs promtool-style rule tests (rules/testing.py), prints
PASS/FAIL with a diff of what differs, exits 1 on any failure (2 when a test file is invalid).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rules.engine import Engine
from rules.model import RuleLoadError, default_pack_paths, load_rule_files
from rules.testing import TestFileError, format_results, run_test_file


@click.group("rules")
def rules() -> None:
    """Check rule files and run rule tests."""


@rules.command("check")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--with-packs", is_flag=True,
              help="Load the shipped packs too (a site file may use their params and must not reuse their names).")
def check(files: tuple[Path, ...], with_packs: bool) -> None:
    """Load FILES (default: the shipped packs) and report every error; exit 2 on any."""
    paths = list(files)
    if with_packs or not paths:
        paths = default_pack_paths() + [p for p in paths if p not in default_pack_paths()]
    try:
        rs = load_rule_files(paths)
        Engine(rs)  # binds params and actions: catches what only shows with the values
    except RuleLoadError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        click.echo(f"{len(exc.errors)} error(s) in {len(paths)} file(s)", err=True)
        sys.exit(2)
    by_scope: dict[str, int] = {}
    for r in rs.rules:
        by_scope[r.scope] = by_scope.get(r.scope, 0) + 1
    scopes = ", ".join(f"{n} {s}" for s, n in sorted(by_scope.items()))
    click.echo(f"OK: {len(rs.rules)} rules ({scopes or 'none'}), {len(rs.params)} params, "
               f"{len(paths)} file(s)")


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
