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
from typing import Any, Literal
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from agentd.site.config import BudgetConfig
from collectors.jobs import JobsConfig

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
                raise ConfigError([f"influx.token_file: cannot read: {exc.strerror}; create it, or set "
                                   f"influx.token (got: {str(self.token_file)!r})"]) from exc
            except UnicodeDecodeError as exc:  # not UTF-8: not a token file
                raise ConfigError([f"influx.token_file: not a text file ({exc.reason}); put the token in it "
                                   f"(got: {str(self.token_file)!r})"]) from exc
        return None


class MqttConfig(_Section):
    """The one MQTT connection of the daemon (coolant inputs, status, later power and budgets)."""

    host: str | None = Field(None, description="broker host; absent = MQTT off (no coolant input)")
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = Field(None, description="CA bundle for the broker's certificate (default: system CAs)")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = Field("", description="defaults to agentd-<node>")
    keepalive: int = Field(30, ge=5, le=3600)
    timeout: float = Field(5.0, gt=0, le=120, description="seconds for connect / subscribe / qos>0 publish")
    queue_size: int = Field(10_000, ge=10, le=1_000_000,
                            description="incoming messages held; beyond, dropped and counted")
    reconnect_min: float = Field(0.1, gt=0, le=60)
    reconnect_max: float = Field(2.0, gt=0, le=300, description="cap of the jittered reconnect backoff")

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        if "://" in v or "/" in v or ":" in v.strip("[]"):
            raise ValueError("must be a host name or address only, for example mqtt.example.org "
                             "(set the port with mqtt.port)")
        return v.strip()

    @model_validator(mode="after")
    def _check_pairs(self) -> MqttConfig:
        if (self.ca_file or self.cert_file or self.key_file) and not self.tls:
            raise ValueError("ca_file / cert_file / key_file are set but tls = false; set mqtt.tls = true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both mqtt.cert_file and mqtt.key_file for a client certificate, or neither")
        if self.password is not None and not self.username:
            raise ValueError("mqtt.password is set without mqtt.username")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("mqtt.reconnect_min must not exceed mqtt.reconnect_max")
        return self


class SubscriptionConfig(_Section):
    """One coolant input: a topic filter, its payload format and how to map it (README: Coolant)."""

    topic: str = Field(description="MQTT topic filter, for example 'cooling/+/+/tcs'")
    format: Literal["json", "value", "influx"] = "json"
    qos: int = Field(0, ge=0, le=2)
    field_map: dict[str, str] = Field(default_factory=dict, description="sender name -> canonical field or ts")
    topic_tags: dict[Literal["site", "loop", "unit", "point"], int] = Field(
        default_factory=dict, description="tag -> topic level index (0-based; negative from the end)")
    tags: dict[Literal["site", "loop", "unit", "point"], str] = Field(default_factory=dict,
                                                                     description="fixed tag values")
    field_segment: int = Field(-1, description="value format: the topic level that names the field")
    units: dict[str, str] = Field(default_factory=dict, description="canonical field -> sender's unit")
    ignore_fields: list[str] = Field(default_factory=list, description="sender fields dropped silently")
    stale_after: str | float | None = Field(None, description="fixed staleness for every sensor of this input")

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        from collectors.coolant import check_topic_filter

        return check_topic_filter(v)

    @field_validator("field_map")
    @classmethod
    def _check_field_map(cls, v: dict[str, str]) -> dict[str, str]:
        from collectors.coolant import FIELDS, TIMESTAMP_KEY

        for name, target in v.items():
            if target not in FIELDS and target != TIMESTAMP_KEY:
                raise ValueError(f"{name} = {target!r}: not a coolant field (one of {', '.join(FIELDS)}, or ts)")
        return v

    @field_validator("units")
    @classmethod
    def _check_units(cls, v: dict[str, str]) -> dict[str, str]:
        from collectors.coolant import unit_factor

        for name, unit in v.items():
            unit_factor(name, unit)
        return v

    @field_validator("stale_after")
    @classmethod
    def _check_stale(cls, v: str | float | None) -> str | float | None:
        if v is not None and parse_duration_s(v) <= 0:
            raise ValueError("stale_after must be positive")
        return v

    @model_validator(mode="after")
    def _check_tags(self) -> SubscriptionConfig:
        levels = self.topic.split("/")
        if levels[-1] != "#":
            segments: dict[str, int] = {str(tag): i for tag, i in self.topic_tags.items()}
            segments["(field_segment)"] = self.field_segment
            for tag, index in segments.items():
                if tag == "(field_segment)" and self.format != "value":
                    continue
                if not -len(levels) <= index < len(levels):
                    raise ValueError(f"topic_tags.{tag} = {index}: topic {self.topic!r} has only "
                                     f"{len(levels)} levels (index 0..{len(levels) - 1})")
        if self.format == "value":
            for tag in ("loop", "unit"):
                if tag not in self.topic_tags and tag not in self.tags:
                    raise ValueError(f"format 'value' carries no tags in the payload: give {tag!r} in "
                                     f"topic_tags (a topic level) or tags (a fixed value)")
        return self

    def to_subscription(self):
        """The plain spec the pure parser in ``collectors.coolant`` works from."""
        from collectors.coolant import Subscription

        return Subscription(
            topic=self.topic, format=self.format, field_map=dict(self.field_map),
            topic_tags=dict(self.topic_tags), tags=dict(self.tags), field_segment=self.field_segment,
            units=dict(self.units), ignore_fields=frozenset(self.ignore_fields),
            stale_after_s=None if self.stale_after is None else parse_duration_s(self.stale_after))


class CoolantConfig(_Section):
    """Coolant inputs over MQTT and how their freshness is judged."""

    subscriptions: list[SubscriptionConfig] = Field(default_factory=list)
    stale_floor: str | float = Field("5s", description="no sensor turns stale sooner than this")
    stale_initial: str | float = Field("30s", description="stale_after before a sensor's period is known")
    max_future: str | float = Field("60s", description="refuse sender timestamps further ahead than this")
    max_age: str | float = Field("1h", description="refuse sender timestamps older than this")
    max_sensors: int = Field(10_000, ge=1, le=1_000_000, description="sensor table bound (garbage topics)")
    max_pending: int = Field(200_000, ge=100, le=10_000_000,
                             description="readings held for the next tick's store append; beyond, dropped")

    @field_validator("stale_floor", "stale_initial", "max_future", "max_age")
    @classmethod
    def _check_durations(cls, v: str | float) -> str | float:
        if parse_duration_s(v) <= 0:
            raise ValueError("must be a positive duration such as '5s'")
        return v

    def seconds(self, name: str) -> float:
        """A duration key in seconds (``seconds("stale_floor")``)."""
        return parse_duration_s(getattr(self, name))


class ApiConfig(_Section):
    listen: str = "127.0.0.1:9410"


class RulesConfig(_Section):
    enabled: bool = Field(True, description="evaluate rules and act (with dry_run: evaluate and report only)")
    builtin_packs: bool = Field(True, description="load the packs that ship in rules/packs")
    dirs: list[Path] = Field(default_factory=lambda: [Path("/etc/agentd/rules.d")],
                             description="site rule files: every *.yaml in these directories")
    params: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="site values of the packs' params (e.g. tcs_supply_max_c = 43)")
    ramp_w_per_s: float = Field(25.0, gt=0, le=10_000, description="how fast a released cap rises, per GPU")
    hold_s: float = Field(30.0, ge=0, le=3600, description="no release within this long of a cap falling")


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
    coolant: CoolantConfig = CoolantConfig()
    rules: RulesConfig = RulesConfig()
    api: ApiConfig = ApiConfig()
    budget: BudgetConfig = BudgetConfig()
    jobs: JobsConfig = JobsConfig()

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


def config_source(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Where ``load_config(path, environ)`` takes the configuration from, as its errors name it."""
    environ = os.environ if environ is None else environ
    cfg_path = Path(path) if path is not None else Path(environ.get("AGENTD_CONFIG", DEFAULT_CONFIG_PATH))
    explicit = path is not None or "AGENTD_CONFIG" in environ
    source = str(cfg_path) if cfg_path.exists() or explicit else "(built-in defaults)"
    if _env_overrides(environ):
        source += " + AGENTD_* environment"
    return source


# -- what `agentd run` checks only when it starts (for `agentd check-config`) -----------------

CREDENTIALS_ROOT = Path("/run/credentials")
CREDENTIAL_NOTE = "note: a systemd credential, checked when the unit starts"


def _unseen_credential(path: Path, environ: Mapping[str, str]) -> bool:
    """A file in systemd's credentials directory that this process cannot see.

    ``/run/credentials/<unit>/`` exists only while the unit runs, for the unit (``LoadCredential=``),
    so from a shell a missing credential says nothing about the unit. Inside the unit (where
    ``$CREDENTIALS_DIRECTORY`` names the directory) such a file must be there.
    """
    inside = environ.get("CREDENTIALS_DIRECTORY")
    if inside and path.is_relative_to(inside):
        return False
    if not path.is_relative_to(CREDENTIALS_ROOT):
        return False
    try:
        path.stat()
    except OSError:
        return True
    return False


def _state_dir_problem(state_dir: Path) -> str | None:
    """Why the store could not be created in ``state_dir`` whoever runs it (root included), or None.

    Permissions are not judged: the shipped unit runs as root, so a non-root shell would see
    false errors; a read-only file system or a file in the way stops root too.
    """
    probe = state_dir
    while not probe.exists() and probe != probe.parent:  # the daemon creates the missing levels
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == state_dir else f"cannot be created: {probe} is not a directory"
        return f"{what}; point state_dir at a directory"
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    if read_only:
        return (f"{probe} is on a read-only file system; the store needs to write there (point state_dir at "
                "a writable directory; under systemd's ProtectSystem=strict only the unit's StateDirectory "
                "and ReadWritePaths= are writable)")
    return None


def preflight(cfg: AgentConfig, source: str, environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """``(errors, notes)`` for what ``agentd run`` reads only when it starts: the InfluxDB token
    file, the MQTT TLS files, the state directory. An error here would stop ``run``; a note says
    what cannot be checked from here (a systemd credential). Both in ``file: key: message`` form.

    The checks are the ones ``run`` makes (``resolved_token``, ``agentd.mqtt.make_tls_context``),
    under the same conditions, so the two cannot disagree.
    """
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    notes: list[str] = []
    influx = cfg.influx
    if influx.url and influx.api == "v2" and influx.token is None and influx.token_file is not None:
        if _unseen_credential(influx.token_file, environ):
            notes.append(f"{source}: influx.token_file: {CREDENTIAL_NOTE} (got: {str(influx.token_file)!r})")
        else:
            try:
                influx.resolved_token()
            except ConfigError as exc:
                errors += [f"{source}: {line}" for line in exc.errors]
    mqtt = cfg.mqtt
    if mqtt.host and mqtt.tls:
        unseen: dict[str, Path | None] = {}
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(mqtt, key)
            if path is not None and _unseen_credential(path, environ):
                unseen[key] = path
                notes.append(f"{source}: mqtt.{key}: {CREDENTIAL_NOTE} (got: {str(path)!r})")
        if "cert_file" in unseen or "key_file" in unseen:  # loaded as a pair: check neither
            unseen.update(cert_file=None, key_file=None)
        from agentd.mqtt import make_tls_context

        try:
            make_tls_context(mqtt.model_copy(update=dict.fromkeys(unseen)))
        except ConfigError as exc:
            errors += [f"{source}: {line}" for line in exc.errors]
    problem = _state_dir_problem(Path(cfg.state_dir))
    if problem is not None:
        errors.append(f"{source}: state_dir: {problem} (got: {str(cfg.state_dir)!r})")
    return errors, notes


def effective_config_text(cfg: AgentConfig) -> str:
    """The effective configuration as TOML-ish text, secrets masked (for ``check-config``)."""
    out: list[str] = []

    def emit(prefix: str, model: BaseModel, array: bool = False) -> None:
        scalars, sections, arrays = [], [], []
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                sections.append((name, value))
            elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
                arrays.append((name, value))
            else:
                scalars.append((name, value))
        if prefix:
            out.append(f"\n[[{prefix}]]" if array else f"\n[{prefix}]")
        for name, value in scalars:
            out.append(f"{name} = {_toml_value(value)}")
        for name, value in sections:
            emit(f"{prefix}.{name}" if prefix else name, value)
        for name, items in arrays:
            for item in items:
                emit(f"{prefix}.{name}" if prefix else name, item, array=True)

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
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(key: Any) -> str:
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else _toml_value(text)
