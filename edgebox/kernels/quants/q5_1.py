"""Q5_1: blocks of 32 values, f16 scale d and offset m, 5-bit codes q: w = d * q + m.

numba: the planes path (v = q with its crumb plane, S = d, M = -m).  ORT: none (5-bit codes need
bits=8 and a float zero point, which ORT's CPU kernel refuses).
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
    # 2 bytes d (f16), 2 bytes m (f16), 4 bytes qh (5th bits), 16 bytes qs (nibbles):
    # x = d * q + m
    qk = qt.block_size(QType.Q5_1)
    d, m, qh, qs = gb.fields(blocks, QType.Q5_1, 2, 2, qk // 8, qk // 2)
    q = (gb.nibbles(qs) | (gb.bits(qh) << 4)).astype(np.float32)  # [n, 32]
    return gb.f16(d) * q + gb.f16(m)


# ---------------------------------------------------------------------------------------------
# the planes path: w = S * v - M


def _values(b: np.ndarray):
    rows = b.shape[0]
    d, m = P.f16(b[..., 0:2]), P.f16(b[..., 2:4])  # d, m, qh[4], qs[16]: w = d*q + m
    qh = gb.bits(b[..., 4:8])
    v = gb.nibbles(b[..., 8:24]) | (qh << 4)
    return v.reshape(rows, -1), d, -m


TRAITS = QuantTraits(QType.Q5_1, dequantize, planes.kernels(QType.Q5_1, _values, sub=32, has_hi=True))
