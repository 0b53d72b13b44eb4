"""Load-time repacking of GGUF weight rows into the "x8" layouts the int8 kernels read.

Every quantized type is repacked once, at load, into an *interleaved-rows* layout: output rows
are taken in groups of 8 (zero rows pad the matrix to an even number of groups), and inside a
group the values of one 32-value block are stored as 8 *chunks* of 32 bytes, chunk ``c``
holding values ``4c .. 4c+3`` of each of the 8 rows, row-major::

    chunk c, byte 4*r + i  =  value (row 8g + r, column 32b + 4c + i)

One ``vpmaddubsw`` of a chunk against the 4 activation bytes ``x[32b+4c : 32b+4c+4]`` broadcast
to all 8 dword lanes, followed by ``vpmaddwd`` with ones, leaves in 32-bit lane ``r`` the partial
dot product of row ``r``: the lanes of every vector in the kernels are the 8 rows.  Block sums
never need a horizontal add, the per-row scales of a block are one 8-wide vector, and a matvec
stores 8 finished outputs with one store.  (llama.cpp repacks Q4_0/Q4_K into interleaved
8-row blocks for AVX2 for the same reason; the llama.cpp sources were not available here, so
this layout was designed from the GGUF block formats in ref.py / gguf-py, not from its code.)

Planes: the 32-byte chunks are stored compactly.

* ``nib``  4-bit values: uint8 ``[G, nb, 4, 32]``; byte ``l`` holds chunk ``l`` in its low nibble
  and chunk ``l + 4`` in its high nibble (values ``j`` and ``j + 16``, as GGUF's own Q4_0 does).
* ``crumb`` 2-bit values: uint8 ``[G, nb, 2, 32]``; byte ``h`` holds chunk ``4h + s`` in bits
  ``2s .. 2s+1``.
* ``bits`` 1-bit values: uint8 ``[G, nb, 32]``; bit ``c`` of byte ``4r + i`` is chunk ``c``'s.
* ``bytes`` 8-bit values: int8 ``[G, nb, 8, 32]``, chunk ``c`` at ``32c``.

Per-row scales become arrays ``[G, n_blocks, 8]`` (the 8 rows' values contiguous).

What each type becomes (``G = 2 * ceil(n_out / 16)`` groups, ``nb = n_in / 32``):

=======  ====================================================================================
Q4_0     nib = q (0..15), d f16 [G, nb, 8]                      w = d * (q - 8)
Q8_0     bytes = q (int8), d f16 [G, nb, 8]                     w = d * q
Q4_K     nib = q, sc u8 / m u8 [G, nb, 8] (6-bit sub-block scale and min),
         d f16 / dmin f16 [G, n_in/256, 8]                      w = d*sc * q - dmin*m
Q5_K     as Q4_K (nib = q & 15) plus ``bits`` = q >> 4 (q 0..31)  w = d*sc * q - dmin*m
Q6_K     nib = q & 15, crumb = q >> 4 (q 0..63), sc int8 [G, n_in/16, 8], d f16 [G, n_in/256, 8]
                                                                w = d*sc * (q - 32)
others   (Q4_1 Q5_0 Q5_1 Q2_K Q3_K, the "planes" path): an unsigned value v (at most
         6 bits) as nib (+ crumb when it has a 5th bit), and exact float32 S and M per row and
         sub-block (16 or 32 values)                            w = S * v - M
=======  ====================================================================================

The fast types keep their data as compact as the file does (Q4_0, Q8_0 and Q6_K byte-for-byte
the same size; Q4_K +2.8% and Q5_K +2.3% for unpacking the 6-bit scales to bytes), since a
matvec is memory bound.  The planes path trades size for one kernel serving six rare formats:
a 4-bit plane even for 2-3-bit codes, f32 S/M per sub-block (+2 bits per value for 32-value
sub-blocks, +4 for 16).  Repacked size / file size: Q4_1 1.2, Q5_0 1.45, Q5_1 1.33, Q3_K 2.33,
Q2_K 3.05.  (Dedicated Q3_K / Q2_K layouts with byte scales, as Q4_K/Q6_K have, would bring them
to ~1.0: future work if such files matter.)

Float types (F32, F16, BF16) are not repacked: the kernels read the rows in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType

ROWS = 8                 # rows per interleaved group (the 8 lanes of a 256-bit int32 vector)
QK = 32                  # values per block of the repacked layouts
_CHUNK_ROWS = 4096       # rows repacked at a time by the numpy path (bounds the temporaries)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty whose data starts on an ``align``-byte boundary (whole 32-byte loads never
    straddle a cache line)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n].view(dtype).reshape(shape)


def n_groups(n_out: int) -> int:
    """Row groups of 8, rounded up to an even count (a layout the paired kernels of earlier
    versions needed; kept so that every packed shape and its padding stay as they were)."""
    return (n_out + 2 * ROWS - 1) // (2 * ROWS) * 2


# --- chunk transforms: values [rows, n_in] -> x8 planes -----------------------------------------

def _chunks(vals: np.ndarray) -> np.ndarray:
    """[8G', n_in] -> [G', nb, 8 chunks, 8 rows, 4]."""
    rows, n_in = vals.shape
    return vals.reshape(rows // ROWS, ROWS, n_in // QK, 8, 4).transpose(0, 2, 3, 1, 4)


def _nib_plane(vals: np.ndarray) -> np.ndarray:
    """4-bit values [8G', n_in] -> uint8 [G', nb, 4, 32]."""
    c = _chunks(vals)
    out = (c[:, :, :4] & 0x0F) | ((c[:, :, 4:] & 0x0F) << 4)
    return out.reshape(c.shape[0], c.shape[1], 4, 32)


def _crumb_plane(vals: np.ndarray) -> np.ndarray:
    """2-bit values [8G', n_in] -> uint8 [G', nb, 2, 32]."""
    c = _chunks(vals).astype(np.uint8)
    G_, nb = c.shape[:2]
    c = c.reshape(G_, nb, 2, 4, 32)                        # [.., h, s, 32]: chunk 4h + s
    out = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    return out


def _bit_plane(vals: np.ndarray) -> np.ndarray:
    """1-bit values [8G', n_in] -> uint8 [G', nb, 32]: bit c of byte 4r+i = chunk c's value."""
    c = _chunks(vals).astype(np.uint8)                    # [G', nb, 8 chunks, 8 rows, 4]
    out = np.zeros(c.shape[:2] + (ROWS, 4), np.uint8)
    for k in range(8):
        out |= (c[:, :, k] & 1) << k
    return out.reshape(c.shape[0], c.shape[1], 32)


def _byte_plane(vals: np.ndarray) -> np.ndarray:
    """8-bit values [8G', n_in] -> [G', nb, 8, 32]."""
    c = _chunks(vals)
    return c.reshape(c.shape[0], c.shape[1], 8, 32)


def _per_row(a: np.ndarray) -> np.ndarray:
    """[8G', k] -> [G', k, 8]: the 8 rows of a group contiguous."""
    rows, k = a.shape
    return a.reshape(rows // ROWS, ROWS, k).transpose(0, 2, 1)


def _f16_bits(two_bytes: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian -> uint16 [...]."""
    return two_bytes[..., 0].astype(np.uint16) | (two_bytes[..., 1].astype(np.uint16) << 8)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    return _f16_bits(two_bytes).view(np.float16).astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] GGUF nibble bytes -> [..., 32] values (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits_le(qh: np.ndarray) -> np.ndarray:
    """[..., m] -> [..., 8m] bit i of the little-endian bit string."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """[..., 32h] -> [..., 128h]: K-quant 2-bit fields (value 32j + l in bits 2j of byte l)."""
    sh = qs.shape
    q = qs.reshape(*sh[:-1], sh[-1] // 32, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return (q & 3).reshape(*sh[:-1], sh[-1] * 4)


def _scale_min_k4(s12: np.ndarray):
    """[..., 12] -> (sc [..., 8], m [..., 8]) 6-bit scales and mins of Q4_K/Q5_K."""
    s, m, lo = s12[..., 0:4], s12[..., 4:8], s12[..., 8:12]
    sc = np.concatenate([s & 63, (lo & 0x0F) | ((s >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 63, (lo >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn


def _q3k_scales(s12: np.ndarray) -> np.ndarray:
    """[..., 12] -> int [..., 16] signed 6-bit scales of Q3_K (already minus 32)."""
    low = np.concatenate([s12[..., :8] & 0x0F, s12[..., :8] >> 4], axis=-1)
    sh = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    high = ((s12[..., None, 8:12] >> sh) & 3).reshape(*s12.shape[:-1], 16)
    return (low | (high << 4)).astype(np.int16) - 32


# --- per-type unpacking of a chunk of raw rows ---------------------------------------------------

def _blocks(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """uint8 [rows, row_bytes] -> [rows, n_blocks, type_size]."""
    ts = qt.type_size(qtype)
    return raw.reshape(raw.shape[0], raw.shape[1] // ts, ts)


def _planes_values(raw: np.ndarray, qtype: QType):
    """Rare types -> (v uint8 [rows, n_in], S f32 [rows, n_sub], M f32 [rows, n_sub], sub).

    w = S * v - M exactly (every S and M is an f16 times a small integer: exact in float32).
    """
    b = _blocks(raw, qtype)
    rows, nblk = b.shape[:2]
    if qtype == QType.Q4_1:            # d, m, qs[16]: w = d*q + m
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        v = _nibbles32(b[..., 4:20])
        return v.reshape(rows, -1), d, -m, 32
    if qtype in (QType.Q5_0, QType.Q5_1):
        d = _f16(b[..., 0:2])
        o = 2 if qtype == QType.Q5_0 else 4
        m = None if qtype == QType.Q5_0 else _f16(b[..., 2:4])
        qh = _bits_le(b[..., o:o + 4])
        v = _nibbles32(b[..., o + 4:o + 20]) | (qh << 4)
        M = 16 * d if m is None else -m              # Q5_0: d*(q - 16); Q5_1: d*q + m
        return v.reshape(rows, -1), d, M, 32
    if qtype == QType.Q2_K:            # scales[16], qs[64], d, dmin: d*sc*q - dmin*m, per 16
        sc = b[..., 0:16]
        v = _crumbs(b[..., 16:80])
        d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
        S = d[..., None] * (sc & 0x0F).astype(np.float32)
        M = dmin[..., None] * (sc >> 4).astype(np.float32)
        return v.reshape(rows, -1), S.reshape(rows, -1), M.reshape(rows, -1), 16
    if qtype == QType.Q3_K:            # hmask[32], qs[64], scales[12], d: d*(sc-32)*(q - 4*!h)
        h = (b[..., None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        h = h.reshape(rows, nblk, 256)
        v = _crumbs(b[..., 32:96]) | (h << 2)         # q + 4, in 0..7
        d = _f16(b[..., 108:110])
        S = d[..., None] * _q3k_scales(b[..., 96:108]).astype(np.float32)
        return v.reshape(rows, -1), S.reshape(rows, -1), (4 * S).reshape(rows, -1), 16
    if qtype == QType.Q5_K:            # d, dmin, scales[12], qh[32], qs[128]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scale_min_k4(b[..., 4:16])
        low = _nibbles32(b[..., 48:176].reshape(rows, nblk, 4, 32)).reshape(rows, nblk, 256)
        hi = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        v = low | (hi.reshape(rows, nblk, 256) << 4)
        S = d[..., None] * sc.astype(np.float32)
        M = dmin[..., None] * mn.astype(np.float32)
        return v.reshape(rows, -1), S.reshape(rows, -1), M.reshape(rows, -1), 32
    raise ValueError(f"no planes layout for {qtype.name}")


PLANES_TYPES = (QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q2_K, QType.Q3_K)
PLANES_HAS_HI = {QType.Q5_0: True, QType.Q5_1: True}


# --- numba repackers for the fast types (load time: ~0.3-1.7 GB/s instead of numpy's ~0.1) ---
# Each takes the raw rows [n_out, row_bytes] (any strides) and fills the preallocated planes;
# rows >= n_out (the padding of the last groups) are zero.

_RJIT = dict(nogil=True, cache=True, parallel=True)


@njit(**_RJIT)
def _repack_q4_0(raw, n_out, q, d):
    G, nb = q.shape[0], q.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for b in range(nb):
                o = 18 * b
                if row < n_out:
                    d[g, b, r] = np.uint16(raw[row, o]) | (np.uint16(raw[row, o + 1]) << 8)
                else:
                    d[g, b, r] = 0
                for l in range(4):
                    for i in range(4):
                        q[g, b, l, 4 * r + i] = raw[row, o + 2 + 4 * l + i] if row < n_out else 0


@njit(**_RJIT)
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


@njit(**_RJIT)
def _repack_q4_k(raw, n_out, q, sc, m, d, dmin):
    G, nsb = d.shape[0], d.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for s in range(nsb):
                o = 144 * s
                if row >= n_out:
                    d[g, s, r] = 0
                    dmin[g, s, r] = 0
                    for j in range(8):
                        sc[g, 8 * s + j, r] = 0
                        m[g, 8 * s + j, r] = 0
                        for l in range(4):
                            for i in range(4):
                                q[g, 8 * s + j, l, 4 * r + i] = 0
                    continue
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
                    qo = o + 16 + 32 * (j // 2)
                    sh = 4 * (j % 2)
                    for l in range(4):
                        for i in range(4):
                            lo = (raw[row, qo + 4 * l + i] >> sh) & 0x0F
                            hi = (raw[row, qo + 16 + 4 * l + i] >> sh) & 0x0F
                            q[g, 8 * s + j, l, 4 * r + i] = lo | (hi << 4)


@njit(**_RJIT)
def _repack_q5_k(raw, n_out, q, qb, sc, m, d, dmin):
    G, nsb = d.shape[0], d.shape[1]
    for g in prange(G):
        for r in range(ROWS):
            row = ROWS * g + r
            for s in range(nsb):
                o = 176 * s
                if row >= n_out:
                    d[g, s, r] = 0
                    dmin[g, s, r] = 0
                    for j in range(8):
                        sc[g, 8 * s + j, r] = 0
                        m[g, 8 * s + j, r] = 0
                        for l in range(4):
                            for i in range(4):
                                q[g, 8 * s + j, l, 4 * r + i] = 0
                        for i in range(4):
                            qb[g, 8 * s + j, 4 * r + i] = 0
                    continue
                d[g, s, r] = np.uint16(raw[row, o]) | (np.uint16(raw[row, o + 1]) << 8)
                dmin[g, s, r] = np.uint16(raw[row, o + 2]) | (np.uint16(raw[row, o + 3]) << 8)
                for j in range(8):
                    if j < 4:
                        sc[g, 8 * s + j, r] = raw[row, o + 4 + j] & 63
                        m[g, 8 * s + j, r] = raw[row, o + 8 + j] & 63
                    else:
                        sc[g, 8 * s + j, r] = (raw[row, o + 8 + j] & 0x0F) | ((raw[row, o + j] >> 6) << 4)
                        m[g, 8 * s + j, r] = (raw[row, o + 8 + j] >> 4) | ((raw[row, o + 4 + j] >> 6) << 4)
                    # value v of sub-block j: nibble j % 2 of qs[32 * (j // 2) + v], 5th bit = bit j of qh[v]
                    qo = o + 48 + 32 * (j // 2)
                    sh = 4 * (j % 2)
                    for l in range(4):
                        for i in range(4):
                            lo = (raw[row, qo + 4 * l + i] >> sh) & 0x0F
                            hi = (raw[row, qo + 16 + 4 * l + i] >> sh) & 0x0F
                            q[g, 8 * s + j, l, 4 * r + i] = lo | (hi << 4)
                    for i in range(4):
                        x = 0
                        for c in range(8):
                            x |= ((raw[row, o + 16 + 4 * c + i] >> j) & 1) << c
                        qb[g, 8 * s + j, 4 * r + i] = x


@njit(**_RJIT)
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
                            q[g, b, l, 4 * r + i] = (v[32 * jj + 4 * l + i] & 0x0F) | \
                                ((v[32 * jj + 16 + 4 * l + i] & 0x0F) << 4)
                    for h2 in range(2):
                        for i in range(4):
                            x = 0
                            for s2 in range(4):
                                x |= (v[32 * jj + 4 * (4 * h2 + s2) + i] >> 4) << (2 * s2)
                            qh[g, b, h2, 4 * r + i] = x


# --- the repackers ------------------------------------------------------------------------------

def _pad_rows(raw: np.ndarray, r0: int, r1: int, rows: int) -> np.ndarray:
    """raw[r0:r1] padded with zero rows to ``rows`` rows."""
    part = raw[r0:r1]
    if part.shape[0] == rows:
        return part
    out = np.zeros((rows, raw.shape[1]), dtype=raw.dtype)
    out[:part.shape[0]] = part
    return out


def repack(raw: np.ndarray, qtype: QType, n_out: int, n_in: int, use_numba: bool = True) -> dict[str, np.ndarray]:
    """raw uint8 [n_out, row_bytes] (any strides; never modified) -> dict of x8 arrays.

    The fast types are repacked by numba loops (use_numba=False: the numpy formulation, kept as
    their specification and compared against in the tests); the planes types by numpy.
    """
    G = n_groups(n_out)
    nb = n_in // QK
    nsb = n_in // 256
    out: dict[str, np.ndarray] = {}
    if qtype == QType.Q4_0:
        out["q"] = aligned_empty((G, nb, 4, 32), np.uint8)
        out["d"] = aligned_empty((G, nb, ROWS), np.uint16)
    elif qtype == QType.Q8_0:
        out["q"] = aligned_empty((G, nb, 8, 32), np.int8)
        out["d"] = aligned_empty((G, nb, ROWS), np.uint16)
    elif qtype == QType.Q4_K:
        out["q"] = aligned_empty((G, nb, 4, 32), np.uint8)
        out["sc"] = aligned_empty((G, nb, ROWS), np.uint8)
        out["m"] = aligned_empty((G, nb, ROWS), np.uint8)
        out["d"] = aligned_empty((G, nsb, ROWS), np.uint16)
        out["dmin"] = aligned_empty((G, nsb, ROWS), np.uint16)
    elif qtype == QType.Q5_K:
        out["q"] = aligned_empty((G, nb, 4, 32), np.uint8)
        out["qb"] = aligned_empty((G, nb, 32), np.uint8)
        out["sc"] = aligned_empty((G, nb, ROWS), np.uint8)
        out["m"] = aligned_empty((G, nb, ROWS), np.uint8)
        out["d"] = aligned_empty((G, nsb, ROWS), np.uint16)
        out["dmin"] = aligned_empty((G, nsb, ROWS), np.uint16)
    elif qtype == QType.Q6_K:
        out["q"] = aligned_empty((G, nb, 4, 32), np.uint8)
        out["qh"] = aligned_empty((G, nb, 2, 32), np.uint8)
        out["sc"] = aligned_empty((G, n_in // 16, ROWS), np.int8)
        out["d"] = aligned_empty((G, nsb, ROWS), np.uint16)
    elif qtype in PLANES_TYPES:
        sub = 16 if qtype in (QType.Q2_K, QType.Q3_K) else 32
        out["q"] = aligned_empty((G, nb, 4, 32), np.uint8)
        out["qh"] = aligned_empty((G, nb, 2, 32) if PLANES_HAS_HI.get(qtype) else (0, 0, 2, 32), np.uint8)
        out["S"] = aligned_empty((G, n_in // sub, ROWS), np.float32)
        out["M"] = aligned_empty((G, n_in // sub, ROWS), np.float32)
    else:
        raise ValueError(f"repack: unsupported type {qtype.name}")

    if use_numba and qtype in (QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K):
        # A strided shard (column slice of the mmap) is copied to contiguous rows first: one
        # compiled repacker per type instead of two, for a transient shard-sized copy.
        raw = np.ascontiguousarray(raw)
    if use_numba and qtype == QType.Q4_0:
        _repack_q4_0(raw, n_out, out["q"], out["d"])
        return out
    if use_numba and qtype == QType.Q8_0:
        _repack_q8_0(raw, n_out, out["q"], out["d"])
        return out
    if use_numba and qtype == QType.Q4_K:
        _repack_q4_k(raw, n_out, out["q"], out["sc"], out["m"], out["d"], out["dmin"])
        return out
    if use_numba and qtype == QType.Q5_K:
        _repack_q5_k(raw, n_out, out["q"], out["qb"], out["sc"], out["m"], out["d"], out["dmin"])
        return out
    if use_numba and qtype == QType.Q6_K:
        _repack_q6_k(raw, n_out, out["q"], out["qh"], out["sc"], out["d"])
        return out
    for r0 in range(0, G * ROWS, _CHUNK_ROWS):
        r1 = min(G * ROWS, r0 + _CHUNK_ROWS)
        g0, g1 = r0 // ROWS, r1 // ROWS
        part = _pad_rows(raw, r0, min(r1, n_out), r1 - r0)
        b = _blocks(part, qtype)
        if qtype == QType.Q4_0:
            # GGUF byte j of a block = value j (low nibble) | value j+16 (high): already the nib
            # plane pairing, so only the 4-byte groups move.
            qs = b[..., 2:18]                                          # [rows, nb, 16]
            out["q"][g0:g1] = qs.reshape(-1, ROWS, nb, 4, 4).transpose(0, 2, 3, 1, 4).reshape(-1, nb, 4, 32)
            out["d"][g0:g1] = _per_row(_f16_bits(b[..., 0:2]))
        elif qtype == QType.Q8_0:
            out["q"][g0:g1] = _byte_plane(b[..., 2:34].reshape(b.shape[0], -1).view(np.int8))
            out["d"][g0:g1] = _per_row(_f16_bits(b[..., 0:2]))
        elif qtype == QType.Q4_K:
            rows, ns = b.shape[:2]
            out["d"][g0:g1] = _per_row(_f16_bits(b[..., 0:2]))
            out["dmin"][g0:g1] = _per_row(_f16_bits(b[..., 2:4]))
            sc, mn = _scale_min_k4(b[..., 4:16])                       # [rows, ns, 8]
            out["sc"][g0:g1] = _per_row(sc.reshape(rows, -1))
            out["m"][g0:g1] = _per_row(mn.reshape(rows, -1))
            v = _nibbles32(b[..., 16:144].reshape(rows, ns, 4, 32)).reshape(rows, -1)
            out["q"][g0:g1] = _nib_plane(v)
        elif qtype == QType.Q5_K:
            rows, ns = b.shape[:2]
            out["d"][g0:g1] = _per_row(_f16_bits(b[..., 0:2]))
            out["dmin"][g0:g1] = _per_row(_f16_bits(b[..., 2:4]))
            sc, mn = _scale_min_k4(b[..., 4:16])
            out["sc"][g0:g1] = _per_row(sc.reshape(rows, -1))
            out["m"][g0:g1] = _per_row(mn.reshape(rows, -1))
            v, _S, _M, _sub = _planes_values(part, qtype)
            out["q"][g0:g1] = _nib_plane(v)
            out["qb"][g0:g1] = _bit_plane(v >> 4)
        elif qtype == QType.Q6_K:
            rows, ns = b.shape[:2]
            low = _nibbles32(b[..., 0:128].reshape(rows, ns, 2, 64)).reshape(rows, ns, 256)
            v = (low | (_crumbs(b[..., 128:192]) << 4)).reshape(rows, -1)
            out["q"][g0:g1] = _nib_plane(v)
            out["qh"][g0:g1] = _crumb_plane(v >> 4)
            out["sc"][g0:g1] = _per_row(b[..., 192:208].reshape(rows, -1).view(np.int8))
            out["d"][g0:g1] = _per_row(_f16_bits(b[..., 208:210]))
        else:
            v, S, M, _sub = _planes_values(part, qtype)
            out["q"][g0:g1] = _nib_plane(v)
            if PLANES_HAS_HI.get(qtype):
                out["qh"][g0:g1] = _crumb_plane(v >> 4)
            out["S"][g0:g1] = _per_row(S.astype(np.float32))
            out["M"][g0:g1] = _per_row(M.astype(np.float32))
    return out
