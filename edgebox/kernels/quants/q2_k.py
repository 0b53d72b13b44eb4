"""Q2_K: super-blocks of 256 values: f16 d and dmin, 16 sub-blocks of 16 with 4-bit scale sc and
min m, 2-bit codes q: w = d*sc * q - dmin*m.

numba: the planes path (v = q, S = d*sc, M = dmin*m per 16 values).  ORT: none written (it would
map like Q4_K at block 16; no target model uses Q2_K for its big matmuls).
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
    # 16 bytes scales (low nibble: scale, high nibble: min, one per 16 values),
    # 64 bytes qs (2-bit), 2 bytes d (f16), 2 bytes dmin (f16): x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q2_K)
    n = blocks.shape[0]
    scales, qs, d, dmin = gb.fields(blocks, QType.Q2_K, qk // 16, qk // 4, 2, 2)
    dl = gb.f16(d) * (scales & 0x0F).astype(np.float32)  # [n, 16]
    ml = gb.f16(dmin) * (scales >> 4).astype(np.float32)  # [n, 16]
    q = gb.crumbs(qs).reshape(n, qk // 16, 16).astype(np.float32)  # [n, 16, 16]
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


# ---------------------------------------------------------------------------------------------
# the planes path: w = S * v - M


def _values(b: np.ndarray):
    rows = b.shape[0]
    sc = b[..., 0:16]  # scales[16], qs[64], d, dmin
    v = gb.crumbs(b[..., 16:80])
    d, dmin = P.f16(b[..., 80:82]), P.f16(b[..., 82:84])
    S = d[..., None] * (sc & 0x0F).astype(np.float32)
    M = dmin[..., None] * (sc >> 4).astype(np.float32)
    return v.reshape(rows, -1), S.reshape(rows, -1), M.reshape(rows, -1)


TRAITS = QuantTraits(QType.Q2_K, dequantize, planes.kernels(QType.Q2_K, _values, sub=16, has_hi=False))
