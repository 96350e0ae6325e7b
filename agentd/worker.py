"""The NVML worker: one daemon thread that runs blocking driver calls in order.

Why not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined at interpreter exit,
so one NVML call stuck in the driver keeps the process alive for ever, on every exit path (a
start that timed out, an exception, SIGTERM). systemd would then wait for ``TimeoutStopSec`` and
SIGKILL, and ``ExecStopPost=agentd restore-limits`` would run late. A daemon thread is not
joined: once the event loop is done, the process exits whatever the driver does, in bounded time.
One thread keeps the calls serialised (reads and limit writes never interleave).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any
from collections.abc import Callable

_STOP = object()


class SerialWorker(Executor):
    """A single-threaded executor on a daemon thread (see the module doc)."""

    def __init__(self, name: str = "nvml") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the NVML worker is shut down")
            future: Future = Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller, as ThreadPoolExecutor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``wait``, wait for queued calls (never use that while one hangs)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        item[0].cancel()
            self._queue.put(_STOP)
        if wait:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
