"""The KV cache of one sequence (one slice per chip) and the ``Segment`` a forward pass reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.kernels import ref


class KVCache:
    """Keys and values of one sequence for every layer, one slice per chip (its KV heads).

    Stored as float16 like llama.cpp's default cache (half the memory of float32). ``np.zeros``
    maps untouched pages lazily, so a long context costs memory only as it fills. A KV head shared
    by several chips (fewer KV heads than chips) is held by each of them, as on the hardware.
    """

    def __init__(self, args: ModelArgs, n_ctx: int, kv_heads_per_chip: Sequence[int] | None = None):
        self.n_ctx = n_ctx
        heads = kv_heads_per_chip or [args.n_head_kv]
        self.k = [np.zeros((args.n_layer, n_ctx, n, args.head_dim), np.float16) for n in heads]  # per chip [L, n_ctx, Hkv_i, hd]
        self.v = [np.zeros(k.shape, k.dtype) for k in self.k]  # not zeros_like: that writes every page
        self.pos = np.zeros(n_ctx, np.int32)  # [n_ctx] rope position of each filled slot
        self.length = 0  # filled slots

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))

    def copy_prefix(self, other: KVCache, n: int) -> None:
        """Take the first ``n`` slots of ``other`` (the prompt cache)."""
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :n] = src[:, :n]
        self.pos[:n] = other.pos[:n]
        self.length = n

    def shift(self, n_keep: int, n_discard: int, args: ModelArgs) -> None:
        """llama.cpp's context shift: forget slots [n_keep, n_keep + n_discard) and move the rest
        down, ``n_discard`` positions earlier. Cached keys carry their rope rotation, so they are
        rotated back by ``n_discard`` (rotations compose) instead of being recomputed."""
        n, end = self.length, self.length - n_discard
        for cache in self.k + self.v:
            cache[:, n_keep:end] = cache[:, n_keep + n_discard : n]
        self.pos[n_keep:end] = self.pos[n_keep + n_discard : n] - n_discard
        delta = np.full(end - n_keep, -n_discard, np.int32)
        for k in self.k:
            for layer in range(args.n_layer):
                moved = k[layer, n_keep:end].astype(np.float32)  # [end - n_keep, Hkv_i, hd]
                k[layer, n_keep:end] = ref.rope(
                    moved, delta, args.n_rot, args.rope_freq_base, args.rope_freq_scale, args.rope_neox
                )
        self.length = end


@dataclass
class Segment:
    """Consecutive tokens of one sequence in a forward pass (a prompt chunk, or one decode token)."""

    tokens: np.ndarray  # [n] int32
    positions: np.ndarray  # [n] int32 rope positions
    kv: KVCache
    all_logits: bool = False  # logits of every row, or only of the last one


def step_cost(segments: Sequence[Segment]) -> tuple[list[tuple[int, int]], int]:
    """The shape ``Box.account_step`` charges a forward pass over ``segments`` by (call it before
    the pass): (rows, context after the pass) per segment, and how many rows' logits it makes."""
    shape = [(len(seg.tokens), seg.kv.length + len(seg.tokens)) for seg in segments]
    return shape, sum(len(seg.tokens) if seg.all_logits else 1 for seg in segments)
