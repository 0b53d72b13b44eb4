"""The parallel linear types: how each weight is cut over the chips (Megatron / vLLM style).

* **Column-parallel** (output features split, no communication after): ``attn_q`` by query head,
  ``attn_k``/``attn_v`` by KV head, ``ffn_gate``/``ffn_up`` by FFN row; the lm head by
  vocabulary row, its logits gathered.
* **Row-parallel** (input features split, partial outputs summed by an all-reduce):
  ``attn_output`` by the heads the chip computed, ``ffn_down`` by the FFN rows it computed.
* Column-parallel weights that read the same input are **merged** per chip (q/k/v, gate/up), so
  a chip runs one matmul for each group; the split of every weight is unchanged.

The ranges come from the ``PartitionPlan`` (cuts on quant-block boundaries, uneven where the
block counts do not divide); a shard is a view into the file's mmap, never a copy, and a chip
whose range is empty holds None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebox.chips.partition import ChipShard
from edgebox.errors import EdgeboxError
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import block_size


def row_slice(m: Matrix, rows: range) -> Matrix:
    """Rows [start, stop) of a matrix: a view into the mmap."""
    return Matrix(f"{m.name}[rows {rows.start}:{rows.stop}]", m.qtype, len(rows), m.n_in, m.data[rows.start : rows.stop])


def col_slice(m: Matrix, cols: range) -> Matrix:
    """Input features [start, stop) of a matrix: a strided view, cut on quant-block boundaries."""
    bs = block_size(m.qtype)
    if cols.start % bs or (cols.stop % bs and cols.stop != m.n_in):
        raise EdgeboxError(f"{m.name}: columns {cols.start}:{cols.stop} are not on {m.qtype.name} block boundaries of {bs}")
    per_block = m.data.shape[1] // (m.n_in // bs)
    b0, b1 = cols.start // bs * per_block, cols.stop // bs * per_block
    return Matrix(f"{m.name}[cols {cols.start}:{cols.stop}]", m.qtype, m.n_out, len(cols), m.data[:, b0:b1])


def head_rows(shards: Sequence[ChipShard], hd: int) -> list[range]:
    """Each chip's rows of ``attn_q`` (= its columns of ``attn_output``): its query heads x hd."""
    return [range(s.heads.start * hd, s.heads.stop * hd) for s in shards]


def kv_head_rows(shards: Sequence[ChipShard], hd: int) -> list[range]:
    """Each chip's rows of ``attn_k``/``attn_v``: the KV heads its query heads read (overlapping
    between chips when there are fewer KV heads than chips: the head is replicated)."""
    return [range(s.kv_heads.start * hd, s.kv_heads.stop * hd) for s in shards]


@dataclass(frozen=True)
class ColumnParallelLinear:
    """y = x @ W.T with W's output features (rows) split: chip i holds rows ``ranges[i]`` and
    produces y[:, ranges[i]]; the outputs stay on their chips (no communication). Rows carry
    whole quant blocks, so any row range is a valid cut."""

    ranges: tuple[range, ...]
    shards: tuple[Matrix | None, ...]  # None for a chip that holds no rows

    @classmethod
    def split(cls, m: Matrix, ranges: list[range]):
        return cls(tuple(ranges), tuple(row_slice(m, r) if len(r) else None for r in ranges))


class VocabParallelLinear(ColumnParallelLinear):
    """The lm head ``output`` [V, D]: column-parallel over the vocabulary (chip i holds the plan's
    ``vocab`` rows, dealt out evenly, the first chips one more); each chip computes the logits of
    its slice and the box gathers them in chip order."""

    @classmethod
    def of(cls, m: Matrix, shards: Sequence[ChipShard]) -> VocabParallelLinear:
        return cls.split(m, [s.vocab for s in shards])


@dataclass(frozen=True)
class RowParallelLinear:
    """y = x @ W.T with W's input features (columns) split: chip i holds columns ``ranges[i]``
    (on quant-block boundaries: ``col_slice`` refuses any other cut), computes
    x[:, ranges[i]] @ W[:, ranges[i]].T, a partial sum of the full y; an all-reduce adds the
    partials. ``attn_output`` is cut by the query heads each chip computed, ``ffn_down`` by its
    FFN rows, so a chip's input is exactly the output of its column-parallel half; the plan deals
    out whole blocks, unevenly where their count does not divide (a chip may get none)."""

    ranges: tuple[range, ...]
    shards: tuple[Matrix | None, ...]

    @classmethod
    def split(cls, m: Matrix, ranges: list[range]) -> RowParallelLinear:
        return cls(tuple(ranges), tuple(col_slice(m, r) if len(r) else None for r in ranges))

    @classmethod
    def attn_output(cls, wo: Matrix, shards: Sequence[ChipShard], hd: int) -> RowParallelLinear:
        return cls.split(wo, head_rows(shards, hd))

    @classmethod
    def ffn_down(cls, w_down: Matrix, shards: Sequence[ChipShard]) -> RowParallelLinear:
        return cls.split(w_down, [s.ffn for s in shards])


@dataclass(frozen=True)
class MergedColumnParallelLinear:
    """Several column-parallel weights that read the same input, computed as one (vLLM's
    MergedColumnParallelLinear): y_j = x @ W_j.T, W_j's rows split by its own ranges (chip i
    holds rows ``parts[j].ranges[i]`` of W_j, as ColumnParallelLinear). Chip i stacks its rows of
    every W_j into one matrix and gets its slice of every y_j, side by side, from one matmul. No
    communication after. ``ffn_gate``/``ffn_up`` are split by the plan's FFN rows (``gate_up``)."""

    parts: tuple[ColumnParallelLinear, ...]

    @classmethod
    def split(cls, ms: list[Matrix], ranges: list[list[range]]):
        if len({m.n_in for m in ms}) != 1:
            raise EdgeboxError(f"{', '.join(m.name for m in ms)}: merged weights must have the same input size")
        return cls(tuple(ColumnParallelLinear.split(m, r) for m, r in zip(ms, ranges)))

    @classmethod
    def gate_up(cls, w_gate: Matrix, w_up: Matrix, shards: Sequence[ChipShard]) -> MergedColumnParallelLinear:
        ffn = [s.ffn for s in shards]
        return cls.split([w_gate, w_up], [ffn, ffn])

    def shard(self, chip: int) -> tuple[Matrix, ...] | None:
        """Chip ``chip``'s rows of every weight, in order; None when it holds rows of none."""
        rows = tuple(p.shards[chip] for p in self.parts)
        if all(r is None for r in rows):
            return None
        if any(r is None for r in rows):
            raise EdgeboxError(f"chip {chip} holds rows of some of the merged weights but not of all")
        return rows


@dataclass(frozen=True)
class QKVParallelLinear(MergedColumnParallelLinear):
    """``attn_q``, ``attn_k``, ``attn_v`` merged (vLLM's QKVParallelLinear): q split by query head,
    k and v by KV head; with fewer KV heads than chips a KV head is replicated on every chip whose
    query heads read it (as is its KV cache). The biases (qwen2) are split with their rows."""

    biases: tuple[np.ndarray | None, ...] = ()  # per chip: its q, k, v bias rows concatenated

    @classmethod
    def of(
        cls,
        wq: Matrix,
        wk: Matrix,
        wv: Matrix,
        bq: np.ndarray | None,
        bk: np.ndarray | None,
        bv: np.ndarray | None,
        shards: Sequence[ChipShard],
        hd: int,
    ) -> QKVParallelLinear:
        q, kv = head_rows(shards, hd), kv_head_rows(shards, hd)
        merged = MergedColumnParallelLinear.split([wq, wk, wv], [q, kv, kv])
        biases = tuple(
            np.concatenate([bq[q[i].start : q[i].stop], bk[kv[i].start : kv[i].stop], bv[kv[i].start : kv[i].stop]])
            if bq is not None and bk is not None and bv is not None and len(q[i])
            else None
            for i in range(len(shards))
        )
        return cls(merged.parts, biases)
