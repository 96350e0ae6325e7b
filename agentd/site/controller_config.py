"""The settings of ``agentd controller``: one pydantic model, filled from the command line (and,
once ``agentd.config.AgentConfig`` carries it, a ``[controller]`` table of the same agentd.toml
that gives the controller its ``[mqtt]`` credentials).

Why a model and not only click options: the same settings are built by the CLI, the site
simulation and the tests, and a bad value must say which setting is wrong and what to do,
located like every other agentd error (``controller.lease_ttl: ...``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentd.site import topics
from collectors.durations import parse_duration_s


class ControllerConfigError(ValueError):
    """Invalid controller settings; ``errors`` holds one ``controller.key: message`` line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _duration(v: Any) -> Any:
    parse_duration_s(v)  # raises ValueError with the expected forms
    return v


class MeterConfig(BaseModel):
    """A facility meter: the measured power of one domain (BMS, PDU, switchgear) on an MQTT topic.

    Its reading overrides the summed node reports when it is higher (the difference is load the
    controller cannot steer: CPUs, fans, the rest of the rack), so the GPU budget leaves room
    for it. Payload: JSON ``{"power_w": 123.4}`` (or ``{"value": ...}``) or a bare number.
    """

    model_config = ConfigDict(extra="forbid")

    domain: str = Field(description="the domain of the domains file this meter measures")
    topic: str = Field(min_length=1, description="the exact MQTT topic (no wildcards)")
    stale_after: str | float = Field("10s", description="a reading older than this is ignored")

    @field_validator("topic")
    @classmethod
    def _exact(cls, v: str) -> str:
        if "+" in v or "#" in v:
            raise ValueError("a meter topic must be exact (no + or #): one topic per domain")
        return v

    @field_validator("stale_after")
    @classmethod
    def _stale(cls, v: Any) -> Any:
        return _duration(v)

    @property
    def stale_after_s(self) -> float:
        return parse_duration_s(self.stale_after)


class ControllerConfig(BaseModel):
    """Everything ``agentd controller`` needs besides the domains file, the broker and the key."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    site: str | None = Field(None, description="the site (topic prefix agentd/v1/{site}); default: the "
                                               "domains file's site")
    id: str = Field("", description="this controller's id: its lease topics and its MQTT username; "
                                    "default: the short hostname. Replicas need distinct ids")
    domain: str | None = Field(None, description="allocate only within this subtree, under the budget the "
                                                 "parent controller leases it")
    delegate: list[str] = Field(default_factory=list,
                                description="child domains run by a subtree controller of their own: read "
                                            "as one reporter (their aggregate report), leased one budget")
    interval: str | float = Field("1s", description="seconds between allocation cycles")
    lease_ttl: str | float = Field("10s", description="how long a lease holds: nodes fall back to their "
                                                      "failsafe this long after the controller stops")
    lease_refresh: str | float | None = Field(None, description="an unchanged lease is re-sent this often "
                                                                "(default: lease_ttl / 3)")
    stale_after: str | float = Field("5s", description="a node with no report for this long is counted at "
                                                       "its last known maximum and not cut")
    failsafe_w: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="subtree mode: the subtree's budget while no parent lease "
                                                 "is live (like a node's failsafe_w)")
    unseen_node_w: float | None = Field(None, ge=0, allow_inf_nan=False,
                                        description="a node the domains file names that never reported is "
                                                    "counted at this (W); unset: not counted, and listed")
    release_w_per_s: float = Field(200.0, gt=0, allow_inf_nan=False,
                                   description="a node's budget rises at most this fast (W/s, jittered)")
    release_jitter: float = Field(0.2, ge=0, lt=1, description="+/- fraction of release_w_per_s, per node")
    slack_gain_per_s: float = Field(0.5, ge=0, description="measured-slack feedback: how fast a capping domain "
                                    "grants again the watts its nodes were granted but do not draw (per s; 0: off)")
    slack_max_fraction: float = Field(0.3, ge=0, description="measured-slack feedback: the most a capping domain's "
                                      "limit may rise above target x cap, as a fraction of the cap")
    release_hold: str | float = Field("5s", description="no rise within this long of a node's last cut")
    band_hold: str | float = Field("5s", description="a domain stays capping at least this long")
    max_clock_skew: str | float = Field("2s", description="subtree mode: a parent lease issued further "
                                                          "ahead of our clock is refused")
    max_lease_ttl: str | float = Field("60s", description="subtree mode: a parent lease is held at most "
                                                          "this long after it was issued")
    meters: list[MeterConfig] = Field(default_factory=list)
    clear_leases_on_stop: bool = Field(False, description="on a clean stop, delete this controller's "
                                                          "retained leases (nodes drop them at once) "
                                                          "instead of letting them expire")
    print_summary: bool = Field(False, description="print a one-line summary per cycle on stdout")
    state_dir: Path | None = Field(None, description="keep domain_power points in a local store here "
                                                     "(forwarded to InfluxDB when [influx] url is set)")

    @field_validator("interval", "lease_ttl", "lease_refresh", "stale_after", "release_hold", "band_hold",
                     "max_clock_skew", "max_lease_ttl")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return v if v is None else _duration(v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return topics.check_level(v, "controller id") if v else v

    @property
    def controller_id(self) -> str:
        """``id``, or the short hostname when unset (resolved here, so the sample config and
        ``check-config`` show the key as the operator left it)."""
        return self.id or topics.check_level(socket.gethostname().split(".")[0], "controller id (the hostname)")

    @field_validator("site")
    @classmethod
    def _site(cls, v: str | None) -> str | None:
        return v if v is None else topics.check_level(v, "site")

    @model_validator(mode="after")
    def _consistent(self) -> ControllerConfig:
        if not 0.05 <= self.interval_s <= 60:
            raise ValueError(f"interval must be between 50ms and 60s (got: {self.interval!r})")
        if self.lease_ttl_s < 2 * self.interval_s:
            raise ValueError(f"lease_ttl ({self.lease_ttl!r}) must be at least twice the interval "
                             f"({self.interval!r}): every lease would expire before its renewal")
        if not self.lease_refresh_s < self.lease_ttl_s:
            raise ValueError("lease_refresh must be shorter than lease_ttl")
        if self.stale_after_s < self.interval_s:
            raise ValueError("stale_after must be at least one interval")
        if self.domain is not None and self.failsafe_w is None:
            raise ValueError(f"failsafe_w is required with domain = {self.domain!r}: the subtree's budget "
                             "while no lease from the parent controller is live (set it so that the "
                             "failsafes of the parent's children sum under the parent's cap)")
        if self.domain is None and self.failsafe_w is not None:
            raise ValueError("failsafe_w is only for a subtree controller (set domain)")
        if self.domain is not None and self.domain in self.delegate:
            raise ValueError(f"domain {self.domain!r} cannot delegate itself")
        domains = [m.domain for m in self.meters]
        dup = sorted({d for d in domains if domains.count(d) > 1})
        if dup:
            raise ValueError(f"more than one meter for {', '.join(dup)}: one topic per domain")
        return self

    @property
    def interval_s(self) -> float:
        return parse_duration_s(self.interval)

    @property
    def lease_ttl_s(self) -> float:
        return parse_duration_s(self.lease_ttl)

    @property
    def lease_refresh_s(self) -> float:
        return self.lease_ttl_s / 3 if self.lease_refresh is None else parse_duration_s(self.lease_refresh)

    @property
    def stale_after_s(self) -> float:
        return parse_duration_s(self.stale_after)

    @property
    def release_hold_s(self) -> float:
        return parse_duration_s(self.release_hold)

    @property
    def band_hold_s(self) -> float:
        return parse_duration_s(self.band_hold)

    @property
    def max_clock_skew_s(self) -> float:
        return parse_duration_s(self.max_clock_skew)

    @property
    def max_lease_ttl_s(self) -> float:
        return parse_duration_s(self.max_lease_ttl)


def load_controller_config(data: dict[str, Any], source: str = "controller") -> ControllerConfig:
    """Validate ``data``; ``ControllerConfigError`` lists every error as ``SOURCE.key: message``."""
    try:
        return ControllerConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling; see docs/site-controller.md)"
            got = err.get("input")
            got_txt = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got: {got!r})"
            lines.append(f"{source}{'.' + key if key else ''}: {msg}{got_txt}")
        raise ControllerConfigError(lines) from None
