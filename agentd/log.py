"""Logging: structlog, JSON lines when stdout is not a terminal (journald), readable on a TTY."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str = "info", *, json: bool | None = None, stream=None) -> None:
    """Configure structlog once for the process. ``json=None`` picks by whether stdout is a TTY."""
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Not cached: a cached logger keeps the first configuration for ever, so a later
        # reconfiguration (a test's capture_logs, a reload changing log_level) would not reach
        # it. The daemon logs a few lines per tick at most; the lookup is not a cost that matters.
        cache_logger_on_first_use=False,
    )
