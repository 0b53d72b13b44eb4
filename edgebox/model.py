"""The transformer forward pass: tokens + positions + KV cache -> logits. No I/O, no sampling.

Reads top to bottom like llama2.c's ``forward``: one comment per step, a shape on every array.
Shapes use R = rows (tokens of all segments) in this call, T = tokens of one segment, S = cached positions, D = n_embd, H = n_head,
Hkv = n_head_kv, hd = head size, F = n_ff, V = n_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .args import ModelArgs
from .errors import ContextOverflowError
from .gguf_loader import Matrix, Weights
from .kernels import ref as ops


class KVCache:
    """Keys and values of one sequence for every layer.

    Stored as float16 like llama.cpp's default cache (half the memory of float32; the attention
    reads them back as float32). ``np.zeros`` maps untouched pages lazily, so a long context
    costs memory only as it fills.
    """

    def __init__(self, args: ModelArgs, n_ctx: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((args.n_layer, n_ctx, args.n_head_kv, args.head_dim), np.float16)  # [L, n_ctx, Hkv, hd]
        self.v = np.zeros_like(self.k)  # [L, n_ctx, Hkv, hd]
        self.pos = np.zeros(n_ctx, np.int32)  # [n_ctx] rope position of each filled slot
        self.length = 0  # filled slots

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def shift(self, n_keep: int, n_discard: int, args: ModelArgs) -> None:
        """llama.cpp's context shift: forget slots [n_keep, n_keep + n_discard) and move the rest
        down, ``n_discard`` positions earlier. Cached keys carry their rope rotation, so they are
        rotated back by ``n_discard`` (rotations compose) instead of being recomputed."""
        n, end = self.length, self.length - n_discard
        self.k[:, n_keep:end] = self.k[:, n_keep + n_discard:n]
        self.v[:, n_keep:end] = self.v[:, n_keep + n_discard:n]
        self.pos[n_keep:end] = self.pos[n_keep + n_discard:n] - n_discard
        delta = np.full(end - n_keep, -n_discard, np.int32)
        for layer in range(args.n_layer):
            moved = self.k[layer, n_keep:end].astype(np.float32)  # [end - n_keep, Hkv, hd]
            self.k[layer, n_keep:end] = ops.rope(moved, delta, args.n_rot, args.rope_freq_base,
                                                 args.rope_freq_scale, args.rope_neox)
        self.length = end


@dataclass
class Segment:
    """Consecutive tokens of one sequence in a forward pass (a prompt chunk, or one decode token)."""

    tokens: np.ndarray  # [n] int32
    positions: np.ndarray  # [n] int32 rope positions
    kv: KVCache
    all_logits: bool = False  # logits of every row, or only of the last one


class Transformer:
    """Forward pass of llama-family models (llama, qwen2) over validated weights."""

    def __init__(self, args: ModelArgs, weights: Weights):
        self.args = args
        self.weights = weights

    def forward(self, tokens: np.ndarray, positions: np.ndarray, kv: KVCache, all_logits: bool = True) -> np.ndarray:
        """One sequence: ``tokens`` [T] at ``positions`` [T] after what ``kv`` holds.

        Returns logits [T, V] (or [1, V] for the last token when ``all_logits`` is False).
        """
        return self.forward_segments([Segment(tokens, positions, kv, all_logits)])[0]

    def forward_segments(self, segments: list[Segment]) -> list[np.ndarray]:
        """Several sequences in one pass (continuous batching): the rows of every segment go
        through each weight matrix together, so a weight is read once per step, not once per
        sequence; attention is per segment over its own cache. Appends each segment's keys and
        values to its cache. Returns per segment logits [n, V] or [1, V]."""
        a, w = self.args, self.weights
        hd = a.head_dim
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
        R = len(tokens)

        # token embeddings
        x = ops.get_rows(w.token_embd.data, w.token_embd.qtype, tokens)  # [R, D]

        for layer, lw in enumerate(w.layers):
            # attention: pre-norm, project to q/k/v (+bias on qwen2)
            h = ops.rms_norm(x, lw.attn_norm, a.rms_eps)  # [R, D]
            q = _linear(h, lw.wq, lw.bq).reshape(R, a.n_head, hd)  # [R, H, hd]
            k = _linear(h, lw.wk, lw.bk).reshape(R, a.n_head_kv, hd)  # [R, Hkv, hd]
            v = _linear(h, lw.wv, lw.bv).reshape(R, a.n_head_kv, hd)  # [R, Hkv, hd]

            # rotary position embedding on q and k
            q = ops.rope(q, positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)  # [R, H, hd]
            k = ops.rope(k, positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)  # [R, Hkv, hd]

            # per segment: append k, v to its cache, attend over everything it caches (causal by position)
            att = np.empty((R, a.n_head * hd), np.float32)  # [R, H*hd]
            for i, seg in enumerate(segments):
                r0, r1, start = rows[i], rows[i + 1], starts[i]
                end = start + (r1 - r0)
                seg.kv.k[layer, start:end] = k[r0:r1]
                seg.kv.v[layer, start:end] = v[r0:r1]
                keys = seg.kv.k[layer, :end].astype(np.float32)  # [S, Hkv, hd]
                values = seg.kv.v[layer, :end].astype(np.float32)  # [S, Hkv, hd]
                att[r0:r1] = ops.attention(q[r0:r1], keys, values, positions[r0:r1], seg.kv.pos[:end])

            # output projection and residual
            x = x + _linear(att, lw.wo)  # [R, D]

            # feed-forward: pre-norm, SwiGLU, down projection, residual
            h = ops.rms_norm(x, lw.ffn_norm, a.rms_eps)  # [R, D]
            g = ops.swiglu(_linear(h, lw.w_gate), _linear(h, lw.w_up))  # [R, F]
            x = x + _linear(g, lw.w_down)  # [R, D]

        for seg in segments:
            seg.kv.length += len(seg.tokens)

        # final norm and the vocabulary projection, for the rows whose logits are wanted
        keep = np.concatenate([np.arange(rows[i], rows[i + 1]) if seg.all_logits else [rows[i + 1] - 1]
                               for i, seg in enumerate(segments)]).astype(np.intp)
        x = ops.rms_norm(x[keep], w.output_norm, a.rms_eps)  # [K, D]
        logits = _linear(x, w.output)  # [K, V]
        counts = [rows[i + 1] - rows[i] if seg.all_logits else 1 for i, seg in enumerate(segments)]
        return np.split(logits, np.cumsum(counts)[:-1])


def _linear(x: np.ndarray, m: Matrix, bias: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_in] @ m.T -> [T, n_out] (+ bias [n_out])."""
    y = ops.matmul(np.ascontiguousarray(x, dtype=np.float32), m.data, m.qtype)
    if bias is not None:
        y += bias
    return y
