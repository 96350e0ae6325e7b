"""What an Xid means for the node: severity, the recommended action and a short meaning.

An Xid is the NVIDIA driver's number for a GPU error (it appears in the kernel log as ``NVRM:
Xid (PCI:...): 79, ...`` and reaches us through NVML's ``nvmlEventTypeXidCriticalError``). Most
Xids are application faults after which the GPU stays usable; a few mean the GPU must be reset,
or the node rebooted, before it can be trusted with work again. The health tracker
(``collectors.gpu_health``) uses this table only when the driver does not say itself: a driver
that reports its own recommended recovery action (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``,
``nvmlEventTypeGpuRecoveryAction``, in recent drivers) decides, and this table is the fallback.

Source: NVIDIA's "Xid Errors" catalogue in the GPU deployment and management documentation
(docs.nvidia.com/deploy/xid-errors, r5xx: "Analyzing Xid Errors with the Xid Catalog", for
Ampere and later GPUs), whose "Resolution Bucket (Immediate Action)" column is mapped here as:

* ``RESTART_APP`` and ``IGNORE`` -> ``none``: the application that hit it restarts; the GPU is
  fine for new work;
* ``RESET_GPU``, ``WORKFLOW_XID_48`` and ``WORKFLOW_NVLINK_ERR`` -> ``reset_gpu``: stop the
  GPU's processes and reset it (``nvidia-smi -r``); if it recurs, reboot, then replace;
* ``RESTART_BM`` / ``RESTART_VM`` -> ``drain_node``: the node must be rebooted (Xid 79: the GPU
  is gone from the PCIe bus until then).

The page-retirement and row-remapping Xids (48, 63, 64) are also described in NVIDIA's "Dynamic
Page Retirement" and "A100 GPU Memory Error Management" documents; the recovery action values
are NVML's ``nvmlDeviceGpuRecoveryAction_t``. The meanings below are our own short wording, not
NVIDIA's text. Severity: ``critical`` for every Xid whose action is not ``none``; ``warning`` for
the memory-health signals that need no action now (63, 92, 94); ``info`` for application faults.

An Xid not in the table gets ``DEFAULT`` (warning, no action): most unknown Xids are newer
application-level ones, and draining nodes for an Xid nobody has classified would be worse than
recording it loudly; the event is stored and logged with a hint to look it up.
"""

from __future__ import annotations

from typing import NamedTuple

NONE, RESET_GPU, DRAIN_NODE = "none", "reset_gpu", "drain_node"
ACTIONS = (NONE, RESET_GPU, DRAIN_NODE)
SEVERITIES = ("info", "warning", "critical")


class XidInfo(NamedTuple):
    """One Xid: ``severity`` (info / warning / critical), ``action`` (none / reset_gpu /
    drain_node), ``meaning`` (a short line for logs and events); ``known`` is False for the
    default given to an Xid the table does not hold."""

    xid: int
    severity: str
    action: str
    meaning: str
    known: bool = True


def _x(xid: int, severity: str, action: str, meaning: str) -> tuple[int, XidInfo]:
    return xid, XidInfo(xid, severity, action, meaning)


CATALOG: dict[int, XidInfo] = dict((
    _x(13, "info", NONE, "graphics engine exception: an application fault (bad instruction or "
                         "out-of-range access); restart the application"),
    _x(31, "info", NONE, "GPU memory page fault: an application touched memory it does not own; "
                         "usually an application bug; restart it"),
    _x(32, "info", NONE, "invalid or corrupted push buffer stream from an application; restart it"),
    _x(43, "info", NONE, "a channel stopped after an application fault; the GPU stays usable"),
    _x(45, "info", NONE, "processes cleaned up after an earlier error; look at the Xid before it"),
    _x(46, "critical", RESET_GPU, "GPU stopped processing work; reset the GPU"),
    _x(48, "critical", RESET_GPU, "uncorrectable (double-bit) ECC memory error; reset the GPU "
                                  "(drain first when Xid 63 or 64 follow)"),
    _x(62, "critical", RESET_GPU, "an internal micro-controller halted; reset the GPU"),
    _x(63, "warning", NONE, "a bad memory row (or page) was recorded for remapping; it takes effect "
                            "at the next GPU reset"),
    _x(64, "critical", RESET_GPU, "recording a row remap (or page retirement) failed; reset the GPU "
                                  "and have the board checked if the remap-failure flag is set"),
    _x(74, "critical", RESET_GPU, "NVLink error; reset the GPU (or reboot the node) and check the "
                                  "links if it recurs"),
    _x(79, "critical", DRAIN_NODE, "GPU has fallen off the bus: it no longer answers on PCIe; "
                                   "drain and reboot the node"),
    _x(92, "warning", NONE, "high rate of corrected (single-bit) ECC errors; watch the counters"),
    _x(94, "warning", NONE, "uncorrectable ECC error contained to the application that hit it; "
                            "restart that application; a row remap waits for the next reset"),
    _x(95, "critical", RESET_GPU, "uncorrectable ECC error that could not be contained: every "
                                  "application on the GPU is affected; reset the GPU"),
    _x(119, "critical", RESET_GPU, "GSP firmware RPC timeout: the GPU System Processor stopped "
                                   "answering the driver; reset the GPU"),
    _x(120, "critical", RESET_GPU, "GSP firmware error on the GPU System Processor; reset the GPU"),
    _x(154, "warning", NONE, "the driver changed its recommended recovery action; its action "
                             "(recovery_action event) decides"),
))

DEFAULT_MEANING = "not in agentd's Xid table; look it up in NVIDIA's Xid catalogue"


def lookup(xid: int) -> XidInfo:
    """The table's entry for ``xid``, or the default (warning, no action, ``known=False``)."""
    info = CATALOG.get(xid)
    if info is not None:
        return info
    return XidInfo(xid, "warning", NONE, DEFAULT_MEANING, known=False)
