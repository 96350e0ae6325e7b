"""The ``agentd`` command line."""

import click


@click.group()
def main() -> None:
    """gpu-agentd: GPU + coolant telemetry and power/thermal protection for one node."""
