"""Every line the daemon's process writes is one JSON object, whoever wrote it: structlog, a
library's standard-library logger, or an uncaught exception (in the main thread or a worker)."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, threading
    import structlog
    from agentd.log import setup_logging

    setup_logging("info", json=True)
    structlog.get_logger("agentd").info("ours", gpu=0)
    logging.getLogger("aiohttp.client").warning("library warning %s", "text")
    logging.getLogger("paho").info("library chatter at info is held back")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    worker = threading.Thread(target=lambda: {}["missing"], name="nvml")
    worker.start(); worker.join()
    raise RuntimeError("uncaught in main")
""")


def test_library_logs_and_uncaught_exceptions_are_single_json_lines():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]  # fails on any non-JSON line
    events = [r["event"] for r in records]
    assert events == ["ours", "library warning text", "Task exception was never retrieved",
                      "uncaught_exception", "uncaught_exception"]
    assert records[1]["logger"] == "aiohttp.client" and records[1]["level"] == "warning"
    assert "ZeroDivisionError" in records[2]["exception"]
    assert records[3]["thread"] == "nvml" and "KeyError" in records[3]["exception"]
    assert "RuntimeError: uncaught in main" in records[4]["exception"]
    assert all("timestamp" in r for r in records)
