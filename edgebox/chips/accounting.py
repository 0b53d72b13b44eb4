"""The chips' device time: after each step every chip is charged what the step costs on the
modelled hardware at its current clock, and reports that activity to the firmware.

The cost is ``edgebox.hw.step.step_cost`` (the one step-cost model) evaluated at each chip's own
clock; the firmware turns the reported busy, idle and link intervals into energy with the same
per-interval formulas, so what the governor's table predicts is what the sensors then read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.hw.profile import ChipProfile
from edgebox.hw.step import ChipWork, Step, StepCost, StepWork, step_cost


def chip_work(chip) -> ChipWork:
    """What a ``Chip`` holds, as the cost model prices it."""
    return ChipWork(
        attn=tuple(tuple(s) for s in chip.attn_matmuls),
        ffn=tuple(tuple(s) for s in chip.ffn_matmuls),
        head=tuple(chip.head_matmuls),
        n_heads=chip.n_heads,
        n_kv=chip.n_kv,
    )


class Accounting:
    """Charges a box's chips for their steps and idle time; each chip's ``clock_s`` is its device time."""

    def __init__(self, chips: Sequence, args: ModelArgs, profile: ChipProfile):
        self.chips, self.profile = list(chips), profile
        self.work = StepWork(profile, [chip_work(c) for c in self.chips], args.n_embd, args.n_vocab, args.head_dim)

    @property
    def clock_s(self) -> float:
        """Device time of the box: the chips meet at every all-reduce, so they share it."""
        return max(chip.clock_s for chip in self.chips)

    def freq_mhz(self, chip, firmware) -> float:
        return firmware.freq_mhz(chip.index) if firmware is not None else self.profile.max_mhz

    def cost(self, step: Step, firmware) -> StepCost:
        """The step at every chip's current clock (one column)."""
        freqs = np.array([[self.freq_mhz(c, firmware)] for c in self.chips], float)  # [n, 1]
        return step_cost(self.work, step, freqs)

    def charge(self, segments: list[tuple[int, int]], n_logits: int, firmware) -> float:
        """Charge every chip for one forward step and report it to ``firmware``; the step's device seconds.

        ``segments``: (rows, context after the step) of each sequence; ``n_logits``: rows whose
        logits were computed.  A chip behind the others first idles up to the box's clock.
        """
        t0 = self.clock_s
        c = self.cost(Step.of(segments, n_logits), firmware)
        step_s = float(c.step_s[0])
        for i, chip in enumerate(self.chips):
            busy_s = float(c.busy_s[i, 0])
            self._report(
                chip,
                firmware,
                busy_s,
                float(c.ops[i]),
                float(c.dram_bytes[i]),
                idle_s=t0 + step_s - c.link_s - chip.clock_s - busy_s,
            )
            if c.link_s:
                self._report(chip, firmware, c.link_s, 0.0, 0.0, link_bytes=c.link_bytes)
        return step_s

    def idle_until(self, t_s: float, firmware) -> None:
        """Every chip idles (clock-gated) until device time ``t_s``."""
        for chip in self.chips:
            self._report(chip, firmware, 0.0, 0.0, 0.0, idle_s=t_s - chip.clock_s)

    @staticmethod
    def _report(chip, firmware, busy_s: float, ops: float, nbytes: float, idle_s: float = 0.0, link_bytes: float = 0.0) -> None:
        if idle_s > 0:
            chip.clock_s += idle_s
            if firmware is not None:
                firmware.idle(chip.index, idle_s)
        chip.clock_s += busy_s
        if firmware is not None and busy_s > 0:
            firmware.activity(chip.index, busy_s, ops, nbytes, link_bytes=link_bytes)
