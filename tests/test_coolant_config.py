"""Config for MQTT and coolant inputs: defaults (MQTT off), located errors, check-config round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentd.cli import main
from agentd.config import ConfigError, load_config

GOOD = """
[mqtt]
host = "mqtt.example.org"
port = 8883
tls = true
username = "agentd"
password = "pw"

[coolant]
stale_floor = "3s"

[[coolant.subscriptions]]
topic = "cooling/+/+/tcs"
topic_tags = { site = 1, unit = 2 }
tags = { loop = "tcs" }
units = { flow_lpm = "gal/min", supply_temp_c = "degF" }

[[coolant.subscriptions]]
topic = "dsx/+/+/+/+"
format = "value"
topic_tags = { site = 1, unit = 2, loop = 3 }
field_map = { RackLiquidSupplyTemperature = "supply_temp_c" }
stale_after = "10s"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def test_defaults_mqtt_off_and_no_coolant_inputs():
    cfg = load_config(None, environ={})
    assert cfg.mqtt.host is None and cfg.mqtt.queue_size == 10_000 and cfg.mqtt.keepalive == 30
    assert cfg.mqtt.reconnect_max == 2.0 and cfg.coolant.subscriptions == []
    assert cfg.coolant.seconds("stale_floor") == 5.0 and cfg.coolant.seconds("max_age") == 3600.0


def test_a_full_coolant_config_loads_and_becomes_parser_specs(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.mqtt.password.get_secret_value() == "pw"
    a, b = (s.to_subscription() for s in cfg.coolant.subscriptions)
    assert a.format == "json" and a.tags == {"loop": "tcs"} and a.units["flow_lpm"] == "gal/min"
    assert b.stale_after_s == 10.0 and b.field_map == {"RackLiquidSupplyTemperature": "supply_temp_c"}


@pytest.mark.parametrize("text, expected", [
    ("[mqtt]\nhost = 'mqtt://broker:1883'\n", "mqtt.host: Value error, must be a host name"),
    ("[mqtt]\nhost = 'b'\nca_file = '/x.pem'\n", "mqtt: Value error, ca_file / cert_file / key_file are set but tls = false"),
    ("[mqtt]\nhost = 'b'\npassword = 'x'\n", "mqtt.password is set without mqtt.username"),
    ("[mqtt]\nqueue_size = 1\n", "mqtt.queue_size: Input should be greater than or equal to 10"),
    ("[[coolant.subscriptions]]\ntopic = 'a/b#'\n", "coolant.subscriptions.0.topic: Value error, '#' must be"),
    ("[[coolant.subscriptions]]\ntopic = 'a'\nformat = 'xml'\n", "coolant.subscriptions.0.format: Input should be"),
    ("[[coolant.subscriptions]]\ntopic = 'a'\nfield_map = { T = 'temperature' }\n",
     "coolant.subscriptions.0.field_map: Value error, T = 'temperature': not a coolant field"),
    ("[[coolant.subscriptions]]\ntopic = 'a'\nunits = { flow_lpm = 'bucket/h' }\n",
     "unknown unit 'bucket/h' for flow_lpm (accepted:"),
    ("[[coolant.subscriptions]]\ntopic = 'a/+'\ntopic_tags = { unit = 4 }\n",
     "topic_tags.unit = 4: topic 'a/+' has only 2 levels"),
    ("[[coolant.subscriptions]]\ntopic = 'a/+'\ntopic_tags = { rack = 1 }\n", "coolant.subscriptions.0.topic_tags.rack"),
    ("[[coolant.subscriptions]]\ntopic = 'a/+'\nformat = 'value'\ntags = { unit = 'u' }\n",
     "format 'value' carries no tags in the payload: give 'loop'"),
    ("[[coolant.subscriptions]]\ntopic = 'a'\ntopc = 'b'\n", "coolant.subscriptions.0.topc: unknown key"),
    ("[coolant]\nstale_floor = '0s'\n", "coolant.stale_floor: Value error, must be a positive duration"),
])
def test_bad_coolant_and_mqtt_config_is_refused_with_the_key_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert any(line.startswith(f"{path}: ") and expected in line for line in err.value.errors), err.value.errors


def test_mqtt_host_from_the_environment(tmp_path):
    cfg = load_config(None, environ={"AGENTD_MQTT__HOST": "broker", "AGENTD_MQTT__PORT": "1884"})
    assert cfg.mqtt.host == "broker" and cfg.mqtt.port == 1884


def test_check_config_prints_subscriptions_as_toml_and_masks_the_password(tmp_path):
    result = CliRunner().invoke(main, ["check-config", str(write(tmp_path, GOOD))], env={})
    assert result.exit_code == 0, result.output
    assert "[[coolant.subscriptions]]" in result.stdout and '"pw"' not in result.output
    text = result.stdout.replace('""  # unset', '""')
    data = tomllib.loads(text)
    assert data["coolant"]["subscriptions"][1]["field_map"] == {"RackLiquidSupplyTemperature": "supply_temp_c"}
    assert data["coolant"]["subscriptions"][0]["topic_tags"] == {"site": 1, "unit": 2}
