"""``agentd domains``: check a power-domain file (registered in agentd/cli.py).

``agentd domains check FILE [--nodes a,b,...|--nodes-file F]`` loads the file, prints every
finding as ``FILE: location: message`` (errors first, then reports: a cap that can never bind,
oversubscription, leaves with no nodes; with a node list also nodes in no leaf or in two, and
entries that match no node), then a short tree summary. Exit 2 on any error, else 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agentd.cli_types import HELP_OPTIONS

from rules.domains import DomainsError, Severity, load_domains


def _read_nodes(nodes: str | None, nodes_file: Path | None) -> list[str] | None:
    if nodes is None and nodes_file is None:
        return None
    out: list[str] = []
    if nodes:
        out.extend(n.strip() for n in nodes.split(",") if n.strip())
    if nodes_file is not None:
        try:
            text = nodes_file.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {nodes_file}: {exc.strerror or exc}",
                                     param_hint="--nodes-file") from exc
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


@click.group("domains", context_settings=HELP_OPTIONS)
def domains() -> None:
    """Check the site's power-domain file."""


@domains.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--nodes", "nodes", metavar="NAME,...", default=None,
              help="Concrete node names to place in the tree (comma-separated).")
@click.option("--nodes-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file of node names, one per line (# comments allowed).")
def check(file: Path, nodes: str | None, nodes_file: Path | None) -> None:
    """Load FILE and print every error and report; exit 2 on any error."""
    node_list = _read_nodes(nodes, nodes_file)
    try:
        tree = load_domains(file)
    except DomainsError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        click.echo(f"{len(exc.errors)} error(s) in {file}", err=True)
        sys.exit(2)
    findings = tree.check(node_list)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    reports = [f for f in findings if f.severity is Severity.REPORT]
    for f in errors:
        click.echo(f.format(tree.source), err=True)
    for f in reports:
        click.echo(f.format(tree.source))
    for line in tree.summary(node_list):
        click.echo(line)
    tail = f"{len(errors)} error(s), {len(reports)} report(s)"
    if node_list is not None:
        tail += f", {len(node_list)} node(s) checked"
    if errors:
        click.echo(tail, err=True)
        sys.exit(2)
    click.echo(f"OK: {tail}")
