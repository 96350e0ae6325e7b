"""The site wire protocol: every refusal reason, signatures, and the site key file."""

from __future__ import annotations

import json

import pytest

from agentd.site.protocol import (MAX_PAYLOAD_BYTES, Lease, PowerReport, ProtocolError, decode_lease,
                                  decode_report, encode_lease, encode_report, load_site_key)

KEY = b"0123456789abcdef-site-key"


def report(**over) -> dict:
    doc = PowerReport(site="s1", node="n1", ts=1.7e9, seq=3, gpus=8, gpu_power_w=4000.0, demand_w=5000.0,
                      min_w=1600.0, floor_w=2000.0, max_w=5600.0,
                      flexible_w={"low": 1000.0, "high": 2000.0}).model_dump(exclude_none=True)
    doc.update(over)
    return doc


def lease(**over) -> Lease:
    fields = dict(site="s1", target="nodes/n1", controller="c1", budget_w=3000.0, issued_at=100.0,
                  expires_at=110.0, seq=1)
    fields.update(over)
    return Lease(**fields)


def refusal(payload: bytes, key: bytes | None = None, *, lease_doc: bool = False) -> str:
    with pytest.raises(ProtocolError) as info:
        (decode_lease(payload, key) if lease_doc else decode_report(payload))
    assert info.value.detail  # every refusal says what was wrong
    return info.value.reason


def test_a_report_round_trips():
    doc = report()
    assert decode_report(encode_report(PowerReport(**doc))) == PowerReport(**doc)


@pytest.mark.parametrize("payload, reason", [
    (b"x" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    (b"{not json", "not_json"),
    (b"\xff\xfe", "not_json"),
    (b"[" * 60_000, "not_json"),  # under the size bound, past the parser's stack
    (b"[1, 2]", "wrong_type"),
    (json.dumps({**report(), "v": 2}).encode(), "unknown_version"),
    (json.dumps({k: v for k, v in report().items() if k != "node"}).encode(), "missing_field"),
    (json.dumps(report(gpu_power_w="4000")).encode(), "wrong_type"),  # strict: no strings for watts
    (json.dumps(report(gpus=True)).encode(), "wrong_type"),
    (json.dumps(report(), allow_nan=True).replace("4000.0", "NaN").encode(), "non_finite"),
    (json.dumps(report(), allow_nan=True).replace("4000.0", "Infinity").encode(), "non_finite"),
    (json.dumps(report(demand_w=-1.0)).encode(), "negative"),
    (json.dumps(report(extra=1)).encode(), "unknown_field"),
    (json.dumps(report(flexible_w={"vip": 10.0})).encode(), "unknown_class"),
    (json.dumps(report(flexible_w={"low": -5.0})).encode(), "negative"),
    (json.dumps(report(floor_w=1000.0)).encode(), "inconsistent"),  # below min_w
    (json.dumps(report(flexible_w={"low": 9000.0})).encode(), "inconsistent"),  # want above max_w
])
def test_bad_reports_are_refused_with_a_stable_reason(payload, reason):
    assert refusal(payload) == reason


def test_demand_may_be_below_the_floor():
    """Idle GPUs draw less than their minimum limit: the physical demand is below the floor."""
    doc = report(demand_w=900.0, flexible_w={})
    assert decode_report(json.dumps(doc).encode()).demand_w == 900.0


def test_a_signed_lease_verifies_and_any_edit_breaks_it():
    payload = encode_lease(lease(), KEY)
    assert decode_lease(payload, KEY).budget_w == 3000.0
    doc = json.loads(payload)
    for field, value in [("budget_w", 1.0), ("target", "nodes/n2"), ("site", "s2"), ("expires_at", 1e12),
                         ("controller", "evil")]:
        edited = json.dumps({**doc, field: value}).encode()
        assert refusal(edited, KEY, lease_doc=True) == "bad_signature", field


def test_a_lease_signed_with_another_key_or_unsigned_is_refused():
    assert refusal(encode_lease(lease(), b"another-site-key-xxxx"), KEY, lease_doc=True) == "bad_signature"
    unsigned = json.dumps({k: v for k, v in json.loads(encode_lease(lease(), KEY)).items() if k != "sig"}).encode()
    assert refusal(unsigned, KEY, lease_doc=True) == "unsigned"
    assert decode_lease(unsigned, None).budget_w == 3000.0  # no key configured: not checked


def test_a_lease_with_nan_is_refused_not_raised():
    doc = json.loads(encode_lease(lease(), KEY))
    text = json.dumps(doc).replace("3000.0", "NaN").encode()
    assert refusal(text, KEY, lease_doc=True) == "non_finite"
    assert refusal(text, None, lease_doc=True) == "non_finite"


def test_lease_targets_are_topic_levels():
    with pytest.raises(ValueError):
        lease(target="nodes/a/b")
    with pytest.raises(ValueError):
        lease(target="racks/r1")


def test_site_key_file_errors_name_the_file(tmp_path, monkeypatch):
    short = tmp_path / "short.key"
    short.write_bytes(b"abc\n")
    with pytest.raises(ValueError, match=r"short\.key: the site key is 3 bytes"):
        load_site_key(short)
    with pytest.raises(ValueError, match=r"missing\.key: cannot read the site key"):
        load_site_key(tmp_path / "missing.key")
    good = tmp_path / "site.key"
    good.write_bytes(KEY + b"\n")
    assert load_site_key(good) == KEY  # trailing newline stripped
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "site-key").write_bytes(KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_site_key("site-key") == KEY  # a systemd credential, by name
