"""The API's bodies as pydantic models: the contract schedulers, slurm-sync and ``agentd status``
code against, and the source of the committed ``openapi.json``.

The throttle body (``Throttle``) is a shared contract (see docs/api.md): keys may be added,
never renamed or dropped. Response models are built by ``agentd.api.snapshot`` once per tick;
request models (``CapLeaseRequest``, ``JobHint``) validate what clients send, strictly: a
string where a number belongs, an unknown key, NaN or infinity is refused with the field named.

Timestamps are RFC 3339 strings in UTC with milliseconds (``2026-12-02T03:04:05.123Z``); the
``_ns`` twins, where present, are integer nanoseconds since the epoch, as in the store.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"},
                                 examples=["2026-12-02T03:04:05.123Z"])]
State = Literal["ok", "degraded", "throttled", "drain", "critical"]
Advice = Literal["none", "no_new_work", "drain"]
ReasonKind = Literal["rule", "stale", "health", "lease", "budget"]
Severity = Literal["info", "warning", "critical"]
JobClass = Literal["low", "normal", "high"]

LEASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
# A Slurm job id (1234, an array task 1234_7, a het component 1234+0) or a pod UID (dashed hex).
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"  # one line of text: no control characters
MAX_LEASE_TTL_S = 7 * 86400.0
MAX_LEASE_W = 100_000.0
MAX_REASON_CHARS = 200


class _Body(BaseModel):
    """A response body: every field is in the document; serialised with its field names."""

    model_config = ConfigDict(extra="forbid")


class _Request(BaseModel):
    """A request body: unknown keys, wrong types (no "500" for 500) and NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_last_second: tuple[int, str] = (-1, "")  # (second, its text): a tick formats a few stamps of one second


def iso_ms(ts_ns: int) -> str:
    """RFC 3339 UTC with milliseconds: the API's one timestamp format (``Timestamp``)."""
    global _last_second
    s, rem = divmod(ts_ns, 1_000_000_000)
    second, text = _last_second
    if second != s:
        t = time.gmtime(s)
        text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        _last_second = (s, text)
    return f"{text}{rem // 1_000_000:03d}Z"


# -- errors ---------------------------------------------------------------------------------


class Error(_Body):
    """Every error answer: a short machine-readable code and a sentence for the operator."""

    error: str = Field(description="short code: bad_request, invalid_body, unauthorized, not_found, "
                                   "method_not_allowed, body_too_large, conflict, not_ready, internal_error, ...")
    detail: str = Field(description="what was wrong, naming the field or parameter, and what to do")


# -- throttle -------------------------------------------------------------------------------


class Reason(_Body):
    """Why the node is not plain ``ok``: one firing rule instance, a stale input, a GPU's health,
    a cap lease or the site budget."""

    kind: ReasonKind
    rule: str | None = Field(None, description="the rule's name (kind rule)")
    severity: Severity
    gpu: int | None = Field(None, description="the GPU index, for a GPU-scope rule or a GPU's health")
    value: str | None = Field(None, description="the value that made it so, as text (41.2, Critical, warn)")
    threshold: str | None = Field(None, description="what the value is compared with (tcs_supply_max_c=40)")
    since: Timestamp | None = Field(None, description="when it started (a rule: when it fired)")
    advice: Advice = "none"
    action: str = Field("none", description="what it does: the rule's actions (cap_gpu, cap_node, advise), "
                                            "cap for a lease or the budget, none")
    message: str = ""
    source: str = Field(description="the same name a GPU's source shows when this binds its limit: rule:<name>, "
                                    "lease:<id>, budget; or the input (coolant.tcs.supply_temp_c, gpu)")
    level: int = Field(ge=0, le=4, description="the level this reason alone puts the node at")


class ThrottleGpu(_Body):
    index: int
    uuid: str
    power_w: float | None = Field(description="instantaneous power at the tick")
    limit_w: float | None = Field(description="the limit the GPU enforces now (read back)")
    target_w: float | None = Field(description="the limit agentd applies now (composition, then the ramp)")
    baseline_w: float | None = Field(description="the operator's limit: what the GPU holds when nothing caps it")
    source: str = Field(description="what binds target_w: baseline, ramp (rising back after a release), "
                                    "rule:<name>, lease:<id>, budget")
    health: str | None = Field(description="ok / warn / fail (null: not judged)")
    temp_c: float | None


class ThrottleJob(_Body):
    job_id: str
    kind: str = Field(description="slurm or k8s (a pod UID)")
    gpus: list[int]
    throttle_fraction: float = Field(ge=0, le=1, description="1 - (sum of target_w) / (sum of baseline_w) "
                                                             "over the job's GPUs")
    class_: str = Field(alias="class", description="its priority class (low / normal / high)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class SlurmRecommendation(_Body):
    state: Literal["DRAIN", "RESUME"]
    reason: str = Field(max_length=200, description="agentd: <advice or state>: <why> (what slurm-sync sets)")
    extra: dict[str, int] = Field(description="for the node's Extra JSON: {\"agentd_level\": N}")


class Taint(_Body):
    key: str
    value: str
    effect: Literal["NoSchedule", "NoExecute"] | None


class KubernetesRecommendation(_Body):
    taint: Taint


class Recommendations(_Body):
    slurm: SlurmRecommendation
    kubernetes: KubernetesRecommendation


class Throttle(_Body):
    """GET /v1/throttle and the retained MQTT topic ``agentd/v1/{site}/nodes/{node}/throttle``."""

    version: Literal[1] = 1
    site: str
    node: str
    level: int = Field(ge=0, le=4, description="0 ok, 1 degraded, 2 throttled, 3 drain, 4 critical (the worst wins)")
    state: State
    accept_new_work: bool = Field(description="false when a firing rule advises no_new_work or drain, or the "
                                              "state is critical")
    advice: Advice = Field(description="the strongest advice of the firing rules")
    reasons: list[Reason] = Field(description="worst first")
    node_cap_w: float | None = Field(description="the tightest node-level cap (a cap_node rule, the site budget); "
                                                 "null when none")
    node_cap_source: str | None = Field(None, description="what sets node_cap_w: rule:<name> or budget")
    draw_w: float = Field(description="sum of the GPUs' power at the tick")
    dry_run: bool = Field(False, description="observe only: targets are what agentd would apply; nothing is written")
    gpus: list[ThrottleGpu]
    jobs: list[ThrottleJob]
    recommendations: Recommendations
    generated_at: Timestamp = Field(description="wall time of the tick that built it")
    expires_at: Timestamp = Field(description="after this, treat the node as unknown (no fresher copy although "
                                              "one is due every api.publish_every_s)")
    age_s: float = Field(0.0, description="now - generated_at when served")


# -- gpus -----------------------------------------------------------------------------------


class GpuDetail(_Body):
    index: int
    uuid: str
    model: str
    healthy: bool = Field(description="false: the GPU could not be read at the last tick (error says why)")
    error: str | None
    health: str | None
    xid_last: int | None
    power_w: float | None
    power_avg_w: float | None
    energy_j: float | None
    temp_c: float | None
    mem_temp_c: float | None
    util_pct: float | None
    mem_util_pct: float | None
    mem_used_bytes: int | None
    sm_clock_mhz: float | None
    clock_reasons: int | None
    throttled: bool | None = Field(description="the hardware reports a throttle reason (power, thermal, ...)")
    limit_w: float | None = Field(description="enforced limit (read back)")
    limit_min_w: float | None
    limit_max_w: float | None
    limit_default_w: float | None
    baseline_w: float | None
    target_w: float | None
    set_w: float | None = Field(description="what agentd wrote and the GPU still holds (null: nothing of ours)")
    source: str
    externally_limited: bool = Field(description="something outside agentd holds the GPU lower than we do")
    observe_only: bool = Field(description="dry run, or agentd may not write this GPU's limit")
    write_error: str | None
    sampled_at: Timestamp | None = Field(description="when this GPU was last read")


class Gpus(_Body):
    """GET /v1/gpus."""

    node: str
    generated_at: Timestamp
    gpus: list[GpuDetail]


# -- coolant --------------------------------------------------------------------------------


class CoolantField(_Body):
    min: float | None
    max: float | None
    good: int = Field(description="sensors with a fresh good value")
    degraded: int = Field(description="sensors that are stale, of bad quality or unavailable")


class CoolantSensor(_Body):
    series: str = Field(description="site/loop/unit/point")
    loop: str
    unit: str
    field: str
    value: float | str
    quality: float
    age_s: float
    stale_after_s: float
    status: Literal["ok", "stale", "bad_quality", "unavailable"]


class CoolantLoop(_Body):
    loop: str
    degraded: bool
    degraded_fields: list[str]
    leak: str | None
    series: int
    fields: dict[str, CoolantField]
    degraded_sensors: list[CoolantSensor]


class Coolant(_Body):
    """GET /v1/coolant: every loop as the rules see it (worst case over its good sensors)."""

    node: str
    generated_at: Timestamp
    fed: bool = Field(description="coolant.subscriptions are configured (without, coolant rules are left out)")
    loops: list[CoolantLoop]
    sensors: list[CoolantSensor]
    sensors_total: int
    sensors_omitted: int = Field(0, description="sensors not listed (beyond the per-answer bound)")


# -- rules ----------------------------------------------------------------------------------


class RuleInstance(_Body):
    gpu: int | None
    state: Literal["pending", "firing"]
    since: Timestamp
    value: str | None


class RuleBody(_Body):
    name: str
    scope: str
    severity: str
    description: str
    when: str
    for_s: float
    clear_for_s: float
    stale: str
    actions: list[str]
    advice: Advice
    healthy: bool
    errors: int
    last_error: str | None
    instances: list[RuleInstance] = Field(description="pending and firing instances (inactive ones left out)")


class Rules(_Body):
    """GET /v1/rules."""

    node: str
    generated_at: Timestamp
    rules: list[RuleBody]


# -- events ---------------------------------------------------------------------------------


class EventBody(_Body):
    seq: int = Field(description="increases by one per event since the daemon started")
    ts: Timestamp
    ts_ns: int
    rule: str
    gpu: int | None
    from_state: str
    to_state: str = Field(description="pending, firing, resolved, or inactive (a pending rule that cleared)")
    severity: str
    value: str | None
    message: str


class Events(_Body):
    """GET /v1/events: rule transitions, oldest first (the last 1000 are kept)."""

    node: str
    generated_at: Timestamp
    events: list[EventBody]


class EventMessage(EventBody):
    """One rule transition on the MQTT topic ``agentd/v1/{site}/events`` (QoS 1, not retained)."""

    site: str
    node: str


# -- cap leases -----------------------------------------------------------------------------


def _whole_number(v: object) -> object:
    """2.0 is the integer 2 in JSON (and JSON Schema); "2" and true stay refused (strict)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _absent_not_null(schema: dict) -> None:
    """The JSON schema of a key that may be left out but not sent as null (the validator refuses
    null): the non-null branch alone; for a list, its bounds as the array keywords."""
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        schema.update(branches[0])
    schema.pop("default", None)
    if schema.get("type") == "array":
        schema["uniqueItems"] = True
        for old, new in (("minLength", "minItems"), ("maxLength", "maxItems")):
            if old in schema:
                schema[new] = schema.pop(old)


class CapLeaseRequest(_Request):
    """PUT /v1/caps/{lease_id}: a per-GPU ceiling for ``ttl_s`` seconds (create, or replace and renew)."""

    watts: float = Field(gt=0, le=MAX_LEASE_W, description="the ceiling for each GPU in scope, W (per GPU, as "
                                                           "zeusd's set_power_limit); below a GPU's minimum limit "
                                                           "it is clamped there, and the reply says so")
    ttl_s: float = Field(gt=0, le=MAX_LEASE_TTL_S, description="seconds until it lapses (renew with another PUT)")
    # gpus and job may be left out (not null); the schema says "not both" as the validator does
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              json_schema_extra={"not": {"required": ["gpus", "job"]}})

    gpus: list[Annotated[int, Field(ge=0, le=1023), BeforeValidator(_whole_number)]] | None = Field(
        None, min_length=1, max_length=1024, json_schema_extra=_absent_not_null,
        description="GPU indices in scope (each once); leave out (with job) for every GPU")
    job: Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)] | None = Field(
        None, json_schema_extra=_absent_not_null,
        description="a job id: its GPUs (found each tick from the GPU processes) are in scope")
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON_CHARS, pattern=TEXT_PATTERN)] = Field(
        "", description="why, for people reading the throttle body and the logs (one line)")

    @field_validator("gpus", "job", mode="before")
    @classmethod
    def _not_null(cls, v: object) -> object:
        if v is None:
            raise ValueError("null is not a scope: leave the key out (neither gpus nor job: every GPU)")
        return v

    @field_validator("gpus")
    @classmethod
    def _unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            twice = sorted({g for g in v if v.count(g) > 1})
            raise ValueError(f"lists GPU {', '.join(map(str, twice))} more than once")
        return v

    @model_validator(mode="after")
    def _one_scope(self) -> CapLeaseRequest:
        if self.gpus is not None and self.job is not None:
            raise ValueError("gpus and job: give one scope, not both (neither: every GPU of the node)")
        return self


class LeaseGpu(_Body):
    index: int
    clamped_w: float | None = Field(description="the ceiling this lease asks of this GPU, within its [min, max] "
                                                "limits (null: limits unknown)")
    clamped: bool = Field(description="watts is outside this GPU's limits: clamped_w is the nearest it can hold")
    min_w: float | None
    max_w: float | None
    target_w: float | None = Field(description="what agentd applied at the last tick (all sources composed)")
    enforced_w: float | None = Field(description="what the GPU held at the last tick (read back); a new or changed "
                                                 "lease shows from the next tick")
    binding: bool = Field(description="this lease is what binds target_w at the last tick")


class CapLease(_Body):
    """A cap lease as the node holds it (the reply to PUT and GET /v1/caps/{lease_id})."""

    id: str
    watts: float = Field(description="as requested (per GPU)")
    ttl_s: float = Field(description="as requested")
    scope: Literal["node", "gpus", "job"]
    gpus: list[int] | None = Field(description="as requested (scope gpus)")
    job: str | None
    reason: str
    created_at: Timestamp = Field(description="when this id was first put (kept across renewals)")
    renewed_at: Timestamp
    expires_at: Timestamp
    in_scope: list[int] = Field(description="the GPUs it covers now (a job's: those its processes use)")
    per_gpu: list[LeaseGpu]
    note: str = ""


class CapLeases(_Body):
    """GET /v1/caps."""

    node: str
    generated_at: Timestamp
    leases: list[CapLease]


# -- jobs -----------------------------------------------------------------------------------


class JobHint(_Request):
    """PUT /v1/jobs/{job_id}: the job's priority class, above every jobs.classes rule (null clears)."""

    class_: JobClass | None = Field(alias="class", description="low / normal / high; null clears the hint")
    priority: Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(_whole_number)] | None = Field(
        None, description="the scheduler's own priority number (Slurm's job priority, as agentd slurm-sync "
                          "sends it): logged and echoed, informational; the class decides")

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


class JobHintReply(_Body):
    job_id: str
    class_: str | None = Field(alias="class", description="the hint now held (null: none)")
    gpus: list[int] = Field(description="the GPUs the job uses on this node at the last tick")
    priority: int | None = Field(None, description="the scheduler's priority number the request carried")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


# -- the agent itself -----------------------------------------------------------------------


class Forward(_Body):
    url: str = Field(description="influx.url: where the store's points go")
    points: int | None = Field(description="points the server accepted since start")
    errors: int | None = Field(description="failed or refused write requests since start")
    last_success_at: Timestamp | None = Field(description="the tick that first saw an accepted write (null: none yet)")
    last_success_age_s: float | None


class Agent(_Body):
    """GET /v1/agent: the daemon's own figures at the last tick (what ``agentd status`` shows
    beside the throttle state): its ticks, its store and what it forwards."""

    node: str
    version: str
    generated_at: Timestamp
    ticks: int
    ticks_missed: int = Field(description="fixed-rate tick slots skipped because a tick overran")
    tick_s: float = Field(description="how long the last tick took")
    tick_lag_s: float = Field(description="how late the last tick started against its schedule")
    nvml_errors: int
    rule_errors: int
    limit_write_errors: int
    store_backlog: int = Field(description="points in the local store not yet forwarded (all of them without "
                                           "influx.url)")
    store_bytes: int | None
    store_dropped: int = Field(description="points the store's size bound removed, oldest first, since start")
    forward: Forward | None = Field(description="null: influx.url is unset (the store is the database)")
    mqtt_connected: bool | None = Field(description="null: mqtt.host is unset")


# -- probes ---------------------------------------------------------------------------------


class Health(_Body):
    """GET /healthz: the process answers (liveness; systemd's watchdog covers a stuck tick)."""

    status: Literal["ok"] = "ok"
    version: str
    node: str
    ticks: int
    last_tick_age_s: float | None = Field(description="seconds since the last tick's snapshot (null: none yet)")


class Ready(_Body):
    """GET /readyz: 200 when the first tick is done and GPU telemetry is fresh, else 503."""

    ready: bool
    detail: str
    first_tick: bool
    telemetry_age_s: float | None = Field(description="seconds since the last good GPU reading (null: none)")
    stale_after_s: float
