"""The settings of ``agentd slurm-sync``: one TOML file (default /etc/agentd/slurm-sync.toml).

slurm-sync runs on a host where ``scontrol`` works (a Slurm controller or login node), not on
the GPU nodes, so it has a file of its own rather than a table of the node's agentd.toml. Two
tables are the node's own models, so a site copies them over unchanged: ``[mqtt]`` (the
broker, credentials, TLS: ``agentd.config.MqttConfig``) and ``[jobs]`` (the job -> class rules:
``collectors.jobs.JobsConfig``; slurm-sync reads ``default_class``, ``classes`` and the squeue
settings of ``jobs.slurm``, the rest is the node's business).

Every error names the file and the key and says what is expected, like agentd.toml's.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentd.config import MqttConfig
from agentd.site import topics
from collectors.durations import parse_duration_s
from collectors.jobs import JobsConfig

DEFAULT_PATH = Path("/etc/agentd/slurm-sync.toml")
MAX_REASON_CHARS = 200  # the throttle contract's bound on a Slurm reason; ours is the same
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a Slurm NodeName (no host lists)


class SyncConfigError(ValueError):
    """Invalid settings; ``errors`` holds one ``file: key: message`` line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _duration(v: Any, *, positive: bool = True) -> Any:
    seconds = parse_duration_s(v)  # ValueError with the expected forms
    if positive and seconds <= 0:
        raise ValueError("must be more than 0 seconds, for example '5s'")
    return v


def _http_url(v: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("must be an http:// or https:// URL, for example http://gpu-node-01:9410")
    return v.rstrip("/")


class PolledNode(_Section):
    """One node whose API slurm-sync polls (``GET {url}/v1/throttle``)."""

    name: str = Field(description="the node's agentd name (its `node`, the short hostname by default)")
    url: str = Field(description="the node's API base URL, e.g. http://gpu-node-01:9410")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return topics.check_level(v, "node name")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)


class SourceConfig(_Section):
    """Where the nodes' throttle bodies come from."""

    kind: Literal["mqtt", "poll"] = Field(
        "mqtt", description="mqtt: subscribe to agentd/v1/{site}/nodes/+/throttle on the [mqtt] broker "
                            "(retained: every node's latest body at once); poll: GET /v1/throttle of each of nodes")
    site: str = Field("default", description="mqtt: the site whose nodes are followed")
    nodes: list[PolledNode] = Field(default_factory=list,
                                    description="poll: the nodes, [{name = \"gpu-node-01\", url = "
                                                "\"http://gpu-node-01:9410\"}, ...]")
    poll_interval: str | float = Field("5s", description="poll: time between two polls of one node")
    timeout: str | float = Field("3s", description="poll: one GET /v1/throttle is given up after this long")
    max_in_flight: int = Field(32, ge=1, le=1024, description="poll: requests at once (a large site is polled "
                                                              "in waves of this many)")

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        return topics.check_level(v, "site")

    @field_validator("poll_interval", "timeout")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return _duration(v)

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        if self.kind == "poll" and not self.nodes:
            raise ValueError("kind = \"poll\" needs nodes = [{name = ..., url = ...}, ...] (the node APIs to poll)")
        if self.kind == "mqtt" and self.nodes:
            raise ValueError("nodes is for kind = \"poll\"; with kind = \"mqtt\" every node of the site is "
                             "followed (map names with node_names)")
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"nodes lists {', '.join(dup)} more than once")
        return self

    @property
    def poll_interval_s(self) -> float:
        return parse_duration_s(self.poll_interval)

    @property
    def timeout_s(self) -> float:
        return parse_duration_s(self.timeout)


class SlurmCommands(_Section):
    """How Slurm is asked and told: its command-line clients (they read SLURM_CONF / slurm.conf)."""

    sinfo: str = Field("sinfo", description="sinfo (reads every node's state, reason and Extra: sinfo --json)")
    scontrol: str = Field("scontrol", description="scontrol (update NodeName=... State=DRAIN|RESUME, Extra=...)")
    timeout: str | float = Field("20s", description="a Slurm command is killed and counted as failed after this long")
    max_output_bytes: int = Field(512 * 1024 * 1024, ge=1024,
                                  description="a larger sinfo --json answer is refused (about 2 kB per node)")

    @field_validator("sinfo", "scontrol")
    @classmethod
    def _command(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name the command, for example 'scontrol' or '/usr/bin/scontrol'")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _duration(v)

    @property
    def timeout_s(self) -> float:
        return parse_duration_s(self.timeout)


class PrioritiesConfig(_Section):
    """push_priorities: each running job's class and Slurm priority, sent to the nodes it runs on."""

    api_url: str = Field("http://{node}:9410",
                         description="a node's API base URL; {node} is its agentd name. Polled nodes use their url")
    interval: str | float = Field("30s", description="squeue --json is read this often (the whole queue: keep it "
                                                     "long on a large cluster)")
    timeout: str | float = Field("5s", description="one PUT /v1/jobs/{job_id} is given up after this long")
    repush: str | float = Field("10m", description="an unchanged hint is sent again this often (a restarted node "
                                                   "has forgotten it)")
    max_in_flight: int = Field(16, ge=1, le=1024, description="PUT requests at once")

    @field_validator("interval", "timeout", "repush")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return _duration(v)

    @field_validator("api_url")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            example = v.format(node="gpu-node-01")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may hold only {node} as a placeholder, e.g. http://{node}:9410") from None
        _http_url(example)
        return v.rstrip("/")

    def url_for(self, node: str) -> str:
        return self.api_url.format(node=node)

    @property
    def interval_s(self) -> float:
        return parse_duration_s(self.interval)

    @property
    def timeout_s(self) -> float:
        return parse_duration_s(self.timeout)

    @property
    def repush_s(self) -> float:
        return parse_duration_s(self.repush)


class SlurmSyncConfig(_Section):
    """Everything ``agentd slurm-sync`` reads."""

    interval: str | float = Field("10s", description="time between two passes (read Slurm, decide, update)")
    dry_run: bool = Field(False, description="decide and log what would change, never run scontrol update "
                                             "nor PUT a job hint")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged")
    reason_prefix: str = Field("agentd:", description="the start of every drain reason slurm-sync writes: a drained "
                                                      "node whose reason starts otherwise is never touched")
    set_extra: bool = Field(False, description="also keep {\"agentd_level\": N} in the node's Extra JSON (other "
                                               "keys there are kept; Slurm 23.02+ can select on it)")
    push_priorities: bool = Field(False, description="send each running job's class and priority to its nodes "
                                                     "(PUT /v1/jobs/{job_id}; see [priorities] and [jobs])")
    max_updates_per_minute: int = Field(30, ge=1, le=100_000,
                                        description="scontrol updates at most this many a minute (drains first)")
    expiry_grace: str | float = Field("2s", description="a body counts as expired this long after its expires_at "
                                                        "(clock skew between the nodes and this host)")
    node_names: dict[str, str] = Field(default_factory=dict,
                                       description="agentd node name -> Slurm NodeName where they differ, "
                                                   "e.g. {\"gpu-node-01.dc1\" = \"gpu01\"}")
    ignore_nodes: list[str] = Field(default_factory=list,
                                    description="Slurm NodeNames slurm-sync never touches (whatever their bodies say)")
    api_token_file: Path | None = Field(None, description="bearer token for the node APIs (GET /v1/throttle when "
                                                          "reads are protected, PUT /v1/jobs); a systemd credential")
    source: SourceConfig = Field(default_factory=SourceConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    slurm: SlurmCommands = Field(default_factory=SlurmCommands)
    priorities: PrioritiesConfig = Field(default_factory=PrioritiesConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: Any) -> Any:
        _duration(v)
        if not 0.1 <= parse_duration_s(v) <= 3600:
            raise ValueError("must be between 100ms and 1h")
        return v

    @field_validator("expiry_grace")
    @classmethod
    def _grace(cls, v: Any) -> Any:
        return _duration(v, positive=False)

    @field_validator("reason_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.strip() or v != v.strip() or len(v) > 32 or not v.isprintable():
            raise ValueError("must be 1..32 printable characters without surrounding spaces, e.g. 'agentd:'")
        return v

    @field_validator("node_names")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for agentd_name, slurm_name in v.items():
            topics.check_level(agentd_name, "node_names key (an agentd node name)")
            if not _NODE_NAME.match(slurm_name):
                raise ValueError(f"{agentd_name} = {slurm_name!r}: not a Slurm NodeName (one node, letters, "
                                 "digits, '_', '.', '-'; no host list)")
        targets = list(v.values())
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise ValueError(f"several agentd nodes map to the Slurm node {', '.join(dup)}: one agentd node per "
                             "Slurm node")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSyncConfig:
        if self.source.kind == "mqtt" and not self.mqtt.host:
            raise ValueError("source.kind = \"mqtt\" needs [mqtt] host (the broker the nodes publish their "
                             "throttle bodies on), or use source.kind = \"poll\" with source.nodes")
        return self

    @property
    def interval_s(self) -> float:
        return parse_duration_s(self.interval)

    @property
    def expiry_grace_s(self) -> float:
        return parse_duration_s(self.expiry_grace)

    def slurm_name(self, node: str) -> str:
        """The Slurm NodeName of agentd node ``node`` (the same name unless node_names says otherwise)."""
        return self.node_names.get(node, node)

    def api_url(self, node: str) -> str:
        """The API base URL of agentd node ``node``: its polled url, else the priorities template."""
        for polled in self.source.nodes:
            if polled.name == node:
                return polled.url
        return self.priorities.url_for(node)

    def api_token(self) -> str | None:
        """The bearer token from ``api_token_file`` (None when unset); SyncConfigError when unreadable."""
        if self.api_token_file is None:
            return None
        try:
            token = self.api_token_file.read_text().strip()
        except OSError as exc:
            raise SyncConfigError([f"api_token_file: cannot read {self.api_token_file}: {exc.strerror}; create "
                                   "it (the token the nodes' api section expects) or remove the key"]) from None
        except UnicodeDecodeError:
            raise SyncConfigError([f"api_token_file: {self.api_token_file} is not a text file"]) from None
        if not token:
            raise SyncConfigError([f"api_token_file: {self.api_token_file} is empty"])
        return token


def _format(exc: ValidationError, source: str) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/slurm-sync.md lists every key)"
        got = err.get("input")
        got_txt = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got: {got!r})"
        lines.append(f"{source}: {key}: {msg}{got_txt}")
    return lines


def parse_sync_config(data: dict[str, Any], source: str = "slurm-sync") -> SlurmSyncConfig:
    """Validate ``data`` (a parsed TOML document); SyncConfigError lists every error."""
    try:
        return SlurmSyncConfig.model_validate(data)
    except ValidationError as exc:
        raise SyncConfigError(_format(exc, source)) from None


def load_sync_config(path: Path) -> SlurmSyncConfig:
    """Read and validate the settings file; SyncConfigError names the file and what is wrong."""
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SyncConfigError([f"{source}: no such file; write one (docs/slurm-sync.md has an example) "
                               "or name another with --config"]) from None
    except OSError as exc:
        raise SyncConfigError([f"{source}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise SyncConfigError([f"{source}: not a text file ({exc.reason}); the settings are UTF-8 TOML"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SyncConfigError([f"{source}: not valid TOML: {exc}"]) from None
    return parse_sync_config(data, source)
