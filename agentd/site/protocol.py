"""What nodes and controllers say to each other: power reports and signed budget leases.

Both are small versioned JSON documents (``"v": 1``), validated with pydantic on receipt: they
come from the network and are untrusted. A bad one raises :class:`ProtocolError` with a short
``reason`` (a label to count by: ``too_large``, ``not_json``, ``missing_field``, ``wrong_type``,
``non_finite``, ``negative``, ``inconsistent``, ``unknown_version``, ``unsigned``,
``bad_signature``) and a ``detail`` for the log; the receiver counts it and goes on.

Leases are signed with HMAC-SHA256 and the site key: the signature covers the canonical JSON of
every other field (``json.dumps(sort_keys=True, separators=(",", ":"))``), so a lease cannot be
edited, and it names its ``target`` (``nodes/<name>`` or ``domains/<name>``) and ``site``, so
one node's lease cannot be replayed on another's topic. Anyone who can publish a budget could
zero a site: the broker's ACL is the first fence (``systemd/mosquitto-acl.example``), the
signature the second.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collectors.classes import CLASSES


VERSION: Literal[1] = 1
MAX_PAYLOAD_BYTES = 64 * 1024  # a report of a 64-GPU node is ~1 KB; anything near this is abuse
MIN_KEY_BYTES = 16
_FLEX_TOLERANCE_W = 1.0


class ProtocolError(ValueError):
    """A payload that is refused: ``reason`` is a stable label, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


Watts = Field(ge=0)
ClassName = Literal["idle", "low", "normal", "high"]
assert get_args(ClassName) == CLASSES, "ClassName must list collectors.classes.CLASSES, in order"


class PowerReport(_Doc):
    """A node's (or a subtree controller's) power, sent every tick.

    ``demand_w`` is what it would draw uncapped; ``floor_w`` what it cannot go below without
    cutting into a job's floor (>= ``min_w``, the sum of its GPUs' minimum limits);
    ``flexible_w[c]`` what it could shed from GPUs of class ``c`` down to their floors; its want,
    ``floor_w + sum(flexible_w)``, is at most ``max_w`` (``demand_w`` may be below ``floor_w``:
    an idle GPU draws less than its minimum limit).
    """

    v: Literal[1] = VERSION
    kind: Literal["node", "domain"] = "node"
    site: str
    node: str = Field(min_length=1, max_length=253)
    ts: float = Field(gt=0, description="unix seconds of the readings")
    seq: int = Field(ge=0)
    gpus: int = Field(ge=0, le=4096)
    gpu_power_w: float = Watts
    demand_w: float = Watts
    min_w: float = Watts
    floor_w: float = Watts
    max_w: float = Watts
    flexible_w: dict[ClassName, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    budget_w: float | None = Field(None, ge=0, description="the budget the node enforces now")
    budget_source: Literal["lease", "failsafe", "none"] = "none"
    lease_age_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> PowerReport:
        # flexible_w's classes and values are checked by its type (in pydantic's core: this
        # validator runs once per report per node per second at the controller)
        if not self.min_w <= self.floor_w <= self.max_w + _FLEX_TOLERANCE_W:
            raise ValueError(f"expected min_w <= floor_w <= max_w (got {self.min_w}, {self.floor_w}, {self.max_w})")
        want = self.floor_w + sum(self.flexible_w.values())
        if want > self.max_w + _FLEX_TOLERANCE_W + 1e-6 * self.max_w:
            raise ValueError(f"floor_w + sum(flexible_w) = {want:.1f} is above max_w = {self.max_w:.1f}")
        return self


class Lease(_Doc):
    """A budget a controller grants a node (or a subtree) until ``expires_at`` (unix seconds)."""

    v: Literal[1] = VERSION
    site: str
    target: str = Field(pattern=r"^(nodes|domains)/[^/+#]+$")
    controller: str = Field(min_length=1, max_length=128)
    budget_w: float
    issued_at: float
    expires_at: float
    seq: int = Field(ge=0)
    sig: str = ""


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign(fields: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of ``fields`` (``sig`` left out)."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def encode_lease(lease: Lease, key: bytes) -> bytes:
    """The signed JSON payload of ``lease``."""
    fields = lease.model_dump(exclude={"sig"})
    fields["sig"] = sign(fields, key)
    return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()


def encode_report(report: PowerReport) -> bytes:
    return json.dumps(report.model_dump(exclude_none=True), separators=(",", ":"), allow_nan=False).encode()


def _load_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{len(payload)} bytes (the limit is {MAX_PAYLOAD_BYTES})")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("not_json", str(exc)[:200]) from None
    except RecursionError:  # b"[" * 60000 is under the size bound but nests past the parser's stack
        raise ProtocolError("not_json", "nested too deeply") from None
    if not isinstance(doc, dict):
        raise ProtocolError("wrong_type", f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("v", VERSION) != VERSION:
        raise ProtocolError("unknown_version", f"v={doc.get('v')!r} (this agentd speaks v{VERSION})")
    return doc


_REASONS = {"missing": "missing_field", "finite_number": "non_finite", "greater_than_equal": "negative",
            "greater_than": "negative", "extra_forbidden": "unknown_field", "value_error": "inconsistent",
            "literal_error": "unknown_class"}


def _refusal(exc: ValidationError) -> ProtocolError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(document)"
    return ProtocolError(_REASONS.get(err["type"], "wrong_type"), f"{where}: {err['msg']}")


def decode_report(payload: bytes) -> PowerReport:
    """A validated report, or ProtocolError (see the module doc for the reasons)."""
    doc = _load_json(payload)
    try:
        return PowerReport.model_validate(doc)
    except ValidationError as exc:
        raise _refusal(exc) from None


def decode_lease(payload: bytes, key: bytes | None) -> Lease:
    """A lease whose signature verifies with ``key`` (None: signatures are not checked, which the
    node allows only when no site key is configured, and logs at start)."""
    doc = _load_json(payload)
    if key is not None:
        sig = doc.get("sig")
        if not isinstance(sig, str) or not sig:
            raise ProtocolError("unsigned", "the lease has no sig, and this node requires signed leases")
        try:
            expected = sign(doc, key)
        except ValueError:  # NaN or Infinity in the document: no canonical form to verify
            raise ProtocolError("non_finite", "the lease holds NaN or Infinity") from None
        if not hmac.compare_digest(sig, expected):
            raise ProtocolError("bad_signature", f"from controller {str(doc.get('controller'))[:64]!r}: "
                                                 "the signature does not verify with this node's site key")
    try:
        return Lease.model_validate(doc)
    except ValidationError as exc:
        raise _refusal(exc) from None


def load_site_key(path: Path | str) -> bytes:
    """The site key from a file; a relative path is looked up in systemd's ``$CREDENTIALS_DIRECTORY``
    first (``LoadCredential=site-key:/etc/agentd/site.key`` then ``site_key_file = "site-key"``).

    Raises ValueError naming the file when it is unreadable or shorter than 16 bytes.
    """
    p = Path(path)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not p.is_absolute() and creds and (Path(creds) / p).exists():
        p = Path(creds) / p
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read the site key: {exc.strerror or exc} (budget.site_key_file)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{p}: the site key is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                         "(e.g. `head -c 32 /dev/urandom | base64 > site.key`)")
    return key
