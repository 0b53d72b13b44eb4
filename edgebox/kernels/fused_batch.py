"""One chip's attention block of a batched decode step (B sequences, one new token each) as one
compiled call: q/k/v projection of the B rows, rope, the new keys and values into each
sequence's cache, attention, the output projection.

Why: the engine's decode step of B sequences otherwise makes ~10 Python-level calls per chip and
layer (quantize and matmul per q/k/v run, concatenate, rope, slicing, the append-and-attend
call with its checks, the output projection), ~300 per step on the 7B; here it is one ``nogil``
call per layer.  The kernels are the ones the Python path calls (each type's ``*_mm`` matmul,
``elementwise`` rope, ``attention``'s append and batched decode kernels, ``kv_quant``'s
Hadamard transform), so the outputs equal the Python path's up to float re-association
(tests/unit/kernels/test_fused_batch.py compares them).

Which weights: as ``kernels.fused`` (numba weights of the types the registry marks ``fusable``);
anything else returns None from :func:`attention_args` and the caller keeps the Python path.

Caching caveat (numba's): the on-disk cache of these functions holds the kernels they call as
compiled then; after changing a kernel in ``kernels/quants/``, matmul_kernels, attention or
elementwise, delete ``edgebox/kernels/__pycache__/fused_batch.*``.
"""

from __future__ import annotations

import numpy as np
from numba import literal_unroll, njit, types
from numba.extending import overload

from edgebox.kernels.fused import attend_cached, bias_args, qkv_heads, quantize_rows, runs_args
from edgebox.kernels.quants import registry

__all__ = ["attention_args", "attention_decode_batch_block"]


def _mm(w, xq, xd, xs16, xsd16, xsd32, T, out):
    """w (a weight's kernel arrays, as PackedWeight.kernel_args) times T rows of quantized
    activations -> out float32 [T * padded rows] (flat)."""
    raise NotImplementedError  # compiled only, through the overload below


@overload(_mm, jit_options=dict(nogil=True))
def _mm_overload(w, xq, xd, xs16, xsd16, xsd32, T, out):
    sig = tuple(t.dtype.name if isinstance(t, types.Array) else "bool" for t in w.types)
    kernels = registry.fusable_paths().get(sig)
    if kernels is None:
        return None
    mm = kernels.mm
    n = len(sig)
    if n == 2:
        return lambda w, xq, xd, xs16, xsd16, xsd32, T, out: mm(w[0], w[1], xq, xd, xs16, xsd16, xsd32, T, out)
    if n == 4:
        return lambda w, xq, xd, xs16, xsd16, xsd32, T, out: mm(w[0], w[1], w[2], w[3], xq, xd, xs16, xsd16, xsd32, T, out)
    if n == 5:
        return lambda w, xq, xd, xs16, xsd16, xsd32, T, out: mm(w[0], w[1], w[2], w[3], w[4], xq, xd, xs16, xsd16, xsd32, T, out)
    if n == 6:
        return lambda w, xq, xd, xs16, xsd16, xsd32, T, out: mm(
            w[0], w[1], w[2], w[3], w[4], w[5], xq, xd, xs16, xsd16, xsd32, T, out
        )
    return None


@njit(nogil=True, cache=True)
def _linear_runs(runs, n_out, x):
    """x float32 [T, n_in] -> float32 [T, n_out] through a stack of runs ((arrays, padded rows,
    rows) each, one weight type per run), their outputs side by side: x is quantized once."""
    T = x.shape[0]
    xq, xd, xs16, xsd16, xsd32 = quantize_rows(x)
    out = np.empty((T, n_out), np.float32)
    off = 0
    for run in literal_unroll(runs):
        y = np.empty(T * run[1], np.float32)
        _mm(run[0], xq, xd, xs16, xsd16, xsd32, T, y)
        out[:, off : off + run[2]] = y.reshape(T, run[1])[:, : run[2]]
        off += run[2]
    return out


@njit(nogil=True, cache=True)
def attention_decode_batch_block(
    h,
    wqkv,
    bias,
    wo,
    n_embd,
    nh,
    nkv,
    hd,
    cos,
    sin,
    neox,
    kl,
    vl,
    tk,
    tv,
    rot_k,
    rot_v,
    layer,
    starts,
    order,
    hstart,
    parallel,
    n_threads,
):
    """One chip's attention for B one-token sequences: h float32 [B, D] -> its partial sums
    [B, D].  Sequence b's key and value go to slot starts[b] of its caches kl[b], vl[b]
    (``attention.kv_lists``: [n_layer, n_ctx, Hkv_c, hd] float16 bits or GGML blocks; tk, tv
    their type codes) and it attends over slots 0..starts[b]; cos, sin [B, n_rot/2] the rope
    tables of the B positions; rot_k, rot_v: the Hadamard rotations of a quantized K and V (0:
    none); wqkv: the runs of the chip's q/k/v stack, wo: (arrays, padded rows, rows) as one run."""
    B = h.shape[0]
    # project to q, k, v (+bias on qwen2), rope, a quantized cache's rotations
    qkv = _linear_runs(wqkv, (nh + 2 * nkv) * hd, h)  # [B, (Hc + 2 Hkv_c)*hd]
    q, k, v = qkv_heads(qkv, bias, nh, nkv, hd, cos, sin, neox, rot_k, rot_v)  # [B, Hc|Hkv_c, hd]
    # the new keys and values into the caches, then each sequence attends over its own
    att = attend_cached(q, k, v, kl, vl, tk, tv, rot_v, layer, starts, order, hstart, n_threads if parallel else 1)
    # this chip's columns of the output projection
    return np.ascontiguousarray(_linear_runs(wo, n_embd, att.reshape(B, nh * hd)))


def attention_args(wqkv, bqkv, wo, T: int):
    """(q/k/v runs, bias, wo runs) for T rows (``fused``'s helpers), or None when a weight cannot
    go in the call."""
    a, b = runs_args(wqkv, T), runs_args(wo, T)
    if a is None or b is None:
        return None
    return a, bias_args(bqkv), b
