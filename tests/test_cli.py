"""The ``agentd`` command line as an operator meets it: every command's -h, --version, shell
completion, one way to pass a config, zero/negative durations refused, the simulator's
variables kept out of the daemon's way, and check-config's output as a config of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from agentd import __version__
from agentd.cli import main
from agentd.config import AgentConfig, SubscriptionConfig, load_config
from agentd.sample_config import SYSTEMD_SET

REPO = Path(__file__).resolve().parents[1]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEADLINE_S = 30.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """As from an operator's shell with nothing of agentd's set."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for name in [n for n in os.environ if n.startswith(("AGENTD_", "CDU_SIM_"))]:
        monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, prog_name="agentd")


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command of the CLI (groups included), as (argv path, command)."""
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        out.append(((*path, name), cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, (*path, name))
    return out


def sim_config(tmp_path: Path, extra: str = "") -> Path:
    """A config `run` starts with anywhere: simulated GPUs, no site rules, state in tmp_path."""
    path = tmp_path / "agentd.toml"
    path.write_text(f"backend = 'sim'\nstate_dir = '{tmp_path / 'state'}'\ninterval = 0.2\nnode = 'n1'\n"
                    f"[rules]\ndirs = []\n{extra}")
    return path


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_", "WATCHDOG_", "CDU_SIM_"))}
    env["AGENTD_API__LISTEN"] = "127.0.0.1:0"  # a free port: another daemon on 9410 must not stop this one
    env.update(extra)
    return env


# -- help, version, completion -----------------------------------------------------------------

def test_dash_h_is_help_on_every_command():
    every = [((), main), *commands()]
    assert len(every) >= 10
    for path, _cmd in every:
        short, long = invoke(*path, "-h"), invoke(*path, "--help")
        assert short.exit_code == 0, (path, short.output)
        assert short.output == long.output and short.output.startswith("Usage: agentd"), path


def test_version():
    for flag in ("--version", "-V"):
        res = invoke(flag)
        assert res.exit_code == 0 and res.output == f"agentd, version {__version__}\n"


def test_shell_completion_script_and_answers():
    res = invoke(env={"_AGENTD_COMPLETE": "bash_source"})
    assert res.exit_code == 0 and "_agentd_completion()" in res.output and "complete -o nosort" in res.output
    res = invoke(env={"_AGENTD_COMPLETE": "bash_complete", "COMP_WORDS": "agentd check", "COMP_CWORD": "1"})
    assert res.exit_code == 0 and "plain,check-config" in res.output.split()


# -- durations and intervals ----------------------------------------------------------------------

DURATION_NAME = re.compile(r"(duration|interval|since|timeout|ttl|period|every|delay|wait)")


def test_every_duration_and_interval_option_refuses_zero_and_negative():
    checked = []
    for path, cmd in commands():
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            long = max(param.opts, key=len)
            if not DURATION_NAME.search(long):
                continue
            for bad in ("0", "-1", "0s", "-2m"):
                res = invoke(*path, f"{long}={bad}")
                assert res.exit_code == 2, (path, long, bad, res.output)
                assert f"Invalid value for '{long}'" in res.output, res.output
            checked.append((*path, long))
    assert {("demo", "--duration"), ("demo", "--interval"), ("sim", "cdu", "--interval"),
            ("sim", "cdu", "--duration")} <= set(checked)


def test_durations_take_units_and_bounds_are_named():
    res = invoke("demo", "--interval", "0.01")
    assert res.exit_code == 2 and "must be at least 0.05 s (got: 0.01)" in res.output
    for bad in ("0", "-1", "-2m", "0s"):
        res = invoke("sim", "cdu", "--broker", "127.0.0.1:1", f"--duration={bad}")
        assert res.exit_code == 2 and f"must be more than 0 seconds (got: {bad})" in res.output, res.output
    res = invoke("demo", "--duration", "soon")
    assert res.exit_code == 2 and "'soon': expected seconds or a duration such as '30s'" in res.output
    from agentd.cli import Seconds

    assert Seconds().convert("2m", None, None) == 120.0 and Seconds().convert("250ms", None, None) == 0.25


# -- the simulator ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "value", "influx"])
def test_sim_cdu_print_subscription_needs_no_broker(fmt):
    res = invoke("sim", "cdu", "--print-subscription", "--format", fmt)
    assert res.exit_code == 0, res.output
    data = tomllib.loads(res.output)
    (sub,) = data["coolant"]["subscriptions"]
    assert SubscriptionConfig.model_validate(sub).format == fmt
    AgentConfig.model_validate(data)  # pasted into agentd.toml as printed, it is valid


def test_sim_cdu_without_broker_is_a_usage_error():
    res = invoke("sim", "cdu", "--duration", "1")
    assert res.exit_code == 2 and "Missing option '--broker'" in res.output


# -- the simulator's variables never break the daemon -----------------------------------------------

def start_and_stop(path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `agentd run --config path` until its `started` log line, then SIGTERM; (exit, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    end = time.monotonic() + DEADLINE_S
    try:
        for line in proc.stdout:
            lines.append(line)
            if '"event": "started"' in line:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < end, "no `started` line in time:\n" + "".join(lines)
        rest, _ = proc.communicate(timeout=DEADLINE_S)
        return proc.returncode, "".join(lines) + (rest or "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_simulators_password_variable_breaks_no_daemon_command(tmp_path):
    path = sim_config(tmp_path)
    env = agent_env(CDU_SIM_MQTT_PASSWORD="s3cret", AGENTD_SIM_MQTT_PASSWORD="s3cret")
    for args in (["check-config", "--config", str(path)], ["restore-limits", "--config", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "agentd", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=DEADLINE_S)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert "unknown key" not in proc.stderr and "s3cret" not in proc.stdout + proc.stderr
    code, output = start_and_stop(path, env)
    assert code == 0, output
    # ... while a misspelt daemon variable is still an error that names it, for each command
    env = agent_env(AGENTD_SIM_GPUS="4")
    for args in (["check-config", "--config", str(path)], ["restore-limits", "--config", str(path)],
                 ["run", "--config", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "agentd", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=DEADLINE_S)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("AGENTD_SIM_GPUS: names the config key sim_gpus, which does not exist "
                                      "(did you mean AGENTD_SIM__GPUS, which sets sim.gpus?)"), proc.stderr


def test_sim_cdu_reads_its_password_from_its_own_variable():
    # a password without --username is refused before any connection: proof the variable was read
    res = invoke("sim", "cdu", "--broker", "127.0.0.1:1", env={"CDU_SIM_MQTT_PASSWORD": "pw"})
    assert res.exit_code == 2 and "mqtt.password is set without mqtt.username" in res.output, res.output
    assert "deprecated" not in res.output
    res = invoke("sim", "cdu", "--broker", "127.0.0.1:1", env={"AGENTD_SIM_MQTT_PASSWORD": "pw"})  # the old name
    assert res.exit_code == 2 and "mqtt.password is set without mqtt.username" in res.output, res.output
    assert "AGENTD_SIM_MQTT_PASSWORD is deprecated" in res.output and "set CDU_SIM_MQTT_PASSWORD instead" in res.output
    assert "CDU_SIM_MQTT_PASSWORD" in invoke("sim", "cdu", "-h").output


# -- one way to pass a config ----------------------------------------------------------------------

def test_config_option_on_every_command_that_reads_one(tmp_path):
    absent = tmp_path / "absent.toml"
    for args in (["run"], ["check-config"], ["restore-limits"], ["rules", "check"]):
        res = invoke(*args, "--config", str(absent))
        assert res.exit_code == 2, (args, res.output)
        assert f"{absent}: no such file (named by --config; check the path, or omit --config" in res.output, args
    res = invoke("check-config", str(absent))  # the positional PATH is kept
    assert res.exit_code == 2 and f"{absent}: no such file (named by PATH;" in res.output
    res = invoke("check-config", env={"AGENTD_CONFIG": str(absent)})
    assert res.exit_code == 2 and f"{absent}: no such file (named by $AGENTD_CONFIG;" in res.output
    good = sim_config(tmp_path)
    res = invoke("check-config", str(good), "--config", str(absent))
    assert res.exit_code == 2 and "two configs given" in res.output
    assert invoke("check-config", "--config", str(good)).exit_code == 0
    assert invoke("check-config", str(good), "--config", str(good)).exit_code == 0


# -- check-config prints a config that check-config accepts -------------------------------------------

@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a client certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "client.pem", folder / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=agentd-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def full_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    """TLS with a client certificate, v1 username/password, every section set."""
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "site.yml").write_text("rules:\n  - name: site_hot\n    scope: gpu\n    when: gpu.temp_c > 80\n"
                                        "    actions: [{type: event}]\n")
    path = tmp_path / "full.toml"
    path.write_text(f"""
interval = 0.5
backend = "sim"
state_dir = "{tmp_path / 'state'}"
node = "gpu-07"
site = "hall-a"
dry_run = true
nvml_timeout = 1.5
log_level = "debug"
[sim]
gpus = 4
seed = 7
profile = "inference"
coolant_supply_c = 28.5
[store]
max_bytes = 2097152
retention = "2d"
[influx]
url = "http://db.example:8086"
api = "v1"
bucket = "tele"
retention_policy = "autogen"
username = "writer"
password = 'pa"ss\\word'
batch_size = 1000
timeout = 5.0
gzip = false
backoff_max = 30.0
[mqtt]
host = "127.0.0.1"
port = 8883
tls = true
ca_file = "{CA_BUNDLE}"
cert_file = "{cert}"
key_file = "{key}"
username = "agentd"
password = "mq-secret"
client_id = "node-7"
keepalive = 20
timeout = 3.0
queue_size = 500
reconnect_min = 0.2
reconnect_max = 4.0
[coolant]
stale_floor = "3s"
stale_initial = "20s"
max_future = "30s"
max_age = "2h"
max_sensors = 500
max_pending = 1000
[[coolant.subscriptions]]
topic = "cooling/+/+/+"
topic_tags = {{ site = 1, unit = 2, loop = 3 }}
field_map = {{ "Supply Temp" = "supply_temp_c", "t" = "ts" }}
ignore_fields = ["serial"]
stale_after = "20s"
[[coolant.subscriptions]]
topic = "dsx/+/+/+/+"
format = "value"
qos = 1
topic_tags = {{ site = 1, unit = 2, loop = 3 }}
tags = {{ point = "inlet" }}
[rules]
builtin_packs = true
dirs = ["{rules_dir}"]
params = {{ tcs_supply_max_c = 43, tcs_flow_rated_lpm = 160 }}
ramp_w_per_s = 50.0
hold_s = 10.0
[budget]
failsafe_w = 3000.0
[jobs]
energy_interval = "10m"
""")
    return path


def without_secrets(value: Any) -> Any:
    """A model dump with every secret as None: what a masked secret becomes after the round trip."""
    from pydantic import SecretStr

    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return None if isinstance(value, SecretStr) else value


@pytest.mark.skipif(not CA_BUNDLE.exists(), reason="needs the system CA bundle")
def test_check_config_output_is_a_config_that_check_config_accepts(tmp_path, client_cert):
    path = full_config(tmp_path, *client_cert)
    env = {"AGENTD_INTERVAL": "0.25", "AGENTD_MQTT__KEEPALIVE": "15"}
    first = invoke("check-config", "--config", str(path), env=env)
    assert first.exit_code == 0, first.output
    assert 'pa"ss' not in first.output and "mq-secret" not in first.output
    assert '# password = "********"  # file; a secret, masked here: put the real value back' in first.stdout
    assert "interval = 0.25  # $AGENTD_INTERVAL" in first.stdout and "keepalive = 15  # $AGENTD_MQTT__KEEPALIVE" \
        in first.stdout and 'site = "hall-a"  # file' in first.stdout and "org = \"\"  # default" in first.stdout
    copy = tmp_path / "x.toml"
    copy.write_text(first.stdout)
    second = invoke("check-config", str(copy))
    assert second.exit_code == 0, second.output
    before = load_config(path, environ=env)
    after = load_config(copy, environ={})
    assert after.model_dump() == without_secrets(before.model_dump())
    assert after.influx.password is None and after.mqtt.password is None and after.mqtt.username == "agentd"
    strip = re.compile(r"  # .*$|^# read from.*$", re.M)  # the origins change: the file holds everything now
    changed = [(a, b) for a, b in zip(strip.sub("", first.stdout).splitlines(), strip.sub("", second.stdout).splitlines())
               if a != b]
    assert changed == [('# password = "********"', "# password is unset")] * 2  # influx's, mqtt's
    again = tmp_path / "y.toml"
    again.write_text(second.stdout)
    third = invoke("check-config", str(again))  # a fixed point
    assert third.exit_code == 0 and strip.sub("", third.stdout) == strip.sub("", second.stdout)


def test_the_default_config_round_trips_and_shows_the_derived_values(tmp_path):
    first = invoke("check-config", env={"AGENTD_CONFIG": ""})
    assert first.exit_code == 0, first.output
    host = socket.gethostname().split(".")[0]
    assert f'node = ""  # default; in use: "{host}" (the short hostname)' in first.stdout
    assert f'client_id = ""  # default; in use: "agentd-{host}" (agentd-<node>)' in first.stdout
    assert "# url is unset  # default" in first.stdout and '""  # unset' not in first.stdout
    copy = tmp_path / "x.toml"
    copy.write_text(first.stdout)
    second = invoke("check-config", str(copy))
    assert second.exit_code == 0, second.output
    assert load_config(copy, environ={}) == load_config(None, environ={"AGENTD_CONFIG": ""})


def test_check_config_names_the_config_file_for_params_and_cross_field_errors(tmp_path):
    path = sim_config(tmp_path, "params = { tcs_supply_max = 43 }\n[mqtt]\nca_file = '/x.pem'\n")
    res = invoke("check-config", "--config", str(path))
    assert res.exit_code == 2
    assert f"{path}: mqtt: Value error, ca_file / cert_file / key_file are set but tls = false" in res.output
    path = sim_config(tmp_path, "params = { tcs_supply_max = 43 }\n")
    res = invoke("check-config", "--config", str(path))
    assert res.exit_code == 2
    assert f"{path}: rules.params.tcs_supply_max: no loaded rule pack declares this parameter" in res.output


# -- agentd config: the sample ----------------------------------------------------------------------

def test_agentd_config_prints_a_sample_that_check_config_accepts(tmp_path):
    res = invoke("config")
    assert res.exit_code == 0 and res.output.startswith("## agentd.toml")
    assert "## seconds between ticks; >= 0.05, <= 3600\n# interval = 1.0\n" in res.output
    sample = tmp_path / "sample.toml"
    sample.write_text(res.output)
    checked = invoke("check-config", "--config", str(sample))
    assert checked.exit_code == 0, checked.output
    assert load_config(sample, environ={}) == AgentConfig()  # every line as printed: the defaults
    assert set(SYSTEMD_SET) == {"dry_run"}


# -- the README documents what the CLI has ------------------------------------------------------------

def test_readme_lists_every_command_and_the_exit_codes():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Commands"):]
    table = table[: table.index("\n## ", 4)]
    for path, cmd in commands():
        if isinstance(cmd, click.Group):
            continue
        assert f"`agentd {' '.join(path)}" in table, f"README's command table lacks `agentd {' '.join(path)}`"
    assert "### Exit codes" in table and "_AGENTD_COMPLETE=bash_source agentd" in table and "agentd --version" in table
    assert "docs/DESIGN.md" in readme and "../shared" not in readme

