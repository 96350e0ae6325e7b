"""Config: defaults with no file, located errors for bad files, env overrides, check-config."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from agentd.cli import main
from agentd.config import ConfigError, load_config, parse_duration_s


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_file(tmp_path):
    cfg = load_config(None, environ={})
    assert cfg.interval == 1.0 and cfg.backend == "nvml" and cfg.influx.url is None
    assert cfg.store.max_bytes == 1_073_741_824 and cfg.store.retention_s == 7 * 86400
    assert cfg.node_name  # short hostname


def test_named_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml", environ={})
    assert "nope.toml: no such file" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("interval = 0.0\n", "interval: Input should be greater than or equal to 0.05 (got: 0.0)"),
    ("interval = 'fast'\n", "interval: Input should be a valid number"),
    ("backend = 'cuda'\n", "backend: Input should be 'nvml' or 'sim' (got: 'cuda')"),
    ("[influx]\nurl = 'influxdb:8086'\n", "influx.url: Value error, must be an http:// or https:// URL"),
    ("[influx]\napi = 'v3'\n", "influx.api: Input should be 'v1' or 'v2'"),
    ("[store]\nretention = '7 days'\n", "store.retention: Value error, expected a duration"),
    ("[sim]\ngpus = 0\n", "sim.gpus: Input should be greater than or equal to 1 (got: 0)"),
    ("intervall = 1\n", "intervall: unknown key"),
    ("[influx]\nurll = 'x'\n", "influx.urll: unknown key"),
])
def test_invalid_values_are_refused_with_the_key_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert any(line.startswith(f"{path}: ") and expected in line for line in err.value.errors), err.value.errors


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, "interval = -1\nbackend = 'x'\n[sim]\ngpus = 100\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert len(err.value.errors) == 3


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "interval = 1\n[influx\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value) and "line 2" in str(err.value)


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "interval = 1.0\nnode = 'a'\n[influx]\nurl = 'http://x:8086'\n")
    cfg = load_config(path, environ={"AGENTD_INTERVAL": "0.1", "AGENTD_NODE": "gpu-07",
                                     "AGENTD_INFLUX__API": "v1", "AGENTD_DRY_RUN": "true"})
    assert cfg.interval == 0.1 and cfg.node == "gpu-07" and cfg.influx.api == "v1" and cfg.dry_run is True
    assert cfg.influx.url == "http://x:8086"


def test_bad_environment_value_is_located(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"AGENTD_INTERVAL": "soon"})
    assert "AGENTD_* environment: interval:" in str(err.value)


def test_token_file_is_read_and_a_missing_one_is_explained(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = load_config(write(tmp_path, f"[influx]\nurl = 'http://db:8086'\ntoken_file = '{token}'\n"), environ={})
    assert cfg.influx.resolved_token() == "s3cret"
    cfg = load_config(write(tmp_path, f"[influx]\ntoken_file = '{tmp_path}/absent'\n"), environ={})
    with pytest.raises(ConfigError, match="influx.token_file: cannot read"):
        cfg.influx.resolved_token()


def test_durations():
    assert parse_duration_s("7d") == 604800 and parse_duration_s("250ms") == 0.25 and parse_duration_s(5) == 5
    for bad in ("", "7 days", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration_s(bad)


def test_check_config_cli(tmp_path):
    runner = CliRunner()
    good = write(tmp_path, "interval = 0.5\n[influx]\nurl = 'http://db:8086'\ntoken = 'top-secret'\n")
    result = runner.invoke(main, ["check-config", str(good)], env={})
    assert result.exit_code == 0, result.output
    assert "interval = 0.5" in result.output and "top-secret" not in result.output and "********" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("interval = 0\n[store]\nmax_bytes = 'big'\n")
    result = runner.invoke(main, ["check-config", str(bad)], env={})
    assert result.exit_code == 2
    assert f"{bad}: interval:" in result.output and f"{bad}: store.max_bytes:" in result.output


def test_check_config_also_checks_the_rules_and_their_params(tmp_path):
    bad = write(tmp_path, "[rules]\nparams = { tcs_supply_max = 43 }\n")
    result = CliRunner().invoke(main, ["check-config", str(bad)], env={})
    assert result.exit_code == 2 and "params.tcs_supply_max" in result.output
    good = write(tmp_path, "[rules]\nparams = { tcs_supply_max_c = 43 }\n")
    assert CliRunner().invoke(main, ["check-config", str(good)], env={}).exit_code == 0


def test_the_shipped_example_config_is_valid(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "systemd" / "agentd.toml"
    result = CliRunner().invoke(main, ["check-config", str(example)], env={})
    assert result.exit_code == 0, result.output
