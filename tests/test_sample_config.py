"""The sample config (``agentd config``) and ``systemd/agentd.toml`` stay true to the model.

systemd/agentd.toml lists every key of the configuration model, commented or not, and every
value it shows is the default (dry_run = true is the one deliberate difference). The README's
configuration table names every key too. When a model gains a key, these fail and say how to
regenerate the file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agentd.config import AgentConfig, list_item_model, section_model, toml_fields
from agentd.sample_config import (
    SYSTEMD_SET,
    data_keys,
    model_keys,
    sample_config_text,
    systemd_example_text,
    toml_value,
    uncommented,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "agentd.toml"
REGENERATE = "regenerate: .venv/bin/python -m agentd.sample_config --systemd > systemd/agentd.toml"


def field_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """dotted key -> the model's default, for every key outside arrays of tables."""
    out: dict[str, Any] = {}
    instance = model.model_construct()
    for name, (attr, info) in toml_fields(model).items():
        dotted = f"{prefix}.{name}" if prefix else name
        sub = section_model(info.annotation)
        if sub is not None:
            out |= field_defaults(sub, dotted)
        elif list_item_model(info.annotation) is None:
            out[dotted] = getattr(instance, attr, None)
    return out


def flat(data: dict[str, Any], model: type[BaseModel] = AgentConfig, prefix: str = "") -> dict[str, Any]:
    """A parsed document as dotted key -> value (arrays of tables left out)."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        info = toml_fields(model)[name][1]
        sub = section_model(info.annotation)
        if sub is not None:
            out |= flat(value, sub, dotted)
        elif list_item_model(info.annotation) is None:
            out[dotted] = value
    return out


def validated(dotted: str, value: Any) -> Any:
    """``value`` as the model holds it (Path for a path, ...), read the way the loader reads it."""
    *sections, key = dotted.split(".")
    data: dict[str, Any] = {key: value}
    for section in reversed(sections):
        data = {section: data}
    cfg: Any = AgentConfig.model_validate(data)
    for part in dotted.split("."):
        cfg = getattr(cfg, toml_fields(type(cfg))[part][0])
    return cfg


def test_systemd_example_lists_every_key_of_the_model():
    text = EXAMPLE.read_text()
    found = data_keys(tomllib.loads(uncommented(text)))
    keys = model_keys()
    assert not keys - found, f"systemd/agentd.toml lacks {sorted(keys - found)}; {REGENERATE}"
    assert not found - keys, f"systemd/agentd.toml has keys the model lacks: {sorted(found - keys)}; {REGENERATE}"
    assert {"interval", "influx.url", "mqtt.password", "coolant.subscriptions.topic", "rules.params",
            "budget.enabled", "jobs.default_class"} <= found


def test_systemd_example_values_are_true():
    """Active lines are the defaults but dry_run; commented lines show the default whenever the key
    has one (a key without a default shows an example and is never active)."""
    text = EXAMPLE.read_text()
    active = flat(tomllib.loads(text))
    assert active == {k: v for k, v in SYSTEMD_SET.items()}, REGENERATE
    defaults = field_defaults(AgentConfig)
    shown = flat(tomllib.loads(uncommented(text)))
    for key, value in shown.items():
        default = defaults[key]
        if key in SYSTEMD_SET or default is None:
            continue
        assert validated(key, value) == default, f"systemd/agentd.toml shows {key} = {value!r}, the default is " \
                                                 f"{default!r}; {REGENERATE}"
    cfg = AgentConfig.model_validate(tomllib.loads(text))
    assert cfg.dry_run is True and cfg.model_copy(update={"dry_run": False}) == AgentConfig()


def test_systemd_example_is_the_generated_text():
    assert EXAMPLE.read_text() == systemd_example_text(), REGENERATE


def test_the_sample_lists_every_key_and_is_the_default_config():
    text = sample_config_text()
    assert data_keys(tomllib.loads(uncommented(text))) == model_keys()
    assert AgentConfig.model_validate(tomllib.loads(text)) == AgentConfig()
    for line in text.splitlines():
        assert line == "" or line.startswith(("## ", "# ", "[")), line  # prose, a default, or a section
        assert len(line) <= 120 or "=" in line, line


def test_every_key_has_a_description():
    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, (_attr, info) in toml_fields(model).items():
            dotted = f"{prefix}.{name}" if prefix else name
            sub = section_model(info.annotation) or list_item_model(info.annotation)
            if sub is not None:
                walk(sub, dotted)
            elif not info.description:
                missing.append(dotted)

    walk(AgentConfig, "")
    assert not missing, f"give these fields a description= (the sample config prints it): {missing}"


def test_set_values_become_active_lines_and_a_wrong_key_is_refused():
    text = sample_config_text({"interval": 0.5, "mqtt.host": "broker"}, header=())
    data = tomllib.loads(text)
    assert data["interval"] == 0.5 and data["mqtt"] == {"host": "broker"}
    with pytest.raises(KeyError, match="intervall"):
        sample_config_text({"intervall": 1})


@pytest.mark.parametrize("value", ['a"b\\c', "tab\there", "line\nbreak", "del\x7f", "ünïcode", ""])
def test_strings_round_trip_through_toml(value):
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    table = {"plain": 1, "with space": 2.5, "dot.ted": True, "q\"uote": [1, 2]}
    assert tomllib.loads(f"v = {toml_value(table)}")["v"] == table


def test_readme_configuration_table_names_every_key():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    section = section[: section.index("\n## ", 4)]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", section))
    missing = sorted(k for k in model_keys() if k not in named)
    assert not missing, f"README's configuration table lacks {missing}"
