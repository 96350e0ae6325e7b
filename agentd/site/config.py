"""The ``[budget]`` section of agentd.toml: how a node takes part in the site's power caps."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(False, description="publish power reports and enforce the controller's leases")
    domains_file: Path | None = Field(None, description="the site's power-domain tree (YAML, shared with the controller)")
    failsafe_w: float | None = Field(None, gt=0, description="node budget when no lease is live")
    site_key_file: Path | None = Field(None, description="HMAC key that signs leases (a file or a systemd credential)")
