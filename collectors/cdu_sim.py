"""A simulated CDU (coolant distribution unit): the coolant plant behind demos and tests.

Two loops, as in a liquid-cooled hall: the **facility** loop (building water into the CDU's heat
exchanger) and the **TCS** loop (technology cooling system: CDU -> rack manifolds -> cold
plates). The TCS supply temperature is held at a set point while the facility water is cold
enough and the pump moves enough coolant; the return temperature rises with the heat load
(``dT = Q / (c * flow)``). Faults are scripted in time:

* ``pump_failure``: the pump stops, TCS flow falls to a residual, the heat exchanger's approach
  widens and the supply climbs, the return climbs faster;
* ``hot_facility``: the facility supply climbs to 40 C, dragging the TCS supply above set point;
* ``leak``: the TCS leak detector reports Warning, then Critical after ``leak_critical_after_s``;
* ``dropout``: a loop (or one field) stops being published (a dead sensor or bridge);
* ``bad_quality``: the TCS loop reports ``quality = 0``;
* ``garbage``: malformed messages are published alongside the good ones (one of each kind of
  bad input the daemon must count and drop).

The model is pure and deterministic for a seed: time advances only through ``step(dt_s, ...)``
and wall time only enters through ``messages(now_wall_ns)``. ``run_publisher`` is the small
async loop that ``agentd sim cdu`` drives; it takes a publish coroutine, so this module needs no
MQTT client. Numbers are plausible for a ~100 kW rack-row CDU with water/PG25, not a calibrated
model of any product.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from collectors.durations import parse_duration_s

FAULT_KINDS = ("pump_failure", "hot_facility", "leak", "dropout", "bad_quality", "garbage")
# Faults of one simulated GPU (collectors.sim.SimBackend plays them; the target is a GPU index):
# ``xid<N>`` (an Xid event; xid79 also makes the GPU fall off the bus), ``ecc_dbe`` (an
# uncorrectable ECC error), ``ecc_sbe`` (corrected errors rising fast), ``row_remap_pending``,
# ``row_remap_failure``. A duration ends the fault as a GPU reset would.
GPU_FAULT_KINDS = ("xid<N>", "ecc_dbe", "ecc_sbe", "row_remap_pending", "row_remap_failure")
_XID_KIND_RE = re.compile(r"^xid([1-9][0-9]{0,3})$")
FORMATS = ("json", "value", "influx")
C_KJ_PER_L_K = 4.0  # volumetric heat capacity of the coolant, kJ/(L K)
DESIGN_LOAD_W = 100_000.0
DESIGN_TCS_FLOW_LPM = 160.0  # at 90 % pump speed; 100 kW -> ~9.4 K rise
FACILITY_FLOW_LPM = 220.0  # at 100 % valve
HOT_FACILITY_C = 40.0
RESIDUAL_FLOW_FRAC = 0.04  # thermosiphon / bypass flow with the pump stopped

# DSX / BMS style point names for the ``value`` format, and the canonical field each maps to.
DSX_NAMES = {
    "supply_temp_c": "RackLiquidSupplyTemperature",
    "return_temp_c": "RackLiquidReturnTemperature",
    "flow_lpm": "RackLiquidFlowRate",
    "supply_pressure_kpa": "RackLiquidSupplyPressure",
    "return_pressure_kpa": "RackLiquidReturnPressure",
    "delta_pressure_kpa": "RackLiquidDifferentialPressure",
    "pump_speed_pct": "CduPumpSpeed",
    "valve_position_pct": "FacilityValvePosition",
    "leak": "LeakDetectorState",
}

# Garbage kinds -> the reason the daemon must count each under (see collectors.coolant.REASONS).
GARBAGE_REASONS = {
    "not_json": "not_json",
    "bad_shape": "bad_shape",
    "wrong_type": "wrong_type",
    "nan": "not_finite",
    "out_of_range": "out_of_range",
    "bad_leak": "bad_leak_state",
    "unknown_field": "unknown_field",
    "too_large": "too_large",
    "ts_future": "ts_future",
    "ts_past": "ts_past",
    "bad_loop": "bad_tag",
    "no_fields": "no_fields",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault: active from ``start_s`` for ``duration_s`` (None = to the end)."""

    kind: str
    start_s: float = 0.0
    duration_s: float | None = None
    # dropout: a loop (facility/tcs) or a field name, default tcs; a GPU fault: the GPU index
    target: str | None = None

    def active(self, t_s: float) -> bool:
        return t_s >= self.start_s and (self.duration_s is None or t_s < self.start_s + self.duration_s)

    @property
    def gpu(self) -> int | None:
        """The GPU index of a GPU fault (None for a CDU fault)."""
        return int(self.target) if is_gpu_kind(self.kind) and self.target is not None else None

    @property
    def xid(self) -> int | None:
        """The Xid of an ``xid<N>`` fault."""
        m = _XID_KIND_RE.match(self.kind)
        return int(m.group(1)) if m else None


def is_gpu_kind(kind: str) -> bool:
    """True for the kinds a simulated GPU plays (``GPU_FAULT_KINDS``), False for the CDU's."""
    return kind in GPU_FAULT_KINDS or _XID_KIND_RE.match(kind) is not None


# KIND[:TARGET][@START][+DURATION], or the older KIND[@START][+DURATION][:TARGET]
_FAULT_RE = re.compile(r"^(?P<kind>[a-z][a-z0-9_]*)(?::(?P<target>[a-z0-9_]+))?"
                       r"(?:@(?P<start>[^@+:]+))?(?:\+(?P<dur>[^@+:]+))?(?::(?P<target_after>[a-z0-9_]+))?$")


def parse_fault(spec: str) -> Fault:
    """``KIND[:TARGET][@START][+DURATION]`` (the older ``KIND[@START][+DURATION][:TARGET]`` too),
    e.g. ``pump_failure@30``, ``leak@60+120``, ``dropout:facility@10+20``, ``garbage``, and the
    GPU faults ``xid79:3@30`` (GPU 3 at 30 s), ``ecc_dbe:0@20``, ``row_remap_pending:1@10+60``.
    START and DURATION are seconds or a duration (``30``, ``30s``, ``2m``). Raises ValueError
    saying what is accepted."""
    m = _FAULT_RE.match(spec.strip())
    kind = m.group("kind") if m else None
    if m is None or kind is None or not (kind in FAULT_KINDS or is_gpu_kind(kind)):
        raise ValueError(f"fault {spec!r}: expected KIND[:TARGET][@START][+DURATION] with KIND one of "
                         f"{', '.join(FAULT_KINDS)} (the CDU's; TARGET only for dropout: a loop or a field) "
                         f"or {', '.join(GPU_FAULT_KINDS)} (one GPU's; TARGET is the GPU index), for "
                         "example pump_failure@30, leak@60+120, xid79:3@30 or ecc_dbe:0@20")
    try:
        start = parse_duration_s(m.group("start")) if m.group("start") else 0.0
        dur = parse_duration_s(m.group("dur")) if m.group("dur") else None
    except ValueError:
        raise ValueError(f"fault {spec!r}: start and duration are seconds or a duration (30, 30s, 2m)") from None
    if m.group("target") and m.group("target_after"):
        raise ValueError(f"fault {spec!r}: give the :TARGET once (KIND:TARGET@START+DURATION)")
    target = m.group("target") or m.group("target_after")
    if is_gpu_kind(kind):
        if target is None or not target.isdigit():
            raise ValueError(f"fault {spec!r}: a GPU fault ({', '.join(GPU_FAULT_KINDS)}) needs the GPU index "
                             f"as its target, e.g. {kind}:3@30 for GPU 3 at 30 s")
        target = str(int(target))
    elif target and kind != "dropout":
        raise ValueError(f"fault {spec!r}: only dropout (a loop or a field) and the GPU faults "
                         f"({', '.join(GPU_FAULT_KINDS)}: a GPU index) take a :TARGET")
    return Fault(kind, start, dur, target)


class CduModel:
    """The plant (see the module docstring). ``step`` advances it, ``messages`` publishes it."""

    def __init__(self, *, site: str = "default", unit: str = "cdu-1", seed: int = 1,
                 faults: Sequence[Fault] = (), fmt: str = "json", topic_prefix: str = "cooling",
                 facility_supply_c: float = 25.0, tcs_setpoint_c: float = 32.0,
                 design_load_w: float = DESIGN_LOAD_W, leak_critical_after_s: float = 30.0,
                 garbage_per_step: int = 3) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
        self.site, self.unit, self.fmt, self.prefix = site, unit, fmt, topic_prefix
        self.faults = list(faults)
        self.rng = random.Random(seed)
        self.design_load_w = design_load_w
        self.facility_nominal_c = facility_supply_c
        self.tcs_setpoint_c = tcs_setpoint_c
        self.leak_critical_after_s = leak_critical_after_s
        self.garbage_per_step = garbage_per_step
        self.t_s = 0.0
        self.heat_load_w = 0.0
        self.facility_supply_c = facility_supply_c
        self.facility_return_c = facility_supply_c + 6.0  # start near steady state at ~80 % load
        self.tcs_supply_c = tcs_setpoint_c
        self.tcs_return_c = tcs_setpoint_c + 8.0
        self.pump_speed_pct = 60.0
        self.valve_pct = 40.0
        self.tcs_flow_lpm = DESIGN_TCS_FLOW_LPM * 60.0 / 90.0
        self.facility_flow_lpm = FACILITY_FLOW_LPM * 0.4
        self.leak = "OK"
        self.published = 0  # good messages produced
        self.garbage = 0  # bad messages produced

    def _on(self, kind: str) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and f.active(self.t_s):
                return f
        return None

    def step(self, dt_s: float, heat_load_w: float) -> None:
        """Advance ``dt_s`` seconds with ``heat_load_w`` going into the TCS loop."""
        self.t_s += dt_s
        self.heat_load_w = q = max(0.0, heat_load_w)
        load = q / self.design_load_w
        k = lambda tau: 1.0 - math.exp(-dt_s / tau)  # noqa: E731  first-order lag factor

        # Pump: speed follows load; a failed pump spins down within seconds.
        target_speed = 0.0 if self._on("pump_failure") else min(100.0, max(35.0, 40.0 + 50.0 * load))
        self.pump_speed_pct += (target_speed - self.pump_speed_pct) * k(2.0)
        self.tcs_flow_lpm = DESIGN_TCS_FLOW_LPM * max(self.pump_speed_pct / 90.0, RESIDUAL_FLOW_FRAC)

        # Facility water: nominal, or drifting hot.
        fac_target = HOT_FACILITY_C if self._on("hot_facility") else self.facility_nominal_c
        self.facility_supply_c += (fac_target - self.facility_supply_c) * k(60.0)

        # Heat exchanger: the facility valve opens with load and when the TCS supply runs above
        # set point; the approach widens with load and with too little flow on the TCS side, so
        # the supply holds its set point only while the facility water is cold enough.
        valve_target = min(100.0, max(10.0, 20.0 + 60.0 * load + 15.0 * (self.tcs_supply_c - self.tcs_setpoint_c)))
        self.valve_pct += (valve_target - self.valve_pct) * k(5.0)
        self.facility_flow_lpm = FACILITY_FLOW_LPM * self.valve_pct / 100.0
        flow_frac = self.tcs_flow_lpm / DESIGN_TCS_FLOW_LPM
        approach = 2.0 * max(load, 0.05) / max(flow_frac, RESIDUAL_FLOW_FRAC) ** 0.6
        supply_target = max(self.tcs_setpoint_c, self.facility_supply_c + approach)
        self.tcs_supply_c += (supply_target - self.tcs_supply_c) * k(20.0)
        rise = min(40.0, q * 60.0 / (C_KJ_PER_L_K * 1000.0 * self.tcs_flow_lpm))
        self.tcs_return_c += (self.tcs_supply_c + rise - self.tcs_return_c) * k(8.0)
        fac_rise = min(30.0, q * 60.0 / (C_KJ_PER_L_K * 1000.0 * max(self.facility_flow_lpm, 1.0)))
        self.facility_return_c += (self.facility_supply_c + fac_rise - self.facility_return_c) * k(15.0)

        leak = self._on("leak")
        if leak is None:
            self.leak = "OK"
        else:
            self.leak = "Warning" if self.t_s - leak.start_s < self.leak_critical_after_s else "Critical"

    def readings(self) -> dict[str, dict[str, float | str]]:
        """What the CDU's sensors read now, per loop, in canonical names (with sensor noise)."""
        g = self.rng.gauss
        speed = self.pump_speed_pct / 100.0
        tcs_sp = 150.0 + 220.0 * speed ** 2
        tcs_rp = 140.0 + 25.0 * speed ** 2 - (25.0 if self.leak == "Critical" else 0.0)
        fac_sp = 300.0
        fac_rp = 300.0 - 90.0 * (self.valve_pct / 100.0) ** 2
        quality = 0.0 if self._on("bad_quality") else 1.0
        tcs: dict[str, float | str] = {
            "supply_temp_c": round(self.tcs_supply_c + g(0, 0.05), 2),
            "return_temp_c": round(self.tcs_return_c + g(0, 0.05), 2),
            "flow_lpm": round(max(0.0, self.tcs_flow_lpm + g(0, 0.5)), 1),
            "supply_pressure_kpa": round(tcs_sp + g(0, 1.0), 1),
            "return_pressure_kpa": round(tcs_rp + g(0, 1.0), 1),
            "pump_speed_pct": round(self.pump_speed_pct, 1),
            "leak": self.leak,
            "quality": quality,
        }
        tcs["delta_pressure_kpa"] = round(tcs["supply_pressure_kpa"] - tcs["return_pressure_kpa"], 1)  # type: ignore[operator]
        fac: dict[str, float | str] = {
            "supply_temp_c": round(self.facility_supply_c + g(0, 0.05), 2),
            "return_temp_c": round(self.facility_return_c + g(0, 0.05), 2),
            "flow_lpm": round(max(0.0, self.facility_flow_lpm + g(0, 0.5)), 1),
            "supply_pressure_kpa": round(fac_sp + g(0, 1.0), 1),
            "return_pressure_kpa": round(fac_rp + g(0, 1.0), 1),
            "valve_position_pct": round(self.valve_pct, 1),
            "quality": 1.0,
        }
        fac["delta_pressure_kpa"] = round(fac["supply_pressure_kpa"] - fac["return_pressure_kpa"], 1)  # type: ignore[operator]
        return {"facility": fac, "tcs": tcs}

    def _dropped(self, loop: str, name: str | None = None) -> bool:
        for f in self.faults:
            if f.kind == "dropout" and f.active(self.t_s):
                target = f.target or "tcs"
                if target == loop or (name is not None and target == name):
                    return True
        return False

    def messages(self, now_wall_ns: int) -> list[tuple[str, bytes]]:
        """This step's MQTT messages ``(topic, payload)`` in the model's format, faults applied."""
        ts_ms = now_wall_ns // 1_000_000
        out: list[tuple[str, bytes]] = []
        for loop, fields in self.readings().items():
            if self._dropped(loop):
                continue
            fields = {k: v for k, v in fields.items() if not self._dropped(loop, k)}
            base = f"{self.prefix}/{self.site}/{self.unit}/{loop}"
            if self.fmt == "json":
                out.append((base, json.dumps({**fields, "ts": ts_ms}, separators=(",", ":")).encode()))
            elif self.fmt == "influx":
                body = ",".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={float(v)!r}"
                                for k, v in fields.items())
                out.append((base, f"coolant {body} {ts_ms * 1_000_000}".encode()))
            else:
                quality = fields.get("quality", 1.0)
                for name, value in fields.items():
                    if name == "quality":
                        continue
                    out.append((f"{base}/{DSX_NAMES[name]}",
                                json.dumps({"value": value, "timestamp": ts_ms, "quality": quality}).encode()))
        self.published += len(out)
        if self._on("garbage"):
            for _ in range(self.garbage_per_step):
                kind = self.rng.choice(list(GARBAGE_REASONS))
                out.append(garbage_message(kind, self.rng, f"{self.prefix}/{self.site}/{self.unit}", now_wall_ns))
                self.garbage += 1
        return out

    def subscription(self) -> dict:
        """A ``coolant.subscriptions`` entry that reads this model's messages (config dict)."""
        return subscription_for(self.fmt, self.prefix)


def subscription_for(fmt: str = "json", prefix: str = "cooling") -> dict:
    """The subscription (config dict) for the simulator's topics in format ``fmt``."""
    if fmt == "value":
        return {"topic": f"{prefix}/+/+/+/+", "format": "value", "topic_tags": {"site": 1, "unit": 2, "loop": 3},
                "field_map": {v: k for k, v in DSX_NAMES.items()}}
    return {"topic": f"{prefix}/+/+/+", "format": fmt, "topic_tags": {"site": 1, "unit": 2, "loop": 3}}


def garbage_message(kind: str, rng: random.Random, base_topic: str, now_wall_ns: int) -> tuple[str, bytes]:
    """One bad message of ``kind`` (a key of GARBAGE_REASONS) on a topic under ``base_topic``
    (``prefix/site/unit``) that the simulator's json subscription matches."""
    topic = f"{base_topic}/tcs"
    ts_ms = now_wall_ns // 1_000_000
    good = {"supply_temp_c": 31.0, "return_temp_c": 40.0, "ts": ts_ms}
    if kind == "not_json":
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))) + b"\xff{"
    elif kind == "bad_shape":
        payload = json.dumps([1, 2, 3]).encode()
    elif kind == "wrong_type":
        payload = json.dumps({**good, "flow_lpm": "fast"}).encode()
    elif kind == "nan":
        payload = b'{"supply_temp_c": NaN, "ts": %d}' % ts_ms
    elif kind == "out_of_range":
        payload = json.dumps({**good, "supply_temp_c": 900.0}).encode()
    elif kind == "bad_leak":
        payload = json.dumps({**good, "leak": "Dripping"}).encode()
    elif kind == "unknown_field":
        payload = json.dumps({**good, "colour": "blue"}).encode()
    elif kind == "too_large":
        payload = json.dumps({**good, "pad": "x" * 70_000}).encode()
    elif kind == "ts_future":
        payload = json.dumps({**good, "ts": ts_ms + 86_400_000}).encode()
    elif kind == "ts_past":
        payload = json.dumps({**good, "ts": ts_ms - 7 * 86_400_000}).encode()
    elif kind == "bad_loop":
        topic = f"{base_topic}/lake"
        payload = json.dumps(good).encode()
    elif kind == "no_fields":
        payload = json.dumps({"ts": ts_ms}).encode()
    else:
        raise ValueError(f"unknown garbage kind {kind!r} (one of {', '.join(GARBAGE_REASONS)})")
    return topic, payload


Publish = Callable[[str, bytes], Awaitable[bool]]


async def run_publisher(model: CduModel, publish: Publish, *, interval_s: float = 1.0,
                        duration_s: float | None = None, heat_load_w: Callable[[float], float] | None = None,
                        wall_ns: Callable[[], int] = time.time_ns,
                        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                        stop: asyncio.Event | None = None,
                        on_step: Callable[[CduModel], None] | None = None) -> int:
    """Step the model and publish its messages every ``interval_s`` (fixed rate) until
    ``duration_s`` or ``stop``. ``heat_load_w(t_s)`` gives the load (default: a steady 80 %).
    Returns how many messages the broker took (``publish`` returns False when disconnected)."""
    load = heat_load_w or (lambda _t: 0.8 * model.design_load_w)
    sent = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = 0
    while (duration_s is None or k * interval_s < duration_s) and not (stop and stop.is_set()):
        model.step(interval_s if k else 0.0, load(model.t_s))
        if on_step is not None:
            on_step(model)
        for topic, payload in model.messages(wall_ns()):
            if await publish(topic, payload):
                sent += 1
        k += 1
        await sleep(max(0.0, start + k * interval_s - loop.time()))
    return sent
