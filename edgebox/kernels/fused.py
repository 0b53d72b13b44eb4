"""One chip's half-layer of a one-token decode step as one compiled call.

Why: a decode step of one sequence makes ~8 Python-level calls per chip and half-layer
(quantize, matmul, rope, two KV writes, attention, quantize, matmul). With four chips on two
host threads, those calls of two chips per thread contend for the GIL, and the thread that gets
it later reaches the all-reduce later: on the 7B Q4_0 file that cost 4 chips ~13 ms per token
over 1 chip. Here the whole half-layer is one ``nogil`` call; the matmul kernels, attention and
quantization are the same compiled functions the Python path calls, so the results are equal up
to float re-association (tests/unit/model/test_model.py compares logits).

Which weights: numba weights of the types the registry marks ``fusable`` (``kernels/quants/``:
the int8-activation paths); a chip's q/k/v stack may hold several runs (Q4_K_M: q and k Q4_K, v
Q6_K), its gate/up stack one. Anything else (float weights, onnxruntime) returns None from
:func:`attention_args` / :func:`ffn_args` and the caller keeps the Python path. The kernel for a
weight is chosen at compile time from the numba types of its arrays (:func:`_mv`, matched against
each path's ``arg_types``), so one cached compiled function serves every model with the same
type mix.

Caching caveat (numba's, as in matmul_simd): the on-disk cache of these functions holds the
kernels they call as compiled then, and is invalidated by edits to this file only. After
changing a kernel in ``kernels/quants/``, matmul_kernels, attention or elementwise, delete
``edgebox/kernels/__pycache__/fused.*`` (a fresh install or clone has no stale cache).
"""

from __future__ import annotations

import numpy as np
from numba import literal_unroll, njit, types
from numba.extending import overload

from edgebox.kernels import attention as A
from edgebox.kernels import barrier
from edgebox.kernels import elementwise as E
from edgebox.kernels import matmul_kernels as K
from edgebox.kernels.kv_quant import fwht_rows
from edgebox.kernels.linear import AutoLinear, NumbaLinear
from edgebox.kernels.quants import registry

__all__ = ["attention_args", "ffn_args", "attention_decode_block", "ffn_decode_block", "decode_layer"]


def _mv(w, xq, xd, xs16, xsd16, xsd32, out):
    """w (a weight's kernel arrays, as PackedWeight.kernel_args) times the quantized activations."""
    raise NotImplementedError  # compiled only, through the overload below


@overload(_mv, jit_options=dict(nogil=True))
def _mv_overload(w, xq, xd, xs16, xsd16, xsd32, out):
    sig = tuple(t.dtype.name if isinstance(t, types.Array) else "bool" for t in w.types)
    kernels = registry.fusable_paths().get(sig)
    if kernels is None:
        return None
    mv = kernels.mv
    n = len(sig)
    if n == 2:
        return lambda w, xq, xd, xs16, xsd16, xsd32, out: mv(w[0], w[1], xq, xd, xs16, xsd16, xsd32, out)
    if n == 4:
        return lambda w, xq, xd, xs16, xsd16, xsd32, out: mv(w[0], w[1], w[2], w[3], xq, xd, xs16, xsd16, xsd32, out)
    if n == 5:
        return lambda w, xq, xd, xs16, xsd16, xsd32, out: mv(w[0], w[1], w[2], w[3], w[4], xq, xd, xs16, xsd16, xsd32, out)
    if n == 6:
        return lambda w, xq, xd, xs16, xsd16, xsd32, out: mv(w[0], w[1], w[2], w[3], w[4], w[5], xq, xd, xs16, xsd16, xsd32, out)
    return None


@njit(nogil=True, cache=True)
def quantize_rows(x):
    """x float32 [T, n] (C order) -> its q8_0 activations (xq, xd, xs16, xsd16, xsd32), flat, as
    matmul's (``fused_batch`` quantizes its B rows with it too)."""
    T, n = x.shape
    nb = n // 32
    xq = np.empty(T * n, np.int8)
    xd = np.empty(T * nb, np.float32)
    xs16 = np.empty(T * 2 * nb, np.int32)
    xsd16 = np.empty(T * 2 * nb, np.float32)
    xsd32 = np.empty(T * nb, np.float32)
    K.quantize_act(x.reshape(-1), n, xq, xd, xs16, xsd16, xsd32)
    return xq, xd, xs16, xsd16, xsd32


@njit(nogil=True, cache=True)
def _linear(w, n_pad, x):
    """x float32 [n_in] -> float32 [n_pad] (the weight's rows padded to whole row groups)."""
    xq, xd, xs16, xsd16, xsd32 = quantize_rows(x.reshape(1, x.shape[0]))
    out = np.empty(n_pad, np.float32)
    _mv(w, xq, xd, xs16, xsd16, xsd32, out)
    return out


@njit(nogil=True, cache=True)
def _linear_runs(runs, n_out, x):
    """x float32 [n_in] -> float32 [n_out] through a stack of runs ((arrays, padded rows, rows)
    each, one weight type per run), their outputs side by side: x is quantized once."""
    xq, xd, xs16, xsd16, xsd32 = quantize_rows(x.reshape(1, x.shape[0]))
    out = np.empty(n_out, np.float32)
    off = 0
    for run in literal_unroll(runs):
        y = np.empty(run[1], np.float32)
        _mv(run[0], xq, xd, xs16, xsd16, xsd32, y)
        out[off : off + run[2]] = y[: run[2]]
        off += run[2]
    return out


@njit(nogil=True, cache=True)
def qkv_heads(qkv, bias, nh, nkv, hd, cos, sin, neox, rot_k, rot_v):
    """The q/k/v projections of B tokens, float32 [B, (Hc + 2 Hkv_c) * hd], modified -> q
    [B, Hc, hd], k and v [B, Hkv_c, hd]: the bias added (qwen2; empty: none), q and k roped
    (cos, sin [B, n_rot/2]), then a quantized cache's Hadamard rotations (rot_k of q and k, rot_v
    of v; 0: none, ``kv_quant``)."""
    B = qkv.shape[0]
    for b in range(B):
        for i in range(bias.shape[0]):
            qkv[b, i] += bias[i]
    qk = np.ascontiguousarray(qkv[:, : (nh + nkv) * hd]).reshape(B, nh + nkv, hd)
    E.apply_rope_kernel(qk, cos, sin, neox)
    v0 = (nh + nkv) * hd
    v = np.ascontiguousarray(qkv[:, v0 : v0 + nkv * hd]).reshape(B, nkv, hd)
    for b in range(B):
        if rot_k:
            fwht_rows(qk[b], rot_k)
        if rot_v:
            fwht_rows(v[b], rot_v)
    return np.ascontiguousarray(qk[:, :nh]), np.ascontiguousarray(qk[:, nh:]), v


@njit(nogil=True, cache=True)
def attend_cached(q, k, v, kl, vl, tk, tv, rot_v, layer, starts, order, hstart, n_threads):
    """Sequence b's new key and value (k, v [B, Hkv_c, hd]) into slot starts[b] of its caches
    kl[b], vl[b] (``attention.decode_batch_kernel``'s forms), then its queries q [B, Hc, hd] over
    slots 0..starts[b] -> float32 [B, Hc, hd], rot_v undone (H @ H = I); n_threads > 1: spread
    over that many of numba's threads (worth it over a long context)."""
    B, nh, hd = q.shape
    slots = np.arange(B)
    A.append_kv_kernel(k, v, kl, vl, tk, tv, layer, slots, starts)
    att = np.empty((B, nh, hd), np.float32)
    if n_threads > 1:
        A.decode_batch_kernel_parallel(q, kl, vl, tk, tv, layer, slots, starts + 1, order, hstart, att, n_threads)
    else:
        A.decode_batch_kernel(q, kl, vl, tk, tv, layer, slots, starts + 1, order, hstart, att)
    if rot_v:
        for b in range(B):
            fwht_rows(att[b], rot_v)
    return att


@njit(nogil=True, cache=True)
def attention_decode_block(
    h,
    wqkv,
    bias,
    wo,
    n_o_pad,
    n_embd,
    nh,
    nkv,
    hd,
    cos,
    sin,
    neox,
    kc,
    vc,
    tk,
    tv,
    rot_k,
    rot_v,
    layer,
    start,
    order,
    hstart,
    n_threads,
):
    """One chip's attention for one token: h float32 [D] -> its partial sum [D]; the token's
    key and value go to slot ``start`` of kc, vc (uint16 [n_layer, n_ctx, Hkv_c, hd] float16
    bits, or uint8 [..., row bytes] GGML blocks; tk, tv: their ``kv_quant`` type codes) and it
    attends over slots 0..start (the cache holds positions in slot order); rot_k, rot_v: the
    Hadamard rotations of a quantized K and V (0: none; ``kv_quant``). wqkv: the runs of the
    chip's q/k/v stack (one per weight type); n_threads > 1: the attention over the cache is
    spread over that many of numba's threads (worth it over a long context)."""
    # project to q, k, v (+bias on qwen2), rope, a quantized cache's rotations
    qkv = _linear_runs(wqkv, (nh + 2 * nkv) * hd, h)  # [(Hc + 2 Hkv_c)*hd]
    q, k, v = qkv_heads(qkv.reshape(1, -1), bias, nh, nkv, hd, cos, sin, neox, rot_k, rot_v)  # [1, Hc|Hkv_c, hd]
    # the new key and value into the cache, then attention over it (a batch of one sequence)
    kc1, vc1 = kc.reshape((1,) + kc.shape), vc.reshape((1,) + vc.shape)  # [1 slot, n_layer, n_ctx, Hkv_c, ...]
    att = attend_cached(q, k, v, kc1, vc1, tk, tv, rot_v, layer, np.full(1, start, np.int64), order, hstart, n_threads)
    # this chip's columns of the output projection
    return _linear(wo, n_o_pad, att.reshape(-1))[:n_embd]


@njit(nogil=True, cache=True)
def ffn_decode_block(h, w_gate_up, n_gu_pad, n_ffn, w_down, n_d_pad, n_embd):
    """One chip's FFN rows for one token: h float32 [D] -> its partial sum [D]."""
    gu = _linear(w_gate_up, n_gu_pad, h)  # [2 Fc (padded)]: gate rows, then up rows
    g = np.empty(n_ffn, np.float32)
    for i in range(n_ffn):
        g[i] = E.silu(gu[i]) * gu[n_ffn + i]
    return _linear(w_down, n_d_pad, g)[:n_embd]


@njit(nogil=True, cache=True)
def _rms_norm(x, w, eps):
    """x float32 [D] -> normalized and scaled by w, a new array (elementwise.rms_norm_kernel)."""
    out = np.empty((1, x.shape[0]), np.float32)
    E.rms_norm_kernel(x.reshape(1, -1), w, eps, out)
    return out[0]


@njit(nogil=True, cache=True)
def decode_layer(x, attn_norm, ffn_norm, eps, attn, ffn, caches, layer, start, cos, sin, neox, hd, bufs, sync, me, att_threads):
    """One layer of a one-token step for the chips of one host thread: x float32 [D], this
    thread's copy of the residual stream, is updated in place; the partial sums of its chips and
    of the other threads' meet in ``barrier.all_reduce`` (bufs, sync; thread ``me``), so every
    thread ends the layer with the same x. attn, ffn: per chip of the thread holding the block,
    (active, ...) + ``decode_attention_args`` / ``decode_ffn_args`` (UniTuples: a layer's chips
    share weight types; a thread holding none gets one inactive entry, as numba cannot type an
    empty tuple); caches: every chip's (k, v, their kv_quant codes) of the sequence's cache,
    indexed by attn's slot; att_threads: attention_decode_block's n_threads. False if another
    thread aborted."""
    D = x.shape[0]
    # attention: each chip's heads, their partial sums added, then all-reduced
    h = _rms_norm(x, attn_norm, eps)  # [D]
    part = np.zeros(D, np.float32)
    for c in range(len(attn)):
        g = attn[c]
        if g[0]:
            kv = caches[g[1]]
            part += attention_decode_block(
                h,
                g[2],
                g[3],
                g[4],
                g[5],
                D,
                g[6],
                g[7],
                hd,
                cos,
                sin,
                neox,
                kv[0],
                kv[1],
                kv[2],
                kv[3],
                g[8],
                g[9],
                layer,
                start,
                g[10],
                g[11],
                att_threads,
            )
    if not barrier.all_reduce(part, bufs, sync, me, 2 * layer):
        return False
    x += part
    # feed-forward: each chip's FFN rows, the same way
    h = _rms_norm(x, ffn_norm, eps)  # [D]
    part[:] = 0.0
    for c in range(len(ffn)):
        g = ffn[c]
        if g[0]:
            part += ffn_decode_block(h, g[1], g[2], g[3], g[4], g[5], D)
    if not barrier.all_reduce(part, bufs, sync, me, 2 * layer + 1):
        return False
    x += part
    return True


# -- which linears can go in: their numba weights for T rows, as (kernel arrays, padded rows, rows) --


def weight_args(lin, T: int = 1):
    """(kernel arrays, padded rows, rows) of the weight a linear uses for T rows, if numba's
    and of an int8-activation (``fusable``) type; else None."""
    if isinstance(lin, AutoLinear):
        lin = lin.for_tokens(T)
    if not isinstance(lin, NumbaLinear):
        return None
    lin.prepare()
    w = lin.packed
    if not w.kernels.fusable:
        return None
    return tuple(w.kernel_args), w.n_out_padded, w.n_out


def runs_args(lin, T: int = 1):
    """A linear's weights for T rows as runs, one ``weight_args`` per run of a chip's
    FusedLinear (one per weight type); None if any cannot go in."""
    if hasattr(lin, "parts"):  # a chip's FusedLinear
        lin.prepare()
        runs = [weight_args(r, T) for r in lin._runs]
    else:
        runs = [weight_args(lin, T)]
    return None if any(r is None for r in runs) else tuple(runs)


def bias_args(bqkv) -> np.ndarray:
    """The q/k/v bias as the blocks take it: float32, empty when the model has none."""
    return np.zeros(0, np.float32) if bqkv is None else np.ascontiguousarray(bqkv, np.float32)


def attention_args(wqkv, bqkv, wo):
    """(q/k/v runs, bias, wo arrays, its padded rows), or None."""
    a, b = runs_args(wqkv), weight_args(wo)
    if a is None or b is None:
        return None
    return a, bias_args(bqkv), b[0], b[1]


def decode_attention_args(lw, n_heads, n_kv, kv_rot, groups):
    """A chip's attention block as ``decode_layer`` takes it: (q/k/v runs, bias, wo, its padded
    rows, n_heads, n_kv, rot_k, rot_v, order, hstart), or None. groups: ``head_groups``."""
    a = attention_args(lw.wqkv, lw.bqkv, lw.wo)
    return None if a is None else (*a, n_heads, n_kv, kv_rot[0], kv_rot[1], groups[0], groups[1])


def decode_ffn_args(lw, n_ffn):
    """A chip's FFN block as ``decode_layer`` takes it: (gate/up, its padded rows, n_ffn, down,
    its padded rows), or None."""
    f = ffn_args(lw.w_gate_up, lw.w_down)
    return None if f is None else (f[0], f[1], n_ffn, f[2], f[3])


def ffn_args(w_gate_up, w_down):
    """(gate/up arrays, its padded rows, down arrays, its padded rows), or None."""
    a, b = runs_args(w_gate_up), weight_args(w_down)
    if a is None or b is None or len(a) != 1:
        return None
    return a[0][0], a[0][1], b[0], b[1]
