"""Field readers of GGUF blocks (numpy), shared by the types' dequantize and ORT converters.

Each takes uint8 blocks [n, type_size] or byte fields of them; the layouts themselves live in
each type's module.
"""

from __future__ import annotations

import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType


def fields(blocks: np.ndarray, qtype: QType, *sizes: int) -> list[np.ndarray]:
    """Split blocks [n, type_size] into byte fields [n, size_i], in file order.

    The sizes are derived from the block size in each type's layout; checking that they add up to
    gguf's type_size keeps the layouts written here tied to the one table of the file format.
    """
    if sum(sizes) != qt.type_size(qtype):
        raise AssertionError(f"{qtype.name} layout {sizes} does not add up to {qt.type_size(qtype)} bytes")
    return np.split(blocks, np.cumsum(sizes)[:-1], axis=1)


def f16(field: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] little-endian half floats -> float32 [n, 1] (exact: f16 embeds in f32)."""
    return field.view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> uint8 [..., 2m]: all low nibbles first, then all high nibbles.

    That is how the 32-value blocks pack values: value j in the low nibble of byte j, value
    j + 16 in the high nibble of byte j.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def bits(qh: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> uint8 [..., 8m]: bit i of the little-endian bit string, i.e. bit i % 8 of byte i // 8."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def crumbs(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 32h] -> uint8 [..., 128h]: the K-quants' 2-bit fields, value 32j + l of each
    32-byte group in bits 2j of its byte l."""
    sh = qs.shape
    q = qs.reshape(*sh[:-1], sh[-1] // 32, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return (q & 3).reshape(*sh[:-1], sh[-1] * 4)


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 6-bit scales and 8 6-bit mins (uint8 [..., 12] -> [..., 8] each), for Q4_K and Q5_K.

    Bytes 0-3: scales 0-3 (low 6 bits); bytes 4-7: mins 0-3 (low 6 bits); bytes 8-11: low
    nibble = low 4 bits of scale 4+i, high nibble = low 4 bits of min 4+i; the top 2 bits of
    bytes 0-3 / 4-7 are the top bits of scales 4-7 / mins 4-7.
    """
    s, m, lo = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([s & 63, (lo & 0x0F) | ((s >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 63, (lo >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn
