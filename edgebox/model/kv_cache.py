"""The KV cache of one sequence (one slice per chip) and the ``Segment`` a forward pass reads."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.kernels import attention, kv_quant, ref


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in their own anonymous mapping: the kernel maps each page on first touch and takes
    all of them back when the array is freed. ``np.zeros`` is glibc's calloc, which serves sizes
    under its mmap threshold (raised up to 32 MiB by every large free) from the heap, writing the
    zeros (every page resident) and keeping them after free: a dry run of a few hundred
    requests grew by 0.5-1 GB per simulation that way."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)


class KVCache:
    """Keys and values of one sequence for every layer, one slice per chip (its KV heads).

    Element types as llama.cpp's ``--cache-type-k`` / ``--cache-type-v`` (``kernels.kv_quant``):
    f16 (the default, half the memory of float32) stores float16 [L, n_ctx, Hkv_i, hd] per chip;
    q8_0 / q4_0 store each row of hd values as GGML blocks of 32 (records [L, n_ctx, Hkv_i,
    hd/32]), quantized when written (:meth:`store`) and dequantized by the attention kernels as
    they read. The arrays are ``lazy_zeros``, so a long reservation costs memory only as it
    fills. A KV head shared by several chips (fewer KV heads than chips) is held by each of
    them, as on the hardware.
    """

    def __init__(
        self,
        args: ModelArgs,
        n_ctx: int,
        kv_heads_per_chip: Sequence[int] | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
    ):
        self.n_ctx = n_ctx
        self.type_k = kv_quant.cache_type(type_k, "cache_type_k")
        self.type_v = kv_quant.cache_type(type_v, "cache_type_v")
        heads = kv_heads_per_chip or [args.n_head_kv]
        hd = args.head_dim
        k_row = kv_quant.cache_row_shape(self.type_k, hd, "cache_type_k")
        v_row = kv_quant.cache_row_shape(self.type_v, hd, "cache_type_v")
        k_dtype, v_dtype = kv_quant.cache_dtype(self.type_k), kv_quant.cache_dtype(self.type_v)
        # per chip [L, n_ctx, Hkv_i, hd] (or [..., hd/32] blocks)
        self.k = [lazy_zeros((args.n_layer, n_ctx, n, *k_row), k_dtype) for n in heads]
        self.v = [lazy_zeros((args.n_layer, n_ctx, n, *v_row), v_dtype) for n in heads]
        self.rot_k = kv_quant.rotation_k(self.type_k, hd)  # a quantized K is kept in a Hadamard basis
        self.pos = np.zeros(n_ctx, np.int32)  # [n_ctx] rope position of each filled slot
        self.length = 0  # filled slots

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))

    def store(self, chip: int, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Keys and values k, v float32 [n, Hkv_i, hd] into slots start..start+n-1 of one chip's
        slice, converted to the cache's types."""
        attention.store(k, self.k[chip][layer], start)
        attention.store(v, self.v[chip][layer], start)

    def copy_prefix(self, other: KVCache, n: int) -> None:
        """Take the first ``n`` slots of ``other`` (the prompt cache; the same types: its bytes)."""
        if (other.type_k, other.type_v) != (self.type_k, self.type_v):
            raise ValueError(f"copy_prefix: cache types {other.type_k}/{other.type_v} into {self.type_k}/{self.type_v}")
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :n] = src[:, :n]
        self.pos[:n] = other.pos[:n]
        self.length = n

    def shift(self, n_keep: int, n_discard: int, args: ModelArgs) -> None:
        """llama.cpp's context shift: forget slots [n_keep, n_keep + n_discard) and move the rest
        down, ``n_discard`` positions earlier. Cached keys carry their rope rotation, so they are
        rotated back by ``n_discard`` (rotations compose) instead of being recomputed; a quantized
        K is dequantized, turned back out of its Hadamard basis, roped, turned and quantized
        again, as llama.cpp's K-shift (build_rope_shift) does."""
        n, end = self.length, self.length - n_discard
        for cache in self.k + self.v:
            cache[:, n_keep:end] = cache[:, n_keep + n_discard : n]
        self.pos[n_keep:end] = self.pos[n_keep + n_discard : n] - n_discard
        delta = np.full(end - n_keep, -n_discard, np.int32)
        for k in self.k:
            for layer in range(args.n_layer):
                moved = kv_quant.rotate(kv_quant.dequantize(k[layer, n_keep:end]), self.rot_k)  # [end - n_keep, Hkv_i, hd]
                roped = ref.rope(moved, delta, args.n_rot, args.rope_freq_base, args.rope_freq_scale, args.rope_neox)
                k[layer, n_keep:end] = kv_quant.quantize(kv_quant.rotate(roped, self.rot_k), self.type_k)
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
