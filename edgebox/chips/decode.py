"""A lone sequence's one-token step: every layer in one hand-off per chip thread.

Why: the layer-by-layer path hands each block to the chip threads and back, two hand-offs and
~10 Python calls per layer (5-7 ms of host time per token on the 7B shape on 1 chip, 23 ms on
4: docs/performance.md). Here each
chip thread loops over the layers itself with one compiled call per layer
(``kernels.fused.decode_layer``: norms, its chips' attention and FFN, the residual adds), and
the partial sums of the threads meet in compiled code (``kernels.barrier``): one hand-off per
token. Not one call for all layers: numba passes a tuple of every layer's arrays as one LLVM
aggregate and compiles it superlinearly (a 30-layer tuple of 4 chips' arrays had compiled for 12
minutes in 5.5 GB when it was stopped).

The math is the layer-by-layer path's, up to the order in which the chips' partial sums add
(each thread adds its chips', then the threads' sums add in thread order), so logits agree
within float re-association (tests/unit/model/test_model.py, the one-call decode test).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from numba.core.errors import TypingError

from edgebox.kernels import attention, barrier
from edgebox.kernels.fused import decode_layer

log = logging.getLogger("edgebox.decode")


class TokenDecoder:
    """Runs ``Box.decode_layers``; built once per box, its per-layer arguments at first use.
    ``enabled = False`` sends every step through the box's blocks (tests compare the two)."""

    def __init__(self, box):
        self.box = box
        self.enabled = True
        self._plan: list | None | bool = False  # per chip thread, per layer: its chips' arguments; False: not built yet
        self.sync = barrier.new_sync()
        self._lock = threading.Lock()  # one token at a time: the threads share sync and bufs
        self.bufs = np.zeros((2, box.threads.n_threads, box.args.n_embd), np.float32)  # [2, threads, D]

    def plan(self) -> list | None:
        """Per chip thread, per layer (attn_norm, ffn_norm, attention entries, FFN entries) as
        ``fused.decode_layer`` takes them; None when some block cannot run in one call (then the
        box keeps the block by block path)."""
        if self._plan is False:
            self._plan = self._build()
        return self._plan

    def _build(self) -> list | None:
        box, w = self.box, self.box._weights
        slot = {c.index: i for i, c in enumerate(c for c in box.chips if c.n_kv)}  # a chip's cache in ``caches``
        plan: list = [[] for _ in box.threads.groups]
        for layer, lw in enumerate(w.layers):
            attn, ffn = [], []  # per thread: its chips' entries
            for group in box.threads.groups:
                a, f = [], []
                for chip in group:
                    cl = chip.layers[layer]
                    if cl.wqkv is not None:
                        args = chip.ops.decode_attention_args(cl, chip.n_heads, chip.n_kv, chip.kv_of_head, chip.kv_rot)
                        if args is None:
                            return None
                        a.append((True, slot[chip.index], *args))
                    if cl.w_gate_up is not None:
                        args = chip.ops.decode_ffn_args(cl, chip.n_ffn)
                        if args is None:
                            return None
                        f.append((True, *args))
                attn.append(a)
                ffn.append(f)
            # a thread holding no part of a block gets one inactive entry (numba types no empty tuple)
            any_a, any_f = next(e for e in attn if e)[0], next(e for e in ffn if e)[0]
            norms = (np.ascontiguousarray(lw.attn_norm, np.float32), np.ascontiguousarray(lw.ffn_norm, np.float32))
            for t, (a, f) in enumerate(zip(attn, ffn)):
                a = a or [(False, *any_a[1:])]
                f = f or [(False, *any_f[1:])]
                plan[t].append((*norms, tuple(a), tuple(f)))
        return plan

    def __call__(self, x: np.ndarray, position: int, kv, start: int) -> np.ndarray | None:
        """x [1, D] the token's embedding at rope ``position``; its keys and values go to slot
        ``start`` of ``kv``. Returns the residual stream after the last layer [1, D], or None."""
        plan = self.plan() if self.enabled else None
        if plan is None:
            return None
        box = self.box
        cos, sin = box.ops.rope_tables(np.array([position], np.int32), box.args)
        caches = tuple(_cache_views(kv, c.index) for c in box.chips if c.n_kv)  # [chips with KV heads]
        try:
            with self._lock:
                self.sync[:] = 0
                outs = box.threads.run_groups(_run_layers, self, plan, x[0], caches, start, cos, sin)
        except TypingError as e:  # a thread's chips mix weight types (not seen in the files we read)
            log.warning("decode: one call per layer cannot compile here (%s); running block by block", str(e).splitlines()[0])
            self._plan = None
            return None  # nothing is lost: the block path rewrites the same cache slot from the same x
        return outs[-1][None]


def _run_layers(index: int, chips: list, dec: TokenDecoder, plan: list, x0, caches: tuple, start: int, cos, sin) -> np.ndarray:
    """Chip thread ``index``'s part of a token: every layer for its chips -> its copy of the
    residual stream [D]."""
    a = dec.box.args
    att_threads = dec.box.ops.decode_attention_threads(start + 1)  # this thread's numba threads, over a long context
    # read once, not per layer: between two layer calls the caches are cold from the weights, and
    # with these lookups inside the loop the gap between calls was ~17 µs, without them ~10
    eps, neox, hd, bufs, sync = a.rms_eps, a.rope_neox, a.head_dim, dec.bufs, dec.sync
    x = x0.copy()  # [D]
    try:
        for layer, (attn_norm, ffn_norm, attn, ffn) in enumerate(plan[index]):
            if not decode_layer(
                x, attn_norm, ffn_norm, eps, attn, ffn, caches, layer, start, cos, sin, neox, hd, bufs, sync, index, att_threads
            ):
                break  # another thread failed: it raises
    except BaseException:
        barrier.abort(dec.sync)  # the other threads must not wait for this one
        raise
    return x


def _cache_views(kv, chip: int) -> tuple:
    """(k, v, k's type code, v's) of one chip's slice of a KV cache, as the kernels read them."""
    k, tk, _ = attention.cache_view(kv.k[chip], 4, "decode_layers", "k")
    v, tv, _ = attention.cache_view(kv.v[chip], 4, "decode_layers", "v")
    return k, v, tk, tv
