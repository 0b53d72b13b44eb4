"""Q8_0: blocks of 32 values, an f16 scale d and int8 codes q: w = d * q.

Repacked: byte plane q (int8) [G, nb, 8, 32], d f16 [G, nb, 8] (as compact as the file).
Kernel: vpmaddubsw needs one unsigned operand: |w| times x with w's sign moved onto x (vpabsb,
vpsignb; llama.cpp's AVX2 trick).  A pair sum can reach 2*128*127, so each product vector is
widened to int32 (vpmaddwd) before it is added.  On VNNI hosts every kernel takes the other
way to one unsigned operand: q + 128 (the sign bit flipped) by vpdpbusd, less 128 * the
activations' sum, the same int32 (the 512-bit pairs: 2.2-2.5x the AVX2 quad on a Zen 4).  ORT:
MatMulNBits bits=8 block 32, code q+128, default zero point 128: bit-exact.
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
    HAS_VNNI,
    abs_i8,
    add_f32,
    add_i32,
    bc4_i8x32,
    bc_f32,
    cvt_f32,
    dpbusd,
    fma_f32,
    hadd_i16,
    ld_f16x8,
    ld_i8x32,
    maddubs,
    mul_f32,
    prefetch,
    prefetch_l2,
    sign_i8,
    st_f32x8,
    sub_i32_s,
    xor_i8,
    zero_f32,
    zero_i32,
)
from edgebox.kernels.matmul_simd512 import (
    add_i32x16,
    bc_f32x16,
    cvt_f32x16,
    fma_f32x16,
    ld2_f16x16,
    ld2_i8x64,
    mul_f32x16,
    splat_i32x16,
    xor_i8x64,
    zero_f32x16,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.traits import Kernels, OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 32 bytes qs (int8): x = d * q
    qk = qt.block_size(QType.Q8_0)
    d, qs = gb.fields(blocks, QType.Q8_0, 2, qk)
    return gb.f16(d) * qs.view(np.int8).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# repacking


@njit(**P.RJIT)
def _repack_q8_0(raw, n_out, q, d):
    G, nb = q.shape[0], q.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for b in range(nb):
                o = 34 * b
                if row < n_out:
                    d[g, b, r] = np.uint16(raw[row, o]) | (np.uint16(raw[row, o + 1]) << 8)
                else:
                    d[g, b, r] = 0
                for c in range(8):
                    for i in range(4):
                        q[g, b, c, 4 * r + i] = np.int8(raw[row, o + 2 + 4 * c + i]) if row < n_out else 0


def planes(n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """The repacked arrays of an [n_out, n_in] weight, allocated."""
    G, nb = P.n_groups(n_out), n_in // P.QK
    return {"q": P.aligned_empty((G, nb, 8, 32), np.int8), "d": P.aligned_empty((G, nb, ROWS), np.uint16)}


def repack(raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True, out: dict | None = None) -> dict[str, np.ndarray]:
    out = planes(n_out, n_in) if out is None else out  # (``out``: row groups of a larger weight's planes)
    if use_numba:
        _repack_q8_0(np.ascontiguousarray(raw), n_out, out["q"], out["d"])  # strided shards: see q4_0
        return out
    return P.repack_by_chunks(raw, QType.Q8_0, n_out, out, _fill)


def _fill(out, part, b, g0, g1):
    """The numpy formulation (the numba repacker's spec)."""
    out["q"][g0:g1] = P.byte_plane(b[..., 2:34].reshape(b.shape[0], -1).view(np.int8))
    out["d"][g0:g1] = P.per_row(P.f16_bits(b[..., 0:2]))


# ---------------------------------------------------------------------------------------------
# kernels


@njit(**_JIT)
def _q8_chunk(w, x):
    return hadd_i16(maddubs(abs_i8(w), sign_i8(x, w)))


@njit(**_JIT)
def _sum128(xs16, e):
    """128 * the sum of activation block e's codes, from ``quantize_act``'s VNNI xs16 (-32 * the
    sum of each 16-value half)."""
    return -4 * (xs16[2 * e] + xs16[2 * e + 1])


@njit(**_JIT)
def _q8_0_blk(q, d, xq, xd, xs16, k, b, acc):
    """acc += the 8 rows' dot products of block k (activation block b)."""
    a = zero_i32()
    if HAS_VNNI:  # as the quads: q + 128 by vpdpbusd, less 128 * the activations' sum
        for c in range(8):
            a = dpbusd(a, xor_i8(ld_i8x32(q, 256 * k + 32 * c), 0x80), bc4_i8x32(xq, 32 * b + 4 * c))
        a = sub_i32_s(a, _sum128(xs16, b))
    else:
        for c in range(8):
            a = add_i32(a, _q8_chunk(ld_i8x32(q, 256 * k + 32 * c), bc4_i8x32(xq, 32 * b + 4 * c)))
    return fma_f32(cvt_f32(a), mul_f32(ld_f16x8(d, 8 * k), bc_f32(xd, b)), acc)


@njit(**_JIT)
def _q8_0_group(q, d, xq, xd, xs16, nb, g, out):
    acc0 = zero_f32()
    acc1 = zero_f32()
    for b in range(0, nb - 1, 2):
        k = g * nb + b
        for i in range(8):
            prefetch(q, 256 * k + _PF + 64 * i)
        acc0 = _q8_0_blk(q, d, xq, xd, xs16, k, b, acc0)
        acc1 = _q8_0_blk(q, d, xq, xd, xs16, k + 1, b + 1, acc1)
    if nb % 2:
        acc0 = _q8_0_blk(q, d, xq, xd, xs16, g * nb + nb - 1, nb - 1, acc0)
    st_f32x8(out, 8 * g, add_f32(acc0, acc1))


@njit(**_PJIT)
def q8_0_mv(q, d, xq, xd, xs16, xsd16, xsd32, out):
    nb = xd.shape[0]
    for g in prange(out.shape[0] // 8):
        _q8_0_group(q, d, xq, xd, xs16, nb, g, out)


@njit(**_JIT)
def _q8_0_quad(q, d, xq, xd, xs16, nb, g, t0, T, out):
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
        if HAS_VNNI:  # q + 128 by vpdpbusd, less 128 * the block's activation sum: the same int32
            for c in range(8):
                w = xor_i8(ld_i8x32(q, qo + 32 * c), 0x80)
                xo = 32 * b + 4 * c
                a0 = dpbusd(a0, w, bc4_i8x32(xq, t0 * n_in + xo))
                a1 = dpbusd(a1, w, bc4_i8x32(xq, t1 * n_in + xo))
                a2 = dpbusd(a2, w, bc4_i8x32(xq, t2 * n_in + xo))
                a3 = dpbusd(a3, w, bc4_i8x32(xq, t3 * n_in + xo))
            a0 = sub_i32_s(a0, _sum128(xs16, t0 * nb + b))
            a1 = sub_i32_s(a1, _sum128(xs16, t1 * nb + b))
            a2 = sub_i32_s(a2, _sum128(xs16, t2 * nb + b))
            a3 = sub_i32_s(a3, _sum128(xs16, t3 * nb + b))
        else:
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


# -- 512-bit pairs of row groups (``matmul_simd512``): the quad's integer sums by vpdpbusd


@njit(**_JIT)
def _q8_0_codes2(q, qo, qo1):
    """A pair's block (group g at qo, g + 1 at qo1) as 8 chunks of unsigned bytes q + 128."""
    return (
        xor_i8x64(ld2_i8x64(q, qo, qo1), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 32, qo1 + 32), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 64, qo1 + 64), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 96, qo1 + 96), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 128, qo1 + 128), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 160, qo1 + 160), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 192, qo1 + 192), 0x80),
        xor_i8x64(ld2_i8x64(q, qo + 224, qo1 + 224), 0x80),
    )


@njit(**_JIT)
def _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, xo, xs16, e, D, xd, acc):
    """One token's step over a pair's block: the weights + 128 as unsigned bytes (``W*``)
    against the activations by vpdpbusd, plus -128 * the activations' sum (``quantize_act``'s
    VNNI xs16 holds -32 * each half's: HAS_512 implies HAS_VNNI), is the quad's exact int32 dot
    product; the same epilogue."""
    i = add_i32x16(_dot32x2(W0, W1, W2, W3, W4, W5, W6, W7, xq, xo), splat_i32x16(-_sum128(xs16, e)))
    return fma_f32x16(cvt_f32x16(i), mul_f32x16(D, bc_f32x16(xd, e)), acc)


@njit(**_JIT)
def _q8_0_quad2(q, d, xq, xd, xs16, nb, g, t0, T, out):
    # ``_q8_0_quad`` for row groups g and g + 1 in 512-bit lanes: the same int32 sums (by
    # vpdpbusd, which needs one unsigned operand: the weights' sign bit flipped) and the same
    # float epilogue lane for lane, so the same bits.
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
        qo = 256 * k
        qo1 = qo + 256 * nb  # (group g + 1's block b)
        _prefetch_pair(q, qo, nb, first, last, 256)
        W0, W1, W2, W3, W4, W5, W6, W7 = _q8_0_codes2(q, qo, qo1)
        D = ld2_f16x16(d, 8 * k, 8 * (k + nb))
        acc0 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, D, xd, acc0)
        acc1 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, D, xd, acc1)
        acc2 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, D, xd, acc2)
        acc3 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, D, xd, acc3)
    _store4x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q8_0_oct2(q, d, xq, xd, xs16, nb, g, t0, T, out):
    # ``_q8_0_quad2`` 8 tokens wide (the batched decode step's T): a pair's weights loaded once
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
        qo = 256 * k
        qo1 = qo + 256 * nb
        _prefetch_pair(q, qo, nb, first, last, 256)
        W0, W1, W2, W3, W4, W5, W6, W7 = _q8_0_codes2(q, qo, qo1)
        D = ld2_f16x16(d, 8 * k, 8 * (k + nb))
        acc0 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, D, xd, acc0)
        acc1 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, D, xd, acc1)
        acc2 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, D, xd, acc2)
        acc3 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, D, xd, acc3)
        acc4 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t4 * n_in + 32 * b, xs16, t4 * nb + b, D, xd, acc4)
        acc5 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t5 * n_in + 32 * b, xs16, t5 * nb + b, D, xd, acc5)
        acc6 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t6 * n_in + 32 * b, xs16, t6 * nb + b, D, xd, acc6)
        acc7 = _q8_0_tok2(W0, W1, W2, W3, W4, W5, W6, W7, xq, t7 * n_in + 32 * b, xs16, t7 * nb + b, D, xd, acc7)
    _store8x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


@njit(**_PJIT)
def q8_0_mm(q, d, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    n, plan = _steps(T, out.shape[0] // T // 8)
    for it in prange(n):
        g, t0, width, pair = _step(plan, it)
        if width == 1:  # the matvec's row-group step, for each group of the unit
            xq1, xd1, xs1, xsd1, out1 = _token(xq, xd, xs16, xsd32, out, T, t0)
            for h in range(g, g + 2 if pair else g + 1):
                _q8_0_group(q, d, xq1, xd1, xs1, nb, h, out1)
        elif not pair:
            _q8_0_quad(q, d, xq, xd, xs16, nb, g, t0, T, out)
        elif width == 8:
            _q8_0_oct2(q, d, xq, xd, xs16, nb, g, t0, T, out)
        else:
            _q8_0_quad2(q, d, xq, xd, xs16, nb, g, t0, T, out)


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    d, qs = gb.fields(b.reshape(-1, 34), QType.Q8_0, 2, 32)
    return qs ^ np.uint8(0x80), gb.f16(d)[:, 0], None  # q + 128 as uint8


TRAITS = QuantTraits(
    QType.Q8_0,
    dequantize,
    Kernels("q8_0", ("q", "d"), ("int8", "uint16"), q8_0_mv, q8_0_mm, repack, fusable=True, planes=planes),
    OrtMapping("MatMulNBits", bits=8, block=32, convert=_ort_codes),
)
