"""What one engine step costs on N tensor-parallel chips: the one step-cost model.

``step_cost(work, step, freq_mhz)`` gives each chip's device seconds, ops, DRAM bytes, link bytes
and energy for a step, at every clock in ``freq_mhz`` at once.  It is the only place a step is
priced: the chips charge it at their current clocks (``edgebox.chips.accounting``), the governor's
table prices the next step at every DVFS level (``edgebox.power.table``), and ``edgebox plan``
prices steady decode; the firmware integrates the same per-interval formulas (``hw.cost``).

The model of a step: each chip runs its ops of a half-layer back to back (matmuls on its shard,
the replicated rms_norm, attention over its KV heads), each op costing the roofline at the chip's
clock plus a launch; the chips then meet at the half-layer's all-reduce, so the box advances by the
slowest chip and the others idle; the vocab-parallel lm head ends the step with a logits gather.
Every collective is a ring on the links, spent busy by every chip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from edgebox.hw import cost
from edgebox.hw.profile import ChipProfile

KV_BYTES = 2  # float16 KV cache (the default; a chip's own cache types give ChipWork.kv_bytes)
ACT_BYTES = 2  # activations cross the links as fp16

Matmul = tuple[int, int, int, bool]  # (n_out, n_in, weight bytes, int8?) of a matrix as a chip holds it


class Step(NamedTuple):
    """The four numbers a step's cost depends on."""

    rows: int  # tokens through every matrix (one per decoding sequence + the prompt rows)
    attn_pairs: int  # sum over sequences of rows x context after the step (query-key pairs)
    ctx_total: int  # sum over sequences of the context after the step (KV read once per sequence)
    n_logits: int  # rows whose logits are computed

    @classmethod
    def of(cls, segments: Sequence[tuple[int, int]], n_logits: int) -> Step:
        """From (rows, context after the step) of each sequence."""
        return cls(sum(n for n, _ in segments), sum(n * c for n, c in segments), sum(c for _, c in segments), n_logits)

    @classmethod
    def decode(cls, batch: int, context: int) -> Step:
        return cls(batch, batch * context, batch * context, batch)

    @classmethod
    def with_prompt(cls, decoding: int, context: int, prompt_rows: int, prompt_at: int, last_chunk: bool = True) -> Step:
        """``decoding`` sequences at ``context`` plus ``prompt_rows`` of a prompt whose first
        row is at position ``prompt_at``."""
        end = prompt_at + prompt_rows
        return cls(
            decoding + prompt_rows,
            decoding * context + prompt_rows * end,
            decoding * context + end,
            decoding + (1 if last_chunk else 0),
        )


@dataclass(frozen=True)
class ChipWork:
    """What one chip holds of the model, as the hardware prices it."""

    attn: tuple[tuple[Matmul, ...], ...]  # per layer, the attention half's matmuls (q, k, v, o)
    ffn: tuple[tuple[Matmul, ...], ...]  # per layer, the FFN half's matmuls (gate, up, down)
    head: tuple[Matmul, ...]  # its vocabulary slice of the lm head
    n_heads: int  # query heads it attends with
    n_kv: int  # KV heads it caches
    kv_bytes: int | None = None  # one token's K and V of one layer in its cache (None: float16)


class StepWork:
    """A box's per-chip work as coefficients of a ``Step``, built once per box.

    Every op's ops are a linear function of (rows, pairs, logits) and its bytes of (1, rows, ctx).
    Half-layers whose shapes are the same on every chip cost the same, so each distinct one is
    kept once with its count.
    """

    def __init__(self, profile: ChipProfile, chips: Sequence[ChipWork], n_embd: int, n_vocab: int, head_dim: int):
        self.profile, self.n_chips = profile, len(chips)
        self.n_embd, self.n_vocab = n_embd, n_vocab
        n_layer = len(chips[0].attn)
        self.n_allreduce = 2 * n_layer  # one after each half-layer
        groups: dict = {}
        for layer in range(n_layer):
            for kind in ("attn", "ffn"):
                key = (kind, tuple(getattr(c, kind)[layer] for c in chips))
                groups[key] = groups.get(key, 0) + 1
        rows = []  # (chip, half, oR, oP, oL, b0, bR, bC, int8)
        counts = []
        for (kind, shapes), count in groups.items():
            h = len(counts)
            counts.append(count)
            for i, c in enumerate(chips):
                for n_out, n_in, w_bytes, int8 in shapes[i]:
                    rows.append((i, h, 2 * n_out * n_in, 0, 0, w_bytes, (n_in + n_out) * ACT_BYTES, 0, int8))
                rows.append((i, h, 2 * n_embd, 0, 0, 0, 2 * n_embd * 4, 0, False))  # rms_norm (replicated)
                if kind == "attn" and c.n_heads:  # attention over its KV cache
                    kv_bytes = c.kv_bytes if c.kv_bytes is not None else 2 * c.n_kv * head_dim * KV_BYTES
                    rows.append((i, h, 0, 4 * c.n_heads * head_dim, 0, 0, 0, kv_bytes, False))
        h = len(counts)
        counts.append(1)  # the lm head (its rows' logits only)
        for i, c in enumerate(chips):
            for n_out, n_in, w_bytes, int8 in c.head:
                rows.append((i, h, 0, 0, 2 * n_out * n_in, w_bytes, 0, 0, int8))
        r = np.array(rows, dtype=object)
        self.op_chip = r[:, 0].astype(np.intp)  # [J]
        self.ops_of = r[:, 2:5].astype(float)  # [J, 3] x (rows, pairs, logits)
        self.bytes_of = r[:, 5:8].astype(float)  # [J, 3] x (1, rows, ctx)
        self.int8 = r[:, 8].astype(bool)[:, None]  # [J, 1]
        self.counts = np.array(counts, float)  # [H]
        n, n_half = self.n_chips, len(counts)
        # sums over ops as matrix products: into (chip, half) cells, and per chip times the count
        self.to_cell = np.zeros((n * n_half, len(rows)))
        self.to_cell[self.op_chip * n_half + r[:, 1].astype(np.intp), np.arange(len(rows))] = 1.0
        self.to_chip = np.zeros((n, len(rows)))
        self.to_chip[self.op_chip, np.arange(len(rows))] = self.counts[r[:, 1].astype(np.intp)]
        self.n_half = n_half


class StepCost(NamedTuple):
    """A step's cost; ``[n, L]``: per chip and per clock column of ``freq_mhz``."""

    step_s: np.ndarray  # [L] the box's wall: lock-stepped half-layers, then the link
    link_s: float  # ring collectives, every chip busy on the link
    busy_s: np.ndarray  # [n, L] each chip's compute
    idle_s: np.ndarray  # [n, L] each chip waiting for the slowest at the all-reduces
    ops: np.ndarray  # [n]
    dram_bytes: np.ndarray  # [n]
    link_bytes: float  # each chip sends
    busy_j: np.ndarray  # [n, L] energy of the compute
    energy_j: np.ndarray  # [n, L] compute + idle + link
    compute_s: np.ndarray  # [n, L] the roofline terms summed over the chip's ops (what bounds it)
    memory_s: np.ndarray  # [n, L]


def step_cost(work: StepWork, step: Step, freq_mhz) -> StepCost:
    """The step on ``work``'s chips with chip i at clock ``freq_mhz[..., i, l]`` for each column l.

    ``freq_mhz``: [L] (every chip at each clock) or [n, L] (each chip its own clock).
    """
    p, n = work.profile, work.n_chips
    R, P, C, L = step
    f = np.asarray(freq_mhz, float)  # [L] or [n, L] MHz
    f_op = f[work.op_chip] if f.ndim == 2 else f  # [J, L] or [L]
    ops = work.ops_of @ np.array((R, P, L), float)  # [J] (exact: integers)
    nbytes = work.bytes_of @ np.array((1, R, C), float)  # [J]
    compute, memory = cost.roofline_s(p, f_op, ops[:, None], nbytes[:, None], work.int8)
    t = cost.op_seconds(p, compute, memory)  # [J, L]
    cell = (work.to_cell @ t).reshape(n, work.n_half, -1)  # [n, H, L]
    busy = work.to_chip @ t  # [n, L]
    work_s = work.counts @ cell.max(axis=0)  # [L] lock-stepped
    link_s = link_bytes = 0.0
    if n > 1:
        ar, gather = R * work.n_embd * ACT_BYTES, L * work.n_vocab * 4
        link_s = work.n_allreduce * cost.link_time(p, ar, n, "allreduce") + cost.link_time(p, gather, n, "allgather")
        link_bytes = work.n_allreduce * cost.link_bytes_sent(ar, n, "allreduce") + cost.link_bytes_sent(gather, n, "allgather")
    chip_ops, chip_bytes = work.to_chip @ ops, work.to_chip @ nbytes  # [n]
    idle = np.maximum(work_s[None, :] - busy, 0.0)
    busy_j = cost.busy_energy_j(p, f, busy, chip_ops[:, None], chip_bytes[:, None])
    energy = busy_j + cost.idle_power_w(p, f) * idle + cost.busy_energy_j(p, f, link_s, 0.0, 0.0, link_bytes=link_bytes)
    return StepCost(
        work_s + link_s,
        link_s,
        busy,
        idle,
        chip_ops,
        chip_bytes,
        link_bytes,
        busy_j,
        energy,
        work.to_chip @ compute,
        work.to_chip @ memory,
    )


class Decode(NamedTuple):
    """Steady batched decode at each clock column (box totals)."""

    tokens_per_s: np.ndarray  # [L] all sequences together
    power_w: np.ndarray  # [L] all chips, mean over the step
    joules_per_token: np.ndarray  # [L]
    step_s: np.ndarray  # [L]
    compute_bound: np.ndarray  # [L] bool: the chips' compute terms outweigh their DRAM terms


def steady_decode(work: StepWork, batch: int, context: int, freq_mhz) -> Decode:
    """``batch`` sequences each decoding one token with ``context`` positions to attend to."""
    c = step_cost(work, Step.decode(batch, context), freq_mhz)
    energy_j = c.energy_j.sum(axis=0)
    return Decode(
        batch / c.step_s, energy_j / c.step_s, energy_j / batch, c.step_s, c.compute_s.sum(axis=0) > c.memory_s.sum(axis=0)
    )
