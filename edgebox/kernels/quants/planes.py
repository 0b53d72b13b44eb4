"""The planes path: one layout and one pair of kernels for the rare types (Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K).

A type on it gives, per row, an unsigned code v (at most 6 bits) and exact float32 S and M per
sub-block of 16 or 32 values with w = S * v - M (every S and M is an f16 times a small integer:
exact in float32).  Repacked: nib plane (+ crumb plane when v has a 5th bit), S and M
[G, n_sub, 8].  Kernel: per 16 values int32 row sums (``_dot16``); float work per sub-block:
acc += S*xd*isum and macc += M*(xd*sum x).  One kernel serves them all at the cost of size (a
4-bit plane even for 2-3-bit codes, f32 S/M per sub-block: repacked / file bytes Q4_1 1.2, Q5_0
1.45, Q5_1 1.33, Q3_K 2.33, Q2_K 3.05), so their decode is proportionally slower; dedicated
layouts with byte scales, as Q4_K / Q6_K have, would bring Q2_K / Q3_K to ~1.0.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.matmul_kernels import _JIT, _PF, _PJIT, _chunks8, _dot16, _quad, _store4
from edgebox.kernels.matmul_pack import ROWS
from edgebox.kernels.matmul_simd import (
    add_i32,
    bc_f32,
    cvt_f32,
    fma_f32,
    ld_f32x8,
    mul_f32,
    prefetch,
    st_f32x8,
    sub_f32,
    zero_f32,
)
from edgebox.kernels.quants.traits import Kernels


def kernels(qtype: QType, values, sub: int, has_hi: bool) -> Kernels:
    """The planes path of a type: ``values(blocks [rows, n_blocks, type_size])`` -> (v uint8
    [rows, n_in], S, M float32 [rows, n_in / sub]); ``has_hi``: v has bits above the 4th."""
    return Kernels(
        "planes",
        ("q", "qh", "S", "M"),
        ("uint8", "uint8", "float32", "float32", "bool", "bool"),
        planes_mv,
        planes_mm,
        functools.partial(_repack, qtype, values, sub, has_hi),
        fusable=True,
        flags=(bool(has_hi), sub == 16),
    )


def _repack(
    qtype: QType, values, sub: int, has_hi: bool, raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True
) -> dict[str, np.ndarray]:
    """numpy only (``use_numba`` is ignored: these types are rare)."""
    G, nb = P.n_groups(n_out), n_in // P.QK
    out = {
        "q": P.aligned_empty((G, nb, 4, 32), np.uint8),
        "qh": P.aligned_empty((G, nb, 2, 32) if has_hi else (0, 0, 2, 32), np.uint8),
        "S": P.aligned_empty((G, n_in // sub, ROWS), np.float32),
        "M": P.aligned_empty((G, n_in // sub, ROWS), np.float32),
    }

    def fill(out, part, b, g0, g1):
        v, S, M = values(b)
        out["q"][g0:g1] = P.nib_plane(v)
        if has_hi:
            out["qh"][g0:g1] = P.crumb_plane(v >> 4)
        out["S"][g0:g1] = P.per_row(S.astype(np.float32))
        out["M"][g0:g1] = P.per_row(M.astype(np.float32))

    return P.repack_by_chunks(raw, qtype, n_out, out, fill)


# ---------------------------------------------------------------------------------------------
# kernels


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
        acc, macc = _pl_tok(v0, v1, v2, v3, v4, v5, v6, v7, S, M, nsub, g, b, sub16, xq, 32 * b, xd, xsd16, xsd32, b, acc, macc)
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
        acc0, m0 = _pl_tok(
            v0,
            v1,
            v2,
            v3,
            v4,
            v5,
            v6,
            v7,
            S,
            M,
            nsub,
            g,
            b,
            sub16,
            xq,
            t0 * n_in + 32 * b,
            xd,
            xsd16,
            xsd32,
            t0 * nb + b,
            acc0,
            m0,
        )
        acc1, m1 = _pl_tok(
            v0,
            v1,
            v2,
            v3,
            v4,
            v5,
            v6,
            v7,
            S,
            M,
            nsub,
            g,
            b,
            sub16,
            xq,
            t1 * n_in + 32 * b,
            xd,
            xsd16,
            xsd32,
            t1 * nb + b,
            acc1,
            m1,
        )
        acc2, m2 = _pl_tok(
            v0,
            v1,
            v2,
            v3,
            v4,
            v5,
            v6,
            v7,
            S,
            M,
            nsub,
            g,
            b,
            sub16,
            xq,
            t2 * n_in + 32 * b,
            xd,
            xsd16,
            xsd32,
            t2 * nb + b,
            acc2,
            m2,
        )
        acc3, m3 = _pl_tok(
            v0,
            v1,
            v2,
            v3,
            v4,
            v5,
            v6,
            v7,
            S,
            M,
            nsub,
            g,
            b,
            sub16,
            xq,
            t3 * n_in + 32 * b,
            xd,
            xsd16,
            xsd32,
            t3 * nb + b,
            acc3,
            m3,
        )
    _store4(out, out.shape[0] // T, g, t0, T, sub_f32(acc0, m0), sub_f32(acc1, m1), sub_f32(acc2, m2), sub_f32(acc3, m3))


@njit(**_PJIT)
def planes_mm(q, qh, S, M, has_hi, sub16, xq, xd, xs16, xsd16, xsd32, T, out):
    nb = xd.shape[0] // T
    G = out.shape[0] // T // 8
    nt = (T + 3) // 4
    for it in prange(G * nt):
        g = it // nt
        _pl_quad(q, qh, S, M, has_hi, sub16, xq, xd, xsd16, xsd32, nb, g, 4 * (it - g * nt), T, out)
