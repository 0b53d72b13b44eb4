"""Q4_0: blocks of 32 values, an f16 scale d and 4-bit codes q: w = d * (q - 8).

Repacked: nib plane q (0..15) [G, nb, 4, 32], d f16 [G, nb, 8] (as compact as the file).
Kernel: one block is 4 loads of 32 bytes, 8 vpmaddubsw (unsigned nibble x signed activation),
int16 sums (8 * 2 * 15 * 127 = 30480 < 32767: no overflow), one vpmaddwd; the -8 is applied in
float as d * (-8 * xd * sum x).  ORT: MatMulNBits bits=4 block 32, code q, default zero point 8
(Q4_0's own offset): bit-exact.
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
    add_i16,
    bc4_i8x32,
    bc_f32,
    cvt_f32,
    fma_f32,
    hadd_i16,
    ld_f16x8,
    ld_i8x32,
    maddubs,
    mul_f32,
    mul_f32_s,
    nib_hi,
    nib_lo,
    prefetch,
    prefetch_l2,
    st_f32x8,
    zero_f32,
    zero_i16,
)
from edgebox.kernels.matmul_simd512 import (
    bc_f32x16,
    cvt_f32x16,
    fma_f32x16,
    ld2_f16x16,
    ld2_i8x64,
    mul_f32x16,
    mul_f32x16_s,
    nib_hi64,
    nib_lo64,
    zero_f32x16,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.traits import Kernels, OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 16 bytes qs (nibbles): x = d * (q - 8)
    qk = qt.block_size(QType.Q4_0)
    d, qs = gb.fields(blocks, QType.Q4_0, 2, qk // 2)
    q = gb.nibbles(qs).astype(np.int8) - np.int8(8)  # [n, 32]
    return gb.f16(d) * q.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# repacking


@njit(**P.RJIT)
def _repack_q4_0(raw, n_out, q, d):
    """Whole 4-byte groups, read as two uint16 of the row (a block is 18 bytes: its fields sit at
    even offsets) and stored as one uint32 lane of the chunk: 3-5 GB/s on 2 cores, against
    0.7-3.7 for the byte loop this replaced."""
    G, nb = q.shape[0], q.shape[1]
    raw16 = raw.view(np.uint16)  # [n_out, 9 nb]: block b is d at 9b, then its 16 code bytes
    q32 = q.view(np.uint32)  # [G, nb, 4, 8]: lane r of chunk l is row r's 4 bytes
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            if row < n_out:
                for b in range(nb):
                    o = 9 * b
                    d[g, b, r] = raw16[row, o]
                    for l in range(4):
                        q32[g, b, l, r] = np.uint32(raw16[row, o + 1 + 2 * l]) | (np.uint32(raw16[row, o + 2 + 2 * l]) << 16)
            else:  # the padding rows
                for b in range(nb):
                    d[g, b, r] = 0
                    for l in range(4):
                        q32[g, b, l, r] = 0


def planes(n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """The repacked arrays of an [n_out, n_in] weight, allocated."""
    G, nb = P.n_groups(n_out), n_in // P.QK
    return {"q": P.aligned_empty((G, nb, 4, 32), np.uint8), "d": P.aligned_empty((G, nb, ROWS), np.uint16)}


def repack(raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True, out: dict | None = None) -> dict[str, np.ndarray]:
    out = planes(n_out, n_in) if out is None else out  # (``out``: row groups of a larger weight's planes)
    if use_numba:
        # the compiled repacker reads contiguous rows (``matmul.pack`` hands strided shards over
        # in small staged pieces; a direct caller's strided rows are copied here)
        _repack_q4_0(np.ascontiguousarray(raw), n_out, out["q"], out["d"])
        return out
    return P.repack_by_chunks(raw, QType.Q4_0, n_out, out, _fill)


def _fill(out, part, b, g0, g1):
    """The numpy formulation (the numba repacker's spec)."""
    nb = b.shape[1]
    # GGUF byte j of a block = value j (low nibble) | value j+16 (high): already the nib
    # plane pairing, so only the 4-byte groups move.
    qs = b[..., 2:18]  # [rows, nb, 16]
    out["q"][g0:g1] = qs.reshape(-1, ROWS, nb, 4, 4).transpose(0, 2, 3, 1, 4).reshape(-1, nb, 4, 32)
    out["d"][g0:g1] = P.per_row(P.f16_bits(b[..., 0:2]))


# ---------------------------------------------------------------------------------------------
# kernels


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
    last = _last(T, t0, 4)  # the last one fetches the next group into L2 meanwhile
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


@njit(**_JIT)
def _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, e, D, D8, xd, xsd32, acc):
    i = _dot32x2(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo)
    return fma_f32x16(D8, bc_f32x16(xsd32, e), fma_f32x16(cvt_f32x16(i), mul_f32x16(D, bc_f32x16(xd, e)), acc))


@njit(**_JIT)
def _q4_0_quad2(q, d, xq, xd, xsd32, nb, g, t0, T, out):
    # ``_q4_0_quad`` for row groups g and g + 1 in 512-bit lanes (``matmul_simd512``): the same
    # integer sums (vpdpbusd on zmm) and the same float epilogue lane for lane, so the same bits.
    n_in = 32 * nb
    first = t0 == 0
    last = _last(T, t0, 4)
    t0, t1, t2, t3 = _quad(T, t0)
    acc0 = zero_f32x16()
    acc1 = zero_f32x16()
    acc2 = zero_f32x16()
    acc3 = zero_f32x16()
    for b in range(nb):
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
        D = ld2_f16x16(d, 8 * k, 8 * (k + nb))
        D8 = mul_f32x16_s(D, -8.0)
        acc0 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, t0 * nb + b, D, D8, xd, xsd32, acc0)
        acc1 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, t1 * nb + b, D, D8, xd, xsd32, acc1)
        acc2 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, t2 * nb + b, D, D8, xd, xsd32, acc2)
        acc3 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, t3 * nb + b, D, D8, xd, xsd32, acc3)
    _store4x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q4_0_oct2(q, d, xq, xd, xsd32, nb, g, t0, T, out):
    # ``_q4_0_quad2`` 8 tokens wide: a pair's weights loaded and unpacked once per 8 tokens
    # (the batched decode step's T), each token's steps the quad's.
    n_in = 32 * nb
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
    for b in range(nb):
        k = g * nb + b
        qo = 128 * k
        qo1 = qo + 128 * nb
        _prefetch_pair(q, qo, nb, first, last)
        w0 = ld2_i8x64(q, qo, qo1)
        w1 = ld2_i8x64(q, qo + 32, qo1 + 32)
        w2 = ld2_i8x64(q, qo + 64, qo1 + 64)
        w3 = ld2_i8x64(q, qo + 96, qo1 + 96)
        v0, v1, v2, v3 = nib_lo64(w0), nib_lo64(w1), nib_lo64(w2), nib_lo64(w3)
        v4, v5, v6, v7 = nib_hi64(w0), nib_hi64(w1), nib_hi64(w2), nib_hi64(w3)
        D = ld2_f16x16(d, 8 * k, 8 * (k + nb))
        D8 = mul_f32x16_s(D, -8.0)
        acc0 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t0 * n_in + 32 * b, t0 * nb + b, D, D8, xd, xsd32, acc0)
        acc1 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t1 * n_in + 32 * b, t1 * nb + b, D, D8, xd, xsd32, acc1)
        acc2 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t2 * n_in + 32 * b, t2 * nb + b, D, D8, xd, xsd32, acc2)
        acc3 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t3 * n_in + 32 * b, t3 * nb + b, D, D8, xd, xsd32, acc3)
        acc4 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t4 * n_in + 32 * b, t4 * nb + b, D, D8, xd, xsd32, acc4)
        acc5 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t5 * n_in + 32 * b, t5 * nb + b, D, D8, xd, xsd32, acc5)
        acc6 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t6 * n_in + 32 * b, t6 * nb + b, D, D8, xd, xsd32, acc6)
        acc7 = _q4_0_tok2(v0, v1, v2, v3, v4, v5, v6, v7, xq, t7 * n_in + 32 * b, t7 * nb + b, D, D8, xd, xsd32, acc7)
    _store8x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


@njit(**_PJIT)
def q4_0_mm(q, d, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    n, plan = _steps(T, out.shape[0] // T // 8)
    for it in prange(n):
        g, t0, width, pair = _step(plan, it)
        if width == 1:  # the matvec's row-group step, for each group of the unit
            xq1, xd1, xs1, xsd1, out1 = _token(xq, xd, xs16, xsd32, out, T, t0)
            for h in range(g, g + 2 if pair else g + 1):
                _q4_0_group(q, d, xq1, xd1, xsd1, nb, h, out1)
        elif not pair:
            _q4_0_quad(q, d, xq, xd, xsd32, nb, g, t0, T, out)
        elif width == 8:
            _q4_0_oct2(q, d, xq, xd, xsd32, nb, g, t0, T, out)
        else:
            _q4_0_quad2(q, d, xq, xd, xsd32, nb, g, t0, T, out)


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    d, qs = gb.fields(b.reshape(-1, 18), QType.Q4_0, 2, 16)
    codes = gb.nibbles(qs)  # [n, 32]: value j = code j
    return codes, gb.f16(d)[:, 0], None


TRAITS = QuantTraits(
    QType.Q4_0,
    dequantize,
    Kernels("q4_0", ("q", "d"), ("uint8", "uint16"), q4_0_mv, q4_0_mm, repack, fusable=True, planes=planes),
    OrtMapping("MatMulNBits", bits=4, block=32, convert=_ort_codes),
)
