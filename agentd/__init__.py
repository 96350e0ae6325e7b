"""gpu-agentd: the per-node operations daemon for liquid-cooled GPU clusters."""

__version__ = "0.1.0"
