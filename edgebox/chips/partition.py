"""The tensor-parallel plan: which rows or columns of each weight live on which chip.

Megatron-style, as on real multi-chip boxes:

* **Column-parallel** (output features split; no communication after): ``attn_q`` by query
  head, ``attn_k``/``attn_v`` by KV head, ``ffn_gate``/``ffn_up`` by FFN row.
* **Row-parallel** (input features split; the partial outputs are summed by an all-reduce):
  ``attn_output`` by the heads the chip computed, ``ffn_down`` by the FFN rows it computed.
* **Vocab-parallel** ``output`` (rows of the lm head split, logits gathered).
* Norms and the token embedding are replicated.
* Column-parallel weights that read the same input are **merged** per chip: a chip's rows of
  ``attn_q``/``attn_k``/``attn_v`` stacked into one matrix, its rows of ``ffn_gate``/``ffn_up``
  into another, so it runs one matmul for each (the split of every weight is unchanged).

A row-parallel weight can only be cut between quant blocks of its input features (32 values, 256
for K-quants), and the column-parallel weight feeding it must be cut at the same places. So the
unit of distribution is the smallest group that both allow: for attention, the fewest query heads
whose ``attn_output`` columns fill whole blocks; for the FFN, one block of ``ffn_down``'s input.
Units are dealt out as evenly as possible (the first chips get one more), so a chip may get
nothing of a small tensor (DeepSeek-7B's FFN: 11008 / 256 = 43 super-blocks -> 11, 11, 11, 10).
When there are fewer KV heads than chips, a KV head is replicated on every chip whose query heads
use it (its KV cache too). Shards are views into the file's mmap, never copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgebox.gguf.args import ModelArgs
from edgebox.errors import EdgeboxError
from edgebox.gguf.loader import Matrix, Weights
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
    def build(cls, args: ModelArgs, weights: Weights, n_chips: int) -> "PartitionPlan":
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


# -- the parallel linear types ---------------------------------------------------------------------

def row_slice(m: Matrix, rows: range) -> Matrix:
    """Rows [start, stop) of a matrix: a view into the mmap."""
    return Matrix(f"{m.name}[rows {rows.start}:{rows.stop}]", m.qtype, len(rows), m.n_in, m.data[rows.start:rows.stop])


def col_slice(m: Matrix, cols: range) -> Matrix:
    """Input features [start, stop) of a matrix: a strided view, cut on quant-block boundaries."""
    bs = block_size(m.qtype)
    if cols.start % bs or (cols.stop % bs and cols.stop != m.n_in):
        raise EdgeboxError(f"{m.name}: columns {cols.start}:{cols.stop} are not on {m.qtype.name} block boundaries of {bs}")
    per_block = m.data.shape[1] // (m.n_in // bs)
    b0, b1 = cols.start // bs * per_block, cols.stop // bs * per_block
    return Matrix(f"{m.name}[cols {cols.start}:{cols.stop}]", m.qtype, m.n_out, len(cols), m.data[:, b0:b1])


@dataclass(frozen=True)
class ColumnParallelLinear:
    """y = x @ W.T with W's output features (rows) split: chip i holds rows ``ranges[i]`` and
    produces y[:, ranges[i]]; the outputs stay on their chips (no communication)."""

    ranges: tuple[range, ...]
    shards: tuple[Matrix | None, ...]  # None for a chip that holds no rows

    @classmethod
    def split(cls, m: Matrix, ranges: list[range]) -> "ColumnParallelLinear":
        return cls(tuple(ranges), tuple(row_slice(m, r) if len(r) else None for r in ranges))


@dataclass(frozen=True)
class RowParallelLinear:
    """y = x @ W.T with W's input features (columns) split: chip i holds columns ``ranges[i]``
    (on quant-block boundaries), computes x[:, ranges[i]] @ W[:, ranges[i]].T, a partial sum of
    the full y; an all-reduce adds the partials."""

    ranges: tuple[range, ...]
    shards: tuple[Matrix | None, ...]

    @classmethod
    def split(cls, m: Matrix, ranges: list[range]) -> "RowParallelLinear":
        return cls(tuple(ranges), tuple(col_slice(m, r) if len(r) else None for r in ranges))


@dataclass(frozen=True)
class MergedColumnParallelLinear:
    """Several column-parallel weights that read the same input, computed as one (vLLM's
    QKVParallelLinear / MergedColumnParallelLinear): y_j = x @ W_j.T, W_j's rows split by its own
    ranges (chip i holds rows ``parts[j].ranges[i]`` of W_j, as ColumnParallelLinear). Chip i
    stacks its rows of every W_j into one matrix and gets its slice of every y_j, side by side,
    from one matmul. No communication after."""

    parts: tuple[ColumnParallelLinear, ...]

    @classmethod
    def split(cls, ms: list[Matrix], ranges: list[list[range]]) -> "MergedColumnParallelLinear":
        if len({m.n_in for m in ms}) != 1:
            raise EdgeboxError(f"{', '.join(m.name for m in ms)}: merged weights must have the same input size")
        return cls(tuple(ColumnParallelLinear.split(m, r) for m, r in zip(ms, ranges)))

    def shard(self, chip: int) -> tuple[Matrix, ...] | None:
        """Chip ``chip``'s rows of every weight, in order; None when it holds rows of none."""
        rows = tuple(p.shards[chip] for p in self.parts)
        if all(r is None for r in rows):
            return None
        if any(r is None for r in rows):
            raise EdgeboxError(f"chip {chip} holds rows of some of the merged weights but not of all")
        return rows


def vocab_parallel(m: Matrix, ranges: list[range]) -> ColumnParallelLinear:
    """The lm head: column-parallel over the vocabulary; the logits are gathered afterwards."""
    return ColumnParallelLinear.split(m, ranges)
