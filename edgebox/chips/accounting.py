"""The chips' device time: after each step every chip is charged what the step costs on the
modelled hardware at its current clock, and reports that activity to the firmware.

The cost is ``edgebox.hw.step.step_cost`` (the one step-cost model) evaluated at each chip's own
clock; the firmware turns the reported busy, idle and link intervals into energy with the same
per-interval formulas, so what the governor's table predicts is what the sensors then read.

Energy is booked here too, with those formulas at the clock each interval is reported at, so the
books match the firmware's counters: ``idle_j`` (chips idling between steps, charged to no one),
``step_j`` (every step), and ``last`` (the last step's energy split by what drives it, the four
numbers of a ``Step``; ``edgebox.engine.energy`` says which sequence pays which part).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.hw import cost
from edgebox.hw.profile import ChipProfile
from edgebox.hw.step import ACT_BYTES, ChipWork, Step, StepCost, StepWork, step_cost


def chip_work(chip) -> ChipWork:
    """What a ``Chip`` holds, as the cost model prices it."""
    return ChipWork(
        attn=tuple(tuple(s) for s in chip.attn_matmuls),
        ffn=tuple(tuple(s) for s in chip.ffn_matmuls),
        head=tuple(chip.head_matmuls),
        n_heads=chip.n_heads,
        n_kv=chip.n_kv,
        kv_bytes=chip.kv_bytes_per_layer,
    )


class StepEnergy(NamedTuple):
    """One step's energy on all chips (joules), split by which of the ``Step``'s numbers drives it.

    Each op's time goes to what bounds it on its roofline: a DRAM-bound op's by its bytes (weights,
    a constant, and activations to ``rows_j``; KV reads to ``ctx_j``), a compute-bound op's by its
    ops (matmul rows to ``rows_j``, attention to ``pairs_j``, the lm head to ``logits_j``); the
    ops' switching energy follows their ops and DRAM energy their bytes.  Launch overheads, the
    wait for the slowest chip at each all-reduce and the all-reduces themselves are ``rows_j``;
    the logits gather is ``logits_j``.  The four sum to what the firmware integrated for the step.
    """

    rows_j: float  # by rows: weights streamed, launches, waits, matmul compute, activations, all-reduce
    pairs_j: float  # by rows x context: attention's compute
    ctx_j: float  # by context: KV-cache reads
    logits_j: float  # by logit rows: the lm head's compute, the logits gather
    step: Step
    seconds: float  # the step's device seconds

    @property
    def joules(self) -> float:
        return self.rows_j + self.pairs_j + self.ctx_j + self.logits_j


class Accounting:
    """Charges a box's chips for their steps and idle time; each chip's ``clock_s`` is its device time."""

    def __init__(self, chips: Sequence, args: ModelArgs, profile: ChipProfile):
        self.chips, self.profile = list(chips), profile
        self.work = StepWork(profile, [chip_work(c) for c in self.chips], args.n_embd, args.n_vocab, args.head_dim)
        self.step_j = 0.0  # every step's energy, all chips, since the box started
        self.idle_j = 0.0  # chips idling between steps (no step to charge it to)
        self.last: StepEnergy | None = None  # the last step's

    @property
    def energy_j(self) -> float:
        """All the energy the chips reported to the firmware (what its counters add up to)."""
        return self.step_j + self.idle_j

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
        logits were computed.  A chip behind the others first idles up to the box's clock (idle
        energy, not the step's).  The step's energy is left in ``last``.
        """
        t0 = self.clock_s
        step = Step.of(segments, n_logits)
        freqs = np.array([self.freq_mhz(chip, firmware) for chip in self.chips], float)
        c = step_cost(self.work, step, freqs[:, None])
        step_s = float(c.step_s[0])
        time_of, ops_of, bytes_of = self._drivers(step, freqs)
        ar_s, ar_bytes = self._allreduce(step)
        n, p = len(self.chips), self.profile
        idle_s, behind_s, f_idle, f_busy, f_link = (np.zeros(n) for _ in range(5))
        for i, chip in enumerate(self.chips):
            behind_s[i] = max(t0 - chip.clock_s, 0.0)
            idle_s[i] = t0 + step_s - c.link_s - chip.clock_s - c.busy_s[i, 0]
            f_idle[i], f_busy[i] = self._report(chip, firmware, c.busy_s[i, 0], c.ops[i], c.dram_bytes[i], idle_s=idle_s[i])
            if c.link_s:
                f_link[i] = self._report(chip, firmware, c.link_s, 0.0, 0.0, link_bytes=c.link_bytes)[1]
        # the energy of what was just reported, as the firmware integrated it (at each report's clock)
        idle_s = np.maximum(idle_s, 0.0)
        idle_j = cost.idle_power_w(p, f_idle) * idle_s
        behind = np.minimum(behind_s / np.where(idle_s > 0, idle_s, 1.0), 1.0)  # catching up: idle, no one's
        self.idle_j += float(idle_j @ behind)
        pools = np.zeros(4)  # rows, pairs, ctx, logits
        pools[0] += float(idle_j @ (1.0 - behind))  # waiting for the slowest chip: the step's
        busy_s = c.busy_s[:, 0]
        busy_j = np.where(busy_s > 0, cost.busy_energy_j(p, f_busy, busy_s, c.ops, c.dram_bytes), 0.0)
        time_j = (cost.static_power_w(p, f_busy) + cost.switching_power_full_w(p, f_busy) * p.busy_activity) * busy_s
        bytes_j = np.where(busy_s > 0, c.dram_bytes * p.dram_j_per_byte, 0.0)
        pools += _shares(time_j, time_of) + _shares(bytes_j, bytes_of) + _shares(busy_j - time_j - bytes_j, ops_of)
        if c.link_s:  # the all-reduces' part of the link interval (time and bytes) is the rows', the gather's the logits'
            link_j = float(cost.busy_energy_j(p, f_link, c.link_s, 0.0, 0.0, link_bytes=c.link_bytes).sum())
            link_bytes_j = n * c.link_bytes * p.link_j_per_byte
            ar_j = (link_j - link_bytes_j) * ar_s / c.link_s + link_bytes_j * (ar_bytes / c.link_bytes if c.link_bytes else 1.0)
            pools[0] += ar_j
            pools[3] += link_j - ar_j
        self.last = StepEnergy(*(float(x) for x in pools), step, step_s)
        self.step_j += self.last.joules
        return step_s

    def least_energy_j(self, step: Step) -> float:
        """The step's energy at its cheapest clock (every chip at one level of the profile): what
        it would cost if nobody needed it sooner (``edgebox.engine.energy``'s price of speed)."""
        c = step_cost(self.work, step, np.array(self.profile.freqs_mhz, float))
        return float(c.energy_j.sum(axis=0).min())

    def idle_until(self, t_s: float, firmware) -> None:
        """Every chip idles (clock-gated) until device time ``t_s``."""
        for chip in self.chips:
            idle_s = t_s - chip.clock_s
            f = self._report(chip, firmware, 0.0, 0.0, 0.0, idle_s=idle_s)[0]
            if idle_s > 0:
                self.idle_j += float(cost.idle_power_w(self.profile, f)) * idle_s

    def _drivers(self, step: Step, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each chip's busy seconds, ops and DRAM bytes split over (rows, pairs, ctx, logits): [n, 4] each.

        ``hw.step``'s ops are linear in (rows, pairs, logits) and its bytes in (1, rows, ctx): each
        term goes to its driver (the constant, the weights, to rows).  An op's time follows the
        terms of the roofline side that bounds it at the chip's clock ``freqs`` [n]; its launch
        goes to rows."""
        w, p = self.work, self.profile
        R, P, C, L = step
        zero = np.zeros(len(w.op_chip))
        o = w.ops_of * np.array((R, P, L), float)  # [J, 3]
        b = w.bytes_of * np.array((1, R, C), float)  # [J, 3]
        ops4 = np.stack([o[:, 0], o[:, 1], zero, o[:, 2]], axis=1)  # [J, 4]
        bytes4 = np.stack([b[:, 0] + b[:, 1], zero, b[:, 2], zero], axis=1)
        ops, nbytes = o.sum(axis=1), b.sum(axis=1)
        compute, memory = cost.roofline_s(p, freqs[w.op_chip], ops, nbytes, w.int8[:, 0])
        by_ops = ops4 * (compute / np.where(ops > 0, ops, 1.0))[:, None]
        by_bytes = bytes4 * (memory / np.where(nbytes > 0, nbytes, 1.0))[:, None]
        t = np.where((compute >= memory)[:, None], by_ops, by_bytes)
        t[:, 0] += p.launch_overhead_s
        return w.to_chip @ t, w.to_chip @ ops4, w.to_chip @ bytes4

    def _allreduce(self, step: Step) -> tuple[float, float]:
        """(seconds, bytes sent) of a step's all-reduces on each chip (the rest of its link time is the gather)."""
        n = len(self.chips)
        if n <= 1:
            return 0.0, 0.0
        ar = step.rows * self.work.n_embd * ACT_BYTES
        k = self.work.n_allreduce
        return k * cost.link_time(self.profile, ar, n, "allreduce"), k * cost.link_bytes_sent(ar, n, "allreduce")

    def _report(
        self, chip, firmware, busy_s: float, ops: float, nbytes: float, idle_s: float = 0.0, link_bytes: float = 0.0
    ) -> tuple[float, float]:
        """Report an idle then a busy interval; the clocks the firmware prices each at (the chip's
        clock when it is reported: a tick inside the idle interval may change it)."""
        busy_s, idle_s = float(busy_s), float(idle_s)
        f_idle = self.freq_mhz(chip, firmware)
        if idle_s > 0:
            chip.clock_s += idle_s
            if firmware is not None:
                firmware.idle(chip.index, idle_s)
        f_busy = self.freq_mhz(chip, firmware)
        chip.clock_s += busy_s
        if firmware is not None and busy_s > 0:
            firmware.activity(chip.index, busy_s, float(ops), float(nbytes), link_bytes=link_bytes)
        return f_idle, f_busy


def _shares(joules: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each chip's ``joules`` [n] split in proportion to its ``weights`` [n, 4] (all to rows when
    they are all zero), summed over the chips: [4]."""
    total = weights.sum(axis=1)
    share = np.where(total[:, None] > 0, weights / np.where(total > 0, total, 1.0)[:, None], np.array((1.0, 0.0, 0.0, 0.0)))
    return joules @ share
