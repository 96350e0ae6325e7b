"""The HTTP API (aiohttp.web): the route table, the handlers, JSON errors, the listeners.

Why these choices:

* One declarative route table (``ROUTES``): the app is built from it and so is the OpenAPI
  document (``agentd.api.openapi``), so a route cannot exist without being documented (a test
  compares the two).
* Reads are served from the last snapshot's cached bytes (``agentd.api.snapshot``): a request
  never touches NVML, the engine or the actuator and never waits for the tick, and it runs on
  the daemon's event loop for a few tens of microseconds (a thread would not isolate it: the GIL
  would make the tick wait for it all the same).
* Every error is ``{"error", "detail"}`` with a 4xx that says what was wrong and names the field
  or parameter: unknown routes (404), wrong methods (405, with ``Allow``), bodies over
  ``api.max_body_bytes`` (413), malformed JSON (400), wrongly-typed or out-of-range fields (422).
  A bug in a handler is a logged 500 with a JSON body; no input is known to reach one (the tests
  send the bad inputs).
* Auth (``agentd.api.auth``): with a token configured, PUT/DELETE need ``Authorization: Bearer``;
  with ``api.auth_reads`` GETs too, except the probes (/healthz, /readyz). A refusal is 401 and
  echoes nothing the client sent.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from agentd import __version__
from agentd.api.auth import bearer_matches
from agentd.api.config import ApiConfig
from agentd.api.leases import LeaseError, LeaseTable, encode_table, write_atomically
from agentd.api.models import (
    JOB_ID_PATTERN,
    LEASE_ID_PATTERN,
    Agent,
    CapLease,
    CapLeaseRequest,
    CapLeases,
    Coolant,
    Error,
    Events,
    Gpus,
    Health,
    JobHint,
    JobHintReply,
    Forward,
    Ready,
    Rules,
    Throttle,
    iso_ms,
)
from agentd.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentd.api.metrics import MetricsInput, MetricsRenderer
from agentd.api.snapshot import Snapshot, lease_body, lease_scope
from agentd.clock import Clock

log = structlog.get_logger("agentd.api")

JSON = "application/json"
MAX_EVENTS = 1000
_LEASE_ID = re.compile(LEASE_ID_PATTERN)
_JOB_ID = re.compile(JOB_ID_PATTERN)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNIX_SECONDS_PATTERN = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
_UNIX_SECONDS = re.compile(UNIX_SECONDS_PATTERN)
_RFC3339 = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})$")


class ApiSource(Protocol):
    """What the handlers need of the daemon (``agentd.api.runtime.ApiRuntime`` is one)."""

    clock: Clock
    node: str
    leases: LeaseTable
    lease_lock: asyncio.Lock
    stale_after_s: float
    forward_url: str | None  # influx.url (None: the store is the database)

    @property
    def snapshot(self) -> Snapshot | None: ...

    def set_job_hint(self, job_id: str, cls: str | None) -> None: ...

    def job_hint(self, job_id: str) -> str | None: ...

    def cap_refusal(self) -> str | None: ...

    @property
    def metrics(self) -> MetricsInput | None: ...  # the last tick's, for /metrics and /v1/agent

    @property
    def metrics_renderer(self) -> MetricsRenderer: ...


class ApiError(Exception):
    """An answer other than 2xx, with its JSON body."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


# -- the route table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Literal["query", "path"]
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    handler: str  # the Api method that serves it
    summary: str
    responses: dict[int, type[BaseModel] | None]  # 2xx and 503 bodies; the error codes come from the rest
    request: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    auth: Literal["write", "read", "none"] = "read"
    tag: str = "node"
    errors: tuple[int, ...] = ()  # 4xx this route can answer besides 401
    content_type: str = JSON
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_LEASE_PARAM = Param("lease_id", "path", {"type": "string", "pattern": LEASE_ID_PATTERN},
                     "the lease's id, chosen by the client (e.g. slurm-12345, operator:rack7)", True)
_JOB_PARAM = Param("job_id", "path", {"type": "string", "pattern": JOB_ID_PATTERN},
                   "a Slurm job id (1234, 1234_7) or a Kubernetes pod UID", True)
_NOT_READY = {503: Error}

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", "/v1/throttle", "throttle", "Throttle state: level, reasons, caps, advice, recommendations",
              {200: Throttle, **_NOT_READY}, tag="throttle",
              description="What schedulers poll (the same body is retained on MQTT agentd/v1/{site}/nodes/{node}/"
                          "throttle). Levels: 0 ok, 1 degraded, 2 throttled, 3 drain, 4 critical; the worst wins."),
    RouteSpec("GET", "/v1/gpus", "gpus", "Every GPU: readings, limits, what binds each limit",
              {200: Gpus, **_NOT_READY}),
    RouteSpec("GET", "/v1/coolant", "coolant", "Coolant loops as the rules see them, and every sensor's freshness",
              {200: Coolant, **_NOT_READY}),
    RouteSpec("GET", "/v1/rules", "rules", "Loaded rules, their health and their pending/firing instances",
              {200: Rules, **_NOT_READY}),
    RouteSpec("GET", "/v1/events", "events", "Rule transitions, oldest first (the last 1000)",
              {200: Events, **_NOT_READY}, errors=(400,), params=(
                  Param("since", "query", {"anyOf": [{"type": "string", "format": "date-time"},
                                                     {"type": "string", "pattern": UNIX_SECONDS_PATTERN}]},
                        "only events recorded after this time: RFC 3339 (2026-12-02T03:04:05Z) or unix seconds"),
                  Param("after_seq", "query", {"type": "integer", "minimum": 0},
                        "only events with a larger seq (a cursor that no clock step can disturb)"),
                  Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS},
                        f"at most this many (default {MAX_EVENTS}), the oldest first"))),
    RouteSpec("GET", "/v1/caps", "caps", "Live cap leases and what each does per GPU",
              {200: CapLeases, **_NOT_READY}, tag="caps"),
    RouteSpec("GET", "/v1/caps/{lease_id}", "get_cap", "One cap lease", {200: CapLease}, tag="caps",
              params=(_LEASE_PARAM,), errors=(400, 404)),
    RouteSpec("PUT", "/v1/caps/{lease_id}", "put_cap", "Create, or replace and renew, a cap lease",
              {200: CapLease, 201: CapLease, 503: Error}, request=CapLeaseRequest, params=(_LEASE_PARAM,),
              auth="write", tag="caps", errors=(400, 409, 413, 422),
              description="watts is the ceiling of each GPU in scope (gpus, or job, or every GPU); it composes "
                          "with the rules and the site budget (the lowest wins) from the next tick. 201 when the "
                          "id is new, 200 when it replaced a live lease."),
    RouteSpec("DELETE", "/v1/caps/{lease_id}", "delete_cap", "Remove a cap lease (its GPUs rise back at the ramp)",
              {204: None, 503: Error}, params=(_LEASE_PARAM,), auth="write", tag="caps", errors=(400, 404)),
    RouteSpec("PUT", "/v1/jobs/{job_id}", "put_job", "A job's priority class (above jobs.classes rules)",
              {200: JobHintReply}, request=JobHint, params=(_JOB_PARAM,), auth="write", tag="jobs",
              errors=(400, 413, 422)),
    RouteSpec("DELETE", "/v1/jobs/{job_id}", "delete_job", "Clear a job's priority hint", {204: None},
              params=(_JOB_PARAM,), auth="write", tag="jobs", errors=(400, 404)),
    RouteSpec("GET", "/v1/agent", "agent", "The daemon's own figures: ticks, store backlog, forwarding, MQTT",
              {200: Agent, 503: Error}, tag="agent"),
    RouteSpec("GET", "/healthz", "healthz", "Liveness: the process answers", {200: Health}, auth="none",
              tag="probes"),
    RouteSpec("GET", "/readyz", "readyz", "Readiness: first tick done and GPU telemetry fresh",
              {200: Ready, 503: Ready}, auth="none", tag="probes"),
    RouteSpec("GET", "/metrics", "metrics", "Prometheus metrics (text exposition format)", {200: None, 503: Error},
              tag="metrics", content_type="text/plain"),
    RouteSpec("GET", "/v1/openapi.json", "openapi", "This document", {200: None}, tag="meta"),
)

PATTERN_HELP = {  # what a pattern means, for the field that has it
    "reason": "must be one line of text (no newlines or control characters)",
    "job": "must be a job id: 1..128 letters, digits and . _ : @ + - (1234, 1234_7, or a pod UID)",
}
ERROR_TEXT = {400: "bad request", 401: "no or wrong bearer token", 404: "not found", 409: "conflict",
              413: "body larger than api.max_body_bytes", 422: "a field is missing, mistyped or out of range",
              503: "not ready"}


# -- helpers -------------------------------------------------------------------------------


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = Error(error=code, detail=detail).model_dump_json().encode()
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_detail(exc: ValidationError) -> str:
    """Every problem as ``field: message (got: value)``; the input is shown short, never whole."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{loc}: required")
            continue
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or err["type"] == "extra_forbidden" else f" (got: {_shown(got)})"
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see the request schema in /v1/openapi.json)"
        elif err["type"] == "string_pattern_mismatch":
            msg = PATTERN_HELP.get(str(err["loc"][-1]), msg)
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """``raw`` as ``model``: 400 when it is not a JSON object, 422 naming each bad field."""
    if not raw.strip():
        raise ApiError(400, "malformed_json", f"the body is empty: send a JSON object ({model.__name__})")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {errors[0]['msg']}") from None
        if errors and errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise ApiError(422, "invalid_body", f"the body must be a JSON object ({model.__name__}), not "
                                                f"{type(errors[0].get('input')).__name__}") from None
        raise ApiError(422, "invalid_body", validation_detail(exc)) from None


def parse_since(text: str) -> int:
    """``since`` as wall ns: RFC 3339 (``2026-12-02T03:04:05.5Z``, an offset, lower-case t/z; a
    leap second reads as :59) or unix seconds (``1796180645.5``); 400 otherwise."""
    if _UNIX_SECONDS.match(text):
        return round(float(text) * 1e9)
    m = _RFC3339.match(text)
    if m is not None:
        y, mo, d, h, mi, s, frac, zone = m.groups()
        try:
            tz = UTC if zone in ("Z", "z") else timezone(
                (-1 if zone[0] == "-" else 1) * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
            dt = datetime(int(y), int(mo), int(d), int(h), int(mi), min(int(s), 59), tzinfo=tz)
        except ValueError:
            pass
        else:
            ns = round(float(frac or 0) * 1e9)
            return (int(dt.timestamp()) * 1_000_000_000) + ns
    raise ApiError(400, "bad_parameter", f"since: {_shown(text)} is neither RFC 3339 (2026-12-02T03:04:05Z) "
                                         "nor unix seconds")


def parse_int(request: web.Request, name: str, lo: int, hi: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name}: {_shown(raw)} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        shown = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, "bad_parameter", f"{name}: {value} is outside {shown}")
    return value


def lease_id_of(request: web.Request) -> str:
    lease_id = request.match_info["lease_id"]
    if not _LEASE_ID.match(lease_id):
        raise ApiError(400, "bad_parameter", f"lease_id: {_shown(lease_id)} must be 1..64 characters of letters, "
                                             "digits and . _ : @ - (starting with a letter or digit)")
    return lease_id


# -- the handlers ----------------------------------------------------------------------------


class Api:
    """The handlers; ``source`` is the daemon's side (``ApiSource``)."""

    def __init__(self, source: ApiSource, cfg: ApiConfig, openapi: bytes) -> None:
        self.src = source
        self.cfg = cfg
        self._openapi = openapi

    def _snap(self) -> Snapshot:
        snap = self.src.snapshot
        if snap is None:
            raise ApiError(503, "not_ready", "no tick has completed yet; retry in a second (GET /readyz says when)",
                           {"Retry-After": "1"})
        return snap

    async def throttle(self, request: web.Request) -> web.Response:
        return json_response(self._snap().throttle_bytes(self.src.clock.wall_ns()))

    async def gpus(self, request: web.Request) -> web.Response:
        return json_response(self._snap().body("gpus"))

    async def coolant(self, request: web.Request) -> web.Response:
        return json_response(self._snap().body("coolant"))

    async def rules(self, request: web.Request) -> web.Response:
        return json_response(self._snap().body("rules"))

    async def caps(self, request: web.Request) -> web.Response:
        return json_response(self._snap().body("caps"))

    async def events(self, request: web.Request) -> web.Response:
        since = request.query.get("since")
        since_ns = parse_since(since) if since is not None else None
        after = parse_int(request, "after_seq", 0)
        limit = parse_int(request, "limit", 1, MAX_EVENTS) or MAX_EVENTS
        return json_response(self._snap().events_bytes(since_ns, after, limit))

    def _lease_reply(self, lease_id: str, status: int, lease: Any, note: str = "") -> web.Response:
        snap = self.src.snapshot
        inp = snap.inp if snap is not None else None
        body = lease_body(inp, lease, lease_scope(inp, lease), note)
        return json_response(body.model_dump_json().encode(), status)

    async def get_cap(self, request: web.Request) -> web.Response:
        lease_id = lease_id_of(request)
        lease = self.src.leases.get(lease_id, self.src.clock.monotonic())
        if lease is None:
            raise ApiError(404, "not_found", f"no cap lease {lease_id!r} on this node (expired, deleted, or never "
                                             "put); GET /v1/caps lists the live ones")
        return self._lease_reply(lease_id, 200, lease)

    async def put_cap(self, request: web.Request) -> web.Response:
        lease_id = lease_id_of(request)
        req: CapLeaseRequest = parse_body(await request.read(), CapLeaseRequest)
        refusal = self.src.cap_refusal()
        if refusal is not None:
            raise ApiError(409, "caps_not_enforced", refusal)
        snap = self.src.snapshot
        if req.gpus is not None and snap is not None:
            known = snap.gpu_indices
            missing = [g for g in req.gpus if g not in known]
            if missing:
                have = ", ".join(str(g) for g in sorted(known)) or "none"
                raise ApiError(409, "unknown_gpu", f"gpus: GPU {', '.join(map(str, missing))} is not on this "
                                                   f"node (its GPUs: {have})")
        src = self.src
        async with src.lease_lock:
            clock = src.clock
            try:
                table, lease, new = src.leases.prepare_put(lease_id, req, clock.monotonic(), clock.wall_ns())
            except LeaseError as exc:
                raise ApiError(exc.status, exc.code, exc.detail) from None
            await self._persist(table)
            src.leases.commit(table)
        log.info("cap_lease_put", lease=lease_id, watts=lease.watts, ttl_s=lease.ttl_s, scope=lease.scope,
                 gpus=list(lease.gpus) if lease.gpus else None, job=lease.job, reason=lease.reason or None,
                 new=new, peer=request.remote or "unix")
        return self._lease_reply(lease_id, 201 if new else 200, lease)

    async def delete_cap(self, request: web.Request) -> web.Response:
        lease_id = lease_id_of(request)
        src = self.src
        async with src.lease_lock:
            try:
                table, lease = src.leases.prepare_delete(lease_id, src.clock.monotonic())
            except LeaseError as exc:
                raise ApiError(exc.status, exc.code, exc.detail) from None
            await self._persist(table)
            src.leases.commit(table)
        log.info("cap_lease_deleted", lease=lease_id, watts=lease.watts, scope=lease.scope,
                 peer=request.remote or "unix")
        return web.Response(status=204)

    async def _persist(self, table: Any) -> None:
        path = self.src.leases.path
        try:
            await asyncio.to_thread(write_atomically, path, encode_table(table))
        except OSError as exc:
            log.error("cap_leases_not_saved", file=str(path), error=exc.strerror or str(exc),
                      hint="the state directory must be writable; the lease table is unchanged")
            raise ApiError(503, "storage_failed", f"cannot save the lease table to {path}: {exc.strerror or exc}; "
                                                  "nothing was changed (fix the state directory and retry)") from None

    def _job_id(self, request: web.Request) -> str:
        job_id = request.match_info["job_id"]
        if not _JOB_ID.match(job_id):
            raise ApiError(400, "bad_parameter", f"job_id: {_shown(job_id)} must be 1..128 letters, digits and "
                                                 ". _ : @ + - (a Slurm job id such as 1234 or 1234_7, or a pod UID)")
        return job_id

    async def put_job(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        hint: JobHint = parse_body(await request.read(), JobHint)
        try:
            self.src.set_job_hint(job_id, hint.class_)
        except ValueError as exc:
            raise ApiError(400, "bad_parameter", f"job_id: {exc}") from None
        log.info("job_hint_set", job=job_id, job_class=hint.class_, priority=hint.priority,
                 peer=request.remote or "unix")
        return json_response(self._job_reply(job_id, hint.priority))

    def _job_reply(self, job_id: str, priority: int | None) -> bytes:
        snap = self.src.snapshot
        gpus = sorted({g for j in snap.inp.jobs if j.job_id == job_id for g in j.gpus}) if snap is not None else []
        return JobHintReply(job_id=job_id, class_=self.src.job_hint(job_id), gpus=gpus,
                            priority=priority).model_dump_json().encode()

    async def delete_job(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        if self.src.job_hint(job_id) is None:
            raise ApiError(404, "not_found", f"job {job_id!r} has no priority hint on this node")
        self.src.set_job_hint(job_id, None)
        log.info("job_hint_cleared", job=job_id, peer=request.remote or "unix")
        return web.Response(status=204)

    async def agent(self, request: web.Request) -> web.Response:
        inp = self.src.metrics  # the tick's own figures, taken once per tick for /metrics too
        if inp is None:
            raise ApiError(503, "not_ready", "no tick has completed yet; retry in a second", {"Retry-After": "1"})
        a = inp.agent
        forward = None
        if self.src.forward_url:
            last = a.forward_last_success_unix_s
            forward = Forward(url=self.src.forward_url, points=a.forward_points, errors=a.forward_errors,
                              last_success_at=iso_ms(int(last * 1e9)) if last is not None else None,
                              last_success_age_s=round(inp.ts_ns / 1e9 - last, 3) if last is not None else None)
        body = Agent(node=self.src.node, version=__version__, generated_at=iso_ms(inp.ts_ns), ticks=a.ticks,
                     ticks_missed=a.ticks_missed, tick_s=a.tick_s, tick_lag_s=a.tick_lag_s, nvml_errors=a.nvml_errors,
                     rule_errors=a.rule_errors, limit_write_errors=a.limit_write_errors,
                     store_backlog=a.store_backlog_points, store_bytes=a.store_bytes,
                     store_dropped=a.store_dropped_points, forward=forward, mqtt_connected=a.mqtt_connected)
        return json_response(body.model_dump_json().encode())

    async def healthz(self, request: web.Request) -> web.Response:
        snap = self.src.snapshot
        now = self.src.clock.monotonic()
        body = Health(version=__version__, node=self.src.node, ticks=snap.inp.ticks if snap else 0,
                      last_tick_age_s=round(now - snap.inp.mono, 3) if snap else None)
        return json_response(body.model_dump_json().encode())

    async def readyz(self, request: web.Request) -> web.Response:
        snap = self.src.snapshot
        limit = self.src.stale_after_s
        if snap is None:
            body = Ready(ready=False, detail="no tick has completed yet", first_tick=False, telemetry_age_s=None,
                         stale_after_s=limit)
            return json_response(body.model_dump_json().encode(), 503)
        last = snap.inp.last_read_mono
        age = None if last is None else round(self.src.clock.monotonic() - last, 3)
        if age is None:
            ready, detail = False, "no GPU has been read yet (NVML hung or failing: see the log)"
        elif age > limit:
            ready, detail = False, f"the last GPU reading is {age:.1f} s old (stale after {limit:g} s)"
        else:
            ready, detail = True, "ok"
        body = Ready(ready=ready, detail=detail, first_tick=True, telemetry_age_s=age, stale_after_s=limit)
        return json_response(body.model_dump_json().encode(), 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus exposition of the last tick (agentd/api/metrics.py renders it, at most
        once per tick, on a worker thread: a render costs milliseconds)."""
        renderer = self.src.metrics_renderer
        inp = self.src.metrics
        if inp is None:
            raise ApiError(503, "not_ready", "no tick has completed yet; retry in a second", {"Retry-After": "1"})
        body = await asyncio.to_thread(renderer.render, inp)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(self._openapi)


# -- middleware and the app ------------------------------------------------------------------


def _auth_check(spec: RouteSpec, cfg: ApiConfig, token: str | None, fn: Handler) -> Handler:
    needs = token is not None and (spec.auth == "write" or (spec.auth == "read" and cfg.auth_reads))
    if not needs:
        return fn
    assert token is not None

    async def checked(request: web.Request) -> web.StreamResponse:
        if not bearer_matches(request.headers.get("Authorization"), token):
            raise ApiError(401, "unauthorized", f"{spec.method} {spec.path} needs the API token: send "
                                                "'Authorization: Bearer <token>' (api.token_file on the node)",
                           {"WWW-Authenticate": 'Bearer realm="agentd"'})
        return await fn(request)
    return checked


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               414: "uri_too_long", 415: "unsupported_media_type", 431: "headers_too_large"}


def error_middleware(max_body_bytes: int) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise ApiError(413, "body_too_large", f"the body is {length} bytes; the most this node takes is "
                                                      f"{max_body_bytes} (api.max_body_bytes)")
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.detail, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {}
            if exc.status == 404:
                detail = f"no such endpoint: {request.method} {request.path} (the routes: GET /v1/openapi.json)"
            elif exc.status == 405:
                allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
                headers["Allow"] = ", ".join(allowed)
                detail = f"{request.method} is not allowed on {request.path}; use {' or '.join(allowed)}"
            elif exc.status == 413:
                detail = f"the body is larger than {max_body_bytes} bytes (api.max_body_bytes)"
            else:
                detail = exc.text or exc.reason
            return error_response(exc.status, _HTTP_CODES.get(exc.status, "bad_request"), detail, headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: logged with the route, answered as JSON, never a crash
            log.error("api_handler_failed", method=request.method, path=request.path, error=repr(exc),
                      hint="a bug in agentd; the daemon goes on; please report it with this line")
            return error_response(500, "internal_error", "the request failed inside agentd (logged as "
                                                         "api_handler_failed); the daemon goes on")
    return errors


def load_openapi() -> bytes:
    """The committed document (package data)."""
    try:
        return resources.files("agentd.api").joinpath("openapi.json").read_bytes()
    except OSError:  # a source tree before its first `python -m agentd.api.openapi`
        return b"{}"


def make_app(source: ApiSource, cfg: ApiConfig, token: str | None, openapi: bytes | None = None) -> web.Application:
    """The aiohttp application for ``source`` under ``cfg``, built from ``ROUTES``."""
    api = Api(source, cfg, openapi if openapi is not None else load_openapi())
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[error_middleware(cfg.max_body_bytes)])
    for spec in ROUTES:
        app.router.add_route(spec.method, spec.path, _auth_check(spec, cfg, token, getattr(api, spec.handler)))
    return app


class ApiServer:
    """The listeners: TCP on ``api.listen`` and, optionally, the Unix socket ``api.unix_socket``."""

    def __init__(self, app: web.Application, cfg: ApiConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        self.addresses: list[str] = []
        self._socket: Path | None = None

    async def start(self) -> None:
        """Bind; OSError naming the key and what to do when an address cannot be taken."""
        await self.runner.setup()
        try:
            address = self.cfg.address
            if address is not None:
                site = web.TCPSite(self.runner, address.host, address.port, reuse_address=True)
                try:
                    await site.start()
                except OSError as exc:
                    raise OSError(f"api.listen: cannot listen on {address}: {exc.strerror or exc}; is another agentd "
                                  "running? set api.listen to a free address (or \"\" for no TCP listener)") from None
                for name in self.runner.addresses:  # the real port when port 0 was asked for
                    host, port = name[:2]
                    self.addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            if self.cfg.unix_socket is not None:
                await self._start_unix(self.cfg.unix_socket)
        except BaseException:
            await self.runner.cleanup()
            raise
        log.info("api_listening", addresses=self.addresses, token=self.cfg.has_token,
                 auth_reads=self.cfg.auth_reads)

    async def _start_unix(self, path: Path) -> None:
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left by a run that did not stop cleanly
            else:
                raise OSError(f"api.unix_socket: {path} exists and is not a socket; remove it or choose another path")
        except FileNotFoundError:
            pass
        site = web.UnixSite(self.runner, str(path))
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"api.unix_socket: cannot listen on {path}: {exc.strerror or exc}; the directory must "
                          "exist and be writable (RuntimeDirectory=agentd gives /run/agentd)") from None
        os.chmod(path, 0o660)
        self._socket = path
        self.addresses.append(f"unix:{path}")

    @property
    def port(self) -> int | None:
        """The TCP port bound (the one picked when api.listen asked for port 0)."""
        for a in self.addresses:
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        return None

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self._socket is not None:
            try:
                self._socket.unlink()
            except OSError:
                pass
            self._socket = None
        log.info("api_stopped")


async def start_api(source: ApiSource, cfg: ApiConfig, token: str | None) -> ApiServer | None:
    """Build and bind the API (None when neither api.listen nor api.unix_socket is set)."""
    if cfg.address is None and cfg.unix_socket is None:
        log.info("api_off", hint="api.listen is empty and api.unix_socket unset")
        return None
    server = ApiServer(make_app(source, cfg, token), cfg)
    await server.start()
    return server


def document_routes() -> list[tuple[str, str]]:
    """(method, path) of every route, for the OpenAPI document and its test."""
    return [(s.method, s.path) for s in ROUTES]
