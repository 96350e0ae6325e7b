"""The API's bearer token: read once at start, compared in constant time, never logged.

Why a bearer token and not mTLS: zeusd (the privileged power-limit daemon this API is closest to)
and Prometheus' scrape config both speak ``Authorization: Bearer``, and schedulers' HTTP clients
all do. The token comes from a file (``api.token_file``) or a systemd credential
(``api.token_credential``: a name under ``$CREDENTIALS_DIRECTORY``, so the token never sits in
the unit or the config). Nothing here logs or echoes the token, nor the header a client sent.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from agentd.api.config import ApiConfig
from agentd.config import ConfigError

MIN_TOKEN_CHARS = 16
_SCHEME = "bearer"


def _read(path: Path, key: str) -> str:
    hint = "create it (e.g. `openssl rand -hex 32 > FILE`, mode 0600), or unset the key"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{key}: cannot read {path}: {exc.strerror or exc}; {hint}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{key}: {path} is not a text file; put the token in it as one line"]) from None
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError([f"{key}: the token in {path} is {len(token)} characters; use at least "
                           f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)"])
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ConfigError([f"{key}: the token in {path} holds spaces or control characters; a bearer token "
                           "is one word (e.g. `openssl rand -hex 32`)"])
    return token


def load_token(cfg: ApiConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The token from ``api.token_file`` or ``api.token_credential`` (None when neither is set).

    Raises ConfigError naming the key and what to do when it cannot be read or is too short.
    """
    environ = os.environ if environ is None else environ
    if cfg.token_file is not None:
        return _read(cfg.token_file, "api.token_file")
    if cfg.token_credential is not None:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError([f"api.token_credential: $CREDENTIALS_DIRECTORY is not set, so the credential "
                               f"{cfg.token_credential!r} cannot be found: run agentd under systemd with "
                               f"LoadCredential={cfg.token_credential}:/etc/agentd/api-token, or set "
                               "api.token_file instead"])
        return _read(Path(directory) / cfg.token_credential, "api.token_credential")
    return None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant time over the token)."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != _SCHEME:
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())
