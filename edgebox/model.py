"""The transformer forward pass: tokens + positions + KV cache -> logits. No I/O, no sampling.

Reads top to bottom like llama2.c's ``forward``: one comment per step, a shape on every array.
Shapes use T = tokens in this call, S = cached positions, D = n_embd, H = n_head,
Hkv = n_head_kv, hd = head size, F = n_ff, V = n_vocab.
"""

from __future__ import annotations

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


class Transformer:
    """Forward pass of llama-family models (llama, qwen2) over validated weights."""

    def __init__(self, args: ModelArgs, weights: Weights):
        self.args = args
        self.weights = weights

    def forward(self, tokens: np.ndarray, positions: np.ndarray, kv: KVCache, all_logits: bool = True) -> np.ndarray:
        """Run ``tokens`` [T] at ``positions`` [T] after what ``kv`` holds; append their keys/values.

        Returns logits [T, V] (or [1, V] for the last token when ``all_logits`` is False).
        """
        a, w = self.args, self.weights
        T, hd = len(tokens), a.head_dim
        start = kv.length
        if start + T > kv.n_ctx:
            raise ContextOverflowError(f"{start + T} tokens do not fit in the context of {kv.n_ctx}; shorten the prompt or raise --ctx")
        kv.pos[start:start + T] = positions

        # token embeddings
        x = ops.get_rows(w.token_embd.data, w.token_embd.qtype, tokens)  # [T, D]

        for layer, lw in enumerate(w.layers):
            # attention: pre-norm, project to q/k/v (+bias on qwen2)
            h = ops.rms_norm(x, lw.attn_norm, a.rms_eps)  # [T, D]
            q = _linear(h, lw.wq, lw.bq).reshape(T, a.n_head, hd)  # [T, H, hd]
            k = _linear(h, lw.wk, lw.bk).reshape(T, a.n_head_kv, hd)  # [T, Hkv, hd]
            v = _linear(h, lw.wv, lw.bv).reshape(T, a.n_head_kv, hd)  # [T, Hkv, hd]

            # rotary position embedding on q and k
            q = ops.rope(q, positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)  # [T, H, hd]
            k = ops.rope(k, positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)  # [T, Hkv, hd]

            # append k, v to the cache, then attend over everything cached (causal by position)
            kv.k[layer, start:start + T] = k
            kv.v[layer, start:start + T] = v
            S = start + T
            keys = kv.k[layer, :S].astype(np.float32)  # [S, Hkv, hd]
            values = kv.v[layer, :S].astype(np.float32)  # [S, Hkv, hd]
            att = ops.attention(q, keys, values, positions, kv.pos[:S])  # [T, H*hd]

            # output projection and residual
            x = x + _linear(att, lw.wo)  # [T, D]

            # feed-forward: pre-norm, SwiGLU, down projection, residual
            h = ops.rms_norm(x, lw.ffn_norm, a.rms_eps)  # [T, D]
            g = ops.swiglu(_linear(h, lw.w_gate), _linear(h, lw.w_up))  # [T, F]
            x = x + _linear(g, lw.w_down)  # [T, D]

        kv.length = start + T

        # final norm and the vocabulary projection
        if not all_logits:
            x = x[-1:]  # [1, D]
        x = ops.rms_norm(x, w.output_norm, a.rms_eps)  # [T, D]
        return _linear(x, w.output)  # [T, V]


def _linear(x: np.ndarray, m: Matrix, bias: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_in] @ m.T -> [T, n_out] (+ bias [n_out])."""
    y = ops.matmul(np.ascontiguousarray(x, dtype=np.float32), m.data, m.qtype)
    if bias is not None:
        y += bias
    return y
