"""Handles on the real servers that `scripts/services` runs for the integration tests.

The servers (Mosquitto, InfluxDB 1.x, VictoriaMetrics) listen on 127.0.0.1; their addresses come
from the variables that `scripts/services env` prints:

    TEST_MQTT_HOST, TEST_MQTT_PORT, TEST_INFLUXDB1_URL, TEST_VM_URL, TEST_SERVICES_DIR

This module uses the standard library only, so that a test checks the project's own clients
against the servers and never the project against itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "services"
NAMES = ("mosquitto", "influxdb1", "vm")
ENV_VARS = (
    "TEST_MQTT_HOST",
    "TEST_MQTT_PORT",
    "TEST_INFLUXDB1_URL",
    "TEST_VM_URL",
    "TEST_SERVICES_DIR",
)
TIMEOUT_S = 30.0


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


@dataclass
class Services:
    """Addresses of the running test servers, and the few calls tests need on them."""

    mqtt_host: str
    mqtt_port: int
    influxdb1_url: str
    vm_url: str
    dir: Path

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


def from_env(environ: dict[str, str] | None = None) -> Services | None:
    """Services from the TEST_* variables, or None when none of them is set.

    Raises ValueError when only some are set (a half-started environment is a mistake worth
    hearing about, not a reason to skip).
    """
    env = os.environ if environ is None else environ
    present = [v for v in ENV_VARS if env.get(v)]
    if not present:
        return None
    missing = [v for v in ENV_VARS if not env.get(v)]
    if missing:
        raise ValueError(
            f"incomplete test server environment: {', '.join(missing)} not set; "
            'run scripts/services start and eval "$(scripts/services env)"'
        )
    return Services(
        mqtt_host=env["TEST_MQTT_HOST"],
        mqtt_port=int(env["TEST_MQTT_PORT"]),
        influxdb1_url=env["TEST_INFLUXDB1_URL"].rstrip("/"),
        vm_url=env["TEST_VM_URL"].rstrip("/"),
        dir=Path(env["TEST_SERVICES_DIR"]),
    )
