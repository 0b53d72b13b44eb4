"""Q8_0: blocks of 32 values, an f16 scale d and int8 codes q: w = d * q.

Repacked: byte plane q (int8) [G, nb, 8, 32], d f16 [G, nb, 8] (as compact as the file).
Kernel: vpmaddubsw needs one unsigned operand: |w| times x with w's sign moved onto x (vpabsb,
vpsignb; llama.cpp's AVX2 trick).  A pair sum can reach 2*128*127, so each product vector is
widened to int32 (vpmaddwd) before it is added.  ORT: MatMulNBits bits=8 block 32, code q+128,
default zero point 128: bit-exact.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.matmul_kernels import _JIT, _PF, _PJIT, _quad, _store4
from edgebox.kernels.matmul_pack import ROWS
from edgebox.kernels.matmul_simd import (
    abs_i8,
    add_f32,
    add_i32,
    bc4_i8x32,
    bc_f32,
    cvt_f32,
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
    zero_f32,
    zero_i32,
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
