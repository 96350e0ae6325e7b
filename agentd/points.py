"""Readings -> InfluxDB points, in the schema of DESIGN.md section 3 (one place owns it)."""

from __future__ import annotations

from collections.abc import Mapping

from collectors.base import GpuSample, nvlink_totals
from collectors.coolant import Reading

from agentd.lineproto import Point

FieldValue = float | int | bool | str | None  # what a line-protocol field can hold


def gpu_point(sample: GpuSample, host: str, limit_set_w: float | None = None,
              limit_target_w: float | None = None) -> Point:
    """The ``gpu`` measurement for one healthy sample.

    ``limit_set_w`` is the limit agentd wrote and the GPU still holds (absent when it holds none:
    dry run, no permission, nothing asked); ``limit_target_w`` is what agentd intends (the
    composed, clamped target), written or not.
    """
    return Point(
        "gpu",
        {"host": host, "gpu": str(sample.index), "uuid": sample.uuid, "model": sample.model},
        {
            "power_w": sample.power_w,
            "power_avg_w": sample.power_avg_w,
            "energy_j": sample.energy_j,
            "temp_c": sample.temp_c,
            "mem_temp_c": sample.mem_temp_c,
            "limit_w": sample.limit_w,
            "limit_set_w": limit_set_w,
            "limit_target_w": limit_target_w,
            "limit_default_w": sample.limit_default_w,
            "util_pct": sample.util_pct,
            "mem_util_pct": sample.mem_util_pct,
            "mem_used_bytes": sample.mem_used_bytes,
            "sm_clock_mhz": sample.sm_clock_mhz,
            "clock_reasons": sample.clock_reasons,
            "throttled": sample.throttled,
        },
        sample.ts_ns,
    )


def agent_point(host: str, ts_ns: int, fields: dict[str, FieldValue]) -> Point:
    """The ``agent`` self-telemetry measurement (tick cost, backlog, errors)."""
    return Point("agent", {"host": host}, fields, ts_ns)


def coolant_point(reading: Reading, ts_ns: int, extra: dict[str, float] | None = None) -> Point:
    """The ``coolant`` measurement for one reading: tags site/loop/unit/point, the canonical
    fields it carries (numbers as floats, ``leak`` a string). ``ts_ns`` is the sender's time when
    it sent one, else the arrival time; ``extra`` adds fields derived from earlier readings."""
    fields: dict[str, FieldValue] = {**reading.fields, **(extra or {})}
    return Point(
        "coolant",
        {"site": reading.site, "loop": reading.loop, "unit": reading.unit, "point": reading.point},
        fields,
        ts_ns,
    )


def throttle_event_point(host: str, ts_ns: int, *, rule: str, severity: str, state: str, action: str,
                         gpu: int | None, value: float | None, limit_w: float | None, message: str,
                         limit_target_w: float | None = None) -> Point:
    """The ``throttle_event`` measurement: one rule transition (pending / firing / resolved /
    inactive, the last for a pending rule whose condition went away before it fired).

    ``gpu`` is a tag (absent for node rules): one rule changes state on several GPUs in the same
    tick, and as a field those points would share series and timestamp and overwrite each other.
    ``value`` is numeric only (a string such as a leak state goes into ``message``), so the
    field keeps one type on every server. ``limit_w`` is the limit written and held (absent in
    dry run), ``limit_target_w`` the one intended.
    """
    numeric = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    tags = {"host": host, "rule": rule, "severity": severity}
    if gpu is not None:
        tags["gpu"] = str(gpu)
    return Point("throttle_event", tags,
                 {"state": state, "action": action, "value": numeric, "limit_w": limit_w,
                  "limit_target_w": limit_target_w, "message": message},
                 ts_ns)


def node_power_point(host: str, site: str, domain: str | None, ts_ns: int, *, gpu_power_w: float,
                     budget_w: float, demand_w: float, flexible_w: Mapping[str, float], floor_w: float,
                     min_w: float, max_w: float, level: str, budget_source: str, lease_age_s: float | None,
                     leases_live: int, refused: Mapping[str, int]) -> Point:
    """The ``node_power`` measurement: the node's share of the site's power caps, every tick.

    ``level`` is ``uncapped`` (the budget leaves the node what it wants), ``capped`` (the budget
    is below it) or ``failsafe`` (no live lease: the configured failsafe budget holds).
    ``flexible_w`` is the total the node could shed down to its floors, ``flexible_<class>_w``
    the part of each priority class; ``demand_w`` the physical estimate of its uncapped draw.
    ``lease_refused_<reason>`` count the leases refused since start, by reason (only reasons
    seen). ``domain`` is the node's leaf in the domains file (absent when none is configured).
    """
    tags = {"host": host, "site": site}
    if domain:
        tags["domain"] = domain
    fields: dict[str, FieldValue] = {
        "gpu_power_w": gpu_power_w, "budget_w": budget_w, "demand_w": demand_w,
        "flexible_w": round(sum(flexible_w.values()), 1), "floor_w": floor_w, "min_w": min_w, "max_w": max_w,
        "level": level, "budget_source": budget_source, "lease_age_s": lease_age_s, "leases_live": leases_live,
    }
    for cls, watts in flexible_w.items():
        fields[f"flexible_{cls}_w"] = watts
    for reason, count in refused.items():
        fields[f"lease_refused_{reason}"] = count
    return Point("node_power", tags, fields, ts_ns)


def gpu_event_point(host: str, ts_ns: int, *, gpu: int, uuid: str, model: str, kind: str, message: str,
                    severity: str, xid: int | None = None, action: str | None = None,
                    action_source: str | None = None, count: int = 1) -> Point:
    """The ``gpu_event`` measurement: something that happened to one GPU (``kind``: ``xid``,
    ``ecc_dbe``, ``ecc_sbe``, ``recovery_action``, ``gpu_lost``, ``gpu_recovered``, the health
    tracker's ``counter_reset`` and ``health``, ...).

    Tags as ``gpu`` plus ``kind`` (a handful of values); ``xid`` is a field (an Xid number names
    no series). ``action`` is the recommended action that decided (``none``, ``reset_gpu``,
    ``drain_node``, or the driver's own), ``action_source`` whose it is (``driver`` or
    ``catalogue``). ``count``: events of the same GPU, kind, Xid and action drained in one tick
    are one point (a flood of thousands a second stays a point a tick); ``message`` is the
    first one's.
    """
    return Point("gpu_event", {"host": host, "gpu": str(gpu), "uuid": uuid, "model": model, "kind": kind},
                 {"xid": xid, "message": message, "action": action, "action_source": action_source,
                  "severity": severity, "count": count},
                 ts_ns)


# Field names of the ``gpu_health`` counters (and the driver's recommended action), as on ``GpuSample``.
HEALTH_COUNTER_FIELDS = ("ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate",
                         "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending",
                         "remap_correctable_rows", "remap_uncorrectable_rows", "remap_pending", "remap_failure",
                         "pcie_replay", "recovery_action", "throttle_power_ns", "throttle_thermal_ns",
                         "throttle_board_limit_ns", "throttle_reliability_ns")


def gpu_health_point(sample: GpuSample, host: str, *, state: str, level: int, reasons: str) -> Point:
    """The ``gpu_health`` measurement: one GPU's health (``state`` ok / warn / fail, ``level``
    0 / 1 / 2 for alerting and graphs, ``reasons`` "; "-joined, empty when ok), the health
    counters it last reported and the driver's ``recovery_action`` (each absent when the device
    does not support it; none on an unreadable GPU, whose sample carries no values).

    NVLink counters are summed over the links (``nvlink_crc_errors`` = CRC flit + CRC data
    errors, ``nvlink_replay_errors``, ``nvlink_recovery_errors``), and a link with errors also
    gets its own fields (``nvlink<N>_crc_errors`` ...): 18 links x 3 counters of zeros in every
    point would say nothing, and the link that misbehaves is what an SRE needs to know.
    """
    fields: dict[str, FieldValue] = {"state": state, "level": level, "reasons": reasons,
                                     "xid_last": sample.xid_last}
    for name in HEALTH_COUNTER_FIELDS:
        fields[name] = getattr(sample, name)
    links = sample.nvlink
    if links:
        totals = nvlink_totals(links)
        fields["nvlink_crc_errors"] = _sum(totals.get("crc_flit"), totals.get("crc_data"))
        fields["nvlink_replay_errors"] = totals.get("replay")
        fields["nvlink_recovery_errors"] = totals.get("recovery")
        for link in links:  # a link with errors also gets its own fields
            for name, value in (("crc", _sum(link.crc_flit, link.crc_data)), ("replay", link.replay),
                                ("recovery", link.recovery)):
                if value:
                    fields[f"nvlink{link.link}_{name}_errors"] = value
    return Point("gpu_health", {"host": host, "gpu": str(sample.index), "uuid": sample.uuid, "model": sample.model},
                 fields, sample.ts_ns)


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)
