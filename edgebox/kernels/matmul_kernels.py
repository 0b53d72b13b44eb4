"""numba kernels: quantized weight (x8 layouts, see matmul_pack) times int8-quantized activations.

Activations (see ``quantize_act``) are llama.cpp's q8_0: per 32 values one float32 scale
``xd = max|x| / 127`` and int8 ``xq = round(x / xd)``.  Alongside come the block sums of ``xq``:
``xs16`` (int32, 32 x the sum per 16 values: Q6_K's -32 offset, ready to subtract), and
``xsd16 = xd * sum16``, ``xsd32 = xd * sum32`` (float32):
they turn unsigned weight codes back into signed values (``sum (q-8)*x = sum q*x - 8*sum x``)
and carry the min/offset terms of Q4_K and the planes types.

Inner step (all int8 types): 32 bytes = 4 values of each of 8 rows; ``vpmaddubsw`` against the 4
activation bytes broadcast to every lane, int16 adds as long as no overflow is possible,
``vpmaddwd`` with ones to int32: lane r = row r.  Per 32-value block the int32 row sums are
converted to float once and fused-multiply-added with the 8 row scales times the activation
scale.  No horizontal sums, no per-value float work.

Loop structure
* ``*_mv`` (T = 1, decode): the parallel loop runs over row groups, and numba's static
  schedule gives each thread one contiguous run of them, so each thread reads its half of the
  matrix as *one* sequential stream; inside a group, even and odd blocks feed two independent
  accumulators (instruction-level parallelism without a second stream).  A software prefetch
  runs _PF = 4 KiB ahead.  The earlier loop over *pairs* of groups (two streams per thread,
  1 KiB prefetch) read 15-20 % slower: the 7B Q4_0 matrices swept back to back in one process,
  pairs vs one stream with 4 KiB prefetch, per matrix shape 30-34 vs 35-38 GB/s when the
  machine's memory was busy and 33-42 vs 50-55 GB/s when it was not (a longer pair prefetch did not help; 8 KiB
  did no better than 4).
* ``*_mm`` (T tokens): one row group x 4 tokens per step, so every weight block unpacked from
  L1 feeds 4 tokens; the parallel loop runs over (row group, token quad) with the token quads
  innermost, so a group's weights stay in L1/L2 while the tokens go by (weights leave DRAM once
  per call), and the group's first quad prefetches _PF ahead (it is the one reading DRAM):
  7B Q4_0 sweep at T=4 234 -> 355, T=8 311 -> 386, T=16 360 -> 407, T=64 413 -> 425 GFLOP/s,
  which is what batched decode of 4-16 streams runs on.  The group's last quad (L1-bound)
  meanwhile prefetches the next group into L2 (prefetcht1: into L1 it evicted the working
  set and gained nothing), so DRAM is read during both kinds of pass: Q4_0 T=8 ~360 -> ~390,
  T=16 ~380 -> ~405 GFLOP/s, Q8_0 T=8 ~220 -> ~237 (old and new alternated, 7B matrices); the
  K-quant kernels do not have it yet.  Ragged T repeats the last token in the final quad
  (results discarded).

Shapes: ``G`` row groups of 8 (even), ``nb = n_in / 32`` blocks.  Weight planes and activations
are passed flat (1-D); outputs are float32 ``[T, G*8]`` flat.  Every kernel releases the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edgebox.kernels.matmul_simd import (
    abs_i8, absmax_f32, add_f32, add_i16, add_i32, and_i8, bc4_i8x32, bc_f32, bc_i32, bf16_to_f32, cvt_f32,
    f16_to_f32, fma_f32, hadd_i16, hmax_f32, hsum_f32, hsum_i32, ld_bf16x8, ld_f16x8, ld_f32x8, ld_i8x8_i32,
    ld_i8x32, ld_u8x8_i32, maddubs, mul_f32, mul_f32_s, mul_i32, nib_hi, nib_lo, or_i8,
    prefetch, prefetch_l2, rint_i32, shl_i8, shr_i8, sign_i8, st_f32x8, st_i32x8_i8, sub_f32, sub_i32, zero_f32,
    zero_i16, zero_i32,
)

_JIT = dict(nogil=True, cache=True)
_PJIT = dict(nogil=True, cache=True, parallel=True)
_PF = 4096          # software prefetch distance in the quant plane, bytes (32 blocks of Q4_0)


# =============================================================================================
# activations

@njit(**_JIT)
def _quant_row(x, t, n, xq, xd, xs16, xsd16, xsd32):
    """Row t of x (flat float32 [T*n]), 32 values per block: four 8-lane vectors, their absolute
    max, then the rounded codes and their two 16-value sums, all in registers (the scalar loop
    this replaced ran ~1.4 ns per value, this one ~0.3)."""
    nb = n // 32
    for b in range(nb):
        i = t * n + 32 * b
        v0 = ld_f32x8(x, i)
        v1 = ld_f32x8(x, i + 8)
        v2 = ld_f32x8(x, i + 16)
        v3 = ld_f32x8(x, i + 24)
        amax = hmax_f32(absmax_f32(absmax_f32(v0, v1), absmax_f32(v2, v3)))
        d = amax / np.float32(127.0)
        idd = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        q0 = rint_i32(mul_f32_s(v0, idd))
        q1 = rint_i32(mul_f32_s(v1, idd))
        q2 = rint_i32(mul_f32_s(v2, idd))
        q3 = rint_i32(mul_f32_s(v3, idd))
        st_i32x8_i8(xq, i, q0)
        st_i32x8_i8(xq, i + 8, q1)
        st_i32x8_i8(xq, i + 16, q2)
        st_i32x8_i8(xq, i + 24, q3)
        s0 = hsum_i32(add_i32(q0, q1))
        s1 = hsum_i32(add_i32(q2, q3))
        e = t * nb + b
        xd[e] = d
        xs16[2 * e] = 32 * s0
        xs16[2 * e + 1] = 32 * s1
        xsd16[2 * e] = d * np.float32(s0)
        xsd16[2 * e + 1] = d * np.float32(s1)
        xsd32[e] = d * np.float32(s0 + s1)


@njit(**_JIT)
def quantize_act(x, n, xq, xd, xs16, xsd16, xsd32):
    """x float32 [T*n_in] (flat, C order; n = n_in) -> xq int8 [T*n_in], xd f32 [T*nb], xs16 i32
    [T*2nb] (32 * sum per 16: Q6_K's offset), xsd16 f32 [T*2nb], xsd32 f32 [T*nb]."""
    for t in range(x.shape[0] // n):
        _quant_row(x, t, n, xq, xd, xs16, xsd16, xsd32)


@njit(**_PJIT)
def quantize_act_par(x, n, xq, xd, xs16, xsd16, xsd32):
    for t in prange(x.shape[0] // n):
        _quant_row(x, t, n, xq, xd, xs16, xsd16, xsd32)


@njit(**_JIT)
def _store4(out, ldo, g, t0, T, acc0, acc1, acc2, acc3):
    st_f32x8(out, t0 * ldo + 8 * g, acc0)
    if t0 + 1 < T:
        st_f32x8(out, (t0 + 1) * ldo + 8 * g, acc1)
    if t0 + 2 < T:
        st_f32x8(out, (t0 + 2) * ldo + 8 * g, acc2)
    if t0 + 3 < T:
        st_f32x8(out, (t0 + 3) * ldo + 8 * g, acc3)


@njit(**_JIT)
def _quad(T, t0):
    """The 4 token indices of a quad starting at t0 (past the end: the last token again)."""
    return t0, min(t0 + 1, T - 1), min(t0 + 2, T - 1), min(t0 + 3, T - 1)


# =============================================================================================
# Q4_0: nib plane q [G, nb, 4, 32], d f16 [G, nb, 8].  w = d * (q - 8).
# One block: 4 loads of 32 bytes, 8 vpmaddubsw (unsigned nibble x signed activation), int16
# sums (8 * 2 * 15 * 127 = 30480 < 32767: no overflow), one vpmaddwd; the -8 is applied in
# float as d * (-8 * xd * sum x).

@njit(**_JIT)
def _nib_block(q, qo, xq, xo):
    """int16 partial sums of one nib-plane block (32 values x 8 rows) against x[xo:xo+32]."""
    a = zero_i16()
    for l in range(4):
        w = ld_i8x32(q, qo + 32 * l)
        a = add_i16(a, maddubs(nib_lo(w), bc4_i8x32(xq, xo + 4 * l)))
        a = add_i16(a, maddubs(nib_hi(w), bc4_i8x32(xq, xo + 16 + 4 * l)))
    return a


@njit(**_JIT)
def _q4_0_blk(q, d, xq, xd, xsd32, k, b, acc):
    """acc += the 8 rows' dot products of block k (activation block b)."""
    D = ld_f16x8(d, 8 * k)
    a = cvt_f32(hadd_i16(_nib_block(q, 128 * k, xq, 32 * b)))
    return fma_f32(D, mul_f32_s(bc_f32(xsd32, b), -8.0), fma_f32(a, mul_f32(D, bc_f32(xd, b)), acc))


@njit(**_JIT)
def _q4_0_group(q, d, xq, xd, xsd32, nb, g, out):
    acc0 = zero_f32()
    acc1 = zero_f32()
    for b in range(0, nb - 1, 2):
        k = g * nb + b
        for i in range(4):
            prefetch(q, 128 * k + _PF + 64 * i)
        acc0 = _q4_0_blk(q, d, xq, xd, xsd32, k, b, acc0)
        acc1 = _q4_0_blk(q, d, xq, xd, xsd32, k + 1, b + 1, acc1)
    if nb % 2:
        acc0 = _q4_0_blk(q, d, xq, xd, xsd32, g * nb + nb - 1, nb - 1, acc0)
    st_f32x8(out, 8 * g, add_f32(acc0, acc1))


@njit(**_PJIT)
def q4_0_mv(q, d, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q4_0_group(q, d, xq, xd, xsd32, nb, g, out)


@njit(**_JIT)
def _q4_0_quad(q, d, xq, xd, xsd32, nb, g, t0, T, out):
    n_in = 32 * nb
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    last = t0 + 4 >= T  # the last one fetches the next group into L2 meanwhile
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    for b in range(nb):
        k = g * nb + b
        qo = 128 * k
        if first:
            prefetch(q, qo + _PF)
            prefetch(q, qo + _PF + 64)
        if last:
            prefetch_l2(q, qo + 128 * nb)
            prefetch_l2(q, qo + 128 * nb + 64)
        a0 = zero_i16()
        a1 = zero_i16()
        a2 = zero_i16()
        a3 = zero_i16()
        for l in range(4):
            w = ld_i8x32(q, qo + 32 * l)
            lo = nib_lo(w)
            hi = nib_hi(w)
            xo = 32 * b + 4 * l
            a0 = add_i16(a0, maddubs(lo, bc4_i8x32(xq, t0 * n_in + xo)))
            a1 = add_i16(a1, maddubs(lo, bc4_i8x32(xq, t1 * n_in + xo)))
            a2 = add_i16(a2, maddubs(lo, bc4_i8x32(xq, t2 * n_in + xo)))
            a3 = add_i16(a3, maddubs(lo, bc4_i8x32(xq, t3 * n_in + xo)))
            a0 = add_i16(a0, maddubs(hi, bc4_i8x32(xq, t0 * n_in + xo + 16)))
            a1 = add_i16(a1, maddubs(hi, bc4_i8x32(xq, t1 * n_in + xo + 16)))
            a2 = add_i16(a2, maddubs(hi, bc4_i8x32(xq, t2 * n_in + xo + 16)))
            a3 = add_i16(a3, maddubs(hi, bc4_i8x32(xq, t3 * n_in + xo + 16)))
        D = ld_f16x8(d, 8 * k)
        D8 = mul_f32_s(D, -8.0)
        e0, e1, e2, e3 = t0 * nb + b, t1 * nb + b, t2 * nb + b, t3 * nb + b
        acc0 = fma_f32(D8, bc_f32(xsd32, e0), fma_f32(cvt_f32(hadd_i16(a0)), mul_f32(D, bc_f32(xd, e0)), acc0))
        acc1 = fma_f32(D8, bc_f32(xsd32, e1), fma_f32(cvt_f32(hadd_i16(a1)), mul_f32(D, bc_f32(xd, e1)), acc1))
        acc2 = fma_f32(D8, bc_f32(xsd32, e2), fma_f32(cvt_f32(hadd_i16(a2)), mul_f32(D, bc_f32(xd, e2)), acc2))
        acc3 = fma_f32(D8, bc_f32(xsd32, e3), fma_f32(cvt_f32(hadd_i16(a3)), mul_f32(D, bc_f32(xd, e3)), acc3))
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_PJIT)
def q4_0_mm(q, d, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _q4_0_quad(q, d, xq, xd, xsd32, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# Q8_0: byte plane q [G, nb, 8, 32] int8, d f16 [G, nb, 8].  w = d * q.
# vpmaddubsw needs one unsigned operand: |w| times x with w's sign moved onto x (vpabsb,
# vpsignb; llama.cpp's AVX2 trick).  A pair sum can reach 2*128*127, so each product vector is
# widened to int32 (vpmaddwd) before it is added.

@njit(**_JIT)
def _q8_chunk(w, x):
    return hadd_i16(maddubs(abs_i8(w), sign_i8(x, w)))


@njit(**_JIT)
def _q8_0_blk(q, d, xq, xd, k, b, acc):
    """acc += the 8 rows' dot products of block k (activation block b)."""
    a = zero_i32()
    for c in range(8):
        a = add_i32(a, _q8_chunk(ld_i8x32(q, 256 * k + 32 * c), bc4_i8x32(xq, 32 * b + 4 * c)))
    return fma_f32(cvt_f32(a), mul_f32(ld_f16x8(d, 8 * k), bc_f32(xd, b)), acc)


@njit(**_JIT)
def _q8_0_group(q, d, xq, xd, nb, g, out):
    acc0 = zero_f32()
    acc1 = zero_f32()
    for b in range(0, nb - 1, 2):
        k = g * nb + b
        for i in range(8):
            prefetch(q, 256 * k + _PF + 64 * i)
        acc0 = _q8_0_blk(q, d, xq, xd, k, b, acc0)
        acc1 = _q8_0_blk(q, d, xq, xd, k + 1, b + 1, acc1)
    if nb % 2:
        acc0 = _q8_0_blk(q, d, xq, xd, g * nb + nb - 1, nb - 1, acc0)
    st_f32x8(out, 8 * g, add_f32(acc0, acc1))


@njit(**_PJIT)
def q8_0_mv(q, d, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q8_0_group(q, d, xq, xd, nb, g, out)


@njit(**_JIT)
def _q8_0_quad(q, d, xq, xd, nb, g, t0, T, out):
    n_in = 32 * nb
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    last = t0 + 4 >= T  # the last one fetches the next group into L2 meanwhile
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    for b in range(nb):
        k = g * nb + b
        qo = 256 * k
        if first:
            for i in range(4):
                prefetch(q, qo + 2 * _PF + 64 * i)
        if last:
            for i in range(4):
                prefetch_l2(q, qo + 256 * nb + 64 * i)
        a0 = zero_i32()
        a1 = zero_i32()
        a2 = zero_i32()
        a3 = zero_i32()
        for c in range(8):
            w = ld_i8x32(q, qo + 32 * c)
            aw = abs_i8(w)
            xo = 32 * b + 4 * c
            a0 = add_i32(a0, hadd_i16(maddubs(aw, sign_i8(bc4_i8x32(xq, t0 * n_in + xo), w))))
            a1 = add_i32(a1, hadd_i16(maddubs(aw, sign_i8(bc4_i8x32(xq, t1 * n_in + xo), w))))
            a2 = add_i32(a2, hadd_i16(maddubs(aw, sign_i8(bc4_i8x32(xq, t2 * n_in + xo), w))))
            a3 = add_i32(a3, hadd_i16(maddubs(aw, sign_i8(bc4_i8x32(xq, t3 * n_in + xo), w))))
        D = ld_f16x8(d, 8 * k)
        acc0 = fma_f32(cvt_f32(a0), mul_f32(D, bc_f32(xd, t0 * nb + b)), acc0)
        acc1 = fma_f32(cvt_f32(a1), mul_f32(D, bc_f32(xd, t1 * nb + b)), acc1)
        acc2 = fma_f32(cvt_f32(a2), mul_f32(D, bc_f32(xd, t2 * nb + b)), acc2)
        acc3 = fma_f32(cvt_f32(a3), mul_f32(D, bc_f32(xd, t3 * nb + b)), acc3)
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_PJIT)
def q8_0_mm(q, d, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _q8_0_quad(q, d, xq, xd, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# Q4_K: nib plane q [G, nb, 4, 32] (one 32-value sub-block per block), sc/m u8 [G, nb, 8],
# d/dmin f16 [G, nb/8, 8].  w = d*sc*q - dmin*m.
# Per sub-block: the Q4_0 int16 block sum, times the 8 rows' 6-bit scales (vpmulld), to float,
# times the activation scale into a per-super-block accumulator; the min term accumulates
# m * (xd * sum x) beside it.  Per super-block: acc += d * sacc - dmin * macc.

@njit(**_JIT)
def _q4_k_sub(q, sc, m, xq, xd, xsd32, k, b, sacc, macc):
    isum = mul_i32(hadd_i16(_nib_block(q, 128 * k, xq, 32 * b)), ld_u8x8_i32(sc, 8 * k))
    sacc = fma_f32(cvt_f32(isum), bc_f32(xd, b), sacc)
    macc = fma_f32(cvt_f32(ld_u8x8_i32(m, 8 * k)), bc_f32(xsd32, b), macc)
    return sacc, macc


@njit(**_JIT)
def _q4_k_group(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, out):
    nsb = nb // 8
    acc = zero_f32()
    for s in range(nsb):
        s0 = zero_f32()
        m0 = zero_f32()
        s1 = zero_f32()
        m1 = zero_f32()
        for j in range(0, 8, 2):
            b = 8 * s + j
            k = g * nb + b
            for i in range(4):
                prefetch(q, 128 * k + _PF + 64 * i)
            s0, m0 = _q4_k_sub(q, sc, m, xq, xd, xsd32, k, b, s0, m0)
            s1, m1 = _q4_k_sub(q, sc, m, xq, xd, xsd32, k + 1, b + 1, s1, m1)
        ks = g * nsb + s
        acc = sub_f32(fma_f32(ld_f16x8(d, 8 * ks), add_f32(s0, s1), acc), mul_f32(ld_f16x8(dmin, 8 * ks), add_f32(m0, m1)))
    st_f32x8(out, 8 * g, acc)


@njit(**_PJIT)
def q4_k_mv(q, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q4_k_group(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, out)


@njit(**_JIT)
def _q4_k_quad(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out):
    # Per sub-block the 8 rows' d*sc and -dmin*m are formed once (exact in float32: an f16
    # times a 6-bit integer) and shared by the 4 tokens, so each token needs only the Q4_0
    # epilogue plus one FMA, and no per-super-block accumulators (registers stay at 4 + 4).
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    for s in range(nsb):
        ks = g * nsb + s
        D = ld_f16x8(d, 8 * ks)
        NDM = mul_f32_s(ld_f16x8(dmin, 8 * ks), -1.0)
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            qo = 128 * k
            if first:
                prefetch(q, qo + _PF)
                prefetch(q, qo + _PF + 64)
            a0 = zero_i16()
            a1 = zero_i16()
            a2 = zero_i16()
            a3 = zero_i16()
            for l in range(4):
                w = ld_i8x32(q, qo + 32 * l)
                lo = nib_lo(w)
                hi = nib_hi(w)
                xo = 32 * b + 4 * l
                a0 = add_i16(a0, maddubs(lo, bc4_i8x32(xq, t0 * n_in + xo)))
                a1 = add_i16(a1, maddubs(lo, bc4_i8x32(xq, t1 * n_in + xo)))
                a2 = add_i16(a2, maddubs(lo, bc4_i8x32(xq, t2 * n_in + xo)))
                a3 = add_i16(a3, maddubs(lo, bc4_i8x32(xq, t3 * n_in + xo)))
                a0 = add_i16(a0, maddubs(hi, bc4_i8x32(xq, t0 * n_in + xo + 16)))
                a1 = add_i16(a1, maddubs(hi, bc4_i8x32(xq, t1 * n_in + xo + 16)))
                a2 = add_i16(a2, maddubs(hi, bc4_i8x32(xq, t2 * n_in + xo + 16)))
                a3 = add_i16(a3, maddubs(hi, bc4_i8x32(xq, t3 * n_in + xo + 16)))
            DS = mul_f32(D, cvt_f32(ld_u8x8_i32(sc, 8 * k)))
            DM = mul_f32(NDM, cvt_f32(ld_u8x8_i32(m, 8 * k)))
            e0, e1, e2, e3 = t0 * nb + b, t1 * nb + b, t2 * nb + b, t3 * nb + b
            acc0 = fma_f32(DM, bc_f32(xsd32, e0), fma_f32(cvt_f32(hadd_i16(a0)), mul_f32(DS, bc_f32(xd, e0)), acc0))
            acc1 = fma_f32(DM, bc_f32(xsd32, e1), fma_f32(cvt_f32(hadd_i16(a1)), mul_f32(DS, bc_f32(xd, e1)), acc1))
            acc2 = fma_f32(DM, bc_f32(xsd32, e2), fma_f32(cvt_f32(hadd_i16(a2)), mul_f32(DS, bc_f32(xd, e2)), acc2))
            acc3 = fma_f32(DM, bc_f32(xsd32, e3), fma_f32(cvt_f32(hadd_i16(a3)), mul_f32(DS, bc_f32(xd, e3)), acc3))
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_PJIT)
def q4_k_mm(q, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _q4_k_quad(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# Q5_K: Q4_K plus a bit plane qb [G, nb, 32] (bit c of byte 4r+i: the 5th bit of chunk c's
# value), so codes are 0..31.  Four vpmaddubsw products fit int16 (4 * 2*31*127 = 31496), so a
# block takes two vpmaddwd instead of Q4_K's one; the rest is Q4_K.

@njit(**_JIT)
def _bit4(hb, c):
    """Bit c of every byte moved to bit 4 (0x10)."""
    if c < 4:
        return and_i8(shl_i8(hb, 4 - c), 0x10)
    if c == 4:
        return and_i8(hb, 0x10)
    return and_i8(shr_i8(hb, c - 4), 0x10)


@njit(**_JIT)
def _nib5_block(q, qb, k, xq, xo):
    """int32 row sums of one Q5_K block (32 values x 8 rows) against x[xo:xo+32]."""
    hb = ld_i8x32(qb, 32 * k)
    ia = zero_i16()
    ib = zero_i16()
    for l in range(4):
        w = ld_i8x32(q, 128 * k + 32 * l)
        lo = or_i8(nib_lo(w), _bit4(hb, l))
        hi = or_i8(nib_hi(w), _bit4(hb, l + 4))
        p = add_i16(maddubs(lo, bc4_i8x32(xq, xo + 4 * l)), maddubs(hi, bc4_i8x32(xq, xo + 16 + 4 * l)))
        if l < 2:
            ia = add_i16(ia, p)
        else:
            ib = add_i16(ib, p)
    return add_i32(hadd_i16(ia), hadd_i16(ib))


@njit(**_JIT)
def _q5_k_sub(q, qb, sc, m, xq, xd, xsd32, k, b, sacc, macc):
    isum = mul_i32(_nib5_block(q, qb, k, xq, 32 * b), ld_u8x8_i32(sc, 8 * k))
    sacc = fma_f32(cvt_f32(isum), bc_f32(xd, b), sacc)
    macc = fma_f32(cvt_f32(ld_u8x8_i32(m, 8 * k)), bc_f32(xsd32, b), macc)
    return sacc, macc


@njit(**_JIT)
def _q5_k_group(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, out):
    nsb = nb // 8
    acc = zero_f32()
    for s in range(nsb):
        s0 = zero_f32()
        m0 = zero_f32()
        s1 = zero_f32()
        m1 = zero_f32()
        for j in range(0, 8, 2):
            b = 8 * s + j
            k = g * nb + b
            for i in range(4):
                prefetch(q, 128 * k + _PF + 64 * i)
            prefetch(qb, 32 * k + _PF // 4)
            s0, m0 = _q5_k_sub(q, qb, sc, m, xq, xd, xsd32, k, b, s0, m0)
            s1, m1 = _q5_k_sub(q, qb, sc, m, xq, xd, xsd32, k + 1, b + 1, s1, m1)
        ks = g * nsb + s
        acc = sub_f32(fma_f32(ld_f16x8(d, 8 * ks), add_f32(s0, s1), acc), mul_f32(ld_f16x8(dmin, 8 * ks), add_f32(m0, m1)))
    st_f32x8(out, 8 * g, acc)


@njit(**_PJIT)
def q5_k_mv(q, qb, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q5_k_group(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, out)


@njit(**_JIT)
def _q5_k_quad(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out):
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    for s in range(nsb):
        ks = g * nsb + s
        D = ld_f16x8(d, 8 * ks)
        NDM = mul_f32_s(ld_f16x8(dmin, 8 * ks), -1.0)
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                if j % 2 == 0:
                    prefetch(qb, 32 * k + _PF // 4)
            e0, e1, e2, e3 = t0 * nb + b, t1 * nb + b, t2 * nb + b, t3 * nb + b
            i0 = _nib5_block(q, qb, k, xq, t0 * n_in + 32 * b)
            i1 = _nib5_block(q, qb, k, xq, t1 * n_in + 32 * b)
            i2 = _nib5_block(q, qb, k, xq, t2 * n_in + 32 * b)
            i3 = _nib5_block(q, qb, k, xq, t3 * n_in + 32 * b)
            DS = mul_f32(D, cvt_f32(ld_u8x8_i32(sc, 8 * k)))
            DM = mul_f32(NDM, cvt_f32(ld_u8x8_i32(m, 8 * k)))
            acc0 = fma_f32(DM, bc_f32(xsd32, e0), fma_f32(cvt_f32(i0), mul_f32(DS, bc_f32(xd, e0)), acc0))
            acc1 = fma_f32(DM, bc_f32(xsd32, e1), fma_f32(cvt_f32(i1), mul_f32(DS, bc_f32(xd, e1)), acc1))
            acc2 = fma_f32(DM, bc_f32(xsd32, e2), fma_f32(cvt_f32(i2), mul_f32(DS, bc_f32(xd, e2)), acc2))
            acc3 = fma_f32(DM, bc_f32(xsd32, e3), fma_f32(cvt_f32(i3), mul_f32(DS, bc_f32(xd, e3)), acc3))
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_PJIT)
def q5_k_mm(q, qb, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _q5_k_quad(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# Q6_K: nib plane q = low 4 bits, crumb plane qh = high 2 bits (q 0..63), sc int8 [G, n_in/16, 8]
# (one scale per 16 values), d f16 [G, nb/8, 8].  w = d*sc*(q - 32).
# Chunks 0-3 of a block are sub-block 2b (low nibbles), 4-7 sub-block 2b+1 (high nibbles).
# Two vpmaddubsw products fit int16 (2 * 2*63*127 = 32004), so pairs are summed before vpmaddwd.
# The -32 is an int32 subtract of 32 * sum(x) per 16, before the (signed) scale multiply.

@njit(**_JIT)
def _hbits(h, s):
    """Crumb s (bits 2s, 2s+1) of every byte, moved to bits 4-5."""
    if s == 0:
        return and_i8(shl_i8(h, 4), 0x30)
    if s == 1:
        return and_i8(shl_i8(h, 2), 0x30)
    if s == 2:
        return and_i8(h, 0x30)
    return and_i8(shr_i8(h, 2), 0x30)


@njit(**_JIT)
def _chunks8(q, qh, k, has_hi):
    """The 8 chunks (u8 codes) of block k from the nib plane (+ crumb plane)."""
    w0 = ld_i8x32(q, 128 * k)
    w1 = ld_i8x32(q, 128 * k + 32)
    w2 = ld_i8x32(q, 128 * k + 64)
    w3 = ld_i8x32(q, 128 * k + 96)
    v0 = nib_lo(w0)
    v1 = nib_lo(w1)
    v2 = nib_lo(w2)
    v3 = nib_lo(w3)
    v4 = nib_hi(w0)
    v5 = nib_hi(w1)
    v6 = nib_hi(w2)
    v7 = nib_hi(w3)
    if has_hi:
        h0 = ld_i8x32(qh, 64 * k)
        h1 = ld_i8x32(qh, 64 * k + 32)
        v0 = or_i8(v0, _hbits(h0, 0))
        v1 = or_i8(v1, _hbits(h0, 1))
        v2 = or_i8(v2, _hbits(h0, 2))
        v3 = or_i8(v3, _hbits(h0, 3))
        v4 = or_i8(v4, _hbits(h1, 0))
        v5 = or_i8(v5, _hbits(h1, 1))
        v6 = or_i8(v6, _hbits(h1, 2))
        v7 = or_i8(v7, _hbits(h1, 3))
    return v0, v1, v2, v3, v4, v5, v6, v7


@njit(**_JIT)
def _dot16(v0, v1, v2, v3, xq, xo):
    """Row sums of 16 values (4 chunks) against x[xo:xo+16] -> int32 x 8."""
    p = add_i16(maddubs(v0, bc4_i8x32(xq, xo)), maddubs(v1, bc4_i8x32(xq, xo + 4)))
    r = add_i16(maddubs(v2, bc4_i8x32(xq, xo + 8)), maddubs(v3, bc4_i8x32(xq, xo + 12)))
    return add_i32(hadd_i16(p), hadd_i16(r))


@njit(**_JIT)
def _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e, xd, facc):
    """facc += xd * (sc_A*(dot_A - 32 sum_A) + sc_B*(dot_B - 32 sum_B)) for block e of a token."""
    ia = sub_i32(_dot16(v0, v1, v2, v3, xq, xo), bc_i32(xs16, 2 * e))
    ib = sub_i32(_dot16(v4, v5, v6, v7, xq, xo + 16), bc_i32(xs16, 2 * e + 1))
    return fma_f32(cvt_f32(add_i32(mul_i32(ia, SA), mul_i32(ib, SB))), bc_f32(xd, e), facc)


@njit(**_JIT)
def _q6_k_blk(q, qh, sc, xq, xs16, xd, k, b, facc):
    v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
    return _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, ld_i8x8_i32(sc, 16 * k), ld_i8x8_i32(sc, 16 * k + 8),
                   xq, 32 * b, xs16, b, xd, facc)


@njit(**_JIT)
def _q6_k_group(q, qh, sc, d, xq, xd, xs16, nb, g, out):
    # One group per iteration: a pair would keep 16 chunk vectors live and spill (measured
    # 18 vs 21 GB/s on 1 thread).
    nsb = nb // 8
    acc = zero_f32()
    for s in range(nsb):
        f = zero_f32()
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            prefetch(q, 128 * k + _PF)
            prefetch(q, 128 * k + _PF + 64)
            prefetch(qh, 64 * k + _PF // 2)
            f = _q6_k_blk(q, qh, sc, xq, xs16, xd, k, b, f)
        acc = fma_f32(ld_f16x8(d, 8 * (g * nsb + s)), f, acc)
    st_f32x8(out, 8 * g, acc)


@njit(**_PJIT)
def q6_k_mv(q, qh, sc, d, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q6_k_group(q, qh, sc, d, xq, xd, xs16, nb, g, out)


@njit(**_JIT)
def _q6_k_quad(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, out):
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    for s in range(nsb):
        f0 = zero_f32()
        f1 = zero_f32()
        f2 = zero_f32()
        f3 = zero_f32()
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(qh, 64 * k + _PF // 2)
            v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
            SA = ld_i8x8_i32(sc, 16 * k)
            SB = ld_i8x8_i32(sc, 16 * k + 8)
            f0 = _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, xd, f0)
            f1 = _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, xd, f1)
            f2 = _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, xd, f2)
            f3 = _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, xd, f3)
        D = ld_f16x8(d, 8 * (g * nsb + s))
        acc0 = fma_f32(D, f0, acc0)
        acc1 = fma_f32(D, f1, acc1)
        acc2 = fma_f32(D, f2, acc2)
        acc3 = fma_f32(D, f3, acc3)
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_PJIT)
def q6_k_mm(q, qh, sc, d, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _q6_k_quad(q, qh, sc, d, xq, xd, xs16, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# planes (Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q5_K): nib plane (+ crumb plane when has_hi) of an unsigned
# code v <= 63, float32 S and M [G, n_sub, 8] per sub-block of 16 or 32.  w = S*v - M.
# Per 16 values: int32 row sums (_dot16); float work per sub-block: acc += S*xd*isum and
# macc += M*(xd*sum x).

@njit(**_JIT)
def _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16, xq, xo, xd, xsd16, xsd32, e, acc, macc):
    """One token, one 32-value block (e: the token's block index): acc += S*xd*isum; macc += M*xd*sum(x)."""
    ia = _dot16(v0, v1, v2, v3, xq, xo)
    ib = _dot16(v4, v5, v6, v7, xq, xo + 16)
    X = bc_f32(xd, e)
    if sub16:
        u = g * nsub + 2 * b
        acc = fma_f32(cvt_f32(ia), mul_f32(ld_f32x8(S, 8 * u), X), acc)
        acc = fma_f32(cvt_f32(ib), mul_f32(ld_f32x8(S, 8 * u + 8), X), acc)
        macc = fma_f32(ld_f32x8(M, 8 * u), bc_f32(xsd16, 2 * e), macc)
        macc = fma_f32(ld_f32x8(M, 8 * u + 8), bc_f32(xsd16, 2 * e + 1), macc)
    else:
        u = g * nsub + b
        acc = fma_f32(cvt_f32(add_i32(ia, ib)), mul_f32(ld_f32x8(S, 8 * u), X), acc)
        macc = fma_f32(ld_f32x8(M, 8 * u), bc_f32(xsd32, e), macc)
    return acc, macc


@njit(**_JIT)
def _pl_group1(q, qh, S, M, has_hi, sub16, xq, xd, xsd16, xsd32, nb, g, out):
    nsub = 2 * nb if sub16 else nb
    acc = zero_f32()
    macc = zero_f32()
    for b in range(nb):
        v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, g * nb + b, has_hi)
        acc, macc = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16,
                            xq, 32 * b, xd, xsd16, xsd32, b, acc, macc)
    st_f32x8(out, 8 * g, sub_f32(acc, macc))


@njit(**_PJIT)
def planes_mv(q, qh, S, M, has_hi, sub16, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _pl_group1(q, qh, S, M, has_hi, sub16, xq, xd, xsd16, xsd32, nb, g, out)


@njit(**_JIT)
def _pl_quad(q, qh, S, M, has_hi, sub16, xq, xd, xsd16, xsd32, nb, g, t0, T, out):
    n_in = 32 * nb
    nsub = 2 * nb if sub16 else nb
    first = t0 == 0  # the group's first quad reads its weights from DRAM: it prefetches
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    m0 = zero_f32()
    m1 = zero_f32()
    m2 = zero_f32()
    m3 = zero_f32()
    for b in range(nb):
        if first:
            prefetch(q, 128 * (g * nb + b) + _PF)
            prefetch(q, 128 * (g * nb + b) + _PF + 64)
        v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, g * nb + b, has_hi)
        acc0, m0 = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16,
                           xq, t0 * n_in + 32 * b, xd, xsd16, xsd32, t0 * nb + b, acc0, m0)
        acc1, m1 = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16,
                           xq, t1 * n_in + 32 * b, xd, xsd16, xsd32, t1 * nb + b, acc1, m1)
        acc2, m2 = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16,
                           xq, t2 * n_in + 32 * b, xd, xsd16, xsd32, t2 * nb + b, acc2, m2)
        acc3, m3 = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16,
                           xq, t3 * n_in + 32 * b, xd, xsd16, xsd32, t3 * nb + b, acc3, m3)
    _store4(out, out.shape[0] // T, g, t0, T, sub_f32(acc0, m0), sub_f32(acc1, m1), sub_f32(acc2, m2),
            sub_f32(acc3, m3))


@njit(**_PJIT)
def planes_mm(q, qh, S, M, has_hi, sub16, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _pl_quad(q, qh, S, M, has_hi, sub16, xq, xd, xsd16, xsd32, nb, g, 4 * (it - g * nt), T, out)


# =============================================================================================
# float weights (F32, F16, BF16), read in place: w [n_out, n_in] flat, x float32 (not quantized).
# kind: 1 = F16, 2 = BF16 (uint16 bit patterns); a float32 array is F32.  Rows are independent
# dot products (8-wide FMA accumulators, one horizontal sum per row); 4 rows share each
# activation load.

def _ldw(w, i, kind):
    """8 weights at w[i:i+8] as float32."""


@overload(_ldw)
def _ldw_impl(w, i, kind):
    if w.dtype == types.float32:
        return lambda w, i, kind: ld_f32x8(w, i)
    return lambda w, i, kind: ld_f16x8(w, i) if kind == 1 else ld_bf16x8(w, i)


def _w1(w, i, kind):
    """Weight w[i] as float32."""


@overload(_w1)
def _w1_impl(w, i, kind):
    if w.dtype == types.float32:
        return lambda w, i, kind: w[i]
    return lambda w, i, kind: f16_to_f32(w[i]) if kind == 1 else bf16_to_f32(w[i])


@njit(**_JIT)
def _float_rows(w, kind, n_in, r0, nr, x, xo, out, oo):
    """out[oo + i] = dot(w row r0+i, x[xo:xo+n_in]) for i < nr (nr <= 4)."""
    a0 = zero_f32()
    a1 = zero_f32()
    a2 = zero_f32()
    a3 = zero_f32()
    # rows past the end repeat the last row (results discarded)
    o0 = r0 * n_in
    o1 = min(r0 + 1, r0 + nr - 1) * n_in
    o2 = min(r0 + 2, r0 + nr - 1) * n_in
    o3 = min(r0 + 3, r0 + nr - 1) * n_in
    n8 = n_in - n_in % 8
    for k in range(0, n8, 8):
        xv = ld_f32x8(x, xo + k)
        a0 = fma_f32(_ldw(w, o0 + k, kind), xv, a0)
        a1 = fma_f32(_ldw(w, o1 + k, kind), xv, a1)
        a2 = fma_f32(_ldw(w, o2 + k, kind), xv, a2)
        a3 = fma_f32(_ldw(w, o3 + k, kind), xv, a3)
    s0 = hsum_f32(a0)
    s1 = hsum_f32(a1)
    s2 = hsum_f32(a2)
    s3 = hsum_f32(a3)
    for k in range(n8, n_in):
        xk = x[xo + k]
        s0 += _w1(w, o0 + k, kind) * xk
        s1 += _w1(w, o1 + k, kind) * xk
        s2 += _w1(w, o2 + k, kind) * xk
        s3 += _w1(w, o3 + k, kind) * xk
    out[oo] = s0
    if nr > 1:
        out[oo + 1] = s1
    if nr > 2:
        out[oo + 2] = s2
    if nr > 3:
        out[oo + 3] = s3


@njit(**_PJIT)
def float_mm(w, kind, n_out, n_in, x, T, out):
    """x float32 [T*n_in] -> out float32 [T*n_out]."""
    nr = (n_out + 3) // 4
    for it in prange(nr):
        r0 = 4 * it
        for t in range(T):
            _float_rows(w, kind, n_in, r0, min(4, n_out - r0), x, t * n_in, out, t * n_out + r0)
