"""Q5_0: blocks of 32 values, f16 scale d, 5-bit codes q (4 low bits qs, 5th bit qh): w = d * (q - 16).

numba: the planes path (v = q with its crumb plane, S = d, M = 16 d).  ORT: MatMulNBits bits=8
block 32, code q (0..31), uint8 zero point 16: bit-exact.
"""

from __future__ import annotations

import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants import planes
from edgebox.kernels.quants.traits import OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 4 bytes qh (bit j = 5th bit of value j), 16 bytes qs (nibbles):
    # x = d * (q - 16)
    qk = qt.block_size(QType.Q5_0)
    d, qh, qs = gb.fields(blocks, QType.Q5_0, 2, qk // 8, qk // 2)
    q = (gb.nibbles(qs) | (gb.bits(qh) << 4)).astype(np.int8) - np.int8(16)  # [n, 32]
    return gb.f16(d) * q.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the planes path: w = S * v - M


def _values(b: np.ndarray):
    rows = b.shape[0]
    d = P.f16(b[..., 0:2])  # d, qh[4], qs[16]: w = d*(q - 16)
    qh = gb.bits(b[..., 2:6])
    v = gb.nibbles(b[..., 6:22]) | (qh << 4)
    return v.reshape(rows, -1), d, 16 * d


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    d, qh, qs = gb.fields(b.reshape(-1, 22), QType.Q5_0, 2, 4, 16)
    codes = gb.nibbles(qs) | (gb.bits(qh) << 4)  # [n, 32] 0..31
    return codes, gb.f16(d)[:, 0], np.full(len(codes), 16, np.uint8)


TRAITS = QuantTraits(
    QType.Q5_0,
    dequantize,
    planes.kernels(QType.Q5_0, _values, sub=32, has_hi=True),
    OrtMapping("MatMulNBits", bits=8, block=32, convert=_ort_codes, zero_points="uint8"),
)
