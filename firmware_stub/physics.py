"""Per-chip physical state integrated over device time: energy, temperature, protections.

Energy per interval comes from ``edgebox.hw.cost`` (one formula for prediction and for the
simulated hardware).  Temperature follows a first-order thermal RC to ambient, stepped with the
exact exponential solution for constant power over an interval, so a long idle interval and
many short ones give the same temperature::

    T(t + dt) = T_ss + (T(t) - T_ss) · exp(-dt / (R·C)),   T_ss = T_ambient + R·P

Protections the runtime cannot override (they cap the clock below scaling_max_freq):
* thermal trip: at temp >= throttle_c the clock is forced to the lowest level until the die
  cools below throttle_c - throttle_hysteresis_c;
* over-current: an interval whose power exceeds over_current_w counts an event (on each rising
  edge) and caps the clock ``over_current_drop_levels`` below the level it ran at, until
  ``over_current_hold_s`` of device time pass without another over-limit interval.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from edgebox.hw.profile import ChipProfile

_EPS_S = 1e-12


def thermal_step(profile: ChipProfile, temp_c: float, power_w: float, dt_s: float) -> float:
    """Die temperature after dt_s seconds at constant power (exact RC solution)."""
    steady_c = profile.ambient_c + profile.thermal_resistance_c_per_w * power_w
    return steady_c + (temp_c - steady_c) * math.exp(-dt_s / profile.thermal_tau_s)


@dataclass(frozen=True)
class ChipState:
    """A consistent snapshot of one chip, in SI units (the files carry hwmon units)."""

    chip: int
    time_s: float  # the chip's device time
    freq_mhz: int  # the clock it runs at now (after protections)
    max_freq_mhz: int  # the runtime's cap (scaling_max_freq)
    voltage_mv: int
    power_w: float  # mean over the last publish interval (power1_input)
    average_power_w: float  # mean over the averaging interval (power1_average)
    last_interval_power_w: float  # the last reported interval's power (what over-current sees)
    energy_j: float  # since start, not wrapped
    energy_counter_uj: int  # energy1_input: wraps
    temp_c: float
    throttle_reasons: tuple[str, ...]  # subset of ("thermal", "critical", "over_current")
    oc_events: int
    thermal_events: int


class ChipPhysics:
    """The integrated state of one chip.  Not thread-safe by itself (Firmware locks it)."""

    def __init__(self, profile: ChipProfile, chip: int, tick_s: float, average_interval_s: float, start_max_mhz: int):
        self.profile = profile
        self.chip = chip
        self.tick_s = tick_s
        self.average_interval_s = average_interval_s
        self.time_s = 0.0  # device seconds
        self.energy_j = 0.0
        self.temp_c = profile.ambient_c
        self.max_level = profile.level_index(start_max_mhz)  # from scaling_max_freq
        self.thermal_throttled = False
        self.critical = False
        self.oc_cap_level: int | None = None  # clock cap while the over-current hold lasts
        self.oc_until_s = 0.0
        self.over_limit = False  # the previous interval was over the limit
        self.oc_events = 0
        self.thermal_events = 0
        self.last_interval_power_w = 0.0
        self.next_tick_s = tick_s
        self.tick_start_s = 0.0  # start of the current publish interval
        self.tick_start_energy_j = 0.0
        self.tick_power_w = 0.0  # mean power of the last completed tick
        self.snapshots: deque[tuple[float, float]] = deque([(0.0, 0.0)])  # (time_s, energy_j)

    # --- clock -----------------------------------------------------------------------------
    def level(self) -> int:
        lv = self.max_level
        if self.oc_cap_level is not None:
            lv = min(lv, self.oc_cap_level)
        if self.thermal_throttled:
            lv = 0
        return lv

    def freq_mhz(self) -> int:
        return self.profile.levels[self.level()].freq_mhz

    def voltage_mv(self) -> int:
        return self.profile.levels[self.level()].voltage_mv

    def throttle_reasons(self) -> tuple[str, ...]:
        reasons = []
        if self.thermal_throttled:
            reasons.append("thermal")
        if self.critical:
            reasons.append("critical")
        if self.oc_cap_level is not None:
            reasons.append("over_current")
        return tuple(reasons)

    # --- integration -----------------------------------------------------------------------
    def run(self, seconds: float, energy_j: float, on_tick) -> None:
        """Advance by an interval of constant power; call on_tick() at each publish boundary.

        The interval is cut at tick boundaries so that averages, published values and the
        thermal trip see the time inside long intervals, not only their end."""
        if seconds <= 0:
            return
        power_w = energy_j / seconds
        self.last_interval_power_w = power_w
        self._over_current(power_w)
        remaining = seconds
        while remaining > _EPS_S:
            # invariant: next_tick_s - time_s > 0, so every piece makes progress
            piece = min(remaining, self.next_tick_s - self.time_s)
            self.time_s += piece
            self.energy_j += power_w * piece
            self.temp_c = thermal_step(self.profile, self.temp_c, power_w, piece)
            self._thermal()
            remaining -= piece
            if self.time_s >= self.next_tick_s - _EPS_S:
                self.close_interval()
                on_tick()
        if self.oc_cap_level is not None and not self.over_limit and self.time_s >= self.oc_until_s:
            self.oc_cap_level = None

    def _over_current(self, power_w: float) -> None:
        p = self.profile
        if power_w > p.over_current_w:
            if not self.over_limit:
                self.oc_events += 1
            self.over_limit = True
            self.oc_cap_level = max(0, self.level() - p.over_current_drop_levels)
            self.oc_until_s = self.time_s + p.over_current_hold_s
        else:
            self.over_limit = False

    def _thermal(self) -> None:
        p = self.profile
        if not self.thermal_throttled and self.temp_c >= p.throttle_c:
            self.thermal_throttled = True
            self.thermal_events += 1
        elif self.thermal_throttled and self.temp_c < p.throttle_c - p.throttle_hysteresis_c:
            self.thermal_throttled = False
        self.critical = self.temp_c >= p.critical_c

    def close_interval(self) -> None:
        """End the current sensor interval at the current time (power1_input, averages)."""
        span = self.time_s - self.tick_start_s
        if span > 0:
            self.tick_power_w = (self.energy_j - self.tick_start_energy_j) / span
        self.tick_start_s, self.tick_start_energy_j = self.time_s, self.energy_j
        while self.next_tick_s <= self.time_s + _EPS_S:
            self.next_tick_s += self.tick_s
        self.snapshots.append((self.time_s, self.energy_j))
        # keep exactly one snapshot at or before the averaging window's start
        horizon = self.time_s - self.average_interval_s
        while len(self.snapshots) > 2 and self.snapshots[1][0] <= horizon + _EPS_S:
            self.snapshots.popleft()

    def average_power_w(self) -> float:
        """Mean power over the averaging interval ending at the last tick (or less, at start)."""
        t0, e0 = self.snapshots[0]
        t1, e1 = self.snapshots[-1]
        if t1 - t0 <= 0:
            return self.tick_power_w
        return (e1 - e0) / (t1 - t0)

    def state(self, energy_wrap_uj: int) -> ChipState:
        return ChipState(
            chip=self.chip,
            time_s=self.time_s,
            freq_mhz=self.freq_mhz(),
            max_freq_mhz=self.profile.levels[self.max_level].freq_mhz,
            voltage_mv=self.voltage_mv(),
            power_w=self.tick_power_w,
            average_power_w=self.average_power_w(),
            last_interval_power_w=self.last_interval_power_w,
            energy_j=self.energy_j,
            energy_counter_uj=int(self.energy_j * 1e6) % energy_wrap_uj,
            temp_c=self.temp_c,
            throttle_reasons=self.throttle_reasons(),
            oc_events=self.oc_events,
            thermal_events=self.thermal_events,
        )
