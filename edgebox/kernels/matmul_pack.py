"""The "x8" layout the int8 kernels read, and the helpers every type's repacker shares.

Every quantized type is repacked once, at load, into an *interleaved-rows* layout: output rows
are taken in groups of 8 (zero rows pad the matrix to an even number of groups), and inside a
group the values of one 32-value block are stored as 8 *chunks* of 32 bytes, chunk ``c``
holding values ``4c .. 4c+3`` of each of the 8 rows, row-major::

    chunk c, byte 4*r + i  =  value (row 8g + r, column 32b + 4c + i)

One ``vpmaddubsw`` of a chunk against 4 activation bytes broadcast to the 8 dword lanes, then
``vpmaddwd`` with ones, leaves in lane ``r`` the partial dot product of row ``r``: block sums
need no horizontal add, a block's row scales are one 8-wide vector, and a matvec stores 8
outputs with one store (llama.cpp's AVX2 repacking interleaves 8 rows for the same reason; this
layout was designed from the GGUF block formats in gguf-py, not from llama.cpp's code).

Planes store the chunks compactly: ``nib`` 4-bit, uint8 ``[G, nb, 4, 32]`` (byte ``l``: chunk
``l`` in the low nibble, chunk ``l + 4`` in the high one, as GGUF's own Q4_0); ``crumb`` 2-bit,
``[G, nb, 2, 32]`` (byte ``h``: chunk ``4h + s`` in bits ``2s .. 2s+1``); ``bits`` 1-bit,
``[G, nb, 32]`` (bit ``c`` of byte ``4r + i`` is chunk ``c``'s); ``bytes`` int8 ``[G, nb, 8, 32]``.
Per-row scales are ``[G, n_blocks, 8]``; ``G = 2 * ceil(n_out / 16)``, ``nb = n_in / 32``. What
each type becomes is written in its module (``kernels/quants/``). A matvec is memory bound, so
the fast types stay as compact as the file; float types are not repacked (read in place).
"""

from __future__ import annotations

import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType

ROWS = 8  # rows per interleaved group (the 8 lanes of a 256-bit int32 vector)
QK = 32  # values per block of the repacked layouts
CHUNK_ROWS = 4096  # rows repacked at a time by the numpy path (bounds the temporaries)

# the numba repackers (load time: ~0.3-1.7 GB/s instead of numpy's ~0.1) take the raw rows
# [n_out, row_bytes] and fill the preallocated planes; rows >= n_out (the padding) are zero
RJIT = dict(nogil=True, cache=True, parallel=True)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty whose data starts on an ``align``-byte boundary (whole 32-byte loads never
    straddle a cache line)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + n].view(dtype).reshape(shape)


def n_groups(n_out: int) -> int:
    """Row groups of 8, rounded up to an even count (a layout the paired kernels of earlier
    versions needed; kept so that every packed shape and its padding stay as they were)."""
    return (n_out + 2 * ROWS - 1) // (2 * ROWS) * 2


# ---------------------------------------------------------------------------------------------
# chunk transforms: values [rows, n_in] -> x8 planes


def chunks(vals: np.ndarray) -> np.ndarray:
    """[8G', n_in] -> [G', nb, 8 chunks, 8 rows, 4]."""
    rows, n_in = vals.shape
    return vals.reshape(rows // ROWS, ROWS, n_in // QK, 8, 4).transpose(0, 2, 3, 1, 4)


def nib_plane(vals: np.ndarray) -> np.ndarray:
    """4-bit values [8G', n_in] -> uint8 [G', nb, 4, 32]."""
    c = chunks(vals)
    out = (c[:, :, :4] & 0x0F) | ((c[:, :, 4:] & 0x0F) << 4)
    return out.reshape(c.shape[0], c.shape[1], 4, 32)


def crumb_plane(vals: np.ndarray) -> np.ndarray:
    """2-bit values [8G', n_in] -> uint8 [G', nb, 2, 32]."""
    c = chunks(vals).astype(np.uint8)
    G_, nb = c.shape[:2]
    c = c.reshape(G_, nb, 2, 4, 32)  # [.., h, s, 32]: chunk 4h + s
    out = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    return out


def bit_plane(vals: np.ndarray) -> np.ndarray:
    """1-bit values [8G', n_in] -> uint8 [G', nb, 32]: bit c of byte 4r+i = chunk c's value."""
    c = chunks(vals).astype(np.uint8)  # [G', nb, 8 chunks, 8 rows, 4]
    out = np.zeros(c.shape[:2] + (ROWS, 4), np.uint8)
    for k in range(8):
        out |= (c[:, :, k] & 1) << k
    return out.reshape(c.shape[0], c.shape[1], 32)


def byte_plane(vals: np.ndarray) -> np.ndarray:
    """8-bit values [8G', n_in] -> [G', nb, 8, 32]."""
    c = chunks(vals)
    return c.reshape(c.shape[0], c.shape[1], 8, 32)


def per_row(a: np.ndarray) -> np.ndarray:
    """[8G', k] -> [G', k, 8]: the 8 rows of a group contiguous."""
    rows, k = a.shape
    return a.reshape(rows // ROWS, ROWS, k).transpose(0, 2, 1)


def f16_bits(two_bytes: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian -> uint16 [...]."""
    return two_bytes[..., 0].astype(np.uint16) | (two_bytes[..., 1].astype(np.uint16) << 8)


def f16(two_bytes: np.ndarray) -> np.ndarray:
    return f16_bits(two_bytes).view(np.float16).astype(np.float32)


def q3k_scales(s12: np.ndarray) -> np.ndarray:
    """[..., 12] -> int [..., 16] signed 6-bit scales of Q3_K (already minus 32)."""
    low = np.concatenate([s12[..., :8] & 0x0F, s12[..., :8] >> 4], axis=-1)
    sh = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    high = ((s12[..., None, 8:12] >> sh) & 3).reshape(*s12.shape[:-1], 16)
    return (low | (high << 4)).astype(np.int16) - 32


def blocks(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """uint8 [rows, row_bytes] -> [rows, n_blocks, type_size]."""
    ts = qt.type_size(qtype)
    return raw.reshape(raw.shape[0], raw.shape[1] // ts, ts)


def pad_rows(raw: np.ndarray, r0: int, r1: int, rows: int) -> np.ndarray:
    """raw[r0:r1] padded with zero rows to ``rows`` rows."""
    part = raw[r0:r1]
    if part.shape[0] == rows:
        return part
    out = np.zeros((rows, raw.shape[1]), dtype=raw.dtype)
    out[: part.shape[0]] = part
    return out


def repack_by_chunks(raw: np.ndarray, qtype: QType, n_out: int, out: dict, fill) -> dict:
    """The numpy repack loop: ``fill(out, part, blocks, g0, g1)`` for CHUNK_ROWS rows at a time
    (part: raw rows, the last group padded with zero rows; blocks: part as [rows, n_blocks,
    type_size]; g0:g1 the row groups they fill)."""
    G = n_groups(n_out)
    for r0 in range(0, G * ROWS, CHUNK_ROWS):
        r1 = min(G * ROWS, r0 + CHUNK_ROWS)
        g0, g1 = r0 // ROWS, r1 // ROWS
        part = pad_rows(raw, r0, min(r1, n_out), r1 - r0)
        fill(out, part, blocks(part, qtype), g0, g1)
    return out
