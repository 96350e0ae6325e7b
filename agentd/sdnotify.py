"""systemd notification (READY, WATCHDOG, STATUS, STOPPING, RELOADING).

A few lines of socket code instead of a dependency (python-systemd needs libsystemd headers to
build, sdnotify on PyPI is unmaintained): the protocol is one datagram to the path in
$NOTIFY_SOCKET (``@name`` for the abstract namespace), and doing nothing when it is unset is
exactly right outside systemd. What is sent when (DESIGN.md section 9):

- ``READY=1`` after the first completed tick, and again after each reload;
- ``WATCHDOG=1`` after each completed tick only (never from a timer: a hung NVML call or a wedged
  loop stops it, and systemd restarts the service after ``WatchdogSec``);
- ``STATUS=`` a one-line summary, sent with the watchdog ping whenever it changes;
- ``RELOADING=1`` with ``MONOTONIC_USEC`` when a SIGHUP reload starts; ``STOPPING=1`` at stop.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def _status(status: str | None) -> str:
    # STATUS= ends at the newline: one line, whatever the caller passed.
    return "" if status is None else "\nSTATUS=" + " ".join(status.split())


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + _status(status))


def watchdog(status: str | None = None) -> bool:
    return notify("WATCHDOG=1" + _status(status))


def reloading() -> bool:
    """Reload started; systemd (>= 253) wants the monotonic time with it, older ones ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """``WatchdogSec`` as systemd passed it (``WATCHDOG_USEC``), when it is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
