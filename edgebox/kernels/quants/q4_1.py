"""Q4_1: blocks of 32 values, f16 scale d and offset m, 4-bit codes q: w = d * q + m.

numba: the planes path (v = q, S = d, M = -m per 32 values).  ORT: MatMulNBits bits=4 block 32,
scale d, float zero point -m/d (exact to float32 rounding, but unpacked in ORT: the backends
keep it on numba).
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
    # 2 bytes d (f16), 2 bytes m (f16), 16 bytes qs (nibbles): x = d * q + m
    qk = qt.block_size(QType.Q4_1)
    d, m, qs = gb.fields(blocks, QType.Q4_1, 2, 2, qk // 2)
    q = gb.nibbles(qs).astype(np.float32)  # [n, 32]
    return gb.f16(d) * q + gb.f16(m)


# ---------------------------------------------------------------------------------------------
# the planes path: w = S * v - M


def _values(b: np.ndarray):
    rows = b.shape[0]
    d, m = P.f16(b[..., 0:2]), P.f16(b[..., 2:4])  # d, m, qs[16]: w = d*q + m
    v = gb.nibbles(b[..., 4:20])
    return v.reshape(rows, -1), d, -m


# ---------------------------------------------------------------------------------------------
# onnxruntime


def _ort_codes(b):
    d, m, qs = gb.fields(b.reshape(-1, 20), QType.Q4_1, 2, 2, 16)
    return gb.nibbles(qs), gb.f16(d)[:, 0], gb.f16(m)[:, 0]  # w = d * q + m


TRAITS = QuantTraits(
    QType.Q4_1,
    dequantize,
    planes.kernels(QType.Q4_1, _values, sub=32, has_hi=False),
    OrtMapping("MatMulNBits", bits=4, block=32, convert=_ort_codes, zero_points="float"),
)
