"""What one chip computes of a layer: its attention heads and its FFN rows, each a partial sum.

Each block returns the chip's partial output [R, D] (None when it holds nothing of the block);
the box sums the partials (all-reduce) and gathers the lm head's vocabulary slices. A block reads
only its chip's shards and its chip's slice of each KV cache, so the chips' blocks run
concurrently on the chip threads. A one-token step of one sequence takes the backend's one-call
block where it has one (the chip thread then holds the GIL once per block, not once per op).

Shapes: R = rows (tokens of all segments) in the step, D = n_embd, hd = head size, Hc = the
chip's query heads, Hkv_c = its KV heads, Fc = its FFN rows, B = one-token segments batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebox.chips.chip import Chip


@dataclass
class DecodeBatch:
    """The step's one-token segments (two or more: continuous batching's decode), which attend
    in one call per chip and layer instead of one per sequence."""

    members: set  # their segment indices
    rows: np.ndarray  # [B] their rows
    starts: np.ndarray  # [B] int64 the cache slot of each one's new token
    caches: list  # per chip: the backend's handle on the B sequences' caches (ops.kv_lists)


@dataclass
class AttentionStep:
    """What a step's attention reads besides the activations. Segment i is rows
    ``rows[i]:rows[i+1]`` of the step; its keys and values go to its KV cache ``caches[i]``
    (``k``/``v`` per chip [L, n_ctx, Hkv_c, hd] f16 or q8_0/q4_0 blocks, ``pos`` [n_ctx] the rope position of each
    slot) from slot ``starts[i]`` on. Built once per step (``Box.attention_step``)."""

    positions: np.ndarray  # [R] rope position of each row
    rows: np.ndarray  # [n_segments + 1]
    starts: list  # [n_segments] cache slot of each segment's first row
    caches: list  # [n_segments] each segment's KV cache
    decode: DecodeBatch | None  # its one-token segments, batched

    @classmethod
    def of(
        cls, ops, chips: list[Chip], positions: np.ndarray, rows: np.ndarray, starts: list[int], caches: list
    ) -> AttentionStep:
        dec = [i for i in range(len(caches)) if rows[i + 1] - rows[i] == 1]
        decode = None
        if len(dec) >= 2:
            lists = [
                ops.kv_lists([caches[i].k[c.index] for i in dec], [caches[i].v[c.index] for i in dec]) if c.n_kv else None
                for c in chips
            ]
            decode = DecodeBatch(set(dec), rows[dec], np.array([starts[i] for i in dec], np.int64), lists)
        return cls(positions, rows, starts, caches, decode)


def attention(chip: Chip, layer: int, h: np.ndarray, step: AttentionStep) -> np.ndarray | None:
    """The chip's heads of one attention block: h [R, D] -> its partial sum of the output [R, D]."""
    lw = chip.layers[layer]
    if lw.wqkv is None:
        return None
    ops, a = chip.ops, chip.args
    R, hd, nh, nkv = len(h), a.head_dim, chip.n_heads, chip.n_kv
    positions, caches, decode = step.positions, step.caches, step.decode
    if R == 1 and len(caches) == 1:
        # one token of one sequence: the whole block in one compiled call where the backend has one
        kv = caches[0]
        out = ops.decode_attention_block(
            lw,
            h[0],
            int(positions[0]),
            kv.k[chip.index],
            kv.v[chip.index],
            layer,
            step.starts[0],
            nh,
            nkv,
            chip.kv_of_head,
            a,
            chip.kv_rot,
        )  # [D]
        if out is not None:
            return out[None]
    if decode is not None and len(decode.members) == len(caches):
        # one token of each of B sequences (rows 0..B-1): the whole block in one compiled call
        # where the backend has one
        batch = getattr(ops, "decode_attention_batch", None)  # (the reference has none)
        out = (
            batch(lw, h, positions, decode.caches[chip.index], layer, decode.starts, nh, nkv, chip.kv_of_head, a, chip.kv_rot)
            if batch is not None
            else None
        )
        if out is not None:
            return out

    # project to this chip's q, k and v heads with one matmul (+bias on qwen2)
    qkv = lw.wqkv(h)  # [R, (Hc + 2 Hkv_c)*hd]
    if lw.bqkv is not None:
        qkv += lw.bqkv

    # rotary position embedding on the q and k heads (one call: same positions for both)
    qk = ops.rope(
        qkv[:, : (nh + nkv) * hd].reshape(R, nh + nkv, hd), positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox
    )  # [R, Hc + Hkv_c, hd]
    q, k = qk[:, :nh], qk[:, nh:]  # [R, Hc, hd], [R, Hkv_c, hd]
    v = qkv[:, (nh + nkv) * hd :].reshape(R, nkv, hd)  # [R, Hkv_c, hd]
    rot_k, rot_v = chip.kv_rot  # a quantized cache holds K and V in a Hadamard basis (kv_quant)
    if rot_k:  # q.k is unchanged: both turn by the same orthonormal H
        q, k = ops.hadamard(q, rot_k), ops.hadamard(k, rot_k)
    if rot_v:
        v = ops.hadamard(v, rot_v)

    att = np.empty((R, nh * hd), np.float32)  # [R, Hc*hd]
    if decode is not None:
        # the one-token segments together: each one's k, v into its cache, then attention
        r = decode.rows
        att[r] = ops.attention_decode_append(
            q[r], k[r], v[r], decode.caches[chip.index], layer, decode.starts, chip.kv_of_head
        )  # [B, Hc*hd]

    # every other segment: append k, v to this chip's slice of its cache, attend over all it holds
    rows, starts = step.rows, step.starts
    for i, kv in enumerate(caches):
        if decode is not None and i in decode.members:
            continue
        r0, r1, start = rows[i], rows[i + 1], starts[i]
        kv.store(chip.index, layer, start, k[r0:r1], v[r0:r1])  # converted to the cache's types
        kc, vc = kv.k[chip.index][layer], kv.v[chip.index][layer]  # [n_ctx, Hkv_c, hd] f16 (or blocks)
        att[r0:r1] = ops.attention(q[r0:r1], kc, vc, start, positions[r0:r1], kv.pos, chip.kv_of_head)

    if rot_v:  # the values' basis back (H @ H = I)
        att = ops.hadamard(att.reshape(R, nh, hd), rot_v).reshape(R, nh * hd)

    # this chip's columns of the output projection: a partial sum
    return lw.wo(att)  # [R, D]


def ffn(chip: Chip, layer: int, h: np.ndarray) -> np.ndarray | None:
    """The chip's FFN rows of one block: SwiGLU, then its columns of ffn_down: h [R, D] -> its
    partial sum [R, D]."""
    lw = chip.layers[layer]
    if lw.w_gate_up is None:
        return None
    if len(h) == 1:  # one token: in one compiled call where the backend has one
        out = chip.ops.decode_ffn_block(lw, h[0], chip.n_ffn, h.shape[1])  # [D]
        if out is not None:
            return out[None]
    gate_up = lw.w_gate_up(h)  # [R, 2 Fc]: its gate rows, then its up rows
    g = chip.ops.swiglu_halves(gate_up)  # [R, Fc]
    return lw.w_down(g)  # [R, D]


def lm_head(chip: Chip, x: np.ndarray) -> np.ndarray | None:
    """The chip's vocabulary slice of the logits: x [K, D] -> [K, its V rows]."""
    return chip.lm_head(x) if chip.lm_head is not None else None
