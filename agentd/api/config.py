"""The ``[api]`` section of agentd.toml: where the throttle API listens and who may change things.

The checks that need only this section are validators here, so ``agentd check-config`` reports
them located (``api.listen: ...``) like every other key: an address that is not ``HOST:PORT``, a
listener off loopback without a token, ``auth_reads`` without a token. Reading the token itself
(a file, a systemd credential) happens when the daemon starts (``agentd.api.auth.load_token``),
with the same wording, and ``agentd.config.preflight`` runs that same check.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_LISTEN = "127.0.0.1:9410"
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")


class ListenAddress(NamedTuple):
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Only this machine can connect (127.0.0.0/8, ::1, or the name localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str) -> ListenAddress | None:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a ListenAddress; None for ``""`` (no TCP
    listener). ValueError saying what a valid value looks like."""
    text = value.strip()
    if not text:
        return None
    example = "for example 127.0.0.1:9410, [::1]:9410 or 0.0.0.0:9410 (empty: no TCP listener)"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets, {example}")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port 0..65535, {example}")
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address, {example}") from None
    return ListenAddress(host, int(port))


class ApiConfig(BaseModel):
    """The throttle API (docs/api.md): HTTP on loopback by default, optionally a Unix socket."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    listen: str = Field(DEFAULT_LISTEN, description="HOST:PORT of the HTTP API ([v6]:PORT for IPv6; port 0 picks a "
                                                    "free one; empty = no TCP listener). Off loopback, a token is "
                                                    "required")
    unix_socket: Path | None = Field(None, description="also serve on this Unix socket (mode 0660: the file's group "
                                                       "may connect)", examples=["/run/agentd/api.sock"])
    token_file: Path | None = Field(None, description="file holding the bearer token that PUT/DELETE requests must "
                                                      "carry (at least 16 characters)",
                                    examples=["/etc/agentd/api-token"])
    token_credential: str | None = Field(None, description="the token as a systemd credential: its name under "
                                                           "$CREDENTIALS_DIRECTORY (LoadCredential=api-token:/etc/"
                                                           "agentd/api-token)", examples=["api-token"])
    auth_reads: bool = Field(False, description="GET requests need the token too (all but /healthz and /readyz)")
    max_body_bytes: int = Field(65_536, ge=1024, le=16_777_216, description="largest request body accepted; "
                                                                            "larger ones get 413")
    metrics_dcgm_compat: bool = Field(False, description="/metrics also carries dcgm-exporter's names and labels "
                                                         "(DCGM_FI_DEV_POWER_USAGE, ...) for existing dashboards")
    publish_every_s: float = Field(30.0, ge=1, le=3600, description="with MQTT, the retained throttle topic is "
                                                                    "republished at least this often (and at once "
                                                                    "when it changes)")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_listen(v)
        return v.strip()

    @field_validator("token_credential")
    @classmethod
    def _check_credential(cls, v: str | None) -> str | None:
        if v is not None and not _CREDENTIAL_NAME.match(v):
            raise ValueError("must be a systemd credential name (letters, digits, '_', '.', '@', '-'), the first "
                             "half of LoadCredential=NAME:PATH")
        return v

    @model_validator(mode="after")
    def _check_access(self) -> ApiConfig:
        if self.token_file is not None and self.token_credential is not None:
            raise ValueError("set api.token_file or api.token_credential, not both")
        has_token = self.token_file is not None or self.token_credential is not None
        address = self.address
        if address is not None and not address.loopback and not has_token:
            raise ValueError(f"api.listen = {self.listen!r} is not a loopback address, so anyone on the network "
                             "could set caps: set api.token_file (or api.token_credential) to a bearer token, or "
                             "listen on 127.0.0.1")
        if self.auth_reads and not has_token:
            raise ValueError("api.auth_reads = true needs a token: set api.token_file or api.token_credential")
        return self

    @property
    def address(self) -> ListenAddress | None:
        """The TCP listener (None: none)."""
        return parse_listen(self.listen)

    @property
    def has_token(self) -> bool:
        return self.token_file is not None or self.token_credential is not None
