"""`agentd check-config` refuses what would stop `agentd run` at start.

A node whose config passed its check must start protecting its GPUs. The files and values that
`run` reads only when it starts (the InfluxDB token file, the MQTT TLS files, the state
directory) are checked by `check-config` too, with the same code and under the same conditions;
each broken case here is shown to stop a real `agentd run` as well, so the two cannot drift
apart. A file in systemd's credentials directory is visible only inside the unit: from a shell
it is noted, not failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentd.cli import main

REPO = Path(__file__).resolve().parents[1]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(autouse=True)
def _outside_any_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """As from an operator's shell: no systemd credentials directory, no AGENTD_* overrides."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for name in [n for n in os.environ if n.startswith("AGENTD_")]:
        monkeypatch.delenv(name)


def config(tmp_path: Path, extra: str = "", *, state_dir: Path | None = None) -> Path:
    """A config that `run` can start with (simulated GPUs, no rules, state in tmp_path) plus ``extra``."""
    path = tmp_path / "agentd.toml"
    path.write_text(f"backend = 'sim'\nstate_dir = '{state_dir or tmp_path / 'state'}'\n"
                    f"[rules]\nenabled = false\n{extra}")
    return path


def check(path: Path, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["check-config", str(path)], env=env or None)
    return result.exit_code, result.output


def run_start(path: Path) -> int:
    """Exit status of a real `agentd run` on ``path`` (each case here stops it at start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_") and k != "NOTIFY_SOCKET"}
    env["AGENTD_API__LISTEN"] = "127.0.0.1:0"  # a free port: another daemon on 9410 must not decide the case
    proc = subprocess.run([sys.executable, "-m", "agentd", "run", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode


def broken_cases(tmp_path: Path) -> dict[str, tuple[str, Path | None, str]]:
    """name -> (config sections, state_dir, what check-config must say): each stops `run` at start."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    mqtt = "[mqtt]\nhost = '127.0.0.1'\nport = 1\ntls = true\n"
    return {
        "token_file missing": (
            f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{tmp_path}/absent-token'\n", None,
            f"influx.token_file: cannot read: No such file or directory; create it, or set influx.token "
            f"(got: '{tmp_path}/absent-token')"),
        "token_file a directory": (
            f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{tmp_path}/a-dir'\n", None,
            "influx.token_file: cannot read: Is a directory"),
        "mqtt.ca_file missing": (
            f"{mqtt}ca_file = '{tmp_path}/absent-ca.pem'\n", None, f"mqtt.ca_file: cannot load {tmp_path}/absent-ca.pem"),
        "mqtt.ca_file not PEM": (f"{mqtt}ca_file = '{not_pem}'\n", None, f"mqtt.ca_file: cannot load {not_pem}"),
        "mqtt client certificate not PEM": (
            f"{mqtt}cert_file = '{not_pem}'\nkey_file = '{not_pem}'\n", None, f"mqtt.cert_file/key_file: cannot load {not_pem}"),
        "state_dir a file": (
            "", tmp_path / "a-file",
            f"state_dir: is not a directory; point state_dir at a directory (got: '{tmp_path}/a-file')"),
        "state_dir below a file": (
            "", tmp_path / "a-file" / "state", f"state_dir: cannot be created: {tmp_path}/a-file is not a directory"),
    }


def test_every_reason_run_stops_at_start_is_a_check_config_error(tmp_path: Path) -> None:
    for name, (text, state_dir, message) in broken_cases(tmp_path).items():
        case = tmp_path / name.replace(" ", "_")
        case.mkdir()
        path = config(case, text, state_dir=state_dir)
        code, output = check(path)
        assert code == 2, (name, output)
        assert f"{path}: {message}" in output, (name, output)
        assert run_start(path) != 0, f"{name}: `agentd run` starts, so check-config must not refuse it"


def test_what_run_does_not_read_is_not_an_error(tmp_path: Path) -> None:
    # v1 uses username/password: run never reads token_file; an inline token wins over the file;
    # without influx.url or mqtt.tls nothing is read at all.
    for text in [f"[influx]\nurl = 'http://127.0.0.1:1'\napi = 'v1'\ntoken_file = '{tmp_path}/absent'\n",
                 f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken = 't'\ntoken_file = '{tmp_path}/absent'\n",
                 f"[influx]\ntoken_file = '{tmp_path}/absent'\n",
                 f"[mqtt]\nca_file = '{tmp_path}/absent'\ntls = true\n",
                 ""]:
        path = config(tmp_path, text, state_dir=tmp_path / "not" / "yet" / "there")  # run creates it
        code, output = check(path)
        assert code == 0, (text, output)


def test_good_files_pass(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    text = f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{token}'\n"
    if CA_BUNDLE.exists():
        text += f"[mqtt]\nhost = '127.0.0.1'\ntls = true\nca_file = '{CA_BUNDLE}'\n"
    code, output = check(config(tmp_path, text))
    assert code == 0, output
    assert "s3cret" not in output


def test_a_systemd_credential_is_noted_from_a_shell(tmp_path: Path) -> None:
    cred = "/run/credentials/agentd.service/influx-token"
    assert not Path(cred).exists()
    path = config(tmp_path, f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{cred}'\n"
                            f"[mqtt]\nhost = '127.0.0.1'\ntls = true\nca_file = '/run/credentials/agentd.service/ca'\n"
                            f"cert_file = '/run/credentials/agentd.service/crt'\nkey_file = '{tmp_path}/key.pem'\n")
    code, output = check(path)
    assert code == 0, output
    for key, value in [("influx.token_file", cred), ("mqtt.ca_file", "/run/credentials/agentd.service/ca"),
                       ("mqtt.cert_file", "/run/credentials/agentd.service/crt")]:
        assert f"{path}: {key}: note: a systemd credential, checked when the unit starts (got: '{value}')" in output
    assert "mqtt.key_file" not in output  # loaded with cert_file as a pair: checked with it, in the unit


def test_inside_the_unit_a_missing_credential_is_an_error(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    path = config(tmp_path, f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{creds}/influx-token'\n")
    code, output = check(path, CREDENTIALS_DIRECTORY=str(creds))
    assert code == 2 and f"{path}: influx.token_file: cannot read: No such file or directory" in output, output
    (creds / "influx-token").write_text("t\n")
    assert check(path, CREDENTIALS_DIRECTORY=str(creds))[0] == 0


def test_errors_from_the_files_and_the_rules_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(f"[influx]\nurl = 'http://127.0.0.1:1'\ntoken_file = '{tmp_path}/absent'\n"
                    "[rules]\nparams = { tcs_supply_max = 43 }\n")
    code, output = check(path)
    assert code == 2 and "influx.token_file: cannot read" in output and "params.tcs_supply_max" in output, output


# -- rule files: a directory the config names must exist; the default may not -------------------

def rules_config(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(f"backend = 'sim'\nstate_dir = '{tmp_path / 'state'}'\n[rules]\n{rules}")
    return path


def test_a_named_rule_directory_that_is_missing_is_a_check_config_error(tmp_path: Path) -> None:
    present = tmp_path / "site-rules"
    present.mkdir()
    path = rules_config(tmp_path, f"dirs = ['{present}', '{tmp_path}/absent']\n")
    code, output = check(path)
    assert code == 2, output
    assert (f"{path}: rules.dirs[1]: no such file or directory; create it, or remove it from rules.dirs "
            f"(got: '{tmp_path}/absent')") in output
    assert f"{path}: rules.dirs[0]: note: holds no *.yaml or *.yml rule files" in output
    code, output = check(path, AGENTD_RULES__DIRS=f"['{present}']")  # named from the environment: the same
    assert code == 0, output
    code, output = check(path, AGENTD_RULES__DIRS=f"['{tmp_path}/absent']")
    assert code == 2 and "rules.dirs[0]: no such file or directory" in output, output


def test_the_default_rule_directory_may_be_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agentd.config

    default = tmp_path / "etc-agentd" / "rules.d"
    monkeypatch.setattr(agentd.config, "DEFAULT_RULES_DIR", default)
    for text in ("", f"dirs = ['{default}']\n"):  # left to its default, or named as the shipped example does
        path = rules_config(tmp_path, text)
        code, output = check(path)
        assert code == 0, (text, output)
        assert (f"{path}: rules.dirs[0]: note: the default rule directory does not exist; create it to add site "
                f"rules (got: '{default}')") in output


def test_yml_rule_files_are_checked_and_their_errors_named(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "site.yml").write_text("rules:\n  - name: hot\n    scope: gpu\n    when: gpu.tmp_c > 80\n")
    code, output = check(rules_config(tmp_path, f"dirs = ['{rules_dir}']\n"))
    assert code == 2 and f"{rules_dir}/site.yml: rules[0] (hot): when: unknown signal 'gpu.tmp_c'" in output, output
