"""The tensor-parallel plan: which query heads, KV heads, FFN rows and vocabulary rows each chip owns.

How each weight is cut along those ranges is ``chips.tp``'s (column-, row-, vocab-parallel).
A row-parallel weight can only be cut between quant blocks of its input features (32 values, 256
for K-quants), and the column-parallel weight feeding it must be cut at the same places. So the
unit of distribution is the smallest group that both allow: for attention, the fewest query heads
whose ``attn_output`` columns fill whole blocks; for the FFN, one block of ``ffn_down``'s input.
Units are dealt out as evenly as possible (the first chips get one more), so a chip may get
nothing of a small tensor (DeepSeek-7B's FFN: 11008 / 256 = 43 super-blocks -> 11, 11, 11, 10).
When there are fewer KV heads than chips, a KV head goes to every chip whose query heads use it.
Norms and the token embedding are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgebox.errors import EdgeboxError
from edgebox.gguf.args import ModelArgs
from edgebox.gguf.loader import Weights
from edgebox.gguf.quant_types import block_size


@dataclass(frozen=True)
class ChipShard:
    """What one chip owns, as ranges: query heads, KV heads, FFN rows, vocabulary rows."""

    chip: int
    heads: range
    kv_heads: range
    ffn: range
    vocab: range


def _deal(n_units: int, n_chips: int) -> list[range]:
    """Split ``n_units`` into ``n_chips`` contiguous ranges, the first ones one longer."""
    base, extra = divmod(n_units, n_chips)
    out, start = [], 0
    for i in range(n_chips):
        n = base + (i < extra)
        out.append(range(start, start + n))
        start += n
    return out


def _scaled(r: range, unit: int, limit: int) -> range:
    return range(min(r.start * unit, limit), min(r.stop * unit, limit))


@dataclass(frozen=True)
class PartitionPlan:
    n_chips: int
    shards: tuple[ChipShard, ...]
    heads_per_unit: int  # query heads that always stay together
    ffn_unit: int  # FFN rows that always stay together

    @classmethod
    def build(cls, args: ModelArgs, weights: Weights, n_chips: int) -> PartitionPlan:
        if n_chips < 1:
            raise EdgeboxError(f"chips must be >= 1, got {n_chips}")
        hd = args.head_dim
        # attention unit: whole blocks of attn_output columns in every layer
        wo_block = max(block_size(lw.wo.qtype) for lw in weights.layers)
        heads_per_unit = wo_block // math.gcd(wo_block, hd)
        if args.n_head % heads_per_unit:
            heads_per_unit = args.n_head  # cannot cut at all: one chip takes every head
        # FFN unit: whole blocks of ffn_down's input (and gate/up rows, which carry no constraint)
        ffn_unit = max(block_size(lw.w_down.qtype) for lw in weights.layers)
        if args.n_ff % ffn_unit:
            ffn_unit = args.n_ff

        head_ranges = [_scaled(r, heads_per_unit, args.n_head) for r in _deal(args.n_head // heads_per_unit, n_chips)]
        ffn_ranges = [_scaled(r, ffn_unit, args.n_ff) for r in _deal(math.ceil(args.n_ff / ffn_unit), n_chips)]
        vocab_ranges = _deal(args.n_vocab, n_chips)
        shards = []
        for i in range(n_chips):
            heads = head_ranges[i]
            if len(heads):
                kv = range(heads.start // args.n_gqa, (heads.stop - 1) // args.n_gqa + 1)
            else:
                kv = range(0, 0)
            shards.append(ChipShard(i, heads, kv, ffn_ranges[i], vocab_ranges[i]))
        return cls(n_chips, tuple(shards), heads_per_unit, ffn_unit)
