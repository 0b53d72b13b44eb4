"""The transformer forward pass: tokens + positions + KV cache -> logits. No I/O, no sampling.

Reads top to bottom like llama2.c's ``forward``: one comment per step, a shape on every array.
Shapes use R = rows (tokens of all segments) in this call, S = cached positions, D = n_embd,
hd = head size, V = n_vocab, and per chip Hc = its query heads, Hkv_c = its KV heads, Fc = its
FFN rows, K = rows whose logits are wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.errors import ContextOverflowError
from edgebox.chips.box import Box
from edgebox.chips.chip import Chip
from edgebox.gguf.loader import Weights
from edgebox.kernels import ref
from edgebox.model.kv_cache import KVCache, Segment


class Transformer:
    """Forward pass of llama-family models (llama, qwen2), tensor-parallel over a box of chips.

    With one chip this is the plain forward pass; with N, each chip computes its heads and FFN
    rows on its own thread and the partial outputs meet in explicit all-reduces.
    """

    def __init__(self, args: ModelArgs, weights: Weights, box: Box):
        self.args = args
        self.weights = weights
        self.box = box

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.args, n_ctx, [chip.n_kv for chip in self.box.chips])

    def forward(self, tokens: np.ndarray, positions: np.ndarray, kv: KVCache, all_logits: bool = True) -> np.ndarray:
        """One sequence: ``tokens`` [T] at ``positions`` [T] after what ``kv`` holds.

        Returns logits [T, V] (or [1, V] for the last token when ``all_logits`` is False).
        """
        return self.forward_segments([Segment(tokens, positions, kv, all_logits)])[0]

    def forward_segments(self, segments: list[Segment]) -> list[np.ndarray]:
        """Several sequences in one pass (continuous batching): the rows of every segment go
        through each weight matrix together, so a weight is read once per step, not once per
        sequence; attention is per segment over its own cache. Appends each segment's keys and
        values to its cache. Returns per segment logits [n, V] or [1, V]. Math only: the caller
        charges the chips' device time (``kv_cache.step_cost``)."""
        a, w, box = self.args, self.weights, self.box
        starts = []
        for seg in segments:
            n = len(seg.tokens)
            if seg.kv.length + n > seg.kv.n_ctx:
                raise ContextOverflowError(f"{seg.kv.length + n} tokens do not fit in the context of {seg.kv.n_ctx}; shorten the prompt or raise the context size")
            starts.append(seg.kv.length)
            seg.kv.pos[seg.kv.length:seg.kv.length + n] = seg.positions
        rows = np.cumsum([0] + [len(seg.tokens) for seg in segments])  # segment i is rows[i]:rows[i+1]
        tokens = np.concatenate([seg.tokens for seg in segments])  # [R]
        positions = np.concatenate([seg.positions for seg in segments])  # [R]
        decode = _DecodeBatch.of(box, segments, rows, starts)

        # token embeddings (replicated on every chip)
        x = ref.get_rows(w.token_embd.data, w.token_embd.qtype, tokens)  # [R, D]

        for layer, lw in enumerate(w.layers):
            # attention: every chip normalizes, projects and attends for its own heads, then
            # multiplies by its columns of attn_output; an all-reduce sums the partial outputs
            h = box.ops.rms_norm(x, lw.attn_norm, a.rms_eps)  # [R, D]
            x = x + box.all_reduce(box.run(lambda chip: _attention(box.ops, chip, layer, h, positions, segments, starts, rows, decode, a)))  # [R, D]

            # feed-forward: every chip does its FFN rows (SwiGLU) and its columns of ffn_down
            h = box.ops.rms_norm(x, lw.ffn_norm, a.rms_eps)  # [R, D]
            x = x + box.all_reduce(box.run(lambda chip: _ffn(box.ops, chip, layer, h)))  # [R, D]

        for seg in segments:
            seg.kv.length += len(seg.tokens)

        # final norm and the vocabulary projection (vocab-parallel, gathered), for the wanted rows
        keep = np.concatenate([np.arange(rows[i], rows[i + 1]) if seg.all_logits else [rows[i + 1] - 1]
                               for i, seg in enumerate(segments)]).astype(np.intp)
        x = box.ops.rms_norm(x[keep], w.output_norm, a.rms_eps)  # [K, D]
        logits = box.gather(box.run(lambda chip: chip.lm_head(x) if chip.lm_head is not None else None))  # [K, V]
        counts = [rows[i + 1] - rows[i] if seg.all_logits else 1 for i, seg in enumerate(segments)]
        return np.split(logits, np.cumsum(counts)[:-1])


@dataclass
class _DecodeBatch:
    """The step's one-token segments (two or more: continuous batching's decode), which attend
    in one call per chip and layer instead of one per sequence."""

    members: set  # their segment indices
    rows: np.ndarray  # [B] their rows
    starts: np.ndarray  # [B] int64 the cache slot of each one's new token
    caches: list  # per chip: the backend's handle on the B sequences' caches (ops.kv_lists)

    @classmethod
    def of(cls, box: Box, segments: list[Segment], rows: np.ndarray, starts: list[int]) -> "_DecodeBatch | None":
        dec = [i for i, seg in enumerate(segments) if len(seg.tokens) == 1]
        if len(dec) < 2:
            return None
        caches = [box.ops.kv_lists([segments[i].kv.k[c.index] for i in dec], [segments[i].kv.v[c.index] for i in dec])
                  if c.n_kv else None for c in box.chips]
        return cls(set(dec), rows[dec], np.array([starts[i] for i in dec], np.int64), caches)


def _attention(ops, chip: Chip, layer: int, h: np.ndarray, positions: np.ndarray, segments: list[Segment],
               starts: list[int], rows: np.ndarray, decode: _DecodeBatch | None, a: ModelArgs) -> np.ndarray | None:
    """One chip's attention for its heads: its partial sum of the attention block's output [R, D]."""
    lw = chip.layers[layer]
    if lw.wqkv is None:
        return None
    R, hd, nh, nkv = len(h), a.head_dim, chip.n_heads, chip.n_kv
    if R == 1 and len(segments) == 1:
        # one token of one sequence: the whole block in one compiled call where the backend has
        # one (chip threads then hold the GIL once per block, not once per step of it)
        kv = segments[0].kv
        out = ops.decode_attention_block(lw, h[0], int(positions[0]), kv.k[chip.index], kv.v[chip.index], layer,
                                         starts[0], nh, nkv, chip.kv_of_head, a)  # [D]
        if out is not None:
            return out[None]

    # project to this chip's q, k and v heads with one matmul (+bias on qwen2)
    qkv = lw.wqkv(h)  # [R, (Hc + 2 Hkv_c)*hd]
    if lw.bqkv is not None:
        qkv += lw.bqkv

    # rotary position embedding on the q and k heads (one call: same positions for both)
    qk = ops.rope(qkv[:, :(nh + nkv) * hd].reshape(R, nh + nkv, hd), positions,
                  a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)  # [R, Hc + Hkv_c, hd]
    q, k = qk[:, :nh], qk[:, nh:]  # [R, Hc, hd], [R, Hkv_c, hd]
    v = qkv[:, (nh + nkv) * hd:].reshape(R, nkv, hd)  # [R, Hkv_c, hd]

    att = np.empty((R, nh * hd), np.float32)  # [R, Hc*hd]
    if decode is not None:
        # the one-token segments together: each one's k, v into its cache, then attention
        r = decode.rows
        att[r] = ops.attention_decode_append(q[r], k[r], v[r], decode.caches[chip.index], layer, decode.starts,
                                             chip.kv_of_head)  # [B, Hc*hd]

    # every other segment: append k, v to this chip's slice of its cache, attend over all it holds
    for i, seg in enumerate(segments):
        if decode is not None and i in decode.members:
            continue
        r0, r1, start = rows[i], rows[i + 1], starts[i]
        kc, vc = seg.kv.k[chip.index][layer], seg.kv.v[chip.index][layer]  # [n_ctx, Hkv_c, hd] f16
        kc[start:start + r1 - r0] = k[r0:r1]
        vc[start:start + r1 - r0] = v[r0:r1]
        att[r0:r1] = ops.attention(q[r0:r1], kc, vc, start, positions[r0:r1], seg.kv.pos, chip.kv_of_head)

    # this chip's columns of the output projection: a partial sum
    return lw.wo(att)  # [R, D]


def _ffn(ops, chip: Chip, layer: int, h: np.ndarray) -> np.ndarray | None:
    """One chip's FFN rows: SwiGLU, then its columns of ffn_down: a partial sum [R, D]."""
    lw = chip.layers[layer]
    if lw.w_gate_up is None:
        return None
    if len(h) == 1:  # one token: in one compiled call where the backend has one
        out = ops.decode_ffn_block(lw, h[0], chip.n_ffn, h.shape[1])  # [D]
        if out is not None:
            return out[None]
    gate_up = lw.w_gate_up(h)  # [R, 2 Fc]: its gate rows, then its up rows
    g = ops.swiglu_halves(gate_up)  # [R, Fc]
    return lw.w_down(g)  # [R, D]
