"""Q5_K: Q4_K with a 5th bit per code (qh), codes 0..31: w = d*sc * q - dmin*m.

Repacked: as Q4_K (nib plane = q & 15) plus a bit plane qb = q >> 4 [G, nb, 32] (bit c of byte
4r+i: the 5th bit of chunk c's value); +2.3% over the file.  Kernel: four vpmaddubsw products fit
int16 (4 * 2*31*127 = 31496), so a block takes two vpmaddwd instead of Q4_K's one; the rest is
Q4_K.  Batched: units of 8, 4 or 1 tokens (``_units``), as Q6_K.  ORT: none (8-bit codes
with float zero points are refused by ORT's CPU kernel).
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
    _ld8,
    _ld8x2,
    _octet,
    _quad,
    _runs,
    _slot,
    _st8,
    _st8x2,
    _store4,
    _store4x2,
    _store8,
    _store8x2,
    _token,
    _unit,
    _units,
)
from edgebox.kernels.matmul_pack import ROWS
from edgebox.kernels.matmul_simd import (
    add_f32,
    and_i8,
    bc_f32,
    cvt_f32,
    fma_f32,
    ld_f16x8,
    ld_i8x32,
    ld_u8x8_i32,
    mul_f32,
    mul_f32_s,
    mul_i32,
    nib_hi,
    nib_lo,
    or_i8,
    prefetch,
    prefetch_l2,
    shl_w8,
    shr_w8,
    st_f32x8,
    sub_f32,
    zero_f32,
)
from edgebox.kernels.matmul_simd512 import (
    bc_f32x16,
    cat_i8x64,
    cvt_f32x16,
    fma_f32x16,
    ld2_f16x16,
    ld2_u8x16_i32,
    mul_f32x16,
    neg_f32x16,
    zero_f32x16,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.q4_k import repack_k4_block
from edgebox.kernels.quants.traits import Kernels, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes dmin (f16), 12 bytes scales+mins, 32 bytes qh (5th bit of value
    # 32*s + l is bit s of qh[l]), 128 bytes qs (nibbles as in Q4_K): x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q5_K)
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = gb.fields(blocks, QType.Q5_K, 2, 2, 12, qk // 8, qk // 2)
    sc, mn = gb.scale_min_k4(scales)
    dl = gb.f16(d) * sc.astype(np.float32)  # [n, 8]
    ml = gb.f16(dmin) * mn.astype(np.float32)  # [n, 8]
    low = gb.nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32)
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (low | (high << 4)).astype(np.float32)  # [n, 8, 32]
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


# ---------------------------------------------------------------------------------------------
# repacking


@njit(**P.RJIT)
def _repack_q5_k(raw, n_out, q, qb, sc, m, d, dmin):
    G, nsb = d.shape[0], d.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for s in range(nsb):
                o = 176 * s
                repack_k4_block(raw, row, n_out, o, o + 48, g, s, r, q, sc, m, d, dmin)  # (the low 4 bits)
                for j in range(8):
                    # the 5th bit of value v of sub-block j: bit j of qh[v]
                    for i in range(4):
                        x = 0
                        if row < n_out:
                            for c in range(8):
                                x |= ((raw[row, o + 16 + 4 * c + i] >> j) & 1) << c
                        qb[g, 8 * s + j, 4 * r + i] = x


def planes(n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """The repacked arrays of an [n_out, n_in] weight, allocated."""
    G, nb, nsb = P.n_groups(n_out), n_in // P.QK, n_in // 256
    return {
        "q": P.aligned_empty((G, nb, 4, 32), np.uint8),
        "qb": P.aligned_empty((G, nb, 32), np.uint8),
        "sc": P.aligned_empty((G, nb, ROWS), np.uint8),
        "m": P.aligned_empty((G, nb, ROWS), np.uint8),
        "d": P.aligned_empty((G, nsb, ROWS), np.uint16),
        "dmin": P.aligned_empty((G, nsb, ROWS), np.uint16),
    }


def repack(raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True, out: dict | None = None) -> dict[str, np.ndarray]:
    out = planes(n_out, n_in) if out is None else out  # (``out``: row groups of a larger weight's planes)
    if use_numba:
        _repack_q5_k(np.ascontiguousarray(raw), n_out, out["q"], out["qb"], out["sc"], out["m"], out["d"], out["dmin"])
        return out
    return P.repack_by_chunks(raw, QType.Q5_K, n_out, out, _fill)


def _codes(b: np.ndarray) -> np.ndarray:
    """blocks [rows, nblk, 176] -> the 5-bit codes uint8 [rows, n_in]."""
    rows, nblk = b.shape[:2]
    low = gb.nibbles(b[..., 48:176].reshape(rows, nblk, 4, 32)).reshape(rows, nblk, 256)
    hi = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    v = low | (hi.reshape(rows, nblk, 256) << 4)
    return v.reshape(rows, -1)


def _fill(out, part, b, g0, g1):
    """The numpy formulation (the numba repacker's spec)."""
    rows, ns = b.shape[:2]
    out["d"][g0:g1] = P.per_row(P.f16_bits(b[..., 0:2]))
    out["dmin"][g0:g1] = P.per_row(P.f16_bits(b[..., 2:4]))
    sc, mn = gb.scale_min_k4(b[..., 4:16])
    out["sc"][g0:g1] = P.per_row(sc.reshape(rows, -1))
    out["m"][g0:g1] = P.per_row(mn.reshape(rows, -1))
    v = _codes(b)
    out["q"][g0:g1] = P.nib_plane(v)
    out["qb"][g0:g1] = P.bit_plane(v >> 4)


# ---------------------------------------------------------------------------------------------
# kernels


@njit(**_JIT)
def _bit4(hb, c):
    """Bit c of every byte moved to bit 4 (0x10); word shifts, the mask drops what crosses."""
    if c < 4:
        return and_i8(shl_w8(hb, 4 - c), 0x10)
    if c == 4:
        return and_i8(hb, 0x10)
    return and_i8(shr_w8(hb, c - 4), 0x10)


@njit(**_JIT)
def _chunks5(q, qb, k):
    """The 8 chunks (5-bit codes) of block k: nib plane | 5th bit from the bit plane."""
    hb = ld_i8x32(qb, 32 * k)
    w0 = ld_i8x32(q, 128 * k)
    w1 = ld_i8x32(q, 128 * k + 32)
    w2 = ld_i8x32(q, 128 * k + 64)
    w3 = ld_i8x32(q, 128 * k + 96)
    return (
        or_i8(nib_lo(w0), _bit4(hb, 0)),
        or_i8(nib_lo(w1), _bit4(hb, 1)),
        or_i8(nib_lo(w2), _bit4(hb, 2)),
        or_i8(nib_lo(w3), _bit4(hb, 3)),
        or_i8(nib_hi(w0), _bit4(hb, 4)),
        or_i8(nib_hi(w1), _bit4(hb, 5)),
        or_i8(nib_hi(w2), _bit4(hb, 6)),
        or_i8(nib_hi(w3), _bit4(hb, 7)),
    )


@njit(**_JIT)
def _nib5_block(q, qb, k, xq, xo):
    """int32 row sums of one Q5_K block (32 values x 8 rows) against x[xo:xo+32]."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _chunks5(q, qb, k)
    return _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, True)


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
def _q5_k_quad(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out):
    """Tokens t0..t0+3 of row group g; the first quad unpacks the codes into ``buf`` and the later
    ones load them from there (as Q6_K's)."""
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
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                if j % 2 == 0:
                    prefetch(qb, 32 * k + _PF // 4)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks5(q, qb, k)
                if not last:  # a later quad of this group will load them
                    _st8(buf, 256 * b, v0, v1, v2, v3, v4, v5, v6, v7)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _ld8(buf, 256 * b)
            if last:
                prefetch_l2(q, 128 * (k + nb))
                prefetch_l2(q, 128 * (k + nb) + 64)
                if j % 2 == 0:
                    prefetch_l2(qb, 32 * (k + nb))
            e0, e1, e2, e3 = t0 * nb + b, t1 * nb + b, t2 * nb + b, t3 * nb + b
            i0 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, True)
            i1 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, True)
            i2 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, True)
            i3 = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, True)
            DS = mul_f32(D, cvt_f32(ld_u8x8_i32(sc, 8 * k)))
            DM = mul_f32(NDM, cvt_f32(ld_u8x8_i32(m, 8 * k)))
            acc0 = fma_f32(DM, bc_f32(xsd32, e0), fma_f32(cvt_f32(i0), mul_f32(DS, bc_f32(xd, e0)), acc0))
            acc1 = fma_f32(DM, bc_f32(xsd32, e1), fma_f32(cvt_f32(i1), mul_f32(DS, bc_f32(xd, e1)), acc1))
            acc2 = fma_f32(DM, bc_f32(xsd32, e2), fma_f32(cvt_f32(i2), mul_f32(DS, bc_f32(xd, e2)), acc2))
            acc3 = fma_f32(DM, bc_f32(xsd32, e3), fma_f32(cvt_f32(i3), mul_f32(DS, bc_f32(xd, e3)), acc3))
    _store4(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, e, DS, DM, xd, xsd32, acc):
    """acc += d*sc * xd * dot - dmin*m * xd * sum(xq) for block e of a token (the quad's step)."""
    i = _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, True)
    return fma_f32(DM, bc_f32(xsd32, e), fma_f32(cvt_f32(i), mul_f32(DS, bc_f32(xd, e)), acc))


@njit(**_JIT)
def _q5_k_oct(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out):
    """Tokens t0..t0+7 of row group g: ``_q5_k_quad`` 8 wide, so at T = 8 (the batched decode
    step) the codes are unpacked and used in one pass, never stored and reloaded (as Q6_K's)."""
    n_in = 32 * nb
    nsb = nb // 8
    first = t0 == 0
    last = _last(T, t0, 8)
    t0, t1, t2, t3, t4, t5, t6, t7 = _octet(T, t0)
    acc0 = zero_f32()
    acc1 = zero_f32()
    acc2 = zero_f32()
    acc3 = zero_f32()
    acc4 = zero_f32()
    acc5 = zero_f32()
    acc6 = zero_f32()
    acc7 = zero_f32()
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
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks5(q, qb, k)
                if not last:
                    _st8(buf, 256 * b, v0, v1, v2, v3, v4, v5, v6, v7)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _ld8(buf, 256 * b)
            if last:
                prefetch_l2(q, 128 * (k + nb))
                prefetch_l2(q, 128 * (k + nb) + 64)
                if j % 2 == 0:
                    prefetch_l2(qb, 32 * (k + nb))
            DS = mul_f32(D, cvt_f32(ld_u8x8_i32(sc, 8 * k)))
            DM = mul_f32(NDM, cvt_f32(ld_u8x8_i32(m, 8 * k)))
            acc0 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, t0 * nb + b, DS, DM, xd, xsd32, acc0)
            acc1 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, t1 * nb + b, DS, DM, xd, xsd32, acc1)
            acc2 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, t2 * nb + b, DS, DM, xd, xsd32, acc2)
            acc3 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, t3 * nb + b, DS, DM, xd, xsd32, acc3)
            acc4 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t4 * n_in + 32 * b, t4 * nb + b, DS, DM, xd, xsd32, acc4)
            acc5 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t5 * n_in + 32 * b, t5 * nb + b, DS, DM, xd, xsd32, acc5)
            acc6 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t6 * n_in + 32 * b, t6 * nb + b, DS, DM, xd, xsd32, acc6)
            acc7 = _q5_tok(v0, v1, v2, v3, v4, v5, v6, v7, xq, t7 * n_in + 32 * b, t7 * nb + b, DS, DM, xd, xsd32, acc7)
    _store8(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


# -- 512-bit pairs of row groups (``matmul_simd512``): the quad and octet above, lane for lane


@njit(**_JIT)
def _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, xo, e, DS, DM, xd, xsd32, acc):
    i = _dot32x2(V0, V1, V2, V3, V4, V5, V6, V7, xq, xo)
    return fma_f32x16(DM, bc_f32x16(xsd32, e), fma_f32x16(cvt_f32x16(i), mul_f32x16(DS, bc_f32x16(xd, e)), acc))


@njit(**_JIT)
def _q5_k_quad2(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out):
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
            k1 = k + nb  # (group g + 1's block b)
            o = 512 * b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(q, 128 * k1 + _PF)
                prefetch(q, 128 * k1 + _PF + 64)
                if j % 2 == 0:
                    prefetch(qb, 32 * k + _PF // 4)
                    prefetch(qb, 32 * k1 + _PF // 4)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks5(q, qb, k)
                u0, u1, u2, u3, u4, u5, u6, u7 = _chunks5(q, qb, k1)
                V0, V1, V2, V3 = cat_i8x64(v0, u0), cat_i8x64(v1, u1), cat_i8x64(v2, u2), cat_i8x64(v3, u3)
                V4, V5, V6, V7 = cat_i8x64(v4, u4), cat_i8x64(v5, u5), cat_i8x64(v6, u6), cat_i8x64(v7, u7)
                if not last:  # a later unit of this pair will load them
                    _st8x2(buf, o, V0, V1, V2, V3, V4, V5, V6, V7)
            else:
                V0, V1, V2, V3, V4, V5, V6, V7 = _ld8x2(buf, o)
            if last:
                prefetch_l2(q, 128 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + nb) + 64)
                prefetch_l2(q, 128 * (k1 + 2 * nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb) + 64)
                if j % 2 == 0:
                    prefetch_l2(qb, 32 * (k1 + nb))
                    prefetch_l2(qb, 32 * (k1 + 2 * nb))
            DS = mul_f32x16(D, cvt_f32x16(ld2_u8x16_i32(sc, 8 * k, 8 * k1)))
            DM = mul_f32x16(NDM, cvt_f32x16(ld2_u8x16_i32(m, 8 * k, 8 * k1)))
            acc0 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t0 * n_in + 32 * b, t0 * nb + b, DS, DM, xd, xsd32, acc0)
            acc1 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t1 * n_in + 32 * b, t1 * nb + b, DS, DM, xd, xsd32, acc1)
            acc2 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t2 * n_in + 32 * b, t2 * nb + b, DS, DM, xd, xsd32, acc2)
            acc3 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t3 * n_in + 32 * b, t3 * nb + b, DS, DM, xd, xsd32, acc3)
    _store4x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q5_k_oct2(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out):
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
            k1 = k + nb  # (group g + 1's block b)
            o = 512 * b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(q, 128 * k1 + _PF)
                prefetch(q, 128 * k1 + _PF + 64)
                if j % 2 == 0:
                    prefetch(qb, 32 * k + _PF // 4)
                    prefetch(qb, 32 * k1 + _PF // 4)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks5(q, qb, k)
                u0, u1, u2, u3, u4, u5, u6, u7 = _chunks5(q, qb, k1)
                V0, V1, V2, V3 = cat_i8x64(v0, u0), cat_i8x64(v1, u1), cat_i8x64(v2, u2), cat_i8x64(v3, u3)
                V4, V5, V6, V7 = cat_i8x64(v4, u4), cat_i8x64(v5, u5), cat_i8x64(v6, u6), cat_i8x64(v7, u7)
                if not last:  # a later unit of this pair will load them
                    _st8x2(buf, o, V0, V1, V2, V3, V4, V5, V6, V7)
            else:
                V0, V1, V2, V3, V4, V5, V6, V7 = _ld8x2(buf, o)
            if last:
                prefetch_l2(q, 128 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + nb) + 64)
                prefetch_l2(q, 128 * (k1 + 2 * nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb) + 64)
                if j % 2 == 0:
                    prefetch_l2(qb, 32 * (k1 + nb))
                    prefetch_l2(qb, 32 * (k1 + 2 * nb))
            DS = mul_f32x16(D, cvt_f32x16(ld2_u8x16_i32(sc, 8 * k, 8 * k1)))
            DM = mul_f32x16(NDM, cvt_f32x16(ld2_u8x16_i32(m, 8 * k, 8 * k1)))
            acc0 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t0 * n_in + 32 * b, t0 * nb + b, DS, DM, xd, xsd32, acc0)
            acc1 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t1 * n_in + 32 * b, t1 * nb + b, DS, DM, xd, xsd32, acc1)
            acc2 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t2 * n_in + 32 * b, t2 * nb + b, DS, DM, xd, xsd32, acc2)
            acc3 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t3 * n_in + 32 * b, t3 * nb + b, DS, DM, xd, xsd32, acc3)
            acc4 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t4 * n_in + 32 * b, t4 * nb + b, DS, DM, xd, xsd32, acc4)
            acc5 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t5 * n_in + 32 * b, t5 * nb + b, DS, DM, xd, xsd32, acc5)
            acc6 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t6 * n_in + 32 * b, t6 * nb + b, DS, DM, xd, xsd32, acc6)
            acc7 = _q5_tok2(V0, V1, V2, V3, V4, V5, V6, V7, xq, t7 * n_in + 32 * b, t7 * nb + b, DS, DM, xd, xsd32, acc7)
    _store8x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


@njit(**_PJIT)
def q5_k_mm(q, qb, sc, m, d, dmin, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    n8, n4, n1 = _units(T)
    nw, S, G2 = _runs(out.shape[0] // T // 8)
    for c in prange(nw):
        buf = np.empty(512 * nb, np.uint8)
        for s in range(c * S // nw, (c + 1) * S // nw):
            g, pair = _slot(s, G2)
            for u in range(n8 + n4 + n1):
                t0, width = _unit(n8, n4, u)
                if width == 1:  # the matvec's row-group step, for each group of the unit
                    xq1, xd1, xs1, xsd1, out1 = _token(xq, xd, xs16, xsd32, out, T, t0)
                    for h in range(g, g + 2 if pair else g + 1):
                        _q5_k_group(q, qb, sc, m, d, dmin, xq1, xd1, xsd1, nb, h, out1)
                elif not pair and width == 8:
                    _q5_k_oct(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out)
                elif not pair:
                    _q5_k_quad(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out)
                elif width == 8:
                    _q5_k_oct2(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out)
                else:
                    _q5_k_quad2(q, qb, sc, m, d, dmin, xq, xd, xsd32, nb, g, t0, T, buf, out)


TRAITS = QuantTraits(
    QType.Q5_K,
    dequantize,
    Kernels(
        "q5_k",
        ("q", "qb", "sc", "m", "d", "dmin"),
        ("uint8", "uint8", "uint8", "uint8", "uint16", "uint16"),
        q5_k_mv,
        q5_k_mm,
        repack,
        fusable=True,
        planes=planes,
    ),
)
