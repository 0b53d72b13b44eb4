"""numba pieces every quantized type's kernels share: activation quantization, the token quad,
and the block dot products of the nib (+ crumb) planes.  The kernels themselves are in each
type's module (``kernels/quants/``); the layouts they read are described in ``matmul_pack``.

Activations (``quantize_act``) are llama.cpp's q8_0: per 32 values a float32 scale
``xd = max|x| / 127`` and int8 ``xq = round(x / xd)``, with block sums of ``xq``: ``xs16`` (Q6_K's
-32 offset per 16 values, in the form the host's kernel uses: with VNNI the int32 -32 x sum;
without, two int16 sums to subtract in int16) and ``xsd16 = xd * sum16``, ``xsd32 = xd * sum32``,
which turn unsigned weight codes back into signed values (``sum (q-8)*x = sum q*x - 8*sum x``).

Inner step (int8 types): 32 bytes = 4 values of each of 8 rows; ``vpmaddubsw`` against the 4
activation bytes broadcast to every lane, ``vpmaddwd`` with ones to int32 (lane r = row r); per
block the row sums meet the 8 row scales times the activation scale in one FMA.

Loops: ``*_mv`` (T = 1, decode) runs parallel over row groups, each thread one sequential stream
with a software prefetch ``_PF`` ahead; ``*_mm`` (T tokens) runs a row group (or a pair, 512-bit)
through units of 8, 4 or 1 tokens (``_units``: a short unit repeats the last token), parallel
over groups, units innermost, so a group's weights leave DRAM once per call. Shapes: ``G`` row
groups of 8, ``nb = n_in / 32`` blocks; planes and activations flat (1-D), outputs float32
``[T, G*8]`` flat. Every kernel releases the GIL. Measurements: docs/performance.md.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgebox.kernels.matmul_simd import (
    HAS_VNNI,
    absmax_f32,
    add_i16,
    add_i32,
    and_i8,
    bc4_i8x32,
    dpbusd,
    hadd_i16,
    hmax_f32,
    hsum_pairs_i32,
    ld_f32x8,
    ld_i8x32,
    maddubs,
    mul_f32_s,
    nib_hi,
    nib_lo,
    or_i8,
    prefetch,
    prefetch_l2,
    rint_i32,
    shl_w8,
    shr_w8,
    st_f32x8,
    st_i8x32,
    st_i32x8_i8,
    zero_i16,
    zero_i32,
)
from edgebox.kernels.matmul_simd512 import HAS_512, bc4_i8x64, dpbusd64, hi_f32x8, ld_i8x64, lo_f32x8, st_i8x64, zero_i32x16

_JIT = dict(nogil=True, cache=True)
_PJIT = dict(nogil=True, cache=True, parallel=True)
_PF = 4096  # software prefetch distance in the quant plane, bytes (32 blocks of Q4_0)
_RUNS = 64  # *_mm kernels that unpack codes once per row group: runs of groups (>= threads)


# =============================================================================================
# activations


@njit(**_JIT)
def _quant_row(x, t, n, xq, xd, xs16, xsd16, xsd32):
    """Row t of x (flat float32 [T*n]), 32 values per block: four 8-lane vectors, their absolute
    max, then the rounded codes and their two 16-value sums, all in registers."""
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
        a = add_i32(q0, q1)  # lane i: values i and i + 8 (same position in their chunks)
        c = add_i32(q2, q3)
        a0 = hsum_pairs_i32(a, 0)
        a1 = hsum_pairs_i32(a, 1)
        c0 = hsum_pairs_i32(c, 0)
        c1 = hsum_pairs_i32(c, 1)
        s0 = a0 + a1
        s1 = c0 + c1
        e = t * nb + b
        xd[e] = d
        if HAS_VNNI:  # the int32 the Q6_K dot product starts from
            xs16[2 * e] = -32 * s0
            xs16[2 * e + 1] = -32 * s1
        else:  # two int16, subtracted from the int16 pair sums
            xs16[2 * e] = ((32 * a0) & 0xFFFF) | ((32 * a1) << 16)
            xs16[2 * e + 1] = ((32 * c0) & 0xFFFF) | ((32 * c1) << 16)
        xsd16[2 * e] = d * np.float32(s0)
        xsd16[2 * e + 1] = d * np.float32(s1)
        xsd32[e] = d * np.float32(s0 + s1)


@njit(**_JIT)
def quantize_act(x, n, xq, xd, xs16, xsd16, xsd32):
    """x float32 [T*n_in] (flat, C order; n = n_in) -> xq int8 [T*n_in], xd f32 [T*nb], xs16 i32
    [T*2nb] (Q6_K's offset per 16 values: VNNI -32 * sum; else int16 32 * (sum of values
    0,1,4,5,8,9,12,13) | int16 32 * (sum of the other 8) << 16, each |.| <= 32512), xsd16 f32
    [T*2nb], xsd32 f32 [T*nb]."""
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
def _store4x2(out, ldo, g, t0, T, acc0, acc1, acc2, acc3):
    """A pair quad's 16-lane accumulators: the low halves to row group g, the high to g + 1."""
    _store4(out, ldo, g, t0, T, lo_f32x8(acc0), lo_f32x8(acc1), lo_f32x8(acc2), lo_f32x8(acc3))
    _store4(out, ldo, g + 1, t0, T, hi_f32x8(acc0), hi_f32x8(acc1), hi_f32x8(acc2), hi_f32x8(acc3))


@njit(**_JIT)
def _store8x2(out, ldo, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7):
    """A pair octet's 16-lane accumulators: the low halves to row group g, the high to g + 1."""
    _store8(
        out,
        ldo,
        g,
        t0,
        T,
        lo_f32x8(acc0),
        lo_f32x8(acc1),
        lo_f32x8(acc2),
        lo_f32x8(acc3),
        lo_f32x8(acc4),
        lo_f32x8(acc5),
        lo_f32x8(acc6),
        lo_f32x8(acc7),
    )
    _store8(
        out,
        ldo,
        g + 1,
        t0,
        T,
        hi_f32x8(acc0),
        hi_f32x8(acc1),
        hi_f32x8(acc2),
        hi_f32x8(acc3),
        hi_f32x8(acc4),
        hi_f32x8(acc5),
        hi_f32x8(acc6),
        hi_f32x8(acc7),
    )


@njit(**_JIT)
def _store8(out, ldo, g, t0, T, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7):
    """An octet's 8 accumulators to row group g of tokens t0..t0+7, those below T (the last octet
    may be short by 2 at most, ``_units``)."""
    st_f32x8(out, t0 * ldo + 8 * g, acc0)
    st_f32x8(out, (t0 + 1) * ldo + 8 * g, acc1)
    st_f32x8(out, (t0 + 2) * ldo + 8 * g, acc2)
    st_f32x8(out, (t0 + 3) * ldo + 8 * g, acc3)
    st_f32x8(out, (t0 + 4) * ldo + 8 * g, acc4)
    st_f32x8(out, (t0 + 5) * ldo + 8 * g, acc5)
    if t0 + 6 < T:
        st_f32x8(out, (t0 + 6) * ldo + 8 * g, acc6)
    if t0 + 7 < T:
        st_f32x8(out, (t0 + 7) * ldo + 8 * g, acc7)


@njit(**_JIT)
def _units(T):
    """How a batched kernel cuts T tokens: (octets, quads, singles). Octets while 8 tokens remain
    (one pass of a row group's codes serves 8 tokens: half the unpacking per token of a quad, and
    no second pass for T = 8, the batched decode step), and a short octet for 6 or 7 left; the
    rest r < 6 in quads, short ones computing their missing tokens anyway, except that a lone
    token left over (r = 1 or 5) takes the matvec's row-group step (the group's weights in L1/L2
    by then): ~2.4 tokens of a quad's work where a quad is 4, so T = 9 no longer costs what
    T = 12 does; two singles cost more than a short quad (docs/performance.md)."""
    n8 = T // 8
    r = T - 8 * n8
    if r >= 6:
        return n8 + 1, 0, 0
    n4 = (r + 2) // 4
    return n8, n4, max(r - 4 * n4, 0)


@njit(**_JIT)
def _unit(n8, n4, u):
    """(first token, width) of unit u of a row group (``_units``)."""
    if u < n8:
        return 8 * u, 8
    if u < n8 + n4:
        return 8 * n8 + 4 * (u - n8), 4
    return 8 * n8 + 4 * n4 + (u - n8 - n4), 1


@njit(**_JIT)
def _steps(T, G):
    """The parallel steps of a batched kernel whose units share nothing: every (pair of row groups,
    unit) in 512-bit lanes (``_units``), then every (row group, unit) of the groups left, 256-bit,
    two quads per octet and the same singles, so the same bits. Returns (count, plan of ``_step``)."""
    n8, n4, n1 = _units(T)
    G2 = G // 2 if HAS_512 else 0
    return G2 * (n8 + n4 + n1) + (G - 2 * G2) * (2 * n8 + n4 + n1), (G2, n8, n4, n1)


@njit(**_JIT)
def _step(plan, it):
    """Step it of ``_steps``: (first row group, first token, width, whether a pair of groups)."""
    G2, n8, n4, n1 = plan
    it = np.int64(it)  # (a prange index may be unsigned, and numba mixes uint64 with int64 in float64)
    nu = n8 + n4 + n1  # a pair's units
    if it < G2 * nu:
        p, u = divmod(it, nu)
        t0, width = _unit(n8, n4, u)
        return 2 * p, t0, width, True
    g, u = divmod(it - G2 * nu, 2 * n8 + n4 + n1)  # a lone group's: its quads, then the singles
    t0, width = _unit(0, 2 * n8 + n4, u)
    return 2 * G2 + g, t0, width, False


@njit(**_JIT)
def _runs(G):
    """Slots of a batched kernel whose units share a code buffer (a group's first unit unpacks
    the codes, the later ones load them): the row groups in pairs (512-bit), then those left one
    by one, in at most ``_RUNS`` contiguous runs, a buffer each. Returns (runs, slots, pairs)."""
    G2 = G // 2 if HAS_512 else 0
    return min(G - G2, _RUNS), G - G2, G2


@njit(**_JIT)
def _slot(s, G2):
    """Slot s of ``_runs``: (first row group, whether a pair of groups)."""
    if s < G2:
        return 2 * s, True
    return s + G2, False


@njit(**_JIT)
def _last(T, t0, width):
    """Whether the unit of ``width`` tokens at t0 is its row group's last octet or quad: it fetches
    the next group into L2 meanwhile, and the codes it unpacks are not used again (the singles
    after it, if any, read the group's weights from L1/L2 in the matvec's own way)."""
    return t0 + width >= T - _units(T)[2]


@njit(**_JIT)
def _token(xq, xd, xs16, xsd32, out, T, t):
    """Token t's activations and output row as a matvec's row-group step reads them (a single
    unit of ``_units``): views from token t on, no copies."""
    nb = xd.shape[0] // T
    return xq[32 * nb * t :], xd[nb * t :], xs16[2 * nb * t :], xsd32[nb * t :], out[out.shape[0] // T * t :]


@njit(**_JIT)
def _octet(T, t0):
    """The 8 token indices of an octet starting at t0 (past the end: the last token again)."""
    e = T - 1
    return t0, min(t0 + 1, e), min(t0 + 2, e), min(t0 + 3, e), min(t0 + 4, e), min(t0 + 5, e), min(t0 + 6, e), min(t0 + 7, e)


@njit(**_JIT)
def _quad(T, t0):
    """The 4 token indices of a quad starting at t0 (past the end: the last token again)."""
    return t0, min(t0 + 1, T - 1), min(t0 + 2, T - 1), min(t0 + 3, T - 1)


# =============================================================================================
# block dot products shared by several types


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
def _hbits(h, s):
    """Crumb s (bits 2s, 2s+1) of every byte, moved to bits 4-5 (word shifts: the mask drops
    what crosses from the neighbouring byte)."""
    if s == 0:
        return and_i8(shl_w8(h, 4), 0x30)
    if s == 1:
        return and_i8(shl_w8(h, 2), 0x30)
    if s == 2:
        return and_i8(h, 0x30)
    return and_i8(shr_w8(h, 2), 0x30)


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
def _st8(buf, o, v0, v1, v2, v3, v4, v5, v6, v7):
    """8 unpacked chunks (one block of a row group) to buf[o:o+256]."""
    st_i8x32(buf, o, v0)
    st_i8x32(buf, o + 32, v1)
    st_i8x32(buf, o + 64, v2)
    st_i8x32(buf, o + 96, v3)
    st_i8x32(buf, o + 128, v4)
    st_i8x32(buf, o + 160, v5)
    st_i8x32(buf, o + 192, v6)
    st_i8x32(buf, o + 224, v7)


@njit(**_JIT)
def _st8x2(buf, o, V0, V1, V2, V3, V4, V5, V6, V7):
    """8 unpacked 512-bit chunks (one block of a row-group pair) to buf[o:o+512]."""
    st_i8x64(buf, o, V0)
    st_i8x64(buf, o + 64, V1)
    st_i8x64(buf, o + 128, V2)
    st_i8x64(buf, o + 192, V3)
    st_i8x64(buf, o + 256, V4)
    st_i8x64(buf, o + 320, V5)
    st_i8x64(buf, o + 384, V6)
    st_i8x64(buf, o + 448, V7)


@njit(**_JIT)
def _ld8x2(buf, o):
    """The 8 chunks ``_st8x2`` stored at buf[o:o+512]."""
    return (
        ld_i8x64(buf, o),
        ld_i8x64(buf, o + 64),
        ld_i8x64(buf, o + 128),
        ld_i8x64(buf, o + 192),
        ld_i8x64(buf, o + 256),
        ld_i8x64(buf, o + 320),
        ld_i8x64(buf, o + 384),
        ld_i8x64(buf, o + 448),
    )


@njit(**_JIT)
def _ld8(buf, o):
    """The 8 chunks ``_st8`` stored at buf[o:o+256]."""
    return (
        ld_i8x32(buf, o),
        ld_i8x32(buf, o + 32),
        ld_i8x32(buf, o + 64),
        ld_i8x32(buf, o + 96),
        ld_i8x32(buf, o + 128),
        ld_i8x32(buf, o + 160),
        ld_i8x32(buf, o + 192),
        ld_i8x32(buf, o + 224),
    )


@njit(**_JIT)
def _dot32(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo, wide):
    """int32 row sums of one block's 8 chunks (u8 codes; chunk c: values 4c..4c+3) against
    x[xo:xo+32].  VNNI: 8 vpdpbusd, each with its activation broadcast folded in.  AVX2:
    vpmaddubsw products summed in int16, then one vpmaddwd; ``wide`` (codes above 4 bits, up to
    31) sums 4 chunks per int16 accumulator (4 * 2*31*127 = 31496), 4-bit codes all 8 (30480)."""
    if HAS_VNNI:
        i = dpbusd(zero_i32(), v0, bc4_i8x32(xq, xo))
        i = dpbusd(i, v1, bc4_i8x32(xq, xo + 4))
        i = dpbusd(i, v2, bc4_i8x32(xq, xo + 8))
        i = dpbusd(i, v3, bc4_i8x32(xq, xo + 12))
        i = dpbusd(i, v4, bc4_i8x32(xq, xo + 16))
        i = dpbusd(i, v5, bc4_i8x32(xq, xo + 20))
        i = dpbusd(i, v6, bc4_i8x32(xq, xo + 24))
        return dpbusd(i, v7, bc4_i8x32(xq, xo + 28))
    a = add_i16(
        add_i16(maddubs(v0, bc4_i8x32(xq, xo)), maddubs(v4, bc4_i8x32(xq, xo + 16))),
        add_i16(maddubs(v1, bc4_i8x32(xq, xo + 4)), maddubs(v5, bc4_i8x32(xq, xo + 20))),
    )
    b = add_i16(
        add_i16(maddubs(v2, bc4_i8x32(xq, xo + 8)), maddubs(v6, bc4_i8x32(xq, xo + 24))),
        add_i16(maddubs(v3, bc4_i8x32(xq, xo + 12)), maddubs(v7, bc4_i8x32(xq, xo + 28))),
    )
    if wide:
        return add_i32(hadd_i16(a), hadd_i16(b))
    return hadd_i16(add_i16(a, b))


@njit(**_JIT)
def _prefetch_pair(q, qo, nb, first, last, block=128):
    """A pair quad's software prefetch at block offset qo of group g (g + 1's is ``block`` * nb
    on; ``block``: the type's bytes per block of a group, 128 for Q4_0/Q4_K, 256 for Q8_0): the
    pair's first quad fetches both groups' blocks ``_PF`` per 128 bytes ahead from DRAM, its
    last one the next pair's into L2 (as the 256-bit quads do for one group)."""
    gap = block * nb
    ahead = _PF * (block // 128)
    for i in range(block // 64):
        if first:
            prefetch(q, qo + ahead + 64 * i)
            prefetch(q, qo + gap + ahead + 64 * i)
        if last:
            prefetch_l2(q, qo + 2 * gap + 64 * i)
            prefetch_l2(q, qo + 3 * gap + 64 * i)


@njit(**_JIT)
def _dot32x2(v0, v1, v2, v3, v4, v5, v6, v7, xq, xo):
    """``_dot32`` (VNNI) of two row groups at once: 512-bit chunks, group g's rows in lanes 0-7,
    g + 1's in 8-15 (``matmul_simd512``)."""
    i = dpbusd64(zero_i32x16(), v0, bc4_i8x64(xq, xo))
    i = dpbusd64(i, v1, bc4_i8x64(xq, xo + 4))
    i = dpbusd64(i, v2, bc4_i8x64(xq, xo + 8))
    i = dpbusd64(i, v3, bc4_i8x64(xq, xo + 12))
    i = dpbusd64(i, v4, bc4_i8x64(xq, xo + 16))
    i = dpbusd64(i, v5, bc4_i8x64(xq, xo + 20))
    i = dpbusd64(i, v6, bc4_i8x64(xq, xo + 24))
    return dpbusd64(i, v7, bc4_i8x64(xq, xo + 28))


@njit(**_JIT)
def _dot16(v0, v1, v2, v3, xq, xo):
    """Row sums of 16 values (4 chunks) against x[xo:xo+16] -> int32 x 8."""
    p = add_i16(maddubs(v0, bc4_i8x32(xq, xo)), maddubs(v1, bc4_i8x32(xq, xo + 4)))
    r = add_i16(maddubs(v2, bc4_i8x32(xq, xo + 8)), maddubs(v3, bc4_i8x32(xq, xo + 12)))
    return add_i32(hadd_i16(p), hadd_i16(r))
