"""Coolant freshness: the latest value of every sensor, when it turns stale, which sensors the
node depends on, and when a silent one is forgotten. Pure, on an injected monotonic clock.

A *sensor* is one field of one series (``site/loop/unit/point``). Its ``stale_after`` is the
subscription's fixed value when set, else ``max(stale_floor, 3 x observed period)``; until a
period has been seen it is ``max(stale_floor, stale_initial)``. The period is a smoothed
inter-arrival time, so a sensor that publishes every 2 s turns stale after 6 s of silence, one
that publishes every minute after 3 minutes.

Which sensors the node depends on (the fail-safe rules read "stale" as "blind"): a series is
*established* once it has sent ``establish_messages`` (3) messages spread over at least
``establish_s`` (default: ``stale_floor``). Learned rather than configured, so a node protects
itself from its first minute without an inventory, and a CDU swap or a new rack needs no config
change on every node. Until then the series is *on probation*:

* its fresh, good readings count like any other (a hot supply or a leak report is evidence
  whoever sends it, and a new CDU's first hot reading must not wait);
* its silence, a quality other than 1 or an ``Unavailable`` leak detector do **not** degrade
  the loop: absence of news from a unit the node never came to rely on is not a fault. So a
  unit seen once (a misconfigured bridge publishing one message per random topic, a typo in a
  unit name, a test publisher) can never hold the node's GPUs capped, and a burst of three
  messages cannot establish it (they must span ``establish_s``).

What learning cannot tell apart: a sender that invents unit names and repeats each one for
longer than ``establish_s`` gets them established, and their silence then degrades the loop as
a real CDU's would. Only a configured inventory of expected units would separate those; none is
configured today.

An established sensor that goes silent is degraded (stale), fail safe as before, and is
forgotten only after ``expire_after_s`` of silence (the daemon passes ``coolant.max_age``, 1 h
by default: a reading that old would be refused as ``ts_past`` anyway). A forgotten field with no
other sensor reads as absent, which the fail-safe rules treat like stale. Probationary sensors
expire the same way and, when the table is full, the probationary series silent the longest is
evicted to make room for a new one; established sensors are never evicted. The table stays
bounded by ``max_sensors``; a reading that still finds no room is refused (``too_many_sensors``).

Cost: a message costs O(its fields) plus O(log n) when it moves a deadline earlier. A tick's
:meth:`loops` visits only *live* sensors (those not yet past their stale deadline): a sensor
that falls silent is moved out of the scan by a deadline heap, and the silent established ones
are summarised per loop (counts, and one cached tuple for ``degraded_sensors``), so thousands
of dead entries cost a tick nothing. A reading already stale when it arrives (a sender clock
behind, a replayed backlog) stays out of the scan too, so a stream of them costs no review per
message. Every method takes ``now_mono`` (seconds, the daemon's
monotonic clock, which never goes back).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from collectors.coolant_spec import LEAK_RANK, Reading


class SeriesKey(NamedTuple):
    """One measuring point: the four tags of the ``coolant`` measurement."""

    site: str
    loop: str
    unit: str
    point: str

    def __str__(self) -> str:
        return "/".join(p for p in self if p)


SensorStatus = Literal["ok", "stale", "bad_quality", "unavailable"]


@dataclass(slots=True)
class _Sensor:
    value: float | str
    quality: float
    seen_mono: float  # when it was measured, on our monotonic clock (sender age subtracted)
    period_s: float | None = None
    fixed_stale_after_s: float | None = None
    dead: bool = False  # past its stale deadline and out of the tick's scan


@dataclass(slots=True, eq=False)
class _Series:
    key: SeriesKey
    sensors: dict[str, _Sensor]
    first_arrival: float
    last_arrival: float
    messages: int = 0
    established: bool = False
    live: int = 0  # sensors not dead
    wake_at: float = math.inf  # its one current entry in the deadline heap
    least_s: float = 0.0  # the shortest stale_after of its live sensors at the last review (a hint)


class _DeadSensor(NamedTuple):
    """A silent established sensor as a LoopView reports it: what it last said, and when."""

    key: SeriesKey
    field: str
    value: float | str
    quality: float
    seen_mono: float
    stale_after_s: float


class _Loop:
    """One loop's series: the live ones to scan, and a summary of its silent established sensors."""

    __slots__ = ("_dead_view", "dead", "dead_fields", "live", "series")

    def __init__(self) -> None:
        self.series = 0
        self.live: dict[SeriesKey, _Series] = {}
        self.dead: dict[tuple[SeriesKey, str], _Sensor] = {}
        self.dead_fields: dict[str, int] = {}
        self._dead_view: tuple[_DeadSensor, ...] | None = ()

    def add_dead(self, key: SeriesKey, name: str, s: _Sensor) -> None:
        """Count a silent sensor in; if it is in already, its newer (still stale) values show."""
        k = (key, name)
        if k not in self.dead:
            self.dead[k] = s
            self.dead_fields[name] = self.dead_fields.get(name, 0) + 1
        self._dead_view = None

    def changed(self) -> None:
        """A silent sensor's values changed (a reading that was stale on arrival)."""
        self._dead_view = None

    def drop_dead(self, key: SeriesKey, name: str) -> None:
        if self.dead.pop((key, name), None) is not None:
            n = self.dead_fields[name] - 1
            if n:
                self.dead_fields[name] = n
            else:
                del self.dead_fields[name]
            self._dead_view = None

    def dead_view(self, stale_after_s: Callable[[_Sensor], float]) -> tuple[_DeadSensor, ...]:
        """Snapshots of the silent sensors, rebuilt only after one of them changed."""
        if self._dead_view is None:
            self._dead_view = tuple(_DeadSensor(k, n, s.value, s.quality, s.seen_mono, stale_after_s(s))
                                    for (k, n), s in self.dead.items())
        return self._dead_view


@dataclass(slots=True, frozen=True)
class SensorView:
    """One sensor (series + field) as the rules see it: a good value only when ``status == 'ok'``."""

    key: SeriesKey
    field: str
    value: float | str
    quality: float
    age_s: float
    stale_after_s: float
    status: SensorStatus

    @property
    def good(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True, frozen=True)
class FieldAgg:
    """A field across the good sensors of a loop, and how many of its sensors are degraded."""

    min: float | None
    max: float | None
    good: int
    degraded: int


# Which end of a field is the worrying one, for LoopView's headline values.
WORST_IS_MAX = frozenset({"supply_temp_c", "return_temp_c", "delta_temp_c", "supply_pressure_kpa"})


@dataclass(slots=True, frozen=True)
class LoopView:
    """A coolant loop (``facility``/``tcs``) at one instant, worst case over its good sensors.

    ``degraded`` is True when a sensor the node depends on (an established series, see the
    module docstring) is stale, reports quality != 1 or a leak detector reports Unavailable;
    degraded sensors never contribute a value.
    """

    loop: str
    fields: dict[str, FieldAgg]
    leak: str | None  # worst good leak state (Critical > Warning > Unavailable/Absent > OK)
    series: int
    degraded_fields: frozenset[str] = frozenset()  # fields with a degraded sensor ("leak" included)
    now_mono: float = 0.0
    _live_degraded: tuple[SensorView, ...] = ()
    _dead: tuple[_DeadSensor, ...] = field(default=(), repr=False)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_fields)

    @property
    def degraded_sensors(self) -> tuple[SensorView, ...]:
        """Every degraded sensor of the loop (built on demand: a tick never needs the list)."""
        now = self.now_mono
        dead = tuple(SensorView(d.key, d.field, d.value, d.quality, now - d.seen_mono, d.stale_after_s, "stale")
                     for d in self._dead)
        return self._live_degraded + dead

    def worst(self, name: str) -> float | None:
        """The worrying end of ``name``: max for temperatures and supply pressure, else min."""
        agg = self.fields.get(name)
        if agg is None:
            return None
        return agg.max if name in WORST_IS_MAX else agg.min

    def is_degraded(self, name: str) -> bool:
        """True when a sensor of ``name`` in this loop is degraded (the rule's ``stale`` case)."""
        return name in self.degraded_fields

    @property
    def supply_temp_c(self) -> float | None:
        return self.worst("supply_temp_c")

    @property
    def return_temp_c(self) -> float | None:
        return self.worst("return_temp_c")

    @property
    def delta_temp_c(self) -> float | None:
        return self.worst("delta_temp_c")

    @property
    def flow_lpm(self) -> float | None:
        return self.worst("flow_lpm")


class CoolantState:
    """Latest value of every coolant sensor with its freshness (see the module docstring)."""

    def __init__(self, *, stale_floor_s: float = 5.0, stale_initial_s: float = 30.0,
                 max_sensors: int = 10_000, establish_messages: int = 3, establish_s: float | None = None,
                 expire_after_s: float = 3600.0) -> None:
        self.stale_floor_s = stale_floor_s
        self.stale_initial_s = stale_initial_s
        self.max_sensors = max_sensors
        self.establish_messages = establish_messages
        self.establish_s = stale_floor_s if establish_s is None else establish_s
        self.expire_after_s = expire_after_s
        self.expired = 0  # sensors forgotten after expire_after_s of silence
        self.evicted = 0  # probationary sensors dropped to make room
        self._series: dict[SeriesKey, _Series] = {}
        self._loops: dict[str, _Loop] = {}
        self._probation: dict[SeriesKey, _Series] = {}  # least recently heard from first
        self._wakeups: list[tuple[float, int, SeriesKey]] = []  # (when, seq, series): a heap
        self._seq = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def is_established(self, key: SeriesKey) -> bool:
        """Whether the node depends on this series (its silence degrades the loop)."""
        series = self._series.get(key)
        return series is not None and series.established

    # -- taking readings -----------------------------------------------------------------------

    def update(self, reading: Reading, arrival_mono: float, arrival_wall_ns: int) -> dict[str, float] | None:
        """Take one reading; returns extra fields derived from earlier readings (delta_temp_c
        when the two temperatures arrived in separate messages), or None when the sensor table
        is full even after evicting probationary series (the reading is refused, counted as
        ``too_many_sensors``)."""
        if self._wakeups and self._wakeups[0][0] < arrival_mono:
            self.expire(arrival_mono)
        key = SeriesKey(reading.site, reading.loop, reading.unit, reading.point)
        series = self._series.get(key)
        fields = reading.fields
        if self._count + len(fields) > self.max_sensors:  # only then count what is new
            known = series.sensors if series is not None else {}
            new = sum(1 for name in fields if name != "quality" and name not in known)
            if new and self._count + new > self.max_sensors and not self._make_room(new, key):
                return None
        if series is None:
            series = self._add_series(key, arrival_mono)
        sensors = series.sensors
        live_before = series.live
        seen = arrival_mono
        if reading.ts_ns is not None:
            age_s = (arrival_wall_ns - reading.ts_ns) / 1e9
            if age_s > 0:
                seen = arrival_mono - age_s
        quality = fields.get("quality", 1.0)
        fixed = reading.stale_after_s
        floor = self.stale_floor_s
        # Every stale_after of this reading is at least `least` (the fixed value, else the floor):
        # a reading younger than that is fresh for all its sensors, with no per-field limit to work
        # out. The review is due at seen + the shortest stale_after seen at the last review: if a
        # period shrank since, the review comes late, which only keeps a stale sensor in the scan
        # a little longer (the scan itself always judges freshness exactly).
        least = fixed if fixed is not None else floor
        all_fresh = arrival_mono - seen < least
        wake = seen + max(least, series.least_s) if all_fresh else math.inf
        touched_dead = False
        for name, value in fields.items():
            if name == "quality":
                continue
            s = sensors.get(name)
            if s is None:
                s = sensors[name] = _Sensor(value, quality, seen, None, fixed)  # type: ignore[arg-type]
                series.live += 1
                self._count += 1
            else:
                dt = seen - s.seen_mono
                if dt <= 0:
                    continue  # older than what we hold (replay, reordering): stored, not state
                if dt > 0.001:
                    p = s.period_s
                    s.period_s = dt if p is None else p + 0.2 * (min(dt, 4.0 * p) - p)
                s.value = value
                s.quality = quality  # type: ignore[assignment]
                s.seen_mono = seen
                s.fixed_stale_after_s = fixed
            if all_fresh:
                if s.dead:
                    self._revive(series, name, s)
                continue
            limit = self.stale_after_s(s)
            deadline = seen + limit
            if deadline > arrival_mono:  # fresh: in the scan until its deadline
                if s.dead:
                    self._revive(series, name, s)
            else:
                # Stale on arrival (a sender clock behind, a replayed backlog): it stays out of
                # the scan, so a stream of such readings costs no review per message.
                if not s.dead:
                    s.dead = True
                    series.live -= 1
                    if series.established:
                        self._loops[key.loop].add_dead(key, name, s)
                elif series.established:
                    touched_dead = True  # its newer values show in degraded_sensors
                deadline = seen + max(limit, self.expire_after_s)
            if deadline < wake:
                wake = deadline
        if wake < series.wake_at:
            series.wake_at = wake
            heapq.heappush(self._wakeups, (wake, next(self._seq), key))
        if touched_dead:
            self._loops[key.loop].changed()
        if (series.live > 0) != (live_before > 0):  # into or out of the tick's scan
            live = self._loops[key.loop].live
            if series.live:
                live[key] = series
            else:
                live.pop(key, None)
        series.messages += 1
        series.last_arrival = arrival_mono
        if not series.established:
            self._on_probation(series, arrival_mono)
        if "delta_temp_c" in fields or ("supply_temp_c" not in fields and "return_temp_c" not in fields):
            return {}
        return self._derive_delta(series, seen, fixed, arrival_mono)

    def _add_series(self, key: SeriesKey, arrival_mono: float) -> _Series:
        series = self._series[key] = _Series(key, {}, arrival_mono, arrival_mono)
        idx = self._loops.get(key.loop)
        if idx is None:
            idx = self._loops[key.loop] = _Loop()
        idx.series += 1
        self._probation[key] = series
        return series

    def _on_probation(self, series: _Series, arrival_mono: float) -> None:
        """One more message of a series not yet established: establish it once it has earned it."""
        key = series.key
        del self._probation[key]
        if (series.messages >= self.establish_messages
                and arrival_mono - series.first_arrival >= self.establish_s):
            series.established = True
            idx = self._loops[key.loop]
            for name, s in series.sensors.items():  # its silent sensors now count as degraded
                if s.dead:
                    idx.add_dead(key, name, s)
        else:
            self._probation[key] = series  # to the end: the most recently heard from

    def _revive(self, series: _Series, name: str, s: _Sensor) -> None:
        s.dead = False
        series.live += 1
        if series.established:
            self._loops[series.key.loop].drop_dead(series.key, name)

    def _derive_delta(self, series: _Series, seen: float, fixed: float | None, now: float) -> dict[str, float]:
        """delta_temp_c from the two temperatures when one of them just arrived and both are fresh."""
        sensors = series.sensors
        sup, ret = sensors.get("supply_temp_c"), sensors.get("return_temp_c")
        if sup is None or ret is None:
            return {}
        if self._status(sup, now)[0] != "ok" or self._status(ret, now)[0] != "ok":
            return {}
        delta = round(ret.value - sup.value, 6)  # type: ignore[operator]
        d = sensors.get("delta_temp_c")
        if d is None:
            if self._count >= self.max_sensors:
                return {"delta_temp_c": delta}  # stored with the reading; no room to track it
            d = sensors["delta_temp_c"] = _Sensor(delta, 1.0, seen, None, fixed)
            series.live += 1
            self._count += 1
        else:
            d.value, d.quality, d.seen_mono, d.fixed_stale_after_s = delta, 1.0, max(seen, d.seen_mono), fixed
            if d.dead:
                self._revive(series, "delta_temp_c", d)
        self._schedule(series, d)
        return {"delta_temp_c": delta}

    # -- deadlines, expiry and eviction ----------------------------------------------------------

    def _schedule(self, series: _Series, s: _Sensor) -> None:
        """Make sure the series is reviewed by the time ``s`` turns stale."""
        at = s.seen_mono + self.stale_after_s(s)
        if at < series.wake_at:
            series.wake_at = at
            heapq.heappush(self._wakeups, (at, next(self._seq), series.key))

    def expire(self, now_mono: float) -> None:
        """Move sensors past their stale deadline out of the scan; forget long-silent ones.

        Called by :meth:`update` and :meth:`loops`; cheap when nothing is due.
        """
        heap = self._wakeups
        while heap and heap[0][0] < now_mono:
            at, _, key = heapq.heappop(heap)
            series = self._series.get(key)
            if series is None or series.wake_at != at:
                continue  # superseded by an earlier entry for the same series
            series.wake_at = math.inf
            self._review(series, now_mono)
        if len(heap) > 2 * len(self._series) + 64:  # superseded entries: rebuild from the live ones
            self._wakeups = [(s.wake_at, next(self._seq), k) for k, s in self._series.items()
                             if s.wake_at != math.inf]
            heapq.heapify(self._wakeups)

    def _review(self, series: _Series, now: float) -> None:
        key = series.key
        idx = self._loops[key.loop]
        keep = self.expire_after_s
        nxt = math.inf
        least = math.inf
        for name, s in list(series.sensors.items()):
            limit = self.stale_after_s(s)
            age = now - s.seen_mono
            if not s.dead:
                if age <= limit:
                    nxt = min(nxt, s.seen_mono + limit)
                    least = min(least, limit)
                    continue
                s.dead = True
                series.live -= 1
                if series.established:
                    idx.add_dead(key, name, s)
            if age > max(limit, keep):
                del series.sensors[name]
                self._count -= 1
                self.expired += 1
                if series.established:
                    idx.drop_dead(key, name)
            else:
                nxt = min(nxt, s.seen_mono + max(limit, keep))
        if not series.sensors:
            self._drop_series(series)
            return
        if not series.live:
            idx.live.pop(key, None)
        series.least_s = 0.0 if least == math.inf else least
        if nxt != math.inf:
            nxt = max(nxt, math.nextafter(now, math.inf))  # float rounding must not stall the heap
            series.wake_at = nxt
            heapq.heappush(self._wakeups, (nxt, next(self._seq), key))

    def _dead_record(self, key: SeriesKey, name: str, s: _Sensor) -> _DeadSensor:
        return _DeadSensor(key, name, s.value, s.quality, s.seen_mono, self.stale_after_s(s))

    def _drop_series(self, series: _Series) -> None:
        key = series.key
        del self._series[key]
        self._probation.pop(key, None)
        idx = self._loops[key.loop]
        idx.live.pop(key, None)
        for name in series.sensors:
            idx.drop_dead(key, name)
        idx.series -= 1
        if not idx.series:
            del self._loops[key.loop]
        series.wake_at = math.inf  # any heap entry left for it is now superseded

    def _make_room(self, need: int, keep: SeriesKey) -> bool:
        """Evict probationary series, least recently heard from first, until ``need`` fit."""
        probation = self._probation
        while self._count + need > self.max_sensors and probation:
            key = next(iter(probation))
            if key == keep:  # the one being heard from now: never its own victim
                if len(probation) == 1:
                    break
                probation[key] = probation.pop(key)
                continue
            series = probation[key]
            self._count -= len(series.sensors)
            self.evicted += len(series.sensors)
            self._drop_series(series)
        return self._count + need <= self.max_sensors

    # -- reading the state ---------------------------------------------------------------------

    def stale_after_s(self, s: _Sensor) -> float:
        if s.fixed_stale_after_s is not None:
            return s.fixed_stale_after_s
        if s.period_s is None:
            return max(self.stale_floor_s, self.stale_initial_s)
        return max(self.stale_floor_s, 3.0 * s.period_s)

    def _status(self, s: _Sensor, now_mono: float) -> tuple[SensorStatus, float, float]:
        age = now_mono - s.seen_mono
        limit = self.stale_after_s(s)
        if age > limit:
            return "stale", age, limit
        if s.quality != 1:
            return "bad_quality", age, limit
        if s.value == "Unavailable":
            return "unavailable", age, limit
        return "ok", age, limit

    def sensor(self, key: SeriesKey, name: str, now_mono: float) -> SensorView | None:
        """One sensor's view, or None when it is not in the table (never seen, or forgotten)."""
        series = self._series.get(key)
        s = series.sensors.get(name) if series is not None else None
        if s is None:
            return None
        status, age, limit = self._status(s, now_mono)
        return SensorView(key, name, s.value, s.quality, age, limit, status)

    def sensors(self, now_mono: float) -> list[SensorView]:
        """Every sensor, sorted by series and field (for the API and the demo view)."""
        out = []
        for key in sorted(self._series):
            sensors = self._series[key].sensors
            for name in sorted(sensors):
                status, age, limit = self._status(sensors[name], now_mono)
                s = sensors[name]
                out.append(SensorView(key, name, s.value, s.quality, age, limit, status))
        return out

    def loop(self, loop: str, now_mono: float, *, site: str | None = None, unit: str | None = None) -> LoopView:
        """The worst case over one loop's sensors (optionally one site / unit)."""
        self.expire(now_mono)
        if site is None and unit is None:
            idx = self._loops.get(loop)
            if idx is None:
                return LoopView(loop, {}, None, 0, now_mono=now_mono)
            return self._aggregate(loop, idx.live.values(), now_mono, idx.series, idx)
        chosen = [s for k, s in self._series.items() if k.loop == loop
                  and (site is None or k.site == site) and (unit is None or k.unit == unit)]
        return self._aggregate(loop, chosen, now_mono, len(chosen), None)

    def loops(self, now_mono: float, *, site: str | None = None) -> dict[str, LoopView]:
        """Every loop seen so far (``facility``, ``tcs``) -> its LoopView."""
        self.expire(now_mono)
        if site is None:
            names = sorted(self._loops)
        else:
            names = sorted({k.loop for k in self._series if k.site == site})
        return {name: self.loop(name, now_mono, site=site) for name in names}

    def _aggregate(self, loop: str, series_iter: Iterable[_Series], now: float, n_series: int,
                   idx: _Loop | None) -> LoopView:
        """Worst case over ``series_iter``; with ``idx`` its dead sensors come from the summary
        (the iterable then holds live series only), without it they are read inline."""
        mins: dict[str, float] = {}
        maxs: dict[str, float] = {}
        good: dict[str, int] = {}
        bad: dict[str, int] = dict(idx.dead_fields) if idx is not None else {}
        degraded: list[SensorView] = []
        dead: list[_DeadSensor] = []
        leak: str | None = None
        status_of = self._status
        floor, initial = self.stale_floor_s, max(self.stale_floor_s, self.stale_initial_s)
        for series in series_iter:
            established = series.established
            key = series.key
            for name, s in series.sensors.items():
                if s.dead:
                    if idx is None and established:
                        dead.append(self._dead_record(key, name, s))
                        bad[name] = bad.get(name, 0) + 1
                    continue
                # the "ok" test of _status, inlined: this runs per live sensor per tick
                limit = s.fixed_stale_after_s
                if limit is None:
                    p = s.period_s
                    limit = initial if p is None else (3.0 * p if 3.0 * p > floor else floor)
                v = s.value
                if now - s.seen_mono > limit or s.quality != 1 or v == "Unavailable":
                    if established:
                        status, age, limit = status_of(s, now)
                        bad[name] = bad.get(name, 0) + 1
                        degraded.append(SensorView(key, name, v, s.quality, age, limit, status))
                    continue
                if name == "leak":
                    if leak is None or LEAK_RANK[v] > LEAK_RANK[leak]:  # type: ignore[index]
                        leak = v  # type: ignore[assignment]
                    continue
                if name in mins:
                    good[name] += 1
                    if v < mins[name]:  # type: ignore[operator]
                        mins[name] = v  # type: ignore[assignment]
                    elif v > maxs[name]:  # type: ignore[operator]
                        maxs[name] = v  # type: ignore[assignment]
                else:
                    good[name] = 1
                    mins[name] = maxs[name] = v  # type: ignore[assignment]
        aggs = {name: FieldAgg(mins.get(name), maxs.get(name), good.get(name, 0), bad.get(name, 0))
                for name in (good.keys() | bad.keys()) if name != "leak"}
        return LoopView(loop, aggs, leak, n_series, frozenset(bad), now,
                        tuple(degraded), idx.dead_view(self.stale_after_s) if idx is not None else tuple(dead))
