"""The transformer forward pass: tokens + positions + KV cache -> logits. No I/O, no sampling.

Reads top to bottom like llama2.c's ``forward``: one comment per step, a shape on every array.
Tensor parallelism is the box's business (gpt-fast's model + ``tp.py``): each block is one call
that runs every chip's part and does the all-reduce, so this module never sees a chip.
Shapes use R = rows (tokens of all segments) in this call, D = n_embd, V = n_vocab, K = rows
whose logits are wanted.
"""

from __future__ import annotations

import numpy as np

from edgebox.chips.box import Box
from edgebox.errors import ContextOverflowError
from edgebox.gguf.args import ModelArgs
from edgebox.gguf.loader import Weights
from edgebox.kernels import ref
from edgebox.model.kv_cache import KVCache, Segment


class Transformer:
    """Forward pass of llama-family models (llama, qwen2) on a ``Box``: the same code for one
    chip or N (the box splits each block's heads or FFN rows and sums the partial outputs)."""

    def __init__(self, args: ModelArgs, weights: Weights, box: Box):
        self.args = args
        self.weights = weights
        self.box = box

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.args, n_ctx, self.box.kv_heads, *self.box.cache_types)

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
                raise ContextOverflowError(
                    f"{seg.kv.length + n} tokens do not fit in the context of {seg.kv.n_ctx}; shorten the prompt or raise the context size"
                )
            starts.append(seg.kv.length)
            seg.kv.pos[seg.kv.length : seg.kv.length + n] = seg.positions
        rows = np.cumsum([0] + [len(seg.tokens) for seg in segments])  # segment i is rows[i]:rows[i+1]
        tokens = np.concatenate([seg.tokens for seg in segments])  # [R]
        positions = np.concatenate([seg.positions for seg in segments])  # [R]
        step = box.attention_step(positions, rows, starts, [seg.kv for seg in segments])

        # token embeddings (replicated on every chip)
        x = ref.get_rows(w.token_embd.data, w.token_embd.qtype, tokens)  # [R, D]

        # a lone sequence's one token: every layer below in one compiled call per layer and chip
        # thread, where the backend has one (the same math; far less host time)
        y = box.decode_layers(x, step)  # [1, D] or None
        for layer, lw in enumerate(w.layers if y is None else ()):
            # attention: q, k, v heads, rope, append to the caches, attend, output projection
            h = box.ops.rms_norm(x, lw.attn_norm, a.rms_eps)  # [R, D]
            x = x + box.attention(layer, h, step)  # [R, D]

            # feed-forward: SwiGLU, then the down projection
            h = box.ops.rms_norm(x, lw.ffn_norm, a.rms_eps)  # [R, D]
            x = x + box.ffn(layer, h)  # [R, D]
        x = x if y is None else y

        for seg in segments:
            seg.kv.length += len(seg.tokens)

        # final norm and the vocabulary projection, for the wanted rows
        keep = np.concatenate(
            [np.arange(rows[i], rows[i + 1]) if seg.all_logits else [rows[i + 1] - 1] for i, seg in enumerate(segments)]
        ).astype(np.intp)
        x = box.ops.rms_norm(x[keep], w.output_norm, a.rms_eps)  # [K, D]
        logits = box.lm_head(x)  # [K, V]
        counts = [rows[i + 1] - rows[i] if seg.all_logits else 1 for i, seg in enumerate(segments)]
        return np.split(logits, np.cumsum(counts)[:-1])
