"""Configuration: one pydantic model tree for ``agentd.toml``.

Every key has a default, so the daemon runs with no file at all. Environment variables with the
``AGENTD_`` prefix override the file; ``__`` separates nesting levels
(``AGENTD_INFLUX__URL=http://db:8086``, ``AGENTD_INTERVAL=0.1``). Values from the environment are
parsed as TOML values when they can be (numbers, booleans, quoted strings, arrays), else taken as
plain strings, so ``AGENTD_DRY_RUN=true`` is a boolean and ``AGENTD_NODE=gpu-01`` a string.

Errors are reported as ``key.path: message (got: value)`` so an operator can find the line.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
ENV_PREFIX = "AGENTD_"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration_s(value: str | int | float) -> float:
    """Parse ``"7d"``, ``"90s"``, ``"250ms"`` or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or '7d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError("expected a duration such as '30s', '5m' or '7d'")
        seconds = float(match.group(1)) * _DURATION_UNITS_S[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class _Section(BaseModel):
    # Unknown keys are errors: a typo in agentd.toml must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SimConfig(_Section):
    gpus: int = Field(8, ge=1, le=64)
    seed: int = 1
    profile: Literal["idle", "training", "inference"] = "training"
    coolant_supply_c: float = Field(30.0, ge=0, le=80, description="TCS supply temperature fed to the thermal model")


class StoreConfig(_Section):
    max_bytes: int = Field(1_073_741_824, ge=1_048_576, description="size cap of the SQLite store")
    retention: str = Field("7d", description="how long readings are kept when no InfluxDB is configured")

    @field_validator("retention")
    @classmethod
    def _check_retention(cls, v: str) -> str:
        if parse_duration_s(v) <= 0:
            raise ValueError("retention must be positive")
        return v

    @property
    def retention_s(self) -> float:
        return parse_duration_s(self.retention)


class InfluxConfig(_Section):
    url: str | None = Field(None, description="absent = local store only")
    api: Literal["v1", "v2"] = "v2"
    org: str = ""
    bucket: str = "telemetry"  # v1: the database
    retention_policy: str = ""  # v1 only
    token: SecretStr | None = None
    token_file: Path | None = None
    username: str = ""  # v1 basic auth
    password: SecretStr | None = None
    batch_size: int = Field(5000, ge=1, le=100_000)
    timeout: float = Field(10.0, gt=0, le=300)
    gzip: bool = True
    backoff_max: float = Field(60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL, for example http://influxdb:8086")
        return v.rstrip("/")

    def resolved_token(self) -> str | None:
        """The token from ``token`` or, when set, read from ``token_file`` (systemd credentials)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError([f"influx.token_file: cannot read {self.token_file}: {exc.strerror} "
                                   "(create it, or set influx.token)"]) from exc
        return None


class MqttConfig(_Section):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)


class ApiConfig(_Section):
    listen: str = "127.0.0.1:9410"


class AgentConfig(_Section):
    interval: float = Field(1.0, ge=0.05, le=3600, description="seconds between ticks")
    backend: Literal["nvml", "sim"] = "nvml"
    state_dir: Path = Path("/var/lib/agentd")
    node: str = Field("", description="defaults to the short hostname")
    site: str = "default"
    dry_run: bool = False
    nvml_timeout: float = Field(2.0, gt=0, le=60, description="seconds before an NVML read counts as hung")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    sim: SimConfig = SimConfig()
    store: StoreConfig = StoreConfig()
    influx: InfluxConfig = InfluxConfig()
    mqtt: MqttConfig = MqttConfig()
    api: ApiConfig = ApiConfig()

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname().split(".")[0]


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``key.path: message (got: value)`` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{name}: conflicts with another AGENTD_ variable"])
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(exc: ValidationError, source: str) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the configuration reference in README.md)"
        got = err.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got: {got!r})"
        lines.append(f"{source}: {key}: {msg}{got_txt}")
    return lines


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load ``path`` (or run on defaults when it is None or, for the default path, absent).

    An explicitly named file that does not exist is an error: the operator meant that file.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or "AGENTD_CONFIG" in environ
    cfg_path = Path(path) if path is not None else Path(environ.get("AGENTD_CONFIG", DEFAULT_CONFIG_PATH))
    data: dict[str, Any] = {}
    source = str(cfg_path)
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from exc
    elif explicit:
        raise ConfigError([f"{source}: no such file (omit --config to run on defaults)"])
    else:
        source = "(built-in defaults)"
    overrides = _env_overrides(environ)
    if overrides:
        data = _merge(data, overrides)
        source += " + AGENTD_* environment"
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc


def effective_config_text(cfg: AgentConfig) -> str:
    """The effective configuration as TOML-ish text, secrets masked (for ``check-config``)."""
    out: list[str] = []

    def emit(prefix: str, model: BaseModel) -> None:
        scalars, sections = [], []
        for name in type(model).model_fields:
            value = getattr(model, name)
            (sections if isinstance(value, BaseModel) else scalars).append((name, value))
        if prefix:
            out.append(f"\n[{prefix}]")
        for name, value in scalars:
            out.append(f"{name} = {_toml_value(value)}")
        for name, value in sections:
            emit(f"{prefix}.{name}" if prefix else name, value)

    emit("", cfg)
    return "\n".join(out).lstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return '"********"'
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
