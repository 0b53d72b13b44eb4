"""The least energy any clock schedule can spend on a given sequence of steps in a given time.

With a fixed batch limit the engine runs the same steps whatever the clocks (the scheduler does
not look at them), so a workload is a sequence of steps and a clock schedule only picks a level
for each.  ``StepPricer`` gives every step's seconds and joules at every level, exactly as the
chips are charged; from those, ``Frontier`` is the lower convex hull of (total seconds, total
joules) over every choice of level per step, time-sharing (dithering) included: for each step
only the efficient part of its own hull counts (from its least-energy level up), and the moves
from one level to the next, taken in order of their price (joules added per second saved), trace
the least energy for every total time.  It is a bound: no governor, static setting or mix of
them running those steps at those levels does better, whatever it knows in advance; a budget's
windows only make it harder.

What it answers (``tools/bench_power.py``): can any schedule be faster than a given run *and*
spend less energy per token on the same work?  If the least energy at that run's time is the
run's own, no.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frontier:
    t0_s: float  # total seconds at every step's least-energy level
    e0_j: float  # the least energy of all (at t0)
    t_s: np.ndarray  # after each move, in price order: total seconds (falling) ...
    e_j: np.ndarray  # ... and total joules (rising)

    @classmethod
    def of(cls, seconds: np.ndarray, joules: np.ndarray) -> Frontier:
        """``seconds``, ``joules``: [steps, levels] (a step absent at a level: inf)."""
        seconds, joules = np.asarray(seconds, float), np.asarray(joules, float)
        # identical steps move together: their moves have the same price
        both = np.concatenate([seconds, joules], axis=1)
        rows, count = np.unique(both, axis=0, return_counts=True)
        n_levels = seconds.shape[1]
        t0 = e0 = 0.0
        d_t, d_e = [], []
        for row, c in zip(rows, count):
            t, e = row[:n_levels], row[n_levels:]
            hull = _efficient_hull(t, e)
            t0 += c * t[hull[0]]
            e0 += c * e[hull[0]]
            for a, b in zip(hull, hull[1:]):
                d_t.append(c * (t[b] - t[a]))  # < 0: faster
                d_e.append(c * (e[b] - e[a]))  # > 0: dearer
        d_t, d_e = np.array(d_t), np.array(d_e)
        order = np.argsort(d_e / -d_t, kind="stable") if len(d_t) else np.array([], int)
        return cls(float(t0), float(e0), t0 + np.cumsum(d_t[order]), e0 + np.cumsum(d_e[order]))

    @property
    def fastest_s(self) -> float:
        return float(self.t_s[-1]) if len(self.t_s) else self.t0_s

    def least_energy_j(self, within_s: float) -> float:
        """The least energy of any schedule finishing the steps within ``within_s`` seconds
        (inf if even the fastest cannot)."""
        if within_s >= self.t0_s:
            return self.e0_j
        if within_s < self.fastest_s * (1 - 1e-12):
            return float("inf")
        t = np.concatenate([[self.t0_s], self.t_s])
        e = np.concatenate([[self.e0_j], self.e_j])
        return float(np.interp(within_s, t[::-1], e[::-1]))

    def least_time_s(self, within_j: float) -> float:
        """The least time of any schedule spending at most ``within_j`` joules (inf if even the
        least-energy one spends more)."""
        if within_j < self.e0_j * (1 - 1e-12):
            return float("inf")
        t = np.concatenate([[self.t0_s], self.t_s])
        e = np.concatenate([[self.e0_j], self.e_j])
        if within_j >= e[-1]:
            return float(t[-1])
        return float(np.interp(within_j, e, t))


def _efficient_hull(t: np.ndarray, e: np.ndarray) -> list[int]:
    """Levels on the lower convex hull of one step's (seconds, joules), from its least-energy
    level towards the fastest, each move saving time at a rising price."""
    ok = np.isfinite(t) & np.isfinite(e)
    idx = [int(i) for i in np.nonzero(ok)[0]]
    start = min(idx, key=lambda i: (e[i], t[i]))
    pts = sorted((i for i in idx if t[i] <= t[start]), key=lambda i: -t[i])  # slowest first
    hull: list[int] = []
    for i in pts:
        if i != start and e[i] < e[start]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # keep b only if the price a->b is below the price b->i (convex)
            if (e[b] - e[a]) * (t[b] - t[i]) >= (e[i] - e[b]) * (t[a] - t[b]):
                hull.pop()
            else:
                break
        if hull and t[i] >= t[hull[-1]]:
            continue
        hull.append(i)
    return hull
