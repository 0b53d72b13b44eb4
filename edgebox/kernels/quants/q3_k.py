"""Q3_K: super-blocks of 256 values: f16 d, 16 signed 6-bit scales sc (offset by 32), 3-bit codes
(low 2 bits qs, the 3rd inverted in hmask): w = d*(sc - 32) * (q - 4*!h).

numba: the planes path (v = q + 4 in 0..7, S = d*(sc - 32), M = 4 S per 16 values).  ORT: none
written (it would map exactly to bits=4 block 16, zero point 4; no target model uses Q3_K for its
big matmuls).
"""

from __future__ import annotations

import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants import planes
from edgebox.kernels.quants.traits import QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 32 bytes hmask (3rd bit, stored inverted: set means +0, clear means -4),
    # 64 bytes qs (low 2 bits), 12 bytes scales (16 x 6-bit, offset by 32), 2 bytes d (f16):
    # x = d*(sc - 32) * (q - 4*!h)
    qk = qt.block_size(QType.Q3_K)
    n = blocks.shape[0]
    hmask, qs, scales, d = gb.fields(blocks, QType.Q3_K, qk // 8, qk // 4, 12, 2)
    # 6-bit scale i: low 4 bits are nibble (i // 8) of byte i % 8, high 2 bits are bits
    # 2*(i // 4).. of byte 8 + i % 4.
    low = gb.nibbles(scales[:, :8])  # [n, 16]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high = ((scales[:, None, 8:] >> shifts) & 3).reshape(n, 16)  # [n, 16]
    sc = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [n, 16]
    dl = gb.f16(d) * sc.astype(np.float32)  # [n, 16]
    # value 32*b + l takes its 3rd bit from bit b of hmask[l] (b counts over both halves).
    h = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = gb.crumbs(qs).astype(np.int8) - ((h.reshape(n, qk) ^ 1) << 2).astype(np.int8)
    return (dl[:, :, None] * q.reshape(n, qk // 16, 16).astype(np.float32)).reshape(n, qk)


# ---------------------------------------------------------------------------------------------
# the planes path: w = S * v - M


def _values(b: np.ndarray):
    rows, nblk = b.shape[:2]  # hmask[32], qs[64], scales[12], d
    h = (b[..., None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    h = h.reshape(rows, nblk, 256)
    v = gb.crumbs(b[..., 32:96]) | (h << 2)  # q + 4, in 0..7
    d = P.f16(b[..., 108:110])
    S = d[..., None] * P.q3k_scales(b[..., 96:108]).astype(np.float32)
    return v.reshape(rows, -1), S.reshape(rows, -1), (4 * S).reshape(rows, -1)


TRAITS = QuantTraits(QType.Q3_K, dequantize, planes.kernels(QType.Q3_K, _values, sub=16, has_hi=False))
