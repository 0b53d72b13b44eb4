"""What a step costs at each DVFS level: the governor's feed-forward model.

``StepPricer`` prices a step (``Step``: rows, query-key pairs, context, logits) at every DVFS level
at once with the one step-cost model (``edgebox.hw.step.step_cost``) on the box's own shards: the
very function the chips are charged with at their current clocks.  The governor prices the step
the engine is about to run, not an average one: a batch's KV cache can outweigh the weights, and
the last, partial chunk of a prompt sits on the roofline ridge and draws more than decode.

``PowerTable`` is the same model tabulated for steady decode at a typical context (the batch loop,
the clock-cap baseline and the no-sensor fallback), plus the busiest chip's peak over every
prompt-chunk size (the over-current check) and the shapes to assume when the engine does not
say what its next step carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from edgebox.hw.step import Step, step_cost

__all__ = ["DECODE", "PREFILL", "Step", "Priced", "StepPricer", "PowerTable"]

DECODE, PREFILL = 0, 1


class Priced(NamedTuple):
    step_s: np.ndarray  # [levels] device seconds
    power_w: np.ndarray  # [levels] box watts over the step
    busy_w: np.ndarray  # [levels] box watts while every chip computes (a chip waiting for
    # the others idles first, so a window ending mid-step sees this)
    chip_peak_w: np.ndarray  # [levels] the busiest chip's power while busy (over-current sees this)


class StepPricer:
    """Prices steps on one box's shards at every level of its profile (all chips at that level)."""

    def __init__(self, box):
        self.work = box.accounting.work
        self.freqs_mhz = np.array(box.profile.freqs_mhz, float)  # [L]

    def price(self, step: Step) -> Priced:
        """The step at every level (arrays over the profile's levels)."""
        c = step_cost(self.work, step, self.freqs_mhz)
        with np.errstate(divide="ignore", invalid="ignore"):
            chip_busy_w = np.where(c.busy_s > 0, c.busy_j / c.busy_s, 0.0)  # [chip, L]
        return Priced(c.step_s, c.energy_j.sum(axis=0) / c.step_s, chip_busy_w.sum(axis=0), chip_busy_w.max(axis=0))


@dataclass(frozen=True)
class PowerTable:
    """Steady decode at a typical context, per (level, batch); the peaks and fallback shapes."""

    levels_mhz: tuple[int, ...]
    max_batch: int
    context: int
    prefill_chunk: int
    # [kind][level][batch - 1], kind DECODE or PREFILL (a full chunk beside batch - 1 decodes)
    box_w: tuple
    step_s: tuple
    tokens_per_s: tuple  # [level][batch - 1], steady decode
    chip_peak_w: tuple  # [level][batch - 1]: the busiest chip, any chunk size
    shapes: tuple  # [level][batch - 1] -> ((seconds, watts, busy watts), ...) every chunk size
    pricer: StepPricer = field(compare=False, repr=False, default=None)

    @classmethod
    def from_box(cls, box, max_batch: int = 16, context: int = 512, prefill_chunk: int = 128) -> PowerTable:
        """``context``: positions each decoding sequence attends to, a typical mid-request value
        (the governor prices the real steps; this table only steers the batch loop)."""
        pricer = StepPricer(box)
        n_levels = len(box.profile.levels)
        box_w = [[[0.0] * max_batch for _ in range(n_levels)] for _ in range(2)]
        step_s = [[[0.0] * max_batch for _ in range(n_levels)] for _ in range(2)]
        tok = [[0.0] * max_batch for _ in range(n_levels)]
        peak = [[0.0] * max_batch for _ in range(n_levels)]
        shapes = [[None] * max_batch for _ in range(n_levels)]
        prompt_at = context // 2
        for b in range(1, max_batch + 1):
            d = pricer.price(Step.decode(b, context))
            f = pricer.price(Step.with_prompt(b - 1, context, prefill_chunk, prompt_at))
            partial = [pricer.price(Step.with_prompt(b - 1, context, r, prompt_at)) for r in range(1, prefill_chunk, 2)]
            for lv in range(n_levels):
                box_w[DECODE][lv][b - 1], step_s[DECODE][lv][b - 1] = float(d.power_w[lv]), float(d.step_s[lv])
                box_w[PREFILL][lv][b - 1], step_s[PREFILL][lv][b - 1] = float(f.power_w[lv]), float(f.step_s[lv])
                tok[lv][b - 1] = b / float(d.step_s[lv])
                every = [d, f] + partial
                peak[lv][b - 1] = max(float(x.chip_peak_w[lv]) for x in every)
                shapes[lv][b - 1] = tuple((float(x.step_s[lv]), float(x.power_w[lv]), float(x.busy_w[lv])) for x in every)
        freeze = lambda x: tuple(tuple(row) for row in x)  # noqa: E731
        return cls(
            box.profile.freqs_mhz,
            max_batch,
            context,
            prefill_chunk,
            tuple(freeze(k) for k in box_w),
            tuple(freeze(k) for k in step_s),
            freeze(tok),
            freeze(peak),
            freeze(shapes),
            pricer,
        )

    @property
    def n_levels(self) -> int:
        return len(self.levels_mhz)

    def _b(self, batch: int) -> int:
        return min(max(int(batch), 1), self.max_batch) - 1

    def power(self, level: int, batch: int, kind: int = DECODE) -> float:
        return self.box_w[kind][level][self._b(batch)]

    def step(self, level: int, batch: int, kind: int = DECODE) -> float:
        return self.step_s[kind][level][self._b(batch)]

    def tokens(self, level: int, batch: int) -> float:
        return self.tokens_per_s[level][self._b(batch)]

    def efficient_level(self, batch: int) -> int:
        """The level with the fewest joules per decoded token at ``batch`` (below it static power
        is paid over longer steps, above it the voltage squares the switching energy)."""
        return min(range(self.n_levels), key=lambda lv: self.power(lv, batch) / self.tokens(lv, batch))

    def chip_peak(self, level: int, batch: int) -> float:
        return self.chip_peak_w[level][self._b(batch)]

    def any_step(self, level: int, batch: int) -> tuple[tuple[float, float, float], ...]:
        """(seconds, watts, busy watts) of every step kind at the typical context: what to assume next when
        the engine does not say."""
        return self.shapes[level][self._b(batch)]

    def mix_tokens(self, target_w: float, batch: int, top: int) -> float | None:
        """Decode tokens/s of the best time-mix of levels 0..top whose mean power is
        ``target_w`` (two neighbours; all time at ``top`` if even that is under).  None: even
        the lowest level draws more."""
        if self.power(0, batch) > target_w:
            return None
        for lv in range(top):
            p0, p1 = self.power(lv, batch), self.power(lv + 1, batch)
            if p1 >= target_w:
                share = (target_w - p0) / (p1 - p0) if p1 > p0 else 0.0
                return self.tokens(lv, batch) + share * (self.tokens(lv + 1, batch) - self.tokens(lv, batch))
        return self.tokens(top, batch)

    def clock_cap(self, budget_w: float, full_load_batch: int | None = None) -> int:
        """The "N W mode" of fixed-clock boxes (Jetson nvpmodel): the highest level whose
        predicted full-load power (decode or prompt chunks at ``full_load_batch``, default
        max_batch) fits the budget."""
        b = full_load_batch or self.max_batch
        fit = [lv for lv in range(self.n_levels) if max(self.power(lv, b, DECODE), self.power(lv, b, PREFILL)) <= budget_w]
        return self.levels_mhz[fit[-1] if fit else 0]
