"""The ``[budget]`` section of agentd.toml: how a node takes part in the site's power caps.

The checks that need only this section are model validators here, so ``agentd check-config``
reports them located (``budget.failsafe_w: ...``) like every other key. What needs another
section (``mqtt.host``) or the disk (the domains file, the site key) is checked when the daemon
starts (``budget_start_errors``), with the same wording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agentd.site.protocol import CLASSES
from collectors.durations import parse_duration_s


def _seconds(value: str | float) -> float:
    return parse_duration_s(value)


class BudgetConfig(BaseModel):
    """Site power caps on this node: power reports to the controller, and its leases enforced."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(False, description="publish power reports and enforce the controller's leases "
                                             "(needs mqtt.host)")
    domains_file: Path | None = Field(None, description="the site's power-domain tree (YAML, shared with the "
                                                        "controller); names this node's domain in node_power",
                                      examples=["/etc/agentd/domains.yaml"])
    failsafe_w: float | None = Field(None, gt=0, description="node budget (sum of GPU limits, W) when no lease "
                                                             "is live: this node's static share, so that the "
                                                             "failsafes of all nodes sum under every cap",
                                     examples=[4000.0])
    allow_unsigned: bool = Field(False, description="accept leases without a signature when site_key_file is "
                                                    "unset (anyone who can publish to the broker could then set "
                                                    "this node's budget)")
    site_key_file: Path | None = Field(None, description="HMAC key that signs leases (a file, or a systemd "
                                                         "credential name under $CREDENTIALS_DIRECTORY)",
                                       examples=["/etc/agentd/site.key"])
    max_clock_skew: str | float = Field("2s", description="a lease issued further ahead of this node's clock "
                                                          "is refused (from the future)")
    max_lease_ttl: str | float = Field("60s", description="a lease is held at most this long after it was "
                                                          "issued, whatever its expires_at says")
    demand_window: str | float = Field("30s", description="the demand a node reports and splits its budget by is "
                                                          "each GPU's highest estimate over this window (a training "
                                                          "job's periodic dips are not a fall in demand); 0 = the "
                                                          "tick's value")
    class_floor_fraction: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(CLASSES, 0.0),
        description="per priority class, the fraction of a GPU's maximum limit its job keeps whatever the "
                    "budget (never below the GPU's minimum limit), e.g. { high = 0.8 }")
    publish_reports: bool = Field(True, description="publish the power report every tick (off: this node "
                                                    "only enforces its leases)")

    @field_validator("failsafe_w")
    @classmethod
    def _failsafe_required(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None and info.data.get("enabled"):
            raise ValueError("required when budget.enabled = true: the node's budget (W, sum of its GPU limits) "
                             "when no controller lease is live (controller down, broker lost); set it to this "
                             "node's static share, so that the failsafes of all nodes sum under every domain's cap")
        return v

    @field_validator("site_key_file")
    @classmethod
    def _key_required(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None and info.data.get("enabled") and not info.data.get("allow_unsigned"):
            raise ValueError("required when budget.enabled = true: the HMAC key the controller signs leases "
                             "with (anyone who can publish to the broker could otherwise set this node's budget); "
                             "set budget.allow_unsigned = true to accept unsigned leases on a trusted broker")
        return v

    @field_validator("max_clock_skew", "max_lease_ttl", "demand_window")
    @classmethod
    def _check_duration(cls, v: str | float, info: ValidationInfo) -> str | float:
        seconds = _seconds(v)
        if info.field_name == "max_lease_ttl" and not 1.0 <= seconds <= 3600.0:
            raise ValueError("must be between 1s and 1h: the node falls back to failsafe_w at most this long "
                             "after the last lease it received")
        if info.field_name == "max_clock_skew" and seconds > 60.0:
            raise ValueError("must be at most 60s (synchronise the clocks with NTP instead)")
        if info.field_name == "demand_window" and seconds > 3600.0:
            raise ValueError("must be at most 1h (a job that stopped would be budgeted for that long)")
        return v

    @field_validator("class_floor_fraction", mode="before")
    @classmethod
    def _check_floors(cls, v: Any) -> dict[str, float]:
        if not isinstance(v, dict):
            raise ValueError("expected a table of class = fraction, e.g. { high = 0.8, normal = 0.3 }")
        unknown = sorted(set(v) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown priority classes {unknown} (known: {', '.join(CLASSES)})")
        out = dict.fromkeys(CLASSES, 0.0)
        for name, fraction in v.items():
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name}: expected a fraction of the GPU's maximum limit between 0 and 1 "
                                 f"(got: {fraction!r})")
            out[name] = float(fraction)
        return out

    @property
    def max_clock_skew_s(self) -> float:
        return _seconds(self.max_clock_skew)

    @property
    def max_lease_ttl_s(self) -> float:
        return _seconds(self.max_lease_ttl)

    @property
    def demand_window_s(self) -> float:
        return _seconds(self.demand_window)


def budget_start_errors(cfg: Any) -> list[str]:
    """What stops ``agentd run`` with budget enabled, as ``key: message`` lines (``cfg`` is the
    AgentConfig): the keys of other sections the budget needs. Empty when fine or disabled."""
    budget: BudgetConfig = cfg.budget
    if not budget.enabled:
        return []
    errors = []
    if not cfg.mqtt.host:
        errors.append("budget.enabled: needs mqtt.host: power reports and leases travel over MQTT; set "
                      "mqtt.host to the site broker, or budget.enabled = false")
    return errors
