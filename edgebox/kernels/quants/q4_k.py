"""Q4_K: super-blocks of 256 values: f16 d and dmin, 8 sub-blocks of 32 with 6-bit scale sc and
min m, 4-bit codes q: w = d*sc * q - dmin*m.

Repacked: nib plane q [G, nb, 4, 32] (one 32-value sub-block per block), sc / m u8 [G, nb, 8],
d / dmin f16 [G, nb/8, 8] (+2.8% over the file, for unpacking the 6-bit scales to bytes).
Kernel: per sub-block the Q4_0 int16 block sum, times the 8 rows' 6-bit scales (vpmulld), to
float, times the activation scale into a per-super-block accumulator; the min term accumulates
m * (xd * sum x) beside it; per super-block acc += d * sacc - dmin * macc.  ORT: MatMulNBits
bits=4 block 32, scale d*sc, float zero point dmin*m/(d*sc): exact to float32 rounding, but
unpacked in ORT (slow), so the backends keep it on numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.matmul_kernels import (
    _JIT,
    _PF,
    _PJIT,
    _dot32,
    _dot32x2,
    _last,
    _nib_block,
    _octet,
    _prefetch_pair,
    _quad,
    _step,
    _steps,
    _store4,
    _store4x2,
    _store8x2,
    _token,
)
from edgebox.kernels.matmul_pack import ROWS
from edgebox.kernels.matmul_simd import (
    add_f32,
    bc_f32,
    cvt_f32,
    fma_f32,
    hadd_i16,
    ld_f16x8,
    ld_i8x32,
    ld_u8x8_i32,
    mul_f32,
    mul_f32_s,
    mul_i32,
    nib_hi,
    nib_lo,
    prefetch,
    prefetch_l2,
    st_f32x8,
    sub_f32,
    zero_f32,
)
from edgebox.kernels.matmul_simd512 import (
    bc_f32x16,
    cvt_f32x16,
    fma_f32x16,
    ld2_f16x16,
    ld2_i8x64,
    ld2_u8x16_i32,
    mul_f32x16,
    neg_f32x16,
    nib_hi64,
    nib_lo64,
    zero_f32x16,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.traits import Kernels, OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes dmin (f16), 12 bytes scales+mins (8 x 6-bit each),
    # 128 bytes qs: each 32-byte group holds sub-block 2g in its low nibbles, 2g+1 in its high.
    # x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q4_K)
    n = blocks.shape[0]
    d, dmin, scales, qs = gb.fields(blocks, QType.Q4_K, 2, 2, 12, qk // 2)
    sc, mn = gb.scale_min_k4(scales)
    dl = gb.f16(d) * sc.astype(np.float32)  # [n, 8]
    ml = gb.f16(dmin) * mn.astype(np.float32)  # [n, 8]
    q = gb.nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


# ---------------------------------------------------------------------------------------------
# repacking


@njit(inline="always")
def repack_k4_block(raw, row, n_out, o, qs, g, s, r, q, sc, m, d, dmin):
    """Super-block ``s`` of GGUF row ``row`` (its bytes from ``o``; the 4-bit codes from ``qs``)
    into lane ``r`` of row group ``g``: d, dmin, the 6-bit scales and mins of its 8 sub-blocks
    and the codes; zeros for a padding row (row >= n_out).  Q4_K's layout, and Q5_K's low bits
    (numba's cache of q5_k's repacker holds this as compiled then: after editing it, delete
    ``quants/__pycache__/q5_k.*``, as ``matmul_simd`` says of its ops)."""
    if row >= n_out:
        d[g, s, r] = 0
        dmin[g, s, r] = 0
        for j in range(8):
            sc[g, 8 * s + j, r] = 0
            m[g, 8 * s + j, r] = 0
            for l in range(4):
                for i in range(4):
                    q[g, 8 * s + j, l, 4 * r + i] = 0
        return
    d[g, s, r] = np.uint16(raw[row, o]) | (np.uint16(raw[row, o + 1]) << 8)
    dmin[g, s, r] = np.uint16(raw[row, o + 2]) | (np.uint16(raw[row, o + 3]) << 8)
    for j in range(8):
        # 6-bit scale and min of sub-block j (ggml's get_scale_min_k4)
        if j < 4:
            sc[g, 8 * s + j, r] = raw[row, o + 4 + j] & 63
            m[g, 8 * s + j, r] = raw[row, o + 8 + j] & 63
        else:
            sc[g, 8 * s + j, r] = (raw[row, o + 8 + j] & 0x0F) | ((raw[row, o + j] >> 6) << 4)
            m[g, 8 * s + j, r] = (raw[row, o + 8 + j] >> 4) | ((raw[row, o + 4 + j] >> 6) << 4)
        # value v of sub-block j: nibble j % 2 of qs[32 * (j // 2) + v]
        qo = qs + 32 * (j // 2)
        sh = 4 * (j % 2)
        for l in range(4):
            for i in range(4):
                lo = (raw[row, qo + 4 * l + i] >> sh) & 0x0F
                hi = (raw[row, qo + 16 + 4 * l + i] >> sh) & 0x0F
                q[g, 8 * s + j, l, 4 * r + i] = lo | (hi << 4)


@njit(**P.RJIT)
def _repack_q4_k(raw, n_out, q, sc, m, d, dmin):
    G, nsb = d.shape[0], d.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for s in range(nsb):
                repack_k4_block(raw, row, n_out, 144 * s, 144 * s + 16, g, s, r, q, sc, m, d, dmin)


def planes(n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """The repacked arrays of an [n_out, n_in] weight, allocated."""
    G, nb, nsb = P.n_groups(n_out), n_in // P.QK, n_in // 256
    return {
        "q": P.aligned_empty((G, nb, 4, 32), np.uint8),
        "sc": P.aligned_empty((G, nb, ROWS), np.uint8),
        "m": P.aligned_empty((G, nb, ROWS), np.uint8),
        "d": P.aligned_empty((G, nsb, ROWS), np.uint16),
        "dmin": P.aligned_empty((G, nsb, ROWS), np.uint16),
    }


def repack(raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True, out: dict | None = None) -> dict[str, np.ndarray]:
    out = planes(n_out, n_in) if out is None else out  # (``out``: row groups of a larger weight's planes)
    if use_numba:
        _repack_q4_k(np.ascontiguousarray(raw), n_out, out["q"], out["sc"], out["m"], out["d"], out["dmin"])
        return out
    return P.repack_by_chunks(raw, QType.Q4_K, n_out, out, _fill)


def _fill(out, part, b, g0, g1):
    """The numpy formulation (the numba repacker's spec)."""
    rows, ns = b.shape[:2]
    out["d"][g0:g1] = P.per_row(P.f16_bits(b[..., 0:2]))
    out["dmin"][g0:g1] = P.per_row(P.f16_bits(b[..., 2:4]))
    sc, mn = gb.scale_min_k4(b[..., 4:16])  # [rows, ns, 8]
    out["sc"][g0:g1] = P.per_row(sc.reshape(rows, -1))
    out["m"][g0:g1] = P.per_row(mn.reshape(rows, -1))
    v = gb.nibbles(b[..., 16:144].reshape(rows, ns, 4, 32)).reshape(rows, -1)
    out["q"][g0:g1] = P.nib_plane(v)


# ---------------------------------------------------------------------------------------------
# kernels


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
    last = _last(T, t0, 4)  # the last one fetches the next group into L2 meanwhile
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
            if last:
                prefetch_l2(q, qo + 128 * nb)
                prefetch_l2(q, qo + 128 * nb + 64)
            w0 = ld_i8x32(q, qo)
            w1 = ld_i8x32(q, qo + 32)
            w2 = ld_i8x32(q, qo + 64)
            w3 = ld_i8x32(q, qo + 96)
            v0, v1, v2, v3 = nib_lo(w0), nib_lo(w1), nib_lo(w2), nib_lo(w3)
            v4, v5, v6, v7 = nib_hi(w0), nib_hi(w1), nib_hi(w2), nib_hi(w3)
            i0 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, False)
            i1 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, False)
            i2 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, False)
            i3 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, False)
            DS = mul_f32(D, cvt_f32(ld_u8x8_i32(sc, 8 * k)))
            DM = mul_f32(NDM, cvt_f32(ld_u8x8_i32(m, 8 * k)))
            e0, e1, e2, e3 = t0 * nb + b, t1 * nb + b, t2 * nb + b, t3 * nb + b
            acc0 = fma_f32(DM, bc_f32(xsd32, e0), fma_f32(cvt_f32(i0), mul_f32(DS, bc_f32(xd, e0)), acc0))
            acc1 = fma_f32(DM, bc_f32(xsd32, e1), fma_f32(cvt_f32(i1), mul_f32(DS, bc_f32(xd, e1)), acc1))
            acc2 = fma_f32(DM, bc_f32(xsd32, e2), fma_f32(cvt_f32(i2), mul_f32(DS, bc_f32(xd, e2)), acc2))
            acc3 = fma_f32(DM, bc_f32(xsd32, e3), fma_f32(cvt_f32(i3), mul_f32(DS, bc_f32(xd, e3)), acc3))
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, e, DS, DM, xd, xsd32, acc):
    i = _dot32x2(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo)
    return fma_f32x16(DM, bc_f32x16(xsd32, e), fma_f32x16(cvt_f32x16(i), mul_f32x16(DS, bc_f32x16(xd, e)), acc))


@njit(**_JIT)
def _q4_k_quad2(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out):
    # ``_q4_k_quad`` for row groups g and g + 1 at once in 512-bit lanes (``matmul_simd512``):
    # the same operations lane for lane, so the same bits, in half the instructions.
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0
    last = _last(T, t0, 4)
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32x16()
    acc1 = zero_f32x16()
    acc2 = zero_f32x16()
    acc3 = zero_f32x16()
    for s in range(nsb):
        ks = g * nsb + s
        D = ld2_f16x16(d, 8 * ks, 8 * (ks + nsb))
        NDM = neg_f32x16(ld2_f16x16(dmin, 8 * ks, 8 * (ks + nsb)))
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            qo = 128 * k
            qo1 = qo + 128 * nb  # (group g + 1's block b)
            _prefetch_pair(q, qo, nb, first, last)
            w0 = ld2_i8x64(q, qo, qo1)
            w1 = ld2_i8x64(q, qo + 32, qo1 + 32)
            w2 = ld2_i8x64(q, qo + 64, qo1 + 64)
            w3 = ld2_i8x64(q, qo + 96, qo1 + 96)
            v0, v1, v2, v3 = nib_lo64(w0), nib_lo64(w1), nib_lo64(w2), nib_lo64(w3)
            v4, v5, v6, v7 = nib_hi64(w0), nib_hi64(w1), nib_hi64(w2), nib_hi64(w3)
            DS = mul_f32x16(D, cvt_f32x16(ld2_u8x16_i32(sc, 8 * k, 8 * (k + nb))))
            DM = mul_f32x16(NDM, cvt_f32x16(ld2_u8x16_i32(m, 8 * k, 8 * (k + nb))))
            acc0 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, t0 * nb + b, DS, DM, xd, xsd32, acc0)
            acc1 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, t1 * nb + b, DS, DM, xd, xsd32, acc1)
            acc2 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, t2 * nb + b, DS, DM, xd, xsd32, acc2)
            acc3 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, t3 * nb + b, DS, DM, xd, xsd32, acc3)
    _store4x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q4_k_oct2(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out):
    # ``_q4_k_quad2`` 8 tokens wide: at T = 8 (the batched decode step) a pair's weights are
    # loaded and unpacked once, not once per quad; each token's steps are the quad's.
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0
    last = _last(T, t0, 8)
    t0, t1, t2, t3, t4, t5, t6, t7 = _octet(T, t0)
    acc0 = zero_f32x16()
    acc1 = zero_f32x16()
    acc2 = zero_f32x16()
    acc3 = zero_f32x16()
    acc4 = zero_f32x16()
    acc5 = zero_f32x16()
    acc6 = zero_f32x16()
    acc7 = zero_f32x16()
    for s in range(nsb):
        ks = g * nsb + s
        D = ld2_f16x16(d, 8 * ks, 8 * (ks + nsb))
        NDM = neg_f32x16(ld2_f16x16(dmin, 8 * ks, 8 * (ks + nsb)))
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            qo = 128 * k
            qo1 = qo + 128 * nb  # (group g + 1's block b)
            _prefetch_pair(q, qo, nb, first, last)
            w0 = ld2_i8x64(q, qo, qo1)
            w1 = ld2_i8x64(q, qo + 32, qo1 + 32)
            w2 = ld2_i8x64(q, qo + 64, qo1 + 64)
            w3 = ld2_i8x64(q, qo + 96, qo1 + 96)
            v0, v1, v2, v3 = nib_lo64(w0), nib_lo64(w1), nib_lo64(w2), nib_lo64(w3)
            v4, v5, v6, v7 = nib_hi64(w0), nib_hi64(w1), nib_hi64(w2), nib_hi64(w3)
            DS = mul_f32x16(D, cvt_f32x16(ld2_u8x16_i32(sc, 8 * k, 8 * (k + nb))))
            DM = mul_f32x16(NDM, cvt_f32x16(ld2_u8x16_i32(m, 8 * k, 8 * (k + nb))))
            acc0 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, t0 * nb + b, DS, DM, xd, xsd32, acc0)
            acc1 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, t1 * nb + b, DS, DM, xd, xsd32, acc1)
            acc2 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, t2 * nb + b, DS, DM, xd, xsd32, acc2)
            acc3 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, t3 * nb + b, DS, DM, xd, xsd32, acc3)
            acc4 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t4 * n_in + 32 * b, t4 * nb + b, DS, DM, xd, xsd32, acc4)
            acc5 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t5 * n_in + 32 * b, t5 * nb + b, DS, DM, xd, xsd32, acc5)
            acc6 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t6 * n_in + 32 * b, t6 * nb + b, DS, DM, xd, xsd32, acc6)
            acc7 = _q4_k_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t7 * n_in + 32 * b, t7 * nb + b, DS, DM, xd, xsd32, acc7)
    _store8x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


@njit(**_PJIT)
def q4_k_mm(q, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    n, plan = _steps(T, out.shape[0] // T // 8)
    for it in prange(n):
        g, t0, width, pair = _step(plan, it)
        if width == 1:  # the matvec's row-group step, for each group of the unit
            xq1, xd1, xs1, xsd1, out1 = _token(xq, xd, xs16, xsd32, out, T, t0)
            for h in range(g, g + 2 if pair else g + 1):
                _q4_k_group(q, sc, m, d, dmin, xq1, xd1, xsd1, nb, h, out1)
        elif not pair:
            _q4_k_quad(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out)
        elif width == 8:
            _q4_k_oct2(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out)
        else:
            _q4_k_quad2(q, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, out)


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    n = b.shape[0] * b.shape[1]
    d, dmin, scales, qs = gb.fields(b.reshape(n, 144), QType.Q4_K, 2, 2, 12, 128)
    sc, mn = gb.scale_min_k4(scales)
    dl = (gb.f16(d) * sc.astype(np.float32)).reshape(-1)  # [n*8]
    ml = (gb.f16(dmin) * mn.astype(np.float32)).reshape(-1)  # [n*8]
    codes = gb.nibbles(qs.reshape(n * 4, 32)).reshape(n * 8, 32)  # sub-block s = 2g (low), 2g+1 (high)
    return codes, dl, -ml  # w = dl * q + offset


TRAITS = QuantTraits(
    QType.Q4_K,
    dequantize,
    Kernels(
        "q4_k",
        ("q", "sc", "m", "d", "dmin"),
        ("uint8", "uint8", "uint8", "uint16", "uint16"),
        q4_k_mv,
        q4_k_mm,
        repack,
        fusable=True,
        planes=planes,
    ),
    OrtMapping("MatMulNBits", bits=4, block=32, convert=_ort_codes, zero_points="float"),
)
