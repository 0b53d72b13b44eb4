"""Q6_K: super-blocks of 256 values: f16 d, 16 int8 scales sc (one per 16 values), 6-bit codes q
(low 4 bits ql, high 2 bits qh): w = d*sc * (q - 32).

Repacked: nib plane q = low 4 bits, crumb plane qh = high 2 bits [G, nb, 2, 32], sc int8
[G, n_in/16, 8], d f16 [G, nb/8, 8] (as compact as the file).  Kernel: chunks 0-3 of a block are
sub-block 2b (low nibbles), 4-7 sub-block 2b+1 (high nibbles); per 16 values the 4 vpmaddubsw
products are summed in int16 and the -32 offset subtracted there (``_q6_half``: exact, though the
sum wraps before), then one vpmaddwd by the int16 scales gives int32 sc * dot.  Batched: tokens
in octets (T = 8, a batched decode step: one pass over the codes), then quads (``_units``);
with VNNI the octets apply d*sc in float (``_q6_tok_d``).
ORT: MatMulNBits bits=8 block 16, code q, uint8 zero point 32, scale d*sc (exact in float32):
bit-exact.
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
    _chunks8,
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
    HAS_VNNI,
    add_i16,
    add_i32,
    bc2_i16,
    bc4_i8x32,
    bc_f32,
    bc_i32,
    cvt_f32,
    dpbusd,
    fma_f32,
    ld_f16x8,
    ld_i8x8_i16x2,
    ld_i8x8_i32,
    madd,
    maddubs,
    mul_f32,
    mul_i32,
    prefetch,
    prefetch_l2,
    st_f32x8,
    sub_i16,
    zero_f32,
)
from edgebox.kernels.matmul_simd512 import (
    add_i32x16,
    bc4_i8x64,
    bc_f32x16,
    bc_i32x16,
    cat_i8x64,
    cvt_f32x16,
    dpbusd64,
    fma_f32x16,
    ld2_f16x16,
    ld2_i8x16_i32,
    mul_f32x16,
    mul_i32x16,
    zero_f32x16,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.traits import Kernels, OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 bytes scales (int8, one per
    # 16 values), 2 bytes d (f16): x = d*sc * (q - 32).
    # Per half of 128 values (64 ql bytes, 32 qh bytes), value 32*j + l has its low nibble in
    # nibble j // 2 of ql[32*(j % 2) + l] and its high bits in bits 2j..2j+1 of qh[l].
    qk = qt.block_size(QType.Q6_K)
    n = blocks.shape[0]
    ql, qh, scales, d = gb.fields(blocks, QType.Q6_K, qk // 2, qk // 4, qk // 16, 2)
    low = gb.nibbles(ql.reshape(n * 2, 64)).reshape(n, qk)
    q = (low | (gb.crumbs(qh) << 4)).astype(np.int8) - np.int8(32)  # [n, 256]
    dl = gb.f16(d) * scales.view(np.int8).astype(np.float32)  # [n, 16]
    return (dl[:, :, None] * q.reshape(n, qk // 16, 16).astype(np.float32)).reshape(n, qk)


# ---------------------------------------------------------------------------------------------
# repacking


@njit(**P.RJIT)
def _repack_q6_k(raw, n_out, q, qh, sc, d):
    G, nsb = d.shape[0], d.shape[1]
    for g in prange(G):
        v = np.empty(256, np.uint8)
        for r in range(ROWS):
            row = ROWS * g + r
            for s in range(nsb):
                o = 210 * s
                if row < n_out:
                    d[g, s, r] = np.uint16(raw[row, o + 208]) | (np.uint16(raw[row, o + 209]) << 8)
                    for u in range(16):
                        sc[g, 16 * s + u, r] = np.int8(raw[row, o + 192 + u])
                    # value 128h + 32j + l: low nibble j // 2 of ql[64h + 32(j % 2) + l],
                    # high bits 2j.. of qh[32h + l]
                    for h in range(2):
                        for j in range(4):
                            for l in range(32):
                                lo = (raw[row, o + 64 * h + 32 * (j % 2) + l] >> (4 * (j // 2))) & 0x0F
                                hb = (raw[row, o + 128 + 32 * h + l] >> (2 * j)) & 3
                                v[128 * h + 32 * j + l] = lo | (hb << 4)
                else:
                    d[g, s, r] = 0
                    for u in range(16):
                        sc[g, 16 * s + u, r] = 0
                    v[:] = 0
                for jj in range(8):
                    b = 8 * s + jj
                    for l in range(4):
                        for i in range(4):
                            q[g, b, l, 4 * r + i] = (v[32 * jj + 4 * l + i] & 0x0F) | ((v[32 * jj + 16 + 4 * l + i] & 0x0F) << 4)
                    for h2 in range(2):
                        for i in range(4):
                            x = 0
                            for s2 in range(4):
                                x |= (v[32 * jj + 4 * (4 * h2 + s2) + i] >> 4) << (2 * s2)
                            qh[g, b, h2, 4 * r + i] = x


def planes(n_out: int, n_in: int) -> dict[str, np.ndarray]:
    """The repacked arrays of an [n_out, n_in] weight, allocated."""
    G, nb, nsb = P.n_groups(n_out), n_in // P.QK, n_in // 256
    return {
        "q": P.aligned_empty((G, nb, 4, 32), np.uint8),
        "qh": P.aligned_empty((G, nb, 2, 32), np.uint8),
        "sc": P.aligned_empty((G, n_in // 16, ROWS), np.int8),
        "d": P.aligned_empty((G, nsb, ROWS), np.uint16),
    }


def repack(raw: np.ndarray, n_out: int, n_in: int, use_numba: bool = True, out: dict | None = None) -> dict[str, np.ndarray]:
    out = planes(n_out, n_in) if out is None else out  # (``out``: row groups of a larger weight's planes)
    if use_numba:
        _repack_q6_k(np.ascontiguousarray(raw), n_out, out["q"], out["qh"], out["sc"], out["d"])
        return out
    return P.repack_by_chunks(raw, QType.Q6_K, n_out, out, _fill)


def _fill(out, part, b, g0, g1):
    """The numpy formulation (the numba repacker's spec)."""
    rows, ns = b.shape[:2]
    low = gb.nibbles(b[..., 0:128].reshape(rows, ns, 2, 64)).reshape(rows, ns, 256)
    v = (low | (gb.crumbs(b[..., 128:192]) << 4)).reshape(rows, -1)
    out["q"][g0:g1] = P.nib_plane(v)
    out["qh"][g0:g1] = P.crumb_plane(v >> 4)
    out["sc"][g0:g1] = P.per_row(b[..., 192:208].reshape(rows, -1).view(np.int8))
    out["d"][g0:g1] = P.per_row(P.f16_bits(b[..., 208:210]))


# ---------------------------------------------------------------------------------------------
# kernels


@njit(**_JIT)
def _q6_half(v0, v1, v2, v3, xq, xo, xs16, u):
    """int16 pair sums of (q - 32) * x over 16 values (4 chunks) against x[xo:xo+16].

    Each maddubs lane (2 products, <= 2*63*127) fits int16; the 4-chunk sum may wrap, but the
    result after subtracting the offset (xs16: 32 x the sum of the lane's 8 activations) is
    sum (q-32)*x over 8 values, |.| <= 8*32*127 = 32512: exact in int16."""
    p = add_i16(maddubs(v0, bc4_i8x32(xq, xo)), maddubs(v1, bc4_i8x32(xq, xo + 4)))
    r = add_i16(maddubs(v2, bc4_i8x32(xq, xo + 8)), maddubs(v3, bc4_i8x32(xq, xo + 12)))
    return sub_i16(add_i16(p, r), bc2_i16(xs16, u))


@njit(**_JIT)
def _q6_half_vnni(v0, v1, v2, v3, xq, xo, xs16, u):
    """int32 sum of (q - 32) * x over 16 values per row: 4 vpdpbusd starting from xs16[u]
    (-32 x sum(x), broadcast)."""
    i = dpbusd(bc_i32(xs16, u), v0, bc4_i8x32(xq, xo))
    i = dpbusd(i, v1, bc4_i8x32(xq, xo + 4))
    i = dpbusd(i, v2, bc4_i8x32(xq, xo + 8))
    return dpbusd(i, v3, bc4_i8x32(xq, xo + 12))


if HAS_VNNI:

    @njit(**_JIT)
    def _q6_scales(sc, o):
        """The 8 rows' int8 scales of one 16-value half, as the per-token step multiplies them."""
        return ld_i8x8_i32(sc, o)

    @njit(**_JIT)
    def _q6_isum(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e):
        """sc_A * dot_A + sc_B * dot_B (int32 per row) for block e of a token (VNNI: int32
        sums times int32 scales, vpmulld)."""
        ia = mul_i32(_q6_half_vnni(v0, v1, v2, v3, xq, xo, xs16, 2 * e), SA)
        ib = mul_i32(_q6_half_vnni(v4, v5, v6, v7, xq, xo + 16, xs16, 2 * e + 1), SB)
        return add_i32(ia, ib)

    @njit(**_JIT)
    def _q6_scales_d(sc, o, D):
        """d * sc per row for one 16-value half, in float32 (exact: an f16 times an int8), formed
        once per block and shared by the octet's tokens."""
        return mul_f32(cvt_f32(ld_i8x8_i32(sc, o)), D)

    @njit(**_JIT)
    def _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e, xd, D, acc):
        """acc += xd * (d*sc_A * dot_A + d*sc_B * dot_B) for block e of a token.  The scales are
        applied in float (2 conversions, a multiply and an FMA) rather than by 2 vpmulld and an
        add: +7-11 % on this EPYC (docs/performance.md), presumably as the conversions issue
        beside the 8 vpdpbusd where the integer multiplies compete with them."""
        ia = cvt_f32(_q6_half_vnni(v0, v1, v2, v3, xq, xo, xs16, 2 * e))
        ib = cvt_f32(_q6_half_vnni(v4, v5, v6, v7, xq, xo + 16, xs16, 2 * e + 1))
        return fma_f32(fma_f32(ib, SB, mul_f32(ia, SA)), bc_f32(xd, e), acc)

else:

    @njit(**_JIT)
    def _q6_scales(sc, o):
        """The 8 rows' int8 scales of one 16-value half, each in both int16 halves of its lane."""
        return ld_i8x8_i16x2(sc, o)

    @njit(**_JIT)
    def _q6_isum(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e):
        """sc_A * dot_A + sc_B * dot_B (int32 per row) for block e of a token; one vpmaddwd
        per half multiplies the int16 pair sums by the int16 scales and adds the pairs."""
        ia = madd(_q6_half(v0, v1, v2, v3, xq, xo, xs16, 2 * e), SA)
        ib = madd(_q6_half(v4, v5, v6, v7, xq, xo + 16, xs16, 2 * e + 1), SB)
        return add_i32(ia, ib)

    @njit(**_JIT)
    def _q6_scales_d(sc, o, D):
        """The 8 rows' int8 scales of one 16-value half as ``_q6_scales``; d is applied per token
        by ``_q6_tok_d`` (vpmaddwd multiplies by the int16 scales for free)."""
        return ld_i8x8_i16x2(sc, o)

    @njit(**_JIT)
    def _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e, xd, D, acc):
        """acc += d * xd * (sc_A * dot_A + sc_B * dot_B): ``_q6_tok`` with the super-block scale d
        folded in per block (no per-super-block accumulator)."""
        isum = _q6_isum(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e)
        return fma_f32(cvt_f32(isum), mul_f32(D, bc_f32(xd, e)), acc)


@njit(**_JIT)
def _q6_tok(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e, xd, facc):
    """facc += xd * (sc_A * dot_A + sc_B * dot_B) for block e of a token."""
    return fma_f32(cvt_f32(_q6_isum(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, xo, xs16, e)), bc_f32(xd, e), facc)


@njit(**_JIT)
def _q6_k_blk(q, qh, sc, xq, xs16, xd, k, b, facc):
    v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
    return _q6_tok(
        v0, v1, v2, v3, v4, v5, v6, v7, _q6_scales(sc, 16 * k), _q6_scales(sc, 16 * k + 8), xq, 32 * b, xs16, b, xd, facc
    )


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
def _q6_k_quad(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out):
    """Tokens t0..t0+3 of row group g.  The group's first quad unpacks the 6-bit codes (nib |
    crumb << 4, ``_chunks8``) and keeps them in ``buf`` (256 bytes per block, L1/L2-resident);
    the later quads load them from there, so the unpacking (~25 vector ops per block) is paid
    once per group instead of once per quad."""
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
                if not last:  # a later quad of this group will load them
                    _st8(buf, 256 * b, v0, v1, v2, v3, v4, v5, v6, v7)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _ld8(buf, 256 * b)
            if last:
                prefetch_l2(q, 128 * (k + nb))
                prefetch_l2(q, 128 * (k + nb) + 64)
                prefetch_l2(qh, 64 * (k + nb))
            SA = _q6_scales(sc, 16 * k)
            SB = _q6_scales(sc, 16 * k + 8)
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


@njit(**_JIT)
def _q6_k_oct(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out):
    """Tokens t0..t0+7 of row group g: ``_q6_k_quad`` 8 wide, so at T = 8 (the batched decode
    step) the codes are unpacked and used in one pass, never stored and reloaded.  The
    super-block scale d is folded into each block's activation scale (``_q6_tok_d``): 8
    accumulators, not 8 more per super-block (8 + 8 + 8 chunk vectors would spill)."""
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
        D = ld_f16x8(d, 8 * (g * nsb + s))
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(qh, 64 * k + _PF // 2)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
                if not last:
                    _st8(buf, 256 * b, v0, v1, v2, v3, v4, v5, v6, v7)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _ld8(buf, 256 * b)
            if last:
                prefetch_l2(q, 128 * (k + nb))
                prefetch_l2(q, 128 * (k + nb) + 64)
                prefetch_l2(qh, 64 * (k + nb))
            SA = _q6_scales_d(sc, 16 * k, D)
            SB = _q6_scales_d(sc, 16 * k + 8, D)
            acc0 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, xd, D, acc0)
            acc1 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, xd, D, acc1)
            acc2 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, xd, D, acc2)
            acc3 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, xd, D, acc3)
            acc4 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t4 * n_in + 32 * b, xs16, t4 * nb + b, xd, D, acc4)
            acc5 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t5 * n_in + 32 * b, xs16, t5 * nb + b, xd, D, acc5)
            acc6 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t6 * n_in + 32 * b, xs16, t6 * nb + b, xd, D, acc6)
            acc7 = _q6_tok_d(v0, v1, v2, v3, v4, v5, v6, v7, SA, SB, xq, t7 * n_in + 32 * b, xs16, t7 * nb + b, xd, D, acc7)
    _store8(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


# -- 512-bit pairs of row groups (``matmul_simd512``): the VNNI quad and octet above, lane for lane


@njit(**_JIT)
def _q6_half2(V0, V1, V2, V3, xq, xo, xs16, u):
    i = dpbusd64(bc_i32x16(xs16, u), V0, bc4_i8x64(xq, xo))
    i = dpbusd64(i, V1, bc4_i8x64(xq, xo + 4))
    i = dpbusd64(i, V2, bc4_i8x64(xq, xo + 8))
    return dpbusd64(i, V3, bc4_i8x64(xq, xo + 12))


@njit(**_JIT)
def _q6_tok2(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, xo, xs16, e, xd, facc):
    ia = mul_i32x16(_q6_half2(V0, V1, V2, V3, xq, xo, xs16, 2 * e), SA)
    ib = mul_i32x16(_q6_half2(V4, V5, V6, V7, xq, xo + 16, xs16, 2 * e + 1), SB)
    return fma_f32x16(cvt_f32x16(add_i32x16(ia, ib)), bc_f32x16(xd, e), facc)


@njit(**_JIT)
def _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, xo, xs16, e, xd, acc):
    ia = cvt_f32x16(_q6_half2(V0, V1, V2, V3, xq, xo, xs16, 2 * e))
    ib = cvt_f32x16(_q6_half2(V4, V5, V6, V7, xq, xo + 16, xs16, 2 * e + 1))
    return fma_f32x16(fma_f32x16(ib, SB, mul_f32x16(ia, SA)), bc_f32x16(xd, e), acc)


@njit(**_JIT)
def _q6_k_quad2(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out):
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
        f0 = zero_f32x16()
        f1 = zero_f32x16()
        f2 = zero_f32x16()
        f3 = zero_f32x16()
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            k1 = k + nb  # (group g + 1's block b)
            o = 512 * b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(qh, 64 * k + _PF // 2)
                prefetch(q, 128 * k1 + _PF)
                prefetch(q, 128 * k1 + _PF + 64)
                prefetch(qh, 64 * k1 + _PF // 2)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
                u0, u1, u2, u3, u4, u5, u6, u7 = _chunks8(q, qh, k1, True)
                V0, V1, V2, V3 = cat_i8x64(v0, u0), cat_i8x64(v1, u1), cat_i8x64(v2, u2), cat_i8x64(v3, u3)
                V4, V5, V6, V7 = cat_i8x64(v4, u4), cat_i8x64(v5, u5), cat_i8x64(v6, u6), cat_i8x64(v7, u7)
                if not last:  # a later unit of this pair will load them
                    _st8x2(buf, o, V0, V1, V2, V3, V4, V5, V6, V7)
            else:
                V0, V1, V2, V3, V4, V5, V6, V7 = _ld8x2(buf, o)
            if last:
                prefetch_l2(q, 128 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + nb) + 64)
                prefetch_l2(qh, 64 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb) + 64)
                prefetch_l2(qh, 64 * (k1 + 2 * nb))
            SA = ld2_i8x16_i32(sc, 16 * k, 16 * (k + nb))
            SB = ld2_i8x16_i32(sc, 16 * k + 8, 16 * (k + nb) + 8)
            f0 = _q6_tok2(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, xd, f0)
            f1 = _q6_tok2(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, xd, f1)
            f2 = _q6_tok2(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, xd, f2)
            f3 = _q6_tok2(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, xd, f3)
        D = ld2_f16x16(d, 8 * (g * nsb + s), 8 * ((g + 1) * nsb + s))
        acc0 = fma_f32x16(D, f0, acc0)
        acc1 = fma_f32x16(D, f1, acc1)
        acc2 = fma_f32x16(D, f2, acc2)
        acc3 = fma_f32x16(D, f3, acc3)
    _store4x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3)


@njit(**_JIT)
def _q6_k_oct2(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out):
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
        D = ld2_f16x16(d, 8 * (g * nsb + s), 8 * ((g + 1) * nsb + s))
        for j in range(8):
            b = 8 * s + j
            k = g * nb + b
            k1 = k + nb  # (group g + 1's block b)
            o = 512 * b
            if first:
                prefetch(q, 128 * k + _PF)
                prefetch(q, 128 * k + _PF + 64)
                prefetch(qh, 64 * k + _PF // 2)
                prefetch(q, 128 * k1 + _PF)
                prefetch(q, 128 * k1 + _PF + 64)
                prefetch(qh, 64 * k1 + _PF // 2)
                v0, v1, v2, v3, v4, v5, v6, v7 = _chunks8(q, qh, k, True)
                u0, u1, u2, u3, u4, u5, u6, u7 = _chunks8(q, qh, k1, True)
                V0, V1, V2, V3 = cat_i8x64(v0, u0), cat_i8x64(v1, u1), cat_i8x64(v2, u2), cat_i8x64(v3, u3)
                V4, V5, V6, V7 = cat_i8x64(v4, u4), cat_i8x64(v5, u5), cat_i8x64(v6, u6), cat_i8x64(v7, u7)
                if not last:  # a later unit of this pair will load them
                    _st8x2(buf, o, V0, V1, V2, V3, V4, V5, V6, V7)
            else:
                V0, V1, V2, V3, V4, V5, V6, V7 = _ld8x2(buf, o)
            if last:
                prefetch_l2(q, 128 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + nb) + 64)
                prefetch_l2(qh, 64 * (k1 + nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb))
                prefetch_l2(q, 128 * (k1 + 2 * nb) + 64)
                prefetch_l2(qh, 64 * (k1 + 2 * nb))
            SA = mul_f32x16(cvt_f32x16(ld2_i8x16_i32(sc, 16 * k, 16 * (k + nb))), D)
            SB = mul_f32x16(cvt_f32x16(ld2_i8x16_i32(sc, 16 * k + 8, 16 * (k + nb) + 8)), D)
            acc0 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t0 * n_in + 32 * b, xs16, t0 * nb + b, xd, acc0)
            acc1 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t1 * n_in + 32 * b, xs16, t1 * nb + b, xd, acc1)
            acc2 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t2 * n_in + 32 * b, xs16, t2 * nb + b, xd, acc2)
            acc3 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t3 * n_in + 32 * b, xs16, t3 * nb + b, xd, acc3)
            acc4 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t4 * n_in + 32 * b, xs16, t4 * nb + b, xd, acc4)
            acc5 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t5 * n_in + 32 * b, xs16, t5 * nb + b, xd, acc5)
            acc6 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t6 * n_in + 32 * b, xs16, t6 * nb + b, xd, acc6)
            acc7 = _q6_tok2_d(V0, V1, V2, V3, V4, V5, V6, V7, SA, SB, xq, t7 * n_in + 32 * b, xs16, t7 * nb + b, xd, acc7)
    _store8x2(out, out.shape[0] // T, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)


@njit(**_PJIT)
def q6_k_mm(q, qh, sc, d, xq, xd, xs16, xsd16, xsd32, T, out):
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
                        _q6_k_group(q, qh, sc, d, xq1, xd1, xs1, nb, h, out1)
                elif not pair and width == 8:
                    _q6_k_oct(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out)
                elif not pair:
                    _q6_k_quad(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out)
                elif width == 8:
                    _q6_k_oct2(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out)
                else:
                    _q6_k_quad2(q, qh, sc, d, xq, xd, xs16, nb, g, t0, T, buf, out)


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    n = b.shape[0] * b.shape[1]
    ql, qh, sc, d = gb.fields(b.reshape(n, 210), QType.Q6_K, 128, 64, 16, 2)
    low = gb.nibbles(ql.reshape(n * 2, 64)).reshape(n, 256)
    codes = (low | (gb.crumbs(qh) << 4)).reshape(n * 16, 16)  # 0..63
    scale = (gb.f16(d) * sc.view(np.int8).astype(np.float32)).reshape(-1)  # [n*16], exact
    return codes, scale, np.full(len(codes), 32, np.uint8)


TRAITS = QuantTraits(
    QType.Q6_K,
    dequantize,
    Kernels(
        "q6_k",
        ("q", "qh", "sc", "d"),
        ("uint8", "uint8", "int8", "uint16"),
        q6_k_mv,
        q6_k_mm,
        repack,
        fusable=True,
        planes=planes,
    ),
    OrtMapping("MatMulNBits", bits=8, block=16, convert=_ort_codes, zero_points="uint8"),
)
