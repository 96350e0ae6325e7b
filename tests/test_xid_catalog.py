"""The Xid table: every Xid the issue names, actions the tracker understands, a default for the rest."""

from __future__ import annotations

import collectors.xid_catalog as xc
from collectors.xid_catalog import ACTIONS, CATALOG, DRAIN_NODE, NONE, RESET_GPU, SEVERITIES, lookup

ISSUE_XIDS = (13, 31, 43, 45, 48, 63, 64, 74, 79, 92, 94, 95, 119, 120)


def test_the_issue_s_xids_are_all_in_the_table():
    for xid in ISSUE_XIDS:
        info = lookup(xid)
        assert info.known and info.xid == xid, xid
        assert info.severity in SEVERITIES and info.action in ACTIONS, info


def test_actions_follow_the_catalogue_s_resolution_buckets():
    assert lookup(79).action == DRAIN_NODE  # RESTART_BM: the GPU is gone until a reboot
    for xid in (46, 48, 62, 64, 74, 95, 119, 120):  # RESET_GPU, WORKFLOW_XID_48, WORKFLOW_NVLINK_ERR
        assert lookup(xid).action == RESET_GPU, xid
    for xid in (13, 31, 32, 43, 45, 63, 92, 94, 154):  # RESTART_APP / IGNORE: the GPU stays usable
        assert lookup(xid).action == NONE, xid


def test_severity_is_critical_exactly_when_an_action_is_needed():
    for info in CATALOG.values():
        assert (info.severity == "critical") == (info.action != NONE), info
    assert {lookup(x).severity for x in (63, 92, 94)} == {"warning"}  # memory health to watch
    assert {lookup(x).severity for x in (13, 31, 43, 45)} == {"info"}  # application faults


def test_an_unknown_xid_gets_the_default_and_says_where_to_look():
    info = lookup(9999)
    assert (info.xid, info.severity, info.action, info.known) == (9999, "warning", NONE, False)
    assert "Xid catalogue" in info.meaning
    assert 9999 not in CATALOG  # lookup does not grow the table


def test_meanings_are_short_lines_of_our_own():
    for info in CATALOG.values():
        assert 10 < len(info.meaning) <= 160 and "\n" not in info.meaning, info
        assert info.meaning[0].islower() or info.meaning.startswith(("GPU", "GSP", "NVLink")), info


def test_the_source_is_cited():
    doc = xc.__doc__ or ""
    assert "docs.nvidia.com/deploy/xid-errors" in doc and "r5xx" in doc and "Resolution Bucket" in doc
