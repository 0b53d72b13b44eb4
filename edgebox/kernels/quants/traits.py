"""What one GGML tensor type is for the kernels: one record per type, filled in by that type's
module in this package and collected in ``registry.TYPES`` (as gguf-py's ``quants._type_traits``).

Block sizes are not here: they come only from ``edgebox.gguf.quant_types`` (gguf's table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgebox.gguf.quant_types import QType


@dataclass(frozen=True)
class Kernels:
    """A type's numba matmul path: the layout its rows are repacked into, and the kernels.

    path:      what ``PackedWeight.path`` says ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "planes", "float")
    arrays:    names of the repacked arrays, in the kernels' argument order
    flags:     constant arguments after the arrays (the planes kernels' has_hi, sub16)
    arg_types: numba types of arrays + flags (dtype names, "bool"): how ``fused`` tells the paths apart
    mv, mm:    one token (arrays, flags, xq, xd, xs16, xsd16, xsd32, out) / T tokens (..., T, out)
    repack:    (raw uint8 [n_out, row_bytes], n_out, n_in, use_numba=True) -> {name: array}
               (use_numba=False: the numpy formulation, the spec the numba repacker is tested on)
    fusable:   runs inside ``fused``'s one-call decode blocks
    planes:    (n_out, n_in) -> {name: array}, the repacked arrays allocated; a type that has it
               takes ``out=`` (row groups of those arrays) in repack, so stacked weights are
               repacked straight into place (``matmul.pack_rows``); None: they are concatenated first
    """

    path: str
    arrays: tuple[str, ...]
    arg_types: tuple[str, ...]
    mv: Callable
    mm: Callable
    repack: Callable | None
    fusable: bool
    flags: tuple = ()
    planes: Callable | None = None


@dataclass(frozen=True)
class OrtMapping:
    """How ``kernels.ort`` computes a type: ``op`` "Gemm" (a float32 copy of W) or "MatMulNBits"
    with ``bits`` per code in blocks of ``block`` values.  ``convert``: uint8 blocks [rows, nsb,
    type_size] -> (codes uint8 [n, block], scales float32 [n], zero points None | uint8 | float32
    [n]); ``zero_points``: "default" (2^(bits-1)), "uint8", or "float" (ORT then runs the weight
    unpacked, ~100x slower: built and tested, never chosen by the backends)."""

    op: str
    bits: int = 0
    block: int = 0
    convert: Callable | None = None
    zero_points: str = "default"


@dataclass(frozen=True)
class QuantTraits:
    """qtype; dequantize: uint8 blocks [n, type_size] -> float32 [n, block_size], bit-exact
    with gguf-py; kernels: its numba path; ort: its onnxruntime mapping, None if it has none."""

    qtype: QType
    dequantize: Callable
    kernels: Kernels
    ort: OrtMapping | None = None
