"""What a step costs at each DVFS level: the governor's feed-forward model.

``StepPricer`` prices one engine step (device seconds, box energy, the busiest chip's power) at
every DVFS level at once, with the formulas the chips charge and the firmware integrates
(``Box.account_step``: roofline per op at the chip's clock plus launch overhead, chips lock-stepped
at every all-reduce, ring collectives; ``cost.busy_energy_j`` / ``idle_power_w``).  A step is
described by the four numbers that pricing depends on::

    Step(rows, attn_pairs, ctx_total, n_logits)
    rows:       tokens through every matrix (one per decoding sequence + the prompt chunk)
    attn_pairs: sum over sequences of rows x context after the step (query-key pairs)
    ctx_total:  sum over sequences of the context after the step (KV read once per sequence)
    n_logits:   rows whose logits are computed

so the governor can price the step the engine is about to run, not an average one: the KV cache
of 16 sequences at 800 positions is 1.6x the weights per chip, and the last, partial chunk of a
prompt sits on the roofline ridge (compute and DRAM both saturated) and draws 15-17 % more than
decode.

``PowerTable`` is the same model tabulated for steady decode at a typical context (what the
batch loop, the clock-cap baseline and the no-sensor fallback need), plus the busiest chip's peak
over every prompt-chunk size (the over-current check) and the shapes to assume when the engine
does not say what its next step carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from edgebox.hw import cost
from edgebox.chips.chip import ACT_BYTES, KV_BYTES

DECODE, PREFILL = 0, 1


class Step(NamedTuple):
    rows: int
    attn_pairs: int
    ctx_total: int
    n_logits: int

    @classmethod
    def decode(cls, batch: int, context: int) -> "Step":
        return cls(batch, batch * context, batch * context, batch)

    @classmethod
    def with_prompt(cls, decoding: int, context: int, prompt_rows: int, prompt_at: int, last_chunk: bool = True) -> "Step":
        """``decoding`` sequences at ``context`` plus ``prompt_rows`` of a prompt whose first
        row is at position ``prompt_at``."""
        end = prompt_at + prompt_rows
        return cls(decoding + prompt_rows, decoding * context + prompt_rows * end, decoding * context + end,
                   decoding + (1 if last_chunk else 0))


class Priced(NamedTuple):
    step_s: np.ndarray          # [levels] device seconds
    power_w: np.ndarray         # [levels] box watts over the step
    busy_w: np.ndarray          # [levels] box watts while every chip computes (a chip waiting for
                                # the others idles first, so a window ending mid-step sees this)
    chip_peak_w: np.ndarray     # [levels] the busiest chip's power while busy (over-current sees this)


class StepPricer:
    """Prices steps on one box's shards; built once from ``box`` (its profile, args, chips)."""

    def __init__(self, box):
        p, a = box.profile, box.args
        self.profile, self.n_chips = p, box.n_chips
        self.freqs = np.array(p.freqs_mhz, float) * 1e6                       # [L] Hz
        volts = np.array([lv.voltage_mv for lv in p.levels], float) * 1e-3
        self.static_w = p.static_w_at_reference * (volts * 1e3 / p.reference_mv) ** 2
        self.switch_w = p.c_eff_f * volts ** 2 * self.freqs                    # C V^2 f, activity 1
        self.idle_w = self.static_w + p.idle_activity * self.switch_w
        self.peak_int8 = p.int8_ops_per_cycle * self.freqs
        self.peak_fp16 = p.fp16_ops_per_cycle * self.freqs
        self.bw = np.minimum(p.dram_bytes_per_s, p.fabric_bytes_per_cycle * self.freqs)

        # every op of a step as coefficients: ops = o0 + oR rows + oP pairs + oL logits,
        # bytes = b0 + bR rows + bC ctx; grouped into half-layers (the chips meet after each)
        rows, groups = [], {}
        hd = a.head_dim
        for layer in range(a.n_layer):
            for kind in ("attn", "ffn"):
                key = (kind, tuple(tuple((c.attn_matmuls if kind == "attn" else c.ffn_matmuls)[layer]) for c in box.chips))
                groups[key] = groups.get(key, 0) + 1
        half = []
        for (kind, shapes), count in groups.items():
            h = len(half)
            half.append(count)
            for i, c in enumerate(box.chips):
                for n_out, n_in, w_bytes, int8 in shapes[i]:
                    rows.append((i, h, 0, 2 * n_out * n_in, 0, 0, w_bytes, (n_in + n_out) * ACT_BYTES, 0, int8))
                rows.append((i, h, 0, 2 * a.n_embd, 0, 0, 0, 2 * a.n_embd * 4, 0, False))          # rms_norm
                if kind == "attn" and c.n_heads:
                    rows.append((i, h, 0, 0, 4 * c.n_heads * hd, 0, 0, 0, 2 * c.n_kv * hd * KV_BYTES, False))
        h = len(half)
        half.append(1)                                                                          # the lm head
        for i, c in enumerate(box.chips):
            for n_out, n_in, w_bytes, int8 in c.head_matmuls:
                rows.append((i, h, 0, 0, 0, 2 * n_out * n_in, w_bytes, 0, 0, int8))
        r = np.array(rows, dtype=object)
        self.op_chip = r[:, 0].astype(int)
        self.op_half = r[:, 1].astype(int)
        self.o0, self.oR, self.oP, self.oL = (r[:, j].astype(float) for j in (2, 3, 4, 5))
        self.b0, self.bR, self.bC = (r[:, j].astype(float) for j in (6, 7, 8))
        self.int8 = r[:, 9].astype(bool)
        self.half_count = np.array(half, float)
        self.n_half = len(half)
        self.n_allreduce = 2 * a.n_layer
        self.n_embd, self.n_vocab = a.n_embd, a.n_vocab
        self.launch_s = p.launch_overhead_s

    def price(self, step: Step) -> Priced:
        """The step at every level (arrays over the profile's levels)."""
        p, n = self.profile, self.n_chips
        R, P, C, L = step
        ops = self.o0 + self.oR * R + self.oP * P + self.oL * L                                # [J]
        nbytes = self.b0 + self.bR * R + self.bC * C
        peak = np.where(self.int8[:, None], self.peak_int8[None, :], self.peak_fp16[None, :])  # [J, L]
        t = np.maximum(ops[:, None] / peak, nbytes[:, None] / self.bw[None, :]) + self.launch_s
        t = np.where((ops[:, None] == 0) & (nbytes[:, None] == 0), 0.0, t)                    # absent op
        cell = self.op_chip * self.n_half + self.op_half
        T = np.zeros((n * self.n_half, t.shape[1]))
        np.add.at(T, cell, t)
        T = T.reshape(n, self.n_half, -1)                                                      # [chip, half, L]
        busy = (T * self.half_count[None, :, None]).sum(axis=1)                                # [chip, L]
        work_s = (T.max(axis=0) * self.half_count[:, None]).sum(axis=0)                        # [L]
        chip_ops = np.bincount(self.op_chip, ops * self.half_count[self.op_half], minlength=n)
        chip_bytes = np.bincount(self.op_chip, nbytes * self.half_count[self.op_half], minlength=n)
        link_s = link_j = 0.0
        if n > 1:
            ar, gather = R * self.n_embd * ACT_BYTES, L * self.n_vocab * 4
            link_s = (self.n_allreduce * cost.link_time(p, ar, n, "allreduce")
                      + cost.link_time(p, gather, n, "allgather"))
            link_j = (self.n_allreduce * cost.link_bytes_sent(ar, n, "allreduce")
                      + cost.link_bytes_sent(gather, n, "allgather")) * p.link_j_per_byte
        step_s = work_s + link_s
        with np.errstate(divide="ignore", invalid="ignore"):
            util = np.clip(np.where(busy > 0, chip_ops[:, None] / (self.peak_int8[None, :] * busy), 0.0), 0.0, 1.0)
        activity = p.busy_activity + (1.0 - p.busy_activity) * util
        busy_j = (self.static_w + self.switch_w * activity) * busy + chip_bytes[:, None] * p.dram_j_per_byte
        idle_j = self.idle_w * np.maximum(work_s[None, :] - busy, 0.0)
        link_total_j = (self.static_w + self.switch_w * p.busy_activity) * link_s + link_j
        energy = busy_j.sum(axis=0) + idle_j.sum(axis=0) + n * link_total_j
        with np.errstate(divide="ignore", invalid="ignore"):
            chip_busy_w = np.where(busy > 0, busy_j / busy, 0.0)
        return Priced(step_s, energy / step_s, chip_busy_w.sum(axis=0), chip_busy_w.max(axis=0))


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
    tokens_per_s: tuple              # [level][batch - 1], steady decode
    chip_peak_w: tuple               # [level][batch - 1]: the busiest chip, any chunk size
    shapes: tuple                    # [level][batch - 1] -> ((seconds, watts, busy watts), ...) every chunk size
    pricer: StepPricer = field(compare=False, repr=False, default=None)

    @classmethod
    def from_box(cls, box, max_batch: int = 16, context: int = 512, prefill_chunk: int = 128) -> "PowerTable":
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
            partial = [pricer.price(Step.with_prompt(b - 1, context, r, prompt_at))
                       for r in range(1, prefill_chunk, 2)]
            for lv in range(n_levels):
                box_w[DECODE][lv][b - 1], step_s[DECODE][lv][b - 1] = float(d.power_w[lv]), float(d.step_s[lv])
                box_w[PREFILL][lv][b - 1], step_s[PREFILL][lv][b - 1] = float(f.power_w[lv]), float(f.step_s[lv])
                tok[lv][b - 1] = b / float(d.step_s[lv])
                every = [d, f] + partial
                peak[lv][b - 1] = max(float(x.chip_peak_w[lv]) for x in every)
                shapes[lv][b - 1] = tuple((float(x.step_s[lv]), float(x.power_w[lv]), float(x.busy_w[lv])) for x in every)
        freeze = lambda x: tuple(tuple(row) for row in x)  # noqa: E731
        return cls(box.profile.freqs_mhz, max_batch, context, prefill_chunk,
                   tuple(freeze(k) for k in box_w), tuple(freeze(k) for k in step_s), freeze(tok),
                   freeze(peak), freeze(shapes), pricer)

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
        fit = [lv for lv in range(self.n_levels)
               if max(self.power(lv, b, DECODE), self.power(lv, b, PREFILL)) <= budget_w]
        return self.levels_mhz[fit[-1] if fit else 0]
