"""Handles on the real servers that `scripts/services` runs for the integration tests.

The servers (Mosquitto, InfluxDB 1.x, VictoriaMetrics, a one-node Slurm, Prometheus) listen on
127.0.0.1; their addresses come from the variables that `scripts/services env` prints:

    TEST_MQTT_HOST, TEST_MQTT_PORT, TEST_INFLUXDB1_URL, TEST_VM_URL, TEST_SERVICES_DIR
    SLURM_CONF (what the Slurm clients read), TEST_SLURM_CONF, TEST_SLURM_NODE, TEST_SLURM_PARTITIONS
    TEST_PROMETHEUS_URL, TEST_PROMETHEUS_TARGETS (the file_sd file Prometheus scrapes from)

The Slurm and Prometheus groups are optional in ``from_env`` (an environment exported before
they existed still serves the other tests); the ``slurm`` and ``prometheus`` fixtures below
skip, or fail under TEST_REQUIRE_SERVICES=1, when their group is missing. A test module uses
them by importing them: ``from tests.services import slurm_fixture, prometheus_fixture  # noqa: F401``.

This module uses the standard library only (and the Slurm command-line clients), so that a test
checks the project's own clients against the servers and never the project against itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "services"
# What start/stop take: the servers, and slurm's three parts one by one.
NAMES = ("mosquitto", "influxdb1", "vm", "slurm", "munge", "slurmctld", "slurmd", "prometheus")
ENV_VARS = (
    "TEST_MQTT_HOST",
    "TEST_MQTT_PORT",
    "TEST_INFLUXDB1_URL",
    "TEST_VM_URL",
    "TEST_SERVICES_DIR",
)
SLURM_ENV_VARS = ("TEST_SLURM_CONF", "TEST_SLURM_NODE", "TEST_SLURM_PARTITIONS")
PROMETHEUS_ENV_VARS = ("TEST_PROMETHEUS_URL", "TEST_PROMETHEUS_TARGETS")
TIMEOUT_S = 30.0
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None | bool], timeout_s: float = 20.0, every_s: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy, and return that; AssertionError naming
    ``what`` and the last value seen after ``timeout_s``. For conditions a server reaches on its
    own time (a scrape, a job start), never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {last!r})")
        time.sleep(every_s)


class ServiceError(RuntimeError):
    """A test server refused a request; the message carries the server's own error text."""


def _request(
    method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Send one HTTP request; return (status, body), or raise ServiceError on any non-2xx."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace").strip()
        raise ServiceError(f"{method} {url} -> HTTP {e.code}: {body}") from None


def _quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


ENDED_JOB_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                              "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"})


def _state_text(job: dict[str, Any]) -> str:
    state = job.get("job_state")  # "RUNNING" (22.05), ["RUNNING"] (23.11+)
    return ",".join(state) if isinstance(state, list) else str(state)


@dataclass
class SlurmCluster:
    """The one-node Slurm cluster (slurmctld + slurmd on this host, no accounting, run as root),
    driven through its own command-line clients with ``SLURM_CONF`` pointing at it."""

    conf: Path
    node: str
    partitions: tuple[str, ...]

    @property
    def env(self) -> dict[str, str]:
        """The environment for a Slurm client (or a program that runs one) to reach this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *argv: str, timeout_s: float = TIMEOUT_S) -> str:
        """Run a Slurm client; its stdout, or ServiceError with the command and its stderr."""
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise ServiceError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def node_info(self, name: str | None = None) -> dict[str, Any]:
        """The node as ``sinfo --json`` lists it (keys: state, state_flags, reason, extra, ...)."""
        want = name or self.node
        for entry in json.loads(self.run("sinfo", "--json"))["nodes"]:
            if entry.get("name") == want:
                return dict(entry)
        raise ServiceError(f"sinfo --json lists no node {want!r}")

    def node_flags(self, name: str | None = None) -> set[str]:
        """The node's state words, upper case: {"IDLE", "DRAIN"}, {"MIXED"}, ..."""
        info = self.node_info(name)
        state = info.get("state")
        words = state if isinstance(state, list) else [state, *info.get("state_flags", [])]
        return {str(w).upper() for w in words}

    def _in_service(self) -> bool:
        try:  # right after a slurmctld restart sinfo may list no node yet
            return not {"UNKNOWN", "NOT_RESPONDING", "DOWN"} & self.node_flags()
        except ServiceError:
            return False

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (``sbatch --parsable ARGS``); its job id."""
        out = self.run("sbatch", "--parsable", "--output=/dev/null", *args).strip()
        return out.split(";")[0]

    def jobs(self, *, ended: bool = False) -> list[dict[str, Any]]:
        """``squeue --json``'s jobs; those that ended (``squeue --json`` lists them for
        MinJobAge, plain ``squeue`` does not) only with ``ended``."""
        jobs = json.loads(self.run("squeue", "--json"))["jobs"]
        return [j for j in jobs if ended or _state_text(j) not in ENDED_JOB_STATES]

    def job_state(self, job_id: str) -> str | None:
        for job in self.jobs(ended=True):
            if str(job.get("job_id")) == job_id:
                return _state_text(job)
        return None

    def wait_running(self, job_id: str, timeout_s: float = 30.0) -> None:
        """Until squeue shows the job RUNNING (the scheduler starts it within seconds)."""
        wait_for(f"job {job_id} running", lambda: self.job_state(job_id) == "RUNNING", timeout_s)

    def reset(self) -> None:
        """Back to a bare cluster: every job cancelled, the node resumed and its Extra cleared."""
        ids = [str(j["job_id"]) for j in self.jobs()]
        if ids:
            self.run("scancel", "--full", *ids)
            wait_for("the test cluster's jobs cancelled", lambda: not self.jobs(), 30.0)
        # After a slurmctld restart the node is UNKNOWN until slurmd registers again, and
        # RESUME is refused in that state.
        wait_for(f"node {self.node} registered and responding", self._in_service, 30.0)
        if "DRAIN" in self.node_flags():
            self.run("scontrol", "update", f"NodeName={self.node}", "State=RESUME")
        if self.node_info().get("extra"):
            self.run("scontrol", "update", f"NodeName={self.node}", "Extra=")
        wait_for(f"node {self.node} idle and responding",
                 lambda: self.node_flags() == {"IDLE"}, 30.0)


@dataclass
class Prometheus:
    """The Prometheus server: it scrapes (every second) the targets listed in ``targets_file``."""

    url: str
    targets_file: Path

    def set_targets(self, targets: Sequence[str], labels: dict[str, str] | None = None) -> None:
        """Scrape ``targets`` ("127.0.0.1:PORT") from now on; replaces the file atomically (a
        half-written file would be read as no targets)."""
        doc = [{"targets": list(targets), "labels": labels or {}}] if targets else []
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.targets_file)

    def clear_targets(self) -> None:
        self.set_targets([])

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; its ``data``, or ServiceError with Prometheus' error."""
        qs = urllib.parse.urlencode(params)
        _, raw = _request("GET", f"{self.url}/api/v1/{path}" + (f"?{qs}" if qs else ""))
        doc = json.loads(raw)
        if doc.get("status") != "success":
            raise ServiceError(f"Prometheus {path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result list ({"metric": {...}, "value": [ts, "v"]} each)."""
        data = self.api("query", query=promql)
        return list(data.get("result", []))

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, with their ``health`` and ``lastError``."""
        return list(self.api("targets")["activeTargets"])


@dataclass
class Services:
    """Addresses of the running test servers, and the few calls tests need on them."""

    mqtt_host: str
    mqtt_port: int
    influxdb1_url: str
    vm_url: str
    dir: Path
    slurm: SlurmCluster | None = field(default=None)
    prometheus: Prometheus | None = field(default=None)

    # ---- lifecycle (to simulate an outage) ----

    def _script(self, command: str, name: str) -> None:
        if name not in NAMES:
            raise ValueError(f"unknown server {name!r}; known: {', '.join(NAMES)}")
        env = dict(os.environ, SERVICES_DIR=str(self.dir))
        proc = subprocess.run(
            [str(SCRIPT), command, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise ServiceError(
                f"scripts/services {command} {name} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )

    def stop(self, name: str) -> None:
        """Stop one server (SIGTERM, then SIGKILL); its data dir and port are kept."""
        self._script("stop", name)

    def start(self, name: str) -> None:
        """Start one server again on the same port and data; returns once it answers."""
        self._script("start", name)

    # ---- InfluxDB 1.x ----

    def influx1_query(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run InfluxQL; return the parsed JSON (timestamps as integer ns).

        SELECT/SHOW go as GET; anything else (CREATE, DROP, DELETE, ...) as POST, which is
        what InfluxDB 1.x wants for statements that change things. Raises ServiceError with
        the server's error text if the request or any statement fails.
        """
        params = {"q": q, "epoch": "ns"}
        if db is not None:
            params["db"] = db
        body = urllib.parse.urlencode(params).encode()
        url = f"{self.influxdb1_url}/query"
        if q.lstrip().upper().startswith(("SELECT", "SHOW")):
            _, raw = _request("GET", f"{url}?{body.decode()}")
        else:
            _, raw = _request(
                "POST",
                url,
                data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        doc = json.loads(raw)
        if "error" in doc:
            raise ServiceError(f"InfluxQL {q!r}: {doc['error']}")
        for result in doc.get("results", []):
            if "error" in result:
                raise ServiceError(f"InfluxQL {q!r}: {result['error']}")
        return doc

    def influx1_create_db(self, db: str) -> None:
        """CREATE DATABASE (a no-op if it exists)."""
        self.influx1_query(f"CREATE DATABASE {_quote_ident(db)}")

    def influx1_drop_db(self, db: str) -> None:
        """DROP DATABASE (a no-op if it does not exist)."""
        self.influx1_query(f"DROP DATABASE {_quote_ident(db)}")

    def influx1_write(self, db: str, lines: str | list[str], precision: str = "ns") -> None:
        """Write line protocol through the v1 /write endpoint."""
        text = lines if isinstance(lines, str) else "\n".join(lines)
        qs = urllib.parse.urlencode({"db": db, "precision": precision})
        _request("POST", f"{self.influxdb1_url}/write?{qs}", data=text.encode())

    def influx1_rows(self, measurement: str, db: str, where: str = "") -> list[dict[str, Any]]:
        """Every point of a measurement as {column: value} dicts ("time" in ns), oldest first."""
        q = f"SELECT * FROM {_quote_ident(measurement)}"
        if where:
            q += f" WHERE {where}"
        doc = self.influx1_query(q, db)
        rows: list[dict[str, Any]] = []
        for result in doc.get("results", []):
            for series in result.get("series", []):
                cols = series["columns"]
                rows.extend(dict(zip(cols, values, strict=True)) for values in series["values"])
        return rows

    def influx1_count(self, measurement: str, db: str, where: str = "") -> int:
        """Number of points in a measurement (optionally filtered by an InfluxQL condition).

        Counts rows of `SELECT *`, so it is exact whatever fields each point carries
        (COUNT(*) counts per field). Points with the same series and timestamp are one point
        in InfluxDB, so a replayed write does not raise the count.
        """
        return len(self.influx1_rows(measurement, db, where))

    # ---- VictoriaMetrics ----

    def vm_flush(self) -> None:
        """Make every sample written so far searchable now (/internal/force_flush)."""
        _request("GET", f"{self.vm_url}/internal/force_flush")

    def vm_export(self, match: str, start: float | None = None) -> list[dict[str, Any]]:
        """Raw samples of the series that match a selector, e.g. '{__name__="gpu_power_w"}'.

        Each item: {"metric": {labels}, "values": [...], "timestamps": [ms, ...]}. Values and
        timestamps are exact (no rollup, no staleness); duplicates are collapsed by the server's
        -dedup.minScrapeInterval. `end` is set two days ahead: by default VM's export ends at
        the current second, which hides samples written during the last second.
        """
        params = [("match[]", match), ("end", str(int(time.time()) + 2 * 86400))]
        if start is not None:
            params.append(("start", str(start)))
        _, raw = _request("GET", f"{self.vm_url}/api/v1/export?{urllib.parse.urlencode(params)}")
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def _group(env: os._Environ[str] | dict[str, str], names: Sequence[str]) -> bool:
    """Whether the variables ``names`` are all set (True) or all unset (False); ValueError when
    only some are (a half-started environment is a mistake worth hearing about, not a skip)."""
    present = [v for v in names if env.get(v)]
    missing = [v for v in names if not env.get(v)]
    if present and missing:
        raise ValueError(
            f"incomplete test server environment: {', '.join(missing)} not set; "
            'run scripts/services start and eval "$(scripts/services env)"'
        )
    return bool(present)


def from_env(environ: dict[str, str] | None = None) -> Services | None:
    """Services from the TEST_* variables, or None when none of them is set.

    Raises ValueError when only some of a group are set. The Slurm and Prometheus groups may be
    absent as a whole (``Services.slurm`` / ``.prometheus`` are then None).
    """
    env = os.environ if environ is None else environ
    if not _group(env, ENV_VARS):
        return None
    slurm = prometheus = None
    if _group(env, SLURM_ENV_VARS):
        slurm = SlurmCluster(conf=Path(env["TEST_SLURM_CONF"]), node=env["TEST_SLURM_NODE"],
                             partitions=tuple(p for p in env["TEST_SLURM_PARTITIONS"].split(",") if p))
    if _group(env, PROMETHEUS_ENV_VARS):
        prometheus = Prometheus(url=env["TEST_PROMETHEUS_URL"].rstrip("/"),
                                targets_file=Path(env["TEST_PROMETHEUS_TARGETS"]))
    return Services(
        mqtt_host=env["TEST_MQTT_HOST"],
        mqtt_port=int(env["TEST_MQTT_PORT"]),
        influxdb1_url=env["TEST_INFLUXDB1_URL"].rstrip("/"),
        vm_url=env["TEST_VM_URL"].rstrip("/"),
        dir=Path(env["TEST_SERVICES_DIR"]),
        slurm=slurm,
        prometheus=prometheus,
    )


def _missing(group: str) -> None:
    message = (f"the {group} test server variables are not set; run scripts/services start and "
               'eval "$(scripts/services env)"')
    if os.environ.get("TEST_REQUIRE_SERVICES") == "1":
        pytest.fail("TEST_REQUIRE_SERVICES=1 but " + message)
    pytest.skip(message)


@pytest.fixture(name="slurm")
def slurm_fixture(services: Services) -> Iterator[SlurmCluster]:
    """The one-node Slurm cluster, reset (no jobs, node idle, Extra empty) before and after the test."""
    if services.slurm is None:
        _missing("Slurm")
    assert services.slurm is not None
    services.slurm.reset()
    yield services.slurm
    services.slurm.reset()


@pytest.fixture(name="prometheus")
def prometheus_fixture(services: Services) -> Iterator[Prometheus]:
    """The Prometheus server, with no scrape targets before and after the test."""
    if services.prometheus is None:
        _missing("Prometheus")
    assert services.prometheus is not None
    services.prometheus.clear_targets()
    yield services.prometheus
    services.prometheus.clear_targets()
