"""GPU process -> job (Slurm, Kubernetes) and the job's priority class."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class JobsConfig(BaseModel):
    """The ``[jobs]`` section of agentd.toml."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    default_class: str = Field("normal", description="priority class of a job no rule names")
