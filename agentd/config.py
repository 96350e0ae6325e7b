"""Configuration: one pydantic model tree for ``agentd.toml``.

Every key has a default, so the daemon runs with no file at all. Environment variables with the
``AGENTD_`` prefix override the file; ``__`` separates nesting levels
(``AGENTD_INFLUX__URL=http://db:8086``, ``AGENTD_INTERVAL=0.1``). Values from the environment are
parsed as TOML values when they can be (numbers, booleans, quoted strings, arrays), else taken as
plain strings, so ``AGENTD_DRY_RUN=true`` is a boolean and ``AGENTD_NODE=gpu-01`` a string.

Errors are reported as ``source: key.path: message (got: value)`` so an operator can find the
line; the source is the file, or the ``AGENTD_*`` variable that set the key.

Field descriptions are the documentation: ``agentd config`` (agentd/sample_config.py) prints
them as the commented sample config, and ``systemd/agentd.toml`` is tested against this model.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from collectors.durations import parse_duration_s  # noqa: F401  (agentd.config.parse_duration_s is public)
from agentd.api.config import ApiConfig
from agentd.site.config import BudgetConfig
from agentd.site.controller_config import ControllerConfig
from collectors.jobs import JobsConfig

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
DEFAULT_RULES_DIR = Path("/etc/agentd/rules.d")
ENV_PREFIX = "AGENTD_"
CONFIG_ENV = "AGENTD_CONFIG"
# AGENTD_ variables that agentd reads for something other than overriding a config key: never
# taken as keys. Add a name here before any part of agentd reads another AGENTD_ variable.
RESERVED_ENV: dict[str, str] = {
    CONFIG_ENV: "the path of agentd.toml",
    "AGENTD_SIM_MQTT_PASSWORD": "the old name of `agentd sim cdu`'s broker password (now CDU_SIM_MQTT_PASSWORD)",
}
# Keys a later version serves: a value set for one is refused with this reason, not "unknown key".
NOT_AVAILABLE: dict[str, str] = {}


class _Section(BaseModel):
    # Unknown keys are errors: a typo in agentd.toml must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SimConfig(_Section):
    """Simulated GPUs (only with backend = "sim"): no driver, no hardware."""

    gpus: int = Field(8, ge=1, le=64, description="number of simulated GPUs")
    seed: int = Field(1, description="random seed: the same seed gives the same readings")
    profile: Literal["idle", "training", "inference"] = Field("training", description="workload the GPUs follow")
    coolant_supply_c: float = Field(30.0, ge=0, le=80, description="TCS supply temperature fed to the thermal model")


class StoreConfig(_Section):
    """The SQLite store in state_dir: the outage buffer, and the database when no InfluxDB is set."""

    max_bytes: int = Field(1_073_741_824, ge=1_048_576,
                           description="size cap of the SQLite store, WAL included; beyond it the oldest points "
                                       "are dropped (counted, logged)")
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
    """Where readings are shipped; with no url they stay in the local store."""

    url: str | None = Field(None, description="InfluxDB base URL; absent = local store only",
                            examples=["http://influxdb:8086"])
    api: Literal["v1", "v2"] = Field("v2", description="v2: /api/v2/write (InfluxDB 2.x, 3.x, 1.8+, "
                                                       "VictoriaMetrics); v1: /write (older 1.x)")
    org: str = Field("", description="v2 organisation")
    bucket: str = Field("telemetry", description="v2 bucket; with api = v1 the database")
    retention_policy: str = Field("", description="v1 only: the retention policy (empty = the database's default)")
    token: SecretStr | None = Field(None, description="v2 token inline (masked by check-config); prefer token_file",
                                    examples=["my-token"])
    token_file: Path | None = Field(None, description="file holding the v2 token (a systemd credential)",
                                    examples=["/run/credentials/agentd.service/influx-token"])
    username: str = Field("", description="v1 basic auth user")
    password: SecretStr | None = Field(None, description="v1 basic auth password (masked by check-config)",
                                       examples=["my-password"])
    batch_size: int = Field(5000, ge=1, le=100_000, description="points per write")
    timeout: float = Field(10.0, gt=0, le=300, description="seconds per write")
    gzip: bool = Field(True, description="gzip request bodies")
    backoff_max: float = Field(60.0, gt=0, le=3600, description="cap of the retry backoff, seconds")

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

    host: str | None = Field(None, description="broker host name or address; absent = MQTT off (no coolant input, "
                                               "no status)", examples=["mqtt.example.org"])
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    tls: bool = Field(False, description="connect with TLS (system CAs unless ca_file)")
    ca_file: Path | None = Field(None, description="CA bundle for the broker's certificate (default: system CAs)",
                                 examples=["/etc/agentd/mqtt-ca.pem"])
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS; with key_file)",
                                   examples=["/etc/agentd/mqtt-client.pem"])
    key_file: Path | None = Field(None, description="the client certificate's private key",
                                  examples=["/etc/agentd/mqtt-client.key"])
    username: str | None = Field(None, description="broker user", examples=["agentd"])
    password: SecretStr | None = Field(None, description="broker password (needs username; masked by check-config)",
                                       examples=["my-password"])
    client_id: str = Field("", description="MQTT client id, unique per broker; empty = agentd-<node>")
    keepalive: int = Field(30, ge=5, le=3600, description="seconds between keepalive pings")
    timeout: float = Field(5.0, gt=0, le=120, description="seconds for connect / subscribe / qos>0 publish")
    queue_size: int = Field(10_000, ge=10, le=1_000_000,
                            description="incoming messages held; beyond, dropped and counted")
    reconnect_min: float = Field(0.1, gt=0, le=60, description="first reconnect delay, seconds (doubles each try)")
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

    topic: str = Field(description="MQTT topic filter, for example 'cooling/+/+/tcs'", examples=["cooling/+/+/+"])
    format: Literal["json", "value", "influx"] = Field(
        "json", description="payload format: json (flat object), value (DSX style, the field from the topic), "
                            "influx (line protocol)")
    qos: int = Field(0, ge=0, le=2, description="MQTT subscription QoS")
    field_map: dict[str, str] = Field(default_factory=dict, description="sender name -> canonical field or ts")
    topic_tags: dict[Literal["site", "loop", "unit", "point"], int] = Field(
        default_factory=dict, description="tag -> topic level index (0-based; negative from the end)")
    tags: dict[Literal["site", "loop", "unit", "point"], str] = Field(default_factory=dict,
                                                                     description="fixed tag values")
    field_segment: int = Field(-1, description="value format: the topic level that names the field")
    units: dict[str, str] = Field(default_factory=dict, description="canonical field -> sender's unit")
    ignore_fields: list[str] = Field(default_factory=list, description="sender fields dropped silently")
    stale_after: str | float | None = Field(None, description="fixed staleness for every sensor of this input",
                                            examples=["30s"])

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

    subscriptions: list[SubscriptionConfig] = Field(
        default_factory=list, description="coolant inputs, one [[coolant.subscriptions]] per topic filter; without "
                                          "any, the coolant-scope rules are left out")
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


class RulesConfig(_Section):
    """Thermal and coolant rules that cap GPU power (README: Rules)."""

    enabled: bool = Field(True, description="evaluate rules and act (with dry_run: evaluate and report only)")
    builtin_packs: bool = Field(True, description="load the packs that ship in rules/packs")
    dirs: list[Path] = Field(default_factory=lambda: [DEFAULT_RULES_DIR],
                             description="site rule files: every *.yaml and *.yml in these directories (or a "
                                         "file named here); a directory named here that is absent is an error "
                                         "of check-config, except the default, which may not exist yet")
    params: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="site values of the packs' params, e.g. "
                                          "{ tcs_supply_max_c = 43, tcs_flow_rated_lpm = 160 } "
                                          "(check with: agentd rules check --config FILE)")
    ramp_w_per_s: float = Field(25.0, gt=0, le=10_000, description="how fast a released cap rises, per GPU")
    hold_s: float = Field(30.0, ge=0, le=3600, description="no release within this long of a cap falling")


class AgentConfig(_Section):
    interval: float = Field(1.0, ge=0.05, le=3600, description="seconds between ticks")
    backend: Literal["nvml", "sim"] = Field("nvml", description="nvml: the driver; sim: simulated GPUs (no driver)")
    state_dir: Path = Field(Path("/var/lib/agentd"),
                            description="the SQLite store and original_limits.json (baselines while capped)")
    node: str = Field("", description="the host tag and MQTT node name; empty = the short hostname")
    site: str = Field("default", description="site name (MQTT topics, coolant tags)")
    dry_run: bool = Field(False, description="observe only: evaluate and report, never touch a GPU")
    nvml_timeout: float = Field(2.0, gt=0, le=60, description="seconds before an NVML read counts as hung")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged")
    sim: SimConfig = SimConfig()
    store: StoreConfig = StoreConfig()
    influx: InfluxConfig = InfluxConfig()
    mqtt: MqttConfig = MqttConfig()
    coolant: CoolantConfig = CoolantConfig()
    rules: RulesConfig = RulesConfig()
    budget: BudgetConfig = BudgetConfig()
    controller: ControllerConfig = ControllerConfig()
    jobs: JobsConfig = JobsConfig()
    api: ApiConfig = ApiConfig()

    @property
    def node_name(self) -> str:
        """The node's name in use: ``node``, or the short hostname when it is empty."""
        return self.node or socket.gethostname().split(".")[0]

    @property
    def mqtt_client_id(self) -> str:
        """The MQTT client id in use: ``mqtt.client_id``, or ``agentd-<node>`` when it is empty."""
        return self.mqtt.client_id or f"agentd-{self.node_name}"


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``key.path: message (got: value)`` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- the model's shape (the environment parser, the sample config and its tests walk it) -------


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``X`` or ``X | None``), or None for any other field."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return section_model(args[0])
    return None


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The item model of an array-of-tables field (``list[X]``), or None."""
    if get_origin(annotation) is list:
        args = get_args(annotation)
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0]
    return None


def toml_fields(model: type[BaseModel]) -> dict[str, tuple[str, Any]]:
    """The model's fields by the name a TOML file spells them (the alias when there is one, as
    jobs.classes' ``class``): key -> (attribute name, FieldInfo)."""
    return {(info.alias or name): (name, info) for name, info in model.model_fields.items()}


def is_table_value(annotation: Any) -> bool:
    """A key whose value is itself a table of free names (``rules.params``, ``field_map``)."""
    if get_origin(annotation) in (Union, UnionType):
        return any(is_table_value(a) for a in get_args(annotation))
    return get_origin(annotation) is dict or annotation is dict


# -- AGENTD_* environment overrides --------------------------------------------------------


@dataclass(slots=True)
class _EnvOverrides:
    tree: dict[str, Any] = dc_field(default_factory=dict)
    origins: dict[tuple[str, ...], str] = dc_field(default_factory=dict)  # leaf key path -> variable
    errors: list[str] = dc_field(default_factory=list)


_ENV_RULE = (f"an {ENV_PREFIX} variable sets the agentd.toml key its name spells, with __ between levels: "
             f"{ENV_PREFIX}INFLUX__URL sets influx.url")


def _env_key_problem(name: str, path: list[str]) -> str | None:
    """Why the variable ``name`` (key ``path``) cannot set a config key, or None when it can."""
    model: type[BaseModel] | None = AgentConfig
    for i, part in enumerate(path):
        if model is None:  # a sub-key of a table-valued key (rules.params.NAME): any name
            return None
        _attr, info = toml_fields(model).get(part) or (part, model.model_fields.get(part))
        dotted = ".".join(path[: i + 1])
        if info is None:
            if dotted in NOT_AVAILABLE:
                return f"{name}: {dotted}: {NOT_AVAILABLE[dotted]}"
            return (f"{name}: names the config key {'.'.join(path)}, which does not exist{_env_hint(path)} "
                    f"({_ENV_RULE}); unset it, or rename it if another program reads it")
        sub = section_model(info.annotation)
        if sub is not None:
            model = sub
            continue
        if i == len(path) - 1:
            return None
        if is_table_value(info.annotation):
            model = None
            continue
        if list_item_model(info.annotation) is not None:
            return (f"{name}: {dotted} is a list of tables and is set whole from the environment, for example "
                    f"{ENV_PREFIX}{'__'.join(p.upper() for p in path[: i + 1])}='[{{ topic = \"cooling/#\" }}]'")
        return f"{name}: {dotted} is a single value and has no key {path[i + 1]!r} ({_ENV_RULE})"
    return None


def _env_hint(path: list[str]) -> str:
    """A close spelling for a one-underscore slip (AGENTD_INFLUX_URL for AGENTD_INFLUX__URL)."""
    head = path[0]
    for section, info in AgentConfig.model_fields.items():
        sub = section_model(info.annotation)
        rest = head[len(section) + 1:]
        if sub is not None and head.startswith(section + "_") and rest in sub.model_fields:
            return f" (did you mean {ENV_PREFIX}{section.upper()}__{rest.upper()}, which sets {section}.{rest}?)"
    return ""


def _env_overrides(environ: Mapping[str, str]) -> _EnvOverrides:
    """The ``AGENTD_*`` variables as a tree of overrides, where each came from, and the errors of
    the ones that name no config key (reserved names are skipped: they are not keys)."""
    out = _EnvOverrides()
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            out.errors.append(f"{name}: names no config key ({_ENV_RULE}); unset it")
            continue
        problem = _env_key_problem(name, path)
        if problem is not None:
            out.errors.append(problem)
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out.tree
        conflict = False
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                conflict = True
                break
        if conflict:
            out.errors.append(f"{name}: conflicts with another {ENV_PREFIX} variable that sets "
                              f"{'.'.join(path[:-1])} as a single value; unset one of them")
            continue
        node[path[-1]] = value
        _record_origins(out.origins, tuple(path), value, name)
    return out


def _record_origins(origins: dict[tuple[str, ...], str], path: tuple[str, ...], value: Any, name: str) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _record_origins(origins, (*path, str(key)), inner, name)
    else:
        origins[path] = name


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _in_data(data: Any, key: tuple[str, ...]) -> bool:
    """Whether the file's data sets ``key`` (or a list or value above it)."""
    for part in key:
        if isinstance(data, dict):
            if part not in data:
                return False
            data = data[part]
        elif isinstance(data, list):
            if not (part.isdigit() and int(part) < len(data)):
                return True  # the file set the whole list
            data = data[int(part)]  # an entry of an array of tables: its own keys say
        else:
            return True
    return True


def _origin(file_data: dict[str, Any], env: Mapping[tuple[str, ...], str], key: tuple[str, ...]) -> str:
    """``"file"``, ``"$AGENTD_NAME"``, ``"file + $AGENTD_NAME"`` or ``"default"`` for ``key``."""
    covering = [name for path, name in env.items() if key[: len(path)] == path]
    if covering:
        return f"${covering[-1]}"
    inside = sorted({name for path, name in env.items() if path[: len(key)] == key})
    parts = (["file"] if _in_data(file_data, key) else []) + [f"${name}" for name in inside]
    return " + ".join(parts) or "default"


# -- loading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration and where each of its values came from."""

    cfg: AgentConfig
    path: Path | None  # the file read; None when none was (built-in defaults)
    source: str  # how errors name it: the file or "(built-in defaults)", + " + AGENTD_* environment"
    file_data: dict[str, Any]
    env_origins: Mapping[tuple[str, ...], str]  # leaf key path -> the AGENTD_ variable that set it

    def origin(self, *key: str) -> str:
        """Where ``key`` came from: ``file``, ``$AGENTD_NAME``, both joined by ``+``, or ``default``."""
        return _origin(self.file_data, self.env_origins, tuple(key))

    def is_set(self, *key: str) -> bool:
        """Whether the file or the environment names ``key`` (rather than leaving its default)."""
        return self.origin(*key) != "default"


def _format_errors(exc: ValidationError, source: str, file_source: str, file_data: dict[str, Any],
                   env: Mapping[tuple[str, ...], str]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = NOT_AVAILABLE.get(key, "unknown key (check the spelling; `agentd config` prints every key)")
        got = err.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got: {got!r})"
        origin = _origin(file_data, env, loc)  # name the variable or the file that set the key
        if origin == "file":
            where = file_source
        elif origin.startswith("$") and " + " not in origin:
            where = origin[1:]
        else:
            where = source
        lines.append(f"{where}: {key}: {msg}{got_txt}")
    return lines


def _config_path(path: Path | str | None, environ: Mapping[str, str], named_by: str) -> tuple[Path, str | None]:
    """The file to read and what named it (None: the default path, which may be absent)."""
    if path is not None:
        return Path(path), named_by
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), f"${CONFIG_ENV}"
    return DEFAULT_CONFIG_PATH, None


def load_config_report(path: Path | str | None = None, environ: Mapping[str, str] | None = None, *,
                       named_by: str = "--config") -> LoadedConfig:
    """Load ``path`` (named on the command line by ``named_by``), else ``$AGENTD_CONFIG``, else
    the default path, which may be absent (built-in defaults); then the ``AGENTD_*`` overrides.

    A file that was named (option, argument or ``$AGENTD_CONFIG``) and does not exist is an error
    that says who named it: the operator meant that file. Raises ConfigError with every error.
    """
    environ = os.environ if environ is None else environ
    cfg_path, named = _config_path(path, environ, named_by)
    data: dict[str, Any] = {}
    source = file_source = str(cfg_path)
    read: Path | None = cfg_path
    if cfg_path.exists():
        hint = "fix it, or name another file with --config"
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{source}: not a text file ({exc.reason}); agentd.toml is UTF-8 TOML; {hint}"]) from exc
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror}; {hint}"]) from exc
    elif named is not None:
        undo = f"unset {CONFIG_ENV}" if named == f"${CONFIG_ENV}" else f"omit {named}"
        raise ConfigError([f"{source}: no such file (named by {named}; check the path, or {undo} to read "
                           f"{DEFAULT_CONFIG_PATH}, or run on built-in defaults when that is absent)"])
    else:
        source = "(built-in defaults)"
        read = None
    env = _env_overrides(environ)
    if env.tree or env.errors:
        source += f" + {ENV_PREFIX}* environment"
    merged = _merge(data, env.tree)
    errors = list(env.errors)
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        errors += _format_errors(exc, source, file_source, data, env.origins)
    if errors or cfg is None:
        raise ConfigError(errors)
    return LoadedConfig(cfg, read, source, data, env.origins)


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None, *,
                named_by: str = "--config") -> AgentConfig:
    """The validated configuration (see ``load_config_report``); raises ConfigError."""
    return load_config_report(path, environ, named_by=named_by).cfg


def config_source(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Where ``load_config(path, environ)`` takes the configuration from, as its errors name it."""
    environ = os.environ if environ is None else environ
    cfg_path, named = _config_path(path, environ, "--config")
    source = str(cfg_path) if cfg_path.exists() or named else "(built-in defaults)"
    env = _env_overrides(environ)
    if env.tree or env.errors:
        source += f" + {ENV_PREFIX}* environment"
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
    if cfg.budget.enabled:  # the domains file, the site key, the broker: as the node's start reads them
        from agentd.site.node import make_node_site

        key_file = cfg.budget.site_key_file
        unseen_key = key_file is not None and _unseen_credential(key_file, environ)
        if unseen_key:
            notes.append(f"{source}: budget.site_key_file: {CREDENTIAL_NOTE} (got: {str(key_file)!r})")
        try:
            make_node_site(cfg.model_copy(update={"budget": cfg.budget.model_copy(
                update={"site_key_file": None, "allow_unsigned": True})}) if unseen_key else cfg)
        except ConfigError as exc:
            errors += [f"{source}: {line}" for line in exc.errors]
    api = cfg.api
    if api.token_credential is not None and not environ.get("CREDENTIALS_DIRECTORY"):
        notes.append(f"{source}: api.token_credential: {CREDENTIAL_NOTE} (got: {api.token_credential!r})")
    elif api.token_file is not None and _unseen_credential(api.token_file, environ):
        notes.append(f"{source}: api.token_file: {CREDENTIAL_NOTE} (got: {str(api.token_file)!r})")
    elif api.has_token:
        from agentd.api.auth import load_token

        try:
            load_token(api, environ)
        except ConfigError as exc:
            errors += [f"{source}: {line}" for line in exc.errors]
    problem = _state_dir_problem(Path(cfg.state_dir))
    if problem is not None:
        errors.append(f"{source}: state_dir: {problem} (got: {str(cfg.state_dir)!r})")
    return errors, notes
