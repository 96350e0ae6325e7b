"""agentd.toml as text: the commented sample (``agentd config``, ``systemd/agentd.toml``) and the
effective configuration that ``agentd check-config`` prints.

Both are generated from the model in agentd/config.py (field descriptions, defaults, bounds,
choices, examples), so neither can drift from what the loader accepts, and both are configs the
loader accepts: ``agentd config > x.toml && agentd check-config x.toml`` passes, and so does
``agentd check-config > x.toml && agentd check-config x.toml``.

The sample follows Telegraf's convention: ``## `` lines explain, ``# key = value`` lines are
settings left at their default (uncomment one to change it). Uncommenting every ``# `` line
gives a TOML document with every key, which is how the tests compare a sample with the model.
"""

from __future__ import annotations

import enum
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from agentd.config import (
    ENV_PREFIX,
    AgentConfig,
    LoadedConfig,
    list_item_model,
    section_model,
    toml_fields,
)

WIDTH = 96

SAMPLE_HEADER = (
    "agentd.toml: every key, its default and what it does (printed by `agentd config`).",
    "Lines '# key = value' hold the default: uncomment one to change it. Every key has a default, so an "
    "empty file (or none) is a valid configuration.",
    "Check a file with: agentd check-config --config FILE",
    f"Any key can be set from the environment instead: {ENV_PREFIX}INTERVAL=0.5, {ENV_PREFIX}INFLUX__URL=... "
    "(__ between levels).",
)

SYSTEMD_HEADER = (
    "/etc/agentd/agentd.toml: the example that ships with the unit (systemd/agentd.toml).",
    "Every key is listed with its default ('# key = value': uncomment to change). One differs: dry_run = true, "
    "so a new node starts observing only; set it to false (and restart) to let agentd cap GPUs.",
    "Validate with: agentd check-config --config /etc/agentd/agentd.toml",
    "`systemctl reload agentd` (SIGHUP) re-reads this file and the rule files; {restart_only} need a restart.",
    f"Any key can be overridden from the environment: {ENV_PREFIX}INTERVAL=0.5, {ENV_PREFIX}INFLUX__URL=...",
    "Regenerate it: python -m agentd.sample_config --systemd > systemd/agentd.toml",
)
SYSTEMD_SET: Mapping[str, Any] = {"dry_run": True}

_REQUIRED = object()

# Values the daemon derives when the key is left empty: shown next to the key by check-config.
DERIVED: Mapping[tuple[str, ...], tuple[Callable[[AgentConfig], str], str]] = {
    ("node",): (lambda cfg: cfg.node_name, "the short hostname"),
    ("mqtt", "client_id"): (lambda cfg: cfg.mqtt_client_id, "agentd-<node>"),
}


# -- TOML values ----------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables for dicts). Secrets are masked, never written."""
    if isinstance(value, SecretStr):
        return toml_string("********")
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [(k, v) for k, v in value.items() if v is not None]
        if not items:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in items) + " }"
    if isinstance(value, BaseModel):
        return toml_value(value.model_dump(exclude_none=True))
    if isinstance(value, PurePath):
        return toml_string(str(value))
    return toml_string(str(value))


def toml_key(key: Any) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    text = str(key)
    bare = text and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in text)
    return text if bare else toml_string(text)


def table_text(header: str, values: Mapping[str, Any]) -> str:
    """One ``[header]`` (or ``[[header]]`` when it is given so) table of ``values``."""
    lines = [header] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


# -- the model's fields -----------------------------------------------------------------------


def _default(info: FieldInfo) -> Any:
    if info.is_required():
        return _REQUIRED
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]  # no factory here takes the data
    return info.default


def _kind(info: FieldInfo) -> str:
    """``section``, ``array`` (of tables) or ``leaf``."""
    if section_model(info.annotation) is not None:
        return "section"
    if list_item_model(info.annotation) is not None:
        return "array"
    return "leaf"


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def _choices(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return []


def describe(info: FieldInfo, default: Any) -> str:
    """What the sample says above a key: its description, choices, bounds, and when it has no
    default value, that it is unset by default (the line below then shows an example)."""
    text = (info.description or "").rstrip(".")
    extra = []
    choices = _choices(info.annotation)
    if choices:
        extra.append("one of " + ", ".join(toml_value(c) for c in choices))
    bounds = _bounds(info)
    if bounds:
        extra.append(bounds)
    if default is None:
        extra.append("unset by default; the line below is an example")
    elif default is _REQUIRED:
        extra.append("required; the line below is an example")
    return "; ".join([text, *extra] if text else extra)


def _example(info: FieldInfo, name: str) -> Any:
    """A value to show for a key without a default: the field's first example, else a value of
    its type within its bounds."""
    if info.examples:
        return info.examples[0]
    annotation = info.annotation
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return f"/path/to/{name}"
    if kind is bool:
        return False
    if kind in (int, float):
        for meta in info.metadata:
            for attr, step in (("ge", 0), ("gt", 1)):
                if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                    return kind(getattr(meta, attr) + step)
        return kind(0)
    choices = _choices(kind)
    if choices:
        return choices[0]
    return ""


def _section_doc(model: type[BaseModel], info: FieldInfo | None) -> str:
    if info is not None and info.description and _kind(info) != "leaf":
        return info.description
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


def _prose(text: str) -> list[str]:
    lines = textwrap.wrap(text, WIDTH - 3, break_on_hyphens=False, break_long_words=False)
    return [f"## {line}" for line in lines]


def _split(model: type[BaseModel]) -> tuple[list[tuple[str, FieldInfo]], ...]:
    leaves: list[tuple[str, FieldInfo]] = []
    sections: list[tuple[str, FieldInfo]] = []
    arrays: list[tuple[str, FieldInfo]] = []
    for name, (_attr, info) in toml_fields(model).items():
        kind = _kind(info)
        (sections if kind == "section" else arrays if kind == "array" else leaves).append((name, info))
    return leaves, sections, arrays


# -- the sample -------------------------------------------------------------------------------


def sample_config_text(set_values: Mapping[str, Any] | None = None,
                       header: Iterable[str] = SAMPLE_HEADER) -> str:
    """The commented sample: every key of the model with its description and default.

    ``set_values`` (dotted key -> value) are written as active settings; every other key is a
    commented ``# key = default`` line, so the text as it stands is the default configuration
    plus ``set_values``.
    """
    values = dict(set_values or {})
    out: list[str] = []
    for line in header:
        out += _prose(line)
    if out:
        out.append("")
    _sample(out, AgentConfig, "", None, values, commented=False, array=False)
    unknown = sorted(values)
    if unknown:
        raise KeyError(f"set_values names keys the model does not have: {', '.join(unknown)}")
    return "\n".join(out).strip("\n") + "\n"


def _sample(out: list[str], model: type[BaseModel], prefix: str, info: FieldInfo | None,
            values: dict[str, Any], *, commented: bool, array: bool) -> None:
    leaves, sections, arrays = _split(model)
    if prefix:
        out.append("")
        out += _prose(_section_doc(model, info))
        out.append(f"# [[{prefix}]]" if array else f"{'# ' if commented else ''}[{prefix}]")
    for name, field_info in leaves:
        dotted = f"{prefix}.{name}" if prefix else name
        default = _default(field_info)
        out += _prose(describe(field_info, default))
        if dotted in values and not commented:
            out.append(f"{toml_key(name)} = {toml_value(values.pop(dotted))}")
            continue
        shown = _example(field_info, name) if default is None or default is _REQUIRED else default
        out.append(f"# {toml_key(name)} = {toml_value(shown)}")
    for name, field_info in sections:
        sub = section_model(field_info.annotation)
        assert sub is not None
        _sample(out, sub, f"{prefix}.{name}" if prefix else name, field_info, values,
                commented=commented, array=False)
    for name, field_info in arrays:
        item = list_item_model(field_info.annotation)
        assert item is not None
        _sample(out, item, f"{prefix}.{name}" if prefix else name, field_info, values, commented=True, array=True)


def systemd_example_text() -> str:
    """What ``systemd/agentd.toml`` holds: the sample with ``dry_run = true`` (a new node observes)."""
    from agentd.reload import RESTART_ONLY

    restart_only = ", ".join(RESTART_ONLY[:-1]) + f" and {RESTART_ONLY[-1]}"
    return sample_config_text(SYSTEMD_SET, [line.format(restart_only=restart_only) for line in SYSTEMD_HEADER])


def uncommented(text: str) -> str:
    """``text`` with every ``# `` setting line made active (``## `` prose dropped): every key."""
    lines = []
    for line in text.splitlines():
        if line.startswith("## "):
            continue
        lines.append(line[2:] if line.startswith("# ") else line)
    return "\n".join(lines) + "\n"


# -- the effective configuration ---------------------------------------------------------------


def effective_config_text(loaded: LoadedConfig) -> str:
    """The configuration in use, as a valid agentd.toml: each value followed by where it came
    from (``file``, ``$AGENTD_NAME`` or ``default``) and, for a key left empty, the value the
    daemon derives (node name, MQTT client id).

    Unset keys and secrets are commented out: an unset key has no TOML value, and a secret is
    masked, so writing ``"********"`` back would make the next load use the mask as the secret.
    """
    out = [
        "# agentd effective configuration (agentd check-config): itself a valid agentd.toml.",
        f"# read from: {loaded.source}",
        "# after each value, where it came from: file, $AGENTD_NAME (the environment) or default.",
    ]
    _effective(out, loaded, loaded.cfg, (), array=False)
    return "\n".join(out) + "\n"


def _effective(out: list[str], loaded: LoadedConfig, model: BaseModel, path: tuple[str, ...], *,
               array: bool) -> None:
    leaves: list[tuple[str, Any]] = []
    sections: list[tuple[str, Any]] = []
    arrays: list[tuple[str, Any]] = []
    for name, (attr, info) in toml_fields(type(model)).items():
        value = getattr(model, attr)
        kind = _kind(info)
        if kind == "array" and not value:
            kind = "leaf"
        (sections if kind == "section" else arrays if kind == "array" else leaves).append((name, value))
    if path:
        dotted = ".".join(p for p in path if not p.isdigit())
        out.append("")
        out.append(f"[[{dotted}]]" if array else f"[{dotted}]")
    for name, value in leaves:
        key = (*path, name)
        origin = loaded.origin(*key)
        if value is None:
            out.append(f"# {toml_key(name)} is unset  # {origin}")
        elif isinstance(value, SecretStr):
            out.append(f"# {toml_key(name)} = {toml_value(value)}  # {origin}; a secret, masked here: "
                       "put the real value back to use this line")
        else:
            note = origin
            derived = DERIVED.get(key)
            if derived is not None:
                in_use = derived[0](loaded.cfg)
                if in_use != value:
                    note += f"; in use: {toml_string(in_use)} ({derived[1]})"
            out.append(f"{toml_key(name)} = {toml_value(value)}  # {note}")
    for name, value in sections:
        _effective(out, loaded, value, (*path, name), array=False)
    for name, items in arrays:
        for i, item in enumerate(items):
            _effective(out, loaded, item, (*path, name, str(i)), array=True)


def model_keys(model: type[BaseModel] = AgentConfig, prefix: str = "") -> set[str]:
    """Every dotted key of the model (a table-valued key such as rules.params counts as one)."""
    keys: set[str] = set()
    for name, (_attr, info) in toml_fields(model).items():
        dotted = f"{prefix}.{name}" if prefix else name
        sub = section_model(info.annotation) or list_item_model(info.annotation)
        if sub is not None:
            keys |= model_keys(sub, dotted)
        else:
            keys.add(dotted)
    return keys


def data_keys(data: Mapping[str, Any], model: type[BaseModel] = AgentConfig, prefix: str = "") -> set[str]:
    """The dotted keys a parsed TOML document sets, read with the model's shape (a table-valued
    key's own names are not keys; a key the model lacks is listed as it is spelled)."""
    keys: set[str] = set()
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        info = toml_fields(model).get(name, (name, None))[1]
        sub = None if info is None else section_model(info.annotation)
        item = None if info is None else list_item_model(info.annotation)
        if sub is not None and isinstance(value, Mapping):
            keys |= data_keys(value, sub, dotted)
        elif item is not None and isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for entry in value:
                keys |= data_keys(entry, item, dotted)
        else:  # a value, a table-valued key (rules.params) or a key the model lacks
            keys.add(dotted)
    return keys


def main(argv: list[str] | None = None) -> int:
    """``python -m agentd.sample_config [--systemd]``: print the sample (or the unit's example)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(systemd_example_text() if "--systemd" in args else sample_config_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
