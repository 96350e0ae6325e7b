"""Logging: structlog, JSON lines when stdout is not a terminal (journald), readable on a TTY.

Everything that can write a log line goes through the same processors and renderer: structlog
itself, the standard-library loggers of the libraries we use (aiohttp, paho-mqtt via aiomqtt,
influxdb-client, asyncio's "Task exception was never retrieved"), and uncaught exceptions in the
main thread and in worker threads. So journald never receives a Python traceback split over
lines, or a line in another format: a traceback is one JSON field of one line.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Libraries are chatty at INFO (aiohttp's access log, paho's connects): their warnings and
# errors reach the log, their chatter only when the daemon itself runs at debug.
_LIBRARY_FLOOR = logging.WARNING


def _pre_chain() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def setup_logging(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure logging for the process (again on a reload). ``json=None`` picks by TTY."""
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*_pre_chain(), structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Not cached: a cached logger keeps the first configuration for ever, so a later
        # reconfiguration (a test's capture_logs, a reload changing log_level) would not reach
        # it. The daemon logs a few lines per tick at most; the lookup is not a cost that matters.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_pre_chain(), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(min(_LEVELS[level], _LIBRARY_FLOOR) if level == "debug" else _LIBRARY_FLOOR)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    structlog.get_logger("agentd").critical("uncaught_exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger("agentd").critical(
        "uncaught_exception", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
