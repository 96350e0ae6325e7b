"""Fixtures for the real servers that `scripts/services` runs (see tests/services.py).

Without the TEST_* environment the tests that need a server are skipped, unless
TEST_REQUIRE_SERVICES=1 (set by scripts/test, i.e. in CI), where a missing server is a failure.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator

import logging
import sys
import threading

import pytest
import structlog

from tests.services import ServiceError, Services, from_env
from tests.services import prometheus_fixture, slurm_fixture  # noqa: F401  (the prometheus and slurm fixtures)

SKIP_MESSAGE = (
    "real servers not running: run scripts/services start and eval $(scripts/services env)"
)
SERVER_FIXTURES = frozenset({"services", "influx1_db"})


def unmarked_server_tests(items: Iterable[pytest.Item]) -> list[str]:
    """Node ids of the tests that use a real server (a fixture below) without the
    ``integration`` marker, which ``-m integration`` / ``-m "not integration"`` select on."""
    return [
        item.nodeid
        for item in items
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run when a server test is not marked: ``-m "not integration"`` would run it."""
    missing = unmarked_server_tests(items)
    if missing:
        raise pytest.UsageError(
            "these tests use the real servers (fixture services or influx1_db) but are not marked "
            "integration; add @pytest.mark.integration (or pytestmark = pytest.mark.integration):\n  "
            + "\n  ".join(missing)
        )


@pytest.fixture(scope="session")
def services() -> Services:
    """The running Mosquitto, InfluxDB 1.x and VictoriaMetrics (addresses and helpers)."""
    try:
        found = from_env()
    except ValueError as e:
        pytest.fail(str(e))
    if found is None:
        if os.environ.get("TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(
                "TEST_REQUIRE_SERVICES=1 but the TEST_* server variables are not set; "
                'run scripts/services start and eval "$(scripts/services env)"'
            )
        pytest.skip(SKIP_MESSAGE)
    return found


@pytest.fixture
def influx1_db(services: Services, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty InfluxDB 1.x database for this test; dropped afterwards."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    services.influx1_create_db(name)
    yield name
    try:
        services.influx1_drop_db(name)
    except (OSError, ServiceError):
        pass  # the test may have left the server stopped; the database dies with the folder


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """A test that runs a command calling ``agentd.log.setup_logging`` (``demo``, ``sim site``
    set the level to warning) must not change what later tests' ``capture_logs`` see."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    structlog.configure(**saved)
    root.handlers, root.level = handlers, level
    sys.excepthook, threading.excepthook = hooks
