"""F32, F16, BF16: one value per "block"; never repacked (the kernels read the mmap rows in place).

numba: float32 activations (not quantized), rows as independent dot products (8-wide FMA
accumulators, one horizontal sum per row), 4 rows sharing each activation load; ``kind`` 0 = F32
(a float32 array), 1 = F16, 2 = BF16 (uint16 bit patterns).  ORT: Gemm(transB=1) on a float32
copy of W (exact: f16 and bf16 embed in float32).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edgebox.gguf.quant_types import QType
from edgebox.kernels.matmul_kernels import _JIT, _PJIT
from edgebox.kernels.matmul_simd import (
    bf16_to_f32,
    f16_to_f32,
    fma_f32,
    hsum_f32,
    ld_bf16x8,
    ld_f16x8,
    ld_f32x8,
    zero_f32,
)
from edgebox.kernels.quants import gguf_blocks as gb
from edgebox.kernels.quants.traits import Kernels, OrtMapping, QuantTraits

# ---------------------------------------------------------------------------------------------
# reference dequantize (numpy)


def _deq_f32(blocks: np.ndarray) -> np.ndarray:
    # 4 bytes: one float32
    return blocks.view(np.float32)


def _deq_f16(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes: one float16
    return gb.f16(blocks)


def _deq_bf16(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes: the upper half of a float32 (its low 16 mantissa bits are zero)
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# kernels


def _ldw(w, i, kind):
    """8 weights at w[i:i+8] as float32."""


@overload(_ldw)
def _ldw_impl(w, i, kind):
    if w.dtype == types.float32:
        return lambda w, i, kind: ld_f32x8(w, i)
    return lambda w, i, kind: ld_f16x8(w, i) if kind == 1 else ld_bf16x8(w, i)


def _w1(w, i, kind):
    """Weight w[i] as float32."""


@overload(_w1)
def _w1_impl(w, i, kind):
    if w.dtype == types.float32:
        return lambda w, i, kind: w[i]
    return lambda w, i, kind: f16_to_f32(w[i]) if kind == 1 else bf16_to_f32(w[i])


@njit(**_JIT)
def _float_rows(w, kind, n_in, r0, nr, x, xo, out, oo):
    """out[oo + i] = dot(w row r0+i, x[xo:xo+n_in]) for i < nr (nr <= 4)."""
    a0 = zero_f32()
    a1 = zero_f32()
    a2 = zero_f32()
    a3 = zero_f32()
    # rows past the end repeat the last row (results discarded)
    o0 = r0 * n_in
    o1 = min(r0 + 1, r0 + nr - 1) * n_in
    o2 = min(r0 + 2, r0 + nr - 1) * n_in
    o3 = min(r0 + 3, r0 + nr - 1) * n_in
    n8 = n_in - n_in % 8
    for k in range(0, n8, 8):
        xv = ld_f32x8(x, xo + k)
        a0 = fma_f32(_ldw(w, o0 + k, kind), xv, a0)
        a1 = fma_f32(_ldw(w, o1 + k, kind), xv, a1)
        a2 = fma_f32(_ldw(w, o2 + k, kind), xv, a2)
        a3 = fma_f32(_ldw(w, o3 + k, kind), xv, a3)
    s0 = hsum_f32(a0)
    s1 = hsum_f32(a1)
    s2 = hsum_f32(a2)
    s3 = hsum_f32(a3)
    for k in range(n8, n_in):
        xk = x[xo + k]
        s0 += _w1(w, o0 + k, kind) * xk
        s1 += _w1(w, o1 + k, kind) * xk
        s2 += _w1(w, o2 + k, kind) * xk
        s3 += _w1(w, o3 + k, kind) * xk
    out[oo] = s0
    if nr > 1:
        out[oo + 1] = s1
    if nr > 2:
        out[oo + 2] = s2
    if nr > 3:
        out[oo + 3] = s3


@njit(**_PJIT)
def float_mm(w, kind, n_out, n_in, x, T, out):
    """x float32 [T*n_in] -> out float32 [T*n_out]."""
    nr = (n_out + 3) // 4
    for it in prange(nr):
        r0 = 4 * it
        for t in range(T):
            _float_rows(w, kind, n_in, r0, min(4, n_out - r0), x, t * n_in, out, t * n_out + r0)


def _traits(qtype: QType, dequantize, dtype: str, kind: int) -> QuantTraits:
    return QuantTraits(
        qtype,
        dequantize,
        Kernels("float", ("w",), (dtype, "int"), float_mm, float_mm, None, fusable=False, flags=(kind,)),
        OrtMapping("Gemm"),
    )


F32 = _traits(QType.F32, _deq_f32, "float32", 0)
F16 = _traits(QType.F16, _deq_f16, "uint16", 1)
BF16 = _traits(QType.BF16, _deq_bf16, "uint16", 2)
