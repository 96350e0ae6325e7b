"""The [api] section: listen addresses, the token (file or systemd credential), and the refusal to
serve off loopback without one, located the way check-config and `agentd run` report errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from agentd.api.auth import bearer_matches, load_token
from agentd.api.config import ApiConfig, ListenAddress, parse_listen
from agentd.cli import main
from agentd.config import ConfigError, load_config, preflight

TOKEN = "0123456789abcdef0123"


def test_the_default_is_loopback_9410_and_needs_no_token():
    cfg = load_config(None, environ={}).api
    assert cfg.address == ListenAddress("127.0.0.1", 9410) and cfg.address.loopback and not cfg.has_token


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:9410", ("127.0.0.1", 9410, True)), ("[::1]:9410", ("::1", 9410, True)),
    ("localhost:0", ("localhost", 0, True)), ("0.0.0.0:80", ("0.0.0.0", 80, False)),
    ("[::]:9410", ("::", 9410, False)), ("node7.example.org:9410", ("node7.example.org", 9410, False)),
])
def test_listen_addresses(text, want):
    a = parse_listen(text)
    assert a is not None and (a.host, a.port, a.loopback) == want
    assert parse_listen("") is None


@pytest.mark.parametrize("bad,word", [("9410", "HOST:PORT"), ("::1:9410", "brackets"), ("h:99999", "0..65535"),
                                      ("[h]:1", "not an IPv6"), (":9410", "HOST:PORT")])
def test_a_bad_listen_value_names_the_key_and_shows_valid_ones(tmp_path, bad, word):
    path = tmp_path / "agentd.toml"
    path.write_text(f"[api]\nlisten = '{bad}'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    (line,) = err.value.errors
    assert line.startswith(f"{path}: api.listen: ") and word in line and "127.0.0.1:9410" in line


def test_off_loopback_without_a_token_is_refused_saying_what_to_set(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"AGENTD_API__LISTEN": "0.0.0.0:9410"})
    (line,) = err.value.errors
    assert line.startswith("AGENTD_API__LISTEN: api: ") and "not a loopback address" in line
    assert "set api.token_file (or api.token_credential)" in line
    ok = load_config(None, environ={"AGENTD_API__LISTEN": "0.0.0.0:9410", "AGENTD_API__TOKEN_FILE": "/etc/t"})
    assert not ok.api.address.loopback  # type: ignore[union-attr]


def test_agentd_run_refuses_to_start_off_loopback_without_a_token(tmp_path):
    config = tmp_path / "agentd.toml"
    config.write_text(f'backend = "sim"\nstate_dir = "{tmp_path}"\n[api]\nlisten = "0.0.0.0:9410"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config)], env={})
    assert result.exit_code == 2 and "api.token_file" in result.output and "not a loopback address" in result.output


@pytest.mark.parametrize("toml,key,word", [
    ("auth_reads = true", "api", "auth_reads = true needs a token"),
    ("token_file = '/a'\ntoken_credential = 'b'", "api", "not both"),
    ("token_credential = 'a/b'", "api.token_credential", "systemd credential name"),
    ("max_body_bytes = 10", "api.max_body_bytes", "greater than or equal to 1024"),
    ("publish_every_s = 0", "api.publish_every_s", "greater than or equal to 1"),
    ("publish_every_s = '30s'", "api.publish_every_s", "valid number"),
    ("listn = 'x'", "api.listn", "unknown key"),
])
def test_other_bad_api_settings_are_located(tmp_path, toml, key, word):
    path = tmp_path / "agentd.toml"
    path.write_text(f"[api]\n{toml}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    (line,) = err.value.errors
    assert line.startswith(f"{path}: {key}: ") and word in line, line


def test_the_token_comes_from_a_file_or_a_credential_and_bad_ones_say_what_to_do(tmp_path):
    good = tmp_path / "tok"
    good.write_text(TOKEN + "\n")
    assert load_token(ApiConfig(token_file=good), {}) == TOKEN
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-token").write_text(TOKEN)
    assert load_token(ApiConfig(token_credential="api-token"), {"CREDENTIALS_DIRECTORY": str(creds)}) == TOKEN
    assert load_token(ApiConfig(), {}) is None
    cases = [
        (ApiConfig(token_file=tmp_path / "missing"), {}, "api.token_file: cannot read"),
        (ApiConfig(token_credential="api-token"), {}, "api.token_credential: $CREDENTIALS_DIRECTORY is not set"),
        (ApiConfig(token_credential="other"), {"CREDENTIALS_DIRECTORY": str(creds)}, "api.token_credential: cannot"),
    ]
    short = tmp_path / "short"
    short.write_text("abc")
    cases.append((ApiConfig(token_file=short), {}, "is 3 characters; use at least 16"))
    spaced = tmp_path / "spaced"
    spaced.write_text("abcdefgh ijklmnopq")
    cases.append((ApiConfig(token_file=spaced), {}, "one word"))
    for cfg, env, word in cases:
        with pytest.raises(ConfigError) as err:
            load_token(cfg, env)
        assert word in err.value.errors[0], err.value.errors
        assert "abcdefgh" not in err.value.errors[0]  # the token's text is never shown


def test_check_config_checks_the_token_file_and_notes_a_credential(tmp_path):
    cfg = load_config(None, environ={"AGENTD_API__TOKEN_FILE": str(tmp_path / "nope"),
                                     "AGENTD_STATE_DIR": str(tmp_path)})
    errors, notes = preflight(cfg, "agentd.toml", environ={})
    assert [e for e in errors if e.startswith("agentd.toml: api.token_file: cannot read")]
    cfg = load_config(None, environ={"AGENTD_API__TOKEN_CREDENTIAL": "api-token", "AGENTD_STATE_DIR": str(tmp_path)})
    errors, notes = preflight(cfg, "agentd.toml", environ={})
    assert not errors and [n for n in notes if "api.token_credential" in n]


def test_the_bearer_check():
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}0", "Bearer \udcff"):
        assert not bearer_matches(header, TOKEN), header
