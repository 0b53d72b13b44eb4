"""numba attention over a float16 or q8_0/q4_0 KV cache: decode (one query per sequence) and tiled prefill.

Spec: :func:`edgebox.kernels.ref.attention` (causal by position, grouped-query heads: query head
h reads KV head ``h // (H // Hkv)`` unless ``kv_of_head`` says otherwise, scale 1/sqrt(hd),
softmax with the max subtracted, float32); results differ from it by re-association only.

Invariant: cache slot index == position, so decode attends over every filled slot and prefill's
query i sees slots ``0 .. start+i``. The cache is read in place: float16 as its uint16 view,
q8_0/q4_0 as the uint8 view of GGML's blocks (``kernels.kv_quant``), dequantized into float32
scratch as read, the query rounded through q8_0 first when K is quantized (as llama.cpp's flash
attention). The element type is chosen at compile time by the view's dtype.

Entry points: ``attention_decode`` (one sequence), ``attention_decode_batch`` (one array of
caches), ``attention_decode_append`` (the engine's decode step: caches in a typed List from
``kv_lists``, the new key and value written by the kernel, one call per layer for every
sequence), ``attention_prefill`` (the T new keys already cached).

How: decode walks the cache in slot order (one contiguous run per key) and streams K and V once;
prefill is flash-attention style per (KV head, tile of BLOCK_Q queries) with an online softmax,
skipping key blocks no query of the tile sees.

Threads: every kernel is ``nogil`` (one host thread per chip). ``parallel=True`` variants run only
when asked and only on a thread-safe numba threading layer (``workqueue`` aborts when two host
threads launch parallel kernels: :func:`threading_layer_is_threadsafe`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload
from numba.typed import List

from edgebox.kernels import kv_quant
from edgebox.kernels.elementwise import FM_REDUCE, expf, f16_to_f32, f32_to_f16
from edgebox.kernels.kv_quant import F16, block_bytes, block_scale, block_vec, dequantize_row, quantize_row, round_query_row
from edgebox.kernels.matmul_simd import (
    abs_i8,
    add_f32,
    cvt_f32,
    fma_f32,
    fma_f32_s,
    hadd_i16,
    hsum_f32,
    ld_f32x8,
    ld_i8x32,
    maddubs,
    mul_f32_s,
    sign_i8,
    st_f16x8,
    st_f32x8,
    zero_f32,
)

__all__ = [
    "attention_decode",
    "attention_decode_batch",
    "attention_decode_append",
    "kv_lists",
    "KVLists",
    "attention_prefill",
    "threading_layer_is_threadsafe",
    "head_groups",
    "decode_batch_kernel",
    "decode_batch_kernel_parallel",
    "append_kv_kernel",
    "store",
    "store_kernel",
    "prefill_kernel",
    "prefill_kernel_parallel",
    "BLOCK_Q",
    "BLOCK_K",
    "Caches",
    "cache_view",
]

# Same choice as edgebox.kernels.matmul, so the import order does not matter: omp is required
# for concurrent parallel launches from several host threads (tbb would do too).
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    try:
        from numba.np.ufunc import omppool  # noqa: F401

        numba.config.THREADING_LAYER = "omp"
    except ImportError:
        pass

BLOCK_Q = 32  # queries per prefill tile
BLOCK_K = 64  # keys per prefill block (K and V block in float32: 2 * 64 * hd * 4 bytes)


def threading_layer_is_threadsafe() -> bool:
    """True when numba's parallel kernels may be launched from several host threads at once.

    That is the omp and tbb layers; ``workqueue`` aborts the process ("Concurrent access has
    been detected") when two threads launch parallel kernels at the same time.
    """
    try:
        layer = numba.threading_layer()  # the layer in use, once a parallel kernel ran
    except ValueError:
        layer = numba.config.THREADING_LAYER  # what will be chosen at the first launch
        if layer == "default":  # the first of the priority list that loads
            for name in numba.config.THREADING_LAYER_PRIORITY:
                try:
                    __import__(f"numba.np.ufunc.{name}pool" if name != "workqueue" else "numba.np.ufunc.workqueue")
                except ImportError:
                    continue
                layer = name
                break
    return layer in ("omp", "tbb", "threadsafe", "safe")


# ---------------------------------------------------------------------------------------------
# Which query heads read which KV head.
#
# The kernels take the map query head -> KV head as CSR: ``order`` [H] lists the query heads
# grouped by KV head and ``hstart`` [Hkv+1] where each KV head's run starts, so the heads of KV
# head g are order[hstart[g]:hstart[g+1]]. The default is GQA's h // (H // Hkv); a chip whose
# contiguous range of query heads straddles KV heads unevenly (heads 0..9 with 7 per KV head:
# 7 on KV head 0, 3 on KV head 1) passes its own map (``kv_of_head``).


def head_groups(H: int, Hkv: int, kv_of_head=None) -> tuple[np.ndarray, np.ndarray]:
    """(order int64 [H], hstart int64 [Hkv+1]) for the map query head -> KV head.

    kv_of_head: int [H] with values in [0, Hkv), or None for h // (H // Hkv) (H % Hkv == 0).
    """
    if kv_of_head is None:
        if Hkv <= 0 or H % Hkv:
            raise ValueError(f"attention: {H} query heads do not group over {Hkv} KV heads; pass kv_of_head")
        return _default_groups(H, Hkv)
    m = np.asarray(kv_of_head)
    if m.shape != (H,) or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"attention: kv_of_head must be {H} integers, got {m.dtype} {m.shape}")
    return _custom_groups(m.astype(np.int64).tobytes(), H, Hkv)


@functools.lru_cache(maxsize=64)
def _default_groups(H: int, Hkv: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.arange(H, dtype=np.int64)
    hstart = np.arange(Hkv + 1, dtype=np.int64) * (H // Hkv)
    order.flags.writeable = hstart.flags.writeable = False
    return order, hstart


@functools.lru_cache(maxsize=256)
def _custom_groups(key: bytes, H: int, Hkv: int) -> tuple[np.ndarray, np.ndarray]:
    m = np.frombuffer(key, np.int64)
    if H and (m.min() < 0 or m.max() >= Hkv):
        raise ValueError(f"attention: kv_of_head values must be in [0, {Hkv}), got {m.tolist()}")
    order = np.argsort(m, kind="stable").astype(np.int64)
    hstart = np.zeros(Hkv + 1, np.int64)
    hstart[1:] = np.cumsum(np.bincount(m, minlength=Hkv))
    order.flags.writeable = hstart.flags.writeable = False
    return order, hstart


# ---------------------------------------------------------------------------------------------
# Decode


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_scores(q, kc, n, order, hstart, g0, g1, sc):
    """sc[h, s] = q[h] . k[s, kv(h)] for the query heads of KV heads g0..g1-1, slots 0..n-1.

    Four keys per pass over q[h] (four independent sums: the FMA latency is hidden and q is
    loaded once per four keys). The cache is walked in slot order: per slot one contiguous run
    of (g1-g0)*hd values, which the hardware prefetcher follows (a KV-head-major walk jumps
    Hkv*hd*2 bytes, often a page, from one key to the next).
    """
    hd = q.shape[1]
    s = 0
    while s + 4 <= n:
        for g in range(g0, g1):
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for d in range(hd):
                    qd = q[h, d]
                    a0 += qd * f16_to_f32(kc[s, g, d])
                    a1 += qd * f16_to_f32(kc[s + 1, g, d])
                    a2 += qd * f16_to_f32(kc[s + 2, g, d])
                    a3 += qd * f16_to_f32(kc[s + 3, g, d])
                sc[h, s] = a0
                sc[h, s + 1] = a1
                sc[h, s + 2] = a2
                sc[h, s + 3] = a3
        s += 4
    while s < n:
        for g in range(g0, g1):
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                a0 = np.float32(0.0)
                for d in range(hd):
                    a0 += q[h, d] * f16_to_f32(kc[s, g, d])
                sc[h, s] = a0
        s += 1


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_values(vc, n, order, hstart, g0, g1, sc, out):
    """out[h] += sum_s sc[h, s] * v[s, kv(h)] for the query heads of KV heads g0..g1-1.

    Several keys per pass over out[h] (fewer loads/stores of the accumulator row). With one
    query head per KV head, eight value rows are widened straight from the cache; with GQA four
    value rows are widened once into a float32 buffer and reused by the KV head's query heads.
    """
    hd = out.shape[1]
    gmax = 0
    for g in range(g0, g1):
        gmax = max(gmax, hstart[g + 1] - hstart[g])
    s = 0
    if gmax <= 1:
        while s + 8 <= n:
            for g in range(g0, g1):
                for idx in range(hstart[g], hstart[g + 1]):
                    h = order[idx]
                    p0 = sc[h, s]
                    p1 = sc[h, s + 1]
                    p2 = sc[h, s + 2]
                    p3 = sc[h, s + 3]
                    p4 = sc[h, s + 4]
                    p5 = sc[h, s + 5]
                    p6 = sc[h, s + 6]
                    p7 = sc[h, s + 7]
                    for d in range(hd):
                        out[h, d] += (
                            (p0 * f16_to_f32(vc[s, g, d]) + p1 * f16_to_f32(vc[s + 1, g, d]))
                            + (p2 * f16_to_f32(vc[s + 2, g, d]) + p3 * f16_to_f32(vc[s + 3, g, d]))
                        ) + (
                            (p4 * f16_to_f32(vc[s + 4, g, d]) + p5 * f16_to_f32(vc[s + 5, g, d]))
                            + (p6 * f16_to_f32(vc[s + 6, g, d]) + p7 * f16_to_f32(vc[s + 7, g, d]))
                        )
            s += 8
    else:
        vb = np.empty((4, hd), np.float32)
        while s + 4 <= n:
            for g in range(g0, g1):
                if hstart[g + 1] == hstart[g]:
                    continue
                for c in range(4):
                    for d in range(hd):
                        vb[c, d] = f16_to_f32(vc[s + c, g, d])
                for idx in range(hstart[g], hstart[g + 1]):
                    h = order[idx]
                    p0 = sc[h, s]
                    p1 = sc[h, s + 1]
                    p2 = sc[h, s + 2]
                    p3 = sc[h, s + 3]
                    for d in range(hd):
                        out[h, d] += (p0 * vb[0, d] + p1 * vb[1, d]) + (p2 * vb[2, d] + p3 * vb[3, d])
            s += 4
    while s < n:
        for g in range(g0, g1):
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                p0 = sc[h, s]
                for d in range(hd):
                    out[h, d] += p0 * f16_to_f32(vc[s, g, d])
        s += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _round_heads(q, i0, i1, order):
    """A copy of q [H, hd] whose rows order[i0:i1] are rounded through q8_0 (the query of a dot
    product with a quantized K, as llama.cpp's flash attention makes it); the others are 0."""
    hd = q.shape[1]
    qr = np.zeros(q.shape, np.float32)
    scratch = np.empty(hd // kv_quant.QK * 34, np.uint8)
    for idx in range(i0, i1):
        round_query_row(q[order[idx]], scratch, qr[order[idx]])
    return qr


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_scores_q(q, kc, tk, n, order, hstart, g0, g1, sc):
    """_decode_scores over a quantized K (kc uint8 [S, Hkv, row bytes] of type code tk; q:
    already rounded through q8_0). Per block of 32: the codes against q in an 8-lane float
    accumulator, scaled by the block's d into the key's accumulator (no horizontal sum per
    block, no widened copy of the row); four keys per pass over q[h]. The cache is read as one
    flat byte array (no array view per key)."""
    hd = q.shape[1]
    nb = hd // kv_quant.QK
    bs = block_bytes(tk)
    kf = kc.reshape(-1)
    rk = kc.shape[2]  # bytes per row
    rs = kc.shape[1] * rk  # bytes per slot
    s = 0
    while s + 4 <= n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                qh = q[h]
                a0 = zero_f32()
                a1 = zero_f32()
                a2 = zero_f32()
                a3 = zero_f32()
                for b in range(nb):
                    o = o0 + b * bs
                    p0 = zero_f32()
                    p1 = zero_f32()
                    p2 = zero_f32()
                    p3 = zero_f32()
                    for j in range(4):
                        qv = ld_f32x8(qh, b * 32 + 8 * j)
                        p0 = fma_f32(qv, block_vec(kf, o, j, tk), p0)
                        p1 = fma_f32(qv, block_vec(kf, o + rs, j, tk), p1)
                        p2 = fma_f32(qv, block_vec(kf, o + 2 * rs, j, tk), p2)
                        p3 = fma_f32(qv, block_vec(kf, o + 3 * rs, j, tk), p3)
                    a0 = fma_f32_s(p0, block_scale(kf, o), a0)
                    a1 = fma_f32_s(p1, block_scale(kf, o + rs), a1)
                    a2 = fma_f32_s(p2, block_scale(kf, o + 2 * rs), a2)
                    a3 = fma_f32_s(p3, block_scale(kf, o + 3 * rs), a3)
                sc[h, s] = hsum_f32(a0)
                sc[h, s + 1] = hsum_f32(a1)
                sc[h, s + 2] = hsum_f32(a2)
                sc[h, s + 3] = hsum_f32(a3)
        s += 4
    while s < n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                qh = q[h]
                a0 = zero_f32()
                for b in range(nb):
                    o = o0 + b * bs
                    p0 = zero_f32()
                    for j in range(4):
                        p0 = fma_f32(ld_f32x8(qh, b * 32 + 8 * j), block_vec(kf, o, j, tk), p0)
                    a0 = fma_f32_s(p0, block_scale(kf, o), a0)
                sc[h, s] = hsum_f32(a0)
        s += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _quant_heads(q, i0, i1, order):
    """The rows order[i0:i1] of q [H, hd] quantized to q8_0 (uint8 [H, hd/32*34], GGML rows; the
    other rows are left unset): the query of llama.cpp's vec_dot_q8_0_q8_0."""
    hd = q.shape[1]
    qrows = np.empty((q.shape[0], hd // kv_quant.QK * 34), np.uint8)
    for idx in range(i0, i1):
        quantize_row(q[order[idx]], qrows[order[idx]], kv_quant.Q8_0)
    return qrows


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _dot_q8(qv, kf, o, d, acc):
    """acc + d * (the int8 dot product of the 32 codes at kf[o+2:o+34] with qv), in 8 lanes."""
    k = ld_i8x32(kf, o + 2)
    return fma_f32_s(cvt_f32(hadd_i16(maddubs(abs_i8(k), sign_i8(qv, k)))), d, acc)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_scores_q8(qrows, kc, n, order, hstart, g0, g1, sc):
    """_decode_scores over a q8_0 K, as llama.cpp's ggml_vec_dot_q8_0_q8_0: per block of 32 the
    integer dot product of the key's and the query's codes (vpmaddubsw on |k| and q with k's
    sign, pairs summed to int32), converted once and scaled by d_k * d_q into the key's 8-lane
    accumulator; four keys per pass over the query (qrows: :func:`_quant_heads`)."""
    nb = qrows.shape[1] // 34
    kf = kc.reshape(-1)
    rk = kc.shape[2]
    rs = kc.shape[1] * rk
    s = 0
    while s + 4 <= n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                qr = qrows[h]
                a0 = zero_f32()
                a1 = zero_f32()
                a2 = zero_f32()
                a3 = zero_f32()
                for b in range(nb):
                    o = o0 + b * 34
                    qv = ld_i8x32(qr, b * 34 + 2)
                    dq = block_scale(qr, b * 34)
                    a0 = _dot_q8(qv, kf, o, dq * block_scale(kf, o), a0)
                    a1 = _dot_q8(qv, kf, o + rs, dq * block_scale(kf, o + rs), a1)
                    a2 = _dot_q8(qv, kf, o + 2 * rs, dq * block_scale(kf, o + 2 * rs), a2)
                    a3 = _dot_q8(qv, kf, o + 3 * rs, dq * block_scale(kf, o + 3 * rs), a3)
                sc[h, s] = hsum_f32(a0)
                sc[h, s + 1] = hsum_f32(a1)
                sc[h, s + 2] = hsum_f32(a2)
                sc[h, s + 3] = hsum_f32(a3)
        s += 4
    while s < n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                qr = qrows[h]
                a0 = zero_f32()
                for b in range(nb):
                    o = o0 + b * 34
                    a0 = _dot_q8(ld_i8x32(qr, b * 34 + 2), kf, o, block_scale(qr, b * 34) * block_scale(kf, o), a0)
                sc[h, s] = hsum_f32(a0)
        s += 1


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_values_q(vc, tv, n, order, hstart, g0, g1, sc, out):
    """_decode_values over a quantized V (vc uint8 [S, Hkv, row bytes] of type code tv): per
    8 lanes of out[h], eight keys' codes times (softmax weight x block scale) added in two
    register chains, one load and store of the accumulator per eight keys; the cache read as one
    flat byte array."""
    hd = out.shape[1]
    nb = hd // kv_quant.QK
    bs = block_bytes(tv)
    vf = vc.reshape(-1)
    rk = vc.shape[2]
    rs = vc.shape[1] * rk
    s = 0
    while s + 8 <= n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                oh = out[h]
                for b in range(nb):
                    o = o0 + b * bs
                    w0 = sc[h, s] * block_scale(vf, o)
                    w1 = sc[h, s + 1] * block_scale(vf, o + rs)
                    w2 = sc[h, s + 2] * block_scale(vf, o + 2 * rs)
                    w3 = sc[h, s + 3] * block_scale(vf, o + 3 * rs)
                    w4 = sc[h, s + 4] * block_scale(vf, o + 4 * rs)
                    w5 = sc[h, s + 5] * block_scale(vf, o + 5 * rs)
                    w6 = sc[h, s + 6] * block_scale(vf, o + 6 * rs)
                    w7 = sc[h, s + 7] * block_scale(vf, o + 7 * rs)
                    for j in range(4):
                        i = b * 32 + 8 * j
                        x0 = fma_f32_s(block_vec(vf, o, j, tv), w0, ld_f32x8(oh, i))
                        x1 = mul_f32_s(block_vec(vf, o + rs, j, tv), w1)
                        x0 = fma_f32_s(block_vec(vf, o + 2 * rs, j, tv), w2, x0)
                        x1 = fma_f32_s(block_vec(vf, o + 3 * rs, j, tv), w3, x1)
                        x0 = fma_f32_s(block_vec(vf, o + 4 * rs, j, tv), w4, x0)
                        x1 = fma_f32_s(block_vec(vf, o + 5 * rs, j, tv), w5, x1)
                        x0 = fma_f32_s(block_vec(vf, o + 6 * rs, j, tv), w6, x0)
                        x1 = fma_f32_s(block_vec(vf, o + 7 * rs, j, tv), w7, x1)
                        st_f32x8(oh, i, add_f32(x0, x1))
        s += 8
    while s < n:
        for g in range(g0, g1):
            o0 = s * rs + g * rk
            for idx in range(hstart[g], hstart[g + 1]):
                h = order[idx]
                oh = out[h]
                p0 = sc[h, s]
                for b in range(nb):
                    o = o0 + b * bs
                    w0 = p0 * block_scale(vf, o)
                    for j in range(4):
                        i = b * 32 + 8 * j
                        st_f32x8(oh, i, fma_f32_s(block_vec(vf, o, j, tv), w0, ld_f32x8(oh, i)))
        s += 1


# The cache's element type is chosen at compile time by the array's dtype: uint16 is float16
# bits, uint8 GGML blocks (then the type code says q8_0 or q4_0). Each stub below is compiled
# only through its overload.


def _is_f16(c) -> bool:
    return isinstance(c, types.Array) and c.dtype == types.uint16


def _scores(q, kc, tk, n, order, hstart, g0, g1, sc):
    raise NotImplementedError


@overload(_scores, jit_options=dict(nogil=True))
def _scores_overload(q, kc, tk, n, order, hstart, g0, g1, sc):
    if _is_f16(kc):
        return lambda q, kc, tk, n, order, hstart, g0, g1, sc: _decode_scores(q, kc, n, order, hstart, g0, g1, sc)

    def quantized(q, kc, tk, n, order, hstart, g0, g1, sc):
        if tk == kv_quant.Q8_0:  # integer dot products, as llama.cpp's
            _decode_scores_q8(_quant_heads(q, hstart[g0], hstart[g1], order), kc, n, order, hstart, g0, g1, sc)
        else:
            _decode_scores_q(_round_heads(q, hstart[g0], hstart[g1], order), kc, tk, n, order, hstart, g0, g1, sc)

    return quantized


def _values(vc, tv, n, order, hstart, g0, g1, sc, out):
    raise NotImplementedError


@overload(_values, jit_options=dict(nogil=True))
def _values_overload(vc, tv, n, order, hstart, g0, g1, sc, out):
    if _is_f16(vc):
        return lambda vc, tv, n, order, hstart, g0, g1, sc, out: _decode_values(vc, n, order, hstart, g0, g1, sc, out)
    return lambda vc, tv, n, order, hstart, g0, g1, sc, out: _decode_values_q(vc, tv, n, order, hstart, g0, g1, sc, out)


def _widen(c, s, g, t, dst):
    """Cache row (slot s, KV head g) -> dst float32 [hd]."""
    raise NotImplementedError


@overload(_widen, jit_options=dict(nogil=True))
def _widen_overload(c, s, g, t, dst):
    if _is_f16(c):

        def f16(c, s, g, t, dst):
            for d in range(dst.shape[0]):
                dst[d] = f16_to_f32(c[s, g, d])

        return f16
    return lambda c, s, g, t, dst: dequantize_row(c[s, g], t, dst)


def _store_rows(x, c, t):
    """x float32 [Hkv, hd] -> one cache slot c: uint16 [Hkv, hd] (float16 bits) or uint8
    [Hkv, row bytes] (each head's row quantized to type code t)."""
    raise NotImplementedError


@overload(_store_rows, jit_options=dict(nogil=True))
def _store_rows_overload(x, c, t):
    if _is_f16(c):

        def f16(x, c, t):
            hd = x.shape[1]
            for g in range(x.shape[0]):
                cg = c[g]
                xg = x[g]
                i = 0
                while i + 8 <= hd:
                    st_f16x8(cg, i, ld_f32x8(xg, i))
                    i += 8
                while i < hd:
                    cg[i] = f32_to_f16(xg[i])
                    i += 1

        return f16

    def quantized(x, c, t):
        for g in range(x.shape[0]):
            quantize_row(x[g], c[g], t)

    return quantized


def _round_queries(q, kc, tk):
    """q float32 [T, H, hd] as it is dotted with the keys of kc: itself for float16 keys, else a
    copy rounded through q8_0 (``kv_quant.round_query``)."""
    raise NotImplementedError


@overload(_round_queries, jit_options=dict(nogil=True))
def _round_queries_overload(q, kc, tk):
    if _is_f16(kc):
        return lambda q, kc, tk: q

    def quantized(q, kc, tk):
        T, H, hd = q.shape
        qr = np.empty(q.shape, np.float32)
        scratch = np.empty(hd // kv_quant.QK * 34, np.uint8)
        for t in range(T):
            for h in range(H):
                round_query_row(q[t, h], scratch, qr[t, h])
        return qr

    return quantized


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _decode_heads(q, kc, vc, tk, tv, n, order, hstart, g0, g1, out, sc):
    """The query heads of KV heads g0..g1-1 (q [H, hd] float32) over cache slots 0..n-1.

    kc, vc: uint16 [S, Hkv, hd] (float16 bits, type code F16) or uint8 [S, Hkv, row bytes]
    (GGML blocks, Q8_0 / Q4_0); tk, tv: their type codes (``kv_quant``); out: float32 [H, hd]
    (the rows of those heads are written); sc: float32 [H, >=n] scratch (the same rows are used).
    """
    hd = q.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    _scores(q, kc, tk, n, order, hstart, g0, g1, sc)
    # softmax numerators exp(scale * (score - max)); the sums divide at the end
    i0 = hstart[g0]
    tot = np.empty(hstart[g1] - i0, np.float32)
    for idx in range(i0, hstart[g1]):
        h = order[idx]
        m = sc[h, 0]
        for s in range(1, n):
            v = sc[h, s]
            m = v if v > m else m
        t = np.float32(0.0)
        for s in range(n):
            e = expf(sc[h, s] * scale - m * scale)
            sc[h, s] = e
            t += e
        tot[idx - i0] = t
        for d in range(hd):
            out[h, d] = 0.0
    _values(vc, tv, n, order, hstart, g0, g1, sc, out)
    for idx in range(i0, hstart[g1]):
        h = order[idx]
        inv = np.float32(1.0) / tot[idx - i0]
        for d in range(hd):
            out[h, d] *= inv


@njit(cache=True, nogil=True, error_model="numpy")
def _decode_item(q, kc, vc, tk, tv, layer, slots, lengths, order, hstart, out, sc, w, parts):
    """Work item w: sequence w // parts, its KV-head range w % parts (of parts equal ranges)."""
    b = w // parts
    p = w - b * parts
    Hkv = hstart.shape[0] - 1
    _decode_heads(
        q[b],
        kc[slots[b]][layer],
        vc[slots[b]][layer],
        tk,
        tv,
        lengths[b],
        order,
        hstart,
        p * Hkv // parts,
        (p + 1) * Hkv // parts,
        out[b],
        sc,
    )


@njit(cache=True, nogil=True, error_model="numpy")
def append_kv_kernel(k_new, v_new, kc, vc, tk, tv, layer, slots, starts):
    """The new key and value of each sequence (float32 [B, Hkv, hd]) into slot starts[b] of
    cache slots[b], layer ``layer``, as float16 bits or quantized blocks (kc, vc, tk, tv: as
    decode_batch_kernel's)."""
    for b in range(k_new.shape[0]):
        _store_rows(k_new[b], kc[slots[b]][layer][starts[b]], tk)
        _store_rows(v_new[b], vc[slots[b]][layer][starts[b]], tv)


@njit(cache=True, nogil=True, error_model="numpy")
def store_kernel(x, c, start, t):
    """Rows x float32 [n, Hkv, hd] into slots start..start+n-1 of one layer's cache c (float16
    bits or quantized blocks of type code t), as append_kv_kernel writes one."""
    for i in range(x.shape[0]):
        _store_rows(x[i], c[start + i], t)


@njit(cache=True, nogil=True, error_model="numpy")
def decode_batch_kernel(q, kc, vc, tk, tv, layer, slots, lengths, order, hstart, out):
    """q float32 [B, H, hd]; kc, vc uint16 [n_slots, n_layer, n_ctx, Hkv, hd], or a typed List
    of [n_layer, n_ctx, Hkv, hd] arrays (one per sequence: :func:`kv_lists`), or uint8 with a
    last axis of row bytes for quantized types (tk, tv: the type codes); sequence b reads
    cache slots[b] at layer ``layer``, keys 0..lengths[b]-1 (all visible); (order, hstart): see
    head_groups; out float32 [B, H, hd]."""
    B, H, _ = q.shape
    n_max = 1
    for b in range(B):
        n_max = max(n_max, lengths[b])
    sc = np.empty((H, n_max), np.float32)
    one = np.int64(1)
    for b in range(B):
        _decode_item(q, kc, vc, tk, tv, layer, slots, lengths, order, hstart, out, sc, np.int64(b), one)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def decode_batch_kernel_parallel(q, kc, vc, tk, tv, layer, slots, lengths, order, hstart, out, n_threads):
    """decode_batch_kernel with (sequence, KV-head range) items spread over numba's threads."""
    B, H, _ = q.shape
    # split each sequence's heads only as far as needed to give n_threads threads work
    parts = min(hstart.shape[0] - 1, max(1, (max(1, n_threads) + B - 1) // B))
    n_max = 1
    for b in range(B):
        n_max = max(n_max, lengths[b])
    sc = np.empty((B, H, n_max), np.float32)
    for w in prange(B * parts):
        wi = np.int64(w)
        _decode_item(q, kc, vc, tk, tv, layer, slots, lengths, order, hstart, out, sc[wi // parts], wi, parts)


# ---------------------------------------------------------------------------------------------
# Prefill


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _prefill_head(q, kc, vc, tk, tv, q_pos, k_pos, kmin, order, hstart, g, out, kb, vb, srow, m, l, acc):
    """All queries of q [T, H, hd], for the query heads of KV head g, over keys 0..len(k_pos)-1.

    kmin[blk]: the smallest key position of key block blk. Scratch (float32): kb, vb [BK, hd],
    srow [BK], m, l [>= heads*BQ], acc [>= heads*BQ, hd].
    """
    T, _, hd = q.shape
    n_keys = k_pos.shape[0]
    BQ = BLOCK_Q
    BK = BLOCK_K
    scale = np.float32(1.0 / math.sqrt(hd))
    i0 = hstart[g]
    ng = hstart[g + 1] - i0
    if ng == 0:
        return
    for t0 in range(0, T, BQ):
        tq = min(BQ, T - t0)
        qmax = q_pos[t0]
        for i in range(1, tq):
            qmax = max(qmax, q_pos[t0 + i])
        for r in range(ng * tq):
            m[r] = np.float32(-np.inf)
            l[r] = 0.0
            for d in range(hd):
                acc[r, d] = 0.0
        for blk in range(kmin.shape[0]):
            if kmin[blk] > qmax:  # no query of this tile sees this block
                continue
            s0 = blk * BK
            sk = min(BK, n_keys - s0)
            for c in range(sk):  # widen (or dequantize) the K and V block once
                _widen(kc, s0 + c, g, tk, kb[c])
                _widen(vc, s0 + c, g, tv, vb[c])
            for j in range(ng):
                h = order[i0 + j]
                for i in range(tq):
                    ti = t0 + i
                    qp = q_pos[ti]
                    r = j * tq + i
                    # scores of the whole block, four keys per pass over q[ti, h]
                    c = 0
                    while c + 4 <= sk:
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        for d in range(hd):
                            qd = q[ti, h, d]
                            a0 += qd * kb[c, d]
                            a1 += qd * kb[c + 1, d]
                            a2 += qd * kb[c + 2, d]
                            a3 += qd * kb[c + 3, d]
                        srow[c] = a0 * scale
                        srow[c + 1] = a1 * scale
                        srow[c + 2] = a2 * scale
                        srow[c + 3] = a3 * scale
                        c += 4
                    while c < sk:
                        a0 = np.float32(0.0)
                        for d in range(hd):
                            a0 += q[ti, h, d] * kb[c, d]
                        srow[c] = a0 * scale
                        c += 1
                    # mask (key position after the query's) and the block max
                    bmax = np.float32(-np.inf)
                    for c in range(sk):
                        if k_pos[s0 + c] <= qp:
                            bmax = srow[c] if srow[c] > bmax else bmax
                        else:
                            srow[c] = -np.inf
                    if bmax == -np.inf:
                        continue
                    m_old = m[r]
                    if bmax > m_old:  # rescale what was accumulated so far
                        alpha = expf(m_old - bmax)
                        m[r] = bmax
                        l[r] *= alpha
                        for d in range(hd):
                            acc[r, d] *= alpha
                    mr = m[r]
                    for c in range(sk):
                        srow[c] = expf(srow[c] - mr)
                    tot = np.float32(0.0)
                    for c in range(sk):
                        tot += srow[c]
                    l[r] += tot
                    c = 0
                    while c + 8 <= sk:  # 8 keys per pass over the accumulator row
                        p0 = srow[c]
                        p1 = srow[c + 1]
                        p2 = srow[c + 2]
                        p3 = srow[c + 3]
                        p4 = srow[c + 4]
                        p5 = srow[c + 5]
                        p6 = srow[c + 6]
                        p7 = srow[c + 7]
                        for d in range(hd):
                            acc[r, d] += ((p0 * vb[c, d] + p1 * vb[c + 1, d]) + (p2 * vb[c + 2, d] + p3 * vb[c + 3, d])) + (
                                (p4 * vb[c + 4, d] + p5 * vb[c + 5, d]) + (p6 * vb[c + 6, d] + p7 * vb[c + 7, d])
                            )
                        c += 8
                    while c < sk:
                        p0 = srow[c]
                        for d in range(hd):
                            acc[r, d] += p0 * vb[c, d]
                        c += 1
        for j in range(ng):
            h = order[i0 + j]
            for i in range(tq):
                r = j * tq + i
                inv = np.float32(1.0) / l[r]
                for d in range(hd):
                    out[t0 + i, h, d] = acc[r, d] * inv


@njit(cache=True, nogil=True, error_model="numpy")
def _block_min(k_pos):
    nb = (k_pos.shape[0] + BLOCK_K - 1) // BLOCK_K
    kmin = np.empty(nb, np.int64)
    for blk in range(nb):
        s0 = blk * BLOCK_K
        v = k_pos[s0]
        for c in range(s0 + 1, min(s0 + BLOCK_K, k_pos.shape[0])):
            v = min(v, k_pos[c])
        kmin[blk] = v
    return kmin


@njit(cache=True, nogil=True, error_model="numpy")
def _max_group(hstart):
    gmax = 1
    for g in range(hstart.shape[0] - 1):
        gmax = max(gmax, hstart[g + 1] - hstart[g])
    return gmax


@njit(cache=True, nogil=True, error_model="numpy")
def prefill_kernel(q, kc, vc, tk, tv, q_pos, k_pos, order, hstart, out):
    """q float32 [T, H, hd]; kc, vc uint16 [S, Hkv, hd] (float16 bits) or uint8 [S, Hkv, row
    bytes] (tk, tv: the type codes); q_pos int64 [T]; k_pos int64 [n_keys]; (order, hstart): see
    head_groups; out float32 [T, H, hd]. Every query must see at least one key (the wrapper
    checks)."""
    q = _round_queries(q, kc, tk)
    hd = q.shape[2]
    Hkv = kc.shape[1]
    rows = _max_group(hstart) * BLOCK_Q
    kmin = _block_min(k_pos)
    kb = np.empty((BLOCK_K, hd), np.float32)
    vb = np.empty((BLOCK_K, hd), np.float32)
    srow = np.empty(BLOCK_K, np.float32)
    m = np.empty(rows, np.float32)
    l = np.empty(rows, np.float32)
    acc = np.empty((rows, hd), np.float32)
    for g in range(Hkv):
        _prefill_head(q, kc, vc, tk, tv, q_pos, k_pos, kmin, order, hstart, g, out, kb, vb, srow, m, l, acc)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def prefill_kernel_parallel(q, kc, vc, tk, tv, q_pos, k_pos, order, hstart, out):
    """prefill_kernel with the KV heads spread over numba's threads."""
    q = _round_queries(q, kc, tk)
    hd = q.shape[2]
    Hkv = kc.shape[1]
    rows = _max_group(hstart) * BLOCK_Q
    kmin = _block_min(k_pos)
    kb = np.empty((Hkv, BLOCK_K, hd), np.float32)
    vb = np.empty((Hkv, BLOCK_K, hd), np.float32)
    srow = np.empty((Hkv, BLOCK_K), np.float32)
    m = np.empty((Hkv, rows), np.float32)
    l = np.empty((Hkv, rows), np.float32)
    acc = np.empty((Hkv, rows, hd), np.float32)
    for g in prange(Hkv):
        gi = np.int64(g)
        _prefill_head(
            q, kc, vc, tk, tv, q_pos, k_pos, kmin, order, hstart, gi, out, kb[gi], vb[gi], srow[gi], m[gi], l[gi], acc[gi]
        )


# ---------------------------------------------------------------------------------------------
# Python wrappers: validate, view float16 as uint16 (q8_0/q4_0 blocks as uint8), allocate the output


def attention_decode(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    n_valid: int,
    *,
    q_pos=None,
    k_pos=None,
    kv_of_head=None,
    parallel: bool = False,
) -> np.ndarray:
    """One query token over cache slots 0..n_valid-1 (all visible) -> float32 [H*hd].

    q: float32 [H, hd] (or [1, H, hd]); k_cache, v_cache: float16 [S, Hkv, hd] (or q8_0/q4_0
    blocks [S, Hkv, hd/32], ``kv_quant``; K and V may differ), S >= n_valid.
    With q_pos (one position) and k_pos [n_valid], only keys with k_pos <= q_pos are seen.
    kv_of_head: int [H], the KV head of each query head (default h // (H // Hkv)).
    """
    q = np.asarray(q)
    if q.ndim == 3 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 2:
        raise ValueError(f"attention_decode: q must be [H, hd], got shape {q.shape}")
    if q_pos is not None or k_pos is not None:
        if q_pos is None or k_pos is None:
            raise ValueError("attention_decode: pass both q_pos and k_pos, or neither")
        out = attention_prefill(
            q[None], k_cache, v_cache, 0, q_pos=q_pos, k_pos=np.asarray(k_pos)[:n_valid], kv_of_head=kv_of_head, parallel=parallel
        )
        return out.reshape(-1)
    q = _q32(q)
    kc, vc, tk, tv, hd_kv = _caches(k_cache, v_cache, 3, "attention_decode")
    H, hd = q.shape
    order, hstart = _heads(H, hd, kc.shape[1], hd_kv, kv_of_head, "attention_decode")
    n = int(n_valid)
    if not 0 < n <= kc.shape[0]:
        raise ValueError(f"attention_decode: n_valid={n_valid} must be in [1, {kc.shape[0]}]")
    # a batch of one over the engine layout [n_slots=1, n_layer=1, S, Hkv, hd] (views, no copy):
    # one compiled kernel serves both entry points
    out = np.empty((1, H, hd), np.float32)
    args = (
        q[None],
        kc[None, None],
        vc[None, None],
        tk,
        tv,
        0,
        np.zeros(1, np.int64),
        np.array([n], np.int64),
        order,
        hstart,
        out,
    )
    if parallel and threading_layer_is_threadsafe():
        decode_batch_kernel_parallel(*args, numba.get_num_threads())
    else:
        decode_batch_kernel(*args)
    return out.reshape(H * hd)


def attention_decode_batch(
    q: np.ndarray,
    k_caches: np.ndarray,
    v_caches: np.ndarray,
    lengths,
    *,
    layer: int | None = None,
    slots=None,
    kv_of_head=None,
    parallel: bool = False,
) -> np.ndarray:
    """One query per sequence, each over its own cache -> float32 [B, H*hd].

    q:          float32 [B, H, hd]
    k_caches:   float16 [n_slots, n_layer, n_ctx, Hkv, hd] with ``layer`` given, or
                float16 [n_seq, S_max, Hkv, hd] with ``layer=None``
    lengths:    int [B], sequence b attends over its slots 0..lengths[b]-1 (all visible)
    slots:      int [B], the cache slot of row b of q (default: b)
    kv_of_head: int [H], the KV head of each query head (default h // (H // Hkv))
    """
    q = _q32(np.asarray(q))
    if q.ndim != 3:
        raise ValueError(f"attention_decode_batch: q must be [B, H, hd], got shape {q.shape}")
    if layer is None:
        kc, vc, tk, tv, hd_kv = _caches(k_caches, v_caches, 4, "attention_decode_batch")
        kc, vc, layer = kc[:, None], vc[:, None], 0  # views: [n_seq, 1, S_max, Hkv, hd]
    else:
        kc, vc, tk, tv, hd_kv = _caches(k_caches, v_caches, 5, "attention_decode_batch")
        if not 0 <= int(layer) < kc.shape[1]:
            raise ValueError(f"attention_decode_batch: layer {layer} out of range [0, {kc.shape[1]})")
    B, H, hd = q.shape
    order, hstart = _heads(H, hd, kc.shape[3], hd_kv, kv_of_head, "attention_decode_batch")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64).reshape(-1)
    slots = np.arange(B, dtype=np.int64) if slots is None else np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
    if lengths.shape[0] != B or slots.shape[0] != B:
        raise ValueError(f"attention_decode_batch: {B} queries, {lengths.shape[0]} lengths, {slots.shape[0]} slots")
    if B and (lengths.min() < 1 or lengths.max() > kc.shape[2]):
        raise ValueError(f"attention_decode_batch: lengths must be in [1, {kc.shape[2]}], got {lengths.tolist()}")
    if B and (slots.min() < 0 or slots.max() >= kc.shape[0]):
        raise ValueError(f"attention_decode_batch: slots must be in [0, {kc.shape[0]}), got {slots.tolist()}")
    out = np.empty((B, H, hd), np.float32)
    if B == 0:
        return out.reshape(0, H * hd)
    args = (q, kc, vc, tk, tv, int(layer), slots, lengths, order, hstart, out)
    if parallel and threading_layer_is_threadsafe():
        decode_batch_kernel_parallel(*args, numba.get_num_threads())
    else:
        decode_batch_kernel(*args)
    return out.reshape(B, H * hd)


class KVLists(NamedTuple):
    """Several sequences' caches as the kernels read them: typed Lists of their uint16 views
    (numba passes a list of arrays only that way), with the sizes checked once."""

    k: object  # numba.typed.List of uint16 [n_layer, n_ctx_b, Hkv, hd] (uint8 [..., row bytes] quantized)
    v: object
    n_ctx: np.ndarray  # [B] slots of each cache
    shape: tuple  # (n_layer, Hkv, hd), the same for all
    tk: int  # the K and V type codes (kv_quant), the same for all
    tv: int


def kv_lists(k_caches, v_caches) -> KVLists:
    """Several sequences' caches ([n_layer, n_ctx, Hkv, hd] float16, or [n_layer, n_ctx, Hkv,
    hd/32] q8_0/q4_0 blocks, each; same n_layer, Hkv, hd and types; n_ctx may differ), for
    :func:`attention_decode_append`. Built once per step (~30 µs for eight sequences), used by
    every layer."""
    if not len(k_caches) or len(k_caches) != len(v_caches):
        raise ValueError(f"kv_lists: {len(k_caches)} k caches and {len(v_caches)} v caches")
    views = [_caches(k, v, 4, "kv_lists") for k, v in zip(k_caches, v_caches)]
    first = views[0]
    for c in views:
        if (c.tk, c.tv) != (first.tk, first.tv):
            raise ValueError("kv_lists: every cache must have the same K and V types")
        if c.k.shape[0] != first.k.shape[0] or c.k.shape[2:] != first.k.shape[2:] or c.v.shape[2:] != first.v.shape[2:]:
            raise ValueError(f"kv_lists: caches {first.k.shape} and {c.k.shape} differ in n_layer, Hkv or hd")
        if not (c.k.flags.c_contiguous and c.v.flags.c_contiguous):
            raise ValueError("kv_lists: every cache must be C-contiguous (one typed List holds one array layout)")
    return KVLists(
        List([c.k for c in views]),
        List([c.v for c in views]),
        np.array([c.k.shape[1] for c in views], np.int64),
        (first.k.shape[0], first.k.shape[2], first.hd),
        first.tk,
        first.tv,
    )


def attention_decode_append(
    q: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    caches: tuple,
    layer: int,
    starts,
    *,
    kv_of_head=None,
    parallel: bool = False,
) -> np.ndarray:
    """One new token per sequence: its key and value go into its cache, then its query attends
    over everything the cache holds -> float32 [B, H*hd].

    q:      float32 [B, H, hd]
    k_new, v_new: float32 [B, Hkv, hd], written (as float16, or quantized) to slot starts[b] of layer ``layer``
    caches: :func:`kv_lists` of the B sequences' caches, in the order of q's rows
    starts: int [B], the new token's slot; sequence b attends over slots 0..starts[b] (all
            visible: the new token has the largest position in its cache)
    """
    kl, vl = caches.k, caches.v
    q = _q32(np.asarray(q))
    k_new, v_new = _q32(np.asarray(k_new)), _q32(np.asarray(v_new))
    if q.ndim != 3 or k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(
            f"attention_decode_append: q [B, H, hd] and k, v [B, Hkv, hd], got {q.shape}, {k_new.shape}, {v_new.shape}"
        )
    B, H, hd = q.shape
    if k_new.shape[0] != B or len(caches.n_ctx) != B:
        raise ValueError(f"attention_decode_append: {B} queries, {k_new.shape[0]} new keys, {len(caches.n_ctx)} caches")
    n_layer, Hkv, hd_kv = caches.shape
    if k_new.shape[1:] != (Hkv, hd_kv):
        raise ValueError(f"attention_decode_append: new keys {k_new.shape[1:]}, cache heads {(Hkv, hd_kv)}")
    if not 0 <= int(layer) < n_layer:
        raise ValueError(f"attention_decode_append: layer {layer} out of range [0, {n_layer})")
    order, hstart = _heads(H, hd, Hkv, hd_kv, kv_of_head, "attention_decode_append")
    starts = np.ascontiguousarray(starts, dtype=np.int64).reshape(-1)
    if starts.shape[0] != B:
        raise ValueError(f"attention_decode_append: {B} queries, {starts.shape[0]} starts")
    if B and (starts.min() < 0 or (starts >= caches.n_ctx).any()):
        raise ValueError(f"attention_decode_append: starts {starts.tolist()} outside the caches")
    slots = np.arange(B, dtype=np.int64)
    append_kv_kernel(k_new, v_new, kl, vl, caches.tk, caches.tv, int(layer), slots, starts)
    out = np.empty((B, H, hd), np.float32)
    args = (q, kl, vl, caches.tk, caches.tv, int(layer), slots, starts + 1, order, hstart, out)
    if parallel and threading_layer_is_threadsafe():
        decode_batch_kernel_parallel(*args, numba.get_num_threads())
    else:
        decode_batch_kernel(*args)
    return out.reshape(B, H * hd)


def attention_prefill(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    *,
    q_pos=None,
    k_pos=None,
    kv_of_head=None,
    parallel: bool = False,
) -> np.ndarray:
    """Causal attention of T new tokens whose keys are already cached -> float32 [T, H*hd].

    q: float32 [T, H, hd]; k_cache, v_cache: float16 [S, Hkv, hd] or q8_0/q4_0 blocks [S, Hkv,
    hd/32]. By default query i is at
    position start+i and sees slots 0..start+i (slot index == position). With q_pos [T] and
    k_pos [n_keys] (``start`` is then ignored), query i sees slot j < n_keys iff
    k_pos[j] <= q_pos[i], as ref.attention. kv_of_head: int [H], the KV head of each query
    head (default h // (H // Hkv)).
    """
    q = _q32(np.asarray(q))
    if q.ndim != 3:
        raise ValueError(f"attention_prefill: q must be [T, H, hd], got shape {q.shape}")
    kc, vc, tk, tv, hd_kv = _caches(k_cache, v_cache, 3, "attention_prefill")
    T, H, hd = q.shape
    order, hstart = _heads(H, hd, kc.shape[1], hd_kv, kv_of_head, "attention_prefill")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("attention_prefill: pass both q_pos and k_pos, or neither")
    if q_pos is None:
        start = int(start)
        if start < 0 or start + T > kc.shape[0]:
            raise ValueError(f"attention_prefill: slots {start}..{start + T - 1} are outside a cache of {kc.shape[0]}")
        k_pos = np.arange(start + T, dtype=np.int64)
        q_pos = k_pos[start:]
    else:
        q_pos = np.ascontiguousarray(q_pos, dtype=np.int64).reshape(-1)
        k_pos = np.ascontiguousarray(k_pos, dtype=np.int64).reshape(-1)
        if q_pos.shape[0] != T:
            raise ValueError(f"attention_prefill: {q_pos.shape[0]} query positions for {T} queries")
        if not 0 < k_pos.shape[0] <= kc.shape[0]:
            raise ValueError(f"attention_prefill: {k_pos.shape[0]} key positions for a cache of {kc.shape[0]}")
        if T and k_pos.min() > q_pos.min():
            raise ValueError("attention: a query has no visible key (check q_pos / k_pos)")
    out = np.empty((T, H, hd), np.float32)
    if T == 0:
        return out.reshape(0, H * hd)
    if parallel and threading_layer_is_threadsafe():
        prefill_kernel_parallel(q, kc, vc, tk, tv, q_pos, k_pos, order, hstart, out)
    else:
        prefill_kernel(q, kc, vc, tk, tv, q_pos, k_pos, order, hstart, out)
    return out.reshape(T, H * hd)


def _q32(q: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(q, dtype=np.float32)


class Caches(NamedTuple):
    """A K and a V cache as the kernels read them."""

    k: np.ndarray  # uint16 [..., hd] (float16 bits) or uint8 [..., row bytes] (GGML blocks)
    v: np.ndarray
    tk: int  # type codes (kv_quant.F16, Q8_0, Q4_0)
    tv: int
    hd: int  # values per row


def cache_view(a: np.ndarray, ndim: int, what: str, name: str = "k") -> tuple[np.ndarray, int, int]:
    """One cache (float16 [..., hd] or q8_0/q4_0 block records [..., hd/32]) -> (its uint16 or
    uint8 view, no copy; its type code; values per row). The last axis must be contiguous."""
    code = kv_quant.code_of_array(a) if isinstance(a, np.ndarray) else -1
    if code < 0 or a.ndim != ndim:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{what}: the {name} cache must be a {ndim}-D float16, q8_0 or q4_0 array, got {desc}")
    if a.strides[-1] != a.dtype.itemsize:
        raise ValueError(f"{what}: the {name} cache's last axis must be contiguous")
    if code == F16:
        return a.view(np.uint16), code, a.shape[-1]
    return a.view(np.uint8), code, a.shape[-1] * kv_quant.QK


def store(x: np.ndarray, cache: np.ndarray, start: int) -> None:
    """x float32 [n, Hkv, hd] -> slots start..start+n-1 of one layer's cache (float16 [S, Hkv, hd]
    or q8_0/q4_0 blocks [S, Hkv, hd/32]), bit for bit as ``kv_quant.quantize``, in place: numpy's
    float16 cast and its temporary took 6 % of a 512-token 7B prompt (docs/performance.md)."""
    c, t, hd = cache_view(cache, 3, "store")
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 3 or x.shape[1:] != (c.shape[1], hd) or not 0 <= start <= c.shape[0] - x.shape[0]:
        raise ValueError(f"store: rows {x.shape} at slot {start} do not fit a cache of {cache.shape}")
    store_kernel(x, c, int(start), t)


def _caches(k, v, ndim: int, what: str) -> Caches:
    """K and V caches -> their views and types (:func:`cache_view`); they must agree in every
    axis but the last."""
    kc, tk, hd = cache_view(k, ndim, what, "k")
    vc, tv, hd_v = cache_view(v, ndim, what, "v")
    if kc.shape[:-1] != vc.shape[:-1] or hd != hd_v:
        raise ValueError(f"{what}: k cache {k.shape} and v cache {v.shape} differ")
    return Caches(kc, vc, tk, tv, hd)


def _heads(H: int, hd: int, Hkv: int, hd_kv: int, kv_of_head, what: str) -> tuple[np.ndarray, np.ndarray]:
    if hd != hd_kv:
        raise ValueError(f"{what}: q head size {hd}, cache head size {hd_kv}")
    return head_groups(H, Hkv, kv_of_head)
