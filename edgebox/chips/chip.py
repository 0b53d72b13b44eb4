"""A chip: its shard of every layer (weights prepared for the kernel backend) and its device clock.

A chip's rows of q/k/v and of gate/up are each merged into one ``FusedLinear``, so one kernel call
replaces one per weight. Which rows and columns a chip holds is decided in ``chips.tp``; what it
computes with them, in ``chips.blocks``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgebox.chips.partition import ChipShard
from edgebox.chips.tp import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from edgebox.gguf.args import ModelArgs
from edgebox.gguf.file import release_view_pages
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import is_quantized
from edgebox.hw.profile import ChipProfile
from edgebox.kernels.kv_quant import kv_row_bytes, rotation_k, rotation_v
from edgebox.kernels.linear import prepare_linear


class StackedRows:
    """A run of same-type parts as one matrix (the ``Matrix`` fields); the rows are stacked into
    one copy only when ``data`` is read (ORT reads it), so a weight found in the packed-weight
    cache, or repacked from its ``row_blocks`` (numba), never copies them."""

    def __init__(self, parts: Sequence[Matrix]):
        self.parts = tuple(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.qtype = self.parts[0].qtype
        self.n_out = sum(p.n_out for p in self.parts)
        self.n_in = self.parts[0].n_in
        self.nbytes = sum(p.nbytes for p in self.parts)

    @functools.cached_property
    def data(self) -> np.ndarray:  # uint8 [sum n_out, row_bytes]
        return np.concatenate([p.data for p in self.parts])

    @property
    def row_blocks(self) -> tuple[np.ndarray, ...]:
        return tuple(p.data for p in self.parts)

    @property
    def rows_read(self) -> bool:
        return "data" in self.__dict__


class FusedLinear:
    """One chip's rows of several weights that read the same input, as one linear: x [R, n_in]
    -> [R, sum of the parts' n_out], each part's output side by side in order.

    The parts (views into the mmap) are stacked into one matrix when the weight is prepared (the
    copy the backend packs; packing frees its pages, as it does the mmap's), so one kernel call
    replaces one per part. Parts of different types cannot share a kernel: each run of one type
    is its own matmul, and the outputs are concatenated.
    """

    def __init__(self, ops, parts: Sequence[Matrix]):
        self.parts = tuple(parts)
        self.n_out = sum(p.n_out for p in self.parts)
        self.n_in = self.parts[0].n_in
        self.nbytes = sum(p.nbytes for p in self.parts)
        self._ops = ops
        self._runs: list | None = None  # one backend linear per run of same-type parts

    def prepare(self, cache=None) -> None:
        """Stack and prepare each run (``cache``: the packed-weight cache, ``kernels.packcache``)."""
        if self._runs is not None:
            return
        runs = []
        for _, group in itertools.groupby(self.parts, key=lambda p: p.qtype):
            group = list(group)
            stacked = StackedRows(group) if len(group) > 1 else None
            runs.append(self._ops.linear(stacked if stacked is not None else group[0]))
            prepare_linear(runs[-1], cache)
            if stacked is not None and stacked.rows_read:
                for p in group:  # the stacked copy replaced them
                    release_view_pages(p.data)
        self._runs = runs

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [R, n_in] -> [R, n_out]
        if self._runs is None:
            self.prepare()
        if len(self._runs) == 1:
            return self._runs[0](x)
        return np.concatenate([lin(x) for lin in self._runs], axis=1)


@dataclass
class ChipLayer:
    """One layer's shard on one chip; None means the chip has no part of that block."""

    wqkv: FusedLinear | None  # [(Hc + 2 Hkv_c)*hd, D]: its q, k, v heads' rows stacked
    bqkv: np.ndarray | None  # [(Hc + 2 Hkv_c)*hd] their biases (qwen2)
    wo: object | None  # Linear [D, Hc*hd] (row-parallel: partial sums)
    w_gate_up: FusedLinear | None  # [2 Fc, D]: its ffn_gate rows, then its ffn_up rows
    w_down: object | None  # Linear [D, Fc] (row-parallel)
    attn_shapes: list  # the block's matmuls as the hardware prices them: (n_out, n_in, bytes, int8)
    ffn_shapes: list
    decode_cache: dict = field(default_factory=dict)  # the backend's one-call decode arguments, made at first use

    @classmethod
    def place(
        cls,
        ops,
        chip: int,
        qkv: QKVParallelLinear,
        o: RowParallelLinear,
        gate_up: MergedColumnParallelLinear,
        down: RowParallelLinear,
    ) -> ChipLayer:
        """Chip ``chip``'s shard of one layer, cut from the layer's parallel linears."""
        qkv_rows, gate_up_rows = qkv.shard(chip), gate_up.shard(chip)
        return cls(
            wqkv=FusedLinear(ops, qkv_rows) if qkv_rows is not None else None,
            bqkv=qkv.biases[chip],
            wo=ops.linear(o.shards[chip]) if o.shards[chip] is not None else None,
            w_gate_up=FusedLinear(ops, gate_up_rows) if gate_up_rows is not None else None,
            w_down=ops.linear(down.shards[chip]) if down.shards[chip] is not None else None,
            attn_shapes=_matmul_shapes(*(qkv_rows or ()), o.shards[chip]),
            ffn_shapes=_matmul_shapes(*(gate_up_rows or ()), down.shards[chip]),
        )


class Chip:
    """One chip: its shards of every layer and of the lm head, the kernels they run on (``ops``),
    which of its query heads read which of its KV heads, and its device clock."""

    def __init__(
        self,
        shard: ChipShard,
        layers: list[ChipLayer],
        lm_head,
        replicated_bytes: int,
        profile: ChipProfile,
        args: ModelArgs,
        ops,
        cache_types: tuple[str, str] = ("f16", "f16"),
    ):
        self.index = shard.chip
        self.args = args
        self.ops = ops  # the kernel backend its blocks run on (the box's)
        self.shard = shard
        self.layers = layers
        self.lm_head = lm_head  # Linear [vocab_i, D] or None
        self.profile = profile
        hd = args.head_dim
        self.n_heads, self.n_kv = len(shard.heads), len(shard.kv_heads)
        self.n_ffn = len(shard.ffn)
        # local KV head of each local query head (GQA, with replicated KV heads)
        self.kv_of_head = np.array([h // args.n_gqa - shard.kv_heads.start for h in shard.heads], np.intp)
        self.weight_bytes = (
            replicated_bytes
            + sum(m.nbytes for layer in layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down) if m is not None)
            + (lm_head.nbytes if lm_head is not None else 0)
        )
        # one token's K and V rows of every layer, in the cache's types (GGML row sizes)
        self.kv_bytes_per_layer = self.n_kv * (kv_row_bytes(cache_types[0], hd) + kv_row_bytes(cache_types[1], hd))
        self.kv_bytes_per_token = args.n_layer * self.kv_bytes_per_layer
        # Hadamard rotations of a quantized cache (kv_quant: llama.cpp's attn_rot_k/attn_rot_v)
        self.kv_rot = (rotation_k(cache_types[0], hd), rotation_v(cache_types[1], hd))
        self.clock_s = 0.0
        # per layer, the matmuls of each half-layer as (n_out, n_in, weight bytes, int8?)
        self.attn_matmuls = [layer.attn_shapes for layer in layers]
        self.ffn_matmuls = [layer.ffn_shapes for layer in layers]
        self.head_matmuls = _matmul_shapes(lm_head)

    @property
    def capacity_bytes(self) -> int:
        return self.profile.capacity_bytes


def _matmul_shapes(*ms) -> list[tuple[int, int, int, bool]]:
    """(n_out, n_in, bytes, int8?) of each matrix or linear that is not None."""
    return [(m.n_out, m.n_in, m.nbytes, is_quantized(getattr(m, "matrix", m).qtype)) for m in ms if m is not None]
