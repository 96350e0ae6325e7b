"""The node's throttle body as a scheduler adapter reads it (docs: the throttle contract).

The body arrives from the network (a retained MQTT message, an HTTP answer), so it is validated
like any untrusted payload: only the keys an adapter acts on are read (the rest of the body is
the node's to grow), each with its type, and a body that cannot be acted on safely is refused
with what is wrong. The node's own model (``agentd.api.models.Throttle``) writes these keys;
this module does not import it, so slurm-sync can run where the node daemon's API is not
installed and tells a newer node's body (``version`` > 1) from a broken one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

VERSION = 1
MAX_BODY_BYTES = 1024 * 1024  # a body is a few kB; a megabyte is a sender that is not a node
Advice = Literal["none", "no_new_work", "drain"]


class BodyError(ValueError):
    """A throttle body that cannot be acted on; the message says what is wrong."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Reason(_Tolerant):
    kind: str = ""
    rule: str | None = None
    advice: str = "none"
    message: str = ""


class _SlurmRecommendation(_Tolerant):
    state: Literal["DRAIN", "RESUME"]
    reason: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class _Recommendations(_Tolerant):
    slurm: _SlurmRecommendation | None = None


class _Body(_Tolerant):
    version: int
    node: str = Field(min_length=1)
    site: str = ""
    level: int = Field(ge=0, le=4)
    state: str
    accept_new_work: bool
    advice: Advice = "none"
    reasons: list[_Reason] = Field(default_factory=list)
    recommendations: _Recommendations = Field(default_factory=_Recommendations)
    generated_at: datetime
    expires_at: datetime

    @field_validator("generated_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("must carry its time zone (the node writes UTC, ...Z)")
        return v


@dataclass(slots=True, frozen=True)
class NodeThrottle:
    """What one body says, in the terms an adapter acts on.

    ``drain``: the node should take no new work (``accept_new_work`` false, or the Slurm
    recommendation says DRAIN); ``why``: the reason without the node's ``agentd:`` prefix, e.g.
    ``"drain: leak_detected"``; ``extra``: the keys the node recommends for Slurm's Extra JSON.
    """

    node: str
    drain: bool
    why: str
    level: int
    state: str
    advice: str
    generated_at_ns: int
    expires_at_ns: int
    extra: dict[str, Any] = field(default_factory=dict)

    def expired(self, now_ns: int, grace_s: float = 0.0) -> bool:
        """True once ``expires_at`` (+ ``grace_s``) has passed: the node is then unknown."""
        return now_ns > self.expires_at_ns + round(grace_s * 1e9)


def _ns(t: datetime) -> int:
    return round(t.astimezone(UTC).timestamp() * 1e9)


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _why(body: _Body) -> str:
    rec = body.recommendations.slurm
    if rec is not None and rec.reason.strip():
        text = _one_line(rec.reason)
        head, sep, rest = text.partition(":")
        if sep and head.strip() == "agentd":  # the node's own prefix; the adapter writes its own
            text = rest.strip()
        if text:
            return text
    # No recommendation text: the strongest advice and the first (worst) reason.
    advice = body.advice if body.advice != "none" else body.state
    first = body.reasons[0] if body.reasons else None
    detail = (first.rule or first.message or first.kind) if first is not None else ""
    return _one_line(f"{advice}: {detail}" if detail else advice)


def parse_body(raw: bytes | str, expect_node: str | None = None) -> NodeThrottle:
    """Read one throttle body; BodyError saying what is wrong when it cannot be acted on.

    ``expect_node``: the node named by where the body came from (its topic, the URL polled); a
    body that names another node is refused (one node must not drain another).
    """
    if len(raw) > MAX_BODY_BYTES:
        raise BodyError(f"body of {len(raw)} bytes is larger than {MAX_BODY_BYTES}: not a throttle body")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BodyError("not a JSON object")
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise BodyError(f"body version {version} is newer than this slurm-sync understands ({VERSION}); "
                        "upgrade gpu-agentd where slurm-sync runs")
    try:
        body = _Body.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise BodyError(f"not a throttle body: {problems}") from None
    if body.version != VERSION:
        raise BodyError(f"body version {body.version} is not {VERSION}")
    if expect_node is not None and body.node != expect_node:
        raise BodyError(f"body names node {body.node!r}, but came from node {expect_node!r}'s topic/API")
    rec = body.recommendations.slurm
    drain = (not body.accept_new_work) or (rec is not None and rec.state == "DRAIN")
    extra = dict(rec.extra) if rec is not None and rec.extra else {"agentd_level": body.level}
    return NodeThrottle(node=body.node, drain=drain, why=_why(body), level=body.level, state=body.state,
                        advice=body.advice, generated_at_ns=_ns(body.generated_at),
                        expires_at_ns=_ns(body.expires_at), extra=extra)
