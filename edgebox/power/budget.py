"""The power budget as windows of energy: a rolling 1 s average and a 100 ms ceiling.

The budget (edgebox/power/README.md) is a statement about energy in windows, not about any
instantaneous reading: average power <= B over every rolling 1 s window and <= 1.2 B over every
100 ms window.  Two tools here:

* ``Budget``: the numbers (B, the windows, the short-window factor) and ``check`` of a trace.
* ``EnergyLog``: cumulative energy samples ``(t_s, energy_j)``; energy between any two times by
  linear interpolation (exact when power is constant between samples, as it is between the
  firmware's activity reports), window averages on a grid, rolling averages.  The governor keeps
  a short one of sensor samples (its own view, lagging by the sensor's publish interval); the
  simulator keeps a full one of the firmware's exact activity (the ground truth it reports).

Everything is in device time when the chips are simulated, wall time on hardware.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

LONG_WINDOW_S = 1.0
SHORT_WINDOW_S = 0.1
SHORT_FACTOR = 1.2


@dataclass(frozen=True)
class Budget:
    """Average power <= watts over every ``long_s`` window and <= short_factor x watts over every
    ``short_s`` window."""

    watts: float = 10.0
    long_s: float = LONG_WINDOW_S
    short_s: float = SHORT_WINDOW_S
    short_factor: float = SHORT_FACTOR

    def __post_init__(self) -> None:
        if not (math.isfinite(self.watts) and self.watts > 0):
            raise ValueError(f"a power budget must be a positive number of watts, got {self.watts!r}")
        if not (0 < self.short_s < self.long_s and self.short_factor >= 1):
            raise ValueError("budget windows: need 0 < short_s < long_s and short_factor >= 1")

    @property
    def short_watts(self) -> float:
        return self.watts * self.short_factor

    def with_watts(self, watts: float) -> Budget:
        return Budget(watts, self.long_s, self.short_s, self.short_factor)


@dataclass
class EnergyLog:
    """Cumulative energy against time, appended in time order.  ``horizon_s`` (optional) drops
    samples older than that behind the newest, keeping one at or before the horizon so a window
    reaching back that far still interpolates."""

    horizon_s: float | None = None
    t: list[float] = field(default_factory=list)
    e: list[float] = field(default_factory=list)

    def add(self, t_s: float, energy_j: float) -> None:
        if self.t and t_s < self.t[-1]:
            raise ValueError(f"EnergyLog: time went back ({t_s} after {self.t[-1]})")
        if self.t and t_s == self.t[-1]:
            self.e[-1] = energy_j  # same instant: the later total wins
        else:
            self.t.append(t_s)
            self.e.append(energy_j)
        if self.horizon_s is not None:
            cut = bisect.bisect_right(self.t, t_s - self.horizon_s) - 1
            if cut > 0:
                del self.t[:cut], self.e[:cut]

    @property
    def start_s(self) -> float:
        return self.t[0] if self.t else 0.0

    @property
    def end_s(self) -> float:
        return self.t[-1] if self.t else 0.0

    def energy_at(self, t_s: float) -> float:
        """Energy at ``t_s`` (clamped to the logged span), linear between samples."""
        t, e = self.t, self.e
        if not t:
            return 0.0
        if t_s <= t[0]:
            return e[0]
        if t_s >= t[-1]:
            return e[-1]
        i = bisect.bisect_right(t, t_s)
        t0, t1 = t[i - 1], t[i]
        return e[i - 1] + (e[i] - e[i - 1]) * (t_s - t0) / (t1 - t0)

    def average_w(self, t0_s: float, t1_s: float) -> float:
        """Mean power over [t0, t1] (clamped to the logged span; 0 for an empty span)."""
        t0_s, t1_s = max(t0_s, self.start_s), min(t1_s, self.end_s)
        if t1_s <= t0_s:
            return 0.0
        return (self.energy_at(t1_s) - self.energy_at(t0_s)) / (t1_s - t0_s)

    def windows(
        self, window_s: float, t_end_s: float | None = None, step_s: float | None = None, t_start_s: float = 0.0
    ) -> list[float]:
        """Averages of the windows [t - window_s, t] for t = t_start + window_s, + step, ... up to
        t_end (default: the end of the log).  step_s=None: back to back (one per window)."""
        step = window_s if step_s is None else step_s
        end = self.end_s if t_end_s is None else t_end_s
        out = []
        k = 0
        while True:
            t = t_start_s + window_s + k * step
            if t > end + 1e-9:
                break
            out.append(self.average_w(t - window_s, t))
            k += 1
        return out


@dataclass(frozen=True)
class Timeline:
    """The budget in force over time: ``steps`` are (from device second, watts), the first at or
    before the start."""

    steps: tuple[tuple[float, float], ...]

    def at(self, t_s: float) -> float:
        w = self.steps[0][1]
        for since, watts in self.steps:
            if t_s >= since:
                w = watts
        return w

    def most_in(self, t0_s: float, t1_s: float) -> float:
        """The highest budget in force at any time in [t0, t1)."""
        return max([self.at(t0_s)] + [w for since, w in self.steps if t0_s < since < t1_s])


@dataclass(frozen=True)
class WindowReport:
    """How a power trace measured up to a budget (``check``)."""

    long_windows: int
    long_within_fraction: float  # rolling 1 s windows <= their budget
    worst_long_ratio: float  # worst 1 s window / its budget
    worst_long_end_s: float
    worst_short_ratio: float  # worst 100 ms window / its budget (the limit is short_factor)
    worst_short_end_s: float

    def ok(self, within: float = 0.99, long_limit: float = 1.05, short_limit: float = SHORT_FACTOR) -> bool:
        return (
            self.long_within_fraction >= within and self.worst_long_ratio <= long_limit and self.worst_short_ratio <= short_limit
        )


def check(
    log: EnergyLog,
    timeline: Timeline,
    t_start_s: float,
    t_end_s: float,
    *,
    step_s: float = 0.01,
    budget: Budget = Budget(),
    skip: tuple[tuple[float, float], ...] = (),
) -> WindowReport:
    """Rolling windows ending every ``step_s``: 1 s windows ending in [t_start, t_end] (except
    those ending inside a ``skip`` interval: the settling after a budget step, judged apart),
    each against the budget in force at its end; 100 ms windows ending in [short_s, t_end],
    each against the highest budget in force during it (a step's power cannot change mid-step,
    so a window that began under the old budget is held to the looser of the two)."""
    eps = 1e-9
    n = ok = 0
    worst_long = worst_short = 0.0
    worst_long_t = worst_short_t = 0.0
    ends = _grid(max(t_start_s, budget.long_s), t_end_s, step_s)
    for t in ends:
        if any(a <= t < b for a, b in skip):
            continue
        ratio = log.average_w(t - budget.long_s, t) / timeline.at(t)
        n += 1
        ok += ratio <= 1 + eps
        if ratio > worst_long:
            worst_long, worst_long_t = ratio, t
    for t in _grid(budget.short_s, t_end_s, step_s):
        ratio = log.average_w(t - budget.short_s, t) / timeline.most_in(t - budget.short_s, t)
        if ratio > worst_short:
            worst_short, worst_short_t = ratio, t
    return WindowReport(n, ok / n if n else 1.0, worst_long, worst_long_t, worst_short, worst_short_t)


def _grid(t0: float, t1: float, step: float) -> list[float]:
    n = int(math.floor((t1 - t0) / step + 1e-9))
    return [t0 + i * step for i in range(n + 1)] if t1 >= t0 else []
