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
    assert err.value.errors == ["AGENTD_INTERVAL: interval: Input should be a valid number, unable to parse "
                                "string as a number (got: 'soon')"]  # names the variable that set it


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


# -- the environment: AGENTD_* sets keys; names that are not keys are located errors ----------

def test_an_agentd_variable_that_is_no_key_names_the_variable_and_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"AGENTD_INFLUX_URL": "http://db:8086", "AGENTD_INTERVAL": "0.5"})
    (line,) = err.value.errors
    assert line.startswith("AGENTD_INFLUX_URL: names the config key influx_url, which does not exist "
                           "(did you mean AGENTD_INFLUX__URL, which sets influx.url?)"), line
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"AGENTD_INTERVAL__FAST": "1"})
    assert err.value.errors == ["AGENTD_INTERVAL__FAST: interval is a single value and has no key 'fast' "
                                "(an AGENTD_ variable sets the agentd.toml key its name spells, with __ between "
                                "levels: AGENTD_INFLUX__URL sets influx.url)"]
    with pytest.raises(ConfigError, match="coolant.subscriptions is a list of tables and is set whole"):
        load_config(None, environ={"AGENTD_COOLANT__SUBSCRIPTIONS__TOPIC": "x"})


def test_every_error_of_the_file_and_the_environment_comes_at_once(tmp_path):
    path = write(tmp_path, "interval = 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"AGENTD_NOPE": "1", "AGENTD_SIM__GPUS": "0"})
    lines = err.value.errors
    assert len(lines) == 3, lines
    assert any(ln.startswith("AGENTD_NOPE: names the config key nope") for ln in lines)
    assert f"{path}: interval: Input should be greater than or equal to 0.05 (got: 0)" in lines
    assert "AGENTD_SIM__GPUS: sim.gpus: Input should be greater than or equal to 1 (got: 0)" in lines


def test_variables_agentd_reads_for_other_purposes_are_never_keys(tmp_path):
    from agentd.config import RESERVED_ENV

    path = write(tmp_path, "interval = 0.5\n")
    env = {"AGENTD_CONFIG": str(path), "AGENTD_SIM_MQTT_PASSWORD": "s3cret", "CDU_SIM_MQTT_PASSWORD": "s3cret",
           "_AGENTD_COMPLETE": "bash_source"}
    assert load_config(None, environ=env).interval == 0.5
    assert {"AGENTD_CONFIG", "AGENTD_SIM_MQTT_PASSWORD"} <= set(RESERVED_ENV)


def test_the_agentd_variables_agentd_reads_are_all_reserved():
    """Any AGENTD_* name that agentd's own code reads (os.environ, getenv, a click envvar, an
    ``*_ENV = "AGENTD_..."`` constant) must be in RESERVED_ENV, or be a config key."""
    import re

    from agentd.config import ENV_PREFIX, RESERVED_ENV, _env_key_problem

    reads = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\(|envvar=\[?|_ENV\s*=\s*)\s*["'](AGENTD_[A-Z0-9_]+)""")
    repo = Path(__file__).resolve().parents[1]
    names = set()
    for folder in ("agentd", "collectors", "rules"):
        for src in (repo / folder).rglob("*.py"):
            names |= set(reads.findall(src.read_text()))
    assert "AGENTD_CONFIG" in names  # the pattern finds what it is meant to find
    for name in sorted(names):
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        assert name in RESERVED_ENV or (path and _env_key_problem(name, path) is None), (
            f"{name} is read by agentd and is not a config key: add it to agentd.config.RESERVED_ENV")


def test_table_valued_keys_take_sub_keys_from_the_environment():
    cfg = load_config(None, environ={"AGENTD_RULES__PARAMS__TCS_SUPPLY_MAX_C": "43"})
    assert cfg.rules.params == {"tcs_supply_max_c": 43}


# -- which file: --config, $AGENTD_CONFIG or the default, and who named a missing one ----------

def test_a_missing_file_says_who_named_it(tmp_path):
    absent = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as err:
        load_config(absent, environ={})
    assert err.value.errors[0].startswith(f"{absent}: no such file (named by --config; check the path, or omit "
                                          "--config to read /etc/agentd/agentd.toml")
    with pytest.raises(ConfigError) as err:
        load_config(absent, environ={}, named_by="PATH")
    assert "(named by PATH; check the path, or omit PATH" in err.value.errors[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"AGENTD_CONFIG": str(absent)})
    assert err.value.errors[0].startswith(f"{absent}: no such file (named by $AGENTD_CONFIG; check the path, "
                                          "or unset AGENTD_CONFIG")


def test_config_option_wins_over_agentd_config(tmp_path):
    a = write(tmp_path, "interval = 0.5\n")
    b = tmp_path / "b.toml"
    b.write_text("interval = 2.0\n")
    assert load_config(b, environ={"AGENTD_CONFIG": str(a)}).interval == 2.0
    assert load_config(None, environ={"AGENTD_CONFIG": str(a)}).interval == 0.5
    assert load_config(None, environ={"AGENTD_CONFIG": ""}).interval == 1.0  # empty = unset


def test_a_binary_file_is_refused_by_name(tmp_path):
    path = tmp_path / "agentd.toml"
    path.write_bytes(b"\xff\xfe\x00interval = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.errors[0].startswith(f"{path}: not a text file")


def test_origins_say_file_environment_or_default(tmp_path):
    from agentd.config import load_config_report

    path = write(tmp_path, "interval = 0.5\n[influx]\nurl = 'http://db:8086'\n[rules]\nparams = { a_c = 1 }\n"
                           "[[coolant.subscriptions]]\ntopic = 'cooling/#'\n")
    loaded = load_config_report(path, environ={"AGENTD_NODE": "n7", "AGENTD_INFLUX__API": "v1",
                                               "AGENTD_RULES__PARAMS__B_C": "2"})
    assert loaded.origin("interval") == "file"
    assert loaded.origin("node") == "$AGENTD_NODE"
    assert loaded.origin("influx", "url") == "file" and loaded.origin("influx", "api") == "$AGENTD_INFLUX__API"
    assert loaded.origin("influx", "org") == "default" and loaded.origin("sim", "gpus") == "default"
    assert loaded.origin("rules", "params") == "file + $AGENTD_RULES__PARAMS__B_C"
    assert loaded.origin("coolant", "subscriptions", "0", "topic") == "file"
    assert loaded.origin("coolant", "subscriptions", "0", "format") == "default"  # not in the entry
    assert loaded.source == f"{path} + AGENTD_* environment"
    assert loaded.cfg.rules.params == {"a_c": 1, "b_c": 2}
